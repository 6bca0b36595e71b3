//! The router, in-process, with recorded AdmissionReview JSON.

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use tower::ServiceExt;

const CREATE: &str = include_str!("fixtures/ippool-create.json");

async fn post(path: &str, body: String) -> (StatusCode, Vec<u8>) {
    let resp = vm_dhcp_webhook::router()
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

async fn review(body: String) -> serde_json::Value {
    let (status, bytes) = post("/v1/webhooks/validation/ippool", body).await;
    assert_eq!(status, StatusCode::OK);
    serde_json::from_slice(&bytes).expect("AdmissionReview JSON")
}

#[tokio::test]
async fn valid_pool_is_allowed_and_uid_echoed() {
    let out = review(CREATE.to_string()).await;
    assert_eq!(out["kind"], "AdmissionReview");
    assert_eq!(
        out["response"]["uid"],
        "705ab4f5-6393-11e8-b7cc-42010a800002"
    );
    assert_eq!(out["response"]["allowed"], true);
}

#[tokio::test]
async fn bad_range_is_denied_with_the_reason() {
    let body = CREATE.replace("\"end\": \"192.168.48.90\"", "\"end\": \"192.168.48.20\"");
    let out = review(body).await;
    assert_eq!(out["response"]["allowed"], false);
    let msg = out["response"]["status"]["message"]
        .as_str()
        .expect("message");
    assert!(
        msg.contains("pool end 192.168.48.20 is less than pool start 192.168.48.81"),
        "{msg}"
    );
}

#[tokio::test]
async fn ipv6_is_denied_not_a_panic() {
    let body = CREATE.replace("192.168.48.0/24", "fd00::/64");
    let out = review(body).await;
    assert_eq!(out["response"]["allowed"], false);
    let msg = out["response"]["status"]["message"]
        .as_str()
        .expect("message");
    assert!(msg.contains("IPv6 is not supported yet"), "{msg}");
}

#[tokio::test]
async fn garbage_body_is_a_400_that_says_why() {
    for body in ["", "{", "[]", "{\"kind\":\"AdmissionReview\"}"] {
        let (status, bytes) = post("/v1/webhooks/validation/ippool", body.to_string()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        let text = String::from_utf8_lossy(&bytes);
        assert!(text.contains("AdmissionReview"), "{text}");
    }
}
