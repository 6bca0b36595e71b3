//! The agent's HTTP endpoints.
//!
//! - `/healthz`: the process serves HTTP.
//! - `/readyz`: 200 only when the DHCP socket is bound and a lease table is loaded.
//! - `/leases`: the Go agent's shape, `{"<mac>": "<lease as a JSON string>"}` (seed README),
//!   for tools written against it.
//! - `/api/v1/leases`: the lease view the aggregated API reads from the active agent:
//!   `{"pool", "active", "items": [{address, mac, state, leaseStart, expiry, lastSeen,
//!   declines}]}`, times in RFC 3339.
//! - `/metrics`: Prometheus (OpenMetrics text).
//!
//! In the cluster both lease endpoints answer only a caller [`super::auth`] lets in (401
//! without a valid bearer token, 403 when it may not get `dhcpleases`); health, readiness
//! and metrics stay open for the kubelet and Prometheus. Where the server listens:
//! [`super::bind`] (never on the VM network).

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use k8s_openapi::jiff::Timestamp;
use serde_json::{Map, Value, json};
use tokio::sync::watch;
use vm_dhcp_core::dhcp::LeaseTable;

use super::auth::Auth;
use super::packet::unix_now;
use super::{AgentState, stopped};

pub fn router(state: Arc<AgentState>, auth: Option<Arc<Auth>>) -> Router {
    let mut leases = Router::new()
        .route("/leases", get(leases_compat))
        .route("/api/v1/leases", get(leases_view));
    if let Some(auth) = auth {
        leases = leases.layer(axum::middleware::from_fn_with_state(auth, require_reader));
    }
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .merge(leases)
        .with_state(state)
}

async fn require_reader(
    State(auth): State<Arc<Auth>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    match auth.check(req.headers()).await {
        Ok(()) => next.run(req).await,
        Err((status, message)) => (status, message).into_response(),
    }
}

pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<AgentState>,
    auth: Option<Arc<Auth>>,
    stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    axum::serve(listener, router(state, auth))
        .with_graceful_shutdown(stopped(stop))
        .await?;
    Ok(())
}

async fn healthz() -> impl IntoResponse {
    axum::Json(json!({"ok": true}))
}

async fn readyz(State(state): State<Arc<AgentState>>) -> Response {
    let socket = state.socket_bound.load(Ordering::Relaxed);
    let table = state.current_table();
    let body = json!({
        "ok": state.is_ready(),
        "socketBound": socket,
        "tableLoaded": table.is_some(),
        "leases": table.as_ref().map(|t| t.len()),
    });
    let status = if state.is_ready() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, axum::Json(body)).into_response()
}

fn not_loaded() -> Response {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        "no lease table loaded yet: the pool has not been read (see the agent's log)\n",
    )
        .into_response()
}

fn rfc3339(secs: Option<u64>) -> Value {
    secs.and_then(|s| i64::try_from(s).ok())
        .and_then(|s| Timestamp::from_second(s).ok())
        .map_or(Value::Null, |t| Value::String(t.to_string()))
}

/// Go's JSON for a nil slice is `null`.
fn go_list<T: ToString>(items: &[T]) -> Value {
    if items.is_empty() {
        Value::Null
    } else {
        Value::Array(items.iter().map(|i| Value::String(i.to_string())).collect())
    }
}

/// Go marshals a `net.IPMask` ([]byte) as base64.
fn base64_mask(mask: Ipv4Addr) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let b = mask.octets();
    let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
    let m = u32::from(b[3]) << 16;
    let sextet = |v: u32, shift: u32| ALPHABET[((v >> shift) & 0x3f) as usize] as char;
    [
        sextet(n, 18),
        sextet(n, 12),
        sextet(n, 6),
        sextet(n, 0),
        sextet(m, 18),
        sextet(m, 12),
        '=',
        '=',
    ]
    .iter()
    .collect()
}

