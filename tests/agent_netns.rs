//! The agent against real DHCP clients (ISC dhclient, busybox udhcpc) and hand-built
//! packets, in network namespaces joined by a veth pair: the agent offline on one side with
//! a pool file, the client on the other.
//!
//! Needs root, `ip netns` and the clients (`scripts/test-deps.sh`); without them each test
//! fails saying what is missing (`VM_DHCP_TESTS_SKIP_MISSING=1`: skips instead). Every namespace
//! and process is removed by Drop guards, also when an assertion fails. Traffic stays in the
//! namespaces the test creates (192.168.48.0/24 exists only there) and their loopback.
//! Waits poll for an event with a generous deadline; nothing here measures speed.

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use dhcproto::v4::{DhcpOption, Flags, Message, MessageType, OptionCode};
use dhcproto::{Decodable, Decoder, Encodable, Encoder};

const AGENT: &str = env!("CARGO_BIN_EXE_vm-dhcp");
const SERVER_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 48, 77);
const LEASED: Ipv4Addr = Ipv4Addr::new(192, 168, 48, 86);
const WRONG: Ipv4Addr = Ipv4Addr::new(192, 168, 48, 88);
/// The client's MAC, written in upper case in the pool: the agent must match it anyway.
const CLIENT_MAC: &str = "02:00:5e:10:00:86";
const CLIENT_MAC_IN_POOL: &str = "02:00:5E:10:00:86";
const STRANGER_MAC: [u8; 6] = [0x02, 0, 0x5e, 0x10, 0, 0x99];
/// Long enough for any client or agent step on a loaded CI machine; never a speed check.
const PATIENCE: Duration = Duration::from_secs(30);

static COUNTER: AtomicU32 = AtomicU32::new(0);

fn pool_yaml(dns: &str, domain: &str, lease_time: u32) -> String {
    format!(
        r#"apiVersion: network.harvesterhci.io/v1alpha1
kind: IPPool
metadata:
  name: net-48
  namespace: default
spec:
  networkName: default/net-48
  ipv4Config:
    serverIP: 192.168.48.77
    cidr: 192.168.48.0/24
    pool:
      start: 192.168.48.81
      end: 192.168.48.90
      exclude: [192.168.48.81, 192.168.48.90]
    router: 192.168.48.1
    dns: [{dns}]
    domainName: {domain}
    domainSearch: [{domain}, corp.example.org]
    ntp: [192.168.48.5]
    leaseTime: {lease_time}
status:
  ipv4:
    allocated:
      192.168.48.77: RESERVED
      192.168.48.81: EXCLUDED
      192.168.48.90: EXCLUDED
      192.168.48.86: "{CLIENT_MAC_IN_POOL}"
    used: 1
    available: 7
"#
    )
}

fn default_pool() -> String {
    pool_yaml("192.168.48.53, 192.168.48.54", "aibao.moe", 300)
}

// ------------------------------------------------------------------ environment

#[path = "support/needs.rs"]
mod needs;

/// Fails the test with what is missing (root, `ip`, a DHCP client), or skips it with
/// `VM_DHCP_TESTS_SKIP_MISSING=1`; then checks that `ip netns` works here.
macro_rules! require_netns {
    ($($program:expr),*) => {
        if !needs::require(module_path!(), true, &[needs::IP, $($program),*]) {
            return;
        }
        netns_works();
    };
}

