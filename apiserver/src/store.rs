//! The engine: the source objects, the views computed from them, and each view's recent
//! history of changes for watches.
//!
//! resourceVersions. Kubernetes clients (Rancher Steve) parse them as integers, watchers
//! resume from the last one they saw, possibly on another replica, and they must keep
//! increasing across restarts. So they are derived from the IPPools' resourceVersions, which
//! are etcd revisions (one counter for the whole cluster):
//! - `ipamallocations` and `macaddresses` are computed from the IPPools alone, which arrive on
//!   one watch stream in revision order, so every replica sees the same changes in the same
//!   order. One pool change at revision `r` can change many objects: the i-th of them (in an
//!   order fixed by the pool's before and after, so the same on every replica) gets version
//!   `r × 65,536 + i`, so every event has a version of its own and every replica gives it
//!   the same one. A list's version is
//!   `r × 65,536 + 65,535` for the last revision seen. A watch resumed from version V on any
//!   replica gets exactly the changes after V (a replica that has not seen V yet sends only
//!   what comes after it); a V older than what the replica remembers gets 410 Expired and
//!   the client lists again, as with kube-apiserver's watch cache. A list's version is the
//!   newest pool revision the replica holds: a deleted pool's revision is not among them,
//!   so after such a deletion a replica started later may list at a lower version.
//!   (After a relist of the pools, which coalesces the changes it missed, this replica's
//!   versions continue from its last one; only then can they differ from another replica's.)
//! - an object keeps its version while its content is unchanged (a pool's new revision does
//!   not turn each of its 10,000 allocations into a MODIFIED event); a replica started later
//!   shows the pool's version it first saw for objects unchanged since.
//! - `dhcpleases` have no etcd revision (the agent holds them): their versions are this
//!   replica's clock in microseconds, strictly increasing, as kube's own recommendation for
//!   servers without storage. Resuming a lease watch on another replica works when the clocks
//!   agree; otherwise the client gets 410 and lists again.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use k8s_openapi::api::core::v1::Pod;
use tokio::sync::watch;
use vm_dhcp_core::crd::IPPool;

use crate::resources::Resource;
use crate::views::{
    AgentLeases, Key, PartialViews, Sources, ViewObject, agent_candidates, changed_views, key_of,
    lease_views, pool_views, rv_of,
};

/// Versions per pool revision (see the module documentation).
pub const VERSIONS_PER_REVISION: u64 = 1 << 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum SourceKind {
    Pools,
    Agents,
}

impl SourceKind {
    pub const ALL: [SourceKind; 2] = [SourceKind::Pools, SourceKind::Agents];
}

/// Short-lived (from a watch event into the engine), so the size difference of the variants
/// costs nothing worth a box.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum SourceObject {
    Pool(IPPool),
    Agent(Pod),
}

