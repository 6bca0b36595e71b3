//! `vm-dhcp apiserver` as a process behind the real aggregator: its RBAC (from
//! apiserver/rbac.yaml, bound to a User here), a kubeconfig for that user, a serving
//! certificate for `<service>.<namespace>.svc`, an ExternalName Service → localhost and the
//! APIService v1alpha1.dhcp.harvesterhci.io with the caBundle. Shared by the e2e test and
//! the benchmark.

use std::path::PathBuf;
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use base64::Engine as _;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::kube_aggregator::pkg::apis::apiregistration::v1::APIService;
use kube::api::DeleteParams;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde::Deserialize as _;
use serde_json::{Value, json};
use vm_dhcp_core::crd::{IPPool, IPPoolAddress};
use vm_dhcp_core::store::{Holding, address_object, address_object_name};
use vm_dhcp_e2e::proc::{Process, run_dir};
use vm_dhcp_e2e::{ControlPlane, TestNamespace};

pub const APISERVICE: &str = "v1alpha1.dhcp.harvesterhci.io";
/// The user the server runs as (its kubeconfig's client certificate).
pub const SERVER_USER: &str = "vm-dhcp-apiserver";

pub struct AggregatedApi {
    pub port: u16,
    /// Plain HTTP, /metrics.
    #[allow(dead_code)]
    pub metrics_port: u16,
    /// Where the Service lives.
    #[allow(dead_code)]
    pub namespace: String,
    pub process: Mutex<Process>,
}

impl AggregatedApi {
    pub fn log_tail(&self, lines: usize) -> String {
        self.process
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .log_tail(lines)
    }
}

pub fn binary() -> Result<PathBuf> {
    // The e2e crate does not depend on the binary crate: find it next to our own executable
    // (target/<profile>/deps for tests, target/<profile>/examples for examples).
    let mut dir = std::env::current_exe()?;
    dir.pop();
    if dir.ends_with("deps") || dir.ends_with("examples") {
        dir.pop();
    }
    let bin = dir.join("vm-dhcp");
    if !bin.is_file() {
        bail!(
            "{} missing: build it first (`cargo build --bin vm-dhcp`, or --release for the benchmark)",
            bin.display()
        );
    }
    Ok(bin)
}

