//! Cluster mode: the IPPool named by `--ippool-ref` (its spec: options, exclusions, server
//! IP, router) and the pool's allocations, one `IPPoolAddress` object each (the allocation
//! store, the one source of truth; `status.ipv4.allocated` is a lagging projection and is
//! not read).
//!
//! One task runs both watches: the IPPool by name, the address objects by the pool label in
//! the pool's namespace. A snapshot (the pool and every allocation) goes to the table task
//! once both have synced — the IPPool seen and the first complete list of addresses — at
//! once the first time, and after that on any change of either, coalesced over
//! [`COALESCE`] so a burst of admissions costs one rebuild. A change of the IPPool's status
//! alone (the controller's projection) changes nothing here. A periodic GET re-reads the
//! IPPool, so a watch that silently stalls cannot leave the options behind for longer than
//! one resync period; the address watch is re-established by the apiserver's watch timeout
//! (under five minutes) and re-lists after any gap the apiserver cannot replay.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::bail;
use futures_util::StreamExt;
use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher;
use kube::{Api, Resource};
use serde::{Deserialize, Deserializer};
use tokio::sync::watch;
use tokio::time::{Instant, MissedTickBehavior};
use vm_dhcp_core::MacAddr;
use vm_dhcp_core::crd::{IPPool, IPPoolAddress, IPPoolAddressSpec};
use vm_dhcp_core::store::{POOL_LABEL, holding_of_address};

use super::source::{PoolSnapshot, Snapshot};
use super::{AgentState, stopped};

/// How long changes are gathered before one rebuild (after the first table).
pub const COALESCE: Duration = Duration::from_millis(100);

/// `<namespace>/<name>`, as `--ippool-ref`, `--lease-lock` and upstream's IPPOOL_REF spell it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectRef {
    pub namespace: String,
    pub name: String,
}

impl std::fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

pub fn parse_ref(flag: &str, value: &str) -> anyhow::Result<ObjectRef> {
    match value.split_once('/') {
        Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
            Ok(ObjectRef {
                namespace: ns.to_string(),
                name: name.to_string(),
            })
        }
        _ => bail!("{flag} {value:?}: expected <namespace>/<name>, e.g. default/net-48"),
    }
}

/// The label selector of a pool's address objects (the label value is the pool's name,
/// shortened as the store shortens it when longer than a label value may be).
pub fn address_selector(pool: &str) -> String {
    let value = vm_dhcp_core::store::labels(pool, "", MacAddr([0; 6]))
        .remove(POOL_LABEL)
        .unwrap_or_default();
    format!("{POOL_LABEL}={value}")
}

/// An `IPPoolAddress` as the agent's watch reads it: the whole spec, and of the metadata only
/// what the watch uses. The rest of the metadata (managedFields above all, a third of each
/// object) is skipped while parsing instead of being built and dropped: a restart lists
/// every address object of the pool, and this halves the agent's decoding of that list.
#[derive(Clone, Debug, Deserialize)]
pub struct AddressRecord {
    #[serde(deserialize_with = "lean_metadata")]
    metadata: ObjectMeta,
    spec: IPPoolAddressSpec,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct LeanMetadata {
    name: Option<String>,
    namespace: Option<String>,
    resource_version: Option<String>,
}

fn lean_metadata<'de, D: Deserializer<'de>>(d: D) -> Result<ObjectMeta, D::Error> {
    let m = LeanMetadata::deserialize(d)?;
    Ok(ObjectMeta {
        name: m.name,
        namespace: m.namespace,
        resource_version: m.resource_version,
        ..ObjectMeta::default()
    })
}

impl AddressRecord {
    /// The address object it was read from, with that much metadata.
    pub fn into_object(self) -> IPPoolAddress {
        let mut obj = IPPoolAddress::new("", self.spec);
        obj.metadata = self.metadata;
        obj
    }
}

impl Resource for AddressRecord {
    type DynamicType = ();
    type Scope = NamespaceResourceScope;

    fn kind(dt: &()) -> Cow<'_, str> {
        IPPoolAddress::kind(dt)
    }
    fn group(dt: &()) -> Cow<'_, str> {
        IPPoolAddress::group(dt)
    }
    fn version(dt: &()) -> Cow<'_, str> {
        IPPoolAddress::version(dt)
    }
    fn plural(dt: &()) -> Cow<'_, str> {
        IPPoolAddress::plural(dt)
    }
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

/// A watch event of records as one of address objects.
fn event_of_objects(event: watcher::Event<AddressRecord>) -> watcher::Event<IPPoolAddress> {
    match event {
        watcher::Event::Apply(r) => watcher::Event::Apply(r.into_object()),
        watcher::Event::Delete(r) => watcher::Event::Delete(r.into_object()),
        watcher::Event::Init => watcher::Event::Init,
        watcher::Event::InitApply(r) => watcher::Event::InitApply(r.into_object()),
        watcher::Event::InitDone => watcher::Event::InitDone,
    }
}

