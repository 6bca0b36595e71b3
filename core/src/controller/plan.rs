//! The controller's reconciles as pure functions: what the caches hold goes in, the writes
//! to make come out as data ([`Write`]). Nothing here reads a clock, a cache or the network:
//! the binary (`src/controller/`) gathers a [`PoolWorld`] or [`WorkloadWorld`] from its
//! caches, calls [`plan_pool`], [`plan_workload`] or [`plan_nad`], and hands the writes to
//! its writer, which applies them only while this replica leads.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use k8s_openapi::jiff::Timestamp;

use super::agent_pod::{self, NOT_READY_TAINT, UNREACHABLE_TAINT};
use super::{
    self as decide, AgentInput, AgentPod, LiveOwners, OrphanClock, Ownership, set_condition,
};
use crate::admission::network_key;
use crate::crd::{
    Condition, IPPool, IPPoolSpec, IPv4Config, IPv4Status, NetworkConfig, NetworkConfigStatus,
    PodReference, VirtualMachineNetworkConfig, VirtualMachineNetworkConfigSpec,
};
use crate::kubevirt::{NetworkAttachmentDefinition, VirtualMachine};
use crate::mac::MacAddr;
use crate::store::{self, HalfMade, Holding, PoolKey};

/// The controller's settings that decisions depend on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// Namespace of the agent pods and their Leases.
    pub namespace: String,
    pub image: String,
    pub service_account: String,
    pub agents_per_pool: usize,
    /// Agents are not managed at all.
    pub no_agent: bool,
    /// Agents decide but send nothing.
    pub no_dhcp: bool,
    pub agent_lease_duration_seconds: u64,
    pub lost_node_grace: Duration,
    pub agents_on_witness_nodes: bool,
    pub leak_grace: Duration,
    pub status_max_allocations: usize,
}

/// Which object a finalizer write is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finalized {
    IPPool,
    Vmnetcfg,
}

/// What the writer reports once a leak is released: a Warning Event on the pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeakSwept {
    pub ip: Ipv4Addr,
    pub network: String,
    pub grace: Duration,
    /// The pool's uid, for the Event's object reference.
    pub pool_uid: Option<String>,
}

/// One write the controller plans. Guarded writes carry the resourceVersion they were
/// decided on: a write that finds another version is not retried, its object is planned
/// again.
#[derive(Debug, Clone)]
pub enum Write {
    /// Sets an object's finalizers (ours on and the Go version's off, or ours off).
    Finalizers {
        kind: Finalized,
        ns: String,
        name: String,
        resource_version: Option<String>,
        finalizers: Vec<String>,
    },
    /// Labels a NAD with its pool (`None`: takes the labels off).
    NadLabels {
        ns: String,
        name: String,
        pool: Option<PoolKey>,
    },
    CreateAgent(Box<Pod>),
    /// Deletes an agent pod; `force` (grace period 0) for one on a lost node.
    DeleteAgent {
        name: String,
        force: bool,
        why: &'static str,
    },
    DeleteAgentLease {
        name: String,
    },
    /// Deletes every address object and claim of a pool that is going away.
    DeleteAllocations {
        pool: PoolKey,
    },
    /// Writes the allocations a pool status holds as claims and address objects (each as
    /// the webhook does, idempotently), then marks the pool migrated.
    Migrate {
        pool: PoolKey,
        network: String,
        holdings: Vec<Holding>,
    },
    /// Marks a pool as kept in address objects (admission allocates in it from then on).
    MarkMigrated {
        pool: PoolKey,
    },
    /// Records the live owner on an allocation that names none (address object and claim).
    Adopt {
        pool: PoolKey,
        ip: IpAddr,
        mac: MacAddr,
        owner: String,
    },
    /// Gives back what a MAC holds in a pool. Decided on caches that may lag, so the writer
    /// reads the claim and the address objects from the apiserver, waits out an admission in
    /// flight on the claim and confirms every owner they name is gone before deleting
    /// anything.
    Release {
        pool: PoolKey,
        network: String,
        mac: MacAddr,
        /// The address the cache saw the MAC hold (the writer also looks at the one its
        /// claim names).
        held: Option<IpAddr>,
        why: String,
        /// Set for a leak: reported once released.
        leak: Option<LeakSwept>,
    },
    /// Deletes one half of an allocation whose other half is missing (an admission stopped
    /// between its two writes): a claim (`ip` unspecified) or an address object. The writer
    /// reads the other half from the apiserver first.
    SweepHalfMade {
        pool: PoolKey,
        ip: Ipv4Addr,
        mac: MacAddr,
        /// The address the claim names (for a claim).
        claimed: Option<IpAddr>,
        resource_version: Option<String>,
    },
    /// A merge patch of a pool's status (its fields), guarded by the version it was
    /// computed from.
    PoolStatus {
        pool: PoolKey,
        resource_version: Option<String>,
        patch: serde_json::Value,
        /// It carries a new projection of `status.ipv4`.
        projected: bool,
    },
    CreatePool(Box<IPPool>),
    DeletePool {
        ns: String,
        name: String,
    },
    CreateVmnetcfg(Box<VirtualMachineNetworkConfig>),
    VmnetcfgSpec {
        ns: String,
        name: String,
        resource_version: Option<String>,
        configs: Vec<NetworkConfig>,
    },
    /// Deletes a vmnetcfg whose VM is gone, once the apiserver confirms that no live VM of
    /// uid `vm_uid` is there (the VMs' watch may lag the vmnetcfgs').
    DeleteVmnetcfg {
        ns: String,
        name: String,
        uid: Option<String>,
        vm_uid: String,
    },
    /// A merge patch of a vmnetcfg's status.
    VmnetcfgStatus {
        ns: String,
        name: String,
        patch: serde_json::Value,
    },
}

