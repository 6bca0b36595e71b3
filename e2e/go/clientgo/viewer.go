package main

import (
	"context"
	"slices"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/cache"
)

// checkViewer runs as a user bound only to the aggregated `view` ClusterRole in
// --namespace: the views there can be listed and watched (and an informer syncs, as Steve
// runs one per user-visible type); elsewhere, and across all namespaces, it is refused.
func checkViewer(ctx context.Context, r *report, cfg *rest.Config, o options) {
	dyn, err := dynamic.NewForConfig(cfg)
	if !r.check("viewer", err) {
		return
	}
	var adminDyn dynamic.Interface
	if o.adminConfig != "" {
		admin, err := loadConfig(o.adminConfig)
		if !r.check("viewer", err) {
			return
		}
		if adminDyn, err = dynamic.NewForConfig(admin); !r.check("viewer", err) {
			return
		}
	}
	for _, res := range resources {
		ri := dyn.Resource(gv.WithResource(res))
		check := "viewer/" + res
		list, err := ri.Namespace(o.namespace).List(ctx, metav1.ListOptions{})
		if err != nil {
			r.fail(check, "list in %s: %v", o.namespace, err)
			continue
		}
		if adminDyn != nil {
			adminList, err := adminDyn.Resource(gv.WithResource(res)).Namespace(o.namespace).List(ctx, metav1.ListOptions{})
			if err != nil {
				r.fail(check, "admin list in %s: %v", o.namespace, err)
				continue
			}
			if len(adminList.Items) != len(list.Items) {
				r.fail(check, "the viewer sees %d, an administrator %d", len(list.Items), len(adminList.Items))
				continue
			}
		}
		w, err := ri.Namespace(o.namespace).Watch(ctx, metav1.ListOptions{ResourceVersion: list.GetResourceVersion(), AllowWatchBookmarks: true})
		if err != nil {
			r.fail(check, "watch in %s: %v", o.namespace, err)
			continue
		}
		// Open and not an ERROR: nothing within a moment, or a bookmark/event.
		select {
		case ev, open := <-w.ResultChan():
			if !open || ev.Type == watch.Error {
				r.fail(check, "watch in %s ended at once: %v %v", o.namespace, ev.Type, ev.Object)
				w.Stop()
				continue
			}
		case <-time.After(time.Second):
		}
		w.Stop()
		// Steve's path: an informer in the namespace, watch-list on.
		gates.watchList.Store(true)
		inf := cache.NewSharedIndexInformer(&cache.ListWatch{
			ListWithContextFunc: func(ctx context.Context, opts metav1.ListOptions) (runtime.Object, error) {
				l, err := ri.Namespace(o.namespace).List(ctx, opts)
				if err != nil {
					return nil, err
				}
				return l, nil
			},
			WatchFuncWithContext: func(ctx context.Context, opts metav1.ListOptions) (watch.Interface, error) {
				return ri.Namespace(o.namespace).Watch(ctx, opts)
			},
		}, &unstructured.Unstructured{}, 0, cache.Indexers{})
		infCtx, cancel := context.WithTimeout(ctx, o.timeout)
		go inf.RunWithContext(infCtx)
		synced := cache.WaitForCacheSync(infCtx.Done(), inf.HasSynced)
		n := len(inf.GetStore().List())
		cancel()
		if !synced || n != len(list.Items) {
			r.fail(check, "an informer (watch-list) as the viewer: synced %v with %d objects, a LIST has %d", synced, n, len(list.Items))
			continue
		}
		// Refused elsewhere: another namespace, and all namespaces, for list and watch.
		var refused []string
		for _, attempt := range []struct {
			what string
			do   func() error
		}{
			{"list in " + o.otherNamespace, func() error {
				_, err := ri.Namespace(o.otherNamespace).List(ctx, metav1.ListOptions{})
				return err
			}},
			{"watch in " + o.otherNamespace, func() error {
				w, err := ri.Namespace(o.otherNamespace).Watch(ctx, metav1.ListOptions{})
				if err == nil {
					w.Stop()
				}
				return err
			}},
			{"list in all namespaces", func() error {
				_, err := ri.List(ctx, metav1.ListOptions{})
				return err
			}},
			{"watch in all namespaces", func() error {
				w, err := ri.Watch(ctx, metav1.ListOptions{})
				if err == nil {
					w.Stop()
				}
				return err
			}},
		} {
			err := attempt.do()
			if !apierrors.IsForbidden(err) {
				r.fail(check, "%s: want Forbidden, got %v", attempt.what, err)
				continue
			}
			refused = append(refused, attempt.what)
		}
		if len(refused) == 4 {
			names := []string{}
			for _, item := range list.Items {
				names = append(names, item.GetName())
			}
			slices.Sort(names)
			r.pass(check, "list (%d: %v), watch and a watch-list informer in %s; Forbidden: %v", len(names), names, o.namespace, refused)
		}
	}
	if o.otherNamespace == "" {
		r.fail("viewer", "--other-namespace is required")
	}
}
