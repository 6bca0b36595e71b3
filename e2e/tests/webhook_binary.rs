//! `vm-dhcp webhook` as a process, self-managed certificates: it stores its CA and serving
//! certificate in a Secret, registers its own configurations with the caBundle, and the
//! apiserver reaches it through a Service (ExternalName → localhost here) and allocates.
//! A test binary of its own: the configurations it registers are cluster-wide.

use std::process::Command;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, DeleteParams, PostParams};
use vm_dhcp_core::crd::{IPPool, VirtualMachineNetworkConfig};
use vm_dhcp_e2e::ControlPlane;
use vm_dhcp_e2e::proc::{Process, run_dir};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn self_managed_webhook_registers_itself_and_allocates() {
    let cp = ControlPlane::shared().await;
    let ns = cp.namespace("whbin").await;
    let name = "vm-dhcp-webhook";
    let mut proc = vm_dhcp_e2e::webhooks::self_managed_binary(cp, &ns, name)
        .await
        .expect("the webhook registers itself");
    let deadline = Instant::now() + Duration::from_secs(30);
    let secret = ns
        .api::<Secret>()
        .get(&format!("{name}-tls"))
        .await
        .expect("self-managed Secret");
    let data = secret.data.expect("secret data");
    assert!(
        data.contains_key("ca.crt") && data.contains_key("tls.crt") && data.contains_key("tls.key")
    );

    // A pool without serverIP is only valid once the mutator filled it in: proof that the
    // apiserver reaches the webhook through the Service with the registered caBundle.
    let pool: IPPool = serde_json::from_value(serde_json::json!({
        "apiVersion": "network.harvesterhci.io/v1alpha1", "kind": "IPPool",
        "metadata": {"name": "net-1", "namespace": ns.name},
        "spec": {"networkName": format!("{}/net-1", ns.name), "ipv4Config": {"cidr": "172.20.0.0/24",
                 "pool": {"start": "172.20.0.10", "end": "172.20.0.20"}}}
    }))
    .expect("pool");
    vm_dhcp_e2e::webhooks::ensure_network(&ns, "net-1").await;
    let pools: Api<IPPool> = ns.api();
    let created = loop {
        match pools.create(&PostParams::default(), &pool).await {
            Ok(p) => break p,
            Err(e) => {
                assert!(
                    Instant::now() < deadline,
                    "webhook never answered: {e}\n{}",
                    proc.log_tail(40)
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    assert_eq!(
        created.spec.ipv4_config.map(|c| c.server_ip).as_deref(),
        Some("172.20.0.1")
    );
    // The process's cache learns the pool, then a vmnetcfg is allocated at admission.
    let cfg: VirtualMachineNetworkConfig = serde_json::from_value(serde_json::json!({
        "apiVersion": "network.harvesterhci.io/v1alpha1", "kind": "VirtualMachineNetworkConfig",
        "metadata": {"name": "vm1", "namespace": ns.name},
        "spec": {"vmName": "vm1", "networkConfigs": [{"macAddress": "02:00:00:00:00:01", "networkName": format!("{}/net-1", ns.name)}]}
    }))
    .expect("vmnetcfg");
    let cfgs: Api<VirtualMachineNetworkConfig> = ns.api();
    let ip = loop {
        let created = cfgs
            .create(&PostParams::default(), &cfg)
            .await
            .expect("vmnetcfg admitted");
        let ip = created
            .spec
            .network_configs
            .and_then(|c| c[0].ip_address.clone());
        if ip.is_some() {
            break ip;
        }
        // Admitted before the cache knew the pool (left alone, as for an unmanaged network).
        cfgs.delete("vm1", &DeleteParams::default())
            .await
            .expect("delete");
        assert!(Instant::now() < deadline, "never allocated");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(ip.as_deref(), Some("172.20.0.10"));
    // /metrics counts the admissions.
    proc.kill();
    for kind in [
        "mutatingwebhookconfiguration",
        "validatingwebhookconfiguration",
    ] {
        let _ = cp.kubectl(&["delete", kind, name]).await;
    }
}

/// Connects over TLS trusting `ca_pem`; returns the served leaf certificate (DER) and the
/// response to `GET path`.
async fn tls_get(port: u16, ca_pem: &str, path: &str) -> std::io::Result<(Vec<u8>, String)> {
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut ca_pem.as_bytes()).flatten() {
        roots.add(cert).map_err(std::io::Error::other)?;
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(std::io::Error::other)?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    let name =
        rustls::pki_types::ServerName::try_from("localhost").map_err(std::io::Error::other)?;
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await?;
    let leaf = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.to_vec())
        .unwrap_or_default();
    tls.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut body = String::new();
    tls.read_to_string(&mut body).await?;
    Ok((leaf, body))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_files_are_reloaded_when_they_change_and_metrics_are_served() {
    let cp = ControlPlane::shared().await;
    let ns = cp.namespace("whcert").await;
    let dir = run_dir().expect("run dir").join(&ns.name);
    std::fs::create_dir_all(&dir).expect("dir");
    let write_pair = |cn: &str| {
        let pair = cp
            .serving_ca
            .serving(cn, &["localhost", "127.0.0.1"])
            .expect("cert");
        // Key first, then certificate: the watcher reacts to either; a mismatched pair for a
        // moment is refused and retried, never served.
        std::fs::write(dir.join("tls.key"), &pair.key).expect("key");
        std::fs::write(dir.join("tls.crt"), &pair.cert).expect("cert");
        pair
    };
    let first = write_pair("first");
    let port = vm_dhcp_e2e::free_port().expect("port");
    let mut cmd = Command::new(vm_dhcp_e2e::bins::vm_dhcp_binary());
    cmd.args([
        "webhook",
        &format!("--kubeconfig={}", cp.kubeconfig_path.display()),
        &format!("--namespace={}", ns.name),
        "--name=file-mode",
        &format!("--https-port={port}"),
        &format!("--tls-cert-file={}", dir.join("tls.crt").display()),
        &format!("--tls-private-key-file={}", dir.join("tls.key").display()),
    ]);
    let run = run_dir().expect("run dir");
    let mut proc = Process::spawn(
        "vm-dhcp-webhook-files",
        cmd,
        &run.join("webhook-files.log"),
        &run,
    )
    .expect("spawn");
    let ca = cp.serving_ca.cert_pem();
    let der = |pem: &str| {
        rustls_pemfile::certs(&mut pem.as_bytes())
            .flatten()
            .next()
            .map(|c| c.to_vec())
            .expect("a certificate")
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let (leaf, metrics) = loop {
        match tls_get(port, &ca, "/metrics").await {
            Ok(got) => break got,
            Err(e) => {
                assert!(
                    proc.exited().is_none(),
                    "webhook exited:\n{}",
                    proc.log_tail(40)
                );
                assert!(
                    Instant::now() < deadline,
                    "never served: {e}\n{}",
                    proc.log_tail(40)
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    assert_eq!(
        leaf,
        der(&first.cert),
        "serves the certificate from the files"
    );
    assert!(
        metrics.contains("200 OK") && metrics.contains("vmdhcp_webhook_commit_conflicts_total"),
        "{metrics}"
    );

    let second = write_pair("second");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (leaf, _) = tls_get(port, &ca, "/healthz").await.expect("still serving");
        if leaf == der(&second.cert) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "rotated certificate never served:\n{}",
            proc.log_tail(20)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        proc.log_tail(50).contains("serving certificate reloaded"),
        "{}",
        proc.log_tail(50)
    );
}
