//! The two custom resources of `network.harvesterhci.io/v1alpha1`, schema-compatible with
//! the Go vm-dhcp-controller so that a cluster running it can switch over and keep every
//! allocation (field names, short names, printer columns and CEL rules are the upstream ones).
//!
//! Deviations from the upstream schema, both fixes of upstream mistakes:
//! - `format: ipv4` sits on the items of `pool.exclude` and `dns`, not on the arrays (where
//!   the apiserver ignores it);
//! - the "add once" rule of `pool.exclude` says `Exclude is required once set` (upstream
//!   copy-pasted `End is required once set`).

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::{CustomResource, KubeSchema};
use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Serialize};

pub const GROUP: &str = "network.harvesterhci.io";
pub const VERSION: &str = "v1alpha1";

/// `status.ipv4.allocated` value of an address taken out by `pool.exclude`.
pub const MARK_EXCLUDED: &str = "EXCLUDED";
/// `status.ipv4.allocated` value of the server IP and router inside the range.
pub const MARK_RESERVED: &str = "RESERVED";

/// Schema-only stand-in for a string that must be an IPv4 address, used on array items.
pub struct Ipv4Text;

impl JsonSchema for Ipv4Text {
    fn inline_schema() -> bool {
        true
    }
    fn schema_name() -> Cow<'static, str> {
        "Ipv4Text".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({ "type": "string", "format": "ipv4" })
    }
}

/// Marks string fields required as upstream does. They carry `#[serde(default)]` only so that
/// the webhook can read an object before its mutator fills them in; an empty-string default in
/// the schema would make the apiserver invent an invalid address.
fn require_fields(schema: &mut Schema, names: &[&str]) {
    if let Some(props) = schema
        .get_mut("properties")
        .and_then(serde_json::Value::as_object_mut)
    {
        for name in names {
            if let Some(prop) = props
                .get_mut(*name)
                .and_then(serde_json::Value::as_object_mut)
            {
                prop.remove("default");
            }
        }
    }
    let obj = schema.ensure_object();
    let required = obj
        .entry("required")
        .or_insert_with(|| serde_json::Value::Array(Vec::new()));
    if let Some(list) = required.as_array_mut() {
        for name in names {
            if !list.iter().any(|v| v == name) {
                list.push((*name).into());
            }
        }
        list.sort_by(|a, b| a.as_str().cmp(&b.as_str()));
    }
}

fn require_server_ip(schema: &mut Schema) {
    require_fields(schema, &["serverIP"]);
}

fn require_counts(schema: &mut Schema) {
    require_fields(schema, &["used", "available"]);
}

fn require_start_end(schema: &mut Schema) {
    require_fields(schema, &["start", "end"]);
}

/// The wrangler `GenericCondition` shape both upstream CRDs use (all strings).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// Type of the condition, e.g. `Registered`.
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_update_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_transition_time: Option<String>,
}

/// An IP pool served by one DHCP agent on one VM network.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "network.harvesterhci.io",
    version = "v1alpha1",
    kind = "IPPool",
    doc = "IPPool is a range of addresses that vm-dhcp serves on one VM network",
    plural = "ippools",
    singular = "ippool",
    shortname = "ippl",
    shortname = "ippls",
    namespaced,
    status = "IPPoolStatus",
    printcolumn = r#"{"name":"NETWORK","type":"string","jsonPath":".spec.networkName"}"#,
    printcolumn = r#"{"name":"AVAILABLE","type":"integer","jsonPath":".status.ipv4.available"}"#,
    printcolumn = r#"{"name":"USED","type":"integer","jsonPath":".status.ipv4.used"}"#,
    printcolumn = r#"{"name":"REGISTERED","type":"string","jsonPath":".status.conditions[?(@.type=='Registered')].status"}"#,
    printcolumn = r#"{"name":"CACHEREADY","type":"string","jsonPath":".status.conditions[?(@.type=='CacheReady')].status"}"#,
    printcolumn = r#"{"name":"AGENTREADY","type":"string","jsonPath":".status.conditions[?(@.type=='AgentReady')].status"}"#,
    printcolumn = r#"{"name":"AGE","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct IPPoolSpec {
    /// The VM network (NetworkAttachmentDefinition) as `<namespace>/<name>`.
    #[schemars(length(max = 64))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("NetworkName is immutable"))]
    pub network_name: String,
    /// Administratively disable the pool: its agents are removed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paused: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv4_config: Option<IPv4Config>,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = require_server_ip)]
