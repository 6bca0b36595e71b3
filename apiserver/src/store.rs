//! The engine: the source objects, the views computed from them, and each view's recent
//! history of changes for watches.
//!
//! # resourceVersions
//!
//! Kubernetes clients (Rancher Steve) parse resourceVersions as integers, a watcher resumes
//! from the last one it saw, possibly on another replica, and they must keep growing across
//! restarts. `ipamallocations` and `macaddresses` are computed from two watched kinds: the
//! `IPPoolAddress` objects (one per allocated address, the truth: MAC, owner, static,
//! interface) and the IPPools (their network, and the reserved and excluded addresses of their
//! spec; their status is never read). Every write of either has an etcd revision of its own,
//! one counter for the whole cluster. The rule, with `K` = [`VERSIONS_PER_REVISION`] = 2^17:
//!
//! - **A view change caused by the write at revision `r` has version `r × K + i`**, `i`
//!   counting the view's changes of that revision in name order. An address object's
//!   create, update or delete changes at most one object of each view: `i = 0`, the version
//!   is `r × K`, the revision of the address object's event itself. A pool spec change (the
//!   pool created or deleted, `exclude` or `router` set) can change many rows at once:
//!   `i = 0, 1, …`, at most [`EVENT_VERSIONS`] of them. The reserved and excluded rows of
//!   a pool written at `r` (its spec or only its status) all take `r × K + j`, `j` their
//!   place among them by name, changed or not (a MODIFIED with the same content); the
//!   other rows the write changes come after them. So a replica that starts later, which
//!   knows only the pool's current resourceVersion, gives those rows the same versions as
//!   one that applied every write: a client that lists again on another replica never
//!   sees an unchanged row's version go back (client-go's informers compare them).
//! - **Writes are applied in revision order across both kinds**, so that every replica
//!   computes the same objects from the same states. The two kinds arrive on two watch
//!   streams, each in revision order, but not in one order relative to each other, and not
//!   in the same interleaving on two replicas. So a change at revision `r` waits until the
//!   other stream is known to have delivered everything up to `r`: it delivered a later write
//!   or a bookmark; or, for the pools, a consistent list of their identities (uid and
//!   generation) at a revision `≥ r` matches what their watch delivered (the server asks as
//!   soon as an address change waits: a few milliseconds); or the server gave up waiting
//!   (see below). Then the same change gets the same version on every replica.
//! - **The list version** of a replica (also in bookmarks) is `W × K + EVENT_VERSIONS` for
//!   its watermark `W`: every write up to revision `W` applied, none after. It is above
//!   every change version of revision `W` and below every version of `W + 1`, so a watch
//!   resumed from it anywhere gets exactly the writes after `W`.
//! - A watch resumed from `V` gets the changes after `V`; a replica that has not reached `V`
//!   yet skips what it applies up to `V`. A `V` older than the history a replica keeps (or
//!   than its start) gets 410 Expired and the client lists again, as with kube-apiserver's
//!   watch cache.
//! - An object keeps its version while its content is unchanged. A replica that starts later
//!   shows, for an object unchanged since, the address object's revision × `K` (what a
//!   replica that saw the write shows), and for a reserved or excluded row its pool's
//!   revision × `K` + its place among them (the same as an older replica's, see above). Start and relist read one consistent snapshot: the IPPools, then the address
//!   objects at exactly the IPPools' list revision.
//! - **What cannot be put in order is not hidden**: a write that arrives after the views have
//!   passed its revision (its watch fell behind more than the server waited, or an IPPool was
//!   created and deleted between two identity lists), or a relist after a watch lost its
//!   place (kube-apiserver's 410; the missed writes come coalesced). The replica applies it
//!   with a version from the top of its current slot (`W × K + EVENT_VERSIONS + n`, below
//!   revision `W + 1`), forgets its history and ends its watches with 410 Expired: their
//!   clients list again, on any replica.
//!
//! The first version derived everything from IPPool statuses as `pool revision × 65,536 +
//! i`; the factor is now 2^17, so a /16 pool's 65,534 rows fit in one revision, and versions
//! keep growing across the upgrade.
//!
//! `dhcpleases` have no etcd revision (the agent holds them): their versions are this
//! replica's clock in microseconds, strictly increasing, as kube's own recommendation for
//! servers without storage. Resuming a lease watch on another replica works when the clocks
//! agree; otherwise the client gets 410 and lists again.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use tokio::sync::watch;
use vm_dhcp_core::crd::{IPPool, IPPoolAddress};
use vm_dhcp_core::mac::MacAddr;

