//! The router, in-process, with recorded AdmissionReview JSON: every decision that needs no
//! commit (commits are proven against a real apiserver in e2e/).

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use kube::runtime::{reflector, watcher};
use tower::ServiceExt;
use vm_dhcp_core::crd::IPPool;
use vm_dhcp_webhook::{Metrics, Webhook, router};

const CREATE: &str = include_str!("fixtures/ippool-create.json");

fn state(pools: Vec<IPPool>) -> Arc<Webhook> {
    let (store, mut writer) = reflector::store();
    for p in pools {
        writer.apply_watcher_event(&watcher::Event::Apply(p));
    }
    Arc::new(Webhook::new(
        None,
        store,
        None,
        Some("10.53.0.0/16".parse().expect("cidr")),
        Metrics::unregistered(),
    ))
}

async fn post(st: Arc<Webhook>, path: &str, body: String) -> (StatusCode, Vec<u8>) {
    let resp = router(st)
        .oneshot(
            Request::post(path)
                .header("content-type", "application/json")
                .body(Body::from(body))
                .expect("request"),
        )
        .await
        .expect("router answers");
    let status = resp.status();
    let bytes = resp.into_body().collect().await.expect("body").to_bytes();
    (status, bytes.to_vec())
}

async fn review(st: Arc<Webhook>, path: &str, body: String) -> serde_json::Value {
    let (status, bytes) = post(st, path, body).await;
    assert_eq!(
        status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&bytes)
    );
    serde_json::from_slice(&bytes).expect("AdmissionReview JSON")
}

