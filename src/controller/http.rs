//! HTTP: `/healthz`, `/readyz` (the caches are complete and, on the leader, reconciles get
//! through), `/metrics` (computed from the
//! caches at each scrape, so every replica serves the same figures and a series goes with
//! its object), and with `--enable-cache-dump-api` the seed README's `/ipams/<network>` and
//! `/caches/<network>` views.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use kube::ResourceExt;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use vm_dhcp_core::admission::network_key;
use vm_dhcp_core::crd::IPPool;
use vm_dhcp_core::{AddrState, Ipam, PoolLayout};

use super::Ctx;

type Labels = Vec<(String, String)>;

pub(super) fn router(ctx: Arc<Ctx>) -> Router {
    let mut r = Router::new()
        .route(
            "/healthz",
            get(|| async { axum::Json(serde_json::json!({"ok": true})) }),
        )
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics));
    if ctx.args.enable_cache_dump_api {
        r = r
            .route("/ipams/{*network}", get(ipams))
            .route("/caches/{*network}", get(caches));
    }
    r.with_state(ctx)
}

async fn readyz(State(ctx): State<Arc<Ctx>>) -> Response {
    if !ctx.ready.load(Ordering::SeqCst) {
        return (StatusCode::SERVICE_UNAVAILABLE, "caches not synced yet\n").into_response();
    }
    let after = std::time::Duration::from_secs(ctx.args.unready_after_seconds.max(1));
    if ctx.leading.load(Ordering::SeqCst)
        && let Some(why) = ctx.health.stuck(after)
    {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("leading, but writes do not go through: {why}\n"),
        )
            .into_response();
    }
    axum::Json(serde_json::json!({
        "ok": true,
        "leading": ctx.leading.load(Ordering::SeqCst),
    }))
    .into_response()
}

pub(super) fn render(ctx: &Ctx) -> Result<String, std::fmt::Error> {
    let mut registry = Registry::default();
    let used = Family::<Labels, Gauge>::default();
    let available = Family::<Labels, Gauge>::default();
    let status = Family::<Labels, Gauge>::default();
    registry.register(
        "vmdhcpcontroller_ippool_used",
        "Addresses allocated in the IPPool",
        used.clone(),
    );
    registry.register(
        "vmdhcpcontroller_ippool_available",
        "Addresses still free in the IPPool",
        available.clone(),
    );
    registry.register(
        "vmdhcpcontroller_vmnetcfg_status",
        "One series per NIC address of a VirtualMachineNetworkConfig (value 1)",
        status.clone(),
    );
    registry.register(
        "vmdhcpcontroller_leaks_swept",
        "Allocations released because no vmnetcfg entry or VM NIC held them after the grace period",
        ctx.writer.swept.clone(),
    );
    registry.register(
        "vmdhcpcontroller_reconciles",
        "Reconciles run by this replica, by kind of object (pool, workload: a VM and its vmnetcfg, nad)",
        ctx.reconciles.clone(),
    );
    registry.register(
        "vmdhcpcontroller_reconcile_failures",
        "Reconciles that failed, by kind (each is recomputed after a backoff, never replayed)",
        ctx.reconcile_failures.clone(),
    );
    registry.register(
        "vmdhcpcontroller_reconcile_seconds",
        "Time one reconcile took (reads, decisions, writes), by kind",
        ctx.reconcile_seconds.clone(),
    );
    registry.register(
        "vmdhcpcontroller_writes",
        "Writes the leader applied, by kind and outcome (done; wait: an admission in flight; recompute: the object changed or the Lease was lost, so it is planned again; failed)",
        ctx.writer.writes.clone(),
    );
    registry.register(
        "vmdhcpcontroller_write_seconds",
        "Time one write took, with the reads that confirm it and its retries, by kind",
        ctx.writer.seconds.clone(),
    );
    registry.register(
        "vmdhcpcontroller_write_queue_depth",
        "Writes waiting for one of the writer's slots or in flight",
        ctx.writer.depth(),
    );
    let depth = Gauge::<i64>::default();
    depth.set(i64::try_from(ctx.queue.len()).unwrap_or(i64::MAX));
    registry.register(
        "vmdhcpcontroller_queue_depth",
        "Objects waiting for a reconcile",
        depth,
    );
    for pool in ctx.stores.pools.state() {
        let Some(ipv4) = pool.status.as_ref().and_then(|s| s.ipv4.as_ref()) else {
            continue;
        };
        let labels = vec![
            (
                "ippool".to_string(),
                format!(
                    "{}/{}",
                    pool.namespace().unwrap_or_default(),
                    pool.name_any()
                ),
            ),
            (
                "cidr".to_string(),
                pool.spec
                    .ipv4_config
                    .as_ref()
                    .map(|c| c.cidr.clone())
                    .unwrap_or_default(),
            ),
            ("network".to_string(), network_key(&pool.spec.network_name)),
        ];
        used.get_or_create(&labels).set(ipv4.used);
        available.get_or_create(&labels).set(ipv4.available);
    }
    for cfg in ctx.stores.cfgs.state() {
        let key = format!("{}/{}", cfg.namespace().unwrap_or_default(), cfg.name_any());
        for e in cfg
            .status
            .iter()
            .flat_map(|s| s.network_configs.iter().flatten())
        {
            let labels = vec![
                ("vmnetcfg".to_string(), key.clone()),
                (
                    "network".to_string(),
                    e.network_name.clone().unwrap_or_default(),
                ),
                ("mac".to_string(), e.mac_address.clone().unwrap_or_default()),
                (
                    "ip".to_string(),
                    e.allocated_ip_address.clone().unwrap_or_default(),
                ),
                ("state".to_string(), e.state.clone().unwrap_or_default()),
            ];
            status.get_or_create(&labels).set(1);
        }
    }
    crate::metrics_http::encode(&registry)
}

