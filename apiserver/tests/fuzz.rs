//! Property tests for the rule "bad input from the network gets a clear error and loses
//! nothing; nothing panics": random paths, query strings, Accept headers, methods and
//! identities against the in-process router, and random text into the selector parsers.
//!
//! Deterministic by default (a fixed seed, no regression files): `PROPTEST_RNG_SEED=<n>`
//! explores other inputs and `PROPTEST_CASES=<n>` changes the case counts.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, HttpBody};
use axum::http::{HeaderValue, Method, Request, StatusCode, header};
use base64::Engine as _;
use http_body_util::BodyExt;
use proptest::prelude::*;
use proptest::test_runner::{TestCaseError, TestRunner};
use serde_json::{Value, json};
use tower::ServiceExt;
use vm_dhcp_apiserver::auth::{
    Attributes, Authorizer, AuthzFuture, Decision, UserInfo, VerifiedClientCert,
};
use vm_dhcp_apiserver::selector::{
    FieldRequirement, FieldSelector, LabelSelector, Op, Requirement,
};
use vm_dhcp_apiserver::{ApiServer, Change, Engine, Resource, router};
use vm_dhcp_core::crd::{IPPool, IPPoolAddress};
use vm_dhcp_core::store::{Holding, address_object};

const GV: &str = "/apis/dhcp.harvesterhci.io/v1alpha1";

// ---------------------------------------------------------------------------------------
// Harness

#[path = "../../tests/support/fuzz_harness.rs"]
mod harness;
use harness::{count_panics, panics, reset_panics};

