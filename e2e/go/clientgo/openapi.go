package main

import (
	"context"
	"fmt"
	"net/http"
	"slices"

	openapi_v3 "github.com/google/gnostic-models/openapiv3"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/util/managedfields"
	"k8s.io/client-go/discovery"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/openapi3"
	"k8s.io/client-go/rest"
	"k8s.io/kube-openapi/pkg/util/proto"
	"k8s.io/kube-openapi/pkg/validation/spec"
)

// gvkOf reads a model's x-kubernetes-group-version-kind extension (a list of maps, decoded
// from YAML or JSON).
func gvkOf(m proto.Schema) []map[string]string {
	var out []map[string]string
	list, _ := m.GetExtensions()["x-kubernetes-group-version-kind"].([]any)
	for _, item := range list {
		entry := map[string]string{}
		switch e := item.(type) {
		case map[any]any:
			for k, v := range e {
				entry[fmt.Sprint(k)] = fmt.Sprint(v)
			}
		case map[string]any:
			for k, v := range e {
				entry[k] = fmt.Sprint(v)
			}
		}
		out = append(out, entry)
	}
	return out
}

// ourModels finds, as Steve's schema converter does, the model of each of our kinds by its
// group-version-kind extension, and checks that it has the fields Steve maps columns to.
func ourModels(models proto.Models) (map[string]string, error) {
	found := map[string]string{}
	for _, name := range models.ListModels() {
		m := models.LookupModel(name)
		if m == nil {
			continue
		}
		for _, g := range gvkOf(m) {
			if g["group"] == group && g["version"] == version {
				found[g["kind"]] = name
			}
		}
	}
	want := map[string][]string{
		"IPAMAllocation": {"address", "mac", "state", "owner", "pool", "network", "metadata"},
		"MACAddress":     {"mac", "address", "network", "metadata"},
		"DHCPLease":      {"address", "mac", "state", "expiry", "metadata"},
	}
	for kind, fields := range want {
		name, ok := found[kind]
		if !ok {
			return found, fmt.Errorf("no model carries group-version-kind %s/%s %s", group, version, kind)
		}
		k, ok := models.LookupModel(name).(*proto.Kind)
		if !ok {
			return found, fmt.Errorf("model %s of %s is a %T, not an object kind", name, kind, models.LookupModel(name))
		}
		for _, f := range fields {
			if _, ok := k.Fields[f]; !ok {
				return found, fmt.Errorf("model %s lacks field %q (has %v)", name, f, k.Keys())
			}
		}
	}
	return found, nil
}

