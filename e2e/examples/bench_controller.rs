//! Benchmark of `vm-dhcp controller` (not CI; `make bench-controller`) on a cluster the size
//! of a large Harvester install: 10,000 VMs over 50 IPPools (200 each, their allocations as
//! address objects and MAC claims, as the webhook writes them), 20 nodes carrying the pools'
//! cluster network, and the controller placing 2 agents per pool (100 agent pods).
//!
//! There is no kubelet here: the benchmark plays the part of every node and agent as the API
//! sees them. A pod the controller places is made Running and Ready with a pod IP; the first
//! agent of each pool takes the pool's Lease and renews it every 1/3 of its duration, as the
//! agent's Lease library does (the standby only watches); every node posts a heartbeat (its
//! Ready condition's `lastHeartbeatTime`) every 10 s, as a kubelet does.
//!
//! Figures, from process start: `/readyz` 200, all 50 pools Registered, CacheReady and
//! AgentReady ("cold start to all pools ready"), the first full pass over (every vmnetcfg
//! status written); then the leader at rest for 60 s with Leases renewing and nodes
//! heartbeating: reconciles per second by kind, CPU (% of one core), resident memory. Last,
//! a restart of the steady state, timed the same way.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, Time};
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::json;
use vm_dhcp_core::admission::{ALLOCATIONS_ANNOTATION, NicAllocation};
use vm_dhcp_core::controller::{
    AGENT_LABEL, AGENT_LABEL_VALUE, CLUSTER_NETWORK_LABEL, FINALIZER, NODE_NETWORK_LABEL_PREFIX,
    POOL_NAME_LABEL, POOL_NAMESPACE_LABEL, VM_NAME_LABEL, lease_name,
};
use vm_dhcp_core::crd::{IPPool, IPPoolAddress, IPPoolMACClaim, VirtualMachineNetworkConfig};
use vm_dhcp_core::kubevirt::{NetworkAttachmentDefinition, VirtualMachine};
use vm_dhcp_core::mac::MacAddr;
use vm_dhcp_core::store::{Holding, STORE_ANNOTATION, STORE_OBJECTS, address_object, claim_object};
use vm_dhcp_e2e::ControlPlane;
use vm_dhcp_e2e::nodesim::bind_pod;
use vm_dhcp_e2e::proc::{Process, run_dir};

const VMS: usize = 10_000;
const POOLS: usize = 50;
const NODES: usize = 20;
const AGENTS_PER_POOL: usize = 2;
/// The agents' Lease duration (the controller's default) and their renewal period.
const AGENT_LEASE_SECONDS: u64 = 5;
const HEARTBEAT: Duration = Duration::from_secs(10);
const AT_REST: Duration = Duration::from_secs(60);
const PARALLEL: usize = 32;
const DEADLINE: Duration = Duration::from_secs(900);

fn vm_name(i: usize) -> String {
    // Zero-padded: the controller's first pass goes in key order, so the last name is the
    // last vmnetcfg it visits (used to see the end of the pass).
    format!("vm-{i:05}")
}

fn pool_name(p: usize) -> String {
    format!("net-{p:02}")
}

/// VM i is on pool i % POOLS, as its k-th VM (k = i / POOLS): 10.(100+p).(k/250).(k%250+4).
fn placement(i: usize) -> (usize, Ipv4Addr, MacAddr) {
    let (p, k) = (i % POOLS, i / POOLS);
    let ip = Ipv4Addr::new(10, 100 + p as u8, (k / 250) as u8, (k % 250 + 4) as u8);
    let mac = MacAddr([0x02, 0xbe, 0, p as u8, (k >> 8) as u8, k as u8]);
    (p, ip, mac)
}

fn proc_status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// User + system CPU seconds of a process (fields 14 and 15 of /proc/<pid>/stat).
fn cpu_seconds(pid: u32) -> f64 {
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            // The command name (field 2) may hold spaces: count from after its ')'.
            let rest = s.rsplit_once(')')?.1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            let user: f64 = f.get(11)?.parse().ok()?;
            let sys: f64 = f.get(12)?.parse().ok()?;
            Some((user + sys) / ticks)
        })
        .unwrap_or(0.0)
}

