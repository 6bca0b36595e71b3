//! The plans on hand-built objects: what each situation makes the controller write.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use serde_json::json;

use super::*;
use crate::controller::{LiveOwners, OrphanClock};
use crate::crd::{IPPool, VirtualMachineNetworkConfig};
use crate::kubevirt::{NetworkAttachmentDefinition, VirtualMachine};
use crate::mac::MacAddr;
use crate::store::Holding;

const NOW: &str = "2026-12-05T12:00:00Z";

fn now() -> Timestamp {
    NOW.parse().expect("time")
}

fn ago(secs: i64) -> String {
    (now() - SignedDuration::from_secs(secs)).to_string()
}

fn mac(s: &str) -> MacAddr {
    s.parse().expect("mac")
}

fn settings() -> Settings {
    Settings {
        namespace: "harvester-system".into(),
        image: "rancher/harvester-vm-dhcp:v2".into(),
        service_account: "vm-dhcp-agent".into(),
        agents_per_pool: 2,
        no_agent: false,
        no_dhcp: false,
        agent_lease_duration_seconds: 5,
        lost_node_grace: Duration::from_secs(30),
        agents_on_witness_nodes: false,
        leak_grace: Duration::from_secs(120),
        status_max_allocations: 1000,
    }
}

/// Pool `default/net1` on NAD `default/net1`, migrated, with our finalizer.
fn pool(extra: serde_json::Value) -> IPPool {
    let mut v = json!({
        "apiVersion": "network.harvesterhci.io/v1alpha1", "kind": "IPPool",
        "metadata": {"name": "net1", "namespace": "default", "uid": "pool-uid",
            "resourceVersion": "7",
            "finalizers": [crate::controller::FINALIZER],
            "annotations": {crate::store::STORE_ANNOTATION: crate::store::STORE_OBJECTS}},
        "spec": {"networkName": "default/net1", "ipv4Config": {
            "serverIP": "10.0.0.2", "cidr": "10.0.0.0/24", "router": "10.0.0.1",
            "pool": {"start": "10.0.0.10", "end": "10.0.0.200"}}}
    });
    merge(&mut v, extra);
    serde_json::from_value(v).expect("pool")
}

fn merge(into: &mut serde_json::Value, from: serde_json::Value) {
    match (into, from) {
        (serde_json::Value::Object(a), serde_json::Value::Object(b)) => {
            for (k, v) in b {
                if v.is_null() {
                    a.remove(&k);
                } else {
                    merge(a.entry(k).or_insert(serde_json::Value::Null), v);
                }
            }
        }
        (a, b) => *a = b,
    }
}

fn nad() -> NetworkAttachmentDefinition {
    serde_json::from_value(json!({
        "apiVersion": "k8s.cni.cncf.io/v1", "kind": "NetworkAttachmentDefinition",
        "metadata": {"name": "net1", "namespace": "default", "labels": {
            CLUSTER_NETWORK: "vmnet",
            crate::controller::POOL_NAMESPACE_LABEL: "default",
            crate::controller::POOL_NAME_LABEL: "net1"}},
        "spec": {"config": "{\"type\":\"bridge\",\"bridge\":\"vmnet-br\"}"}
    }))
    .expect("nad")
}

const CLUSTER_NETWORK: &str = crate::controller::CLUSTER_NETWORK_LABEL;

/// A node with the VM network's bridge (`network.harvesterhci.io/vmnet=true`), Ready.
fn node(name: &str) -> Node {
    serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {"network.harvesterhci.io/vmnet": "true"}},
        "status": {"conditions": [{"type": "Ready", "status": "True"}]}
    }))
    .expect("node")
}

fn witness(name: &str) -> Node {
    let mut n = node(name);
    n.metadata
        .labels
        .get_or_insert_default()
        .insert(crate::controller::WITNESS_LABEL.into(), "true".into());
    n
}

