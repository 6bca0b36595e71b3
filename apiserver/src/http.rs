//! The HTTP surface: one handler that authenticates, authorizes and routes, as
//! k8s.io/apiserver's filter chain does (authentication → authorization → handler).

// Parsing helpers fail with the finished error response, returned as is by the handler; its
// size on the (rare) error path does not matter.
#![allow(clippy::result_large_err)]

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::auth::{
    Attributes, Authorizer, RequestHeaderConfig, SharedRequestHeaderConfig, VerifiedClientCert,
    authenticate, forbidden_message,
};
use crate::discovery;
use crate::metrics::Metrics;
use crate::resources::Resource;
use crate::selector::{FieldSelector, LabelSelector};
use crate::store::{Engine, Entry, EventType, StoreError};
use crate::views::{Key, ViewObject};
use crate::{GROUP, VERSION};

/// Everything the router needs.
pub struct ApiServer {
    pub engine: Arc<Engine>,
    pub request_header: SharedRequestHeaderConfig,
    /// False until the requestheader CA is loaded: not ready without it.
    pub authn_ready: Arc<AtomicBool>,
    pub authorizer: Arc<dyn Authorizer>,
    /// How often a watch with `allowWatchBookmarks=true` gets a BOOKMARK.
    pub bookmark_interval: Duration,
    /// The longest a watch stays open (`timeoutSeconds` can only shorten it).
    pub max_watch_timeout: Duration,
    /// The longest a list waits for a view to reach a requested resourceVersion.
    pub rv_wait: Duration,
    pub metrics: Metrics,
    /// Set when the server shuts down: every open watch ends cleanly (its response
    /// completes), so that its client watches again from its last resourceVersion on
    /// another replica instead of seeing a broken stream, which makes client-go list
    /// everything again. New watches end after their initial events.
    pub end_watches: tokio::sync::watch::Sender<bool>,
}

impl ApiServer {
    pub fn new(engine: Arc<Engine>, authorizer: Arc<dyn Authorizer>) -> Self {
        ApiServer {
            engine,
            request_header: Arc::new(std::sync::RwLock::new(RequestHeaderConfig::default())),
            authn_ready: Arc::new(AtomicBool::new(true)),
            authorizer,
            bookmark_interval: Duration::from_secs(60),
            max_watch_timeout: Duration::from_secs(1800),
            rv_wait: Duration::from_secs(3),
            metrics: Metrics::default(),
            end_watches: tokio::sync::watch::Sender::new(false),
        }
    }
}

pub fn router(server: Arc<ApiServer>) -> Router {
    Router::new().fallback(measured).with_state(server)
}

/// Every request, counted and timed by verb, resource and code.
async fn measured(State(s): State<Arc<ApiServer>>, req: Request) -> Response {
    let started = std::time::Instant::now();
    let watch = req.uri().query().is_some_and(|q| {
        q.split('&')
            .any(|kv| matches!(kv, "watch=true" | "watch=1" | "watch=True"))
    });
    let (verb, resource) = match route(req.uri().path()) {
        Route::Collection { resource, .. } => {
            (if watch { "watch" } else { "list" }, resource.def().plural)
        }
        Route::Object { resource, .. } => {
            (if watch { "watch" } else { "get" }, resource.def().plural)
        }
        Route::Health(which) => ("get", which),
        Route::Apis | Route::Group | Route::GroupVersion => ("get", "discovery"),
        Route::OpenApiV2 | Route::OpenApiV3 | Route::OpenApiV3GroupVersion => ("get", "openapi"),
        Route::NotFound => ("get", "unknown"),
    };
    let verb = match *req.method() {
        Method::GET | Method::HEAD => verb.to_string(),
        ref other => other.as_str().to_ascii_lowercase(),
    };
    let metrics = s.metrics.clone();
    let resp = handle(State(s), req).await;
    metrics.request(&verb, resource, resp.status().as_u16(), started.elapsed());
    resp
}

// ---------------------------------------------------------------------------------------
// Status errors

fn status(code: StatusCode, reason: &str, message: impl Into<String>) -> Response {
    status_with(code, reason, message, None)
}

fn status_with(
    code: StatusCode,
    reason: &str,
    message: impl Into<String>,
    details: Option<Value>,
) -> Response {
    let mut body = status_object(code, reason, message);
    if let Some(d) = details {
        body["details"] = d;
    }
    json_response(code, &body, "application/json")
}

fn status_object(code: StatusCode, reason: &str, message: impl Into<String>) -> Value {
    json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message.into(), "reason": reason, "code": code.as_u16(),
    })
}

