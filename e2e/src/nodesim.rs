//! A node simulator: no kubelet or scheduler can run here, so the harness plays both for the
//! agent pods of one test namespace.
//!
//! - **Nodes**: Node objects with the labels a test asks for, Ready=True.
//! - **Scheduler**: binds pods that honour required node affinity, nodeSelector, required pod
//!   anti-affinity and NoSchedule/NoExecute taints; otherwise writes PodScheduled=False.
//! - **Kubelet**: runs each container's command as a local process in a network namespace of
//!   its own: `eth0` is a veth to the root namespace (the pod IP, reachable from the root
//!   namespace), each Multus network of the pod is a veth on a per-network Linux bridge
//!   (`eth1` for the agent), and a forwarder listening on 127.0.0.1:6443 *inside* the pod's
//!   namespace carries connections to the real kube-apiserver on the host's loopback. It writes
//!   the pod's status (readiness from the readiness probe), restarts containers as
//!   `restartPolicy` says, and finishes normal deletions.
//! - **In-cluster mode** ([`NodeSim::start_in_cluster`]): every pod of the namespace (an
//!   installed release's Deployments and the agents its controller makes), run as a
//!   cluster's kubelet runs it: its ServiceAccount token from a real TokenRequest, its Secret,
//!   ConfigMap, projected and downward-API volumes at their mount paths (a mount namespace
//!   per container, see [`crate::kubelet`]), `KUBERNETES_SERVICE_HOST`/`_PORT` naming the
//!   in-namespace forwarder, so the programs use their in-cluster configuration and act with
//!   exactly their ServiceAccount's rights. Pods sit on one bridge (pod to pod works, the pod
//!   IPs are reachable from the root namespace, so kube-apiserver reaches webhooks and
//!   aggregated APIs at their EndpointSlice addresses); startup, liveness and HTTPS probes
//!   and preStop hooks are honoured.
//! - **Lost nodes** ([`NodeSim::lose_node`]): Ready=Unknown, the unreachable taints, processes
//!   killed, and the node's pods left alone (Terminating until someone force-deletes them).
//! - **Partitions** ([`NodeSim::partition_pod`], [`NodeSim::heal_pod`]): one pod's forwarder
//!   stops carrying bytes, as a network that drops packets does, while its processes run on.
//!
//! Every namespace and root-namespace link is recorded in the run directory, so a run that was
//! killed is cleaned up by the next one; [`NodeSim`] and [`VmNetns`] clean up when dropped.
//! Nothing is addressed but loopback and links this module creates.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::authentication::v1::TokenRequest;
use k8s_openapi::api::core::v1::{
    Container, Node, NodeSelectorRequirement, Pod, PodAffinityTerm, Probe, ServiceAccount, Taint,
    Toleration,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, Time};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, Preconditions};
use kube::{Client, ResourceExt};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;

use crate::cluster::ControlPlane;
use crate::kubelet::{self, NotReady};
use crate::proc::{Process, log_tail, record, run_dir};

/// The label selector of the agent pods (the label upstream's controller puts on them).
pub const AGENT_SELECTOR: &str = "network.harvesterhci.io/vm-dhcp-controller=agent";
/// Multus' annotation listing a pod's secondary networks.
pub const NETWORKS_ANNOTATION: &str = "k8s.v1.cni.cncf.io/networks";
/// Where a pod finds the apiserver: a forwarder inside its network namespace.
pub const POD_APISERVER_PORT: u16 = 6443;
/// Taint a node controller puts on a node whose kubelet stopped reporting.
pub const UNREACHABLE_TAINT: &str = "node.kubernetes.io/unreachable";
const NOT_READY_TAINT: &str = "node.kubernetes.io/not-ready";

/// Pod addresses: /30s of 10.254.0.0/16 (root side .1, pod side .2), on links we create only.
const POD_NET_BASE: u32 = u32::from_be_bytes([10, 254, 0, 0]);
const POD_NET_SLOTS: u32 = 1 << 14;
/// In-cluster mode: one /24 of 10.253.0.0/16 per simulator (root side .1, pods .2–.254), on
/// a bridge in the simulator's fabric namespace.
const BRIDGED_NET_BASE: u32 = u32::from_be_bytes([10, 253, 0, 0]);
const BRIDGED_NET_SLOTS: u32 = 256;
/// preStop hooks run at most this long (the chart's sleep is 5 s).
const MAX_PRE_STOP: Duration = Duration::from_secs(10);
/// How often an in-cluster pod's Secret, ConfigMap and token volumes are written again.
const VOLUME_SYNC: Duration = Duration::from_secs(5);
/// Deletion grace periods are capped: tests should not wait 30 s for a process that ignores
/// SIGTERM.
const MAX_GRACE: Duration = Duration::from_secs(3);
/// Probes run at their period, but at least every second, for test speed.
const MAX_PROBE_PERIOD: Duration = Duration::from_secs(1);
const TICK: Duration = Duration::from_millis(100);
/// How often the pods are listed (there is no watch: see `poll_loop`).
const POLL: Duration = Duration::from_millis(200);

/// Names and addresses unique within this test process (several simulators may run at once).
static COUNTER: AtomicU32 = AtomicU32::new(0);

fn next_id() -> u32 {
    COUNTER.fetch_add(1, Ordering::Relaxed)
}

/// A node to create: `name` is short; the Node object is `<namespace>-<name>` so that tests
/// sharing the control plane never collide.
#[derive(Clone, Debug)]
pub struct NodeSpec {
    pub name: String,
    pub labels: BTreeMap<String, String>,
}

impl NodeSpec {
    pub fn new(name: &str) -> Self {
        NodeSpec {
            name: name.to_string(),
            labels: BTreeMap::new(),
        }
    }

    pub fn label(mut self, key: &str, value: &str) -> Self {
        self.labels.insert(key.to_string(), value.to_string());
        self
    }
}

/// Why a running pod's task must stop.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Stop {
    Run,
    /// A normal delete: (in-cluster mode: preStop hooks within the `declared` grace period,)
    /// SIGTERM, wait the grace period (capped), SIGKILL, finish deletion.
    Delete {
        grace: Duration,
        declared: Duration,
    },
    /// The node was lost: its processes are already dead; do nothing more.
    Lost,
}

/// The network plumbing of one pod.
#[derive(Clone, Debug)]
struct Sandbox {
    netns: String,
    /// The other end of the pod's `eth0`: in the root namespace, or (in-cluster mode) a port
    /// of the pod bridge in `host_ns`.
    host_if: String,
    host_ns: Option<String>,
    pod_ip: Ipv4Addr,
    /// Pod-side interfaces on the per-network bridges, with their network ("ns/name").
    networks: Vec<(String, String)>,
}

struct PodEntry {
    name: String,
    node: String,
    sandbox: Option<Sandbox>,
    /// Running processes by container name.
    procs: HashMap<String, Process>,
    /// Logs by container name (kept after the process is gone).
    logs: HashMap<String, PathBuf>,
    lost: bool,
    stop: watch::Sender<Stop>,
    task: Option<JoinHandle<()>>,
    forwarder: Option<JoinHandle<()>>,
    /// True while the pod's path to the apiserver is cut (see [`NodeSim::partition_pod`]).
    apiserver_cut: watch::Sender<bool>,
}

struct SimNode {
    short: String,
    lost: bool,
}

#[derive(Default)]
struct State {
    nodes: BTreeMap<String, SimNode>,
    /// Pods by uid, as last listed.
    seen: HashMap<String, Pod>,
    /// Pods we bound whose binding the last list did not show yet (uid → node), so that
    /// anti-affinity sees them, as kube-scheduler's assume cache does.
    assumed: HashMap<String, String>,
    /// Pods we run (or ran), by uid.
    pods: HashMap<String, PodEntry>,
    /// Network "ns/name" → bridge in the fabric namespace.
    bridges: HashMap<String, String>,
}

struct Inner {
    cp: &'static ControlPlane,
    client: Client,
    ns: String,
    selector: String,
    /// In-cluster mode (see [`NodeSim::start_in_cluster`]).
    in_cluster: bool,
    /// In-cluster mode: the pods' bridge in the fabric namespace and its /24.
    pod_net: Option<PodNet>,
    programs: HashMap<String, PathBuf>,
    dir: PathBuf,
    run: PathBuf,
    /// The namespace holding the per-network bridges.
    fabric: String,
    resync: Notify,
    /// Serializes bridge creation (two pods on one new network).
    bridge_lock: tokio::sync::Mutex<()>,
    state: Mutex<State>,
}

/// The pod network of the in-cluster mode: a bridge in the fabric namespace, a veth from the
/// root namespace into it (`root_if`, holding `.1` of the /24), and every pod's `eth0`.
struct PodNet {
    bridge: String,
    root_if: String,
    /// The /24's first address.
    base: Ipv4Addr,
}

/// What [`NodeSim::start_with`] runs.
#[derive(Clone, Debug)]
pub struct SimOptions {
    /// The pods of the namespace it runs (a label selector; empty: all).
    pub selector: String,
    /// Run pods as a cluster's kubelet does (see [`NodeSim::start_in_cluster`]) rather than
    /// with a kubeconfig file in `KUBECONFIG`.
    pub in_cluster: bool,
}

/// The simulator of one test; dropping it kills its processes, removes its namespaces and
/// deletes its Node objects.
pub struct NodeSim {
    inner: Arc<Inner>,
    poll_task: JoinHandle<()>,
}

/// A "VM": a network namespace with `eth0` on a pod network's bridge. Removed when dropped.
pub struct VmNetns {
    pub name: String,
    pub ifname: String,
    pub mac: String,
}

impl VmNetns {
    /// A command that runs `program` inside the VM's namespace.
    pub fn command(&self, program: &str) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new("ip");
        cmd.args(["netns", "exec", &self.name, program]);
        cmd.kill_on_drop(true);
        cmd
    }

    /// Runs `program args` in the VM's namespace and waits for it.
    pub async fn run(&self, program: &str, args: &[&str]) -> Result<std::process::Output> {
        self.command(program)
            .args(args)
            .output()
            .await
            .with_context(|| format!("running {program} in {}", self.name))
    }

    /// One DHCP exchange with busybox udhcpc on the VM's interface (up to 15 tries a second
    /// apart, nothing configured): what the client said, to find its `lease of <ip>
    /// obtained` line.
    pub async fn udhcpc_once(&self) -> Result<String> {
        let out = self
            .run(
                &crate::bins::busybox(),
                &[
                    "udhcpc",
                    "-i",
                    &self.ifname,
                    "-f",
                    "-n",
                    "-q",
                    "-t",
                    "15",
                    "-T",
                    "1",
                    "-s",
                    "/bin/true",
                ],
            )
            .await?;
        Ok(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }

    /// Starts a long-running `program args` (a DHCP client, a server) in the VM's namespace,
    /// with its output in `<run dir>/nodesim/<vm>-<log_name>.log`; like every harness child it
    /// dies with the test process, and is killed when the returned [`Process`] is dropped.
    pub fn spawn(&self, log_name: &str, program: &str, args: &[&str]) -> Result<Process> {
        let run = run_dir()?;
        let dir = run.join("nodesim");
        std::fs::create_dir_all(&dir)?;
        let mut cmd = std::process::Command::new("ip");
        cmd.args(["netns", "exec", &self.name, program]).args(args);
        let log = dir.join(format!("{}-{log_name}.log", self.name));
        Process::spawn(&format!("{}/{log_name}", self.name), cmd, &log, &run)
    }
}

impl Drop for VmNetns {
    fn drop(&mut self) {
        ip_sync(&["netns", "delete", &self.name]);
    }
}