fn pool_ready(p: &IPPool) -> bool {
    let conds = p.status.as_ref().and_then(|s| s.conditions.as_ref());
    ["Registered", "CacheReady", "AgentReady"]
        .iter()
        .all(|t| conds.is_some_and(|c| c.iter().any(|c| c.type_ == *t && c.status == "True")))
}

fn cfg_done(c: &VirtualMachineNetworkConfig) -> bool {
    let entries = c.status.as_ref().and_then(|s| s.network_configs.as_ref());
    entries.is_some_and(|e| {
        !e.is_empty()
            && e.iter().all(|e| {
                e.state.as_deref() == Some("Allocated") && e.allocated_ip_address.is_some()
            })
    })
}

/// The controller's `vmdhcpcontroller_reconciles_total` by kind.
async fn reconciles(port: u16) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    let Ok((200, text)) = vm_dhcp_e2e::plain_get(port, "/metrics").await else {
        return out;
    };
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("vmdhcpcontroller_reconciles_total{kind=\"") else {
            continue;
        };
        if let Some((kind, value)) = rest.split_once("\"} ")
            && let Ok(v) = value.trim().parse::<f64>()
        {
            out.insert(kind.to_string(), v);
        }
    }
    out
}

/// Plays kubelet and agent for the pods the controller places, and kubelet's heartbeat for
/// the nodes; counts what it wrote.
struct Fleet {
    stop: Arc<AtomicBool>,
    renewals: Arc<AtomicU64>,
    heartbeats: Arc<AtomicU64>,
    pods_started: Arc<AtomicU64>,
}

