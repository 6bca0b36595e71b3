//! The controller's decisions as pure functions: names, conditions, which allocations have
//! no owner, what a VM's
//! vmnetcfg should say, and which agent pods to create, delete or force-delete. The binary
//! (`src/controller/`) reads the cluster, calls these, and writes with the resourceVersion
//! guard.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::time::Duration;

use crate::admission::network_key;
use crate::crd::{Condition, IPv4Status, NetworkConfig};
use crate::kubevirt::VirtualMachine;
use crate::mac::MacAddr;

pub mod agent_pod;
pub mod owners;
pub mod plan;

/// Our finalizer on IPPools and vmnetcfgs (the Go version's are `wrangler.cattle.io/vm-dhcp-*`).
pub const FINALIZER: &str = "dhcp.harvesterhci.io/controller";
/// Prefix of the Go version's finalizers, removed on takeover.
pub const GO_FINALIZER_PREFIX: &str = "wrangler.cattle.io/vm-dhcp-";
/// The label every agent pod carries (ours and the Go version's).
pub const AGENT_LABEL: &str = "network.harvesterhci.io/vm-dhcp-controller";
pub const AGENT_LABEL_VALUE: &str = "agent";
/// Only our agent pods carry this label: it tells them from the Go version's.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
pub const MANAGED_BY_VALUE: &str = "vm-dhcp-controller";
/// The pod template's revision (image, arguments, network): pods of another one are rolled.
pub const REVISION_LABEL: &str = "dhcp.harvesterhci.io/agent-revision";
/// NAD and agent pod labels naming the pool.
pub const POOL_NAMESPACE_LABEL: &str = "network.harvesterhci.io/ippool-namespace";
pub const POOL_NAME_LABEL: &str = "network.harvesterhci.io/ippool-name";
/// NAD label naming its cluster network (Harvester's network controller writes it).
pub const CLUSTER_NETWORK_LABEL: &str = "network.harvesterhci.io/clusternetwork";
/// Node label prefix: `network.harvesterhci.io/<clusternetwork>=true` where the bridge is up.
pub const NODE_NETWORK_LABEL_PREFIX: &str = "network.harvesterhci.io/";
pub const WITNESS_LABEL: &str = "node-role.harvesterhci.io/witness";
/// vmnetcfg label naming its VM.
pub const VM_NAME_LABEL: &str = "harvesterhci.io/vmName";
/// IPPool annotation: keep the agents' current image when the controller's changes.
pub const HOLD_AGENT_UPGRADE_ANNOTATION: &str = "network.harvesterhci.io/hold-ippool-agent-upgrade";
/// NAD annotation opting in to an IPPool created with the network: the JSON of an IPPool
/// `spec.ipv4Config` (plus optional `paused`).
pub const AUTO_POOL_ANNOTATION: &str = "dhcp.harvesterhci.io/ippool";
/// Label on an IPPool the controller created from a NAD (deleted with the NAD).
pub const AUTO_POOL_LABEL: &str = "dhcp.harvesterhci.io/created-from-nad";
/// Multus' annotation listing a pod's secondary networks.
pub const MULTUS_ANNOTATION: &str = "k8s.v1.cni.cncf.io/networks";