impl Write {
    /// A short name for metrics and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Write::Finalizers { .. } => "finalizers",
            Write::NadLabels { .. } => "nad_labels",
            Write::CreateAgent(_) => "create_agent",
            Write::DeleteAgent { .. } => "delete_agent",
            Write::DeleteAgentLease { .. } => "delete_agent_lease",
            Write::DeleteAllocations { .. } => "delete_allocations",
            Write::Migrate { .. } => "migrate",
            Write::MarkMigrated { .. } => "mark_migrated",
            Write::Adopt { .. } => "adopt",
            Write::Release { .. } => "release",
            Write::SweepHalfMade { .. } => "sweep_half_made",
            Write::PoolStatus { .. } => "pool_status",
            Write::CreatePool(_) => "create_pool",
            Write::DeletePool { .. } => "delete_pool",
            Write::CreateVmnetcfg(_) => "create_vmnetcfg",
            Write::VmnetcfgSpec { .. } => "vmnetcfg_spec",
            Write::DeleteVmnetcfg { .. } => "delete_vmnetcfg",
            Write::VmnetcfgStatus { .. } => "vmnetcfg_status",
        }
    }
}

/// The writes of one reconcile, in order, and when to look again.
#[derive(Debug, Clone, Default)]
pub struct Plan {
    pub writes: Vec<Write>,
    pub recheck: Option<Duration>,
    /// What is wrong with the input that no write can fix (logged).
    pub warnings: Vec<String>,
}

impl Plan {
    fn recheck_in(&mut self, after: Duration) {
        self.recheck = Some(self.recheck.map_or(after, |r| r.min(after)));
    }
}

/// What a pool's reconcile reads, from the caches.
#[derive(Debug, Clone)]
pub struct PoolWorld<'a> {
    pub pool: &'a IPPool,
    pub nad: Option<&'a NetworkAttachmentDefinition>,
    pub nodes: Vec<&'a Node>,
    /// The pool's agent pods, ours and the Go version's.
    pub pods: Vec<&'a Pod>,
    /// The pool's agent Lease.
    pub lease: Option<&'a Lease>,
    /// The pool's address objects with their resourceVersions.
    pub holdings: Vec<(Holding, Option<String>)>,
    /// The pool's claims: MAC → the address it names, with its resourceVersion.
    pub claims: BTreeMap<MacAddr, (IpAddr, Option<String>)>,
    /// Who may hold an address on the pool's network.
    pub live: &'a LiveOwners,
    /// Whether the allocations fit in the status and, when a projection is due, the
    /// `status.ipv4` the address objects project (or why they cannot).
    pub projection: Result<(bool, Option<IPv4Status>), String>,
    pub now: Timestamp,
}

/// The sweep's memory across reconciles, and a monotonic now for it.
pub struct Clocks<'a> {
    pub orphans: &'a mut OrphanClock,
    pub half_made: &'a mut OrphanClock,
    pub now: Duration,
}

fn pool_ns_name(pool: &IPPool) -> PoolKey {
    (
        pool.metadata.namespace.clone().unwrap_or_default(),
        pool.metadata.name.clone().unwrap_or_default(),
    )
}

fn ours(finalizer: &str) -> bool {
    finalizer == decide::FINALIZER || finalizer.starts_with(decide::GO_FINALIZER_PREFIX)
}

/// The finalizers an object should carry: ours on and the Go version's off (`keep`), or
/// none of either; `None` when they already are.
pub fn next_finalizers(current: &[String], keep: bool) -> Option<Vec<String>> {
    let mut next: Vec<String> = current.iter().filter(|f| !ours(f)).cloned().collect();
    if keep {
        next.push(decide::FINALIZER.to_string());
    }
    (next != current).then_some(next)
}

fn finalizers_write(
    kind: Finalized,
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    keep: bool,
) -> Option<Write> {
    let current = meta.finalizers.clone().unwrap_or_default();
    next_finalizers(&current, keep).map(|finalizers| Write::Finalizers {
        kind,
        ns: meta.namespace.clone().unwrap_or_default(),
        name: meta.name.clone().unwrap_or_default(),
        resource_version: meta.resource_version.clone(),
        finalizers,
    })
}

fn labels(
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
) -> BTreeMap<String, String> {
    meta.labels.clone().unwrap_or_default()
}

fn nad_names_pool(nad: &NetworkAttachmentDefinition, (ns, name): &PoolKey) -> bool {
    let l = labels(&nad.metadata);
    l.get(decide::POOL_NAMESPACE_LABEL) == Some(ns) && l.get(decide::POOL_NAME_LABEL) == Some(name)
}

/// A node's eligibility for agents and, if it is lost, since when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeView {
    pub eligible: bool,
    pub lost_since: Option<Timestamp>,
}

