//! `vm-dhcp controller` as a process against the real control plane, with the webhooks in
//! process and the agents (the real `vm-dhcp agent`, cluster mode) run by the node simulator:
//! placement, conditions, VM → vmnetcfg with the webhook's address, releases, lost nodes,
//! pause, restarts, the leak sweep, takeover from the Go version, metrics and debug views.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use serde_json::json;
use vm_dhcp_core::crd::{IPPool, VirtualMachineNetworkConfig};
use vm_dhcp_core::kubevirt::{NetworkAttachmentDefinition, VirtualMachine};
use vm_dhcp_e2e::nodesim::{NodeSim, NodeSpec};
use vm_dhcp_e2e::proc::{Process, run_dir};
use vm_dhcp_e2e::webhooks::{Replica, webhooks};
use vm_dhcp_e2e::{ControlPlane, TestNamespace};

const DEADLINE: Duration = Duration::from_secs(60);
const AGENT_IMAGE: &str = "registry.local/vm-dhcp-agent:test";
const AGENT_SA: &str = "vm-dhcp-agent";

/// Skips (with a message) where network namespaces cannot be made.
#[allow(dead_code)]
#[path = "../../tests/support/needs.rs"]
mod needs;

/// The node simulator needs root (network namespaces), ip and busybox: a test fails saying
/// which is missing (or is skipped with VM_DHCP_TESTS_SKIP_MISSING=1).
fn can_run_pods() -> bool {
    needs::require(module_path!(), true, &[needs::IP, needs::BUSYBOX])
}

/// The controller under test, as a process; killed when dropped.
struct Controller {
    proc: Process,
    port: u16,
    log: PathBuf,
}

impl Controller {
    fn start(cp: &'static ControlPlane, ns: &str, extra: &[&str]) -> Controller {
        Self::start_via(&cp.kubeconfig_path, ns, extra)
    }

    /// A controller reaching kube-apiserver through `kubeconfig` (e.g. a fault proxy's).
    fn start_via(kubeconfig: &std::path::Path, ns: &str, extra: &[&str]) -> Controller {
        let port = vm_dhcp_e2e::free_port().expect("port");
        let mut cmd = vm_dhcp_e2e::controller_command_via(kubeconfig, ns, AGENT_SA, port);
        cmd.args([
            "--lost-node-grace-seconds=3",
            "--leak-grace-seconds=3",
            "--admission-window-seconds=2",
            "--resync-seconds=5",
            "--workload-resync-seconds=5",
            "--agent-lease-duration-seconds=3",
            "--leader-election-lease-seconds=6",
            "--enable-cache-dump-api",
        ]);
        cmd.args(extra);
        if !extra.iter().any(|a| a.starts_with("--image=")) {
            cmd.arg(format!("--image={AGENT_IMAGE}"));
        }
        let run = run_dir().expect("run dir");
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let log = run.join(format!("controller-{ns}-{n}.log"));
        let proc = Process::spawn("vm-dhcp-controller", cmd, &log, &run).expect("spawn controller");
        Controller { proc, port, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    async fn get(&self, path: &str) -> (u16, String) {
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Ok(answer) = vm_dhcp_e2e::plain_get(self.port, path).await {
                return answer;
            }
            assert!(
                Instant::now() < deadline,
                "controller HTTP never answered:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "----- controller log -----\n{}",
                vm_dhcp_e2e::proc::log_tail(&self.log, 80)
            );
        }
        self.proc.kill();
    }
}

/// Everything one test needs: namespace, webhooks, nodes and agents, the controller.
struct World {
    ns: TestNamespace,
    _replicas: Vec<Replica>,
    sim: NodeSim,
    cn: String,
    network: String,
}

async fn agent_rbac(ns: &TestNamespace) {
    vm_dhcp_e2e::rbac::agent_service_account(ns, AGENT_SA).await;
}

impl World {
    /// `nodes`: (short name, carries the cluster network, is a witness).
    async fn new(prefix: &str, nodes: &[(&str, bool, bool)]) -> World {
        Self::with_webhooks(prefix, nodes, true).await
    }

    /// Without webhooks: objects as a cluster running the Go version holds them.
    async fn with_webhooks(prefix: &str, nodes: &[(&str, bool, bool)], hooks: bool) -> World {
        let cp = ControlPlane::shared().await;
        let ns = cp.namespace(prefix).await;
        let replicas = if hooks {
            webhooks(cp, &ns, 1).await
        } else {
            Vec::new()
        };
        agent_rbac(&ns).await;
        // A cluster network of this test only: the Node objects are cluster-wide.
        let cn = format!("cn{}", ns.name.rsplit('-').next().unwrap_or("0"));
        let specs = nodes
            .iter()
            .map(|(name, on, witness)| {
                let mut s = NodeSpec::new(name);
                if *on {
                    s = s.label(&format!("network.harvesterhci.io/{cn}"), "true");
                }
                if *witness {
                    s = s.label("node-role.harvesterhci.io/witness", "true");
                }
                s
            })
            .collect();
        let programs = HashMap::from([(
            "vm-dhcp-agent".to_string(),
            vm_dhcp_e2e::bins::vm_dhcp_binary(),
        )]);
        let sim = NodeSim::start(cp, &ns.name, specs, programs)
            .await
            .expect("node simulator");
        let network = format!("{}/net-1", ns.name);
        let nad: NetworkAttachmentDefinition = serde_json::from_value(json!({
            "apiVersion": "k8s.cni.cncf.io/v1", "kind": "NetworkAttachmentDefinition",
            "metadata": {"name": "net-1", "namespace": ns.name,
                         "labels": {"network.harvesterhci.io/clusternetwork": cn}},
            "spec": {"config": json!({"cniVersion": "0.3.1", "name": "net-1", "type": "bridge",
                     "bridge": format!("{cn}-br"), "promiscMode": true, "vlan": 0, "ipam": {}}).to_string()}
        }))
        .expect("nad");
        ns.api::<NetworkAttachmentDefinition>()
            .create(&PostParams::default(), &nad)
            .await
            .expect("nad");
        World {
            ns,
            _replicas: replicas,
            sim,
            cn,
            network,
        }
    }

