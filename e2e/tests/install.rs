//! The chart installed as users install it: `helm install` of `chart/` on a control plane
//! with kube-controller-manager (Deployments → ReplicaSets → Pods, EndpointSlices, role
//! aggregation, garbage collection), real cert-manager, and the node simulator's in-cluster
//! kubelet running every pod of the release (and the agents its controller makes) as the
//! local `vm-dhcp` binary under its own ServiceAccount's token: every component acts with
//! the chart's RBAC, reads its certificates from the mounted Secrets, and is reached by
//! kube-apiserver at its Service's endpoints (`--enable-aggregator-routing`).
//!
//! - cert-manager mode: Certificates Ready, caBundles injected, every pod Ready, then the
//!   whole chain through the release to a guest's DHCP lease, and the view as a user with
//!   only `view`;
//! - self-managed mode: installed, Ready, a VM admitted, the view lists it;
//! - `helm upgrade` to a new image rolls every component (agents too) while a client keeps
//!   creating VMs: none is refused;
//! - `helm uninstall` leaves no webhook configuration or APIService behind; IPPools and VMs
//!   are created freely afterwards;
//! - the Go add-on's release and objects are taken over by `helm upgrade --install` after the
//!   README's adoption step, with no allocation lost.
//!
//! The releases are cluster-wide (webhook configurations, APIService), so the tests run one
//! at a time, each starting from a cluster without vm-dhcp.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::{Value, json};
use vm_dhcp_core::crd::{IPPool, VirtualMachineNetworkConfig};
use vm_dhcp_core::kubevirt::VirtualMachine;
use vm_dhcp_e2e::ControlPlane;
use vm_dhcp_e2e::certmanager::CertManager;
use vm_dhcp_e2e::nodesim::{AGENT_SELECTOR, NodeSim, NodeSpec};
use vm_dhcp_e2e::release::{
    self, APISERVICE, RELEASE, WEBHOOK, helm, helm_ok, image_values, kubectl, until,
};

const WAIT: Duration = Duration::from_secs(120);
/// A user bound only to the `view` cluster role.
const VIEWER: &str = "jane-viewer";

/// The tests share the cluster-wide names of the release: one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[allow(dead_code)]
#[path = "../../tests/support/needs.rs"]
mod needs;

/// The node simulator makes network namespaces: without root (or `ip`, or busybox for the
/// guest's DHCP client) the test fails saying so (`VM_DHCP_TESTS_SKIP_MISSING=1`: skips).
fn can_run_pods() -> bool {
    needs::require(module_path!(), true, &[needs::IP, needs::BUSYBOX])
}

fn text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Removes what an earlier test of this binary may have left (it failed half-way): every
/// release, and vm-dhcp's cluster-wide objects and finalizers, so that nothing blocks.
async fn reset(cp: &ControlPlane) {
    let list = helm_ok(cp, &["list", "-A", "-a", "-o", "json"])
        .await
        .expect("helm list");
    let releases: Vec<Value> = serde_json::from_str(&list).unwrap_or_default();
    for r in releases {
        let (name, ns) = (
            r["name"].as_str().unwrap_or_default(),
            r["namespace"].as_str().unwrap_or_default(),
        );
        let _ = helm(
            cp,
            &["uninstall", name, "-n", ns, "--wait", "--timeout", "60s"],
        )
        .await;
    }
    for kind in [
        "mutatingwebhookconfigurations",
        "validatingwebhookconfigurations",
    ] {
        let _ = cp
            .kubectl(&["delete", kind, WEBHOOK, "--ignore-not-found"])
            .await;
    }
    let _ = cp
        .kubectl(&["delete", "apiservice", APISERVICE, "--ignore-not-found"])
        .await;
    for kind in ["ippools.network.harvesterhci.io", "vmnetcfgs"] {
        let out = cp.kubectl(&["get", kind, "-A", "-o", "json"]).await;
        let list: Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        for item in list["items"].as_array().into_iter().flatten() {
            let (name, ns) = (
                item["metadata"]["name"].as_str().unwrap_or_default(),
                item["metadata"]["namespace"].as_str().unwrap_or_default(),
            );
            let _ = cp
                .kubectl(&[
                    "patch",
                    kind,
                    name,
                    "-n",
                    ns,
                    "--type=merge",
                    "-p",
                    r#"{"metadata":{"finalizers":null}}"#,
                ])
                .await;
            let _ = cp
                .kubectl(&["delete", kind, name, "-n", ns, "--wait=false"])
                .await;
        }
    }
}

/// Two nodes on cluster network `cn` (when given), and a third on none.
fn nodes(cn: Option<&str>) -> Vec<NodeSpec> {
    let mut nodes: Vec<NodeSpec> = ["node-1", "node-2"]
        .iter()
        .map(|n| match cn {
            Some(cn) => NodeSpec::new(n).label(&format!("network.harvesterhci.io/{cn}"), "true"),
            None => NodeSpec::new(n),
        })
        .collect();
    nodes.push(NodeSpec::new("node-3"));
    nodes
}

