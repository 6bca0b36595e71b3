//! The router in-process: discovery, OpenAPI, list/get/watch with JSON and Table, selectors,
//! paging, Status errors, authentication (the TLS layer's verified certificate arrives as a
//! request extension) and authorization.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, Response, StatusCode, header};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tower::ServiceExt;
use vm_dhcp_apiserver::auth::{
    Attributes, Authorizer, AuthzFuture, CachedAuthorizer, Decision, UserInfo, VerifiedClientCert,
};
use vm_dhcp_apiserver::{ApiServer, Change, Engine, SourceKind, SourceObject, router};
use vm_dhcp_core::crd::{IPPool, IPPoolAddress};
use vm_dhcp_core::store::{Holding, address_object};

const GV: &str = "/apis/dhcp.harvesterhci.io/v1alpha1";
const TABLE: &str = "application/json;as=Table;v=v1;g=meta.k8s.io,application/json;as=Table;v=v1beta1;g=meta.k8s.io,application/json";
const STEVE_TABLE: &str = "application/json;as=Table;v=v1;g=meta.k8s.io";

/// Allows everyone except the users named, and counts the calls.
struct Table {
    denied: BTreeSet<String>,
    calls: AtomicUsize,
}

impl Authorizer for Table {
    fn authorize<'a>(&'a self, user: &'a UserInfo, _attrs: &'a Attributes) -> AuthzFuture<'a> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        let allowed = !self.denied.contains(&user.name);
        Box::pin(async move {
            Ok(Decision {
                allowed,
                reason: if allowed {
                    String::new()
                } else {
                    "no RBAC policy matched".into()
                },
            })
        })
    }
}

const K: u64 = vm_dhcp_apiserver::store::VERSIONS_PER_REVISION;

/// The list version after revision `r` (every write up to `r` applied).
fn listed(r: u64) -> String {
    vm_dhcp_apiserver::store::list_version(r).to_string()
}

/// Pool default/net-48: .12 excluded, the router .13 reserved (the server IP .2 is outside
/// the range). Its status is empty: the views come from the address objects.
fn pool(rv: u64) -> IPPool {
    serde_json::from_value(json!({
        "apiVersion": "network.harvesterhci.io/v1alpha1", "kind": "IPPool",
        "metadata": {"name": "net-48", "namespace": "default", "resourceVersion": rv.to_string()},
        "spec": {"networkName": "default/net-48", "ipv4Config": {"cidr": "192.168.48.0/24",
            "serverIP": "192.168.48.2", "router": "192.168.48.13",
            "pool": {"start": "192.168.48.10", "end": "192.168.48.20",
                     "exclude": ["192.168.48.12"]}}}
    }))
    .expect("pool")
}

fn other_pool() -> IPPool {
    serde_json::from_value(json!({
        "apiVersion": "network.harvesterhci.io/v1alpha1", "kind": "IPPool",
        "metadata": {"name": "net-9", "namespace": "other", "resourceVersion": "90"},
        "spec": {"networkName": "other/net-9", "ipv4Config": {"cidr": "10.9.0.0/24",
            "serverIP": "10.9.0.2", "pool": {"start": "10.9.0.10", "end": "10.9.0.20"}}}
    }))
    .expect("pool")
}

/// The address object of `ip` in `<ns>/<pool>` held by `mac`, written at revision `rv`.
fn address_in(
    ns: &str,
    pool: &str,
    rv: u64,
    ip: &str,
    mac: &str,
    owner: Option<&str>,
    static_: bool,
) -> IPPoolAddress {
    let h = Holding {
        ip: ip.parse().expect("ip"),
        mac: mac.parse().expect("mac"),
        owner: owner.map(str::to_string),
        static_,
        interface: None,
    };
    let mut obj = address_object(ns, pool, &format!("{ns}/{pool}"), &h);
    obj.metadata.resource_version = Some(rv.to_string());
    obj
}

fn address(rv: u64, ip: &str, mac: &str, owner: Option<&str>, static_: bool) -> IPPoolAddress {
    address_in("default", "net-48", rv, ip, mac, owner, static_)
}

/// vm1 on .10 (dynamic), vm2 on .11 (static), and one allocation in other/net-9.
fn base_addresses() -> Vec<IPPoolAddress> {
    vec![
        address(
            95,
            "192.168.48.10",
            "52:54:00:00:00:01",
            Some("default/vm1"),
            false,
        ),
        address(
            96,
            "192.168.48.11",
            "52:54:00:00:00:02",
            Some("default/vm2"),
            true,
        ),
        address_in(
            "other",
            "net-9",
            91,
            "10.9.0.10",
            "52:54:00:00:09:01",
            None,
            false,
        ),
    ]
}

/// A write of an address object at its revision, and both watches past it.
fn write(engine: &Engine, change: Change, rev: u64) {
    engine.apply(vec![
        change,
        Change::Progress(SourceKind::Pools, rev),
        Change::Progress(SourceKind::Addresses, rev),
    ]);
}

struct Fixture {
    engine: Arc<Engine>,
    authz: Arc<Table>,
    server: Arc<ApiServer>,
}