/// This file's default seed (see `harness::config`).
fn config(cases: u32) -> proptest::test_runner::Config {
    harness::config(cases, 0x7664_6863_7066_757a)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

// ---------------------------------------------------------------------------------------
// Fixture (the minimum of tests/router.rs)

/// Allows everyone except mallory.
struct Allow;

impl Authorizer for Allow {
    fn authorize<'a>(&'a self, user: &'a UserInfo, _attrs: &'a Attributes) -> AuthzFuture<'a> {
        let allowed = user.name != "mallory";
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

/// The pools of tests/router.rs: the status is empty, the views come from the spec (.12
/// excluded, the router .13 reserved) and the address objects.
fn pools() -> Vec<IPPool> {
    let pool = |value: Value| serde_json::from_value::<IPPool>(value).expect("pool");
    vec![
        pool(json!({
            "apiVersion": "network.harvesterhci.io/v1alpha1", "kind": "IPPool",
            "metadata": {"name": "net-48", "namespace": "default", "resourceVersion": "100"},
            "spec": {"networkName": "default/net-48", "ipv4Config": {"cidr": "192.168.48.0/24",
                "serverIP": "192.168.48.2", "router": "192.168.48.13",
                "pool": {"start": "192.168.48.10", "end": "192.168.48.20",
                         "exclude": ["192.168.48.12"]}}}
        })),
        pool(json!({
            "apiVersion": "network.harvesterhci.io/v1alpha1", "kind": "IPPool",
            "metadata": {"name": "net-9", "namespace": "other", "resourceVersion": "90"},
            "spec": {"networkName": "other/net-9", "ipv4Config": {"cidr": "10.9.0.0/24",
                "serverIP": "10.9.0.2", "pool": {"start": "10.9.0.10", "end": "10.9.0.20"}}}
        })),
    ]
}

fn addresses() -> Vec<IPPoolAddress> {
    let object = |ns: &str, pool: &str, ip: &str, mac: &str, owner: Option<&str>, static_| {
        let h = Holding {
            ip: ip.parse().expect("ip"),
            mac: mac.parse().expect("mac"),
            owner: owner.map(str::to_string),
            static_,
            interface: None,
        };
        let mut obj = address_object(ns, pool, &format!("{ns}/{pool}"), &h);
        obj.metadata.resource_version = Some("95".into());
        obj
    };
    vec![
        object(
            "default",
            "net-48",
            "192.168.48.10",
            "52:54:00:00:00:01",
            Some("default/vm1"),
            false,
        ),
        object(
            "default",
            "net-48",
            "192.168.48.11",
            "52:54:00:00:00:02",
            Some("default/vm2"),
            true,
        ),
        object(
            "other",
            "net-9",
            "10.9.0.10",
            "52:54:00:00:09:01",
            None,
            false,
        ),
    ]
}

/// A synced engine, or one still waiting for the agents' list (every view answers 503).
fn server(synced: bool) -> Arc<ApiServer> {
    let engine = Arc::new(Engine::default());
    let mut changes = vec![Change::Snapshot {
        revision: 100,
        pools: pools(),
        addresses: addresses(),
    }];
    if synced {
        changes.push(Change::Agents(vec![]));
    }
    engine.apply(changes);
    let mut server = ApiServer::new(engine, Arc::new(Allow));
    server.bookmark_interval = Duration::from_millis(100);
    // A resourceVersion from the future waits this long before its 504: short, to keep the
    // cases fast.
    server.rv_wait = Duration::from_millis(10);
    server.request_header.write().expect("lock").allowed_names = vec!["front-proxy-client".into()];
    Arc::new(server)
}

/// Everything the engine serves, to show that no request changed it.
fn snapshot(server: &ApiServer) -> Vec<(Result<u64, String>, Vec<String>)> {
    Resource::ALL
        .into_iter()
        .map(|r| {
            let rv = server.engine.resource_version(r).map_err(|e| e.to_string());
            let items = match server.engine.list(r, None) {
                Ok((items, _)) => items.iter().map(|o| o.to_json(None).to_string()).collect(),
                Err(e) => vec![e.to_string()],
            };
            (rv, items)
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// Requests

#[derive(Debug, Clone)]
enum Identity {
    /// The aggregator's verified certificate and an allowed user.
    Alice,
    /// Authenticated, denied by the authorizer: 403.
    Mallory,
    /// No verified certificate: the headers do not count, 401.
    NoCertificate,
    /// A certificate whose CN is not in requestheader-allowed-names: 401.
    WrongCommonName,
}

#[derive(Debug, Clone)]
struct Case {
    synced: bool,
    method: Method,
    identity: Identity,
    path: String,
    query: Option<String>,
    accept: Option<Vec<u8>>,
}

fn odd_text() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => "[a-z0-9.-]{0,20}",
        3 => "\\PC{0,16}",
        2 => ".{0,8}",
        2 => "(%[0-9A-Fa-f]{2}|%[G-Zg-z]{0,2}|%|%00|%2F|%2f|%C3%28|%FF){1,4}",
        2 => "[ -~]{0,24}",
        1 => "[a-z]{64,2000}",
    ]
}

fn segment() -> impl Strategy<Value = String> {
    prop_oneof![
        5 => prop::sample::select(vec![
            "ipamallocations", "macaddresses", "dhcpleases", "namespaces", "default", "other",
            "net-48.192-168-48-10", "net-48.192-168-48-11", "net-48.192-168-48-12",
            "net-48.52-54-00-00-00-01", "net-9.10-9-0-10", "IPAMAllocations", "ipamallocation",
            "ipam", "pods", "status", "watch", "v1alpha1", "dhcp.harvesterhci.io", "", ".", "..",
            "%2e%2e", "%2F", "kube-system",
        ])
        .prop_map(String::from),
        3 => odd_text(),
    ]
}

/// Mostly under the group version; some discovery, OpenAPI and elsewhere.
fn path() -> impl Strategy<Value = String> {
    let under_gv =
        (prop::collection::vec(segment(), 0..6), any::<bool>()).prop_map(|(segs, slash)| {
            let mut p = GV.to_string();
            for s in segs {
                p.push('/');
                p.push_str(&s);
            }
            if slash {
                p.push('/');
            }
            p
        });
    let namespace = prop_oneof![
        4 => Just(Some("default")),
        2 => Just(Some("other")),
        2 => Just(None),
        1 => prop::sample::select(vec!["nope", "", "%20", "Default", "kube-system"]).prop_map(Some),
    ];
    let plural = prop_oneof![
        3 => Just("ipamallocations"),
        2 => Just("macaddresses"),
        2 => Just("dhcpleases"),
        1 => prop::sample::select(vec!["nothing", "IPAMAllocation", "ipamallocation", "pods"]),
    ];
    let name = prop::option::weighted(
        0.3,
        prop_oneof![
            3 => prop::sample::select(vec![
                "net-48.192-168-48-10", "net-48.192-168-48-11", "net-48.52-54-00-00-00-01",
                "net-9.10-9-0-10", "net-9.52-54-00-00-09-01",
            ])
            .prop_map(String::from),
            1 => segment(),
        ],
    );
    let structured = (namespace, plural, name).prop_map(|(ns, plural, name)| {
        let mut p = match ns {
            Some(ns) => format!("{GV}/namespaces/{ns}/{plural}"),
            None => format!("{GV}/{plural}"),
        };
        if let Some(n) = name {
            p.push('/');
            p.push_str(&n);
        }
        p
    });
    let elsewhere = prop_oneof![
        prop::sample::select(vec![
            "/",
            "/apis",
            "/apis/",
            "/apis/dhcp.harvesterhci.io",
            "/apis/dhcp.harvesterhci.io/v1",
            "/openapi/v2",
            "/openapi/v3",
            "/openapi/v3/apis/dhcp.harvesterhci.io/v1alpha1",
            "/api/v1/namespaces",
            "/apis/network.harvesterhci.io/v1alpha1/ippools",
            "//apis",
            "/metrics",
        ])
        .prop_map(String::from),
        odd_text().prop_map(|s| format!("/{s}")),
    ];
    let real = prop::sample::select(vec![
        "namespaces/default/ipamallocations/net-48.192-168-48-10",
        "namespaces/default/ipamallocations/net-48.192-168-48-12",
        "namespaces/default/macaddresses/net-48.52-54-00-00-00-01",
        "namespaces/other/ipamallocations/net-9.10-9-0-10",
    ])
    .prop_map(|p| format!("{GV}/{p}"));
    prop_oneof![2 => under_gv, 7 => structured, 1 => real, 1 => elsewhere]
}

/// Characters a URI carries as they are; everything else is percent-encoded the way a
/// client would, except '%' itself so that invalid escapes reach the server.
fn encode(text: &str, keep: &str) -> String {
    let mut out = String::new();
    for c in text.chars() {
        if c.is_ascii_alphanumeric() || "-._~!$'()*+;:@%".contains(c) || keep.contains(c) {
            out.push(c);
        } else {
            let mut buf = [0u8; 4];
            for b in c.encode_utf8(&mut buf).bytes() {
                out.push_str(&format!("%{b:02X}"));
            }
        }
    }
    out
}

fn label_selector_text() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec![
            "dhcp.harvesterhci.io/state=static",
            "dhcp.harvesterhci.io/state in (static,allocated)",
            "dhcp.harvesterhci.io/pool!=net-48",
            "!dhcp.harvesterhci.io/mac",
            "a>1",
            "a<x",
            "a in (b",
            "a=b,",
            ",",
            "a b",
            "((((",
            "a notin ()",
            "x==y,,z",
        ])
        .prop_map(String::from),
        "[a-z/.=!<>(), -]{0,40}",
        "\\PC{0,30}",
    ]
}