/// Whether agents of a pool on cluster network `cn` may run on `node` (labelled for the
/// network, Ready, schedulable, not a witness unless allowed), and since when it is lost
/// (not Ready with the unreachable taint).
pub fn node_view(node: &Node, cn: &str, allow_witness: bool, now: Timestamp) -> NodeView {
    let labels = labels(&node.metadata);
    let ready = node
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| c.iter().find(|c| c.type_ == "Ready"));
    let is_ready = ready.is_some_and(|c| c.status == "True");
    let taints = node
        .spec
        .as_ref()
        .and_then(|s| s.taints.clone())
        .unwrap_or_default();
    let unreachable = taints.iter().find(|t| t.key == UNREACHABLE_TAINT);
    let lost_since = match (is_ready, unreachable) {
        (false, Some(t)) => t
            .time_added
            .as_ref()
            .map(|t| t.0)
            .or_else(|| {
                ready
                    .and_then(|c| c.last_transition_time.as_ref())
                    .map(|t| t.0)
            })
            .or(Some(now)),
        _ => None,
    };
    let blocked = taints.iter().any(|t| {
        matches!(t.effect.as_str(), "NoSchedule" | "NoExecute")
            && !(t.key == NOT_READY_TAINT && is_ready)
    }) || node.spec.as_ref().and_then(|s| s.unschedulable) == Some(true);
    let witness = labels.get(decide::WITNESS_LABEL).map(String::as_str) == Some("true");
    let cn_label = format!("{}{cn}", decide::NODE_NETWORK_LABEL_PREFIX);
    NodeView {
        eligible: labels.get(&cn_label).map(String::as_str) == Some("true")
            && is_ready
            && !blocked
            && (allow_witness || !witness),
        lost_since,
    }
}

pub fn pod_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// The holder of an agent Lease while it is not expired (a second of tolerance for clock
/// skew between the agent's node and ours).
pub fn lease_holder(lease: &Lease, now: Timestamp) -> Option<String> {
    let spec = lease.spec.as_ref()?;
    let holder = spec.holder_identity.clone().filter(|h| !h.is_empty())?;
    let renewed = spec.renew_time.as_ref()?.0;
    let duration = i64::from(spec.lease_duration_seconds.unwrap_or(15));
    let expires = renewed + k8s_openapi::jiff::SignedDuration::from_secs(duration + 1);
    (expires > now).then_some(holder)
}

/// What the agents of a pool say for its status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentOutcome {
    pub registered: Result<(), String>,
    pub ready: Result<PodReference, String>,
    /// The image agents run (the held one, or the controller's).
    pub image: String,
}

/// Brings a pool's agent pods in line (creates, deletes, force-deletes, the Go version's
/// pods once ours is active) and says whether one is active.
fn plan_agents_of(w: &PoolWorld<'_>, s: &Settings, paused: bool, plan: &mut Plan) -> AgentOutcome {
    let (pool_ns, pool_name) = pool_ns_name(w.pool);
    let held_image = w
        .pool
        .status
        .as_ref()
        .and_then(|s| s.agent_pod_ref.as_ref())
        .and_then(|r| r.image.clone());
    let hold = w
        .pool
        .metadata
        .annotations
        .as_ref()
        .is_some_and(|a| a.contains_key(decide::HOLD_AGENT_UPGRADE_ANNOTATION));
    let image = match (hold, held_image) {
        (true, Some(held)) => held,
        _ => s.image.clone(),
    };
    let cn = w
        .nad
        .and_then(|n| decide::cluster_network(n.metadata.labels.as_ref(), &n.spec.config));
    let mut views = BTreeMap::new();
    let mut eligible = 0;
    if let Some(cn) = &cn {
        for node in &w.nodes {
            let v = node_view(node, cn, s.agents_on_witness_nodes, w.now);
            eligible += usize::from(v.eligible);
            views.insert(node.metadata.name.clone().unwrap_or_default(), v);
        }
    }
    let network = network_key(&w.pool.spec.network_name);
    let revision = format!(
        "{:06x}",
        decide::stable_hash(&[
            "v1",
            &image,
            &s.no_dhcp.to_string(),
            &s.service_account,
            cn.as_deref().unwrap_or_default(),
            &network,
            &s.agent_lease_duration_seconds.to_string(),
            &s.agents_on_witness_nodes.to_string(),
        ]) & 0xff_ffff
    );
    let holder = w.lease.and_then(|l| lease_holder(l, w.now));
    let grace = s.lost_node_grace;
    let inputs: Vec<AgentPod> = w
        .pods
        .iter()
        .map(|p| {
            let name = p.metadata.name.clone().unwrap_or_default();
            let node = p.spec.as_ref().and_then(|s| s.node_name.clone());
            let lost_for = node
                .and_then(|n| views.get(&n).and_then(|v| v.lost_since))
                .map(|since| Duration::from_secs((w.now - since).get_seconds().max(0) as u64));
            if let Some(d) = lost_for.filter(|d| *d < grace) {
                plan.recheck_in(grace - d + Duration::from_millis(500));
            }
            let l = labels(&p.metadata);
            AgentPod {
                ours: l.get(decide::MANAGED_BY_LABEL).map(String::as_str)
                    == Some(decide::MANAGED_BY_VALUE),
                revision: l.get(decide::REVISION_LABEL).cloned(),
                ready: pod_ready(p),
                terminating: p.metadata.deletion_timestamp.is_some(),
                node_lost_for: lost_for,
                lease_holder: holder.as_deref() == Some(name.as_str()),
                name,
            }
        })
        .collect();
    let want = if paused || cn.is_none() {
        0
    } else {
        s.agents_per_pool.min(eligible)
    };
    let agents = decide::plan_agents(&AgentInput {
        pool_ns: pool_ns.clone(),
        pool_name: pool_name.clone(),
        want,
        revision: revision.clone(),
        pods: inputs.clone(),
        lost_grace: grace,
    });
    for name in agents.force_delete {
        plan.writes.push(Write::DeleteAgent {
            name,
            force: true,
            why: "its node is lost: force-deleted to be replaced",
        });
    }
    for name in agents.delete {
        plan.writes.push(Write::DeleteAgent {
            name,
            force: false,
            why: "not wanted (an image roll, fewer nodes or replicas, or paused)",
        });
    }
    for name in agents.delete_go {
        plan.writes.push(Write::DeleteAgent {
            name,
            force: false,
            why: "the Go version's agent: ours is active",
        });
    }
    if let (Some(cn), Some(nad)) = (&cn, w.nad) {
        let nad_ns = nad.metadata.namespace.clone().unwrap_or_default();
        let nad_name = nad.metadata.name.clone().unwrap_or_default();
        for name in &agents.create {
            let pod = agent_pod::agent_pod(&agent_pod::AgentPodSpec {
                name,
                namespace: &s.namespace,
                pool_ns: &pool_ns,
                pool_name: &pool_name,
                image: &image,
                revision: &revision,
                service_account: &s.service_account,
                cluster_network: cn,
                nad: (&nad_ns, &nad_name),
                lease_duration_seconds: s.agent_lease_duration_seconds,
                lost_node_grace_seconds: s.lost_node_grace.as_secs(),
                dry_run: s.no_dhcp,
                on_witness_nodes: s.agents_on_witness_nodes,
            });
            plan.writes.push(Write::CreateAgent(Box::new(pod)));
        }
    }
    let registered = if paused {
        Err(decide::disabled_message("ippool", &pool_ns, &pool_name))
    } else if w.nad.is_none() {
        let (nad_ns, nad_name) = network.split_once('/').unwrap_or_default();
        Err(format!(
            "network-attachment-definitions.k8s.cni.cncf.io \"{nad_name}\" not found (namespace {nad_ns})"
        ))
    } else if cn.is_none() {
        Err(format!(
            "could not find clusternetwork for nad {}",
            w.pool.spec.network_name
        ))
    } else if eligible == 0 {
        Err(format!(
            "no node can run the agents: none is Ready, schedulable and labelled {}{}=true",
            decide::NODE_NETWORK_LABEL_PREFIX,
            cn.as_deref().unwrap_or_default()
        ))
    } else {
        Ok(())
    };
    let active = inputs
        .iter()
        .find(|p| p.ours && p.ready && p.lease_holder && !p.terminating);
    let ready = match (&registered, active) {
        (_, Some(p)) => Ok(PodReference {
            namespace: Some(s.namespace.clone()),
            name: Some(p.name.clone()),
            image: Some(image.clone()),
            uid: w
                .pods
                .iter()
                .find(|x| x.metadata.name.as_deref() == Some(p.name.as_str()))
                .and_then(|x| x.metadata.uid.clone()),
        }),
        (Err(e), None) => Err(e.clone()),
        (Ok(()), None) if inputs.iter().all(|p| !p.ours) && agents.create.is_empty() => Err(
            format!("agent for ippool {pool_ns}/{pool_name} is not deployed"),
        ),
        (Ok(()), None) => Err(match &holder {
            Some(h) => format!("agent pod {h} holds the lease but is not ready"),
            None => format!(
                "no agent of ippool {pool_ns}/{pool_name} is ready and holding lease {}/{} yet",
                s.namespace,
                decide::lease_name(&pool_ns, &pool_name)
            ),
        }),
    };
    AgentOutcome {
        registered,
        ready,
        image,
    }
}