impl SourceObject {
    fn meta(&self) -> &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
        match self {
            SourceObject::Pool(o) => &o.metadata,
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
        "the views are not ready yet: the server is still reading the IPPools and agent pods; retry in a few seconds"
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

    /// Updates some objects of one pool: `objects` new or changed, `gone` the names of those
    /// removed; returns the changes, each with the next version from `next`.
    fn update_pool(
        &mut self,
        pool: &Key,
        objects: Vec<ViewObject>,
        gone: Vec<String>,
        next: &mut impl FnMut() -> u64,
    ) -> Vec<(EventType, Arc<ViewObject>, Option<Arc<ViewObject>>)> {
        let View {
            objects: all,
            by_pool,
            ..
        } = self;
        let keys = by_pool.entry(pool.clone()).or_default();
        let mut changes = Vec::new();
        for mut obj in objects {
            let key = obj.key();
            let (kind, previous) = match all.get(&key) {
                Some(old) if old.same_content(&obj) => continue,
                Some(old) => (EventType::Modified, Some(old.clone())),
                None => (EventType::Added, None),
            };
            obj.resource_version = next();
            let obj = Arc::new(obj);
            keys.insert(key.clone());
            all.insert(key, obj.clone());
            changes.push((kind, obj, previous));
        }
        for name in gone {
            let key = (pool.0.clone(), name);
            if let Some(old) = all.remove(&key) {
                keys.remove(&key);
                let mut last = (*old).clone();
                last.resource_version = next();
                changes.push((EventType::Deleted, Arc::new(last), None));
            }
        }
        if keys.is_empty() {
            by_pool.remove(pool);
        }
        changes
    }

    /// Replaces the objects of one pool; returns the changes, each with the next version
    /// from `next` (changed and added objects in name order, then deletions).
    fn replace_pool(
        &mut self,
        pool: &Key,
        objects: Vec<ViewObject>,
        next: &mut impl FnMut() -> u64,
    ) -> Vec<(EventType, Arc<ViewObject>, Option<Arc<ViewObject>>)> {
        let old_keys = self.by_pool.remove(pool).unwrap_or_default();
        let mut new_keys = BTreeSet::new();
        let mut changes = Vec::new();
        for mut obj in objects {
            let key = obj.key();
            new_keys.insert(key.clone());
            let (kind, previous) = match self.objects.get(&key) {
                Some(old) if **old == obj => continue,
                Some(old) => (EventType::Modified, Some(old.clone())),
                None => (EventType::Added, None),
            };
            obj.resource_version = next();
            let obj = Arc::new(obj);
            self.objects.insert(key, obj.clone());
            changes.push((kind, obj, previous));
        }
        for gone in old_keys.difference(&new_keys) {
            if let Some(old) = self.objects.remove(gone) {
                let mut last = (*old).clone();
                last.resource_version = next();
                changes.push((EventType::Deleted, Arc::new(last), None));
            }
        }
        if !new_keys.is_empty() {
            self.by_pool.insert(pool.clone(), new_keys);
        }
        changes
    }

    /// Remembers changes for resuming watches; each carries its object's version.
    fn record(
        &mut self,
        changes: Vec<(EventType, Arc<ViewObject>, Option<Arc<ViewObject>>)>,
        limit: usize,
    ) {
        for (kind, object, previous) in changes {
            self.history.push_back(Entry {
                seq: self.next_seq,
                rv: object.resource_version,
                kind,
                object,
                previous,
            });
            self.next_seq += 1;
        }
        // Every change has a version of its own: resuming from a trimmed one is Expired.
        while self.history.len() > limit {
            let Some(dropped) = self.history.pop_front() else {
                break;
            };
            self.oldest_rv = self.oldest_rv.max(dropped.rv);
        }
    }
}

struct Inner {
    sources: Sources,
    synced: BTreeSet<SourceKind>,
    ready: bool,
    /// The highest pool revision seen.
    pool_rv: u64,
    views: [View; 3],
}

/// The list version after pool revision `rv`: above every change version of that revision.
fn last_version_of(rv: u64) -> u64 {
    rv.saturating_mul(VERSIONS_PER_REVISION)
        .saturating_add(VERSIONS_PER_REVISION - 1)
}

/// How one pool's objects are brought up to date.
enum PoolUpdate {
    /// Every object (a new or deleted pool, or its identity changed): (allocations, MACs).
    Full(Vec<ViewObject>, Vec<ViewObject>),
    /// Only what the change touched.
    Partial(PartialViews),
}

impl Inner {
    /// Recomputes the allocation and MAC views of `pools` (key → the pool before the change)
    /// after a pool change at revision `rv`, giving each change the next version of that
    /// revision. True if anything changed.
    fn pools_changed(
        &mut self,
        pools: &BTreeMap<Key, Option<Arc<IPPool>>>,
        rv: u64,
        limit: usize,
    ) -> bool {
        let mut updates: Vec<(Key, PoolUpdate)> = pools
            .iter()
            .map(|(key, old)| {
                let new = self.sources.pools.get(key);
                let partial = match (old, new) {
                    (Some(old), Some(new)) => changed_views(old, new),
                    _ => None,
                };
                let update = match partial {
                    Some(p) => PoolUpdate::Partial(p),
                    None => {
                        let (allocs, macs) = new.map(|p| pool_views(p)).unwrap_or_default();
                        PoolUpdate::Full(allocs, macs)
                    }
                };
                (key.clone(), update)
            })
            .collect();
        let mut any = false;
        for (index, view) in self.views[..2].iter_mut().enumerate() {
            let mut next_version = view
                .rv
                .saturating_add(1)
                .max(rv.saturating_mul(VERSIONS_PER_REVISION));
            let mut next = || {
                let v = next_version;
                next_version += 1;
                v
            };
            let mut changes = Vec::new();
            for (key, update) in &mut updates {
                match update {
                    PoolUpdate::Full(allocs, macs) => {
                        let objects = std::mem::take(if index == 0 { allocs } else { macs });
                        let objects = view.keep_versions(objects);
                        changes.extend(view.replace_pool(key, objects, &mut next));
                    }
                    PoolUpdate::Partial(p) => {
                        let (objects, gone) = if index == 0 {
                            (&mut p.allocations, &mut p.allocations_gone)
                        } else {
                            (&mut p.macs, &mut p.macs_gone)
                        };
                        changes.extend(view.update_pool(
                            key,
                            std::mem::take(objects),
                            std::mem::take(gone),
                            &mut next,
                        ));
                    }
                }
            }
            view.rv = view.rv.max(last_version_of(rv)).max(next_version - 1);
            any |= !changes.is_empty();
            view.record(changes, limit);
        }
        any
    }