fn field_selector_text() -> impl Strategy<Value = String> {
    let field = prop::sample::select(vec![
        "metadata.name",
        "metadata.namespace",
        "pool",
        "network",
        "address",
        "mac",
        "state",
        "owner",
        "agent",
        "spec.mac",
        "status.state",
        "spec.nothing",
        "",
        " ",
        "metadata",
    ]);
    let op = prop::sample::select(vec!["=", "==", "!=", "!", "<", ">", "=!", "", "===", "\\="]);
    let value = prop_oneof![
        prop::sample::select(vec![
            "net-48.192-168-48-10",
            "52:54:00:00:00:01",
            "52-54-00-00-00-01",
            "AA:BB:CC:DD:EE:FF",
            "static",
            "default/vm1",
            "",
            "\\",
            "a\\,b",
            "a,b",
            "=",
            "52:54:00:00:00:0g",
        ])
        .prop_map(String::from),
        "\\PC{0,20}",
    ];
    prop_oneof![
        4 => prop::collection::vec((field, op, value), 1..4).prop_map(|terms| {
            terms
                .into_iter()
                .map(|(f, o, v)| format!("{f}{o}{v}"))
                .collect::<Vec<_>>()
                .join(",")
        }),
        1 => "[a-z.=!,\\\\ ]{0,30}",
        1 => "\\PC{0,30}",
    ]
}

fn number_text() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec![
            "0",
            "1",
            "2",
            "3",
            "-1",
            "",
            "1e3",
            "0x10",
            "+5",
            " 1",
            "18446744073709551615",
            "18446744073709551616",
            "99999999999999999999999",
            "6619135",
            "6553600",
            "6619136",
            "5898240",
            "NaN",
        ])
        .prop_map(String::from),
        any::<u64>().prop_map(|n| n.to_string()),
        any::<i64>().prop_map(|n| n.to_string()),
    ]
}