/// `helm install` (retried while discovery has not caught up with cert-manager's CRDs):
/// the output, and how long it took.
async fn install(cp: &ControlPlane, ns: &str, values: &[String]) -> String {
    let chart = release::chart_dir().display().to_string();
    let mut args: Vec<&str> = vec![
        "install",
        RELEASE,
        &chart,
        "--namespace",
        ns,
        "--wait",
        "--timeout",
        "4m",
    ];
    args.extend(values.iter().map(String::as_str));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = helm(cp, &args).await.expect("helm");
        if out.status.success() {
            return String::from_utf8_lossy(&out.stdout).into_owned();
        }
        let said = text(&out);
        assert!(
            said.contains("does not serve cert-manager.io/v1") && Instant::now() < deadline,
            "helm install failed:\n{said}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn show(cp: &ControlPlane, args: &[&str]) {
    let out = kubectl(cp, args).await.expect("kubectl");
    println!("$ kubectl {}\n{out}", args.join(" "));
}

/// Everything a test needs: the release's namespace (where its pods and agents run), a
/// namespace for the VMs, the simulated nodes.
struct World {
    cp: &'static ControlPlane,
    client: Client,
    release_ns: vm_dhcp_e2e::TestNamespace,
    vms_ns: vm_dhcp_e2e::TestNamespace,
    sim: NodeSim,
}

impl World {
    async fn new(prefix: &str, cn: Option<&str>) -> World {
        let cp = ControlPlane::with_controllers().await;
        reset(cp).await;
        let release_ns = cp.namespace(&format!("{prefix}-rel")).await;
        let vms_ns = cp.namespace(&format!("{prefix}-vms")).await;
        let sim = NodeSim::start_in_cluster(cp, &release_ns.name, nodes(cn), release::programs())
            .await
            .expect("node simulator");
        World {
            cp,
            client: cp.client().await,
            release_ns,
            vms_ns,
            sim,
        }
    }

    fn rel(&self) -> &str {
        &self.release_ns.name
    }

    fn vms(&self) -> &str {
        &self.vms_ns.name
    }

    async fn describe(&self) -> String {
        format!(
            "{}\nsimulator:\n{}",
            release::describe(&self.client, self.rel()).await,
            self.sim.sim_log()
        )
    }

    /// Fails the test with `e` and an account of the release's pods.
    fn fail(&self, e: anyhow::Error) -> ! {
        let described = tokio::task::block_in_place(|| {
            tokio::runtime::Handle::current().block_on(self.describe())
        });
        panic!("{e:#}\n{described}")
    }

    async fn rolled_out(&self) {
        if let Err(e) = release::wait_rolled_out(&self.client, self.rel(), RELEASE, WAIT).await {
            panic!("{e:#}\nsimulator:\n{}", self.sim.sim_log());
        }
    }

    /// The release's pods by name → image (agents excluded).
    async fn component_pods(&self) -> BTreeMap<String, String> {
        let lp = ListParams::default().labels(&format!("{}={RELEASE}", release::INSTANCE_LABEL));
        Api::<Pod>::namespaced(self.client.clone(), self.rel())
            .list(&lp)
            .await
            .expect("pods")
            .items
            .into_iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none())
            .map(|p| {
                let image = p
                    .spec
                    .as_ref()
                    .and_then(|s| s.containers.first())
                    .and_then(|c| c.image.clone())
                    .unwrap_or_default();
                (p.name_any(), image)
            })
            .collect()
    }

    /// The agent pods by name → (image, Ready).
    async fn agents(&self) -> BTreeMap<String, (String, bool)> {
        self.agents_on()
            .await
            .into_iter()
            .map(|(name, (image, ready, _))| (name, (image, ready)))
            .collect()
    }

    /// The agent pods by name → (image, Ready, node).
    async fn agents_on(&self) -> BTreeMap<String, (String, bool, String)> {
        let lp = ListParams::default().labels(AGENT_SELECTOR);
        Api::<Pod>::namespaced(self.client.clone(), self.rel())
            .list(&lp)
            .await
            .expect("pods")
            .items
            .into_iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none())
            .map(|p| {
                let image = p
                    .spec
                    .as_ref()
                    .and_then(|s| s.containers.first())
                    .and_then(|c| c.image.clone())
                    .unwrap_or_default();
                let ready = release::pod_ready(&p);
                let node = p
                    .spec
                    .as_ref()
                    .and_then(|s| s.node_name.clone())
                    .unwrap_or_default();
                (p.name_any(), (image, ready, node))
            })
            .collect()
    }
}