/// FNV-1a, stable across builds (std's hasher is not), for name suffixes and revisions.
pub fn stable_hash(parts: &[&str]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for b in part.bytes().chain([0]) {
            h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

/// `text` if it fits in `max` characters; otherwise its head and a hash of the whole, so two
/// long names that share a head still differ. Never ends in `-` or `.`.
pub fn shorten(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let hash = format!("{:08x}", stable_hash(&[text]) as u32);
    let keep = max.saturating_sub(hash.len() + 1);
    let head: String = text.chars().take(keep).collect();
    let head = head.trim_end_matches(['-', '.']);
    format!("{head}-{hash}")
}

/// The Lease the agents of a pool compete for (in the agents' namespace).
pub fn lease_name(pool_ns: &str, pool_name: &str) -> String {
    shorten(&format!("vmdhcp-{pool_ns}-{pool_name}"), 63)
}

/// The name of one of our agent pods: `<pool>-agent-<revision>-<n>`, at most 63 characters.
/// Deterministic, so that a create repeated before the cache shows the first one gets a
/// harmless AlreadyExists instead of a second pod.
pub fn agent_pod_name(pool_ns: &str, pool_name: &str, revision: &str, n: usize) -> String {
    let suffix = format!("-agent-{revision}-{n}");
    let base = shorten(
        &format!("{pool_ns}-{pool_name}"),
        63usize.saturating_sub(suffix.len()),
    );
    format!("{base}{suffix}")
}

/// The Go version's agent pod name (`SafeAgentConcatName`), to find it on takeover.
pub fn go_agent_pod_name(pool_ns: &str, pool_name: &str) -> String {
    let joined = format!("{pool_ns}-{pool_name}");
    if joined.len() < 58 {
        return format!("{joined}-agent");
    }
    // Upstream: SHA-256; we only need it to recognise the pod, which we also find by label.
    joined.chars().take(51).collect::<String>() + "-agent"
}

/// Splits an image as upstream does: the tag follows the last `:` unless that colon is part
/// of a registry port (before the last `/`); no tag means `latest`.
pub fn parse_image(image: &str) -> Result<(String, String), String> {
    let image = image.trim();
    if image.is_empty() {
        return Err(
            "the agent image is empty: set --image (e.g. rancher/harvester-vm-dhcp:v1.0.0)".into(),
        );
    }
    let colons = image.matches(':').count();
    if colons > 2 {
        return Err(format!(
            "invalid image name {image:?}: multiple colons found"
        ));
    }
    let last_slash = image.rfind('/');
    match image.rfind(':') {
        Some(i) if last_slash.is_none_or(|s| i > s) => {
            let (repo, tag) = (&image[..i], &image[i + 1..]);
            if tag.is_empty() {
                return Err(format!("invalid image name {image:?}: colon without tag"));
            }
            Ok((repo.to_string(), tag.to_string()))
        }
        _ => Ok((image.to_string(), "latest".to_string())),
    }
}

/// The cluster network of a NAD: its label, else the bridge name in its CNI config
/// (`<cn>-br`).
pub fn cluster_network(labels: Option<&BTreeMap<String, String>>, config: &str) -> Option<String> {
    if let Some(cn) = labels
        .and_then(|l| l.get(CLUSTER_NETWORK_LABEL))
        .map(|s| s.trim())
        .filter(|s| !s.is_empty())
    {
        return Some(cn.to_string());
    }
    let cfg: serde_json::Value = serde_json::from_str(config).ok()?;
    let bridge = cfg.get("bridge")?.as_str()?;
    bridge
        .strip_suffix("-br")
        .filter(|s| !s.is_empty())
        .map(str::to_string)
}

/// Sets a condition; keeps `lastTransitionTime` when the status did not change. Returns
/// whether anything changed.
pub fn set_condition(
    conditions: &mut Vec<Condition>,
    type_: &str,
    status: bool,
    reason: &str,
    message: &str,
    now: &str,
) -> bool {
    let status = if status { "True" } else { "False" };
    let reason = (!reason.is_empty()).then(|| reason.to_string());
    let message = (!message.is_empty()).then(|| message.to_string());
    match conditions.iter_mut().find(|c| c.type_ == type_) {
        Some(c) if c.status == status && c.reason == reason && c.message == message => false,
        Some(c) => {
            if c.status != status {
                c.last_transition_time = Some(now.to_string());
            }
            c.status = status.to_string();
            c.reason = reason;
            c.message = message;
            c.last_update_time = Some(now.to_string());
            true
        }
        None => {
            conditions.push(Condition {
                type_: type_.to_string(),
                status: status.to_string(),
                reason,
                message,
                last_update_time: Some(now.to_string()),
                last_transition_time: Some(now.to_string()),
            });
            true
        }
    }
}

pub fn condition_is(conditions: Option<&Vec<Condition>>, type_: &str, status: &str) -> bool {
    conditions
        .into_iter()
        .flatten()
        .any(|c| c.type_ == type_ && c.status == status)
}

/// One allocation of a pool: the address, the MAC holding it and its recorded owner.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Held {
    pub ip: Ipv4Addr,
    pub mac: MacAddr,
    pub owner: Option<String>,
}

/// A JSON merge patch turning `before` into `after` for `status.ipv4` (removed keys as null).
pub fn ipv4_merge_patch(before: Option<&IPv4Status>, after: &IPv4Status) -> serde_json::Value {
    fn diff(
        before: Option<&BTreeMap<String, String>>,
        after: Option<&BTreeMap<String, String>>,
    ) -> serde_json::Map<String, serde_json::Value> {
        let mut out = serde_json::Map::new();
        for (k, _) in before.into_iter().flatten() {
            if after.is_none_or(|a| !a.contains_key(k)) {
                out.insert(k.clone(), serde_json::Value::Null);
            }
        }
        for (k, v) in after.into_iter().flatten() {
            if before.and_then(|b| b.get(k)) != Some(v) {
                out.insert(k.clone(), v.clone().into());
            }
        }
        out
    }
    let mut patch = serde_json::json!({
        "allocated": diff(before.and_then(|b| b.allocated.as_ref()), after.allocated.as_ref()),
        "owners": diff(before.and_then(|b| b.owners.as_ref()), after.owners.as_ref()),
        "used": after.used,
        "available": after.available,
    });
    // A list: a merge patch replaces it whole (null removes it); sent only when it changed.
    let statics = |s: Option<&IPv4Status>| {
        s.and_then(|s| s.static_addresses.clone())
            .filter(|l| !l.is_empty())
    };
    if statics(before) != statics(Some(after)) {
        patch["staticAddresses"] = serde_json::json!(statics(Some(after)));
    }
    patch
}

/// Whether two statuses say the same (maps compared as maps, absent = empty).
pub fn same_ipv4(a: Option<&IPv4Status>, b: &IPv4Status) -> bool {
    let Some(a) = a else {
        return b.allocated.as_ref().is_none_or(BTreeMap::is_empty)
            && b.owners.as_ref().is_none_or(BTreeMap::is_empty)
            && b.static_addresses.as_ref().is_none_or(Vec::is_empty)
            && b.used == 0
            && b.available == 0;
    };
    let empty = BTreeMap::new();
    a.allocated.as_ref().unwrap_or(&empty) == b.allocated.as_ref().unwrap_or(&empty)
        && a.owners.as_ref().unwrap_or(&empty) == b.owners.as_ref().unwrap_or(&empty)
        && a.static_addresses.as_deref().unwrap_or_default()
            == b.static_addresses.as_deref().unwrap_or_default()
        && a.used == b.used
        && a.available == b.available
}

/// Who may hold an allocation: (network key, MAC) → owner `<namespace>/<vm>`, from every
/// vmnetcfg entry and every VM NIC that exists and is not being deleted.
#[derive(Debug, Clone, Default)]
pub struct LiveOwners {
    owners: BTreeMap<(String, MacAddr), String>,
}

impl LiveOwners {
    pub fn insert(&mut self, network: &str, mac: MacAddr, owner: String) {
        self.owners
            .entry((network_key(network), mac))
            .or_insert(owner);
    }

    pub fn get(&self, network: &str, mac: MacAddr) -> Option<&str> {
        self.owners
            .get(&(network_key(network), mac))
            .map(String::as_str)
    }

    pub fn len(&self) -> usize {
        self.owners.len()
    }

    pub fn is_empty(&self) -> bool {
        self.owners.is_empty()
    }

    /// (network key, MAC, owner) of every entry.
    pub fn into_claims(self) -> Vec<(String, MacAddr, String)> {
        self.owners
            .into_iter()
            .map(|((network, mac), owner)| (network, mac, owner))
            .collect()
    }

    /// Adds every NIC of a VM on a known MAC (spec, Harvester annotation, or the webhook's
    /// record), skipping absent NICs and the pod network.
    pub fn add_vm(&mut self, vm: &VirtualMachine) {
        let ns = vm.metadata.namespace.as_deref().unwrap_or_default();
        let owner = format!("{ns}/{}", vm.metadata.name.as_deref().unwrap_or_default());
        for nic in vm_nics(vm) {
            if let Some(mac) = nic.mac {
                self.insert(&nic.network, mac, owner.clone());
            }
        }
    }
}

/// One NIC of a VM on a Multus network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmNic {
    pub interface: String,
    /// Network key `<namespace>/<name>` (a bare name means the VM's namespace).
    pub network: String,
    pub mac: Option<MacAddr>,
    /// The address the webhook recorded for this NIC (allocations annotation).
    pub ip: Option<Ipv4Addr>,
}