fn not_found(resource: Resource, name: &str) -> Response {
    status_with(
        StatusCode::NOT_FOUND,
        "NotFound",
        format!("{}.{GROUP} {name:?} not found", resource.def().plural),
        Some(json!({"name": name, "group": GROUP, "kind": resource.def().plural})),
    )
}

fn bad_request(message: impl Into<String>) -> Response {
    status(StatusCode::BAD_REQUEST, "BadRequest", message)
}

fn store_error(e: StoreError) -> Response {
    match e {
        StoreError::NotReady => status(
            StatusCode::SERVICE_UNAVAILABLE,
            "ServiceUnavailable",
            e.to_string(),
        ),
        StoreError::Expired { .. } => status(StatusCode::GONE, "Expired", e.to_string()),
    }
}

fn json_response(code: StatusCode, body: &Value, content_type: &str) -> Response {
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    let mut resp = (code, bytes).into_response();
    if let Ok(v) = HeaderValue::from_str(content_type) {
        resp.headers_mut().insert(header::CONTENT_TYPE, v);
    }
    resp
}

// ---------------------------------------------------------------------------------------
// Content negotiation

#[derive(Debug, Clone, PartialEq, Eq)]
struct MediaType {
    essence: String,
    params: BTreeMap<String, String>,
}

fn parse_accept(headers: &HeaderMap) -> Vec<MediaType> {
    let text: Vec<&str> = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    let mut out = Vec::new();
    for part in text.iter().flat_map(|t| t.split(',')) {
        let mut pieces = part.split(';');
        let essence = pieces
            .next()
            .unwrap_or_default()
            .trim()
            .to_ascii_lowercase();
        if essence.is_empty() {
            continue;
        }
        let params = pieces
            .filter_map(|p| {
                let (k, v) = p.split_once('=')?;
                Some((
                    k.trim().to_ascii_lowercase(),
                    v.trim().trim_matches('"').to_string(),
                ))
            })
            .collect();
        out.push(MediaType { essence, params });
    }
    out
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Json,
    Table,
    Metadata,
}

/// The first acceptable media type; None when nothing fits (406).
fn negotiate(accept: &[MediaType]) -> Option<Format> {
    if accept.is_empty() {
        return Some(Format::Json);
    }
    accept.iter().find_map(|m| {
        let json_like = matches!(
            m.essence.as_str(),
            "application/json" | "*/*" | "application/*"
        );
        if !json_like {
            return None; // protobuf, yaml, CBOR: JSON is always offered as well
        }
        match m.params.get("as").map(String::as_str) {
            None => Some(Format::Json),
            Some(as_) => {
                let meta_group = m.params.get("g").map(String::as_str) == Some("meta.k8s.io")
                    && matches!(
                        m.params.get("v").map(String::as_str),
                        Some("v1" | "v1beta1")
                    );
                match as_ {
                    "Table" if meta_group => Some(Format::Table),
                    "PartialObjectMetadata" | "PartialObjectMetadataList" if meta_group => {
                        Some(Format::Metadata)
                    }
                    _ => None,
                }
            }
        }
    })
}

fn wants_discovery_v2(accept: &[MediaType]) -> bool {
    // The first entry that is either v2 or plain JSON decides.
    for m in accept {
        if m.essence != "application/json" && m.essence != "*/*" {
            continue;
        }
        if m.params.get("g").map(String::as_str) == Some("apidiscovery.k8s.io") {
            if m.params.get("v").map(String::as_str) == Some("v2")
                && m.params.get("as").map(String::as_str) == Some("APIGroupDiscoveryList")
            {
                return true;
            }
            continue; // v2beta1: not served, look further
        }
        return false;
    }
    false
}

fn not_acceptable(accept: &HeaderMap) -> Response {
    let asked = accept
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    status(
        StatusCode::NOT_ACCEPTABLE,
        "NotAcceptable",
        format!(
            "only the following media types are accepted: application/json, application/json;as=Table;v=v1;g=meta.k8s.io, application/json;as=PartialObjectMetadata;v=v1;g=meta.k8s.io (asked for {asked:?})"
        ),
    )
}

// ---------------------------------------------------------------------------------------
// Routing

