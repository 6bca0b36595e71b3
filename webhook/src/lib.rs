//! The admission adapter: decodes AdmissionReviews, asks the core for a decision, makes
//! allocations through the store (`allocator`), and answers. It never panics on a request
//! body: anything it cannot read is answered with an HTTP 400 that says what was wrong, or a
//! denial that names the field.

pub mod allocator;
pub mod config;
pub mod holdings;
pub mod limits;
pub mod metrics;

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use ipnet::Ipv4Net;
use kube::api::Api;
use kube::core::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation};
use kube::runtime::reflector::Store;
use serde::de::DeserializeOwned;
use vm_dhcp_core::admission::{
    ALLOCATIONS_ANNOTATION, NicPlan, PoolContext, ippool_defaults, network_key, nic_allocation,
    plan_vm, plan_vmnetcfg, validate_ippool, validate_ippool_delete,
};
use vm_dhcp_core::alloc::{Allocation, MacChoice};
use vm_dhcp_core::crd::{IPPool, VirtualMachineNetworkConfig};
use vm_dhcp_core::kubevirt::{NetworkAttachmentDefinition, VirtualMachine};
use vm_dhcp_core::store::{STORE_ANNOTATION, STORE_OBJECTS};

pub use allocator::{Allocator, Made, Nic, StoreError};
pub use metrics::Metrics;

/// Paths the webhook configurations point at.
pub const PATH_MUTATE_IPPOOL: &str = "/v1/webhook/mutation/ippools";
pub const PATH_VALIDATE_IPPOOL: &str = "/v1/webhook/validation/ippools";
pub const PATH_MUTATE_VMNETCFG: &str = "/v1/webhook/mutation/virtualmachinenetworkconfigs";
pub const PATH_VALIDATE_VMNETCFG: &str = "/v1/webhook/validation/virtualmachinenetworkconfigs";
pub const PATH_MUTATE_VM: &str = "/v1/webhook/mutation/virtualmachines";

/// What the handlers share.
pub struct Webhook {
    client: Option<kube::Client>,
    pools: Store<IPPool>,
    allocator: Option<Allocator>,
    service_cidr: Option<Ipv4Net>,
    pub metrics: Metrics,
}

impl Webhook {
    /// `allocator` is `None` only for in-process tests of decisions that need no write.
    pub fn new(
        client: Option<kube::Client>,
        pools: Store<IPPool>,
        allocator: Option<Allocator>,
        service_cidr: Option<Ipv4Net>,
        metrics: Metrics,
    ) -> Self {
        Webhook {
            client,
            pools,
            allocator,
            service_cidr,
            metrics,
        }
    }

    /// A pool is created only for an existing VM network (as upstream checks); later
    /// updates are not refused when the network is gone, so a pool can still be paused or
    /// cleaned up.
    async fn check_network_exists(&self, network: &str) -> Result<(), String> {
        let Some(client) = self.client.clone() else {
            return Ok(());
        };
        let (ns, name) = network.rsplit_once('/').unwrap_or(("default", network));
        let nads: Api<NetworkAttachmentDefinition> = Api::namespaced(client, ns);
        match nads.get_opt(name).await {
            Ok(Some(_)) => Ok(()),
            Ok(None) => Err(format!(
                "spec.networkName: VM network {network} does not exist (network-attachment-definitions.k8s.cni.cncf.io \"{name}\" not found)"
            )),
            Err(e) => Err(format!(
                "spec.networkName: cannot read VM network {network}: {e}"
            )),
        }
    }

    /// Does the cache know an IPPool for this network?
    pub fn knows_network(&self, network: &str) -> bool {
        self.pool_for(network).is_some()
    }

    /// The IPPool serving a network (`<namespace>/<name>`), from the cache.
    fn pool_for(&self, network: &str) -> Option<Arc<IPPool>> {
        self.pools.find(|p| {
            network_key(&p.spec.network_name) == network && p.metadata.deletion_timestamp.is_none()
        })
    }