use crate::resources::Resource;
use crate::views::{
    Address, AgentLeases, Key, PoolSpec, Sources, ViewObject, agent_candidates, allocation_name,
    allocation_object, key_of, lease_views, mac_name, mac_object, rv_of,
};

/// Versions per etcd revision (see the module documentation).
pub const VERSIONS_PER_REVISION: u64 = 1 << 17;
/// The top of each revision's versions is kept for list versions (and resets).
pub const LIST_VERSIONS: u64 = 1 << 10;
/// How many view changes one revision can version.
pub const EVENT_VERSIONS: u64 = VERSIONS_PER_REVISION - LIST_VERSIONS;

/// The list version of a replica whose watermark is `revision`.
pub fn list_version(revision: u64) -> u64 {
    revision
        .saturating_mul(VERSIONS_PER_REVISION)
        .saturating_add(EVENT_VERSIONS)
}

/// The version of the `i`-th view change of revision `revision`.
pub fn change_version(revision: u64, i: u64) -> u64 {
    revision
        .saturating_mul(VERSIONS_PER_REVISION)
        .saturating_add(i)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum SourceKind {
    Pools,
    Addresses,
    Agents,
}

impl SourceKind {
    pub const ALL: [SourceKind; 3] = [SourceKind::Pools, SourceKind::Addresses, SourceKind::Agents];

    /// The ordered streams (pools, address objects) by index.
    fn stream(self) -> Option<usize> {
        match self {
            SourceKind::Pools => Some(POOLS),
            SourceKind::Addresses => Some(ADDRESSES),
            SourceKind::Agents => None,
        }
    }
}

const POOLS: usize = 0;
const ADDRESSES: usize = 1;
const STREAM_KINDS: [SourceKind; 2] = [SourceKind::Pools, SourceKind::Addresses];

/// Short-lived (from a watch event into the engine), so the size difference of the variants
/// costs nothing worth a box.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum SourceObject {
    Pool(IPPool),
    Address(IPPoolAddress),
    Agent(Pod),
}

/// What tells one IPPool from another and its spec from an older one: a list of these at a
/// revision that matches what the IPPool watch delivered proves that watch has nothing left
/// to deliver up to that revision that could change a view.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PoolIdentity {
    pub uid: Option<String>,
    pub generation: Option<i64>,
}

impl PoolIdentity {
    pub fn of(meta: &ObjectMeta) -> Self {
        PoolIdentity {
            uid: meta.uid.clone(),
            generation: meta.generation,
        }
    }
}

#[derive(Debug, Clone)]
pub enum Change {
    /// A watch event (created or updated); its resourceVersion is its etcd revision.
    Apply(SourceObject),
    /// A watch event (deleted); the object's resourceVersion is the deletion's revision.
    Delete(SourceObject),
    /// The IPPools and the address objects as of one revision (the address objects listed
    /// with `resourceVersionMatch=Exact` at the IPPools' list revision): at start and after
    /// either watch lost its place. Replaces both; the watches go on from `revision`.
    Snapshot {
        revision: u64,
        pools: Vec<IPPool>,
        addresses: Vec<IPPoolAddress>,
    },
    /// A complete listing of the agent pods (start-up and after a watch restart).
    Agents(Vec<Pod>),
    /// The watch of this kind has delivered everything up to this revision (a bookmark, or
    /// the server's decision to stop waiting for it).
    Progress(SourceKind, u64),
    /// A consistent list of the IPPools' identities at `revision` (see [`PoolIdentity`]).
    PoolProbe {
        revision: u64,
        pools: Vec<(Key, PoolIdentity)>,
    },
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
        "the views are not ready yet: the server is still reading the IPPools, their IPPoolAddress objects and the agent pods; retry in a few seconds"
    )]
    NotReady,
    #[error(
        "too old resource version: {asked} (the oldest this server can resume from is {oldest}); list again"
    )]
    Expired { asked: u64, oldest: u64 },
}

/// One view change before it has a version: (pool, object key, the object as it should be
/// now, or `None`: gone).
type Row = (Key, Key, Option<ViewObject>);

type Changes = Vec<(EventType, Arc<ViewObject>, Option<Arc<ViewObject>>)>;

/// How the changes of one source write are versioned.
#[derive(Debug, Clone, Copy)]
enum Stamp {
    /// The write at this revision, in order: `r × K + i`.
    At(u64),
    /// Out of order: the top of the current slot, history forgotten, watches ended.
    Reset,
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
    /// Watches positioned before this lost their place in a reset.
    min_seq: u64,
}

