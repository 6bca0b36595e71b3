//! The Harvester UI's path to the views: Steve's transport contract, checked with client-go
//! itself (the program in e2e/go/clientgo, client-go v0.34 as Harvester's Steve) through the
//! real kube-apiserver's aggregator against `vm-dhcp apiserver`: discovery (aggregated v2 and
//! legacy), OpenAPI v2 and v3, Table lists and watches, informers in both watch modes across
//! the restart of a replica and the crash of another, and a user holding only the aggregated
//! `view` ClusterRole.
//!
//! Two replicas of the server run; the APIService's Service points at a proxy standing for
//! its endpoints (replica A), so that A can be restarted while B takes over, as when a pod of
//! the Deployment is replaced, and B can then crash while the restarted A takes over. A test
//! binary of its own: the APIService is cluster-wide.

#[path = "apiserver/setup.rs"]
mod setup;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::authorization::v1::SubjectAccessReview;
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::api::rbac::v1::{ClusterRole, RoleBinding};
use kube::api::{Api, DeleteParams, PostParams};
use serde_json::json;
use setup::{AggregatedApi, allocate, create_pool, release};
use vm_dhcp_core::crd::IPPool;
use vm_dhcp_e2e::clientgo::{self, Line};
use vm_dhcp_e2e::faultproxy::FaultProxy;
use vm_dhcp_e2e::proc::{Process, run_dir};
use vm_dhcp_e2e::{ControlPlane, TestNamespace};

/// The user bound to the `view` ClusterRole in the viewer test.
const VIEWER: &str = "clientgo-viewer";

struct Backend {
    cp: &'static ControlPlane,
    /// The Service's endpoints: forwards new connections to the serving replica.
    proxy: FaultProxy,
    /// Replica A, behind the proxy until it is restarted; serving again after B crashed.
    a: Mutex<AggregatedApi>,
    /// Replica B, serving after A's restart until it crashes.
    b: Mutex<AggregatedApi>,
    viewer_kubeconfig: PathBuf,
    _controller_manager: Mutex<Process>,
}

/// Restarts and the other checks do not overlap: a restart ends every watch.
static RESTART: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

/// Everything, started once for this test binary, on a thread whose runtime lives as long
/// as the process (the proxy's tasks run there).
async fn backend() -> &'static Backend {
    static BACKEND: OnceLock<Backend> = OnceLock::new();
    static INIT: Mutex<()> = Mutex::new(());
    if let Some(b) = BACKEND.get() {
        return b;
    }
    let cp = ControlPlane::shared().await;
    tokio::task::spawn_blocking(move || {
        let _guard = INIT.lock().unwrap_or_else(|e| e.into_inner());
        if BACKEND.get().is_none() {
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("runtime");
                rt.block_on(async move {
                    let started = start_backend(cp).await;
                    let ok = started.is_ok();
                    let _ = tx.send(started);
                    if ok {
                        std::future::pending::<()>().await;
                    }
                });
            });
            match rx.recv() {
                Ok(Ok(b)) => {
                    let _ = BACKEND.set(b);
                }
                Ok(Err(e)) => panic!("starting the backend failed: {e:#}\n{}", cp.logs(30)),
                Err(_) => panic!("the backend's start-up thread died"),
            }
        }
        BACKEND.get().expect("set above")
    })
    .await
    .expect("start-up task")
}

fn kubeconfig_for(cp: &ControlPlane, user: &str, groups: &[&str], file: &str) -> Result<PathBuf> {
    use base64::Engine as _;
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let pair = cp.ca.client(user, groups)?;
    let config = json!({
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "e2e", "cluster": {
            "server": format!("https://127.0.0.1:{}", cp.apiserver_port),
            "certificate-authority-data": b64(&cp.ca.cert_pem())}}],
        "users": [{"name": user, "user": {
            "client-certificate-data": b64(&pair.cert), "client-key-data": b64(&pair.key)}}],
        "contexts": [{"name": "e2e", "context": {"cluster": "e2e", "user": user}}],
        "current-context": "e2e"
    });
    let path = run_dir()?.join(file);
    std::fs::write(&path, serde_json::to_string(&config)?)?;
    Ok(path)
}