func checkOpenAPI(ctx context.Context, r *report, cfg *rest.Config, o options) {
	dc, err := discovery.NewDiscoveryClientForConfig(cfg)
	if !r.check("openapi", err) {
		return
	}
	// 1. The cluster's /openapi/v2 with our APIService registered: Steve builds every schema
	//    from it and builds none when it fails. JSON as kubectl asks, protobuf as client-go.
	var code int
	raw, err := dc.RESTClient().Get().AbsPath("/openapi/v2").SetHeader("Accept", "application/json").Do(ctx).StatusCode(&code).Raw()
	if err != nil || code != http.StatusOK {
		r.fail("openapi/v2", "GET /openapi/v2: %d %v", code, err)
	} else {
		doc, err := dc.OpenAPISchema()
		if err != nil {
			r.fail("openapi/v2", "OpenAPISchema (protobuf): %v", err)
		} else if models, err := proto.NewOpenAPIData(doc); err != nil {
			r.fail("openapi/v2", "proto.NewOpenAPIData: %v", err)
		} else if found, err := ourModels(models); err != nil {
			r.fail("openapi/v2", "%v", err)
		} else {
			r.pass("openapi/v2", "200 (%d bytes of JSON), %d models; ours: %v", len(raw), len(models.ListModels()), found)
		}
	}

	// 2. Our OpenAPI v3 document, through the aggregator: listed in /openapi/v3, parsed into
	//    client-go's models (kubectl explain) and into a structured-merge-diff type converter
	//    (client-go's openapi.NewTypeConverter, server-side apply tooling) that accepts the
	//    objects we serve.
	root := openapi3.NewRoot(dc.OpenAPIV3())
	paths, err := dc.OpenAPIV3().Paths()
	if err != nil {
		r.fail("openapi/v3", "GET /openapi/v3: %v", err)
		return
	}
	gvPath, ok := paths["apis/"+gv.String()]
	if !ok {
		r.fail("openapi/v3", "apis/%s missing from /openapi/v3 (%d paths)", gv, len(paths))
		return
	}
	body, err := gvPath.Schema(runtime.ContentTypeJSON)
	if err != nil {
		r.fail("openapi/v3", "GET /openapi/v3/apis/%s: %v", gv, err)
		return
	}
	gnostic, err := openapi_v3.ParseDocument(body)
	if err != nil {
		r.fail("openapi/v3", "gnostic ParseDocument: %v", err)
		return
	}
	models, err := proto.NewOpenAPIV3Data(gnostic)
	if err != nil {
		r.fail("openapi/v3", "proto.NewOpenAPIV3Data: %v", err)
		return
	}
	found, err := ourModels(models)
	if err != nil {
		r.fail("openapi/v3", "%v", err)
		return
	}
	ours, err := root.GVSpec(gv)
	if err != nil {
		r.fail("openapi/v3", "openapi3 Root.GVSpec(%s): %v", gv, err)
		return
	}
	converter, err := managedfields.NewTypeConverter(ours.Components.Schemas, false)
	if err != nil {
		r.fail("openapi/v3", "managedfields.NewTypeConverter over our schemas: %v", err)
		return
	}
	dyn, err := dynamic.NewForConfig(cfg)
	if !r.check("openapi/v3", err) {
		return
	}
	converted := 0
	for _, res := range resources {
		list, err := dyn.Resource(gv.WithResource(res)).Namespace(o.namespace).List(ctx, metav1.ListOptions{})
		if err != nil {
			r.fail("openapi/v3", "list %s: %v", res, err)
			return
		}
		for i := range list.Items {
			if _, err := converter.ObjectToTyped(&list.Items[i]); err != nil {
				r.fail("openapi/v3", "%s %s does not fit our own schema: %v", res, list.Items[i].GetName(), err)
				return
			}
			converted++
		}
	}
	if converted == 0 {
		r.fail("openapi/v3", "no object in namespace %s to convert: the test must create some", o.namespace)
		return
	}
	r.pass("openapi/v3", "%d models, ours %v; %d served objects convert to typed values", len(models.ListModels()), found, converted)

	// 3. The cluster-wide converter (client-go's openapi.NewTypeConverter) puts every group's
	//    components into one map by name: a schema we publish under a shared name (the meta
	//    types) replaces kube-apiserver's when ours comes last. Made deterministic here: the
	//    core group's schemas, then ours over them, must still accept a real object of the
	//    core group with managed fields and owner references.
	core, err := root.GVSpec(schema.GroupVersion{Version: "v1"})
	if err != nil {
		r.fail("openapi/v3-shared", "core/v1 schemas: %v", err)
		return
	}
	merged := map[string]*spec.Schema{}
	for k, v := range core.Components.Schemas {
		merged[k] = v
	}
	var shadowed []string
	for k, v := range ours.Components.Schemas {
		if _, shared := merged[k]; shared {
			shadowed = append(shadowed, k)
		}
		merged[k] = v
	}
	// Every field kube-apiserver declares in a shared schema, ours declares with the same
	// type (a missing one fails conversion of objects that have it).
	var differs []string
	for _, name := range shadowed {
		theirs, mine := core.Components.Schemas[name], ours.Components.Schemas[name]
		if !slices.Equal(mine.Type, theirs.Type) || mine.Format != theirs.Format {
			differs = append(differs, fmt.Sprintf("%s is %v/%q, kube-apiserver's %v/%q", name, mine.Type, mine.Format, theirs.Type, theirs.Format))
		}
		for _, ext := range []string{"x-kubernetes-map-type", "x-kubernetes-list-type"} {
			if fmt.Sprint(mine.Extensions[ext]) != fmt.Sprint(theirs.Extensions[ext]) {
				differs = append(differs, fmt.Sprintf("%s %s %v, kube-apiserver's %v", name, ext, mine.Extensions[ext], theirs.Extensions[ext]))
			}
		}
		for prop, t := range theirs.Properties {
			m, ok := mine.Properties[prop]
			switch {
			case !ok:
				differs = append(differs, fmt.Sprintf("%s.%s missing", name, prop))
			case !slices.Equal(m.Type, t.Type) || m.Format != t.Format:
				differs = append(differs, fmt.Sprintf("%s.%s is %v/%q, kube-apiserver's %v/%q", name, prop, m.Type, m.Format, t.Type, t.Format))
			default:
				for _, ext := range []string{"x-kubernetes-list-type", "x-kubernetes-list-map-keys", "x-kubernetes-map-type"} {
					if fmt.Sprint(m.Extensions[ext]) != fmt.Sprint(t.Extensions[ext]) {
						differs = append(differs, fmt.Sprintf("%s.%s %s %v, kube-apiserver's %v", name, prop, ext, m.Extensions[ext], t.Extensions[ext]))
					}
				}
			}
		}
	}
	if len(differs) > 0 {
		slices.Sort(differs)
		r.fail("openapi/v3-shared", "schemas we publish under kube-apiserver's names differ from its own: %v", differs)
	}
	mergedConverter, err := managedfields.NewTypeConverter(merged, false)
	if err != nil {
		r.fail("openapi/v3-shared", "core/v1 + ours (shadowing %v): %v", shadowed, err)
		return
	}
	cs, err := kubernetes.NewForConfig(cfg)
	if !r.check("openapi/v3-shared", err) {
		return
	}
	cm, err := cs.CoreV1().ConfigMaps(o.namespace).Get(ctx, "clientgo-openapi-probe", metav1.GetOptions{})
	if err != nil {
		r.fail("openapi/v3-shared", "the test's ConfigMap %s/clientgo-openapi-probe: %v", o.namespace, err)
		return
	}
	cm.APIVersion, cm.Kind = "v1", "ConfigMap"
	obj, err := runtime.DefaultUnstructuredConverter.ToUnstructured(cm)
	if err != nil {
		r.fail("openapi/v3-shared", "%v", err)
		return
	}
	if _, err := mergedConverter.ObjectToTyped(&unstructured.Unstructured{Object: obj}); err != nil {
		r.fail("openapi/v3-shared", "with our schemas of %v over the core group's, a ConfigMap with managedFields and ownerReferences no longer converts: %v", shadowed, err)
		return
	}
	r.pass("openapi/v3-shared", "a ConfigMap with managedFields and ownerReferences converts with our %v over core/v1's", shadowed)
}