enum Route {
    Health(&'static str),
    Apis,
    Group,
    GroupVersion,
    OpenApiV2,
    OpenApiV3,
    OpenApiV3GroupVersion,
    Collection {
        namespace: Option<String>,
        resource: Resource,
    },
    Object {
        namespace: String,
        resource: Resource,
        name: String,
    },
    NotFound,
}

fn route(path: &str) -> Route {
    let segs: Vec<&str> = path.trim_end_matches('/').split('/').skip(1).collect();
    let resource = |plural: &str| Resource::from_plural(plural);
    match segs.as_slice() {
        ["healthz"] => Route::Health("healthz"),
        ["readyz"] => Route::Health("readyz"),
        ["livez"] => Route::Health("livez"),
        ["apis"] => Route::Apis,
        ["openapi", "v2"] => Route::OpenApiV2,
        ["openapi", "v3"] => Route::OpenApiV3,
        ["openapi", "v3", "apis", g, v] if *g == GROUP && *v == VERSION => {
            Route::OpenApiV3GroupVersion
        }
        ["apis", g] if *g == GROUP => Route::Group,
        ["apis", g, v] if *g == GROUP && *v == VERSION => Route::GroupVersion,
        ["apis", g, v, rest @ ..] if *g == GROUP && *v == VERSION => match rest {
            [plural] => resource(plural).map_or(Route::NotFound, |resource| Route::Collection {
                namespace: None,
                resource,
            }),
            ["namespaces", ns, plural] => {
                resource(plural).map_or(Route::NotFound, |resource| Route::Collection {
                    namespace: Some(ns.to_string()),
                    resource,
                })
            }
            ["namespaces", ns, plural, name] => {
                resource(plural).map_or(Route::NotFound, |resource| Route::Object {
                    namespace: ns.to_string(),
                    resource,
                    name: name.to_string(),
                })
            }
            _ => Route::NotFound,
        },
        _ => Route::NotFound,
    }
}

type Query = Vec<(String, String)>;

fn query_of(req: &Request) -> Result<Query, Response> {
    match req.uri().query() {
        None => Ok(Vec::new()),
        Some(q) => axum::extract::Query::<Query>::try_from_uri(req.uri())
            .map(|q| q.0)
            .map_err(|e| bad_request(format!("malformed query string {q:?}: {e}"))),
    }
}

fn param<'a>(q: &'a Query, name: &str) -> Option<&'a str> {
    q.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

fn flag(q: &Query, name: &str) -> Result<Option<bool>, Response> {
    match param(q, name) {
        None => Ok(None),
        Some("true" | "1" | "True") => Ok(Some(true)),
        Some("false" | "0" | "False" | "") => Ok(Some(false)),
        Some(other) => Err(bad_request(format!(
            "{name}={other:?} is not a boolean: use true or false"
        ))),
    }
}