async fn start_backend(cp: &'static ControlPlane) -> Result<Backend> {
    // The `view` ClusterRole is filled from the roles labelled aggregate-to-view by
    // kube-controller-manager's aggregation controller: run that controller alone.
    let kcm_config = kubeconfig_for(
        cp,
        "clientgo-e2e-controller-manager",
        &["system:masters"],
        "clientgo-kcm.kubeconfig",
    )?;
    let kcm_dir = run_dir()?.join("clientgo-kcm");
    std::fs::create_dir_all(&kcm_dir)?;
    let mut kcm = std::process::Command::new(vm_dhcp_e2e::bins::kube_controller_manager()?);
    kcm.args([
        format!("--kubeconfig={}", kcm_config.display()),
        format!("--authentication-kubeconfig={}", kcm_config.display()),
        format!("--authorization-kubeconfig={}", kcm_config.display()),
        "--bind-address=127.0.0.1".into(),
        format!("--secure-port={}", vm_dhcp_e2e::free_port()?),
        format!("--cert-dir={}", kcm_dir.display()),
        "--leader-elect=false".into(),
        "--controllers=clusterrole-aggregation-controller".into(),
        "--v=1".into(),
    ]);
    let controller_manager = Process::spawn(
        "kube-controller-manager (role aggregation)",
        kcm,
        &run_dir()?.join("clientgo-kcm.log"),
        &run_dir()?,
    )?;

    let proxy = FaultProxy::start(SocketAddr::from(([127, 0, 0, 1], 1))).await?;
    let a = setup::start_via(cp, &[], Some(&proxy)).await?;
    let b = setup::spawn_replica("apiserver-b")?;
    wait_ready(cp, &b).await?;
    wait_merged(cp).await?;
    Ok(Backend {
        cp,
        proxy,
        a: Mutex::new(a),
        b: Mutex::new(b),
        viewer_kubeconfig: kubeconfig_for(cp, VIEWER, &[], "clientgo-viewer.kubeconfig")?,
        _controller_manager: Mutex::new(controller_manager),
    })
}

