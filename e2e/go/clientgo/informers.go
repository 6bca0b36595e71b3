package main

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/dynamic"
	clientfeatures "k8s.io/client-go/features"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/cache"
)

// gateSwitch is client-go's feature gates with WatchListClient under our control: a
// reflector reads the gate once, when it is made, so informers of both modes can run side
// by side in one process.
type gateSwitch struct {
	base      clientfeatures.Gates
	watchList atomic.Bool
}

func (g *gateSwitch) Enabled(f clientfeatures.Feature) bool {
	if f == clientfeatures.WatchListClient {
		return g.watchList.Load()
	}
	return g.base.Enabled(f)
}

var gates = &gateSwitch{}

func installGates() {
	gates.base = clientfeatures.FeatureGates()
	clientfeatures.ReplaceFeatureGates(gates)
}

func modeName(watchList bool) string {
	if watchList {
		return "watch-list=on"
	}
	return "watch-list=off"
}

// observed is one informer and everything it was seen to do.
type observed struct {
	name      string
	resource  string
	watchList bool
	inf       cache.SharedIndexInformer

	// Calls the reflector made: LIST, WATCH with sendInitialEvents=true (a watch-list),
	// plain WATCH; and how many lists (of either kind) completed.
	lists, watchLists, watches, synced atomic.Int32

	mu          sync.Mutex
	events      []string
	lastRV      map[string]int64 // per object: the last version seen
	lastEventRV int64            // the last version of a change event (not the initial list)
	lastSync    int64            // LastSyncResourceVersion, as last sampled
	problems    []string
	watchErrors []string
	callLog     []string
}

func (w *observed) problem(format string, args ...any) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.problems = append(w.problems, fmt.Sprintf(format, args...))
}