/// The in-cluster mode's pod network: a bridge in `fabric`, and a veth from the root
/// namespace into it holding the first address of a free /24 of 10.253.0.0/16.
async fn create_pod_net(run: &Path, fabric: &str) -> Result<PodNet> {
    let pid = std::process::id();
    let n = next_id();
    let root_if = format!("vd{pid:x}r{n:x}");
    let bridge = "podbr".to_string();
    record(run, "links", &root_if);
    ip(&["-n", fabric, "link", "add", &bridge, "type", "bridge"]).await?;
    ip(&["-n", fabric, "link", "set", &bridge, "up"]).await?;
    ip(&[
        "link", "add", &root_if, "type", "veth", "peer", "name", "uplink", "netns", fabric,
    ])
    .await?;
    ip(&[
        "-n", fabric, "link", "set", "uplink", "master", &bridge, "up",
    ])
    .await?;
    // Simulators of this process pick their /24 one at a time.
    static PICK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    let _pick = PICK.lock().await;
    let start = pid.wrapping_mul(7).wrapping_add(n);
    for i in 0..BRIDGED_NET_SLOTS {
        let slot = start.wrapping_add(i) % BRIDGED_NET_SLOTS;
        let base = Ipv4Addr::from(BRIDGED_NET_BASE + slot * 256);
        let out = tokio::process::Command::new("ip")
            .args(["-4", "-o", "addr", "show", "to", &format!("{base}/24")])
            .output()
            .await?;
        if !(out.status.success() && out.stdout.is_empty()) {
            continue;
        }
        let host = Ipv4Addr::from(u32::from(base) + 1);
        ip(&["addr", "add", &format!("{host}/24"), "dev", &root_if]).await?;
        ip(&["link", "set", &root_if, "up"]).await?;
        return Ok(PodNet {
            bridge,
            root_if,
            base,
        });
    }
    bail!("no free /24 in 10.253.0.0/16")
}

fn now() -> Value {
    serde_json::to_value(Time(k8s_openapi::jiff::Timestamp::now())).unwrap_or(Value::Null)
}