/// The Multus NICs of a VM in spec order, absent ones left out. The MAC is the spec's, else
/// Harvester's annotation, else the webhook's record; unreadable MACs count as unknown.
pub fn vm_nics(vm: &VirtualMachine) -> Vec<VmNic> {
    crate::nics::read(vm)
        .nics
        .into_iter()
        .map(|nic| VmNic {
            mac: nic.known_mac(),
            ip: nic.recorded_ip(),
            interface: nic.interface,
            network: nic.network,
        })
        .collect()
}

/// The `spec.networkConfigs` a VM's vmnetcfg should hold: its NICs on managed networks with a
/// known MAC, in the VM's interface order. The address is the webhook's record, else what
/// the existing vmnetcfg says for that (network, MAC), else what the pool holds for the MAC.
pub fn desired_network_configs(
    vm: &VirtualMachine,
    managed: impl Fn(&str) -> bool,
    existing: &[NetworkConfig],
    held_ip: impl Fn(&str, MacAddr) -> Option<Ipv4Addr>,
) -> Vec<NetworkConfig> {
    let mut seen = BTreeSet::new();
    vm_nics(vm)
        .into_iter()
        .filter(|n| managed(&n.network))
        .filter_map(|n| {
            let mac = n.mac?;
            if !seen.insert((n.network.clone(), mac)) {
                return None;
            }
            let kept = existing
                .iter()
                .find(|e| {
                    network_key(&e.network_name) == n.network
                        && e.mac_address.parse::<MacAddr>().ok() == Some(mac)
                })
                .and_then(|e| e.ip_address.as_deref()?.parse::<Ipv4Addr>().ok());
            let ip = n.ip.or(kept).or_else(|| held_ip(&n.network, mac));
            Some(NetworkConfig {
                network_name: n.network,
                mac_address: mac.to_string(),
                ip_address: ip.map(|ip| ip.to_string()),
            })
        })
        .collect()
}

