package main

import (
	"context"
	"encoding/json"
	"fmt"
	"mime"
	"slices"
	"strings"

	apidiscoveryv2 "k8s.io/api/apidiscovery/v2"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/discovery"
	"k8s.io/client-go/rest"
)

// The Accept header client-go's discovery client sends for /apis (aggregated discovery v2,
// v2beta1, then the legacy documents).
const aggregatedAccept = "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList,application/json;g=apidiscovery.k8s.io;v=v2beta1;as=APIGroupDiscoveryList,application/json"

// resourceFacts is what Steve builds a schema from, comparable across both discovery forms.
type resourceFacts struct {
	Namespaced   bool
	Kind         string
	SingularName string
	Verbs        []string
	ShortNames   []string
	Categories   []string
}

func (f resourceFacts) String() string {
	b, _ := json.Marshal(f)
	return string(b)
}

func sorted(s []string) []string {
	out := slices.Clone(s)
	slices.Sort(out)
	return out
}

func factsOfLegacy(r metav1.APIResource) resourceFacts {
	return resourceFacts{
		Namespaced:   r.Namespaced,
		Kind:         r.Kind,
		SingularName: r.SingularName,
		Verbs:        sorted(r.Verbs),
		ShortNames:   sorted(r.ShortNames),
		Categories:   sorted(r.Categories),
	}
}

func factsOfV2(r apidiscoveryv2.APIResourceDiscovery) resourceFacts {
	f := resourceFacts{
		Namespaced:   r.Scope == apidiscoveryv2.ScopeNamespace,
		SingularName: r.SingularResource,
		Verbs:        sorted(r.Verbs),
		ShortNames:   sorted(r.ShortNames),
		Categories:   sorted(r.Categories),
	}
	if r.ResponseKind != nil {
		f.Kind = r.ResponseKind.Kind
	}
	return f
}

func wantFacts(f resourceFacts, resource string) error {
	var problems []string
	if !f.Namespaced {
		problems = append(problems, "not namespaced")
	}
	if f.Kind != kinds[resource] {
		problems = append(problems, fmt.Sprintf("kind %q, want %q", f.Kind, kinds[resource]))
	}
	if !slices.Equal(f.Verbs, []string{"get", "list", "watch"}) {
		problems = append(problems, fmt.Sprintf("verbs %v, want get, list, watch", f.Verbs))
	}
	if f.SingularName == "" {
		problems = append(problems, "no singular name (kubectl and Steve need one)")
	}
	if len(problems) > 0 {
		return fmt.Errorf("%s: %s", resource, strings.Join(problems, "; "))
	}
	return nil
}