async fn handle(State(s): State<Arc<ApiServer>>, req: Request) -> Response {
    let path = req.uri().path().to_string();
    let route = route(&path);
    if let Route::Health(which) = route {
        return health(&s, which);
    }
    // Authentication: only a verified front-proxy certificate makes the headers count.
    let user = {
        let config = s
            .request_header
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        authenticate(
            &config,
            req.extensions().get::<VerifiedClientCert>(),
            req.headers(),
        )
    };
    let user = match user {
        Ok(u) => u,
        Err(why) => {
            tracing::debug!(%path, "unauthenticated request: {why}");
            return status(StatusCode::UNAUTHORIZED, "Unauthorized", "Unauthorized");
        }
    };
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let verb = match *req.method() {
            Method::POST => "create",
            Method::PUT => "update",
            Method::PATCH => "patch",
            Method::DELETE => "delete",
            _ => "this method",
        };
        return status(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            format!(
                "the server does not allow this method on the requested resource: {verb} is not supported, {GROUP} views are read-only (get, list, watch)"
            ),
        );
    }
    let query = match query_of(&req) {
        Ok(q) => q,
        Err(r) => return r,
    };
    let watch = match flag(&query, "watch") {
        Ok(w) => w.unwrap_or(false),
        Err(r) => return r,
    };
    let attrs = match &route {
        Route::Collection {
            namespace,
            resource,
        } => {
            let pinned = param(&query, "fieldSelector")
                .and_then(|f| FieldSelector::parse(f).ok())
                .and_then(|f| f.pinned_name().map(str::to_string))
                .unwrap_or_default();
            Attributes::Resource {
                verb: if watch { "watch" } else { "list" }.into(),
                namespace: namespace.clone().unwrap_or_default(),
                resource: resource.def().plural.into(),
                name: pinned,
            }
        }
        Route::Object {
            namespace,
            resource,
            name,
        } => Attributes::Resource {
            verb: if watch { "watch" } else { "get" }.into(),
            namespace: namespace.clone(),
            resource: resource.def().plural.into(),
            name: name.clone(),
        },
        _ => Attributes::NonResource {
            verb: "get".into(),
            path: path.clone(),
        },
    };
    match s.authorizer.authorize(&user, &attrs).await {
        Ok(d) if d.allowed => {}
        Ok(d) => {
            return status_with(
                StatusCode::FORBIDDEN,
                "Forbidden",
                forbidden_message(&user, &attrs, &d.reason),
                match &attrs {
                    Attributes::Resource { resource, name, .. } => {
                        Some(json!({"name": name, "group": GROUP, "kind": resource}))
                    }
                    Attributes::NonResource { .. } => None,
                },
            );
        }
        Err(e) => {
            tracing::warn!(user = %user.name, "authorization check failed: {e}");
            return status(
                StatusCode::INTERNAL_SERVER_ERROR,
                "InternalError",
                format!("authorization check failed (SubjectAccessReview): {e}"),
            );
        }
    }
    let accept = parse_accept(req.headers());
    match route {
        Route::Health(_) => unreachable_health(),
        Route::Apis => {
            if wants_discovery_v2(&accept) {
                cached_json(
                    req.headers(),
                    &discovery::aggregated_v2(),
                    discovery::V2_MEDIA_TYPE,
                )
            } else {
                plain(&discovery::api_group_list())
            }
        }
        Route::Group => plain(&discovery::api_group()),
        Route::GroupVersion => plain(&discovery::api_resource_list()),
        Route::OpenApiV2 => {
            cached_json(req.headers(), &discovery::openapi_v2(), "application/json")
        }
        Route::OpenApiV3 => {
            let doc = discovery::openapi_v3_group_version();
            json_response(
                StatusCode::OK,
                &discovery::openapi_v3_root(&doc),
                "application/json",
            )
        }
        Route::OpenApiV3GroupVersion => cached_json(
            req.headers(),
            &discovery::openapi_v3_group_version(),
            "application/json",
        ),
        Route::NotFound => status(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!("the server could not find the requested resource {path:?}"),
        ),
        Route::Object {
            namespace,
            resource,
            name,
        } => {
            let Some(format) = negotiate(&accept) else {
                return not_acceptable(req.headers());
            };
            if watch {
                // A watch on one object: the collection watch pinned to the name.
                let mut query = query;
                query.retain(|(k, _)| k != "fieldSelector");
                // Escaped as kube's fields.EscapeValue does, so that no name reads as syntax.
                let escaped = name
                    .replace('\\', "\\\\")
                    .replace(',', "\\,")
                    .replace('=', "\\=");
                query.push(("fieldSelector".into(), format!("metadata.name={escaped}")));
                return watch_collection(&s, Some(namespace), resource, &query, format).await;
            }
            get_object(&s, &namespace, resource, &name, &query, format)
        }
        Route::Collection {
            namespace,
            resource,
        } => {
            let Some(format) = negotiate(&accept) else {
                return not_acceptable(req.headers());
            };
            if watch {
                watch_collection(&s, namespace, resource, &query, format).await
            } else {
                list_collection(&s, namespace, resource, &query, format).await
            }
        }
    }
}

fn unreachable_health() -> Response {
    status(
        StatusCode::INTERNAL_SERVER_ERROR,
        "InternalError",
        "health routes are answered before authentication",
    )
}

fn plain<T: serde::Serialize>(doc: &T) -> Response {
    json_response(
        StatusCode::OK,
        &serde_json::to_value(doc).unwrap_or(Value::Null),
        "application/json",
    )
}

/// A document with an ETag, answering If-None-Match with 304 (the aggregator polls these).
fn cached_json(headers: &HeaderMap, doc: &Value, content_type: &str) -> Response {
    let tag = discovery::etag(doc);
    let matches = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == tag));
    let mut resp = if matches {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        json_response(StatusCode::OK, doc, content_type)
    };
    if let Ok(v) = HeaderValue::from_str(&tag) {
        resp.headers_mut().insert(header::ETAG, v);
    }
    resp
}

fn health(s: &ApiServer, which: &str) -> Response {
    if which != "readyz" {
        return (StatusCode::OK, "ok").into_response();
    }
    let unsynced = s.engine.unsynced();
    let authn = s.authn_ready.load(Ordering::Relaxed);
    if unsynced.is_empty() && authn && s.engine.is_ready() {
        return (StatusCode::OK, "ok").into_response();
    }
    let mut why = Vec::new();
    if !unsynced.is_empty() {
        why.push(format!("caches not synced: {unsynced:?}"));
    }
    if !authn {
        why.push(
            "requestheader CA not loaded from kube-system/extension-apiserver-authentication"
                .to_string(),
        );
    }
    (
        StatusCode::SERVICE_UNAVAILABLE,
        format!("{}\n", why.join("; ")),
    )
        .into_response()
}

