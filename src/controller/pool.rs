//! IPPool reconcile: finalizer and takeover of the Go version's, NAD labels, the migration of
//! a status-held pool into address objects, the sweep (leaks, half-made allocations,
//! adoption of ownerless ones), the status (a projection of the address objects: marks,
//! counts, conditions, agentPodRef), and the agent pods. Also the release of allocations.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use futures_util::StreamExt as _;
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, Preconditions};
use kube::runtime::events::{Event, EventType};
use kube::{Resource, ResourceExt};
use vm_dhcp_core::PoolLayout;
use vm_dhcp_core::admission::network_key;
use vm_dhcp_core::controller::{
    self as decide, AgentInput, AgentPod, LiveOwners, Ownership, set_condition,
};
use vm_dhcp_core::crd::{
    Condition, IPPool, IPPoolAddress, IPPoolMACClaim, IPPoolSpec, IPv4Config, PodReference,
};
use vm_dhcp_core::kubevirt::NetworkAttachmentDefinition;
use vm_dhcp_core::mac::MacAddr;
use vm_dhcp_core::store::{self as store, HalfMade, PoolKey};

use super::{Ctx, Key, get, is_conflict, is_not_found, now_text};

use vm_dhcp_core::controller::agent_pod::{NOT_READY_TAINT, UNREACHABLE_TAINT};
const WRITE_ATTEMPTS: usize = 10;
/// Writes in flight while a pool status is migrated into objects.
const MIGRATION_WRITES: usize = 32;
/// The shortest time between two projections of one pool's status.
const PROJECTION_INTERVAL: Duration = Duration::from_millis(500);

fn pool_key(pool: &IPPool) -> String {
    format!(
        "{}/{}",
        pool.namespace().unwrap_or_default(),
        pool.name_any()
    )
}

/// Every vmnetcfg entry and VM NIC on `network` that exists and is not being deleted,
/// leaving out vmnetcfg `skip_cfg`.
pub(super) fn live_owners(ctx: &Ctx, network: &str, skip_cfg: Option<(&str, &str)>) -> LiveOwners {
    ctx.owners().live(network, skip_cfg)
}

/// Writes `status.ipv4` (and whatever `extra` adds to the status) with the resourceVersion
/// guard: on 409 the pool is read again and `next` decides again. Returns the pool written,
/// or `None` when there was nothing to change.
pub(super) async fn write_pool_status<F>(
    ctx: &Ctx,
    ns: &str,
    name: &str,
    start: Option<IPPool>,
    mut next: F,
) -> Result<Option<IPPool>>
where
    F: FnMut(&IPPool) -> Result<Option<serde_json::Value>>,
{
    let api: Api<IPPool> = Api::namespaced(ctx.client.clone(), ns);
    let mut pool = match start {
        Some(p) => p,
        None => api.get(name).await?,
    };
    for _ in 0..WRITE_ATTEMPTS {
        let Some(status_patch) = next(&pool)? else {
            return Ok(None);
        };
        let patch = serde_json::json!({
            "metadata": {"resourceVersion": pool.resource_version()},
            "status": status_patch,
        });
        match api
            .patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(written) => return Ok(Some(written)),
            Err(e) if is_conflict(&e) => pool = api.get(name).await?,
            Err(e) => {
                return Err(e).with_context(|| format!("writing the status of IPPool {ns}/{name}"));
            }
        }
    }
    Err(anyhow!(
        "IPPool {ns}/{name}: {WRITE_ATTEMPTS} write conflicts in a row; will retry"
    ))
}

fn layout_of(pool: &IPPool) -> Result<PoolLayout, String> {
    let cfg = pool
        .spec
        .ipv4_config
        .as_ref()
        .ok_or_else(|| "spec.ipv4Config is missing".to_string())?;
    PoolLayout::from_config(cfg).map_err(|e| e.to_string())
}

/// Releases addresses of one network whose (network, MAC) nobody holds any more. Entries
/// that a live vmnetcfg entry or VM NIC still lists are kept (the owner is still there).
pub(super) async fn release(
    ctx: &Arc<Ctx>,
    network: &str,
    entries: &[(MacAddr, Ipv4Addr)],
    skip_cfg: Option<(&str, &str)>,
    why: &str,
) -> Result<()> {
    let Some(pool) = ctx.pool_for_network(network) else {
        return Ok(()); // no pool, nothing to give back
    };
    let live = live_owners(ctx, network, skip_cfg);
    let key = (pool.namespace().unwrap_or_default(), pool.name_any());
    for (mac, _) in entries {
        if live.get(network, *mac).is_none() {
            release_mac(ctx, &key, network, *mac, why).await?;
        }
    }
    Ok(())
}

fn precondition(resource_version: Option<String>) -> DeleteParams {
    DeleteParams {
        preconditions: Some(Preconditions {
            resource_version,
            uid: None,
        }),
        ..DeleteParams::default()
    }
}