fn netns_works() {
    match Command::new("ip").args(["netns", "list"]).output() {
        Ok(out) if out.status.success() => {}
        Ok(out) => panic!(
            "`ip netns list` failed, network namespaces are unusable here: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ),
        Err(e) => panic!("`ip` (iproute2) not runnable: {e}"),
    }
}

fn run(cmd: &[&str]) {
    let out = Command::new(cmd[0])
        .args(&cmd[1..])
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A scratch directory, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("vdt-{}-{tag}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("scratch dir");
        Scratch(dir)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Two namespaces and the veth pair between them; deleting a namespace deletes its end.
struct Net {
    server_ns: String,
    client_ns: String,
    server_if: String,
    client_if: String,
}

impl Net {
    fn new() -> Self {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        // Interface names: at most 15 bytes ("vdt-" + 7-digit pid + "-" + n + side).
        let net = Net {
            server_ns: format!("vdt-{pid}-{n}-srv"),
            client_ns: format!("vdt-{pid}-{n}-cli"),
            server_if: format!("vdt-{pid}-{n}s"),
            client_if: format!("vdt-{pid}-{n}c"),
        };
        assert!(net.client_if.len() <= 15, "{}", net.client_if);
        run(&["ip", "netns", "add", &net.server_ns]);
        run(&["ip", "netns", "add", &net.client_ns]);
        run(&[
            "ip",
            "link",
            "add",
            &net.server_if,
            "netns",
            &net.server_ns,
            "type",
            "veth",
            "peer",
            "name",
            &net.client_if,
            "netns",
            &net.client_ns,
            "address",
            CLIENT_MAC,
        ]);
        for ns in [&net.server_ns, &net.client_ns] {
            run(&["ip", "-n", ns, "link", "set", "lo", "up"]);
        }
        run(&[
            "ip",
            "-n",
            &net.server_ns,
            "addr",
            "add",
            "192.168.48.77/24",
            "dev",
            &net.server_if,
        ]);
        run(&[
            "ip",
            "-n",
            &net.server_ns,
            "link",
            "set",
            &net.server_if,
            "up",
        ]);
        // The client side starts unnumbered, as a booting VM.
        run(&[
            "ip",
            "-n",
            &net.client_ns,
            "link",
            "set",
            &net.client_if,
            "up",
        ]);
        net
    }

    fn client_addresses(&self) -> String {
        let out = Command::new("ip")
            .args([
                "-n",
                &self.client_ns,
                "-4",
                "addr",
                "show",
                "dev",
                &self.client_if,
            ])
            .output()
            .expect("ip addr show");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for ns in [&self.client_ns, &self.server_ns] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// A child process killed and reaped on drop.
struct Proc {
    child: Child,
    what: &'static str,
}

impl Proc {
    fn spawn(what: &'static str, cmd: &mut Command) -> Self {
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("starting {what}: {e}"));
        Proc { child, what }
    }

    fn signal(&self, sig: libc::c_int) {
        // SAFETY: kill(2) on the pid of a child we have not reaped yet.
        let rc = unsafe { libc::kill(self.child.id() as libc::pid_t, sig) };
        assert_eq!(rc, 0, "signalling {}", self.what);
    }

    fn assert_running(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!("{} exited early: {status}", self.what);
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `f` on a thread that has entered the network namespace `ns`: sockets it creates
/// live there.
fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = fs::File::open(&path).unwrap_or_else(|e| panic!("opening {path}: {e}"));
        // SAFETY: setns on a valid namespace fd; it only affects this thread.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
        f()
    })
    .join()
    .unwrap_or_else(|e| std::panic::resume_unwind(e))
}

fn wait_for<T>(what: &str, mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Some(v) = probe() {
            return v;
        }
        assert!(Instant::now() < deadline, "gave up waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

// ------------------------------------------------------------------ the agent

struct Agent {
    // Field order is drop order: the process goes before its namespaces.
    proc: Proc,
    net: Net,
    dir: Scratch,
}

impl Agent {
    fn start(tag: &str, pool: &str) -> Self {
        let dir = Scratch::new(tag);
        let net = Net::new();
        fs::write(dir.path("pool.yaml"), pool).expect("pool file");
        let log = fs::File::create(dir.path("agent.log")).expect("agent log");
        let proc = Proc::spawn(
            "the agent",
            Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    &net.server_ns,
                    AGENT,
                    "agent",
                    "--ippool-file",
                ])
                .arg(dir.path("pool.yaml"))
                .args(["--nic", &net.server_if, "--http-addr", "127.0.0.1:8080"])
                .env("RUST_LOG", "debug")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log),
        );
        let mut agent = Agent { proc, net, dir };
        wait_for("the agent to be ready", || {
            agent.proc.assert_running();
            agent.get("/readyz").ok().filter(|(s, _)| *s == 200)
        });
        agent
    }

    /// GET from the agent's HTTP server on the server namespace's loopback.
    fn get(&self, path: &str) -> std::io::Result<(u16, String)> {
        let path = path.to_string();
        in_netns(&self.net.server_ns, move || {
            let mut conn = TcpStream::connect("127.0.0.1:8080")?;
            conn.set_read_timeout(Some(PATIENCE))?;
            write!(
                conn,
                "GET {path} HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n\r\n"
            )?;
            let mut raw = String::new();
            conn.read_to_string(&mut raw)?;
            let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
            let status = head
                .split(' ')
                .nth(1)
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            Ok((status, body.to_string()))
        })
    }

    fn get_ok(&self, path: &str) -> String {
        match self.get(path) {
            Ok((200, body)) => body,
            other => panic!("GET {path}: {other:?}"),
        }
    }

    fn json(&self, path: &str) -> serde_json::Value {
        serde_json::from_str(&self.get_ok(path)).expect("JSON body")
    }

    fn metric(&self, line_prefix: &str) -> f64 {
        self.get_ok("/metrics")
            .lines()
            .find_map(|l| l.strip_prefix(line_prefix)?.trim().parse().ok())
            .unwrap_or(0.0)
    }

    fn lease_state(&self) -> String {
        let view = self.json("/api/v1/leases");
        view["items"]
            .as_array()
            .and_then(|items| items.iter().find(|i| i["mac"] == CLIENT_MAC))
            .and_then(|i| i["state"].as_str())
            .unwrap_or("absent")
            .to_string()
    }

    fn edit_pool(&self, pool: &str) {
        // Write then rename: the agent never reads half a file.
        let tmp = self.dir.path("pool.yaml.tmp");
        fs::write(&tmp, pool).expect("pool file");
        fs::rename(&tmp, self.dir.path("pool.yaml")).expect("replace pool file");
    }

    fn log(&self) -> String {
        fs::read_to_string(self.dir.path("agent.log")).unwrap_or_default()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- agent log ---\n{}\n--- end ---", self.log());
        }
    }
}

// ------------------------------------------------------------------ real clients

/// A hook for dhclient (-sf) and udhcpc (-s) that records each event with what the client
/// was told, and configures only the test interface (never /etc: no resolv.conf rewrite).
fn write_hook(dir: &Scratch) -> (PathBuf, PathBuf) {
    let log = dir.path("hook.log");
    let hook = dir.path("hook.sh");
    let script = format!(
        r#"#!/bin/sh
PATH=/usr/sbin:/usr/bin:/sbin:/bin
event="${{reason:-$1}}"
# Configure first, then record: a recorded event means the interface is already set.
case "$event" in
  BOUND|RENEW|REBIND|REBOOT) ip addr replace "$new_ip_address/$new_subnet_mask" dev "$interface" ;;
  bound|renew) ip addr replace "$ip/$subnet" dev "$interface" ;;
  PREINIT) ip link set dev "$interface" up ;;
  deconfig|EXPIRE|FAIL|RELEASE|STOP) ip -4 addr flush dev "$interface" ;;