/// Whether two entry lists say the same, with MACs compared canonically.
pub fn same_network_configs(a: &[NetworkConfig], b: &[NetworkConfig]) -> bool {
    let canon = |list: &[NetworkConfig]| -> Vec<(String, String, Option<String>)> {
        list.iter()
            .map(|e| {
                (
                    network_key(&e.network_name),
                    e.mac_address
                        .parse::<MacAddr>()
                        .map(|m| m.to_string())
                        .unwrap_or_else(|_| e.mac_address.clone()),
                    e.ip_address.clone(),
                )
            })
            .collect()
    };
    canon(a) == canon(b)
}

/// An allocation whose owner is nowhere to be seen, and since when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ownership {
    /// A live vmnetcfg entry or VM NIC holds it; `adopt` carries the owner to record when
    /// the status has none (an allocation the Go version made).
    Owned { adopt: Option<String> },
    /// Nobody holds it.
    Orphan,
}

pub fn ownership(network: &str, h: &Held, live: &LiveOwners) -> Ownership {
    match live.get(network, h.mac) {
        Some(owner) => Ownership::Owned {
            adopt: h.owner.is_none().then(|| owner.to_string()),
        },
        None => Ownership::Orphan,
    }
}

/// The sweep's memory: when each orphan was first seen. Entries that are owned again (or
/// gone) are forgotten; those orphaned for longer than `grace` are returned for release.
#[derive(Debug, Clone, Default)]
pub struct OrphanClock {
    first_seen: BTreeMap<(String, Ipv4Addr, MacAddr), Duration>,
}

