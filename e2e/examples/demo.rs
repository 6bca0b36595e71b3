//! The whole product on a local control plane (`make demo`, as root): a real kube-apiserver
//! and etcd, `vm-dhcp webhook` (self-managed certificates, registered through a Service),
//! `vm-dhcp controller`, `vm-dhcp apiserver` behind the aggregator, and two simulated nodes
//! whose kubelet runs the agent pods the controller creates. Then, as an operator would: a
//! VM network (NAD), its IPPool, a VM; the webhook allocates at admission, the controller
//! writes the vmnetcfg and places the agents, and a guest with the VM's MAC gets its address
//! from a real DHCP client (busybox udhcpc). Prints each step and what kubectl shows.
//!
//! It then waits for Ctrl-C with the cluster up (the kubeconfig path is printed), unless
//! `DEMO_EXIT=1` (CI runs it so). Everything it started dies with it; namespaces and links
//! it made are removed now or by the next run.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, PostParams};
use serde_json::json;
use vm_dhcp_core::admission::{ALLOCATIONS_ANNOTATION, NicAllocation};
use vm_dhcp_core::crd::IPPool;
use vm_dhcp_core::kubevirt::{NetworkAttachmentDefinition, VirtualMachine};
use vm_dhcp_e2e::ControlPlane;
use vm_dhcp_e2e::nodesim::{NodeSim, NodeSpec};
use vm_dhcp_e2e::proc::{Process, run_dir};

#[path = "../tests/apiserver/setup.rs"]
mod setup;

const AGENT_IMAGE: &str = "registry.local/vm-dhcp-agent:demo";
const AGENT_SA: &str = "vm-dhcp-agent";
const WAIT: Duration = Duration::from_secs(90);

fn step(text: &str) {
    println!("\n==> {text}");
}