fn continue_text() -> impl Strategy<Value = String> {
    let token = (any::<u64>(), "[a-z]{0,8}", "\\PC{0,16}").prop_map(|(rv, ns, name)| {
        json!({"rv": rv, "ns": ns, "name": name})
            .to_string()
            .into_bytes()
    });
    let bytes = prop_oneof![
        token,
        prop::collection::vec(any::<u8>(), 0..64),
        Just(b"{\"rv\":-1}".to_vec()),
        Just(b"null".to_vec()),
    ];
    prop_oneof![
        bytes
            .clone()
            .prop_map(|b| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)),
        bytes.prop_map(|b| base64::engine::general_purpose::STANDARD.encode(b)),
        "[A-Za-z0-9_=+/-]{0,40}",
        "\\PC{0,20}",
    ]
}

fn flag_text() -> impl Strategy<Value = String> {
    prop::sample::select(vec![
        "true", "1", "True", "false", "0", "False", "", "TRUE", "yes", "2", "t",
    ])
    .prop_map(String::from)
}

/// Mostly values a client sends, sometimes wild ones, so that requests get past the first
/// check often enough to reach the later ones.
fn sane_or_wild(sane: &[&'static str], wild: BoxedStrategy<String>) -> BoxedStrategy<String> {
    prop_oneof![
        3 => prop::sample::select(sane.to_vec()).prop_map(String::from),
        1 => wild,
    ]
    .boxed()
}

fn query_param() -> impl Strategy<Value = (String, String)> {
    let p = |key: &'static str, value: BoxedStrategy<String>| {
        value.prop_map(move |v| (key.to_string(), v)).boxed()
    };
    let wild = || "\\PC{0,10}".boxed();
    prop_oneof![
        2 => p("labelSelector", sane_or_wild(&[
            "dhcp.harvesterhci.io/state=static", "dhcp.harvesterhci.io/state in (static,allocated)",
            "dhcp.harvesterhci.io/pool!=net-48", "!dhcp.harvesterhci.io/mac", "",
        ], label_selector_text().boxed())),
        2 => p("fieldSelector", sane_or_wild(&[
            "metadata.name=net-48.192-168-48-10", "metadata.namespace=default",
            "mac=52-54-00-00-00-01", "state!=free", "spec.state=static", "",
        ], field_selector_text().boxed())),
        1 => p("limit", sane_or_wild(&["1", "2", "3", "500", "0"], number_text().boxed())),
        1 => p("continue", continue_text().boxed()),
        2 => p("resourceVersion", sane_or_wild(&["0", "1", "6553600", "6619135", "5898240"], number_text().boxed())),
        1 => p("resourceVersionMatch", sane_or_wild(&["Exact", "NotOlderThan"], wild())),
        3 => p("watch", sane_or_wild(&["true", "1"], flag_text().boxed())),
        1 => p("timeoutSeconds", sane_or_wild(&["1", "5", "0"], number_text().boxed())),
        1 => p("includeObject", sane_or_wild(&["None", "Metadata", "Object"], wild())),
        1 => p("allowWatchBookmarks", flag_text().boxed()),
        1 => p("sendInitialEvents", flag_text().boxed()),
        1 => (wild(), wild()).boxed(),
    ]
}

/// Parameters encoded properly, or raw junk between them.
fn query() -> impl Strategy<Value = Option<String>> {
    let piece = prop_oneof![
        6 => query_param().prop_map(|(k, v)| format!("{}={}", encode(&k, ""), encode(&v, "/?"))),
        1 => query_param().prop_map(|(k, _)| encode(&k, "")),
        1 => prop::sample::select(vec![
            "", "=", "&", "==", "a=b=c", "%zz=1", "watch=%74rue", "watch=true&watch=false",
            "limit=%FF", "%FF%FE=1", "labelSelector=%", "fieldSelector=a%3Db%5C",
        ])
        .prop_map(String::from),
        // Combinations that reach the later checks: an old version asked for exactly (410),
        // a watch from a version (no initial events) or with bookmarks.
        1 => prop::sample::select(vec![
            "resourceVersion=6553600&resourceVersionMatch=Exact",
            "resourceVersion=1&resourceVersionMatch=Exact",
            "watch=true&resourceVersion=1",
            "watch=true&resourceVersion=6553600",
            "watch=true&allowWatchBookmarks=true&sendInitialEvents=true",
            "watch=true&allowWatchBookmarks=true&resourceVersion=6619135",
            "watch=true&sendInitialEvents=true",
            "limit=1&continue=eyJydiI6NjYxOTEzNSwibnMiOiJkZWZhdWx0IiwibmFtZSI6Im5ldC00OC4xOTItMTY4LTQ4LTEwIn0",
        ])
        .prop_map(String::from),
    ];
    prop::option::of(prop::collection::vec(piece, 0..5).prop_map(|p| p.join("&")))
}