impl OrphanClock {
    /// `now` is a monotonic time (e.g. since process start). Returns the orphans to release.
    pub fn observe(
        &mut self,
        pool: &str,
        orphans: &[(Ipv4Addr, MacAddr)],
        now: Duration,
        grace: Duration,
    ) -> Vec<(Ipv4Addr, MacAddr)> {
        let current: BTreeSet<(Ipv4Addr, MacAddr)> = orphans.iter().copied().collect();
        self.first_seen
            .retain(|(p, ip, mac), _| p != pool || current.contains(&(*ip, *mac)));
        let mut due = Vec::new();
        for (ip, mac) in current {
            let since = *self
                .first_seen
                .entry((pool.to_string(), ip, mac))
                .or_insert(now);
            if now.saturating_sub(since) >= grace {
                due.push((ip, mac));
            }
        }
        due
    }

    /// Forgets a pool (deleted).
    pub fn forget(&mut self, pool: &str) {
        self.first_seen.retain(|(p, _, _), _| p != pool);
    }

    /// How long until the next orphan of any pool is due (to schedule the next sweep).
    pub fn next_due(&self, now: Duration, grace: Duration) -> Option<Duration> {
        self.first_seen
            .values()
            .map(|since| (*since + grace).saturating_sub(now))
            .min()
    }
}

/// A MAC's claim as the apiserver holds it (a quorum read: never the cache, which may not
/// have seen it yet), for [`release_gate`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClaimSeen<'a> {
    /// When an admission last touched it (RFC 3339).
    pub admitted_at: Option<&'a str>,
    /// `<namespace>/<vm>`.
    pub owner: Option<&'a str>,
}

/// What must hold before one MAC's allocation is released.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReleaseGate {
    /// An admission may still be in flight on the claim: not before this long.
    Wait(Duration),
    /// Only if none of these owners (`<namespace>/<vm>`) holds the MAC on the network, per
    /// a quorum read of its VM and vmnetcfg.
    Confirm(Vec<String>),
}

/// The gate of a release, whoever decided it (a VM or vmnetcfg gone, a NIC removed, a leak):
/// a claim touched within `window` of `now` waits; otherwise every owner the claim or the
/// address object names is confirmed gone. Those decisions were made on caches that may lag
/// (a VM created while its watch was down is not there yet); the owners named by the store
/// itself are what keeps a live VM's allocation, also when the claim is missing and only the
/// address object names one.
pub fn release_gate<'a>(
    claim: Option<ClaimSeen<'a>>,
    address_owners: impl IntoIterator<Item = &'a str>,
    now: k8s_openapi::jiff::Timestamp,
    window: Duration,
) -> ReleaseGate {
    if let Some(at) = claim
        .and_then(|c| c.admitted_at)
        .and_then(|a| a.parse::<k8s_openapi::jiff::Timestamp>().ok())
    {
        let age = Duration::try_from(now.duration_since(at)).unwrap_or(Duration::ZERO);
        if let Some(wait) = window.checked_sub(age).filter(|d| !d.is_zero()) {
            return ReleaseGate::Wait(wait);
        }
    }
    let mut owners: Vec<String> = Vec::new();
    for owner in claim
        .and_then(|c| c.owner)
        .into_iter()
        .chain(address_owners)
    {
        if !owners.iter().any(|o| o == owner) {
            owners.push(owner.to_string());
        }
    }
    ReleaseGate::Confirm(owners)
}

