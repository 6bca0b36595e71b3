//! End-to-end test harness: a real kube-apiserver + etcd (built from their Go modules by
//! `e2e/build-bins.sh`), a test PKI, the CRDs, and helpers for the tests in `e2e/tests/`.
//!
//! One control plane per test binary (`ControlPlane::shared()`), tests isolated by
//! namespace. Children die with the test process (PR_SET_PDEATHSIG), and whatever a killed
//! run left behind is removed by the next one.

pub mod bins;
pub mod certmanager;
pub mod chaos;
pub mod clientgo;
pub mod cluster;
pub mod faultproxy;
pub mod kubelet;
pub mod nodesim;
pub mod pki;
pub mod proc;
pub mod release;
pub mod tls;

pub use cluster::{ControlPlane, TestNamespace, free_port};
pub mod rbac;
pub mod webhooks;

/// `GET http://127.0.0.1:<port><path>` over plain HTTP/1.0: the status code and the body.
pub async fn plain_get(port: u16, path: &str) -> std::io::Result<(u16, String)> {
    plain_get_at(std::net::Ipv4Addr::LOCALHOST.into(), port, path).await
}

/// `GET http://<ip>:<port><path>` over plain HTTP/1.0 (a pod IP, from the root namespace):
/// the status code and the body.
pub async fn plain_get_at(
    ip: std::net::IpAddr,
    port: u16,
    path: &str,
) -> std::io::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect((ip, port)).await?;
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: {ip}\r\n\r\n").as_bytes())
        .await?;
    let mut text = String::new();
    stream.read_to_string(&mut text).await?;
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    Ok((code, body.to_string()))
}

/// `GET http://<ip>:<port><path>` over plain HTTP/1.0 with `Authorization: Bearer <token>`
/// (an agent's lease endpoints): the status code and the body.
pub async fn bearer_get_at(
    ip: std::net::IpAddr,
    port: u16,
    path: &str,
    token: &str,
) -> std::io::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect((ip, port)).await?;
    stream
        .write_all(
            format!("GET {path} HTTP/1.0\r\nHost: {ip}\r\nAuthorization: Bearer {token}\r\n\r\n")
                .as_bytes(),
        )
        .await?;
    let mut text = String::new();
    stream.read_to_string(&mut text).await?;
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    Ok((code, body.to_string()))
}

/// `vm-dhcp controller` against `cp`, confined to namespace `ns` (what it watches, its agents
/// and its leader Lease), agents running as service account `agent_sa`, HTTP on
/// 127.0.0.1:`port`; callers add their own flags.
pub fn controller_command(
    cp: &ControlPlane,
    ns: &str,
    agent_sa: &str,
    port: u16,
) -> std::process::Command {
    controller_command_via(&cp.kubeconfig_path, ns, agent_sa, port)
}

/// [`controller_command`] reaching kube-apiserver through `kubeconfig` (e.g. a fault proxy's).
pub fn controller_command_via(
    kubeconfig: &std::path::Path,
    ns: &str,
    agent_sa: &str,
    port: u16,
) -> std::process::Command {
    let mut cmd = std::process::Command::new(bins::vm_dhcp_binary());
    cmd.args([
        "controller".to_string(),
        format!("--kubeconfig={}", kubeconfig.display()),
        format!("--namespace={ns}"),
        format!("--watch-namespace={ns}"),
        format!("--service-account-name={agent_sa}"),
        format!("--leader-election-namespace={ns}"),
        format!("--http-addr=127.0.0.1:{port}"),
    ]);
    cmd.env("RUST_LOG", "info,kube=warn");
    cmd
}

/// Whether network namespace `netns` has `ip` on `dev` and `dev` is up (an address on a
/// downed link, a lost node's, answers nobody).
pub async fn netns_holds_ip(netns: &str, dev: &str, ip: &str) -> bool {
    let out = tokio::process::Command::new("ip")
        .args(["-n", netns, "-o", "-4", "addr", "show", "dev", dev])
        .output()
        .await;
    let has_addr =
        out.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(&format!("inet {ip}/")));
    if !has_addr {
        return false;
    }
    let link = tokio::process::Command::new("ip")
        .args(["-n", netns, "-o", "link", "show", "dev", dev])
        .output()
        .await;
    link.is_ok_and(|o| {
        let text = String::from_utf8_lossy(&o.stdout).to_string();
        text.split_once('<')
            .and_then(|(_, rest)| rest.split_once('>'))
            .is_some_and(|(flags, _)| flags.split(',').any(|f| f == "UP"))
    })
}
