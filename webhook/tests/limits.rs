//! Body limits, in-process: the largest review the webhook must take (an IPPool UPDATE whose
//! status lists every allocation the controller projects, in `object` and `oldObject`) is
//! taken; a larger body, a body that never ends and a body that trickles get a `Status`
//! that names the limit, never axum's silent 413.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use kube::runtime::reflector;
use serde_json::{Value, json};
use tower::ServiceExt;
use vm_dhcp_webhook::limits::{BodyLimits, DEFAULT_MAX_REQUEST_BYTES};
use vm_dhcp_webhook::{Metrics, PATH_VALIDATE_IPPOOL, Webhook, router, router_with_limits};

const CREATE: &str = include_str!("fixtures/ippool-create.json");

fn state() -> Arc<Webhook> {
    let (store, _writer) = reflector::store();
    Arc::new(Webhook::new(
        None,
        store,
        None,
        Some("10.53.0.0/16".parse().expect("cidr")),
        Metrics::unregistered(),
    ))
}

/// The largest IPPool the controller writes: the status lists `PROJECTION_MAX_ENTRIES`
/// allocations (above that it lists none), each with an owner of the longest names a
/// namespace and a VM can have, all of them static.
fn largest_pool() -> Value {
    let mut pool: Value =
        serde_json::from_str::<Value>(CREATE).expect("fixture")["request"]["object"].clone();
    let n = vm_dhcp_core::store::PROJECTION_MAX_ENTRIES;
    let mut allocated = BTreeMap::new();
    let mut owners = BTreeMap::new();
    let mut statics = Vec::new();
    for i in 0..n {
        let ip = format!("10.{}.{}.{}", 100 + i / 65536, (i / 256) % 256, i % 256);
        let mac = format!(
            "fa:ce:00:{:02x}:{:02x}:{:02x}",
            i >> 16,
            (i >> 8) & 255,
            i & 255
        );
        let owner = format!("{}/{}{:0>10}", "n".repeat(63), "v".repeat(53), i);
        allocated.insert(ip.clone(), mac);
        owners.insert(ip.clone(), owner);
        statics.push(ip);
    }
    pool["status"] = json!({
        "lastUpdate": "2026-01-01T00:00:00Z",
        "ipv4": {"allocated": allocated, "owners": owners, "staticAddresses": statics,
                 "used": n, "available": 65534 - n},
        "conditions": [{"type": "AllocationsListed", "status": "True",
                        "lastTransitionTime": "2026-01-01T00:00:00Z", "reason": "Listed", "message": ""}],
    });
    pool
}

fn update_review(object: Value, old: Value) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {
            "uid": "uid-big-update",
            "kind": {"group": "network.harvesterhci.io", "version": "v1alpha1", "kind": "IPPool"},
            "resource": {"group": "network.harvesterhci.io", "version": "v1alpha1", "resource": "ippools"},
            "name": "net-48", "namespace": "default", "operation": "UPDATE",
            "userInfo": {"username": "system:serviceaccount:harvester-system:vm-dhcp-controller",
                         "groups": ["system:serviceaccounts", "system:authenticated"]},
            "object": object, "oldObject": old, "dryRun": false,
        }
    }))
    .expect("review JSON")
}

async fn send(app: axum::Router, req: Request<Body>) -> (StatusCode, Value) {
    let resp = app.oneshot(req).await.expect("router answers");
    let status = resp.status();
    let bytes = resp.into_body().collect().await.expect("body").to_bytes();
    let body = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
    (status, body)
}

fn post(body: Body, length: Option<usize>) -> Request<Body> {
    let mut req = Request::post(PATH_VALIDATE_IPPOOL).header("content-type", "application/json");
    if let Some(len) = length {
        req = req.header("content-length", len);
    }
    req.body(body).expect("request")
}

fn assert_status(body: &Value, code: u16, reason: &str, says: &str) {
    assert_eq!(body["kind"], "Status", "{body}");
    assert_eq!(body["code"], code, "{body}");
    assert_eq!(body["reason"], reason, "{body}");
    let message = body["message"].as_str().unwrap_or_default();
    assert!(message.contains(says), "{message:?} should say {says:?}");
}

