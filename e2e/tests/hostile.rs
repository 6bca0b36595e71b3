//! Hostile clients against `vm-dhcp webhook` as a process, while kube-apiserver keeps
//! admitting VMs through it: 1,000 idle TLS connections, slowloris clients (headers a line at
//! a time, bodies a byte at a time), TCP connections that never start TLS, more connections
//! than the cap, oversized and malformed requests over the wire, and a SIGTERM in the middle
//! of a request. The server must keep serving, cut each attacker at its timeout (or at the
//! cap), answer bad requests with a clear error, stay within bounded memory and never panic.
//!
//! Latencies are printed (p50/p99 of VM creates idle and under attack), not asserted: the
//! machine is shared. What is asserted: every admission succeeded, every attacker was cut,
//! none before its timeout unless the cap needed its place, none long after it.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, ValidatingWebhookConfiguration,
};
use kube::api::{Api, DeleteParams, PostParams};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use vm_dhcp_core::admission::ALLOCATIONS_ANNOTATION;
use vm_dhcp_core::kubevirt::VirtualMachine;
use vm_dhcp_e2e::proc::{Process, run_dir};
use vm_dhcp_e2e::webhooks::register;
use vm_dhcp_e2e::{ControlPlane, TestNamespace};

const IPPOOL_CREATE: &str = include_str!("../../webhook/tests/fixtures/ippool-create.json");

/// `vm-dhcp webhook` with certificate files, serving on `port`.
struct Server {
    proc: Process,
    port: u16,
    tls: Arc<rustls::ClientConfig>,
}

impl Server {
    async fn start(cp: &ControlPlane, ns: &TestNamespace, extra: &[&str]) -> Server {
        Self::start_with(cp, ns, extra, None).await
    }

