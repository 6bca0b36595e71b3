//! The admission adapter: decodes AdmissionReviews, asks the core for a decision, and
//! answers. It never panics on a request body: anything it cannot read is answered with an
//! HTTP 400 that says what was wrong, or a denial that names the field.

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use kube::core::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation};
use vm_dhcp_core::PoolLayout;
use vm_dhcp_core::crd::IPPool;

/// The webhook's HTTP routes.
pub fn router() -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/v1/webhooks/validation/ippool", post(validate_ippool))
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

async fn validate_ippool(body: Bytes) -> Response {
    let req = match read_review(&body) {
        Ok(req) => req,
        Err(rejection) => return rejection.into_response(),
    };
    Json(validate_ippool_request(&req).into_review()).into_response()
}

fn validate_ippool_request(req: &AdmissionRequest<DynamicObject>) -> AdmissionResponse {
    let resp = AdmissionResponse::from(req);
    if !matches!(req.operation, Operation::Create | Operation::Update) {
        return resp;
    }
    let Some(object) = &req.object else {
        return resp.deny("the request carries no object to validate");
    };
    let pool: IPPool = match serde_json::to_value(object).and_then(serde_json::from_value) {
        Ok(pool) => pool,
        Err(e) => return resp.deny(format!("object is not a valid IPPool: {e}")),
    };
    let Some(config) = &pool.spec.ipv4_config else {
        return resp.deny("spec.ipv4Config is required");
    };
    match PoolLayout::from_config(config) {
        Ok(_) => resp,
        Err(e) => resp.deny(format!("spec.ipv4Config: {e}")),
    }
}