async fn ip(args: &[&str]) -> Result<()> {
    let out = tokio::process::Command::new("ip")
        .args(args)
        .output()
        .await
        .context("running ip (is iproute2 installed?)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// For Drop, which cannot await; errors are ignored (the object may already be gone).
fn ip_sync(args: &[&str]) {
    let _ = std::process::Command::new("ip")
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status();
}

impl NodeSim {
    /// Creates `nodes` and starts playing scheduler and kubelet for the agent pods
    /// ([`AGENT_SELECTOR`]) of namespace `ns`. `programs` maps a container image (exactly, or
    /// its repository's last path segment without tag: `busybox` for `docker.io/busybox:1.36`)
    /// or a command's first element to a local binary.
    pub async fn start(
        cp: &'static ControlPlane,
        ns: &str,
        nodes: Vec<NodeSpec>,
        programs: HashMap<String, PathBuf>,
    ) -> Result<NodeSim> {
        Self::start_with_selector(cp, ns, nodes, programs, AGENT_SELECTOR).await
    }

    /// [`NodeSim::start`] for the pods matching another label selector.
    pub async fn start_with_selector(
        cp: &'static ControlPlane,
        ns: &str,
        nodes: Vec<NodeSpec>,
        programs: HashMap<String, PathBuf>,
        selector: &str,
    ) -> Result<NodeSim> {
        let options = SimOptions {
            selector: selector.to_string(),
            in_cluster: false,
        };
        Self::start_with(cp, ns, nodes, programs, options).await
    }

    /// Creates `nodes` and plays scheduler and kubelet for **every** pod of namespace `ns`
    /// (where a release is installed: its Deployments' pods, made by kube-controller-manager,
    /// and the agent pods its controller makes) as a cluster's kubelet runs them:
    /// - the container's command and args (the image stands for the program `programs` maps
    ///   it to, as in [`NodeSim::start`]) and env (values, `fieldRef`, `secretKeyRef`,
    ///   `configMapKeyRef`, `envFrom`), plus `KUBERNETES_SERVICE_HOST`/`_PORT` naming the
    ///   forwarder to kube-apiserver in the pod's network namespace, and no `KUBECONFIG`: the
    ///   programs use their in-cluster configuration;
    /// - the ServiceAccount token (a real TokenRequest bound to the pod, renewed), the
    ///   cluster CA and the namespace at `/var/run/secrets/kubernetes.io/serviceaccount`, and
    ///   the pod's Secret, ConfigMap, projected, downward-API and emptyDir volumes at their
    ///   mount paths, each container in a mount namespace of its own ([`crate::kubelet`]);
    ///   a volume whose Secret does not exist yet keeps the pod in ContainerCreating;
    /// - every pod on one bridge with an address of a /24 of 10.253.0.0/16 that the root
    ///   namespace (kube-apiserver) reaches, and other pods too;
    /// - startup, liveness and readiness probes (HTTP, HTTPS without verification, TCP,
    ///   exec), and preStop hooks (`sleep`, `httpGet`, `exec`; at most 10 s) before SIGTERM.
    ///
    /// So each component acts with exactly the rights of its ServiceAccount.
    pub async fn start_in_cluster(
        cp: &'static ControlPlane,
        ns: &str,
        nodes: Vec<NodeSpec>,
        programs: HashMap<String, PathBuf>,
    ) -> Result<NodeSim> {
        let options = SimOptions {
            selector: String::new(),
            in_cluster: true,
        };
        Self::start_with(cp, ns, nodes, programs, options).await
    }

    /// Creates `nodes` and starts playing scheduler and kubelet for the pods of namespace
    /// `ns` that `options` selects, run as `options` says.
    pub async fn start_with(
        cp: &'static ControlPlane,
        ns: &str,
        nodes: Vec<NodeSpec>,
        programs: HashMap<String, PathBuf>,
        options: SimOptions,
    ) -> Result<NodeSim> {
        let run = run_dir()?;
        let dir = run.join("nodesim").join(ns);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let fabric = format!("vds-{}-f{}", std::process::id(), next_id());
        record(&run, "netns", &fabric);
        ip(&["netns", "add", &fabric]).await?;
        let pod_net = if options.in_cluster {
            Some(create_pod_net(&run, &fabric).await?)
        } else {
            None
        };
        let client = cp.client().await;
        let mut state = State::default();
        let node_api: Api<Node> = Api::all(client.clone());
        for spec in &nodes {
            let full = format!("{ns}-{}", spec.name);
            let mut labels = spec.labels.clone();
            labels.insert("kubernetes.io/hostname".into(), full.clone());
            let node: Node = serde_json::from_value(json!({
                "metadata": {"name": full, "labels": labels},
                "spec": {}
            }))?;
            node_api
                .create(&PostParams::default(), &node)
                .await
                .with_context(|| format!("creating node {full}"))?;
            state.nodes.insert(
                full.clone(),
                SimNode {
                    short: spec.name.clone(),
                    lost: false,
                },
            );
        }
        let inner = Arc::new(Inner {
            cp,
            client,
            ns: ns.to_string(),
            selector: options.selector,
            in_cluster: options.in_cluster,
            pod_net,
            programs,
            dir,
            run,
            fabric,
            resync: Notify::new(),
            bridge_lock: tokio::sync::Mutex::new(()),
            state: Mutex::new(state),
        });
        let names: Vec<String> = inner.lock().nodes.keys().cloned().collect();
        for full in names {
            inner.set_node_ready(&full, true).await?;
        }
        let poll_task = tokio::spawn(inner.clone().poll_loop());
        Ok(NodeSim { inner, poll_task })
    }

    /// The Node object's name for a short node name (full names are returned unchanged).
    pub fn node_name(&self, name: &str) -> String {
        self.inner
            .full_name(name)
            .unwrap_or_else(|| format!("{}-{name}", self.inner.ns))
    }

    /// The Node objects' names.
    pub fn nodes(&self) -> Vec<String> {
        self.inner.lock().nodes.keys().cloned().collect()
    }

    fn entry_for<T>(&self, pod: &str, f: impl Fn(&PodEntry) -> Option<T>) -> Option<T> {
        // Several entries may share a name (a pod recreated with the same name after a force
        // delete): prefer one that is not on a lost node.
        let state = self.inner.lock();
        let mut entries: Vec<&PodEntry> = state.pods.values().filter(|e| e.name == pod).collect();
        entries.sort_by_key(|e| e.lost);
        entries.into_iter().find_map(f)
    }

    /// The network namespace of a pod the simulator runs.
    pub fn pod_netns(&self, pod: &str) -> Option<String> {
        self.entry_for(pod, |e| e.sandbox.as_ref().map(|s| s.netns.clone()))
    }

    /// The pod IP the simulator gave a pod.
    pub fn pod_ip(&self, pod: &str) -> Option<Ipv4Addr> {
        self.entry_for(pod, |e| e.sandbox.as_ref().map(|s| s.pod_ip))
    }

    /// The pid of a container's running process.
    pub fn pid(&self, pod: &str, container: &str) -> Option<u32> {
        self.entry_for(pod, |e| e.procs.get(container).map(Process::id))
    }

    /// The log file of a container (stdout and stderr of every run).
    pub fn log_path(&self, pod: &str, container: &str) -> Option<PathBuf> {
        self.entry_for(pod, |e| e.logs.get(container).cloned())
    }

    /// A container's log text ("" if there is none).
    pub fn log(&self, pod: &str, container: &str) -> String {
        self.log_path(pod, container)
            .and_then(|p| std::fs::read_to_string(p).ok())
            .unwrap_or_default()
    }

    /// Simulates a node lost as a power cut leaves it: its processes die at once, the Node
    /// turns Ready=Unknown with the unreachable taints (what the node lifecycle controller
    /// writes), and nothing acts for its pods any more: deleting them leaves them Terminating
    /// until someone force-deletes them.
    pub async fn lose_node(&self, name: &str) -> Result<()> {
        let full = self
            .inner
            .full_name(name)
            .with_context(|| format!("no node {name}"))?;
        let mut dead_links = Vec::new();
        {
            let mut state = self.inner.lock();
            if let Some(node) = state.nodes.get_mut(&full) {
                node.lost = true;
            }
            for entry in state.pods.values_mut().filter(|e| e.node == full) {
                entry.lost = true;
                for proc in entry.procs.values_mut() {
                    proc.kill();
                }
                entry.procs.clear();
                if let Some(f) = entry.forwarder.take() {
                    f.abort();
                }
                let _ = entry.stop.send(Stop::Lost);
                if let Some(sb) = &entry.sandbox {
                    dead_links.push(sb.clone());
                }
            }
        }
        // The node's network is gone with it: take its links down (kept for clean-up).
        for sb in dead_links {
            match &sb.host_ns {
                Some(host_ns) => {
                    let _ = ip(&["-n", host_ns, "link", "set", &sb.host_if, "down"]).await;
                }
                None => {
                    let _ = ip(&["link", "set", &sb.host_if, "down"]).await;
                }
            }
            for (ifname, _) in &sb.networks {
                let _ = ip(&["-n", &sb.netns, "link", "set", ifname, "down"]).await;
            }
        }
        self.inner.set_node_ready(&full, false).await?;
        self.inner.log(&format!("node {full} lost"));
        Ok(())
    }

    /// Cuts one pod's path to the apiserver, as a partition between its node and the control
    /// plane does, while the pod runs on: its forwarder stops carrying bytes either way on
    /// open connections and holds new ones without connecting them. Nothing is refused or
    /// reset, so each request hangs until the client's own deadline, as dropped packets make
    /// it; the pod IP and `eth1` stay reachable.
    pub fn partition_pod(&self, pod: &str) -> Result<()> {
        self.set_apiserver_cut(pod, true)
    }

    /// Ends [`NodeSim::partition_pod`]: held bytes flow on, as TCP retransmissions deliver
    /// them after a partition heals (a stale request may still reach the apiserver).
    pub fn heal_pod(&self, pod: &str) -> Result<()> {
        self.set_apiserver_cut(pod, false)
    }

    fn set_apiserver_cut(&self, pod: &str, cut: bool) -> Result<()> {
        self.entry_for(pod, |e| {
            e.apiserver_cut.send_replace(cut);
            Some(())
        })
        .with_context(|| format!("no pod {pod} in the simulator"))?;
        self.inner.log(&format!(
            "pod {pod}: apiserver path {}",
            if cut { "cut" } else { "healed" }
        ));
        Ok(())
    }

    /// Brings a lost node back: Ready=True, no unreachable taints; pods still bound to it are
    /// started again (or their pending deletion finished), as a rebooted kubelet does.
    pub async fn restore_node(&self, name: &str) -> Result<()> {
        let full = self
            .inner
            .full_name(name)
            .with_context(|| format!("no node {name}"))?;
        let stale: Vec<PodEntry> = {
            let mut state = self.inner.lock();
            let uids: Vec<String> = state
                .pods
                .iter()
                .filter(|(_, e)| e.node == full && e.lost)
                .map(|(uid, _)| uid.clone())
                .collect();
            uids.iter()
                .filter_map(|uid| state.pods.remove(uid))
                .collect()
        };
        for entry in stale {
            destroy_entry(entry);
        }
        self.inner.set_node_ready(&full, true).await?;
        if let Some(node) = self.inner.lock().nodes.get_mut(&full) {
            node.lost = false;
        }
        self.inner.log(&format!("node {full} restored"));
        self.inner.resync.notify_one();
        Ok(())
    }

    /// Creates a "VM" namespace whose `eth0` sits on the bridge of `network` ("ns/name", as in
    /// the pods' Multus annotation), with a generated locally administered MAC.
    pub async fn attach_vm(&self, network: &str) -> Result<VmNetns> {
        self.attach_vm_with_mac(network, None).await
    }

    /// [`NodeSim::attach_vm`] with a chosen MAC address.
    pub async fn attach_vm_with_mac(&self, network: &str, mac: Option<&str>) -> Result<VmNetns> {
        let n = next_id();
        let pid = std::process::id();
        let name = format!("vds-{pid}-vm{n}");
        let mac = match mac {
            Some(m) => m.to_string(),
            None => {
                let p = pid.to_be_bytes();
                let c = n.to_be_bytes();
                format!("02:56:{:02x}:{:02x}:{:02x}:{:02x}", p[2], p[3], c[2], c[3])
            }
        };
        record(&self.inner.run, "netns", &name);
        ip(&["netns", "add", &name]).await?;
        let vm = VmNetns {
            name,
            ifname: "eth0".into(),
            mac,
        };
        let bridge = self.inner.ensure_bridge(network).await?;
        let port = format!("v{n}");
        let fabric = &self.inner.fabric;
        ip(&[
            "-n", &vm.name, "link", "add", "eth0", "address", &vm.mac, "type", "veth", "peer",
            "name", &port, "netns", fabric,
        ])
        .await?;
        ip(&["-n", fabric, "link", "set", &port, "master", &bridge, "up"]).await?;
        ip(&["-n", &vm.name, "link", "set", "lo", "up"]).await?;
        ip(&["-n", &vm.name, "link", "set", "eth0", "up"]).await?;
        self.inner
            .log(&format!("vm {} (mac {}) on {network}", vm.name, vm.mac));
        Ok(vm)
    }

    /// The simulator's own log (scheduling decisions, errors).
    pub fn sim_log(&self) -> String {
        std::fs::read_to_string(self.inner.dir.join("nodesim.log")).unwrap_or_default()
    }
}

/// Copies one direction of a forwarded connection, holding each chunk while `cut` is true
/// (what a partition does to packets in flight), and passes on the end of the stream.
async fn relay(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut cut: watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        // Not one `||` with the write: the watch's read guard would live across it.
        let healed = cut.wait_for(|c| !*c).await.is_ok();
        if !healed || to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
    // The end of the stream is held too: a FIN is a packet like any other.
    if cut.wait_for(|c| !*c).await.is_ok() {
        let _ = to.shutdown().await;
    }
}

/// Kills an entry's processes and removes its namespace (its veths go with it).
fn destroy_entry(mut entry: PodEntry) {
    if let Some(t) = entry.task.take() {
        t.abort();
    }
    if let Some(f) = entry.forwarder.take() {
        f.abort();
    }
    for proc in entry.procs.values_mut() {
        proc.kill();
    }
    if let Some(sb) = &entry.sandbox {
        ip_sync(&["netns", "delete", &sb.netns]);
        // (A port of the pod bridge goes with the pod's namespace.)
        if sb.host_ns.is_none() {
            ip_sync(&["link", "delete", &sb.host_if]);
        }
    }
}

impl Drop for NodeSim {
    fn drop(&mut self) {
        self.poll_task.abort();
        let (entries, nodes) = {
            let mut state = self.inner.lock();
            let entries: Vec<PodEntry> = state.pods.drain().map(|(_, e)| e).collect();
            (entries, state.nodes.keys().cloned().collect::<Vec<_>>())
        };
        if std::thread::panicking() {
            eprintln!(
                "----- node simulator ({}) -----\n{}",
                self.inner.ns,
                log_tail(&self.inner.dir.join("nodesim.log"), 60)
            );
            for e in &entries {
                for (c, log) in &e.logs {
                    eprintln!(
                        "----- pod {} container {c} ({}) -----\n{}",
                        e.name,
                        log.display(),
                        log_tail(log, 30)
                    );
                }
            }
        }
        for entry in entries {
            destroy_entry(entry);
        }
        ip_sync(&["netns", "delete", &self.inner.fabric]);
        if let Some(net) = &self.inner.pod_net {
            ip_sync(&["link", "delete", &net.root_if]);
        }
        // Node objects are cluster-wide: remove ours so other tests never see them. Drop
        // cannot await, and a kube Client is bound to its runtime: use a thread of our own.
        let cp = self.inner.cp;
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                let api: Api<Node> = Api::all(cp.client().await);
                for node in nodes {
                    let _ = tokio::time::timeout(
                        Duration::from_secs(5),
                        api.delete(&node, &DeleteParams::default()),
                    )
                    .await;
                }
            });
        })
        .join();
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn log(&self, line: &str) {
        let stamp = k8s_openapi::jiff::Timestamp::now();
        record(&self.dir, "nodesim.log", &format!("{stamp} {line}"));
    }

    fn full_name(&self, name: &str) -> Option<String> {
        let state = self.lock();
        if state.nodes.contains_key(name) {
            return Some(name.to_string());
        }
        state
            .nodes
            .iter()
            .find(|(_, n)| n.short == name)
            .map(|(full, _)| full.clone())
    }

    fn pods_api(&self) -> Api<Pod> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    /// Ready=True (a live kubelet), or Ready=Unknown plus the unreachable taints (what the
    /// node lifecycle controller writes when the kubelet stops posting status).
    async fn set_node_ready(&self, node: &str, ready: bool) -> Result<()> {
        let api: Api<Node> = Api::all(self.client.clone());
        let current = api.get(node).await?;
        let mut taints: Vec<Taint> = current
            .spec
            .and_then(|s| s.taints)
            .unwrap_or_default()
            .into_iter()
            // The TaintNodesByCondition admission plugin puts not-ready on every new Node;
            // the node lifecycle controller (absent here) swaps it for unreachable or removes
            // it as the Ready condition changes.
            .filter(|t| t.key != UNREACHABLE_TAINT && t.key != NOT_READY_TAINT)
            .collect();
        let condition = if ready {
            json!({"type": "Ready", "status": "True", "reason": "KubeletReady",
                   "message": "kubelet is posting ready status (node simulator)",
                   "lastHeartbeatTime": now(), "lastTransitionTime": now()})
        } else {
            for effect in ["NoSchedule", "NoExecute"] {
                taints.push(serde_json::from_value(json!({
                    "key": UNREACHABLE_TAINT, "effect": effect, "timeAdded": now()
                }))?);
            }
            json!({"type": "Ready", "status": "Unknown", "reason": "NodeStatusUnknown",
                   "message": "Kubelet stopped posting node status.",
                   "lastHeartbeatTime": now(), "lastTransitionTime": now()})
        };
        api.patch(
            node,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"taints": taints}})),
        )
        .await
        .with_context(|| format!("tainting node {node}"))?;
        let status = json!({"status": {
            "conditions": [condition],
            "addresses": [{"type": "InternalIP", "address": "127.0.0.1"},
                          {"type": "Hostname", "address": node}],
        }});
        api.patch_status(node, &PatchParams::default(), &Patch::Merge(status))
            .await
            .with_context(|| format!("writing status of node {node}"))?;
        Ok(())
    }

    /// Lists the pods every [`POLL`] (a full list makes deletions plain: a pod that is gone
    /// is simply absent) and reconciles; `resync` wakes it early.
    async fn poll_loop(self: Arc<Self>) {
        let lp = ListParams::default().labels(&self.selector);
        let mut tick = tokio::time::interval(POLL);
        let mut failing = false;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = self.resync.notified() => {}
            }
            match self.pods_api().list(&lp).await {
                Ok(list) => {
                    failing = false;
                    let seen = list
                        .items
                        .into_iter()
                        .map(|p| (p.metadata.uid.clone().unwrap_or_default(), p))
                        .collect();
                    self.lock().seen = seen;
                    self.reconcile().await;
                }
                Err(e) => {
                    if !failing {
                        self.log(&format!("listing pods: {e}"));
                    }
                    failing = true;
                }
            }
        }
    }

    /// Brings the world in line with the pods seen: schedule, start, stop, clean up.
    async fn reconcile(self: &Arc<Self>) {
        enum Action {
            Schedule(Pod),
            Start(Pod),
            FinishDelete(String, String),
        }
        let mut actions = Vec::new();
        let mut gone = Vec::new();
        {
            let mut state = self.lock();
            let State {
                seen,
                pods,
                nodes,
                assumed,
                ..
            } = &mut *state;
            // Pods that no longer exist (deleted, or force-deleted on a lost node).
            let dead: Vec<String> = pods
                .keys()
                .filter(|uid| !seen.contains_key(*uid))
                .cloned()
                .collect();
            for uid in dead {
                if let Some(e) = pods.remove(&uid) {
                    gone.push(e);
                }
            }
            assumed.retain(|uid, _| seen.get(uid).is_some_and(|p| node_of(p).is_none()));
            let mut sorted: Vec<&Pod> = seen.values().collect();
            sorted.sort_by_key(|p| {
                (
                    p.metadata.creation_timestamp.clone().map(|t| t.0),
                    p.name_any(),
                )
            });
            for pod in sorted {
                let uid = pod.metadata.uid.clone().unwrap_or_default();
                let deleting = pod.metadata.deletion_timestamp.is_some();
                let Some(node) = node_of(pod) else {
                    // Unbound pods are deleted at once by the apiserver: nothing to finish.
                    if !deleting && !assumed.contains_key(&uid) {
                        actions.push(Action::Schedule(pod.clone()));
                    }
                    continue;
                };
                let Some(sim_node) = nodes.get(&node) else {
                    continue;
                };
                if sim_node.lost {
                    continue;
                }
                match pods.get(&uid) {
                    Some(entry) if deleting => {
                        let grace = pod
                            .metadata
                            .deletion_grace_period_seconds
                            .or(pod
                                .spec
                                .as_ref()
                                .and_then(|s| s.termination_grace_period_seconds))
                            .unwrap_or(30);
                        let declared = Duration::from_secs(grace.max(0) as u64);
                        let grace = declared.min(MAX_GRACE);
                        if *entry.stop.borrow() == Stop::Run {
                            let _ = entry.stop.send(Stop::Delete { grace, declared });
                        }
                    }
                    Some(_) => {}
                    None if deleting => actions.push(Action::FinishDelete(pod.name_any(), uid)),
                    None => {
                        let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
                        if !matches!(phase, Some("Succeeded" | "Failed")) {
                            actions.push(Action::Start(pod.clone()));
                        }
                    }
                }
            }
        }
        for entry in gone {
            self.log(&format!("pod {} is gone: cleaning up", entry.name));
            destroy_entry(entry);
        }
        let schedule: Vec<Pod> = actions
            .iter()
            .filter_map(|a| match a {
                Action::Schedule(p) => Some(p.clone()),
                _ => None,
            })
            .collect();
        if !schedule.is_empty()
            && let Err(e) = self.schedule(schedule).await
        {
            self.log(&format!("scheduling failed: {e:#}"));
        }
        for action in actions {
            match action {
                Action::Schedule(_) => {}
                Action::FinishDelete(name, uid) => self.finish_delete(&name, &uid).await,
                Action::Start(pod) => self.start_pod(pod),
            }
        }
    }

    fn start_pod(self: &Arc<Self>, pod: Pod) {
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        let (stop_tx, stop_rx) = watch::channel(Stop::Run);
        let entry = PodEntry {
            name: pod.name_any(),
            node: node_of(&pod).unwrap_or_default(),
            sandbox: None,
            procs: HashMap::new(),
            logs: HashMap::new(),
            lost: false,
            stop: stop_tx,
            task: None,
            forwarder: None,
            apiserver_cut: watch::Sender::new(false),
        };
        self.lock().pods.insert(uid.clone(), entry);
        let task = tokio::spawn(self.clone().run_pod(pod, stop_rx));
        if let Some(e) = self.lock().pods.get_mut(&uid) {
            e.task = Some(task);
        }
    }

    /// Deletes the pod object for good (the kubelet's last step), only if it is still the
    /// same pod.
    async fn finish_delete(&self, name: &str, uid: &str) {
        let dp = DeleteParams {
            grace_period_seconds: Some(0),
            preconditions: Some(Preconditions {
                uid: Some(uid.to_string()),
                resource_version: None,
            }),
            ..DeleteParams::default()
        };
        match self.pods_api().delete(name, &dp).await {
            Ok(_) => self.log(&format!("pod {name} deleted")),
            Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => {}
            Err(e) => self.log(&format!("deleting pod {name}: {e}")),
        }
    }

    // ----- scheduler -----

    async fn schedule(&self, pods: Vec<Pod>) -> Result<()> {
        let node_api: Api<Node> = Api::all(self.client.clone());
        let names: Vec<String> = self.lock().nodes.keys().cloned().collect();
        let mut nodes = Vec::new();
        for name in names {
            if let Some(n) = node_api.get_opt(&name).await? {
                nodes.push(n);
            }
        }
        for pod in pods {
            // Pods placed so far (bound, or bound by us a moment ago), for anti-affinity.
            let placed: Vec<(Pod, String)> = {
                let state = self.lock();
                state
                    .seen
                    .values()
                    .filter(|p| p.metadata.uid != pod.metadata.uid)
                    .filter(|p| {
                        !matches!(
                            p.status.as_ref().and_then(|s| s.phase.as_deref()),
                            Some("Succeeded" | "Failed")
                        )
                    })
                    .filter_map(|p| {
                        let uid = p.metadata.uid.clone().unwrap_or_default();
                        node_of(p)
                            .or_else(|| state.assumed.get(&uid).cloned())
                            .map(|n| (p.clone(), n))
                    })
                    .collect()
            };
            let mut reasons: BTreeMap<&'static str, usize> = BTreeMap::new();
            let mut fits = Vec::new();
            for node in &nodes {
                match node_fits(&pod, node, &nodes, &placed) {
                    Ok(()) => fits.push(node),
                    Err(reason) => *reasons.entry(reason).or_default() += 1,
                }
            }
            // Spread: the feasible node with the fewest of our pods, then by name.
            let load = |n: &Node| {
                placed
                    .iter()
                    .filter(|(_, on)| Some(on) == n.metadata.name.as_ref())
                    .count()
            };
            fits.sort_by_key(|n| (load(n), n.name_any()));
            let name = pod.name_any();
            let uid = pod.metadata.uid.clone().unwrap_or_default();
            match fits.first() {
                Some(node) => {
                    let node = node.name_any();
                    match bind_pod(&self.pods_api(), &name, &uid, &node).await {
                        Ok(_) => {
                            self.log(&format!("bound pod {name} to {node}"));
                            self.lock().assumed.insert(uid, node);
                        }
                        Err(e) => self.log(&format!("binding pod {name} to {node}: {e}")),
                    }
                }
                None => {
                    let detail: Vec<String> =
                        reasons.iter().map(|(r, n)| format!("{n} {r}")).collect();
                    let message = format!(
                        "0/{} nodes are available: {}.",
                        nodes.len(),
                        detail.join(", ")
                    );
                    let already = pod
                        .status
                        .as_ref()
                        .and_then(|s| s.conditions.as_ref())
                        .and_then(|c| c.iter().find(|c| c.type_ == "PodScheduled"))
                        .is_some_and(|c| {
                            c.status == "False" && c.message.as_deref() == Some(message.as_str())
                        });
                    if !already {
                        self.log(&format!("pod {name} unschedulable: {message}"));
                        let status = json!({"status": {"phase": "Pending", "conditions": [{
                            "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                            "message": message, "lastTransitionTime": now()
                        }]}});
                        if let Err(e) = self
                            .pods_api()
                            .patch_status(&name, &PatchParams::default(), &Patch::Merge(status))
                            .await
                        {
                            self.log(&format!("writing PodScheduled=False on {name}: {e}"));
                        }
                    }
                }
            }
        }
        Ok(())
    }

    // ----- kubelet -----

    async fn ensure_bridge(&self, network: &str) -> Result<String> {
        let _guard = self.bridge_lock.lock().await;
        if let Some(b) = self.lock().bridges.get(network) {
            return Ok(b.clone());
        }
        let bridge = format!("br{}", next_id());
        ip(&["-n", &self.fabric, "link", "add", &bridge, "type", "bridge"]).await?;
        ip(&["-n", &self.fabric, "link", "set", &bridge, "up"]).await?;
        self.log(&format!(
            "network {network} is bridge {bridge} in {}",
            self.fabric
        ));
        self.lock()
            .bridges
            .insert(network.to_string(), bridge.clone());
        Ok(bridge)
    }

    async fn create_sandbox(&self, pod: &Pod) -> Result<Sandbox> {
        let pid = std::process::id();
        let n = next_id();
        let netns = format!("vds-{pid}-p{n}");
        // At most 15 characters: "vd" + pid (≤ 6 hex digits) + "h" + counter in hex.
        let host_if = format!("vd{pid:x}h{n:x}");
        record(&self.run, "netns", &netns);
        record(&self.run, "links", &host_if);
        ip(&["netns", "add", &netns]).await?;
        let mut sandbox = Sandbox {
            netns: netns.clone(),
            host_if: host_if.clone(),
            host_ns: self.pod_net.as_ref().map(|_| self.fabric.clone()),
            pod_ip: Ipv4Addr::UNSPECIFIED,
            networks: Vec::new(),
        };
        // Registered before anything else can fail, so clean-up finds the namespace.
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        if let Some(e) = self.lock().pods.get_mut(&uid) {
            e.sandbox = Some(sandbox.clone());
        }
        ip(&["-n", &netns, "link", "set", "lo", "up"]).await?;
        let (host_ip, pod_ip, prefix) = match &self.pod_net {
            None => {
                let (host_ip, pod_ip) = alloc_subnet(n).await?;
                ip(&[
                    "link", "add", &host_if, "type", "veth", "peer", "name", "eth0", "netns",
                    &netns,
                ])
                .await?;
                ip(&["addr", "add", &format!("{host_ip}/30"), "dev", &host_if]).await?;
                ip(&["link", "set", &host_if, "up"]).await?;
                (host_ip, pod_ip, 30)
            }
            Some(net) => {
                let pod_ip = self.alloc_bridged(net, &uid)?;
                ip(&[
                    "-n",
                    &self.fabric,
                    "link",
                    "add",
                    &host_if,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    "eth0",
                    "netns",
                    &netns,
                ])
                .await?;
                ip(&[
                    "-n",
                    &self.fabric,
                    "link",
                    "set",
                    &host_if,
                    "master",
                    &net.bridge,
                    "up",
                ])
                .await?;
                (Ipv4Addr::from(u32::from(net.base) + 1), pod_ip, 24)
            }
        };
        sandbox.pod_ip = pod_ip;
        if let Some(e) = self.lock().pods.get_mut(&uid) {
            e.sandbox = Some(sandbox.clone());
        }
        ip(&[
            "-n",
            &netns,
            "addr",
            "add",
            &format!("{pod_ip}/{prefix}"),
            "dev",
            "eth0",
        ])
        .await?;
        ip(&["-n", &netns, "link", "set", "eth0", "up"]).await?;
        ip(&[
            "-n",
            &netns,
            "route",
            "add",
            "default",
            "via",
            &host_ip.to_string(),
        ])
        .await?;
        for (i, (network, ifname)) in pod_networks(pod, &self.ns)?.into_iter().enumerate() {
            let bridge = self.ensure_bridge(&network).await?;
            let port = format!("p{n}x{i}");
            ip(&[
                "-n",
                &netns,
                "link",
                "add",
                &ifname,
                "type",
                "veth",
                "peer",
                "name",
                &port,
                "netns",
                &self.fabric,
            ])
            .await?;
            ip(&[
                "-n",
                &self.fabric,
                "link",
                "set",
                &port,
                "master",
                &bridge,
                "up",
            ])
            .await?;
            ip(&["-n", &netns, "link", "set", &ifname, "up"]).await?;
            sandbox.networks.push((ifname, network));
        }
        if let Some(e) = self.lock().pods.get_mut(&uid) {
            e.sandbox = Some(sandbox.clone());
        }
        Ok(sandbox)
    }

    /// A free address of the pod bridge's /24 for pod `uid` (none of our sandboxes holds it).
    fn alloc_bridged(&self, net: &PodNet, uid: &str) -> Result<Ipv4Addr> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let state = self.lock();
        let used: HashSet<Ipv4Addr> = state
            .pods
            .iter()
            .filter(|(u, _)| u.as_str() != uid)
            .filter_map(|(_, e)| e.sandbox.as_ref().map(|s| s.pod_ip))
            .collect();
        for _ in 0..253 {
            let host = 2 + NEXT.fetch_add(1, Ordering::Relaxed) % 253;
            let candidate = Ipv4Addr::from(u32::from(net.base) + host);
            if !used.contains(&candidate) {
                return Ok(candidate);
            }
        }
        bail!("the pod network {}/24 is full", net.base)
    }

    /// A listener on 127.0.0.1:6443 inside the pod's namespace whose connections go to the
    /// real apiserver on the host's loopback (TLS passes through untouched).
    fn start_forwarder(&self, netns: &str, cut: watch::Receiver<bool>) -> Result<JoinHandle<()>> {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, POD_APISERVER_PORT));
        let std_listener = listen_in_netns(netns, addr)?;
        let listener = tokio::net::TcpListener::from_std(std_listener)?;
        let upstream = self.cp.apiserver_port;
        Ok(tokio::spawn(async move {
            // Connections end with the forwarder (aborting it drops the set).
            let mut conns = tokio::task::JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        let Ok((inbound, _)) = accepted else { continue };
                        let mut cut = cut.clone();
                        conns.spawn(async move {
                            // A connection made during a partition is held, not refused.
                            if cut.wait_for(|c| !*c).await.is_err() {
                                return;
                            }
                            if let Ok(outbound) = tokio::net::TcpStream::connect((Ipv4Addr::LOCALHOST, upstream)).await {
                                let (in_read, in_write) = inbound.into_split();
                                let (out_read, out_write) = outbound.into_split();
                                tokio::join!(
                                    relay(in_read, out_write, cut.clone()),
                                    relay(out_read, in_write, cut),
                                );
                            }
                        });
                    }
                    Some(_) = conns.join_next(), if !conns.is_empty() => {}
                }
            }
        }))
    }

    /// A kubeconfig for the pod's service account: a TokenRequest bound to the pod, or, if
    /// that fails (no such ServiceAccount: no controller creates them here), a client
    /// certificate with the service account's user name and groups.
    async fn pod_kubeconfig(&self, pod: &Pod, dir: &Path) -> Result<PathBuf> {
        use base64::Engine as _;
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        let sa = pod
            .spec
            .as_ref()
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_else(|| "default".into());
        let request: TokenRequest = serde_json::from_value(json!({
            "spec": {"audiences": [], "expirationSeconds": 86400,
                     "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": pod.name_any(),
                                        "uid": pod.metadata.uid}}
        }))?;
        let sas: Api<ServiceAccount> = Api::namespaced(self.client.clone(), &self.ns);
        let user = match sas
            .create_subresource::<TokenRequest, TokenRequest>(
                "token",
                &sa,
                &PostParams::default(),
                &request,
            )
            .await
        {
            Ok(tr) => match tr.status {
                Some(s) => json!({"token": s.token}),
                None => bail!("TokenRequest for {sa} returned no status"),
            },
            Err(e) => {
                self.log(&format!(
                    "pod {}: TokenRequest for {sa} failed ({e}); using a client certificate",
                    pod.name_any()
                ));
                let ns_group = format!("system:serviceaccounts:{}", self.ns);
                let cert = self.cp.ca.client(
                    &format!("system:serviceaccount:{}:{sa}", self.ns),
                    &["system:serviceaccounts", &ns_group],
                )?;
                json!({"client-certificate-data": b64(&cert.cert), "client-key-data": b64(&cert.key)})
            }
        };
        let config = json!({
            "apiVersion": "v1", "kind": "Config",
            "clusters": [{"name": "sim", "cluster": {
                "server": format!("https://127.0.0.1:{POD_APISERVER_PORT}"),
                "certificate-authority-data": b64(&self.cp.ca.cert_pem())}}],
            "users": [{"name": sa, "user": user}],
            "contexts": [{"name": "sim", "context": {"cluster": "sim", "user": sa, "namespace": self.ns}}],
            "current-context": "sim"
        });
        let path = dir.join("kubeconfig");
        std::fs::write(&path, serde_yaml::to_string(&config)?)?;
        Ok(path)
    }

    /// The local binary and arguments for a container (see [`NodeSim::start`]).
    fn resolve(&self, c: &Container) -> Option<(PathBuf, Vec<String>)> {
        let command = c.command.clone().unwrap_or_default();
        let args = c.args.clone().unwrap_or_default();
        if let Some(image) = c.image.as_deref() {
            let repo = image.split('@').next().unwrap_or(image);
            let last = repo.rsplit('/').next().unwrap_or(repo);
            let short = last.split(':').next().unwrap_or(last);
            if let Some(bin) = self
                .programs
                .get(image)
                .or_else(|| self.programs.get(short))
            {
                // The binary stands for the image's entrypoint: the command follows it.
                return Some((bin.clone(), command.into_iter().chain(args).collect()));
            }
        }
        let first = command.first()?;
        let base = first.rsplit('/').next().unwrap_or(first);
        let bin = self
            .programs
            .get(first)
            .or_else(|| self.programs.get(base))?;
        Some((
            bin.clone(),
            command[1..].iter().cloned().chain(args).collect(),
        ))
    }

    fn env(
        &self,
        pod: &Pod,
        c: &Container,
        pod_ip: Ipv4Addr,
        kubeconfig: &Path,
    ) -> Vec<(String, String)> {
        let mut env = vec![
            (
                "PATH".to_string(),
                std::env::var("PATH").unwrap_or_else(|_| "/usr/sbin:/usr/bin:/sbin:/bin".into()),
            ),
            ("KUBECONFIG".to_string(), kubeconfig.display().to_string()),
        ];
        // Logs of our own binaries are wanted in the pod logs.
        for pass in ["RUST_LOG", "RUST_BACKTRACE"] {
            if let Ok(v) = std::env::var(pass) {
                env.push((pass.to_string(), v));
            }
        }
        for var in c.env.iter().flatten() {
            let value = if let Some(v) = &var.value {
                Some(v.clone())
            } else if let Some(field) = var.value_from.as_ref().and_then(|f| f.field_ref.as_ref()) {
                kubelet::field_value(pod, &self.ns, &field.field_path, &pod_ip.to_string())
            } else {
                None
            };
            match value {
                Some(v) => env.push((var.name.clone(), v)),
                None => self.log(&format!(
                    "pod {}: env {} has a source the simulator does not support",
                    pod.name_any(),
                    var.name
                )),
            }
        }
        env
    }

    /// The environment of a container in in-cluster mode: what a container runtime gives
    /// (PATH, HOME), what the kubelet adds (`KUBERNETES_SERVICE_*`, here the forwarder in
    /// the pod's namespace), `envFrom` and `env` with their sources read now.
    async fn in_cluster_env(
        &self,
        pod: &Pod,
        c: &Container,
        pod_ip: Ipv4Addr,
        dir: &Path,
    ) -> Result<Vec<(String, String)>, NotReady> {
        let port = POD_APISERVER_PORT.to_string();
        let mut env = vec![
            (
                "PATH".to_string(),
                std::env::var("PATH").unwrap_or_else(|_| "/usr/sbin:/usr/bin:/sbin:/bin".into()),
            ),
            ("HOME".to_string(), dir.display().to_string()),
            ("HOSTNAME".to_string(), pod.name_any()),
            ("KUBERNETES_SERVICE_HOST".to_string(), "127.0.0.1".into()),
            ("KUBERNETES_SERVICE_PORT".to_string(), port.clone()),
            ("KUBERNETES_SERVICE_PORT_HTTPS".to_string(), port.clone()),
            (
                "KUBERNETES_PORT".to_string(),
                format!("tcp://127.0.0.1:{port}"),
            ),
        ];
        for pass in ["RUST_LOG", "RUST_BACKTRACE"] {
            if let Ok(v) = std::env::var(pass) {
                env.push((pass.to_string(), v));
            }
        }
        let secrets: Api<k8s_openapi::api::core::v1::Secret> =
            Api::namespaced(self.client.clone(), &self.ns);
        let maps: Api<k8s_openapi::api::core::v1::ConfigMap> =
            Api::namespaced(self.client.clone(), &self.ns);
        let secret_data = |s: k8s_openapi::api::core::v1::Secret| -> BTreeMap<String, String> {
            s.data
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k, String::from_utf8_lossy(&v.0).into_owned()))
                .collect()
        };
        let config_data = |m: k8s_openapi::api::core::v1::ConfigMap| m.data.unwrap_or_default();
        let missing = |kind: &str, name: &str| {
            NotReady::Wait(format!(
                "CreateContainerConfigError: {kind} \"{name}\" not found"
            ))
        };
        for from in c.env_from.iter().flatten() {
            let prefix = from.prefix.clone().unwrap_or_default();
            let data = if let Some(s) = &from.secret_ref {
                match secrets.get_opt(&s.name).await? {
                    Some(secret) => secret_data(secret),
                    None if s.optional.unwrap_or(false) => BTreeMap::new(),
                    None => return Err(missing("secret", &s.name)),
                }
            } else if let Some(m) = &from.config_map_ref {
                match maps.get_opt(&m.name).await? {
                    Some(map) => config_data(map),
                    None if m.optional.unwrap_or(false) => BTreeMap::new(),
                    None => return Err(missing("configmap", &m.name)),
                }
            } else {
                BTreeMap::new()
            };
            env.extend(data.into_iter().map(|(k, v)| (format!("{prefix}{k}"), v)));
        }
        for var in c.env.iter().flatten() {
            let from = var.value_from.as_ref();
            let value = if let Some(v) = &var.value {
                Some(v.clone())
            } else if let Some(field) = from.and_then(|f| f.field_ref.as_ref()) {
                kubelet::field_value(pod, &self.ns, &field.field_path, &pod_ip.to_string())
            } else if let Some(key) = from.and_then(|f| f.secret_key_ref.as_ref()) {
                let found = secrets
                    .get_opt(&key.name)
                    .await?
                    .map(secret_data)
                    .and_then(|d| d.get(&key.key).cloned());
                match found {
                    Some(v) => Some(v),
                    None if key.optional.unwrap_or(false) => None,
                    None => {
                        return Err(missing("secret key", &format!("{}/{}", key.name, key.key)));
                    }
                }
            } else if let Some(key) = from.and_then(|f| f.config_map_key_ref.as_ref()) {
                let found = maps
                    .get_opt(&key.name)
                    .await?
                    .map(config_data)
                    .and_then(|d| d.get(&key.key).cloned());
                match found {
                    Some(v) => Some(v),
                    None if key.optional.unwrap_or(false) => None,
                    None => {
                        return Err(missing(
                            "configmap key",
                            &format!("{}/{}", key.name, key.key),
                        ));
                    }
                }
            } else {
                self.log(&format!(
                    "pod {}: env {} has a source the simulator does not support",
                    pod.name_any(),
                    var.name
                ));
                None
            };
            if let Some(v) = value {
                env.push((var.name.clone(), v));
            }
        }
        Ok(env)
    }

    /// The process of container `c` (of the pod as `launch` shows it).
    async fn container_command(
        &self,
        launch: &Launch,
        c: &Container,
        bin: &Path,
        args: &[String],
        sandbox: &Sandbox,
        dir: &Path,
    ) -> Result<std::process::Command, NotReady> {
        match launch {
            Launch::Kubeconfig { pod, kubeconfig } => {
                let mut cmd = netns_command(&sandbox.netns, bin, args, dir);
                cmd.envs(self.env(pod, c, sandbox.pod_ip, kubeconfig));
                Ok(cmd)
            }
            Launch::InCluster(volumes) => {
                let env = self
                    .in_cluster_env(volumes.pod(), c, sandbox.pod_ip, dir)
                    .await?;
                let mounts = volumes.mounts(c)?;
                let stage = dir.join(format!("stage-{}", c.name));
                Ok(kubelet::command(
                    &sandbox.netns,
                    bin,
                    args,
                    &env,
                    &mounts,
                    &stage,
                    c.working_dir.as_deref(),
                )?)
            }
        }
    }

    /// In-cluster mode: the pod's volumes, once everything they need exists; the pod shows
    /// ContainerCreating (with the kubelet's message) meanwhile. `None`: told to stop.
    async fn wait_volumes(
        &self,
        pod: &Pod,
        dir: &Path,
        sandbox: &Sandbox,
        base: &Value,
        stop: &mut watch::Receiver<Stop>,
    ) -> Result<Option<kubelet::PodVolumes>> {
        let name = pod.name_any();
        let mut said = String::new();
        loop {
            match kubelet::PodVolumes::new(
                &self.client,
                pod,
                &self.cp.ca.cert_pem(),
                &sandbox.pod_ip.to_string(),
                &dir.join("volumes"),
            )
            .await
            {
                Ok(v) => return Ok(Some(v)),
                Err(NotReady::Fail(e)) => {
                    let message = format!("{e:#}");
                    let mut status = base.clone();
                    status["phase"] = "Pending".into();
                    status["containerStatuses"] = json!(
                        pod.spec
                            .iter()
                            .flat_map(|s| s.containers.iter())
                            .map(|c| waiting_status(c, "CreateContainerConfigError", &message))
                            .collect::<Vec<_>>()
                    );
                    self.patch_pod_status(&name, &status).await;
                    return Err(e);
                }
                Err(NotReady::Wait(message)) => {
                    if message != said {
                        self.log(&format!("pod {name}: {message}"));
                        let mut status = base.clone();
                        status["phase"] = "Pending".into();
                        status["containerStatuses"] = json!(
                            pod.spec
                                .iter()
                                .flat_map(|s| s.containers.iter())
                                .map(|c| waiting_status(c, "ContainerCreating", &message))
                                .collect::<Vec<_>>()
                        );
                        self.patch_pod_status(&name, &status).await;
                        said = message;
                    }
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                _ = stop.changed() => return Ok(None),
            }
        }
    }

    /// Starts a container's process unless the pod's node was lost meanwhile; the lock makes
    /// this atomic with [`NodeSim::lose_node`].
    fn spawn_container(
        &self,
        uid: &str,
        name: &str,
        cmd: std::process::Command,
        log: &Path,
    ) -> Result<Option<u32>> {
        let mut state = self.lock();
        let Some(entry) = state.pods.get_mut(uid) else {
            return Ok(None);
        };
        if entry.lost {
            return Ok(None);
        }
        let proc = Process::spawn(&format!("{}/{name}", entry.name), cmd, log, &self.run)?;
        let pid = proc.id();
        entry.procs.insert(name.to_string(), proc);
        entry.logs.insert(name.to_string(), log.to_path_buf());
        Ok(Some(pid))
    }

    /// The exit status of a container's process, if it has exited (it is then forgotten).
    fn poll_exit(&self, uid: &str, name: &str) -> Option<std::process::ExitStatus> {
        let mut state = self.lock();
        let entry = state.pods.get_mut(uid)?;
        let status = entry.procs.get_mut(name)?.exited()?;
        entry.procs.remove(name);
        Some(status)
    }

    /// Kills a container's process (a failed liveness or startup probe); its exit is then
    /// seen as any other.
    fn kill_container(&self, uid: &str, name: &str) {
        if let Some(pid) = self
            .lock()
            .pods
            .get(uid)
            .and_then(|e| e.procs.get(name))
            .map(Process::id)
        {
            // SAFETY: plain syscall on the pid of a child we have not reaped yet.
            unsafe {
                libc::kill(pid as i32, libc::SIGKILL);
            }
        }
    }

    async fn run_pod(self: Arc<Self>, pod: Pod, mut stop: watch::Receiver<Stop>) {
        let name = pod.name_any();
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        let result = self.run_pod_inner(&pod, &mut stop).await;
        if let Err(e) = &result {
            self.log(&format!("pod {name}: {e:#}"));
        }
        // Whatever happened, a deletion still has to be finished (unless the node is lost).
        loop {
            let current = *stop.borrow_and_update();
            match current {
                Stop::Lost => return,
                Stop::Delete { grace, declared } => {
                    if self.in_cluster {
                        self.pre_stop(&pod, &uid, declared.min(MAX_PRE_STOP)).await;
                    }
                    self.terminate(&uid, grace).await;
                    let entry = self.lock().pods.remove(&uid);
                    if let Some(mut entry) = entry {
                        // This very task is running: do not abort it.
                        entry.task = None;
                        destroy_entry(entry);
                    }
                    self.finish_delete(&name, &uid).await;
                    return;
                }
                Stop::Run => {
                    if stop.changed().await.is_err() {
                        return;
                    }
                }
            }
        }
    }

    /// The preStop hooks of the pod's running containers, all at once, within `limit`.
    async fn pre_stop(&self, pod: &Pod, uid: &str, limit: Duration) {
        let (running, sandbox) = {
            let state = self.lock();
            match state.pods.get(uid) {
                Some(e) => (
                    e.procs.keys().cloned().collect::<HashSet<String>>(),
                    e.sandbox.clone(),
                ),
                None => return,
            }
        };
        let Some(sandbox) = sandbox else { return };
        let hooks = pod
            .spec
            .iter()
            .flat_map(|s| s.containers.iter())
            .filter(|c| running.contains(&c.name))
            .filter_map(|c| {
                let hook = c.lifecycle.as_ref()?.pre_stop.clone()?;
                Some((c.clone(), hook))
            })
            .map(|(c, hook)| {
                let sandbox = sandbox.clone();
                async move {
                    if let Some(sleep) = &hook.sleep {
                        tokio::time::sleep(Duration::from_secs(sleep.seconds.max(0) as u64)).await;
                    } else if let Some(http) = &hook.http_get {
                        let probe = Probe {
                            http_get: Some(http.clone()),
                            ..Probe::default()
                        };
                        run_probe(&probe, &c, sandbox.pod_ip, &sandbox.netns).await;
                    } else if let Some(exec) = &hook.exec {
                        let _ = tokio::process::Command::new("ip")
                            .args(["netns", "exec", &sandbox.netns])
                            .args(exec.command.iter().flatten())
                            .kill_on_drop(true)
                            .status()
                            .await;
                    }
                }
            })
            .collect::<Vec<_>>();
        if hooks.is_empty() {
            return;
        }
        self.log(&format!(
            "pod {}: running {} preStop hook(s)",
            pod.name_any(),
            hooks.len()
        ));
        let _ = tokio::time::timeout(limit, futures::future::join_all(hooks)).await;
    }

    /// SIGTERM, up to `grace` for the processes to exit, then SIGKILL.
    async fn terminate(&self, uid: &str, grace: Duration) {
        let pids: Vec<u32> = self
            .lock()
            .pods
            .get(uid)
            .map(|e| e.procs.values().map(Process::id).collect())
            .unwrap_or_default();
        for pid in &pids {
            // SAFETY: plain syscall on the pid of a child we have not reaped yet.
            unsafe {
                libc::kill(*pid as i32, libc::SIGTERM);
            }
        }
        let deadline = Instant::now() + grace;
        loop {
            let running = {
                let mut state = self.lock();
                match state.pods.get_mut(uid) {
                    Some(e) => {
                        e.procs.retain(|_, p| p.exited().is_none());
                        !e.procs.is_empty()
                    }
                    None => false,
                }
            };
            if !running || Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if let Some(e) = self.lock().pods.get_mut(uid) {
            for proc in e.procs.values_mut() {
                proc.kill();
            }
            e.procs.clear();
            if let Some(f) = e.forwarder.take() {
                f.abort();
            }
        }
    }

    async fn patch_pod_status(&self, name: &str, status: &Value) {
        let patch = json!({"status": status});
        if let Err(e) = self
            .pods_api()
            .patch_status(name, &PatchParams::default(), &Patch::Merge(patch))
            .await
        {
            self.log(&format!("writing status of pod {name}: {e}"));
        }
    }

    /// Runs the pod until it is told to stop (or reaches a terminal phase and is told so).
    async fn run_pod_inner(&self, pod: &Pod, stop: &mut watch::Receiver<Stop>) -> Result<()> {
        let name = pod.name_any();
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        let node = pod
            .spec
            .as_ref()
            .and_then(|s| s.node_name.clone())
            .unwrap_or_default();
        let dir = self
            .dir
            .join(format!("{name}-{}", &uid[..uid.len().min(8)]));
        std::fs::create_dir_all(&dir)?;
        let sandbox = self.create_sandbox(pod).await?;
        // No entry (the pod was removed meanwhile): a path nobody can cut.
        let cut = self
            .lock()
            .pods
            .get(&uid)
            .map(|e| e.apiserver_cut.subscribe())
            .unwrap_or_else(|| watch::Sender::new(false).subscribe());
        let forwarder = self.start_forwarder(&sandbox.netns, cut)?;
        if let Some(e) = self.lock().pods.get_mut(&uid) {
            e.forwarder = Some(forwarder);
        }
        let start_time = now();
        let mut base = json!({
            "hostIP": "127.0.0.1", "hostIPs": [{"ip": "127.0.0.1"}],
            "podIP": sandbox.pod_ip.to_string(), "podIPs": [{"ip": sandbox.pod_ip.to_string()}],
            "startTime": start_time,
        });
        let mut launch = if self.in_cluster {
            match self.wait_volumes(pod, &dir, &sandbox, &base, stop).await? {
                Some(volumes) => Launch::InCluster(Box::new(volumes)),
                None => return Ok(()),
            }
        } else {
            Launch::Kubeconfig {
                pod: Box::new(pod.clone()),
                kubeconfig: self.pod_kubeconfig(pod, &dir).await?,
            }
        };
        // The containers as they run (in-cluster mode: with the token volume's mounts).
        let spec = launch.pod().spec.clone().context("pod without spec")?;
        let restart_policy = spec
            .restart_policy
            .clone()
            .unwrap_or_else(|| "Always".into());
        self.log(&format!(
            "pod {name} on {node}: netns {} ip {}",
            sandbox.netns, sandbox.pod_ip
        ));

        let mut init_statuses = Vec::new();
        for c in spec.init_containers.iter().flatten() {
            let Some((bin, args)) = self.resolve(c) else {
                let status = waiting_status(
                    c,
                    "ErrImageNeverPull",
                    "no program for this image in the node simulator",
                );
                base["phase"] = "Pending".into();
                base["initContainerStatuses"] = json!([status]);
                self.patch_pod_status(&name, &base).await;
                return Ok(());
            };
            let mut restarts = 0;
            loop {
                let cmd = match self
                    .container_command(&launch, c, &bin, &args, &sandbox, &dir)
                    .await
                {
                    Ok(cmd) => cmd,
                    Err(NotReady::Fail(e)) => return Err(e),
                    Err(NotReady::Wait(message)) => {
                        self.log(&format!("pod {name} init container {}: {message}", c.name));
                        tokio::select! {
                            _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                            _ = stop.changed() => return Ok(()),
                        }
                    }
                };
                let log = dir.join(format!("{}.log", c.name));
                if self.spawn_container(&uid, &c.name, cmd, &log)?.is_none() {
                    return Ok(());
                }
                base["phase"] = "Pending".into();
                let running = json!({"name": c.name, "image": c.image, "imageID": "", "ready": false,
                                     "restartCount": restarts, "state": {"running": {"startedAt": now()}}});
                base["initContainerStatuses"] = json!(
                    init_statuses
                        .iter()
                        .cloned()
                        .chain([running])
                        .collect::<Vec<Value>>()
                );
                self.patch_pod_status(&name, &base).await;
                let status = loop {
                    if let Some(s) = self.poll_exit(&uid, &c.name) {
                        break s;
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(TICK) => {}
                        _ = stop.changed() => return Ok(()),
                    }
                };
                let code = exit_code(status);
                if code == 0 {
                    init_statuses.push(json!({"name": c.name, "image": c.image, "imageID": "", "ready": true,
                        "restartCount": restarts,
                        "state": {"terminated": {"exitCode": 0, "reason": "Completed", "finishedAt": now()}}}));
                    break;
                }
                if restart_policy == "Never" {
                    base["phase"] = "Failed".into();
                    self.patch_pod_status(&name, &base).await;
                    return Ok(());
                }
                restarts += 1;
                tokio::select! {
                    _ = tokio::time::sleep(backoff(restarts)) => {}
                    _ = stop.changed() => return Ok(()),
                }
            }
        }
        if !init_statuses.is_empty() {
            base["initContainerStatuses"] = json!(init_statuses);
        }

        let mut containers = Vec::new();
        for c in &spec.containers {
            let Some((bin, args)) = self.resolve(c) else {
                base["phase"] = "Pending".into();
                base["containerStatuses"] = json!([waiting_status(
                    c,
                    "ErrImageNeverPull",
                    "no program for this image in the node simulator"
                )]);
                self.patch_pod_status(&name, &base).await;
                self.log(&format!(
                    "pod {name}: no program for container {} (image {:?})",
                    c.name, c.image
                ));
                return Ok(());
            };
            containers.push(ContainerRun {
                spec: c.clone(),
                bin,
                args,
                state: json!({"waiting": {"reason": "ContainerCreating"}}),
                last_state: json!({}),
                restarts: 0,
                ready: false,
                started: false,
                done: false,
                next_start: Some(Instant::now()),
                next_probe: Instant::now(),
                successes: 0,
                failures: 0,
                started_at: Instant::now(),
                startup_ok: false,
                next_live: Instant::now(),
                live_failures: 0,
            });
        }
        let mut written = Value::Null;
        let mut sync_failing = false;
        loop {
            // In-cluster mode: Secrets, ConfigMaps and tokens reach the volumes.
            if let Launch::InCluster(volumes) = &mut launch
                && volumes.due(VOLUME_SYNC)
            {
                match volumes.sync(&self.client).await {
                    Ok(()) => sync_failing = false,
                    Err(e) => {
                        if !sync_failing {
                            self.log(&format!("pod {name}: syncing volumes: {e:?}"));
                        }
                        sync_failing = true;
                    }
                }
            }
            for c in containers.iter_mut() {
                // Exit: record it and decide on a restart.
                if c.started
                    && let Some(status) = self.poll_exit(&uid, &c.spec.name)
                {
                    let code = exit_code(status);
                    let reason = if code == 0 { "Completed" } else { "Error" };
                    let started_at = c.state["running"]["startedAt"].clone();
                    let terminated = json!({"terminated": {"exitCode": code, "reason": reason,
                                            "startedAt": started_at, "finishedAt": now()}});
                    self.log(&format!(
                        "pod {name} container {} exited with {code}",
                        c.spec.name
                    ));
                    c.started = false;
                    c.ready = false;
                    let restart = match restart_policy.as_str() {
                        "Always" => true,
                        "OnFailure" => code != 0,
                        _ => false,
                    };
                    if restart {
                        c.restarts += 1;
                        c.last_state = terminated;
                        c.state = json!({"waiting": {"reason": "CrashLoopBackOff",
                            "message": format!("back-off restarting failed container {}", c.spec.name)}});
                        c.next_start = Some(Instant::now() + backoff(c.restarts));
                    } else {
                        c.state = terminated;
                        c.done = true;
                    }
                }
                // (Re)start when due.
                if c.next_start.is_some_and(|t| Instant::now() >= t) {
                    c.next_start = None;
                    let cmd = match self
                        .container_command(&launch, &c.spec, &c.bin, &c.args, &sandbox, &dir)
                        .await
                    {
                        Ok(cmd) => Some(cmd),
                        Err(NotReady::Wait(message)) => {
                            c.state = json!({"waiting": {"reason": "CreateContainerConfigError",
                                                         "message": message}});
                            c.next_start = Some(Instant::now() + Duration::from_secs(1));
                            None
                        }
                        Err(NotReady::Fail(e)) => {
                            c.state = json!({"waiting": {"reason": "CreateContainerError",
                                                         "message": format!("{e:#}")}});
                            c.next_start = Some(Instant::now() + Duration::from_secs(2));
                            self.log(&format!("pod {name} container {}: {e:#}", c.spec.name));
                            None
                        }
                    };
                    if let Some(cmd) = cmd {
                        let log = dir.join(format!("{}.log", c.spec.name));
                        match self.spawn_container(&uid, &c.spec.name, cmd, &log)? {
                            Some(pid) => {
                                self.log(&format!(
                                    "pod {name} container {} started: pid {pid}",
                                    c.spec.name
                                ));
                                c.started = true;
                                c.state = json!({"running": {"startedAt": now()}});
                                c.successes = 0;
                                c.failures = 0;
                                c.started_at = Instant::now();
                                c.live_failures = 0;
                                // Only the in-cluster kubelet runs startup and liveness probes.
                                c.startup_ok = !self.in_cluster || c.spec.startup_probe.is_none();
                                let first = if c.startup_ok {
                                    c.spec.readiness_probe.as_ref()
                                } else {
                                    c.spec.startup_probe.as_ref()
                                };
                                c.next_probe = Instant::now() + initial_delay(first);
                                c.next_live = Instant::now()
                                    + c.spec
                                        .liveness_probe
                                        .as_ref()
                                        .map(|p| full_period(p) + full_initial_delay(p))
                                        .unwrap_or_default();
                            }
                            None => return Ok(()),
                        }
                    }
                }
                if c.started && !c.startup_ok {
                    // Startup probe: nothing else runs until it passes; the container is
                    // killed when it has not passed within failureThreshold × period.
                    if let Some(probe) = &c.spec.startup_probe
                        && Instant::now() >= c.next_probe
                    {
                        c.next_probe = Instant::now() + period(probe);
                        if run_probe(probe, &c.spec, sandbox.pod_ip, &sandbox.netns).await {
                            c.startup_ok = true;
                            c.next_probe = Instant::now();
                        } else {
                            let budget = full_initial_delay(probe)
                                + full_period(probe)
                                    * probe.failure_threshold.unwrap_or(3).max(1) as u32;
                            if c.started_at.elapsed() > budget {
                                self.log(&format!(
                                    "pod {name} container {} failed its startup probe: killed",
                                    c.spec.name
                                ));
                                self.kill_container(&uid, &c.spec.name);
                            }
                        }
                    }
                    continue;
                }
                // Liveness (in-cluster mode), at the probe's own period.
                if c.started
                    && self.in_cluster
                    && let Some(probe) = &c.spec.liveness_probe
                    && Instant::now() >= c.next_live
                {
                    c.next_live = Instant::now() + full_period(probe);
                    if run_probe(probe, &c.spec, sandbox.pod_ip, &sandbox.netns).await {
                        c.live_failures = 0;
                    } else {
                        c.live_failures += 1;
                        if c.live_failures >= probe.failure_threshold.unwrap_or(3).max(1) as u32 {
                            self.log(&format!(
                                "pod {name} container {} failed its liveness probe: killed",
                                c.spec.name
                            ));
                            c.live_failures = 0;
                            self.kill_container(&uid, &c.spec.name);
                        }
                    }
                }
                // Readiness.
                if c.started {
                    match &c.spec.readiness_probe {
                        None => c.ready = true,
                        Some(probe) if Instant::now() >= c.next_probe => {
                            c.next_probe = Instant::now() + period(probe);
                            let ok =
                                run_probe(probe, &c.spec, sandbox.pod_ip, &sandbox.netns).await;
                            if ok {
                                c.successes += 1;
                                c.failures = 0;
                                if c.successes >= probe.success_threshold.unwrap_or(1).max(1) as u32
                                {
                                    c.ready = true;
                                }
                            } else {
                                c.failures += 1;
                                c.successes = 0;
                                if c.failures >= probe.failure_threshold.unwrap_or(3).max(1) as u32
                                {
                                    c.ready = false;
                                }
                            }
                        }
                        Some(_) => {}
                    }
                }
            }
            let all_done = containers.iter().all(|c| c.done);
            let phase = if all_done {
                if containers
                    .iter()
                    .all(|c| c.state["terminated"]["exitCode"] == 0)
                {
                    "Succeeded"
                } else {
                    "Failed"
                }
            } else if containers.iter().any(|c| c.started || c.restarts > 0) {
                "Running"
            } else {
                "Pending"
            };
            let ready = !all_done && containers.iter().all(|c| c.ready);
            let cond =
                |t: &str, ok: bool| json!({"type": t, "status": if ok { "True" } else { "False" }});
            let mut status = base.clone();
            status["phase"] = phase.into();
            status["conditions"] = json!([
                cond("PodScheduled", true),
                cond("Initialized", true),
                cond("ContainersReady", ready),
                cond("Ready", ready),
            ]);
            status["containerStatuses"] = json!(
                containers
                    .iter()
                    .map(ContainerRun::status)
                    .collect::<Vec<_>>()
            );
            if *stop.borrow() != Stop::Run {
                // Lost or being deleted: the kubelet writes nothing more for this run.
                return Ok(());
            }
            if status != written {
                // Transition times are stamped only when something changed.
                let mut stamped = status.clone();
                if let Some(conds) = stamped["conditions"].as_array_mut() {
                    for c in conds {
                        c["lastTransitionTime"] = now();
                    }
                }
                self.patch_pod_status(&name, &stamped).await;
                written = status;
            }
            if all_done {
                // Terminal: the kubelet tears the sandbox's processes down; keep the
                // namespace until the pod is deleted.
                return Ok(());
            }
            tokio::select! {
                _ = tokio::time::sleep(TICK) => {}
                _ = stop.changed() => return Ok(()),
            }
        }
    }
}

/// How a pod's containers are run: with a kubeconfig file (the simulator's original mode),
/// or as a cluster's kubelet does ([`NodeSim::start_in_cluster`]).
enum Launch {
    Kubeconfig { pod: Box<Pod>, kubeconfig: PathBuf },
    InCluster(Box<kubelet::PodVolumes>),
}

impl Launch {
    /// The pod as its containers see it.
    fn pod(&self) -> &Pod {
        match self {
            Launch::Kubeconfig { pod, .. } => pod,
            Launch::InCluster(v) => v.pod(),
        }
    }
}

struct ContainerRun {
    spec: Container,
    bin: PathBuf,
    args: Vec<String>,
    state: Value,
    last_state: Value,
    restarts: u32,
    ready: bool,
    started: bool,
    done: bool,
    next_start: Option<Instant>,
    next_probe: Instant,
    successes: u32,
    failures: u32,
    /// When the current process started.
    started_at: Instant,
    /// The startup probe passed (or there is none).
    startup_ok: bool,
    next_live: Instant,
    live_failures: u32,
}

impl ContainerRun {
    fn status(&self) -> Value {
        json!({"name": self.spec.name, "image": self.spec.image, "imageID": "",
               "containerID": format!("sim://{}", self.bin.display()),
               "ready": self.ready, "started": self.started && self.startup_ok,
               "restartCount": self.restarts,
               "state": self.state, "lastState": self.last_state})
    }
}

fn waiting_status(c: &Container, reason: &str, message: &str) -> Value {
    json!({"name": c.name, "image": c.image, "imageID": "", "ready": false, "restartCount": 0,
           "state": {"waiting": {"reason": reason, "message": message}}})
}

/// The kubelet's crash-loop back-off, shortened for tests: 200 ms doubling up to 2 s.
fn backoff(restarts: u32) -> Duration {
    Duration::from_millis(200u64.saturating_mul(1 << restarts.min(4).saturating_sub(1)))
        .min(Duration::from_secs(2))
}

fn exit_code(status: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(-1)
}

fn period(probe: &Probe) -> Duration {
    Duration::from_secs(probe.period_seconds.unwrap_or(10).max(1) as u64).min(MAX_PROBE_PERIOD)
}

/// A probe's own period (liveness probes and startup budgets are not shortened).
fn full_period(probe: &Probe) -> Duration {
    Duration::from_secs(probe.period_seconds.unwrap_or(10).max(1) as u64)
}

fn full_initial_delay(probe: &Probe) -> Duration {
    Duration::from_secs(probe.initial_delay_seconds.unwrap_or(0).max(0) as u64)
}

fn initial_delay(probe: Option<&Probe>) -> Duration {
    let secs = probe
        .and_then(|p| p.initial_delay_seconds)
        .unwrap_or(0)
        .max(0) as u64;
    Duration::from_secs(secs).min(MAX_PROBE_PERIOD)
}

fn netns_command(netns: &str, bin: &Path, args: &[String], dir: &Path) -> std::process::Command {
    let mut cmd = std::process::Command::new("ip");
    cmd.args(["netns", "exec", netns]).arg(bin).args(args);
    cmd.env_clear().current_dir(dir);
    // Tools that want a home (kubectl's cache) get the pod's directory.
    cmd.env("HOME", dir);
    cmd
}

fn node_of(pod: &Pod) -> Option<String> {
    pod.spec
        .as_ref()
        .and_then(|s| s.node_name.clone())
        .filter(|n| !n.is_empty())
}

/// Resolves a probe port (a number, or the name of a container port).
fn probe_port(port: &IntOrString, c: &Container) -> Option<u16> {
    match port {
        IntOrString::Int(p) => u16::try_from(*p).ok(),
        IntOrString::String(name) => c
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some(name.as_str()))
            .and_then(|p| u16::try_from(p.container_port).ok()),
    }
}