fn b64(s: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

/// apiserver/rbac.yaml with the ServiceAccount subjects replaced by our User.
async fn apply_rbac(cp: &ControlPlane, dir: &std::path::Path) -> Result<()> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../apiserver/rbac.yaml");
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
    let mut docs = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let mut v = serde_json::to_value(serde_yaml::Value::deserialize(doc)?)?;
        if v.get("subjects").is_some() {
            v["subjects"] = serde_json::json!([{
                "kind": "User", "name": SERVER_USER, "apiGroup": "rbac.authorization.k8s.io"
            }]);
        }
        docs.push(serde_yaml::to_string(&v)?);
    }
    let file = dir.join("rbac.yaml");
    std::fs::write(&file, docs.join("---\n"))?;
    let out = cp
        .kubectl(&["apply", "-f", &file.display().to_string()])
        .await;
    if !out.status.success() {
        bail!(
            "kubectl apply rbac: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}
/// Runs `vm-dhcp apiserver` with the certificate and kubeconfig `start` wrote into `dir`.
fn spawn(
    dir: &std::path::Path,
    name: &str,
    extra_args: &[String],
    namespace: &str,
) -> Result<AggregatedApi> {
    let run = run_dir()?;
    let port = vm_dhcp_e2e::free_port()?;
    let metrics_port = vm_dhcp_e2e::free_port()?;
    let mut cmd = Command::new(binary()?);
    cmd.args([
        "apiserver".to_string(),
        format!("--secure-port={port}"),
        "--bind-address=127.0.0.1".into(),
        format!("--tls-cert-file={}", dir.join("tls.crt").display()),
        format!("--tls-private-key-file={}", dir.join("tls.key").display()),
        format!("--kubeconfig={}", dir.join("kubeconfig").display()),
        format!("--metrics-port={metrics_port}"),
    ]);
    cmd.args(extra_args);
    cmd.env("RUST_LOG", "info");
    let process = Process::spawn(
        &format!("vm-dhcp-{name}"),
        cmd,
        &run.join(format!("{name}.log")),
        &run,
    )?;
    Ok(AggregatedApi {
        port,
        metrics_port,
        namespace: namespace.to_string(),
        process: Mutex::new(process),
    })
}

/// A second replica beside the registered one (after `start`): same identity and
/// certificate, not behind the aggregator; clients reach it directly.
#[allow(dead_code)] // used by the e2e test, not by the benchmark that shares this file
pub fn spawn_replica(name: &str) -> Result<AggregatedApi> {
    spawn(&run_dir()?.join("aggregated-api"), name, &[], "")
}

/// Starts the server and registers it; returns once kube-apiserver proxies to it.
#[allow(dead_code)] // the client-go test registers it behind a proxy instead
pub async fn start(cp: &'static ControlPlane, extra_args: &[String]) -> Result<AggregatedApi> {
    start_via(cp, extra_args, None).await
}

/// [`start`], with the APIService's Service pointing at `front` (a proxy standing for the
/// Service's endpoints, e.g. to move traffic between replicas), which is set to forward to
/// the server.
pub async fn start_via(
    cp: &'static ControlPlane,
    extra_args: &[String],
    front: Option<&vm_dhcp_e2e::faultproxy::FaultProxy>,
) -> Result<AggregatedApi> {
    let run = run_dir()?;
    let dir = run.join("aggregated-api");
    std::fs::create_dir_all(&dir)?;
    apply_rbac(cp, &dir).await?;
    let ns = cp.namespace("aggapi").await;
    let svc_name = "vm-dhcp-apiserver";
    let svc_host = format!("{svc_name}.{}.svc", ns.name);
    let serving = cp
        .serving_ca
        .serving(svc_name, &["localhost", "127.0.0.1", &svc_host])?;
    let cert_file = dir.join("tls.crt");
    let key_file = dir.join("tls.key");
    std::fs::write(&cert_file, &serving.cert)?;
    std::fs::write(&key_file, &serving.key)?;
    let user = cp.ca.client(SERVER_USER, &[])?;
    let kubeconfig = serde_json::json!({
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "e2e", "cluster": {
            "server": format!("https://127.0.0.1:{}", cp.apiserver_port),
            "certificate-authority-data": b64(&cp.ca.cert_pem())}}],
        "users": [{"name": SERVER_USER, "user": {
            "client-certificate-data": b64(&user.cert), "client-key-data": b64(&user.key)}}],
        "contexts": [{"name": "e2e", "context": {"cluster": "e2e", "user": SERVER_USER}}],
        "current-context": "e2e"
    });
    let kubeconfig_file = dir.join("kubeconfig");
    std::fs::write(&kubeconfig_file, serde_yaml::to_string(&kubeconfig)?)?;

    let api = spawn(&dir, "apiserver", extra_args, &ns.name)?;
    let port = match front {
        Some(proxy) => {
            proxy.set_target(std::net::SocketAddr::from(([127, 0, 0, 1], api.port)));
            proxy.port()
        }
        None => api.port,
    };

    let svc: Service = serde_json::from_value(serde_json::json!({
        "metadata": {"name": svc_name},
        "spec": {"type": "ExternalName", "externalName": "localhost", "ports": [{"port": port}]}
    }))?;
    ns.api::<Service>()
        .create(&PostParams::default(), &svc)
        .await
        .context("creating the ExternalName Service")?;
    let apisvc: APIService = serde_json::from_value(serde_json::json!({
        "metadata": {"name": APISERVICE},
        "spec": {"group": "dhcp.harvesterhci.io", "version": "v1alpha1",
                 "groupPriorityMinimum": 1000, "versionPriority": 15,
                 "service": {"namespace": ns.name, "name": svc_name, "port": port},
                 "caBundle": b64(&cp.serving_ca.cert_pem())}
    }))?;
    Api::<APIService>::all(ns.client.clone())
        .patch(
            APISERVICE,
            &PatchParams::apply("vm-dhcp-e2e").force(),
            &Patch::Apply(&apisvc),
        )
        .await
        .context("registering the APIService")?;

    // Available, and the views synced (a list answers 200, not 503).
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out = cp
            .kubectl(&[
                "get",
                "--raw",
                "/apis/dhcp.harvesterhci.io/v1alpha1/ipamallocations",
            ])
            .await;
        if out.status.success() {
            break;
        }
        if let Some(status) = api
            .process
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .exited()
        {
            bail!("vm-dhcp apiserver exited ({status}):\n{}", api.log_tail(40));
        }
        if Instant::now() > deadline {
            bail!(
                "the aggregated API never answered: {}\n{}",
                String::from_utf8_lossy(&out.stderr),
                api.log_tail(40)
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(api)
}

// The sources of the views, written as the webhook and the controller write them.

#[allow(dead_code)] // not every user of this file needs every helper
/// Pool `<ns>/<name>` on 172.<octet>.0.0/24, range .10–.50, server IP .2 (outside the range),
/// with `config` merged into its `ipv4Config` (e.g. exclusions, a server IP inside the range).
pub fn pool(ns: &str, name: &str, octet: u8, config: Value) -> IPPool {
    let mut ipv4 = json!({
        "cidr": format!("172.{octet}.0.0/24"), "serverIP": format!("172.{octet}.0.2"),
        "pool": {"start": format!("172.{octet}.0.10"), "end": format!("172.{octet}.0.50")}});
    if let (Some(base), Some(extra)) = (ipv4.as_object_mut(), config.as_object()) {
        for (k, v) in extra {
            match (base.get_mut(k), v) {
                (Some(Value::Object(b)), Value::Object(e)) => b.extend(e.clone()),
                _ => {
                    base.insert(k.clone(), v.clone());
                }
            }
        }
    }
    serde_json::from_value(json!({
        "apiVersion": "network.harvesterhci.io/v1alpha1", "kind": "IPPool",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"networkName": format!("{ns}/{name}"), "ipv4Config": ipv4}
    }))
    .expect("pool")
}

/// Creates a pool. Its status stays empty: the views come from the IPPoolAddress objects
/// (and the spec), never from the status.
#[allow(dead_code)]
pub async fn create_pool(ns: &TestNamespace, name: &str, octet: u8, config: Value) {
    ns.api::<IPPool>()
        .create(&PostParams::default(), &pool(&ns.name, name, octet, config))
        .await
        .expect("create pool");
}

/// What the webhook writes for an allocation: the pool's IPPoolAddress object for `ip`.
#[allow(dead_code)]
pub async fn allocate(ns: &TestNamespace, pool: &str, ip: &str, mac: &str, owner: Option<&str>) {
    allocate_as(ns, pool, ip, mac, owner, false).await;
}

#[allow(dead_code)]
pub async fn allocate_as(
    ns: &TestNamespace,
    pool: &str,
    ip: &str,
    mac: &str,
    owner: Option<&str>,
    static_: bool,
) {
    let h = Holding {
        ip: ip.parse().expect("ip"),
        mac: mac.parse().expect("mac"),
        owner: owner.map(str::to_string),
        static_,
        interface: Some("nic-1".into()),
    };
    let obj = address_object(&ns.name, pool, &format!("{}/{pool}", ns.name), &h);
    ns.api::<IPPoolAddress>()
        .create(&PostParams::default(), &obj)
        .await
        .expect("create the IPPoolAddress");
}

/// What the controller does on release: deletes the address object.
#[allow(dead_code)]
pub async fn release(ns: &TestNamespace, pool: &str, ip: &str) {
    ns.api::<IPPoolAddress>()
        .delete(
            &address_object_name(pool, ip.parse().expect("ip")),
            &DeleteParams::default(),
        )
        .await
        .expect("delete the IPPoolAddress");
}