    /// Creates the pool (through the webhooks: the mutator fills serverIP in) and waits
    /// until the webhook's cache knows it.
    async fn pool(&self, cidr: &str, start: &str, end: &str) -> IPPool {
        let pool: IPPool = serde_json::from_value(json!({
            "apiVersion": "network.harvesterhci.io/v1alpha1", "kind": "IPPool",
            "metadata": {"name": "net-1", "namespace": self.ns.name},
            "spec": {"networkName": self.network, "ipv4Config": {"cidr": cidr,
                     "pool": {"start": start, "end": end}}}
        }))
        .expect("pool");
        let api: Api<IPPool> = self.ns.api();
        let deadline = Instant::now() + DEADLINE;
        let created = loop {
            match api.create(&PostParams::default(), &pool).await {
                Ok(p) => break p,
                Err(e) => assert!(Instant::now() < deadline, "pool never admitted: {e}"),
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        let deadline = Instant::now() + DEADLINE;
        while !self
            ._replicas
            .iter()
            .all(|r| r.webhook.knows_network(&self.network))
        {
            assert!(
                Instant::now() < deadline,
                "webhook cache never saw the pool"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        created
    }

    fn pools(&self) -> Api<IPPool> {
        self.ns.api()
    }

    fn cfgs(&self) -> Api<VirtualMachineNetworkConfig> {
        self.ns.api()
    }

    fn vms(&self) -> Api<VirtualMachine> {
        self.ns.api()
    }

    fn pods(&self) -> Api<Pod> {
        self.ns.api()
    }

    async fn wait_pool(&self, what: &str, ok: impl Fn(&IPPool) -> bool) -> IPPool {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let p = self.pools().get("net-1").await.expect("pool");
            if ok(&p) {
                return p;
            }
            assert!(
                Instant::now() < deadline,
                "pool never {what}; last:\n{:#?}\nsimulator:\n{}",
                p.status,
                self.sim.sim_log()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Our agent pods (name → node), as the API shows them.
    async fn agents(&self) -> BTreeMap<String, Option<String>> {
        self.pods()
            .list(&Default::default())
            .await
            .expect("pods")
            .items
            .into_iter()
            .filter(|p| {
                p.labels()
                    .get("app.kubernetes.io/managed-by")
                    .map(String::as_str)
                    == Some("vm-dhcp-controller")
            })
            .map(|p| (p.name_any(), p.spec.and_then(|s| s.node_name)))
            .collect()
    }

    async fn vm(&self, name: &str, nics: &[(&str, &str)]) -> VirtualMachine {
        let interfaces: Vec<_> = nics
            .iter()
            .map(|(nic, mac)| json!({"name": nic, "bridge": {}, "macAddress": mac}))
            .collect();
        let networks: Vec<_> = nics
            .iter()
            .map(|(nic, _)| json!({"name": nic, "multus": {"networkName": self.network}}))
            .collect();
        let vm: VirtualMachine = serde_json::from_value(json!({
            "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine",
            "metadata": {"name": name, "namespace": self.ns.name},
            "spec": {"runStrategy": "Halted", "template": {"spec": {
                "domain": {"devices": {"interfaces": interfaces}}, "networks": networks}}}
        }))
        .expect("vm");
        self.vms()
            .create(&PostParams::default(), &vm)
            .await
            .expect("VM admitted")
    }

    async fn wait_cfg(
        &self,
        name: &str,
        what: &str,
        ok: impl Fn(Option<&VirtualMachineNetworkConfig>) -> bool,
    ) -> Option<VirtualMachineNetworkConfig> {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let c = self.cfgs().get_opt(name).await.expect("vmnetcfg");
            if ok(c.as_ref()) {
                return c;
            }
            assert!(
                Instant::now() < deadline,
                "vmnetcfg {name} never {what}; last:\n{c:#?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// The value of the series `name` whose labels include every one of `labels`.
fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines().find_map(|line| {
        let rest = line.strip_prefix(name)?.strip_prefix('{')?;
        let (set, value) = rest.split_once("} ")?;
        labels
            .iter()
            .all(|(k, v)| set.split(',').any(|kv| kv == format!("{k}=\"{v}\"")))
            .then(|| value.trim().parse().ok())?
    })
}

fn cond(pool: &IPPool, type_: &str) -> Option<String> {
    pool.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| c.status.clone())
}

fn all_true(p: &IPPool) -> bool {
    ["Registered", "CacheReady", "AgentReady"]
        .iter()
        .all(|t| cond(p, t).as_deref() == Some("True"))
        && cond(p, "Stopped").as_deref() == Some("False")
}

fn allocated(p: &IPPool) -> BTreeMap<String, String> {
    p.status
        .as_ref()
        .and_then(|s| s.ipv4.as_ref())
        .and_then(|s| s.allocated.clone())
        .unwrap_or_default()
}

fn counts(p: &IPPool) -> (i64, i64) {
    p.status
        .as_ref()
        .and_then(|s| s.ipv4.as_ref())
        .map(|s| (s.used, s.available))
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_on_eligible_distinct_nodes_and_the_vm_lifecycle_allocates_and_releases() {
    if !can_run_pods() {
        return;
    }
    // c lacks the cluster network; w is a witness node: neither may run an agent.
    let w = World::new(
        "ctl-life",
        &[
            ("a", true, false),
            ("b", true, false),
            ("c", false, false),
            ("w", true, true),
        ],
    )
    .await;
    let cp = ControlPlane::shared().await;
    let ctl = Controller::start(cp, &w.ns.name, &[]);
    w.pool("10.77.0.0/24", "10.77.0.10", "10.77.0.19").await;

    let pool = w
        .wait_pool("Registered, CacheReady and AgentReady", all_true)
        .await;
    let agents = w.agents().await;
    assert_eq!(agents.len(), 2, "two agents: {agents:?}");
    let nodes: BTreeSet<String> = agents.values().flatten().cloned().collect();
    let expected: BTreeSet<String> = ["a", "b"].iter().map(|n| w.sim.node_name(n)).collect();
    assert_eq!(nodes, expected, "only eligible nodes, one agent each");
    let holder = pool
        .status
        .as_ref()
        .and_then(|s| s.agent_pod_ref.as_ref())
        .and_then(|r| r.name.clone())
        .expect("agentPodRef names the active agent");
    assert!(agents.contains_key(&holder), "{holder} is one of ours");
    let pod = w.pods().get(&holder).await.expect("agent pod");
    let c = &pod.spec.as_ref().expect("spec").containers[0];
    assert_eq!(c.image.as_deref(), Some(AGENT_IMAGE));
    let args = c.args.clone().unwrap_or_default();
    assert!(
        args.windows(2)
            .any(|a| a[0] == "--ippool-ref" && a[1] == w.network),
        "{args:?}"
    );
    assert!(pod.annotations()["k8s.v1.cni.cncf.io/networks"].contains("\"interface\":\"eth1\""));
    let nad =
        w.ns.api::<NetworkAttachmentDefinition>()
            .get("net-1")
            .await
            .expect("nad");
    assert_eq!(
        nad.labels()
            .get("network.harvesterhci.io/ippool-name")
            .map(String::as_str),
        Some("net-1")
    );
    assert!(
        pool.finalizers()
            .iter()
            .any(|f| f == "dhcp.harvesterhci.io/controller")
    );

    // A VM: the webhook allocates, the controller writes the vmnetcfg with that address.
    let vm = w
        .vm(
            "vm1",
            &[
                ("nic-1", "02:aa:00:00:00:01"),
                ("nic-2", "02:aa:00:00:00:02"),
            ],
        )
        .await;
    let record = vm.annotations()["dhcp.harvesterhci.io/allocations"].clone();
    assert!(
        record.contains("10.77.0.10") && record.contains("10.77.0.11"),
        "{record}"
    );
    let cfg = w
        .wait_cfg("vm1", "allocated", |c| {
            c.and_then(|c| c.status.as_ref())
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|cs| {
                    cs.iter()
                        .any(|c| c.type_ == "Allocated" && c.status == "True")
                })
        })
        .await
        .expect("vmnetcfg");
    let entries = cfg.spec.network_configs.clone().expect("entries");
    assert_eq!(
        entries
            .iter()
            .map(|e| (e.mac_address.as_str(), e.ip_address.as_deref()))
            .collect::<Vec<_>>(),
        vec![
            ("02:aa:00:00:00:01", Some("10.77.0.10")),
            ("02:aa:00:00:00:02", Some("10.77.0.11"))
        ],
        "NICs in the VM's order with the webhook's addresses"
    );
    assert_eq!(
        cfg.labels()
            .get("harvesterhci.io/vmName")
            .map(String::as_str),
        Some("vm1")
    );
    assert_eq!(cfg.owner_references()[0].uid, vm.uid().expect("uid"));
    // The status is a projection of the address objects, written by the controller.
    w.wait_pool("projected two allocations", |p| counts(p) == (2, 8))
        .await;

    // The whole chain: a real DHCP client with the VM's first MAC on the VM network is
    // given the address the webhook allocated, by the agent the controller placed.
    let guest = w
        .sim
        .attach_vm_with_mac(&w.network, Some("02:aa:00:00:00:01"))
        .await
        .expect("VM namespace");
    let said = guest.udhcpc_once().await.expect("udhcpc");
    assert!(
        said.contains("lease of 10.77.0.10 obtained"),
        "udhcpc:\n{said}\nsimulator:\n{}",
        w.sim.sim_log()
    );
    eprintln!("the VM's DHCP client:\n{said}");
    drop(guest);

    // Metrics and debug views.
    let (code, metrics) = ctl.get("/metrics").await;
    assert_eq!(code, 200);
    let pool_key = format!("{}/net-1", w.ns.name);
    let pool_labels = [
        ("ippool", pool_key.as_str()),
        ("cidr", "10.77.0.0/24"),
        ("network", w.network.as_str()),
    ];
    assert_eq!(
        metric(&metrics, "vmdhcpcontroller_ippool_used", &pool_labels),
        Some(2.0),
        "{metrics}"
    );
    assert_eq!(
        metric(&metrics, "vmdhcpcontroller_ippool_available", &pool_labels),
        Some(8.0)
    );
    // The leader's work: reconciles ran, how long they took, the queue.
    for kind in ["pool", "workload"] {
        assert!(
            metric(
                &metrics,
                "vmdhcpcontroller_reconciles_total",
                &[("kind", kind)]
            )
            .is_some_and(|n| n >= 1.0),
            "no {kind} reconcile counted:\n{metrics}"
        );
        assert!(
            metric(
                &metrics,
                "vmdhcpcontroller_reconcile_seconds_count",
                &[("kind", kind)]
            )
            .is_some_and(|n| n >= 1.0),
            "no {kind} reconcile timed:\n{metrics}"
        );
    }
    assert!(
        metrics.contains("\nvmdhcpcontroller_queue_depth "),
        "{metrics}"
    );
    let cfg_key = format!("{}/vm1", w.ns.name);
    assert_eq!(
        metric(
            &metrics,
            "vmdhcpcontroller_vmnetcfg_status",
            &[
                ("vmnetcfg", cfg_key.as_str()),
                ("network", w.network.as_str()),
                ("mac", "02:aa:00:00:00:01"),
                ("ip", "10.77.0.10"),
                ("state", "Allocated")
            ]
        ),
        Some(1.0),
        "{metrics}"
    );
    let (_, ipams) = ctl.get(&format!("/ipams/{}", w.network)).await;
    let ipams: BTreeMap<String, String> = serde_json::from_str(&ipams).expect("ipams JSON");
    assert_eq!(ipams.len(), 10);
    assert_eq!(ipams["10.77.0.10"], "true");
    assert_eq!(ipams["10.77.0.12"], "false");
    let (_, caches) = ctl.get(&format!("/caches/{}", w.network)).await;
    let caches: BTreeMap<String, String> = serde_json::from_str(&caches).expect("caches JSON");
    assert_eq!(caches["02:aa:00:00:00:02"], "10.77.0.11");

    // NIC removed from the VM: its entry goes and its address is freed.
    let patch = json!({"spec": {"template": {"spec": {
        "domain": {"devices": {"interfaces": [{"name": "nic-1", "bridge": {}, "macAddress": "02:aa:00:00:00:01"}]}},
        "networks": [{"name": "nic-1", "multus": {"networkName": w.network}}]}}}});
    w.vms()
        .patch("vm1", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("NIC removed");
    w.wait_pool("released the removed NIC's address", |p| {
        !allocated(p).contains_key("10.77.0.11") && counts(p) == (1, 9)
    })
    .await;
    w.wait_cfg("vm1", "down to one entry", |c| {
        c.and_then(|c| c.status.as_ref())
            .and_then(|s| s.network_configs.as_ref())
            .is_some_and(|e| e.len() == 1)
    })
    .await;

    // VM deleted: vmnetcfg deleted by the controller (no GC runs here), address freed.
    w.vms()
        .delete("vm1", &DeleteParams::default())
        .await
        .expect("delete VM");
    w.wait_cfg("vm1", "deleted", |c| c.is_none()).await;
    let pool = w
        .wait_pool("released every address", |p| counts(p) == (0, 10))
        .await;
    assert!(
        !allocated(&pool).values().any(|v| v.contains(':')),
        "{:?}",
        allocated(&pool)
    );
    let (_, metrics) = ctl.get("/metrics").await;
    assert!(
        !metrics.contains("vmdhcpcontroller_vmnetcfg_status{"),
        "series gone with the vmnetcfg:\n{metrics}"
    );

    // Pool deleted: agents, Lease and NAD labels cleaned up, finalizer removed.
    w.pools()
        .delete("net-1", &DeleteParams::default())
        .await
        .expect("delete pool");
    let deadline = Instant::now() + DEADLINE;
    while w.pools().get_opt("net-1").await.expect("pool").is_some() || !w.agents().await.is_empty()
    {
        assert!(
            Instant::now() < deadline,
            "pool or agents never went:\n{}",
            ctl.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let nad =
        w.ns.api::<NetworkAttachmentDefinition>()
            .get("net-1")
            .await
            .expect("nad");
    assert!(
        !nad.labels()
            .contains_key("network.harvesterhci.io/ippool-name")
    );
    let (_, metrics) = ctl.get("/metrics").await;
    assert!(
        !metrics.contains("vmdhcpcontroller_ippool_used{"),
        "{metrics}"
    );
    let _ = &w.cn;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_node_agent_is_replaced_and_pause_removes_agents() {
    if !can_run_pods() {
        return;
    }
    let w = World::new(
        "ctl-lost",
        &[("a", true, false), ("b", true, false), ("c", true, false)],
    )
    .await;
    let cp = ControlPlane::shared().await;
    let _ctl = Controller::start(cp, &w.ns.name, &[]);
    w.pool("10.78.0.0/24", "10.78.0.10", "10.78.0.19").await;
    let pool = w.wait_pool("ready", all_true).await;
    let holder_ref = pool
        .status
        .and_then(|s| s.agent_pod_ref)
        .expect("active agent");
    let holder = holder_ref.name.expect("active agent's name");
    let holder_uid = holder_ref.uid.expect("active agent's uid");
    let agents = w.agents().await;
    assert_eq!(agents.len(), 2);
    let lost_node = agents[&holder].clone().expect("bound");
    let spare = ["a", "b", "c"]
        .iter()
        .map(|n| w.sim.node_name(n))
        .find(|n| !agents.values().flatten().any(|x| x == n))
        .expect("a spare node");

    w.sim.lose_node(&lost_node).await.expect("lose node");
    // The pod on the lost node is force-deleted after the grace period and replaced on the
    // spare node; the other agent takes the Lease.
    let deadline = Instant::now() + DEADLINE;
    loop {
        let now = w.agents().await;
        let on: BTreeSet<String> = now.values().flatten().cloned().collect();
        // Pod names are deterministic, so the replacement may reuse the lost pod's name:
        // judge by nodes, not names.
        if !on.contains(&lost_node) && now.len() == 2 && on.contains(&spare) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "agent never replaced: {now:?}\n{}",
            w.sim.sim_log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Another pod, told by its uid: the replacement may carry the lost pod's name and be
    // the one that takes the Lease.
    w.wait_pool("active again with another agent", |p| {
        all_true(p)
            && p.status
                .as_ref()
                .and_then(|s| s.agent_pod_ref.as_ref())
                .and_then(|r| r.uid.as_deref())
                .is_some_and(|u| u != holder_uid)
    })
    .await;

    // Pause: agents removed, Stopped=True; unpause: back.
    w.pools()
        .patch(
            "net-1",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"paused": true}})),
        )
        .await
        .expect("pause");
    w.wait_pool("stopped", |p| {
        cond(p, "Stopped").as_deref() == Some("True")
            && cond(p, "AgentReady").as_deref() == Some("False")
    })
    .await;
    let deadline = Instant::now() + DEADLINE;
    while !w.agents().await.is_empty() {
        assert!(Instant::now() < deadline, "agents stayed while paused");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    w.pools()
        .patch(
            "net-1",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"paused": false}})),
        )
        .await
        .expect("unpause");
    w.wait_pool("active after unpause", all_true).await;
}

/// Creates a VM with one NIC on the test network, with `annotations`; the error is the
/// webhook's refusal.
async fn try_vm(
    w: &World,
    name: &str,
    mac: &str,
    annotations: serde_json::Value,
) -> Result<VirtualMachine, kube::Error> {
    let vm: VirtualMachine = serde_json::from_value(json!({
        "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine",
        "metadata": {"name": name, "namespace": w.ns.name, "annotations": annotations},
        "spec": {"runStrategy": "Halted", "template": {"spec": {
            "domain": {"devices": {"interfaces": [{"name": "nic-1", "bridge": {}, "macAddress": mac}]}},
            "networks": [{"name": "nic-1", "multus": {"networkName": w.network}}]}}}
    }))
    .expect("vm");
    w.vms().create(&PostParams::default(), &vm).await
}

/// Retries a create that the webhook refuses until it is admitted; fails after `limit`.
async fn admitted_within(
    limit: Duration,
    what: &str,
    mut attempt: impl AsyncFnMut() -> Result<VirtualMachine, kube::Error>,
) -> VirtualMachine {
    let start = Instant::now();
    loop {
        match attempt().await {
            Ok(vm) => {
                eprintln!("{what}: admitted {:?} after the release", start.elapsed());
                return vm;
            }
            Err(e) => assert!(
                start.elapsed() < limit,
                "{what}: still refused {:?} after the release: {e}",
                start.elapsed()
            ),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Regression: after the controller released an address, the webhook kept refusing it for
/// 35 s and more (it reused the pool it had cached after a batch of refusals). A full pool
/// and a static request for a held address are refused; once the controller has released,
/// both are admitted within 5 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admission_after_a_release_sees_the_release() {
    if !can_run_pods() {
        return;
    }
    let w = World::new("ctl-rel", &[("a", true, false)]).await;
    let cp = ControlPlane::shared().await;
    let _ctl = Controller::start(cp, &w.ns.name, &["--agents-per-pool=1"]);
    w.pool("10.81.0.0/24", "10.81.0.10", "10.81.0.12").await;
    for (i, name) in ["vm1", "vm2", "vm3"].iter().enumerate() {
        w.vm(name, &[("nic-1", &format!("02:cd:00:00:00:0{}", i + 1))])
            .await;
    }
    let full = try_vm(&w, "vm4", "02:cd:00:00:00:04", json!({}))
        .await
        .expect_err("a full pool refuses");
    assert!(full.to_string().contains("no free address left"), "{full}");
    let static_ip = json!({"static-ip.harvesterhci.io/nic-1": "10.81.0.10"});
    let taken = try_vm(&w, "vm5", "02:cd:00:00:00:05", static_ip.clone())
        .await
        .expect_err("a held address refuses a static request");
    assert!(taken.to_string().contains("already allocated"), "{taken}");

    // vm1 goes: the controller releases 10.81.0.10, then the static request gets it.
    w.vms()
        .delete("vm1", &DeleteParams::default())
        .await
        .expect("delete vm1");
    w.wait_pool("released vm1's address", |p| {
        !allocated(p).contains_key("10.81.0.10") && counts(p).1 == 1
    })
    .await;
    let vm5 = admitted_within(Duration::from_secs(5), "static request", async || {
        try_vm(&w, "vm5", "02:cd:00:00:00:05", static_ip.clone()).await
    })
    .await;
    assert!(
        vm5.annotations()["dhcp.harvesterhci.io/allocations"].contains("10.81.0.10"),
        "{:?}",
        vm5.annotations()
    );

    // Full again; vm2 goes, and the dynamic request that was refused gets its address.
    w.vms()
        .delete("vm2", &DeleteParams::default())
        .await
        .expect("delete vm2");
    w.wait_pool("released vm2's address", |p| {
        !allocated(p).contains_key("10.81.0.11") && counts(p).1 == 1
    })
    .await;
    let vm4 = admitted_within(Duration::from_secs(5), "full pool", async || {
        try_vm(&w, "vm4", "02:cd:00:00:00:04", json!({})).await
    })
    .await;
    assert!(
        vm4.annotations()["dhcp.harvesterhci.io/allocations"].contains("10.81.0.11"),
        "{:?}",
        vm4.annotations()
    );
}

/// Regression: a VM deleted within the admission window of its claim (its vmnetcfg's
/// admission touched it a moment ago) has its release wait; the writes after it in the same
/// plan went on regardless, so the vmnetcfg's finalizer went before its release, and the
/// address stayed held until the leak sweep found it. The release must come from the
/// vmnetcfg's finalizer, after the wait, with the vmnetcfg kept until then.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_deleted_inside_the_admission_window_is_released_before_its_finalizer_goes() {
    if !can_run_pods() {
        return;
    }
    let w = World::new("ctl-win", &[("a", true, false)]).await;
    let cp = ControlPlane::shared().await;
    let ctl = Controller::start(cp, &w.ns.name, &["--agents-per-pool=1"]);
    w.pool("10.82.0.0/24", "10.82.0.10", "10.82.0.19").await;
    let mac = "02:ce:00:00:00:01";
    w.vm("quick", &[("nic-1", mac)]).await;
    w.wait_cfg("quick", "created", |c| c.is_some()).await;
    w.vms()
        .delete("quick", &DeleteParams::default())
        .await
        .expect("delete quick");
    w.wait_cfg("quick", "deleted", |c| c.is_none()).await;
    // Its finalizer gone, its address is too (the sweep would come seconds later).
    let held: Vec<String> =
        w.ns.api::<vm_dhcp_core::crd::IPPoolAddress>()
            .list(&Default::default())
            .await
            .expect("address objects")
            .items
            .into_iter()
            .filter(|a| a.spec.mac_address == mac)
            .map(|a| a.spec.address)
            .collect();
    let log = ctl.log();
    assert!(
        held.is_empty(),
        "the vmnetcfg went while {mac} still held {held:?}:\n{log}"
    );
    let released: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("address released") && l.contains(mac))
        .collect();
    assert!(
        released.len() == 1 && released[0].contains("vmnetcfg"),
        "the vmnetcfg's finalizer released {mac} once: {released:#?}\n{log}"
    );
    assert!(
        !log.lines()
            .any(|l| l.contains("leak swept") && l.contains(mac)),
        "{mac} was left to the leak sweep:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leaks_are_swept_and_a_restarted_controller_loses_nothing() {
    if !can_run_pods() {
        return;
    }
    let w = World::new("ctl-leak", &[("a", true, false)]).await;
    let cp = ControlPlane::shared().await;
    let ctl = Controller::start(cp, &w.ns.name, &["--agents-per-pool=1"]);
    w.pool("10.79.0.0/24", "10.79.0.10", "10.79.0.19").await;
    w.wait_pool("ready", all_true).await;
    w.vm("keep", &[("nic-1", "02:bb:00:00:00:01")]).await;
    w.wait_cfg("keep", "created", |c| c.is_some()).await;

    // Kill the controller; meanwhile a second VM comes (the webhook allocates) and an
    // allocation without any owner appears (an admission later rejected).
    drop(ctl);
    w.vm("late", &[("nic-1", "02:bb:00:00:00:02")]).await;
    let leak = vm_dhcp_core::store::Holding {
        ip: "10.79.0.19".parse().expect("ip"),
        mac: "02:bb:00:00:00:99".parse().expect("mac"),
        owner: Some(format!("{}/ghost", w.ns.name)),
        static_: false,
        interface: None,
    };
    w.ns.api::<vm_dhcp_core::crd::IPPoolMACClaim>()
        .create(
            &PostParams::default(),
            &vm_dhcp_core::store::claim_object(&w.ns.name, "net-1", &w.network, &leak, None),
        )
        .await
        .expect("leaked claim written");
    w.ns.api::<vm_dhcp_core::crd::IPPoolAddress>()
        .create(
            &PostParams::default(),
            &vm_dhcp_core::store::address_object(&w.ns.name, "net-1", &w.network, &leak),
        )
        .await
        .expect("leaked address written");

    let ctl = Controller::start(cp, &w.ns.name, &["--agents-per-pool=1"]);
    w.wait_cfg("late", "created by the restarted controller", |c| {
        c.is_some()
    })
    .await;
    let leaked = w.ns.api::<vm_dhcp_core::crd::IPPoolAddress>();
    let deadline = Instant::now() + DEADLINE;
    while leaked
        .get_opt("net-1.10.79.0.19")
        .await
        .expect("get address object")
        .is_some()
    {
        assert!(
            Instant::now() < deadline,
            "the leak was never swept:\n{}",
            ctl.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let pool = w
        .wait_pool("projected without the leak", |p| {
            !allocated(p).contains_key("10.79.0.19") && counts(p) == (2, 8)
        })
        .await;
    let held = allocated(&pool);
    assert_eq!(
        held.get("10.79.0.10").map(String::as_str),
        Some("02:bb:00:00:00:01")
    );
    assert_eq!(
        held.get("10.79.0.11").map(String::as_str),
        Some("02:bb:00:00:00:02")
    );
    assert_eq!(counts(&pool), (2, 8), "counts fixed in the same write");
    let (_, metrics) = ctl.get("/metrics").await;
    let pool_key = format!("{}/net-1", w.ns.name);
    assert_eq!(
        metric(
            &metrics,
            "vmdhcpcontroller_leaks_swept_total",
            &[("ippool", pool_key.as_str())]
        ),
        Some(1.0),
        "{metrics}"
    );
    assert!(ctl.log().contains("leak swept"), "{}", ctl.log());
    // The Event, as `kubectl get events` shows it on the pool.
    let deadline = Instant::now() + DEADLINE;
    loop {
        let events =
            w.ns.api::<k8s_openapi::api::events::v1::Event>()
                .list(&Default::default())
                .await
                .expect("events");
        let swept = events.items.iter().find(|e| {
            e.reason.as_deref() == Some("LeakSwept")
                && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("net-1")
        });
        if let Some(e) = swept {
            let note = e.note.clone().unwrap_or_default();
            assert!(
                note.contains("10.79.0.19") && note.contains("02:bb:00:00:00:99"),
                "{note}"
            );
            assert_eq!(e.type_.as_deref(), Some("Warning"));
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no LeakSwept Event: {:#?}",
            events.items
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn takeover_from_the_go_version_keeps_every_allocation() {
    if !can_run_pods() {
        return;
    }
    let w = World::with_webhooks("ctl-go", &[("a", true, false)], false).await;
    let ns = w.ns.name.clone();
    // Objects exactly as the Go controller leaves them (created without our webhooks' help:
    // the status is written as the Go controller wrote it).
    let pool: IPPool = serde_json::from_value(json!({
        "apiVersion": "network.harvesterhci.io/v1alpha1", "kind": "IPPool",
        "metadata": {"name": "net-1", "namespace": ns,
                     "finalizers": ["wrangler.cattle.io/vm-dhcp-ippool-controller"]},
        "spec": {"networkName": w.network, "ipv4Config": {"cidr": "10.80.0.0/24",
                 "serverIP": "10.80.0.2", "router": "10.80.0.1",
                 "pool": {"start": "10.80.0.10", "end": "10.80.0.19", "exclude": ["10.80.0.15"]}}}
    }))
    .expect("pool");
    w.pools()
        .create(&PostParams::default(), &pool)
        .await
        .expect("pool");
    let status = json!({"status": {
        "ipv4": {"allocated": {"10.80.0.10": "02:cc:00:00:00:01", "10.80.0.15": "EXCLUDED"},
                 "used": 1, "available": 8},
        "agentPodRef": {"namespace": ns, "name": format!("{ns}-net-1-agent"), "image": "rancher/harvester-vm-dhcp-agent:v1.5.0"},
        "conditions": [{"type": "Registered", "status": "True"}, {"type": "CacheReady", "status": "True"},
                       {"type": "AgentReady", "status": "True"}, {"type": "Stopped", "status": "False"}]}});
    w.pools()
        .patch_status("net-1", &PatchParams::default(), &Patch::Merge(&status))
        .await
        .expect("Go status");
    let vm: VirtualMachine = serde_json::from_value(json!({
        "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine",
        "metadata": {"name": "old", "namespace": ns,
                     "annotations": {"harvesterhci.io/mac-address": "{\"nic-1\":\"02:cc:00:00:00:01\"}"}},
        "spec": {"runStrategy": "Always", "template": {"spec": {
            "domain": {"devices": {"interfaces": [{"name": "nic-1", "bridge": {}}]}},
            "networks": [{"name": "nic-1", "multus": {"networkName": w.network}}]}}}
    }))
    .expect("vm");
    let go_vm = w
        .vms()
        .create(&PostParams::default(), &vm)
        .await
        .expect("vm");
    let cfg: VirtualMachineNetworkConfig = serde_json::from_value(json!({
        "apiVersion": "network.harvesterhci.io/v1alpha1", "kind": "VirtualMachineNetworkConfig",
        "metadata": {"name": "old", "namespace": ns,
                     "labels": {"harvesterhci.io/vmName": "old"},
                     "finalizers": ["wrangler.cattle.io/vm-dhcp-vmnetcfg-controller"],
                     "ownerReferences": [{"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine",
                                          "name": "old", "uid": go_vm.uid()}]},
        "spec": {"vmName": "old", "networkConfigs": [{"networkName": w.network, "macAddress": "02:cc:00:00:00:01"}]}
    }))
    .expect("cfg");
    w.cfgs()
        .create(&PostParams::default(), &cfg)
        .await
        .expect("cfg");
    // The Go agent pod: bound to a node that no longer runs anything (it just sits there).
    let go_pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": format!("{ns}-net-1-agent"), "labels": {
            "network.harvesterhci.io/vm-dhcp-controller": "agent",
            "network.harvesterhci.io/ippool-namespace": ns,
            "network.harvesterhci.io/ippool-name": "net-1"}},
        "spec": {"nodeName": "go-node-gone", "containers": [{"name": "agent",
                 "image": "rancher/harvester-vm-dhcp-agent:v1.5.0", "args": ["--ippool-ref", format!("{ns}/net-1")]}]}
    }))
    .expect("go pod");
    w.pods()
        .create(&PostParams::default(), &go_pod)
        .await
        .expect("go pod");

    let cp = ControlPlane::shared().await;
    let ctl = Controller::start(cp, &ns, &["--agents-per-pool=1"]);
    let pool = w
        .wait_pool("taken over", |p| {
            all_true(p)
                && p.finalizers() == ["dhcp.harvesterhci.io/controller"]
                && p.status
                    .as_ref()
                    .and_then(|s| s.ipv4.as_ref())
                    .and_then(|s| s.owners.as_ref())
                    .is_some_and(|o| {
                        o.get("10.80.0.10").map(String::as_str) == Some(&format!("{ns}/old"))
                    })
        })
        .await;
    let held = allocated(&pool);
    assert_eq!(
        held["10.80.0.10"], "02:cc:00:00:00:01",
        "the Go allocation kept"
    );
    assert_eq!(held["10.80.0.15"], "EXCLUDED");
    assert_eq!(counts(&pool), (1, 8));
    // The Go agent pod goes once ours is active (it stays Terminating on its dead node).
    let deadline = Instant::now() + DEADLINE;
    loop {
        let p = w
            .pods()
            .get_opt(&format!("{ns}-net-1-agent"))
            .await
            .expect("pod");
        if p.as_ref()
            .is_none_or(|p| p.metadata.deletion_timestamp.is_some())
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the Go agent pod was never deleted:\n{}",
            ctl.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let cfg = w
        .wait_cfg("old", "adopted", |c| {
            c.is_some_and(|c| {
                c.finalizers() == ["dhcp.harvesterhci.io/controller"]
                    && c.status
                        .as_ref()
                        .and_then(|s| s.network_configs.as_ref())
                        .is_some_and(|e| {
                            e.iter()
                                .any(|e| e.allocated_ip_address.as_deref() == Some("10.80.0.10"))
                        })
            })
        })
        .await
        .expect("cfg");
    assert_eq!(
        cfg.spec.network_configs.expect("entries")[0]
            .ip_address
            .as_deref(),
        Some("10.80.0.10"),
        "the controller carries the held address into the entry"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_roll_keeps_an_agent_and_an_opted_in_nad_gets_its_pool() {
    if !can_run_pods() {
        return;
    }
    let w = World::new("ctl-roll", &[("a", true, false), ("b", true, false)]).await;
    let cp = ControlPlane::shared().await;
    let ctl = Controller::start(cp, &w.ns.name, &["--agents-per-pool=1"]);
    w.pool("10.81.0.0/24", "10.81.0.10", "10.81.0.19").await;
    w.wait_pool("ready", all_true).await;
    let old: BTreeSet<String> = w.agents().await.into_keys().collect();

    // A new agent image: the new agent comes first, the old one goes once it is Ready.
    drop(ctl);
    let v2 = AGENT_IMAGE.replace(":test", ":v2");
    let _ctl = Controller::start(
        cp,
        &w.ns.name,
        &["--agents-per-pool=1", &format!("--image={v2}")],
    );
    let pool = w
        .wait_pool("active on the new image", |p| {
            all_true(p)
                && p.status
                    .as_ref()
                    .and_then(|s| s.agent_pod_ref.as_ref())
                    .is_some_and(|r| {
                        r.image.as_deref() == Some(v2.as_str())
                            && r.name.as_ref().is_some_and(|n| !old.contains(n))
                    })
        })
        .await;
    let deadline = Instant::now() + DEADLINE;
    loop {
        let now: BTreeSet<String> = w.agents().await.into_keys().collect();
        if now.len() == 1 && now.is_disjoint(&old) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "old agent never removed: {now:?} (old {old:?})"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(pool.status.is_some());

    // A NAD with the opt-in annotation gets its IPPool; deleting the NAD deletes it.
    let nad: NetworkAttachmentDefinition = serde_json::from_value(json!({
        "apiVersion": "k8s.cni.cncf.io/v1", "kind": "NetworkAttachmentDefinition",
        "metadata": {"name": "net-2", "namespace": w.ns.name,
                     "labels": {"network.harvesterhci.io/clusternetwork": w.cn},
                     "annotations": {"dhcp.harvesterhci.io/ippool":
                        r#"{"cidr":"10.82.0.0/24","pool":{"start":"10.82.0.10","end":"10.82.0.20"}}"#}},
        "spec": {"config": "{}"}
    }))
    .expect("nad");
    let nads = w.ns.api::<NetworkAttachmentDefinition>();
    nads.create(&PostParams::default(), &nad)
        .await
        .expect("nad");
    let deadline = Instant::now() + DEADLINE;
    let auto = loop {
        if let Some(p) = w.pools().get_opt("net-2").await.expect("pool") {
            break p;
        }
        assert!(
            Instant::now() < deadline,
            "no IPPool created for the opted-in NAD"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(auto.spec.network_name, format!("{}/net-2", w.ns.name));
    assert_eq!(
        auto.labels()
            .get("dhcp.harvesterhci.io/created-from-nad")
            .map(String::as_str),
        Some("true")
    );
    nads.delete("net-2", &DeleteParams::default())
        .await
        .expect("delete nad");
    let deadline = Instant::now() + DEADLINE;
    while w.pools().get_opt("net-2").await.expect("pool").is_some() {
        assert!(
            Instant::now() < deadline,
            "the NAD's IPPool was never deleted"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The holder of the controllers' leader Lease.
async fn leader(ns: &TestNamespace) -> Option<String> {
    ns.api::<k8s_openapi::api::coordination::v1::Lease>()
        .get_opt("vm-dhcp-controllers")
        .await
        .expect("lease")
        .and_then(|l| l.spec?.holder_identity)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_only_the_leader_writes_and_the_other_takes_over_without_agents() {
    if !can_run_pods() {
        return;
    }
    let w = World::new("ctl-ha", &[("a", true, false)]).await;
    let cp = ControlPlane::shared().await;
    let one = Controller::start(cp, &w.ns.name, &["--no-agent", "--identity=ctl-one"]);
    let deadline = Instant::now() + DEADLINE;
    while leader(&w.ns).await.as_deref() != Some("ctl-one") {
        assert!(
            Instant::now() < deadline,
            "ctl-one never led:\n{}",
            one.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let two = Controller::start(cp, &w.ns.name, &["--no-agent", "--identity=ctl-two"]);
    w.pool("10.83.0.0/24", "10.83.0.10", "10.83.0.19").await;
    // --no-agent: the pool is served by nobody we deploy; the conditions say the cache is
    // ready and no agent pod is referenced or created.
    let pool = w
        .wait_pool("Registered and CacheReady", |p| {
            cond(p, "Registered").as_deref() == Some("True")
                && cond(p, "CacheReady").as_deref() == Some("True")
        })
        .await;
    assert!(
        pool.status
            .as_ref()
            .and_then(|s| s.agent_pod_ref.as_ref())
            .is_none(),
        "{:?}",
        pool.status
    );
    w.vm("vm1", &[("nic-1", "02:dd:00:00:00:01")]).await;
    w.wait_cfg("vm1", "created", |c| c.is_some()).await;
    let pods = w.pods().list(&Default::default()).await.expect("pods");
    assert!(
        pods.items.is_empty(),
        "no agent pods: {:?}",
        pods.items.iter().map(|p| p.name_any()).collect::<Vec<_>>()
    );
    // Both serve readiness and metrics from their caches; only the holder reconciles.
    let pool_key = format!("{}/net-1", w.ns.name);
    for c in [&one, &two] {
        assert_eq!(c.get("/readyz").await.0, 200);
        let deadline = Instant::now() + DEADLINE;
        loop {
            let (_, m) = c.get("/metrics").await;
            if metric(&m, "vmdhcpcontroller_ippool_used", &[("ippool", &pool_key)]) == Some(1.0) {
                break;
            }
            assert!(Instant::now() < deadline, "metrics never caught up:\n{m}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    assert!(one.log().contains("leading: reconciling"), "{}", one.log());
    assert!(
        !two.log().contains("leading: reconciling"),
        "the standby reconciled:\n{}",
        two.log()
    );
    assert_eq!(leader(&w.ns).await.as_deref(), Some("ctl-one"));

    // The leader dies without giving the Lease back: the standby takes over once it expires
    // and keeps reconciling.
    drop(one);
    w.vm("vm2", &[("nic-1", "02:dd:00:00:00:02")]).await;
    w.wait_cfg("vm2", "created by the new leader", |c| {
        c.and_then(|c| c.status.as_ref())
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|cs| {
                cs.iter()
                    .any(|c| c.type_ == "Allocated" && c.status == "True")
            })
    })
    .await;
    assert_eq!(leader(&w.ns).await.as_deref(), Some("ctl-two"));
    assert!(two.log().contains("leading: reconciling"), "{}", two.log());
    w.vms()
        .delete("vm1", &DeleteParams::default())
        .await
        .expect("delete vm1");
    let pool = w
        .wait_pool("released vm1's address", |p| {
            !allocated(p).contains_key("10.83.0.10")
        })
        .await;
    assert_eq!(counts(&pool), (1, 9));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_dhcp_runs_agents_dry_and_a_held_pool_keeps_its_agent_image() {
    if !can_run_pods() {
        return;
    }
    let w = World::new("ctl-hold", &[("a", true, false), ("b", true, false)]).await;
    let cp = ControlPlane::shared().await;
    let ctl = Controller::start(cp, &w.ns.name, &["--agents-per-pool=1"]);
    w.pool("10.84.0.0/24", "10.84.0.10", "10.84.0.19").await;
    w.wait_pool("ready", all_true).await;
    let old: BTreeSet<String> = w.agents().await.into_keys().collect();
    let args_of = |p: &Pod| {
        p.spec.as_ref().expect("spec").containers[0]
            .args
            .clone()
            .unwrap_or_default()
    };
    for name in &old {
        let p = w.pods().get(name).await.expect("agent");
        assert!(!args_of(&p).iter().any(|a| a == "--dry-run"));
    }

    // Hold the pool's agent image, then restart with a new image and --no-dhcp: the agents
    // roll (dry-run is a new revision) but keep the held image.
    let hold = json!({"metadata": {"annotations": {
        "network.harvesterhci.io/hold-ippool-agent-upgrade": "true"}}});
    w.pools()
        .patch("net-1", &PatchParams::default(), &Patch::Merge(&hold))
        .await
        .expect("hold annotation");
    drop(ctl);
    let v2 = AGENT_IMAGE.replace(":test", ":v2");
    let _ctl = Controller::start(
        cp,
        &w.ns.name,
        &["--agents-per-pool=1", &format!("--image={v2}"), "--no-dhcp"],
    );
    let pool = w
        .wait_pool("active on a new agent", |p| {
            all_true(p)
                && p.status
                    .as_ref()
                    .and_then(|s| s.agent_pod_ref.as_ref())
                    .and_then(|r| r.name.as_ref())
                    .is_some_and(|n| !old.contains(n))
        })
        .await;
    let image = pool
        .status
        .as_ref()
        .and_then(|s| s.agent_pod_ref.as_ref())
        .and_then(|r| r.image.clone());
    assert_eq!(image.as_deref(), Some(AGENT_IMAGE), "the held image");
    let deadline = Instant::now() + DEADLINE;
    let now = loop {
        let now: BTreeSet<String> = w.agents().await.into_keys().collect();
        if now.len() == 1 && now.is_disjoint(&old) {
            break now;
        }
        assert!(
            Instant::now() < deadline,
            "old agent never removed: {now:?} (old {old:?})"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    for name in &now {
        let p = w.pods().get(name).await.expect("agent");
        let c = &p.spec.as_ref().expect("spec").containers[0];
        assert_eq!(c.image.as_deref(), Some(AGENT_IMAGE), "held, not {v2}");
        assert!(
            args_of(&p).iter().any(|a| a == "--dry-run"),
            "{:?}",
            args_of(&p)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_go_agent_left_terminating_on_a_lost_node_is_force_deleted() {
    if !can_run_pods() {
        return;
    }
    // g lacks the cluster network: our agent goes to a; the Go agent sits on g.
    let w = World::new("ctl-golost", &[("a", true, false), ("g", false, false)]).await;
    let ns = w.ns.name.clone();
    let g = w.sim.node_name("g");
    w.sim.lose_node(&g).await.expect("lose node");
    let name = format!("{ns}-net-1-agent");
    let go_pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {
            "network.harvesterhci.io/vm-dhcp-controller": "agent",
            "network.harvesterhci.io/ippool-namespace": ns,
            "network.harvesterhci.io/ippool-name": "net-1"}},
        "spec": {"nodeName": g, "containers": [{"name": "agent",
                 "image": "rancher/harvester-vm-dhcp-agent:v1.5.0", "args": ["--ippool-ref", format!("{ns}/net-1")]}]}
    }))
    .expect("go pod");
    w.pods()
        .create(&PostParams::default(), &go_pod)
        .await
        .expect("go pod");
    // Deleted before the takeover (by the Go controller or a user): no kubelet confirms it.
    w.pods()
        .delete(&name, &DeleteParams::default())
        .await
        .expect("delete go pod");
    let stuck = w.pods().get_opt(&name).await.expect("pod");
    assert!(
        stuck.is_some_and(|p| p.metadata.deletion_timestamp.is_some()),
        "the Go pod should be left Terminating on the lost node"
    );

    let cp = ControlPlane::shared().await;
    let _ctl = Controller::start(cp, &ns, &["--agents-per-pool=1"]);
    w.pool("10.85.0.0/24", "10.85.0.10", "10.85.0.19").await;
    w.wait_pool("ready", all_true).await;
    let deadline = Instant::now() + DEADLINE;
    while w.pods().get_opt(&name).await.expect("pod").is_some() {
        assert!(
            Instant::now() < deadline,
            "the Go agent stayed Terminating on the lost node\n{}",
            w.sim.sim_log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Address objects of the test pool `net-1`: address → (MAC, owner).
async fn store_of(w: &World) -> BTreeMap<String, (String, Option<String>)> {
    vm_dhcp_e2e::webhooks::addresses(&w.ns, "net-1")
        .await
        .into_iter()
        .map(|(ip, a)| (ip, (a.mac_address, a.owner)))
        .collect()
}

fn allocation_ip(vm: &VirtualMachine) -> String {
    let record = &vm.annotations()["dhcp.harvesterhci.io/allocations"];
    let list: Vec<serde_json::Value> = serde_json::from_str(record).expect("allocations JSON");
    list[0]["ipAddress"]
        .as_str()
        .expect("ipAddress")
        .to_string()
}

/// Issue 12 item 6: a pool whose status holds 5,000 allocations written by the Go version is
/// migrated into address objects before admission allocates in it (which refuses, retryably,
/// until then); every allocation is kept, and a Go-written static vmnetcfg keeps its address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_go_pool_of_5000_allocations_is_migrated_and_keeps_every_one() {
    if !can_run_pods() {
        return;
    }
    let w = World::new("ctl-mig", &[("a", true, false)]).await;
    let ns = w.ns.name.clone();
    // The Go version's static vmnetcfg (made before the pool existed: our webhook leaves
    // entries on networks without a pool alone).
    let cfg: VirtualMachineNetworkConfig = serde_json::from_value(json!({
        "apiVersion": "network.harvesterhci.io/v1alpha1", "kind": "VirtualMachineNetworkConfig",
        "metadata": {"name": "static-vm", "namespace": ns},
        "spec": {"vmName": "static-vm", "networkConfigs": [{"networkName": w.network,
                 "macAddress": "02:dd:ff:00:00:01", "ipAddress": "10.82.40.1"}]}
    }))
    .expect("cfg");
    w.cfgs()
        .create(&PostParams::default(), &cfg)
        .await
        .expect("static vmnetcfg");
    w.pool("10.82.0.0/18", "10.82.0.10", "10.82.63.250").await;
    // As the Go version made it: without the mark our mutator gives every new pool.
    let unmark =
        json!({"metadata": {"annotations": {vm_dhcp_core::store::STORE_ANNOTATION: null}}});
    w.pools()
        .patch("net-1", &PatchParams::default(), &Patch::Merge(&unmark))
        .await
        .expect("unmarked");
    let mut go: BTreeMap<String, String> = (0..5000u32)
        .map(|i| {
            let ip =
                std::net::Ipv4Addr::from(u32::from(std::net::Ipv4Addr::new(10, 82, 0, 10)) + i);
            let b = i.to_be_bytes();
            (
                ip.to_string(),
                format!("02:dd:{:02x}:{:02x}:{:02x}:{:02x}", b[0], b[1], b[2], b[3]),
            )
        })
        .collect();
    go.insert("10.82.40.1".into(), "02:dd:ff:00:00:01".into());
    let status = json!({"status": {"ipv4": {"allocated": go, "used": go.len(), "available": 16_129 - go.len()}}});
    w.pools()
        .patch_status("net-1", &PatchParams::default(), &Patch::Merge(&status))
        .await
        .expect("Go status");

    // Before the controller has migrated the pool, admission refuses and says to retry.
    let early = try_vm(&w, "early", "02:dd:ee:00:00:01", json!({}))
        .await
        .expect_err("refused until migrated");
    assert!(
        early.to_string().contains("retry in a few seconds"),
        "{early}"
    );

    let started = Instant::now();
    let cp = ControlPlane::shared().await;
    let ctl = Controller::start(cp, &ns, &["--no-agent"]);
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let pool = w.pools().get("net-1").await.expect("pool");
        let marked = pool
            .annotations()
            .get(vm_dhcp_core::store::STORE_ANNOTATION)
            .is_some_and(|v| v == vm_dhcp_core::store::STORE_OBJECTS);
        if marked {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the pool was never migrated:\n{}",
            ctl.log()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    eprintln!(
        "migrated {} Go allocations into address objects in {:.1} s",
        go.len(),
        started.elapsed().as_secs_f64()
    );
    let held = store_of(&w).await;
    let as_objects: BTreeMap<String, String> = held
        .iter()
        .map(|(ip, (mac, _))| (ip.clone(), mac.clone()))
        .collect();
    assert_eq!(as_objects.len(), go.len(), "one object per Go allocation");
    assert!(as_objects == go, "every Go allocation kept as it was");
    let claimed = vm_dhcp_e2e::webhooks::claims(&w.ns, "net-1").await;
    assert_eq!(claimed.len(), go.len(), "one claim per MAC");

    // Admission works again: a new VM gets the lowest address no Go allocation holds.
    let vm = admitted_within(Duration::from_secs(30), "after migration", async || {
        try_vm(&w, "early", "02:dd:ee:00:00:01", json!({})).await
    })
    .await;
    let ip = allocation_ip(&vm);
    assert_eq!(ip, "10.82.19.146", "10.82.0.10 + 5,000");
    // The Go-written static vmnetcfg keeps its address: re-admitted on update, adopted.
    let patch = json!({"metadata": {"labels": {"touched": "yes"}}});
    let cfg = w
        .cfgs()
        .patch("static-vm", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("static vmnetcfg re-admitted");
    assert_eq!(
        cfg.spec.network_configs.expect("entries")[0]
            .ip_address
            .as_deref(),
        Some("10.82.40.1")
    );
    let deadline = Instant::now() + DEADLINE;
    loop {
        let held = store_of(&w).await;
        let owner = held.get("10.82.40.1").and_then(|(_, o)| o.clone());
        if owner.as_deref() == Some(format!("{ns}/static-vm").as_str()) {
            break;
        }
        assert!(Instant::now() < deadline, "never adopted: {owner:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let pool = w
        .wait_pool("projected", |p| counts(p).0 == go.len() as i64 + 1)
        .await;
    assert_eq!(
        allocated(&pool).get("10.82.40.1").map(String::as_str),
        Some("02:dd:ff:00:00:01")
    );
}

/// Issue 12 items 2 and 7: what a crash between the two writes of an admission leaves (a
/// MAC claim without its address object, an address object no claim names) is swept after
/// the grace period; a retry of the crashed admission completes it instead; complete
/// allocations are never touched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_between_the_writes_of_an_admission_is_swept() {
    if !can_run_pods() {
        return;
    }
    let w = World::new("ctl-crash", &[("a", true, false)]).await;
    let ns = w.ns.name.clone();
    let cp = ControlPlane::shared().await;
    let ctl = Controller::start(cp, &ns, &["--no-agent"]);
    w.pool("10.83.0.0/24", "10.83.0.10", "10.83.0.99").await;
    let kept = w.vm("kept", &[("nic-1", "02:ee:00:00:00:01")]).await;
    assert_eq!(allocation_ip(&kept), "10.83.0.10");

    let holding = |ip: &str, mac: &str, owner: &str| vm_dhcp_core::store::Holding {
        ip: ip.parse().expect("ip"),
        mac: mac.parse().expect("mac"),
        owner: Some(format!("{ns}/{owner}")),
        static_: false,
        interface: None,
    };
    let claims = w.ns.api::<vm_dhcp_core::crd::IPPoolMACClaim>();
    let addresses = w.ns.api::<vm_dhcp_core::crd::IPPoolAddress>();
    // Crashed after the claim: its VM is retried by the client, and gets the claimed address.
    let retried = holding("10.83.0.50", "02:ee:00:00:00:02", "retried");
    // Crashed after the claim: its VM never comes.
    let gone = holding("10.83.0.51", "02:ee:00:00:00:03", "gone");
    // An address object whose claim is gone (a release stopped half-way).
    let stray = holding("10.83.0.52", "02:ee:00:00:00:04", "stray");
    for h in [&retried, &gone] {
        claims
            .create(
                &PostParams::default(),
                &vm_dhcp_core::store::claim_object(&ns, "net-1", &w.network, h, None),
            )
            .await
            .expect("half-made claim");
    }
    addresses
        .create(
            &PostParams::default(),
            &vm_dhcp_core::store::address_object(&ns, "net-1", &w.network, &stray),
        )
        .await
        .expect("stray address object");

    let vm = try_vm(&w, "retried", "02:ee:00:00:00:02", json!({}))
        .await
        .expect("the retry is admitted");
    assert_eq!(
        allocation_ip(&vm),
        "10.83.0.50",
        "the claimed address, completed"
    );

    let deadline = Instant::now() + DEADLINE;
    loop {
        let held = store_of(&w).await;
        let claimed = vm_dhcp_e2e::webhooks::claims(&w.ns, "net-1").await;
        let swept = !held.contains_key("10.83.0.52") && !claimed.contains_key("02:ee:00:00:00:03");
        if swept {
            assert_eq!(
                held.keys().cloned().collect::<Vec<_>>(),
                vec!["10.83.0.10".to_string(), "10.83.0.50".to_string()],
                "complete allocations kept"
            );
            assert_eq!(claimed.len(), 2, "{claimed:?}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "half-made allocations never swept: {held:?} {claimed:?}\n{}",
            ctl.log()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert!(
        ctl.log().contains("half-made allocation swept"),
        "{}",
        ctl.log()
    );
}

/// Issue 12 items 4 and 5: a /16 pool is admitted and allocates at both ends; the status
/// lists the allocations up to the limit, then only the counts with a condition that says
/// where to look, and lists them again when they fit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sixteen_pool_lists_its_allocations_in_the_status_only_while_they_fit() {
    if !can_run_pods() {
        return;
    }
    let w = World::new("ctl-big", &[("a", true, false)]).await;
    let cp = ControlPlane::shared().await;
    let _ctl = Controller::start(
        cp,
        &w.ns.name,
        &["--no-agent", "--status-max-allocations=5"],
    );
    w.pool("10.90.0.0/16", "10.90.0.2", "10.90.255.254").await;
    for i in 1..=5u8 {
        w.vm(
            &format!("vm{i}"),
            &[("nic-1", &format!("02:f0:00:00:00:{i:02x}"))],
        )
        .await;
    }
    let top = try_vm(
        &w,
        "top",
        "02:f0:00:00:00:ff",
        json!({"static-ip.harvesterhci.io/nic-1": "10.90.255.254"}),
    )
    .await
    .expect("the last address of the /16");
    assert_eq!(allocation_ip(&top), "10.90.255.254");
    let listed = |p: &IPPool| cond(p, vm_dhcp_core::store::LISTED_CONDITION);
    let pool = w
        .wait_pool("counts only", |p| {
            counts(p).0 == 6 && listed(p).as_deref() == Some("False")
        })
        .await;
    // 65,533 addresses in the range (the mutator put the server IP below it).
    let (used, available) = counts(&pool);
    let server = pool.spec.ipv4_config.as_ref().map(|c| c.server_ip.clone());
    assert_eq!(server.as_deref(), Some("10.90.0.1"));
    assert_eq!(used + available, 65_533, "{used} + {available}");
    assert!(
        allocated(&pool).is_empty(),
        "allocations left out of the status"
    );
    let message = pool
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| {
            c.iter()
                .find(|c| c.type_ == vm_dhcp_core::store::LISTED_CONDITION)
        })
        .and_then(|c| c.message.clone())
        .unwrap_or_default();
    assert!(message.contains("kubectl get ipamallocations"), "{message}");

    w.vms()
        .delete("vm1", &DeleteParams::default())
        .await
        .expect("delete vm1");
    let pool = w
        .wait_pool("listed again", |p| {
            counts(p).0 == 5 && listed(p).as_deref() == Some("True")
        })
        .await;
    let macs = allocated(&pool)
        .values()
        .filter(|v| v.contains(':'))
        .count();
    assert_eq!(macs, 5);
}

/// Issue 12 item 7: a VM deleted and recreated under the same name (same MAC) never loses the
/// address it was just given, whatever the timing against the controller's release.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_recreated_under_its_name_keeps_its_address() {
    if !can_run_pods() {
        return;
    }
    let w = World::new("ctl-recreate", &[("a", true, false)]).await;
    let cp = ControlPlane::shared().await;
    let ctl = Controller::start(cp, &w.ns.name, &["--no-agent"]);
    w.pool("10.84.0.0/24", "10.84.0.10", "10.84.0.99").await;
    let first = w.vm("re", &[("nic-1", "02:ab:00:00:00:01")]).await;
    let ip = allocation_ip(&first);
    for round in 0..4u64 {
        w.vms()
            .delete("re", &DeleteParams::default())
            .await
            .expect("delete");
        tokio::time::sleep(Duration::from_millis(round * 700)).await;
        let again = admitted_within(Duration::from_secs(10), "recreated", async || {
            try_vm(&w, "re", "02:ab:00:00:00:01", json!({})).await
        })
        .await;
        assert_eq!(allocation_ip(&again), ip, "round {round}: the same address");
    }
    // Past the admission window the controller has decided; the address is still held.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let held = store_of(&w).await;
    assert_eq!(
        held.get(&ip).map(|(mac, _)| mac.as_str()),
        Some("02:ab:00:00:00:01"),
        "{held:?}\n{}",
        ctl.log()
    );
    let claimed = vm_dhcp_e2e::webhooks::claims(&w.ns, "net-1").await;
    assert_eq!(claimed["02:ab:00:00:00:01"].address, ip);
    w.wait_cfg("re", "shows the address", |c| {
        c.and_then(|c| c.status.as_ref())
            .and_then(|s| s.network_configs.as_ref())
            .is_some_and(|e| {
                e.iter()
                    .any(|e| e.allocated_ip_address.as_deref() == Some(ip.as_str()))
            })
    })
    .await;
}

/// One look at who leads and who answers DHCP.
struct Look {
    at: Instant,
    leaders: Vec<&'static str>,
    actives: Vec<String>,
}

/// kube-apiserver stops answering the leading controller and the active agent for 30 s (a
/// proxy holding their connections, the requests hanging as dropped packets make them):
/// both fence themselves before the standbys may take over, the standbys take over and
/// keep writing, and at no sampled moment are there two leaders or two active agents.
/// Afterwards the healed pair stays standby and nothing written meanwhile is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wedged_apiserver_never_makes_two_leaders_or_two_active_agents_and_loses_no_write() {
    if !can_run_pods() {
        return;
    }
    let w = World::new("ctl-wedge", &[("a", true, false), ("b", true, false)]).await;
    let cp = ControlPlane::shared().await;
    let proxy = vm_dhcp_e2e::faultproxy::FaultProxy::start(std::net::SocketAddr::from((
        [127, 0, 0, 1],
        cp.apiserver_port,
    )))
    .await
    .expect("fault proxy");
    let kubeconfig = proxy
        .kubeconfig_for(
            cp,
            &run_dir()
                .expect("run dir")
                .join(format!("{}-wedge.kubeconfig", w.ns.name)),
        )
        .expect("proxy kubeconfig");
    let one = Controller::start_via(&kubeconfig, &w.ns.name, &["--identity=ctl-one"]);
    let deadline = Instant::now() + DEADLINE;
    while leader(&w.ns).await.as_deref() != Some("ctl-one") {
        assert!(
            Instant::now() < deadline,
            "ctl-one never led:\n{}",
            one.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let two = Controller::start(cp, &w.ns.name, &["--identity=ctl-two"]);
    let created = w.pool("10.84.0.0/24", "10.84.0.10", "10.84.0.19").await;
    let server_ip = created
        .spec
        .ipv4_config
        .as_ref()
        .map(|c| c.server_ip.clone())
        .expect("ipv4Config");
    w.wait_pool("ready with its agents", all_true).await;
    let agent_lease = vm_dhcp_core::controller::lease_name(&w.ns.name, "net-1");
    let active_agent = async || {
        w.ns.api::<k8s_openapi::api::coordination::v1::Lease>()
            .get_opt(&agent_lease)
            .await
            .expect("agent lease")
            .and_then(|l| l.spec?.holder_identity)
            .filter(|h| !h.is_empty())
    };
    let deadline = Instant::now() + DEADLINE;
    let cut = loop {
        if let Some(h) = active_agent().await {
            break h;
        }
        assert!(Instant::now() < deadline, "no agent took the pool's Lease");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    w.vm("vm1", &[("nic-1", "02:de:00:00:00:01")]).await;
    w.wait_cfg("vm1", "allocated", |c| c.is_some_and(allocated_cfg))
        .await;

    // Sample every ~100 ms: the controllers' own word, the agents' interfaces.
    let agents: Vec<(String, String)> = w
        .agents()
        .await
        .into_keys()
        .map(|p| {
            let netns = w.sim.pod_netns(&p).expect("agent netns");
            (p, netns)
        })
        .collect();
    assert_eq!(agents.len(), 2, "two agents: {agents:?}");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let stop = stop.clone();
        let (p1, p2) = (one.port, two.port);
        let server_ip = server_ip.clone();
        tokio::spawn(async move {
            let mut looks = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let mut leaders = Vec::new();
                for (name, port) in [("ctl-one", p1), ("ctl-two", p2)] {
                    let says = async {
                        let (_, body) = vm_dhcp_e2e::plain_get(port, "/readyz").await.ok()?;
                        serde_json::from_str::<serde_json::Value>(&body).ok()?["leading"].as_bool()
                    };
                    if says.await == Some(true) {
                        leaders.push(name);
                    }
                }
                let mut actives = Vec::new();
                for (pod, netns) in &agents {
                    if vm_dhcp_e2e::netns_holds_ip(netns, "eth1", &server_ip).await {
                        actives.push(pod.clone());
                    }
                }
                looks.push(Look {
                    at: Instant::now(),
                    leaders,
                    actives,
                });
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            looks
        })
    };
    tokio::time::sleep(Duration::from_secs(2)).await;

    // The wedge: ctl-one's and the active agent's requests hang for 30 s.
    proxy.pause();
    w.sim.partition_pod(&cut).expect("cut the active agent");
    let wedged_at = Instant::now();
    // Meanwhile the standbys take over and write: a VM made, a VM deleted.
    w.vm("vm2", &[("nic-1", "02:de:00:00:00:02")]).await;
    w.vms()
        .delete("vm1", &DeleteParams::default())
        .await
        .expect("delete vm1");
    w.wait_cfg("vm2", "allocated by the new leader", |c| {
        c.is_some_and(allocated_cfg)
    })
    .await;
    w.wait_pool("released vm1's address", |p| {
        let macs: BTreeSet<String> = allocated(p).into_values().collect();
        !macs.contains("02:de:00:00:00:01") && macs.contains("02:de:00:00:00:02")
    })
    .await;
    assert_eq!(
        leader(&w.ns).await.as_deref(),
        Some("ctl-two"),
        "{}",
        two.log()
    );
    let took_over = wedged_at.elapsed();
    let deadline = Instant::now() + DEADLINE;
    let new_active = loop {
        match active_agent().await {
            Some(h) if h != cut => break h,
            _ => {}
        }
        assert!(
            Instant::now() < deadline,
            "the standby agent never took the pool's Lease"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    tokio::time::sleep(Duration::from_secs(30).saturating_sub(wedged_at.elapsed())).await;
    proxy.resume();
    w.sim.heal_pod(&cut).expect("heal the agent");
    let healed_at = Instant::now();

    // Whatever ctl-one had in flight arrives now; it must change nothing.
    tokio::time::sleep(Duration::from_secs(8)).await;
    w.vm("vm3", &[("nic-1", "02:de:00:00:00:03")]).await;
    w.wait_cfg("vm3", "allocated after the wedge", |c| {
        c.is_some_and(allocated_cfg)
    })
    .await;
    let pool = w
        .wait_pool("holding vm2 and vm3 only", |p| {
            let macs: BTreeSet<String> = allocated(p).into_values().collect();
            macs == ["02:de:00:00:00:02", "02:de:00:00:00:03"]
                .map(String::from)
                .into()
        })
        .await;
    assert_eq!(counts(&pool), (2, 8));
    assert!(
        w.cfgs().get_opt("vm1").await.expect("vmnetcfg").is_none(),
        "vm1's vmnetcfg is back"
    );
    assert_eq!(leader(&w.ns).await.as_deref(), Some("ctl-two"));
    assert_eq!(active_agent().await.as_deref(), Some(new_active.as_str()));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let looks = sampler.await.expect("sampler");

    let two_leaders: Vec<_> = looks.iter().filter(|l| l.leaders.len() > 1).collect();
    let two_actives: Vec<_> = looks.iter().filter(|l| l.actives.len() > 1).collect();
    assert!(
        two_leaders.is_empty() && two_actives.is_empty(),
        "two leaders at {} samples, two active agents at {} of {}:\nctl-one:\n{}\nctl-two:\n{}",
        two_leaders.len(),
        two_actives.len(),
        looks.len(),
        one.log(),
        two.log()
    );
    // Exactly one, but for the handover: the longest run of samples without one.
    let longest_gap = |has: &dyn Fn(&Look) -> bool| {
        let mut longest = Duration::ZERO;
        let mut since: Option<Instant> = None;
        for l in &looks {
            match (has(l), since) {
                (false, None) => since = Some(l.at),
                (true, Some(t)) => {
                    longest = longest.max(l.at.duration_since(t));
                    since = None;
                }
                _ => {}
            }
        }
        longest
    };
    let leaderless = longest_gap(&|l: &Look| l.leaders.len() == 1);
    let inactive = longest_gap(&|l: &Look| l.actives.len() == 1);
    assert!(
        looks
            .iter()
            .filter(|l| l.at > healed_at)
            .all(|l| l.leaders == ["ctl-two"]),
        "after the wedge only ctl-two leads"
    );
    assert!(
        leaderless < Duration::from_secs(20) && inactive < Duration::from_secs(12),
        "handover too slow: {leaderless:?} without a leader, {inactive:?} without an active agent"
    );
    assert!(
        one.log().contains("standing by"),
        "ctl-one never fenced itself:\n{}",
        one.log()
    );
    eprintln!(
        "wedge: {} samples; ctl-two led and wrote {took_over:?} after the wedge; longest without a leader {leaderless:?}, without an active agent {inactive:?}; {cut} -> {new_active}",
        looks.len()
    );
}

fn allocated_cfg(c: &VirtualMachineNetworkConfig) -> bool {
    c.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| {
            cs.iter()
                .any(|c| c.type_ == "Allocated" && c.status == "True")
        })
}