/// One probe attempt, from the root namespace (as the kubelet probes from the host).
async fn run_probe(probe: &Probe, c: &Container, ip: Ipv4Addr, netns: &str) -> bool {
    let timeout = Duration::from_secs(probe.timeout_seconds.unwrap_or(1).max(1) as u64);
    let attempt = async {
        if let Some(http) = &probe.http_get {
            let port = probe_port(&http.port, c)?;
            let path = http.path.as_deref().unwrap_or("/");
            if http.scheme.as_deref() == Some("HTTPS") {
                // TLS without verifying the certificate, as the kubelet probes.
                let host = http.host.clone().unwrap_or_else(|| ip.to_string());
                let code = kubelet::https_status(ip, port, path, &host).await?;
                return Some((200..400).contains(&code));
            }
            let mut stream = tokio::net::TcpStream::connect((ip, port)).await.ok()?;
            let request = format!(
                "GET {path} HTTP/1.0\r\nHost: {ip}:{port}\r\nUser-Agent: kube-probe/nodesim\r\n\r\n"
            );
            stream.write_all(request.as_bytes()).await.ok()?;
            let mut buf = [0u8; 64];
            let mut len = 0;
            while len < 12 {
                let n = stream.read(&mut buf[len..]).await.ok()?;
                if n == 0 {
                    break;
                }
                len += n;
            }
            let head = String::from_utf8_lossy(&buf[..len]);
            let code: u16 = head.split_whitespace().nth(1)?.parse().ok()?;
            Some((200..400).contains(&code))
        } else if let Some(tcp) = &probe.tcp_socket {
            let port = probe_port(&tcp.port, c)?;
            Some(tokio::net::TcpStream::connect((ip, port)).await.is_ok())
        } else if let Some(exec) = &probe.exec {
            let command = exec.command.clone().unwrap_or_default();
            let status = tokio::process::Command::new("ip")
                .args(["netns", "exec", netns])
                .args(&command)
                .kill_on_drop(true)
                .status()
                .await
                .ok()?;
            Some(status.success())
        } else {
            // gRPC probes are not simulated: count them as passing.
            Some(true)
        }
    };
    matches!(tokio::time::timeout(timeout, attempt).await, Ok(Some(true)))
}