/// Gives back what one MAC holds in a pool: its claim first, then the address object, each
/// only if it is still the version this decision saw. Safe against a re-admission of the MAC
/// (a VM deleted and recreated under its name), which touches the claim before its object
/// is stored: a claim touched within the admission window is left for later, the owners the
/// claim and the address object name are looked up with quorum reads, and a claim touched
/// since it was read fails the delete's precondition. Returns the address released, if any.
///
/// The claim is read from the apiserver, not the cache: the watches lag each other after an
/// outage (each backs off on its own), and a claim the cache has not seen yet is not a claim
/// that is gone. Taken for gone, it skipped the owner's check and the address object of a
/// live VM was deleted, its address then given to another MAC while its claim still named
/// it.
async fn release_mac(
    ctx: &Arc<Ctx>,
    key: &PoolKey,
    network: &str,
    mac: MacAddr,
    why: &str,
) -> Result<Option<IpAddr>> {
    let (ns, pool) = key;
    let claims: Api<IPPoolMACClaim> = Api::namespaced(ctx.client.clone(), ns);
    let addresses: Api<IPPoolAddress> = Api::namespaced(ctx.client.clone(), ns);
    let claim_name = store::claim_object_name(pool, mac);
    let claim = claims
        .get_opt(&claim_name)
        .await
        .with_context(|| format!("reading the claim of MAC {mac} in IPPool {ns}/{pool}"))?;
    let held = {
        let h = ctx.stores.holdings.lock();
        h.of_mac(key, mac).map(|held| {
            (
                held.ip,
                held.owner.clone(),
                h.version(key, held.ip).map(str::to_string),
            )
        })
    };
    let window = Duration::from_secs(ctx.args.admission_window_seconds);
    let gate = decide::release_gate(
        claim.as_ref().map(|c| decide::ClaimSeen {
            admitted_at: c.spec.admitted_at.as_deref(),
            owner: c.spec.owner.as_deref(),
        }),
        held.as_ref().and_then(|(_, owner, _)| owner.as_deref()),
        Timestamp::now(),
        window,
    );
    let owners = match gate {
        decide::ReleaseGate::Wait(wait) => {
            ctx.requeue_after(
                Key::Pool(ns.clone(), pool.clone()),
                wait + Duration::from_millis(200),
            );
            return Ok(None);
        }
        decide::ReleaseGate::Confirm(owners) => owners,
    };
    for owner in owners {
        if owner_holds(ctx, &owner, network, mac).await? {
            return Ok(None);
        }
    }
    if let Some(claim) = &claim {
        match claims
            .delete(&claim_name, &precondition(claim.resource_version()))
            .await
        {
            Ok(_) => {}
            Err(e) if is_not_found(&e) => {}
            Err(e) if is_conflict(&e) => return Ok(None), // admitted again meanwhile
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("releasing MAC {mac} in IPPool {ns}/{pool}"));
            }
        }
    }
    let Some((ip, _, version)) = held else {
        return Ok(None);
    };
    let name = store::address_object_name(pool, ip);
    match addresses.delete(&name, &precondition(version)).await {
        Ok(_) => {
            tracing::info!(pool = %format!("{ns}/{pool}"), %ip, %mac, %why, "address released");
            Ok(Some(ip))
        }
        Err(e) if is_not_found(&e) || is_conflict(&e) => Ok(None),
        Err(e) => Err(e).with_context(|| format!("releasing {ip} in IPPool {ns}/{pool}")),
    }
}

/// Does the owner (`<namespace>/<name>`) still hold the MAC on the network, per a quorum
/// read of its VM and vmnetcfg (the caches may not have seen a VM recreated a moment ago)?
async fn owner_holds(ctx: &Ctx, owner: &str, network: &str, mac: MacAddr) -> Result<bool> {
    let Some((ns, name)) = owner.split_once('/') else {
        return Ok(false);
    };
    let mut live = LiveOwners::default();
    let vms: Api<vm_dhcp_core::kubevirt::VirtualMachine> = Api::namespaced(ctx.client.clone(), ns);
    if let Some(vm) = vms
        .get_opt(name)
        .await
        .with_context(|| format!("reading VM {owner}"))?
        .filter(|v| v.meta().deletion_timestamp.is_none())
    {
        live.add_vm(&vm);
    }
    let cfgs: Api<vm_dhcp_core::crd::VirtualMachineNetworkConfig> =
        Api::namespaced(ctx.client.clone(), ns);
    if let Some(cfg) = cfgs
        .get_opt(name)
        .await
        .with_context(|| format!("reading vmnetcfg {owner}"))?
        .filter(|c| c.meta().deletion_timestamp.is_none())
    {
        for e in cfg.spec.network_configs.iter().flatten() {
            if let Ok(m) = e.mac_address.parse::<MacAddr>() {
                live.insert(&e.network_name, m, owner.to_string());
            }
        }
    }
    Ok(live.get(network, mac).is_some())
}

/// Moves the allocations a pool status holds (the Go version's, or vm-dhcp's before the
/// store) into address objects, idempotently, then marks the pool so admission allocates
/// in it. Returns how many were migrated.
async fn migrate(ctx: &Ctx, pool: &IPPool) -> Result<usize> {
    let ns = pool.namespace().unwrap_or_default();
    let name = pool.name_any();
    let network = network_key(&pool.spec.network_name);
    let ipv4 = pool.status.as_ref().and_then(|s| s.ipv4.as_ref());
    let mut moved = 0;
    if store::needs_migration(pool.meta().annotations.as_ref(), ipv4) {
        let claims: Api<IPPoolMACClaim> = Api::namespaced(ctx.client.clone(), &ns);
        let addresses: Api<IPPoolAddress> = Api::namespaced(ctx.client.clone(), &ns);
        let holdings = store::holdings_in_status(ipv4);
        let created = |r: Result<(), kube::Error>| match r {
            Err(e) if e_already_exists(&e) => Ok(()),
            other => other,
        };
        // Each allocation as the webhook makes it (claim, then address object); many at once.
        let results: Vec<Result<()>> = futures_util::stream::iter(&holdings)
            .map(|h| {
                let (claims, addresses, ns, name, network) =
                    (&claims, &addresses, &ns, &name, &network);
                async move {
                    let claim = store::claim_object(ns, name, network, h, None);
                    created(
                        claims
                            .create(&PostParams::default(), &claim)
                            .await
                            .map(|_| ()),
                    )
                    .with_context(|| format!("migrating {} of IPPool {ns}/{name}", h.ip))?;
                    let obj = store::address_object(ns, name, network, h);
                    created(
                        addresses
                            .create(&PostParams::default(), &obj)
                            .await
                            .map(|_| ()),
                    )
                    .with_context(|| format!("migrating {} of IPPool {ns}/{name}", h.ip))
                }
            })
            .buffer_unordered(MIGRATION_WRITES)
            .collect()
            .await;
        results.into_iter().collect::<Result<()>>()?;
        moved = holdings.len();
    }
    if pool
        .meta()
        .annotations
        .as_ref()
        .and_then(|a| a.get(store::STORE_ANNOTATION))
        .map(String::as_str)
        != Some(store::STORE_OBJECTS)
    {
        let api: Api<IPPool> = Api::namespaced(ctx.client.clone(), &ns);
        let patch = serde_json::json!({"metadata": {"annotations": {
            store::STORE_ANNOTATION: store::STORE_OBJECTS}}});
        api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .with_context(|| format!("marking IPPool {ns}/{name} as migrated"))?;
        if moved > 0 {
            tracing::info!(pool = %format!("{ns}/{name}"), allocations = moved,
                "pool status migrated into IPPoolAddress objects");
        }
    }
    Ok(moved)
}