/// Records what `clock` sees of one pool now; returns what has been so for `grace` and
/// asks to look again when the next one comes due.
fn observe_due(
    clock: &mut OrphanClock,
    now: Duration,
    pool: &str,
    seen: &[(Ipv4Addr, MacAddr)],
    grace: Duration,
    plan: &mut Plan,
) -> Vec<(Ipv4Addr, MacAddr)> {
    let due = clock.observe(pool, seen, now, grace);
    if let Some(next) = clock.next_due(now, grace) {
        plan.recheck_in(next + Duration::from_millis(200));
    }
    due
}

/// The sweep of one pool: ownerless allocations a live owner holds are adopted, orphans
/// released after the grace period, half-made allocations deleted after it.
fn plan_sweep(w: &PoolWorld<'_>, s: &Settings, clocks: &mut Clocks<'_>, plan: &mut Plan) {
    let key = pool_ns_name(w.pool);
    let network = network_key(&w.pool.spec.network_name);
    let clock_key = format!("{}/{}", key.0, key.1);
    let mut orphans = Vec::new();
    for (h, _) in &w.holdings {
        let IpAddr::V4(ip) = h.ip else { continue };
        let held = decide::Held {
            ip,
            mac: h.mac,
            owner: h.owner.clone(),
        };
        match decide::ownership(&network, &held, w.live) {
            Ownership::Owned { adopt: Some(owner) } => plan.writes.push(Write::Adopt {
                pool: key.clone(),
                ip: h.ip,
                mac: h.mac,
                owner,
            }),
            Ownership::Owned { adopt: None } => {}
            Ownership::Orphan => orphans.push((ip, h.mac)),
        }
    }
    let grace = s.leak_grace;
    for (ip, mac) in observe_due(
        clocks.orphans,
        clocks.now,
        &clock_key,
        &orphans,
        grace,
        plan,
    ) {
        let held = w
            .holdings
            .iter()
            .find(|(h, _)| h.mac == mac)
            .map(|(h, _)| h.ip);
        plan.writes.push(Write::Release {
            pool: key.clone(),
            network: network.clone(),
            mac,
            held,
            why: "leak swept".into(),
            leak: Some(LeakSwept {
                ip,
                network: network.clone(),
                grace,
                pool_uid: w.pool.metadata.uid.clone(),
            }),
        });
    }

    let named: BTreeMap<MacAddr, IpAddr> = w.claims.iter().map(|(m, (ip, _))| (*m, *ip)).collect();
    let found = store::half_made(w.holdings.iter().map(|(h, _)| h), &named);
    let by_ip: BTreeMap<IpAddr, (MacAddr, Option<String>)> = w
        .holdings
        .iter()
        .map(|(h, v)| (h.ip, (h.mac, v.clone())))
        .collect();
    // The clock's keys: (pool, address, MAC); a claim has no address of its own to key on.
    let marks: Vec<(Ipv4Addr, MacAddr)> = found
        .iter()
        .filter_map(|f| match f {
            HalfMade::Claim { mac } => Some((Ipv4Addr::UNSPECIFIED, *mac)),
            HalfMade::Address { ip } => match (ip, by_ip.get(ip)) {
                (IpAddr::V4(v4), Some((mac, _))) => Some((*v4, *mac)),
                _ => None,
            },
        })
        .collect();
    for (ip, mac) in observe_due(
        clocks.half_made,
        clocks.now,
        &clock_key,
        &marks,
        grace,
        plan,
    ) {
        let (claimed, resource_version) = if ip.is_unspecified() {
            let claim = w.claims.get(&mac);
            (claim.map(|(ip, _)| *ip), claim.and_then(|(_, v)| v.clone()))
        } else {
            (
                w.claims.get(&mac).map(|(ip, _)| *ip),
                by_ip.get(&IpAddr::V4(ip)).and_then(|(_, v)| v.clone()),
            )
        };
        plan.writes.push(Write::SweepHalfMade {
            pool: key.clone(),
            ip,
            mac,
            claimed,
            resource_version,
        });
    }
}

