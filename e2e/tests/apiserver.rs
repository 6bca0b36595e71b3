//! The aggregated API through the real kube-apiserver's aggregator: `vm-dhcp apiserver` as a
//! process, reached through an APIService → ExternalName Service → localhost. kubectl get
//! (columns, -A, -o yaml, --watch), kubectl explain, the lease view from a stand-in agent, and
//! our own authentication and authorization, asked directly. What Rancher's Steve does with
//! the API (Table lists and watches, informers, discovery, OpenAPI) is checked with client-go
//! itself in `clientgo.rs`.
//! A test binary of its own: the APIService is cluster-wide.

#[path = "apiserver/setup.rs"]
mod setup;

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use futures::{AsyncBufReadExt, StreamExt};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::config::AuthInfo;
use serde_json::{Value, json};
use setup::{AggregatedApi, allocate, allocate_as, create_pool, release};
use tokio::io::AsyncBufReadExt as _;
use vm_dhcp_core::crd::IPPool;
use vm_dhcp_e2e::ControlPlane;

const GV: &str = "/apis/dhcp.harvesterhci.io/v1alpha1";

static AGENT_PORT: OnceLock<u16> = OnceLock::new();

/// A stand-in for an agent's HTTP server (GET /api/v1/leases), on a thread of its own so it
/// outlives every test's runtime.
fn fake_agent() -> u16 {
    *AGENT_PORT.get_or_init(|| {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("agent port");
        let port = listener.local_addr().expect("addr").port();
        listener.set_nonblocking(true).expect("nonblocking");
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let doc = json!({
                    "pool": "any", "agent": "lease-pool-agent", "active": true, "serverIP": "172.30.0.2",
                    "leaseTime": 3600,
                    "items": [{"address": "172.30.0.10", "mac": "02:00:00:00:30:10", "state": "bound",
                               "leaseStart": "2026-11-27T10:00:00Z", "expiry": "2026-11-27T11:00:00Z",
                               "lastSeen": "2026-11-27T10:30:00Z", "declines": 0}]
                });
                let app = axum::Router::new().route(
                    "/api/v1/leases",
                    axum::routing::get(move || {
                        let doc = doc.clone();
                        async move { axum::Json(doc) }
                    }),
                );
                let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
                let _ = axum::serve(listener, app).await;
            });
        });
        port
    })
}

/// The server, started once for this test binary (on a thread with its own runtime: each
/// test has its own, and the process must outlive them).
async fn server() -> &'static AggregatedApi {
    static API: OnceLock<AggregatedApi> = OnceLock::new();
    static INIT: std::sync::Mutex<()> = std::sync::Mutex::new(());
    if let Some(api) = API.get() {
        return api;
    }
    let cp = ControlPlane::shared().await;
    let agent_port = fake_agent();
    tokio::task::spawn_blocking(move || {
        let _guard = INIT.lock().unwrap_or_else(|e| e.into_inner());
        if API.get().is_none() {
            let started = std::thread::spawn(move || {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("runtime")
                    .block_on(setup::start(
                        cp,
                        &[
                            format!("--agent-port={agent_port}"),
                            "--lease-poll-ms=300".into(),
                        ],
                    ))
            })
            .join()
            .expect("start-up thread");
            match started {
                Ok(api) => {
                    let _ = API.set(api);
                }
                Err(e) => panic!("starting vm-dhcp apiserver failed: {e:#}\n{}", cp.logs(30)),
            }
        }
        API.get().expect("set above")
    })
    .await
    .expect("start-up task")
}