/// `kubectl get ipamallocations.dhcp.harvesterhci.io` as the viewer, until it lists `ip`.
async fn viewer_sees(cp: &ControlPlane, ns: &str, ip: &str) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        let out = cp
            .kubectl(&[
                "get",
                "ipamallocations.dhcp.harvesterhci.io",
                "-n",
                ns,
                "--as",
                VIEWER,
            ])
            .await;
        let said = text(&out);
        if out.status.success() && said.contains(ip) {
            return said;
        }
        assert!(
            Instant::now() < deadline,
            "the viewer never saw {ip}; last answer:\n{said}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// (a) cert-manager mode, as most Harvester operators install it: `helm install` →
/// Certificates Ready → caBundles injected → every pod Ready; then through the release: a VM
/// network and its IPPool → the agents on the network's nodes → a VM admitted with an address
/// → its vmnetcfg → a guest with the VM's MAC gets the address from udhcpc → a user with only
/// `view` lists it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cert_manager_install_takes_a_guest_to_its_lease() {
    if !can_run_pods() {
        return;
    }
    let _serial = SERIAL.lock().await;
    let cm = CertManager::shared().await;
    let w = World::new("inst-cm", Some("cm-net")).await;
    let cp = w.cp;

    let t0 = Instant::now();
    let mut values = vec!["--set".to_string(), "certificates.mode=cert-manager".into()];
    values.extend(image_values("e2e-1"));
    let output = install(cp, w.rel(), &values).await;
    let installed = t0.elapsed();
    println!(
        "$ helm install {RELEASE} chart -n {} --set certificates.mode=cert-manager ... --wait\n{output}",
        w.rel()
    );

    let certificates = release::wait_certificates_ready(cp, w.rel())
        .await
        .unwrap_or_else(|e| panic!("{e:#}\ncert-manager:\n{}", cm.logs(30)));
    assert_eq!(
        certificates.iter().cloned().collect::<BTreeSet<_>>(),
        [
            format!("{RELEASE}-apiserver"),
            format!("{RELEASE}-ca"),
            WEBHOOK.to_string()
        ]
        .into(),
        "the CA and one Certificate per Service"
    );
    let (mutating, validating, api) = release::wait_ca_bundles(cp, WEBHOOK)
        .await
        .unwrap_or_else(|e| panic!("{e:#}\ncert-manager:\n{}", cm.logs(30)));
    // cainjector injects the issuing CA: the same in all three.
    assert_eq!(mutating, validating);
    assert_eq!(mutating, api);
    w.rolled_out().await;
    release::wait_apiservice_available(cp)
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
    let ready_after = t0.elapsed();
    show(
        cp,
        &[
            "get",
            "pods,certificates,apiservices",
            "-n",
            w.rel(),
            "-o",
            "wide",
        ],
    )
    .await;

    // The chain, through the release. The VM network and its pool live in another namespace.
    let network = release::vm_network(&w.client, w.vms(), "net-48", "cm-net")
        .await
        .expect("NAD");
    let pool = release::ippool(
        &w.client,
        w.vms(),
        "net-48",
        &network,
        json!({"cidr": "192.168.48.0/24", "router": "192.168.48.1", "dns": ["1.1.1.1"],
               "pool": {"start": "192.168.48.81", "end": "192.168.48.90",
                        "exclude": ["192.168.48.81", "192.168.48.90"]}}),
        Duration::from_secs(5),
    )
    .await
    .expect("IPPool admitted");
    let server_ip = pool
        .spec
        .ipv4_config
        .as_ref()
        .map(|c| c.server_ip.clone())
        .unwrap_or_default();
    assert!(
        !server_ip.is_empty(),
        "the webhook's mutator filled serverIP"
    );
    let ctx = || String::new();
    release::wait_pool_ready(&w.client, w.vms(), "net-48", WAIT, ctx)
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
    // Placed by the controller: two agents, on the two nodes of the pool's cluster network,
    // both Ready (the pool is ready once the active one is; the standby may load its table
    // a moment later).
    let deadline = Instant::now() + WAIT;
    let agents = loop {
        let agents = w.agents_on().await;
        if (agents.len() == 2 && agents.values().all(|(_, ready, _)| *ready))
            || Instant::now() > deadline
        {
            break agents;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let on: BTreeSet<String> = agents.values().map(|(_, _, node)| node.clone()).collect();
    assert_eq!(
        on,
        [w.sim.node_name("node-1"), w.sim.node_name("node-2")].into(),
        "one agent on each node of the network, none on node-3: {agents:?}"
    );
    assert!(
        agents
            .values()
            .all(|(image, ready, _)| *ready
                && image == &format!("{}:e2e-1", release::IMAGE_REPOSITORY)),
        "{agents:?}"
    );

    let vm = release::create_vm(&w.client, w.vms(), "test-vm", &network)
        .await
        .expect("VM admitted");
    let allocation = release::allocation(&vm).expect("allocation");
    println!(
        "VM {}/test-vm admitted: {} on {}",
        w.vms(),
        allocation.ip_address,
        allocation.mac_address
    );
    release::wait_vmnetcfg_allocated(&w.client, w.vms(), "test-vm", WAIT)
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
    let guest = w
        .sim
        .attach_vm_with_mac(&network, Some(&allocation.mac_address))
        .await
        .expect("guest");
    let said = guest.udhcpc_once().await.expect("udhcpc");
    let first_lease = t0.elapsed();
    assert!(
        said.contains(&format!("lease of {} obtained", allocation.ip_address)),
        "the guest was not given {}:\n{said}\n{}",
        allocation.ip_address,
        w.describe().await
    );
    println!("{}", said.trim_end());

    release::bind_view(cp, w.vms(), VIEWER, "ipamallocations.dhcp.harvesterhci.io")
        .await
        .expect("view binding");
    let listed = viewer_sees(cp, w.vms(), &allocation.ip_address).await;
    println!(
        "$ kubectl get ipamallocations.dhcp.harvesterhci.io -n {} --as {VIEWER}\n{listed}",
        w.vms()
    );
    // The leases, read by the aggregated API from the active agent (pod to pod).
    let leases = until(
        "the lease bound in dhcpleases",
        WAIT,
        String::new,
        || async {
            let out = cp
                .kubectl(&[
                    "get",
                    "dhcpleases.dhcp.harvesterhci.io",
                    "-n",
                    w.vms(),
                    "--as",
                    VIEWER,
                ])
                .await;
            let said = text(&out);
            said.lines()
                .any(|l| l.contains(&allocation.ip_address) && l.contains(" bound "))
                .then_some(said)
        },
    )
    .await
    .unwrap_or_else(|e| w.fail(e));
    println!(
        "$ kubectl get dhcpleases.dhcp.harvesterhci.io -n {} --as {VIEWER}\n{leases}",
        w.vms()
    );
    let can = cp
        .kubectl(&[
            "auth",
            "can-i",
            "create",
            "ippools.network.harvesterhci.io",
            "-n",
            w.vms(),
            "--as",
            VIEWER,
        ])
        .await;
    assert_eq!(
        String::from_utf8_lossy(&can.stdout).trim(),
        "no",
        "view reads, it does not write"
    );
    println!(
        "helm install → release ready (--wait returned) {:.1} s, every component and the APIService ready {:.1} s, first lease {:.1} s",
        installed.as_secs_f64(),
        ready_after.as_secs_f64(),
        first_lease.as_secs_f64()
    );
}

/// (b) self-managed mode (the chart's default, no dependency): the webhook makes its CA,
/// keeps it in its Secret and writes it into its two configurations; the chart's own CA is in
/// the APIService. Installed, every pod Ready, a VM admitted, the view lists it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn self_managed_install_admits_a_vm_and_the_view_lists_it() {
    if !can_run_pods() {
        return;
    }
    let _serial = SERIAL.lock().await;
    let w = World::new("inst-sm", None).await;
    let cp = w.cp;
    let t0 = Instant::now();
    let output = install(cp, w.rel(), &image_values("e2e-1")).await;
    println!(
        "$ helm install {RELEASE} chart -n {} ... --wait ({:.1} s)\n{}",
        w.rel(),
        t0.elapsed().as_secs_f64(),
        output.lines().take(6).collect::<Vec<_>>().join("\n")
    );
    w.rolled_out().await;
    let (mutating, validating, api) = release::wait_ca_bundles(cp, WEBHOOK)
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(
        mutating, validating,
        "one webhook CA in both configurations"
    );
    assert_ne!(
        mutating, api,
        "the aggregated API has the chart's CA, not the webhook's"
    );
    let secret = kubectl(
        cp,
        &[
            "get",
            "secret",
            &format!("{WEBHOOK}-tls"),
            "-n",
            w.rel(),
            "-o",
            "jsonpath={.data.ca\\.crt}",
        ],
    )
    .await
    .expect("the webhook's Secret");
    assert_eq!(
        secret, mutating,
        "the caBundle is the CA in the webhook's Secret"
    );
    release::wait_apiservice_available(cp)
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
    show(cp, &["get", "pods", "-n", w.rel()]).await;
    show(cp, &["get", "apiservice", APISERVICE]).await;

    let network = release::vm_network(&w.client, w.vms(), "net-1", "sm-net")
        .await
        .expect("NAD");
    release::ippool(
        &w.client,
        w.vms(),
        "net-1",
        &network,
        json!({"cidr": "10.70.0.0/24", "pool": {"start": "10.70.0.10", "end": "10.70.0.20"}}),
        Duration::from_secs(5),
    )
    .await
    .expect("IPPool admitted");
    // Admission allocates as soon as the webhook's cache knows the pool.
    let vm = until(
        "a VM admitted with an address",
        WAIT,
        String::new,
        || async {
            let _ = Api::<VirtualMachine>::namespaced(w.client.clone(), w.vms())
                .delete("vm-1", &DeleteParams::default())
                .await;
            let vm = release::create_vm(&w.client, w.vms(), "vm-1", &network)
                .await
                .ok()?;
            release::allocation(&vm).ok().map(|a| (vm, a))
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e:#}"));
    let (_, allocation) = vm;
    assert!(
        allocation.ip_address.starts_with("10.70.0."),
        "{allocation:?}"
    );
    release::bind_view(cp, w.vms(), VIEWER, "ipamallocations.dhcp.harvesterhci.io")
        .await
        .expect("view binding");
    let listed = viewer_sees(cp, w.vms(), &allocation.ip_address).await;
    println!(
        "$ kubectl get ipamallocations.dhcp.harvesterhci.io -n {} --as {VIEWER}\n{listed}",
        w.vms()
    );
}

/// (c) `helm upgrade` to a new image tag rolls every component (and the controller rolls the
/// agents) while a client keeps creating VMs with a NIC on a pooled network: every one is
/// admitted with an address, so admission stayed available throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_rolls_every_component_with_admission_throughout() {
    if !can_run_pods() {
        return;
    }
    let _serial = SERIAL.lock().await;
    let w = World::new("inst-up", Some("up-net")).await;
    let cp = w.cp;
    install(cp, w.rel(), &image_values("e2e-1")).await;
    w.rolled_out().await;
    release::wait_ca_bundles(cp, WEBHOOK)
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
    let network = release::vm_network(&w.client, w.vms(), "net-1", "up-net")
        .await
        .expect("NAD");
    release::ippool(
        &w.client,
        w.vms(),
        "net-1",
        &network,
        json!({"cidr": "10.60.0.0/23", "pool": {"start": "10.60.0.10", "end": "10.60.1.250"}}),
        Duration::from_secs(5),
    )
    .await
    .expect("IPPool admitted");
    release::wait_pool_ready(&w.client, w.vms(), "net-1", WAIT, String::new)
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
    let before = w.component_pods().await;
    let agents_before = w.agents().await;
    assert_eq!(
        before.len(),
        3,
        "controller, webhook, aggregated API: {before:?}"
    );
    assert_eq!(agents_before.len(), 2, "{agents_before:?}");

    // The client: one VM after another until told to stop.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let client = {
        let (stop, kube, ns, network) = (
            stop.clone(),
            w.client.clone(),
            w.vms().to_string(),
            network.clone(),
        );
        tokio::spawn(async move {
            let mut results: Vec<(String, Result<String, String>)> = Vec::new();
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                n += 1;
                let name = format!("vm-{n}");
                let result = match release::create_vm(&kube, &ns, &name, &network).await {
                    Ok(vm) => release::allocation(&vm)
                        .map(|a| a.ip_address)
                        .map_err(|e| format!("{e:#}")),
                    Err(e) => Err(format!("{e:#}")),
                };
                results.push((name, result));
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            results
        })
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    let t0 = Instant::now();
    let chart = release::chart_dir().display().to_string();
    let mut args = vec![
        "upgrade",
        RELEASE,
        &chart,
        "-n",
        w.rel(),
        "--reuse-values",
        "--set",
        "image.tag=e2e-2",
        "--wait",
        "--timeout",
        "4m",
    ];
    let out = helm(cp, &args).await.expect("helm upgrade");
    assert!(out.status.success(), "helm upgrade:\n{}", text(&out));
    args.clear();
    w.rolled_out().await;
    let upgraded = t0.elapsed();
    let new_image = format!("{}:e2e-2", release::IMAGE_REPOSITORY);
    let agents = until(
        "the controller rolling the agents to the new image",
        WAIT,
        String::new,
        || async {
            let agents = w.agents().await;
            (agents.len() == 2
                && agents
                    .values()
                    .all(|(image, ready)| *ready && *image == new_image))
            .then_some(agents)
        },
    )
    .await
    .unwrap_or_else(|e| w.fail(e));
    let rolled = t0.elapsed();
    // A little more traffic after the last agent moved.
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let results = client.await.expect("client task");

    let after = w.component_pods().await;
    assert_eq!(after.len(), 3, "{after:?}");
    assert!(
        after.keys().all(|p| !before.contains_key(p)),
        "every component pod was replaced: before {before:?}, after {after:?}"
    );
    assert!(after.values().all(|image| *image == new_image), "{after:?}");
    assert!(
        agents.keys().all(|a| !agents_before.contains_key(a)),
        "the agents were replaced: {agents_before:?} → {agents:?}"
    );
    let failures: Vec<&(String, Result<String, String>)> =
        results.iter().filter(|(_, r)| r.is_err()).collect();
    let addresses: BTreeSet<&String> = results
        .iter()
        .filter_map(|(_, r)| r.as_ref().ok())
        .collect();
    println!(
        "helm upgrade --wait returned after {:.1} s, agents rolled after {:.1} s; {} VMs created meanwhile, {} refused",
        upgraded.as_secs_f64(),
        rolled.as_secs_f64(),
        results.len(),
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "admission failed during the upgrade: {failures:#?}"
    );
    assert_eq!(addresses.len(), results.len(), "every VM its own address");
    assert!(
        results.len() >= 10,
        "the client kept creating: {}",
        results.len()
    );
    show(cp, &["get", "pods", "-n", w.rel(), "-o", "wide"]).await;
}

/// (d) `helm uninstall` leaves no webhook configuration or APIService behind (the webhook of
/// a self-managed release writes its configurations itself): the cluster is not blocked, and
/// discovery is whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uninstall_leaves_nothing_that_blocks_the_cluster() {
    if !can_run_pods() {
        return;
    }
    let _serial = SERIAL.lock().await;
    let w = World::new("inst-un", None).await;
    let cp = w.cp;
    install(cp, w.rel(), &image_values("e2e-1")).await;
    w.rolled_out().await;
    release::wait_ca_bundles(cp, WEBHOOK)
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
    release::wait_apiservice_available(cp)
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
    let network = release::vm_network(&w.client, w.vms(), "net-1", "un-net")
        .await
        .expect("NAD");
    release::ippool(
        &w.client,
        w.vms(),
        "net-1",
        &network,
        json!({"cidr": "10.61.0.0/24", "pool": {"start": "10.61.0.10", "end": "10.61.0.20"}}),
        Duration::from_secs(5),
    )
    .await
    .expect("IPPool admitted");

    let out = helm(
        cp,
        &[
            "uninstall",
            RELEASE,
            "-n",
            w.rel(),
            "--wait",
            "--timeout",
            "2m",
        ],
    )
    .await
    .expect("helm uninstall");
    assert!(out.status.success(), "helm uninstall:\n{}", text(&out));
    println!("$ helm uninstall {RELEASE} -n {}\n{}", w.rel(), text(&out));
    // The release's pods go (garbage collection, then the kubelet's graceful stop).
    let lp = ListParams::default().labels(&format!("{}={RELEASE}", release::INSTANCE_LABEL));
    let pods: Api<Pod> = Api::namespaced(w.client.clone(), w.rel());
    until("the release's pods gone", WAIT, String::new, || async {
        pods.list(&lp).await.ok()?.items.is_empty().then_some(())
    })
    .await
    .unwrap_or_else(|e| w.fail(e));

    // Nothing of vm-dhcp in the admission chain or the aggregation layer.
    let rel = w.rel().to_string();
    let leftovers = || async {
        let mut found = Vec::new();
        for kind in [
            "mutatingwebhookconfigurations",
            "validatingwebhookconfigurations",
        ] {
            let list: Value = serde_json::from_str(
                &kubectl(cp, &["get", kind, "-o", "json"])
                    .await
                    .expect("list"),
            )
            .expect("JSON");
            for c in list["items"].as_array().into_iter().flatten() {
                let ours = c["metadata"]["name"] == WEBHOOK
                    || c["webhooks"].as_array().into_iter().flatten().any(|h| {
                        h["clientConfig"]["service"]["namespace"].as_str() == Some(rel.as_str())
                    });
                if ours {
                    found.push(format!("{kind}/{}", c["metadata"]["name"]));
                }
            }
        }
        let list: Value = serde_json::from_str(
            &kubectl(cp, &["get", "apiservices", "-o", "json"])
                .await
                .expect("list"),
        )
        .expect("JSON");
        for s in list["items"].as_array().into_iter().flatten() {
            if s["spec"]["group"] == "dhcp.harvesterhci.io"
                || s["spec"]["service"]["namespace"].as_str() == Some(rel.as_str())
            {
                found.push(format!("apiservice/{}", s["metadata"]["name"]));
            }
        }
        found
    };
    assert_eq!(
        leftovers().await,
        Vec::<String>::new(),
        "left behind by helm uninstall"
    );
    let out = cp.kubectl(&["api-resources"]).await;
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "discovery is whole: {}",
        text(&out)
    );

    // Not blocked: a pool and a VM on another network are created (no one allocates now).
    let other = release::vm_network(&w.client, w.vms(), "net-2", "un-net")
        .await
        .expect("NAD");
    let pool: IPPool = serde_json::from_value(json!({
        "apiVersion": "network.harvesterhci.io/v1alpha1", "kind": "IPPool",
        "metadata": {"name": "net-2", "namespace": w.vms()},
        "spec": {"networkName": other, "ipv4Config": {"cidr": "10.62.0.0/24", "serverIP": "10.62.0.2",
                 "pool": {"start": "10.62.0.10", "end": "10.62.0.20"}}}
    }))
    .expect("pool");
    Api::<IPPool>::namespaced(w.client.clone(), w.vms())
        .create(&PostParams::default(), &pool)
        .await
        .expect("an IPPool is admitted after the uninstall");
    release::create_vm(&w.client, w.vms(), "after", &other)
        .await
        .expect("a VM with a NIC on a VM network is admitted after the uninstall");
    // And nothing came back (a webhook replica that was still stopping, say).
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        leftovers().await,
        Vec::<String>::new(),
        "recreated after the uninstall"
    );
}

