//! Real cert-manager for the tests: its controller and CA injector (our launcher of the
//! published module's packages, built by `e2e/build-bins.sh`, see e2e/go/certmanager), run
//! out of cluster against a [`ControlPlane`] with the admin kubeconfig, after its CRDs
//! (copied from the module's `deploy/crds`) are applied.
//!
//! The controller runs the Issuer/ClusterIssuer, certificates, CertificateRequest approver
//! and self-signed and CA issuer controllers (no ACME, Vault, Venafi or Gateway); the CA
//! injector fills `caBundle` of webhook configurations, APIServices and CRDs annotated with
//! `cert-manager.io/inject-ca-from` (or `-from-secret`). cert-manager's own webhook is not
//! run: nothing here needs conversion, and its defaulting and validation are not needed
//! for well-formed objects.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};

use crate::cluster::{ControlPlane, check_processes, free_port, processes_logs, start_once};
use crate::proc::{Process, run_dir};

/// A running cert-manager (controller and CA injector); both are killed when it is dropped.
pub struct CertManager {
    /// How long applying cert-manager's CRDs took (until established).
    pub crds_applied: Duration,
    /// How long the controller and the CA injector took from their start until both
    /// answered `/readyz` (informer caches synced).
    pub startup: Duration,
    /// The namespace of the Secrets of ClusterIssuers.
    pub cluster_resource_namespace: String,
    processes: Mutex<Vec<Process>>,
}

impl CertManager {
    /// cert-manager on [`ControlPlane::with_controllers`], shared by the tests of this test
    /// binary and started on first use.
    pub async fn shared() -> &'static CertManager {
        static CM: OnceLock<CertManager> = OnceLock::new();
        static INIT: Mutex<()> = Mutex::new(());
        let cp = ControlPlane::with_controllers().await;
        start_once(&CM, &INIT, "cert-manager", move || CertManager::start(cp)).await
    }

    /// Applies cert-manager's CRDs to `cp` and waits until they are established.
    pub async fn apply_crds(cp: &ControlPlane) -> Result<()> {
        cp.apply_crds(&crate::bins::cert_manager_crds()?).await
    }

    /// Applies the CRDs, starts the controller and the CA injector against `cp` and waits
    /// until both are ready. Their logs are in the run directory, `cert-manager-<n>/`.
    pub async fn start(cp: &ControlPlane) -> Result<CertManager> {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let binary = crate::bins::cert_manager()?;
        let t0 = Instant::now();
        Self::apply_crds(cp).await?;
        let crds_applied = t0.elapsed();

        let run = run_dir()?;
        let dir = run.join(format!(
            "cert-manager-{}",
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir)?;
        let kubeconfig = format!("--kubeconfig={}", cp.kubeconfig_path.display());
        let cluster_resource_namespace = "kube-system".to_string();

        let t1 = Instant::now();
        let mut processes = Vec::new();
        let mut ports = Vec::new();
        for (name, extra) in [
            (
                "controller",
                vec![format!(
                    "--cluster-resource-namespace={cluster_resource_namespace}"
                )],
            ),
            ("cainjector", vec![]),
        ] {
            let port = free_port()?;
            let mut cmd = std::process::Command::new(&binary);
            cmd.arg(name)
                .arg(&kubeconfig)
                .arg(format!("--readyz-listen-address=127.0.0.1:{port}"))
                .arg("--v=2")
                .args(extra);
            processes.push(Process::spawn(
                &format!("cert-manager {name}"),
                cmd,
                &dir.join(format!("{name}.log")),
                &run,
            )?);
            ports.push(port);
        }
        let cm = CertManager {
            crds_applied,
            startup: Duration::ZERO,
            cluster_resource_namespace,
            processes: Mutex::new(processes),
        };
        let deadline = Instant::now() + Duration::from_secs(120);
        for port in ports {
            loop {
                cm.check_alive()?;
                if matches!(crate::plain_get(port, "/readyz").await, Ok((200, _))) {
                    break;
                }
                if Instant::now() > deadline {
                    bail!("cert-manager was not ready within 120 s\n{}", cm.logs(40));
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        Ok(CertManager {
            startup: t1.elapsed(),
            ..cm
        })
    }

    /// Fails if the controller or the CA injector has exited.
    pub fn check_alive(&self) -> Result<()> {
        check_processes(&self.processes)
    }

    /// The last lines of the controller's and the CA injector's logs.
    pub fn logs(&self, lines: usize) -> String {
        processes_logs(&self.processes, lines)
    }
}