#[x_kube(validation = Rule::new("!has(oldSelf.router) || has(self.router)").message("Router is required once set"))]
pub struct IPv4Config {
    /// The subnet of the VM network, e.g. `192.168.48.0/24`.
    #[x_kube(validation = Rule::new("self == oldSelf").message("CIDR is immutable"))]
    pub cidr: String,
    /// The address the active agent holds on the VM network and answers from.
    #[serde(rename = "serverIP", default)]
    #[schemars(extend("format" = "ipv4"))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("ServerIP is immutable"))]
    pub server_ip: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("format" = "ipv4"))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("Router is immutable"))]
    pub router: Option<String>,
    pub pool: Pool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<Vec<Ipv4Text>>", length(max = 3))]
    pub dns: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain_search: Option<Vec<String>>,
    /// NTP servers: addresses or host names (the agent resolves names).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 4))]
    pub ntp: Option<Vec<String>>,
    /// Lease time in seconds; absent or not positive means 3600.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_time: Option<i64>,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = require_start_end)]
#[x_kube(validation = Rule::new("!has(oldSelf.exclude) || has(self.exclude)").message("Exclude is required once set"))]
pub struct Pool {
    /// First address handed out (inclusive).
    #[serde(default)]
    #[schemars(extend("format" = "ipv4"))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("Start is immutable"))]
    pub start: String,
    /// Last address handed out (inclusive).
    #[serde(default)]
    #[schemars(extend("format" = "ipv4"))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("End is immutable"))]
    pub end: String,
    /// Addresses inside the range that are never handed out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<Vec<Ipv4Text>>")]
    #[x_kube(validation = Rule::new("self == oldSelf").message("Exclude is immutable"))]
    pub exclude: Option<Vec<String>>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct IPPoolStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_update: Option<Time>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv4: Option<IPv4Status>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_pod_ref: Option<PodReference>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conditions: Option<Vec<Condition>>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = require_counts)]
pub struct IPv4Status {
    /// Address → MAC, `EXCLUDED` or `RESERVED`: the one source of truth of the pool.
    /// An atomic map: the apiserver tracks it as one field, not one managedFields entry per
    /// address (that bookkeeping doubled the cost of every status write of a large pool).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("x-kubernetes-map-type" = "atomic"))]
    pub allocated: Option<BTreeMap<String, String>>,
    /// Address → owner (`<namespace>/<name>` of the VM and its vmnetcfg), written in the same
    /// atomic update as `allocated` so that a MAC bound by one owner is refused to another.
    /// Not in the Go version; entries it wrote have no owner until the controller adopts them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("x-kubernetes-map-type" = "atomic"))]
    pub owners: Option<BTreeMap<String, String>>,
    /// The addresses their owners asked for by address (a `static-ip.harvesterhci.io/<nic>`
    /// annotation, or a vmnetcfg entry created with its `ipAddress`), written with the
    /// allocation, so that the IPAM views tell static from allocated from the pool alone.
    /// Not in the Go version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub static_addresses: Option<Vec<String>>,
    #[serde(default)]
    pub used: i64,
    #[serde(default)]
    pub available: i64,
}