/// The Go add-on's chart as far as an upgrade meets it (harvester/charts, release
/// `harvester-vm-dhcp-controller`): its two Deployments with their names and selector labels,
/// ServiceAccounts, Services and a ClusterRole. Its images are not ours: the simulated kubelet
/// leaves their pods waiting, as a cluster whose Go pods are about to be replaced.
fn go_chart() -> std::path::PathBuf {
    let dir = vm_dhcp_e2e::proc::run_dir()
        .expect("run dir")
        .join("go-addon-chart");
    std::fs::create_dir_all(dir.join("templates")).expect("chart dir");
    std::fs::write(
        dir.join("Chart.yaml"),
        "apiVersion: v2\nname: harvester-vm-dhcp-controller\n\
         description: stand-in for the Go add-on's chart (objects an upgrade meets)\n\
         type: application\nversion: 0.3.3\nappVersion: v0.3.3\n",
    )
    .expect("Chart.yaml");
    let templates = r#"{{- $name := .Release.Name }}
{{- range $sa := list $name (printf "%s-agent" $name) (printf "%s-webhook" $name) }}
---
apiVersion: v1
kind: ServiceAccount
metadata:
  name: {{ $sa }}
  labels:
    app.kubernetes.io/name: harvester-vm-dhcp-controller
    app.kubernetes.io/instance: {{ $.Release.Name }}
{{- end }}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata:
  name: {{ $name }}
rules:
  - apiGroups: ["network.harvesterhci.io"]
    resources: ["ippools", "virtualmachinenetworkconfigs"]
    verbs: ["*"]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata:
  name: {{ $name }}
roleRef:
  apiGroup: rbac.authorization.k8s.io
  kind: ClusterRole
  name: {{ $name }}
subjects:
  - kind: ServiceAccount
    name: {{ $name }}
    namespace: {{ .Release.Namespace }}
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ $name }}
  labels:
    app.kubernetes.io/name: harvester-vm-dhcp-controller
    app.kubernetes.io/instance: {{ .Release.Name }}
    app.kubernetes.io/component: controller
