//! The admission webhooks against a real kube-apiserver: allocation at admission, conflict
//! rejection, dryRun, and many concurrent creates through two replicas that both commit.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use futures::StreamExt;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, PostParams};
use vm_dhcp_core::admission::{ALLOCATIONS_ANNOTATION, NicAllocation};
use vm_dhcp_core::crd::{
    IPPool, IPPoolAddress, IPPoolAddressSpec, IPPoolMACClaimSpec, VirtualMachineNetworkConfig,
};
use vm_dhcp_core::kubevirt::VirtualMachine;
use vm_dhcp_e2e::webhooks::{addresses, claims, create_pool, pool, setup, vm};
use vm_dhcp_e2e::{ControlPlane, TestNamespace};

fn vmnetcfg(ns: &str, vm: &str, mac: &str, network: &str) -> VirtualMachineNetworkConfig {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "network.harvesterhci.io/v1alpha1", "kind": "VirtualMachineNetworkConfig",
        "metadata": {"name": vm, "namespace": ns},
        "spec": {"vmName": vm, "networkConfigs": [{"macAddress": mac, "networkName": network}]}
    }))
    .expect("vmnetcfg")
}

fn allocation_of(vm: &VirtualMachine) -> Option<NicAllocation> {
    let text = vm
        .metadata
        .annotations
        .as_ref()?
        .get(ALLOCATIONS_ANNOTATION)?;
    serde_json::from_str::<Vec<NicAllocation>>(text)
        .ok()?
        .into_iter()
        .next()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_pool_and_vmnetcfg_allocate_at_admission_and_conflicts_are_refused() {
    let cp = ControlPlane::shared().await;
    let (ns, replicas) = setup(cp, "wh-seed", 1).await;
    // A pool for a VM network that does not exist is refused, as upstream does.
    let missing = pool(
        &ns.name,
        "no-such-net",
        "10.60.0.0/24",
        "10.60.0.10",
        "10.60.0.20",
        None,
    );
    let err = ns
        .api::<IPPool>()
        .create(&PostParams::default(), &missing)
        .await
        .expect_err("no NAD");
    assert!(
        err.to_string().contains(&format!(
            "VM network {}/no-such-net does not exist",
            ns.name
        )),
        "{err}"
    );

    let mut seed: IPPool =
        serde_yaml::from_str(include_str!("../../core/tests/fixtures/seed-ippool.yaml"))
            .expect("seed");
    seed.metadata.namespace = Some(ns.name.clone());
    seed.spec.network_name = format!("{}/net-48", ns.name);
    create_pool(&ns, &replicas, &seed).await;
    let network = format!("{}/net-48", ns.name);

    let cfgs: Api<VirtualMachineNetworkConfig> = ns.api();
    let created = cfgs
        .create(
            &PostParams::default(),
            &vmnetcfg(&ns.name, "test-vm", "FA:CF:8E:50:82:FC", &network),
        )
        .await
        .expect("vmnetcfg admitted");
    let entry = &created.spec.network_configs.as_ref().expect("entries")[0];
    assert_eq!(
        entry.ip_address.as_deref(),
        Some("192.168.48.82"),
        "lowest free address (81 is excluded)"
    );

    // The allocation is one address object and one MAC claim, made before the answer.
    let held = addresses(&ns, "net-48").await;
    assert_eq!(held.len(), 1, "{held:?}");
    let a = &held["192.168.48.82"];
    assert_eq!(a.mac_address, "fa:cf:8e:50:82:fc");
    assert_eq!(
        a.owner.as_deref(),
        Some(format!("{}/test-vm", ns.name).as_str())
    );
    assert!(!a.static_);
    let claimed = claims(&ns, "net-48").await;
    assert_eq!(claimed["fa:cf:8e:50:82:fc"].address, "192.168.48.82");
    let named = ns
        .api::<IPPoolAddress>()
        .get("net-48.192.168.48.82")
        .await
        .expect("address object named <pool>.<address>");
    assert_eq!(
        named
            .labels()
            .get("network.harvesterhci.io/mac")
            .map(String::as_str),
        Some("fa-cf-8e-50-82-fc")
    );
    let pools: Api<IPPool> = ns.api();

    // The same MAC for another VM: the conflicting static MAC is refused, naming the holder.
    let err = cfgs
        .create(
            &PostParams::default(),
            &vmnetcfg(&ns.name, "other-vm", "fa:cf:8e:50:82:fc", &network),
        )
        .await
        .expect_err("conflicting MAC");
    let msg = err.to_string();
    assert!(
        msg.contains(&format!(
            "MAC address fa:cf:8e:50:82:fc is already bound to 192.168.48.82 in this network by {}/test-vm",
            ns.name
        )),
        "{msg}"
    );
    // A static address held by another MAC is refused too.
    let mut taken = vmnetcfg(&ns.name, "third-vm", "fa:cf:8e:50:82:fd", &network);
    if let Some(entries) = taken.spec.network_configs.as_mut() {
        entries[0].ip_address = Some("192.168.48.82".into());
    }
    let err = cfgs
        .create(&PostParams::default(), &taken)
        .await
        .expect_err("taken address");
    assert!(
        err.to_string()
            .contains("address 192.168.48.82 is already allocated to MAC fa:cf:8e:50:82:fc"),
        "{err}"
    );

    // A VM asking for an address with the static-ip annotation gets it, and the pool lists
    // it as static (what the aggregated API shows as state "static"); dynamic ones are not.
    let mut wants = vm(&ns.name, "static-vm", &network);
    wants.metadata.annotations = Some(BTreeMap::from([(
        "static-ip.harvesterhci.io/nic-1".to_string(),
        "192.168.48.85".to_string(),
    )]));
    let admitted = ns
        .api::<VirtualMachine>()
        .create(&PostParams::default(), &wants)
        .await
        .expect("static VM admitted");
    assert_eq!(
        allocation_of(&admitted).map(|a| a.ip_address),
        Some("192.168.48.85".to_string())
    );
    let held = addresses(&ns, "net-48").await;
    assert!(held["192.168.48.85"].static_, "{held:?}");
    assert!(!held["192.168.48.82"].static_, "{held:?}");

    // Deleting the pool is refused while an address is held.
    let err = pools
        .delete("net-48", &DeleteParams::default())
        .await
        .expect_err("held");
    assert!(
        err.to_string()
            .contains("2 address(es) are still allocated"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_side_dry_run_changes_no_status() {
    let cp = ControlPlane::shared().await;
    let (ns, replicas) = setup(cp, "wh-dry", 1).await;
    create_pool(
        &ns,
        &replicas,
        &pool(
            &ns.name,
            "net-dry",
            "10.20.0.0/24",
            "10.20.0.10",
            "10.20.0.50",
            None,
        ),
    )
    .await;
    let pools: Api<IPPool> = ns.api();
    let before = pools.get("net-dry").await.expect("pool");
    let path = cp.dir.join(format!("{}-dry.yaml", ns.name));
    let obj = vmnetcfg(
        &ns.name,
        "dry-vm",
        "02:00:00:00:00:01",
        &format!("{}/net-dry", ns.name),
    );
    std::fs::write(&path, serde_yaml::to_string(&obj).expect("yaml")).expect("write manifest");
    let out = cp
        .kubectl(&[
            "create",
            "--dry-run=server",
            "-o",
            "yaml",
            "-f",
            &path.display().to_string(),
        ])
        .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("ipAddress: 10.20.0.10"),
        "dry run shows the decision:\n{text}"
    );
    let after = pools.get("net-dry").await.expect("pool");
    assert_eq!(
        after.metadata.resource_version, before.metadata.resource_version,
        "pool untouched"
    );
    assert!(
        addresses(&ns, "net-dry").await.is_empty(),
        "no address object"
    );
    assert!(claims(&ns, "net-dry").await.is_empty(), "no MAC claim");
    assert!(
        ns.api::<VirtualMachineNetworkConfig>()
            .get_opt("dry-vm")
            .await
            .expect("get")
            .is_none()
    );
}

/// Creates `count` VMs with `clients` concurrent clients; a create that fails is retried
/// (as a client would) up to `retries` times. Returns the admitted VMs.
async fn create_vms(
    ns: &TestNamespace,
    network: &str,
    count: usize,
    clients: usize,
    retries: u32,
) -> Vec<VirtualMachine> {
    let vms: Api<VirtualMachine> = ns.api();
    futures::stream::iter(0..count)
        .map(|i| {
            let vms = vms.clone();
            let obj = vm(&ns.name, &format!("vm-{i:04}"), network);
            async move {
                let mut last = None;
                for _ in 0..=retries {
                    match vms.create(&PostParams::default(), &obj).await {
                        Ok(created) => return created,
                        Err(kube::Error::Api(s)) if s.code == 409 => {
                            // A previous attempt was admitted after all.
                            return vms
                                .get(obj.metadata.name.as_deref().unwrap_or_default())
                                .await
                                .expect("get");
                        }
                        Err(e) => last = Some(e),
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                panic!("VM create kept failing: {last:?}");
            }
        })
        .buffer_unordered(clients)
        .collect()
        .await
}

/// Every admitted VM's address is held by its MAC in the store, no address went to two VMs
/// and no MAC holds two addresses. Returns address → MAC of the VMs.
fn check_distinct(
    vms: &[VirtualMachine],
    held: &BTreeMap<String, IPPoolAddressSpec>,
    claimed: &BTreeMap<String, IPPoolMACClaimSpec>,
) -> BTreeMap<String, String> {
    let mut by_ip = BTreeMap::new();
    for vm in vms {
        let a = allocation_of(vm)
            .unwrap_or_else(|| panic!("{:?} has no allocation annotation", vm.metadata.name));
        assert!(
            by_ip
                .insert(a.ip_address.clone(), a.mac_address.clone())
                .is_none(),
            "{} handed out twice",
            a.ip_address
        );
        assert_eq!(
            held.get(&a.ip_address).map(|h| h.mac_address.as_str()),
            Some(a.mac_address.as_str()),
            "{} is durable as an address object of its MAC",
            a.ip_address
        );
        assert_eq!(
            claimed.get(&a.mac_address).map(|c| c.address.as_str()),
            Some(a.ip_address.as_str()),
            "the claim of {} names its address",
            a.mac_address
        );
    }
    let macs: Vec<&String> = held.values().map(|h| &h.mac_address).collect();
    let unique: BTreeSet<&&String> = macs.iter().collect();
    assert_eq!(macs.len(), unique.len(), "a MAC holds two addresses");
    by_ip
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_vms_from_32_clients_through_two_replicas_get_distinct_addresses() {
    let cp = ControlPlane::shared().await;
    let (ns, replicas) = setup(cp, "wh-load", 2).await;
    create_pool(
        &ns,
        &replicas,
        &pool(
            &ns.name,
            "net-load",
            "10.30.0.0/22",
            "10.30.0.10",
            "10.30.3.250",
            None,
        ),
    )
    .await;
    let network = format!("{}/net-load", ns.name);
    let t0 = Instant::now();
    let vms = create_vms(&ns, &network, 500, 32, 0).await;
    let took = t0.elapsed();
    let held = addresses(&ns, "net-load").await;
    let by_ip = check_distinct(&vms, &held, &claims(&ns, "net-load").await);
    assert_eq!(by_ip.len(), 500);
    assert_eq!(held.len(), 500, "no leak without failures");
    let committed: Vec<u64> = replicas
        .iter()
        .map(|r| r.webhook.metrics.allocations_committed())
        .collect();
    let conflicts: Vec<u64> = replicas
        .iter()
        .map(|r| r.webhook.metrics.conflicts())
        .collect();
    eprintln!(
        "500 VMs by 32 clients through 2 replicas in {:.2} s ({:.0} creates/s); jobs committed per replica {committed:?}, write conflicts {conflicts:?}",
        took.as_secs_f64(),
        500.0 / took.as_secs_f64()
    );
    assert!(
        committed.iter().all(|&c| c > 0),
        "both replicas committed: {committed:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_vms_with_a_replica_killed_mid_load_lose_and_duplicate_nothing() {
    let cp = ControlPlane::shared().await;
    let (ns, mut replicas) = setup(cp, "wh-kill", 2).await;
    create_pool(
        &ns,
        &replicas,
        &pool(
            &ns.name,
            "net-kill",
            "10.40.0.0/22",
            "10.40.0.10",
            "10.40.3.250",
            None,
        ),
    )
    .await;
    let network = format!("{}/net-kill", ns.name);
    let load = create_vms(&ns, &network, 500, 32, 20);
    let kill = async {
        tokio::time::sleep(Duration::from_millis(400)).await;
        replicas[1].kill();
    };
    let (vms, ()) = tokio::join!(load, kill);
    let held = addresses(&ns, "net-kill").await;
    let claimed = claims(&ns, "net-kill").await;
    let by_ip = check_distinct(&vms, &held, &claimed);
    assert_eq!(by_ip.len(), 500, "every VM was admitted with an address");
    let leaks = held.len() - by_ip.len();
    let half = claimed.len() - by_ip.len();
    eprintln!(
        "killed one of two replicas mid-load: 500 VMs admitted, 0 duplicate addresses, 0 duplicate MACs; {leaks} address object(s) and {half} claim(s) beyond the VMs' left for the controller's sweep"
    );
}

/// The matchConditions keep a webhook outage from blocking what does not need an address:
/// with every replica gone (failurePolicy Fail), a VM update that touches no NIC and a VM on
/// the pod network alone are still admitted, while a VM with a NIC on a pooled network is
/// refused (which proves the configuration is live).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_outage_blocks_only_vms_that_need_an_address() {
    let cp = ControlPlane::shared().await;
    let (ns, mut replicas) = setup(cp, "wh-outage", 1).await;
    create_pool(
        &ns,
        &replicas,
        &pool(
            &ns.name,
            "net-out",
            "10.41.0.0/24",
            "10.41.0.10",
            "10.41.0.250",
            None,
        ),
    )
    .await;
    let network = format!("{}/net-out", ns.name);
    let vms: Api<VirtualMachine> = ns.api();
    let admitted = vms
        .create(&PostParams::default(), &vm(&ns.name, "with-nic", &network))
        .await
        .expect("VM with a NIC admitted while the webhook runs");
    assert!(allocation_of(&admitted).is_some(), "allocation recorded");
    for replica in &mut replicas {
        replica.kill();
    }

    let label = serde_json::json!({"metadata": {"labels": {"touched": "during-outage"}}});
    vms.patch(
        "with-nic",
        &kube::api::PatchParams::default(),
        &kube::api::Patch::Merge(&label),
    )
    .await
    .expect("an update that touches no NIC does not call the webhook");

    let pod_network_only: VirtualMachine = serde_json::from_value(serde_json::json!({
        "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine",
        "metadata": {"name": "pod-net", "namespace": ns.name},
        "spec": {"runStrategy": "Halted", "template": {"spec": {
            "domain": {"devices": {"interfaces": [{"name": "default", "masquerade": {}}]}},
            "networks": [{"name": "default", "pod": {}}]}}}
    }))
    .expect("vm");
    vms.create(&PostParams::default(), &pod_network_only)
        .await
        .expect("a VM on the pod network alone does not call the webhook");

    let refused = vms
        .create(
            &PostParams::default(),
            &vm(&ns.name, "needs-address", &network),
        )
        .await
        .expect_err("a VM that needs an address waits for the webhook (failurePolicy Fail)");
    let message = refused.to_string();
    assert!(
        message.contains("failed calling webhook"),
        "refused by the unreachable webhook: {message}"
    );
}

/// A VM with NICs on two pools is all or nothing: when the second pool has no room, what
/// the first pool gave is deleted again before the refusal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_on_two_pools_is_all_or_nothing() {
    let cp = ControlPlane::shared().await;
    let (ns, replicas) = setup(cp, "wh-two", 1).await;
    for (name, cidr, start, end) in [
        ("net-a", "10.61.0.0/24", "10.61.0.10", "10.61.0.50"),
        ("net-b", "10.62.0.0/24", "10.62.0.10", "10.62.0.10"),
    ] {
        create_pool(
            &ns,
            &replicas,
            &pool(&ns.name, name, cidr, start, end, None),
        )
        .await;
    }
    let vms: Api<VirtualMachine> = ns.api();
    // net-b's only address goes to another VM.
    vms.create(
        &PostParams::default(),
        &vm(&ns.name, "first", &format!("{}/net-b", ns.name)),
    )
    .await
    .expect("first VM");
    let two: VirtualMachine = serde_json::from_value(serde_json::json!({
        "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine",
        "metadata": {"name": "two", "namespace": ns.name},
        "spec": {"runStrategy": "Halted", "template": {"spec": {
            "domain": {"devices": {"interfaces": [
                {"name": "nic-a", "bridge": {}, "macAddress": "02:61:00:00:00:01"},
                {"name": "nic-b", "bridge": {}, "macAddress": "02:62:00:00:00:01"}]}},
            "networks": [
                {"name": "nic-a", "multus": {"networkName": format!("{}/net-a", ns.name)}},
                {"name": "nic-b", "multus": {"networkName": format!("{}/net-b", ns.name)}}]}}}
    }))
    .expect("vm");
    let err = vms
        .create(&PostParams::default(), &two)
        .await
        .expect_err("net-b is full");
    assert!(err.to_string().contains("no free address left"), "{err}");
    assert!(
        addresses(&ns, "net-a").await.is_empty(),
        "net-a's address rolled back"
    );
    assert!(
        claims(&ns, "net-a").await.is_empty(),
        "net-a's MAC claim rolled back"
    );
    assert_eq!(
        addresses(&ns, "net-b").await.len(),
        1,
        "the first VM's only"
    );
}
