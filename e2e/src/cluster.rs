//! A real control plane for tests: etcd and kube-apiserver on free loopback ports, with the
//! aggregation layer's front-proxy certificates, started once per test binary.
//!
//! Two shared instances: [`ControlPlane::shared`] runs no controllers at all (no garbage
//! collector, no namespace controller: many tests rely on that), and
//! [`ControlPlane::with_controllers`] adds kube-controller-manager, as in a cluster.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};

use crate::pki::{Ca, CertPair};
use crate::proc::{Process, log_tail, run_dir};

/// Files of the front-proxy (aggregation layer) identity, for tests of our own
/// authentication: a client holding `client` is the aggregator.
pub struct FrontProxy {
    pub ca_file: PathBuf,
    pub client: CertPair,
    pub allowed_name: &'static str,
}

pub struct ControlPlane {
    pub dir: PathBuf,
    pub apiserver_port: u16,
    pub etcd_url: String,
    pub kubeconfig_path: PathBuf,
    pub kubeconfig: Kubeconfig,
    /// The cluster CA (signs the apiserver's serving certificate and client certificates).
    pub ca: Ca,
    /// The CA used for our own test servers (webhooks, aggregated API).
    pub serving_ca: Ca,
    pub front_proxy: FrontProxy,
    pub bin_dir: PathBuf,
    /// How long start-up took, from nothing to CRDs established (and, with controllers,
    /// kube-controller-manager working).
    pub startup: Duration,
    /// What runs besides etcd and kube-apiserver.
    pub options: Options,
    /// How long kube-controller-manager took from its start until its controllers worked
    /// (`None` without controllers).
    pub controllers_startup: Option<Duration>,
    processes: Mutex<Vec<Process>>,
}

/// What a control plane runs besides etcd and kube-apiserver.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Options {
    /// Also run kube-controller-manager with [`CONTROLLERS`], and let kube-apiserver reach
    /// aggregated APIs and Service-addressed webhooks at their Service's EndpointSlice
    /// addresses (`--enable-aggregator-routing`), as a cluster without kube-proxy on the
    /// apiserver's host must. In that mode `ExternalName` Services are refused, and
    /// EndpointSlices cannot hold loopback addresses: backends need a pod IP.
    pub controllers: bool,
}

/// The controllers kube-controller-manager runs in a control plane with controllers: those
/// a cluster needs for objects to behave as users expect (Deployments get ReplicaSets and
/// Pods, deleted namespaces go away, owners' dependents are collected, aggregated
/// ClusterRoles are filled, Services get Endpoints and EndpointSlices, namespaces get their
/// `default` ServiceAccount and `kube-root-ca.crt`). Left out because there is no real node:
/// node lifecycle, taint eviction and pod GC (they would evict or delete the simulated
/// nodes' pods), node IPAM, volumes, and CSR signing.
pub const CONTROLLERS: &[&str] = &[
    "serviceaccount-token-controller",
    "serviceaccount-controller",
    "root-ca-certificate-publisher-controller",
    "garbage-collector-controller",
    "namespace-controller",
    "deployment-controller",
    "replicaset-controller",
    "statefulset-controller",
    "daemonset-controller",
    "job-controller",
    "disruption-controller",
    "clusterrole-aggregation-controller",
    "endpoints-controller",
    "endpointslice-controller",
    "endpointslice-mirroring-controller",
];

/// A free TCP port on 127.0.0.1 (the listener is closed again: a tiny race we accept).
/// Whether etcd syncs to disk (`VM_DHCP_E2E_ETCD_FSYNC=1`, for benchmarks) or not (tests).
pub fn etcd_fsync() -> bool {
    std::env::var("VM_DHCP_E2E_ETCD_FSYNC").is_ok_and(|v| v == "1")
}