/// A node the node controller gave up on `secs` ago: Ready Unknown, unreachable taint.
fn lost(name: &str, secs: i64) -> Node {
    serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {"network.harvesterhci.io/vmnet": "true"}},
        "spec": {"taints": [{"key": agent_pod::UNREACHABLE_TAINT, "effect": "NoExecute",
            "timeAdded": ago(secs)}]},
        "status": {"conditions": [{"type": "Ready", "status": "Unknown",
            "lastTransitionTime": ago(secs)}]}
    }))
    .expect("node")
}

/// Our agent pod of the pool on `node` with `revision`.
fn agent(name: &str, node: &str, revision: &str, ready: bool) -> Pod {
    serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": "harvester-system", "uid": format!("{name}-uid"),
            "labels": {
                crate::controller::MANAGED_BY_LABEL: crate::controller::MANAGED_BY_VALUE,
                crate::controller::REVISION_LABEL: revision,
                crate::controller::POOL_NAMESPACE_LABEL: "default",
                crate::controller::POOL_NAME_LABEL: "net1"}},
        "spec": {"nodeName": node, "containers": []},
        "status": {"conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]}
    }))
    .expect("pod")
}

/// The Go version's agent pod (no managed-by label).
fn go_agent(name: &str, node: &str) -> Pod {
    serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": "harvester-system",
            "labels": {crate::controller::AGENT_LABEL: crate::controller::AGENT_LABEL_VALUE}},
        "spec": {"nodeName": node, "containers": []},
        "status": {"conditions": [{"type": "Ready", "status": "True"}]}
    }))
    .expect("pod")
}

fn lease(holder: &str) -> Lease {
    serde_json::from_value(json!({
        "metadata": {"name": "lease", "namespace": "harvester-system"},
        "spec": {"holderIdentity": holder, "leaseDurationSeconds": 5,
            "renewTime": (now() - SignedDuration::from_secs(1)).strftime("%Y-%m-%dT%H:%M:%S%.6fZ").to_string()}
    }))
    .expect("lease")
}

struct World {
    pool: IPPool,
    nad: Option<NetworkAttachmentDefinition>,
    nodes: Vec<Node>,
    pods: Vec<Pod>,
    lease: Option<Lease>,
    holdings: Vec<(Holding, Option<String>)>,
    claims: BTreeMap<MacAddr, (IpAddr, Option<String>)>,
    live: LiveOwners,
    orphans: OrphanClock,
    half_made: OrphanClock,
}

impl World {
    fn new(pool: IPPool) -> World {
        World {
            pool,
            nad: Some(nad()),
            nodes: vec![node("n1"), node("n2"), node("n3")],
            pods: Vec::new(),
            lease: None,
            holdings: Vec::new(),
            claims: BTreeMap::new(),
            live: LiveOwners::default(),
            orphans: OrphanClock::default(),
            half_made: OrphanClock::default(),
        }
    }

    /// An allocation made as the webhook makes it: address object and claim.
    fn allocate(&mut self, ip: &str, m: &str, owner: Option<&str>) {
        let ip: IpAddr = ip.parse().expect("ip");
        self.holdings.push((
            Holding {
                ip,
                mac: mac(m),
                owner: owner.map(str::to_string),
                static_: false,
                interface: None,
            },
            Some(format!("rv-{ip}")),
        ));
        self.claims
            .insert(mac(m), (ip, Some(format!("rv-claim-{m}"))));
    }

    fn plan_at(&mut self, s: &Settings, mono: Duration) -> Plan {
        let w = PoolWorld {
            pool: &self.pool,
            nad: self.nad.as_ref(),
            nodes: self.nodes.iter().collect(),
            pods: self.pods.iter().collect(),
            lease: self.lease.as_ref(),
            holdings: self.holdings.clone(),
            claims: self.claims.clone(),
            live: &self.live,
            projection: Ok((true, None)),
            now: now(),
        };
        let mut clocks = Clocks {
            orphans: &mut self.orphans,
            half_made: &mut self.half_made,
            now: mono,
        };
        plan_pool(&w, s, &mut clocks, NOW)
    }