// ---------------------------------------------------------------------------------------
// Rendering

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Include {
    None,
    Metadata,
    Object,
}

fn include_of(q: &Query) -> Result<Include, Response> {
    match param(q, "includeObject") {
        None | Some("") | Some("Metadata") => Ok(Include::Metadata),
        Some("Object") => Ok(Include::Object),
        Some("None") => Ok(Include::None),
        Some(other) => Err(bad_request(format!(
            "includeObject={other:?} is not supported: use None, Metadata or Object"
        ))),
    }
}

fn partial_metadata(obj: &ViewObject, rv: Option<u64>) -> Value {
    json!({"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": obj.metadata(rv)})
}

fn row(obj: &ViewObject, include: Include, rv: Option<u64>) -> Value {
    let mut row = json!({"cells": obj.resource.def().cells(obj)});
    match include {
        Include::None => {}
        Include::Metadata => row["object"] = partial_metadata(obj, rv),
        Include::Object => row["object"] = obj.to_json(rv),
    }
    row
}

fn table(resource: Resource, rows: Vec<Value>, list_meta: Value, with_columns: bool) -> Value {
    let mut t = json!({
        "kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": list_meta, "rows": rows,
    });
    if with_columns {
        t["columnDefinitions"] = resource.def().column_definitions();
    }
    t
}

fn get_object(
    s: &ApiServer,
    namespace: &str,
    resource: Resource,
    name: &str,
    query: &Query,
    format: Format,
) -> Response {
    let include = match include_of(query) {
        Ok(i) => i,
        Err(r) => return r,
    };
    let obj = match s.engine.get(resource, namespace, name) {
        Ok(Some(o)) => o,
        Ok(None) => return not_found(resource, name),
        Err(e) => return store_error(e),
    };
    let body = match format {
        Format::Json => obj.to_json(None),
        Format::Metadata => partial_metadata(&obj, None),
        Format::Table => table(
            resource,
            vec![row(&obj, include, None)],
            json!({"resourceVersion": obj.resource_version.to_string()}),
            true,
        ),
    };
    json_response(StatusCode::OK, &body, "application/json")
}

/// Selectors and namespace of a list or watch.
struct Filter {
    namespace: Option<String>,
    labels: LabelSelector,
    fields: FieldSelector,
}

impl Filter {
    fn from_query(
        namespace: Option<String>,
        resource: Resource,
        q: &Query,
    ) -> Result<Filter, Response> {
        let labels = LabelSelector::parse(param(q, "labelSelector").unwrap_or(""))
            .map_err(|e| bad_request(e.to_string()))?;
        let fields = FieldSelector::parse(param(q, "fieldSelector").unwrap_or(""))
            .map_err(|e| bad_request(e.to_string()))?;
        for r in &fields.requirements {
            if !resource.def().is_selectable(&r.field) {
                return Err(bad_request(format!(
                    "field label not supported: {} (use metadata.name, metadata.namespace or one of {})",
                    r.field,
                    resource.def().selectable.join(", ")
                )));
            }
        }
        Ok(Filter {
            namespace,
            labels,
            fields,
        })
    }

    fn matches(&self, obj: &ViewObject) -> bool {
        if self
            .namespace
            .as_ref()
            .is_some_and(|ns| *ns != obj.namespace)
        {
            return false;
        }
        if !self.labels.matches(&obj.labels) {
            return false;
        }
        self.fields.requirements.iter().all(|r| {
            let have = obj.field(&r.field).unwrap_or_default();
            // MACs compare in their canonical form: users type upper case or dashes.
            let equal = if r.field.ends_with("mac") {
                match (
                    have.parse::<vm_dhcp_core::MacAddr>(),
                    r.value.parse::<vm_dhcp_core::MacAddr>(),
                ) {
                    (Ok(a), Ok(b)) => a == b,
                    _ => have == r.value,
                }
            } else {
                have == r.value
            };
            equal == r.equal
        })
    }
}

#[derive(serde::Serialize, serde::Deserialize)]
struct ContinueToken {
    rv: u64,
    ns: String,
    name: String,
}

