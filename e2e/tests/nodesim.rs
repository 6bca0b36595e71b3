//! The node simulator against the real control plane: scheduling (node affinity, pod
//! anti-affinity, taints), the kubelet's part (a process in a network namespace, pod IP,
//! readiness, restarts, the in-namespace apiserver forwarder, per-network bridges), normal
//! deletion, and a lost node.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Node, Pod, ServiceAccount};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::api::{Api, DeleteParams, PostParams};
use serde_json::{Value, json};
use vm_dhcp_e2e::ControlPlane;
use vm_dhcp_e2e::nodesim::{NodeSim, NodeSpec, UNREACHABLE_TAINT, netns_list};

const MGMT: &str = "network.harvesterhci.io/mgmt";
const DEADLINE: Duration = Duration::from_secs(30);

#[allow(dead_code)]
#[path = "../../tests/support/needs.rs"]
mod needs;

/// The simulator makes network namespaces and runs busybox: without root, `ip` or busybox a
/// test fails saying so (`VM_DHCP_TESTS_SKIP_MISSING=1`: skips).
macro_rules! require_pods {
    () => {
        if !needs::require(module_path!(), true, &[needs::IP, needs::BUSYBOX]) {
            return;
        }
    };
}

/// `program` (whose Debian package has its name), or a failure that says how to get it.
fn which(program: &'static str) -> PathBuf {
    needs::require(
        module_path!(),
        false,
        &[needs::Program {
            name: program,
            package: program,
        }],
    );
    needs::find(program).unwrap_or_else(|| panic!("{program} not found"))
}

fn programs() -> HashMap<String, PathBuf> {
    HashMap::from([("busybox".to_string(), which("busybox"))])
}

/// An agent pod (the label the simulator selects) with `spec`.
fn agent_pod(name: &str, labels: Value, spec: Value) -> Pod {
    let mut all = json!({"network.harvesterhci.io/vm-dhcp-controller": "agent"});
    if let (Some(all), Some(extra)) = (all.as_object_mut(), labels.as_object()) {
        all.extend(extra.clone());
    }
    serde_json::from_value(json!({"metadata": {"name": name, "labels": all}, "spec": spec}))
        .expect("pod object")
}

/// Required node affinity to `<key>=true`, as the upstream controller writes it.
fn affinity_to(key: &str) -> Value {
    json!({"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": key, "operator": "In", "values": ["true"]}]}]}}})
}

fn busybox(name: &str, command: &[&str]) -> Value {
    json!({"name": name, "image": "docker.io/library/busybox:1.36", "command": command})
}

/// A directory with an index.html holding `marker`, for busybox httpd.
fn web_root(ns: &str, marker: &str) -> PathBuf {
    let dir = vm_dhcp_e2e::proc::run_dir()
        .expect("run dir")
        .join(format!("web-{ns}"));
    std::fs::create_dir_all(&dir).expect("web dir");
    std::fs::write(dir.join("index.html"), marker).expect("index.html");
    dir
}

fn condition(pod: &Pod, type_: &str) -> Option<String> {
    pod.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| c.status.clone())
}

fn phase(pod: &Pod) -> &str {
    pod.status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or("")
}

fn node_of(pod: &Pod) -> Option<String> {
    pod.spec.as_ref().and_then(|s| s.node_name.clone())
}