fn text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs kubectl until `check` accepts its output (the views follow the source within a
/// second; the deadline is generous).
async fn kubectl_until(cp: &ControlPlane, args: &[&str], check: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let out = cp.kubectl(args).await;
        let t = text(&out);
        if out.status.success() && check(&t) {
            return t;
        }
        assert!(
            Instant::now() < deadline,
            "kubectl {args:?} never gave the expected output; last:\n{t}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_get_prints_columns_and_full_objects() {
    let api = server().await;
    let cp = ControlPlane::shared().await;
    let ns = cp.namespace("aggget").await;
    // The server IP inside the range (reserved), one address excluded.
    create_pool(
        &ns,
        "net-a",
        21,
        json!({"serverIP": "172.21.0.50", "pool": {"exclude": ["172.21.0.11"]}}),
    )
    .await;
    // What the webhook writes with an allocation: the address object, with its owner and
    // whether it was asked for by address.
    allocate(
        &ns,
        "net-a",
        "172.21.0.10",
        "02:00:00:00:21:10",
        Some(&format!("{}/vm-a", ns.name)),
    )
    .await;
    allocate_as(
        &ns,
        "net-a",
        "172.21.0.12",
        "02:00:00:00:21:12",
        Some(&format!("{}/vm-static", ns.name)),
        true,
    )
    .await;
    // A status that says otherwise (as a stale projection could): not read.
    ns.api::<IPPool>()
        .patch_status(
            "net-a",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"ipv4": {"used": 1, "available": 38,
                "allocated": {"172.21.0.13": "02:00:00:00:21:13"}}}})),
        )
        .await
        .expect("status");
    let table = kubectl_until(cp, &["get", "ipamallocations", "-n", &ns.name], |t| {
        t.contains("static") && t.contains("allocated")
    })
    .await;
    assert!(
        !table.contains("172.21.0.13"),
        "the views never come from the status:\n{table}"
    );
    let row = |ip: &str| {
        table
            .lines()
            .find(|l| l.contains(ip))
            .unwrap_or_default()
            .split_whitespace()
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    assert_eq!(
        row("172.21.0.12")[3..],
        ["static".to_string(), format!("{}/vm-static", ns.name)],
        "{table}"
    );
    assert_eq!(
        row("172.21.0.10")[3..],
        ["allocated".to_string(), format!("{}/vm-a", ns.name)],
        "{table}"
    );
    eprintln!("$ kubectl get ipamallocations -n {}\n{table}", ns.name);
    let header = table.lines().next().unwrap_or_default();
    for col in ["NAME", "ADDRESS", "MAC", "STATE", "OWNER"] {
        assert!(header.contains(col), "column {col} missing:\n{table}");
    }
    assert!(table.contains("net-a.172-21-0-10") && table.contains("02:00:00:00:21:10"));
    assert_eq!(row("172.21.0.50")[3], "reserved", "{table}");
    assert_eq!(row("172.21.0.11")[3], "excluded", "{table}");

    let all = kubectl_until(cp, &["get", "ipamallocations", "-A", "-o", "wide"], |t| {
        t.contains("172.21.0.10")
    })
    .await;
    eprintln!("$ kubectl get ipamallocations -A -o wide\n{all}");
    let header = all.lines().next().unwrap_or_default();
    assert!(
        header.starts_with("NAMESPACE"),
        "-A adds the namespace:\n{all}"
    );
    assert!(
        header.contains("NETWORK") && header.contains("POOL") && header.contains("INTERFACE"),
        "{all}"
    );

    let yaml = kubectl_until(
        cp,
        &[
            "get",
            "ipamallocation",
            "net-a.172-21-0-10",
            "-n",
            &ns.name,
            "-o",
            "yaml",
        ],
        |t| t.contains("kind: IPAMAllocation"),
    )
    .await;
    eprintln!("$ kubectl get ipamallocation net-a.172-21-0-10 -o yaml\n{yaml}");
    let obj: serde_yaml::Value = serde_yaml::from_str(&yaml).expect("YAML");
    assert_eq!(
        obj["apiVersion"].as_str(),
        Some("dhcp.harvesterhci.io/v1alpha1")
    );
    assert_eq!(obj["address"].as_str(), Some("172.21.0.10"));
    assert_eq!(obj["mac"].as_str(), Some("02:00:00:00:21:10"));
    assert_eq!(obj["state"].as_str(), Some("allocated"));
    assert_eq!(obj["interface"].as_str(), Some("nic-1"));
    assert_eq!(
        obj["network"].as_str(),
        Some(format!("{}/net-a", ns.name).as_str())
    );
    let rv = obj["metadata"]["resourceVersion"].as_str().expect("rv");
    assert!(rv.parse::<u64>().is_ok(), "numeric resourceVersion {rv}");

    // Short name, a label selector and a field selector through the aggregator.
    let sel = kubectl_until(
        cp,
        &[
            "get",
            "ipamalloc",
            "-n",
            &ns.name,
            "-l",
            "dhcp.harvesterhci.io/state in (reserved,excluded)",
        ],
        |t| t.contains("reserved"),
    )
    .await;
    assert!(!sel.contains("172.21.0.10"), "{sel}");
    let by_mac = kubectl_until(
        cp,
        &[
            "get",
            "ipamallocations",
            "-n",
            &ns.name,
            "--field-selector",
            "mac=02-00-00-00-21-10",
        ],
        |t| t.contains("172.21.0.10"),
    )
    .await;
    assert_eq!(by_mac.lines().count(), 2, "{by_mac}");
    let macs = kubectl_until(cp, &["get", "macaddresses", "-n", &ns.name], |t| {
        t.contains("02:00:00:00:21:10")
    })
    .await;
    eprintln!("$ kubectl get macaddresses -n {}\n{macs}", ns.name);
    // kubectl's error for a missing object is our Status.
    let out = cp
        .kubectl(&["get", "ipamallocation", "nope", "-n", &ns.name])
        .await;
    assert!(!out.status.success());
    assert!(
        text(&out).contains("Error from server (NotFound)"),
        "{}",
        text(&out)
    );
    let _ = api;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_watch_shows_a_new_allocation_promptly() {
    let _api = server().await;
    let cp = ControlPlane::shared().await;
    let ns = cp.namespace("aggwatch").await;
    create_pool(&ns, "net-w", 22, json!({})).await;
    allocate(&ns, "net-w", "172.22.0.10", "02:00:00:00:22:10", None).await;
    kubectl_until(cp, &["get", "ipamallocations", "-n", &ns.name], |t| {
        t.contains("172.22.0.10")
    })
    .await;
    let mut child = tokio::process::Command::new(cp.bin_dir.join("kubectl"))
        .arg(format!("--kubeconfig={}", cp.kubeconfig_path.display()))
        .args(["get", "ipamallocations", "-n", &ns.name, "--watch"])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("kubectl --watch");
    let mut lines = tokio::io::BufReader::new(child.stdout.take().expect("stdout")).lines();
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !seen.iter().any(|l: &String| l.contains("172.22.0.10")) {
        let line = tokio::time::timeout_at(deadline, lines.next_line())
            .await
            .expect("initial rows within 20 s")
            .expect("read")
            .expect("kubectl still running");
        seen.push(line);
    }
    let t0 = Instant::now();
    allocate(&ns, "net-w", "172.22.0.11", "02:00:00:00:22:11", None).await;
    loop {
        let line = tokio::time::timeout_at(deadline, lines.next_line())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "the new allocation never showed up; saw:\n{}",
                    seen.join("\n")
                )
            })
            .expect("read")
            .expect("kubectl still running");
        seen.push(line.clone());
        if line.contains("172.22.0.11") {
            break;
        }
    }
    let latency = t0.elapsed();
    eprintln!(
        "$ kubectl get ipamallocations --watch\n{}\n(new allocation shown {:.0} ms after the IPPoolAddress create was sent)",
        seen.join("\n"),
        latency.as_secs_f64() * 1000.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_explain_reads_our_openapi() {
    let _api = server().await;
    let cp = ControlPlane::shared().await;
    let out = kubectl_until(cp, &["explain", "ipamallocations"], |t| {
        t.contains("IPAMAllocation")
    })
    .await;
    eprintln!("$ kubectl explain ipamallocations\n{out}");
    assert!(out.contains("dhcp.harvesterhci.io"), "{out}");
    for field in ["address", "mac", "owner", "state", "network"] {
        assert!(out.contains(field), "field {field} missing:\n{out}");
    }
    let state = kubectl_until(cp, &["explain", "ipamallocations.state"], |t| {
        t.contains("static")
    })
    .await;
    assert!(state.contains("excluded"), "{state}");
    kubectl_until(cp, &["explain", "dhcpleases.expiry"], |t| {
        t.contains("expires")
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_view_reads_the_active_agent() {
    let _api = server().await;
    let cp = ControlPlane::shared().await;
    let ns = cp.namespace("agglease").await;
    create_pool(&ns, "lease-pool", 30, json!({})).await;
    allocate(&ns, "lease-pool", "172.30.0.10", "02:00:00:00:30:10", None).await;
    // An agent pod as the controller makes it, "running" with the stand-in's address.
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "lease-pool-agent", "labels": {
            "network.harvesterhci.io/vm-dhcp-controller": "agent",
            "network.harvesterhci.io/ippool-namespace": ns.name,
            "network.harvesterhci.io/ippool-name": "lease-pool"}},
        "spec": {"containers": [{"name": "agent", "image": "rancher/harvester-vm-dhcp-agent"}]}
    }))
    .expect("pod");
    let pods: Api<Pod> = ns.api();
    pods.create(&PostParams::default(), &pod)
        .await
        .expect("pod");
    pods.patch_status(
        "lease-pool-agent",
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {"phase": "Running", "podIP": "127.0.0.1", "podIPs": [{"ip": "127.0.0.1"}]}})),
    )
    .await
    .expect("pod status");
    let out = kubectl_until(
        cp,
        &["get", "dhcpleases", "-n", &ns.name, "-o", "wide"],
        |t| t.contains("172.30.0.10"),
    )
    .await;
    eprintln!("$ kubectl get dhcpleases -n {} -o wide\n{out}", ns.name);
    assert!(
        out.contains("bound") && out.contains("lease-pool-agent"),
        "{out}"
    );
    assert!(out.contains("2026-11-27T11:00:00Z"), "expiry column: {out}");
}