    /// Allocates every plan or none: per pool through the store; what a failed admission
    /// made is deleted again.
    async fn allocate(&self, plans: &[NicPlan], dry_run: bool) -> Result<Vec<Allocation>, String> {
        if plans.is_empty() {
            return Ok(Vec::new());
        }
        let allocator = self
            .allocator
            .as_ref()
            .ok_or("no Kubernetes client: allocation is unavailable")?;
        let mut by_network: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
        for (i, plan) in plans.iter().enumerate() {
            by_network.entry(plan.network.as_str()).or_default().push(i);
        }
        let mut out: Vec<Option<Allocation>> = vec![None; plans.len()];
        let mut made = Vec::new();
        for (network, idx) in by_network {
            let result = match self.pool_for(network) {
                None => Err(format!("network {network} has no IPPool any more")),
                Some(pool) => {
                    let nics: Vec<Nic<'_>> = idx
                        .iter()
                        .map(|&i| Nic {
                            request: &plans[i].request,
                            interface: Some(plans[i].interface.as_str()).filter(|s| !s.is_empty()),
                        })
                        .collect();
                    allocator
                        .allocate(&pool, &nics, dry_run, &mut made)
                        .await
                        .map_err(|e| match e {
                            StoreError::Alloc(a) => format!(
                                "network {network}: {a} (requested for {})",
                                plans[idx[0]].request.owner
                            ),
                            other => other.to_string(),
                        })
                }
            };
            match result {
                Ok(got) => {
                    for (&i, a) in idx.iter().zip(got) {
                        out[i] = Some(a);
                    }
                }
                Err(e) => {
                    allocator.roll_back(made).await;
                    return Err(e);
                }
            }
        }
        Ok(out.into_iter().flatten().collect())
    }
}

/// The webhook's HTTP routes, with the default body limits.
pub fn router(state: Arc<Webhook>) -> Router {
    router_with_limits(state, limits::BodyLimits::default())
}

/// The webhook's HTTP routes: every body is read under `limits` before a handler sees it.
pub fn router_with_limits(state: Arc<Webhook>, limits: limits::BodyLimits) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route(PATH_MUTATE_IPPOOL, post(mutate_ippool))
        .route(PATH_VALIDATE_IPPOOL, post(validate_ippool_route))
        .route(PATH_MUTATE_VMNETCFG, post(mutate_vmnetcfg))
        .route(PATH_VALIDATE_VMNETCFG, post(validate_vmnetcfg))
        .route(PATH_MUTATE_VM, post(mutate_vm))
        .with_state(state)
        // `limit_body` has read the whole body within its own limit already.
        .layer(axum::extract::DefaultBodyLimit::disable())
        .layer(axum::middleware::from_fn_with_state(
            limits,
            limits::limit_body,
        ))
}

/// Reads an AdmissionReview; a body that is not one is the caller's error, never ours.
fn read_review(body: &[u8]) -> Result<AdmissionRequest<DynamicObject>, (StatusCode, String)> {
    let review: AdmissionReview<DynamicObject> = serde_json::from_slice(body).map_err(|e| {
        (
            StatusCode::BAD_REQUEST,
            format!("request body is not an admission.k8s.io/v1 AdmissionReview: {e}"),
        )
    })?;
    review.try_into().map_err(|_| {
        (
            StatusCode::BAD_REQUEST,
            "AdmissionReview has no request".to_string(),
        )
    })
}

fn typed<K: DeserializeOwned>(obj: &DynamicObject, kind: &str) -> Result<K, String> {
    serde_json::to_value(obj)
        .and_then(serde_json::from_value)
        .map_err(|e| format!("object is not a valid {kind}: {e}"))
}

fn operation(op: &Operation) -> &'static str {
    match op {
        Operation::Create => "create",
        Operation::Update => "update",
        Operation::Delete => "delete",
        Operation::Connect => "connect",
    }
}

/// Runs one admission: decodes, decides, records the metric, answers.
async fn admit<F, Fut>(
    state: &Webhook,
    resource: &'static str,
    kind: &'static str,
    body: Bytes,
    decide: F,
) -> Response
where
    F: FnOnce(AdmissionRequest<DynamicObject>) -> Fut,
    Fut: std::future::Future<Output = Result<AdmissionResponse, String>>,
{
    let started = std::time::Instant::now();
    let req = match read_review(&body) {
        Ok(req) => req,
        Err(rejection) => {
            state.metrics.admission(resource, "unknown", "malformed");
            return rejection.into_response();
        }
    };
    let op = operation(&req.operation);
    let what = format!(
        "{kind} {}/{}",
        req.namespace.as_deref().unwrap_or_default(),
        req.name
    );
    let base = AdmissionResponse::from(&req);
    let resp = match decide(req).await {
        Ok(resp) => {
            state.metrics.admission(
                resource,
                op,
                if resp.allowed { "allowed" } else { "denied" },
            );
            resp
        }
        Err(reason) => {
            state.metrics.admission(resource, op, "denied");
            tracing::info!(%what, %reason, "admission denied");
            base.deny(format!("cannot {op} {what} because {reason}"))
        }
    };
    state.metrics.observe_admission(resource, started.elapsed());
    Json(resp.into_review()).into_response()
}