    /// [`Server::start`], with at most `nofile` file descriptors for the process.
    async fn start_with(
        cp: &ControlPlane,
        ns: &TestNamespace,
        extra: &[&str],
        nofile: Option<u64>,
    ) -> Server {
        let dir = run_dir()
            .expect("run dir")
            .join(format!("hostile-{}", ns.name));
        std::fs::create_dir_all(&dir).expect("dir");
        let pair = cp
            .serving_ca
            .serving("vm-dhcp-webhook", &["localhost", "127.0.0.1"])
            .expect("cert");
        std::fs::write(dir.join("tls.key"), &pair.key).expect("key");
        std::fs::write(dir.join("tls.crt"), &pair.cert).expect("cert");
        let port = vm_dhcp_e2e::free_port().expect("port");
        // `VM_DHCP_HOSTILE_BIN`: another build of the binary (a release build, for figures).
        let bin = std::env::var_os("VM_DHCP_HOSTILE_BIN")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(vm_dhcp_e2e::bins::vm_dhcp_binary);
        let mut cmd = std::process::Command::new(bin);
        cmd.args([
            "webhook",
            &format!("--kubeconfig={}", cp.kubeconfig_path.display()),
            &format!("--namespace={}", ns.name),
            "--name=hostile",
            &format!("--https-port={port}"),
            &format!("--tls-cert-file={}", dir.join("tls.crt").display()),
            &format!("--tls-private-key-file={}", dir.join("tls.key").display()),
            "--service-cidr=10.96.0.0/12",
        ]);
        cmd.args(extra);
        if let Some(limit) = nofile {
            // SAFETY: setrlimit is async-signal-safe; the closure touches nothing else.
            unsafe {
                use std::os::unix::process::CommandExt as _;
                cmd.pre_exec(move || {
                    let rl = libc::rlimit {
                        rlim_cur: limit,
                        rlim_max: limit,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &rl) == 0 {
                        Ok(())
                    } else {
                        Err(std::io::Error::last_os_error())
                    }
                });
            }
        }
        let run = run_dir().expect("run dir");
        let mut proc = Process::spawn(
            "vm-dhcp-webhook-hostile",
            cmd,
            &run.join(format!("webhook-hostile-{}.log", ns.name)),
            &run,
        )
        .expect("spawn");
        let tls = client_config(&cp.serving_ca.cert_pem());
        let server_tls = tls.clone();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match request(
                port,
                &server_tls,
                b"GET /readyz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
            )
            .await
            {
                Ok(r) if r.starts_with("HTTP/1.1 200") => break,
                other => {
                    assert!(
                        proc.exited().is_none(),
                        "webhook exited:\n{}",
                        proc.log_tail(40)
                    );
                    assert!(
                        Instant::now() < deadline,
                        "webhook never ready: {other:?}\n{}",
                        proc.log_tail(40)
                    );
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        Server { proc, port, tls }
    }

    fn pid(&self) -> u32 {
        self.proc.id()
    }

    /// Fails the test if the process exited or logged a panic.
    fn assert_healthy(&mut self) {
        assert!(
            self.proc.exited().is_none(),
            "webhook exited:\n{}",
            self.proc.log_tail(60)
        );
        let log = std::fs::read_to_string(&self.proc.log).unwrap_or_default();
        assert!(
            !log.contains("panicked"),
            "webhook panicked:\n{}",
            self.proc.log_tail(60)
        );
    }
}

fn client_config(ca_pem: &str) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut ca_pem.as_bytes()).flatten() {
        roots.add(cert).expect("CA");
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("TLS versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    Arc::new(config)
}

async fn connect(
    port: u16,
    tls: &Arc<rustls::ClientConfig>,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(("127.0.0.1", port)).await?;
    let name =
        rustls::pki_types::ServerName::try_from("localhost").map_err(std::io::Error::other)?;
    tokio_rustls::TlsConnector::from(tls.clone())
        .connect(name, tcp)
        .await
}

/// Sends `raw` (a whole request with `Connection: close`) and returns the whole response.
async fn request(
    port: u16,
    tls: &Arc<rustls::ClientConfig>,
    raw: &[u8],
) -> std::io::Result<String> {
    let mut s = connect(port, tls).await?;
    s.write_all(raw).await?;
    let mut out = Vec::new();
    // A server that closes without TLS close_notify ends the read with an error: what was
    // read is the answer.
    let _ = tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut out)).await;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

fn post(path: &str, body: &[u8]) -> Vec<u8> {
    let mut raw = format!(
        "POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    raw.extend_from_slice(body);
    raw
}

async fn unregister(ns: &TestNamespace) {
    let dp = DeleteParams::default();
    let _ = Api::<MutatingWebhookConfiguration>::all(ns.client.clone())
        .delete(&ns.name, &dp)
        .await;
    let _ = Api::<ValidatingWebhookConfiguration>::all(ns.client.clone())
        .delete(&ns.name, &dp)
        .await;
}

/// A /20 pool in `ns` created through the webhook, and a VM admitted with an address (the
/// process's cache knows the pool).
async fn pool_ready(ns: &TestNamespace, server: &mut Server) -> String {
    vm_dhcp_e2e::webhooks::ensure_network(ns, "net-h").await;
    let pool = vm_dhcp_e2e::webhooks::pool(
        &ns.name,
        "net-h",
        "10.77.0.0/20",
        "10.77.0.10",
        "10.77.15.250",
        None,
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let pools: Api<vm_dhcp_core::crd::IPPool> = ns.api();
    while let Err(e) = pools.create(&PostParams::default(), &pool).await {
        assert!(
            Instant::now() < deadline,
            "pool never admitted: {e}\n{}",
            server.proc.log_tail(40)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let network = format!("{}/net-h", ns.name);
    let vms: Api<VirtualMachine> = ns.api();
    loop {
        let vm = vm_dhcp_e2e::webhooks::vm(&ns.name, "probe", &network);
        if let Ok(made) = vms.create(&PostParams::default(), &vm).await
            && allocated(&made)
        {
            return network;
        }
        let _ = vms.delete("probe", &DeleteParams::default()).await;
        assert!(
            Instant::now() < deadline,
            "never allocated\n{}",
            server.proc.log_tail(40)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn allocated(vm: &VirtualMachine) -> bool {
    vm.metadata
        .annotations
        .as_ref()
        .is_some_and(|a| a.contains_key(ALLOCATIONS_ANNOTATION))
}

/// Latencies of VM creates (each allocates at admission), and how many failed.
#[derive(Default)]
struct Admissions {
    latencies: Vec<Duration>,
    failed: Vec<String>,
}

impl Admissions {
    fn percentile(&self, p: f64) -> Duration {
        let mut sorted = self.latencies.clone();
        sorted.sort();
        if sorted.is_empty() {
            return Duration::ZERO;
        }
        let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
        sorted[i]
    }

    fn line(&self, what: &str) -> String {
        format!(
            "{what:<14} {:>4} creates, {:>2} failed, p50 {:>6.1} ms, p99 {:>6.1} ms, max {:>6.1} ms",
            self.latencies.len() + self.failed.len(),
            self.failed.len(),
            ms(self.percentile(0.5)),
            ms(self.percentile(0.99)),
            ms(self.percentile(1.0)),
        )
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Creates VMs one after another for at least `n` creates and `at_least` of time.
async fn admit(
    ns: &TestNamespace,
    network: &str,
    prefix: &str,
    n: usize,
    at_least: Duration,
) -> Admissions {
    let vms: Api<VirtualMachine> = ns.api();
    let mut out = Admissions::default();
    let started = Instant::now();
    let mut i = 0;
    while i < n || started.elapsed() < at_least {
        let vm = vm_dhcp_e2e::webhooks::vm(&ns.name, &format!("{prefix}-{i}"), network);
        let t = Instant::now();
        match vms.create(&PostParams::default(), &vm).await {
            Ok(made) if allocated(&made) => out.latencies.push(t.elapsed()),
            Ok(_) => out
                .failed
                .push(format!("{prefix}-{i}: admitted without an allocation")),
            Err(e) => out.failed.push(format!("{prefix}-{i}: {e}")),
        }
        i += 1;
    }
    out
}

/// What the attackers saw: how long each connection lived until the server cut it, and the
/// age of those still open when the attack stopped.
#[derive(Default)]
struct Cuts {
    lived: Mutex<Vec<Duration>>,
    still_open: Mutex<Vec<Duration>>,
    answers: Mutex<Vec<String>>,
    open: AtomicUsize,
    /// The most open at once.
    peak: AtomicUsize,
    connect_errors: AtomicUsize,
}

impl Cuts {
    fn summary(&self, what: &str) -> String {
        let mut lived = self.lived();
        lived.sort();
        let at = |p: f64| {
            lived
                .get(((lived.len() as f64 * p) as usize).min(lived.len().saturating_sub(1)))
                .map_or(0.0, |d| d.as_secs_f64())
        };
        let still_open = self.still_open.lock().expect("lock").len();
        format!(
            "{what:<22} {:>5} cut (after min {:.2} s, median {:.2} s, max {:.2} s), {still_open} open at the end (oldest {:.2} s), {} connect errors",
            lived.len(),
            at(0.0),
            at(0.5),
            at(1.0),
            self.oldest_open().as_secs_f64(),
            self.connect_errors.load(Ordering::Relaxed),
        )
    }

    fn lived(&self) -> Vec<Duration> {
        self.lived.lock().expect("lock").clone()
    }

    fn oldest_open(&self) -> Duration {
        self.still_open
            .lock()
            .expect("lock")
            .iter()
            .max()
            .copied()
            .unwrap_or_default()
    }
}

#[derive(Clone, Copy)]
enum Attack {
    /// TLS handshake, then nothing.
    IdleTls,
    /// TCP connect, no TLS.
    NoHandshake,
    /// A request's headers, a line every 500 ms, never the blank line.
    SlowHeaders,
    /// Whole headers announcing a 100 kB body, then a byte every 500 ms.
    SlowBody,
}

/// One attacker: connects, misbehaves until the server cuts it, records how long the
/// connection lived, and starts again until `stop`.
async fn attacker(
    kind: Attack,
    port: u16,
    tls: Arc<rustls::ClientConfig>,
    cuts: Arc<Cuts>,
    mut stop: watch::Receiver<bool>,
) {
    while !*stop.borrow() {
        let tcp = match TcpStream::connect(("127.0.0.1", port)).await {
            Ok(t) => t,
            Err(_) => {
                cuts.connect_errors.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let stream: Box<dyn AsyncStream> = match kind {
            Attack::NoHandshake => Box::new(tcp),
            _ => {
                let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
                match tokio_rustls::TlsConnector::from(tls.clone())
                    .connect(name, tcp)
                    .await
                {
                    Ok(s) => Box::new(s),
                    Err(_) => {
                        cuts.connect_errors.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                }
            }
        };
        // The server's clock for this connection starts here: at accept for plain TCP (the
        // handshake timeout), at the end of the handshake for TLS (the header timeout). A
        // handshake that waits for a loaded server is not counted against it.
        let started = Instant::now();
        let now_open = cuts.open.fetch_add(1, Ordering::Relaxed) + 1;
        cuts.peak.fetch_max(now_open, Ordering::Relaxed);
        let (mut rd, mut wr) = tokio::io::split(stream);
        let mut answer = Vec::new();
        let misbehave = async {
            match kind {
                Attack::IdleTls | Attack::NoHandshake => std::future::pending::<()>().await,
                Attack::SlowHeaders => {
                    let _ = wr.write_all(b"POST /v1/webhook/mutation/virtualmachines HTTP/1.1\r\nHost: localhost\r\n").await;
                    for i in 0u64.. {
                        tokio::time::sleep(Duration::from_millis(500)).await;
                        if wr
                            .write_all(format!("X-Slow-{i}: a\r\n").as_bytes())
                            .await
                            .is_err()
                        {
                            break;
                        }
                    }
                    std::future::pending::<()>().await
                }
                Attack::SlowBody => {
                    let _ = wr.write_all(b"POST /v1/webhook/validation/ippools HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n{").await;
                    loop {
                        tokio::time::sleep(Duration::from_millis(500)).await;
                        if wr.write_all(b" ").await.is_err() {
                            break;
                        }
                    }
                    std::future::pending::<()>().await
                }
            }
        };
        tokio::select! {
            // The server's answer (a 408) or its close.
            _ = rd.read_to_end(&mut answer) => {
                cuts.lived.lock().expect("lock").push(started.elapsed());
                if !answer.is_empty() {
                    let text = String::from_utf8_lossy(&answer);
                    cuts.answers.lock().expect("lock").push(text.lines().next().unwrap_or_default().to_string());
                }
            }
            () = misbehave => {}
            _ = stop.wait_for(|s| *s) => {
                cuts.still_open.lock().expect("lock").push(started.elapsed());
            }
        }
        cuts.open.fetch_sub(1, Ordering::Relaxed);
    }
}

trait AsyncStream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> AsyncStream for T {}

fn proc_status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// TCP sockets the process holds (listener and its own client connections included).
fn sockets(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.flatten()
                .filter(|e| {
                    std::fs::read_link(e.path())
                        .is_ok_and(|l| l.to_string_lossy().starts_with("socket:"))
                })
                .count()
        })
        .unwrap_or(0)
}

const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(2);
/// Slack for a cut on a loaded 2-core machine (other builds share it): the timers fire
/// late, not early, and a plain TCP connection may wait in the accept queue.
const SLACK: Duration = Duration::from_secs(6);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idle_and_slowloris_clients_are_cut_at_their_timeouts_while_admissions_go_on() {
    let cp = ControlPlane::shared().await;
    let ns = cp.namespace("hostile").await;
    let mut server = Server::start(
        cp,
        &ns,
        &[
            "--header-read-timeout=5s",
            "--tls-handshake-timeout=2s",
            // Above the attackers' 1,300: here the timeouts are what cuts them.
            "--max-connections=2000",
        ],
    )
    .await;
    register(cp, &ns, server.port).await;
    let network = pool_ready(&ns, &mut server).await;
    let pid = server.pid();

    let idle = admit(&ns, &network, "idle", 150, Duration::ZERO).await;
    let rss_idle = proc_status_kib(pid, "VmRSS:");

    let (stop_tx, stop) = watch::channel(false);
    let mut tasks = tokio::task::JoinSet::new();
    let mut all = Vec::new();
    for (kind, n, name) in [
        (Attack::IdleTls, 1000, "idle TLS"),
        (Attack::NoHandshake, 100, "TCP, no handshake"),
        (Attack::SlowHeaders, 150, "slowloris headers"),
        (Attack::SlowBody, 50, "slowloris body"),
    ] {
        let cuts = Arc::new(Cuts::default());
        all.push((name, kind, cuts.clone()));
        for i in 0..n {
            tasks.spawn(attacker(
                kind,
                server.port,
                server.tls.clone(),
                cuts.clone(),
                stop.clone(),
            ));
            if i % 50 == 49 {
                // Handshakes in waves: the attackers share the machine with the server.
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    // The 1,000 idle connections are up before the measurement starts.
    let idle_tls = all[0].2.clone();
    let deadline = Instant::now() + Duration::from_secs(60);
    while idle_tls.peak.load(Ordering::Relaxed) < 900 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let open_at_start = idle_tls.open.load(Ordering::Relaxed);
    let peak_before = idle_tls.peak.load(Ordering::Relaxed);
    let sockets_under_attack = sockets(pid);
    // Long enough for every attacker to be cut twice.
    let attacked = admit(&ns, &network, "attacked", 150, 3 * HEADER_TIMEOUT).await;
    let _ = stop_tx.send(true);
    while tasks.join_next().await.is_some() {}
    let rss_after = proc_status_kib(pid, "VmRSS:");
    let hwm = proc_status_kib(pid, "VmHWM:");

    println!(
        "webhook under attack (header-read timeout {HEADER_TIMEOUT:?}, handshake timeout {HANDSHAKE_TIMEOUT:?}):"
    );
    println!("  {}", idle.line("idle"));
    println!("  {}", attacked.line("under attack"));
    println!(
        "  p99 under attack / idle: {:.2}x (the issue's goal: within 2x)",
        attacked.percentile(0.99).as_secs_f64() / idle.percentile(0.99).as_secs_f64().max(1e-9)
    );
    println!(
        "  idle TLS connections open when the measurement started: {open_at_start} (most at once: {}); server sockets then: {sockets_under_attack}",
        idle_tls.peak.load(Ordering::Relaxed)
    );
    for (name, _, cuts) in &all {
        println!("  {}", cuts.summary(name));
    }
    let answers = all[3].2.answers.lock().expect("lock").clone();
    println!(
        "  slow bodies answered: {:?}",
        answers.iter().take(3).collect::<Vec<_>>()
    );
    println!(
        "  webhook memory: VmRSS {:.1} MiB idle, {:.1} MiB after; peak VmHWM {:.1} MiB",
        rss_idle as f64 / 1024.0,
        rss_after as f64 / 1024.0,
        hwm as f64 / 1024.0
    );

    server.assert_healthy();
    assert!(
        idle.failed.is_empty(),
        "admissions failed while idle: {:?}",
        idle.failed
    );
    assert!(
        attacked.failed.is_empty(),
        "admissions failed under attack: {:?}\n{}",
        attacked.failed,
        server.proc.log_tail(40)
    );
    assert!(
        peak_before >= 900,
        "at most {peak_before} idle TLS connections were up at once before the measurement"
    );
    for (name, kind, cuts) in &all {
        let timeout = match kind {
            Attack::NoHandshake => HANDSHAKE_TIMEOUT,
            _ => HEADER_TIMEOUT,
        };
        let lived = cuts.lived();
        assert!(!lived.is_empty(), "{name}: never cut");
        // Cut at the timeout: not before it (the cap is out of reach here), not long after.
        let early: Vec<_> = lived
            .iter()
            .filter(|d| **d + Duration::from_millis(200) < timeout)
            .collect();
        assert!(
            early.is_empty(),
            "{name}: {} cut before the {timeout:?} timeout: {:?}",
            early.len(),
            &early[..early.len().min(5)]
        );
        // A slow body gets its headers through at once, then has the timeout again for the
        // body: up to twice the timeout.
        let bound = 2 * timeout + SLACK;
        let late: Vec<_> = lived.iter().filter(|d| **d > bound).collect();
        assert!(
            late.is_empty(),
            "{name}: {} lived past {bound:?}: {:?}",
            late.len(),
            &late[..late.len().min(5)]
        );
        assert!(
            cuts.oldest_open() <= bound,
            "{name}: a connection was still open after {:?}",
            cuts.oldest_open()
        );
    }
    assert!(
        answers.iter().any(|a| a.starts_with("HTTP/1.1 408")),
        "a slow body is answered 408: {answers:?}"
    );
    // Memory stays bounded: 1,300 connections cost a few MiB each at most.
    assert!(hwm < 1024 * 1024, "VmHWM {hwm} KiB");
    unregister(&ns).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn past_the_connection_cap_the_longest_idle_connection_makes_room() {
    let cp = ControlPlane::shared().await;
    let ns = cp.namespace("hostcap").await;
    const CAP: usize = 64;
    let mut server = Server::start(
        cp,
        &ns,
        &[
            // Only the cap cuts the idle attackers here.
            "--header-read-timeout=60s",
            "--max-connections=64",
        ],
    )
    .await;
    register(cp, &ns, server.port).await;
    let network = pool_ready(&ns, &mut server).await;
    let pid = server.pid();
    let (stop_tx, stop) = watch::channel(false);
    let cuts = Arc::new(Cuts::default());
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..3 * CAP {
        tasks.spawn(attacker(
            Attack::IdleTls,
            server.port,
            server.tls.clone(),
            cuts.clone(),
            stop.clone(),
        ));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut most_sockets = 0;
    let admissions = {
        let admit = admit(&ns, &network, "capped", 60, Duration::from_secs(5));
        tokio::pin!(admit);
        loop {
            tokio::select! {
                a = &mut admit => break a,
                () = tokio::time::sleep(Duration::from_millis(100)) => most_sockets = most_sockets.max(sockets(pid)),
            }
        }
    };
    let _ = stop_tx.send(true);
    while tasks.join_next().await.is_some() {}
    println!(
        "connection cap {CAP}, {} idle TLS attackers reconnecting:",
        3 * CAP
    );
    println!("  {}", admissions.line("admissions"));
    println!("  {}", cuts.summary("idle TLS (evicted)"));
    println!(
        "  most sockets held by the webhook: {most_sockets} (cap {CAP}, plus its listener and its own API connections)"
    );
    server.assert_healthy();
    assert!(
        admissions.failed.is_empty(),
        "admissions failed at the cap: {:?}",
        admissions.failed
    );
    // Eviction, not the 60 s timeout, cut them; and the cap held.
    assert!(
        cuts.lived().len() >= 2 * CAP,
        "only {} evicted",
        cuts.lived().len()
    );
    assert!(cuts.lived().iter().all(|d| *d < Duration::from_secs(30)));
    assert!(
        most_sockets <= CAP + 16,
        "{most_sockets} sockets open with a cap of {CAP}"
    );
    unregister(&ns).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_and_malformed_requests_get_clear_errors_over_the_wire() {
    let cp = ControlPlane::shared().await;
    let ns = cp.namespace("hostbad").await;
    let mut server = Server::start(
        cp,
        &ns,
        &["--max-request-bytes=1048576", "--header-read-timeout=5s"],
    )
    .await;
    let (port, tls) = (server.port, server.tls.clone());
    let path = vm_dhcp_webhook::PATH_VALIDATE_IPPOOL;

    // Past the limit: a Status naming it, without reading the body.
    let mut big = b"{\"pad\":\"".to_vec();
    big.resize(2 * 1024 * 1024, b'x');
    big.extend_from_slice(b"\"}");
    let answer = {
        let mut s = connect(port, &tls).await.expect("connect");
        let raw = post(path, &big);
        // The server may answer and close before the body is written: write and read at once.
        let (mut rd, mut wr) = tokio::io::split(&mut s);
        let write = async move {
            let _ = wr.write_all(&raw).await;
        };
        let mut out = Vec::new();
        let read = rd.read_to_end(&mut out);
        let _ =
            tokio::time::timeout(Duration::from_secs(20), futures::future::join(write, read)).await;
        String::from_utf8_lossy(&out).into_owned()
    };
    println!("oversized: {}", answer.lines().next().unwrap_or_default());
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("\"kind\":\"Status\""), "{answer}");
    assert!(answer.contains("limit of 1048576 bytes"), "{answer}");
    assert!(answer.contains("--max-request-bytes"), "{answer}");

    // Malformed reviews: a 400 that says what is wrong.
    for (body, says) in [
        (
            &b"{not json"[..],
            "not an admission.k8s.io/v1 AdmissionReview",
        ),
        (
            b"{\"apiVersion\":\"admission.k8s.io/v1\",\"kind\":\"AdmissionReview\"}",
            "no request",
        ),
        (b"[1,2,3]", "not an admission.k8s.io/v1 AdmissionReview"),
        (
            &[0xff, 0xfe, 0x00, 0x01][..],
            "not an admission.k8s.io/v1 AdmissionReview",
        ),
    ] {
        let answer = request(port, &tls, &post(path, body))
            .await
            .expect("answer");
        assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
        assert!(answer.contains(says), "{says:?} in {answer}");
    }
    // A well-formed review still gets an AdmissionReview back.
    let answer = request(port, &tls, &post(path, IPPOOL_CREATE.as_bytes()))
        .await
        .expect("answer");
    assert!(
        answer.starts_with("HTTP/1.1 200") && answer.contains("\"AdmissionReview\""),
        "{answer}"
    );

    // Not HTTP, huge headers, a lying length, a body on a GET: an error or a close, never a panic.
    let mut huge_header =
        b"POST /v1/webhook/validation/ippools HTTP/1.1\r\nHost: localhost\r\nX-Big: ".to_vec();
    huge_header.resize(2 * 1024 * 1024, b'a');
    huge_header.extend_from_slice(b"\r\n\r\n");
    for (what, raw) in [
        ("garbage", b"\x16\x03\x01garbage that is not HTTP\r\n\r\n".to_vec()),
        ("huge header", huge_header),
        ("length too short", b"POST /v1/webhook/validation/ippools HTTP/1.1\r\nHost: localhost\r\nContent-Length: 3\r\nConnection: close\r\n\r\n{\"apiVersion\": 1}".to_vec()),
        ("bad length", b"POST /v1/webhook/validation/ippools HTTP/1.1\r\nHost: localhost\r\nContent-Length: -5\r\nConnection: close\r\n\r\n".to_vec()),
        ("chunked lie", b"POST /v1/webhook/validation/ippools HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\nfffffffffffffffff\r\nab\r\n".to_vec()),
        ("unknown path", b"GET /../../etc/passwd HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".to_vec()),
    ] {
        let answer = request(port, &tls, &raw).await.unwrap_or_else(|e| format!("(connection error: {e})"));
        println!("{what}: {}", answer.lines().next().unwrap_or("(closed)"));
        assert!(!answer.starts_with("HTTP/1.1 200"), "{what}: {answer}");
        assert!(!answer.starts_with("HTTP/1.1 5"), "{what}: {answer}");
    }
    let alive = request(
        port,
        &tls,
        b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    )
    .await
    .expect("healthz");
    assert!(alive.starts_with("HTTP/1.1 200"), "{alive}");
    server.assert_healthy();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drops_readiness_first_and_lets_the_request_in_flight_finish() {
    let cp = ControlPlane::shared().await;
    let ns = cp.namespace("hostterm").await;
    let mut server = Server::start(
        cp,
        &ns,
        &[
            "--shutdown-delay=2s",
            "--drain-timeout=15s",
            "--header-read-timeout=20s",
        ],
    )
    .await;
    let (port, tls) = (server.port, server.tls.clone());
    // A review in flight: its headers now, its body over the next 4 s.
    let body = IPPOOL_CREATE.as_bytes().to_vec();
    let mut in_flight = connect(port, &tls).await.expect("connect");
    in_flight
        .write_all(format!(
            "POST {} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            vm_dhcp_webhook::PATH_VALIDATE_IPPOOL,
            body.len()
        ).as_bytes())
        .await
        .expect("headers");
    let finish = tokio::spawn(async move {
        for chunk in body.chunks(body.len().div_ceil(8)) {
            in_flight.write_all(chunk).await?;
            in_flight.flush().await?;
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let mut out = Vec::new();
        let _ = in_flight.read_to_end(&mut out).await;
        Ok::<_, std::io::Error>(String::from_utf8_lossy(&out).into_owned())
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let term = Instant::now();
    // SAFETY: kill(2) on the pid of our own child.
    unsafe { libc::kill(server.pid() as i32, libc::SIGTERM) };
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Not ready any more, but still serving during the delay.
    let ready = request(
        port,
        &tls,
        b"GET /readyz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    )
    .await
    .expect("readyz");
    let healthy = request(
        port,
        &tls,
        b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    )
    .await
    .expect("healthz");
    println!(
        "after SIGTERM: /readyz {}, /healthz {}",
        ready.lines().next().unwrap_or_default(),
        healthy.lines().next().unwrap_or_default()
    );
    assert!(ready.starts_with("HTTP/1.1 503"), "{ready}");
    // A client that would keep its connection is told to close it.
    let kept = request(
        port,
        &tls,
        b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n",
    )
    .await
    .expect("healthz, keep-alive");
    assert!(
        kept.to_ascii_lowercase().contains("connection: close"),
        "{kept}"
    );
    assert!(healthy.starts_with("HTTP/1.1 200"), "{healthy}");
    // The request in flight is answered in full, after the delay is over.
    let answer = finish.await.expect("task").expect("in-flight request");
    println!(
        "in-flight review answered {:.1} s after SIGTERM: {}",
        term.elapsed().as_secs_f64(),
        answer.lines().next().unwrap_or_default()
    );
    assert!(
        answer.starts_with("HTTP/1.1 200") && answer.contains("\"AdmissionReview\""),
        "{answer}"
    );
    // Then the process exits by itself, cleanly, and takes no new connection.
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = server.proc.exited() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "still running after the drain:\n{}",
            server.proc.log_tail(30)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    println!(
        "exited {status} {:.1} s after SIGTERM",
        term.elapsed().as_secs_f64()
    );
    assert!(status.success(), "{status}\n{}", server.proc.log_tail(30));
    assert!(
        connect(port, &tls).await.is_err(),
        "a connection after the drain"
    );
}

#[allow(dead_code)]
#[path = "apiserver/setup.rs"]
mod setup;

/// Hostile queries to the aggregated API through kube-apiserver, as kubectl sends them: each
/// is answered with a `Status` kubectl can print (or with data), never a server error, and the
/// server is still serving afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_aggregated_api_queries_get_a_status_never_a_crash() {
    let cp = ControlPlane::shared().await;
    let api = setup::start(cp, &[]).await.expect("vm-dhcp apiserver");
    let ns = cp.namespace("hostapi").await;
    setup::create_pool(&ns, "net-q", 41, serde_json::json!({})).await;
    setup::allocate(
        &ns,
        "net-q",
        "172.41.0.10",
        "02:00:00:00:41:10",
        Some("default/vm1"),
    )
    .await;
    let base = format!(
        "/apis/dhcp.harvesterhci.io/v1alpha1/namespaces/{}/ipamallocations",
        ns.name
    );
    let long_selector = format!("a in ({})", vec!["x"; 5000].join(","));
    let deep_selector = "a,".repeat(3000) + "a";
    let queries: Vec<String> = vec![
        format!("{base}?labelSelector=a+in+("),
        format!("{base}?labelSelector=%21%21%21"),
        format!("{base}?labelSelector={}", long_selector.replace(' ', "+")),
        format!("{base}?labelSelector={deep_selector}"),
        format!("{base}?fieldSelector=spec.nope%3D1"),
        format!("{base}?fieldSelector=%3D%3D%3D"),
        format!("{base}?resourceVersion=abc"),
        format!("{base}?resourceVersion=-1"),
        format!("{base}?resourceVersion=99999999999999999999999999"),
        format!("{base}?resourceVersion=1&resourceVersionMatch=Exact"),
        format!("{base}?resourceVersionMatch=Bogus"),
        format!("{base}?limit=-5"),
        format!("{base}?limit=abc&continue=%00garbage"),
        format!("{base}?watch=true&resourceVersion=1&timeoutSeconds=2"),
        format!("{base}?watch=true&timeoutSeconds=-1"),
        format!("{base}?watch=true&sendInitialEvents=true&timeoutSeconds=2"),
        format!("{base}?watch=maybe"),
        format!("{base}/%00%ff"),
        format!("{base}/{}", "n".repeat(300)),
        format!("{base}/x/y/z/w"),
        format!("{base}?includeObject=Everything"),
        "/apis/dhcp.harvesterhci.io/v1alpha1/foos".to_string(),
        "/apis/dhcp.harvesterhci.io/v1alpha1/namespaces/%2e%2e/ipamallocations".to_string(),
        format!(
            "/apis/dhcp.harvesterhci.io/v1alpha1/namespaces/{}/ipamallocations",
            "n".repeat(300)
        ),
        "/apis/dhcp.harvesterhci.io/v1alpha1/dhcpleases?fieldSelector=metadata.name%3D".to_string(),
    ];
    for path in &queries {
        let out = cp
            .kubectl(&["get", "--raw", path, "--request-timeout=10s"])
            .await;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let first = text.lines().next().unwrap_or_default().to_string();
        println!(
            "{:<90.90} {}",
            path.replace(&base, "…"),
            first.chars().take(140).collect::<String>()
        );
        if !out.status.success() {
            // A Status kubectl could read: "Error from server (Reason): message".
            assert!(
                text.contains("Error from server (") || text.contains("Error from server:"),
                "{path}: {text}"
            );
            for bad in [
                "(InternalError)",
                "(ServiceUnavailable)",
                "an error on the server",
                "panicked",
            ] {
                assert!(!text.contains(bad), "{path}: {text}\n{}", api.log_tail(30));
            }
        }
    }
    // Still serving, the allocation still there, nothing panicked.
    let out = cp.kubectl(&["get", "--raw", &base]).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("172.41.0.10"),
        "{text}"
    );
    let mut process = api.process.lock().unwrap_or_else(|e| e.into_inner());
    assert!(
        process.exited().is_none(),
        "apiserver exited:\n{}",
        process.log_tail(40)
    );
    let log = std::fs::read_to_string(&process.log).unwrap_or_default();
    assert!(!log.contains("panicked"), "{}", process.log_tail(40));
}

/// CPU time (user + system) of a process, from /proc/<pid>/stat, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = stat.rfind(')').map_or("", |i| &stat[i + 2..]);
    let fields: Vec<&str> = rest.split(' ').collect();
    let field = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // utime and stime are fields 14 and 15 of the file, 11 and 12 after the command name.
    field(11) + field(12)
}

/// Out of file descriptors, `accept` fails at once and keeps failing while the connection
/// waits in the queue: the server must wait between tries (a spinning loop burns a core),
/// and accept again once descriptors are free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_file_descriptors_the_accept_loop_backs_off_and_recovers() {
    let cp = ControlPlane::shared().await;
    let ns = cp.namespace("hostfd").await;
    let mut server = Server::start_with(cp, &ns, &["--header-read-timeout=60s"], Some(128)).await;
    let pid = server.pid();
    // Fill the descriptor table: plain TCP connections, held open. Those past the limit wait
    // in the listen queue, where accept fails on them with EMFILE.
    let mut held = Vec::new();
    for _ in 0..300 {
        if let Ok(s) = TcpStream::connect(("127.0.0.1", server.port)).await {
            held.push(s);
        }
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let failures = || {
        std::fs::read_to_string(&server.proc.log)
            .unwrap_or_default()
            .matches("accepting a connection failed")
            .count()
    };
    let (t0, c0, f0) = (Instant::now(), cpu_ticks(pid), failures());
    tokio::time::sleep(Duration::from_secs(4)).await;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let busy = (cpu_ticks(pid) - c0) as f64 / hz / t0.elapsed().as_secs_f64();
    let (before, during) = (f0, failures() - f0);
    println!(
        "out of descriptors: {} connections held; over 4 s the webhook used {:.1} % of a core and retried accept {during} times ({before} before)",
        held.len(),
        busy * 100.0
    );
    assert!(
        before + during > 0,
        "accept never failed: the limit was not reached\n{}",
        server.proc.log_tail(20)
    );
    // Backing off up to a second: a handful of tries in 4 s. Without the backoff, thousands
    // (with a zero pause) or millions and a whole core (with none).
    assert!(during < 100, "{during} accept retries in 4 s: no backoff");
    assert!(
        busy < 0.5,
        "the accept loop spins: {:.0} % of a core",
        busy * 100.0
    );
    // Descriptors free again: served again.
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let answer = request(
            server.port,
            &server.tls,
            b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
        )
        .await;
        if answer
            .as_deref()
            .is_ok_and(|a| a.starts_with("HTTP/1.1 200"))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not serving after the descriptors were freed: {answer:?}\n{}",
            server.proc.log_tail(20)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    server.assert_healthy();
}