/// The allocations of one pool as its address objects say, fed by the watch protocol
/// (`Init`, `InitApply`…, `InitDone`, then `Apply`/`Delete`). A relist is gathered aside and
/// replaces the allocations only when complete, so the table never sees half a list.
#[derive(Debug, Default)]
struct Allocations {
    pool: String,
    by_ip: BTreeMap<IpAddr, MacAddr>,
    relist: Option<BTreeMap<IpAddr, MacAddr>>,
    /// The first complete list has arrived.
    synced: bool,
}

impl Allocations {
    fn new(pool: &str) -> Self {
        Allocations {
            pool: pool.to_string(),
            ..Default::default()
        }
    }

    /// The object's allocation, if it is one of this pool's (a shortened label value can
    /// be shared by two long pool names) and readable.
    fn read(&self, obj: &IPPoolAddress) -> Option<(IpAddr, MacAddr)> {
        if obj.spec.ippool != self.pool {
            return None;
        }
        match holding_of_address(obj) {
            Ok(h) => Some((h.ip, h.mac)),
            Err(e) => {
                tracing::warn!("{e}; no lease for it");
                None
            }
        }
    }

    /// Applies one watch event; true when the allocations in force changed.
    fn apply(&mut self, event: watcher::Event<IPPoolAddress>) -> bool {
        match event {
            watcher::Event::Init => {
                self.relist = Some(BTreeMap::new());
                false
            }
            watcher::Event::InitApply(obj) => {
                if let Some((ip, mac)) = self.read(&obj) {
                    self.relist
                        .get_or_insert_with(BTreeMap::new)
                        .insert(ip, mac);
                }
                false
            }
            watcher::Event::InitDone => {
                let listed = self.relist.take().unwrap_or_default();
                let changed = !self.synced || listed != self.by_ip;
                self.by_ip = listed;
                self.synced = true;
                changed
            }
            watcher::Event::Apply(obj) => match self.read(&obj) {
                Some((ip, mac)) => self.by_ip.insert(ip, mac) != Some(mac),
                None => false,
            },
            watcher::Event::Delete(obj) => {
                if obj.spec.ippool != self.pool {
                    return false;
                }
                match obj.spec.address.trim().parse::<IpAddr>() {
                    Ok(ip) => self.by_ip.remove(&ip).is_some(),
                    Err(_) => false,
                }
            }
        }
    }
}

/// Reports a failing watch once per outage, and its recovery.
struct Outage {
    what: &'static str,
    failing: bool,
}

impl Outage {
    fn failed(&mut self, pool: &ObjectRef, e: &dyn std::fmt::Display) {
        if !self.failing {
            tracing::warn!(ippool = %pool, "watching {}: {e}; retrying with backoff, the current table stays in force", self.what);
            self.failing = true;
        }
    }

    fn ok(&mut self, pool: &ObjectRef) {
        if self.failing {
            tracing::info!(ippool = %pool, "{} watch restored", self.what);
            self.failing = false;
        }
    }
}

/// Whether two versions of the IPPool make the same table (the status is not an input).
fn same_input(a: &IPPool, b: &IPPool) -> bool {
    a.spec == b.spec
        && a.metadata.name == b.metadata.name
        && a.metadata.namespace == b.metadata.namespace
}