/// A pool's status patch: the projection of its address objects (when due), conditions and
/// the active agent; `None` when nothing changes.
fn status_patch(
    w: &PoolWorld<'_>,
    s: &Settings,
    paused: bool,
    outcome: &AgentOutcome,
    now: &str,
) -> Option<(serde_json::Value, bool)> {
    let (ns, name) = pool_ns_name(w.pool);
    let status = w.pool.status.as_ref();
    let before = status.and_then(|s| s.ipv4.as_ref());
    let mut conditions: Vec<Condition> = status
        .and_then(|s| s.conditions.clone())
        .unwrap_or_default();
    let mut changed = false;
    let mut patch = serde_json::Map::new();
    let mut projected = false;
    if let Ok((listed, Some(ipv4))) = &w.projection
        && !decide::same_ipv4(before, ipv4)
    {
        let patch_ipv4 = if *listed {
            decide::ipv4_merge_patch(before, ipv4)
        } else {
            serde_json::json!({"allocated": null, "owners": null, "staticAddresses": null,
                "used": ipv4.used, "available": ipv4.available})
        };
        patch.insert("ipv4".into(), patch_ipv4);
        patch.insert("lastUpdate".into(), now.into());
        projected = true;
    }
    if let Ok((listed, _)) = &w.projection {
        let message = if *listed {
            String::new()
        } else {
            format!(
                "more than {} allocations: status.ipv4.allocated is left out; list them with kubectl get ipamallocations -n {ns} (or kubectl get ippooladdresses -n {ns} -l {}={name})",
                s.status_max_allocations,
                store::POOL_LABEL
            )
        };
        let reason = if *listed { "" } else { "TooManyToList" };
        changed |= set_condition(
            &mut conditions,
            store::LISTED_CONDITION,
            *listed,
            reason,
            &message,
            now,
        );
    }
    let disabled = decide::disabled_message("ippool", &ns, &name);
    let cache_ok = if paused {
        Err(disabled.clone())
    } else {
        w.projection.as_ref().map(|_| ()).map_err(Clone::clone)
    };
    let ready_ok = if paused {
        Err(disabled)
    } else {
        outcome.ready.as_ref().map(|_| ()).map_err(Clone::clone)
    };
    for (type_, r) in [
        ("Registered", outcome.registered.clone()),
        ("CacheReady", cache_ok),
        ("AgentReady", ready_ok),
    ] {
        changed |= match r {
            Ok(()) => set_condition(&mut conditions, type_, true, "", "", now),
            Err(m) => set_condition(&mut conditions, type_, false, "Error", &m, now),
        };
    }
    changed |= set_condition(&mut conditions, "Stopped", paused, "", "", now);
    if changed {
        patch.insert(
            "conditions".into(),
            serde_json::to_value(&conditions).unwrap_or_default(),
        );
    }
    if !s.no_agent {
        let have = status.and_then(|s| s.agent_pod_ref.clone());
        // Without an active agent the ref keeps only the image (for the hold annotation).
        let value = match &outcome.ready {
            Ok(r) => serde_json::to_value(r).unwrap_or_default(),
            Err(_) if paused => serde_json::Value::Null,
            Err(_) => {
                let image = have
                    .as_ref()
                    .and_then(|r| r.image.clone())
                    .unwrap_or(s.image.clone());
                serde_json::json!({"namespace": null, "name": null, "uid": null, "image": image})
            }
        };
        let have_value = have
            .as_ref()
            .map(|r| serde_json::to_value(r).unwrap_or_default())
            .unwrap_or(serde_json::Value::Null);
        let same_ref = match &outcome.ready {
            Ok(r) => Some(r) == have.as_ref(),
            Err(_) => have.is_none(),
        };
        if !same_ref && value != have_value {
            patch.insert("agentPodRef".into(), value);
        }
    }
    (!patch.is_empty()).then_some((serde_json::Value::Object(patch), projected))
}