/// Waits (up to a generous deadline) until the pod satisfies `ok`.
async fn wait_pod(pods: &Api<Pod>, name: &str, what: &str, ok: impl Fn(&Pod) -> bool) -> Pod {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let pod = pods.get_opt(name).await.expect("reading pod");
        if let Some(p) = &pod
            && ok(p)
        {
            return p.clone();
        }
        assert!(
            Instant::now() < deadline,
            "pod {name} never became {what}; last seen:\n{pod:#?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn wait_gone(pods: &Api<Pod>, name: &str) {
    let deadline = Instant::now() + DEADLINE;
    while pods.get_opt(name).await.expect("reading pod").is_some() {
        assert!(Instant::now() < deadline, "pod {name} was never removed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn process_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_affinity_places_the_pod_which_runs_ready_and_reachable() {
    require_pods!();
    let cp = ControlPlane::shared().await;
    let ns = cp.namespace("sim-affinity").await;
    // The labelled node sorts last: a scheduler ignoring affinity would pick "a".
    let nodes = vec![
        NodeSpec::new("a"),
        NodeSpec::new("b").label(MGMT, "false"),
        NodeSpec::new("c").label(MGMT, "true"),
    ];
    let sim = NodeSim::start(cp, &ns.name, nodes, programs())
        .await
        .expect("simulator");
    let pods: Api<Pod> = ns.api();
    let marker = format!("served by {}", ns.name);
    let root = web_root(&ns.name, &marker);
    let root = root.to_str().expect("utf-8 path");
    let httpd = |probe_path: &str| {
        let mut c = busybox("web", &["httpd", "-f", "-p", "8080", "-h", root]);
        c["readinessProbe"] =
            json!({"httpGet": {"path": probe_path, "port": 8080}, "periodSeconds": 10});
        json!({"affinity": affinity_to(MGMT), "containers": [c]})
    };
    for (name, spec) in [
        ("web", httpd("/index.html")),
        ("unready", httpd("/missing.html")),
        (
            "nowhere",
            json!({"affinity": affinity_to("network.harvesterhci.io/provider"),
                   "containers": [busybox("main", &["sleep", "3600"])]}),
        ),
    ] {
        pods.create(&PostParams::default(), &agent_pod(name, json!({}), spec))
            .await
            .expect("create pod");
    }

    let web = wait_pod(&pods, "web", "Ready", |p| {
        condition(p, "Ready").as_deref() == Some("True")
    })
    .await;
    assert_eq!(
        node_of(&web),
        Some(sim.node_name("c")),
        "scheduled off the labelled node"
    );
    assert_eq!(phase(&web), "Running");
    let status = web.status.clone().expect("status");
    let pod_ip = status.pod_ip.clone().expect("podIP");
    assert_eq!(
        Some(pod_ip.clone()),
        sim.pod_ip("web").map(|ip| ip.to_string())
    );
    assert_eq!(status.pod_ips.map(|ips| ips.len()), Some(1));
    assert!(status.start_time.is_some());
    let cs = &status.container_statuses.expect("containerStatuses")[0];
    assert!(
        cs.ready
            && cs.restart_count == 0
            && cs.state.as_ref().and_then(|s| s.running.as_ref()).is_some()
    );
    let pid = sim.pid("web", "web").expect("web has a process");
    assert!(process_alive(pid));
    let ip: std::net::IpAddr = pod_ip.parse().expect("pod IP");
    let (code, page) = vm_dhcp_e2e::plain_get_at(ip, 8080, "/index.html")
        .await
        .expect("HTTP to the pod IP");
    assert!(code == 200 && page.contains(&marker), "{code} {page}");

    // Same server, probe on a missing page: running, never ready. By now "web" has shown
    // that probes run, so "unready" has been probed too.
    let unready = wait_pod(&pods, "unready", "Running", |p| phase(p) == "Running").await;
    assert_eq!(node_of(&unready), Some(sim.node_name("c")));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let unready = pods.get("unready").await.expect("unready");
    assert_eq!(condition(&unready, "Ready").as_deref(), Some("False"));
    assert_eq!(
        condition(&unready, "ContainersReady").as_deref(),
        Some("False")
    );

    let nowhere = wait_pod(&pods, "nowhere", "Unschedulable", |p| {
        p.status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| {
                c.iter().any(|c| {
                    c.type_ == "PodScheduled" && c.reason.as_deref() == Some("Unschedulable")
                })
            })
    })
    .await;
    assert_eq!(node_of(&nowhere), None);
    assert_eq!(phase(&nowhere), "Pending");
    assert_eq!(
        condition(&nowhere, "PodScheduled").as_deref(),
        Some("False")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anti_affinity_puts_two_pods_on_distinct_nodes_and_leaves_a_third_pending() {
    require_pods!();
    let cp = ControlPlane::shared().await;
    let ns = cp.namespace("sim-anti").await;
    let nodes = vec![
        NodeSpec::new("a").label(MGMT, "true"),
        NodeSpec::new("b").label(MGMT, "true"),
        NodeSpec::new("c"),
    ];
    let sim = NodeSim::start(cp, &ns.name, nodes, programs())
        .await
        .expect("simulator");
    let pods: Api<Pod> = ns.api();
    let pool = json!({"network.harvesterhci.io/ippool-name": "pool-1"});
    let mut affinity = affinity_to(MGMT);
    affinity["podAntiAffinity"] = json!({"requiredDuringSchedulingIgnoredDuringExecution": [{
        "labelSelector": {"matchLabels": pool}, "topologyKey": "kubernetes.io/hostname"}]});
    let spec = json!({"affinity": affinity, "containers": [busybox("main", &["sleep", "3600"])]});
    // All three at once: the scheduler must account for its own fresh bindings.
    for name in ["p1", "p2", "p3"] {
        pods.create(
            &PostParams::default(),
            &agent_pod(name, pool.clone(), spec.clone()),
        )
        .await
        .expect("create pod");
    }
    let deadline = Instant::now() + DEADLINE;
    let (running, pending) = loop {
        let mut running = Vec::new();
        let mut pending = Vec::new();
        for name in ["p1", "p2", "p3"] {
            let p = pods.get(name).await.expect("pod");
            if phase(&p) == "Running" {
                running.push(p);
            } else if condition(&p, "PodScheduled").as_deref() == Some("False") {
                pending.push(p);
            }
        }
        if running.len() == 2 && pending.len() == 1 {
            break (running, pending);
        }
        assert!(
            Instant::now() < deadline,
            "never 2 running + 1 pending:\n{}",
            sim.sim_log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let mut placed: Vec<String> = running.iter().filter_map(node_of).collect();
    placed.sort();
    assert_eq!(placed, vec![sim.node_name("a"), sim.node_name("b")]);
    assert_eq!(node_of(&pending[0]), None);
    let message = pending[0]
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| c.iter().find(|c| c.type_ == "PodScheduled"))
        .and_then(|c| c.message.clone())
        .unwrap_or_default();
    assert!(
        message.contains("anti-affinity") && message.contains("0/3"),
        "{message}"
    );

    // Freeing a node lets the pending pod in, on exactly that node.
    let freed = running[0].metadata.name.clone().expect("name");
    let freed_node = node_of(&running[0]);
    pods.delete(&freed, &DeleteParams::default())
        .await
        .expect("delete");
    wait_gone(&pods, &freed).await;
    let third = pending[0].metadata.name.clone().expect("name");
    let third = wait_pod(&pods, &third, "Running", |p| phase(p) == "Running").await;
    assert_eq!(node_of(&third), freed_node);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_reaches_the_apiserver_through_the_forwarder_in_its_namespace() {
    require_pods!();
    let cp = ControlPlane::shared().await;
    let ns = cp.namespace("sim-apiserver").await;
    let sim = NodeSim::start(cp, &ns.name, vec![NodeSpec::new("a")], programs())
        .await
        .expect("simulator");
    let pods: Api<Pod> = ns.api();
    // "agent" exists (TokenRequest path); "ghost" does not (client-certificate fallback).
    let sa: ServiceAccount =
        serde_json::from_value(json!({"metadata": {"name": "agent"}})).expect("sa");
    ns.api::<ServiceAccount>()
        .create(&PostParams::default(), &sa)
        .await
        .expect("create sa");
    let role: Role = serde_json::from_value(json!({
        "metadata": {"name": "read-pods"},
        "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get"]}]
    }))
    .expect("role");
    ns.api::<Role>()
        .create(&PostParams::default(), &role)
        .await
        .expect("create role");
    let binding: RoleBinding = serde_json::from_value(json!({
        "metadata": {"name": "read-pods"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "read-pods"},
        "subjects": [{"kind": "ServiceAccount", "name": "agent", "namespace": ns.name},
                     {"kind": "ServiceAccount", "name": "ghost", "namespace": ns.name}]
    }))
    .expect("binding");
    ns.api::<RoleBinding>()
        .create(&PostParams::default(), &binding)
        .await
        .expect("create binding");

    // kubectl has no idea of the apiserver's real port: only the kubeconfig the simulator
    // wrote (127.0.0.1:6443 inside the pod's namespace) can get it there.
    let script = "set -e; $KUBECTL get --raw /readyz; echo; \
                  $KUBECTL auth whoami -o jsonpath='{.status.userInfo.username}'; echo; \
                  $KUBECTL get pod $POD_NAME -o jsonpath='{.spec.nodeName}'; echo; \
                  echo node=$NODE_NAME";
    let kubectl = cp.bin_dir.join("kubectl");
    for (pod, sa) in [("with-token", "agent"), ("with-cert", "ghost")] {
        let mut c = busybox("main", &["sh", "-c", script]);
        c["env"] = json!([
            {"name": "KUBECTL", "value": kubectl.display().to_string()},
            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
        ]);
        let spec = json!({"serviceAccountName": sa, "restartPolicy": "Never", "containers": [c]});
        pods.create(&PostParams::default(), &agent_pod(pod, json!({}), spec))
            .await
            .expect("create pod");
    }
    let node = sim.node_name("a");
    for (pod, sa) in [("with-token", "agent"), ("with-cert", "ghost")] {
        let done = wait_pod(&pods, pod, "finished", |p| {
            matches!(phase(p), "Succeeded" | "Failed")
        })
        .await;
        let log = sim.log(pod, "main");
        assert_eq!(phase(&done), "Succeeded", "{pod} failed; its log:\n{log}");
        let lines: Vec<&str> = log.lines().map(str::trim).collect();
        let user = format!("system:serviceaccount:{}:{sa}", ns.name);
        let node_line = format!("node={node}");
        assert_eq!(
            lines,
            vec!["ok", user.as_str(), node.as_str(), node_line.as_str()],
            "{pod}: unexpected output"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn normal_delete_terminates_the_process_and_removes_the_pod() {
    require_pods!();
    let cp = ControlPlane::shared().await;
    let ns = cp.namespace("sim-delete").await;
    let sim = NodeSim::start(cp, &ns.name, vec![NodeSpec::new("a")], programs())
        .await
        .expect("simulator");
    let pods: Api<Pod> = ns.api();
    // The trap shows the process got SIGTERM (a SIGKILL would leave no trace).
    let script =
        "trap 'echo got-sigterm; exit 0' TERM; echo started; while true; do sleep 0.1; done";
    let spec = json!({"terminationGracePeriodSeconds": 30, "containers": [busybox("main", &["sh", "-c", script])]});
    pods.create(
        &PostParams::default(),
        &agent_pod("doomed", json!({}), spec),
    )
    .await
    .expect("create pod");
    wait_pod(&pods, "doomed", "Running", |p| phase(p) == "Running").await;
    let pid = sim.pid("doomed", "main").expect("process");
    let netns = sim.pod_netns("doomed").expect("netns");
    assert!(process_alive(pid) && netns_list().contains(&netns));
    let log_path = sim.log_path("doomed", "main").expect("log");
    let deadline = Instant::now() + DEADLINE;
    while !std::fs::read_to_string(&log_path)
        .unwrap_or_default()
        .contains("started")
    {
        assert!(Instant::now() < deadline, "the shell never started");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    pods.delete("doomed", &DeleteParams::default())
        .await
        .expect("delete");
    wait_gone(&pods, "doomed").await;
    assert!(!process_alive(pid), "process {pid} outlived its pod");
    assert!(
        !netns_list().contains(&netns),
        "netns {netns} outlived its pod"
    );
    let log = std::fs::read_to_string(&log_path).expect("log");
    assert!(
        log.contains("got-sigterm"),
        "the process was not sent SIGTERM:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_node_kills_its_processes_and_leaves_its_pods_terminating() {
    require_pods!();
    let cp = ControlPlane::shared().await;
    let ns = cp.namespace("sim-lost").await;
    let nodes = vec![
        NodeSpec::new("a").label(MGMT, "true"),
        NodeSpec::new("b").label(MGMT, "true"),
    ];
    let sim = NodeSim::start(cp, &ns.name, nodes, programs())
        .await
        .expect("simulator");
    let pods: Api<Pod> = ns.api();
    let pool = json!({"network.harvesterhci.io/ippool-name": "pool-1"});
    let mut affinity = affinity_to(MGMT);
    affinity["podAntiAffinity"] = json!({"requiredDuringSchedulingIgnoredDuringExecution": [{
        "labelSelector": {"matchLabels": pool}, "topologyKey": "kubernetes.io/hostname"}]});
    let spec = json!({"affinity": affinity, "containers": [busybox("main", &["sleep", "3600"])]});
    for name in ["victim", "survivor"] {
        pods.create(
            &PostParams::default(),
            &agent_pod(name, pool.clone(), spec.clone()),
        )
        .await
        .expect("create pod");
    }
    let victim = wait_pod(&pods, "victim", "Running", |p| phase(p) == "Running").await;
    wait_pod(&pods, "survivor", "Running", |p| phase(p) == "Running").await;
    let lost = node_of(&victim).expect("bound");
    let pid = sim.pid("victim", "main").expect("process");
    let netns = sim.pod_netns("victim").expect("netns");
    let survivor_pid = sim.pid("survivor", "main").expect("process");

    sim.lose_node(&lost).await.expect("lose node");
    assert!(
        !process_alive(pid),
        "the lost node's process {pid} still runs"
    );
    assert!(
        process_alive(survivor_pid),
        "the other node's process died too"
    );
    let node: Node = Api::all(ns.client.clone()).get(&lost).await.expect("node");
    let ready = node
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| c.iter().find(|c| c.type_ == "Ready"))
        .expect("Ready condition");
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_deref()),
        ("Unknown", Some("NodeStatusUnknown"))
    );
    let mut taints: Vec<(String, String)> = node
        .spec
        .and_then(|s| s.taints)
        .unwrap_or_default()
        .into_iter()
        .map(|t| (t.key, t.effect))
        .collect();
    taints.sort();
    assert_eq!(
        taints,
        vec![
            (UNREACHABLE_TAINT.to_string(), "NoExecute".to_string()),
            (UNREACHABLE_TAINT.to_string(), "NoSchedule".to_string())
        ]
    );

    // Both deleted at once: the live node finishes its deletion, the lost one never does.
    pods.delete("victim", &DeleteParams::default())
        .await
        .expect("delete victim");
    pods.delete("survivor", &DeleteParams::default())
        .await
        .expect("delete survivor");
    wait_gone(&pods, "survivor").await;
    assert!(!process_alive(survivor_pid));
    // Longer than any deletion on a live node takes (grace capped at 3 s).
    tokio::time::sleep(Duration::from_secs(5)).await;
    let stuck = pods
        .get("victim")
        .await
        .expect("the lost node's pod must still exist");
    assert!(
        stuck.metadata.deletion_timestamp.is_some(),
        "not Terminating"
    );

    // A replacement cannot go to the tainted node (and the other is free again).
    pods.create(
        &PostParams::default(),
        &agent_pod("replacement", pool.clone(), spec.clone()),
    )
    .await
    .expect("create replacement");
    let replacement = wait_pod(&pods, "replacement", "Running", |p| phase(p) == "Running").await;
    assert_ne!(node_of(&replacement), Some(lost.clone()));

    // What the controller will do: force-delete. The simulator then drops the namespace.
    let force = DeleteParams {
        grace_period_seconds: Some(0),
        ..DeleteParams::default()
    };
    pods.delete("victim", &force).await.expect("force delete");
    wait_gone(&pods, "victim").await;
    let deadline = Instant::now() + DEADLINE;
    while netns_list().contains(&netns) {
        assert!(
            Instant::now() < deadline,
            "netns {netns} was never cleaned up"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vm_namespaces_reach_the_pod_eth1_on_their_own_network_only() {
    require_pods!();
    let cp = ControlPlane::shared().await;
    let ns = cp.namespace("sim-bridge").await;
    let sim = NodeSim::start(cp, &ns.name, vec![NodeSpec::new("a")], programs())
        .await
        .expect("simulator");
    let pods: Api<Pod> = ns.api();
    let marker = format!("eth1 of {}", ns.name);
    let root = web_root(&ns.name, &marker);
    let httpd = busybox(
        "web",
        &[
            "httpd",
            "-f",
            "-p",
            "8080",
            "-h",
            root.to_str().expect("utf-8"),
        ],
    );
    // The JSON form (as upstream writes it) and Multus' short form, on two networks.
    let annotations = [
        (
            "on-a",
            json!([{"namespace": ns.name, "name": "net-a", "interface": "eth1"}]).to_string(),
        ),
        ("on-b", "net-b@eth1".to_string()),
    ];
    for (name, networks) in &annotations {
        let mut pod = agent_pod(name, json!({}), json!({"containers": [httpd.clone()]}));
        pod.metadata.annotations =
            Some([("k8s.v1.cni.cncf.io/networks".to_string(), networks.clone())].into());
        pods.create(&PostParams::default(), &pod)
            .await
            .expect("create pod");
    }
    // The same subnet on both networks: only the bridges keep them apart.
    for (pod, addr) in [("on-a", "192.168.77.1/24"), ("on-b", "192.168.77.2/24")] {
        wait_pod(&pods, pod, "Running", |p| phase(p) == "Running").await;
        let netns = sim.pod_netns(pod).expect("netns");
        let out = tokio::process::Command::new("ip")
            .args(["-n", &netns, "addr", "add", addr, "dev", "eth1"])
            .output()
            .await
            .expect("ip");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let vm_a = sim
        .attach_vm(&format!("{}/net-a", ns.name))
        .await
        .expect("vm on net-a");
    let vm_b = sim
        .attach_vm(&format!("{}/net-b", ns.name))
        .await
        .expect("vm on net-b");
    let busybox_bin = which("busybox");
    let bb = busybox_bin.to_str().expect("utf-8");
    for (vm, addr) in [(&vm_a, "192.168.77.50/24"), (&vm_b, "192.168.77.51/24")] {
        let out = vm
            .run("ip", &["addr", "add", addr, "dev", &vm.ifname])
            .await
            .expect("ip");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    for (vm, own, other) in [
        (&vm_a, "192.168.77.1", "192.168.77.2"),
        (&vm_b, "192.168.77.2", "192.168.77.1"),
    ] {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let out = vm
                .run(bb, &["ping", "-c", "1", "-W", "1", own])
                .await
                .expect("ping");
            if out.status.success() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{} never reached {own}: {}",
                vm.name,
                String::from_utf8_lossy(&out.stdout)
            );
        }
        // A TCP connection to the pod's own process (busybox wget crashes on Debian 12's
        // busybox, nc does not).
        let request =
            format!("printf 'GET /index.html HTTP/1.0\\r\\n\\r\\n' | {bb} nc -w 5 {own} 8080");
        let out = vm.run(bb, &["sh", "-c", &request]).await.expect("nc");
        let reply = String::from_utf8_lossy(&out.stdout);
        assert!(
            reply.starts_with("HTTP/1.1 200") && reply.ends_with(&marker),
            "{} from {own}: {reply}{}",
            vm.name,
            String::from_utf8_lossy(&out.stderr)
        );
        let out = vm
            .run(bb, &["ping", "-c", "2", "-W", "1", other])
            .await
            .expect("ping");
        assert!(
            !out.status.success(),
            "{} reached {other} on another network",
            vm.name
        );
    }
    // The other direction, as DHCP replies travel: the pod's namespace reaches a server the
    // VM runs (a long-running process started with VmNetns::spawn).
    let _server = vm_a
        .spawn(
            "httpd",
            bb,
            &[
                "httpd",
                "-f",
                "-p",
                "8081",
                "-h",
                root.to_str().expect("utf-8"),
            ],
        )
        .expect("httpd in the VM");
    let pod_ns = sim.pod_netns("on-a").expect("netns");
    let request =
        format!("printf 'GET /index.html HTTP/1.0\\r\\n\\r\\n' | {bb} nc -w 5 192.168.77.50 8081");
    let deadline = Instant::now() + DEADLINE;
    loop {
        let out = tokio::process::Command::new("ip")
            .args(["netns", "exec", &pod_ns, bb, "sh", "-c", &request])
            .output()
            .await
            .expect("nc from the pod");
        let reply = String::from_utf8_lossy(&out.stdout);
        if reply.starts_with("HTTP/1.1 200") && reply.ends_with(&marker) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the pod never reached the VM's server: {reply}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_policy_is_followed() {
    require_pods!();
    let cp = ControlPlane::shared().await;
    let ns = cp.namespace("sim-restart").await;
    let _sim = NodeSim::start(cp, &ns.name, vec![NodeSpec::new("a")], programs())
        .await
        .expect("simulator");
    let pods: Api<Pod> = ns.api();
    for (name, policy, code) in [
        ("crashing", "OnFailure", 3),
        ("done", "OnFailure", 0),
        ("failed", "Never", 3),
    ] {
        let script = format!("exit {code}");
        let spec = json!({"restartPolicy": policy, "containers": [busybox("main", &["sh", "-c", &script])]});
        pods.create(&PostParams::default(), &agent_pod(name, json!({}), spec))
            .await
            .expect("create pod");
    }
    let restarts = |p: &Pod| {
        p.status
            .as_ref()
            .and_then(|s| s.container_statuses.as_ref())
            .and_then(|c| c.first())
            .map(|c| c.restart_count)
            .unwrap_or(0)
    };
    let crashing = wait_pod(&pods, "crashing", "restarted twice", |p| restarts(p) >= 2).await;
    assert_eq!(phase(&crashing), "Running");
    let cs = &crashing
        .status
        .as_ref()
        .and_then(|s| s.container_statuses.clone())
        .expect("statuses")[0];
    let last = cs
        .last_state
        .as_ref()
        .and_then(|s| s.terminated.as_ref())
        .expect("lastState.terminated");
    assert_eq!(last.exit_code, 3);
    let done = wait_pod(&pods, "done", "Succeeded", |p| {
        matches!(phase(p), "Succeeded" | "Failed")
    })
    .await;
    assert_eq!((phase(&done), restarts(&done)), ("Succeeded", 0));
    let failed = wait_pod(&pods, "failed", "Failed", |p| {
        matches!(phase(p), "Succeeded" | "Failed")
    })
    .await;
    assert_eq!((phase(&failed), restarts(&failed)), ("Failed", 0));
}