/// Waits until a replica's /readyz (over TLS, straight to it) says ok.
async fn wait_ready(cp: &ControlPlane, api: &AggregatedApi) -> Result<()> {
    let url: http::Uri = format!("https://127.0.0.1:{}", api.port).parse()?;
    let mut config = kube::Config::new(url);
    let ca = rustls_pemfile::certs(&mut cp.serving_ca.cert_pem().as_bytes())
        .next()
        .context("the serving CA")??;
    config.root_cert = Some(vec![ca.to_vec()]);
    let client = kube::Client::try_from(config)?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let req = http::Request::get("/readyz").body(Vec::new())?;
        if client
            .request_text(req)
            .await
            .is_ok_and(|t| t.trim() == "ok")
        {
            return Ok(());
        }
        if let Some(status) = api
            .process
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .exited()
        {
            bail!("the replica exited ({status}):\n{}", api.log_tail(30));
        }
        if Instant::now() > deadline {
            bail!("the replica never became ready:\n{}", api.log_tail(30));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits until kube-apiserver has merged our group into its aggregated discovery (fresh)
/// and our definitions into its OpenAPI v2 and v3 documents: it fetches them on its own
/// schedule after the APIService becomes available, and its first tries, made before the
/// server listened, failed.
async fn wait_merged(cp: &ControlPlane) -> Result<()> {
    let client = cp.client().await;
    let started = Instant::now();
    let deadline = started + Duration::from_secs(90);
    let get = |path: &str, accept: &str| {
        http::Request::get(path)
            .header("Accept", accept)
            .body(Vec::new())
            .map_err(anyhow::Error::from)
    };
    let mut missing = Vec::new();
    loop {
        missing.clear();
        let discovery = client
            .request_text(get(
                "/apis",
                "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList",
            )?)
            .await
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok());
        let fresh = discovery.as_ref().is_some_and(|d| {
            d["items"].as_array().is_some_and(|groups| {
                groups.iter().any(|g| {
                    g["metadata"]["name"] == "dhcp.harvesterhci.io"
                        && g["versions"][0]["freshness"] == "Current"
                })
            })
        });
        if !fresh {
            missing.push("aggregated discovery (fresh)");
        }
        let v2 = client
            .request_text(get("/openapi/v2", "application/json")?)
            .await
            .unwrap_or_default();
        if !v2.contains("io.harvesterhci.dhcp.v1alpha1.IPAMAllocation") {
            missing.push("OpenAPI v2 definitions");
        }
        let v3 = client
            .request_text(get("/openapi/v3", "application/json")?)
            .await
            .unwrap_or_default();
        if !v3.contains("apis/dhcp.harvesterhci.io/v1alpha1") {
            missing.push("OpenAPI v3 path");
        }
        if missing.is_empty() {
            eprintln!(
                "kube-apiserver merged our discovery and OpenAPI {:.1} s after the server was ready",
                started.elapsed().as_secs_f64()
            );
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("kube-apiserver never merged our {missing:?} (90 s)");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn view_name(pool: &str, addr: &str) -> String {
    format!("{pool}.{}", addr.replace(['.', ':'], "-"))
}

/// Runs one check of the program, answering its steps with `step`; fails the test with
/// every FAIL line (and client-go's log) if any.
async fn run_check<F, Fut>(check: &str, args: Vec<String>, mut step: F)
where
    F: FnMut(String) -> Fut,
    Fut: std::future::Future<Output = Result<String>>,
{
    let mut run = clientgo::start(check, &args).expect("starting clientgo");
    let started = Instant::now();
    loop {
        let line = match run.next(Duration::from_secs(120)).await {
            Ok(Some(line)) => line,
            Ok(None) => break,
            Err(e) => panic!(
                "clientgo {check}: {e:#}\nclient-go log:\n{}",
                run.stderr_tail(40)
            ),
        };
        if let Line::Step(what) = line {
            let answer = match step(what.clone()).await {
                Ok(value) if value.is_empty() => "ok".to_string(),
                Ok(value) => format!("ok {value}"),
                Err(e) => format!("error {e:#}").replace('\n', " | "),
            };
            eprintln!("clientgo {check}: step {what:?} -> {answer}");
            run.answer(&answer).await.expect("answering a step");
        }
    }
    let status = run
        .wait(Duration::from_secs(30))
        .await
        .expect("clientgo exits");
    eprintln!(
        "clientgo {check}: {} passed, {} failed, {status}, {:.1} s",
        run.passed.len(),
        run.failed.len(),
        started.elapsed().as_secs_f64()
    );
    assert!(
        run.failed.is_empty() && status.success() && !run.passed.is_empty(),
        "clientgo {check} ({status}) failed:\n{}\nclient-go log:\n{}",
        run.failed.join("\n"),
        run.stderr_tail(40)
    );
}

fn admin_args(b: &Backend, ns: &TestNamespace) -> Vec<String> {
    vec![
        format!("--kubeconfig={}", b.cp.kubeconfig_path.display()),
        format!("--namespace={}", ns.name),
    ]
}

/// A pool with a reserved row (its server IP inside the range) and `allocated` addresses
/// (.10, .11, ... with MACs 02:00:00:00:<octet>:10, :11, ...), waited for until the views
/// show them.
async fn pool_with_rows(ns: &TestNamespace, pool: &str, octet: u8, allocated: u8) {
    pool_with_rows_and(ns, pool, octet, allocated, &[]).await;
}

/// [`pool_with_rows`], with these addresses excluded (a row each).
async fn pool_with_rows_and(
    ns: &TestNamespace,
    pool: &str,
    octet: u8,
    allocated: u8,
    excluded: &[&str],
) {
    create_pool(
        ns,
        pool,
        octet,
        json!({"serverIP": format!("172.{octet}.0.50"), "pool": {"exclude": excluded}}),
    )
    .await;
    for i in 0..allocated {
        allocate(
            ns,
            pool,
            &format!("172.{octet}.0.{}", 10 + i),
            &format!("02:00:00:00:{octet}:{}", 10 + i),
            Some(&format!("{}/vm-{i}", ns.name)),
        )
        .await;
    }
    let want = usize::from(allocated) + 1 + excluded.len();
    let cp = backend().await.cp;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let out = cp
            .kubectl(&["get", "ipamallocations", "-n", &ns.name, "--no-headers"])
            .await;
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        if out.status.success() && text.lines().count() == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the views never showed {want} rows:\n{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_aggregated_and_legacy_agree() {
    let b = backend().await;
    let _shared = RESTART.read().await;
    let ns = b.cp.namespace("cgdisc").await;
    run_check("discovery", admin_args(b, &ns), |s| async move {
        bail!("unexpected step {s}")
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openapi_v2_answers_and_our_v3_converts() {
    let b = backend().await;
    let _shared = RESTART.read().await;
    let ns = b.cp.namespace("cgopenapi").await;
    pool_with_rows(&ns, "oa", 42, 1).await;
    // A core object with managed fields (any write has them) and an owner reference.
    let cm: ConfigMap = serde_json::from_value(json!({
        "metadata": {"name": "clientgo-openapi-probe", "ownerReferences": [{
            "apiVersion": "v1", "kind": "Namespace", "name": ns.name,
            "uid": "00000000-0000-0000-0000-000000000001"}]},
        "data": {"k": "v"}
    }))
    .expect("configmap");
    ns.api::<ConfigMap>()
        .create(&PostParams::default(), &cm)
        .await
        .expect("create the probe ConfigMap");
    run_check("openapi", admin_args(b, &ns), |s| async move {
        bail!("unexpected step {s}")
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn table_list_pages_and_watch_as_steve_asks() {
    let b = backend().await;
    let _shared = RESTART.read().await;
    let ns = b.cp.namespace("cgtable").await;
    pool_with_rows(&ns, "tb", 43, 3).await;
    let ns = &ns;
    run_check("table", admin_args(b, ns), |s| async move {
        if s != "table-changes" {
            bail!("unexpected step {s}");
        }
        // Two allocations and a release: three events, in this order.
        allocate(ns, "tb", "172.43.0.20", "02:00:00:00:43:20", None).await;
        allocate(ns, "tb", "172.43.0.21", "02:00:00:00:43:21", None).await;
        release(ns, "tb", "172.43.0.20").await;
        Ok([
            ("ADDED", "172.43.0.20"),
            ("ADDED", "172.43.0.21"),
            ("DELETED", "172.43.0.20"),
        ]
        .map(|(t, ip)| format!("{t}:{}", view_name("tb", ip)))
        .join(","))
    })
    .await;
}

impl Backend {
    /// Replica A goes away as a replaced pod does (out of the endpoints, and SIGTERM: it
    /// drains and exits), B serves, and A comes back as a new process, ready.
    async fn restart_a(&self) -> Result<()> {
        let b_port = self.b.lock().unwrap_or_else(|e| e.into_inner()).port;
        self.proxy
            .set_target(SocketAddr::from(([127, 0, 0, 1], b_port)));
        let pid = {
            let a = self.a.lock().unwrap_or_else(|e| e.into_inner());
            let process = a.process.lock().unwrap_or_else(|e| e.into_inner());
            i32::try_from(process.id())?
        };
        // SAFETY: kill(2) on our own child's pid; no memory is involved.
        if unsafe { libc::kill(pid, libc::SIGTERM) } != 0 {
            bail!("SIGTERM to replica A: {}", std::io::Error::last_os_error());
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let exited = {
                let a = self.a.lock().unwrap_or_else(|e| e.into_inner());
                let mut process = a.process.lock().unwrap_or_else(|e| e.into_inner());
                process.exited()
            };
            if let Some(status) = exited {
                eprintln!("replica A exited after SIGTERM: {status}");
                break;
            }
            if Instant::now() > deadline {
                bail!("replica A did not exit within 30 s of SIGTERM");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let restarted = setup::spawn_replica("apiserver-a-restarted")?;
        wait_ready(self.cp, &restarted).await?;
        *self.a.lock().unwrap_or_else(|e| e.into_inner()) = restarted;
        Ok(())
    }

    /// Replica B crashes (SIGKILL) while it serves: for a second its endpoint still takes
    /// connections (refused: the aggregator answers 503), then traffic moves to A; B comes
    /// back as a new process.
    async fn crash_b(&self) -> Result<()> {
        {
            let b = self.b.lock().unwrap_or_else(|e| e.into_inner());
            b.process.lock().unwrap_or_else(|e| e.into_inner()).kill();
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        let a_port = self.a.lock().unwrap_or_else(|e| e.into_inner()).port;
        self.proxy
            .set_target(SocketAddr::from(([127, 0, 0, 1], a_port)));
        let restarted = setup::spawn_replica("apiserver-b-restarted")?;
        wait_ready(self.cp, &restarted).await?;
        *self.b.lock().unwrap_or_else(|e| e.into_inner()) = restarted;
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn informers_in_both_watch_modes_across_a_replica_restart_and_a_crash() {
    informers_across_restart_and_crash("cginf", 44, &[]).await;
}

/// The same with a pool whose creation makes two rows at one revision (excluded .40,
/// reserved .50): after the relist that the crash forces onto the restarted replica, their
/// versions must be the ones the replica that applied the creation gave them (found by
/// this check: a replica started later stamped every such row `r×K+0`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn informers_see_no_version_go_back_with_two_rows_made_by_one_pool_write() {
    informers_across_restart_and_crash("cginfx", 47, &["172.47.0.40"]).await;
}

/// The informers check on pool `inf` (172.<octet>.0.0/24, two allocations, `excluded`).
async fn informers_across_restart_and_crash(prefix: &str, octet: u8, excluded: &[&str]) {
    let b = backend().await;
    let _exclusive = RESTART.write().await;
    let ns = b.cp.namespace(prefix).await;
    pool_with_rows_and(&ns, "inf", octet, 2, excluded).await;
    let mut args = admin_args(b, &ns);
    args.push("--pool=inf".into());
    let ns = &ns;
    let ip = |i: u8| format!("172.{octet}.0.{i}");
    let mac = |i: u8| format!("02:00:00:00:{octet}:{i}");
    let (ip, mac) = (&ip, &mac);
    run_check("informers", args, |s| async move {
        match s.as_str() {
            "allocate" => {
                allocate(ns, "inf", &ip(30), &mac(30), None).await;
                Ok(format!(
                    "{} {}",
                    view_name("inf", &ip(30)),
                    view_name("inf", &mac(30))
                ))
            }
            "restart" => b.restart_a().await.map(|()| String::new()),
            "crash" => b.crash_b().await.map(|()| String::new()),
            "release" => {
                release(ns, "inf", &ip(10)).await;
                Ok(format!(
                    "{} {}",
                    view_name("inf", &ip(10)),
                    view_name("inf", &mac(10))
                ))
            }
            "delete-pool" => {
                ns.api::<IPPool>()
                    .delete("inf", &DeleteParams::default())
                    .await?;
                Ok(String::new())
            }
            other => bail!("unexpected step {other}"),
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_view_user_reads_its_namespace_only() {
    let b = backend().await;
    let _shared = RESTART.read().await;
    let ns = b.cp.namespace("cgview").await;
    let other = b.cp.namespace("cgother").await;
    pool_with_rows(&ns, "vw", 45, 1).await;
    pool_with_rows(&other, "vw", 46, 1).await;
    // Only the aggregated `view` ClusterRole, in `ns`; it must hold our rules first (the
    // aggregation controller adds them from the chart's aggregate-to-view role).
    let roles: Api<ClusterRole> = Api::all(ns.client.clone());
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let view = roles.get("view").await.expect("the view ClusterRole");
        let ours = view.rules.unwrap_or_default().iter().any(|r| {
            r.api_groups
                .as_ref()
                .is_some_and(|g| g.iter().any(|g| g == "dhcp.harvesterhci.io"))
        });
        if ours {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the view ClusterRole never got the dhcp.harvesterhci.io rules"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let binding: RoleBinding = serde_json::from_value(json!({
        "metadata": {"name": "clientgo-viewer"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "view"},
        "subjects": [{"kind": "User", "name": VIEWER, "apiGroup": "rbac.authorization.k8s.io"}]
    }))
    .expect("binding");
    ns.api::<RoleBinding>()
        .create(&PostParams::default(), &binding)
        .await
        .expect("bind the viewer");
    // kube-apiserver's RBAC sees the binding through its own cache: wait until it allows
    // (our server asks it the same question, and caches a denial for 10 s).
    let reviews: Api<SubjectAccessReview> = Api::all(ns.client.clone());
    let review: SubjectAccessReview = serde_json::from_value(json!({
        "spec": {"user": VIEWER, "groups": ["system:authenticated"], "resourceAttributes": {
            "namespace": ns.name, "verb": "watch", "group": "dhcp.harvesterhci.io",
            "resource": "dhcpleases"}}
    }))
    .expect("review");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let answer = reviews
            .create(&PostParams::default(), &review)
            .await
            .expect("SubjectAccessReview");
        if answer.status.is_some_and(|s| s.allowed) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "RBAC never allowed the viewer through the view ClusterRole"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let args = vec![
        format!("--kubeconfig={}", b.viewer_kubeconfig.display()),
        format!("--admin-kubeconfig={}", b.cp.kubeconfig_path.display()),
        format!("--namespace={}", ns.name),
        format!("--other-namespace={}", other.name),
    ];
    run_check(
        "viewer",
        args,
        |s| async move { bail!("unexpected step {s}") },
    )
    .await;
}