pub fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn write(dir: &Path, name: &str, text: &str) -> Result<PathBuf> {
    let path = dir.join(name);
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

const FRONT_PROXY_CLIENT: &str = "front-proxy-client";
const CONTROLLER_MANAGER_USER: &str = "system:kube-controller-manager";

/// Starts a value once per test binary: on a thread of its own, with a runtime of its own
/// (which cannot nest in the caller's, and must not be the runtime of one `#[tokio::test]`,
/// which ends with that test). A failed start panics every caller.
pub async fn start_once<T, F, Fut>(
    cell: &'static OnceLock<T>,
    init: &'static Mutex<()>,
    what: &'static str,
    start: F,
) -> &'static T
where
    T: Send + Sync + 'static,
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<T>>,
{
    if let Some(value) = cell.get() {
        return value;
    }
    tokio::task::spawn_blocking(move || {
        let _guard = init.lock().unwrap_or_else(|e| e.into_inner());
        if cell.get().is_none() {
            let started = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("tokio runtime for start-up");
                rt.block_on(start())
            })
            .join()
            .unwrap_or_else(|_| panic!("{what} start-up thread panicked"));
            match started {
                Ok(value) => {
                    let _ = cell.set(value);
                }
                Err(e) => panic!("starting {what} failed: {e:#}"),
            }
        }
        cell.get().expect("value set above")
    })
    .await
    .expect("start-up task")
}

