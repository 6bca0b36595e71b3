//! Webhook replicas in the test process, for the e2e tests and the webhook benchmark.

use std::sync::Arc;

use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, ValidatingWebhookConfiguration,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use std::time::{Duration, Instant};

use kube::api::{Api, DeleteParams, PostParams};
use std::collections::BTreeMap;

use vm_dhcp_core::crd::{
    IPPool, IPPoolAddress, IPPoolAddressSpec, IPPoolMACClaim, IPPoolMACClaimSpec,
};
use vm_dhcp_core::kubevirt::{NetworkAttachmentDefinition, VirtualMachine};
use vm_dhcp_webhook::config::{Endpoint, webhook_configurations};
use vm_dhcp_webhook::{Metrics, Webhook};

use crate::pki::CertPair;
use crate::{ControlPlane, TestNamespace};

/// One webhook replica: its own runtime (so killing it is abrupt, like a crashed pod), its
/// own IPPool cache and committers, serving on a port shared with the other replicas.
pub struct Replica {
    pub webhook: Arc<Webhook>,
    rt: Option<tokio::runtime::Runtime>,
}

impl Replica {
    pub fn start(cp: &'static ControlPlane, port: u16, cert: CertPair) -> (Replica, u16) {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("replica runtime");
        let (webhook, port) = rt.block_on(async move {
            let client = cp.client().await;
            let webhook = vm_dhcp_webhook::start(client, None, Metrics::unregistered())
                .await
                .expect("IPPool cache synced");
            let listener = crate::tls::reuseport_listener(port).expect("listener");
            let port =
                crate::tls::serve_on(listener, vm_dhcp_webhook::router(webhook.clone()), &cert)
                    .expect("serve");
            (webhook, port)
        });
        (
            Replica {
                webhook,
                rt: Some(rt),
            },
            port,
        )
    }

