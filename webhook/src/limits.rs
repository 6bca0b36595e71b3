//! How much of a request the webhook reads, and for how long: every AdmissionReview body is
//! read here before a handler sees it, up to a size limit, within a timeout, and within a
//! memory budget shared by all the requests being read at once. Past a limit the caller gets a
//! `Status` that says which limit and how to raise it (kube-apiserver shows its message in
//! the error of the refused request), never axum's silent 2 MiB 413.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http_body_util::BodyExt as _;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The largest object kube-apiserver writes: it refuses a create or update body above
/// 3 MiB (twice etcd's default 1.5 MiB request limit, room it leaves for JSON patches that
/// copy fields); an object it stores is smaller still.
pub const MAX_OBJECT_BYTES: usize = 3 * 1024 * 1024;
/// An UPDATE review carries the object twice (`object` and `oldObject`: an IPPool's status
/// with every allocation listed is in both) plus the request's envelope (user, groups, extra
/// and options, a few KiB), with a MiB of headroom.
pub const DEFAULT_MAX_REQUEST_BYTES: usize = 2 * MAX_OBJECT_BYTES + 1024 * 1024;
/// Bodies being read or decided at once hold at most this many times the limit in memory;
/// a request past the budget waits for others to finish (within the read timeout).
pub const BUDGET_REQUESTS: usize = 4;
/// Default read timeout of a body (the server's `--header-read-timeout` replaces it).
pub const DEFAULT_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Budget unit: a permit is one KiB.
const UNIT: usize = 1024;

/// The body limits of one router.
#[derive(Clone, Debug)]
pub struct BodyLimits {
    max_bytes: usize,
    read_timeout: Duration,
    budget: Arc<Semaphore>,
    budget_units: usize,
}

impl Default for BodyLimits {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_REQUEST_BYTES, DEFAULT_READ_TIMEOUT)
    }
}

impl BodyLimits {
    /// Bodies up to `max_bytes`, each read within `read_timeout`.
    pub fn new(max_bytes: usize, read_timeout: Duration) -> Self {
        let max_bytes = max_bytes.max(1);
        let budget_units = units(max_bytes)
            .saturating_mul(BUDGET_REQUESTS)
            .min(u32::MAX as usize)
            .min(Semaphore::MAX_PERMITS);
        BodyLimits {
            max_bytes,
            read_timeout,
            budget: Arc::new(Semaphore::new(budget_units)),
            budget_units,
        }
    }

    pub fn max_bytes(&self) -> usize {
        self.max_bytes
    }
}

fn units(bytes: usize) -> usize {
    bytes.div_ceil(UNIT).max(1)
}

/// A Kubernetes `Status` as the error body: kube-apiserver decodes it and shows its message.
pub fn status(code: StatusCode, reason: &str, message: String) -> Response {
    (
        code,
        Json(serde_json::json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": message,
            "reason": reason,
            "code": code.as_u16(),
        })),
    )
        .into_response()
}

fn too_large(limits: &BodyLimits, size: Option<u64>) -> Response {
    let size = size.map_or_else(
        || "more than".to_string(),
        |s| format!("{s} bytes, more than"),
    );
    status(
        StatusCode::PAYLOAD_TOO_LARGE,
        "RequestEntityTooLarge",
        format!(
            "the request body is {size} the webhook's limit of {} bytes \
             (raise it with --max-request-bytes or VM_DHCP_MAX_REQUEST_BYTES)",
            limits.max_bytes
        ),
    )
}

enum ReadError {
    TooLarge(Option<u64>),
    Body(String),
}

/// Reads the body, taking budget for each KiB as it arrives.
async fn read(
    limits: &BodyLimits,
    body: Body,
    declared: Option<u64>,
) -> Result<(Vec<u8>, Option<OwnedSemaphorePermit>), ReadError> {
    let mut body = body;
    let mut out = Vec::with_capacity(declared.map_or(0, |d| d as usize).min(limits.max_bytes));
    let mut held: Option<OwnedSemaphorePermit> = None;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| ReadError::Body(e.to_string()))?;
        let Ok(data) = frame.into_data() else {
            continue; // trailers
        };
        let len = out.len() + data.len();
        if len > limits.max_bytes {
            return Err(ReadError::TooLarge(declared.filter(|d| *d as usize >= len)));
        }
        let have = held.as_ref().map_or(0, |p| p.num_permits());
        let need = units(len).min(limits.budget_units).saturating_sub(have);
        if need > 0 {
            let more = limits
                .budget
                .clone()
                .acquire_many_owned(need as u32)
                .await
                .map_err(|e| ReadError::Body(e.to_string()))?;
            match held.as_mut() {
                Some(p) => p.merge(more),
                None => held = Some(more),
            }
        }
        out.extend_from_slice(&data);
    }
    Ok((out, held))
}

/// Middleware: the whole body, within the limits, or a `Status` that names the limit.
pub async fn limit_body(State(limits): State<BodyLimits>, req: Request, next: Next) -> Response {
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if let Some(size) = declared.filter(|d| *d > limits.max_bytes as u64) {
        return too_large(&limits, Some(size));
    }
    let (parts, body) = req.into_parts();
    match tokio::time::timeout(limits.read_timeout, read(&limits, body, declared)).await {
        Err(_) => status(
            StatusCode::REQUEST_TIMEOUT,
            "Timeout",
            format!(
                "the request body did not arrive within {:?} (--header-read-timeout)",
                limits.read_timeout
            ),
        ),
        Ok(Err(ReadError::TooLarge(size))) => too_large(&limits, size),
        Ok(Err(ReadError::Body(e))) => status(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            format!("reading the request body: {e}"),
        ),
        Ok(Ok((bytes, permit))) => {
            let resp = next
                .run(Request::from_parts(parts, Body::from(bytes)))
                .await;
            // The decoded review lived until here: the budget covers it too.
            drop(permit);
            resp
        }
    }
}