/// Polls `check` until it gives a value, or fails with `what` and `context()`.
async fn until<T, F, Fut>(what: &str, context: impl Fn() -> String, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(v) = check().await {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("{what} did not happen within {WAIT:?}\n{}", context());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn kubectl(cp: &ControlPlane, args: &[&str]) -> Result<String> {
    let out = cp.kubectl(args).await;
    if !out.status.success() {
        bail!(
            "kubectl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

async fn show(cp: &ControlPlane, args: &[&str]) -> Result<()> {
    println!("$ kubectl {}\n{}", args.join(" "), kubectl(cp, args).await?);
    Ok(())
}

fn controller(cp: &ControlPlane, ns: &str) -> Result<Process> {
    let port = vm_dhcp_e2e::free_port()?;
    let mut cmd = vm_dhcp_e2e::controller_command(cp, ns, AGENT_SA, port);
    cmd.arg(format!("--image={AGENT_IMAGE}"));
    let run = run_dir()?;
    Process::spawn(
        "vm-dhcp-controller",
        cmd,
        &run.join("demo-controller.log"),
        &run,
    )
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    if unsafe { libc::geteuid() } != 0 {
        bail!("the demo makes network namespaces for its nodes and guest: run it as root");
    }
    step("a local control plane: kube-apiserver and etcd (built from their Go modules)");
    let cp = ControlPlane::shared().await;
    println!("up in {:.1} s", cp.startup.as_secs_f64());
    let ns = cp.namespace("demo").await;
    let network = format!("{}/net-48", ns.name);

    step("vm-dhcp webhook: self-managed CA in a Secret, registers its own configurations");
    let _webhook = vm_dhcp_e2e::webhooks::self_managed_binary(cp, &ns, "vm-dhcp-webhook").await?;
    step("vm-dhcp apiserver: dhcp.harvesterhci.io/v1alpha1 behind the aggregator");
    let _api = setup::start(cp, &[])
        .await
        .context("starting the aggregated API")?;
    step("vm-dhcp controller, and two nodes on cluster network 'demo' (simulated kubelet)");
    vm_dhcp_e2e::rbac::agent_service_account(&ns, AGENT_SA).await;
    let ctl = controller(cp, &ns.name)?;
    let nodes = ["node-1", "node-2"]
        .iter()
        .map(|n| NodeSpec::new(n).label("network.harvesterhci.io/demo", "true"))
        .collect();
    let programs = HashMap::from([(
        "vm-dhcp-agent".to_string(),
        vm_dhcp_e2e::bins::vm_dhcp_binary(),
    )]);
    let sim = NodeSim::start(cp, &ns.name, nodes, programs).await?;

    step("the VM network (NAD) and its IPPool, as in the seed README (no serverIP given)");
    let nad: NetworkAttachmentDefinition = serde_json::from_value(json!({
        "apiVersion": "k8s.cni.cncf.io/v1", "kind": "NetworkAttachmentDefinition",
        "metadata": {"name": "net-48", "namespace": ns.name,
                     "labels": {"network.harvesterhci.io/clusternetwork": "demo"}},
        "spec": {"config": json!({"cniVersion": "0.3.1", "name": "net-48", "type": "bridge",
                 "bridge": "demo-br", "promiscMode": true, "vlan": 0, "ipam": {}}).to_string()}
    }))?;
    ns.api::<NetworkAttachmentDefinition>()
        .create(&PostParams::default(), &nad)
        .await?;
    let pool: IPPool = serde_json::from_value(json!({
        "apiVersion": "network.harvesterhci.io/v1alpha1", "kind": "IPPool",
        "metadata": {"name": "net-48", "namespace": ns.name},
        "spec": {"networkName": network, "ipv4Config": {
            "cidr": "192.168.48.0/24", "router": "192.168.48.1", "dns": ["1.1.1.1"],
            "domainName": "aibao.moe",
            "pool": {"start": "192.168.48.81", "end": "192.168.48.90",
                     "exclude": ["192.168.48.81", "192.168.48.90"]}}}
    }))?;
    let pools: Api<IPPool> = ns.api();
    let created = pools.create(&PostParams::default(), &pool).await?;
    println!(
        "admitted; the webhook chose serverIP {}",
        created
            .spec
            .ipv4_config
            .map(|c| c.server_ip)
            .unwrap_or_default()
    );
    let ready = |p: &IPPool| {
        p.status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|cs| {
                ["Registered", "CacheReady", "AgentReady"]
                    .iter()
                    .all(|t| cs.iter().any(|c| c.type_ == *t && c.status == "True"))
            })
    };
    until(
        "the pool's agents becoming ready",
        || {
            format!(
                "controller:\n{}\nsimulator:\n{}",
                ctl.log_tail(30),
                sim.sim_log()
            )
        },
        || async { pools.get("net-48").await.ok().filter(|p| ready(p)) },
    )
    .await?;
    show(cp, &["get", "ippools", "-n", &ns.name, "-o", "wide"]).await?;
    show(cp, &["get", "pods", "-n", &ns.name, "-o", "wide"]).await?;

    step("a VM with one NIC on the network and no MAC: the webhook picks the MAC and the address");
    let vm: VirtualMachine = serde_json::from_value(json!({
        "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine",
        "metadata": {"name": "test-vm", "namespace": ns.name},
        "spec": {"runStrategy": "Halted", "template": {"spec": {
            "domain": {"devices": {"interfaces": [{"name": "nic-1", "bridge": {}}]}},
            "networks": [{"name": "nic-1", "multus": {"networkName": network}}]}}}
    }))?;
    let vm = ns
        .api::<VirtualMachine>()
        .create(&PostParams::default(), &vm)
        .await?;
    let record = vm
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(ALLOCATIONS_ANNOTATION))
        .context("the VM carries no allocation: was the webhook called?")?;
    println!("{ALLOCATIONS_ANNOTATION}: {record}");
    let allocation = serde_json::from_str::<Vec<NicAllocation>>(record)?
        .into_iter()
        .next()
        .context("no NIC allocated")?;
    until(
        "the controller writing the vmnetcfg",
        || ctl.log_tail(30),
        || async {
            kubectl(
                cp,
                &[
                    "get",
                    "vmnetcfg",
                    "test-vm",
                    "-n",
                    &ns.name,
                    "-o",
                    "jsonpath={.status.conditions[?(@.type=='Allocated')].status}",
                ],
            )
            .await
            .ok()
            .filter(|s| s == "True")
        },
    )
    .await?;
    show(cp, &["get", "vmnetcfgs", "-n", &ns.name]).await?;

    step(&format!(
        "a guest with MAC {} on the network asks for an address (busybox udhcpc)",
        allocation.mac_address
    ));
    let guest = sim
        .attach_vm_with_mac(&network, Some(&allocation.mac_address))
        .await?;
    let said = guest.udhcpc_once().await?;
    println!("{}", said.trim_end());
    if !said.contains(&format!("lease of {} obtained", allocation.ip_address)) {
        bail!(
            "the guest was not given {}:\n{said}\nsimulator:\n{}",
            allocation.ip_address,
            sim.sim_log()
        );
    }

    step("the IPAM and the leases through the aggregated API");
    show(cp, &["get", "ipamallocations", "-n", &ns.name]).await?;
    until("the lease showing in dhcpleases", String::new, || async {
        kubectl(cp, &["get", "dhcpleases", "-n", &ns.name])
            .await
            .ok()
            .filter(|t| t.contains(&allocation.ip_address))
    })
    .await?;
    show(cp, &["get", "dhcpleases", "-n", &ns.name, "-o", "wide"]).await?;
    let agents: Api<Pod> = ns.api();
    let count = agents.list(&Default::default()).await?.items.len();
    println!(
        "\nThe guest got {} from one of {count} agent pods.",
        allocation.ip_address
    );

    if std::env::var("DEMO_EXIT").is_ok_and(|v| v == "1") {
        return Ok(());
    }
    println!(
        "\nThe cluster stays up until Ctrl-C. Try:\n  export KUBECONFIG={}\n  {} get ippools,vmnetcfgs,ipamallocations,macaddresses,dhcpleases -n {}",
        cp.kubeconfig_path.display(),
        vm_dhcp_e2e::bins::bin_dir()?.join("kubectl").display(),
        ns.name
    );
    tokio::signal::ctrl_c().await?;
    drop(guest);
    Ok(())
}
