//! Benchmark of `vm-dhcp controller` start-up (not CI; `make bench-controller`): 10,000 VMs
//! with their vmnetcfgs and two IPPools of 8,000 allocations each (16,000 in all; one pool
//! is limited to 10,000 addresses by the webhook, the status must fit one etcd object),
//! written straight with the client (no webhooks, no agents: `--no-agent`).
//!
//! Two starts are timed, each from process start: a cold one (the vmnetcfgs have no status
//! yet, the controller writes all 10,000) and a restart of the steady state (nothing to
//! write but the pools' conditions, cleared before the restart so their rewrite is seen).
//! For each: until `/readyz` is 200, until both pools' conditions are written, until the
//! first full pass is over; the controller's resident memory (VmRSS, VmHWM) and CPU time.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures::{StreamExt, TryStreamExt};
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use serde_json::{Map, Value, json};
use vm_dhcp_core::controller::{FINALIZER, VM_NAME_LABEL};
use vm_dhcp_core::crd::{IPPool, VirtualMachineNetworkConfig};
use vm_dhcp_core::kubevirt::{NetworkAttachmentDefinition, VirtualMachine};
use vm_dhcp_e2e::ControlPlane;
use vm_dhcp_e2e::proc::{Process, run_dir};

const VMS: usize = 10_000;
/// VM i has a NIC on net-a when i < A_END and on net-b when i >= B_START: 8,000 each.
const A_END: usize = 8_000;
const B_START: usize = 2_000;
const PARALLEL: usize = 32;
const DEADLINE: Duration = Duration::from_secs(600);

fn vm_name(i: usize) -> String {
    // Zero-padded: the controller's first pass goes in key order, so the last name is the
    // last vmnetcfg it visits (used to see the end of the pass).
    format!("vm-{i:05}")
}

/// The k-th address of a pool's range (10.1x.0.10 onwards).
fn address(second: u8, k: usize) -> String {
    let n = 10 + k;
    format!("10.{second}.{}.{}", n / 256, n % 256)
}

fn mac(tag: u8, i: usize) -> String {
    format!("02:{tag:02x}:00:00:{:02x}:{:02x}", i >> 8, i & 0xff)
}

struct Net {
    name: &'static str,
    second: u8,
    tag: u8,
}

const NETS: [Net; 2] = [
    Net {
        name: "net-a",
        second: 10,
        tag: 0x0a,
    },
    Net {
        name: "net-b",
        second: 11,
        tag: 0x0b,
    },
];