/// A TCP listener created inside network namespace `netns`: a socket belongs to the
/// namespace of the thread that creates it, so a short-lived thread enters the namespace,
/// binds, and exits (tokio's threads never change namespace).
fn listen_in_netns(netns: &str, addr: SocketAddr) -> Result<std::net::TcpListener> {
    let path = format!("/run/netns/{netns}");
    std::thread::scope(|s| {
        s.spawn(|| -> Result<std::net::TcpListener> {
            let file = std::fs::File::open(&path).with_context(|| format!("opening {path}"))?;
            // SAFETY: setns on a valid fd affects only this (scoped, short-lived) thread.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                bail!("setns into {netns}: {}", std::io::Error::last_os_error());
            }
            let listener = std::net::TcpListener::bind(addr)
                .with_context(|| format!("binding {addr} in {netns}"))?;
            listener.set_nonblocking(true)?;
            Ok(listener)
        })
        .join()
        .map_err(|_| anyhow::anyhow!("netns listener thread panicked"))?
    })
}

/// A free /30 of 10.254.0.0/16 for pod `n`: slots start at an offset derived from our pid so
/// that concurrent test processes rarely meet, and a slot whose addresses the root namespace
/// already holds is skipped.
async fn alloc_subnet(n: u32) -> Result<(Ipv4Addr, Ipv4Addr)> {
    let start = std::process::id().wrapping_mul(613);
    for i in 0..64 {
        let slot = start.wrapping_add(n).wrapping_add(i * 7919) % POD_NET_SLOTS;
        let net = Ipv4Addr::from(POD_NET_BASE + slot * 4);
        let out = tokio::process::Command::new("ip")
            .args(["-4", "-o", "addr", "show", "to", &format!("{net}/30")])
            .output()
            .await?;
        if out.status.success() && out.stdout.is_empty() {
            let base = u32::from(net);
            return Ok((Ipv4Addr::from(base + 1), Ipv4Addr::from(base + 2)));
        }
    }
    bail!("no free /30 in 10.254.0.0/16")
}