/// One pool's reconcile: its finalizer (the Go version's taken over), the migration of a
/// status-held pool into address objects, its NAD's labels, its agents, the sweep and its
/// status; or, when it is being deleted, its agents, Lease, NAD labels and allocations.
pub fn plan_pool(w: &PoolWorld<'_>, s: &Settings, clocks: &mut Clocks<'_>, now: &str) -> Plan {
    let mut plan = Plan::default();
    let key = pool_ns_name(w.pool);
    let network = network_key(&w.pool.spec.network_name);
    let meta = &w.pool.metadata;
    if meta.deletion_timestamp.is_some() {
        if !meta.finalizers.iter().flatten().any(|f| ours(f)) {
            return plan;
        }
        if !s.no_agent {
            for p in &w.pods {
                plan.writes.push(Write::DeleteAgent {
                    name: p.metadata.name.clone().unwrap_or_default(),
                    force: false,
                    why: "its IPPool is deleted",
                });
            }
            plan.writes.push(Write::DeleteAgentLease {
                name: decide::lease_name(&key.0, &key.1),
            });
        }
        if let Some(nad) = w.nad.filter(|n| nad_names_pool(n, &key)) {
            plan.writes.push(Write::NadLabels {
                ns: nad.metadata.namespace.clone().unwrap_or_default(),
                name: nad.metadata.name.clone().unwrap_or_default(),
                pool: None,
            });
        }
        plan.writes
            .push(Write::DeleteAllocations { pool: key.clone() });
        plan.writes
            .extend(finalizers_write(Finalized::IPPool, meta, false));
        return plan;
    }
    plan.writes
        .extend(finalizers_write(Finalized::IPPool, meta, true));
    let ipv4 = w.pool.status.as_ref().and_then(|s| s.ipv4.as_ref());
    if store::needs_migration(meta.annotations.as_ref(), ipv4) {
        // The pool comes back as an event once marked, with its new objects.
        plan.writes.push(Write::Migrate {
            pool: key,
            network,
            holdings: store::holdings_in_status(ipv4),
        });
        return plan;
    }
    let marked = meta
        .annotations
        .as_ref()
        .and_then(|a| a.get(store::STORE_ANNOTATION))
        .is_some_and(|v| v == store::STORE_OBJECTS);
    if !marked {
        plan.writes.push(Write::MarkMigrated { pool: key.clone() });
    }
    if let Some(nad) = w.nad.filter(|n| !nad_names_pool(n, &key)) {
        plan.writes.push(Write::NadLabels {
            ns: nad.metadata.namespace.clone().unwrap_or_default(),
            name: nad.metadata.name.clone().unwrap_or_default(),
            pool: Some(key.clone()),
        });
    }
    let paused = w.pool.spec.paused == Some(true);
    let outcome = if s.no_agent {
        AgentOutcome {
            registered: Ok(()),
            ready: Ok(PodReference::default()),
            image: s.image.clone(),
        }
    } else {
        plan_agents_of(w, s, paused, &mut plan)
    };
    plan_sweep(w, s, clocks, &mut plan);
    if let Some((patch, projected)) = status_patch(w, s, paused, &outcome, now) {
        plan.writes.push(Write::PoolStatus {
            pool: key,
            resource_version: meta.resource_version.clone(),
            patch,
            projected,
        });
    }
    plan
}

/// A NAD with the opt-in annotation gets an IPPool (labelled as created from it); that
/// IPPool goes when the NAD does. `pool` is the IPPool named as the NAD; `network_pool`
/// whether some IPPool already serves its network.
pub fn plan_nad(
    ns: &str,
    name: &str,
    nad: Option<&NetworkAttachmentDefinition>,
    pool: Option<&IPPool>,
    network_pool: bool,
) -> Plan {
    let mut plan = Plan::default();
    let auto = pool.filter(|p| {
        labels(&p.metadata)
            .get(decide::AUTO_POOL_LABEL)
            .map(String::as_str)
            == Some("true")
    });
    let Some(nad) = nad.filter(|n| n.metadata.deletion_timestamp.is_none()) else {
        if auto.is_some_and(|p| p.metadata.deletion_timestamp.is_none()) {
            plan.writes.push(Write::DeletePool {
                ns: ns.into(),
                name: name.into(),
            });
        }
        return plan;
    };
    let Some(text) = nad
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(decide::AUTO_POOL_ANNOTATION))
    else {
        return plan;
    };
    if pool.is_some() || network_pool {
        return plan;
    }
    let settings = serde_json::from_str::<serde_json::Value>(text).and_then(|mut v| {
        let paused = v
            .as_object_mut()
            .and_then(|o| o.remove("paused"))
            .and_then(|p| p.as_bool());
        Ok((serde_json::from_value::<IPv4Config>(v)?, paused))
    });
    let (ipv4, paused) = match settings {
        Ok(s) => s,
        Err(e) => {
            plan.warnings.push(format!(
                "NAD {ns}/{name}: annotation {} is not an IPPool spec.ipv4Config as JSON ({e}); no IPPool created",
                decide::AUTO_POOL_ANNOTATION
            ));
            return plan;
        }
    };
    let mut pool = IPPool::new(
        name,
        IPPoolSpec {
            network_name: format!("{ns}/{name}"),
            paused,
            ipv4_config: Some(ipv4),
        },
    );
    pool.metadata.namespace = Some(ns.to_string());
    pool.metadata.labels = Some(BTreeMap::from([(
        decide::AUTO_POOL_LABEL.to_string(),
        "true".to_string(),
    )]));
    plan.writes.push(Write::CreatePool(Box::new(pool)));
    plan
}