/// The NICs of VM i: (network, MAC, address).
fn nics(i: usize) -> Vec<(&'static Net, String, String)> {
    let mut out = Vec::new();
    if i < A_END {
        out.push((&NETS[0], mac(NETS[0].tag, i), address(NETS[0].second, i)));
    }
    if i >= B_START {
        let k = i - B_START;
        out.push((&NETS[1], mac(NETS[1].tag, i), address(NETS[1].second, k)));
    }
    out
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

fn conditions_written(p: &IPPool) -> bool {
    let conds = p.status.as_ref().and_then(|s| s.conditions.as_ref());
    ["Registered", "CacheReady"]
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

struct Figures {
    ready: Duration,
    pools: Duration,
    pass: Duration,
}

/// Starts the controller and times it; returns it still running.
async fn timed_start(
    cp: &'static ControlPlane,
    ns: &str,
    label: &str,
) -> Result<(Process, Figures)> {
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
        "--no-agent",
        &format!("--http-addr=127.0.0.1:{port}"),
    ]);
    cmd.env("RUST_LOG", "warn");
    let run = run_dir()?;
    let log = run.join(format!("bench-controller-{label}.log"));
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
        let mut all = true;
        for n in &NETS {
            all &= conditions_written(&pools.get(n.name).await?);
        }
        if all {
            break t0.elapsed();
        }
        check(&mut proc)?;
        // Each GET carries a 500 KiB status: polling harder would steal the 2 cores the
        // controller is being timed on.
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let last = vm_name(VMS - 1);
    let pass = loop {
        if cfg_done(&cfgs.get(&last).await?) {
            break t0.elapsed();
        }
        check(&mut proc)?;
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let cpu = cpu_seconds(pid);
    println!("{label}:");
    println!(
        "  /readyz 200 after            {:>8.2} s",
        ready.as_secs_f64()
    );
    println!(
        "  both pools' conditions after {:>8.2} s",
        pools_done.as_secs_f64()
    );
    println!(
        "  first full pass over after   {:>8.2} s",
        pass.as_secs_f64()
    );
    println!(
        "  memory: VmRSS {:.1} MiB at ready, {:.1} MiB after the pass (peak VmHWM {:.1} MiB); CPU {:.2} s",
        rss_ready as f64 / 1024.0,
        proc_status_kib(pid, "VmRSS:") as f64 / 1024.0,
        proc_status_kib(pid, "VmHWM:") as f64 / 1024.0,
        cpu
    );
    Ok((
        proc,
        Figures {
            ready,
            pools: pools_done,
            pass,
        },
    ))
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
    let t_setup = Instant::now();

    for n in &NETS {
        let nad: NetworkAttachmentDefinition = serde_json::from_value(json!({
            "apiVersion": "k8s.cni.cncf.io/v1", "kind": "NetworkAttachmentDefinition",
            "metadata": {"name": n.name, "namespace": ns.name},
            "spec": {"config": json!({"cniVersion": "0.3.1", "name": n.name, "type": "bridge",
                     "bridge": "mgmt-br", "ipam": {}}).to_string()}
        }))?;
        Api::<NetworkAttachmentDefinition>::namespaced(client.clone(), &ns.name)
            .create(&PostParams::default(), &nad)
            .await?;
        // A /18 with a range of 9,206 addresses (under the webhook's 10,000).
        let s = n.second;
        let pool: IPPool = serde_json::from_value(json!({
            "apiVersion": "network.harvesterhci.io/v1alpha1", "kind": "IPPool",
            "metadata": {"name": n.name, "namespace": ns.name},
            "spec": {"networkName": format!("{}/{}", ns.name, n.name), "ipv4Config": {
                "cidr": format!("10.{s}.0.0/18"), "serverIP": format!("10.{s}.0.2"),
                "pool": {"start": format!("10.{s}.0.10"), "end": format!("10.{s}.35.255")}}}
        }))?;
        let pools: Api<IPPool> = Api::namespaced(client.clone(), &ns.name);
        pools.create(&PostParams::default(), &pool).await?;
        let mut allocated = Map::new();
        let mut owners = Map::new();
        for i in 0..VMS {
            for (net, m, ip) in nics(i) {
                if net.name == n.name {
                    allocated.insert(ip.clone(), Value::String(m));
                    owners.insert(ip, Value::String(format!("{}/{}", ns.name, vm_name(i))));
                }
            }
        }
        let used = allocated.len();
        let body = json!({"status": {"ipv4": {"allocated": allocated, "owners": owners,
                                              "used": used, "available": 9_206 - used}}});
        pools
            .patch_status(n.name, &PatchParams::default(), &Patch::Merge(&body))
            .await
            .with_context(|| format!("writing the status of {}", n.name))?;
    }

    let vms: Api<VirtualMachine> = Api::namespaced(client.clone(), &ns.name);
    let cfgs: Api<VirtualMachineNetworkConfig> = Api::namespaced(client.clone(), &ns.name);
    let nsname = ns.name.clone();
    futures::stream::iter(0..VMS)
        .map(|i| {
            let (vms, cfgs, nsname) = (vms.clone(), cfgs.clone(), nsname.clone());
            async move {
                let name = vm_name(i);
                let nics = nics(i);
                let interfaces: Vec<_> = nics
                    .iter()
                    .map(|(n, m, _)| json!({"name": n.name, "bridge": {}, "macAddress": m}))
                    .collect();
                let networks: Vec<_> = nics
                    .iter()
                    .map(|(n, _, _)| {
                        json!({"name": n.name, "multus": {"networkName": format!("{nsname}/{}", n.name)}})
                    })
                    .collect();
                let vm: VirtualMachine = serde_json::from_value(json!({
                    "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine",
                    "metadata": {"name": name, "namespace": nsname},
                    "spec": {"runStrategy": "Halted", "template": {"spec": {
                        "domain": {"devices": {"interfaces": interfaces}}, "networks": networks}}}
                }))?;
                let vm = vms.create(&PostParams::default(), &vm).await?;
                let entries: Vec<_> = nics
                    .iter()
                    .map(|(n, m, ip)| {
                        json!({"networkName": format!("{nsname}/{}", n.name), "macAddress": m, "ipAddress": ip})
                    })
                    .collect();
                // As the controller creates it for its VM (owner, label, finalizer).
                let cfg: VirtualMachineNetworkConfig = serde_json::from_value(json!({
                    "apiVersion": "network.harvesterhci.io/v1alpha1",
                    "kind": "VirtualMachineNetworkConfig",
                    "metadata": {"name": name, "namespace": nsname,
                        "labels": {VM_NAME_LABEL: name}, "finalizers": [FINALIZER],
                        "ownerReferences": [{"apiVersion": "kubevirt.io/v1",
                            "kind": "VirtualMachine", "name": name,
                            "uid": vm.metadata.uid}]},
                    "spec": {"vmName": name, "networkConfigs": entries}
                }))?;
                cfgs.create(&PostParams::default(), &cfg).await?;
                anyhow::Ok(())
            }
        })
        .buffer_unordered(PARALLEL)
        .try_collect::<Vec<()>>()
        .await?;
    println!(
        "setup: {VMS} VMs and vmnetcfgs, 2 IPPools with {} allocations in all, written in {:.1} s",
        (0..VMS).map(|i| nics(i).len()).sum::<usize>(),
        t_setup.elapsed().as_secs_f64()
    );

    let (mut cold_proc, cold) = timed_start(
        cp,
        &ns.name,
        "cold start (10,000 vmnetcfg statuses to write)",
    )
    .await?;
    // Every vmnetcfg has its status now (the pass went in key order; this checks it).
    let list = cfgs.list(&ListParams::default()).await?;
    let done = list.items.iter().filter(|c| cfg_done(c)).count();
    if done != VMS {
        bail!("after the first pass only {done} of {VMS} vmnetcfgs are Allocated");
    }
    // A graceful stop gives the leader Lease back: the restart times the start, not the
    // wait for a dead leader's Lease to expire (15 s).
    stop(&mut cold_proc).await?;

    // Steady state: clear the pools' conditions and the last vmnetcfg's status so the
    // restart has something observable to write at both marks.
    let pools: Api<IPPool> = Api::namespaced(client.clone(), &ns.name);
    for n in &NETS {
        pools
            .patch_status(
                n.name,
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
    let (mut warm_proc, warm) = timed_start(cp, &ns.name, "restart (steady state)").await?;
    warm_proc.kill();
    println!(
        "summary: ready {:.2}/{:.2} s, pools {:.2}/{:.2} s, pass {:.2}/{:.2} s (cold/restart)",
        cold.ready.as_secs_f64(),
        warm.ready.as_secs_f64(),
        cold.pools.as_secs_f64(),
        warm.pools.as_secs_f64(),
        cold.pass.as_secs_f64(),
        warm.pass.as_secs_f64()
    );
    Ok(())
}