    fn plan(&mut self, s: &Settings) -> Plan {
        self.plan_at(s, Duration::ZERO)
    }
}

fn created(plan: &Plan) -> Vec<&Pod> {
    plan.writes
        .iter()
        .filter_map(|w| match w {
            Write::CreateAgent(p) => Some(&**p),
            _ => None,
        })
        .collect()
}

/// (name, force) of every agent deleted.
fn deleted(plan: &Plan) -> Vec<(String, bool)> {
    plan.writes
        .iter()
        .filter_map(|w| match w {
            Write::DeleteAgent { name, force, .. } => Some((name.clone(), *force)),
            _ => None,
        })
        .collect()
}

fn revision_of(pod: &Pod) -> String {
    pod.metadata.labels.as_ref().expect("labels")[crate::controller::REVISION_LABEL].clone()
}

fn status_patch_of(plan: &Plan) -> Option<&serde_json::Value> {
    plan.writes.iter().find_map(|w| match w {
        Write::PoolStatus { patch, .. } => Some(patch),
        _ => None,
    })
}

fn condition<'a>(patch: &'a serde_json::Value, type_: &str) -> &'a serde_json::Value {
    patch["conditions"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["type"] == type_))
        .unwrap_or_else(|| panic!("no condition {type_} in {patch}"))
}

#[test]
fn agents_go_to_labelled_ready_nodes_and_witness_nodes_only_with_the_flag() {
    let mut world = World::new(pool(json!({})));
    world.nodes = vec![witness("w1"), witness("w2"), node("n1")];
    let plan = world.plan(&settings());
    // Two wanted, one eligible node: one agent; the witness nodes are left out.
    assert_eq!(created(&plan).len(), 1, "{plan:#?}");
    let pod = created(&plan)[0];
    let text = serde_json::to_string(&pod.spec).expect("spec");
    assert!(
        text.contains(crate::controller::WITNESS_LABEL),
        "the pod must keep off witness nodes: {text}"
    );
    let patch = status_patch_of(&plan).expect("status");
    assert_eq!(condition(patch, "Registered")["status"], "True");
    assert_eq!(condition(patch, "AgentReady")["status"], "False");

    let s = Settings {
        agents_on_witness_nodes: true,
        ..settings()
    };
    assert_eq!(created(&world.plan(&s)).len(), 2);

    // No node carries the network: nothing is created and Registered says why.
    world.nodes = vec![
        serde_json::from_value(json!({"metadata": {"name": "x"},
        "status": {"conditions": [{"type": "Ready", "status": "True"}]}}))
        .expect("node"),
    ];
    let plan = world.plan(&settings());
    assert!(created(&plan).is_empty());
    let patch = status_patch_of(&plan).expect("status");
    let registered = condition(patch, "Registered");
    assert_eq!(registered["status"], "False");
    assert!(
        registered["message"]
            .as_str()
            .is_some_and(|m| m.contains("network.harvesterhci.io/vmnet=true")),
        "{registered}"
    );
}

#[test]
fn an_agent_on_a_lost_node_waits_out_the_grace_then_is_force_deleted_and_replaced() {
    let s = settings();
    let mut world = World::new(pool(json!({})));
    let rev = revision_of(created(&world.plan(&s))[0]);
    world.pods = vec![agent("a1", "n1", &rev, true), agent("a2", "n2", &rev, true)];
    world.lease = Some(lease("a1"));
    assert!(
        world
            .plan(&s)
            .writes
            .iter()
            .all(|w| !matches!(w, Write::CreateAgent(_) | Write::DeleteAgent { .. }))
    );

    // Lost 10 s ago: not yet (a node may come back); look again when the grace runs out.
    world.nodes[0] = lost("n1", 10);
    let plan = world.plan(&s);
    assert!(deleted(&plan).is_empty(), "{plan:#?}");
    let recheck = plan.recheck.expect("a recheck");
    assert!(
        recheck > Duration::from_secs(19) && recheck < Duration::from_secs(22),
        "{recheck:?}"
    );

    // Lost for longer than the grace: force-deleted (its kubelet will never confirm a
    // plain delete) and replaced on the node that has none.
    world.nodes[0] = lost("n1", 45);
    let plan = world.plan(&s);
    assert_eq!(deleted(&plan), vec![("a1".to_string(), true)]);
    assert_eq!(created(&plan).len(), 1);
}

