//! The fault-injection suite: the whole product on the local control plane (two webhook
//! replicas, two leader-elected controllers, agents on simulated nodes, the aggregated
//! apiserver), with load running (VMs created and deleted at a steady rate through the
//! webhooks, guests' DHCP clients renewing in their network namespaces), and one fault after
//! another. `make chaos` runs every fault (`e2e/examples/chaos.rs`); `e2e/tests/chaos.rs`
//! runs a few in CI.
//!
//! While a fault is injected and lifted, probes watch what users see: admission (a VM create
//! admitted with an allocation), DHCP (a fresh DORA of a guest), the controllers (the leader
//! Lease held by a live controller), the agents (as many Ready as the controller places) and
//! the aggregated apiserver (`ipamallocations` listed through kube-apiserver's aggregator).
//! Each probe's recovery is the time from the fault's start until a probe went through after
//! the last one that failed. Then the load pauses and the allocation store is checked
//! against the VMs (see [`check`]).

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::json;
use tokio::sync::Semaphore;
use vm_dhcp_core::admission::{ALLOCATIONS_ANNOTATION, NicAllocation};
use vm_dhcp_core::crd::{IPPool, IPPoolAddress, IPPoolMACClaim};
use vm_dhcp_core::kubevirt::{NetworkAttachmentDefinition, VirtualMachine};

use crate::nodesim::{AGENT_SELECTOR, NodeSim, NodeSpec, VmNetns};
use crate::proc::{Process, run_dir};
use crate::webhooks::{Replica, vm, webhooks};
use crate::{ControlPlane, TestNamespace};

const AGENT_SA: &str = "vm-dhcp-agent";
const AGENT_IMAGE: &str = "registry.local/vm-dhcp-agent:test";
const POOL: &str = "net-c";
const LEADER_LEASE: &str = "vm-dhcp-controllers";
/// The controllers' timings: short, so that a run takes minutes. The agents' Lease is short
/// enough for a standby to answer within [`DHCP_BOUND`] of the active agent's death (with the
/// default of 5 s it could not).
pub const LEAK_GRACE: Duration = Duration::from_secs(3);
pub const ADMISSION_WINDOW: Duration = Duration::from_secs(2);
const RESYNC: Duration = Duration::from_secs(5);
const AGENT_LEASE_SECONDS: u64 = 2;
const LEADER_LEASE_SECONDS: u64 = 4;
const LOST_NODE_GRACE_SECONDS: u64 = 3;
const AGENTS_PER_POOL: usize = 2;
/// The issue's bound on DHCP after an agent kill.
pub const DHCP_BOUND: Duration = Duration::from_secs(5);
/// How long the imposed outages last.
const RESTART_DOWN: Duration = Duration::from_secs(2);
const NOSPACE_FOR: Duration = Duration::from_secs(5);
const PARTITION_FOR: Duration = Duration::from_secs(12);
/// How long a kubelet takes to start a crashed container again (the aggregated apiserver
/// runs one replica here: its outage is this plus its start).
const KUBELET_RESTART_DELAY: Duration = Duration::from_secs(1);
/// A probe that has not recovered this long after the fault was lifted never will.
const GIVE_UP: Duration = Duration::from_secs(90);
/// Characters of violations shown in one cell of the table.
const MAX_CELL: usize = 400;
/// A successful probe this slow is shown in the table.
const SLOW: Duration = Duration::from_secs(1);
/// Load requests in flight at most (a hanging control plane would pile them up).
const MAX_IN_FLIGHT: u32 = 24;
/// Client-side deadline of one load request (longer than the webhook's timeout).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);

/// One fault of the suite.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    WebhookReplica,
    ControllerLeader,
    ActiveAgent,
    AggregatedApiserver,
    KubeApiserverRestart,
    EtcdRestart,
    AgentPartition,
    NodeLost,
    EtcdNoSpace,
}

impl Fault {
    pub const ALL: [Fault; 9] = [
        Fault::WebhookReplica,
        Fault::ControllerLeader,
        Fault::ActiveAgent,
        Fault::AggregatedApiserver,
        Fault::KubeApiserverRestart,
        Fault::EtcdRestart,
        Fault::AgentPartition,
        Fault::NodeLost,
        Fault::EtcdNoSpace,
    ];

    pub fn name(self) -> String {
        match self {
            Fault::WebhookReplica => "kill -9 webhook replica".into(),
            Fault::ControllerLeader => "kill -9 controller leader".into(),
            Fault::ActiveAgent => "kill -9 active agent".into(),
            Fault::AggregatedApiserver => "kill -9 aggregated apiserver".into(),
            Fault::KubeApiserverRestart => format!(
                "kube-apiserver kill -9, restart after {} s",
                RESTART_DOWN.as_secs()
            ),
            Fault::EtcdRestart => {
                format!("etcd kill -9, restart after {} s", RESTART_DOWN.as_secs())
            }
            Fault::AgentPartition => format!(
                "active agent cut from kube-apiserver for {} s",
                PARTITION_FOR.as_secs()
            ),
            Fault::NodeLost => "node of the active agent lost".into(),
            Fault::EtcdNoSpace => format!(
                "etcd disk full (NOSPACE alarm) for {} s",
                NOSPACE_FOR.as_secs()
            ),
        }
    }

    /// Parses a fault from a short name (`webhook`, `controller`, `agent`, `apiserver`,
    /// `kube-apiserver`, `etcd`, `partition`, `node`, `nospace`).
    pub fn parse(s: &str) -> Option<Fault> {
        Some(match s {
            "webhook" => Fault::WebhookReplica,
            "controller" => Fault::ControllerLeader,
            "agent" => Fault::ActiveAgent,
            "apiserver" => Fault::AggregatedApiserver,
            "kube-apiserver" => Fault::KubeApiserverRestart,
            "etcd" => Fault::EtcdRestart,
            "partition" => Fault::AgentPartition,
            "node" => Fault::NodeLost,
            "nospace" => Fault::EtcdNoSpace,
            _ => return None,
        })
    }
}

/// How big a run is.
#[derive(Clone, Debug)]
pub struct Config {
    /// VM creates per second while the load runs (as many deletes once `live` VMs exist).
    pub rate: f64,
    /// VMs kept alive by the load (the oldest is deleted when a create passes this).
    pub live: usize,
    /// Guests whose DHCP clients renew all along (their VMs are never deleted).
    pub guests: usize,
    /// Load before each fault, and after its recovery before the checks.
    pub settle: Duration,
    pub faults: Vec<Fault>,
}

/// When one probe saw the service whole again, from the fault's start: `Some(ZERO)` if it
/// never saw it broken, `None` if it did not recover within [`GIVE_UP`] of the lift.
#[derive(Clone, Copy, Debug, Default)]
pub struct Outage {
    pub back: Option<Duration>,
    /// Failed at least once.
    pub was_down: bool,
    /// The slowest successful probe (a request held while the control plane was away).
    pub slowest: Duration,
}

/// One row of the table.
#[derive(Clone, Debug)]
pub struct Row {
    pub fault: Fault,
    /// Everything whole again (every probe back), from the fault's start.
    pub recovered: Option<Duration>,
    /// When the fault ended (the process killed, the outage lifted), from its start.
    pub lifted: Duration,
    pub admission: Outage,
    pub dhcp: Outage,
    pub leader: Outage,
    pub agents: Outage,
    pub apiserver: Outage,
    pub requests: u64,
    pub failed: u64,
    /// Leases the renewing guests lost (their renewals unanswered until expiry).
    pub leases_lost: usize,
    /// Time until the store held exactly the live VMs' allocations once the load paused.
    pub swept: Option<Duration>,
    /// The longest any leak (an address object or claim whose MAC no live VM holds) lived
    /// during this fault's round, as the leak tracker sampled it.
    pub longest_leak: Duration,
    /// Empty when every invariant held.
    pub violations: Vec<String>,
}