fn accept() -> impl Strategy<Value = Option<Vec<u8>>> {
    let known = prop::sample::select(vec![
        "application/json",
        "application/json;as=Table;v=v1;g=meta.k8s.io,application/json;as=Table;v=v1beta1;g=meta.k8s.io,application/json",
        "application/json;as=Table;v=v1;g=meta.k8s.io",
        "application/json;as=PartialObjectMetadataList;v=v1;g=meta.k8s.io",
        "application/json;as=PartialObjectMetadata;v=v1;g=meta.k8s.io",
        "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList,application/json",
        "application/vnd.kubernetes.protobuf",
        "application/yaml",
        "application/cbor",
        "*/*",
        "application/*",
        "text/html",
        "",
        ";;;",
        ",,,",
        "application/json;as=Table",
        "application/json;as=\"Table\";v=\"v1\";g=\"meta.k8s.io\"",
        "APPLICATION/JSON;AS=Table;V=v1;G=meta.k8s.io",
    ])
    .prop_map(|s| s.as_bytes().to_vec());
    let params = prop::collection::vec(
        (
            prop::sample::select(vec!["application/json", "*/*", "text/plain", "", "a/b"]),
            prop::collection::vec(
                (
                    prop::sample::select(vec!["as", "v", "g", "q", "", "AS"]),
                    prop::sample::select(vec![
                        "Table",
                        "v1",
                        "v1beta1",
                        "meta.k8s.io",
                        "0.9",
                        "",
                        "\"",
                        "PartialObjectMetadata",
                    ]),
                ),
                0..4,
            ),
        ),
        1..4,
    )
    .prop_map(|types| {
        types
            .into_iter()
            .map(|(t, ps)| {
                let mut s = t.to_string();
                for (k, v) in ps {
                    s.push_str(&format!(";{k}={v}"));
                }
                s
            })
            .collect::<Vec<_>>()
            .join(", ")
            .into_bytes()
    });
    let printable = "[ -~]{0,80}".prop_map(String::into_bytes);
    // obs-text: a valid header value that is not a string.
    let obs_text = prop::collection::vec(0x80u8..=0xff, 1..16);
    prop::option::weighted(
        0.4,
        prop_oneof![4 => known, 3 => params, 2 => printable, 1 => obs_text],
    )
}

fn case() -> impl Strategy<Value = Case> {
    let method = prop_oneof![
        60 => Just(Method::GET),
        2 => Just(Method::HEAD),
        1 => Just(Method::POST),
        1 => Just(Method::PUT),
        1 => Just(Method::PATCH),
        1 => Just(Method::DELETE),
        1 => Just(Method::OPTIONS),
    ];
    let identity = prop_oneof![
        50 => Just(Identity::Alice),
        1 => Just(Identity::Mallory),
        1 => Just(Identity::NoCertificate),
        1 => Just(Identity::WrongCommonName),
    ];
    (
        prop::bool::weighted(0.95),
        method,
        identity,
        path(),
        query(),
        accept(),
    )
        .prop_map(|(synced, method, identity, path, query, accept)| Case {
            synced,
            method,
            identity,
            path,
            query,
            accept,
        })
}

fn request(case: &Case) -> Request<Body> {
    let mut uri = encode(&case.path, "/,=&");
    if let Some(q) = &case.query {
        uri.push('?');
        uri.push_str(q);
    }
    let (user, cn) = match case.identity {
        Identity::Alice | Identity::NoCertificate => ("alice", "front-proxy-client"),
        Identity::Mallory => ("mallory", "front-proxy-client"),
        Identity::WrongCommonName => ("alice", "someone-else"),
    };
    let mut req = Request::builder()
        .method(case.method.clone())
        .uri(&uri)
        .header("X-Remote-User", user)
        .header("X-Remote-Group", "system:authenticated");
    if let Some(a) = &case.accept {
        req = req.header(
            header::ACCEPT,
            HeaderValue::from_bytes(a).expect("header value"),
        );
    }
    let mut req = req
        .body(Body::empty())
        .unwrap_or_else(|e| panic!("the test built an invalid request for {uri:?}: {e}"));
    if !matches!(case.identity, Identity::NoCertificate) {
        req.extensions_mut().insert(VerifiedClientCert {
            common_name: cn.into(),
        });
    }
    req
}