fn with_patch(
    resp: AdmissionResponse,
    ops: Vec<serde_json::Value>,
) -> Result<AdmissionResponse, String> {
    if ops.is_empty() {
        return Ok(resp);
    }
    let patch: json_patch::Patch = serde_json::from_value(serde_json::Value::Array(ops))
        .map_err(|e| format!("building the patch: {e}"))?;
    resp.with_patch(patch)
        .map_err(|e| format!("serializing the patch: {e}"))
}

fn json_pointer_escape(key: &str) -> String {
    key.replace('~', "~0").replace('/', "~1")
}

/// The JSON patch operation that sets one annotation (creating the map when there is none).
fn annotation_op(has_annotations: bool, key: &str, value: &str) -> serde_json::Value {
    if has_annotations {
        serde_json::json!({"op": "add",
            "path": format!("/metadata/annotations/{}", json_pointer_escape(key)),
            "value": value})
    } else {
        serde_json::json!({"op": "add", "path": "/metadata/annotations", "value": {key: value}})
    }
}

async fn mutate_ippool(State(state): State<Arc<Webhook>>, body: Bytes) -> Response {
    admit(&state, "ippools", "IPPool", body, |req| async move {
        let resp = AdmissionResponse::from(&req);
        if req.operation != Operation::Create {
            return Ok(resp);
        }
        let obj = req.object.as_ref().ok_or("the request carries no object")?;
        let raw = serde_json::to_value(obj).map_err(|e| e.to_string())?;
        let ops = ippool_defaults(&raw)?
            .into_iter()
            .map(|d| serde_json::json!({"op": if d.exists { "replace" } else { "add" }, "path": d.path, "value": d.value}))
            .collect::<Vec<_>>();
        // `add` needs the parent objects to exist.
        let mut parents = Vec::new();
        if !ops.is_empty() && raw.pointer("/spec/ipv4Config/pool").is_none() {
            parents.push(serde_json::json!({"op": "add", "path": "/spec/ipv4Config/pool", "value": {}}));
        }
        // A new pool has nothing to migrate: its allocations live in the store from the start.
        let annotations = raw.pointer("/metadata/annotations");
        let marked = annotations.and_then(|a| a.get(STORE_ANNOTATION)).and_then(|v| v.as_str()) == Some(STORE_OBJECTS);
        let mark = (!marked).then(|| annotation_op(annotations.is_some_and(|a| a.is_object()), STORE_ANNOTATION, STORE_OBJECTS));
        with_patch(resp, parents.into_iter().chain(ops).chain(mark).collect())
    })
    .await
}

async fn validate_ippool_route(State(state): State<Arc<Webhook>>, body: Bytes) -> Response {
    let st = state.clone();
    admit(&state, "ippools", "IPPool", body, |req| async move {
        let resp = AdmissionResponse::from(&req);
        match req.operation {
            Operation::Delete => {
                let old = req
                    .old_object
                    .as_ref()
                    .ok_or("the request carries no old object")?;
                let pool = typed::<IPPool>(old, "IPPool")?;
                let holdings = st.allocator.as_ref().map(|a| a.holdings_of(&pool));
                validate_ippool_delete(&pool, holdings.as_deref())?;
                Ok(resp)
            }
            Operation::Create | Operation::Update => {
                let pool: IPPool = typed(
                    req.object.as_ref().ok_or("the request carries no object")?,
                    "IPPool",
                )?;
                if pool.metadata.deletion_timestamp.is_some() {
                    return Ok(resp);
                }
                let old = req
                    .old_object
                    .as_ref()
                    .map(|o| typed::<IPPool>(o, "IPPool"))
                    .transpose()?;
                let ctx = PoolContext {
                    others: st
                        .pools
                        .state()
                        .iter()
                        .map(|p| {
                            let ns = p.metadata.namespace.as_deref().unwrap_or_default();
                            let name = p.metadata.name.as_deref().unwrap_or_default();
                            (format!("{ns}/{name}"), network_key(&p.spec.network_name))
                        })
                        .collect(),
                    service_cidr: st.service_cidr,
                };
                validate_ippool(&pool, old.as_ref(), &ctx)?;
                if req.operation == Operation::Create {
                    st.check_network_exists(&network_key(&pool.spec.network_name))
                        .await?;
                }
                Ok(resp)
            }
            Operation::Connect => Ok(resp),
        }
    })
    .await
}