fn synced_engine() -> Arc<Engine> {
    let engine = Arc::new(Engine::default());
    engine.apply(vec![
        Change::Snapshot {
            revision: 100,
            pools: vec![pool(100), other_pool()],
            addresses: base_addresses(),
        },
        Change::Agents(vec![]),
    ]);
    engine
}

fn fixture_with(engine: Arc<Engine>) -> Fixture {
    let authz = Arc::new(Table {
        denied: BTreeSet::from(["mallory".to_string()]),
        calls: AtomicUsize::new(0),
    });
    let mut server = ApiServer::new(engine.clone(), authz.clone());
    server.bookmark_interval = Duration::from_millis(100);
    {
        let mut config = server.request_header.write().expect("lock");
        config.allowed_names = vec!["front-proxy-client".into()];
    }
    Fixture {
        engine,
        authz,
        server: Arc::new(server),
    }
}

fn fixture() -> Fixture {
    fixture_with(synced_engine())
}

/// A request as the aggregator sends it: verified front-proxy certificate, user headers.
fn as_user(path: &str, user: &str, accept: Option<&str>) -> Request<Body> {
    let mut req = Request::get(path)
        .header("X-Remote-User", user)
        .header("X-Remote-Group", "system:authenticated");
    if let Some(a) = accept {
        req = req.header(header::ACCEPT, a);
    }
    let mut req = req.body(Body::empty()).expect("request");
    req.extensions_mut().insert(VerifiedClientCert {
        common_name: "front-proxy-client".into(),
    });
    req
}

async fn send(f: &Fixture, req: Request<Body>) -> Response<Body> {
    router(f.server.clone())
        .oneshot(req)
        .await
        .expect("router answers")
}

async fn body_json(resp: Response<Body>) -> Value {
    let bytes = resp.into_body().collect().await.expect("body").to_bytes();
    serde_json::from_slice(&bytes)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&bytes)))
}

async fn get(f: &Fixture, path: &str, accept: Option<&str>) -> (StatusCode, Value) {
    let resp = send(f, as_user(path, "alice", accept)).await;
    let code = resp.status();
    (code, body_json(resp).await)
}

fn assert_status(doc: &Value, code: u16, reason: &str) {
    assert_eq!(doc["kind"], "Status", "{doc}");
    assert_eq!(doc["apiVersion"], "v1");
    assert_eq!(doc["status"], "Failure");
    assert_eq!(doc["code"], code, "{doc}");
    assert_eq!(doc["reason"], reason, "{doc}");
    assert!(
        doc["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{doc}"
    );
}

/// Reads newline-delimited events from a watch body until `n` arrived (generous deadline).
struct Lines {
    body: Body,
    buf: Vec<u8>,
}

impl Lines {
    async fn next_events(&mut self, n: usize) -> Vec<Value> {
        let mut out = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while out.len() < n {
            while let Some(pos) = self.buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=pos).collect();
                let v: Value =
                    serde_json::from_slice(&line[..line.len() - 1]).unwrap_or_else(|e| {
                        panic!("watch line is not one JSON object ({e}): {line:?}")
                    });
                out.push(v);
                if out.len() == n {
                    return out;
                }
            }
            let frame = tokio::time::timeout_at(deadline, self.body.frame())
                .await
                .unwrap_or_else(|_| panic!("only {} of {n} events within 10 s: {out:?}", out.len()))
                .expect("stream still open")
                .expect("frame");
            if let Ok(data) = frame.into_data() {
                self.buf.extend_from_slice(&data);
            }
        }
        out
    }
}

async fn watch(f: &Fixture, path: &str, accept: Option<&str>) -> Lines {
    let resp = send(f, as_user(path, "alice", accept)).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(
        resp.headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok()),
        Some("application/json")
    );
    assert!(
        resp.headers().get(header::CONTENT_LENGTH).is_none(),
        "a watch is streamed"
    );
    Lines {
        body: resp.into_body(),
        buf: Vec::new(),
    }
}

// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn legacy_discovery_documents() {
    let f = fixture();
    let (code, doc) = get(&f, "/apis", None).await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(doc["kind"], "APIGroupList");
    assert_eq!(doc["groups"][0]["name"], "dhcp.harvesterhci.io");
    let (_, doc) = get(&f, "/apis/dhcp.harvesterhci.io", None).await;
    assert_eq!(doc["kind"], "APIGroup");
    assert_eq!(
        doc["preferredVersion"]["groupVersion"],
        "dhcp.harvesterhci.io/v1alpha1"
    );
    let (code, doc) = get(&f, GV, None).await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(doc["kind"], "APIResourceList");
    assert_eq!(doc["groupVersion"], "dhcp.harvesterhci.io/v1alpha1");
    let names: Vec<&str> = doc["resources"]
        .as_array()
        .expect("resources")
        .iter()
        .map(|r| r["name"].as_str().expect("name"))
        .collect();
    assert_eq!(names, vec!["ipamallocations", "macaddresses", "dhcpleases"]);
    for r in doc["resources"].as_array().expect("resources") {
        assert_eq!(r["namespaced"], true);
        assert_eq!(r["verbs"], json!(["get", "list", "watch"]), "read-only");
    }
    let (code, _) = get(&f, "/apis/network.harvesterhci.io/v1alpha1", None).await;
    assert_eq!(
        code,
        StatusCode::NOT_FOUND,
        "the CRD group is never served here"
    );
}