fn e_already_exists(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409 && s.reason == "AlreadyExists")
}

/// The claims of one pool: MAC → the address each names, with its resourceVersion.
fn claims_of(ctx: &Ctx, key: &PoolKey) -> BTreeMap<MacAddr, (IpAddr, Option<String>)> {
    ctx.stores
        .claims
        .state()
        .iter()
        .filter(|c| c.namespace().as_deref() == Some(key.0.as_str()) && c.spec.ippool == key.1)
        .filter_map(|c| {
            let h = store::holding_of_claim(c).ok()?;
            Some((h.mac, (h.ip, c.resource_version())))
        })
        .collect()
}

/// Records what `clock` sees of one pool now; returns what has been so for `grace`, and
/// schedules the pool again for the next one to come due.
fn observe_due(
    ctx: &Arc<Ctx>,
    clock: &std::sync::Mutex<decide::OrphanClock>,
    key: &PoolKey,
    seen: &[(Ipv4Addr, MacAddr)],
    grace: Duration,
) -> Vec<(Ipv4Addr, MacAddr)> {
    let (ns, name) = key;
    let mut clock = clock.lock().unwrap_or_else(|e| e.into_inner());
    let due = clock.observe(&format!("{ns}/{name}"), seen, ctx.now(), grace);
    if let Some(next) = clock.next_due(ctx.now(), grace) {
        ctx.requeue_after(
            Key::Pool(ns.clone(), name.clone()),
            next + Duration::from_millis(200),
        );
    }
    due
}

/// Deletes the half-made allocations that have been so for the grace period.
async fn sweep_half_made(ctx: &Arc<Ctx>, key: &PoolKey, grace: Duration) -> Result<()> {
    let (ns, name) = key;
    let claims = claims_of(ctx, key);
    let named: BTreeMap<MacAddr, IpAddr> = claims.iter().map(|(m, (ip, _))| (*m, *ip)).collect();
    let (found, versions) = {
        let h = ctx.stores.holdings.lock();
        let found = store::half_made(h.of_pool(key), &named);
        let versions: BTreeMap<IpAddr, (MacAddr, Option<String>)> = h
            .of_pool(key)
            .map(|held| {
                (
                    held.ip,
                    (held.mac, h.version(key, held.ip).map(str::to_string)),
                )
            })
            .collect();
        (found, versions)
    };
    // The clock's keys: (pool, address, MAC); a claim has no address of its own to key on.
    let marks: Vec<(Ipv4Addr, MacAddr)> = found
        .iter()
        .filter_map(|f| match f {
            HalfMade::Claim { mac } => Some((Ipv4Addr::UNSPECIFIED, *mac)),
            HalfMade::Address { ip } => match (ip, versions.get(ip)) {
                (IpAddr::V4(v4), Some((mac, _))) => Some((*v4, *mac)),
                _ => None,
            },
        })
        .collect();
    let pool_key = format!("{ns}/{name}");
    let due = observe_due(ctx, &ctx.half_made, key, &marks, grace);
    for (ip, mac) in due {
        // The claims and the address objects come from two watches that can lag each other
        // by seconds (after an outage each backs off on its own): the other half is read
        // from the apiserver before anything is deleted.
        if other_half_exists(ctx, key, ip, mac, claims.get(&mac).map(|(ip, _)| *ip)).await? {
            continue;
        }
        let deleted = if ip.is_unspecified() {
            let api: Api<IPPoolMACClaim> = Api::namespaced(ctx.client.clone(), ns);
            let version = claims.get(&mac).and_then(|(_, v)| v.clone());
            api.delete(&store::claim_object_name(name, mac), &precondition(version))
                .await
                .map(|_| ())
        } else {
            let api: Api<IPPoolAddress> = Api::namespaced(ctx.client.clone(), ns);
            let version = versions.get(&IpAddr::V4(ip)).and_then(|(_, v)| v.clone());
            api.delete(
                &store::address_object_name(name, IpAddr::V4(ip)),
                &precondition(version),
            )
            .await
            .map(|_| ())
        };
        match deleted {
            Ok(()) => tracing::warn!(pool = %pool_key, %ip, %mac, grace_seconds = grace.as_secs(),
                "half-made allocation swept (an admission stopped between its two writes)"),
            Err(e) if is_not_found(&e) || is_conflict(&e) => {}
            Err(e) => return Err(e).context("sweeping a half-made allocation"),
        }
    }
    Ok(())
}