fn message(out: &serde_json::Value) -> String {
    out["response"]["status"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// The JSON patch of a response. kube-rs sends the bytes as a JSON array of numbers (which
/// the apiserver's decoder accepts for a []byte field); base64 text is accepted here too.
fn patch(out: &serde_json::Value) -> serde_json::Value {
    use base64::Engine as _;
    let bytes: Vec<u8> = match &out["response"]["patch"] {
        serde_json::Value::String(text) => base64::engine::general_purpose::STANDARD
            .decode(text)
            .expect("base64"),
        serde_json::Value::Array(items) => items
            .iter()
            .map(|b| b.as_u64().expect("byte") as u8)
            .collect(),
        other => panic!("no patch in {other}"),
    };
    serde_json::from_slice(&bytes).expect("JSON patch")
}

const VALIDATE: &str = "/v1/webhook/validation/ippools";
const MUTATE: &str = "/v1/webhook/mutation/ippools";

#[tokio::test]
async fn valid_pool_is_allowed_and_uid_echoed() {
    let out = review(state(vec![]), VALIDATE, CREATE.to_string()).await;
    assert_eq!(out["kind"], "AdmissionReview");
    assert_eq!(
        out["response"]["uid"],
        "705ab4f5-6393-11e8-b7cc-42010a800002"
    );
    assert_eq!(out["response"]["allowed"], true);
}

#[tokio::test]
async fn bad_range_is_denied_with_the_upstream_prefix_and_reason() {
    let body = CREATE.replace("\"end\": \"192.168.48.90\"", "\"end\": \"192.168.48.20\"");
    let out = review(state(vec![]), VALIDATE, body).await;
    assert_eq!(out["response"]["allowed"], false);
    assert_eq!(
        message(&out),
        "cannot create IPPool default/net-48 because spec.ipv4Config: pool end 192.168.48.20 is less than pool start 192.168.48.81"
    );
}

#[tokio::test]
async fn ipv6_and_service_cidr_overlap_are_denied() {
    let out = review(
        state(vec![]),
        VALIDATE,
        CREATE.replace("192.168.48.0/24", "fd00::/64"),
    )
    .await;
    assert!(
        message(&out).contains("IPv6 is not supported yet"),
        "{}",
        message(&out)
    );
    let body = CREATE
        .replace("192.168.48.0/24", "10.53.1.0/24")
        .replace("192.168.48.", "10.53.1.");
    let out = review(state(vec![]), VALIDATE, body).await;
    assert!(
        message(&out).contains("overlaps the cluster service cidr 10.53.0.0/16"),
        "{}",
        message(&out)
    );
}

#[tokio::test]
async fn a_second_pool_on_the_same_network_is_denied() {
    let mut existing: IPPool = serde_json::from_value(
        serde_json::from_str::<serde_json::Value>(CREATE).expect("json")["request"]["object"]
            .clone(),
    )
    .expect("pool");
    existing.metadata.name = Some("first".into());
    let out = review(state(vec![existing]), VALIDATE, CREATE.to_string()).await;
    assert!(
        message(&out).contains("network default/net-48 already has IPPool default/first"),
        "{}",
        message(&out)
    );
}

#[tokio::test]
async fn mutator_adds_missing_server_ip_and_range() {
    let body = CREATE.replace(
        "\"serverIP\": \"192.168.48.77\",\n          \"cidr\": \"192.168.48.0/24\",\n          \"pool\": {\"start\": \"192.168.48.81\", \"end\": \"192.168.48.90\"}",
        "\"cidr\": \"192.168.48.0/24\"",
    );
    assert!(!body.contains("serverIP"), "fixture edit applied");
    let out = review(state(vec![]), MUTATE, body).await;
    assert_eq!(out["response"]["allowed"], true);
    assert_eq!(
        patch(&out),
        serde_json::json!([
            {"op": "add", "path": "/spec/ipv4Config/pool", "value": {}},
            {"op": "add", "path": "/spec/ipv4Config/pool/start", "value": "192.168.48.1"},
            {"op": "add", "path": "/spec/ipv4Config/pool/end", "value": "192.168.48.254"},
            {"op": "add", "path": "/spec/ipv4Config/serverIP", "value": "192.168.48.1"},
            // A new pool is marked as living in the allocation store (nothing to migrate).
            {"op": "add", "path": "/metadata/annotations",
             "value": {"network.harvesterhci.io/allocation-store": "objects"}}
        ])
    );
}

#[tokio::test]
async fn vmnetcfg_with_a_malformed_or_duplicate_mac_is_denied() {
    let review_of = |entries: serde_json::Value| {
        serde_json::json!({
            "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": {"uid": "u1", "kind": {"group": "network.harvesterhci.io", "version": "v1alpha1", "kind": "VirtualMachineNetworkConfig"},
                "resource": {"group": "network.harvesterhci.io", "version": "v1alpha1", "resource": "virtualmachinenetworkconfigs"},
                "name": "vm1", "namespace": "ns", "operation": "CREATE", "userInfo": {"username": "u"},
                "object": {"apiVersion": "network.harvesterhci.io/v1alpha1", "kind": "VirtualMachineNetworkConfig",
                    "metadata": {"name": "vm1", "namespace": "ns"}, "spec": {"vmName": "vm1", "networkConfigs": entries}}}
        })
        .to_string()
    };
    let out = review(
        state(vec![]),
        "/v1/webhook/mutation/virtualmachinenetworkconfigs",
        review_of(
            serde_json::json!([{"networkName": "default/net-48", "macAddress": "not-a-mac"}]),
        ),
    )
    .await;
    assert!(message(&out).starts_with("cannot create VirtualMachineNetworkConfig ns/vm1 because spec.networkConfigs[0].macAddress: invalid MAC address \"not-a-mac\""), "{}", message(&out));
    let out = review(
        state(vec![]),
        "/v1/webhook/validation/virtualmachinenetworkconfigs",
        review_of(
            serde_json::json!([{"networkName": "a/b", "macAddress": "aa:bb:cc:dd:ee:ff"},
                                     {"networkName": "a/b", "macAddress": "AA:BB:CC:DD:EE:FF"}]),
        ),
    )
    .await;
    assert!(
        message(&out).contains("is already used by spec.networkConfigs[0]"),
        "{}",
        message(&out)
    );
    // Entries on networks without a pool are left alone, not an error.
    let out = review(
        state(vec![]),
        "/v1/webhook/mutation/virtualmachinenetworkconfigs",
        review_of(
            serde_json::json!([{"networkName": "a/unmanaged", "macAddress": "aa:bb:cc:dd:ee:ff"}]),
        ),
    )
    .await;
    assert_eq!(out["response"]["allowed"], true);
}

#[tokio::test]
async fn garbage_body_is_a_400_that_says_why() {
    for body in ["", "{", "[]", "{\"kind\":\"AdmissionReview\"}"] {
        let (status, bytes) = post(state(vec![]), VALIDATE, body.to_string()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        let text = String::from_utf8_lossy(&bytes);
        assert!(text.contains("AdmissionReview"), "{text}");
    }
}