/// Feeds `tx` with a snapshot of the pool and its allocations on every change (see the
/// module docs), until `stop`.
pub async fn watch_cluster(
    pools: Api<IPPool>,
    addresses: Api<AddressRecord>,
    pool: ObjectRef,
    tx: watch::Sender<PoolSnapshot>,
    state: Arc<AgentState>,
    resync: Duration,
    stop: watch::Receiver<bool>,
) {
    let pool_events = watcher::watch_object(pools.clone(), &pool.name).default_backoff();
    tokio::pin!(pool_events);
    // One list served from the apiserver's watch cache (resourceVersion 0, unpaginated): a
    // restart lists every address object of the pool (about 1 KiB each) and most of its
    // time is the apiserver encoding them; pages add a request each (and on older
    // apiservers a read from etcd). The price: the whole list in memory at once, and a
    // list from a cache may be slightly behind (HA apiservers), which the watch that
    // follows catches up at once. 16,000 addresses: the table 0.64–0.69 s after start
    // (e2e agent_cluster, restart_rebuilds_…, release build, 2 busy cores).
    let config = watcher::Config {
        page_size: None,
        ..watcher::Config::default()
            .labels(&address_selector(&pool.name))
            .any_semantic()
    };
    let address_events = watcher::watcher(addresses, config).default_backoff();
    tokio::pin!(address_events);
    let mut resync_tick = tokio::time::interval_at(Instant::now() + resync, resync);
    resync_tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let stop = stopped(stop);
    tokio::pin!(stop);

    let mut spec: Option<Arc<IPPool>> = None;
    let mut allocations = Allocations::new(&pool.name);
    // When the gathered changes go out; None: nothing pending.
    let mut flush_at: Option<Instant> = None;
    let mut sent = false;
    let mut pool_watch = Outage {
        what: "the IPPool",
        failing: false,
    };
    let mut address_watch = Outage {
        what: "the IPPool's address objects",
        failing: false,
    };
    loop {
        let flush = async {
            match flush_at {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        let changed = tokio::select! {
            _ = &mut stop => return,
            _ = flush => {
                flush_at = None;
                if let (Some(p), true) = (&spec, allocations.synced) {
                    tx.send_replace(Some(Arc::new(Snapshot::Objects {
                        pool: p.clone(),
                        allocations: allocations.by_ip.iter().map(|(ip, mac)| (*ip, *mac)).collect(),
                    })));
                    sent = true;
                }
                false
            }
            event = address_events.next() => match event {
                None => {
                    tracing::error!(ippool = %pool, "the address object watch ended; keeping the current table");
                    return;
                }
                Some(Err(e)) => {
                    address_watch.failed(&pool, &e);
                    false
                }
                Some(Ok(event)) => {
                    address_watch.ok(&pool);
                    allocations.apply(event_of_objects(event))
                }
            },
            event = pool_events.next() => match event {
                None => {
                    tracing::error!(ippool = %pool, "the IPPool watch ended; keeping the current table");
                    return;
                }
                Some(Err(e)) => {
                    pool_watch.failed(&pool, &e);
                    false
                }
                Some(Ok(seen)) => {
                    pool_watch.ok(&pool);
                    seen_pool(&pool, seen, &mut spec, &state, sent)
                }
            },
            _ = resync_tick.tick() => match pools.get_opt(&pool.name).await {
                Ok(seen) => seen_pool(&pool, seen, &mut spec, &state, sent),
                Err(e) => {
                    tracing::warn!(ippool = %pool, "resync: reading the IPPool: {e}; the current table stays in force");
                    false
                }
            },
        };
        if changed && flush_at.is_none() {
            // The first table goes out as soon as both watches have synced; later changes
            // are gathered for a moment.
            flush_at = Some(if sent {
                Instant::now() + COALESCE
            } else {
                Instant::now()
            });
        }
    }
}

/// Records the IPPool as seen; true when it changes the table's input.
fn seen_pool(
    pool: &ObjectRef,
    seen: Option<IPPool>,
    spec: &mut Option<Arc<IPPool>>,
    state: &AgentState,
    sent: bool,
) -> bool {
    match seen {
        Some(p) => {
            if spec.as_deref().is_some_and(|old| same_input(old, &p)) {
                return false;
            }
            *spec = Some(Arc::new(p));
            true
        }
        None => {
            // A missing pool may be a typo in --ippool-ref, an RBAC rule that hides it, or
            // a deletion in progress; the controller removes agents of deleted pools.
            state.metrics.reload("pool_missing");
            tracing::warn!(
                ippool = %pool,
                "the IPPool does not exist (check --ippool-ref); {}",
                if sent {
                    "keeping the previous lease table"
                } else {
                    "nothing to serve until it exists"
                }
            );
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_dhcp_core::store::{Holding, address_object};

    fn object(pool: &str, ip: &str, mac: &str) -> IPPoolAddress {
        address_object(
            "default",
            pool,
            "default/net-48",
            &Holding {
                ip: ip.parse().expect("ip"),
                mac: mac.parse().expect("mac"),
                owner: Some("default/vm".into()),
                static_: false,
                interface: None,
            },
        )
    }

    fn held(a: &Allocations) -> Vec<(String, String)> {
        a.by_ip
            .iter()
            .map(|(ip, mac)| (ip.to_string(), mac.to_string()))
            .collect()
    }

    #[test]
    fn allocations_follow_the_watch_and_swap_a_relist_in_whole() {
        let mut a = Allocations::new("net-48");
        assert!(!a.apply(watcher::Event::Init));
        assert!(!a.apply(watcher::Event::InitApply(object(
            "net-48",
            "192.168.48.86",
            "02:00:00:00:00:86"
        ))));
        // Another pool whose long name shortens to the same label value.
        assert!(!a.apply(watcher::Event::InitApply(object(
            "other",
            "192.168.48.87",
            "02:00:00:00:00:87"
        ))));
        assert!(!a.synced);
        assert!(a.apply(watcher::Event::InitDone), "first list");
        assert!(a.synced);
        assert_eq!(
            held(&a),
            [("192.168.48.86".into(), "02:00:00:00:00:86".into())]
        );

        let created = object("net-48", "192.168.48.88", "02:00:00:00:00:88");
        assert!(a.apply(watcher::Event::Apply(created.clone())));
        assert!(
            !a.apply(watcher::Event::Apply(created.clone())),
            "no change"
        );
        assert!(!a.apply(watcher::Event::Apply(object(
            "other",
            "192.168.48.89",
            "02:00:00:00:00:89"
        ))));
        assert_eq!(a.by_ip.len(), 2);

        // A relist in progress leaves the allocations in force alone.
        assert!(!a.apply(watcher::Event::Init));
        assert!(!a.apply(watcher::Event::InitApply(created.clone())));
        assert_eq!(a.by_ip.len(), 2);
        assert!(a.apply(watcher::Event::InitDone), ".86 went in the gap");
        assert_eq!(
            held(&a),
            [("192.168.48.88".into(), "02:00:00:00:00:88".into())]
        );
        assert!(!a.apply(watcher::Event::Init));
        assert!(!a.apply(watcher::Event::InitApply(created.clone())));
        assert!(!a.apply(watcher::Event::InitDone), "same list");

        assert!(a.apply(watcher::Event::Delete(created.clone())));
        assert!(!a.apply(watcher::Event::Delete(created)), "already gone");
        assert!(a.by_ip.is_empty());
    }

    #[test]
    fn records_read_what_the_watch_and_the_table_need() {
        let mut obj = object("net-48", "192.168.48.86", "02:00:00:00:00:86");
        obj.metadata.resource_version = Some("42".into());
        obj.metadata.uid = Some("u-1".into());
        let mut json = serde_json::to_value(&obj).expect("json");
        json["metadata"]["managedFields"] = serde_json::json!([{
            "manager": "vm-dhcp-webhook", "operation": "Apply",
            "fieldsType": "FieldsV1", "fieldsV1": {"f:spec": {"f:address": {}}}
        }]);
        let record: AddressRecord = serde_json::from_value(json).expect("a record");
        assert_eq!(record.meta().resource_version.as_deref(), Some("42"));
        assert_eq!(record.meta().managed_fields, None, "skipped");
        assert_eq!(AddressRecord::plural(&()), "ippooladdresses");
        assert_eq!(
            AddressRecord::url_path(&(), Some("default")),
            IPPoolAddress::url_path(&(), Some("default"))
        );
        let back = record.into_object();
        assert_eq!(back.spec, obj.spec);
        assert_eq!(back.metadata.name, obj.metadata.name);
        assert_eq!(back.metadata.namespace, obj.metadata.namespace);
        let mut a = Allocations::new("net-48");
        a.apply(watcher::Event::InitDone);
        assert!(a.apply(watcher::Event::Apply(back)));
        assert_eq!(
            held(&a),
            [("192.168.48.86".into(), "02:00:00:00:00:86".into())]
        );
    }

    #[test]
    fn unreadable_objects_are_skipped() {
        let mut a = Allocations::new("net-48");
        a.apply(watcher::Event::InitDone);
        let mut bad = object("net-48", "192.168.48.86", "02:00:00:00:00:86");
        bad.spec.mac_address = "not-a-mac".into();
        assert!(!a.apply(watcher::Event::Apply(bad)));
        assert!(a.by_ip.is_empty());
    }

    #[test]
    fn the_selector_is_the_stores_pool_label() {
        assert_eq!(
            address_selector("net-48"),
            "network.harvesterhci.io/ippool-name=net-48"
        );
        let long = "a".repeat(80);
        let selector = address_selector(&long);
        let value = selector.split_once('=').expect("key=value").1;
        assert!(value.len() <= 63, "{selector}");
        let labels = vm_dhcp_core::store::labels(
            &long,
            "default/x",
            "02:00:00:00:00:01".parse().expect("mac"),
        );
        assert_eq!(labels.get(POOL_LABEL).map(String::as_str), Some(value));
    }

    #[test]
    fn refs_need_namespace_and_name() {
        assert_eq!(
            parse_ref("--ippool-ref", "default/net-48").expect("valid"),
            ObjectRef {
                namespace: "default".into(),
                name: "net-48".into()
            }
        );
        for bad in ["net-48", "/net-48", "default/", "a/b/c", ""] {
            let err = parse_ref("--ippool-ref", bad).expect_err(bad).to_string();
            assert!(err.contains("<namespace>/<name>"), "{err}");
        }
    }
}