/// Whether the apiserver holds the other half of what the caches saw half-made: for a claim
/// (`ip` unspecified), the address object it names holding its MAC; for an address object,
/// the claim of its MAC naming it.
async fn other_half_exists(
    ctx: &Ctx,
    (ns, name): &PoolKey,
    ip: Ipv4Addr,
    mac: MacAddr,
    claimed: Option<IpAddr>,
) -> Result<bool> {
    if ip.is_unspecified() {
        let Some(claimed) = claimed else {
            return Ok(false);
        };
        let api: Api<IPPoolAddress> = Api::namespaced(ctx.client.clone(), ns);
        let obj = api
            .get_opt(&store::address_object_name(name, claimed))
            .await
            .context("reading the address object of a claim that looked half-made")?;
        Ok(obj
            .as_ref()
            .and_then(|o| store::holding_of_address(o).ok())
            .is_some_and(|h| h.mac == mac))
    } else {
        let api: Api<IPPoolMACClaim> = Api::namespaced(ctx.client.clone(), ns);
        let obj = api
            .get_opt(&store::claim_object_name(name, mac))
            .await
            .context("reading the claim of an address object that looked half-made")?;
        Ok(obj
            .as_ref()
            .and_then(|o| store::holding_of_claim(o).ok())
            .is_some_and(|h| h.ip == IpAddr::V4(ip)))
    }
}

/// Deletes every address object and claim of a pool that is going away.
async fn delete_store_of(ctx: &Ctx, ns: &str, name: &str) -> Result<()> {
    let selector = format!(
        "{}={}",
        store::POOL_LABEL,
        vm_dhcp_core::controller::shorten(name, 63)
    );
    let lp = ListParams::default().labels(&selector);
    let addresses: Api<IPPoolAddress> = Api::namespaced(ctx.client.clone(), ns);
    addresses
        .delete_collection(&DeleteParams::default(), &lp)
        .await
        .with_context(|| format!("deleting the address objects of IPPool {ns}/{name}"))?;
    let claims: Api<IPPoolMACClaim> = Api::namespaced(ctx.client.clone(), ns);
    claims
        .delete_collection(&DeleteParams::default(), &lp)
        .await
        .with_context(|| format!("deleting the MAC claims of IPPool {ns}/{name}"))?;
    Ok(())
}

/// Records the live owner on allocations that have none (migrated from a status that named
/// none), on the address object and its claim.
async fn adopt(ctx: &Ctx, key: &PoolKey, adopt: &[(IpAddr, MacAddr, String)]) -> Result<()> {
    let (ns, name) = key;
    let addresses: Api<IPPoolAddress> = Api::namespaced(ctx.client.clone(), ns);
    let claims: Api<IPPoolMACClaim> = Api::namespaced(ctx.client.clone(), ns);
    for (ip, mac, owner) in adopt {
        let patch = serde_json::json!({"spec": {"owner": owner}});
        for result in [
            addresses
                .patch(
                    &store::address_object_name(name, *ip),
                    &PatchParams::default(),
                    &Patch::Merge(&patch),
                )
                .await
                .map(|_| ()),
            claims
                .patch(
                    &store::claim_object_name(name, *mac),
                    &PatchParams::default(),
                    &Patch::Merge(&patch),
                )
                .await
                .map(|_| ()),
        ] {
            match result {
                Ok(()) => {}
                Err(e) if is_not_found(&e) => {}
                Err(e) => return Err(e).context("recording an adopted owner"),
            }
        }
        tracing::info!(pool = %format!("{ns}/{name}"), %ip, %mac, %owner, "allocation adopted by its owner");
    }
    Ok(())
}

fn condition_list(pool: &IPPool) -> Vec<Condition> {
    pool.status
        .as_ref()
        .and_then(|s| s.conditions.clone())
        .unwrap_or_default()
}

/// A node's eligibility for agents and, if it is lost, since when.
struct NodeView {
    eligible: bool,
    lost_since: Option<Timestamp>,
}

fn node_view(node: &Node, cn_label: &str, allow_witness: bool) -> NodeView {
    let labels = node.labels();
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
            .or(Some(Timestamp::now())),
        _ => None,
    };
    let blocked = taints.iter().any(|t| {
        matches!(t.effect.as_str(), "NoSchedule" | "NoExecute")
            && !(t.key == NOT_READY_TAINT && is_ready)
    }) || node.spec.as_ref().and_then(|s| s.unschedulable) == Some(true);
    let witness = labels.get(decide::WITNESS_LABEL).map(String::as_str) == Some("true");
    NodeView {
        eligible: labels.get(cn_label).map(String::as_str) == Some("true")
            && is_ready
            && !blocked
            && (allow_witness || !witness),
        lost_since,
    }
}

fn pod_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// The Lease holder's name if the Lease is not expired.
fn lease_holder(ctx: &Ctx, pool_ns: &str, pool_name: &str) -> Option<String> {
    let lease = get(
        &ctx.stores.leases,
        &ctx.args.namespace,
        &decide::lease_name(pool_ns, pool_name),
    )?;
    let spec = lease.spec.as_ref()?;
    let holder = spec.holder_identity.clone().filter(|h| !h.is_empty())?;
    let renewed = spec.renew_time.as_ref()?.0;
    let duration = i64::from(spec.lease_duration_seconds.unwrap_or(15));
    // A second of tolerance for clock skew between the agent's node and ours.
    let expires = renewed + k8s_openapi::jiff::SignedDuration::from_secs(duration + 1);
    (expires > Timestamp::now()).then_some(holder)
}

struct AgentOutcome {
    registered: Result<(), String>,
    ready: Result<PodReference, String>,
    /// When to look again (a lost node's grace period running out).
    recheck: Option<Duration>,
}

