package main

import (
	"context"
	"encoding/json"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/runtime/serializer"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/pager"
)

// What Steve's table client asks for: a Table (v1, then v1beta1), plain JSON last.
const tableAccept = "application/json;as=Table;v=v1;g=meta.k8s.io,application/json;as=Table;v=v1beta1;g=meta.k8s.io,application/json"

// tableClient is a REST client for our group-version that decodes meta.k8s.io Tables (and
// Status, watch events) with client-go's own codecs.
func tableClient(cfg *rest.Config) (*rest.RESTClient, error) {
	scheme := runtime.NewScheme()
	metav1.AddToGroupVersion(scheme, schema.GroupVersion{Version: "v1"})
	if err := metav1.AddMetaToScheme(scheme); err != nil {
		return nil, err
	}
	c := rest.CopyConfig(cfg)
	c.GroupVersion = &gv
	c.APIPath = "/apis"
	c.NegotiatedSerializer = serializer.NewCodecFactory(scheme).WithoutConversion()
	c.AcceptContentTypes = tableAccept
	return rest.RESTClientFor(c)
}

// parseRV is what Steve's SQL cache does with a resourceVersion.
func parseRV(rv string) (int64, error) {
	n, err := strconv.ParseInt(rv, 10, 64)
	if err != nil {
		return 0, fmt.Errorf("resourceVersion %q is not an int64: %v", rv, err)
	}
	if n <= 0 {
		return 0, fmt.Errorf("resourceVersion %q is not positive", rv)
	}
	return n, nil
}

// rowObject decodes a row's embedded object (includeObject=Object or Metadata).
func rowObject(row metav1.TableRow) (*unstructured.Unstructured, error) {
	if len(row.Object.Raw) == 0 {
		return nil, fmt.Errorf("row %v has no object", row.Cells)
	}
	u := &unstructured.Unstructured{}
	if err := json.Unmarshal(row.Object.Raw, &u.Object); err != nil {
		return nil, fmt.Errorf("row object: %v", err)
	}
	return u, nil
}

func listTable(ctx context.Context, c *rest.RESTClient, ns, res string, opts metav1.ListOptions, include string) (*metav1.Table, error) {
	var t metav1.Table
	req := c.Get().Namespace(ns).Resource(res).VersionedParams(&opts, metav1.ParameterCodec)
	if include != "" {
		req = req.Param("includeObject", include)
	}
	// Raw: client-go's typed decoding drops kind and apiVersion, which are checked here.
	raw, err := req.Do(ctx).Raw()
	if err != nil {
		return nil, err
	}
	if err := json.Unmarshal(raw, &t); err != nil {
		return nil, fmt.Errorf("decoding a Table: %v", err)
	}
	if t.Kind != "Table" || t.APIVersion != "meta.k8s.io/v1" {
		return nil, fmt.Errorf("got %s %s, not a meta.k8s.io/v1 Table", t.APIVersion, t.Kind)
	}
	return &t, nil
}

