//! The views, computed purely from the source objects: IPPools (the one source of truth:
//! addresses, MACs, owners and which addresses are static) and the active agent's lease
//! document.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::sync::Arc;

use k8s_openapi::api::core::v1::Pod;
use serde::Deserialize;
use serde_json::{Map, Value, json};
use vm_dhcp_core::crd::{IPPool, MARK_EXCLUDED, MARK_RESERVED};
use vm_dhcp_core::mac::MacAddr;

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
    /// Numeric, derived from the sources' resourceVersions (see `Engine`).
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

/// What the views are computed from.
#[derive(Debug, Default, Clone)]
pub struct Sources {
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

/// What the allocation and MAC views of one pool are computed from: the pool alone (its
/// `allocated`, `owners` and `staticAddresses`), so every replica sees their changes in the
/// one order of the IPPool watch stream (see `Engine`).
struct PoolFacts<'a> {
    namespace: String,
    pool_name: String,
    pool_rv: u64,
    network: String,
    allocated: &'a BTreeMap<String, String>,
    owners: &'a BTreeMap<String, String>,
    statics: BTreeSet<&'a str>,
}

static NO_ENTRIES: BTreeMap<String, String> = BTreeMap::new();

impl<'a> PoolFacts<'a> {
    fn of(pool: &'a IPPool) -> Self {
        let (namespace, pool_name) = key_of(&pool.metadata);
        let ipv4 = pool.status.as_ref().and_then(|s| s.ipv4.as_ref());
        PoolFacts {
            namespace,
            pool_name,
            pool_rv: rv_of(&pool.metadata),
            network: pool_network(pool),
            allocated: ipv4
                .and_then(|s| s.allocated.as_ref())
                .unwrap_or(&NO_ENTRIES),
            owners: ipv4.and_then(|s| s.owners.as_ref()).unwrap_or(&NO_ENTRIES),
            statics: ipv4
                .and_then(|s| s.static_addresses.as_ref())
                .into_iter()
                .flatten()
                .map(String::as_str)
                .collect(),
        }
    }

    /// Everything an address's objects show, to tell cheaply whether they changed.
    fn facts(&self, address: &str) -> (Option<&str>, Option<&str>, bool) {
        (
            self.allocated.get(address).map(String::as_str),
            self.owners.get(address).map(String::as_str),
            self.statics.contains(address),
        )
    }

    fn allocation_name(&self, address: &str) -> String {
        format!("{}.{}", self.pool_name, dashed(address))
    }

    fn mac_name(&self, mac: &MacAddr) -> String {
        format!("{}.{}", self.pool_name, dashed(&mac.to_string()))
    }

    /// The `ipamallocations` object of one address, and the `macaddresses` object of its
    /// MAC; `None` for an entry the webhook never writes (a hand-edited status).
    fn entry(&self, address: &str, value: &str) -> Option<(ViewObject, Option<ViewObject>)> {
        let ip = address.parse::<Ipv4Addr>().ok()?;
        let mut labels = common_labels(&self.pool_name, &self.network);
        let mut fields = Map::new();
        fields.insert("pool".into(), self.pool_name.clone().into());
        fields.insert("network".into(), self.network.clone().into());
        fields.insert("address".into(), ip.to_string().into());
        let mut mac_object = None;
        let state = match value {
            MARK_EXCLUDED => "excluded",
            MARK_RESERVED => "reserved",
            mac_text => {
                let mac = mac_text.parse::<MacAddr>().ok()?;
                let owner = self
                    .owners
                    .get(address)
                    .map_or(Value::Null, |o| Value::from(o.as_str()));
                let state = if self.statics.contains(address) {
                    "static"
                } else {
                    "allocated"
                };
                fields.insert("mac".into(), mac.to_string().into());
                fields.insert("owner".into(), owner.clone());
                label(&mut labels, LABEL_MAC, &dashed(&mac.to_string()));
                let mut mac_labels = common_labels(&self.pool_name, &self.network);
                label(&mut mac_labels, LABEL_MAC, &dashed(&mac.to_string()));
                let mut mac_fields = Map::new();
                mac_fields.insert("mac".into(), mac.to_string().into());
                mac_fields.insert("network".into(), self.network.clone().into());
                mac_fields.insert("pool".into(), self.pool_name.clone().into());
                mac_fields.insert("address".into(), ip.to_string().into());
                mac_fields.insert("state".into(), state.into());
                mac_fields.insert("owner".into(), owner);
                mac_object = Some(ViewObject {
                    resource: Resource::MacAddresses,
                    namespace: self.namespace.clone(),
                    name: self.mac_name(&mac),
                    resource_version: self.pool_rv,
                    labels: mac_labels,
                    fields: mac_fields,
                });
                state
            }
        };
        fields.insert("state".into(), state.into());
        label(&mut labels, LABEL_STATE, state);
        // The field order of the served object: keep it stable and readable.
        let mut ordered = Map::new();
        for k in ["pool", "network", "address", "mac", "state", "owner"] {
            if let Some(v) = fields.remove(k) {
                ordered.insert(k.into(), v);
            }
        }
        let allocation = ViewObject {
            resource: Resource::IpamAllocations,
            namespace: self.namespace.clone(),
            name: self.allocation_name(address),
            resource_version: self.pool_rv,
            labels,
            fields: ordered,
        };
        Some((allocation, mac_object))
    }
}