impl View {
    fn first_seq(&self) -> u64 {
        self.history
            .front()
            .map_or(self.next_seq, |e| e.seq)
            .max(self.min_seq)
    }

    fn put(&mut self, pool: &Key, obj: Arc<ViewObject>) {
        let key = obj.key();
        self.by_pool
            .entry(pool.clone())
            .or_default()
            .insert(key.clone());
        self.objects.insert(key, obj);
    }

    fn take(&mut self, pool: &Key, key: &Key) -> Option<Arc<ViewObject>> {
        if let Some(keys) = self.by_pool.get_mut(pool) {
            keys.remove(key);
            if keys.is_empty() {
                self.by_pool.remove(pool);
            }
        }
        self.objects.remove(key)
    }

    /// Brings `rows` up to date; each change gets its version from `stamp`. The rows in
    /// `restamp` (the reserved and excluded rows of a pool written at this revision) take
    /// a new version even when their content is the same, and the first ones, in name
    /// order (see the module documentation). True if anything changed.
    fn commit(
        &mut self,
        rows: Vec<Row>,
        restamp: &BTreeSet<Key>,
        stamp: Stamp,
        watermark: u64,
        limit: usize,
    ) -> bool {
        let mut diffs = Vec::new();
        let mut later = Vec::new();
        for (pool, key, desired) in rows {
            let old = self.objects.get(&key).cloned();
            let first = desired.is_some() && restamp.contains(&key);
            let kind = match (&old, &desired) {
                (None, None) => continue,
                (Some(o), Some(n)) if o.same_content(n) && !first => continue,
                (Some(_), Some(_)) => EventType::Modified,
                (None, Some(_)) => EventType::Added,
                (Some(_), None) => EventType::Deleted,
            };
            if first {
                diffs.push((pool, key, kind, desired, old));
            } else {
                later.push((pool, key, kind, desired, old));
            }
        }
        diffs.append(&mut later);
        if diffs.is_empty() {
            return false;
        }
        let in_order = match stamp {
            Stamp::At(rev) => (diffs.len() as u64 <= EVENT_VERSIONS
                && change_version(rev, 0) > self.rv
                && rev < u64::MAX / VERSIONS_PER_REVISION)
                .then_some(rev),
            Stamp::Reset => None,
        };
        let Some(rev) = in_order else {
            let version = self.reset(watermark);
            for (pool, key, _, desired, _) in diffs {
                self.take(&pool, &key);
                if let Some(mut obj) = desired {
                    obj.resource_version = version;
                    self.put(&pool, Arc::new(obj));
                }
            }
            return true;
        };
        let mut changes: Changes = Vec::with_capacity(diffs.len());
        for (i, (pool, key, kind, desired, old)) in diffs.into_iter().enumerate() {
            let version = change_version(rev, i as u64);
            match desired {
                Some(mut obj) => {
                    obj.resource_version = version;
                    let obj = Arc::new(obj);
                    self.put(&pool, obj.clone());
                    changes.push((kind, obj, old));
                }
                None => {
                    self.take(&pool, &key);
                    if let Some(old) = old {
                        let mut last = (*old).clone();
                        last.resource_version = version;
                        changes.push((EventType::Deleted, Arc::new(last), None));
                    }
                }
            }
        }
        self.record(changes, limit);
        true
    }

    /// A change that cannot be put in order: a version from the top of the current slot,
    /// no history before it, and every watch positioned before it ends with 410.
    fn reset(&mut self, watermark: u64) -> u64 {
        let end = change_version(watermark, VERSIONS_PER_REVISION - 1);
        let mut version = self.rv.saturating_add(1).max(list_version(watermark));
        if version > end {
            tracing::warn!(
                watermark,
                "more out-of-order changes at one revision than versions left for them"
            );
            version = end.max(self.rv);
        }
        tracing::info!(
            version,
            "a source change came out of revision order (or a relist found missed changes): watches on this replica restart"
        );
        self.rv = version;
        self.history.clear();
        self.next_seq += 1;
        self.min_seq = self.next_seq;
        self.oldest_rv = version;
        version
    }