/// One existing agent pod of a pool, as the planner needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentPod {
    pub name: String,
    /// Ours (managed-by label), else the Go version's.
    pub ours: bool,
    pub revision: Option<String>,
    pub ready: bool,
    pub terminating: bool,
    /// How long its node has been unreachable (Ready not True with the unreachable taint).
    pub node_lost_for: Option<Duration>,
    /// Holds the pool's Lease (not expired).
    pub lease_holder: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentInput {
    pub pool_ns: String,
    pub pool_name: String,
    /// Agents wanted: the replica count, capped by the eligible nodes (0 when paused).
    pub want: usize,
    pub revision: String,
    pub pods: Vec<AgentPod>,
    pub lost_grace: Duration,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AgentPlan {
    pub create: Vec<String>,
    pub delete: Vec<String>,
    pub force_delete: Vec<String>,
    /// The Go version's agent pods to delete (ours is active).
    pub delete_go: Vec<String>,
}

/// Which agent pods to create and remove, DaemonSet-style with surge:
/// - a pod whose node has been lost for longer than the grace period is force-deleted (a
///   kubelet that is gone never confirms a deletion: harvester#8205), the Go version's too;
/// - new pods are created until `want` pods of the current revision are alive;
/// - pods of another revision are deleted only once `want` current pods are Ready, so an
///   image roll never leaves the pool without an active agent;
/// - extra current pods are removed (not-ready and non-holders first);
/// - the Go version's pods are deleted once one of ours is a Ready Lease holder.
pub fn plan_agents(input: &AgentInput) -> AgentPlan {
    let mut plan = AgentPlan::default();
    let lost = |p: &AgentPod| p.node_lost_for.is_some_and(|d| d >= input.lost_grace);
    // The Go version's pods too: its agent on a lost node is just as stuck Terminating, and
    // a plain delete of it (below) would never complete either.
    for p in input.pods.iter().filter(|p| lost(p)) {
        plan.force_delete.push(p.name.clone());
    }
    let alive: Vec<&AgentPod> = input
        .pods
        .iter()
        .filter(|p| p.ours && !p.terminating && !lost(p))
        .collect();
    let (current, outdated): (Vec<&AgentPod>, Vec<&AgentPod>) = alive
        .iter()
        .partition(|p| p.revision.as_deref() == Some(input.revision.as_str()));
    let used: BTreeSet<&str> = input.pods.iter().map(|p| p.name.as_str()).collect();
    let mut n = 0;
    for _ in current.len()..input.want {
        loop {
            let name = agent_pod_name(&input.pool_ns, &input.pool_name, &input.revision, n);
            n += 1;
            if !used.contains(name.as_str()) {
                plan.create.push(name);
                break;
            }
        }
    }
    let ready_current = current.iter().filter(|p| p.ready).count();
    if input.want == 0 || ready_current >= input.want {
        plan.delete.extend(outdated.iter().map(|p| p.name.clone()));
    }
    if current.len() > input.want {
        let mut extra = current.clone();
        // Keep the Ready Lease holder and Ready pods; remove the rest first.
        extra.sort_by_key(|p| (p.lease_holder, p.ready, std::cmp::Reverse(p.name.clone())));
        plan.delete.extend(
            extra
                .iter()
                .take(current.len() - input.want)
                .map(|p| p.name.clone()),
        );
    }
    let ours_active = input
        .pods
        .iter()
        .any(|p| p.ours && p.ready && p.lease_holder && !p.terminating);
    if ours_active || input.want == 0 {
        plan.delete_go.extend(
            input
                .pods
                .iter()
                .filter(|p| !p.ours && !p.terminating && !lost(p))
                .map(|p| p.name.clone()),
        );
    }
    plan
}

/// The status a vmnetcfg shows: one entry per spec entry on a managed network with the
/// address its MAC holds in the pool (`Allocated`), or `Pending` when it holds none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryStatus {
    pub network: String,
    pub mac: String,
    pub ip: Option<Ipv4Addr>,
}

/// The upstream message of a paused vmnetcfg or pool.
pub fn disabled_message(kind: &str, ns: &str, name: &str) -> String {
    format!("{kind} {ns}/{name} was administratively disabled")
}

/// The pool entries whose (network, MAC) a vmnetcfg no longer lists: its status shows them,
/// its spec does not (a NIC removed from the VM, or an entry edited away).
pub fn stale_entries(
    spec: &[NetworkConfig],
    status: &[crate::crd::NetworkConfigStatus],
) -> Vec<(String, MacAddr, Ipv4Addr)> {
    let listed: BTreeSet<(String, MacAddr)> = spec
        .iter()
        .filter_map(|e| Some((network_key(&e.network_name), e.mac_address.parse().ok()?)))
        .collect();
    status
        .iter()
        .filter_map(|s| {
            let network = network_key(s.network_name.as_deref()?);
            let mac: MacAddr = s.mac_address.as_deref()?.parse().ok()?;
            let ip: Ipv4Addr = s.allocated_ip_address.as_deref()?.parse().ok()?;
            (!listed.contains(&(network.clone(), mac))).then_some((network, mac, ip))
        })
        .collect()
}

#[cfg(test)]
mod tests;