#[test]
fn an_image_roll_surges_new_agents_and_deletes_the_old_only_once_they_are_ready() {
    let old = Settings {
        image: "rancher/harvester-vm-dhcp:v1".into(),
        ..settings()
    };
    let new = settings();
    let mut world = World::new(pool(json!({})));
    let old_rev = revision_of(created(&world.plan(&old))[0]);
    world.pods = vec![
        agent("old-1", "n1", &old_rev, true),
        agent("old-2", "n2", &old_rev, true),
    ];
    world.lease = Some(lease("old-1"));

    let plan = world.plan(&new);
    let surge = created(&plan);
    assert_eq!(surge.len(), 2, "{plan:#?}");
    let new_rev = revision_of(surge[0]);
    assert_ne!(new_rev, old_rev);
    assert!(
        deleted(&plan).is_empty(),
        "old agents stay until new ones are Ready"
    );
    // The active agent is still the old one.
    let patch = status_patch_of(&plan).expect("status");
    assert_eq!(patch["agentPodRef"]["name"], "old-1");

    world.pods.push(agent("new-1", "n3", &new_rev, true));
    world.pods.push(agent("new-2", "n1", &new_rev, false));
    assert!(
        deleted(&world.plan(&new)).is_empty(),
        "one new agent is not Ready"
    );

    world.pods[3] = agent("new-2", "n1", &new_rev, true);
    let mut gone = deleted(&world.plan(&new));
    gone.sort();
    assert_eq!(
        gone,
        vec![("old-1".to_string(), false), ("old-2".to_string(), false)]
    );

    // The hold annotation keeps the image the active agent runs.
    let mut world = World::new(pool(json!({
        "metadata": {"annotations": {crate::controller::HOLD_AGENT_UPGRADE_ANNOTATION: "true"}},
        "status": {"agentPodRef": {"image": "rancher/harvester-vm-dhcp:v1"}}})));
    let held = world.plan(&new);
    assert_eq!(revision_of(created(&held)[0]), old_rev);
}

#[test]
fn a_leak_is_released_after_the_grace_and_an_ownerless_allocation_is_adopted() {
    let s = settings();
    let mut world = World::new(pool(json!({})));
    world.allocate("10.0.0.10", "02:00:00:00:00:01", Some("ns1/vm1"));
    world.allocate("10.0.0.11", "02:00:00:00:00:02", None);
    world
        .live
        .insert("default/net1", mac("02:00:00:00:00:02"), "ns1/vm2".into());
    let releases = |plan: &Plan| -> Vec<MacAddr> {
        plan.writes
            .iter()
            .filter_map(|w| match w {
                Write::Release { mac, .. } => Some(*mac),
                _ => None,
            })
            .collect()
    };

    let plan = world.plan_at(&s, Duration::from_secs(0));
    assert!(releases(&plan).is_empty(), "a leak is not released at once");
    assert!(plan.writes.iter().any(|w| matches!(w,
        Write::Adopt { owner, mac: m, .. } if owner == "ns1/vm2" && *m == mac("02:00:00:00:00:02"))));
    let recheck = plan
        .recheck
        .expect("the sweep looks again when the leak is due");
    assert!(recheck >= s.leak_grace, "{recheck:?}");

    let plan = world.plan_at(&s, Duration::from_secs(60));
    assert!(releases(&plan).is_empty());

    // Its owner came back before the grace ran out: forgotten, nothing released later.
    world
        .live
        .insert("default/net1", mac("02:00:00:00:00:01"), "ns1/vm1".into());
    world.plan_at(&s, Duration::from_secs(90));
    world.live = LiveOwners::default();
    world
        .live
        .insert("default/net1", mac("02:00:00:00:00:02"), "ns1/vm2".into());
    assert!(releases(&world.plan_at(&s, Duration::from_secs(130))).is_empty());

    let plan = world.plan_at(&s, Duration::from_secs(250));
    let release = plan
        .writes
        .iter()
        .find(|w| matches!(w, Write::Release { .. }))
        .expect("the leak is released once it has been one for the grace");
    let Write::Release {
        mac: m, held, leak, ..
    } = release
    else {
        unreachable!()
    };
    assert_eq!(*m, mac("02:00:00:00:00:01"));
    assert_eq!(
        *held,
        Some("10.0.0.10".parse().expect("ip")),
        "the release names the address the cache saw: the writer reads its object"
    );
    assert!(
        leak.as_ref()
            .is_some_and(|l| l.pool_uid.as_deref() == Some("pool-uid"))
    );
}