spec:
  replicas: 1
  selector:
    matchLabels:
      app.kubernetes.io/name: harvester-vm-dhcp-controller
      app.kubernetes.io/instance: {{ .Release.Name }}
  template:
    metadata:
      labels:
        app.kubernetes.io/name: harvester-vm-dhcp-controller
        app.kubernetes.io/instance: {{ .Release.Name }}
        app.kubernetes.io/component: controller
    spec:
      serviceAccountName: {{ $name }}
      containers:
        - name: harvester-vm-dhcp-controller
          image: rancher/harvester-vm-dhcp-controller:v0.3.3
          args: ["--name", "{{ $name }}", "--namespace", "{{ .Release.Namespace }}",
                 "--image", "rancher/harvester-vm-dhcp-agent:v0.3.3",
                 "--service-account-name", "{{ $name }}-agent"]
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ $name }}-webhook
  labels:
    app.kubernetes.io/name: harvester-vm-dhcp-controller-webhook
    app.kubernetes.io/instance: {{ .Release.Name }}
    app.kubernetes.io/component: webhook
spec:
  replicas: 1
  selector:
    matchLabels:
      app.kubernetes.io/name: harvester-vm-dhcp-controller-webhook
      app.kubernetes.io/instance: {{ .Release.Name }}
  template:
    metadata:
      labels:
        app.kubernetes.io/name: harvester-vm-dhcp-controller-webhook
        app.kubernetes.io/instance: {{ .Release.Name }}
        app.kubernetes.io/component: webhook
    spec:
      serviceAccountName: {{ $name }}-webhook
      containers:
        - name: harvester-vm-dhcp-controller-webhook
          image: rancher/harvester-vm-dhcp-webhook:v0.3.3
          args: ["--name", "{{ $name }}-webhook", "--namespace", "{{ .Release.Namespace }}",
                 "--https-port", "8443", "--service-cidr", "10.53.0.0/16"]
          ports:
            - name: https
              containerPort: 8443