/// A client straight to our server (not through kube-apiserver), optionally with the
/// front-proxy certificate and the user headers the aggregator would set.
async fn direct(api: &AggregatedApi, cp: &ControlPlane, user: Option<&str>) -> kube::Client {
    direct_as(api, cp, user, "system:authenticated")
}

fn direct_as(
    api: &AggregatedApi,
    cp: &ControlPlane,
    user: Option<&str>,
    group: &str,
) -> kube::Client {
    use base64::Engine as _;
    let url: http::Uri = format!("https://127.0.0.1:{}", api.port)
        .parse()
        .expect("url");
    let mut config = kube::Config::new(url);
    let ca_der = rustls_pemfile::certs(&mut cp.serving_ca.cert_pem().as_bytes())
        .next()
        .expect("one CA")
        .expect("PEM");
    config.root_cert = Some(vec![ca_der.to_vec()]);
    if let Some(user) = user {
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        config.auth_info = AuthInfo {
            client_certificate_data: Some(b64(&cp.front_proxy.client.cert)),
            client_key_data: Some(b64(&cp.front_proxy.client.key).into()),
            ..Default::default()
        };
        config.headers = vec![
            (
                http::HeaderName::from_static("x-remote-user"),
                http::HeaderValue::from_str(user).expect("header"),
            ),
            (
                http::HeaderName::from_static("x-remote-group"),
                http::HeaderValue::from_str(group).expect("header"),
            ),
        ];
    }
    kube::Client::try_from(config).expect("client")
}

