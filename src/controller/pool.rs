//! IPPool and NAD reconciles: what the caches hold of one pool (its NAD, the nodes, its
//! agent pods and Lease, its address objects and claims, the owners on its network) goes to
//! `vm_dhcp_core::controller::plan`, and the writes it plans to the writer.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use vm_dhcp_core::PoolLayout;
use vm_dhcp_core::admission::network_key;
use vm_dhcp_core::controller::plan::{self, Clocks, PoolWorld};
use vm_dhcp_core::controller::{self as decide};
use vm_dhcp_core::crd::IPPool;
use vm_dhcp_core::mac::MacAddr;
use vm_dhcp_core::store::{self as store, PoolKey};

use super::{Ctx, Key, get, now_text};

/// The shortest time between two projections of one pool's status.
const PROJECTION_INTERVAL: Duration = Duration::from_millis(500);

fn layout_of(pool: &IPPool) -> Result<PoolLayout, String> {
    let cfg = pool
        .spec
        .ipv4_config
        .as_ref()
        .ok_or_else(|| "spec.ipv4Config is missing".to_string())?;
    PoolLayout::from_config(cfg).map_err(|e| e.to_string())
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

pub(super) async fn reconcile(ctx: &Arc<Ctx>, ns: &str, name: &str) -> Result<()> {
    let Some(pool) = get(&ctx.stores.pools, ns, name) else {
        ctx.orphans
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .forget(&format!("{ns}/{name}"));
        return Ok(());
    };
    let key: PoolKey = (ns.to_string(), name.to_string());
    let network = network_key(&pool.spec.network_name);
    let (nad_ns, nad_name) = network.split_once('/').unwrap_or(("", ""));
    let nad = get(&ctx.stores.nads, nad_ns, nad_name);
    let nodes = ctx.stores.nodes.state();
    let pods = pods_of(ctx, ns, name);
    let lease = get(
        &ctx.stores.leases,
        &ctx.args.namespace,
        &decide::lease_name(ns, name),
    );

    // The status projects the address objects, at most once per interval: under a burst of
    // admissions one write carries many of them. Between projections only whether the
    // allocations fit in the status is needed (for its condition), not the projection.
    let project_now = {
        let last = ctx.projected.lock().unwrap_or_else(|e| e.into_inner());
        match last.get(&key) {
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
    let (holdings, projection) = {
        let mut h = ctx.stores.holdings.lock();
        let holdings: Vec<_> = h
            .of_pool(&key)
            .map(|held| (held.clone(), h.version(&key, held.ip).map(str::to_string)))
            .collect();
        let projection = match layout_of(&pool) {
            Ok(layout) => h
                .index(&key, &layout)
                .map(|i| {
                    if project_now {
                        let p = i.projection(max_listed);
                        (p.listed, Some(p.ipv4))
                    } else {
                        (i.len() <= max_listed, None)
                    }
                })
                .map_err(|e| e.to_string()),
            Err(e) => Err(e),
        };
        (holdings, projection)
    };
    let live = ctx.owners().live(&network, None);
    let world = PoolWorld {
        pool: &pool,
        nad: nad.as_deref(),
        nodes: nodes.iter().map(|n| &**n).collect(),
        pods: pods.iter().map(|p| &**p).collect(),
        lease: lease.as_deref(),
        holdings,
        claims: claims_of(ctx, &key),
        live: &live,
        projection,
        now: k8s_openapi::jiff::Timestamp::now(),
    };
    let planned = {
        let mut orphans = ctx.orphans.lock().unwrap_or_else(|e| e.into_inner());
        let mut half_made = ctx.half_made.lock().unwrap_or_else(|e| e.into_inner());
        let mut clocks = Clocks {
            orphans: &mut orphans,
            half_made: &mut half_made,
            now: ctx.now(),
        };
        plan::plan_pool(&world, &ctx.settings, &mut clocks, &now_text())
    };
    ctx.apply(Key::Pool(ns.into(), name.into()), planned).await
}

/// NAD-driven IPPool: created only when the NAD carries the opt-in annotation; deleted by us
/// when the NAD goes (it is labelled as ours).
pub(super) async fn reconcile_nad(ctx: &Arc<Ctx>, ns: &str, name: &str) -> Result<()> {
    let nad = get(&ctx.stores.nads, ns, name);
    let pool = get(&ctx.stores.pools, ns, name);
    let network_pool = ctx.pool_for_network(&format!("{ns}/{name}")).is_some();
    let planned = plan::plan_nad(ns, name, nad.as_deref(), pool.as_deref(), network_pool);
    ctx.apply(Key::Nad(ns.into(), name.into()), planned).await
}