#[test]
fn a_half_made_allocation_is_swept_after_the_grace() {
    let s = settings();
    let mut world = World::new(pool(json!({})));
    world.allocate("10.0.0.10", "02:00:00:00:00:01", Some("ns1/vm1"));
    world
        .live
        .insert("default/net1", mac("02:00:00:00:00:01"), "ns1/vm1".into());
    // A claim whose address object was never written.
    world.claims.insert(
        mac("02:00:00:00:00:09"),
        ("10.0.0.19".parse().expect("ip"), Some("rv9".into())),
    );
    let sweeps = |plan: &Plan| {
        plan.writes
            .iter()
            .filter(|w| matches!(w, Write::SweepHalfMade { .. }))
            .cloned()
            .collect::<Vec<_>>()
    };
    assert!(sweeps(&world.plan_at(&s, Duration::ZERO)).is_empty());
    let plan = world.plan_at(&s, s.leak_grace);
    let swept = sweeps(&plan);
    let [
        Write::SweepHalfMade {
            ip,
            mac: m,
            claimed,
            resource_version,
            ..
        },
    ] = swept.as_slice()
    else {
        panic!("one sweep: {plan:#?}")
    };
    assert!(ip.is_unspecified(), "a claim has no address object");
    assert_eq!(*m, mac("02:00:00:00:00:09"));
    assert_eq!(*claimed, Some("10.0.0.19".parse().expect("ip")));
    assert_eq!(resource_version.as_deref(), Some("rv9"));
}

#[test]
fn a_go_pool_is_taken_over_finalizer_status_and_agent() {
    let s = settings();
    let go = pool(json!({
        "metadata": {"finalizers": ["wrangler.cattle.io/vm-dhcp-ippool-controller"],
            "annotations": {crate::store::STORE_ANNOTATION: null}},
        "status": {"ipv4": {"allocated": {
            "10.0.0.10": "02:00:00:00:00:01", "10.0.0.1": "EXCLUDED"},
            "used": 1, "available": 190}}
    }));
    let mut world = World::new(go);
    world.pods = vec![go_agent("default-net1-agent", "n1")];
    let plan = world.plan(&s);
    let [
        Write::Finalizers {
            kind: Finalized::IPPool,
            finalizers,
            resource_version,
            ..
        },
        Write::Migrate { holdings, .. },
    ] = plan.writes.as_slice()
    else {
        panic!("finalizer, then migration, then nothing until it is marked: {plan:#?}")
    };
    assert_eq!(finalizers, &vec![crate::controller::FINALIZER.to_string()]);
    assert_eq!(resource_version.as_deref(), Some("7"));
    assert_eq!(holdings.len(), 1);
    assert_eq!(holdings[0].mac, mac("02:00:00:00:00:01"));

    // Migrated: the Go agent keeps serving until one of ours is a Ready Lease holder.
    world.pool = pool(json!({}));
    let plan = world.plan(&s);
    assert!(deleted(&plan).is_empty(), "{plan:#?}");
    let rev = revision_of(created(&plan)[0]);
    world.pods.push(agent("ours", "n2", &rev, true));
    world.lease = Some(lease("ours"));
    assert_eq!(
        deleted(&world.plan(&s)),
        vec![("default-net1-agent".to_string(), false)]
    );
}