static WATCH_CHUNKS: AtomicUsize = AtomicUsize::new(0);

/// How often each status came back, to show the generators reach every branch.
static SEEN: Mutex<BTreeMap<u16, usize>> = Mutex::new(BTreeMap::new());

/// The router's answer to one case, checked.
async fn check(servers: &[Arc<ApiServer>; 2], case: Case) -> Result<(), TestCaseError> {
    let server = servers[usize::from(case.synced)].clone();
    let resp = router(server)
        .oneshot(request(&case))
        .await
        .expect("router answers");
    let code = resp.status();
    *SEEN
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .entry(code.as_u16())
        .or_default() += 1;
    let streamed = resp.body().size_hint().exact().is_none();
    if streamed {
        prop_assert_eq!(code, StatusCode::OK, "only a watch streams");
        prop_assert!(
            case.query.as_deref().is_some_and(|q| q.contains("watch")),
            "a stream without watch in the query"
        );
        prop_assert_eq!(
            resp.headers()
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok()),
            Some("application/json")
        );
        // The first chunk, if one comes soon (a watch with nothing to say stays quiet).
        let mut body = resp.into_body();
        match tokio::time::timeout(Duration::from_millis(50), body.frame()).await {
            Err(_) | Ok(None) => {}
            Ok(Some(frame)) => {
                let frame = frame.map_err(|e| TestCaseError::fail(format!("body error: {e}")))?;
                if let Ok(data) = frame.into_data() {
                    WATCH_CHUNKS.fetch_add(1, Ordering::Relaxed);
                    for line in data.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
                        let ev: Value = serde_json::from_slice(line).map_err(|e| {
                            TestCaseError::fail(format!(
                                "watch line is not JSON ({e}): {}",
                                String::from_utf8_lossy(line)
                            ))
                        })?;
                        let kind = ev["type"].as_str().unwrap_or_default();
                        prop_assert!(
                            ["ADDED", "MODIFIED", "DELETED", "BOOKMARK", "ERROR"].contains(&kind),
                            "{}",
                            ev
                        );
                        if kind == "ERROR" {
                            prop_assert_eq!(&ev["object"]["kind"], "Status", "{}", ev);
                        }
                    }
                }
            }
        }
        return Ok(());
    }
    let bytes = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| TestCaseError::fail(format!("body error: {e}")))?
        .to_bytes();
    let text = String::from_utf8_lossy(&bytes);
    let allowed = [200, 400, 401, 403, 404, 405, 406, 410, 503];
    if case.method == Method::HEAD {
        // axum answers HEAD without the body; the status is all there is to check.
        prop_assert!(bytes.is_empty());
        prop_assert!(allowed.contains(&code.as_u16()) || code == StatusCode::GATEWAY_TIMEOUT);
        return Ok(());
    }
    let health = matches!(case.path.as_str(), "/healthz" | "/readyz" | "/livez");
    let doc: Value = if health {
        Value::Null
    } else {
        serde_json::from_slice(&bytes)
            .map_err(|e| TestCaseError::fail(format!("{code}: body is not JSON ({e}): {text}")))?
    };
    if code == StatusCode::GATEWAY_TIMEOUT {
        // kube-apiserver's answer to a resourceVersion newer than this replica has seen:
        // "Too large resource version", 504 Timeout, which clients retry. Nothing else.
        prop_assert_eq!(&doc["reason"], "Timeout", "{}", doc);
        prop_assert!(
            doc["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("Too large resource version")),
            "{}",
            doc
        );
    } else {
        prop_assert!(
            allowed.contains(&code.as_u16()),
            "status {} for {:?}: {}",
            code,
            case,
            text
        );
    }
    if code == StatusCode::OK {
        if !health {
            prop_assert!(doc.is_object(), "{}", text);
        }
        return Ok(());
    }
    prop_assert_eq!(&doc["kind"], "Status", "{}", doc);
    prop_assert_eq!(&doc["apiVersion"], "v1", "{}", doc);
    prop_assert_eq!(&doc["status"], "Failure", "{}", doc);
    prop_assert_eq!(
        doc["code"].as_u64(),
        Some(u64::from(code.as_u16())),
        "{}",
        doc
    );
    prop_assert!(
        doc["reason"].as_str().is_some_and(|r| !r.is_empty()),
        "{}",
        doc
    );
    prop_assert!(
        doc["message"]
            .as_str()
            .is_some_and(|m| !m.trim().is_empty()),
        "{}",
        doc
    );
    Ok(())
}