#[tokio::test]
async fn aggregated_discovery_v2_with_its_content_type_and_etag() {
    let f = fixture();
    let accept = "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList,application/json;g=apidiscovery.k8s.io;v=v2beta1;as=APIGroupDiscoveryList,application/json";
    let resp = send(&f, as_user("/apis", "system:kube-aggregator", Some(accept))).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(
        resp.headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok()),
        Some("application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList"),
        "the aggregator uses v2 only when the Content-Type carries the parameters"
    );
    let etag = resp
        .headers()
        .get(header::ETAG)
        .expect("etag")
        .to_str()
        .expect("ascii")
        .to_string();
    let doc = body_json(resp).await;
    assert_eq!(doc["kind"], "APIGroupDiscoveryList");
    assert_eq!(doc["apiVersion"], "apidiscovery.k8s.io/v2");
    let v = &doc["items"][0]["versions"][0];
    assert_eq!(doc["items"][0]["metadata"]["name"], "dhcp.harvesterhci.io");
    assert_eq!(v["version"], "v1alpha1");
    assert_eq!(v["freshness"], "Current");
    assert_eq!(v["resources"][0]["resource"], "ipamallocations");
    assert_eq!(v["resources"][0]["scope"], "Namespaced");
    assert_eq!(v["resources"][0]["responseKind"]["kind"], "IPAMAllocation");
    let mut again = as_user("/apis", "system:kube-aggregator", Some(accept));
    again
        .headers_mut()
        .insert(header::IF_NONE_MATCH, etag.parse().expect("header"));
    assert_eq!(send(&f, again).await.status(), StatusCode::NOT_MODIFIED);
    // Only v2beta1 asked for: the legacy document (the aggregator then falls back).
    let (_, doc) = get(
        &f,
        "/apis",
        Some("application/json;g=apidiscovery.k8s.io;v=v2beta1;as=APIGroupDiscoveryList,application/json"),
    )
    .await;
    assert_eq!(doc["kind"], "APIGroupList");
}

#[tokio::test]
async fn openapi_v2_and_v3_describe_every_served_field() {
    let f = fixture();
    let (code, root) = get(&f, "/openapi/v3", None).await;
    assert_eq!(code, StatusCode::OK);
    let url = root["paths"]["apis/dhcp.harvesterhci.io/v1alpha1"]["serverRelativeURL"]
        .as_str()
        .expect("serverRelativeURL");
    assert!(url.starts_with("/openapi/v3/apis/dhcp.harvesterhci.io/v1alpha1?hash="));
    let (code, v3) = get(&f, url, None).await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(v3["openapi"], "3.0.0");
    let schemas = &v3["components"]["schemas"];
    let (code, v2) = get(&f, "/openapi/v2", None).await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(v2["swagger"], "2.0");
    // Every field of every served object is in the schema of its kind (kubectl explain).
    for (plural, kind) in [
        ("ipamallocations", "IPAMAllocation"),
        ("macaddresses", "MACAddress"),
    ] {
        let (_, list) = get(&f, &format!("{GV}/{plural}"), None).await;
        let name = format!("io.harvesterhci.dhcp.v1alpha1.{kind}");
        for schema in [&schemas[&name], &v2["definitions"][&name]] {
            assert_eq!(
                schema["x-kubernetes-group-version-kind"][0]["kind"], kind,
                "{name}"
            );
            for item in list["items"].as_array().expect("items") {
                for field in item.as_object().expect("object").keys() {
                    assert!(
                        schema["properties"].get(field).is_some(),
                        "{kind}.{field} is served but not in the OpenAPI schema"
                    );
                }
            }
        }
    }
    assert!(
        schemas
            .get("io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta")
            .is_some(),
        "the v3 document stands alone"
    );
}

#[tokio::test]
async fn list_has_numeric_versions_and_full_items() {
    let f = fixture();
    let (code, list) = get(&f, &format!("{GV}/ipamallocations"), None).await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(list["kind"], "IPAMAllocationList");
    assert_eq!(list["apiVersion"], "dhcp.harvesterhci.io/v1alpha1");
    assert_eq!(
        list["metadata"]["resourceVersion"],
        listed(100).as_str(),
        "the snapshot's revision 100: 100 × 2^17 + (2^17 - 2^10)"
    );
    let items = list["items"].as_array().expect("items");
    assert_eq!(items.len(), 5, "4 in default/net-48, 1 in other/net-9");
    for item in items {
        assert_eq!(item["kind"], "IPAMAllocation");
        assert_eq!(item["apiVersion"], "dhcp.harvesterhci.io/v1alpha1");
        let rv = item["metadata"]["resourceVersion"].as_str().expect("rv");
        assert!(rv.parse::<u64>().is_ok(), "numeric: {rv}");
    }
    let static_one = items
        .iter()
        .find(|i| i["metadata"]["name"] == "net-48.192-168-48-11")
        .expect("static allocation");
    assert_eq!(static_one["state"], "static");
    assert_eq!(static_one["owner"], "default/vm2");
    assert_eq!(
        static_one["metadata"]["resourceVersion"],
        (96 * K).to_string().as_str(),
        "its address object's revision 96 × 2^17"
    );
    assert_eq!(static_one["interface"], Value::Null);
    assert!(
        static_one.get("interface").is_none(),
        "absent, not null, when unknown"
    );
    let (_, ns_list) = get(&f, &format!("{GV}/namespaces/other/ipamallocations"), None).await;
    assert_eq!(ns_list["items"].as_array().map(Vec::len), Some(1));
    let (_, macs) = get(&f, &format!("{GV}/namespaces/default/macaddresses"), None).await;
    assert_eq!(
        macs["items"][0]["metadata"]["name"],
        "net-48.52-54-00-00-00-01"
    );
}