esac
{{
  echo "event=$event"
  env | grep -E '^(new_|ip=|subnet=|router=|dns=|domain=|search=|ntpsrv=|lease=|serverid=)' | sort
  echo "end"
}} >> "{log}"
exit 0
"#,
        log = log.display()
    );
    fs::write(&hook, script).expect("hook");
    run(&["chmod", "+x", &hook.display().to_string()]);
    (hook, log)
}

#[derive(Debug)]
struct Event {
    name: String,
    vars: BTreeMap<String, String>,
}

fn events(log: &Path) -> Vec<Event> {
    let text = fs::read_to_string(log).unwrap_or_default();
    let mut out = Vec::new();
    let mut current: Option<Event> = None;
    for line in text.lines() {
        if let Some(name) = line.strip_prefix("event=") {
            current = Some(Event {
                name: name.to_string(),
                vars: BTreeMap::new(),
            });
        } else if line == "end" {
            out.extend(current.take());
        } else if let (Some(ev), Some((k, v))) = (current.as_mut(), line.split_once('=')) {
            ev.vars.insert(k.to_string(), v.to_string());
        }
    }
    out
}

fn nth_event(log: &Path, names: &[&str], n: usize) -> Event {
    wait_for(&format!("client event {names:?} #{n}"), || {
        events(log)
            .into_iter()
            .filter(|e| names.contains(&e.name.as_str()))
            .nth(n)
    })
}

fn var<'a>(event: &'a Event, key: &str) -> &'a str {
    event
        .vars
        .get(key)
        .map(String::as_str)
        .unwrap_or_else(|| panic!("{} has no {key}: {:?}", event.name, event.vars))
}