/// The vmnetcfg of a CREATE or UPDATE and what it asks the pools for (`None` for other
/// operations).
fn vmnetcfg_plans(
    st: &Webhook,
    req: &AdmissionRequest<DynamicObject>,
) -> Result<Option<(VirtualMachineNetworkConfig, Vec<NicPlan>)>, String> {
    if !matches!(req.operation, Operation::Create | Operation::Update) {
        return Ok(None);
    }
    let obj = req.object.as_ref().ok_or("the request carries no object")?;
    let cfg: VirtualMachineNetworkConfig = typed(obj, "VirtualMachineNetworkConfig")?;
    let namespace = req.namespace.clone().unwrap_or_default();
    let plans = plan_vmnetcfg(&cfg, &namespace, |n| st.pool_for(n).is_some())?;
    Ok(Some((cfg, plans)))
}

async fn mutate_vmnetcfg(State(state): State<Arc<Webhook>>, body: Bytes) -> Response {
    let st = state.clone();
    admit(&state, "virtualmachinenetworkconfigs", "VirtualMachineNetworkConfig", body, |req| async move {
        let resp = AdmissionResponse::from(&req);
        let Some((cfg, plans)) = vmnetcfg_plans(&st, &req)? else {
            return Ok(resp);
        };
        if cfg.metadata.deletion_timestamp.is_some() || cfg.spec.paused == Some(true) {
            return Ok(resp);
        }
        let got = st.allocate(&plans, req.dry_run).await?;
        let entries = cfg.spec.network_configs.unwrap_or_default();
        let ops = plans
            .iter()
            .zip(&got)
            .filter(|(p, a)| entries[p.index].ip_address.as_deref() != Some(a.ip.to_string().as_str()))
            .map(|(p, a)| {
                let op = if entries[p.index].ip_address.is_some() { "replace" } else { "add" };
                serde_json::json!({"op": op, "path": format!("/spec/networkConfigs/{}/ipAddress", p.index), "value": a.ip.to_string()})
            })
            .collect();
        with_patch(resp, ops)
    })
    .await
}

async fn validate_vmnetcfg(State(state): State<Arc<Webhook>>, body: Bytes) -> Response {
    let st = state.clone();
    admit(&state, "virtualmachinenetworkconfigs", "VirtualMachineNetworkConfig", body, |req| async move {
        let resp = AdmissionResponse::from(&req);
        let Some((cfg, plans)) = vmnetcfg_plans(&st, &req)? else {
            return Ok(resp);
        };
        // After mutation every managed entry carries the address it holds.
        let active = cfg.spec.paused != Some(true) && cfg.metadata.deletion_timestamp.is_none();
        if let Some(p) = plans.iter().find(|p| active && p.request.want.is_none()) {
            return Err(format!(
                "spec.networkConfigs[{}].ipAddress was not allocated (is the mutating webhook registered?)",
                p.index
            ));
        }
        Ok(resp)
    })
    .await
}