---
apiVersion: v1
kind: Service
metadata:
  name: {{ $name }}-webhook
spec:
  selector:
    app.kubernetes.io/name: harvester-vm-dhcp-controller-webhook
    app.kubernetes.io/instance: {{ .Release.Name }}
  ports:
    - name: https
      port: 443
      targetPort: 8443
---
apiVersion: v1
kind: Service
metadata:
  name: {{ $name }}
spec:
  selector:
    app.kubernetes.io/name: harvester-vm-dhcp-controller
    app.kubernetes.io/instance: {{ .Release.Name }}
  ports:
    - name: metrics
      port: 8080
      targetPort: 8080
"#;
    std::fs::write(dir.join("templates/go.yaml"), templates).expect("templates");
    dir
}

async fn create<K>(client: &Client, ns: &str, value: Value) -> K
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + serde::Serialize
        + std::fmt::Debug,
    <K as kube::Resource>::DynamicType: Default,
{
    let obj: K = serde_json::from_value(value).expect("object");
    Api::<K>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &obj)
        .await
        .unwrap_or_else(|e| panic!("creating {}: {e}", obj.name_any()))
}

/// (e) The Go add-on is taken over: its release (the Go chart's Deployments, Services,
/// ServiceAccounts), and the objects the Go version made (an IPPool whose allocations are in
/// `status.ipv4.allocated`, vmnetcfgs with its finalizers, its agent pod, its webhook
/// configurations with its own CA and no Helm ownership, its Secrets). `helm upgrade
/// --install` of this chart is refused on the configurations' ownership until the step of
/// chart/README.md's upgrade section is done, then succeeds; the controller migrates every
/// allocation into IPPoolAddress objects, and the guest of a Go-era VM still gets its address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_go_add_on_is_taken_over_with_every_allocation() {
    if !can_run_pods() {
        return;
    }
    let _serial = SERIAL.lock().await;
    let w = World::new("inst-go", Some("go-net")).await;
    let cp = w.cp;
    let (rel, vms) = (w.rel().to_string(), w.vms().to_string());

    // The Go add-on's release.
    let go = go_chart().display().to_string();
    helm_ok(cp, &["install", RELEASE, &go, "-n", &rel])
        .await
        .expect("the Go add-on's release");

    // What the Go version made, as it left it.
    let network = release::vm_network(&w.client, &vms, "net-1", "go-net")
        .await
        .expect("NAD");
    let macs = ["02:cc:00:00:00:01", "02:cc:00:00:00:02"];
    let _: IPPool = create(
        &w.client,
        &vms,
        json!({
            "apiVersion": "network.harvesterhci.io/v1alpha1", "kind": "IPPool",
            "metadata": {"name": "net-1", "namespace": vms,
                         "finalizers": ["wrangler.cattle.io/vm-dhcp-ippool-controller"]},
            "spec": {"networkName": network, "ipv4Config": {"cidr": "10.80.0.0/24",
                     "serverIP": "10.80.0.2", "router": "10.80.0.1",
                     "pool": {"start": "10.80.0.10", "end": "10.80.0.19", "exclude": ["10.80.0.15"]}}}
        }),
    )
    .await;
    let go_agent = format!("{vms}-net-1-agent");
    let status = json!({"status": {
        "ipv4": {"allocated": {"10.80.0.10": macs[0], "10.80.0.11": macs[1], "10.80.0.15": "EXCLUDED"},
                 "used": 2, "available": 7},
        "agentPodRef": {"namespace": rel, "name": go_agent, "image": "rancher/harvester-vm-dhcp-agent:v0.3.3"},
        "conditions": [{"type": "Registered", "status": "True"}, {"type": "CacheReady", "status": "True"},
                       {"type": "AgentReady", "status": "True"}, {"type": "Stopped", "status": "False"}]}});
    Api::<IPPool>::namespaced(w.client.clone(), &vms)
        .patch_status("net-1", &PatchParams::default(), &Patch::Merge(&status))
        .await
        .expect("the Go controller's status");
    for (i, mac) in macs.iter().enumerate() {
        let name = format!("old-{}", i + 1);
        let vm: VirtualMachine = create(
            &w.client,
            &vms,
            json!({
                "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine",
                "metadata": {"name": name, "namespace": vms,
                             "annotations": {"harvesterhci.io/mac-address": json!({"nic-1": mac}).to_string()}},
                "spec": {"runStrategy": "Always", "template": {"spec": {
                    "domain": {"devices": {"interfaces": [{"name": "nic-1", "bridge": {}}]}},
                    "networks": [{"name": "nic-1", "multus": {"networkName": network}}]}}}
            }),
        )
        .await;
        let _: VirtualMachineNetworkConfig = create(
            &w.client,
            &vms,
            json!({
                "apiVersion": "network.harvesterhci.io/v1alpha1", "kind": "VirtualMachineNetworkConfig",
                "metadata": {"name": name, "namespace": vms,
                             "labels": {"harvesterhci.io/vmName": name},
                             "finalizers": ["wrangler.cattle.io/vm-dhcp-vmnetcfg-controller"],
                             "ownerReferences": [{"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine",
                                                  "name": name, "uid": vm.uid()}]},
                "spec": {"vmName": name, "networkConfigs": [{"networkName": network, "macAddress": mac}]}
            }),
        )
        .await;
    }
    let _: Pod = create(
        &w.client,
        &rel,
        json!({
            "metadata": {"name": go_agent, "labels": {
                "network.harvesterhci.io/vm-dhcp-controller": "agent",
                "network.harvesterhci.io/ippool-namespace": vms,
                "network.harvesterhci.io/ippool-name": "net-1"}},
            "spec": {"containers": [{"name": "agent", "image": "rancher/harvester-vm-dhcp-agent:v0.3.3",
                     "args": ["--ippool-ref", format!("{vms}/net-1")]}]}
        }),
    )
    .await;
    // The Go webhook's own configurations (its CA, no Helm ownership) and Secrets.
    let go_ca = vm_dhcp_e2e::pki::Ca::new("harvester-vm-dhcp-controller-webhook-ca").expect("CA");
    let go_pair = go_ca
        .serving(
            &format!("{WEBHOOK}.{rel}.svc"),
            &[&format!("{WEBHOOK}.{rel}.svc")],
        )
        .expect("Go serving pair");
    let ca_bundle = {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode(go_ca.cert_pem())
    };
    // (As the harvester/webhook framework the Go webhook is built on writes them.)
    for (kind, hook, path) in [
        (
            "MutatingWebhookConfiguration",
            "mutator.harvesterhci.io",
            "/v1/webhook/mutation",
        ),
        (
            "ValidatingWebhookConfiguration",
            "validator.harvesterhci.io",
            "/v1/webhook/validation",
        ),
    ] {
        let config = json!({
            "apiVersion": "admissionregistration.k8s.io/v1", "kind": kind,
            "metadata": {"name": WEBHOOK},
            "webhooks": [{
                "name": hook,
                "clientConfig": {"service": {"namespace": rel, "name": WEBHOOK, "path": path, "port": 443},
                                 "caBundle": ca_bundle},
                "rules": [{"apiGroups": ["network.harvesterhci.io"], "apiVersions": ["v1alpha1"],
                           "resources": ["ippools", "virtualmachinenetworkconfigs"],
                           "operations": ["CREATE", "UPDATE"], "scope": "Namespaced"}],
                "failurePolicy": "Fail", "sideEffects": "None", "admissionReviewVersions": ["v1"]}]
        });
        let file = vm_dhcp_e2e::proc::run_dir()
            .expect("run dir")
            .join(format!("go-{kind}.json"));
        std::fs::write(&file, config.to_string()).expect("write");
        kubectl(cp, &["create", "-f", &file.display().to_string()])
            .await
            .expect("the Go webhook's configuration");
    }
    for name in [format!("{WEBHOOK}-ca"), format!("{WEBHOOK}-tls")] {
        let dir = vm_dhcp_e2e::proc::run_dir().expect("run dir");
        let (cert, key) = (
            dir.join(format!("{name}.crt")),
            dir.join(format!("{name}.key")),
        );
        std::fs::write(&cert, &go_pair.cert).expect("cert");
        std::fs::write(&key, &go_pair.key).expect("key");
        kubectl(
            cp,
            &[
                "create",
                "secret",
                "tls",
                &name,
                "-n",
                &rel,
                &format!("--cert={}", cert.display()),
                &format!("--key={}", key.display()),
            ],
        )
        .await
        .expect("the Go webhook's Secret");
    }

    // Helm refuses to take over the configurations the Go webhook wrote...
    let chart = release::chart_dir().display().to_string();
    let mut upgrade: Vec<String> = ["upgrade", "--install", RELEASE, &chart, "-n", &rel]
        .iter()
        .map(|s| s.to_string())
        .collect();
    upgrade.extend(image_values("e2e-1"));
    let mut dry_run: Vec<&str> = upgrade.iter().map(String::as_str).collect();
    dry_run.push("--dry-run=server");
    let out = helm(cp, &dry_run).await.expect("helm");
    assert!(
        !out.status.success() && text(&out).contains("invalid ownership metadata"),
        "helm should refuse the Go webhook's configurations:\n{}",
        text(&out)
    );
    // ...so, as chart/README.md says, they are deleted before the upgrade (adopting them
    // instead would keep the Go webhooks, with the Go CA, in the lists Helm merges), and so
    // are the Go webhook's Secrets.
    kubectl(
        cp,
        &[
            "delete",
            "mutatingwebhookconfiguration,validatingwebhookconfiguration",
            WEBHOOK,
            "--ignore-not-found",
        ],
    )
    .await
    .expect("delete the Go webhook's configurations");
    kubectl(
        cp,
        &[
            "-n",
            &rel,
            "delete",
            "secret",
            "--ignore-not-found",
            &format!("{WEBHOOK}-tls"),
            &format!("{WEBHOOK}-ca"),
        ],
    )
    .await
    .expect("delete the Go webhook's Secrets");
    let mut args: Vec<&str> = upgrade.iter().map(String::as_str).collect();
    args.extend(["--wait", "--timeout", "4m"]);
    let output = helm_ok(cp, &args).await.unwrap_or_else(|e| w.fail(e));
    println!(
        "$ helm upgrade --install {RELEASE} chart -n {rel} ...\n{}",
        output.lines().take(6).collect::<Vec<_>>().join("\n")
    );
    w.rolled_out().await;
    let history = helm_ok(cp, &["history", RELEASE, "-n", &rel])
        .await
        .expect("history");
    println!("$ helm history {RELEASE} -n {rel}\n{history}");

    // Every allocation kept: in the pool's status and as address objects.
    let wanted: BTreeMap<String, String> = [("10.80.0.10", macs[0]), ("10.80.0.11", macs[1])]
        .into_iter()
        .map(|(ip, mac)| (ip.to_string(), mac.to_string()))
        .collect();
    let objects = until(
        "the controller migrating the allocations into IPPoolAddress objects",
        WAIT,
        String::new,
        || async {
            let text = kubectl(cp, &["get", "ippooladdresses", "-n", &vms, "-o", "json"])
                .await
                .ok()?;
            let list: Value = serde_json::from_str(&text).ok()?;
            let found: BTreeMap<String, String> = list["items"]
                .as_array()?
                .iter()
                .map(|a| {
                    (
                        a["spec"]["address"]
                            .as_str()
                            .unwrap_or_default()
                            .to_string(),
                        a["spec"]["macAddress"]
                            .as_str()
                            .unwrap_or_default()
                            .to_string(),
                    )
                })
                .collect();
            wanted
                .iter()
                .all(|(ip, mac)| found.get(ip) == Some(mac))
                .then_some(found)
        },
    )
    .await
    .unwrap_or_else(|e| w.fail(e));
    show(cp, &["get", "ippooladdresses", "-n", &vms]).await;
    assert!(
        objects
            .keys()
            .all(|ip| wanted.contains_key(ip) || ip == "10.80.0.15"),
        "no allocation invented: {objects:?}"
    );
    let pool = release::wait_pool_ready(&w.client, &vms, "net-1", WAIT, String::new)
        .await
        .unwrap_or_else(|e| w.fail(e));
    let allocated = pool
        .status
        .as_ref()
        .and_then(|s| s.ipv4.as_ref())
        .map(|s| s.allocated.clone().unwrap_or_default())
        .unwrap_or_default();
    for (ip, mac) in &wanted {
        assert_eq!(
            allocated.get(ip),
            Some(mac),
            "{ip} kept in the status: {allocated:?}"
        );
    }
    assert_eq!(pool.finalizers(), ["dhcp.harvesterhci.io/controller"]);
    for (i, mac) in macs.iter().enumerate() {
        let name = format!("old-{}", i + 1);
        let cfg = release::wait_vmnetcfg_allocated(&w.client, &vms, &name, WAIT)
            .await
            .unwrap_or_else(|e| panic!("{e:#}"));
        assert_eq!(
            cfg.finalizers(),
            ["dhcp.harvesterhci.io/controller"],
            "{name}"
        );
        let ip = cfg
            .status
            .as_ref()
            .and_then(|s| s.network_configs.as_ref())
            .and_then(|e| e.first())
            .and_then(|e| e.allocated_ip_address.clone());
        assert_eq!(
            ip.as_deref(),
            Some(format!("10.80.0.1{i}").as_str()),
            "{name} ({mac})"
        );
    }
    // The Go agent pod goes once one of ours is active.
    let pods: Api<Pod> = Api::namespaced(w.client.clone(), &rel);
    until("the Go agent pod deleted", WAIT, String::new, || async {
        pods.get_opt(&go_agent)
            .await
            .ok()?
            .is_none_or(|p| p.metadata.deletion_timestamp.is_some())
            .then_some(())
    })
    .await
    .unwrap_or_else(|e| w.fail(e));

    // The guest of a Go-era VM still gets its address, and a new VM gets a free one.
    let guest = w
        .sim
        .attach_vm_with_mac(&network, Some(macs[0]))
        .await
        .expect("guest");
    let said = guest.udhcpc_once().await.expect("udhcpc");
    assert!(
        said.contains("lease of 10.80.0.10 obtained"),
        "the Go-era guest:\n{said}\n{}",
        w.describe().await
    );
    let vm = release::create_vm(&w.client, &vms, "new-1", &network)
        .await
        .expect("a new VM admitted by the new webhook");
    let fresh = release::allocation(&vm).expect("allocation").ip_address;
    assert!(
        ![
            "10.80.0.10",
            "10.80.0.11",
            "10.80.0.15",
            "10.80.0.1",
            "10.80.0.2"
        ]
        .contains(&fresh.as_str()),
        "a new VM gets a free address, not {fresh}"
    );
    let labels = kubectl(
        cp,
        &[
            "get",
            "mutatingwebhookconfiguration",
            WEBHOOK,
            "-o",
            "jsonpath={.metadata.labels}",
        ],
    )
    .await
    .expect("labels");
    assert!(
        labels.contains("\"app.kubernetes.io/managed-by\":\"Helm\""),
        "{labels}"
    );
}
