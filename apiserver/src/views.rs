//! The views, computed purely from the source objects: the `IPPoolAddress` objects (the one
//! source of truth of the allocations: address, MAC, owner, static, interface), the IPPool
//! spec (network, and the reserved and excluded addresses) and the active agent's lease
//! document.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use k8s_openapi::api::core::v1::Pod;
use serde::Deserialize;
use serde_json::{Map, Value, json};
use vm_dhcp_core::crd::{IPPool, IPPoolAddress};
use vm_dhcp_core::ipam::PoolLayout;
use vm_dhcp_core::mac::MacAddr;
use vm_dhcp_core::store::{BadObject, holding_of_address};

use crate::resources::Resource;

/// `(namespace, name)`.
pub type Key = (String, String);

/// Label keys set on view objects (label values cannot hold `/` or `:`, so the network is
/// split and the MAC written with dashes; the exact values are in the fields).
pub const LABEL_POOL: &str = "dhcp.harvesterhci.io/pool";
pub const LABEL_NETWORK: &str = "dhcp.harvesterhci.io/network";
pub const LABEL_NETWORK_NAMESPACE: &str = "dhcp.harvesterhci.io/network-namespace";
pub const LABEL_MAC: &str = "dhcp.harvesterhci.io/mac";
pub const LABEL_STATE: &str = "dhcp.harvesterhci.io/state";

/// Agent pods as the controller labels them (the upstream contract).
pub use vm_dhcp_core::controller::{
    AGENT_LABEL, AGENT_LABEL_VALUE, POOL_NAME_LABEL as AGENT_POOL_NAME_LABEL,
    POOL_NAMESPACE_LABEL as AGENT_POOL_NAMESPACE_LABEL,
};

/// One object of a view. The fields are the top-level fields besides `apiVersion`, `kind`
/// and `metadata` (views have no desired state, so no spec/status split, like
/// metrics.k8s.io).
#[derive(Debug, Clone, PartialEq)]
pub struct ViewObject {
    pub resource: Resource,
    pub namespace: String,
    pub name: String,
    /// Numeric, derived from the etcd revisions of the sources' changes (see `store`).
    pub resource_version: u64,
    pub labels: BTreeMap<String, String>,
    pub fields: Map<String, Value>,
}

impl ViewObject {
    pub fn key(&self) -> Key {
        (self.namespace.clone(), self.name.clone())
    }

    /// Equal apart from the resourceVersion.
    pub fn same_content(&self, other: &ViewObject) -> bool {
        self.labels == other.labels && self.fields == other.fields && self.name == other.name
    }

    pub fn metadata(&self, rv: Option<u64>) -> Value {
        let mut meta = json!({
            "name": self.name,
            "namespace": self.namespace,
            "resourceVersion": rv.unwrap_or(self.resource_version).to_string(),
        });
        if !self.labels.is_empty() {
            meta["labels"] = json!(self.labels);
        }
        meta
    }

    /// The object as the API serves it; `rv` overrides the resourceVersion (watch events
    /// carry the stream's version).
    pub fn to_json(&self, rv: Option<u64>) -> Value {
        let mut obj = Map::with_capacity(self.fields.len() + 3);
        obj.insert("apiVersion".into(), crate::group_version().into());
        obj.insert("kind".into(), self.resource.def().kind.into());
        obj.insert("metadata".into(), self.metadata(rv));
        // Absent, not null, as Kubernetes serializes empty optional fields.
        for (k, v) in self.fields.iter().filter(|(_, v)| !v.is_null()) {
            obj.insert(k.clone(), v.clone());
        }
        Value::Object(obj)
    }