async fn mutate_vm(State(state): State<Arc<Webhook>>, body: Bytes) -> Response {
    let st = state.clone();
    admit(&state, "virtualmachines", "VirtualMachine", body, |req| async move {
        let resp = AdmissionResponse::from(&req);
        if !matches!(req.operation, Operation::Create | Operation::Update) {
            return Ok(resp);
        }
        let obj = req.object.as_ref().ok_or("the request carries no object")?;
        let mut vm: VirtualMachine = typed(obj, "VirtualMachine")?;
        if vm.metadata.namespace.is_none() {
            vm.metadata.namespace = req.namespace.clone();
        }
        if vm.metadata.deletion_timestamp.is_some() {
            return Ok(resp);
        }
        let plans = plan_vm(&vm, |n| st.pool_for(n).is_some())?;
        if let (Operation::Update, Some(old)) = (&req.operation, req.old_object.as_ref()) {
            let mut old_vm: VirtualMachine = typed(old, "VirtualMachine")?;
            old_vm.metadata.namespace = vm.metadata.namespace.clone();
            let old_plans = plan_vm(&old_vm, |n| st.pool_for(n).is_some()).unwrap_or_default();
            let recorded = vm.metadata.annotations.as_ref().is_some_and(|a| a.contains_key(ALLOCATIONS_ANNOTATION));
            if old_plans == plans && recorded {
                return Ok(resp); // no NIC changed: nothing to allocate
            }
        }
        if plans.is_empty() {
            return Ok(resp);
        }
        let got = st.allocate(&plans, req.dry_run).await?;
        let mut ops = Vec::new();
        for (plan, a) in plans.iter().zip(&got) {
            if matches!(plan.request.mac, MacChoice::Generate { .. }) {
                ops.push(serde_json::json!({"op": "add",
                    "path": format!("/spec/template/spec/domain/devices/interfaces/{}/macAddress", plan.index),
                    "value": a.mac.to_string()}));
            }
        }
        let record: Vec<_> = plans.iter().zip(&got).map(|(p, a)| nic_allocation(p, a)).collect();
        let value = serde_json::to_string(&record).map_err(|e| e.to_string())?;
        ops.push(annotation_op(vm.metadata.annotations.is_some(), ALLOCATIONS_ANNOTATION, &value));
        with_patch(resp, ops)
    })
    .await
}

/// Starts the caches (IPPools, MAC claims, and the address objects as per-pool indexes,
/// each a watch over every namespace) and returns the webhook state once all have synced:
/// readiness means the caches are complete.
pub async fn start(
    client: kube::Client,
    service_cidr: Option<Ipv4Net>,
    metrics: Metrics,
) -> Result<Arc<Webhook>, kube::runtime::reflector::store::WriterDropped> {
    use futures::StreamExt as _;
    use kube::runtime::{WatchStreamExt as _, reflector, watcher};
    use vm_dhcp_core::crd::{IPPoolAddress, IPPoolMACClaim};

    /// A cache of every `K` in the cluster, kept by a watch that retries with backoff.
    fn cache<K>(client: &kube::Client) -> Store<K>
    where
        K: kube::Resource<DynamicType = ()>
            + Clone
            + std::fmt::Debug
            + serde::de::DeserializeOwned
            + Send
            + Sync
            + 'static,
    {
        let (store, writer) = reflector::store();
        let stream = reflector(
            writer,
            watcher(Api::<K>::all(client.clone()), watcher::Config::default()),
        )
        .default_backoff()
        .applied_objects();
        let kind = K::kind(&()).to_string();
        tokio::spawn(async move {
            futures::pin_mut!(stream);
            while let Some(event) = stream.next().await {
                if let Err(e) = event {
                    tracing::warn!(error = %e, "{kind} watch failed; retrying");
                }
            }
        });
        store
    }

    let pools: Store<IPPool> = cache(&client);
    let claims: Store<IPPoolMACClaim> = cache(&client);

    let pending: Arc<std::sync::Mutex<std::collections::HashMap<_, _>>> = Arc::default();
    let seen = pending.clone();
    let mut holdings = holdings::watch_holdings(
        Api::<IPPoolAddress>::all(client.clone()),
        watcher::Config::default(),
        move |key, ip| {
            if let Some(std::net::IpAddr::V4(ip)) = ip {
                seen.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&(key.clone(), ip));
            }
        },
    );
    pools.wait_until_ready().await?;
    claims.wait_until_ready().await?;
    holdings.wait_until_synced().await;
    let allocator = Allocator::new(
        client.clone(),
        claims,
        holdings.holdings.clone(),
        pending,
        metrics.clone(),
    );
    Ok(Arc::new(Webhook::new(
        Some(client),
        pools,
        Some(allocator),
        service_cidr,
        metrics,
    )))
}