#[test]
fn a_deleted_pool_takes_its_agents_lease_labels_and_allocations_with_it() {
    let s = settings();
    let mut world = World::new(pool(json!({"metadata": {"deletionTimestamp": NOW}})));
    world.pods = vec![agent("a1", "n1", "r", true)];
    let kinds: Vec<&str> = world.plan(&s).writes.iter().map(Write::kind).collect();
    assert_eq!(
        kinds,
        [
            "delete_agent",
            "delete_agent_lease",
            "nad_labels",
            "delete_allocations",
            "finalizers"
        ]
    );
    // Once our finalizer is off, nothing more.
    world.pool = pool(json!({"metadata": {"deletionTimestamp": NOW, "finalizers": ["other"]}}));
    assert!(world.plan(&s).writes.is_empty());
}

#[test]
fn an_unchanged_pool_plans_no_write() {
    let s = settings();
    let mut world = World::new(pool(json!({})));
    let first = world.plan(&s);
    let rev = revision_of(created(&first)[0]);
    world.pods = vec![agent("a1", "n1", &rev, true), agent("a2", "n2", &rev, true)];
    world.lease = Some(lease("a1"));
    let patch = status_patch_of(&world.plan(&s)).expect("status").clone();
    let mut status = json!({});
    merge(&mut status, patch);
    world.pool = pool(json!({ "status": status }));
    let plan = world.plan(&s);
    assert!(plan.writes.is_empty(), "{plan:#?}");
}

struct TestPools {
    held: BTreeMap<(String, MacAddr), Ipv4Addr>,
    live: LiveOwners,
}

impl Pools for TestPools {
    fn pool_of(&self, network: &str) -> Option<PoolKey> {
        (network == "default/net1").then(|| ("default".to_string(), "net1".to_string()))
    }

    fn held_ip(&self, pool: &PoolKey, mac: MacAddr) -> Option<Ipv4Addr> {
        self.held.get(&(pool.1.clone(), mac)).copied()
    }

    fn live(&self, network: &str, skip: Option<(&str, &str)>) -> LiveOwners {
        let mut out = LiveOwners::default();
        for (n, m, owner) in self.live.clone().into_claims() {
            if skip.is_some_and(|(ns, name)| owner == format!("{ns}/{name}")) {
                continue;
            }
            if n == network {
                out.insert(&n, m, owner);
            }
        }
        out
    }
}

fn vm(interfaces: serde_json::Value) -> VirtualMachine {
    let names: Vec<String> = interfaces
        .as_array()
        .expect("interfaces")
        .iter()
        .map(|i| i["name"].as_str().expect("name").to_string())
        .collect();
    serde_json::from_value(json!({
        "metadata": {"name": "vm1", "namespace": "ns1", "uid": "vm-uid"},
        "spec": {"template": {"spec": {
            "domain": {"devices": {"interfaces": interfaces}},
            "networks": names.iter().map(|n| json!({"name": n,
                "multus": {"networkName": "default/net1"}})).collect::<Vec<_>>()}}}
    }))
    .expect("vm")
}

fn cfg(spec: serde_json::Value, status: serde_json::Value) -> VirtualMachineNetworkConfig {
    serde_json::from_value(json!({
        "metadata": {"name": "vm1", "namespace": "ns1", "uid": "cfg-uid", "resourceVersion": "3",
            "finalizers": [crate::controller::FINALIZER],
            "ownerReferences": [{"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine",
                "name": "vm1", "uid": "vm-uid"}]},
        "spec": {"vmName": "vm1", "networkConfigs": spec},
        "status": status
    }))
    .expect("vmnetcfg")
}