#[tokio::test]
async fn the_largest_ippool_update_is_taken_under_the_default_limit() {
    let pool = largest_pool();
    let mut old = pool.clone();
    old["metadata"]["resourceVersion"] = json!("41");
    let body = update_review(pool, old);
    println!(
        "largest IPPool UPDATE review: {} bytes (default limit {DEFAULT_MAX_REQUEST_BYTES}, axum's implicit limit {})",
        body.len(),
        2 * 1024 * 1024
    );
    // The reason for the limit: axum's implicit one refused this review.
    assert!(body.len() > 2 * 1024 * 1024, "{}", body.len());
    assert!(body.len() < DEFAULT_MAX_REQUEST_BYTES, "{}", body.len());
    let len = body.len();
    let (code, out) = send(router(state()), post(Body::from(body), Some(len))).await;
    assert_eq!(code, StatusCode::OK, "{out}");
    assert_eq!(out["kind"], "AdmissionReview", "{out}");
    assert_eq!(out["response"]["uid"], "uid-big-update", "{out}");
}

#[tokio::test]
async fn a_body_past_the_limit_gets_a_status_naming_the_limit() {
    let limits = BodyLimits::new(64 * 1024, Duration::from_secs(5));
    let body = vec![b' '; 64 * 1024 + 1];
    // Declared: refused before it is read.
    let (code, out) = send(
        router_with_limits(state(), limits.clone()),
        post(Body::from(body.clone()), Some(body.len())),
    )
    .await;
    assert_eq!(code, StatusCode::PAYLOAD_TOO_LARGE);
    assert_status(&out, 413, "RequestEntityTooLarge", "limit of 65536 bytes");
    assert_status(&out, 413, "RequestEntityTooLarge", "--max-request-bytes");
    assert_status(&out, 413, "RequestEntityTooLarge", "65537 bytes");
    // Streamed with no length: cut as soon as it passes the limit.
    let chunks = futures::stream::iter(
        body.chunks(1000)
            .map(|c| Ok::<_, std::io::Error>(Bytes::copy_from_slice(c)))
            .collect::<Vec<_>>(),
    );
    let (code, out) = send(
        router_with_limits(state(), limits.clone()),
        post(Body::from_stream(chunks), None),
    )
    .await;
    assert_eq!(code, StatusCode::PAYLOAD_TOO_LARGE);
    assert_status(&out, 413, "RequestEntityTooLarge", "limit of 65536 bytes");
    // A lying Content-Length (small) does not let a larger body through.
    let (code, out) = send(
        router_with_limits(state(), limits),
        post(Body::from(body), Some(10)),
    )
    .await;
    assert!(
        code == StatusCode::PAYLOAD_TOO_LARGE || code == StatusCode::BAD_REQUEST,
        "{code} {out}"
    );
}

#[tokio::test]
async fn a_body_that_never_ends_is_cut_at_the_read_timeout() {
    let limits = BodyLimits::new(1024 * 1024, Duration::from_millis(300));
    let trickle = futures::stream::StreamExt::chain(
        futures::stream::iter([Ok::<_, std::io::Error>(Bytes::from_static(
            b"{\"apiVersion\":",
        ))]),
        futures::stream::pending(),
    );
    let started = std::time::Instant::now();
    let (code, out) = send(
        router_with_limits(state(), limits),
        post(Body::from_stream(trickle), Some(1000)),
    )
    .await;
    println!("cut after {:?}", started.elapsed());
    assert_eq!(code, StatusCode::REQUEST_TIMEOUT);
    assert_status(&out, 408, "Timeout", "did not arrive within 300ms");
}

#[tokio::test]
async fn the_budget_makes_a_reader_wait_for_others_not_fail() {
    // Room for 4 bodies of the limit: 6 maximal bodies at once all get an answer.
    let limits = BodyLimits::new(256 * 1024, Duration::from_secs(10));
    let app = router_with_limits(state(), limits);
    let body = update_review(
        json!({"kind": "IPPool", "pad": "x".repeat(200 * 1024)}),
        Value::Null,
    );
    let sends = (0..6).map(|_| {
        let len = body.len();
        send(app.clone(), post(Body::from(body.clone()), Some(len)))
    });
    for (code, out) in futures::future::join_all(sends).await {
        // A review whose object is not an IPPool: answered (denied), not refused for size.
        assert_eq!(code, StatusCode::OK, "{out}");
    }
}
