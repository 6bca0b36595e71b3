//! Smoke tests that prove the harness: a real kube-apiserver + etcd, our CRDs with their
//! schema and CEL rules, a webhook reached by URL on loopback, and an aggregated API reached
//! through an ExternalName Service.

use std::time::{Duration, Instant};

use axum::Json;
use axum::routing::{get, post};
use k8s_openapi::api::admissionregistration::v1::ValidatingWebhookConfiguration;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::kube_aggregator::pkg::apis::apiregistration::v1::APIService;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::core::{DynamicObject, GroupVersionKind};
use kube::discovery::ApiResource;
use vm_dhcp_core::crd::{IPPool, VirtualMachineNetworkConfig};
use vm_dhcp_e2e::ControlPlane;

fn fixture(name: &str) -> serde_json::Value {
    let path = format!(
        "{}/../core/tests/fixtures/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_yaml::from_str(&text).expect("fixture YAML")
}

/// Every key of `sent` is in `got` with the same value (the server may add fields).
fn assert_contains(got: &serde_json::Value, sent: &serde_json::Value, path: &str) {
    match (sent, got) {
        (serde_json::Value::Object(s), serde_json::Value::Object(g)) => {
            for (k, v) in s {
                let child = format!("{path}.{k}");
                let got_v = g
                    .get(k)
                    .unwrap_or_else(|| panic!("{child} was pruned by the apiserver"));
                assert_contains(got_v, v, &child);
            }
        }
        _ => assert_eq!(got, sent, "{path} changed"),
    }
}

#[tokio::test]
async fn control_plane_starts_and_reports_its_startup_time() {
    let cp = ControlPlane::shared().await;
    cp.check_alive()
        .expect("etcd and kube-apiserver are running");
    eprintln!("control plane started in {:.2} s", cp.startup.as_secs_f64());
    let out = cp.kubectl(&["get", "crd", "-o", "name"]).await;
    let text = String::from_utf8_lossy(&out.stdout);
    for crd in [
        "ippools.network.harvesterhci.io",
        "virtualmachinenetworkconfigs.network.harvesterhci.io",
        "virtualmachines.kubevirt.io",
        "virtualmachineinstances.kubevirt.io",
        "network-attachment-definitions.k8s.cni.cncf.io",
    ] {
        assert!(
            text.contains(crd),
            "{crd} missing from kubectl get crd:\n{text}"
        );
    }
}

#[tokio::test]
async fn seed_samples_are_accepted_and_nothing_is_pruned() {
    let cp = ControlPlane::shared().await;
    let ns = cp.namespace("smoke-seed").await;
    for (file, kind) in [
        ("seed-ippool.yaml", "IPPool"),
        ("seed-vmnetcfg.yaml", "VirtualMachineNetworkConfig"),
    ] {
        let mut obj = fixture(file);
        obj["metadata"]["namespace"] = ns.name.clone().into();
        let gvk = GroupVersionKind::gvk("network.harvesterhci.io", "v1alpha1", kind);
        let plural = if kind == "IPPool" {
            "ippools"
        } else {
            "virtualmachinenetworkconfigs"
        };
        let api: Api<DynamicObject> = Api::namespaced_with(
            ns.client.clone(),
            &ns.name,
            &ApiResource::from_gvk_with_plural(&gvk, plural),
        );
        let dynobj: DynamicObject = serde_json::from_value(obj.clone()).expect("dynamic object");
        let created = api
            .create(&PostParams::default(), &dynobj)
            .await
            .expect("create accepted");
        let name = created.metadata.name.clone().expect("name");
        let back = serde_json::to_value(api.get(&name).await.expect("read back")).expect("json");
        assert_contains(&back["spec"], &obj["spec"], &format!("{kind}.spec"));
    }
    // Typed reads work too.
    let pools: Api<IPPool> = ns.api();
    let pool = pools.get("net-48").await.expect("typed IPPool");
    assert_eq!(pool.spec.network_name, "default/net-48");
    let cfgs: Api<VirtualMachineNetworkConfig> = ns.api();
    let cfg = cfgs.get("test-vm").await.expect("typed vmnetcfg");
    assert_eq!(cfg.spec.network_configs.map(|c| c.len()), Some(1));
}

#[tokio::test]
async fn cel_rule_rejects_a_cidr_change_with_the_upstream_message() {
    let cp = ControlPlane::shared().await;
    let ns = cp.namespace("smoke-cel").await;
    let pools: Api<IPPool> = ns.api();
    let mut pool: IPPool = serde_json::from_value(fixture("seed-ippool.yaml")).expect("IPPool");
    pool.metadata.namespace = Some(ns.name.clone());
    pools
        .create(&PostParams::default(), &pool)
        .await
        .expect("create");
    let patch = serde_json::json!({"spec": {"ipv4Config": {"cidr": "192.168.49.0/24"}}});
    let err = pools
        .patch("net-48", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect_err("CIDR change must be rejected");
    assert!(err.to_string().contains("CIDR is immutable"), "{err}");
    // A malformed exclude entry is refused by the schema (the upstream schema let it through).
    let mut bad: IPPool = serde_json::from_value(fixture("seed-ippool.yaml")).expect("IPPool");
    bad.metadata.name = Some("bad-exclude".into());
    bad.metadata.namespace = Some(ns.name.clone());
    if let Some(cfg) = bad.spec.ipv4_config.as_mut() {
        cfg.pool.exclude = Some(vec!["not-an-ip".into()]);
    }
    let err = pools
        .create(&PostParams::default(), &bad)
        .await
        .expect_err("bad exclude");
    assert!(err.to_string().contains("exclude"), "{err}");
}

#[tokio::test]
async fn validating_webhook_on_loopback_is_called_and_can_deny() {
    let cp = ControlPlane::shared().await;
    let ns = cp.namespace("smoke-webhook").await;
    let cert = cp
        .serving_ca
        .serving("webhook", &["127.0.0.1", "localhost"])
        .expect("cert");
    let router = axum::Router::new().route(
        "/deny",
        post(|Json(review): Json<serde_json::Value>| async move {
            let uid = review["request"]["uid"].clone();
            Json(serde_json::json!({
                "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
                "response": {"uid": uid, "allowed": false,
                             "status": {"code": 403, "message": "denied by the e2e smoke webhook"}}
            }))
        }),
    );
    let port = vm_dhcp_e2e::tls::serve(router, &cert)
        .await
        .expect("serve webhook");
    let name = format!("{}-deny", ns.name);
    let ca = base64_encode(&cp.serving_ca.cert_pem());
    let config: ValidatingWebhookConfiguration = serde_json::from_value(serde_json::json!({
        "metadata": {"name": name},
        "webhooks": [{
            "name": "deny.e2e.vm-dhcp.io",
            "clientConfig": {"url": format!("https://127.0.0.1:{port}/deny"), "caBundle": ca},
            "rules": [{"apiGroups": ["network.harvesterhci.io"], "apiVersions": ["v1alpha1"],
                       "operations": ["CREATE"], "resources": ["ippools"]}],
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": ns.name}},
            "sideEffects": "None", "admissionReviewVersions": ["v1"], "failurePolicy": "Fail",
            "timeoutSeconds": 5
        }]
    }))
    .expect("webhook configuration");
    let configs: Api<ValidatingWebhookConfiguration> = Api::all(ns.client.clone());
    configs
        .create(&PostParams::default(), &config)
        .await
        .expect("register webhook");
    let pools: Api<IPPool> = ns.api();
    let mut pool: IPPool = serde_json::from_value(fixture("seed-ippool.yaml")).expect("IPPool");
    pool.metadata.namespace = Some(ns.name.clone());
    // The configuration takes effect asynchronously: retry until our webhook answers.
    let deadline = Instant::now() + Duration::from_secs(20);
    let err = loop {
        match pools.create(&PostParams::default(), &pool).await {
            Err(e) => break e,
            Ok(_) => {
                pools
                    .delete("net-48", &DeleteParams::default())
                    .await
                    .expect("cleanup");
                assert!(Instant::now() < deadline, "the webhook was never called");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    assert!(
        err.to_string().contains("denied by the e2e smoke webhook"),
        "{err}"
    );
    configs
        .delete(&name, &DeleteParams::default())
        .await
        .expect("unregister");
}

fn base64_encode(text: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(text)
}

#[tokio::test]
async fn aggregated_api_through_externalname_service_reaches_the_test_server() {
    let cp = ControlPlane::shared().await;
    let ns = cp.namespace("smoke-aggr").await;
    let group = "smoke.e2e.vm-dhcp.io";
    let svc_host = format!("smoke-api.{}.svc", ns.name);
    let cert = cp
        .serving_ca
        .serving("smoke-api", &["localhost", "127.0.0.1", &svc_host])
        .expect("cert");
    let list = serde_json::json!({
        "kind": "APIResourceList", "apiVersion": "v1", "groupVersion": format!("{group}/v1"),
        "resources": [{"name": "widgets", "singularName": "widget", "namespaced": true,
                       "kind": "Widget", "verbs": ["get", "list"]}]
    });
    let router = axum::Router::new().route(
        &format!("/apis/{group}/v1"),
        get(move || async move { Json(list.clone()) }),
    );
    let port = vm_dhcp_e2e::tls::serve(router, &cert).await.expect("serve");
    let svc: Service = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "smoke-api"},
        "spec": {"type": "ExternalName", "externalName": "localhost", "ports": [{"port": port}]}
    }))
    .expect("service");
    ns.api::<Service>()
        .create(&PostParams::default(), &svc)
        .await
        .expect("create service");
    let apisvc: APIService = serde_json::from_value(serde_json::json!({
        "metadata": {"name": format!("v1.{group}")},
        "spec": {"group": group, "version": "v1", "groupPriorityMinimum": 1000, "versionPriority": 15,
                 "service": {"namespace": ns.name, "name": "smoke-api", "port": port},
                 "caBundle": base64_encode(&cp.serving_ca.cert_pem())}
    }))
    .expect("APIService");
    let apisvcs: Api<APIService> = Api::all(ns.client.clone());
    apisvcs
        .patch(
            &format!("v1.{group}"),
            &PatchParams::apply("e2e").force(),
            &Patch::Apply(&apisvc),
        )
        .await
        .expect("register APIService");
    let deadline = Instant::now() + Duration::from_secs(30);
    let raw = format!("/apis/{group}/v1");
    loop {
        let out = cp.kubectl(&["get", "--raw", &raw]).await;
        if out.status.success() {
            let doc: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
            assert_eq!(doc["groupVersion"], format!("{group}/v1"));
            assert_eq!(doc["resources"][0]["name"], "widgets");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "aggregated API never answered: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(
                &cp.kubectl(&["get", "apiservice", &format!("v1.{group}"), "-o", "yaml"])
                    .await
                    .stdout
            )
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    apisvcs
        .delete(&format!("v1.{group}"), &DeleteParams::default())
        .await
        .expect("unregister");
}