async fn raw(client: &kube::Client, path: &str) -> (u16, Value) {
    let req = http::Request::get(path).body(Vec::new()).expect("request");
    match client.request::<Value>(req).await {
        Ok(v) => (200, v),
        Err(kube::Error::Api(s)) => (s.code, serde_json::to_value(&*s).unwrap_or(Value::Null)),
        Err(e) => panic!("{path}: {e}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_own_authentication_and_authorization() {
    let api = server().await;
    let cp = ControlPlane::shared().await;
    let ns = cp.namespace("aggauthz").await;
    let path = format!("{GV}/namespaces/{}/ipamallocations", ns.name);
    // No client certificate: 401, whatever the headers say; the probes still answer.
    let anonymous = direct(api, cp, None).await;
    let (code, doc) = raw(&anonymous, &path).await;
    assert_eq!(code, 401, "{doc}");
    let req = http::Request::get("/readyz")
        .body(Vec::new())
        .expect("request");
    assert_eq!(
        anonymous.request_text(req).await.expect("readyz").trim(),
        "ok"
    );
    // The aggregator's certificate, for a user RBAC does not allow: 403 from our SAR.
    let nobody = direct(api, cp, Some("nobody")).await;
    let (code, doc) = raw(&nobody, &path).await;
    assert_eq!(code, 403, "{doc}");
    assert!(
        doc["message"]
            .as_str()
            .is_some_and(|m| m.contains("User \"nobody\" cannot list resource \"ipamallocations\"")),
        "{doc}"
    );
    // Bound to the view role in that namespace: allowed (after the SAR cache's 10 s for a
    // user already denied; this one is fresh).
    let binding: k8s_openapi::api::rbac::v1::RoleBinding = serde_json::from_value(json!({
        "metadata": {"name": "viewer"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "harvester-vm-dhcp-apiserver:view"},
        "subjects": [{"kind": "User", "name": "viewer", "apiGroup": "rbac.authorization.k8s.io"}]
    }))
    .expect("binding");
    ns.api::<k8s_openapi::api::rbac::v1::RoleBinding>()
        .create(&PostParams::default(), &binding)
        .await
        .expect("binding");
    let viewer = direct(api, cp, Some("viewer")).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (code, doc) = raw(&viewer, &path).await;
        if code == 200 {
            assert_eq!(doc["kind"], "IPAMAllocationList");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "viewer never allowed: {code} {doc}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // Not allowed in another namespace.
    let (code, _) = raw(&viewer, &format!("{GV}/namespaces/default/ipamallocations")).await;
    assert_eq!(code, 403);
    // A write through the aggregator: kube-apiserver's RBAC answers first for most users;
    // as admin it reaches us and gets 405.
    let out = cp
        .kubectl(&["delete", "ipamallocation", "x", "-n", &ns.name])
        .await;
    assert!(!out.status.success());
    assert!(text(&out).contains("MethodNotAllowed"), "{}", text(&out));
}

/// Reads watch events (bookmarks skipped) until `count` arrived.
async fn events(client: &kube::Client, path: &str, count: usize) -> Vec<Value> {
    let req = http::Request::get(path).body(Vec::new()).expect("request");
    let mut lines = client.request_stream(req).await.expect("watch").lines();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let mut out = Vec::new();
    while out.len() < count {
        let line = tokio::time::timeout_at(deadline, lines.next())
            .await
            .unwrap_or_else(|_| panic!("{count} events within 20 s; got {:#?}", summary(&out)))
            .expect("stream open")
            .expect("line");
        let ev: Value = serde_json::from_str(&line).expect("one JSON event per line");
        if ev["type"] != "BOOKMARK" {
            out.push(ev);
        }
    }
    out
}

fn summary(events: &[Value]) -> Vec<(String, String, String)> {
    events
        .iter()
        .map(|e| {
            (
                e["type"].as_str().unwrap_or_default().to_string(),
                e["object"]["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                e["object"]["metadata"]["resourceVersion"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_resumes_on_another_replica_without_gaps() {
    let api = server().await;
    let cp = ControlPlane::shared().await;
    let second = setup::spawn_replica("apiserver-2").expect("second replica");
    let a = direct_as(api, cp, Some("admin"), "system:masters");
    let b = direct_as(&second, cp, Some("admin"), "system:masters");
    let probe = direct(&second, cp, None).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let req = http::Request::get("/readyz")
            .body(Vec::new())
            .expect("request");
        if probe
            .request_text(req)
            .await
            .is_ok_and(|t| t.trim() == "ok")
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the second replica never became ready:\n{}",
            second.log_tail(30)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let ns = cp.namespace("aggresume").await;
    let m = |i: u8| format!("02:00:00:00:31:{i:02x}");
    let ip = |i: u8| format!("172.31.0.{i}");
    create_pool(&ns, "resume", 31, json!({})).await;
    allocate(&ns, "resume", &ip(10), &m(10), None).await;
    let path = format!("{GV}/namespaces/{}/ipamallocations", ns.name);
    // Both replicas have the allocation; list on A.
    let mut list_rv = String::new();
    for client in [&b, &a] {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let (code, doc) = raw(client, &path).await;
            if code == 200 && doc["items"].as_array().is_some_and(|i| i.len() == 1) {
                list_rv = doc["metadata"]["resourceVersion"]
                    .as_str()
                    .expect("rv")
                    .to_string();
                break;
            }
            assert!(Instant::now() < deadline, "{code} {doc}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    // Allocations and releases (one address object each), and between them a spec change
    // of the pool that excludes two free addresses at once: one revision, two rows.
    allocate(&ns, "resume", &ip(11), &m(11), None).await;
    allocate(&ns, "resume", &ip(12), &m(12), None).await;
    release(&ns, "resume", &ip(10)).await;
    allocate(&ns, "resume", &ip(13), &m(13), None).await;
    ns.api::<IPPool>()
        .patch(
            "resume",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"ipv4Config": {"pool": {
                "exclude": [ip(20), ip(21)]}}}})),
        )
        .await
        .expect("exclude two addresses");
    allocate(&ns, "resume", &ip(14), &m(14), None).await;
    for i in [11, 12, 13] {
        release(&ns, "resume", &ip(i)).await;
    }
    allocate(&ns, "resume", &ip(15), &m(15), None).await;
    // +11 +12 -10 +13 (+20 +21 excluded) +14 -11 -12 -13 +15: eleven events, each with its
    // own version.
    let total = 11;
    let on_a = events(
        &a,
        &format!("{path}?watch=true&resourceVersion={list_rv}"),
        total,
    )
    .await;
    let seen = summary(&on_a);
    let versions: std::collections::BTreeSet<&String> = seen.iter().map(|(_, _, rv)| rv).collect();
    assert_eq!(versions.len(), total, "one version per event: {seen:#?}");
    let numbers: Vec<u64> = seen
        .iter()
        .map(|(_, _, rv)| rv.parse().expect("numeric"))
        .collect();
    assert!(
        numbers.windows(2).all(|w| w[0] < w[1]),
        "versions increase: {seen:#?}"
    );
    let excluded: Vec<&(String, String, String)> = seen
        .iter()
        .filter(|(_, name, _)| name.ends_with("-20") || name.ends_with("-21"))
        .collect();
    assert_eq!(excluded.len(), 2, "{seen:#?}");
    // The same watch on B gives the same events with the same versions...
    let on_b = events(
        &b,
        &format!("{path}?watch=true&resourceVersion={list_rv}"),
        total,
    )
    .await;
    assert_eq!(summary(&on_b), seen);
    // ...and a client that saw A's events up to the first excluded row resumes on B with
    // exactly the rest, though that row is in the middle of one pool write.
    let middle = seen
        .iter()
        .position(|(_, name, _)| name.ends_with("-20"))
        .expect("the first excluded row");
    let rest = events(
        &b,
        &format!("{path}?watch=true&resourceVersion={}", seen[middle].2),
        total - middle - 1,
    )
    .await;
    assert_eq!(summary(&rest), seen[middle + 1..].to_vec());
    eprintln!("events on A and B: {seen:#?}");
    if let Ok(mut p) = second.process.lock() {
        p.kill();
    }
}

async fn plain_get(port: u16, path: &str) -> (u16, String) {
    vm_dhcp_e2e::plain_get(port, path)
        .await
        .unwrap_or_else(|e| panic!("GET {path} on port {port}: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_requests_watches_and_objects() {
    let api = server().await;
    let cp = ControlPlane::shared().await;
    let ns = cp.namespace("aggmetrics").await;
    create_pool(&ns, "met", 32, json!({})).await;
    allocate(&ns, "met", "172.32.0.10", "02:00:00:00:32:10", None).await;
    kubectl_until(cp, &["get", "ipamallocations", "-n", &ns.name], |t| {
        t.contains("172.32.0.10")
    })
    .await;
    // A watch held open while the metrics are read.
    let client = cp.client().await;
    let req = http::Request::get(format!(
        "{GV}/namespaces/{}/macaddresses?watch=true",
        ns.name
    ))
    .body(Vec::new())
    .expect("request");
    let mut lines = client.request_stream(req).await.expect("watch").lines();
    let first = lines.next().await.expect("an event").expect("line");
    assert!(first.contains("ADDED"), "{first}");
    let (code, text) = plain_get(api.metrics_port, "/metrics").await;
    assert_eq!(code, 200, "{text}");
    for expected in [
        "vm_dhcp_apiserver_requests_total{verb=\"list\",resource=\"ipamallocations\",code=\"200\"}",
        "vm_dhcp_apiserver_watches{resource=\"macaddresses\"} 1",
        "vm_dhcp_apiserver_request_duration_seconds_bucket{",
        "vm_dhcp_apiserver_source_apply_seconds_count",
        "vm_dhcp_apiserver_view_objects{resource=\"ipamallocations\"}",
    ] {
        assert!(text.contains(expected), "{expected} missing from:\n{text}");
    }
    // The metrics port serves nothing else; the secure port does not serve /metrics
    // without the aggregator's certificate.
    assert_eq!(plain_get(api.metrics_port, "/apis").await.0, 404);
    let anonymous = direct(api, cp, None).await;
    let (code, _) = raw(&anonymous, "/metrics").await;
    assert_eq!(code, 401);
}
