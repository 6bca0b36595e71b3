//! The product installed as a user installs it (`make demo`, as root): a local control plane
//! (kube-apiserver, etcd and kube-controller-manager, built from their Go modules), real
//! cert-manager, two simulated nodes whose kubelet runs every pod, and then
//! `helm install ./chart --set certificates.mode=cert-manager`. The chart's Deployments become
//! pods that run the local `vm-dhcp` binary under their own ServiceAccounts, with their
//! certificates from cert-manager's Secrets; kube-apiserver reaches the webhook and the
//! aggregated API at their Services' endpoints. Then, as an operator would: a VM network
//! (NAD), its IPPool, a VM; the webhook allocates at admission, the controller writes the
//! vmnetcfg and places the agents, and a guest with the VM's MAC gets its address from a real
//! DHCP client (busybox udhcpc). Prints each step and what kubectl shows.
//!
//! It then waits for Ctrl-C with the cluster up (the kubeconfig path is printed), unless
//! `DEMO_EXIT=1` (CI runs it so). Everything it started dies with it; namespaces and links
//! it made are removed now or by the next run.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use vm_dhcp_e2e::ControlPlane;
use vm_dhcp_e2e::certmanager::CertManager;
use vm_dhcp_e2e::nodesim::{AGENT_SELECTOR, NodeSim, NodeSpec};
use vm_dhcp_e2e::release::{self, APISERVICE, RELEASE, helm_ok, kubectl};

/// The Harvester add-on's namespace; the VMs go to `default`.
const NAMESPACE: &str = "harvester-system";
const VMS: &str = "default";
const WAIT: Duration = Duration::from_secs(120);
/// A user who holds only the `view` cluster role in `default`.
const VIEWER: &str = "jane";

fn step(text: &str) {
    println!("\n==> {text}");
}