fn pools() -> TestPools {
    TestPools {
        held: BTreeMap::from([
            (
                ("net1".into(), mac("02:00:00:00:00:01")),
                Ipv4Addr::new(10, 0, 0, 10),
            ),
            (
                ("net1".into(), mac("02:00:00:00:00:02")),
                Ipv4Addr::new(10, 0, 0, 11),
            ),
        ]),
        live: LiveOwners::default(),
    }
}

fn workload(
    vm: Option<&VirtualMachine>,
    cfg: Option<&VirtualMachineNetworkConfig>,
    p: &TestPools,
) -> Plan {
    plan_workload(
        &WorkloadWorld {
            ns: "ns1",
            name: "vm1",
            vm,
            cfg,
        },
        p,
        NOW,
    )
}

#[test]
fn a_vmnetcfg_follows_hot_plugged_nics_and_leaves_out_absent_ones() {
    let p = pools();
    let one = vm(json!([
        {"name": "nic-1", "macAddress": "02:00:00:00:00:01"},
        {"name": "nic-2", "macAddress": "02:00:00:00:00:02", "state": "absent"}]));
    let plan = workload(Some(&one), None, &p);
    let [Write::CreateVmnetcfg(created)] = plan.writes.as_slice() else {
        panic!("{plan:#?}")
    };
    let entries = created.spec.network_configs.clone().expect("entries");
    assert_eq!(entries.len(), 1, "the absent NIC is left out: {entries:?}");
    assert_eq!(entries[0].ip_address.as_deref(), Some("10.0.0.10"));
    assert_eq!(
        created.metadata.owner_references.as_ref().expect("owner")[0].uid,
        "vm-uid"
    );

    // nic-2 hot-plugged: the vmnetcfg's spec gains it, guarded by its version.
    let two = vm(json!([
        {"name": "nic-1", "macAddress": "02:00:00:00:00:01"},
        {"name": "nic-2", "macAddress": "02:00:00:00:00:02"}]));
    let existing = cfg(
        json!([{"networkName": "default/net1", "macAddress": "02:00:00:00:00:01", "ipAddress": "10.0.0.10"}]),
        json!({}),
    );
    let plan = workload(Some(&two), Some(&existing), &p);
    let [
        Write::VmnetcfgSpec {
            configs,
            resource_version,
            ..
        },
    ] = plan.writes.as_slice()
    else {
        panic!("{plan:#?}")
    };
    assert_eq!(configs.len(), 2);
    assert_eq!(configs[1].ip_address.as_deref(), Some("10.0.0.11"));
    assert_eq!(resource_version.as_deref(), Some("3"));
}

#[test]
fn a_nic_removed_releases_its_address_unless_someone_still_holds_the_mac() {
    let mut p = pools();
    let one = vm(json!([{"name": "nic-1", "macAddress": "02:00:00:00:00:01"}]));
    // The spec lists nic-1 only; the status still shows nic-2's address.
    let c = cfg(
        json!([{"networkName": "default/net1", "macAddress": "02:00:00:00:00:01", "ipAddress": "10.0.0.10"}]),
        json!({"networkConfigs": [
            {"networkName": "default/net1", "macAddress": "02:00:00:00:00:01", "allocatedIPAddress": "10.0.0.10", "state": "Allocated"},
            {"networkName": "default/net1", "macAddress": "02:00:00:00:00:02", "allocatedIPAddress": "10.0.0.11", "state": "Allocated"}]}),
    );
    let released = |plan: &Plan| -> Vec<MacAddr> {
        plan.writes
            .iter()
            .filter_map(|w| match w {
                Write::Release { mac, .. } => Some(*mac),
                _ => None,
            })
            .collect()
    };
    let plan = workload(Some(&one), Some(&c), &p);
    assert_eq!(released(&plan), vec![mac("02:00:00:00:00:02")]);
    let status = plan
        .writes
        .iter()
        .find_map(|w| match w {
            Write::VmnetcfgStatus { patch, .. } => Some(patch),
            _ => None,
        })
        .expect("the status drops the entry");
    assert_eq!(status["networkConfigs"].as_array().map(Vec::len), Some(1));

    // Another VM took the MAC over: nothing released.
    p.live
        .insert("default/net1", mac("02:00:00:00:00:02"), "ns1/vm9".into());
    assert!(released(&workload(Some(&one), Some(&c), &p)).is_empty());
}