fn udhcpc(agent: &Agent, hook: &Path) -> Proc {
    Proc::spawn(
        "udhcpc",
        Command::new("ip")
            .args(["netns", "exec", &agent.net.client_ns])
            .args(["busybox", "udhcpc", "-f", "-i", &agent.net.client_if])
            .args(["-t", "10", "-T", "1", "-A", "1"])
            .args(["-O", "search", "-O", "ntpsrv", "-s"])
            .arg(hook)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    )
}

#[test]
fn dhclient_configures_address_and_every_option() {
    require_netns!(needs::DHCLIENT);
    let agent = Agent::start("dhclient", &default_pool());
    let (hook, log) = write_hook(&agent.dir);
    let conf = agent.dir.path("dhclient.conf");
    fs::write(
        &conf,
        "request subnet-mask, routers, domain-name-servers, domain-name, domain-search, \
         ntp-servers, dhcp-lease-time, dhcp-renewal-time, dhcp-rebinding-time;\n",
    )
    .expect("dhclient.conf");
    // -d: stay in the foreground so the guard can stop it; private lease and pid files.
    let _client = Proc::spawn(
        "dhclient",
        Command::new("ip")
            .args([
                "netns",
                "exec",
                &agent.net.client_ns,
                "dhclient",
                "-4",
                "-1",
                "-d",
            ])
            .arg("-cf")
            .arg(&conf)
            .arg("-sf")
            .arg(&hook)
            .arg("-lf")
            .arg(agent.dir.path("dhclient.leases"))
            .arg("-pf")
            .arg(agent.dir.path("dhclient.pid"))
            .arg(&agent.net.client_if)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    );
    let bound = nth_event(&log, &["BOUND"], 0);
    assert_eq!(var(&bound, "new_ip_address"), "192.168.48.86");
    assert_eq!(var(&bound, "new_subnet_mask"), "255.255.255.0");
    assert_eq!(var(&bound, "new_routers"), "192.168.48.1");
    assert_eq!(
        var(&bound, "new_domain_name_servers"),
        "192.168.48.53 192.168.48.54"
    );
    assert_eq!(var(&bound, "new_domain_name"), "aibao.moe");
    assert_eq!(
        var(&bound, "new_domain_search"),
        "aibao.moe. corp.example.org."
    );
    assert_eq!(var(&bound, "new_ntp_servers"), "192.168.48.5");
    assert_eq!(var(&bound, "new_dhcp_lease_time"), "300");
    assert_eq!(var(&bound, "new_dhcp_renewal_time"), "150");
    assert_eq!(var(&bound, "new_dhcp_rebinding_time"), "262");
    assert_eq!(var(&bound, "new_dhcp_server_identifier"), "192.168.48.77");
    assert!(
        agent
            .net
            .client_addresses()
            .contains("inet 192.168.48.86/24"),
        "{}",
        agent.net.client_addresses()
    );
    assert_eq!(agent.lease_state(), "bound");
    // The compatibility view says what the client was told.
    let compat = agent.json("/leases");
    let lease: serde_json::Value = serde_json::from_str(
        compat[CLIENT_MAC]
            .as_str()
            .expect("lease as a JSON string, keyed by the canonical MAC"),
    )
    .expect("lease JSON");
    assert_eq!(lease["ClientIP"], "192.168.48.86");
    assert_eq!(lease["SubnetMask"], "////AA==");
    assert_eq!(lease["LeaseTime"], 300);
    assert_eq!(
        agent.metric("vmdhcp_agent_replies_total{type=\"ack\"}"),
        1.0
    );
}

#[test]
fn udhcpc_configures_address_and_every_option() {
    require_netns!(needs::BUSYBOX);
    let agent = Agent::start("udhcpc", &default_pool());
    let (hook, log) = write_hook(&agent.dir);
    let _client = udhcpc(&agent, &hook);
    let bound = nth_event(&log, &["bound"], 0);
    assert_eq!(var(&bound, "ip"), "192.168.48.86");
    assert_eq!(var(&bound, "subnet"), "255.255.255.0");
    assert_eq!(var(&bound, "router"), "192.168.48.1");
    assert_eq!(var(&bound, "dns"), "192.168.48.53 192.168.48.54");
    assert_eq!(var(&bound, "domain"), "aibao.moe");
    assert_eq!(var(&bound, "search"), "aibao.moe corp.example.org");
    assert_eq!(var(&bound, "ntpsrv"), "192.168.48.5");
    assert_eq!(var(&bound, "lease"), "300");
    assert_eq!(var(&bound, "serverid"), "192.168.48.77");
    assert!(
        agent
            .net
            .client_addresses()
            .contains("inet 192.168.48.86/24"),
        "{}",
        agent.net.client_addresses()
    );
}

