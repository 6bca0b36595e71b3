//! Webhook replicas in the test process, for the e2e tests and the webhook benchmark.

use std::sync::Arc;

use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, ValidatingWebhookConfiguration,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::api::{Api, PostParams};
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
    for hook in &mut mutating.webhooks.iter_mut().flatten().collect::<Vec<_>>() {
        hook.namespace_selector = Some(selector.clone());
    }
    for hook in &mut validating.webhooks.iter_mut().flatten().collect::<Vec<_>>() {
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
    replicas
}