async fn show(cp: &ControlPlane, args: &[&str]) -> Result<()> {
    println!("$ kubectl {}\n{}", args.join(" "), kubectl(cp, args).await?);
    Ok(())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    if unsafe { libc::geteuid() } != 0 {
        bail!("the demo makes network namespaces for its nodes and guest: run it as root");
    }
    step(
        "a local control plane: kube-apiserver, etcd, kube-controller-manager (built from their Go modules)",
    );
    let cp = ControlPlane::with_controllers().await;
    println!("up in {:.1} s", cp.startup.as_secs_f64());
    step("cert-manager: its controller and CA injector, and its CRDs");
    let cm = CertManager::shared().await;
    println!(
        "ready in {:.1} s",
        (cm.crds_applied + cm.startup).as_secs_f64()
    );
    step("two nodes on cluster network 'demo', whose (simulated) kubelet runs every pod");
    kubectl(cp, &["create", "namespace", NAMESPACE]).await?;
    let nodes = ["node-1", "node-2"]
        .iter()
        .map(|n| NodeSpec::new(n).label("network.harvesterhci.io/demo", "true"))
        .collect();
    let sim = NodeSim::start_in_cluster(cp, NAMESPACE, nodes, release::programs()).await?;
    show(cp, &["get", "nodes", "-L", "network.harvesterhci.io/demo"]).await?;

    let chart = release::chart_dir();
    let chart = chart.canonicalize().unwrap_or(chart).display().to_string();
    let values = release::image_values("demo");
    let mut args = vec![
        "install",
        RELEASE,
        &chart,
        "--namespace",
        NAMESPACE,
        "--set",
        "certificates.mode=cert-manager",
    ];
    args.extend(values.iter().map(String::as_str));
    args.extend(["--wait", "--timeout", "5m"]);
    step(&format!(
        "helm {} (the image is a name: the kubelet runs the local vm-dhcp binary)",
        args.join(" ")
    ));
    let t0 = Instant::now();
    let output = helm_ok(cp, &args)
        .await
        .with_context(|| release_state(&sim))?;
    println!("{output}");
    println!(
        "helm install returned after {:.1} s",
        t0.elapsed().as_secs_f64()
    );

    step("the release: certificates issued, caBundles injected, every pod Ready");
    release::wait_certificates_ready(cp, NAMESPACE).await?;
    release::wait_ca_bundles(cp, release::WEBHOOK).await?;
    let client = cp.client().await;
    release::wait_rolled_out(&client, NAMESPACE, RELEASE, WAIT).await?;
    release::wait_apiservice_available(cp).await?;
    show(
        cp,
        &["get", "pods,certificates", "-n", NAMESPACE, "-o", "wide"],
    )
    .await?;
    show(cp, &["get", "apiservice", APISERVICE]).await?;

    step("the VM network (NAD) and its IPPool, as in the seed README (no serverIP given)");
    let network = release::vm_network(&client, VMS, "net-48", "demo").await?;
    let pool = release::ippool(
        &client,
        VMS,
        "net-48",
        &network,
        serde_json::json!({"cidr": "192.168.48.0/24", "router": "192.168.48.1",
            "dns": ["1.1.1.1"], "domainName": "aibao.moe",
            "pool": {"start": "192.168.48.81", "end": "192.168.48.90",
                     "exclude": ["192.168.48.81", "192.168.48.90"]}}),
        Duration::from_secs(10),
    )
    .await?;
    println!(
        "admitted; the webhook chose serverIP {}",
        pool.spec
            .ipv4_config
            .map(|c| c.server_ip)
            .unwrap_or_default()
    );
    release::wait_pool_ready(&client, VMS, "net-48", WAIT, || release_state(&sim)).await?;
    show(cp, &["get", "ippools", "-n", VMS, "-o", "wide"]).await?;
    show(
        cp,
        &[
            "get",
            "pods",
            "-n",
            NAMESPACE,
            "-l",
            AGENT_SELECTOR,
            "-o",
            "wide",
        ],
    )
    .await?;

    step("a VM with one NIC on the network and no MAC: the webhook picks the MAC and the address");
    let vm = release::create_vm(&client, VMS, "test-vm", &network).await?;
    let allocation = release::allocation(&vm)?;
    println!(
        "{}: {}",
        vm_dhcp_core::admission::ALLOCATIONS_ANNOTATION,
        vm.metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(vm_dhcp_core::admission::ALLOCATIONS_ANNOTATION))
            .cloned()
            .unwrap_or_default()
    );
    release::wait_vmnetcfg_allocated(&client, VMS, "test-vm", WAIT).await?;
    show(cp, &["get", "vmnetcfgs", "-n", VMS]).await?;

    step(&format!(
        "a guest with MAC {} on the network asks for an address (busybox udhcpc)",
        allocation.mac_address
    ));
    let guest = sim
        .attach_vm_with_mac(&network, Some(&allocation.mac_address))
        .await?;
    let said = guest.udhcpc_once().await?;
    let leased = t0.elapsed();
    println!("{}", said.trim_end());
    if !said.contains(&format!("lease of {} obtained", allocation.ip_address)) {
        bail!(
            "the guest was not given {}:\n{said}\n{}",
            allocation.ip_address,
            release_state(&sim)
        );
    }

    step("the IPAM and the leases through the aggregated API");
    show(cp, &["get", "ipamallocations", "-n", VMS]).await?;
    // The aggregated API reads the leases from the active agent (pod to pod) every second.
    release::until(
        "the lease showing as bound in dhcpleases",
        WAIT,
        String::new,
        || async {
            kubectl(cp, &["get", "dhcpleases", "-n", VMS])
                .await
                .ok()
                .filter(|t| {
                    t.lines()
                        .any(|l| l.contains(&allocation.ip_address) && l.contains(" bound "))
                })
        },
    )
    .await?;
    show(cp, &["get", "dhcpleases", "-n", VMS, "-o", "wide"]).await?;
    step(&format!(
        "as user '{VIEWER}', who holds only the cluster role 'view' in {VMS}"
    ));
    release::bind_view(cp, VMS, VIEWER, "ipamallocations.dhcp.harvesterhci.io").await?;
    show(
        cp,
        &[
            "get",
            "ipamallocations.dhcp.harvesterhci.io",
            "-n",
            VMS,
            "--as",
            VIEWER,
        ],
    )
    .await?;
    println!(
        "\nThe guest got {} {:.1} s after `helm install`.",
        allocation.ip_address,
        leased.as_secs_f64()
    );

    if std::env::var("DEMO_EXIT").is_ok_and(|v| v == "1") {
        return Ok(());
    }
    println!(
        "\nThe cluster stays up until Ctrl-C. Try:\n  export KUBECONFIG={}\n  {} get ippools,vmnetcfgs,ipamallocations,macaddresses,dhcpleases -n {VMS}\n  {} -n {NAMESPACE} get pods,certificates\n  {} list -n {NAMESPACE}",
        cp.kubeconfig_path.display(),
        cp.bin_dir.join("kubectl").display(),
        cp.bin_dir.join("kubectl").display(),
        cp.bin_dir.join("helm").display(),
    );
    tokio::signal::ctrl_c().await?;
    drop(guest);
    Ok(())
}

/// What the simulated kubelet did, for a failure message.
fn release_state(sim: &NodeSim) -> String {
    format!("node simulator:\n{}", sim.sim_log())
}