    /// Recomputes the lease view of `pools` (versions from the clock). True if anything
    /// changed; `first` records no history.
    fn update_leases(&mut self, pools: &BTreeSet<Key>, limit: usize, first: bool) -> bool {
        let view = &mut self.views[2];
        let lease_rv = now_micros().max(view.rv + 1);
        let mut next_version = lease_rv;
        let mut changes = Vec::new();
        for pool_key in pools {
            let objects = match (
                self.sources.pools.get(pool_key),
                self.sources.leases.get(pool_key),
            ) {
                (Some(pool), Some(doc)) => lease_views(pool, doc),
                _ => Vec::new(),
            };
            let objects = view.keep_versions(objects);
            changes.extend(view.replace_pool(pool_key, objects, &mut || {
                let v = next_version;
                next_version += 1;
                v
            }));
        }
        if first {
            // The list version covers every object's version.
            view.rv = next_version.max(lease_rv + 1) - 1;
            view.oldest_rv = view.rv;
            return false;
        }
        if changes.is_empty() {
            view.rv = view.rv.max(1);
            return false;
        }
        view.rv = next_version - 1;
        view.record(changes, limit);
        true
    }
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
                pool_rv: 0,
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

    /// Applies source changes and updates the views. Pool changes are turned into view
    /// changes one at a time, in the order given (the watch stream's, so revision order).
    pub fn apply(&self, changes: Vec<Change>) {
        let mut guard = self.lock();
        let inner = &mut *guard;
        let limit = self.history_limit;
        let mut lease_dirty: BTreeSet<Key> = BTreeSet::new();
        let mut any = false;
        for change in changes {
            // The pools touched, each with its version before the change.
            let mut pools: BTreeMap<Key, Option<Arc<IPPool>>> = BTreeMap::new();
            let mut touch = |sources: &Sources, obj: &SourceObject| {
                if let Some(key) = pool_key(obj) {
                    let before = sources.pools.get(&key).cloned();
                    pools.entry(key).or_insert(before);
                }
            };
            let rv = match change {
                Change::Apply(obj) => {
                    touch(&inner.sources, &obj);
                    let rv = rv_of(obj.meta());
                    insert(&mut inner.sources, obj);
                    rv
                }
                Change::Delete(obj) => {
                    touch(&inner.sources, &obj);
                    let rv = rv_of(obj.meta());
                    remove(&mut inner.sources, &obj);
                    rv
                }
                Change::Replace(kind, objs) => {
                    let new_keys: BTreeSet<Key> = objs.iter().map(|o| key_of(o.meta())).collect();
                    for o in all_of(&inner.sources, kind) {
                        if !new_keys.contains(&key_of(o.meta())) {
                            touch(&inner.sources, &o);
                            remove(&mut inner.sources, &o);
                        }
                    }
                    let mut rv = 0;
                    for o in objs {
                        if !same_version(&inner.sources, &o) {
                            touch(&inner.sources, &o);
                        }
                        rv = rv.max(rv_of(o.meta()));
                        insert(&mut inner.sources, o);
                    }
                    inner.synced.insert(kind);
                    rv
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
                    continue;
                }
            };
            if pools.is_empty() {
                continue;
            }
            inner.pool_rv = inner.pool_rv.max(rv);
            lease_dirty.extend(pools.keys().cloned());
            if inner.ready {
                any |= inner.pools_changed(&pools, rv, limit);
            }
        }
        if !inner.ready {
            if !SourceKind::ALL.iter().all(|k| inner.synced.contains(k)) {
                return;
            }
            // The first complete picture: every object at its pool's version, and no
            // history before it.
            inner.ready = true;
            let pools: Vec<Key> = inner.sources.pools.keys().cloned().collect();
            for key in &pools {
                let (allocs, macs) = inner
                    .sources
                    .pools
                    .get(key)
                    .map(|p| pool_views(p))
                    .unwrap_or_default();
                let version = inner.sources.pools.get(key).map_or(0, |p| {
                    rv_of(&p.metadata).saturating_mul(VERSIONS_PER_REVISION)
                });
                for (view, objects) in inner.views.iter_mut().zip([allocs, macs]) {
                    view.replace_pool(key, objects, &mut || version);
                }
            }
            let rv = last_version_of(inner.pool_rv);
            for view in &mut inner.views[..2] {
                view.rv = rv;
                view.oldest_rv = rv;
            }
            lease_dirty = inner.sources.leases.keys().cloned().collect();
            lease_dirty.extend(pools);
            inner.update_leases(&lease_dirty, limit, true);
            drop(guard);
            self.changed.send_modify(|n| *n += 1);
            return;
        }
        any |= inner.update_leases(&lease_dirty, limit, false);
        drop(guard);
        if any {
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

    /// How many objects each view holds.
    pub fn object_counts(&self) -> Vec<(Resource, usize)> {
        let inner = self.lock();
        [
            Resource::IpamAllocations,
            Resource::MacAddresses,
            Resource::DhcpLeases,
        ]
        .into_iter()
        .map(|r| (r, inner.views[r.index()].objects.len()))
        .collect()
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

/// The pool a source change touches (agents touch none: they only tell the lease poller
/// whom to ask).
fn pool_key(obj: &SourceObject) -> Option<Key> {
    match obj {
        SourceObject::Pool(p) => Some(key_of(&p.metadata)),
        SourceObject::Agent(_) => None,
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
        SourceKind::Agents => sources
            .agents
            .values()
            .map(|o| SourceObject::Agent((**o).clone()))
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A pool whose addresses 10.0.0.<a> are held by MACs ending in <a>.
    fn pool(rv: u64, addresses: &[u8]) -> SourceObject {
        let texts: Vec<(String, String)> = addresses
            .iter()
            .map(|a| (format!("10.0.0.{a}"), format!("52:54:00:00:00:{a:02x}")))
            .collect();
        let rows: Vec<Row> = texts
            .iter()
            .map(|(ip, mac)| (ip.as_str(), mac.as_str(), None, false))
            .collect();
        pool_of(rv, &rows)
    }

    fn ready(engine: &Engine, first: SourceObject) {
        engine.apply(vec![
            Change::Replace(SourceKind::Pools, vec![first]),
            Change::Replace(SourceKind::Agents, vec![]),
        ]);
    }

    fn versions(entries: &[Entry]) -> Vec<(u64, String)> {
        entries
            .iter()
            .map(|e| (e.rv, e.object.name.clone()))
            .collect()
    }

    /// (address, MAC or mark, owner, static).
    type Row<'a> = (&'a str, &'a str, Option<&'a str>, bool);

    /// A pool from entries.
    fn pool_of(rv: u64, entries: &[Row]) -> SourceObject {
        let allocated: serde_json::Map<String, serde_json::Value> = entries
            .iter()
            .map(|(a, v, _, _)| (a.to_string(), v.to_string().into()))
            .collect();
        let owners: serde_json::Map<String, serde_json::Value> = entries
            .iter()
            .filter_map(|(a, _, o, _)| Some((a.to_string(), (*o)?.to_string().into())))
            .collect();
        let statics: Vec<&str> = entries
            .iter()
            .filter(|e| e.3)
            .map(|(a, _, _, _)| *a)
            .collect();
        SourceObject::Pool(
            serde_json::from_value(json!({
                "apiVersion": "network.harvesterhci.io/v1alpha1", "kind": "IPPool",
                "metadata": {"name": "net", "namespace": "default", "resourceVersion": rv.to_string()},
                "spec": {"networkName": "default/net", "ipv4Config": {"cidr": "10.0.0.0/24",
                    "serverIP": "10.0.0.2", "pool": {"start": "10.0.0.10", "end": "10.0.0.200"}}},
                "status": {"ipv4": {"used": 1, "available": 1, "allocated": allocated,
                    "owners": owners, "staticAddresses": statics}}
            }))
            .expect("pool"),
        )
    }

    fn contents(engine: &Engine, resource: Resource) -> Vec<(String, serde_json::Value)> {
        let (items, _) = engine.list(resource, None).expect("list");
        items
            .iter()
            .map(|o| (o.name.clone(), json!([o.labels, o.fields])))
            .collect()
    }

    #[test]
    fn updating_only_what_a_write_touched_ends_where_a_full_computation_does() {
        let m1 = "52:54:00:00:00:01";
        let m2 = "52:54:00:00:00:02";
        let m3 = "52:54:00:00:00:03";
        let revisions: Vec<Vec<Row>> = vec![
            vec![
                ("10.0.0.10", m1, Some("ns/a"), false),
                ("10.0.0.2", "RESERVED", None, false),
            ],
            // An owner adopted, a static address added, a mark.
            vec![
                ("10.0.0.10", m1, Some("ns/a2"), false),
                ("10.0.0.11", m2, Some("ns/b"), true),
                ("10.0.0.12", "EXCLUDED", None, false),
                ("10.0.0.2", "RESERVED", None, false),
            ],
            // A MAC moves to another address; one address held by garbage; a MAC twice.
            vec![
                ("10.0.0.13", m1, Some("ns/a2"), false),
                ("10.0.0.11", m2, None, false),
                ("10.0.0.14", "not-a-mac", None, false),
                ("10.0.0.15", m3, Some("ns/c"), false),
                ("10.0.0.16", m3, Some("ns/c"), true),
                ("10.0.0.2", "RESERVED", None, false),
                // An unreadable key holding a MAC too, sorting after every address.
                ("9.not.an.address", m1, None, false),
            ],
            // Released, and a MAC held twice becomes held once.
            vec![("10.0.0.15", m3, Some("ns/c"), false)],
            vec![],
        ];
        let step = Engine::new(1000);
        ready(&step, pool_of(100, &revisions[0]));
        for (i, entries) in revisions.iter().enumerate().skip(1) {
            let rv = 100 + i as u64;
            step.apply(vec![Change::Apply(pool_of(rv, entries))]);
            let whole = Engine::new(1000);
            ready(&whole, pool_of(rv, entries));
            for resource in [Resource::IpamAllocations, Resource::MacAddresses] {
                assert_eq!(
                    contents(&step, resource),
                    contents(&whole, resource),
                    "revision {rv}, {resource:?}"
                );
            }
        }
        // Each step's events replayed on the first picture give the last one: every change
        // was announced.
        let events = step
            .watch_from(Resource::MacAddresses, Some(last_version_of(100)))
            .expect("watch");
        assert!(events.replay.iter().any(|e| e.kind == EventType::Deleted));
        let versions: BTreeSet<u64> = events.replay.iter().map(|e| e.rv).collect();
        assert_eq!(versions.len(), events.replay.len(), "one version per event");
    }

    fn leases(states: &[(u8, &str)]) -> Change {
        let doc: AgentLeases = serde_json::from_value(json!({
            "agent": "a-0", "active": true,
            "items": states.iter().map(|(a, state)| json!({
                "address": format!("10.0.0.{a}"), "mac": format!("52:54:00:00:00:{a:02x}"),
                "state": state})).collect::<Vec<_>>()
        }))
        .expect("lease document");
        Change::Leases(("default".into(), "net".into()), Some(doc))
    }

    #[test]
    fn lease_versions_are_distinct_and_covered_by_the_list_version() {
        let engine = Engine::new(1000);
        engine.apply(vec![
            Change::Replace(SourceKind::Pools, vec![pool(100, &[10, 11, 12])]),
            leases(&[(10, "bound"), (11, "bound"), (12, "offered")]),
            Change::Replace(SourceKind::Agents, vec![]),
        ]);
        let (items, list_rv) = engine.list(Resource::DhcpLeases, None).expect("list");
        let versions: BTreeSet<u64> = items.iter().map(|o| o.resource_version).collect();
        assert_eq!(versions.len(), 3, "one version each");
        assert!(
            versions.iter().all(|v| *v <= list_rv),
            "{versions:?} > {list_rv}"
        );
        engine.apply(vec![leases(&[(10, "bound"), (11, "bound"), (12, "bound")])]);
        let changed = engine
            .watch_from(Resource::DhcpLeases, Some(list_rv))
            .expect("watch");
        assert_eq!(changed.replay.len(), 1, "only the lease that changed");
        assert!(changed.replay[0].rv > list_rv);
        assert_eq!(changed.rv, changed.replay[0].rv);
    }

    #[test]
    fn every_change_of_one_pool_revision_has_a_version_of_its_own() {
        let engine = Engine::new(1000);
        ready(&engine, pool(100, &[10]));
        engine.apply(vec![Change::Apply(pool(105, &[10, 11, 12]))]);
        let all = engine
            .watch_from(Resource::IpamAllocations, Some(last_version_of(100)))
            .expect("watch");
        let r = 105 * VERSIONS_PER_REVISION;
        assert_eq!(
            versions(&all.replay),
            vec![
                (r, "net.10-0-0-11".to_string()),
                (r + 1, "net.10-0-0-12".to_string())
            ]
        );
        assert_eq!(all.rv, last_version_of(105));
        // A watcher that saw only the first of the two resumes with exactly the second.
        let rest = engine
            .watch_from(Resource::IpamAllocations, Some(r))
            .expect("watch");
        assert_eq!(
            versions(&rest.replay),
            vec![(r + 1, "net.10-0-0-12".into())]
        );
    }

    #[test]
    fn replicas_fed_the_same_revisions_give_the_same_versions() {
        // Replica A gets the pool's revisions one by one, replica B in one batch and with
        // agent changes in between: the events and their versions must be the same, so a
        // watcher can resume on either.
        let a = Engine::new(1000);
        let b = Engine::new(1000);
        ready(&a, pool(100, &[10]));
        ready(&b, pool(100, &[10]));
        a.apply(vec![Change::Apply(pool(110, &[10, 11]))]);
        a.apply(vec![Change::Apply(pool(120, &[11, 12, 13]))]);
        a.apply(vec![Change::Apply(pool(130, &[11, 12, 13, 14]))]);
        b.apply(vec![
            Change::Apply(pool(110, &[10, 11])),
            Change::Replace(SourceKind::Agents, vec![]),
            Change::Apply(pool(120, &[11, 12, 13])),
            Change::Apply(pool(130, &[11, 12, 13, 14])),
        ]);
        let from = last_version_of(100);
        let on_a = a
            .watch_from(Resource::IpamAllocations, Some(from))
            .expect("a");
        let on_b = b
            .watch_from(Resource::IpamAllocations, Some(from))
            .expect("b");
        assert_eq!(versions(&on_a.replay), versions(&on_b.replay));
        assert_eq!(
            on_a.replay.len(),
            5,
            "11 added; 12 and 13 added, 10 deleted; 14 added"
        );
        // Resume on B from the middle of revision 120 as seen on A.
        let middle = on_a.replay[2].rv;
        let rest = b
            .watch_from(Resource::IpamAllocations, Some(middle))
            .expect("b");
        assert_eq!(versions(&rest.replay), versions(&on_a.replay[3..]));
        let macs_a = a.watch_from(Resource::MacAddresses, Some(from)).expect("a");
        let macs_b = b.watch_from(Resource::MacAddresses, Some(from)).expect("b");
        assert_eq!(versions(&macs_a.replay), versions(&macs_b.replay));
    }
}