func checkDiscovery(ctx context.Context, r *report, cfg *rest.Config) {
	const check = "discovery"
	// 1. The aggregated document, as kube-apiserver merges it, fetched raw: the media type
	//    must be v2 (not a fallback to the legacy APIGroupList) and our group fresh.
	dc, err := discovery.NewDiscoveryClientForConfig(cfg)
	if !r.check(check, err) {
		return
	}
	res := dc.RESTClient().Get().AbsPath("/apis").SetHeader("Accept", aggregatedAccept).Do(ctx)
	raw, err := res.Raw()
	if err != nil {
		r.fail(check+"/aggregated-v2", "GET /apis: %v", err)
		return
	}
	var contentType string
	res.ContentType(&contentType)
	mediaType, params, _ := mime.ParseMediaType(contentType)
	if mediaType != "application/json" || params["g"] != "apidiscovery.k8s.io" || params["v"] != "v2" {
		r.fail(check+"/aggregated-v2", "GET /apis answered %q, not aggregated discovery v2", contentType)
		return
	}
	var list apidiscoveryv2.APIGroupDiscoveryList
	if err := json.Unmarshal(raw, &list); err != nil {
		r.fail(check+"/aggregated-v2", "decoding APIGroupDiscoveryList: %v", err)
		return
	}
	v2 := map[string]resourceFacts{}
	freshness := apidiscoveryv2.DiscoveryFreshness("")
	for _, g := range list.Items {
		if g.Name != group {
			continue
		}
		for _, v := range g.Versions {
			if v.Version != version {
				continue
			}
			freshness = v.Freshness
			for _, res := range v.Resources {
				v2[res.Resource] = factsOfV2(res)
				if len(res.Subresources) > 0 {
					r.fail(check+"/aggregated-v2", "%s has subresources %v: none are served", res.Resource, res.Subresources)
				}
			}
		}
	}
	if freshness != apidiscoveryv2.DiscoveryFreshnessCurrent {
		r.fail(check+"/aggregated-v2", "%s/%s freshness %q in /apis, want Current", group, version, freshness)
	}
	ok := true
	for _, name := range resources {
		f, found := v2[name]
		if !found {
			r.fail(check+"/aggregated-v2", "%s missing from /apis (v2); have %v", name, keys(v2))
			ok = false
			continue
		}
		if err := wantFacts(f, name); err != nil {
			r.fail(check+"/aggregated-v2", "%v", err)
			ok = false
		}
	}
	if ok {
		r.pass(check+"/aggregated-v2", "%s/%s %s in /apis (%s): %v", group, version, freshness, contentType, v2)
	}

	// 2. client-go's discovery as Steve calls it (aggregated by default), and the legacy
	//    per-group-version document: they must agree, resource by resource.
	_, lists, err := dc.ServerGroupsAndResources()
	if err != nil {
		// A failed group elsewhere is reported in err with partial results: only ours counts.
		if failed, isGroupErr := err.(*discovery.ErrGroupDiscoveryFailed); !isGroupErr || failed.Groups[gv] != nil {
			r.fail(check+"/client-go", "ServerGroupsAndResources: %v", err)
			return
		}
	}
	fromClient := map[string]resourceFacts{}
	for _, l := range lists {
		if l.GroupVersion != gv.String() {
			continue
		}
		for _, res := range l.APIResources {
			fromClient[res.Name] = factsOfLegacy(res)
		}
	}
	legacyClient, err := discovery.NewDiscoveryClientForConfig(cfg)
	if !r.check(check, err) {
		return
	}
	legacyClient.UseLegacyDiscovery = true
	legacyList, err := legacyClient.ServerResourcesForGroupVersion(gv.String())
	if err != nil {
		r.fail(check+"/legacy", "GET /apis/%s: %v", gv, err)
		return
	}
	legacy := map[string]resourceFacts{}
	for _, res := range legacyList.APIResources {
		legacy[res.Name] = factsOfLegacy(res)
	}
	groups, err := legacyClient.ServerGroups()
	if err != nil {
		r.fail(check+"/legacy", "ServerGroups (legacy): %v", err)
		return
	}
	groupFound := false
	for _, g := range groups.Groups {
		if g.Name == group && g.PreferredVersion.GroupVersion == gv.String() {
			groupFound = true
		}
	}
	if !groupFound {
		r.fail(check+"/legacy", "%s with preferred version %s missing from the legacy /apis", group, gv)
	}
	ok = groupFound
	for _, name := range resources {
		l, inLegacy := legacy[name]
		c, inClient := fromClient[name]
		a := v2[name]
		switch {
		case !inLegacy:
			r.fail(check+"/legacy", "%s missing from /apis/%s; have %v", name, gv, keys(legacy))
			ok = false
		case !inClient:
			r.fail(check+"/client-go", "%s missing from ServerGroupsAndResources; have %v", name, keys(fromClient))
			ok = false
		case l.String() != a.String() || l.String() != c.String():
			r.fail(check+"/agree", "%s: legacy %v, aggregated %v, client-go %v", name, l, a, c)
			ok = false
		default:
			if err := wantFacts(l, name); err != nil {
				r.fail(check+"/legacy", "%v", err)
				ok = false
			}
		}
	}
	if ok {
		r.pass(check+"/agree", "legacy /apis/%s, aggregated /apis and ServerGroupsAndResources agree on %v", gv, resources)
	}
	// Steve also keeps resources with no kind or verbs out: ServerPreferredResources is
	// what its schema collection reads.
	preferred, err := dc.ServerPreferredNamespacedResources()
	if err != nil {
		if failed, isGroupErr := err.(*discovery.ErrGroupDiscoveryFailed); !isGroupErr || failed.Groups[gv] != nil {
			r.fail(check+"/preferred", "ServerPreferredNamespacedResources: %v", err)
			return
		}
	}
	seen := 0
	for _, l := range preferred {
		if l.GroupVersion == gv.String() {
			seen = len(l.APIResources)
		}
	}
	if seen != len(resources) {
		r.fail(check+"/preferred", "ServerPreferredNamespacedResources lists %d resources of %s, want %d", seen, gv, len(resources))
	} else {
		r.pass(check+"/preferred", "ServerPreferredNamespacedResources lists our %d resources", seen)
	}
}

func keys[V any](m map[string]V) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	slices.Sort(out)
	return out
}