fn parse_rv(q: &Query) -> Result<Option<u64>, Response> {
    match param(q, "resourceVersion") {
        None | Some("") => Ok(None),
        Some(text) => text.parse::<u64>().map(Some).map_err(|_| {
            bad_request(format!(
                "resourceVersion {text:?} is not valid: this server's versions are numbers"
            ))
        }),
    }
}

async fn list_collection(
    s: &ApiServer,
    namespace: Option<String>,
    resource: Resource,
    q: &Query,
    format: Format,
) -> Response {
    let filter = match Filter::from_query(namespace.clone(), resource, q) {
        Ok(f) => f,
        Err(r) => return r,
    };
    let include = match include_of(q) {
        Ok(i) => i,
        Err(r) => return r,
    };
    let rv = match parse_rv(q) {
        Ok(rv) => rv,
        Err(r) => return r,
    };
    let limit = match param(q, "limit").map(str::parse::<usize>) {
        None => 0,
        Some(Ok(n)) => n,
        Some(Err(_)) => return bad_request("limit must be a non-negative integer"),
    };
    let token = match param(q, "continue").filter(|c| !c.is_empty()) {
        None => None,
        Some(text) => {
            if rv.is_some_and(|v| v != 0) {
                return bad_request(
                    "specifying resourceVersion is not allowed when using continue",
                );
            }
            match base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(text)
                .ok()
                .and_then(|b| serde_json::from_slice::<ContinueToken>(&b).ok())
            {
                Some(t) => Some(t),
                None => {
                    return bad_request(
                        "continue key is not valid: pass the metadata.continue of the previous page unchanged",
                    );
                }
            }
        }
    };
    let exact = match param(q, "resourceVersionMatch") {
        None | Some("") | Some("NotOlderThan") => false,
        Some("Exact") => true,
        Some(other) => {
            return bad_request(format!(
                "resourceVersionMatch: Unsupported value: {other:?}: supported values: \"Exact\", \"NotOlderThan\""
            ));
        }
    };
    if let Some(asked) = rv.filter(|v| *v != 0) {
        let current = match s.engine.resource_version(resource) {
            Ok(c) => c,
            Err(e) => return store_error(e),
        };
        if exact && asked != current {
            return status(
                StatusCode::GONE,
                "Expired",
                format!(
                    "resourceVersion {asked} is not available: this server serves only the current state ({current}); list with resourceVersionMatch=NotOlderThan or without a resourceVersion"
                ),
            );
        }
        if asked > current && !wait_for_rv(s, resource, asked).await {
            return status(
                StatusCode::GATEWAY_TIMEOUT,
                "Timeout",
                format!(
                    "Too large resource version: {asked}, current: {current}; this replica has not seen that change yet, retry"
                ),
            );
        }
    }
    let (items, mut list_rv) = match s.engine.list(resource, namespace.as_deref()) {
        Ok(x) => x,
        Err(e) => return store_error(e),
    };
    let after: Option<Key> = token.as_ref().map(|t| {
        list_rv = t.rv;
        (t.ns.clone(), t.name.clone())
    });
    let mut selected: Vec<Arc<ViewObject>> = items
        .into_iter()
        .filter(|o| after.as_ref().is_none_or(|a| o.key() > *a))
        .filter(|o| filter.matches(o))
        .collect();
    let mut list_meta = json!({"resourceVersion": list_rv.to_string()});
    if limit > 0 && selected.len() > limit {
        let remaining = selected.len() - limit;
        selected.truncate(limit);
        if let Some(last) = selected.last() {
            let token = ContinueToken {
                rv: list_rv,
                ns: last.namespace.clone(),
                name: last.name.clone(),
            };
            list_meta["continue"] = base64::engine::general_purpose::URL_SAFE_NO_PAD
                .encode(serde_json::to_vec(&token).unwrap_or_default())
                .into();
            list_meta["remainingItemCount"] = remaining.into();
        }
    }
    let body = match format {
        Format::Json => json!({
            "kind": format!("{}List", resource.def().kind),
            "apiVersion": crate::group_version(),
            "metadata": list_meta,
            "items": selected.iter().map(|o| o.to_json(None)).collect::<Vec<_>>(),
        }),
        Format::Metadata => json!({
            "kind": "PartialObjectMetadataList", "apiVersion": "meta.k8s.io/v1",
            "metadata": list_meta,
            "items": selected.iter().map(|o| partial_metadata(o, None)).collect::<Vec<_>>(),
        }),
        Format::Table => table(
            resource,
            selected.iter().map(|o| row(o, include, None)).collect(),
            list_meta,
            true,
        ),
    };
    json_response(StatusCode::OK, &body, "application/json")
}