fn agent_pod(
    ctx: &Ctx,
    pool: &IPPool,
    name: &str,
    image: &str,
    revision: &str,
    cn: &str,
    nad: (&str, &str),
) -> Pod {
    let pool_ns = pool.namespace().unwrap_or_default();
    let pool_name = pool.name_any();
    decide::agent_pod::agent_pod(&decide::agent_pod::AgentPodSpec {
        name,
        namespace: &ctx.args.namespace,
        pool_ns: &pool_ns,
        pool_name: &pool_name,
        image,
        revision,
        service_account: &ctx.args.service_account_name,
        cluster_network: cn,
        nad,
        lease_duration_seconds: ctx.args.agent_lease_duration_seconds,
        lost_node_grace_seconds: ctx.args.lost_node_grace_seconds,
        dry_run: ctx.args.no_dhcp,
        on_witness_nodes: ctx.args.agents_on_witness_nodes,
    })
}

async fn delete_pod(ctx: &Ctx, name: &str, force: bool) -> Result<()> {
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &ctx.args.namespace);
    let dp = if force {
        DeleteParams {
            grace_period_seconds: Some(0),
            ..DeleteParams::default()
        }
    } else {
        DeleteParams::default()
    };
    match api.delete(name, &dp).await {
        Ok(_) => Ok(()),
        Err(e) if is_not_found(&e) => Ok(()),
        Err(e) => Err(e).with_context(|| format!("deleting agent pod {name}")),
    }
}

fn pods_of(ctx: &Ctx, pool_ns: &str, pool_name: &str) -> Vec<Arc<Pod>> {
    ctx.stores
        .pods
        .state()
        .into_iter()
        .filter(|p| {
            let l = p.labels();
            l.get(decide::POOL_NAMESPACE_LABEL).map(String::as_str) == Some(pool_ns)
                && l.get(decide::POOL_NAME_LABEL).map(String::as_str) == Some(pool_name)
        })
        .collect()
}