#[test]
fn a_deleted_vmnetcfg_releases_what_it_held_then_drops_its_finalizer() {
    let mut p = pools();
    let mut c = cfg(
        json!([{"networkName": "default/net1", "macAddress": "02:00:00:00:00:01", "ipAddress": "10.0.0.10"}]),
        json!({}),
    );
    c.metadata.deletion_timestamp =
        Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(now()));
    // Its own entries do not count as owners; the VM's NIC (still live) does.
    p.live
        .insert("default/net1", mac("02:00:00:00:00:01"), "ns1/vm1".into());
    let plan = workload(None, Some(&c), &p);
    let kinds: Vec<&str> = plan.writes.iter().map(Write::kind).collect();
    assert_eq!(kinds, ["release", "finalizers"], "{plan:#?}");
    let Write::Release { held, .. } = &plan.writes[0] else {
        unreachable!()
    };
    assert_eq!(*held, Some("10.0.0.10".parse().expect("ip")));
}

#[test]
fn a_vmnetcfg_whose_vm_is_gone_is_deleted_once_the_apiserver_agrees() {
    let c = cfg(json!([]), json!({}));
    let plan = workload(None, Some(&c), &pools());
    let [Write::DeleteVmnetcfg { uid, vm_uid, .. }] = plan.writes.as_slice() else {
        panic!("{plan:#?}")
    };
    assert_eq!(uid.as_deref(), Some("cfg-uid"));
    assert_eq!(vm_uid, "vm-uid", "the writer checks this VM is gone first");
}

#[test]
fn a_nad_with_the_opt_in_annotation_gets_a_pool_and_takes_it_away() {
    let mut n = nad();
    n.metadata.annotations = Some(BTreeMap::from([(
        crate::controller::AUTO_POOL_ANNOTATION.to_string(),
        r#"{"serverIP":"10.0.0.2","cidr":"10.0.0.0/24","pool":{"start":"10.0.0.10","end":"10.0.0.20"},"paused":true}"#.to_string(),
    )]));
    let plan = plan_nad("default", "net1", Some(&n), None, false);
    let [Write::CreatePool(p)] = plan.writes.as_slice() else {
        panic!("{plan:#?}")
    };
    assert_eq!(p.spec.network_name, "default/net1");
    assert_eq!(p.spec.paused, Some(true));
    // Some pool already serves the network: none is created.
    assert!(
        plan_nad("default", "net1", Some(&n), None, true)
            .writes
            .is_empty()
    );

    let mut auto = (**p).clone();
    auto.metadata.uid = Some("u".into());
    let plan = plan_nad("default", "net1", None, Some(&auto), false);
    assert!(matches!(plan.writes.as_slice(), [Write::DeletePool { .. }]));
    // A pool a user made is never deleted with the NAD.
    assert!(
        plan_nad("default", "net1", None, Some(&pool(json!({}))), false)
            .writes
            .is_empty()
    );

    n.metadata.annotations = Some(BTreeMap::from([(
        crate::controller::AUTO_POOL_ANNOTATION.to_string(),
        "{not json".to_string(),
    )]));
    let plan = plan_nad("default", "net1", Some(&n), None, false);
    assert!(plan.writes.is_empty());
    assert!(plan.warnings[0].contains(crate::controller::AUTO_POOL_ANNOTATION));
}