/// The pod's Multus networks as ("ns/name", interface): the JSON list form, or the short
/// comma-separated `ns/name@if` form. Interfaces default to net1, net2, … as Multus names them.
fn pod_networks(pod: &Pod, pod_ns: &str) -> Result<Vec<(String, String)>> {
    let Some(text) = pod.annotations().get(NETWORKS_ANNOTATION) else {
        return Ok(Vec::new());
    };
    let text = text.trim();
    let mut out = Vec::new();
    if text.starts_with('[') {
        let list: Vec<Value> =
            serde_json::from_str(text).with_context(|| format!("parsing {NETWORKS_ANNOTATION}"))?;
        for (i, item) in list.iter().enumerate() {
            let name = item["name"].as_str().context("network without a name")?;
            let ns = item["namespace"].as_str().unwrap_or(pod_ns);
            let ifname = item["interface"]
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| format!("net{}", i + 1));
            out.push((format!("{ns}/{name}"), ifname));
        }
    } else {
        for (i, item) in text
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .enumerate()
        {
            let (net, ifname) = match item.split_once('@') {
                Some((n, i)) => (n, i.to_string()),
                None => (item, format!("net{}", i + 1)),
            };
            let key = if net.contains('/') {
                net.to_string()
            } else {
                format!("{pod_ns}/{net}")
            };
            out.push((key, ifname));
        }
    }
    for (_, ifname) in &out {
        if ifname.is_empty() || ifname.len() > 15 || ifname == "eth0" || ifname == "lo" {
            bail!("invalid interface name {ifname:?} in {NETWORKS_ANNOTATION}");
        }
    }
    Ok(out)
}