#[tokio::test]
async fn table_output_with_each_include_object() {
    let f = fixture();
    let path = format!("{GV}/namespaces/default/ipamallocations");
    let (code, t) = get(&f, &path, Some(TABLE)).await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(t["kind"], "Table");
    assert_eq!(t["apiVersion"], "meta.k8s.io/v1");
    let cols: Vec<&str> = t["columnDefinitions"]
        .as_array()
        .expect("columns")
        .iter()
        .map(|c| c["name"].as_str().expect("name"))
        .collect();
    assert_eq!(&cols[..5], &["Name", "Address", "MAC", "State", "Owner"]);
    assert_eq!(t["columnDefinitions"][0]["format"], "name");
    assert_eq!(
        t["columnDefinitions"][5]["priority"], 1,
        "Pool only in -o wide"
    );
    let first = &t["rows"][0];
    assert_eq!(
        first["cells"],
        json!([
            "net-48.192-168-48-10",
            "192.168.48.10",
            "52:54:00:00:00:01",
            "allocated",
            "default/vm1",
            "net-48",
            "default/net-48",
            "<none>"
        ])
    );
    assert_eq!(
        first["object"]["kind"], "PartialObjectMetadata",
        "default Metadata"
    );
    assert_eq!(first["object"]["metadata"]["namespace"], "default");
    let (_, t) = get(
        &f,
        &format!("{path}?includeObject=Object"),
        Some(STEVE_TABLE),
    )
    .await;
    assert_eq!(t["rows"][0]["object"]["kind"], "IPAMAllocation");
    assert_eq!(t["rows"][0]["object"]["address"], "192.168.48.10");
    let (_, t) = get(&f, &format!("{path}?includeObject=None"), Some(STEVE_TABLE)).await;
    assert!(t["rows"][0].get("object").is_none());
    let (code, doc) = get(&f, &format!("{path}?includeObject=All"), Some(STEVE_TABLE)).await;
    assert_eq!(code, StatusCode::BAD_REQUEST);
    assert_status(&doc, 400, "BadRequest");
    // A single object as a one-row Table.
    let (_, t) = get(&f, &format!("{path}/net-48.192-168-48-12"), Some(TABLE)).await;
    assert_eq!(t["rows"].as_array().map(Vec::len), Some(1));
    assert_eq!(t["rows"][0]["cells"][3], "excluded");
    // PartialObjectMetadataList, as client-go's metadata informers ask.
    let (_, m) = get(
        &f,
        &path,
        Some("application/json;as=PartialObjectMetadataList;v=v1;g=meta.k8s.io"),
    )
    .await;
    assert_eq!(m["kind"], "PartialObjectMetadataList");
    assert_eq!(m["items"][0]["kind"], "PartialObjectMetadata");
}