    /// Remembers changes for resuming watches; each carries its object's version.
    fn record(&mut self, changes: Changes, limit: usize) {
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

    /// An object whose content did not change keeps its version (the lease view).
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

    /// Replaces the objects of one pool (the lease view); returns the changes, each with
    /// the next version from `next` (changed and added objects in name order, then
    /// deletions).
    fn replace_pool(
        &mut self,
        pool: &Key,
        objects: Vec<ViewObject>,
        next: &mut impl FnMut() -> u64,
    ) -> Changes {
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
}

/// The address objects of one pool.
#[derive(Debug, Default)]
struct PoolAddresses {
    /// Normally one object per address and per MAC; a half-made leftover (see core/src/store.rs) or a
    /// hand-made object can add a second until it is swept.
    by_ip: BTreeMap<IpAddr, Vec<Arc<Address>>>,
    by_mac: BTreeMap<MacAddr, Vec<Arc<Address>>>,
}

/// The object the views show when several hold one address or MAC (see [`Address::rank`]).
fn best(holders: &[Arc<Address>]) -> Option<&Arc<Address>> {
    holders.iter().max_by(|a, b| a.rank().cmp(&b.rank()))
}

impl PoolAddresses {
    fn insert(&mut self, a: Arc<Address>) {
        self.by_ip.entry(a.ip).or_default().push(a.clone());
        self.by_mac.entry(a.mac).or_default().push(a);
    }

    fn remove(&mut self, a: &Address) {
        if let Some(v) = self.by_ip.get_mut(&a.ip) {
            v.retain(|o| o.name != a.name);
            if v.is_empty() {
                self.by_ip.remove(&a.ip);
            }
        }
        if let Some(v) = self.by_mac.get_mut(&a.mac) {
            v.retain(|o| o.name != a.name);
            if v.is_empty() {
                self.by_mac.remove(&a.mac);
            }
        }
    }

    fn holder(&self, ip: IpAddr) -> Option<&Arc<Address>> {
        self.by_ip.get(&ip).and_then(|v| best(v))
    }

    fn of_mac(&self, mac: MacAddr) -> Option<&Arc<Address>> {
        self.by_mac.get(&mac).and_then(|v| best(v))
    }

    fn is_empty(&self) -> bool {
        self.by_ip.is_empty()
    }
}

/// The rows a source write may have changed.
#[derive(Debug, Default)]
struct Touched {
    ips: BTreeSet<(Key, IpAddr)>,
    macs: BTreeSet<(Key, MacAddr)>,
    /// The pool this write is of (its reserved and excluded rows take the write's version).
    pool: Option<Key>,
}

impl Touched {
    fn is_empty(&self) -> bool {
        self.ips.is_empty() && self.macs.is_empty() && self.pool.is_none()
    }

    /// Every row of a pool: its address objects' addresses and MACs, and its spec's marks.
    fn all_rows(&mut self, pool: &Key, spec: Option<&PoolSpec>, addresses: Option<&PoolAddresses>) {
        if let Some(spec) = spec {
            self.ips
                .extend(spec.marks.keys().map(|ip| (pool.clone(), *ip)));
        }
        if let Some(a) = addresses {
            self.ips
                .extend(a.by_ip.keys().map(|ip| (pool.clone(), *ip)));
            self.macs
                .extend(a.by_mac.keys().map(|mac| (pool.clone(), *mac)));
        }
    }
}

/// A write of an ordered stream, waiting for its turn (a few at a time, moved not copied:
/// boxing either variant would only add an allocation).
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
enum Item {
    Pool { obj: IPPool, deleted: bool },
    Address { obj: IPPoolAddress, deleted: bool },
}

#[derive(Debug)]
struct Queued {
    rev: u64,
    item: Item,
}

#[derive(Default)]
struct Inner {
    /// IPPools (as of the watermark), agent pods, lease documents.
    sources: Sources,
    /// What the views need of each IPPool's spec (as of the watermark).
    specs: BTreeMap<Key, PoolSpec>,
    /// Each pool's address objects (as of the watermark).
    addresses: BTreeMap<Key, PoolAddresses>,
    /// Address object `(namespace, name)` → its pool and what it holds.
    names: HashMap<Key, (Key, Arc<Address>)>,
    /// The snapshot of IPPools and address objects arrived.
    listed: bool,
    agents_listed: bool,
    ready: bool,
    /// Received writes of each stream (pools, address objects), in revision order, not
    /// applied yet.
    queues: [VecDeque<Queued>; 2],
    /// Each stream has delivered everything up to this revision.
    progress: [u64; 2],
    /// Every write up to this revision is applied, none after.
    watermark: u64,
    /// The IPPools as their watch delivered them (applied or waiting), for probes.
    received_pools: BTreeMap<Key, PoolIdentity>,
    /// Pools whose lease objects need recomputing.
    lease_dirty: BTreeSet<Key>,
    views: [View; 3],
}

impl Inner {
    /// The stream whose first waiting write is next in revision order, and that revision
    /// (pools first on a tie, which etcd never produces: one revision is one write).
    fn head(&self) -> Option<(usize, u64)> {
        match (self.queues[POOLS].front(), self.queues[ADDRESSES].front()) {
            (Some(p), Some(a)) if p.rev <= a.rev => Some((POOLS, p.rev)),
            (_, Some(a)) => Some((ADDRESSES, a.rev)),
            (Some(p), None) => Some((POOLS, p.rev)),
            (None, None) => None,
        }
    }

    /// A write received from one stream.
    fn receive(&mut self, stream: usize, item: Item, limit: usize) -> bool {
        let meta = match &item {
            Item::Pool { obj, .. } => &obj.metadata,
            Item::Address { obj, .. } => &obj.metadata,
        };
        let rev = rv_of(meta);
        if let Item::Pool { obj, deleted } = &item {
            let key = key_of(&obj.metadata);
            if *deleted {
                self.received_pools.remove(&key);
            } else {
                self.received_pools
                    .insert(key, PoolIdentity::of(&obj.metadata));
            }
        }
        if self.listed && rev <= self.watermark {
            // Late: the views are past its revision already. Unless what is held of that
            // object is as new (a snapshot taken after it), it is applied out of order.
            if self.holds_newer(&item, rev) {
                return false;
            }
            let touched = self.apply_item(item);
            return self.ready && self.commit(touched, Stamp::Reset, limit);
        }
        let queue = &mut self.queues[stream];
        let at = queue.partition_point(|q| q.rev <= rev);
        queue.insert(at, Queued { rev, item });
        self.progress[stream] = self.progress[stream].max(rev);
        false
    }

    /// Whether the state holds the object of `item` at revision `rev` or later (a deletion's
    /// revision is after the object's last write: an object held at a later revision was
    /// created again).
    fn holds_newer(&self, item: &Item, rev: u64) -> bool {
        match item {
            Item::Pool { obj, .. } => self
                .sources
                .pools
                .get(&key_of(&obj.metadata))
                .is_some_and(|p| rv_of(&p.metadata) >= rev),
            Item::Address { obj, .. } => self
                .names
                .get(&key_of(&obj.metadata))
                .is_some_and(|(_, a)| a.rv >= rev),
        }
    }

    /// Applies the waiting writes whose turn has come, in revision order, and moves the
    /// watermark. True if a view changed (or its version moved).
    fn drain(&mut self, limit: usize) -> bool {
        if !self.listed {
            return false;
        }
        let mut any = false;
        while let Some((stream, rev)) = self.head() {
            if rev > self.progress[1 - stream] {
                break;
            }
            let Some(q) = self.queues[stream].pop_front() else {
                break;
            };
            self.watermark = self.watermark.max(rev);
            let touched = self.apply_item(q.item);
            if self.ready {
                any |= self.commit(touched, Stamp::At(rev), limit);
            }
        }
        self.watermark = self
            .watermark
            .max(self.progress[POOLS].min(self.progress[ADDRESSES]));
        if self.ready {
            let floor = list_version(self.watermark);
            for view in &mut self.views[..2] {
                if view.rv < floor {
                    view.rv = floor;
                    any = true;
                }
            }
        }
        any
    }

    /// Updates the sources with one write; returns the rows it may have changed.
    fn apply_item(&mut self, item: Item) -> Touched {
        let mut t = Touched::default();
        match item {
            Item::Pool {
                obj,
                deleted: false,
            } => {
                let key = key_of(&obj.metadata);
                let new = PoolSpec::of(&obj);
                // The lease objects show the pool's name and network only.
                if self
                    .specs
                    .get(&key)
                    .is_none_or(|old| old.network != new.network)
                {
                    self.lease_dirty.insert(key.clone());
                }
                t.pool = Some(key.clone());
                match self.specs.get(&key) {
                    Some(old) if old.same_views(&new) => {
                        // The rows are the same; the reserved and excluded ones take this
                        // revision all the same (see the module documentation).
                        t.ips.extend(new.marks.keys().map(|ip| (key.clone(), *ip)));
                        self.specs.insert(key.clone(), new);
                    }
                    Some(old) if old.network == new.network => {
                        t.ips.extend(
                            old.marks
                                .keys()
                                .chain(new.marks.keys())
                                .map(|ip| (key.clone(), *ip)),
                        );
                        self.specs.insert(key.clone(), new);
                    }
                    old => {
                        t.all_rows(&key, old, self.addresses.get(&key));
                        t.all_rows(&key, Some(&new), None);
                        self.specs.insert(key.clone(), new);
                    }
                }
                self.sources.pools.insert(key, Arc::new(obj));
            }
            Item::Pool { obj, deleted: true } => {
                let key = key_of(&obj.metadata);
                if let Some(old) = self.specs.remove(&key) {
                    t.all_rows(&key, Some(&old), self.addresses.get(&key));
                }
                self.sources.pools.remove(&key);
                self.sources.leases.remove(&key);
                self.lease_dirty.insert(key);
            }
            Item::Address { obj, deleted } => {
                let name = key_of(&obj.metadata);
                if let Some((pool, old)) = self.names.remove(&name) {
                    t.ips.insert((pool.clone(), old.ip));
                    t.macs.insert((pool.clone(), old.mac));
                    if let Some(a) = self.addresses.get_mut(&pool) {
                        a.remove(&old);
                        if a.is_empty() {
                            self.addresses.remove(&pool);
                        }
                    }
                }
                if !deleted {
                    match Address::of(&obj) {
                        Ok((pool, a)) => self.insert_address(name, pool, a, &mut t),
                        Err(e) => tracing::debug!("not shown: {e}"),
                    }
                }
            }
        }
        t
    }

    fn insert_address(&mut self, name: Key, pool: Key, a: Address, t: &mut Touched) {
        t.ips.insert((pool.clone(), a.ip));
        t.macs.insert((pool.clone(), a.mac));
        let a = Arc::new(a);
        self.addresses
            .entry(pool.clone())
            .or_default()
            .insert(a.clone());
        self.names.insert(name, (pool, a));
    }

    /// The `ipamallocations` object of an address as the sources say now (none while its
    /// pool does not exist).
    fn allocation(&self, pool: &Key, ip: IpAddr) -> Option<ViewObject> {
        let spec = self.specs.get(pool)?;
        let holder = self.addresses.get(pool).and_then(|a| a.holder(ip));
        allocation_object(&pool.0, &pool.1, spec, ip, holder.map(|h| &**h))
    }

    fn mac(&self, pool: &Key, mac: MacAddr) -> Option<ViewObject> {
        let spec = self.specs.get(pool)?;
        let holder = self.addresses.get(pool)?.of_mac(mac)?;
        Some(mac_object(&pool.0, &pool.1, spec, holder))
    }

    /// Brings the touched rows of both views up to date. True if anything changed.
    fn commit(&mut self, t: Touched, stamp: Stamp, limit: usize) -> bool {
        if t.is_empty() {
            return false;
        }
        let restamp: BTreeSet<Key> = match &t.pool {
            Some(pool) if matches!(stamp, Stamp::At(_)) => self.mark_rows(pool),
            _ => BTreeSet::new(),
        };
        let mut ips: Vec<Row> = t
            .ips
            .into_iter()
            .map(|(pool, ip)| {
                let key = (pool.0.clone(), allocation_name(&pool.1, ip));
                let obj = self.allocation(&pool, ip);
                (pool, key, obj)
            })
            .collect();
        ips.sort_by(|a, b| a.1.cmp(&b.1));
        let mut macs: Vec<Row> = t
            .macs
            .into_iter()
            .map(|(pool, mac)| {
                let key = (pool.0.clone(), mac_name(&pool.1, mac));
                let obj = self.mac(&pool, mac);
                (pool, key, obj)
            })
            .collect();
        macs.sort_by(|a, b| a.1.cmp(&b.1));
        let w = self.watermark;
        let a = self.views[0].commit(ips, &restamp, stamp, w, limit);
        let b = self.views[1].commit(macs, &BTreeSet::new(), stamp, w, limit);
        a || b
    }

    /// The `ipamallocations` rows of `pool` that come from its spec alone (reserved or
    /// excluded, held by no address object), by name.
    fn mark_rows(&self, pool: &Key) -> BTreeSet<Key> {
        let Some(spec) = self.specs.get(pool) else {
            return BTreeSet::new();
        };
        let held = self.addresses.get(pool);
        spec.marks
            .keys()
            .filter(|ip| held.is_none_or(|a| a.holder(**ip).is_none()))
            .map(|ip| (pool.0.clone(), allocation_name(&pool.1, *ip)))
            .collect()
    }

    /// Replaces the IPPools and address objects with a snapshot at `revision`.
    fn snapshot(
        &mut self,
        revision: u64,
        pools: Vec<IPPool>,
        addresses: Vec<IPPoolAddress>,
        limit: usize,
    ) -> bool {
        let mut t = Touched::default();
        if self.ready {
            for (key, spec) in &self.specs {
                t.all_rows(key, Some(spec), self.addresses.get(key));
            }
        }
        self.specs.clear();
        self.addresses.clear();
        self.names.clear();
        self.sources.pools.clear();
        self.received_pools.clear();
        for pool in pools {
            let key = key_of(&pool.metadata);
            self.received_pools
                .insert(key.clone(), PoolIdentity::of(&pool.metadata));
            self.specs.insert(key.clone(), PoolSpec::of(&pool));
            self.sources.pools.insert(key, Arc::new(pool));
        }
        for obj in addresses {
            match Address::of(&obj) {
                Ok((pool, a)) => {
                    let mut ignored = Touched::default();
                    self.insert_address(key_of(&obj.metadata), pool, a, &mut ignored);
                }
                Err(e) => tracing::debug!("not shown: {e}"),
            }
        }
        let Inner {
            sources,
            received_pools,
            queues,
            ..
        } = self;
        sources.leases.retain(|k, _| sources.pools.contains_key(k));
        // The watches go on from `revision`: what came before is in the snapshot.
        for queue in queues.iter_mut() {
            queue.retain(|q| q.rev > revision);
        }
        for q in &queues[POOLS] {
            if let Item::Pool { obj, deleted } = &q.item {
                let key = key_of(&obj.metadata);
                if *deleted {
                    received_pools.remove(&key);
                } else {
                    received_pools.insert(key, PoolIdentity::of(&obj.metadata));
                }
            }
        }
        for p in &mut self.progress {
            *p = (*p).max(revision);
        }
        self.watermark = self.watermark.max(revision);
        self.listed = true;
        self.lease_dirty.extend(self.sources.pools.keys().cloned());
        if !self.ready {
            return false;
        }
        for (key, spec) in &self.specs {
            t.all_rows(key, Some(spec), self.addresses.get(key));
        }
        self.commit(t, Stamp::Reset, limit)
    }

    /// The first complete picture: every object at its natural version (the revision of
    /// its address object, or of its pool for a mark), no history before it.
    fn build(&mut self) {
        let Inner {
            specs,
            addresses,
            views,
            watermark,
            ..
        } = self;
        let list = list_version(*watermark);
        let natural = |rv: u64| change_version(rv, 0).min(list);
        for (key, spec) in specs.iter() {
            let held = addresses.get(key);
            let mut ips: BTreeSet<IpAddr> = spec.marks.keys().copied().collect();
            if let Some(a) = held {
                ips.extend(a.by_ip.keys().copied());
            }
            // The reserved and excluded rows: the pool's revision, each at its place among
            // them by name, as every replica that applied the pool's last write stamped
            // them (see the module documentation).
            let marks: Vec<String> = spec
                .marks
                .keys()
                .filter(|ip| held.is_none_or(|a| a.holder(**ip).is_none()))
                .map(|ip| allocation_name(&key.1, *ip))
                .collect::<BTreeSet<String>>()
                .into_iter()
                .collect();
            for ip in ips {
                let holder = held.and_then(|a| a.holder(ip));
                if let Some(mut obj) =
                    allocation_object(&key.0, &key.1, spec, ip, holder.map(|h| &**h))
                {
                    obj.resource_version = match holder {
                        Some(h) => natural(h.rv),
                        None => {
                            let place = marks.iter().position(|m| *m == obj.name).unwrap_or(0);
                            change_version(spec.rv, place as u64).min(list)
                        }
                    };
                    views[0].put(key, Arc::new(obj));
                }
            }
            for holders in held.iter().flat_map(|a| a.by_mac.values()) {
                if let Some(h) = best(holders) {
                    let mut obj = mac_object(&key.0, &key.1, spec, h);
                    obj.resource_version = natural(h.rv);
                    views[1].put(key, Arc::new(obj));
                }
            }
        }
        for view in &mut views[..2] {
            view.rv = list;
            view.oldest_rv = list;
        }
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
            inner: Mutex::new(Inner::default()),
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
        let mut out = Vec::new();
        if !inner.listed {
            out.extend([SourceKind::Pools, SourceKind::Addresses]);
        }
        if !inner.agents_listed {
            out.push(SourceKind::Agents);
        }
        out
    }

    /// What the views wait for: a write at this revision waits until the watch of this
    /// kind is known to have delivered everything up to it (see the module documentation).
    /// The server then lists the IPPools' identities ([`Change::PoolProbe`]) or, after a
    /// while, gives up waiting ([`Change::Progress`]).
    pub fn waiting(&self) -> Option<(SourceKind, u64)> {
        let inner = self.lock();
        if !inner.listed {
            return None;
        }
        let (stream, rev) = inner.head()?;
        let other = 1 - stream;
        (rev > inner.progress[other]).then_some((STREAM_KINDS[other], rev))
    }

    /// The revision up to which every write is applied (the watermark).
    pub fn applied_revision(&self) -> u64 {
        self.lock().watermark
    }

    /// Applies source changes and updates the views. Writes of IPPools and address objects
    /// are applied in revision order, each when its turn has come (see the module
    /// documentation), however the changes are batched.
    pub fn apply(&self, changes: Vec<Change>) {
        let mut guard = self.lock();
        let inner = &mut *guard;
        let limit = self.history_limit;
        let mut any = false;
        for change in changes {
            match change {
                Change::Apply(SourceObject::Pool(obj)) => {
                    any |= inner.receive(
                        POOLS,
                        Item::Pool {
                            obj,
                            deleted: false,
                        },
                        limit,
                    );
                }
                Change::Delete(SourceObject::Pool(obj)) => {
                    any |= inner.receive(POOLS, Item::Pool { obj, deleted: true }, limit);
                }
                Change::Apply(SourceObject::Address(obj)) => {
                    any |= inner.receive(
                        ADDRESSES,
                        Item::Address {
                            obj,
                            deleted: false,
                        },
                        limit,
                    );
                }
                Change::Delete(SourceObject::Address(obj)) => {
                    any |= inner.receive(ADDRESSES, Item::Address { obj, deleted: true }, limit);
                }
                Change::Apply(SourceObject::Agent(pod)) => {
                    inner
                        .sources
                        .agents
                        .insert(key_of(&pod.metadata), Arc::new(pod));
                }
                Change::Delete(SourceObject::Agent(pod)) => {
                    inner.sources.agents.remove(&key_of(&pod.metadata));
                }
                Change::Agents(pods) => {
                    inner.sources.agents = pods
                        .into_iter()
                        .map(|p| (key_of(&p.metadata), Arc::new(p)))
                        .collect();
                    inner.agents_listed = true;
                }
                Change::Snapshot {
                    revision,
                    pools,
                    addresses,
                } => {
                    any |= inner.snapshot(revision, pools, addresses, limit);
                }
                Change::Progress(kind, rev) => {
                    if let Some(stream) = kind.stream() {
                        inner.progress[stream] = inner.progress[stream].max(rev);
                    }
                }
                Change::PoolProbe { revision, pools } => {
                    let listed: BTreeMap<Key, PoolIdentity> = pools.into_iter().collect();
                    if listed == inner.received_pools {
                        inner.progress[POOLS] = inner.progress[POOLS].max(revision);
                    }
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
                    inner.lease_dirty.insert(pool);
                }
            }
            any |= inner.drain(limit);
        }
        if !inner.ready {
            if !(inner.listed && inner.agents_listed) {
                return;
            }
            // The first complete picture: every object at its natural version, and no
            // history before it.
            inner.ready = true;
            inner.build();
            let mut pools = std::mem::take(&mut inner.lease_dirty);
            pools.extend(inner.sources.leases.keys().cloned());
            pools.extend(inner.sources.pools.keys().cloned());
            inner.update_leases(&pools, limit, true);
            drop(guard);
            self.changed.send_modify(|n| *n += 1);
            return;
        }
        let dirty = std::mem::take(&mut inner.lease_dirty);
        if !dirty.is_empty() {
            any |= inner.update_leases(&dirty, limit, false);
        }
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
    /// far behind that the history no longer holds them, or lost its place in a reset.
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
            let front = v.history.front().map_or(v.next_seq, |e| e.seq);
            let skip = usize::try_from(cursor - front).unwrap_or(usize::MAX);
            let events: Vec<Entry> = v.history.iter().skip(skip).cloned().collect();
            Ok((events, v.next_seq, v.rv))
        })
    }

    /// How many objects each view holds.
    pub fn object_counts(&self) -> Vec<(Resource, usize)> {
        let inner = self.lock();
        Resource::ALL
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

#[cfg(test)]
mod tests;