// ----- scheduling predicates -----

fn node_ready(node: &Node) -> bool {
    node.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| c.iter().find(|c| c.type_ == "Ready"))
        .is_some_and(|c| c.status == "True")
}

fn tolerates(tolerations: &[Toleration], taint: &Taint) -> bool {
    tolerations.iter().any(|t| {
        let effect_ok = t
            .effect
            .as_deref()
            .is_none_or(|e| e.is_empty() || e == taint.effect);
        let key_ok = match t.key.as_deref() {
            None | Some("") => t.operator.as_deref() == Some("Exists"),
            Some(k) => k == taint.key,
        };
        let value_ok = match t.operator.as_deref() {
            Some("Exists") => true,
            _ => t.value.as_deref().unwrap_or("") == taint.value.as_deref().unwrap_or(""),
        };
        effect_ok && key_ok && value_ok
    })
}

fn requirement_matches(req: &NodeSelectorRequirement, value: Option<&str>) -> bool {
    let values = req.values.clone().unwrap_or_default();
    match req.operator.as_str() {
        "In" => value.is_some_and(|v| values.iter().any(|x| x == v)),
        "NotIn" => value.is_none_or(|v| !values.iter().any(|x| x == v)),
        "Exists" => value.is_some(),
        "DoesNotExist" => value.is_none(),
        op @ ("Gt" | "Lt") => {
            let (Some(v), Some(bound)) = (
                value.and_then(|v| v.parse::<i64>().ok()),
                values.first().and_then(|b| b.parse::<i64>().ok()),
            ) else {
                return false;
            };
            if op == "Gt" { v > bound } else { v < bound }
        }
        _ => false,
    }
}