    /// A field-selector field's value: `metadata.name`, `metadata.namespace`, or a top-level
    /// string field (also under `spec.`/`status.` for clients that assume that layout).
    pub fn field(&self, path: &str) -> Option<String> {
        match path {
            "metadata.name" => Some(self.name.clone()),
            "metadata.namespace" => Some(self.namespace.clone()),
            _ => {
                let name = path
                    .strip_prefix("spec.")
                    .or_else(|| path.strip_prefix("status."))
                    .unwrap_or(path);
                match self.fields.get(name) {
                    Some(Value::String(s)) => Some(s.clone()),
                    Some(Value::Null) | None => Some(String::new()),
                    Some(other) => Some(other.to_string()),
                }
            }
        }
    }
}

/// The active agent's `/api/v1/leases` document.
#[derive(Debug, Clone, PartialEq, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct AgentLeases {
    #[serde(default)]
    pub agent: Option<String>,
    #[serde(default)]
    pub active: bool,
    #[serde(default, rename = "serverIP")]
    pub server_ip: Option<String>,
    #[serde(default)]
    pub items: Vec<AgentLease>,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct AgentLease {
    pub address: String,
    pub mac: String,
    #[serde(default)]
    pub state: Option<String>,
    #[serde(default)]
    pub lease_start: Option<String>,
    #[serde(default)]
    pub expiry: Option<String>,
    #[serde(default)]
    pub last_seen: Option<String>,
    #[serde(default)]
    pub declines: u64,
}

/// The sources of the lease view and of the lease poller's targets (the address objects
/// and the pools' specs the allocation views need are kept by the engine).
#[derive(Debug, Default, Clone)]
pub struct Sources {
    /// The IPPools (their status names the active agent).
    pub pools: BTreeMap<Key, Arc<IPPool>>,
    /// Agent pods (labelled `network.harvesterhci.io/vm-dhcp-controller=agent`).
    pub agents: BTreeMap<Key, Arc<Pod>>,
    /// Pool → what its active agent serves, with the agent pod's name.
    pub leases: BTreeMap<Key, Arc<AgentLeases>>,
}

pub fn rv_of(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> u64 {
    meta.resource_version
        .as_deref()
        .and_then(|rv| rv.parse().ok())
        .unwrap_or(0)
}

pub fn key_of(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> Key {
    (
        meta.namespace.clone().unwrap_or_default(),
        meta.name.clone().unwrap_or_default(),
    )
}

/// The pool's network as `<namespace>/<name>`.
pub fn pool_network(pool: &IPPool) -> String {
    vm_dhcp_core::admission::network_key(&pool.spec.network_name)
}

fn dashed(text: &str) -> String {
    text.replace([':', '.'], "-")
}

/// A label value only when it is a valid one (at most 63 characters).
fn label(labels: &mut BTreeMap<String, String>, key: &str, value: &str) {
    if !value.is_empty()
        && value.len() <= 63
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        && value
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric())
        && value
            .chars()
            .last()
            .is_some_and(|c| c.is_ascii_alphanumeric())
    {
        labels.insert(key.to_string(), value.to_string());
    }
}

fn common_labels(pool: &str, network: &str) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::new();
    label(&mut labels, LABEL_POOL, pool);
    if let Some((ns, name)) = network.split_once('/') {
        label(&mut labels, LABEL_NETWORK_NAMESPACE, ns);
        label(&mut labels, LABEL_NETWORK, name);
    }
    labels
}

/// `allocated`, `static`, `reserved` or `excluded`.
pub const STATES: [&str; 4] = ["allocated", "static", "reserved", "excluded"];

/// One `IPPoolAddress` object as the views read it (the one source of truth of an
/// allocation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Address {
    /// The object's name (`<pool>.<address>`).
    pub name: String,
    /// The object's resourceVersion (the etcd revision of its last write).
    pub rv: u64,
    pub ip: IpAddr,
    pub mac: MacAddr,
    pub owner: Option<String>,
    pub static_: bool,
    pub interface: Option<String>,
}