impl Fleet {
    fn start(client: Client, ns: &str, nodes: Vec<String>) -> Fleet {
        let fleet = Fleet {
            stop: Arc::default(),
            renewals: Arc::default(),
            heartbeats: Arc::default(),
            pods_started: Arc::default(),
        };
        // Node heartbeats, spread over the period.
        for (n, node) in nodes.clone().into_iter().enumerate() {
            let (client, stop, count) =
                (client.clone(), fleet.stop.clone(), fleet.heartbeats.clone());
            tokio::spawn(async move {
                let api: Api<Node> = Api::all(client);
                tokio::time::sleep(HEARTBEAT * n as u32 / NODES as u32).await;
                while !stop.load(Ordering::Relaxed) {
                    if heartbeat(&api, &node, true).await.is_ok() {
                        count.fetch_add(1, Ordering::Relaxed);
                    }
                    tokio::time::sleep(HEARTBEAT).await;
                }
            });
        }
        // Pods: Running and Ready as soon as placed; the first of each pool holds the Lease.
        let (stop, started, renewals) = (
            fleet.stop.clone(),
            fleet.pods_started.clone(),
            fleet.renewals.clone(),
        );
        let ns = ns.to_string();
        tokio::spawn(async move {
            let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
            let selector = format!("{AGENT_LABEL}={AGENT_LABEL_VALUE}");
            let mut holders: HashMap<String, String> = HashMap::new();
            // Scheduler: each pool's agents on distinct nodes, round robin over the nodes.
            let mut used: HashMap<String, Vec<usize>> = HashMap::new();
            let mut cursor = 0usize;
            let mut serial = 0u32;
            while !stop.load(Ordering::Relaxed) {
                let listed = match pods.list(&ListParams::default().labels(&selector)).await {
                    Ok(l) => l.items,
                    Err(e) => {
                        eprintln!("fleet: listing agent pods: {e}");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        continue;
                    }
                };
                for pod in listed {
                    let name = pod.name_any();
                    let pool_key = format!(
                        "{}/{}",
                        pod.labels()
                            .get(POOL_NAMESPACE_LABEL)
                            .cloned()
                            .unwrap_or_default(),
                        pod.labels()
                            .get(POOL_NAME_LABEL)
                            .cloned()
                            .unwrap_or_default()
                    );
                    let mut placed = pod
                        .spec
                        .as_ref()
                        .and_then(|s| s.node_name.clone())
                        .is_some();
                    if !placed && pod.metadata.deletion_timestamp.is_none() {
                        let taken = used.entry(pool_key).or_default();
                        let Some(n) = (0..NODES)
                            .map(|k| (cursor + k) % NODES)
                            .find(|n| !taken.contains(n))
                        else {
                            continue;
                        };
                        cursor = n + 1;
                        let uid = pod.metadata.uid.clone().unwrap_or_default();
                        match bind_pod(&pods, &name, &uid, &nodes[n]).await {
                            Ok(_) => {
                                taken.push(n);
                                placed = true;
                            }
                            Err(e) => eprintln!("fleet: binding pod {name}: {e}"),
                        }
                    }
                    let running =
                        pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running");
                    if placed && !running && pod.metadata.deletion_timestamp.is_none() {
                        serial += 1;
                        let ip = format!("10.244.{}.{}", serial / 250, serial % 250 + 2);
                        let now = Time(k8s_openapi::jiff::Timestamp::now());
                        let status = json!({"status": {"phase": "Running", "podIP": ip,
                            "podIPs": [{"ip": ip}],
                            "conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": now},
                                           {"type": "ContainersReady", "status": "True", "lastTransitionTime": now}]}});
                        if pods
                            .patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
                            .await
                            .is_ok()
                        {
                            started.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    let labels = pod.labels();
                    if let (Some(pns), Some(pname)) = (
                        labels.get(POOL_NAMESPACE_LABEL),
                        labels.get(POOL_NAME_LABEL),
                    ) {
                        let lease = lease_name(pns, pname);
                        if placed && !holders.contains_key(&lease) {
                            holders.insert(lease.clone(), name.clone());
                            let leases: Api<Lease> = Api::namespaced(client.clone(), &ns);
                            let (stop, renewals) = (stop.clone(), renewals.clone());
                            tokio::spawn(agent(leases, lease, name, stop, renewals));
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        });
        fleet
    }
}

/// An active agent as the API sees it: takes its pool's Lease and renews it.
async fn agent(
    api: Api<Lease>,
    lease: String,
    holder: String,
    stop: Arc<AtomicBool>,
    renewals: Arc<AtomicU64>,
) {
    let every = Duration::from_secs(AGENT_LEASE_SECONDS) / 3;
    while !stop.load(Ordering::Relaxed) {
        let now = MicroTime(k8s_openapi::jiff::Timestamp::now());
        let spec = LeaseSpec {
            holder_identity: Some(holder.clone()),
            lease_duration_seconds: Some(AGENT_LEASE_SECONDS as i32),
            renew_time: Some(now.clone()),
            acquire_time: Some(now),
            ..Default::default()
        };
        let written = match api.get_opt(&lease).await {
            Ok(Some(mut l)) => {
                l.spec = Some(spec);
                api.replace(&lease, &PostParams::default(), &l)
                    .await
                    .is_ok()
            }
            Ok(None) => {
                let mut l = Lease {
                    spec: Some(spec),
                    ..Default::default()
                };
                l.metadata.name = Some(lease.clone());
                api.create(&PostParams::default(), &l).await.is_ok()
            }
            Err(_) => false,
        };
        if written {
            renewals.fetch_add(1, Ordering::Relaxed);
        }
        tokio::time::sleep(every).await;
    }
}

/// Posts a node's Ready condition with a fresh heartbeat.
async fn heartbeat(api: &Api<Node>, node: &str, ready: bool) -> Result<()> {
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    let status = json!({"status": {"conditions": [{"type": "Ready",
        "status": if ready { "True" } else { "False" }, "reason": "KubeletReady",
        "lastHeartbeatTime": now, "lastTransitionTime": "2026-01-01T00:00:00Z"}]}});
    api.patch_status(node, &PatchParams::default(), &Patch::Strategic(&status))
        .await
        .with_context(|| format!("heartbeat of node {node}"))?;
    Ok(())
}

struct Figures {
    ready: Duration,
    pools: Duration,
    pass: Duration,
}

/// Starts the controller and times it; returns it still running, and its HTTP port.
async fn timed_start(
    cp: &'static ControlPlane,
    ns: &str,
    label: &str,
) -> Result<(Process, u16, Figures)> {
    let client = cp.client().await;
    let pools: Api<IPPool> = Api::namespaced(client.clone(), ns);
    let cfgs: Api<VirtualMachineNetworkConfig> = Api::namespaced(client.clone(), ns);
    let port = vm_dhcp_e2e::free_port()?;
    let bin = vm_dhcp_e2e::bins::vm_dhcp_binary();
    let mut cmd = Command::new(&bin);
    cmd.args([
        "controller",
        &format!("--kubeconfig={}", cp.kubeconfig_path.display()),
        &format!("--namespace={ns}"),
        &format!("--watch-namespace={ns}"),
        &format!("--leader-election-namespace={ns}"),
        "--image=registry.local/vm-dhcp-agent:bench",
        &format!("--agents-per-pool={AGENTS_PER_POOL}"),
        &format!("--agent-lease-duration-seconds={AGENT_LEASE_SECONDS}"),
        &format!("--http-addr=127.0.0.1:{port}"),
    ]);
    cmd.env("RUST_LOG", "warn");
    let run = run_dir()?;
    let log = run.join(format!("bench-controller-{}.log", label.replace(' ', "-")));
    let t0 = Instant::now();
    let mut proc = Process::spawn("vm-dhcp-controller", cmd, &log, &run)?;
    let pid = proc.id();
    let deadline = t0 + DEADLINE;
    let check = |proc: &mut Process| -> Result<()> {
        if let Some(status) = proc.exited() {
            bail!("the controller exited ({status}):\n{}", proc.log_tail(40));
        }
        if Instant::now() > deadline {
            bail!("the controller took too long:\n{}", proc.log_tail(40));
        }
        Ok(())
    };
    let ready = loop {
        if vm_dhcp_e2e::plain_get(port, "/readyz")
            .await
            .is_ok_and(|(code, _)| code == 200)
        {
            break t0.elapsed();
        }
        check(&mut proc)?;
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let rss_ready = proc_status_kib(pid, "VmRSS:");
    let pools_done = loop {
        let listed = pools.list(&ListParams::default()).await?;
        if listed.items.iter().filter(|p| pool_ready(p)).count() == POOLS {
            break t0.elapsed();
        }
        check(&mut proc)?;
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let last = vm_name(VMS - 1);
    let pass = loop {
        if cfg_done(&cfgs.get(&last).await?) {
            break t0.elapsed();
        }
        check(&mut proc)?;
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    println!("{label}:");
    println!(
        "  /readyz 200 after              {:>8.2} s",
        ready.as_secs_f64()
    );
    println!(
        "  all {POOLS} pools ready after      {:>8.2} s",
        pools_done.as_secs_f64()
    );
    println!(
        "  first full pass over after     {:>8.2} s",
        pass.as_secs_f64()
    );
    println!(
        "  memory: VmRSS {:.1} MiB at ready, {:.1} MiB after the pass (peak VmHWM {:.1} MiB); CPU {:.2} s",
        rss_ready as f64 / 1024.0,
        proc_status_kib(pid, "VmRSS:") as f64 / 1024.0,
        proc_status_kib(pid, "VmHWM:") as f64 / 1024.0,
        cpu_seconds(pid)
    );
    Ok((
        proc,
        port,
        Figures {
            ready,
            pools: pools_done,
            pass,
        },
    ))
}

/// The leader at rest for [`AT_REST`]: reconciles per second, CPU, memory.
async fn at_rest(proc: &Process, port: u16, fleet: &Fleet) -> Result<(f64, f64, f64)> {
    let pid = proc.id();
    // Let the first pass's tail (agent pods' readiness, pools' conditions) settle.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let (r0, c0, t0) = (reconciles(port).await, cpu_seconds(pid), Instant::now());
    let (l0, h0) = (
        fleet.renewals.load(Ordering::Relaxed),
        fleet.heartbeats.load(Ordering::Relaxed),
    );
    tokio::time::sleep(AT_REST).await;
    let (r1, c1, secs) = (
        reconciles(port).await,
        cpu_seconds(pid),
        t0.elapsed().as_secs_f64(),
    );
    let (l1, h1) = (
        fleet.renewals.load(Ordering::Relaxed),
        fleet.heartbeats.load(Ordering::Relaxed),
    );
    if r1.is_empty() {
        bail!("the controller's /metrics has no vmdhcpcontroller_reconciles_total");
    }
    let total: f64 = r1.values().sum::<f64>() - r0.values().sum::<f64>();
    let by_kind: Vec<String> = r1
        .iter()
        .map(|(k, v)| {
            format!(
                "{k} {:.2}/s",
                (v - r0.get(k).copied().unwrap_or(0.0)) / secs
            )
        })
        .collect();
    let cpu = 100.0 * (c1 - c0) / secs;
    let rss = proc_status_kib(pid, "VmRSS:") as f64 / 1024.0;
    println!(
        "at rest for {secs:.0} s ({:.1} Lease renewals/s by {POOLS} active agents of {}, {:.1} node heartbeats/s by {NODES} nodes):",
        (l1 - l0) as f64 / secs,
        POOLS * AGENTS_PER_POOL,
        (h1 - h0) as f64 / secs
    );
    println!(
        "  reconciles                     {:>8.2} /s ({})",
        total / secs,
        by_kind.join(", ")
    );
    println!("  leader CPU                     {cpu:>8.2} % of one core");
    println!("  VmRSS                          {rss:>8.1} MiB");
    Ok((total / secs, cpu, rss))
}

/// SIGTERM, then waits for the exit.
async fn stop(proc: &mut Process) -> Result<()> {
    // SAFETY: plain syscall on the pid of a child we spawned and have not reaped.
    unsafe { libc::kill(proc.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(30);
    while proc.exited().is_none() {
        if Instant::now() > deadline {
            bail!("the controller ignored SIGTERM:\n{}", proc.log_tail(40));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// 20 nodes carrying cluster network `cn`, Ready.
async fn nodes(client: &Client, cn: &str) -> Result<Vec<String>> {
    let api: Api<Node> = Api::all(client.clone());
    let mut names = Vec::new();
    for n in 0..NODES {
        let name = format!("bench-node-{n:02}");
        let node: Node = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "labels": {
                format!("{NODE_NETWORK_LABEL_PREFIX}{cn}"): "true",
                "kubernetes.io/hostname": name}}
        }))?;
        if api.get_opt(&name).await?.is_none() {
            api.create(&PostParams::default(), &node).await?;
        }
        heartbeat(&api, &name, true).await?;
        names.push(name);
    }
    Ok(names)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let bin = vm_dhcp_e2e::bins::vm_dhcp_binary();
    if !Path::new(&bin).to_string_lossy().contains("/release/") {
        eprintln!(
            "note: {} is not a release build; figures are not representative",
            bin.display()
        );
    }
    let cp = ControlPlane::shared().await;
    let ns = cp.namespace("benchctl").await;
    let client = cp.client().await;
    vm_dhcp_e2e::rbac::agent_service_account(&ns, "vm-dhcp-agent").await;
    let t_setup = Instant::now();
    let cn = "benchcn";
    let node_names = nodes(&client, cn).await?;

    let nads: Api<NetworkAttachmentDefinition> = Api::namespaced(client.clone(), &ns.name);
    let pools: Api<IPPool> = Api::namespaced(client.clone(), &ns.name);
    for p in 0..POOLS {
        let name = pool_name(p);
        let nad: NetworkAttachmentDefinition = serde_json::from_value(json!({
            "apiVersion": "k8s.cni.cncf.io/v1", "kind": "NetworkAttachmentDefinition",
            "metadata": {"name": name, "namespace": ns.name,
                         "labels": {CLUSTER_NETWORK_LABEL: cn}},
            "spec": {"config": json!({"cniVersion": "0.3.1", "name": name, "type": "bridge",
                     "bridge": format!("{cn}-br"), "vlan": 100 + p, "ipam": {}}).to_string()}
        }))?;
        nads.create(&PostParams::default(), &nad).await?;
        // A /22 per pool (1,018 addresses in range), 200 of them allocated; already in the
        // address-object store, as the webhook leaves a pool.
        let s = 100 + p;
        let pool: IPPool = serde_json::from_value(json!({
            "apiVersion": "network.harvesterhci.io/v1alpha1", "kind": "IPPool",
            "metadata": {"name": name, "namespace": ns.name,
                         "annotations": {STORE_ANNOTATION: STORE_OBJECTS}},
            "spec": {"networkName": format!("{}/{name}", ns.name), "ipv4Config": {
                "cidr": format!("10.{s}.0.0/22"), "serverIP": format!("10.{s}.0.2"),
                "router": format!("10.{s}.0.1"),
                "pool": {"start": format!("10.{s}.0.4"), "end": format!("10.{s}.3.253")}}}
        }))?;
        pools.create(&PostParams::default(), &pool).await?;
    }

    let vms: Api<VirtualMachine> = Api::namespaced(client.clone(), &ns.name);
    let cfgs: Api<VirtualMachineNetworkConfig> = Api::namespaced(client.clone(), &ns.name);
    let addresses: Api<IPPoolAddress> = Api::namespaced(client.clone(), &ns.name);
    let claims: Api<IPPoolMACClaim> = Api::namespaced(client.clone(), &ns.name);
    let nsname = ns.name.clone();
    futures::stream::iter(0..VMS)
        .map(|i| {
            let (vms, cfgs, addresses, claims, nsname) = (
                vms.clone(),
                cfgs.clone(),
                addresses.clone(),
                claims.clone(),
                nsname.clone(),
            );
            async move {
                let name = vm_name(i);
                let (p, ip, mac) = placement(i);
                let pool = pool_name(p);
                let network = format!("{nsname}/{pool}");
                let holding = Holding {
                    ip: IpAddr::V4(ip),
                    mac,
                    owner: Some(format!("{nsname}/{name}")),
                    static_: false,
                    interface: Some("nic-1".into()),
                };
                claims
                    .create(
                        &PostParams::default(),
                        &claim_object(&nsname, &pool, &network, &holding, None),
                    )
                    .await
                    .with_context(|| format!("claim of {name}"))?;
                addresses
                    .create(
                        &PostParams::default(),
                        &address_object(&nsname, &pool, &network, &holding),
                    )
                    .await
                    .with_context(|| format!("address of {name}"))?;
                let record = serde_json::to_string(&[NicAllocation {
                    interface: "nic-1".into(),
                    network: network.clone(),
                    mac_address: mac.to_string(),
                    ip_address: ip.to_string(),
                }])?;
                let vm: VirtualMachine = serde_json::from_value(json!({
                    "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine",
                    "metadata": {"name": name, "namespace": nsname,
                                 "annotations": {ALLOCATIONS_ANNOTATION: record}},
                    "spec": {"runStrategy": "Halted", "template": {"spec": {
                        "domain": {"devices": {"interfaces": [
                            {"name": "nic-1", "bridge": {}, "macAddress": mac.to_string()}]}},
                        "networks": [{"name": "nic-1", "multus": {"networkName": network}}]}}}
                }))?;
                let vm = vms.create(&PostParams::default(), &vm).await?;
                // As the controller creates it for its VM (owner, label, finalizer).
                let cfg: VirtualMachineNetworkConfig = serde_json::from_value(json!({
                    "apiVersion": "network.harvesterhci.io/v1alpha1",
                    "kind": "VirtualMachineNetworkConfig",
                    "metadata": {"name": name, "namespace": nsname,
                        "labels": {VM_NAME_LABEL: name}, "finalizers": [FINALIZER],
                        "ownerReferences": [{"apiVersion": "kubevirt.io/v1",
                            "kind": "VirtualMachine", "name": name,
                            "uid": vm.metadata.uid}]},
                    "spec": {"vmName": name, "networkConfigs": [{"networkName": network,
                        "macAddress": mac.to_string(), "ipAddress": ip.to_string()}]}
                }))?;
                cfgs.create(&PostParams::default(), &cfg).await?;
                anyhow::Ok(())
            }
        })
        .buffer_unordered(PARALLEL)
        .try_collect::<Vec<()>>()
        .await?;
    println!(
        "setup: {VMS} VMs with vmnetcfgs, {POOLS} IPPools ({} allocations as address objects), {NODES} nodes, written in {:.1} s",
        VMS,
        t_setup.elapsed().as_secs_f64()
    );

    let fleet = Fleet::start(client.clone(), &ns.name, node_names);
    let (mut cold_proc, port, cold) = timed_start(
        cp,
        &ns.name,
        "cold start (10,000 vmnetcfg statuses and 100 agent pods to write)",
    )
    .await?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    let agents = pods
        .list(&ListParams::default().labels(&format!("{AGENT_LABEL}={AGENT_LABEL_VALUE}")))
        .await?
        .items
        .len();
    if agents != POOLS * AGENTS_PER_POOL {
        bail!(
            "the controller placed {agents} agent pods, not {}",
            POOLS * AGENTS_PER_POOL
        );
    }
    let list = cfgs.list(&ListParams::default()).await?;
    let done = list.items.iter().filter(|c| cfg_done(c)).count();
    if done != VMS {
        bail!("after the first pass only {done} of {VMS} vmnetcfgs are Allocated");
    }
    let (rate, cpu, rss) = at_rest(&cold_proc, port, &fleet).await?;
    // A graceful stop gives the leader Lease back: the restart times the start, not the
    // wait for a dead leader's Lease to expire.
    stop(&mut cold_proc).await?;

    // Steady state: clear the pools' conditions and the last vmnetcfg's status so the
    // restart has something observable to write at both marks.
    for p in 0..POOLS {
        pools
            .patch_status(
                &pool_name(p),
                &PatchParams::default(),
                &Patch::Merge(&json!({"status": {"conditions": null}})),
            )
            .await?;
    }
    cfgs.patch_status(
        &vm_name(VMS - 1),
        &PatchParams::default(),
        &Patch::Merge(&json!({"status": null})),
    )
    .await?;
    let (mut warm_proc, _, warm) = timed_start(cp, &ns.name, "restart (steady state)").await?;
    warm_proc.kill();
    fleet.stop.store(true, Ordering::Relaxed);
    println!(
        "summary: all pools ready {:.2}/{:.2} s (cold/restart; target < 10 s), /readyz {:.2}/{:.2} s, pass {:.2}/{:.2} s; at rest {rate:.2} reconciles/s, leader CPU {cpu:.2} % of one core (target < 2 %), VmRSS {rss:.1} MiB (target < 150 MiB); {} agent pods started",
        cold.pools.as_secs_f64(),
        warm.pools.as_secs_f64(),
        cold.ready.as_secs_f64(),
        warm.ready.as_secs_f64(),
        cold.pass.as_secs_f64(),
        warm.pass.as_secs_f64(),
        fleet.pods_started.load(Ordering::Relaxed)
    );
    Ok(())
}