async fn metrics(State(ctx): State<Arc<Ctx>>) -> Response {
    crate::metrics_http::response(render(&ctx))
}

/// The pool of `<ns>/<name>`: a network name first (upstream's key), else a pool name.
fn find_pool(ctx: &Ctx, path: &str) -> Option<Arc<IPPool>> {
    ctx.pool_for_network(path).or_else(|| {
        let (ns, name) = path.split_once('/')?;
        super::get(&ctx.stores.pools, ns, name)
    })
}

fn pool_ipam(ctx: &Ctx, path: &str) -> Result<(Arc<IPPool>, Ipam), (StatusCode, String)> {
    let pool = find_pool(ctx, path).ok_or_else(|| {
        (
            StatusCode::NOT_FOUND,
            format!("failed to list ipam of {path}: network {path} does not exist\n"),
        )
    })?;
    let fail = |e: String| {
        (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("failed to list ipam of {path}: {e}\n"),
        )
    };
    let cfg = pool
        .spec
        .ipv4_config
        .as_ref()
        .ok_or_else(|| fail("spec.ipv4Config is missing".into()))?;
    let layout = PoolLayout::from_config(cfg).map_err(|e| fail(e.to_string()))?;
    let key = (pool.namespace().unwrap_or_default(), pool.name_any());
    let ipam = ctx
        .stores
        .holdings
        .lock()
        .index(&key, &layout)
        .map(|i| i.ipam().clone())
        .map_err(|e| fail(e.to_string()))?;
    Ok((pool, ipam))
}

/// `{"<ip>": "true"|"false"}` for every address that can be handed out.
async fn ipams(State(ctx): State<Arc<Ctx>>, Path(network): Path<String>) -> Response {
    let (_, ipam) = match pool_ipam(&ctx, &network) {
        Ok(x) => x,
        Err(r) => return r.into_response(),
    };
    let layout = ipam.layout().clone();
    let out: BTreeMap<String, &str> = (u32::from(layout.start)..=u32::from(layout.end))
        .map(Ipv4Addr::from)
        .filter_map(|ip| match ipam.state(ip) {
            AddrState::Free => Some((ip.to_string(), "false")),
            AddrState::Allocated => Some((ip.to_string(), "true")),
            _ => None,
        })
        .collect();
    axum::Json(out).into_response()
}

/// `{"<mac>": "<ip>"}` of the pool.
async fn caches(State(ctx): State<Arc<Ctx>>, Path(network): Path<String>) -> Response {
    let Some(pool) = find_pool(&ctx, &network) else {
        return (
            StatusCode::NOT_FOUND,
            format!("failed to list cache of {network}: network {network} does not exist\n"),
        )
            .into_response();
    };
    let key = (pool.namespace().unwrap_or_default(), pool.name_any());
    let out: BTreeMap<String, String> = ctx
        .stores
        .holdings
        .lock()
        .of_pool(&key)
        .map(|h| (h.mac.to_string(), h.ip.to_string()))
        .collect();
    axum::Json(out).into_response()
}