fn node_affinity_matches(pod: &Pod, node: &Node) -> bool {
    let spec = match pod.spec.as_ref() {
        Some(s) => s,
        None => return false,
    };
    let labels = node.labels();
    if let Some(sel) = &spec.node_selector
        && sel.iter().any(|(k, v)| labels.get(k) != Some(v))
    {
        return false;
    }
    let Some(required) = spec
        .affinity
        .as_ref()
        .and_then(|a| a.node_affinity.as_ref())
        .and_then(|n| {
            n.required_during_scheduling_ignored_during_execution
                .as_ref()
        })
    else {
        return true;
    };
    // Terms are ORed, the requirements of a term ANDed; an empty term matches nothing.
    required.node_selector_terms.iter().any(|term| {
        let exprs = term.match_expressions.as_deref().unwrap_or_default();
        let fields = term.match_fields.as_deref().unwrap_or_default();
        if exprs.is_empty() && fields.is_empty() {
            return false;
        }
        exprs
            .iter()
            .all(|r| requirement_matches(r, labels.get(&r.key).map(String::as_str)))
            && fields.iter().all(|r| {
                let v = if r.key == "metadata.name" {
                    node.metadata.name.as_deref()
                } else {
                    None
                };
                requirement_matches(r, v)
            })
    })
}

fn label_selector_matches(sel: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    let labels_ok = sel
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    let exprs_ok = sel.match_expressions.iter().flatten().all(|r| {
        let value = labels.get(&r.key);
        let values = r.values.clone().unwrap_or_default();
        match r.operator.as_str() {
            "In" => value.is_some_and(|v| values.contains(v)),
            "NotIn" => value.is_none_or(|v| !values.contains(v)),
            "Exists" => value.is_some(),
            "DoesNotExist" => value.is_none(),
            _ => false,
        }
    });
    labels_ok && exprs_ok
}

/// Does `term` (of a pod in `term_ns`) select `other`? Only the test namespace's pods are
/// known to the simulator.
fn term_selects(term: &PodAffinityTerm, term_ns: &str, other: &Pod) -> bool {
    let Some(sel) = &term.label_selector else {
        return false; // a null selector matches no pods
    };
    let other_ns = other.namespace().unwrap_or_default();
    let ns_ok = match (&term.namespaces, &term.namespace_selector) {
        (Some(list), _) if !list.is_empty() => list.contains(&other_ns),
        (_, Some(ns_sel)) => {
            let mut ns_labels = BTreeMap::new();
            ns_labels.insert("kubernetes.io/metadata.name".to_string(), other_ns.clone());
            label_selector_matches(ns_sel, &ns_labels)
        }
        _ => other_ns == term_ns,
    };
    ns_ok && label_selector_matches(sel, other.labels())
}

fn anti_affinity_terms(pod: &Pod) -> Vec<PodAffinityTerm> {
    pod.spec
        .as_ref()
        .and_then(|s| s.affinity.as_ref())
        .and_then(|a| a.pod_anti_affinity.as_ref())
        .and_then(|a| {
            a.required_during_scheduling_ignored_during_execution
                .clone()
        })
        .unwrap_or_default()
}

/// Whether `pod` may go to `node`, or the reason it may not (kube-scheduler's wording).
fn node_fits(
    pod: &Pod,
    node: &Node,
    nodes: &[Node],
    placed: &[(Pod, String)],
) -> Result<(), &'static str> {
    if !node_ready(node) {
        return Err("node(s) were not ready");
    }
    let tolerations = pod
        .spec
        .as_ref()
        .and_then(|s| s.tolerations.clone())
        .unwrap_or_default();
    let taints = node
        .spec
        .as_ref()
        .and_then(|s| s.taints.clone())
        .unwrap_or_default();
    if taints
        .iter()
        .filter(|t| t.effect == "NoSchedule" || t.effect == "NoExecute")
        .any(|t| !tolerates(&tolerations, t))
    {
        return Err("node(s) had untolerated taint(s)");
    }
    if !node_affinity_matches(pod, node) {
        return Err("node(s) didn't match Pod's node affinity/selector");
    }
    let topology = |node_name: &str, key: &str| -> Option<String> {
        nodes
            .iter()
            .find(|n| n.metadata.name.as_deref() == Some(node_name))
            .and_then(|n| n.labels().get(key).cloned())
    };
    let pod_ns = pod.namespace().unwrap_or_default();
    let conflicts = |term: &PodAffinityTerm,
                     term_ns: &str,
                     other: &Pod,
                     other_node: &str,
                     selects_other: bool| {
        let Some(value) = node.labels().get(&term.topology_key) else {
            return false;
        };
        let same = topology(other_node, &term.topology_key).as_ref() == Some(value);
        same && if selects_other {
            term_selects(term, term_ns, other)
        } else {
            term_selects(term, term_ns, pod)
        }
    };
    for (other, other_node) in placed {
        // The incoming pod's anti-affinity against pods already placed...
        if anti_affinity_terms(pod)
            .iter()
            .any(|t| conflicts(t, &pod_ns, other, other_node, true))
        {
            return Err("node(s) didn't match pod anti-affinity rules");
        }
        // ...and placed pods' anti-affinity against the incoming pod.
        let other_ns = other.namespace().unwrap_or_default();
        if anti_affinity_terms(other)
            .iter()
            .any(|t| conflicts(t, &other_ns, other, other_node, false))
        {
            return Err("node(s) didn't satisfy existing pods' anti-affinity rules");
        }
    }
    Ok(())
}

/// Names of namespaces currently present (for tests that check clean-up).
/// Binds pod `name` (of `uid`) to `node`, as the scheduler does (`pods/binding`).
pub async fn bind_pod(pods: &Api<Pod>, name: &str, uid: &str, node: &str) -> kube::Result<()> {
    let binding = json!({
        "apiVersion": "v1", "kind": "Binding",
        "metadata": {"name": name, "uid": uid},
        "target": {"apiVersion": "v1", "kind": "Node", "name": node}
    });
    pods.create_subresource::<Value, Value>("binding", name, &PostParams::default(), &binding)
        .await
        .map(|_| ())
}

pub fn netns_list() -> HashSet<String> {
    std::fs::read_dir("/run/netns")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default()
}