impl Address {
    /// The pool `(namespace, name)` an address object belongs to, and what it holds.
    pub fn of(obj: &IPPoolAddress) -> Result<(Key, Address), BadObject> {
        let h = holding_of_address(obj)?;
        let (namespace, name) = key_of(&obj.metadata);
        Ok((
            (namespace, obj.spec.ippool.clone()),
            Address {
                name,
                rv: rv_of(&obj.metadata),
                ip: h.ip,
                mac: h.mac,
                owner: h.owner,
                static_: h.static_,
                interface: h.interface.filter(|i| !i.is_empty()),
            },
        ))
    }

    /// When two address objects claim one address (or one MAC), the views show the one
    /// written last: the highest resourceVersion (then the name), the same on every replica.
    pub fn rank(&self) -> (u64, &str) {
        (self.rv, &self.name)
    }
}

/// What the spec of a pool takes out of its range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mark {
    /// The server IP or router, when inside `[start, end]`.
    Reserved,
    /// An entry of `pool.exclude` (every one, in the range or not, as the Go version's status
    /// lists them).
    Excluded,
}

impl Mark {
    pub fn state(self) -> &'static str {
        match self {
            Mark::Reserved => "reserved",
            Mark::Excluded => "excluded",
        }
    }
}

/// What the views need of an IPPool: its network and the addresses its spec marks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolSpec {
    /// `<namespace>/<name>`.
    pub network: String,
    pub marks: BTreeMap<IpAddr, Mark>,
    /// The pool's resourceVersion when this was read (the version a replica that starts
    /// later shows on the marked rows).
    pub rv: u64,
}

impl PoolSpec {
    pub fn of(pool: &IPPool) -> Self {
        PoolSpec {
            network: pool_network(pool),
            marks: spec_marks(pool),
            rv: rv_of(&pool.metadata),
        }
    }

    /// Equal apart from the resourceVersion: the views of the pool are the same.
    pub fn same_views(&self, other: &PoolSpec) -> bool {
        self.network == other.network && self.marks == other.marks
    }
}

/// The reserved and excluded addresses of a pool's spec, as the Go version's status listed
/// them: `RESERVED` for the server IP and router inside `[start, end]`, `EXCLUDED` for every
/// `pool.exclude` entry (reserved wins). A spec whose addresses do not parse marks nothing.
pub fn spec_marks(pool: &IPPool) -> BTreeMap<IpAddr, Mark> {
    let mut marks = BTreeMap::new();
    let Some(config) = pool.spec.ipv4_config.as_ref() else {
        return marks;
    };
    let Ok(layout) = PoolLayout::from_config(config) else {
        return marks;
    };
    for ip in &layout.exclude {
        marks.insert(IpAddr::V4(*ip), Mark::Excluded);
    }
    for ip in [layout.server_ip, layout.router].into_iter().flatten() {
        if layout.start <= ip && ip <= layout.end {
            marks.insert(IpAddr::V4(ip), Mark::Reserved);
        }
    }
    marks
}

/// `<pool>.<address with dashes>`: the name of an address's `ipamallocations` object.
pub fn allocation_name(pool: &str, ip: IpAddr) -> String {
    format!("{pool}.{}", dashed(&ip.to_string()))
}

/// `<pool>.<MAC with dashes>`: the name of a MAC's `macaddresses` object.
pub fn mac_name(pool: &str, mac: MacAddr) -> String {
    format!("{pool}.{}", dashed(&mac.to_string()))
}

fn opt(v: &Option<String>) -> Value {
    v.as_deref().map_or(Value::Null, Value::from)
}