impl IPv4Status {
    /// The `staticAddresses` that `allocated` still gives to a MAC, each once, in order: a
    /// leftover of an older write (released, or a mark) is not static.
    pub fn held_statics(&self, allocated: &BTreeMap<String, String>) -> BTreeSet<String> {
        self.static_addresses
            .iter()
            .flatten()
            .filter(|ip| {
                allocated
                    .get(*ip)
                    .is_some_and(|v| v.parse::<crate::mac::MacAddr>().is_ok())
            })
            .cloned()
            .collect()
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PodReference {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
}

/// The addresses of one VirtualMachine's NICs on managed networks.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "network.harvesterhci.io",
    version = "v1alpha1",
    kind = "VirtualMachineNetworkConfig",
    doc = "VirtualMachineNetworkConfig holds the addresses of one VirtualMachine's NICs",
    plural = "virtualmachinenetworkconfigs",
    singular = "virtualmachinenetworkconfig",
    shortname = "vmnetcfg",
    shortname = "vmnetcfgs",
    namespaced,
    status = "VirtualMachineNetworkConfigStatus",
    printcolumn = r#"{"name":"VMNAME","type":"string","jsonPath":".spec.vmName"}"#,
    printcolumn = r#"{"name":"ALLOCATED","type":"string","jsonPath":".status.conditions[?(@.type=='Allocated')].status"}"#,
    printcolumn = r#"{"name":"DISABLED","type":"string","jsonPath":".status.conditions[?(@.type=='Disabled')].status"}"#,
    printcolumn = r#"{"name":"INSYNCED","type":"string","jsonPath":".status.conditions[?(@.type=='InSynced')].status"}"#,
    printcolumn = r#"{"name":"AGE","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct VirtualMachineNetworkConfigSpec {
    #[schemars(length(max = 64))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("VMName is immutable"))]
    pub vm_name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 4))]
    pub network_configs: Option<Vec<NetworkConfig>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paused: Option<bool>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NetworkConfig {
    /// The VM network as `<namespace>/<name>`.
    #[schemars(length(max = 64))]
    pub network_name: String,
    #[schemars(length(max = 17))]
    pub mac_address: String,
    /// The address of this NIC: written by the webhook at admission, or set by the user
    /// for a static address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("format" = "ipv4"))]
    pub ip_address: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VirtualMachineNetworkConfigStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network_configs: Option<Vec<NetworkConfigStatus>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conditions: Option<Vec<Condition>>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NetworkConfigStatus {
    #[serde(
        rename = "allocatedIPAddress",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub allocated_ip_address: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac_address: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network_name: Option<String>,
    /// `Allocated`, `Pending` or `Stale`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
}

/// One allocated address of an IPPool: the allocation store's unit of truth.
/// Creating it reserves the address (AlreadyExists: it is taken); deleting it releases it.
/// Named `<pool>.<address>` (see `store::address_object_name`), in the pool's namespace.
/// Written by the webhook (allocation) and the controller (migration, release); users read
/// the `ipamallocations` view instead.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "network.harvesterhci.io",
    version = "v1alpha1",
    kind = "IPPoolAddress",
    doc = "IPPoolAddress is one allocated address of an IPPool (written by vm-dhcp; read the ipamallocations view)",
    plural = "ippooladdresses",
    singular = "ippooladdress",
    shortname = "ippaddr",
    namespaced,
    printcolumn = r#"{"name":"IPPOOL","type":"string","jsonPath":".spec.ippool"}"#,
    printcolumn = r#"{"name":"ADDRESS","type":"string","jsonPath":".spec.address"}"#,
    printcolumn = r#"{"name":"MAC","type":"string","jsonPath":".spec.macAddress"}"#,
    printcolumn = r#"{"name":"OWNER","type":"string","jsonPath":".spec.owner"}"#,
    printcolumn = r#"{"name":"STATIC","type":"boolean","jsonPath":".spec.static"}"#,
    printcolumn = r#"{"name":"AGE","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct IPPoolAddressSpec {
    /// The IPPool (same namespace).
    #[x_kube(validation = Rule::new("self == oldSelf").message("ippool is immutable"))]
    pub ippool: String,
    /// The address (IPv4 today; the store holds any family).
    #[x_kube(validation = Rule::new("self == oldSelf").message("address is immutable"))]
    pub address: String,
    /// The MAC holding the address, lower case `aa:bb:cc:dd:ee:ff`.
    #[x_kube(validation = Rule::new("self == oldSelf").message("macAddress is immutable"))]
    pub mac_address: String,
    /// `<namespace>/<name>` of the VM and its vmnetcfg; absent for an allocation migrated from
    /// a pool status that named no owner (adopted by the first admission or the controller).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// Asked for by address (a static-ip annotation or a vmnetcfg entry with `ipAddress`).
    #[serde(default, rename = "static")]
    pub static_: bool,
    /// The VM interface (NIC name) when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<String>,
}

