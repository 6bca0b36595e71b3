//! The engine: the source objects, the views computed from them, and each view's recent
//! history of changes for watches.
//!
//! resourceVersions. Kubernetes clients (Rancher Steve) parse them as integers, watchers
//! resume from the last one they saw, possibly on another replica, and they must keep
//! increasing across restarts. So they are derived from the sources' resourceVersions, which
//! are etcd revisions (one counter for the whole cluster):
//! - an `ipamallocations`/`macaddresses` object's version is the highest version of the
//!   objects it is computed from (its IPPool, and the VM and vmnetcfg holding its MAC) when its
//!   content last changed; unchanged objects keep their version when the pool changes
//!   elsewhere (a replica started later shows the pool's version it first saw);
//! - a list's version, and the version of a watch event, is the highest source version the
//!   view has seen (deletions included). A watch resumed from version V on any replica gets the
//!   changes it made after V; a V older than what the replica remembers gets 410 Expired and
//!   the client lists again, as with kube-apiserver's watch cache.
//!   Known limit: changes arrive on separate watch streams per source kind; when a VM's change
//!   at revision 105 is seen before a pool's change at 100, both events carry 105 on this
//!   replica. A client that saw only the first on one replica and resumes at 105 on another
//!   misses the second until its next relist.
//! - `dhcpleases` have no etcd revision (the agent holds them): their versions are this
//!   replica's clock in microseconds, strictly increasing, as kube's own recommendation for
//!   servers without storage. Resuming a lease watch on another replica works when the clocks
//!   agree; otherwise the client gets 410 and lists again.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use k8s_openapi::api::core::v1::Pod;
use tokio::sync::watch;
use vm_dhcp_core::crd::{IPPool, VirtualMachineNetworkConfig};
use vm_dhcp_core::kubevirt::VirtualMachine;

use crate::resources::Resource;
use crate::views::{
    AgentLeases, Key, Sources, ViewObject, agent_candidates, holder_index, key_of, lease_views,
    pool_network, pool_views, rv_of, vm_networks, vmnetcfg_networks,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum SourceKind {
    Pools,
    VmNetCfgs,
    Vms,
    Agents,
}

impl SourceKind {
    pub const ALL: [SourceKind; 4] = [
        SourceKind::Pools,
        SourceKind::VmNetCfgs,
        SourceKind::Vms,
        SourceKind::Agents,
    ];
}

/// Short-lived (from a watch event into the engine), so the size difference of the variants
/// costs nothing worth a box.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum SourceObject {
    Pool(IPPool),
    VmNetCfg(VirtualMachineNetworkConfig),
    Vm(VirtualMachine),
    Agent(Pod),
}

impl SourceObject {
    fn meta(&self) -> &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
        match self {
            SourceObject::Pool(o) => &o.metadata,
            SourceObject::VmNetCfg(o) => &o.metadata,
            SourceObject::Vm(o) => &o.metadata,
            SourceObject::Agent(o) => &o.metadata,
        }
    }
}

#[derive(Debug, Clone)]
pub enum Change {
    Apply(SourceObject),
    Delete(SourceObject),
    /// A complete listing of one kind (start-up and after a watch restart): marks it synced.
    Replace(SourceKind, Vec<SourceObject>),
    /// What the pool's active agent serves; `None` when no agent answers.
    Leases(Key, Option<AgentLeases>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    Added,
    Modified,
    Deleted,
}

impl EventType {
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Added => "ADDED",
            EventType::Modified => "MODIFIED",
            EventType::Deleted => "DELETED",
        }
    }
}

/// One change of a view.
#[derive(Debug, Clone)]
pub struct Entry {
    pub seq: u64,
    /// The version of the change (what the watch event carries).
    pub rv: u64,
    pub kind: EventType,
    pub object: Arc<ViewObject>,
    /// The object before a MODIFIED (to turn it into ADDED/DELETED for a selector).
    pub previous: Option<Arc<ViewObject>>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StoreError {
    #[error(
        "the views are not ready yet: the server is still reading IPPools, VMs and vmnetcfgs; retry in a few seconds"
    )]
    NotReady,
    #[error(
        "too old resource version: {asked} (the oldest this server can resume from is {oldest}); list again"
    )]
    Expired { asked: u64, oldest: u64 },
}