func (w *observed) record(kind string, obj any, initial bool) {
	if d, ok := obj.(cache.DeletedFinalStateUnknown); ok {
		// Seen missing at a relist: its last known state, nothing new to check.
		w.mu.Lock()
		w.events = append(w.events, fmt.Sprintf("DELETED(relist):%s", d.Key))
		w.mu.Unlock()
		return
	}
	u, ok := obj.(*unstructured.Unstructured)
	if !ok {
		w.problem("%s event with a %T", kind, obj)
		return
	}
	rv, err := parseRV(u.GetResourceVersion())
	if err != nil {
		w.problem("%s %s: %v", kind, u.GetName(), err)
		return
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	name := u.GetName()
	prev, known := w.lastRV[name]
	if known && rv < prev {
		w.problems = append(w.problems, fmt.Sprintf("%s %s went back from version %d to %d", kind, name, prev, rv))
	}
	changed := !known || rv != prev
	w.lastRV[name] = rv
	if kind == "DELETED" {
		delete(w.lastRV, name)
	}
	if initial {
		return
	}
	w.events = append(w.events, fmt.Sprintf("%s:%s", kind, name))
	if changed || kind == "DELETED" {
		if rv <= w.lastEventRV {
			w.problems = append(w.problems, fmt.Sprintf("%s %s has version %d, not above the previous change's %d", kind, name, rv, w.lastEventRV))
		}
		w.lastEventRV = rv
	}
}

// sample checks that the informer's LastSyncResourceVersion parses and never goes back.
func (w *observed) sample() {
	v := w.inf.LastSyncResourceVersion()
	if v == "" {
		return
	}
	rv, err := parseRV(v)
	if err != nil {
		w.problem("LastSyncResourceVersion: %v", err)
		return
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	if rv < w.lastSync {
		w.problems = append(w.problems, fmt.Sprintf("LastSyncResourceVersion went back from %d to %d", w.lastSync, rv))
	}
	w.lastSync = rv
}

func (w *observed) calls() string {
	w.mu.Lock()
	defer w.mu.Unlock()
	return fmt.Sprintf("%d LIST, %d watch-list, %d WATCH: %v", w.lists.Load(), w.watchLists.Load(), w.watches.Load(), w.callLog)
}

func (w *observed) note(format string, args ...any) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.callLog = append(w.callLog, fmt.Sprintf(format, args...))
}

func newObserved(dyn dynamic.Interface, resource, namespace string, watchList bool) *observed {
	w := &observed{
		name:      modeName(watchList) + " " + resource,
		resource:  resource,
		watchList: watchList,
		lastRV:    map[string]int64{},
	}
	ri := dyn.Resource(gv.WithResource(resource)).Namespace(namespace)
	lw := &cache.ListWatch{
		ListWithContextFunc: func(ctx context.Context, opts metav1.ListOptions) (runtime.Object, error) {
			w.lists.Add(1)
			l, err := ri.List(ctx, opts)
			if err != nil {
				w.note("LIST rv=%q: %v", opts.ResourceVersion, err)
				return nil, err
			}
			w.note("LIST rv=%q: %s", opts.ResourceVersion, l.GetResourceVersion())
			w.synced.Add(1)
			return l, nil
		},
		WatchFuncWithContext: func(ctx context.Context, opts metav1.ListOptions) (watch.Interface, error) {
			kind := "WATCH"
			if opts.SendInitialEvents != nil && *opts.SendInitialEvents {
				w.watchLists.Add(1)
				kind = "WATCH-LIST"
			} else {
				w.watches.Add(1)
			}
			ws, err := ri.Watch(ctx, opts)
			if err != nil {
				w.note("%s rv=%q: %v", kind, opts.ResourceVersion, err)
				return nil, err
			}
			w.note("%s rv=%q", kind, opts.ResourceVersion)
			// ERROR events (a 410 makes the reflector list again) are kept for the report.
			return watch.Filter(ws, func(e watch.Event) (watch.Event, bool) {
				switch e.Type {
				case watch.Error:
					w.note("%s rv=%q got ERROR %v", kind, opts.ResourceVersion, e.Object)
				case watch.Bookmark:
					if m, err := meta.Accessor(e.Object); err == nil && m.GetAnnotations()[metav1.InitialEventsAnnotationKey] == "true" {
						w.note("%s rv=%q: initial events end at %s", kind, opts.ResourceVersion, m.GetResourceVersion())
						w.synced.Add(1)
					}
				}
				return e, true
			}), nil
		},
	}
	w.inf = cache.NewSharedIndexInformer(lw, &unstructured.Unstructured{}, 0, cache.Indexers{})
	_ = w.inf.SetWatchErrorHandlerWithContext(func(_ context.Context, _ *cache.Reflector, err error) {
		w.mu.Lock()
		w.watchErrors = append(w.watchErrors, err.Error())
		w.mu.Unlock()
	})
	_, _ = w.inf.AddEventHandler(cache.ResourceEventHandlerDetailedFuncs{
		AddFunc:    func(obj any, initial bool) { w.record("ADDED", obj, initial) },
		UpdateFunc: func(_, obj any) { w.record("MODIFIED", obj, false) },
		DeleteFunc: func(obj any) { w.record("DELETED", obj, false) },
	})
	return w
}

// names is what the informer's store holds now.
func (w *observed) names() []string {
	var out []string
	for _, obj := range w.inf.GetStore().List() {
		if u, ok := obj.(*unstructured.Unstructured); ok {
			out = append(out, u.GetName())
		}
	}
	slices.Sort(out)
	return out
}

// waitFor polls cond on every informer until it holds for all, or the timeout passes.
func waitFor(ws []*observed, timeout time.Duration, cond func(w *observed) bool) []*observed {
	deadline := time.Now().Add(timeout)
	for {
		var missing []*observed
		for _, w := range ws {
			w.sample()
			if !cond(w) {
				missing = append(missing, w)
			}
		}
		if len(missing) == 0 || time.Now().After(deadline) {
			return missing
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func namesOf(ws []*observed) string {
	var s []string
	for _, w := range ws {
		s = append(s, fmt.Sprintf("%s (store %v, events %v, %s, watch errors %v)", w.name, w.names(), w.eventsCopy(), w.calls(), w.watchErrorsCopy()))
	}
	return strings.Join(s, "; ")
}

func (w *observed) eventsCopy() []string {
	w.mu.Lock()
	defer w.mu.Unlock()
	return slices.Clone(w.events)
}

func (w *observed) watchErrorsCopy() []string {
	w.mu.Lock()
	defer w.mu.Unlock()
	return slices.Clone(w.watchErrors)
}

func (w *observed) sawEvent(e string) bool {
	return slices.Contains(w.eventsCopy(), e)
}

func (w *observed) has(name string) bool {
	_, exists, _ := w.inf.GetStore().GetByKey(w.namespaceKey(name))
	return exists
}

var informerNamespace string

func (w *observed) namespaceKey(name string) string {
	return informerNamespace + "/" + name
}

// checkInformers runs an informer per watch mode on ipamallocations and macaddresses in the
// test's namespace. The test answers the steps: allocate (answers the new address's
// allocation and MAC view names), restart (one replica of the server restarted while the
// watches run), release (answers the released allocation's and MAC's view names), crash
// (the replica serving then is killed, the restarted one takes over), delete-pool.
func checkInformers(ctx context.Context, r *report, st *steps, cfg *rest.Config, o options) {
	informerNamespace = o.namespace
	dyn, err := dynamic.NewForConfig(cfg)
	if !r.check("informers", err) {
		return
	}
	var all []*observed
	for _, on := range []bool{true, false} {
		for _, res := range []string{"ipamallocations", "macaddresses"} {
			all = append(all, newObserved(dyn, res, o.namespace, on))
		}
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	// A reflector reads the WatchListClient gate when its informer starts running: set the
	// gate, start one informer, wait for its first call, then the next.
	for _, w := range all {
		gates.watchList.Store(w.watchList)
		go w.inf.RunWithContext(ctx)
		deadline := time.Now().Add(o.timeout)
		for w.lists.Load()+w.watchLists.Load() == 0 && time.Now().Before(deadline) {
			time.Sleep(5 * time.Millisecond)
		}
	}
	byMode := func(on bool) []*observed {
		var out []*observed
		for _, w := range all {
			if w.watchList == on {
				out = append(out, w)
			}
		}
		return out
	}
	defer func() {
		for _, w := range all {
			w.mu.Lock()
			problems := slices.Clone(w.problems)
			w.mu.Unlock()
			if len(problems) > 0 {
				r.fail("informers/versions", "%s: %v", w.name, problems)
			} else {
				r.pass("informers/versions", "%s: versions int64, per object and per change only growing, last sync %d", w.name, w.lastSync)
			}
		}
	}()

	// 1. Sync: both modes, each by the path it must take, holding what a LIST holds.
	syncCtx, syncCancel := context.WithTimeout(ctx, o.timeout)
	defer syncCancel()
	for _, w := range all {
		if !cache.WaitForCacheSync(syncCtx.Done(), w.inf.HasSynced) {
			r.fail("informers/sync", "%s did not sync within %v: %s", w.name, o.timeout, namesOf([]*observed{w}))
			return
		}
	}
	for _, w := range all {
		list, err := dyn.Resource(gv.WithResource(w.resource)).Namespace(o.namespace).List(ctx, metav1.ListOptions{})
		if err != nil {
			r.fail("informers/sync", "list %s: %v", w.resource, err)
			return
		}
		var want []string
		for _, item := range list.Items {
			want = append(want, item.GetName())
		}
		slices.Sort(want)
		if got := w.names(); !slices.Equal(got, want) || len(want) == 0 {
			r.fail("informers/sync", "%s synced %v, a LIST gives %v", w.name, got, want)
			return
		}
		w.sample()
	}
	for _, w := range byMode(true) {
		if w.lists.Load() != 0 || w.watchLists.Load() != 1 || w.synced.Load() != 1 {
			r.fail("informers/sync", "%s: %s; want one watch-list ended by the k8s.io/initial-events-end bookmark and no LIST (client-go falls back to LIST when the bookmark never comes)", w.name, w.calls())
			return
		}
	}
	for _, w := range byMode(false) {
		if w.lists.Load() != 1 || w.watchLists.Load() != 0 {
			r.fail("informers/sync", "%s: %s; want one LIST", w.name, w.calls())
			return
		}
	}
	r.pass("informers/sync", "%s", namesOf(all))

	// 2. A new allocation.
	answer, err := st.do("allocate")
	if err != nil {
		r.fail("informers/allocate", "%v", err)
		return
	}
	ipamName, macName, _ := strings.Cut(answer, " ")
	wantOf := func(w *observed) string {
		if w.resource == "macaddresses" {
			return macName
		}
		return ipamName
	}
	if missing := waitFor(all, o.timeout, func(w *observed) bool {
		return w.has(wantOf(w)) && w.sawEvent("ADDED:"+wantOf(w))
	}); len(missing) > 0 {
		r.fail("informers/allocate", "the new allocation (%s, %s) never reached: %s", ipamName, macName, namesOf(missing))
		return
	}
	r.pass("informers/allocate", "ADDED %s / %s seen by all four informers", ipamName, macName)

	// 3. One replica restarted: every informer's watch ends and is opened again, resuming
	//    from its last version on a replica that kept the history (no relist).
	before := map[*observed]int32{}
	for _, w := range all {
		before[w] = w.lists.Load() + w.watchLists.Load() + w.watches.Load()
	}
	if _, err := st.do("restart"); err != nil {
		r.fail("informers/restart", "%v", err)
		return
	}
	if missing := waitFor(all, o.timeout, func(w *observed) bool {
		return w.lists.Load()+w.watchLists.Load()+w.watches.Load() > before[w]
	}); len(missing) > 0 {
		r.fail("informers/restart", "no new call after the replica's restart (was the watch not ended?): %s", namesOf(missing))
		return
	}
	relisted := []string{}
	for _, w := range all {
		if w.lists.Load()+w.watchLists.Load() != 1 {
			relisted = append(relisted, fmt.Sprintf("%s (%s, watch errors %v)", w.name, w.calls(), w.watchErrorsCopy()))
		}
	}
	if len(relisted) > 0 {
		r.fail("informers/restart", "listed again instead of resuming the watch: %v", relisted)
	} else {
		r.pass("informers/restart", "every watch resumed from its last version after the restart: %s", namesOf(all))
	}

	// 4. A release.
	answer, err = st.do("release")
	if err != nil {
		r.fail("informers/release", "%v", err)
		return
	}
	ipamName, macName, _ = strings.Cut(answer, " ")
	if missing := waitFor(all, o.timeout, func(w *observed) bool {
		return !w.has(wantOf(w)) && w.sawEvent("DELETED:"+wantOf(w))
	}); len(missing) > 0 {
		r.fail("informers/release", "the release (%s, %s) never reached: %s", ipamName, macName, namesOf(missing))
		return
	}
	r.pass("informers/release", "DELETED %s / %s seen by all four informers", ipamName, macName)

	// 5. The replica now serving crashes (SIGKILL: its streams break mid-way, no clean end)
	//    and the restarted one takes over: every informer lists again (a broken stream
	//    makes client-go relist), on the replica that restarted, and no version goes back,
	//    per object or per informer.
	before = map[*observed]int32{}
	for _, w := range all {
		before[w] = w.synced.Load()
	}
	if _, err := st.do("crash"); err != nil {
		r.fail("informers/crash", "%v", err)
		return
	}
	if missing := waitFor(all, 2*o.timeout, func(w *observed) bool {
		return w.synced.Load() > before[w]
	}); len(missing) > 0 {
		r.fail("informers/crash", "no relist after the serving replica crashed: %s", namesOf(missing))
		return
	}
	// (A watch-list answered 503 while the dead replica still had the endpoint makes
	// client-go fall back to LIST at once: a LIST in that mode is no finding here.)
	for _, w := range all {
		if !w.watchList && w.watchLists.Load() != 0 {
			r.fail("informers/crash", "%s made a watch-list with the feature off: %s", w.name, w.calls())
			return
		}
	}
	if missing := waitFor(all, o.timeout, func(w *observed) bool {
		list, err := dyn.Resource(gv.WithResource(w.resource)).Namespace(o.namespace).List(ctx, metav1.ListOptions{})
		if err != nil {
			return false
		}
		var want []string
		for _, item := range list.Items {
			want = append(want, item.GetName())
		}
		slices.Sort(want)
		return slices.Equal(w.names(), want)
	}); len(missing) > 0 {
		r.fail("informers/crash", "after the relist the stores differ from a LIST: %s", namesOf(missing))
		return
	}
	r.pass("informers/crash", "every informer listed again on the restarted replica and holds what a LIST holds: %s", namesOf(all))

	// 6. The pool deleted: every row of it goes.
	stores := map[*observed][]string{}
	for _, w := range all {
		stores[w] = w.names()
	}
	if _, err := st.do("delete-pool"); err != nil {
		r.fail("informers/delete-pool", "%v", err)
		return
	}
	if missing := waitFor(all, o.timeout, func(w *observed) bool {
		for _, obj := range w.inf.GetStore().List() {
			if u, ok := obj.(*unstructured.Unstructured); ok {
				if pool, _, _ := unstructured.NestedString(u.Object, "pool"); pool == o.pool {
					return false
				}
			}
		}
		for _, name := range stores[w] {
			if !w.sawEvent("DELETED:" + name) {
				return false
			}
		}
		return true
	}); len(missing) > 0 {
		r.fail("informers/delete-pool", "the pool's rows did not all go (each with a DELETED event): %s", namesOf(missing))
		return
	}
	r.pass("informers/delete-pool", "every row of pool %s DELETED in all four informers: %s", o.pool, namesOf(all))
}