/// Brings a pool's agent pods in line and says whether one is active.
async fn agents(
    ctx: &Ctx,
    pool: &IPPool,
    paused: bool,
    nad: Option<&NetworkAttachmentDefinition>,
) -> Result<AgentOutcome> {
    let pool_ns = pool.namespace().unwrap_or_default();
    let pool_name = pool.name_any();
    let image = match (
        pool.annotations()
            .contains_key(decide::HOLD_AGENT_UPGRADE_ANNOTATION),
        pool.status
            .as_ref()
            .and_then(|s| s.agent_pod_ref.as_ref())
            .and_then(|r| r.image.clone()),
    ) {
        (true, Some(held)) => held,
        _ => ctx.args.image.clone(),
    };
    let cn = nad.and_then(|n| decide::cluster_network(n.meta().labels.as_ref(), &n.spec.config));
    let now = Timestamp::now();
    let mut views = BTreeMap::new();
    let mut eligible = 0;
    if let Some(cn) = &cn {
        let label = format!("{}{cn}", decide::NODE_NETWORK_LABEL_PREFIX);
        for node in ctx.stores.nodes.state() {
            let v = node_view(&node, &label, ctx.args.agents_on_witness_nodes);
            eligible += usize::from(v.eligible);
            views.insert(node.name_any(), v);
        }
    }
    let revision = format!(
        "{:06x}",
        decide::stable_hash(&[
            "v1",
            &image,
            &ctx.args.no_dhcp.to_string(),
            &ctx.args.service_account_name,
            cn.as_deref().unwrap_or_default(),
            &network_key(&pool.spec.network_name),
            &ctx.args.agent_lease_duration_seconds.to_string(),
            &ctx.args.agents_on_witness_nodes.to_string(),
        ]) & 0xff_ffff
    );
    let holder = lease_holder(ctx, &pool_ns, &pool_name);
    let pods = pods_of(ctx, &pool_ns, &pool_name);
    let grace = Duration::from_secs(ctx.args.lost_node_grace_seconds);
    let mut recheck = None;
    let inputs: Vec<AgentPod> = pods
        .iter()
        .map(|p| {
            let node = p.spec.as_ref().and_then(|s| s.node_name.clone());
            let lost_for = node
                .and_then(|n| views.get(&n).and_then(|v| v.lost_since))
                .map(|since| {
                    let secs = (now - since).get_seconds().max(0) as u64;
                    Duration::from_secs(secs)
                });
            if let Some(d) = lost_for.filter(|d| *d < grace) {
                recheck = Some(grace - d + Duration::from_millis(500));
            }
            AgentPod {
                name: p.name_any(),
                ours: p.labels().get(decide::MANAGED_BY_LABEL).map(String::as_str)
                    == Some(decide::MANAGED_BY_VALUE),
                revision: p.labels().get(decide::REVISION_LABEL).cloned(),
                ready: pod_ready(p),
                terminating: p.meta().deletion_timestamp.is_some(),
                node_lost_for: lost_for,
                lease_holder: holder.as_deref() == Some(p.name_any().as_str()),
            }
        })
        .collect();
    let want = if paused || cn.is_none() {
        0
    } else {
        ctx.args.agents_per_pool.min(eligible)
    };
    let plan = decide::plan_agents(&AgentInput {
        pool_ns: pool_ns.clone(),
        pool_name: pool_name.clone(),
        want,
        revision: revision.clone(),
        pods: inputs.clone(),
        lost_grace: grace,
    });
    let key = format!("{pool_ns}/{pool_name}");
    for name in &plan.force_delete {
        tracing::warn!(pool = %key, pod = %name, "agent pod on a lost node: force-deleting it to replace it");
        delete_pod(ctx, name, true).await?;
    }
    for name in plan.delete.iter() {
        tracing::info!(pool = %key, pod = %name, "deleting agent pod");
        delete_pod(ctx, name, false).await?;
    }
    for name in &plan.delete_go {
        tracing::info!(pool = %key, pod = %name, "deleting the Go version's agent pod: ours is active");
        delete_pod(ctx, name, false).await?;
    }
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &ctx.args.namespace);
    if let (Some(cn), Some(nad)) = (&cn, nad) {
        let nad_ns = nad.namespace().unwrap_or_default();
        let nad_name = nad.name_any();
        for name in &plan.create {
            let pod = agent_pod(ctx, pool, name, &image, &revision, cn, (&nad_ns, &nad_name));
            match api.create(&PostParams::default(), &pod).await {
                Ok(_) => tracing::info!(pool = %key, pod = %name, %image, "agent pod created"),
                Err(e) if is_conflict(&e) => {} // created before; the cache will show it
                Err(e) => return Err(e).with_context(|| format!("creating agent pod {name}")),
            }
        }
    }
    let registered = if paused {
        Err(decide::disabled_message("ippool", &pool_ns, &pool_name))
    } else if nad.is_none() {
        let (nad_ns, nad_name) = network_key(&pool.spec.network_name)
            .split_once('/')
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .unwrap_or_default();
        Err(format!(
            "network-attachment-definitions.k8s.cni.cncf.io \"{nad_name}\" not found (namespace {nad_ns})"
        ))
    } else if cn.is_none() {
        Err(format!(
            "could not find clusternetwork for nad {}",
            pool.spec.network_name
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
        (_, Some(p)) => {
            let pod = pods.iter().find(|x| x.name_any() == p.name);
            Ok(PodReference {
                namespace: Some(ctx.args.namespace.clone()),
                name: Some(p.name.clone()),
                image: Some(image.clone()),
                uid: pod.and_then(|x| x.uid()),
            })
        }
        (Err(e), None) => Err(e.clone()),
        (Ok(()), None) if inputs.iter().all(|p| !p.ours) && plan.create.is_empty() => Err(format!(
            "agent for ippool {pool_ns}/{pool_name} is not deployed"
        )),
        (Ok(()), None) => Err(match &holder {
            Some(h) => format!("agent pod {h} holds the lease but is not ready"),
            None => format!(
                "no agent of ippool {pool_ns}/{pool_name} is ready and holding lease {}/{} yet",
                ctx.args.namespace,
                decide::lease_name(&pool_ns, &pool_name)
            ),
        }),
    };
    let registered = registered.map(|_| ());
    Ok(AgentOutcome {
        registered,
        ready,
        recheck,
    })
}

/// Takes the Go version's finalizers off and ours on (or ours off when `remove`), guarded.
pub(super) async fn set_finalizers<K>(api: &Api<K>, obj: &K, remove: bool) -> Result<()>
where
    K: Resource<DynamicType = ()>
        + Clone
        + k8s_openapi::serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    let current = obj.finalizers().to_vec();
    let mut next: Vec<String> = current
        .iter()
        .filter(|f| !f.starts_with(decide::GO_FINALIZER_PREFIX) && *f != decide::FINALIZER)
        .cloned()
        .collect();
    if !remove {
        next.push(decide::FINALIZER.to_string());
    }
    if next == current {
        return Ok(());
    }
    let patch = serde_json::json!({"metadata": {
        "resourceVersion": obj.resource_version(), "finalizers": next}});
    match api
        .patch(
            &obj.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await
    {
        Ok(_) => Ok(()),
        Err(e) if is_not_found(&e) => Ok(()),
        Err(e) => Err(e).context("writing finalizers"),
    }
}

/// Removes our labels from the pool's NAD (if they still name this pool).
async fn unlabel_nad(ctx: &Ctx, pool: &IPPool) -> Result<()> {
    let network = network_key(&pool.spec.network_name);
    let Some((nad_ns, nad_name)) = network.split_once('/') else {
        return Ok(());
    };
    let Some(nad) = get(&ctx.stores.nads, nad_ns, nad_name) else {
        return Ok(());
    };
    let l = nad.labels();
    if l.get(decide::POOL_NAMESPACE_LABEL) != pool.namespace().as_ref()
        || l.get(decide::POOL_NAME_LABEL) != Some(&pool.name_any())
    {
        return Ok(());
    }
    let api: Api<NetworkAttachmentDefinition> = Api::namespaced(ctx.client.clone(), nad_ns);
    let patch = serde_json::json!({"metadata": {"labels": {
        decide::POOL_NAMESPACE_LABEL: null, decide::POOL_NAME_LABEL: null}}});
    match api
        .patch(nad_name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        Ok(_) => Ok(()),
        Err(e) if is_not_found(&e) => Ok(()),
        Err(e) => Err(e).with_context(|| format!("removing the IPPool labels of NAD {network}")),
    }
}

pub(super) async fn reconcile(ctx: &Arc<Ctx>, ns: &str, name: &str) -> Result<()> {
    let Some(pool) = get(&ctx.stores.pools, ns, name) else {
        ctx.orphans
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .forget(&format!("{ns}/{name}"));
        return Ok(());
    };
    let api: Api<IPPool> = Api::namespaced(ctx.client.clone(), ns);
    let key = pool_key(&pool);
    if pool.meta().deletion_timestamp.is_some() {
        let finalizers = pool.finalizers();
        if !finalizers
            .iter()
            .any(|f| f == decide::FINALIZER || f.starts_with(decide::GO_FINALIZER_PREFIX))
        {
            return Ok(());
        }
        if !ctx.args.no_agent {
            for p in pods_of(ctx, ns, name) {
                delete_pod(ctx, &p.name_any(), false).await?;
            }
            let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
                Api::namespaced(ctx.client.clone(), &ctx.args.namespace);
            match leases
                .delete(&decide::lease_name(ns, name), &DeleteParams::default())
                .await
            {
                Ok(_) => {}
                Err(e) if is_not_found(&e) => {}
                Err(e) => return Err(e).context("deleting the agents' Lease"),
            }
        }
        unlabel_nad(ctx, &pool).await?;
        delete_store_of(ctx, ns, name).await?;
        set_finalizers(&api, &*pool, true).await?;
        tracing::info!(pool = %key, "IPPool removed: agents, Lease and NAD labels cleaned up");
        return Ok(());
    }
    set_finalizers(&api, &*pool, false).await?;
    if migrate(ctx, &pool).await? > 0 {
        return Ok(()); // the marked pool comes back as an event, with its new objects
    }

    let network = network_key(&pool.spec.network_name);
    let (nad_ns, nad_name) = network.split_once('/').unwrap_or(("", ""));
    let nad = get(&ctx.stores.nads, nad_ns, nad_name);
    if let Some(nad) = &nad {
        let l = nad.labels();
        if l.get(decide::POOL_NAMESPACE_LABEL).map(String::as_str) != Some(ns)
            || l.get(decide::POOL_NAME_LABEL).map(String::as_str) != Some(name)
        {
            let nads: Api<NetworkAttachmentDefinition> =
                Api::namespaced(ctx.client.clone(), nad_ns);
            let patch = serde_json::json!({"metadata": {"labels": {
                decide::POOL_NAMESPACE_LABEL: ns, decide::POOL_NAME_LABEL: name}}});
            nads.patch(nad_name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .with_context(|| format!("labelling NAD {network} with its IPPool"))?;
        }
    }

    let paused = pool.spec.paused == Some(true);
    let outcome = if ctx.args.no_agent {
        AgentOutcome {
            registered: Ok(()),
            ready: Ok(PodReference::default()),
            recheck: None,
        }
    } else {
        agents(ctx, &pool, paused, nad.as_deref()).await?
    };

    // Sweep: orphans (after the grace period) are released; ownerless allocations that a
    // live vmnetcfg entry or VM NIC holds are adopted; half-made ones are deleted.
    let layout = layout_of(&pool);
    let grace = Duration::from_secs(ctx.args.leak_grace_seconds);
    let store_key: PoolKey = (ns.to_string(), name.to_string());
    let (orphans, adoptions) = {
        let live = live_owners(ctx, &network, None);
        let holdings = ctx.stores.holdings.lock();
        let mut orphans = Vec::new();
        let mut adoptions = Vec::new();
        for h in holdings.of_pool(&store_key) {
            let IpAddr::V4(ip) = h.ip else { continue };
            let held = decide::Held {
                ip,
                mac: h.mac,
                owner: h.owner.clone(),
            };
            match decide::ownership(&network, &held, &live) {
                Ownership::Owned { adopt: Some(owner) } => adoptions.push((h.ip, h.mac, owner)),
                Ownership::Owned { adopt: None } => {}
                Ownership::Orphan => orphans.push((ip, h.mac)),
            }
        }
        (orphans, adoptions)
    };
    let due = observe_due(ctx, &ctx.orphans, &store_key, &orphans, grace);
    adopt(ctx, &store_key, &adoptions).await?;
    let mut swept = Vec::new();
    for (ip, mac) in &due {
        if release_mac(ctx, &store_key, &network, *mac, "leak swept")
            .await?
            .is_some()
        {
            swept.push((*ip, *mac));
        }
    }
    sweep_half_made(ctx, &store_key, grace).await?;
    if let Some(after) = outcome.recheck {
        ctx.requeue_after(Key::Pool(ns.into(), name.into()), after);
    }

    // The status projects the address objects, at most once per interval: under a burst of
    // admissions one write carries many of them. Between projections only whether the
    // allocations fit in the status is needed (for its condition), not the projection.
    let project_now = {
        let last = ctx.projected.lock().unwrap_or_else(|e| e.into_inner());
        match last.get(&store_key) {
            Some(at) if at.elapsed() < PROJECTION_INTERVAL => {
                ctx.requeue_after(
                    Key::Pool(ns.into(), name.into()),
                    PROJECTION_INTERVAL - at.elapsed(),
                );
                false
            }
            _ => true,
        }
    };
    let max_listed = ctx.args.status_max_allocations;
    // (the allocations fit in the status, the projected `status.ipv4` if due now)
    let projection: Result<(bool, Option<vm_dhcp_core::crd::IPv4Status>), String> = match &layout {
        Ok(layout) => ctx
            .stores
            .holdings
            .lock()
            .index(&store_key, layout)
            .map(|i| {
                if project_now {
                    let p = i.projection(max_listed);
                    (p.listed, Some(p.ipv4))
                } else {
                    (i.len() <= max_listed, None)
                }
            })
            .map_err(|e| e.to_string()),
        Err(e) => Err(e.clone()),
    };

    let now = now_text();
    let written = write_pool_status(ctx, ns, name, Some((*pool).clone()), |p| {
        let before = p.status.as_ref().and_then(|s| s.ipv4.as_ref());
        let mut conditions = condition_list(p);
        let mut changed = false;
        let mut patch = serde_json::Map::new();
        match &projection {
            Ok((listed, Some(ipv4))) if !decide::same_ipv4(before, ipv4) => {
                let patch_ipv4 = if *listed {
                    decide::ipv4_merge_patch(before, ipv4)
                } else {
                    serde_json::json!({"allocated": null, "owners": null, "staticAddresses": null,
                        "used": ipv4.used, "available": ipv4.available})
                };
                patch.insert("ipv4".into(), patch_ipv4);
                patch.insert("lastUpdate".into(), Timestamp::now().to_string().into());
            }
            _ => {}
        }
        if let Ok((listed, _)) = &projection {
            let listed = *listed;
            let message = if listed {
                String::new()
            } else {
                format!(
                    "more than {} allocations: status.ipv4.allocated is left out; list them with kubectl get ipamallocations -n {ns} (or kubectl get ippooladdresses -n {ns} -l {}={name})",
                    max_listed,
                    store::POOL_LABEL
                )
            };
            let reason = if listed { "" } else { "TooManyToList" };
            changed |= set_condition(
                &mut conditions,
                store::LISTED_CONDITION,
                listed,
                reason,
                &message,
                &now,
            );
        }
        let disabled = decide::disabled_message("ippool", ns, name);
        let cond = |r: &Result<(), String>| match r {
            Ok(()) => (true, String::new(), String::new()),
            Err(m) => (false, "Error".to_string(), m.clone()),
        };
        let cache_ok = if paused {
            Err(disabled.clone())
        } else {
            projection.as_ref().map(|_| ()).map_err(Clone::clone)
        };
        let ready_ok = if paused {
            Err(disabled.clone())
        } else {
            outcome.ready.as_ref().map(|_| ()).map_err(Clone::clone)
        };
        for (type_, r) in [
            ("Registered", outcome.registered.clone()),
            ("CacheReady", cache_ok),
            ("AgentReady", ready_ok),
        ] {
            let (ok, reason, message) = cond(&r);
            changed |= set_condition(&mut conditions, type_, ok, &reason, &message, &now);
        }
        changed |= set_condition(&mut conditions, "Stopped", paused, "", "", &now);
        if changed {
            patch.insert("conditions".into(), serde_json::to_value(&conditions)?);
        }
        let want_ref = match &outcome.ready {
            Ok(r) if !ctx.args.no_agent => Some(r.clone()),
            _ => None,
        };
        let have_ref = p.status.as_ref().and_then(|s| s.agent_pod_ref.clone());
        if want_ref != have_ref && !ctx.args.no_agent {
            // Without an active agent the ref keeps only the image (for the hold annotation).
            let value = match want_ref {
                Some(r) => serde_json::to_value(r)?,
                None if paused => serde_json::Value::Null,
                None => {
                    let image = have_ref.and_then(|r| r.image).unwrap_or(ctx.args.image.clone());
                    serde_json::json!({"namespace": null, "name": null, "uid": null, "image": image})
                }
            };
            let unchanged = value
                == p.status
                    .as_ref()
                    .and_then(|s| s.agent_pod_ref.as_ref())
                    .map(|r| serde_json::to_value(r).unwrap_or_default())
                    .unwrap_or(serde_json::Value::Null);
            if !unchanged {
                patch.insert("agentPodRef".into(), value);
            }
        }
        Ok((!patch.is_empty()).then_some(serde_json::Value::Object(patch)))
    })
    .await?;

    if written.as_ref().is_some_and(|w| {
        w.status.as_ref().and_then(|s| s.ipv4.as_ref())
            != pool.status.as_ref().and_then(|s| s.ipv4.as_ref())
    }) {
        ctx.projected
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(store_key.clone(), std::time::Instant::now());
    }
    {
        for (ip, mac) in &swept {
            tracing::warn!(pool = %key, %ip, %mac, grace_seconds = grace.as_secs(),
                "leak swept: no vmnetcfg entry or VM NIC holds this allocation; released");
            ctx.swept
                .get_or_create(&vec![("ippool".to_string(), key.clone())])
                .inc();
            let event = Event {
                type_: EventType::Warning,
                reason: "LeakSwept".into(),
                note: Some(format!(
                    "released {ip} held by {mac}: no vmnetcfg entry or VM NIC on {network} has had that MAC for {}s",
                    grace.as_secs()
                )),
                action: "Release".into(),
                secondary: None,
            };
            if let Err(e) = ctx.recorder.publish(&event, &pool.object_ref(&())).await {
                tracing::warn!(error = %e, "could not record the LeakSwept Event");
            }
        }
    }
    Ok(())
}

/// NAD-driven IPPool: created only when the NAD carries the opt-in annotation; deleted by us
/// when the NAD goes (it is labelled as ours).
pub(super) async fn reconcile_nad(ctx: &Arc<Ctx>, ns: &str, name: &str) -> Result<()> {
    let pools: Api<IPPool> = Api::namespaced(ctx.client.clone(), ns);
    let nad = get(&ctx.stores.nads, ns, name);
    let auto = get(&ctx.stores.pools, ns, name)
        .filter(|p| p.labels().get(decide::AUTO_POOL_LABEL).map(String::as_str) == Some("true"));
    let live_nad = nad.filter(|n| n.meta().deletion_timestamp.is_none());
    let Some(nad) = live_nad else {
        if let Some(pool) = auto.filter(|p| p.meta().deletion_timestamp.is_none()) {
            tracing::info!(pool = %pool_key(&pool), "deleting the IPPool created with NAD {ns}/{name}: the NAD is gone");
            match pools.delete(name, &DeleteParams::default()).await {
                Ok(_) => {}
                Err(e) if is_not_found(&e) => {}
                Err(e) => return Err(e).context("deleting the NAD's IPPool"),
            }
        }
        return Ok(());
    };
    let Some(text) = nad.annotations().get(decide::AUTO_POOL_ANNOTATION) else {
        return Ok(());
    };
    if get(&ctx.stores.pools, ns, name).is_some()
        || ctx.pool_for_network(&format!("{ns}/{name}")).is_some()
    {
        return Ok(());
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
            tracing::warn!(nad = %format!("{ns}/{name}"), error = %e,
                "annotation {} is not an IPPool spec.ipv4Config as JSON; no IPPool created", decide::AUTO_POOL_ANNOTATION);
            return Ok(());
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
    match pools.create(&PostParams::default(), &pool).await {
        Ok(_) => {
            tracing::info!(nad = %format!("{ns}/{name}"), "IPPool created from the NAD's opt-in annotation");
            Ok(())
        }
        Err(e) if is_conflict(&e) => Ok(()),
        Err(e) => Err(e).with_context(|| {
            format!(
                "creating the IPPool of NAD {ns}/{name} from its {} annotation; fix the annotation",
                decide::AUTO_POOL_ANNOTATION
            )
        }),
    }
}