/// The `ipamallocations` object of address `ip` of pool `<namespace>/<pool>`: from the
/// address object holding it, else from the spec's mark; `None` when the address is free.
/// The resourceVersion is left at 0 for the engine to set.
pub fn allocation_object(
    namespace: &str,
    pool: &str,
    spec: &PoolSpec,
    ip: IpAddr,
    holder: Option<&Address>,
) -> Option<ViewObject> {
    let mut labels = common_labels(pool, &spec.network);
    let mut fields = Map::new();
    fields.insert("pool".into(), pool.into());
    fields.insert("network".into(), spec.network.clone().into());
    fields.insert("address".into(), ip.to_string().into());
    let state = match (holder, spec.marks.get(&ip)) {
        (Some(a), _) => {
            let state = if a.static_ { "static" } else { "allocated" };
            fields.insert("mac".into(), a.mac.to_string().into());
            fields.insert("state".into(), state.into());
            fields.insert("owner".into(), opt(&a.owner));
            fields.insert("interface".into(), opt(&a.interface));
            label(&mut labels, LABEL_MAC, &dashed(&a.mac.to_string()));
            state
        }
        (None, Some(mark)) => {
            fields.insert("state".into(), mark.state().into());
            mark.state()
        }
        (None, None) => return None,
    };
    label(&mut labels, LABEL_STATE, state);
    Some(ViewObject {
        resource: Resource::IpamAllocations,
        namespace: namespace.to_string(),
        name: allocation_name(pool, ip),
        resource_version: 0,
        labels,
        fields,
    })
}

/// The `macaddresses` object of the MAC `holder` holds in pool `<namespace>/<pool>`.
pub fn mac_object(namespace: &str, pool: &str, spec: &PoolSpec, holder: &Address) -> ViewObject {
    let mac = holder.mac.to_string();
    let mut labels = common_labels(pool, &spec.network);
    label(&mut labels, LABEL_MAC, &dashed(&mac));
    let state = if holder.static_ {
        "static"
    } else {
        "allocated"
    };
    let mut fields = Map::new();
    fields.insert("mac".into(), mac.into());
    fields.insert("network".into(), spec.network.clone().into());
    fields.insert("pool".into(), pool.into());
    fields.insert("address".into(), holder.ip.to_string().into());
    fields.insert("state".into(), state.into());
    fields.insert("owner".into(), opt(&holder.owner));
    fields.insert("interface".into(), opt(&holder.interface));
    ViewObject {
        resource: Resource::MacAddresses,
        namespace: namespace.to_string(),
        name: mac_name(pool, holder.mac),
        resource_version: 0,
        labels,
        fields,
    }
}

/// The `dhcpleases` objects of one pool. The resourceVersion is left at 0: the engine sets
/// the lease stream's version (leases have no etcd revision of their own).
pub fn lease_views(pool: &IPPool, leases: &AgentLeases) -> Vec<ViewObject> {
    let (namespace, pool_name) = key_of(&pool.metadata);
    let network = pool_network(pool);
    leases
        .items
        .iter()
        .filter_map(|l| {
            let ip = l.address.trim().parse::<IpAddr>().ok()?;
            let mac = l.mac.parse::<MacAddr>().ok()?;
            let mut labels = common_labels(&pool_name, &network);
            label(&mut labels, LABEL_MAC, &dashed(&mac.to_string()));
            let state = l.state.clone().unwrap_or_default();
            label(&mut labels, LABEL_STATE, &state);
            let opt = |v: &Option<String>| v.clone().map_or(Value::Null, Value::from);
            let mut fields = Map::new();
            fields.insert("pool".into(), pool_name.clone().into());
            fields.insert("network".into(), network.clone().into());
            fields.insert("address".into(), ip.to_string().into());
            fields.insert("mac".into(), mac.to_string().into());
            fields.insert("state".into(), state.into());
            fields.insert("leaseStart".into(), opt(&l.lease_start));
            fields.insert("expiry".into(), opt(&l.expiry));
            fields.insert("lastSeen".into(), opt(&l.last_seen));
            fields.insert("declines".into(), l.declines.into());
            fields.insert("agent".into(), opt(&leases.agent));
            fields.insert("serverIP".into(), opt(&leases.server_ip));
            Some(ViewObject {
                resource: Resource::DhcpLeases,
                namespace: namespace.clone(),
                name: format!("{pool_name}.{}", dashed(&ip.to_string())),
                resource_version: 0,
                labels,
                fields,
            })
        })
        .collect()
}