func checkTable(ctx context.Context, r *report, st *steps, cfg *rest.Config, o options) {
	c, err := tableClient(cfg)
	if !r.check("table", err) {
		return
	}
	dyn, err := dynamic.NewForConfig(cfg)
	if !r.check("table", err) {
		return
	}
	res := "ipamallocations"
	all, err := dyn.Resource(gv.WithResource(res)).Namespace(o.namespace).List(ctx, metav1.ListOptions{})
	if err != nil {
		r.fail("table", "list %s: %v", res, err)
		return
	}
	var want []string
	for _, item := range all.Items {
		want = append(want, item.GetName())
	}
	slices.Sort(want)
	if len(want) < 3 {
		r.fail("table", "namespace %s holds %d %s; the check needs at least 3", o.namespace, len(want), res)
		return
	}

	// 1. Steve's column request: LIST limit=1 as a Table; then every page by continue.
	first, err := listTable(ctx, c, o.namespace, res, metav1.ListOptions{Limit: 1}, "")
	if err != nil {
		r.fail("table/limit", "LIST limit=1 as Table: %v", err)
		return
	}
	var cols []string
	for _, cd := range first.ColumnDefinitions {
		cols = append(cols, cd.Name)
		if cd.Type == "" {
			r.fail("table/limit", "column %q has no type", cd.Name)
		}
	}
	switch {
	case len(first.ColumnDefinitions) == 0:
		r.fail("table/limit", "no columnDefinitions in the first page")
	case len(first.Rows) != 1:
		r.fail("table/limit", "limit=1 gave %d rows", len(first.Rows))
	case first.Continue == "":
		r.fail("table/limit", "limit=1 of %d objects gave no continue token", len(want))
	default:
		got := []string{}
		page := first
		pages := 1
		for {
			for _, row := range page.Rows {
				u, err := rowObject(row)
				if err != nil {
					r.fail("table/limit", "page %d: %v", pages, err)
					return
				}
				got = append(got, u.GetName())
			}
			if page.Continue == "" {
				break
			}
			if pages > len(want)+1 {
				r.fail("table/limit", "more pages than objects: the continue token does not advance")
				return
			}
			page, err = listTable(ctx, c, o.namespace, res, metav1.ListOptions{Limit: 1, Continue: page.Continue}, "")
			if err != nil {
				r.fail("table/limit", "page %d by continue token: %v", pages+1, err)
				return
			}
			pages++
		}
		slices.Sort(got)
		if !slices.Equal(got, want) {
			r.fail("table/limit", "pages of one by continue gave %v, a full list %v", got, want)
		} else {
			r.pass("table/limit", "columns %v; %d pages of one by continue token = the full list", cols, pages)
		}
	}
	// The same through client-go's pager (what a reflector does with a paged list).
	p := pager.New(func(ctx context.Context, opts metav1.ListOptions) (runtime.Object, error) {
		l, err := dyn.Resource(gv.WithResource(res)).Namespace(o.namespace).List(ctx, opts)
		if err != nil {
			return nil, err
		}
		return l, nil
	})
	p.PageSize = 1
	var paged []string
	if err := p.EachListItemWithAlloc(ctx, metav1.ListOptions{}, func(obj runtime.Object) error {
		u, ok := obj.(*unstructured.Unstructured)
		if !ok {
			return fmt.Errorf("item is a %T", obj)
		}
		paged = append(paged, u.GetName())
		return nil
	}); err != nil {
		r.fail("table/pager", "pager with page size 1: %v", err)
	} else if slices.Sort(paged); !slices.Equal(paged, want) {
		r.fail("table/pager", "pager gave %v, want %v", paged, want)
	} else {
		r.pass("table/pager", "client-go's pager, page size 1: %d items", len(paged))
	}

	// 2. Table LIST with includeObject=Object: full objects, int64 versions.
	full, err := listTable(ctx, c, o.namespace, res, metav1.ListOptions{}, "Object")
	if err != nil {
		r.fail("table/list-object", "LIST includeObject=Object: %v", err)
		return
	}
	listRV, err := parseRV(full.ResourceVersion)
	if err != nil {
		r.fail("table/list-object", "the Table's %v", err)
		return
	}
	okList := true
	for _, row := range full.Rows {
		u, err := rowObject(row)
		if err != nil {
			r.fail("table/list-object", "%v", err)
			okList = false
			continue
		}
		if u.GetKind() != kinds[res] || u.GetAPIVersion() != gv.String() {
			r.fail("table/list-object", "row object is %s %s, not the full object", u.GetAPIVersion(), u.GetKind())
			okList = false
		}
		if _, found, _ := unstructured.NestedString(u.Object, "address"); !found {
			r.fail("table/list-object", "row object %s has no address: not the full object", u.GetName())
			okList = false
		}
		rv, err := parseRV(u.GetResourceVersion())
		if err != nil {
			r.fail("table/list-object", "%s: %v", u.GetName(), err)
			okList = false
		} else if rv > listRV {
			r.fail("table/list-object", "%s has version %d above the list's %d", u.GetName(), rv, listRV)
			okList = false
		}
	}
	if len(full.Rows) != len(want) {
		r.fail("table/list-object", "%d rows, want %d", len(full.Rows), len(want))
		okList = false
	}
	if okList {
		r.pass("table/list-object", "%d rows with full %s objects, versions int64 up to the list's %d", len(full.Rows), kinds[res], listRV)
	}

	// 3. Table WATCH with includeObject=Object from the list's version, as Steve watches:
	//    the test makes changes; every event's object version parses and only grows.
	w, err := c.Get().Namespace(o.namespace).Resource(res).
		VersionedParams(&metav1.ListOptions{Watch: true, ResourceVersion: full.ResourceVersion, AllowWatchBookmarks: true, TimeoutSeconds: ptr(int64(120))}, metav1.ParameterCodec).
		Param("includeObject", "Object").
		Watch(ctx)
	if err != nil {
		r.fail("table/watch-object", "WATCH as Table: %v", err)
		return
	}
	defer w.Stop()
	answer, err := st.do("table-changes")
	if err != nil {
		r.fail("table/watch-object", "%v", err)
		return
	}
	// The answer lists the expected events: TYPE:name,...
	var expected []string
	for _, e := range strings.Split(answer, ",") {
		if e = strings.TrimSpace(e); e != "" {
			expected = append(expected, e)
		}
	}
	var seen []string
	last := listRV
	columnsSeen := false
	deadline := time.After(o.timeout)
	for len(seen) < len(expected) {
		var ev watch.Event
		var open bool
		select {
		case ev, open = <-w.ResultChan():
		case <-deadline:
			r.fail("table/watch-object", "after %v saw %v, want %v", o.timeout, seen, expected)
			return
		}
		if !open {
			r.fail("table/watch-object", "the watch ended after %v, want %v", seen, expected)
			return
		}
		switch ev.Type {
		case watch.Error:
			r.fail("table/watch-object", "ERROR event: %v", ev.Object)
			return
		case watch.Bookmark:
			if t, ok := ev.Object.(*metav1.Table); ok {
				if rv, err := parseRV(t.ResourceVersion); err != nil || rv < last {
					r.fail("table/watch-object", "bookmark version %q (after %d): %v", t.ResourceVersion, last, err)
					return
				}
			}
			continue
		}
		t, ok := ev.Object.(*metav1.Table)
		if !ok {
			r.fail("table/watch-object", "%s event carries a %T, not a Table", ev.Type, ev.Object)
			return
		}
		if len(t.ColumnDefinitions) > 0 {
			columnsSeen = true
		}
		if len(t.Rows) != 1 {
			r.fail("table/watch-object", "%s event with %d rows", ev.Type, len(t.Rows))
			return
		}
		u, err := rowObject(t.Rows[0])
		if err != nil {
			r.fail("table/watch-object", "%v", err)
			return
		}
		if u.GetKind() != kinds[res] {
			r.fail("table/watch-object", "event row object is a %q, not the full object", u.GetKind())
			return
		}
		rv, err := parseRV(u.GetResourceVersion())
		if err != nil {
			r.fail("table/watch-object", "%s %s: %v", ev.Type, u.GetName(), err)
			return
		}
		if rv <= last {
			r.fail("table/watch-object", "%s %s has version %d, not above the previous %d", ev.Type, u.GetName(), rv, last)
			return
		}
		last = rv
		seen = append(seen, fmt.Sprintf("%s:%s", ev.Type, u.GetName()))
	}
	if !slices.Equal(seen, expected) {
		r.fail("table/watch-object", "events %v, want %v", seen, expected)
		return
	}
	if !columnsSeen {
		r.fail("table/watch-object", "no event carried columnDefinitions (kubectl needs them in the first)")
		return
	}
	r.pass("table/watch-object", "events %v, full objects, versions int64 and growing from %d to %d", seen, listRV, last)
}

func ptr[T any](v T) *T { return &v }