/// What a workload's reconcile asks of the pools, from the caches.
pub trait Pools {
    /// The pool serving a network (not being deleted), if the network is managed.
    fn pool_of(&self, network: &str) -> Option<PoolKey>;
    /// The address a MAC holds in a pool.
    fn held_ip(&self, pool: &PoolKey, mac: MacAddr) -> Option<Ipv4Addr>;
    /// Who may hold an address on a network, leaving out vmnetcfg `skip`.
    fn live(&self, network: &str, skip: Option<(&str, &str)>) -> LiveOwners;
}

/// A VM and its vmnetcfg (same namespace and name), from the caches.
#[derive(Debug, Clone, Copy)]
pub struct WorkloadWorld<'a> {
    pub ns: &'a str,
    pub name: &'a str,
    /// The VM, unless it is gone or being deleted.
    pub vm: Option<&'a VirtualMachine>,
    pub cfg: Option<&'a VirtualMachineNetworkConfig>,
}

/// The (network, MAC, address) entries a vmnetcfg's status and spec mention.
fn all_entries(cfg: &VirtualMachineNetworkConfig) -> BTreeMap<String, Vec<(MacAddr, Ipv4Addr)>> {
    let mut out: BTreeMap<String, Vec<(MacAddr, Ipv4Addr)>> = BTreeMap::new();
    for s in cfg
        .status
        .iter()
        .flat_map(|s| s.network_configs.iter().flatten())
    {
        if let (Some(n), Some(m), Some(ip)) = (
            s.network_name.as_deref(),
            s.mac_address.as_deref().and_then(|m| m.parse().ok()),
            s.allocated_ip_address
                .as_deref()
                .and_then(|i| i.parse().ok()),
        ) {
            out.entry(network_key(n)).or_default().push((m, ip));
        }
    }
    for e in cfg.spec.network_configs.iter().flatten() {
        if let (Ok(m), Some(ip)) = (
            e.mac_address.parse(),
            e.ip_address.as_deref().and_then(|i| i.parse().ok()),
        ) {
            out.entry(network_key(&e.network_name))
                .or_default()
                .push((m, ip));
        }
    }
    out
}

/// The uid of the VM a vmnetcfg follows (its owner reference), if it follows one.
pub fn owned_by_vm(cfg: &VirtualMachineNetworkConfig) -> Option<String> {
    cfg.metadata
        .owner_references
        .iter()
        .flatten()
        .find(|o| o.kind == "VirtualMachine" && o.api_version.starts_with("kubevirt.io/"))
        .map(|o| o.uid.clone())
}

/// Releases of the entries of one network nobody holds any more (a live vmnetcfg entry or VM
/// NIC that still lists one keeps it).
fn plan_releases(
    pools: &dyn Pools,
    network: &str,
    entries: &[(MacAddr, Ipv4Addr)],
    skip: Option<(&str, &str)>,
    why: &str,
    plan: &mut Plan,
) {
    let Some(pool) = pools.pool_of(network) else {
        return; // no pool, nothing to give back
    };
    let live = pools.live(network, skip);
    for (mac, _) in entries {
        if live.get(network, *mac).is_none() {
            plan.writes.push(Write::Release {
                pool: pool.clone(),
                network: network.to_string(),
                mac: *mac,
                held: pools.held_ip(&pool, *mac).map(IpAddr::V4),
                why: why.to_string(),
                leak: None,
            });
        }
    }
}