/// The claim of one MAC in one IPPool's network: MAC uniqueness per network, made as atomic
/// as address uniqueness by the object's name (`<pool>.<mac>`). It names the address the MAC
/// holds or is taking; an admission touches it (`admittedAt`), so a release decided earlier
/// (with this object's resourceVersion as precondition) cannot undo a re-admission.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "network.harvesterhci.io",
    version = "v1alpha1",
    kind = "IPPoolMACClaim",
    doc = "IPPoolMACClaim binds one MAC to one address of an IPPool (written by vm-dhcp)",
    plural = "ippoolmacclaims",
    singular = "ippoolmacclaim",
    shortname = "ippmac",
    namespaced,
    printcolumn = r#"{"name":"IPPOOL","type":"string","jsonPath":".spec.ippool"}"#,
    printcolumn = r#"{"name":"MAC","type":"string","jsonPath":".spec.macAddress"}"#,
    printcolumn = r#"{"name":"ADDRESS","type":"string","jsonPath":".spec.address"}"#,
    printcolumn = r#"{"name":"OWNER","type":"string","jsonPath":".spec.owner"}"#,
    printcolumn = r#"{"name":"AGE","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct IPPoolMACClaimSpec {
    #[x_kube(validation = Rule::new("self == oldSelf").message("ippool is immutable"))]
    pub ippool: String,
    #[x_kube(validation = Rule::new("self == oldSelf").message("macAddress is immutable"))]
    pub mac_address: String,
    /// The address this MAC holds (or is taking: its IPPoolAddress may not exist yet).
    pub address: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    #[serde(default, rename = "static")]
    pub static_: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<String>,
    /// When an admission last asked for this MAC (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admitted_at: Option<String>,
}

/// The CRD manifests as `chart/crds/` holds them: (file name, YAML), in a stable order.
pub fn crd_manifests() -> Result<Vec<(&'static str, String)>, serde_yaml::Error> {
    use kube::CustomResourceExt;
    Ok(vec![
        (
            "network.harvesterhci.io_ippools.yaml",
            serde_yaml::to_string(&IPPool::crd())?,
        ),
        (
            "network.harvesterhci.io_virtualmachinenetworkconfigs.yaml",
            serde_yaml::to_string(&VirtualMachineNetworkConfig::crd())?,
        ),
        (
            "network.harvesterhci.io_ippooladdresses.yaml",
            serde_yaml::to_string(&IPPoolAddress::crd())?,
        ),
        (
            "network.harvesterhci.io_ippoolmacclaims.yaml",
            serde_yaml::to_string(&IPPoolMACClaim::crd())?,
        ),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::CustomResourceExt;

    #[test]
    fn crd_names_match_upstream() {
        let crd = IPPool::crd();
        assert_eq!(
            crd.metadata.name.as_deref(),
            Some("ippools.network.harvesterhci.io")
        );
        assert_eq!(
            crd.spec.names.short_names,
            Some(vec!["ippl".to_string(), "ippls".to_string()])
        );
        let crd = VirtualMachineNetworkConfig::crd();
        assert_eq!(
            crd.metadata.name.as_deref(),
            Some("virtualmachinenetworkconfigs.network.harvesterhci.io")
        );
        assert_eq!(
            crd.spec.names.short_names,
            Some(vec!["vmnetcfg".to_string(), "vmnetcfgs".to_string()])
        );
    }
}