#[test]
fn option_edit_reaches_a_renewing_udhcpc() {
    require_netns!(needs::BUSYBOX);
    let agent = Agent::start("edit", &default_pool());
    let (hook, log) = write_hook(&agent.dir);
    let client = udhcpc(&agent, &hook);
    let bound = nth_event(&log, &["bound"], 0);
    assert_eq!(var(&bound, "dns"), "192.168.48.53 192.168.48.54");

    agent.edit_pool(&pool_yaml("192.168.48.99", "new.example", 600));
    wait_for("the agent to load the edited pool", || {
        let compat = agent.json("/leases");
        let lease = compat[CLIENT_MAC].as_str()?.to_string();
        lease.contains("192.168.48.99").then_some(())
    });
    // SIGUSR1: udhcpc renews now, by unicast to the server (RENEWING). Repeated until the
    // renewal is seen, in case a signal lands while udhcpc is busy.
    let renewed = wait_for("a renewal with the new options", || {
        client.signal(libc::SIGUSR1);
        std::thread::sleep(Duration::from_millis(500));
        events(&log).into_iter().find(|e| e.name == "renew")
    });
    assert_eq!(var(&renewed, "ip"), "192.168.48.86");
    assert_eq!(var(&renewed, "dns"), "192.168.48.99");
    assert_eq!(var(&renewed, "domain"), "new.example");
    assert_eq!(var(&renewed, "search"), "new.example corp.example.org");
    assert_eq!(var(&renewed, "lease"), "600");
}

#[test]
fn release_then_discover_again() {
    require_netns!(needs::BUSYBOX);
    let agent = Agent::start("release", &default_pool());
    let (hook, log) = write_hook(&agent.dir);
    let client = udhcpc(&agent, &hook);
    nth_event(&log, &["bound"], 0);
    assert_eq!(agent.lease_state(), "bound");

    // SIGUSR2: udhcpc sends a RELEASE and deconfigures the interface.
    client.signal(libc::SIGUSR2);
    wait_for("the agent to record the release", || {
        (agent.lease_state() == "released").then_some(())
    });
    // udhcpc sends the RELEASE before its deconfig hook runs.
    wait_for("the client to drop the released address", || {
        (!agent.net.client_addresses().contains("192.168.48.86")).then_some(())
    });
    assert_eq!(
        agent.metric("vmdhcp_agent_requests_total{type=\"release\"}"),
        1.0
    );

    // SIGUSR1 from the released state: a fresh DISCOVER, and the same address again.
    let again = wait_for("a new lease after the release", || {
        client.signal(libc::SIGUSR1);
        std::thread::sleep(Duration::from_millis(500));
        events(&log)
            .into_iter()
            .filter(|e| e.name == "bound")
            .nth(1)
    });
    assert_eq!(var(&again, "ip"), "192.168.48.86");
    assert_eq!(agent.lease_state(), "bound");
    assert_eq!(
        agent.metric("vmdhcp_agent_replies_total{type=\"offer\"}"),
        2.0
    );
}

#[test]
fn dhclient_with_a_stale_lease_is_naked_and_binds_again() {
    require_netns!(needs::DHCLIENT);
    let agent = Agent::start("stale", &default_pool());
    let (hook, log) = write_hook(&agent.dir);
    // A lease for an address that is not this client's: dhclient starts in INIT-REBOOT and
    // asks for it; the agent NAKs (broadcast) and dhclient falls back to DISCOVER.
    let leases = agent.dir.path("dhclient.leases");
    fs::write(
        &leases,
        format!(
            "lease {{\n  interface \"{}\";\n  fixed-address 192.168.48.88;\n  option subnet-mask 255.255.255.0;\n  option dhcp-lease-time 300;\n  option dhcp-server-identifier 192.168.48.77;\n  renew 4 2037/12/31 00:00:00;\n  rebind 4 2037/12/31 00:00:00;\n  expire 4 2037/12/31 00:00:00;\n}}\n",
            agent.net.client_if
        ),
    )
    .expect("lease file");
    let _client = Proc::spawn(
        "dhclient",
        Command::new("ip")
            .args([
                "netns",
                "exec",
                &agent.net.client_ns,
                "dhclient",
                "-4",
                "-1",
                "-d",
            ])
            .arg("-sf")
            .arg(&hook)
            .arg("-lf")
            .arg(&leases)
            .arg("-pf")
            .arg(agent.dir.path("dhclient.pid"))
            .arg(&agent.net.client_if)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    );
    let bound = nth_event(&log, &["BOUND", "REBOOT"], 0);
    assert_eq!(bound.name, "BOUND", "bound after a fresh DISCOVER");
    assert_eq!(var(&bound, "new_ip_address"), "192.168.48.86");
    assert_eq!(agent.metric("vmdhcp_agent_naks_total"), 1.0);
}