/// A VM and its vmnetcfg: the vmnetcfg follows the VM (created, updated, deleted; the
/// garbage collector is never relied upon), its finalizer releases what it held, entries
/// dropped from its spec are released, and its status shows what the pools hold for it.
pub fn plan_workload(w: &WorkloadWorld<'_>, pools: &dyn Pools, now: &str) -> Plan {
    let mut plan = Plan::default();
    let (ns, name) = (w.ns, w.name);
    if let Some(cfg) = w.cfg.filter(|c| c.metadata.deletion_timestamp.is_some()) {
        if cfg.metadata.finalizers.iter().flatten().any(|f| ours(f)) {
            for (network, entries) in all_entries(cfg) {
                plan_releases(
                    pools,
                    &network,
                    &entries,
                    Some((ns, name)),
                    &format!("vmnetcfg {ns}/{name} deleted"),
                    &mut plan,
                );
            }
            plan.writes
                .extend(finalizers_write(Finalized::Vmnetcfg, &cfg.metadata, false));
        }
        return plan;
    }
    let held =
        |network: &str, mac: MacAddr| pools.pool_of(network).and_then(|p| pools.held_ip(&p, mac));
    match (w.vm, w.cfg) {
        (Some(vm), cfg) => {
            let existing = cfg
                .and_then(|c| c.spec.network_configs.clone())
                .unwrap_or_default();
            let desired = decide::desired_network_configs(
                vm,
                |n| pools.pool_of(n).is_some(),
                &existing,
                held,
            );
            match cfg {
                None if desired.is_empty() => return plan,
                None => {
                    let mut obj = VirtualMachineNetworkConfig::new(
                        name,
                        VirtualMachineNetworkConfigSpec {
                            vm_name: name.to_string(),
                            network_configs: Some(desired),
                            paused: None,
                        },
                    );
                    obj.metadata.namespace = Some(ns.to_string());
                    obj.metadata.labels = Some(BTreeMap::from([(
                        decide::VM_NAME_LABEL.to_string(),
                        name.to_string(),
                    )]));
                    obj.metadata.finalizers = Some(vec![decide::FINALIZER.to_string()]);
                    obj.metadata.owner_references = Some(vec![OwnerReference {
                        api_version: "kubevirt.io/v1".into(),
                        kind: "VirtualMachine".into(),
                        name: name.into(),
                        uid: vm.metadata.uid.clone().unwrap_or_default(),
                        ..OwnerReference::default()
                    }]);
                    plan.writes.push(Write::CreateVmnetcfg(Box::new(obj)));
                    return plan;
                }
                Some(c) if !decide::same_network_configs(&existing, &desired) => {
                    // Only a vmnetcfg that follows this VM is rewritten (a user's own is not).
                    if owned_by_vm(c).is_none_or(|uid| Some(uid) == vm.metadata.uid) {
                        plan.writes.push(Write::VmnetcfgSpec {
                            ns: ns.into(),
                            name: name.into(),
                            resource_version: c.metadata.resource_version.clone(),
                            configs: desired,
                        });
                    }
                    return plan; // the update comes back as an event
                }
                Some(_) => {}
            }
        }
        (None, Some(c)) => {
            if let Some(vm_uid) = owned_by_vm(c) {
                // The VM is gone: its vmnetcfg goes, by us (once the apiserver agrees).
                plan.writes.push(Write::DeleteVmnetcfg {
                    ns: ns.into(),
                    name: name.into(),
                    uid: c.metadata.uid.clone(),
                    vm_uid,
                });
                return plan;
            }
        }
        (None, None) => return plan,
    }
    let Some(cfg) = w.cfg else {
        return plan;
    };
    plan.writes
        .extend(finalizers_write(Finalized::Vmnetcfg, &cfg.metadata, true));
    let spec = cfg.spec.network_configs.clone().unwrap_or_default();
    let status_entries = cfg
        .status
        .as_ref()
        .and_then(|s| s.network_configs.clone())
        .unwrap_or_default();
    // Entries the spec no longer lists (a NIC removed): give their addresses back.
    let mut stale: BTreeMap<String, Vec<(MacAddr, Ipv4Addr)>> = BTreeMap::new();
    for (network, mac, ip) in decide::stale_entries(&spec, &status_entries) {
        stale.entry(network).or_default().push((mac, ip));
    }
    for (network, entries) in &stale {
        plan_releases(
            pools,
            network,
            entries,
            None,
            &format!("entry removed from vmnetcfg {ns}/{name}"),
            &mut plan,
        );
    }
    if let Some(patch) = vmnetcfg_status_patch(cfg, &spec, pools, now) {
        plan.writes.push(Write::VmnetcfgStatus {
            ns: ns.into(),
            name: name.into(),
            patch,
        });
    }
    plan
}

/// A vmnetcfg's status: one entry per spec entry on a managed network with the address its
/// MAC holds (`Allocated`, else `Pending`), and its conditions; `None` when unchanged.
fn vmnetcfg_status_patch(
    cfg: &VirtualMachineNetworkConfig,
    spec: &[NetworkConfig],
    pools: &dyn Pools,
    now: &str,
) -> Option<serde_json::Value> {
    let ns = cfg.metadata.namespace.as_deref().unwrap_or_default();
    let name = cfg.metadata.name.as_deref().unwrap_or_default();
    let paused = cfg.spec.paused == Some(true);
    let mut entries = Vec::new();
    let mut missing = Vec::new();
    for e in spec {
        let network = network_key(&e.network_name);
        let Some(pool) = pools.pool_of(&network) else {
            continue; // unmanaged network
        };
        let ip = e
            .mac_address
            .parse::<MacAddr>()
            .ok()
            .and_then(|m| pools.held_ip(&pool, m));
        if ip.is_none() {
            missing.push(format!("{} on {network}", e.mac_address));
        }
        entries.push(NetworkConfigStatus {
            allocated_ip_address: ip.map(|i| i.to_string()),
            mac_address: Some(e.mac_address.clone()),
            network_name: Some(e.network_name.clone()),
            state: Some(
                if ip.is_some() && !paused {
                    "Allocated"
                } else {
                    "Pending"
                }
                .into(),
            ),
        });
    }
    let mut conditions = cfg
        .status
        .as_ref()
        .and_then(|s| s.conditions.clone())
        .unwrap_or_default();
    let disabled = decide::disabled_message("vmnetcfg", ns, name);
    let allocated: Result<(), String> = if paused {
        Err(disabled.clone())
    } else if spec.is_empty() {
        Err(format!("no network configs found for vmnetcfg {ns}/{name}"))
    } else if !missing.is_empty() {
        Err(format!(
            "no address is allocated for {} (the webhook allocates at admission; is it registered?)",
            missing.join(", ")
        ))
    } else {
        Ok(())
    };
    let insynced: Result<(), String> = if paused { Err(disabled) } else { Ok(()) };
    for (type_, r) in [("Allocated", allocated), ("InSynced", insynced)] {
        match r {
            Ok(()) => set_condition(&mut conditions, type_, true, "", "", now),
            Err(m) => set_condition(&mut conditions, type_, false, "Error", &m, now),
        };
    }
    set_condition(&mut conditions, "Disabled", paused, "", "", now);
    let have = cfg.status.clone().unwrap_or_default();
    let strip = |c: &[Condition]| -> Vec<(String, String, Option<String>, Option<String>)> {
        c.iter()
            .map(|c| {
                (
                    c.type_.clone(),
                    c.status.clone(),
                    c.reason.clone(),
                    c.message.clone(),
                )
            })
            .collect()
    };
    let same_conditions =
        strip(have.conditions.as_deref().unwrap_or_default()) == strip(&conditions);
    if have.network_configs.clone().unwrap_or_default() == entries && same_conditions {
        return None;
    }
    Some(serde_json::json!({"networkConfigs": entries, "conditions": conditions}))
}

#[cfg(test)]
mod tests;