#[derive(Default)]
struct View {
    objects: BTreeMap<Key, Arc<ViewObject>>,
    by_pool: BTreeMap<Key, BTreeSet<Key>>,
    rv: u64,
    history: VecDeque<Entry>,
    /// Watches may resume from this version or later.
    oldest_rv: u64,
    next_seq: u64,
}

impl View {
    fn first_seq(&self) -> u64 {
        self.history.front().map_or(self.next_seq, |e| e.seq)
    }

    /// An object whose content did not change keeps its version: a pool's new
    /// resourceVersion must not turn each of its 16,000 allocations into a MODIFIED event.
    /// (So a replica started after a change may show an older version for an unchanged
    /// object than one that saw the change: the content is the same.)
    fn keep_versions(&self, objects: Vec<ViewObject>) -> Vec<ViewObject> {
        objects
            .into_iter()
            .map(|mut o| {
                if let Some(old) = self.objects.get(&o.key())
                    && old.same_content(&o)
                {
                    o.resource_version = old.resource_version;
                }
                o
            })
            .collect()
    }

    /// Replaces the objects of one pool; returns the changes (without seq/rv yet).
    fn replace_pool(
        &mut self,
        pool: &Key,
        objects: Vec<ViewObject>,
    ) -> Vec<(EventType, Arc<ViewObject>, Option<Arc<ViewObject>>)> {
        let old_keys = self.by_pool.remove(pool).unwrap_or_default();
        let mut new_keys = BTreeSet::new();
        let mut changes = Vec::new();
        for obj in objects {
            let key = obj.key();
            new_keys.insert(key.clone());
            match self.objects.get(&key) {
                Some(old) if **old == obj => {}
                Some(old) => {
                    let old = old.clone();
                    let obj = Arc::new(obj);
                    self.objects.insert(key, obj.clone());
                    changes.push((EventType::Modified, obj, Some(old)));
                }
                None => {
                    let obj = Arc::new(obj);
                    self.objects.insert(key, obj.clone());
                    changes.push((EventType::Added, obj, None));
                }
            }
        }
        for gone in old_keys.difference(&new_keys) {
            if let Some(old) = self.objects.remove(gone) {
                changes.push((EventType::Deleted, old, None));
            }
        }
        if !new_keys.is_empty() {
            self.by_pool.insert(pool.clone(), new_keys);
        }
        changes
    }

    fn record(
        &mut self,
        rv: u64,
        changes: Vec<(EventType, Arc<ViewObject>, Option<Arc<ViewObject>>)>,
        limit: usize,
    ) {
        for (kind, object, previous) in changes {
            self.history.push_back(Entry {
                seq: self.next_seq,
                rv,
                kind,
                object,
                previous,
            });
            self.next_seq += 1;
        }
        // Trim whole versions, so that "resume from V" never skips half of V's changes.
        while self.history.len() > limit {
            let Some(dropped) = self.history.pop_front() else {
                break;
            };
            self.oldest_rv = self.oldest_rv.max(dropped.rv);
            while self.history.front().is_some_and(|e| e.rv == dropped.rv) {
                self.history.pop_front();
            }
        }
    }
}

struct Inner {
    sources: Sources,
    synced: BTreeSet<SourceKind>,
    ready: bool,
    /// The highest source version seen (deletions included).
    source_rv: u64,
    views: [View; 3],
}

/// Where a watch starts.
pub struct WatchStart {
    /// The current objects (a watch without a resourceVersion starts with ADDED for them).
    pub initial: Vec<Arc<ViewObject>>,
    /// The changes after the requested version (a resumed watch).
    pub replay: Vec<Entry>,
    /// The view's version now.
    pub rv: u64,
    /// Read further changes with [`Engine::events_after`] from here.
    pub cursor: u64,
}

pub struct Engine {
    inner: Mutex<Inner>,
    changed: watch::Sender<u64>,
    history_limit: usize,
}

fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

impl Default for Engine {
    fn default() -> Self {
        Engine::new(200_000)
    }
}