// ------------------------------------------------------------------ hand-built packets

fn request(mac: [u8; 6], xid: u32, message_type: MessageType) -> Message {
    let mut msg = Message::new_with_id(
        xid,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        &mac,
    );
    msg.opts_mut().insert(DhcpOption::MessageType(message_type));
    msg
}

fn client_mac() -> [u8; 6] {
    let mut mac = [0u8; 6];
    for (i, part) in CLIENT_MAC.split(':').enumerate() {
        mac[i] = u8::from_str_radix(part, 16).expect("hex");
    }
    mac
}

/// Sends each message from `bind` (port 68) in the client namespace to `to`, then collects
/// replies until one answers `until_xid`.
fn exchange(
    agent: &Agent,
    bind: Ipv4Addr,
    to: SocketAddrV4,
    messages: Vec<Message>,
    until_xid: u32,
) -> Vec<Message> {
    let device = agent.net.client_if.clone();
    in_netns(&agent.net.client_ns, move || {
        let socket = socket2::Socket::new(
            socket2::Domain::IPV4,
            socket2::Type::DGRAM,
            Some(socket2::Protocol::UDP),
        )
        .expect("socket");
        socket.set_reuse_address(true).expect("SO_REUSEADDR");
        socket.set_broadcast(true).expect("SO_BROADCAST");
        socket
            .bind_device(Some(device.as_bytes()))
            .expect("SO_BINDTODEVICE");
        socket
            .bind(&SocketAddrV4::new(bind, 68).into())
            .expect("bind port 68");
        let socket: UdpSocket = socket.into();
        socket
            .set_read_timeout(Some(Duration::from_millis(200)))
            .expect("timeout");
        let deadline = Instant::now() + PATIENCE;
        let mut replies = Vec::new();
        let mut buf = [0u8; 1500];
        // Resent until answered: a datagram sent before the agent's socket saw the link
        // come up could be lost.
        loop {
            for msg in &messages {
                let mut bytes = Vec::new();
                msg.encode(&mut Encoder::new(&mut bytes)).expect("encode");
                socket.send_to(&bytes, to).expect("send");
            }
            let resend = Instant::now() + Duration::from_secs(2);
            while Instant::now() < resend {
                let Ok(len) = socket.recv(&mut buf) else {
                    continue;
                };
                let reply = Message::decode(&mut Decoder::new(&buf[..len])).expect("decodes");
                let done = reply.xid() == until_xid;
                replies.push(reply);
                if done {
                    return replies;
                }
            }
            assert!(Instant::now() < deadline, "no reply to xid {until_xid:#x}");
        }
    })
}

fn broadcast_67() -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::BROADCAST, 67)
}

fn opt_ip(msg: &Message, code: OptionCode) -> Option<Ipv4Addr> {
    match msg.opts().get(code) {
        Some(DhcpOption::ServerIdentifier(ip)) => Some(*ip),
        Some(DhcpOption::SubnetMask(ip)) => Some(*ip),
        _ => None,
    }
}

#[test]
fn wrong_requested_address_gets_a_broadcast_nak() {
    require_netns!();
    let agent = Agent::start("nak", &default_pool());
    // INIT-REBOOT: no server id, no ciaddr, a requested address that is not ours.
    let mut msg = request(client_mac(), 0x4e414b01, MessageType::Request);
    msg.opts_mut().insert(DhcpOption::RequestedIpAddress(WRONG));
    // The client is unnumbered: only a broadcast reply can reach this socket.
    let replies = exchange(
        &agent,
        Ipv4Addr::UNSPECIFIED,
        broadcast_67(),
        vec![msg],
        0x4e414b01,
    );
    let nak = replies.last().expect("a reply");
    assert_eq!(nak.opts().msg_type(), Some(MessageType::Nak));
    assert_eq!(opt_ip(nak, OptionCode::ServerIdentifier), Some(SERVER_IP));
    assert_eq!(nak.yiaddr(), Ipv4Addr::UNSPECIFIED);
    assert!(agent.metric("vmdhcp_agent_naks_total") >= 1.0);
    assert_eq!(
        agent.lease_state(),
        "static-never-seen",
        "a NAK binds nothing"
    );
}