    /// Stops the replica at once: in-flight requests and commits are cut off.
    pub fn kill(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Starts `n` replicas on one port and registers the webhook configurations for the test's
/// namespace only (other tests share the control plane).
pub async fn webhooks(cp: &'static ControlPlane, ns: &TestNamespace, n: usize) -> Vec<Replica> {
    let cert = cp
        .serving_ca
        .serving("vm-dhcp-webhook", &["127.0.0.1", "localhost"])
        .expect("cert");
    let mut replicas = Vec::new();
    let mut port = 0;
    for _ in 0..n {
        let cert = cert.clone();
        let (replica, p) = tokio::task::spawn_blocking(move || Replica::start(cp, port, cert))
            .await
            .expect("replica start");
        port = p;
        replicas.push(replica);
    }
    register(cp, ns, port).await;
    replicas
}

/// Registers the webhook's configurations for `ns` only, served at 127.0.0.1:`port` with a
/// certificate of the control plane's serving CA.
pub async fn register(cp: &ControlPlane, ns: &TestNamespace, port: u16) {
    use base64::Engine as _;
    let ca = base64::engine::general_purpose::STANDARD.encode(cp.serving_ca.cert_pem());
    let (mut mutating, mut validating) = webhook_configurations(
        &ns.name,
        &Endpoint::Url(format!("https://127.0.0.1:{port}")),
        &ca,
    );
    let selector: LabelSelector = serde_json::from_value(serde_json::json!({
        "matchLabels": {"kubernetes.io/metadata.name": ns.name}
    }))
    .expect("selector");
    for hook in mutating.webhooks.iter_mut().flatten() {
        hook.namespace_selector = Some(selector.clone());
    }
    for hook in validating.webhooks.iter_mut().flatten() {
        hook.namespace_selector = Some(selector.clone());
    }
    Api::<MutatingWebhookConfiguration>::all(ns.client.clone())
        .create(&PostParams::default(), &mutating)
        .await
        .expect("register mutating webhooks");
    Api::<ValidatingWebhookConfiguration>::all(ns.client.clone())
        .create(&PostParams::default(), &validating)
        .await
        .expect("register validating webhooks");
}

pub fn pool(
    ns: &str,
    name: &str,
    cidr: &str,
    start: &str,
    end: &str,
    server: Option<&str>,
) -> IPPool {
    let mut cfg = serde_json::json!({"cidr": cidr, "pool": {"start": start, "end": end}});
    if let Some(server) = server {
        cfg["serverIP"] = server.into();
    }
    serde_json::from_value(serde_json::json!({
        "apiVersion": "network.harvesterhci.io/v1alpha1", "kind": "IPPool",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"networkName": format!("{ns}/{name}"), "ipv4Config": cfg}
    }))
    .expect("IPPool")
}

/// Creates a pool through the webhooks (the mutator fills the serverIP in) and waits until
/// every replica's cache knows it.
pub async fn create_pool(ns: &TestNamespace, replicas: &[Replica], pool: &IPPool) -> IPPool {
    let nad = pool
        .spec
        .network_name
        .rsplit('/')
        .next()
        .unwrap_or_default();
    ensure_network(ns, nad).await;
    let pools: Api<IPPool> = ns.api();
    let created = pools
        .create(&PostParams::default(), pool)
        .await
        .expect("create pool");
    assert!(
        created
            .spec
            .ipv4_config
            .as_ref()
            .is_some_and(|c| !c.server_ip.is_empty()),
        "the mutating webhook set serverIP"
    );
    let network = format!(
        "{}/{}",
        pool.metadata.namespace.as_deref().unwrap_or_default(),
        pool.spec
            .network_name
            .rsplit('/')
            .next()
            .unwrap_or_default()
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !replicas.iter().all(|r| r.webhook.knows_network(&network)) {
        assert!(
            Instant::now() < deadline,
            "the replicas' caches never saw the pool"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    created
}

/// Waits until the webhook configuration is live: a pool without serverIP is only
/// accepted once the mutator runs (the schema requires serverIP).
pub async fn wait_for_webhooks(ns: &TestNamespace) {
    ensure_network(ns, "probe").await;
    let probe = pool(
        &ns.name,
        "probe",
        "10.254.254.0/24",
        "10.254.254.10",
        "10.254.254.20",
        None,
    );
    let pools: Api<IPPool> = ns.api();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match pools.create(&PostParams::default(), &probe).await {
            Ok(_) => break,
            Err(e) => assert!(
                Instant::now() < deadline,
                "webhooks never became active: {e}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    pools
        .delete("probe", &DeleteParams::default())
        .await
        .expect("delete probe pool");
}

pub fn vm(ns: &str, name: &str, network: &str) -> VirtualMachine {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"runStrategy": "Halted", "template": {"spec": {
            "domain": {"devices": {"interfaces": [{"name": "nic-1", "bridge": {}}]}},
            "networks": [{"name": "nic-1", "multus": {"networkName": network}}]}}}
    }))
    .expect("vm")
}

/// Creates the VM network (NAD) `<ns>/<name>` if it does not exist: a pool is only admitted
/// for an existing network.
pub async fn ensure_network(ns: &TestNamespace, name: &str) {
    let nads: Api<NetworkAttachmentDefinition> = ns.api();
    if nads.get_opt(name).await.expect("get NAD").is_some() {
        return;
    }
    let nad: NetworkAttachmentDefinition = serde_json::from_value(serde_json::json!({
        "apiVersion": "k8s.cni.cncf.io/v1", "kind": "NetworkAttachmentDefinition",
        "metadata": {"name": name, "namespace": ns.name,
                     "labels": {"network.harvesterhci.io/clusternetwork": "mgmt"}},
        "spec": {"config": format!("{{\"cniVersion\":\"0.3.1\",\"name\":\"{name}\",\"type\":\"bridge\",\"bridge\":\"mgmt-br\"}}")}
    }))
    .expect("NAD");
    nads.create(&PostParams::default(), &nad)
        .await
        .expect("create NAD");
}

/// A fresh namespace with `n` webhook replicas registered for it, once they answer.
pub async fn setup(
    cp: &'static ControlPlane,
    prefix: &str,
    n: usize,
) -> (TestNamespace, Vec<Replica>) {
    let ns = cp.namespace(prefix).await;
    let replicas = webhooks(cp, &ns, n).await;
    wait_for_webhooks(&ns).await;
    (ns, replicas)
}

/// `vm-dhcp webhook` as a process with self-managed certificates, named `name`, reached by
/// the apiserver through the Service `<ns>/<name>` (ExternalName → localhost); returns once
/// it has registered its configurations.
pub async fn self_managed_binary(
    cp: &ControlPlane,
    ns: &TestNamespace,
    name: &str,
) -> anyhow::Result<crate::proc::Process> {
    use anyhow::bail;
    use k8s_openapi::api::core::v1::Service;
    let port = crate::free_port()?;
    let svc: Service = serde_json::from_value(serde_json::json!({
        "metadata": {"name": name},
        "spec": {"type": "ExternalName", "externalName": "localhost", "ports": [{"port": port}]}
    }))?;
    ns.api::<Service>()
        .create(&PostParams::default(), &svc)
        .await?;
    let mut cmd = std::process::Command::new(crate::bins::vm_dhcp_binary());
    cmd.args([
        "webhook",
        &format!("--kubeconfig={}", cp.kubeconfig_path.display()),
        &format!("--namespace={}", ns.name),
        &format!("--name={name}"),
        &format!("--https-port={port}"),
        &format!("--service-port={port}"),
        "--service-cidr=10.96.0.0/12",
    ]);
    let run = crate::proc::run_dir()?;
    let log = run.join(format!("webhook-{}-{name}.log", ns.name));
    let mut proc = crate::proc::Process::spawn("vm-dhcp-webhook", cmd, &log, &run)?;
    let configs: Api<MutatingWebhookConfiguration> = Api::all(ns.client.clone());
    let deadline = Instant::now() + Duration::from_secs(60);
    while configs.get_opt(name).await?.is_none() {
        if proc.exited().is_some() || Instant::now() > deadline {
            bail!(
                "the webhook never registered its configurations:\n{}",
                proc.log_tail(40)
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(proc)
}

/// The objects of kind `K` labelled for `pool`.
async fn of_pool<K>(ns: &TestNamespace, pool: &str) -> Vec<K>
where
    K: kube::Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    let lp = kube::api::ListParams::default()
        .labels(&format!("{}={pool}", vm_dhcp_core::store::POOL_LABEL));
    ns.api::<K>().list(&lp).await.expect("list the store").items
}

/// The address objects of a pool (the allocation store's truth): address → spec.
pub async fn addresses(ns: &TestNamespace, pool: &str) -> BTreeMap<String, IPPoolAddressSpec> {
    of_pool::<IPPoolAddress>(ns, pool)
        .await
        .into_iter()
        .map(|a| (a.spec.address.clone(), a.spec))
        .collect()
}

/// The MAC claims of a pool: MAC → spec.
pub async fn claims(ns: &TestNamespace, pool: &str) -> BTreeMap<String, IPPoolMACClaimSpec> {
    of_pool::<IPPoolMACClaim>(ns, pool)
        .await
        .into_iter()
        .map(|c| (c.spec.mac_address.clone(), c.spec))
        .collect()
}

/// The floor webhook: the least any synchronous allocator can cost. A mutating webhook for
/// the VMs of `ns` that makes exactly one small object (a ConfigMap) per admission, then
/// allows. Served on the caller's runtime; registered as `floor-<ns>`.
pub async fn floor_webhook(cp: &'static ControlPlane, ns: &TestNamespace) {
    use axum::body::Bytes;
    use k8s_openapi::api::core::v1::ConfigMap;
    use kube::core::DynamicObject;
    use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview};

    let client = cp.client().await;
    let route = move |body: Bytes| {
        let client = client.clone();
        async move {
            let review: AdmissionReview<DynamicObject> = match serde_json::from_slice(&body) {
                Ok(r) => r,
                Err(e) => {
                    return (axum::http::StatusCode::BAD_REQUEST, e.to_string()).into_response();
                }
            };
            let req: AdmissionRequest<DynamicObject> = match review.try_into() {
                Ok(r) => r,
                Err(_) => {
                    return (axum::http::StatusCode::BAD_REQUEST, "no request").into_response();
                }
            };
            let resp = AdmissionResponse::from(&req);
            let ns = req.namespace.clone().unwrap_or_default();
            let cm: ConfigMap = serde_json::from_value(serde_json::json!({
                "metadata": {"name": format!("floor-{}", req.uid)},
                "data": {"vm": req.name}
            }))
            .expect("ConfigMap");
            let resp = match Api::<ConfigMap>::namespaced(client, &ns)
                .create(&PostParams::default(), &cm)
                .await
            {
                Ok(_) => resp,
                Err(e) => resp.deny(e.to_string()),
            };
            axum::Json(resp.into_review()).into_response()
        }
    };
    use axum::response::IntoResponse as _;
    let router = axum::Router::new().route("/mutate", axum::routing::post(route));
    let cert = cp
        .serving_ca
        .serving("floor-webhook", &["127.0.0.1"])
        .expect("cert");
    let port = crate::tls::serve(router, &cert).await.expect("serve floor");
    use base64::Engine as _;
    let ca = base64::engine::general_purpose::STANDARD.encode(cp.serving_ca.cert_pem());
    let config: MutatingWebhookConfiguration = serde_json::from_value(serde_json::json!({
        "metadata": {"name": format!("floor-{}", ns.name)},
        "webhooks": [{
            "name": "floor.vm-dhcp.test",
            "admissionReviewVersions": ["v1"],
            "sideEffects": "NoneOnDryRun",
            "failurePolicy": "Fail",
            "timeoutSeconds": 10,
            "clientConfig": {"url": format!("https://127.0.0.1:{port}/mutate"), "caBundle": ca},
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": ns.name}},
            "rules": [{"apiGroups": ["kubevirt.io"], "apiVersions": ["*"],
                       "operations": ["CREATE"], "resources": ["virtualmachines"]}]
        }]
    }))
    .expect("floor configuration");
    Api::<MutatingWebhookConfiguration>::all(ns.client.clone())
        .create(&PostParams::default(), &config)
        .await
        .expect("register the floor webhook");
}