async fn wait_for_rv(s: &ApiServer, resource: Resource, asked: u64) -> bool {
    let mut changes = s.engine.subscribe();
    let deadline = tokio::time::Instant::now() + s.rv_wait;
    loop {
        if s.engine
            .resource_version(resource)
            .is_ok_and(|c| c >= asked)
        {
            return true;
        }
        match tokio::time::timeout_at(deadline, changes.changed()).await {
            Ok(Ok(())) => continue,
            _ => return false,
        }
    }
}

// ---------------------------------------------------------------------------------------
// Watch

struct WatchEncoder {
    resource: Resource,
    format: Format,
    include: Include,
    columns_sent: bool,
}

impl WatchEncoder {
    fn event(&mut self, kind: &str, obj: &ViewObject, rv: u64) -> Value {
        let object = match self.format {
            Format::Json => obj.to_json(Some(rv)),
            Format::Metadata => partial_metadata(obj, Some(rv)),
            Format::Table => {
                // kubectl and Steve reuse the first event's columns.
                let with_columns = !self.columns_sent;
                self.columns_sent = true;
                table(
                    self.resource,
                    vec![row(obj, self.include, Some(rv))],
                    json!({"resourceVersion": rv.to_string()}),
                    with_columns,
                )
            }
        };
        json!({"type": kind, "object": object})
    }

    fn bookmark(&self, rv: u64, initial_events_end: bool) -> Value {
        let mut meta = json!({"resourceVersion": rv.to_string()});
        if initial_events_end {
            meta["annotations"] = json!({"k8s.io/initial-events-end": "true"});
        }
        let object = match self.format {
            Format::Json => json!({
                "kind": self.resource.def().kind, "apiVersion": crate::group_version(), "metadata": meta,
            }),
            Format::Metadata => {
                json!({"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": meta})
            }
            Format::Table => {
                json!({"kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": {"resourceVersion": rv.to_string()}, "rows": []})
            }
        };
        json!({"type": "BOOKMARK", "object": object})
    }
}

fn line(out: &mut Vec<u8>, event: &Value) {
    if serde_json::to_writer(&mut *out, event).is_ok() {
        out.push(b'\n');
    }
}

/// Encodes the entries a watcher should see, applying its filter: an object that starts or
/// stops matching becomes ADDED or DELETED, as kube-apiserver's watch cache does.
fn encode_entries(enc: &mut WatchEncoder, filter: &Filter, entries: &[Entry], out: &mut Vec<u8>) {
    for e in entries {
        let now = filter.matches(&e.object);
        match e.kind {
            EventType::Added | EventType::Deleted => {
                if now {
                    let ev = enc.event(e.kind.as_str(), &e.object, e.rv);
                    line(out, &ev);
                }
            }
            EventType::Modified => {
                let before = e.previous.as_ref().is_some_and(|p| filter.matches(p));
                let ev = match (before, now) {
                    (true, true) => enc.event("MODIFIED", &e.object, e.rv),
                    (false, true) => enc.event("ADDED", &e.object, e.rv),
                    (true, false) => {
                        let prev = e.previous.as_ref().unwrap_or(&e.object);
                        enc.event("DELETED", prev, e.rv)
                    }
                    (false, false) => continue,
                };
                line(out, &ev);
            }
        }
    }
}