#[test]
fn handcrafted_renewal_is_acked_by_unicast() {
    require_netns!();
    let agent = Agent::start("renew", &default_pool());
    run(&[
        "ip",
        "-n",
        &agent.net.client_ns,
        "addr",
        "add",
        "192.168.48.86/24",
        "dev",
        &agent.net.client_if,
    ]);
    // RENEWING: ciaddr set, no server id, no requested address, sent by unicast.
    let mut msg = request(client_mac(), 0x52454e01, MessageType::Request);
    msg.set_ciaddr(LEASED);
    msg.opts_mut().insert(DhcpOption::ParameterRequestList(vec![
        OptionCode::SubnetMask,
        OptionCode::Router,
        OptionCode::DomainNameServer,
    ]));
    // Bound to the leased address itself, so a broadcast reply would never reach it.
    let replies = exchange(
        &agent,
        LEASED,
        SocketAddrV4::new(SERVER_IP, 67),
        vec![msg],
        0x52454e01,
    );
    let ack = replies.last().expect("a reply");
    assert_eq!(ack.opts().msg_type(), Some(MessageType::Ack));
    assert_eq!(ack.yiaddr(), LEASED);
    assert_eq!(ack.ciaddr(), LEASED);
    assert_eq!(
        opt_ip(ack, OptionCode::SubnetMask),
        Some(Ipv4Addr::new(255, 255, 255, 0))
    );
    assert_eq!(
        ack.opts().get(OptionCode::AddressLeaseTime),
        Some(&DhcpOption::AddressLeaseTime(300))
    );
    assert_eq!(agent.lease_state(), "bound");
}

#[test]
fn unknown_mac_gets_nothing() {
    require_netns!();
    let agent = Agent::start("unknown", &default_pool());
    let stranger = request(STRANGER_MAC, 0x554e4b01, MessageType::Discover);
    let mut known = request(client_mac(), 0x4b4e4f01, MessageType::Discover);
    known.set_flags(Flags::default().set_broadcast());
    // The agent handles datagrams in order on one socket: an answer to the stranger would
    // arrive before the answer to the known client.
    let replies = exchange(
        &agent,
        Ipv4Addr::UNSPECIFIED,
        broadcast_67(),
        vec![stranger, known],
        0x4b4e4f01,
    );
    assert!(
        replies.iter().all(|r| r.xid() != 0x554e4b01),
        "the unknown MAC got an answer: {replies:?}"
    );
    let offer = replies.last().expect("offer");
    assert_eq!(offer.opts().msg_type(), Some(MessageType::Offer));
    assert_eq!(offer.yiaddr(), LEASED);
    assert!(agent.metric("vmdhcp_agent_drops_total{reason=\"unknown_mac\"}") >= 1.0);
}

#[test]
fn malformed_pool_file_keeps_the_previous_table() {
    require_netns!();
    let agent = Agent::start("badfile", &default_pool());
    agent.edit_pool("spec: [this is not, an IPPool\n");
    wait_for("the agent to reject the file", || {
        (agent.metric("vmdhcp_agent_table_reloads_total{result=\"invalid_source\"}") >= 1.0)
            .then_some(())
    });
    assert!(
        agent.log().contains("not a valid IPPool manifest"),
        "{}",
        agent.log()
    );
    // Still serving the last good table.
    assert_eq!(agent.get("/readyz").map(|(s, _)| s).ok(), Some(200));
    let discover = request(client_mac(), 0x42414401, MessageType::Discover);
    let replies = exchange(
        &agent,
        Ipv4Addr::UNSPECIFIED,
        broadcast_67(),
        vec![discover],
        0x42414401,
    );
    assert_eq!(
        replies.last().and_then(|r| r.opts().msg_type()),
        Some(MessageType::Offer)
    );
}