impl ControlPlane {
    /// The control plane shared by every test of this test binary, started on first use:
    /// etcd and kube-apiserver only, no controllers.
    pub async fn shared() -> &'static ControlPlane {
        static CP: OnceLock<ControlPlane> = OnceLock::new();
        static INIT: Mutex<()> = Mutex::new(());
        start_once(&CP, &INIT, "the test control plane", ControlPlane::start).await
    }

    /// A second control plane shared by the tests of this test binary that need
    /// kube-controller-manager (see [`CONTROLLERS`]), started on first use. It is separate
    /// from [`ControlPlane::shared`], whose tests rely on no controller running.
    pub async fn with_controllers() -> &'static ControlPlane {
        static CP: OnceLock<ControlPlane> = OnceLock::new();
        static INIT: Mutex<()> = Mutex::new(());
        start_once(&CP, &INIT, "the control plane with controllers", || {
            ControlPlane::start_with(Options { controllers: true })
        })
        .await
    }

    /// Starts etcd and kube-apiserver, waits until ready, installs the CRDs.
    pub async fn start() -> Result<ControlPlane> {
        Self::start_with(Options::default()).await
    }

    /// Starts etcd and kube-apiserver (and kube-controller-manager if asked), waits until
    /// ready, installs the CRDs.
    pub async fn start_with(options: Options) -> Result<ControlPlane> {
        let t0 = Instant::now();
        let bin_dir = crate::bins::bin_dir()?;
        let dir = if options.controllers {
            run_dir()?.join("control-plane-with-controllers")
        } else {
            run_dir()?.join("control-plane")
        };
        std::fs::create_dir_all(&dir)?;
        let run = run_dir()?;

        let ca = Ca::new("vm-dhcp-e2e-ca")?;
        let serving_ca = Ca::new("vm-dhcp-e2e-serving-ca")?;
        let fp_ca = Ca::new("vm-dhcp-e2e-front-proxy-ca")?;
        let apiserver_cert = ca.serving(
            "kube-apiserver",
            &["127.0.0.1", "localhost", "kubernetes.default.svc"],
        )?;
        let admin = ca.client("admin", &["system:masters"])?;
        let fp_client = fp_ca.client(FRONT_PROXY_CLIENT, &[])?;
        let (sa_key, sa_pub) = crate::pki::service_account_keys()?;
        let ca_file = write(&dir, "ca.crt", &ca.cert_pem())?;
        let cert_file = write(&dir, "apiserver.crt", &apiserver_cert.cert)?;
        let key_file = write(&dir, "apiserver.key", &apiserver_cert.key)?;
        let fp_ca_file = write(&dir, "front-proxy-ca.crt", &fp_ca.cert_pem())?;
        let fp_cert_file = write(&dir, "front-proxy-client.crt", &fp_client.cert)?;
        let fp_key_file = write(&dir, "front-proxy-client.key", &fp_client.key)?;
        let sa_key_file = write(&dir, "sa.key", &sa_key)?;
        let sa_pub_file = write(&dir, "sa.pub", &sa_pub)?;

        let mut processes = Vec::new();
        let etcd_port = free_port()?;
        let peer_port = free_port()?;
        let etcd_url = format!("http://127.0.0.1:{etcd_port}");
        let mut etcd = Command::new(bin_dir.join("etcd"));
        etcd.args([
            "--name=e2e",
            &format!("--data-dir={}", dir.join("etcd").display()),
            &format!("--listen-client-urls={etcd_url}"),
            &format!("--advertise-client-urls={etcd_url}"),
            &format!("--listen-peer-urls=http://127.0.0.1:{peer_port}"),
            &format!("--initial-advertise-peer-urls=http://127.0.0.1:{peer_port}"),
            &format!("--initial-cluster=e2e=http://127.0.0.1:{peer_port}"),
            "--log-level=warn",
        ]);
        // Tests skip etcd's fsync (it would only slow them); a benchmark of what admission
        // pays sets VM_DHCP_E2E_ETCD_FSYNC=1 to sync to disk as production does.
        if !etcd_fsync() {
            etcd.arg("--unsafe-no-fsync");
        }
        processes.push(Process::spawn("etcd", etcd, &dir.join("etcd.log"), &run)?);
        wait_tcp(etcd_port, &mut processes[0]).await?;

        let port = free_port()?;
        let p = |path: &Path| path.display().to_string();
        let mut api = Command::new(bin_dir.join("kube-apiserver"));
        api.args([
            format!("--etcd-servers={etcd_url}"),
            "--bind-address=127.0.0.1".into(),
            format!("--secure-port={port}"),
            "--advertise-address=127.0.0.1".into(),
            "--endpoint-reconciler-type=none".into(),
            format!("--cert-dir={}", p(&dir)),
            format!("--tls-cert-file={}", p(&cert_file)),
            format!("--tls-private-key-file={}", p(&key_file)),
            format!("--client-ca-file={}", p(&ca_file)),
            format!("--service-account-issuer=https://127.0.0.1:{port}"),
            format!("--service-account-key-file={}", p(&sa_pub_file)),
            format!("--service-account-signing-key-file={}", p(&sa_key_file)),
            "--service-cluster-ip-range=10.0.0.0/24".into(),
            "--authorization-mode=RBAC".into(),
            "--allow-privileged=true".into(),
            "--disable-admission-plugins=ServiceAccount".into(),
            format!("--requestheader-client-ca-file={}", p(&fp_ca_file)),
            format!("--requestheader-allowed-names={FRONT_PROXY_CLIENT}"),
            "--requestheader-username-headers=X-Remote-User".into(),
            "--requestheader-group-headers=X-Remote-Group".into(),
            "--requestheader-extra-headers-prefix=X-Remote-Extra-".into(),
            format!("--proxy-client-cert-file={}", p(&fp_cert_file)),
            format!("--proxy-client-key-file={}", p(&fp_key_file)),
            "--v=1".into(),
        ]);
        if options.controllers {
            api.arg("--enable-aggregator-routing=true");
        }
        processes.push(Process::spawn(
            "kube-apiserver",
            api,
            &dir.join("kube-apiserver.log"),
            &run,
        )?);

        let kubeconfig = kubeconfig(port, &ca.cert_pem(), &admin);
        let kubeconfig_path = dir.join("kubeconfig");
        std::fs::write(&kubeconfig_path, serde_yaml::to_string(&kubeconfig)?)?;

        let cp = ControlPlane {
            dir: dir.clone(),
            apiserver_port: port,
            etcd_url,
            kubeconfig_path,
            kubeconfig,
            ca,
            serving_ca,
            front_proxy: FrontProxy {
                ca_file: fp_ca_file,
                client: fp_client,
                allowed_name: FRONT_PROXY_CLIENT,
            },
            bin_dir,
            startup: Duration::ZERO,
            options,
            controllers_startup: None,
            processes: Mutex::new(processes),
        };
        if let Err(e) = cp.wait_ready().await {
            bail!("{e:#}\n{}", cp.logs(40));
        }
        let mut controllers_startup = None;
        if options.controllers {
            let t1 = Instant::now();
            cp.start_controller_manager(&ca_file, &sa_key_file)?;
            cp.install_crds().await?;
            if let Err(e) = cp.wait_controllers().await {
                bail!("{e:#}\n{}", cp.logs(40));
            }
            controllers_startup = Some(t1.elapsed());
        } else {
            cp.install_crds().await?;
        }
        Ok(ControlPlane {
            startup: t0.elapsed(),
            controllers_startup,
            ..cp
        })
    }

    /// Starts kube-controller-manager as `system:kube-controller-manager` (the identity its
    /// bootstrap RBAC is for), each controller under its own service account as kubeadm does.
    fn start_controller_manager(&self, ca_file: &Path, sa_key_file: &Path) -> Result<()> {
        let dir = self.dir.join("kube-controller-manager");
        std::fs::create_dir_all(&dir)?;
        let cert = self.ca.client(CONTROLLER_MANAGER_USER, &[])?;
        let config = kubeconfig(self.apiserver_port, &self.ca.cert_pem(), &cert);
        let config_path = dir.join("kubeconfig");
        std::fs::write(&config_path, serde_yaml::to_string(&config)?)?;
        let p = |path: &Path| path.display().to_string();
        let mut kcm = Command::new(crate::bins::kube_controller_manager()?);
        kcm.args([
            format!("--kubeconfig={}", p(&config_path)),
            format!("--authentication-kubeconfig={}", p(&config_path)),
            format!("--authorization-kubeconfig={}", p(&config_path)),
            "--bind-address=127.0.0.1".into(),
            format!("--secure-port={}", free_port()?),
            format!("--cert-dir={}", p(&dir)),
            "--leader-elect=false".into(),
            "--use-service-account-credentials=true".into(),
            format!("--root-ca-file={}", p(ca_file)),
            format!("--service-account-private-key-file={}", p(sa_key_file)),
            format!("--controllers={}", CONTROLLERS.join(",")),
            "--v=1".into(),
        ]);
        let process = Process::spawn(
            "kube-controller-manager",
            kcm,
            &self.dir.join("kube-controller-manager.log"),
            &run_dir()?,
        )?;
        self.processes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(process);
        Ok(())
    }

    /// Waits until kube-controller-manager's controllers act: the `default` namespace got
    /// its `default` ServiceAccount and its `kube-root-ca.crt` ConfigMap, both made by
    /// controllers that run under service-account credentials they had to obtain first.
    async fn wait_controllers(&self) -> Result<()> {
        use k8s_openapi::api::core::v1::{ConfigMap, ServiceAccount};
        let deadline = Instant::now() + Duration::from_secs(90);
        let client = self.client().await;
        let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), "default");
        let cms: Api<ConfigMap> = Api::namespaced(client, "default");
        loop {
            self.check_alive()?;
            let sa = sas.get_opt("default").await.ok().flatten().is_some();
            let cm = cms
                .get_opt("kube-root-ca.crt")
                .await
                .ok()
                .flatten()
                .is_some();
            if sa && cm {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "kube-controller-manager did not create the default ServiceAccount \
                     ({sa}) and kube-root-ca.crt ({cm}) in namespace default within 90 s"
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A new client on the caller's runtime (a kube Client is bound to the runtime that made
    /// it, and every `#[tokio::test]` has its own).
    pub async fn client(&self) -> Client {
        let config =
            Config::from_custom_kubeconfig(self.kubeconfig.clone(), &KubeConfigOptions::default())
                .await
                .expect("test kubeconfig is valid");
        Client::try_from(config).expect("building a kube client")
    }

    async fn wait_ready(&self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        let client = self.client().await;
        loop {
            self.check_alive()?;
            let ready = client
                .request_text(http_get("/readyz"))
                .await
                .map(|body| body.trim() == "ok")
                .unwrap_or(false);
            if ready {
                let namespaces: Api<Namespace> = Api::all(client.clone());
                if namespaces.get_opt("default").await.ok().flatten().is_some() {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                bail!("kube-apiserver did not become ready within 60 s");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Kills `name` (`etcd`, `kube-apiserver` or `kube-controller-manager`) with SIGKILL,
    /// leaves it down for `down`, then starts it again with the same command line (read from
    /// /proc), logging to `<name>.restart-<n>.log`. Returns once it accepts TCP connections on
    /// `port` again (etcd's client port or the apiserver's secure port: pass what the caller
    /// needs; 0 skips the wait). For fault injection on a control plane of one test binary:
    /// every client of the control plane sees the outage.
    pub async fn restart_component(&self, name: &str, down: Duration, port: u16) -> Result<()> {
        static RESTARTS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let (argv, index) = {
            let procs = self.processes.lock().unwrap_or_else(|e| e.into_inner());
            let index = procs
                .iter()
                .position(|p| p.name == name)
                .with_context(|| format!("no {name} in this control plane"))?;
            let raw = std::fs::read(format!("/proc/{}/cmdline", procs[index].id()))
                .with_context(|| format!("reading {name}'s command line"))?;
            let argv: Vec<String> = raw
                .split(|b| *b == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            (argv, index)
        };
        let Some((program, args)) = argv.split_first() else {
            bail!("{name} has an empty command line");
        };
        {
            let mut procs = self.processes.lock().unwrap_or_else(|e| e.into_inner());
            procs[index].kill();
        }
        tokio::time::sleep(down).await;
        let mut cmd = Command::new(program);
        cmd.args(args);
        let n = RESTARTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let log = self.dir.join(format!("{name}.restart-{n}.log"));
        let process = Process::spawn(name, cmd, &log, &run_dir()?)?;
        {
            let mut procs = self.processes.lock().unwrap_or_else(|e| e.into_inner());
            procs[index] = process;
        }
        if port != 0 {
            let deadline = Instant::now() + Duration::from_secs(60);
            while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
                if Instant::now() > deadline {
                    bail!("{name} did not listen on {port} within 60 s of its restart");
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        Ok(())
    }

    /// etcd's client port.
    pub fn etcd_port(&self) -> u16 {
        self.etcd_url
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or(0)
    }

    /// Fails if etcd, kube-apiserver (or kube-controller-manager) has exited.
    pub fn check_alive(&self) -> Result<()> {
        check_processes(&self.processes)
    }

    /// The last lines of etcd's and kube-apiserver's (and kube-controller-manager's) logs.
    pub fn logs(&self, lines: usize) -> String {
        processes_logs(&self.processes, lines)
    }

    async fn install_crds(&self) -> Result<()> {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut files = Vec::new();
        for dir in [root.join("../chart/crds"), root.join("crds")] {
            for entry in
                std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))?
            {
                files.push(entry?.path());
            }
        }
        files.sort();
        self.apply_crds(&files).await
    }

    /// Applies the CRDs in `files` (one per file; files not ending in `.yaml` are skipped)
    /// with server-side apply and waits until all are established.
    pub async fn apply_crds(&self, files: &[PathBuf]) -> Result<()> {
        let client = self.client().await;
        let crds: Api<CustomResourceDefinition> = Api::all(client);
        let mut names = Vec::new();
        for file in files
            .iter()
            .filter(|f| f.extension().is_some_and(|e| e == "yaml"))
        {
            let text = std::fs::read_to_string(file)?;
            let crd: CustomResourceDefinition = serde_yaml::from_str(&text)
                .with_context(|| format!("parsing {}", file.display()))?;
            let name = crd.metadata.name.clone().context("CRD without a name")?;
            crds.patch(
                &name,
                &PatchParams::apply("vm-dhcp-e2e").force(),
                &Patch::Apply(&crd),
            )
            .await
            .with_context(|| format!("applying {}", file.display()))?;
            names.push(name);
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        for name in names {
            loop {
                let established = crds
                    .get(&name)
                    .await?
                    .status
                    .and_then(|s| s.conditions)
                    .is_some_and(|c| {
                        c.iter()
                            .any(|c| c.type_ == "Established" && c.status == "True")
                    });
                if established {
                    break;
                }
                if Instant::now() > deadline {
                    bail!("CRD {name} not established within 30 s");
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        Ok(())
    }

    /// A fresh namespace for one test (in [`ControlPlane::shared`] no namespace controller
    /// runs: deleted namespaces would stay Terminating, so every test gets a new one). Its guard prints the control-plane
    /// logs if the test fails.
    pub async fn namespace(&'static self, prefix: &str) -> TestNamespace {
        static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("{prefix}-{}-{n}", std::process::id());
        let client = self.client().await;
        let ns: Api<Namespace> = Api::all(client.clone());
        let obj: Namespace = serde_json::from_value(serde_json::json!({
            "metadata": {"name": name}
        }))
        .expect("namespace object");
        ns.create(&PostParams::default(), &obj)
            .await
            .expect("creating test namespace");
        TestNamespace {
            name,
            client,
            cp: self,
        }
    }

    /// Runs the built kubectl against this control plane. Async, so that servers the test
    /// runs on its own runtime keep answering while kubectl waits for them.
    pub async fn kubectl(&self, args: &[&str]) -> std::process::Output {
        tokio::process::Command::new(self.bin_dir.join("kubectl"))
            .arg(format!("--kubeconfig={}", self.kubeconfig_path.display()))
            .args(args)
            .output()
            .await
            .expect("running kubectl")
    }
}

/// Fails if one of `processes` has exited, with the tail of its log.
pub(crate) fn check_processes(processes: &Mutex<Vec<Process>>) -> Result<()> {
    let mut procs = processes.lock().unwrap_or_else(|e| e.into_inner());
    for proc in procs.iter_mut() {
        if let Some(status) = proc.exited() {
            bail!(
                "{} exited ({status}); its log:\n{}",
                proc.name,
                proc.log_tail(40)
            );
        }
    }
    Ok(())
}

/// The last `lines` lines of the logs of `processes`, each under a header.
pub(crate) fn processes_logs(processes: &Mutex<Vec<Process>>, lines: usize) -> String {
    let procs = processes.lock().unwrap_or_else(|e| e.into_inner());
    procs
        .iter()
        .map(|p| {
            format!(
                "----- {} ({}) -----\n{}",
                p.name,
                p.log.display(),
                log_tail(&p.log, lines)
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Waits until something listens on 127.0.0.1:`port`, or `proc` exits.
async fn wait_tcp(port: u16, proc: &mut Process) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        if let Some(status) = proc.exited() {
            bail!("{} exited ({status}):\n{}", proc.name, proc.log_tail(40));
        }
        if Instant::now() > deadline {
            bail!(
                "{} did not listen on port {port} within 20 s:\n{}",
                proc.name,
                proc.log_tail(40)
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

fn http_get(path: &str) -> http::Request<Vec<u8>> {
    http::Request::get(path)
        .body(Vec::new())
        .expect("static request")
}

fn kubeconfig(port: u16, ca_pem: &str, admin: &CertPair) -> Kubeconfig {
    use base64::Engine as _;
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    serde_json::from_value(serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "e2e", "cluster": {
            "server": format!("https://127.0.0.1:{port}"),
            "certificate-authority-data": b64(ca_pem)}}],
        "users": [{"name": "admin", "user": {
            "client-certificate-data": b64(&admin.cert),
            "client-key-data": b64(&admin.key)}}],
        "contexts": [{"name": "e2e", "context": {"cluster": "e2e", "user": "admin"}}],
        "current-context": "e2e"
    }))
    .expect("static kubeconfig shape")
}

/// One test's namespace and client. When the test panics, the control-plane logs are
/// printed so the failure can be read without re-running.
pub struct TestNamespace {
    pub name: String,
    pub client: Client,
    cp: &'static ControlPlane,
}

impl TestNamespace {
    pub fn api<K>(&self) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        <K as kube::Resource>::DynamicType: Default,
    {
        Api::namespaced(self.client.clone(), &self.name)
    }
}

impl Drop for TestNamespace {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "test in namespace {} failed; control-plane logs:\n{}",
                self.name,
                self.cp.logs(60)
            );
        }
    }
}