impl Row {
    pub fn ok(&self) -> bool {
        self.violations.is_empty()
    }
}

fn secs(d: Duration) -> String {
    format!("{:.1} s", d.as_secs_f64())
}

fn outage_cell(o: &Outage) -> String {
    match (o.back, o.was_down) {
        (_, false) if o.slowest >= SLOW => format!("up (slowest {})", secs(o.slowest)),
        (_, false) => "up".into(),
        (Some(d), true) => secs(d),
        (None, true) => "never".into(),
    }
}

/// The table the suite prints (Markdown).
pub fn table(rows: &[Row]) -> String {
    let mut out = String::from(
        "| fault | time to recover | admission back | DHCP back | leader back | agents back | apiserver back | requests failed | guest leases lost | longest leak | invariants |\n\
         |---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        out.push_str(&row_line(r));
        out.push('\n');
    }
    out.push_str(
        "\nTimes from the fault's start until a probe went through after the last one that \
         failed (\"up\": none failed; \"slowest\": a probe held, not failed, that long). Admission must be back \
         within the webhook's timeout of the fault's end (for kube-apiserver and etcd \
         faults: of kube-apiserver ready again); DHCP within 5 s of an agent kill. \"apiserver\": ipamallocations listed \
         through kube-apiserver's aggregator. \"guest leases lost\": \
         renewing guests (leases of 20 s) whose renewals went unanswered until expiry. \"longest \
         leak\": the longest an address object or claim whose MAC no live VM holds lived \
         (sampled every 0.5 s; the bound is the webhook's timeout, the leak grace, a \
         controller resync and a second); once the load pauses, the store must hold \
         exactly the live VMs' allocations within that bound.\n",
    );
    out
}

fn row_line(r: &Row) -> String {
    let rec = r.recovered.map_or("never".to_string(), secs);
    let leak = secs(r.longest_leak);
    let inv = if r.ok() {
        "held".to_string()
    } else {
        let all = r.violations.join("; ");
        // The table stays readable; the whole list is in `Row::violations`.
        let cut: String = all.chars().take(MAX_CELL).collect();
        if cut.len() < all.len() {
            format!("VIOLATED: {cut}…")
        } else {
            format!("VIOLATED: {all}")
        }
    };
    format!(
        "| {} | {rec} | {} | {} | {} | {} | {} | {} of {} | {} | {leak} | {inv} |",
        r.fault.name(),
        outage_cell(&r.admission),
        outage_cell(&r.dhcp),
        outage_cell(&r.leader),
        outage_cell(&r.agents),
        outage_cell(&r.apiserver),
        r.failed,
        r.requests,
        r.leases_lost
    )
}

// ------------------------------------------------------------------------------ processes

struct Controller {
    proc: Process,
    identity: String,
}

fn start_controller(cp: &ControlPlane, ns: &str, identity: &str) -> Result<Controller> {
    let port = crate::free_port()?;
    let mut cmd = crate::controller_command(cp, ns, AGENT_SA, port);
    cmd.args([
        format!("--identity={identity}"),
        format!("--name=vm-dhcp-controller-{identity}"),
        format!("--lost-node-grace-seconds={LOST_NODE_GRACE_SECONDS}"),
        format!("--leak-grace-seconds={}", LEAK_GRACE.as_secs()),
        format!("--admission-window-seconds={}", ADMISSION_WINDOW.as_secs()),
        format!("--resync-seconds={}", RESYNC.as_secs()),
        format!("--agent-lease-duration-seconds={AGENT_LEASE_SECONDS}"),
        format!("--leader-election-lease-seconds={LEADER_LEASE_SECONDS}"),
        format!("--agents-per-pool={AGENTS_PER_POOL}"),
        format!("--image={AGENT_IMAGE}"),
    ]);
    let run = run_dir()?;
    let log = run.join(format!("chaos-controller-{ns}-{identity}.log"));
    let proc = Process::spawn("vm-dhcp-controller", cmd, &log, &run)?;
    Ok(Controller {
        proc,
        identity: identity.to_string(),
    })
}

struct Apiserver {
    proc: Process,
}

fn start_apiserver(
    cp: &ControlPlane,
    token_file: &std::path::Path,
    port: u16,
) -> Result<Apiserver> {
    let mut cmd = std::process::Command::new(crate::bins::vm_dhcp_binary());
    cmd.args([
        "apiserver".to_string(),
        format!("--kubeconfig={}", cp.kubeconfig_path.display()),
        "--bind-address=127.0.0.1".into(),
        format!("--secure-port={port}"),
        "--metrics-port=0".into(),
        format!("--agent-token-file={}", token_file.display()),
    ]);
    let run = run_dir()?;
    static N: AtomicU64 = AtomicU64::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let log = run.join(format!("chaos-apiserver-{n}.log"));
    let proc = Process::spawn("vm-dhcp-apiserver", cmd, &log, &run)?;
    Ok(Apiserver { proc })
}

/// Registers the aggregated API as a user's cluster has it: an APIService for
/// `dhcp.harvesterhci.io/v1alpha1` and its Service (ExternalName → localhost, the server's
/// port). The control plane is this test binary's own, so the cluster-wide APIService
/// disturbs no other test.
async fn register_apiservice(ns: &TestNamespace, port: u16) -> Result<()> {
    use k8s_openapi::api::core::v1::Service;
    use k8s_openapi::kube_aggregator::pkg::apis::apiregistration::v1::APIService;
    use kube::api::{Patch, PatchParams};
    let svc: Service = serde_json::from_value(json!({
        "metadata": {"name": "vm-dhcp-apiserver"},
        "spec": {"type": "ExternalName", "externalName": "localhost", "ports": [{"port": port}]}
    }))?;
    ns.api::<Service>()
        .create(&PostParams::default(), &svc)
        .await
        .context("the aggregated API's Service")?;
    // Without --tls-cert-file the server's certificate is self-signed.
    let apisvc: APIService = serde_json::from_value(json!({
        "metadata": {"name": "v1alpha1.dhcp.harvesterhci.io"},
        "spec": {"group": "dhcp.harvesterhci.io", "version": "v1alpha1",
                 "groupPriorityMinimum": 1000, "versionPriority": 15,
                 "insecureSkipTLSVerify": true,
                 "service": {"namespace": ns.name, "name": "vm-dhcp-apiserver", "port": port}}
    }))?;
    Api::<APIService>::all(ns.client.clone())
        .patch(
            "v1alpha1.dhcp.harvesterhci.io",
            &PatchParams::apply("vm-dhcp-chaos").force(),
            &Patch::Apply(&apisvc),
        )
        .await
        .context("the aggregated API's APIService")?;
    Ok(())
}

/// `ipamallocations` of the namespace listed through kube-apiserver's aggregator, as
/// `kubectl get ipamallocations` does.
async fn aggregated_list(client: &Client, ns: &str) -> bool {
    let path = format!("/apis/dhcp.harvesterhci.io/v1alpha1/namespaces/{ns}/ipamallocations");
    let Ok(req) = http::Request::get(path).body(Vec::new()) else {
        return false;
    };
    let Ok(Ok(body)) = tokio::time::timeout(Duration::from_secs(5), client.request_text(req)).await
    else {
        return false;
    };
    serde_json::from_str::<serde_json::Value>(&body).is_ok_and(|v| v["items"].is_array())
}

/// kube-apiserver's `/readyz` says ok.
async fn kube_ready(client: &Client) -> bool {
    let Ok(req) = http::Request::get("/readyz").body(Vec::new()) else {
        return false;
    };
    tokio::time::timeout(Duration::from_secs(3), client.request_text(req))
        .await
        .is_ok_and(|r| r.is_ok_and(|body| body.trim() == "ok"))
}

// ------------------------------------------------------------------------------------ load