#[test]
fn random_requests_get_a_status_never_a_panic_or_500() {
    count_panics();
    let rt = runtime();
    let servers = [server(false), server(true)];
    let before: Vec<_> = servers.iter().map(|s| snapshot(s)).collect();
    let mut runner = TestRunner::new(config(1024));
    let result = runner.run(&case(), |case| {
        reset_panics();
        rt.block_on(async {
            check(&servers, case).await?;
            // Let spawned watch tasks run on until they notice the dropped body.
            tokio::task::yield_now().await;
            Ok::<(), TestCaseError>(())
        })?;
        let panics = panics();
        prop_assert_eq!(
            panics,
            0,
            "a panic while answering (see the panic message above)"
        );
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    let after: Vec<_> = servers.iter().map(|s| snapshot(s)).collect();
    assert_eq!(before, after, "requests changed what the engine serves");
    let seen = SEEN.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let chunks = WATCH_CHUNKS.load(Ordering::Relaxed);
    eprintln!("statuses: {seen:?}; watches that sent a first chunk: {chunks}");
    if std::env::var_os("PROPTEST_CASES").is_none() {
        for code in [200, 400, 401, 403, 404, 405, 406, 410, 503] {
            assert!(
                seen.contains_key(&code),
                "no case was answered {code}: the generators need fixing ({seen:?})"
            );
        }
        assert!(
            chunks > 0,
            "no watch sent an event: the generators need fixing"
        );
    }
}

// ---------------------------------------------------------------------------------------
// Selector parsers

fn selector_soup() -> impl Strategy<Value = String> {
    prop_oneof![
        "\\PC{0,64}",
        "(?s).{0,64}",
        "[a-z0-9=!<>(),/._\\\\ -]{0,300}",
        "[=!<>(),\\\\]{0,200}",
        "[a-z(), ]{0,200}",
        prop::collection::vec(
            prop::sample::select(vec![
                "a", "b/c", "in", "notin", "(", ")", ",", "=", "==", "!=", "!", ">", "<", " ", "1",
                "-1", "\\", "é", "ａ", "\u{0}", "\t",
            ]),
            0..200,
        )
        .prop_map(|v| v.concat()),
        "[a-z]{1,2000}".prop_map(|s| format!("{s}={s}")),
        (1usize..5000).prop_map(|n| "(".repeat(n) + &",".repeat(n)),
    ]
}

fn labels() -> impl Strategy<Value = BTreeMap<String, String>> {
    prop::collection::btree_map(
        prop_oneof!["[a-c]", "[a-c]/[a-c]", "\\PC{0,4}"],
        prop_oneof!["[a-c0-9-]{0,3}", any::<i64>().prop_map(|n| n.to_string())],
        0..5,
    )
}

/// A requirement as Kubernetes spells it, and its parse.
fn label_requirement() -> impl Strategy<Value = (String, Requirement)> {
    let name = "[A-Za-z0-9]([A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?";
    let prefix = "[a-z0-9]([a-z0-9.-]{0,40}[a-z0-9])?";
    let key = (prop::option::of(prefix), name).prop_map(|(p, n)| match p {
        Some(p) => format!("{p}/{n}"),
        None => n,
    });
    let value = prop_oneof![
        1 => Just(String::new()),
        4 => "[A-Za-z0-9]([A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?",
    ];
    let ws = || prop::sample::select(vec!["", " ", "  ", "\t"]);
    let op = prop_oneof![
        (prop::sample::select(vec!["=", "==", "!="]), value.clone()).prop_map(|(o, v)| {
            let op = if o == "!=" { Op::NotEquals } else { Op::Equals };
            (format!("{o}{v}"), op, vec![v])
        }),
        (any::<bool>(), prop::collection::vec(value, 1..4)).prop_map(|(inn, vs)| {
            let (word, op) = if inn {
                ("in", Op::In)
            } else {
                ("notin", Op::NotIn)
            };
            (format!(" {word} ({})", vs.join(", ")), op, vs)
        }),
        (any::<bool>(), any::<i64>()).prop_map(|(gt, n)| {
            let (o, op) = if gt {
                (">", Op::GreaterThan)
            } else {
                ("<", Op::LessThan)
            };
            (format!("{o}{n}"), op, vec![n.to_string()])
        }),
        Just((String::new(), Op::Exists, vec![])),
        Just(("!".to_string(), Op::DoesNotExist, vec![])),
    ];
    (key, op, ws(), ws()).prop_map(|(key, (text, op, values), before, after)| {
        let text = if op == Op::DoesNotExist {
            format!("{before}!{key}{after}")
        } else {
            format!("{before}{key}{text}{after}")
        };
        (text, Requirement { key, op, values })
    })
}

/// A field term with `\` escaping `,`, `=` and `\` in the value, and its parse.
fn field_requirement() -> impl Strategy<Value = (String, FieldRequirement)> {
    let field = "[a-z][a-z.]{0,20}";
    let value = "[a-z0-9:/,=\\\\!. -]{0,20}";
    let op = prop::sample::select(vec!["=", "==", "!="]);
    (field, op, value).prop_map(|(field, op, value)| {
        let escaped: String = value
            .chars()
            .flat_map(|c| {
                if matches!(c, ',' | '=' | '\\') {
                    vec!['\\', c]
                } else {
                    vec![c]
                }
            })
            .collect();
        (
            format!("{field}{op}{escaped}"),
            FieldRequirement {
                field,
                value,
                equal: op != "!=",
            },
        )
    })
}

proptest! {
    #![proptest_config(config(3000))]

    /// Any text: a parse or an error that quotes the input and says why, never a panic. A
    /// parsed selector has the values its operators need, so matching it cannot panic.
    #[test]
    fn label_selector_parse_never_panics(input in selector_soup(), labels in labels()) {
        match LabelSelector::parse(&input) {
            Ok(sel) => {
                for r in &sel.requirements {
                    prop_assert!(!r.key.is_empty());
                    match r.op {
                        Op::Equals | Op::NotEquals | Op::GreaterThan | Op::LessThan => {
                            prop_assert_eq!(r.values.len(), 1, "{:?}", r)
                        }
                        Op::In | Op::NotIn => prop_assert!(!r.values.is_empty(), "{:?}", r),
                        Op::Exists | Op::DoesNotExist => prop_assert!(r.values.is_empty(), "{:?}", r),
                    }
                }
                let _ = sel.matches(&labels);
            }
            Err(e) => {
                prop_assert_eq!(&e.input, &input);
                prop_assert!(!e.reason.is_empty());
                prop_assert!(!e.to_string().is_empty());
            }
        }
    }

    #[test]
    fn field_selector_parse_never_panics(input in selector_soup()) {
        match FieldSelector::parse(&input) {
            Ok(sel) => {
                for r in &sel.requirements {
                    prop_assert!(!r.field.is_empty());
                    prop_assert_eq!(r.field.trim(), r.field.as_str());
                }
                let _ = sel.pinned_name();
            }
            Err(e) => {
                prop_assert_eq!(&e.input, &input);
                prop_assert!(!e.reason.is_empty());
            }
        }
    }

    /// The selectors have no textual form to re-parse, so the other direction: whatever the
    /// Kubernetes grammar writes parses back to exactly what was written.
    #[test]
    fn written_label_selectors_parse_to_what_was_written(
        reqs in prop::collection::vec(label_requirement(), 0..6)
    ) {
        let text = reqs.iter().map(|(t, _)| t.as_str()).collect::<Vec<_>>().join(",");
        let want: Vec<Requirement> = reqs.into_iter().map(|(_, r)| r).collect();
        let got = LabelSelector::parse(&text).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(got.requirements, want, "{}", text);
    }

    #[test]
    fn written_field_selectors_parse_to_what_was_written(
        reqs in prop::collection::vec(field_requirement(), 0..6)
    ) {
        let text = reqs.iter().map(|(t, _)| t.as_str()).collect::<Vec<_>>().join(",");
        let want: Vec<FieldRequirement> = reqs.into_iter().map(|(_, r)| r).collect();
        let got = FieldSelector::parse(&text).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(got.requirements, want, "{}", text);
    }
}