async fn names(f: &Fixture, query: &str) -> Vec<String> {
    let (code, list) = get(f, &format!("{GV}/ipamallocations?{query}"), None).await;
    assert_eq!(code, StatusCode::OK, "{query}: {list}");
    list["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|i| i["metadata"]["name"].as_str().expect("name").to_string())
        .collect()
}

#[tokio::test]
async fn label_and_field_selectors_narrow_the_list() {
    let f = fixture();
    assert_eq!(
        names(&f, "labelSelector=dhcp.harvesterhci.io/state%3Dstatic").await,
        vec!["net-48.192-168-48-11"]
    );
    assert_eq!(
        names(
            &f,
            "labelSelector=dhcp.harvesterhci.io/state%20in%20(reserved,excluded)"
        )
        .await,
        vec!["net-48.192-168-48-12", "net-48.192-168-48-13"]
    );
    assert_eq!(
        names(&f, "labelSelector=dhcp.harvesterhci.io/pool!%3Dnet-48").await,
        vec!["net-9.10-9-0-10"]
    );
    assert_eq!(
        names(&f, "labelSelector=!dhcp.harvesterhci.io/mac")
            .await
            .len(),
        2,
        "reserved and excluded have no MAC"
    );
    // Field selectors: MACs match whatever their case or separator.
    assert_eq!(
        names(&f, "fieldSelector=mac%3D52-54-00-00-00-02").await,
        vec!["net-48.192-168-48-11"]
    );
    assert_eq!(
        names(&f, "fieldSelector=network%3Dother/net-9").await,
        vec!["net-9.10-9-0-10"]
    );
    assert_eq!(
        names(&f, "fieldSelector=pool%3Dnet-48,state!%3Dallocated")
            .await
            .len(),
        3
    );
    assert_eq!(
        names(&f, "fieldSelector=metadata.name%3Dnet-48.192-168-48-13").await,
        vec!["net-48.192-168-48-13"]
    );
    let (code, doc) = get(
        &f,
        &format!("{GV}/ipamallocations?labelSelector=a%20in%20b"),
        None,
    )
    .await;
    assert_eq!(code, StatusCode::BAD_REQUEST);
    assert_status(&doc, 400, "BadRequest");
    let (code, doc) = get(
        &f,
        &format!("{GV}/ipamallocations?fieldSelector=spec.color%3Dred"),
        None,
    )
    .await;
    assert_eq!(code, StatusCode::BAD_REQUEST);
    assert!(
        doc["message"]
            .as_str()
            .is_some_and(|m| m.contains("field label not supported: spec.color")),
        "{doc}"
    );
}

#[tokio::test]
async fn limit_and_continue_page_through_everything_once() {
    let f = fixture();
    let mut seen = Vec::new();
    let mut next = String::new();
    let mut pages = 0;
    loop {
        let path = if next.is_empty() {
            format!("{GV}/ipamallocations?limit=2")
        } else {
            format!("{GV}/ipamallocations?limit=2&continue={next}")
        };
        let (code, list) = get(&f, &path, None).await;
        assert_eq!(code, StatusCode::OK, "{list}");
        assert_eq!(
            list["metadata"]["resourceVersion"],
            listed(100).as_str(),
            "one version for all pages"
        );
        pages += 1;
        for i in list["items"].as_array().expect("items") {
            seen.push(i["metadata"]["name"].as_str().expect("name").to_string());
        }
        match list["metadata"]["continue"].as_str() {
            Some(c) => next = c.to_string(),
            None => break,
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(seen, names(&f, "").await, "every item once, in order");
    let (code, doc) = get(
        &f,
        &format!("{GV}/ipamallocations?limit=2&continue=garbage"),
        None,
    )
    .await;
    assert_eq!(code, StatusCode::BAD_REQUEST);
    assert_status(&doc, 400, "BadRequest");
}

#[tokio::test]
async fn resource_version_semantics_of_list() {
    let f = fixture();
    let base = format!("{GV}/ipamallocations");
    let (code, _) = get(&f, &format!("{base}?resourceVersion=0"), None).await;
    assert_eq!(code, StatusCode::OK);
    let (code, _) = get(
        &f,
        &format!(
            "{base}?resourceVersion={}&resourceVersionMatch=Exact",
            listed(100)
        ),
        None,
    )
    .await;
    assert_eq!(code, StatusCode::OK);
    let (code, doc) = get(
        &f,
        &format!("{base}?resourceVersion=7&resourceVersionMatch=Exact"),
        None,
    )
    .await;
    assert_eq!(code, StatusCode::GONE);
    assert_status(&doc, 410, "Expired");
    let (code, doc) = get(&f, &format!("{base}?resourceVersion=abc"), None).await;
    assert_eq!(code, StatusCode::BAD_REQUEST);
    assert_status(&doc, 400, "BadRequest");
    let (code, doc) = get(&f, &format!("{base}?resourceVersionMatch=Bogus"), None).await;
    assert_eq!(code, StatusCode::BAD_REQUEST);
    assert_status(&doc, 400, "BadRequest");
    assert!(
        doc["message"].as_str().is_some_and(|m| m.contains("Bogus")),
        "{doc}"
    );
}

#[tokio::test]
async fn get_and_not_found() {
    let f = fixture();
    let (code, obj) = get(
        &f,
        &format!("{GV}/namespaces/default/ipamallocations/net-48.192-168-48-10"),
        None,
    )
    .await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(obj["kind"], "IPAMAllocation");
    assert_eq!(obj["mac"], "52:54:00:00:00:01");
    assert_eq!(
        obj["metadata"]["labels"]["dhcp.harvesterhci.io/network"],
        "net-48"
    );
    let (code, doc) = get(
        &f,
        &format!("{GV}/namespaces/default/ipamallocations/nope"),
        None,
    )
    .await;
    assert_eq!(code, StatusCode::NOT_FOUND);
    assert_status(&doc, 404, "NotFound");
    assert_eq!(
        doc["message"],
        "ipamallocations.dhcp.harvesterhci.io \"nope\" not found"
    );
    assert_eq!(doc["details"]["name"], "nope");
    let (code, doc) = get(&f, &format!("{GV}/namespaces/default/widgets"), None).await;
    assert_eq!(code, StatusCode::NOT_FOUND);
    assert_status(&doc, 404, "NotFound");
}

#[tokio::test]
async fn writes_and_unacceptable_media_get_status_errors() {
    let f = fixture();
    for method in ["POST", "PUT", "PATCH", "DELETE"] {
        let mut req = as_user(
            &format!("{GV}/namespaces/default/ipamallocations/net-48.192-168-48-10"),
            "alice",
            None,
        );
        *req.method_mut() = method.parse().expect("method");
        let resp = send(&f, req).await;
        assert_eq!(resp.status(), StatusCode::METHOD_NOT_ALLOWED, "{method}");
        assert_status(&body_json(resp).await, 405, "MethodNotAllowed");
    }
    let (code, doc) = get(
        &f,
        &format!("{GV}/ipamallocations"),
        Some("application/vnd.kubernetes.protobuf"),
    )
    .await;
    assert_eq!(code, StatusCode::NOT_ACCEPTABLE);
    assert_status(&doc, 406, "NotAcceptable");
    // Protobuf first with JSON offered too, as client-go sends: JSON.
    let (code, _) = get(
        &f,
        &format!("{GV}/ipamallocations"),
        Some("application/vnd.kubernetes.protobuf,application/json"),
    )
    .await;
    assert_eq!(code, StatusCode::OK);
}

#[tokio::test]
async fn authentication_needs_the_verified_front_proxy_certificate() {
    let f = fixture();
    // Headers without a certificate are not trusted: 401 even for system:masters.
    let req = Request::get(GV)
        .header("X-Remote-User", "admin")
        .header("X-Remote-Group", "system:masters")
        .body(Body::empty())
        .expect("request");
    let resp = send(&f, req).await;
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    assert_status(&body_json(resp).await, 401, "Unauthorized");
    // A certificate from the right CA but with a name not allowed: 401.
    let mut req = as_user(GV, "admin", None);
    req.extensions_mut().insert(VerifiedClientCert {
        common_name: "not-the-proxy".into(),
    });
    assert_eq!(send(&f, req).await.status(), StatusCode::UNAUTHORIZED);
    // The right certificate but no user header: 401.
    let mut req = Request::get(GV).body(Body::empty()).expect("request");
    req.extensions_mut().insert(VerifiedClientCert {
        common_name: "front-proxy-client".into(),
    });
    assert_eq!(send(&f, req).await.status(), StatusCode::UNAUTHORIZED);
    // Probes need nothing.
    for path in ["/healthz", "/readyz", "/livez"] {
        let req = Request::get(path).body(Body::empty()).expect("request");
        assert_eq!(send(&f, req).await.status(), StatusCode::OK, "{path}");
    }
    let (code, _) = get(&f, GV, None).await;
    assert_eq!(code, StatusCode::OK);
}

#[tokio::test]
async fn authorization_denies_with_the_kubernetes_message_and_caches() {
    let f = fixture();
    let resp = send(
        &f,
        as_user(
            &format!("{GV}/namespaces/default/ipamallocations"),
            "mallory",
            None,
        ),
    )
    .await;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    let doc = body_json(resp).await;
    assert_status(&doc, 403, "Forbidden");
    assert!(
        doc["message"].as_str().is_some_and(|m| m.starts_with(
            "ipamallocations.dhcp.harvesterhci.io is forbidden: User \"mallory\" cannot list resource \"ipamallocations\" in API group \"dhcp.harvesterhci.io\" in the namespace \"default\""
        )),
        "{doc}"
    );
    // The cache: one SubjectAccessReview for repeated identical requests; masters skip it.
    let inner = Arc::new(Table {
        denied: BTreeSet::new(),
        calls: AtomicUsize::new(0),
    });
    let cached = CachedAuthorizer::new(inner.clone(), Duration::from_secs(10));
    let user = UserInfo {
        name: "alice".into(),
        groups: vec!["system:authenticated".into()],
        ..Default::default()
    };
    let attrs = Attributes::Resource {
        verb: "list".into(),
        namespace: "default".into(),
        resource: "ipamallocations".into(),
        name: String::new(),
    };
    for _ in 0..3 {
        assert!(
            cached
                .authorize(&user, &attrs)
                .await
                .expect("decision")
                .allowed
        );
    }
    assert_eq!(inner.calls.load(Ordering::Relaxed), 1);
    let admin = UserInfo {
        name: "admin".into(),
        groups: vec!["system:masters".into()],
        ..Default::default()
    };
    assert!(
        cached
            .authorize(&admin, &attrs)
            .await
            .expect("decision")
            .allowed
    );
    assert_eq!(
        inner.calls.load(Ordering::Relaxed),
        1,
        "system:masters needs no SAR"
    );
    assert!(f.authz.calls.load(Ordering::Relaxed) >= 1);
}

#[tokio::test]
async fn not_ready_until_every_source_is_listed() {
    let engine = Arc::new(Engine::default());
    engine.apply(vec![Change::Snapshot {
        revision: 100,
        pools: vec![pool(100)],
        addresses: base_addresses(),
    }]);
    let f = fixture_with(engine.clone());
    let req = Request::get("/readyz")
        .body(Body::empty())
        .expect("request");
    let resp = send(&f, req).await;
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    let (code, doc) = get(&f, &format!("{GV}/ipamallocations"), None).await;
    assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
    assert_status(&doc, 503, "ServiceUnavailable");
    engine.apply(vec![Change::Agents(vec![])]);
    let req = Request::get("/readyz")
        .body(Body::empty())
        .expect("request");
    assert_eq!(send(&f, req).await.status(), StatusCode::OK);
}

#[tokio::test]
async fn watch_streams_lines_and_resumes_from_a_version() {
    let f = fixture();
    let mut w = watch(
        &f,
        &format!("{GV}/namespaces/default/ipamallocations?watch=true"),
        None,
    )
    .await;
    let initial = w.next_events(4).await;
    assert!(initial.iter().all(|e| e["type"] == "ADDED"));
    assert_eq!(initial[0]["object"]["kind"], "IPAMAllocation");
    // A new allocation: its address object created at revision 130.
    let new = || address(130, "192.168.48.14", "52:54:00:00:00:03", None, false);
    write(&f.engine, Change::Apply(SourceObject::Address(new())), 130);
    let ev = w.next_events(1).await;
    assert_eq!(ev[0]["type"], "ADDED");
    assert_eq!(ev[0]["object"]["metadata"]["name"], "net-48.192-168-48-14");
    let added = (130 * K).to_string();
    assert_eq!(
        ev[0]["object"]["metadata"]["resourceVersion"],
        added.as_str(),
        "revision 130 × 2^17"
    );
    // Released (deleted) at 140.
    let mut gone = new();
    gone.metadata.resource_version = Some("140".into());
    write(&f.engine, Change::Delete(SourceObject::Address(gone)), 140);
    let ev = w.next_events(1).await;
    assert_eq!(ev[0]["type"], "DELETED");
    assert_eq!(
        ev[0]["object"]["metadata"]["resourceVersion"],
        (140 * K).to_string().as_str()
    );
    // Another watcher resumes from the ADDED event: only what came after.
    let mut resumed = watch(
        &f,
        &format!("{GV}/ipamallocations?watch=1&resourceVersion={added}"),
        None,
    )
    .await;
    let ev = resumed.next_events(1).await;
    assert_eq!(ev[0]["type"], "DELETED");
    assert_eq!(ev[0]["object"]["metadata"]["name"], "net-48.192-168-48-14");
    // Older than what the server remembers: an ERROR event with 410.
    let mut old = watch(
        &f,
        &format!("{GV}/ipamallocations?watch=1&resourceVersion=5"),
        None,
    )
    .await;
    let ev = old.next_events(1).await;
    assert_eq!(ev[0]["type"], "ERROR");
    assert_status(&ev[0]["object"], 410, "Expired");
}

#[tokio::test]
async fn watch_with_a_selector_turns_leaving_objects_into_deleted() {
    let f = fixture();
    let mut w = watch(
        &f,
        &format!(
            "{GV}/ipamallocations?watch=true&labelSelector=dhcp.harvesterhci.io/state%3Dallocated"
        ),
        None,
    )
    .await;
    let initial = w.next_events(2).await;
    assert_eq!(initial.len(), 2);
    // vm1's address object becomes static: it leaves the selection.
    let now_static = address(
        150,
        "192.168.48.10",
        "52:54:00:00:00:01",
        Some("default/vm1"),
        true,
    );
    write(
        &f.engine,
        Change::Apply(SourceObject::Address(now_static)),
        150,
    );
    let ev = w.next_events(1).await;
    assert_eq!(ev[0]["type"], "DELETED");
    assert_eq!(ev[0]["object"]["metadata"]["name"], "net-48.192-168-48-10");
    assert_eq!(
        ev[0]["object"]["metadata"]["resourceVersion"],
        (150 * K).to_string().as_str()
    );
}

#[tokio::test]
async fn steve_table_watch_with_objects_and_bookmarks() {
    let f = fixture();
    let mut w = watch(
        &f,
        &format!("{GV}/namespaces/default/ipamallocations?watch=true&includeObject=Object&allowWatchBookmarks=true"),
        Some(STEVE_TABLE),
    )
    .await;
    let events = w.next_events(2).await;
    assert_eq!(events[0]["object"]["kind"], "Table");
    assert!(
        events[0]["object"]["columnDefinitions"].is_array(),
        "first event has the columns"
    );
    assert!(
        events[1]["object"].get("columnDefinitions").is_none(),
        "later ones reuse them"
    );
    assert_eq!(
        events[0]["object"]["rows"][0]["object"]["kind"],
        "IPAMAllocation"
    );
    assert!(events[1]["object"]["rows"][0]["cells"].is_array());
    // Bookmarks arrive (every 100 ms in this fixture) with a numeric version.
    let rest = w.next_events(3).await;
    let bookmark = rest
        .iter()
        .find(|e| e["type"] == "BOOKMARK")
        .expect("a bookmark");
    let rv = bookmark["object"]["metadata"]["resourceVersion"]
        .as_str()
        .expect("rv");
    assert!(rv.parse::<u64>().is_ok());
}

#[tokio::test]
async fn send_initial_events_ends_with_an_annotated_bookmark() {
    let f = fixture();
    let mut w = watch(
        &f,
        &format!("{GV}/namespaces/other/ipamallocations?watch=true&sendInitialEvents=true&allowWatchBookmarks=true&resourceVersionMatch=NotOlderThan"),
        None,
    )
    .await;
    let events = w.next_events(2).await;
    assert_eq!(events[0]["type"], "ADDED");
    assert_eq!(events[1]["type"], "BOOKMARK");
    assert_eq!(
        events[1]["object"]["metadata"]["annotations"]["k8s.io/initial-events-end"],
        "true"
    );
}

#[tokio::test]
async fn lease_view_from_the_agent_document() {
    let f = fixture();
    let doc = serde_json::from_value(json!({
        "pool": "default/net-48", "agent": "default-net-48-agent", "active": true, "serverIP": "192.168.48.2",
        "items": [{"address": "192.168.48.10", "mac": "52:54:00:00:00:01", "state": "bound",
                   "leaseStart": "2026-11-27T10:00:00Z", "expiry": "2026-11-27T11:00:00Z",
                   "lastSeen": "2026-11-27T10:00:00Z", "declines": 0}]
    }))
    .expect("agent doc");
    f.engine.apply(vec![Change::Leases(
        ("default".into(), "net-48".into()),
        Some(doc),
    )]);
    let (code, t) = get(
        &f,
        &format!("{GV}/namespaces/default/dhcpleases"),
        Some(TABLE),
    )
    .await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(
        t["rows"][0]["cells"],
        json!([
            "net-48.192-168-48-10",
            "192.168.48.10",
            "52:54:00:00:00:01",
            "bound",
            "2026-11-27T11:00:00Z",
            "2026-11-27T10:00:00Z",
            "2026-11-27T10:00:00Z",
            "default-net-48-agent"
        ])
    );
    let rv: u64 = t["metadata"]["resourceVersion"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .expect("numeric rv");
    assert!(
        rv > 1_700_000_000_000_000,
        "lease versions are clock microseconds: {rv}"
    );
}

#[tokio::test]
async fn a_watch_on_one_object_takes_any_name_literally() {
    let f = fixture();
    // The name is pinned with an escaped field selector: commas and '=' are no syntax.
    let mut w = watch(
        &f,
        &format!("{GV}/namespaces/default/ipamallocations/a,b=c?watch=true"),
        None,
    )
    .await;
    assert!(
        tokio::time::timeout(Duration::from_millis(300), w.next_events(1))
            .await
            .is_err(),
        "no object has that name: no event"
    );
    let mut one = watch(
        &f,
        &format!("{GV}/namespaces/default/ipamallocations/net-48.192-168-48-10?watch=true"),
        None,
    )
    .await;
    let ev = one.next_events(1).await;
    assert_eq!(ev[0]["object"]["metadata"]["name"], "net-48.192-168-48-10");
}

#[tokio::test]
async fn a_watch_resumed_ahead_of_this_replica_sends_only_later_changes() {
    // Another replica already streamed the first two changes of revision 110 (versions agree
    // across replicas); this one has not seen revision 110 yet.
    let f = fixture();
    let seen = 110 * K + 1;
    let mut w = watch(
        &f,
        &format!("{GV}/namespaces/other/ipamallocations?watch=true&resourceVersion={seen}"),
        None,
    )
    .await;
    // Revision 110: other/net-9's spec excludes three free addresses, three rows at once.
    let mut excluding = other_pool();
    excluding.metadata.resource_version = Some("110".into());
    if let Some(c) = excluding.spec.ipv4_config.as_mut() {
        c.pool.exclude = Some(vec![
            "10.9.0.14".into(),
            "10.9.0.15".into(),
            "10.9.0.16".into(),
        ]);
    }
    write(&f.engine, Change::Apply(SourceObject::Pool(excluding)), 110);
    let ev = w.next_events(1).await;
    assert_eq!(ev[0]["object"]["metadata"]["name"], "net-9.10-9-0-16");
    assert_eq!(ev[0]["object"]["state"], "excluded");
    assert_eq!(
        ev[0]["object"]["metadata"]["resourceVersion"],
        (seen + 1).to_string()
    );
}

#[tokio::test]
async fn open_watches_end_cleanly_when_the_server_shuts_down() {
    let f = fixture();
    let mut w = watch(
        &f,
        &format!("{GV}/namespaces/other/ipamallocations?watch=true&allowWatchBookmarks=true"),
        None,
    )
    .await;
    assert_eq!(w.next_events(1).await[0]["type"], "ADDED");
    f.server.end_watches.send_replace(true);
    // The response completes (its client watches again from its last version elsewhere)
    // instead of staying open until the connection is cut.
    let end = tokio::time::timeout(Duration::from_secs(2), async {
        loop {
            match w.body.frame().await {
                None => return Ok(()),
                Some(Err(e)) => return Err(e.to_string()),
                Some(Ok(_)) => {}
            }
        }
    })
    .await
    .expect("the watch ends within 2 s of the shutdown");
    assert_eq!(end, Ok(()), "a clean end, not an error");
}