fn compat_leases(table: &LeaseTable) -> Map<String, Value> {
    let o = table.options();
    table
        .leases()
        .into_iter()
        .map(|(mac, ip)| {
            // Go's field order (serde_json's map would sort the keys).
            let fields: [(&str, Value); 9] = [
                ("ServerIP", Value::String(o.server_ip.to_string())),
                ("ClientIP", Value::String(ip.to_string())),
                ("SubnetMask", Value::String(base64_mask(o.subnet_mask()))),
                (
                    "Router",
                    Value::String(o.router.map(|r| r.to_string()).unwrap_or_default()),
                ),
                ("DNS", go_list(&o.dns)),
                (
                    "DomainName",
                    Value::String(o.domain_name.clone().unwrap_or_default()),
                ),
                ("DomainSearch", go_list(&o.domain_search)),
                ("NTP", go_list(&o.ntp)),
                ("LeaseTime", Value::from(o.lease_time)),
            ];
            let body: Vec<String> = fields
                .iter()
                .map(|(k, v)| format!("{}:{v}", Value::String((*k).to_string())))
                .collect();
            (
                mac.to_string(),
                Value::String(format!("{{{}}}", body.join(","))),
            )
        })
        .collect()
}

async fn leases_compat(State(state): State<Arc<AgentState>>) -> Response {
    match state.current_table() {
        Some(table) => axum::Json(Value::Object(compat_leases(&table))).into_response(),
        None => not_loaded(),
    }
}

async fn leases_view(State(state): State<Arc<AgentState>>) -> Response {
    let Some(table) = state.current_table() else {
        return not_loaded();
    };
    let now = unix_now();
    let rows = state.book().view(&table, now);
    let items: Vec<Value> = rows
        .into_iter()
        .map(|row| {
            json!({
                "address": row.ip.to_string(),
                "mac": row.mac.to_string(),
                "state": row.state.as_str(),
                "leaseStart": rfc3339(row.lease_start),
                "expiry": rfc3339(row.expires),
                "lastSeen": rfc3339(row.last_seen),
                "declines": row.declines,
            })
        })
        .collect();
    axum::Json(json!({
        "pool": table.pool(),
        "agent": state.name,
        "active": state.active.load(Ordering::Relaxed),
        "serverIP": table.options().server_ip.to_string(),
        "leaseTime": table.options().lease_time,
        "items": items,
    }))
    .into_response()
}

async fn metrics(State(state): State<Arc<AgentState>>) -> Response {
    crate::metrics_http::response(crate::metrics_http::encode(&state.registry))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_encode_as_go_does() {
        // The seed README shows "////AA==" for a /24.
        assert_eq!(base64_mask(Ipv4Addr::new(255, 255, 255, 0)), "////AA==");
        assert_eq!(base64_mask(Ipv4Addr::new(255, 255, 240, 0)), "///wAA==");
        assert_eq!(base64_mask(Ipv4Addr::new(255, 255, 255, 252)), "/////A==");
        assert_eq!(base64_mask(Ipv4Addr::new(0, 0, 0, 0)), "AAAAAA==");
    }

    #[test]
    fn compat_leases_have_the_seed_readme_shape() {
        let pool: vm_dhcp_core::crd::IPPool = serde_yaml::from_str(
            r#"
metadata: {name: net-48, namespace: default}
spec:
  networkName: default/net-48
  ipv4Config:
    serverIP: 192.168.48.77
    cidr: 192.168.48.0/24
    pool: {start: 192.168.48.81, end: 192.168.48.90}
    router: 192.168.48.1
    dns: [1.1.1.1]
    domainName: aibao.moe
    domainSearch: [aibao.moe]
    ntp: [122.117.253.246, 17.253.116.253, 114.35.131.27, 103.147.22.149]
    leaseTime: 300
status:
  ipv4: {allocated: {192.168.48.86: "C6:D6:82:39:D3:C3"}, used: 1, available: 7}
"#,
        )
        .expect("pool");
        let table = LeaseTable::from_pool(&pool, &Default::default()).expect("servable pool");
        let leases = compat_leases(&table);
        // Byte for byte the seed README's first /leases entry.
        assert_eq!(
            leases["c6:d6:82:39:d3:c3"],
            r#"{"ServerIP":"192.168.48.77","ClientIP":"192.168.48.86","SubnetMask":"////AA==","Router":"192.168.48.1","DNS":["1.1.1.1"],"DomainName":"aibao.moe","DomainSearch":["aibao.moe"],"NTP":["122.117.253.246","17.253.116.253","114.35.131.27","103.147.22.149"],"LeaseTime":300}"#
        );
    }

    #[test]
    fn timestamps_are_rfc3339() {
        assert_eq!(rfc3339(Some(0)), json!("1970-01-01T00:00:00Z"));
        assert_eq!(rfc3339(Some(1_700_000_000)), json!("2023-11-14T22:13:20Z"));
        assert_eq!(rfc3339(None), Value::Null);
    }
}