/// The agent pods of a pool to ask for leases, best first: the one the pool's status names,
/// then the others labelled for the pool. Only running pods with an IP.
pub fn agent_candidates(sources: &Sources, pool_key: &Key) -> Vec<(Key, String)> {
    let Some(pool) = sources.pools.get(pool_key) else {
        return Vec::new();
    };
    let named = pool
        .status
        .as_ref()
        .and_then(|s| s.agent_pod_ref.as_ref())
        .and_then(|r| Some((r.namespace.clone()?, r.name.clone()?)));
    let mut out: Vec<(Key, String)> = Vec::new();
    let ip_of = |pod: &Pod| {
        pod.status
            .as_ref()
            .filter(|s| s.phase.as_deref() == Some("Running"))
            .and_then(|s| s.pod_ip.clone())
            .filter(|ip| !ip.is_empty())
    };
    if let Some(key) = named
        && let Some(ip) = sources.agents.get(&key).and_then(|p| ip_of(p))
    {
        out.push((key, ip));
    }
    for (key, pod) in &sources.agents {
        let labels = pod.metadata.labels.clone().unwrap_or_default();
        let for_pool = labels.get(AGENT_POOL_NAMESPACE_LABEL) == Some(&pool_key.0)
            && labels.get(AGENT_POOL_NAME_LABEL) == Some(&pool_key.1);
        if for_pool
            && pod.metadata.deletion_timestamp.is_none()
            && !out.iter().any(|(k, _)| k == key)
            && let Some(ip) = ip_of(pod)
        {
            out.push((key.clone(), ip));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(exclude: &[&str], router: Option<&str>) -> IPPool {
        serde_json::from_value(json!({
            "apiVersion": "network.harvesterhci.io/v1alpha1", "kind": "IPPool",
            "metadata": {"name": "net-48", "namespace": "default", "resourceVersion": "100"},
            "spec": {"networkName": "default/net-48", "ipv4Config": {"cidr": "192.168.48.0/24",
                "serverIP": "192.168.48.2", "router": router,
                "pool": {"start": "192.168.48.10", "end": "192.168.48.20", "exclude": exclude}}},
            // Never read: the views come from the address objects.
            "status": {"ipv4": {"used": 1, "available": 1,
                "allocated": {"192.168.48.19": "52:54:00:00:00:19"}}}
        }))
        .expect("pool")
    }

    fn address(ip: &str, mac: &str, owner: Option<&str>, static_: bool) -> Address {
        Address {
            name: format!("net-48.{ip}"),
            rv: 7,
            ip: ip.parse().expect("ip"),
            mac: mac.parse().expect("mac"),
            owner: owner.map(str::to_string),
            static_,
            interface: Some("nic-1".into()),
        }
    }

    #[test]
    fn marks_follow_the_go_status_rules() {
        let p = pool(&["192.168.48.12", "192.168.48.30"], Some("192.168.48.13"));
        let marks = spec_marks(&p);
        let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
        assert_eq!(
            marks,
            BTreeMap::from([
                (ip("192.168.48.12"), Mark::Excluded),
                (ip("192.168.48.13"), Mark::Reserved),
                // Outside the range: listed, as the Go version lists every exclude entry.
                (ip("192.168.48.30"), Mark::Excluded),
            ]),
            "the server IP is outside [start, end]: not reserved"
        );
    }

    #[test]
    fn an_object_per_taken_address_with_state_and_owner() {
        let p = pool(&["192.168.48.12"], Some("192.168.48.13"));
        let spec = PoolSpec::of(&p);
        let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
        let a = address(
            "192.168.48.10",
            "52:54:00:00:00:01",
            Some("default/vm1"),
            false,
        );
        let s = address("192.168.48.11", "52:54:00:00:00:02", None, true);
        let obj =
            |i: &str, h: Option<&Address>| allocation_object("default", "net-48", &spec, ip(i), h);
        let alloc = obj("192.168.48.10", Some(&a)).expect("allocated");
        assert_eq!(alloc.name, "net-48.192-168-48-10");
        assert_eq!(alloc.fields["state"], "allocated");
        assert_eq!(alloc.fields["owner"], "default/vm1");
        assert_eq!(alloc.fields["interface"], "nic-1");
        assert_eq!(alloc.fields["network"], "default/net-48");
        let stat = obj("192.168.48.11", Some(&s)).expect("static");
        assert_eq!(stat.fields["state"], "static");
        assert_eq!(stat.fields["owner"], Value::Null, "nobody adopted it yet");
        assert_eq!(stat.labels[LABEL_MAC], "52-54-00-00-00-02");
        assert_eq!(stat.labels[LABEL_NETWORK], "net-48");
        assert_eq!(stat.labels[LABEL_STATE], "static");
        assert_eq!(
            obj("192.168.48.12", None).expect("excluded").fields["state"],
            "excluded"
        );
        assert_eq!(
            obj("192.168.48.13", None).expect("reserved").fields["state"],
            "reserved"
        );
        assert!(
            !obj("192.168.48.13", None)
                .expect("reserved")
                .labels
                .contains_key(LABEL_MAC),
            "reserved and excluded rows have no MAC"
        );
        // An address object on an excluded address wins: it is held until released.
        let held = address("192.168.48.12", "52:54:00:00:00:03", None, false);
        assert_eq!(
            obj("192.168.48.12", Some(&held)).expect("held").fields["state"],
            "allocated"
        );
        assert!(obj("192.168.48.14", None).is_none(), "free");
        // The status's allocation of .19 is not a view: the status is not read.
        assert!(obj("192.168.48.19", None).is_none());
        let mac = mac_object("default", "net-48", &spec, &s);
        assert_eq!(mac.name, "net-48.52-54-00-00-00-02");
        assert_eq!(mac.fields["address"], "192.168.48.11");
        assert_eq!(mac.fields["state"], "static");
    }

    #[test]
    fn address_objects_are_read_with_their_pool_and_version() {
        let h = vm_dhcp_core::store::Holding {
            ip: "192.168.48.10".parse().expect("ip"),
            mac: "52:54:00:00:00:01".parse().expect("mac"),
            owner: Some("default/vm1".into()),
            static_: true,
            interface: None,
        };
        let mut obj =
            vm_dhcp_core::store::address_object("default", "net-48", "default/net-48", &h);
        obj.metadata.resource_version = Some("42".into());
        let (pool, a) = Address::of(&obj).expect("readable");
        assert_eq!(pool, ("default".to_string(), "net-48".to_string()));
        assert_eq!(a.rv, 42);
        assert_eq!(a.name, "net-48.192.168.48.10");
        assert!(a.static_);
        obj.spec.mac_address = "bogus".into();
        assert!(Address::of(&obj).is_err());
    }

    #[test]
    fn leases_need_parseable_addresses() {
        let doc: AgentLeases = serde_json::from_value(json!({
            "pool": "default/net-48", "agent": "a-0", "active": true, "serverIP": "192.168.48.2",
            "items": [{"address": "192.168.48.10", "mac": "52:54:00:00:00:01", "state": "bound",
                       "leaseStart": "2026-01-01T00:00:00Z", "expiry": null, "lastSeen": null, "declines": 0},
                      {"address": "bogus", "mac": "52:54:00:00:00:01"}]
        }))
        .expect("agent doc");
        let leases = lease_views(&pool(&[], None), &doc);
        assert_eq!(leases.len(), 1);
        assert_eq!(leases[0].fields["agent"], "a-0");
        assert_eq!(leases[0].fields["state"], "bound");
    }
}