async fn watch_collection(
    s: &Arc<ApiServer>,
    namespace: Option<String>,
    resource: Resource,
    q: &Query,
    format: Format,
) -> Response {
    let filter = match Filter::from_query(namespace, resource, q) {
        Ok(f) => f,
        Err(r) => return r,
    };
    let include = match include_of(q) {
        Ok(i) => i,
        Err(r) => return r,
    };
    let rv = match parse_rv(q) {
        Ok(rv) => rv,
        Err(r) => return r,
    };
    let (bookmarks, send_initial) =
        match (flag(q, "allowWatchBookmarks"), flag(q, "sendInitialEvents")) {
            (Ok(b), Ok(i)) => (b.unwrap_or(false), i),
            (Err(r), _) | (_, Err(r)) => return r,
        };
    if send_initial == Some(true) && !bookmarks {
        return bad_request(
            "sendInitialEvents=true needs allowWatchBookmarks=true (the end of the initial events is a bookmark)",
        );
    }
    let timeout = match param(q, "timeoutSeconds").map(str::parse::<u64>) {
        None => s.max_watch_timeout,
        Some(Ok(secs)) => Duration::from_secs(secs).min(s.max_watch_timeout),
        Some(Err(_)) => return bad_request("timeoutSeconds must be a non-negative integer"),
    };
    // rv unset or 0: the current state first; sendInitialEvents decides explicitly.
    let initial = match send_initial {
        Some(b) => b,
        None => rv.is_none_or(|v| v == 0),
    };
    let from = if initial {
        None
    } else {
        rv.filter(|v| *v != 0)
    };
    let mut enc = WatchEncoder {
        resource,
        format,
        include,
        columns_sent: false,
    };
    // Subscribed before the start is taken: a change between the two only wakes the stream
    // once for nothing, while a change after the start can never go unnoticed.
    let mut changes = s.engine.subscribe();
    changes.mark_unchanged();
    let start = match s.engine.watch_from(resource, from) {
        Ok(st) => st,
        Err(e @ StoreError::Expired { .. }) => {
            // As kube-apiserver: 200 with an ERROR event, so clients relist.
            let mut out = Vec::new();
            line(
                &mut out,
                &json!({"type": "ERROR", "object": status_object(StatusCode::GONE, "Expired", e.to_string())}),
            );
            let once =
                futures::stream::once(async move { Ok::<Bytes, Infallible>(Bytes::from(out)) });
            return watch_response(Body::from_stream(once));
        }
        Err(e) => return store_error(e),
    };
    let mut first = Vec::new();
    if initial {
        for obj in start.initial.iter().filter(|o| filter.matches(o)) {
            let ev = enc.event("ADDED", obj, obj.resource_version);
            line(&mut first, &ev);
        }
        if send_initial == Some(true) {
            line(&mut first, &enc.bookmark(start.rv, true));
        }
    } else {
        encode_entries(&mut enc, &filter, &start.replay, &mut first);
    }
    let (tx, rx) = mpsc::channel::<Bytes>(16);
    let open = s.metrics.watch_opened(resource.def().plural);
    let engine = s.engine.clone();
    let bookmark_every = s.bookmark_interval;
    let mut cursor = start.cursor;
    // Resumed from V on a replica that has not seen V yet (versions agree across
    // replicas): the changes up to V are the client's already, only later ones go out.
    let floor = from.unwrap_or(0);
    let mut last_rv = start.rv.max(floor);
    let ending = watches_end(s.end_watches.subscribe());
    tokio::spawn(async move {
        tokio::pin!(ending);
        let _open = open;
        let deadline = tokio::time::Instant::now() + timeout;
        let mut bookmark_tick = tokio::time::interval(bookmark_every);
        bookmark_tick.reset();
        // Send in pieces so that a huge initial state streams instead of buffering twice.
        for chunk in first.chunks(256 * 1024) {
            if tx.send(Bytes::copy_from_slice(chunk)).await.is_err() {
                return;
            }
        }
        loop {
            tokio::select! {
                changed = changes.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    let mut out = Vec::new();
                    match engine.events_after(resource, cursor) {
                        Ok((mut entries, next, rv)) => {
                            entries.retain(|e| e.rv > floor);
                            encode_entries(&mut enc, &filter, &entries, &mut out);
                            cursor = next;
                            last_rv = rv.max(floor);
                        }
                        Err(e) => {
                            line(&mut out, &json!({"type": "ERROR", "object": status_object(StatusCode::GONE, "Expired", e.to_string())}));
                            let _ = tx.send(Bytes::from(out)).await;
                            return;
                        }
                    }
                    if !out.is_empty() && tx.send(Bytes::from(out)).await.is_err() {
                        return;
                    }
                }
                _ = bookmark_tick.tick(), if bookmarks => {
                    let mut out = Vec::new();
                    line(&mut out, &enc.bookmark(last_rv, false));
                    if tx.send(Bytes::from(out)).await.is_err() {
                        return;
                    }
                }
                () = tokio::time::sleep_until(deadline) => return,
                () = &mut ending => return,
                () = tx.closed() => return,
            }
        }
    });
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<Bytes, Infallible>(b), rx))
    });
    watch_response(Body::from_stream(stream))
}

/// Resolves once the server ends its watches (never if that sender is gone).
async fn watches_end(mut end: tokio::sync::watch::Receiver<bool>) {
    loop {
        let ended = *end.borrow_and_update();
        if ended {
            return;
        }
        if end.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

fn watch_response(body: Body) -> Response {
    let mut resp = Response::new(body);
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp.headers_mut().insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("no-cache, private"),
    );
    resp
}