impl Engine {
    /// `history_limit`: changes remembered per view for resuming watches.
    pub fn new(history_limit: usize) -> Self {
        Engine {
            inner: Mutex::new(Inner {
                sources: Sources::default(),
                synced: BTreeSet::new(),
                ready: false,
                source_rv: 0,
                views: Default::default(),
            }),
            changed: watch::channel(0).0,
            history_limit: history_limit.max(1),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic elsewhere cannot leave the views half-updated in a way worse than stale.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Wakes when any view changed (the value is a counter).
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// True once every source kind has been listed once.
    pub fn is_ready(&self) -> bool {
        self.lock().ready
    }

    /// What has not been listed yet (for /readyz).
    pub fn unsynced(&self) -> Vec<SourceKind> {
        let inner = self.lock();
        SourceKind::ALL
            .into_iter()
            .filter(|k| !inner.synced.contains(k))
            .collect()
    }

    /// Applies source changes and updates the views.
    pub fn apply(&self, changes: Vec<Change>) {
        let mut inner = self.lock();
        let mut dirty: BTreeSet<Key> = BTreeSet::new();
        let mut dirty_networks: BTreeSet<String> = BTreeSet::new();
        let mut lease_dirty: BTreeSet<Key> = BTreeSet::new();
        let mut max_rv = 0u64;
        for change in changes {
            match change {
                Change::Apply(obj) => {
                    max_rv = max_rv.max(rv_of(obj.meta()));
                    note(&mut inner.sources, &obj, &mut dirty, &mut dirty_networks);
                    insert(&mut inner.sources, obj);
                }
                Change::Delete(obj) => {
                    max_rv = max_rv.max(rv_of(obj.meta()));
                    note(&mut inner.sources, &obj, &mut dirty, &mut dirty_networks);
                    remove(&mut inner.sources, &obj);
                }
                Change::Replace(kind, objs) => {
                    let old: Vec<SourceObject> = all_of(&inner.sources, kind);
                    let new_keys: BTreeSet<Key> = objs.iter().map(|o| key_of(o.meta())).collect();
                    for o in &old {
                        if !new_keys.contains(&key_of(o.meta())) {
                            note(&mut inner.sources, o, &mut dirty, &mut dirty_networks);
                            remove(&mut inner.sources, o);
                        }
                    }
                    for o in objs {
                        max_rv = max_rv.max(rv_of(o.meta()));
                        if !same_version(&inner.sources, &o) {
                            note(&mut inner.sources, &o, &mut dirty, &mut dirty_networks);
                        }
                        insert(&mut inner.sources, o);
                    }
                    inner.synced.insert(kind);
                }
                Change::Leases(pool, doc) => {
                    match doc {
                        Some(d) => {
                            if inner.sources.leases.get(&pool).is_some_and(|o| **o == d) {
                                continue;
                            }
                            inner.sources.leases.insert(pool.clone(), Arc::new(d));
                        }
                        None => {
                            if inner.sources.leases.remove(&pool).is_none() {
                                continue;
                            }
                        }
                    }
                    lease_dirty.insert(pool);
                }
            }
        }
        for (key, pool) in &inner.sources.pools {
            if dirty_networks.contains(&pool_network(pool)) {
                dirty.insert(key.clone());
            }
        }
        lease_dirty.extend(dirty.iter().cloned());
        inner.source_rv = inner.source_rv.max(max_rv);
        let max_rv = inner.source_rv;
        let limit = self.history_limit;
        let inner = &mut *inner;
        let first_time = !inner.ready;
        if first_time {
            if !SourceKind::ALL.iter().all(|k| inner.synced.contains(k)) {
                return;
            }
            // First complete picture: compute everything, remember no history before it.
            inner.ready = true;
            dirty = inner.sources.pools.keys().cloned().collect();
            lease_dirty = inner.sources.leases.keys().cloned().collect();
            lease_dirty.extend(dirty.iter().cloned());
        }
        let networks: BTreeSet<String> = dirty
            .iter()
            .filter_map(|k| inner.sources.pools.get(k).map(|p| pool_network(p)))
            .collect();
        let holders = holder_index(&inner.sources, &networks);
        let mut alloc_changes = Vec::new();
        let mut mac_changes = Vec::new();
        for pool_key in &dirty {
            let (allocs, macs) = match inner.sources.pools.get(pool_key) {
                Some(pool) => pool_views(pool, &holders),
                None => (Vec::new(), Vec::new()),
            };
            let [alloc_view, mac_view, _] = &mut inner.views;
            let allocs = alloc_view.keep_versions(allocs);
            let macs = mac_view.keep_versions(macs);
            alloc_changes.extend(alloc_view.replace_pool(pool_key, allocs));
            mac_changes.extend(mac_view.replace_pool(pool_key, macs));
        }
        let mut lease_changes = Vec::new();
        let lease_rv = now_micros().max(inner.views[2].rv + 1);
        for pool_key in &lease_dirty {
            let objects = match (
                inner.sources.pools.get(pool_key),
                inner.sources.leases.get(pool_key),
            ) {
                (Some(pool), Some(doc)) => lease_views(pool, doc),
                _ => Vec::new(),
            };
            let view = &mut inner.views[2];
            let objects = objects
                .into_iter()
                .map(|mut o| {
                    o.resource_version = lease_rv;
                    o
                })
                .collect();
            let objects = view.keep_versions(objects);
            lease_changes.extend(view.replace_pool(pool_key, objects));
        }
        let mut any = false;
        let [alloc_view, mac_view, lease_view] = &mut inner.views;
        for (view, changes, rv) in [
            (alloc_view, alloc_changes, None),
            (mac_view, mac_changes, None),
            (lease_view, lease_changes, Some(lease_rv)),
        ] {
            let rv = match rv {
                Some(lease_rv) if !changes.is_empty() => lease_rv,
                Some(_) => view.rv.max(1),
                None => view.rv.max(max_rv),
            };
            view.rv = rv;
            if first_time {
                view.oldest_rv = rv;
                continue;
            }
            any |= !changes.is_empty();
            view.record(rv, changes, limit);
        }
        if first_time || any {
            self.changed.send_modify(|n| *n += 1);
        }
    }

    fn view<T>(
        &self,
        resource: Resource,
        f: impl FnOnce(&View) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let inner = self.lock();
        if !inner.ready {
            return Err(StoreError::NotReady);
        }
        f(&inner.views[resource.index()])
    }

    /// The objects (sorted by namespace and name) and the list's version.
    pub fn list(
        &self,
        resource: Resource,
        namespace: Option<&str>,
    ) -> Result<(Vec<Arc<ViewObject>>, u64), StoreError> {
        self.view(resource, |v| {
            let items = match namespace {
                None => v.objects.values().cloned().collect(),
                Some(ns) => v
                    .objects
                    .range((ns.to_string(), String::new())..)
                    .take_while(|((n, _), _)| n == ns)
                    .map(|(_, o)| o.clone())
                    .collect(),
            };
            Ok((items, v.rv))
        })
    }

    pub fn get(
        &self,
        resource: Resource,
        namespace: &str,
        name: &str,
    ) -> Result<Option<Arc<ViewObject>>, StoreError> {
        self.view(resource, |v| {
            Ok(v.objects
                .get(&(namespace.to_string(), name.to_string()))
                .cloned())
        })
    }

    pub fn resource_version(&self, resource: Resource) -> Result<u64, StoreError> {
        self.view(resource, |v| Ok(v.rv))
    }

    /// Starts a watch: from now with the current objects (`from` = None), or resumed after
    /// version `from`.
    pub fn watch_from(
        &self,
        resource: Resource,
        from: Option<u64>,
    ) -> Result<WatchStart, StoreError> {
        self.view(resource, |v| match from {
            None => Ok(WatchStart {
                initial: v.objects.values().cloned().collect(),
                replay: Vec::new(),
                rv: v.rv,
                cursor: v.next_seq,
            }),
            Some(asked) if asked < v.oldest_rv => Err(StoreError::Expired {
                asked,
                oldest: v.oldest_rv,
            }),
            Some(asked) => Ok(WatchStart {
                initial: Vec::new(),
                replay: v.history.iter().filter(|e| e.rv > asked).cloned().collect(),
                rv: v.rv,
                cursor: v.next_seq,
            }),
        })
    }

    /// The changes from `cursor` on, and the next cursor; Expired when the watcher fell so
    /// far behind that the history no longer holds them.
    pub fn events_after(
        &self,
        resource: Resource,
        cursor: u64,
    ) -> Result<(Vec<Entry>, u64, u64), StoreError> {
        self.view(resource, |v| {
            if cursor < v.first_seq() {
                return Err(StoreError::Expired {
                    asked: cursor,
                    oldest: v.oldest_rv,
                });
            }
            let skip = usize::try_from(cursor - v.first_seq()).unwrap_or(usize::MAX);
            let events: Vec<Entry> = v.history.iter().skip(skip).cloned().collect();
            Ok((events, v.next_seq, v.rv))
        })
    }

    /// For the lease poller: every pool with the agent pods to ask, best first.
    pub fn lease_targets(&self) -> Vec<(Key, Vec<(Key, String)>)> {
        let inner = self.lock();
        inner
            .sources
            .pools
            .keys()
            .map(|k| (k.clone(), agent_candidates(&inner.sources, k)))
            .collect()
    }
}

/// Marks what a source object's change touches: its pool, or the pools of its networks
/// (before and after the change).
fn note(
    sources: &mut Sources,
    obj: &SourceObject,
    dirty: &mut BTreeSet<Key>,
    networks: &mut BTreeSet<String>,
) {
    let key = key_of(obj.meta());
    match obj {
        SourceObject::Pool(_) => {
            dirty.insert(key);
        }
        SourceObject::VmNetCfg(cfg) => {
            networks.extend(vmnetcfg_networks(cfg));
            if let Some(old) = sources.vmnetcfgs.get(&key) {
                networks.extend(vmnetcfg_networks(old));
            }
        }
        SourceObject::Vm(vm) => {
            networks.extend(vm_networks(vm));
            if let Some(old) = sources.vms.get(&key) {
                networks.extend(vm_networks(old));
            }
        }
        SourceObject::Agent(_) => {}
    }
}

fn same_version(sources: &Sources, obj: &SourceObject) -> bool {
    let key = key_of(obj.meta());
    let rv = obj.meta().resource_version.as_ref();
    match obj {
        SourceObject::Pool(_) => sources
            .pools
            .get(&key)
            .is_some_and(|o| o.metadata.resource_version.as_ref() == rv),
        SourceObject::VmNetCfg(_) => sources
            .vmnetcfgs
            .get(&key)
            .is_some_and(|o| o.metadata.resource_version.as_ref() == rv),
        SourceObject::Vm(_) => sources
            .vms
            .get(&key)
            .is_some_and(|o| o.metadata.resource_version.as_ref() == rv),
        SourceObject::Agent(_) => sources
            .agents
            .get(&key)
            .is_some_and(|o| o.metadata.resource_version.as_ref() == rv),
    }
}

fn insert(sources: &mut Sources, obj: SourceObject) {
    let key = key_of(obj.meta());
    match obj {
        SourceObject::Pool(o) => {
            sources.pools.insert(key, Arc::new(o));
        }
        SourceObject::VmNetCfg(o) => {
            sources.vmnetcfgs.insert(key, Arc::new(o));
        }
        SourceObject::Vm(o) => {
            sources.vms.insert(key, Arc::new(o));
        }
        SourceObject::Agent(o) => {
            sources.agents.insert(key, Arc::new(o));
        }
    }
}

fn remove(sources: &mut Sources, obj: &SourceObject) {
    let key = key_of(obj.meta());
    match obj {
        SourceObject::Pool(_) => {
            sources.pools.remove(&key);
            sources.leases.remove(&key);
        }
        SourceObject::VmNetCfg(_) => {
            sources.vmnetcfgs.remove(&key);
        }
        SourceObject::Vm(_) => {
            sources.vms.remove(&key);
        }
        SourceObject::Agent(_) => {
            sources.agents.remove(&key);
        }
    }
}

fn all_of(sources: &Sources, kind: SourceKind) -> Vec<SourceObject> {
    match kind {
        SourceKind::Pools => sources
            .pools
            .values()
            .map(|o| SourceObject::Pool((**o).clone()))
            .collect(),
        SourceKind::VmNetCfgs => sources
            .vmnetcfgs
            .values()
            .map(|o| SourceObject::VmNetCfg((**o).clone()))
            .collect(),
        SourceKind::Vms => sources
            .vms
            .values()
            .map(|o| SourceObject::Vm((**o).clone()))
            .collect(),
        SourceKind::Agents => sources
            .agents
            .values()
            .map(|o| SourceObject::Agent((**o).clone()))
            .collect(),
    }
}
