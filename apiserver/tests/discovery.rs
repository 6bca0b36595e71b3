//! Discovery documents, in-process.

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use tower::ServiceExt;

async fn get(path: &str) -> (StatusCode, serde_json::Value) {
    let resp = vm_dhcp_apiserver::router()
        .oneshot(Request::get(path).body(Body::empty()).expect("request"))
        .await
        .expect("router answers");
    let status = resp.status();
    let bytes = resp.into_body().collect().await.expect("body").to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null),
    )
}

#[tokio::test]
async fn group_document() {
    let (status, doc) = get("/apis/dhcp.harvesterhci.io").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(doc["kind"], "APIGroup");
    assert_eq!(doc["name"], "dhcp.harvesterhci.io");
    assert_eq!(
        doc["preferredVersion"]["groupVersion"],
        "dhcp.harvesterhci.io/v1alpha1"
    );
}

#[tokio::test]
async fn resource_list_is_read_only_and_namespaced() {
    let (status, doc) = get("/apis/dhcp.harvesterhci.io/v1alpha1").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(doc["kind"], "APIResourceList");
    let res = &doc["resources"][0];
    assert_eq!(res["name"], "ipamallocations");
    assert_eq!(res["namespaced"], true);
    assert_eq!(res["verbs"], serde_json::json!(["get", "list", "watch"]));
}

#[tokio::test]
async fn the_crd_group_is_never_served_here() {
    let (status, _) = get("/apis/network.harvesterhci.io/v1alpha1").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}