#[derive(Default)]
struct Counters {
    requests: AtomicU64,
    failed: AtomicU64,
}

struct Load {
    counters: Arc<Counters>,
    paused: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    in_flight: Arc<Semaphore>,
    task: tokio::task::JoinHandle<()>,
}

impl Load {
    fn totals(&self) -> (u64, u64) {
        (
            self.counters.requests.load(Ordering::Relaxed),
            self.counters.failed.load(Ordering::Relaxed),
        )
    }

    /// Pauses the load and waits until no request of it is in flight.
    async fn pause(&self) {
        self.paused.store(true, Ordering::Relaxed);
        let _all = self.in_flight.acquire_many(MAX_IN_FLIGHT).await;
    }

    fn resume(&self) {
        self.paused.store(false, Ordering::Relaxed);
    }
}

fn allocation(vm: &VirtualMachine) -> Option<NicAllocation> {
    let text = vm.annotations().get(ALLOCATIONS_ANNOTATION)?;
    serde_json::from_str::<Vec<NicAllocation>>(text)
        .ok()?
        .into_iter()
        .next()
}

/// Creates `load-N` VMs at `cfg.rate` (each on a task of its own, so a slow request does not
/// slow the rate, at most [`MAX_IN_FLIGHT`] at once) and deletes the oldest once more than
/// `cfg.live` exist. A request that fails or passes [`REQUEST_TIMEOUT`] counts as failed; a
/// failed delete is tried again later.
fn start_load(ns: &TestNamespace, network: &str, cfg: &Config) -> Load {
    let counters = Arc::new(Counters::default());
    let paused = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let in_flight = Arc::new(Semaphore::new(MAX_IN_FLIGHT as usize));
    let vms: Api<VirtualMachine> = ns.api();
    let (c, p, s, sem) = (
        counters.clone(),
        paused.clone(),
        stop.clone(),
        in_flight.clone(),
    );
    let (ns_name, network, live, every) = (
        ns.name.clone(),
        network.to_string(),
        cfg.live,
        Duration::from_secs_f64(1.0 / cfg.rate.max(0.1)),
    );
    let task = tokio::spawn(async move {
        let alive: Arc<Mutex<VecDeque<String>>> = Arc::default();
        let mut seq = 0u64;
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        while !s.load(Ordering::Relaxed) {
            tick.tick().await;
            if p.load(Ordering::Relaxed) {
                continue;
            }
            let Ok(permit) = sem.clone().acquire_owned().await else {
                break;
            };
            let name = format!("load-{seq:05}");
            seq += 1;
            let (vms, c, alive) = (vms.clone(), c.clone(), alive.clone());
            let obj = vm(&ns_name, &name, &network);
            tokio::spawn(async move {
                let _permit = permit;
                c.requests.fetch_add(1, Ordering::Relaxed);
                let create =
                    tokio::time::timeout(REQUEST_TIMEOUT, vms.create(&PostParams::default(), &obj))
                        .await;
                if matches!(create, Ok(Ok(_))) {
                    lock(&alive).push_back(name);
                } else {
                    c.failed.fetch_add(1, Ordering::Relaxed);
                }
                let old = {
                    let mut a = lock(&alive);
                    if a.len() > live { a.pop_front() } else { None }
                };
                if let Some(old) = old {
                    c.requests.fetch_add(1, Ordering::Relaxed);
                    let del = tokio::time::timeout(
                        REQUEST_TIMEOUT,
                        vms.delete(&old, &DeleteParams::default()),
                    )
                    .await;
                    match del {
                        Ok(Ok(_)) => {}
                        Ok(Err(kube::Error::Api(e))) if e.code == 404 => {}
                        _ => {
                            c.failed.fetch_add(1, Ordering::Relaxed);
                            lock(&alive).push_front(old);
                        }
                    }
                }
            });
        }
    });
    Load {
        counters,
        paused,
        stop,
        in_flight,
        task,
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

// ------------------------------------------------------------------------------ invariants

/// The store against the VMs: no address or MAC twice, every admitted VM's allocation
/// durable (address object and claim naming each other and the VM's MAC), and (`exact`)
/// nothing held by no VM. Violations, described.
async fn check(ns: &TestNamespace, exact: bool) -> Result<Vec<String>> {
    let lp = ListParams::default().labels(&format!("{}={POOL}", vm_dhcp_core::store::POOL_LABEL));
    let vms = ns
        .api::<VirtualMachine>()
        .list(&ListParams::default())
        .await?
        .items;
    let addrs = ns.api::<IPPoolAddress>().list(&lp).await?.items;
    let claims = ns.api::<IPPoolMACClaim>().list(&lp).await?.items;
    let mut bad = Vec::new();
    let mut vm_ip: BTreeMap<String, String> = BTreeMap::new();
    let mut vm_mac: BTreeMap<String, String> = BTreeMap::new();
    let mut allocs = Vec::new();
    for v in vms
        .iter()
        .filter(|v| v.metadata.deletion_timestamp.is_none())
    {
        let Some(a) = allocation(v) else {
            bad.push(format!("{} admitted without an allocation", v.name_any()));
            continue;
        };
        if let Some(other) = vm_ip.insert(a.ip_address.clone(), v.name_any()) {
            bad.push(format!(
                "{} given to {other} and {}",
                a.ip_address,
                v.name_any()
            ));
        }
        let mac = a.mac_address.to_lowercase();
        if let Some(other) = vm_mac.insert(mac.clone(), v.name_any()) {
            bad.push(format!("MAC {mac} on {other} and {}", v.name_any()));
        }
        allocs.push((v.name_any(), a));
    }
    let mut by_ip: HashMap<&str, &IPPoolAddress> = HashMap::new();
    for a in &addrs {
        if by_ip.insert(a.spec.address.as_str(), a).is_some() {
            bad.push(format!("{} has two address objects", a.spec.address));
        }
    }
    let mut macs_held: BTreeMap<String, Vec<&str>> = BTreeMap::new();
    for a in &addrs {
        macs_held
            .entry(a.spec.mac_address.to_lowercase())
            .or_default()
            .push(&a.spec.address);
    }
    for (mac, ips) in &macs_held {
        if ips.len() > 1 {
            bad.push(format!("MAC {mac} holds {ips:?}"));
        }
    }
    let mut claim_of: HashMap<String, &IPPoolMACClaim> = HashMap::new();
    for c in &claims {
        if claim_of
            .insert(c.spec.mac_address.to_lowercase(), c)
            .is_some()
        {
            bad.push(format!("MAC {} has two claims", c.spec.mac_address));
        }
    }
    let mut claimed_ips = BTreeSet::new();
    for c in &claims {
        if !claimed_ips.insert(c.spec.address.clone()) {
            bad.push(format!("{} named by two claims", c.spec.address));
        }
    }
    for (name, a) in &allocs {
        let mac = a.mac_address.to_lowercase();
        match by_ip.get(a.ip_address.as_str()) {
            Some(obj) if obj.spec.mac_address.to_lowercase() == mac => {}
            Some(obj) => bad.push(format!(
                "{name}'s {} is held by MAC {}",
                a.ip_address, obj.spec.mac_address
            )),
            None => bad.push(format!(
                "{name}'s {} lost (no address object)",
                a.ip_address
            )),
        }
        match claim_of.get(&mac) {
            Some(c) if c.spec.address == a.ip_address => {}
            Some(c) => bad.push(format!("{name}'s claim names {}", c.spec.address)),
            None => bad.push(format!("{name}'s MAC {mac} lost (no claim)")),
        }
    }
    if exact {
        let leaked: Vec<&str> = addrs
            .iter()
            .filter(|a| !vm_mac.contains_key(&a.spec.mac_address.to_lowercase()))
            .map(|a| a.spec.address.as_str())
            .collect();
        if !leaked.is_empty() {
            bad.push(format!(
                "{} address object(s) held by no VM: {leaked:?}",
                leaked.len()
            ));
        }
        let orphans: Vec<&str> = claims
            .iter()
            .filter(|c| !vm_mac.contains_key(&c.spec.mac_address.to_lowercase()))
            .map(|c| c.spec.mac_address.as_str())
            .collect();
        if !orphans.is_empty() {
            bad.push(format!(
                "{} claim(s) held by no VM: {orphans:?}",
                orphans.len()
            ));
        }
    }
    Ok(bad)
}

// ---------------------------------------------------------------------------------- probes

/// Runs `probe` again and again from the fault's start until it succeeds after `lifted` has
/// been set (the fault is over) or [`GIVE_UP`] after that: when it was whole again.
async fn watch_outage<F, Fut>(
    start: Instant,
    lifted: tokio::sync::watch::Receiver<Option<Instant>>,
    pause: Duration,
    mut probe: F,
) -> Outage
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let mut was_down = false;
    let mut slowest = Duration::ZERO;
    let mut ok_since: Option<Instant> = None;
    loop {
        let tried = Instant::now();
        let ok = probe().await;
        let now = Instant::now();
        if ok {
            slowest = slowest.max(now - tried);
            // Whole again when a request went through (it may have been held meanwhile).
            ok_since.get_or_insert(now);
        } else {
            was_down = true;
            ok_since = None;
        }
        let lift = *lifted.borrow();
        if let Some(lift) = lift {
            if let Some(since) = ok_since
                && now >= lift
            {
                let back = if was_down {
                    since.saturating_duration_since(start)
                } else {
                    Duration::ZERO
                };
                return Outage {
                    back: Some(back),
                    was_down,
                    slowest,
                };
            }
            if now > lift + GIVE_UP {
                return Outage {
                    back: None,
                    was_down,
                    slowest,
                };
            }
        }
        tokio::time::sleep(pause).await;
    }
}

// ------------------------------------------------------------------------------- the world

struct World {
    cp: &'static ControlPlane,
    ns: TestNamespace,
    replicas: Vec<Replica>,
    /// The replicas' shared port and the webhook configurations' timeoutSeconds.
    webhook_port: u16,
    admission_bound: Duration,
    sim: NodeSim,
    controllers: Vec<Controller>,
    restarts: u32,
    apiserver: Apiserver,
    /// The aggregated apiserver's port (kept across its restarts, as a pod's is).
    apiserver_port: u16,
    token_file: PathBuf,
    network: String,
    agent_lease: String,
    /// The pool's server IP, which only the active agent holds.
    server_ip: String,
    /// The DHCP probe: a guest with a pinned VM's MAC.
    probe: VmNetns,
    /// Guests renewing all along, with the address their VM holds.
    guests: Vec<(VmNetns, Process, String)>,
    nodes: Vec<String>,
}

async fn create_until_admitted(
    vms: &Api<VirtualMachine>,
    obj: &VirtualMachine,
) -> Result<VirtualMachine> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match vms.create(&PostParams::default(), obj).await {
            Ok(v) => return Ok(v),
            Err(kube::Error::Api(e)) if e.code == 409 => {
                return Ok(vms.get(&obj.name_any()).await?);
            }
            Err(e) if Instant::now() > deadline => {
                bail!("{} never admitted: {e}", obj.name_any())
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// The webhook replicas' port and timeout, from the configuration registered for `ns`.
async fn webhook_endpoint(ns: &TestNamespace) -> Result<(u16, Duration)> {
    let config = Api::<MutatingWebhookConfiguration>::all(ns.client.clone())
        .get(&ns.name)
        .await
        .context("the mutating webhook configuration")?;
    let hook = config
        .webhooks
        .as_ref()
        .and_then(|w| w.first())
        .context("a webhook configuration without webhooks")?;
    let url = hook
        .client_config
        .url
        .as_deref()
        .context("a webhook without a URL")?;
    let port = url
        .trim_start_matches("https://")
        .split(['/', ':'])
        .nth(1)
        .and_then(|p| p.parse().ok())
        .with_context(|| format!("no port in {url}"))?;
    let timeout = hook.timeout_seconds.unwrap_or(10).max(1) as u64;
    Ok((port, Duration::from_secs(timeout)))
}

impl World {
    async fn new(cfg: &Config) -> Result<World> {
        let cp = ControlPlane::shared().await;
        let ns = cp.namespace("chaos").await;
        let replicas = webhooks(cp, &ns, 2).await;
        crate::webhooks::wait_for_webhooks(&ns).await;
        let (webhook_port, admission_bound) = webhook_endpoint(&ns).await?;
        crate::rbac::agent_service_account(&ns, AGENT_SA).await;
        let reader = crate::rbac::lease_reader_token(&ns).await;
        let token_file = run_dir()?.join(format!("chaos-{}-reader.token", ns.name));
        std::fs::write(&token_file, reader)?;
        let cn = format!("cc{}", ns.name.rsplit('-').next().unwrap_or("0"));
        let nodes = ["n1", "n2", "n3"];
        let specs = nodes
            .iter()
            .map(|n| NodeSpec::new(n).label(&format!("network.harvesterhci.io/{cn}"), "true"))
            .collect();
        let programs =
            HashMap::from([("vm-dhcp-agent".to_string(), crate::bins::vm_dhcp_binary())]);
        let sim = NodeSim::start(cp, &ns.name, specs, programs).await?;
        let network = format!("{}/{POOL}", ns.name);
        let nad: NetworkAttachmentDefinition = serde_json::from_value(json!({
            "apiVersion": "k8s.cni.cncf.io/v1", "kind": "NetworkAttachmentDefinition",
            "metadata": {"name": POOL, "namespace": ns.name,
                         "labels": {"network.harvesterhci.io/clusternetwork": cn}},
            "spec": {"config": json!({"cniVersion": "0.3.1", "name": POOL, "type": "bridge",
                     "bridge": format!("{cn}-br"), "promiscMode": true, "vlan": 0, "ipam": {}}).to_string()}
        }))?;
        ns.api::<NetworkAttachmentDefinition>()
            .create(&PostParams::default(), &nad)
            .await?;
        // Leases of 20 s: the guests renew every 10 s.
        let pool: IPPool = serde_json::from_value(json!({
            "apiVersion": "network.harvesterhci.io/v1alpha1", "kind": "IPPool",
            "metadata": {"name": POOL, "namespace": ns.name},
            "spec": {"networkName": network, "ipv4Config": {"cidr": "10.77.0.0/22",
                     "pool": {"start": "10.77.0.10", "end": "10.77.3.250"}, "leaseTime": 20}}
        }))?;
        let server_ip = ns
            .api::<IPPool>()
            .create(&PostParams::default(), &pool)
            .await
            .context("create the pool")?
            .spec
            .ipv4_config
            .map(|c| c.server_ip)
            .filter(|ip| !ip.is_empty())
            .context("the mutating webhook gave the pool no serverIP")?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while !replicas.iter().all(|r| r.webhook.knows_network(&network)) {
            if Instant::now() > deadline {
                bail!("the webhooks never saw the pool");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let controllers = vec![
            start_controller(cp, &ns.name, "c0")?,
            start_controller(cp, &ns.name, "c1")?,
        ];
        let port = crate::free_port()?;
        let apiserver = start_apiserver(cp, &token_file, port)?;
        register_apiservice(&ns, port).await?;
        // Pinned VMs: the probe's and the renewing guests'.
        let vms: Api<VirtualMachine> = ns.api();
        let mut pinned = Vec::new();
        for i in 0..=cfg.guests {
            let v = create_until_admitted(&vms, &vm(&ns.name, &format!("pinned-{i}"), &network))
                .await?;
            pinned.push(allocation(&v).context("a pinned VM without an allocation")?);
        }
        let probe = sim
            .attach_vm_with_mac(&network, Some(&pinned[0].mac_address))
            .await?;
        let agent_lease = vm_dhcp_core::controller::lease_name(&ns.name, POOL);
        let mut world = World {
            cp,
            ns,
            replicas,
            webhook_port,
            admission_bound,
            sim,
            controllers,
            restarts: 2,
            apiserver,
            apiserver_port: port,
            token_file,
            network: network.clone(),
            agent_lease,
            server_ip,
            probe,
            guests: Vec::new(),
            nodes: nodes.iter().map(|s| s.to_string()).collect(),
        };
        world.active_agent(Duration::from_secs(90)).await?;
        let deadline = Instant::now() + Duration::from_secs(60);
        while !aggregated_list(&world.client(), &world.ns.name).await {
            if Instant::now() > deadline {
                bail!(
                    "ipamallocations never listed through the aggregator:\n{}",
                    world.apiserver.proc.log_tail(20)
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        if !world.dhcp_once().await {
            // The first agent may still be loading its table.
            let deadline = Instant::now() + Duration::from_secs(30);
            while !world.dhcp_once().await {
                if Instant::now() > deadline {
                    bail!(
                        "the probe guest never got a lease before any fault:\n{}",
                        world.sim.sim_log()
                    );
                }
            }
        }
        let busybox = crate::bins::busybox();
        // The guests configure what they obtain, as a VM does: a renewal's answer goes to
        // the leased address (RFC 2131 §4.1), which must be there to receive it.
        let script = run_dir()?.join(format!("chaos-{}-udhcpc.sh", world.ns.name));
        std::fs::write(
            &script,
            "#!/bin/sh\ncase \"$1\" in\n  deconfig) ip addr flush dev \"$interface\" ;;\n  \
             bound|renew) ip addr replace \"$ip/${mask:-32}\" dev \"$interface\" ;;\nesac\nexit 0\n",
        )?;
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755))?;
        }
        let script = script.display().to_string();
        for a in &pinned[1..] {
            let guest = world
                .sim
                .attach_vm_with_mac(&network, Some(&a.mac_address))
                .await?;
            let client = guest.spawn(
                "udhcpc",
                &busybox,
                &[
                    "udhcpc",
                    "-i",
                    &guest.ifname,
                    "-f",
                    "-t",
                    "0",
                    "-T",
                    "1",
                    "-s",
                    &script,
                ],
            )?;
            world.guests.push((guest, client, a.ip_address.clone()));
        }
        Ok(world)
    }

    fn client(&self) -> Client {
        self.ns.client.clone()
    }

    /// The pool's active agent pod (holder of the pool's Lease, running), waiting up to
    /// `within`.
    async fn active_agent(&self, within: Duration) -> Result<String> {
        let leases: Api<Lease> = Api::namespaced(self.client(), &self.ns.name);
        let deadline = Instant::now() + within;
        loop {
            if let Ok(Some(l)) = leases.get_opt(&self.agent_lease).await
                && let Some(h) = l
                    .spec
                    .and_then(|s| s.holder_identity)
                    .filter(|h| !h.is_empty())
                && self.sim.pid(&h, "agent").is_some()
            {
                return Ok(h);
            }
            if Instant::now() > deadline {
                bail!("no active agent within {within:?}:\n{}", self.sim.sim_log());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The agent pods whose `eth1` holds the pool's server IP (and is up): the active ones.
    async fn holders_of_server_ip(&self) -> Result<Vec<String>> {
        let pods = self
            .ns
            .api::<Pod>()
            .list(&ListParams::default().labels(AGENT_SELECTOR))
            .await?;
        let mut holders = Vec::new();
        for p in pods.items {
            let name = p.name_any();
            if let Some(netns) = self.sim.pod_netns(&name)
                && crate::netns_holds_ip(&netns, "eth1", &self.server_ip).await
            {
                holders.push(name);
            }
        }
        Ok(holders)
    }

    /// A fresh DORA of the probe guest (one DISCOVER, a second to answer) succeeds.
    async fn dhcp_once(&self) -> bool {
        dhcp_once(&self.probe).await
    }

    /// How many times the guests' DHCP clients lost their lease (no answer to their
    /// renewals before it expired), in all.
    fn guest_leases_lost(&self) -> usize {
        self.guests
            .iter()
            .map(|(_, client, _)| {
                std::fs::read_to_string(&client.log)
                    .unwrap_or_default()
                    .matches("lease lost")
                    .count()
            })
            .sum()
    }

    /// The guests' DHCP clients only ever obtained their VM's address.
    fn guests_kept_their_addresses(&self) -> Vec<String> {
        let mut bad = Vec::new();
        for (guest, client, ip) in &self.guests {
            let log = std::fs::read_to_string(&client.log).unwrap_or_default();
            for line in log.lines() {
                if let Some(rest) = line.split("lease of ").nth(1) {
                    let got = rest.split_whitespace().next().unwrap_or_default();
                    if got != ip {
                        bad.push(format!(
                            "guest {} (holding {ip}) was given {got}",
                            guest.mac
                        ));
                    }
                }
            }
        }
        bad.sort();
        bad.dedup();
        bad
    }

    /// Starts a webhook replica again on the shared port (a kubelet restarting the crashed
    /// pod) and waits until its cache knows the pool.
    async fn restart_replica(&mut self) -> Result<()> {
        let cert = self
            .cp
            .serving_ca
            .serving("vm-dhcp-webhook", &["127.0.0.1", "localhost"])?;
        let (cp, port) = (self.cp, self.webhook_port);
        let (replica, _) = tokio::task::spawn_blocking(move || Replica::start(cp, port, cert))
            .await
            .context("restarting the webhook replica")?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while !replica.webhook.knows_network(&self.network) {
            if Instant::now() > deadline {
                bail!("the restarted webhook replica never saw the pool");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.replicas.push(replica);
        Ok(())
    }

    /// Injects `fault`, lifts it as its story says, and watches every probe until the system
    /// is whole again. Returns the row without load counts, sweep and store checks.
    async fn inject(&mut self, fault: Fault) -> Result<Row> {
        let (lift_tx, lift_rx) = tokio::sync::watch::channel(None::<Instant>);
        let start = Instant::now();
        let probes = self.spawn_probes(start, lift_rx);
        // What the fault is, and when it ends.
        let mut violations = Vec::new();
        match fault {
            Fault::WebhookReplica => {
                let mut dead = self.replicas.remove(0);
                dead.kill();
                lift_tx.send_replace(Some(Instant::now()));
            }
            Fault::ControllerLeader => {
                let leader = self.leader().await.context("no controller leads")?;
                let i = self
                    .controllers
                    .iter()
                    .position(|c| c.identity == leader)
                    .context("the leader is none of ours")?;
                self.controllers[i].proc.kill();
                lift_tx.send_replace(Some(Instant::now()));
            }
            Fault::ActiveAgent => {
                let agent = self.active_agent(Duration::from_secs(30)).await?;
                let pid = self.sim.pid(&agent, "agent").context("agent pid")?;
                // SAFETY: kill(2) on the agent process the simulator started for this run.
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                lift_tx.send_replace(Some(Instant::now()));
            }
            Fault::AggregatedApiserver => {
                self.apiserver.proc.kill();
                lift_tx.send_replace(Some(Instant::now()));
                // The kubelet notices the crash and starts the container again, same port.
                tokio::time::sleep(KUBELET_RESTART_DELAY).await;
                self.apiserver = start_apiserver(self.cp, &self.token_file, self.apiserver_port)?;
            }
            Fault::KubeApiserverRestart | Fault::EtcdRestart => {
                let (name, port) = if fault == Fault::EtcdRestart {
                    ("etcd", self.cp.etcd_port())
                } else {
                    ("kube-apiserver", self.cp.apiserver_port)
                };
                self.cp.restart_component(name, RESTART_DOWN, port).await?;
                self.wait_kube_ready().await?;
                lift_tx.send_replace(Some(Instant::now()));
            }
            Fault::AgentPartition => {
                let agent = self.active_agent(Duration::from_secs(30)).await?;
                self.sim.partition_pod(&agent)?;
                tokio::time::sleep(PARTITION_FOR).await;
                self.sim.heal_pod(&agent)?;
                lift_tx.send_replace(Some(Instant::now()));
            }
            Fault::NodeLost => {
                let agent = self.active_agent(Duration::from_secs(30)).await?;
                let node = self
                    .ns
                    .api::<Pod>()
                    .get(&agent)
                    .await?
                    .spec
                    .and_then(|s| s.node_name)
                    .context("the agent's node")?;
                let short = self
                    .nodes
                    .iter()
                    .find(|n| self.sim.node_name(n) == node)
                    .cloned()
                    .context("the agent's node is none of ours")?;
                self.sim.lose_node(&short).await?;
                // The node stays lost until every probe is back (the controller must
                // replace its agent); then it is restored below.
                lift_tx.send_replace(Some(Instant::now()));
                let row = self.finish(fault, start, probes, violations).await;
                self.sim.restore_node(&short).await?;
                return Ok(row);
            }
            Fault::EtcdNoSpace => {
                let etcd = SocketAddr::from(([127, 0, 0, 1], self.cp.etcd_port()));
                etcd_alarm(etcd, "ACTIVATE").await?;
                tokio::time::sleep(NOSPACE_FOR).await;
                // Writes were refused all along, not just slow.
                let refused = self
                    .ns
                    .api::<VirtualMachine>()
                    .create(
                        &PostParams::default(),
                        &vm(&self.ns.name, "nospace-probe", &self.network),
                    )
                    .await;
                if refused.is_ok() {
                    violations.push("a VM was admitted while etcd had no space".to_string());
                    let _ = self
                        .ns
                        .api::<VirtualMachine>()
                        .delete("nospace-probe", &DeleteParams::default())
                        .await;
                }
                etcd_alarm(etcd, "DEACTIVATE").await?;
                self.wait_kube_ready().await?;
                lift_tx.send_replace(Some(Instant::now()));
            }
        }
        let lifted_at = (*lift_tx.borrow()).unwrap_or(start);
        let mut row = self.finish(fault, start, probes, violations).await;
        row.lifted = lifted_at - start;
        // What a kubelet does for a killed pod: start it again (the webhook replica after the
        // measure, so the survivor's takeover was what was measured).
        match fault {
            Fault::WebhookReplica => self.restart_replica().await?,
            Fault::ControllerLeader => {
                let dead: Vec<usize> = self
                    .controllers
                    .iter_mut()
                    .enumerate()
                    .filter_map(|(i, c)| c.proc.exited().map(|_| i))
                    .collect();
                for i in dead {
                    let identity = format!("c{}", self.restarts);
                    self.restarts += 1;
                    self.controllers[i] = start_controller(self.cp, &self.ns.name, &identity)?;
                }
            }
            _ => {}
        }
        Ok(row)
    }

    /// Waits for the probes, then judges the bounds.
    async fn finish(
        &self,
        fault: Fault,
        start: Instant,
        probes: Probes,
        mut violations: Vec<String>,
    ) -> Row {
        let (admission, dhcp, leader, agents, apiserver) = tokio::join!(
            probes.admission,
            probes.dhcp,
            probes.leader,
            probes.agents,
            probes.apiserver
        );
        let [admission, dhcp, leader, agents, apiserver] =
            [admission, dhcp, leader, agents, apiserver].map(|r| r.unwrap_or_default());
        let all = [admission, dhcp, leader, agents, apiserver];
        let recovered = all
            .iter()
            .map(|o| o.back)
            .try_fold(Duration::ZERO, |m, b| b.map(|b| m.max(b)));
        for (what, o) in [
            ("admission", admission),
            ("DHCP", dhcp),
            ("the leader", leader),
            ("the agents", agents),
            ("the aggregated apiserver", apiserver),
        ] {
            if o.back.is_none() {
                violations.push(format!(
                    "{what} not back within {} s of the fault's end",
                    GIVE_UP.as_secs()
                ));
            }
        }
        let lifted = probes.lifted.borrow().unwrap_or(start) - start;
        if let Some(back) = admission.back
            && admission.was_down
            && back.saturating_sub(lifted) > self.admission_bound
        {
            violations.push(format!(
                "admission back {} after the fault's end, over the webhook's timeout of {} s",
                secs(back.saturating_sub(lifted)),
                self.admission_bound.as_secs()
            ));
        }
        if fault == Fault::ActiveAgent
            && let Some(back) = dhcp.back
            && back > DHCP_BOUND
        {
            violations.push(format!(
                "DHCP back {} after the agent's kill, over {} s",
                secs(back),
                DHCP_BOUND.as_secs()
            ));
        }
        Row {
            fault,
            recovered,
            lifted,
            admission,
            dhcp,
            leader,
            agents,
            apiserver,
            requests: 0,
            failed: 0,
            leases_lost: 0,
            swept: None,
            longest_leak: Duration::ZERO,
            violations,
        }
    }

    async fn wait_kube_ready(&self) -> Result<()> {
        let client = self.client();
        let deadline = Instant::now() + Duration::from_secs(120);
        while !kube_ready(&client).await {
            if Instant::now() > deadline {
                bail!(
                    "kube-apiserver not ready within 120 s:\n{}",
                    self.cp.logs(30)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(())
    }

    async fn leader(&self) -> Option<String> {
        leader_of(&self.client(), &self.ns.name).await
    }

    fn spawn_probes(
        &self,
        start: Instant,
        lifted: tokio::sync::watch::Receiver<Option<Instant>>,
    ) -> Probes {
        let fast = Duration::from_millis(100);
        // Admission: a VM admitted with an allocation (then deleted).
        let admission = {
            let (vms, ns, network) = (
                self.ns.api::<VirtualMachine>(),
                self.ns.name.clone(),
                self.network.clone(),
            );
            let timeout = self.admission_bound + Duration::from_secs(2);
            tokio::spawn(watch_outage(start, lifted.clone(), fast, move || {
                let (vms, ns, network) = (vms.clone(), ns.clone(), network.clone());
                async move {
                    static N: AtomicU64 = AtomicU64::new(0);
                    let name = format!("probe-{}", N.fetch_add(1, Ordering::Relaxed));
                    let created = tokio::time::timeout(
                        timeout,
                        vms.create(&PostParams::default(), &vm(&ns, &name, &network)),
                    )
                    .await;
                    let ok = matches!(&created, Ok(Ok(v)) if allocation(v).is_some());
                    if ok {
                        let _ = tokio::time::timeout(
                            REQUEST_TIMEOUT,
                            vms.delete(&name, &DeleteParams::default()),
                        )
                        .await;
                    }
                    ok
                }
            }))
        };
        // DHCP: the probe guest's fresh DORA (its namespace is the world's, shared by
        // reference through a clone of its name).
        let dhcp = {
            let probe = VmRef {
                name: self.probe.name.clone(),
                ifname: self.probe.ifname.clone(),
            };
            tokio::spawn(watch_outage(start, lifted.clone(), fast, move || {
                let probe = probe.clone();
                async move { probe.dhcp_once().await }
            }))
        };
        let leader = {
            let (client, ns) = (self.client(), self.ns.name.clone());
            let alive: Vec<(String, u32)> = self
                .controllers
                .iter()
                .map(|c| (c.identity.clone(), c.proc.id()))
                .collect();
            let alive = Arc::new(alive);
            tokio::spawn(watch_outage(start, lifted.clone(), fast, move || {
                let (client, ns, alive) = (client.clone(), ns.clone(), alive.clone());
                async move {
                    match leader_of(&client, &ns).await {
                        Some(h) => alive.iter().any(|(id, pid)| {
                            *id == h && std::path::Path::new(&format!("/proc/{pid}")).exists()
                        }),
                        None => false,
                    }
                }
            }))
        };
        let agents = {
            let (pods, nodes) = (self.ns.api::<Pod>(), Api::<Node>::all(self.client()));
            tokio::spawn(watch_outage(start, lifted.clone(), fast, move || {
                let (pods, nodes) = (pods.clone(), nodes.clone());
                async move { ready_agents(&pods, &nodes).await >= AGENTS_PER_POOL }
            }))
        };
        let apiserver = {
            let (client, ns) = (self.client(), self.ns.name.clone());
            tokio::spawn(watch_outage(start, lifted.clone(), fast, move || {
                let (client, ns) = (client.clone(), ns.clone());
                async move { aggregated_list(&client, &ns).await }
            }))
        };
        Probes {
            admission,
            dhcp,
            leader,
            agents,
            apiserver,
            lifted,
        }
    }
}

struct Probes {
    admission: tokio::task::JoinHandle<Outage>,
    dhcp: tokio::task::JoinHandle<Outage>,
    leader: tokio::task::JoinHandle<Outage>,
    agents: tokio::task::JoinHandle<Outage>,
    apiserver: tokio::task::JoinHandle<Outage>,
    lifted: tokio::sync::watch::Receiver<Option<Instant>>,
}

/// A guest namespace by name (the [`VmNetns`] that owns it stays with the world).
#[derive(Clone)]
struct VmRef {
    name: String,
    ifname: String,
}

impl VmRef {
    async fn dhcp_once(&self) -> bool {
        let out = tokio::process::Command::new("ip")
            .args(["netns", "exec", &self.name, &crate::bins::busybox()])
            .args([
                "udhcpc",
                "-i",
                &self.ifname,
                "-f",
                "-n",
                "-q",
                "-t",
                "1",
                "-T",
                "1",
                "-s",
                "/bin/true",
            ])
            .kill_on_drop(true)
            .output()
            .await;
        out.is_ok_and(|o| o.status.success())
    }
}

async fn dhcp_once(vm: &VmNetns) -> bool {
    VmRef {
        name: vm.name.clone(),
        ifname: vm.ifname.clone(),
    }
    .dhcp_once()
    .await
}

async fn leader_of(client: &Client, ns: &str) -> Option<String> {
    let leases: Api<Lease> = Api::namespaced(client.clone(), ns);
    tokio::time::timeout(Duration::from_secs(3), leases.get_opt(LEADER_LEASE))
        .await
        .ok()?
        .ok()
        .flatten()
        .and_then(|l| l.spec?.holder_identity)
        .filter(|h| !h.is_empty())
}

/// Agent pods Ready (as their status says) on Ready nodes, not being deleted.
async fn ready_agents(pods: &Api<Pod>, nodes: &Api<Node>) -> usize {
    let (Ok(Ok(pods)), Ok(Ok(nodes))) = (
        tokio::time::timeout(
            Duration::from_secs(3),
            pods.list(&ListParams::default().labels(AGENT_SELECTOR)),
        )
        .await,
        tokio::time::timeout(Duration::from_secs(3), nodes.list(&ListParams::default())).await,
    ) else {
        return 0;
    };
    let ready = |conditions: Option<Vec<(String, String)>>| {
        conditions.is_some_and(|cs| cs.iter().any(|(t, s)| t == "Ready" && s == "True"))
    };
    let ready_nodes: BTreeSet<String> = nodes
        .items
        .iter()
        .filter(|n| {
            ready(
                n.status
                    .as_ref()
                    .and_then(|s| s.conditions.as_ref())
                    .map(|cs| {
                        cs.iter()
                            .map(|c| (c.type_.clone(), c.status.clone()))
                            .collect()
                    }),
            )
        })
        .map(|n| n.name_any())
        .collect();
    pods.items
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter(|p| {
            p.spec
                .as_ref()
                .and_then(|s| s.node_name.as_ref())
                .is_some_and(|n| ready_nodes.contains(n))
        })
        .filter(|p| {
            ready(
                p.status
                    .as_ref()
                    .and_then(|s| s.conditions.as_ref())
                    .map(|cs| {
                        cs.iter()
                            .map(|c| (c.type_.clone(), c.status.clone()))
                            .collect()
                    }),
            )
        })
        .count()
}

impl Drop for World {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for c in &self.controllers {
                eprintln!(
                    "----- controller {} -----\n{}",
                    c.identity,
                    c.proc.log_tail(40)
                );
            }
        }
    }
}

/// etcd's NOSPACE alarm through its HTTP gateway (what a full disk raises: every write is
/// refused with "database space exceeded" until it is disarmed).
async fn etcd_alarm(etcd: SocketAddr, action: &str) -> Result<()> {
    let status = etcd_post(etcd, "/v3/maintenance/status", "{}").await?;
    let member = status["header"]["member_id"]
        .as_str()
        .map(str::to_string)
        .or_else(|| {
            status["header"]["member_id"]
                .as_u64()
                .map(|m| m.to_string())
        })
        .context("etcd status without a member id")?;
    let body = json!({"action": action, "memberID": member, "alarm": "NOSPACE"}).to_string();
    let answer = etcd_post(etcd, "/v3/maintenance/alarm", &body).await?;
    if action == "ACTIVATE" && answer["alarms"].as_array().is_none_or(|a| a.is_empty()) {
        bail!("etcd did not raise the alarm: {answer}");
    }
    Ok(())
}

async fn etcd_post(etcd: SocketAddr, path: &str, body: &str) -> Result<serde_json::Value> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(etcd).await?;
    s.write_all(
        format!(
            "POST {path} HTTP/1.0\r\nHost: {etcd}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )
    .await?;
    let mut text = String::new();
    s.read_to_string(&mut text).await?;
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    if !head.starts_with("HTTP/1.0 200") && !head.starts_with("HTTP/1.1 200") {
        bail!("etcd {path}: {head}\n{body}");
    }
    serde_json::from_str(body).with_context(|| format!("etcd {path}: {body}"))
}

// ------------------------------------------------------------------------------- leaks

/// A leak the tracker saw: what it is, when it was first seen, in which round (fault).
type Leak = (String, Instant, u64);

/// Samples the store every 0.5 s for leaks (address objects and claims whose MAC no live
/// VM holds, by object uid) and records how long each lived, for the round (fault) in
/// which it appeared.
struct LeakTracker {
    /// Leaks seen and not yet gone, by uid.
    open: Arc<Mutex<HashMap<String, Leak>>>,
    /// The longest life of a leak gone, per round.
    longest: Arc<Mutex<HashMap<u64, (Duration, String)>>>,
    round: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl LeakTracker {
    fn start(ns: &TestNamespace) -> LeakTracker {
        let open: Arc<Mutex<HashMap<String, Leak>>> = Arc::default();
        let longest: Arc<Mutex<HashMap<u64, (Duration, String)>>> = Arc::default();
        let round = Arc::new(AtomicU64::new(0));
        let (o, l, r) = (open.clone(), longest.clone(), round.clone());
        let (vms, addrs, claims) = (
            ns.api::<VirtualMachine>(),
            ns.api::<IPPoolAddress>(),
            ns.api::<IPPoolMACClaim>(),
        );
        let task = tokio::spawn(async move {
            let lp = ListParams::default()
                .labels(&format!("{}={POOL}", vm_dhcp_core::store::POOL_LABEL));
            loop {
                tokio::time::sleep(Duration::from_millis(500)).await;
                let sample = async {
                    // Store first, VMs second: an allocation made in between has its VM
                    // listed (or is a leak for real).
                    let a = addrs.list(&lp).await.ok()?.items;
                    let c = claims.list(&lp).await.ok()?.items;
                    let v = vms.list(&ListParams::default()).await.ok()?.items;
                    Some((a, c, v))
                };
                let Ok(Some((a, c, v))) =
                    tokio::time::timeout(Duration::from_secs(5), sample).await
                else {
                    continue;
                };
                let live: BTreeSet<String> = v
                    .iter()
                    .filter(|v| v.metadata.deletion_timestamp.is_none())
                    .filter_map(allocation)
                    .map(|a| a.mac_address.to_lowercase())
                    .collect();
                let now = Instant::now();
                let mut leaks: HashMap<String, String> = HashMap::new();
                for x in &a {
                    if !live.contains(&x.spec.mac_address.to_lowercase()) {
                        leaks.insert(
                            x.uid().unwrap_or_default(),
                            format!("address {} of {}", x.spec.address, x.spec.mac_address),
                        );
                    }
                }
                for x in &c {
                    if !live.contains(&x.spec.mac_address.to_lowercase()) {
                        leaks.insert(
                            x.uid().unwrap_or_default(),
                            format!("claim of {}", x.spec.mac_address),
                        );
                    }
                }
                let mut open = lock(&o);
                let gone: Vec<String> = open
                    .keys()
                    .filter(|k| !leaks.contains_key(*k))
                    .cloned()
                    .collect();
                for k in gone {
                    if let Some((what, since, round)) = open.remove(&k) {
                        let mut longest = lock(&l);
                        let entry = longest.entry(round).or_default();
                        if now - since > entry.0 {
                            *entry = (now - since, what);
                        }
                    }
                }
                let round = r.load(Ordering::Relaxed);
                for (k, what) in leaks {
                    open.entry(k).or_insert((what, now, round));
                }
            }
        });
        LeakTracker {
            open,
            longest,
            round,
            task,
        }
    }

    /// Ends the round: the longest life of a leak that appeared in it (one still open
    /// counts with its age so far), and what it was.
    fn take_longest(&self) -> (Duration, String) {
        let round = self.round.fetch_add(1, Ordering::Relaxed);
        let now = Instant::now();
        let mut longest = lock(&self.longest).remove(&round).unwrap_or_default();
        for (what, since, r) in lock(&self.open).values() {
            if *r == round && now - *since > longest.0 {
                longest = (now - *since, what.clone());
            }
        }
        longest
    }
}

impl Drop for LeakTracker {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// ----------------------------------------------------------------------------------- suite

/// Runs the suite: the world, the load, each fault in turn; the rows of the table.
pub async fn run(cfg: Config) -> Result<Vec<Row>> {
    let t0 = Instant::now();
    let mut world = World::new(&cfg).await?;
    eprintln!("chaos: world ready in {:.1} s", t0.elapsed().as_secs_f64());
    let load = start_load(&world.ns, &world.network, &cfg);
    let leaks = LeakTracker::start(&world.ns);
    // What a leak may live: an admission in flight (the webhook's timeout), the leak grace,
    // a resync of the controller, a second.
    let leak_bound = world.admission_bound + LEAK_GRACE + RESYNC + Duration::from_secs(1);
    let mut rows = Vec::new();
    let result = async {
        for fault in cfg.faults.clone() {
            tokio::time::sleep(cfg.settle).await;
            let (r0, f0) = load.totals();
            let lost0 = world.guest_leases_lost();
            eprintln!("chaos: {} ...", fault.name());
            let mut row = world.inject(fault).await?;
            // The load runs on the recovered system, then pauses for the checks.
            tokio::time::sleep(cfg.settle).await;
            load.pause().await;
            let (r1, f1) = load.totals();
            (row.requests, row.failed) = (r1 - r0, f1 - f0);
            row.leases_lost = world.guest_leases_lost().saturating_sub(lost0);
            row.violations.extend(check(&world.ns, false).await?);
            row.violations.extend(world.guests_kept_their_addresses());
            let holders = world.holders_of_server_ip().await?;
            if holders.len() != 1 {
                row.violations.push(format!(
                    "{} agents hold the server IP {} after recovery: {holders:?}",
                    holders.len(),
                    world.server_ip
                ));
            }
            // Leaks (deleted VMs' allocations, half-made ones) go within their grace.
            let bound = leak_bound;
            let swept_t = Instant::now();
            let mut last = Vec::new();
            while swept_t.elapsed() < bound {
                last = check(&world.ns, true).await?;
                if last.is_empty() {
                    row.swept = Some(swept_t.elapsed());
                    break;
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            if row.swept.is_none() {
                row.violations.push(format!(
                    "not swept within {} s: {}",
                    bound.as_secs(),
                    last.join("; ")
                ));
            }
            let (longest, what) = leaks.take_longest();
            row.longest_leak = longest;
            if longest > leak_bound {
                row.violations.push(format!(
                    "a leak ({what}) lived {}, over {} s",
                    secs(longest),
                    leak_bound.as_secs()
                ));
            }
            eprintln!("chaos: {}", row_line(&row));
            rows.push(row);
            load.resume();
        }
        anyhow::Ok(())
    }
    .await;
    load.stop.store(true, Ordering::Relaxed);
    let _ = load.task.await;
    if let Err(e) = result {
        let logs: Vec<String> = world
            .controllers
            .iter()
            .map(|c| {
                format!(
                    "----- controller {} -----\n{}",
                    c.identity,
                    c.proc.log_tail(30)
                )
            })
            .collect();
        return Err(e.context(format!(
            "after {} fault(s):\n{}{}\n{}",
            rows.len(),
            table(&rows),
            logs.join("\n"),
            world.cp.logs(20)
        )));
    }
    world.cp.check_alive()?;
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_outage_ends_with_the_first_probe_through_after_the_last_failure() {
        let start = Instant::now();
        let (lift, lifted) = tokio::sync::watch::channel(Some(start));
        let tries = Arc::new(AtomicU64::new(0));
        let t = tries.clone();
        let o = watch_outage(start, lifted, Duration::from_millis(5), move || {
            let n = t.fetch_add(1, Ordering::Relaxed);
            async move { n >= 3 }
        })
        .await;
        drop(lift);
        assert!(o.was_down);
        assert_eq!(
            tries.load(Ordering::Relaxed),
            4,
            "stops at the first success"
        );
        assert!(
            o.back.is_some_and(|b| b >= Duration::from_millis(15)),
            "{o:?}"
        );
    }

    #[tokio::test]
    async fn a_service_never_down_is_up_and_one_never_back_is_reported() {
        let start = Instant::now();
        let (_lift, lifted) = tokio::sync::watch::channel(Some(start));
        let up = watch_outage(start, lifted, Duration::from_millis(5), || async { true }).await;
        assert!(!up.was_down);
        assert_eq!(up.back, Some(Duration::ZERO));
        assert_eq!(outage_cell(&up), "up");
        // Lifted long ago: a probe that keeps failing gives up at once.
        let long_ago = Instant::now()
            .checked_sub(GIVE_UP + Duration::from_secs(1))
            .unwrap_or(start);
        let (_lift, lifted) = tokio::sync::watch::channel(Some(long_ago));
        let down = watch_outage(long_ago, lifted, Duration::from_millis(5), || async {
            false
        })
        .await;
        assert!(down.was_down);
        assert_eq!(down.back, None);
        assert_eq!(outage_cell(&down), "never");
    }

    #[test]
    fn every_fault_has_a_short_name() {
        let short = [
            "webhook",
            "controller",
            "agent",
            "apiserver",
            "kube-apiserver",
            "etcd",
            "partition",
            "node",
            "nospace",
        ];
        let parsed: Vec<Fault> = short.iter().filter_map(|s| Fault::parse(s)).collect();
        assert_eq!(parsed, Fault::ALL.to_vec());
        assert_eq!(Fault::parse("nothing"), None);
    }
}