/// The `ipamallocations` and `macaddresses` objects of one pool. The resourceVersion is the
/// pool's; the engine replaces it with the version of the change.
pub fn pool_views(pool: &IPPool) -> (Vec<ViewObject>, Vec<ViewObject>) {
    let facts = PoolFacts::of(pool);
    let mut allocations = Vec::with_capacity(facts.allocated.len());
    let mut macs = Vec::new();
    for (address, value) in facts.allocated {
        if let Some((allocation, mac)) = facts.entry(address, value) {
            allocations.push(allocation);
            macs.extend(mac);
        }
    }
    (allocations, macs)
}

/// The objects a pool change touches: new or changed ones, and the names of those gone.
#[derive(Debug, Default, PartialEq)]
pub struct PartialViews {
    pub allocations: Vec<ViewObject>,
    pub allocations_gone: Vec<String>,
    pub macs: Vec<ViewObject>,
    pub macs_gone: Vec<String>,
}

/// What changed between two versions of one pool, computed from the addresses whose entries
/// differ (a write that adds one allocation to 16,000 builds two objects, not 32,000).
/// `None` when the pool's identity or network changed: recompute it whole.
pub fn changed_views(old: &IPPool, new: &IPPool) -> Option<PartialViews> {
    let before = PoolFacts::of(old);
    let after = PoolFacts::of(new);
    if (&before.namespace, &before.pool_name, &before.network)
        != (&after.namespace, &after.pool_name, &after.network)
    {
        return None;
    }
    let changed: BTreeSet<&str> = before
        .allocated
        .keys()
        .chain(after.allocated.keys())
        .map(String::as_str)
        .filter(|a| before.facts(a) != after.facts(a))
        .collect();
    let mut out = PartialViews::default();
    if changed.is_empty() {
        return Some(out);
    }
    // MACs whose object may change: those the changed addresses held before or hold now.
    let mut macs: BTreeMap<MacAddr, Option<&str>> = BTreeMap::new();
    for address in &changed {
        for facts in [&before, &after] {
            if let Some(mac) = facts.allocated.get(*address).and_then(|v| v.parse().ok()) {
                macs.insert(mac, None);
            }
        }
        match after.allocated.get(*address) {
            Some(value) => match after.entry(address, value) {
                Some((allocation, _)) => out.allocations.push(allocation),
                None => out.allocations_gone.push(after.allocation_name(address)),
            },
            None => out.allocations_gone.push(after.allocation_name(address)),
        }
    }
    // Where each of them is now (the last address in order wins, as in `pool_views`).
    for (address, value) in after.allocated {
        if address.parse::<Ipv4Addr>().is_ok()
            && let Ok(mac) = value.parse::<MacAddr>()
            && let Some(at) = macs.get_mut(&mac)
        {
            *at = Some(address.as_str());
        }
    }
    for (mac, at) in macs {
        let object = at.and_then(|address| {
            let value = after.allocated.get(address)?;
            after.entry(address, value)?.1
        });
        match object {
            Some(object) => out.macs.push(object),
            None => out.macs_gone.push(after.mac_name(&mac)),
        }
    }
    out.allocations.sort_by(|a, b| a.name.cmp(&b.name));
    out.allocations_gone.sort();
    out.macs.sort_by(|a, b| a.name.cmp(&b.name));
    out.macs_gone.sort();
    Some(out)
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
            let ip = l.address.parse::<Ipv4Addr>().ok()?;
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

    fn pool() -> IPPool {
        serde_json::from_value(json!({
            "apiVersion": "network.harvesterhci.io/v1alpha1", "kind": "IPPool",
            "metadata": {"name": "net-48", "namespace": "default", "resourceVersion": "100"},
            "spec": {"networkName": "default/net-48", "ipv4Config": {"cidr": "192.168.48.0/24",
                "serverIP": "192.168.48.2", "pool": {"start": "192.168.48.10", "end": "192.168.48.20"}}},
            "status": {"ipv4": {"used": 3, "available": 8,
                "allocated": {"192.168.48.10": "52:54:00:00:00:01", "192.168.48.11": "52:54:00:00:00:02",
                              "192.168.48.12": "EXCLUDED", "192.168.48.13": "RESERVED"},
                "owners": {"192.168.48.10": "default/vm1"},
                "staticAddresses": ["192.168.48.11"]}}
        }))
        .expect("pool")
    }

    #[test]
    fn one_object_per_taken_address_with_state_and_owner() {
        let (allocs, macs) = pool_views(&pool());
        let by_name: BTreeMap<&str, &ViewObject> =
            allocs.iter().map(|o| (o.name.as_str(), o)).collect();
        assert_eq!(allocs.len(), 4);
        assert_eq!(macs.len(), 2);
        let a = by_name["net-48.192-168-48-10"];
        assert_eq!(a.fields["state"], "allocated");
        assert_eq!(a.fields["owner"], "default/vm1");
        assert_eq!(a.resource_version, 100);
        let s = by_name["net-48.192-168-48-11"];
        assert_eq!(s.fields["state"], "static", "listed in staticAddresses");
        assert_eq!(
            s.fields["owner"],
            Value::Null,
            "an allocation nobody adopted yet"
        );
        assert_eq!(by_name["net-48.192-168-48-12"].fields["state"], "excluded");
        assert_eq!(by_name["net-48.192-168-48-13"].fields["state"], "reserved");
        assert_eq!(s.labels[LABEL_MAC], "52-54-00-00-00-02");
        assert_eq!(s.labels[LABEL_NETWORK], "net-48");
        assert_eq!(s.labels[LABEL_STATE], "static");
        assert_eq!(macs[1].name, "net-48.52-54-00-00-00-02");
        assert_eq!(macs[1].fields["address"], "192.168.48.11");
        assert_eq!(macs[1].fields["state"], "static");
        assert_eq!(macs[0].fields["owner"], "default/vm1");
    }

    #[test]
    fn a_static_address_no_longer_allocated_is_not_shown() {
        let mut p = pool();
        if let Some(ipv4) = p.status.as_mut().and_then(|s| s.ipv4.as_mut()) {
            ipv4.static_addresses = Some(vec!["192.168.48.15".into(), "192.168.48.12".into()]);
        }
        let (allocs, _) = pool_views(&p);
        assert_eq!(allocs.len(), 4);
        assert!(allocs.iter().all(|o| o.fields["state"] != "static"));
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
        let leases = lease_views(&pool(), &doc);
        assert_eq!(leases.len(), 1);
        assert_eq!(leases[0].fields["agent"], "a-0");
        assert_eq!(leases[0].fields["state"], "bound");
    }
}
