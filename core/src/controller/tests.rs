use super::*;
use crate::admission::{ALLOCATIONS_ANNOTATION, NicAllocation};
use crate::crd::NetworkConfigStatus;

fn mac(s: &str) -> MacAddr {
    s.parse().expect("mac")
}

fn ip(s: &str) -> Ipv4Addr {
    s.parse().expect("ip")
}

#[test]
fn names_stay_within_63_characters_and_differ_for_long_inputs() {
    let long_ns = "n".repeat(60);
    let a = lease_name(&long_ns, "pool-a");
    let b = lease_name(&long_ns, "pool-b");
    assert!(a.len() <= 63 && b.len() <= 63, "{a} {b}");
    assert_ne!(a, b);
    assert_eq!(lease_name("default", "net-48"), "vmdhcp-default-net-48");
    let p = agent_pod_name(&long_ns, "pool", "abcdef", 12);
    assert!(p.len() <= 63, "{p}");
    assert!(p.ends_with("-agent-abcdef-12"), "{p}");
    assert_eq!(
        agent_pod_name("default", "net-48", "abcdef", 0),
        "default-net-48-agent-abcdef-0"
    );
    assert_ne!(
        agent_pod_name("default", "net-48", "abcdef", 0),
        go_agent_pod_name("default", "net-48"),
        "ours never take the Go pod's name"
    );
}

#[test]
fn images_parse_as_upstream() {
    assert_eq!(
        parse_image("rancher/agent:v1").expect("ok"),
        ("rancher/agent".into(), "v1".into())
    );
    assert_eq!(
        parse_image("rancher/agent").expect("ok"),
        ("rancher/agent".into(), "latest".into())
    );
    assert_eq!(
        parse_image("reg:5000/agent").expect("ok"),
        ("reg:5000/agent".into(), "latest".into())
    );
    assert!(
        parse_image("agent:")
            .unwrap_err()
            .contains("colon without tag")
    );
    assert!(
        parse_image("a:1:2:3")
            .unwrap_err()
            .contains("multiple colons")
    );
}

#[test]
fn cluster_network_from_label_else_bridge() {
    let labels = BTreeMap::from([(CLUSTER_NETWORK_LABEL.to_string(), "cn2".to_string())]);
    assert_eq!(cluster_network(Some(&labels), "{}").as_deref(), Some("cn2"));
    assert_eq!(
        cluster_network(None, r#"{"type":"bridge","bridge":"mgmt-br"}"#).as_deref(),
        Some("mgmt")
    );
    assert_eq!(cluster_network(None, r#"{"type":"kube-ovn"}"#), None);
    assert_eq!(cluster_network(None, "not json"), None);
}

#[test]
fn conditions_keep_transition_time_when_status_is_unchanged() {
    let mut c = Vec::new();
    assert!(set_condition(
        &mut c,
        "AgentReady",
        false,
        "Error",
        "x",
        "t1"
    ));
    assert!(!set_condition(
        &mut c,
        "AgentReady",
        false,
        "Error",
        "x",
        "t2"
    ));
    assert!(set_condition(
        &mut c,
        "AgentReady",
        false,
        "Error",
        "y",
        "t3"
    ));
    assert_eq!(c[0].last_transition_time.as_deref(), Some("t1"));
    assert!(set_condition(&mut c, "AgentReady", true, "", "", "t4"));
    assert_eq!(c[0].last_transition_time.as_deref(), Some("t4"));
    assert_eq!(c[0].reason, None);
    assert!(condition_is(Some(&c), "AgentReady", "True"));
}

fn vm(json: serde_json::Value) -> VirtualMachine {
    serde_json::from_value(json).expect("vm")
}

fn sample_vm() -> VirtualMachine {
    let record = serde_json::to_string(&vec![NicAllocation {
        interface: "nic-2".into(),
        network: "default/net-a".into(),
        mac_address: "02:00:00:00:00:02".into(),
        ip_address: "10.0.0.12".into(),
    }])
    .expect("record");
    vm(serde_json::json!({
        "metadata": {"name": "vm1", "namespace": "ns1", "annotations": {
            "harvesterhci.io/mac-address": "{\"nic-1\":\"02:00:00:00:00:01\"}",
            ALLOCATIONS_ANNOTATION: record}},
        "spec": {"template": {"spec": {
            "domain": {"devices": {"interfaces": [
                {"name": "default", "masquerade": {}},
                {"name": "nic-2", "macAddress": "02:00:00:00:00:02"},
                {"name": "nic-1"},
                {"name": "nic-3", "macAddress": "02:00:00:00:00:03", "state": "absent"},
                {"name": "nic-4", "macAddress": "02:00:00:00:00:04"},
                {"name": "nic-5"}]}},
            "networks": [
                {"name": "default", "pod": {}},
                {"name": "nic-1", "multus": {"networkName": "net-b"}},
                {"name": "nic-2", "multus": {"networkName": "default/net-a"}},
                {"name": "nic-3", "multus": {"networkName": "default/net-a"}},
                {"name": "nic-4", "multus": {"networkName": "default/unmanaged"}},
                {"name": "nic-5", "multus": {"networkName": "default/net-a"}}]}}}
    }))
}

#[test]
fn desired_entries_follow_the_vm_in_order_with_the_webhook_address() {
    let managed = |n: &str| n == "default/net-a" || n == "ns1/net-b";
    let existing = vec![NetworkConfig {
        network_name: "ns1/net-b".into(),
        mac_address: "02:00:00:00:00:01".into(),
        ip_address: Some("10.1.0.5".into()),
    }];
    let got = desired_network_configs(&sample_vm(), managed, &existing, |_, _| None);
    assert_eq!(
        got,
        vec![
            NetworkConfig {
                network_name: "default/net-a".into(),
                mac_address: "02:00:00:00:00:02".into(),
                ip_address: Some("10.0.0.12".into()),
            },
            // Bare network name: the VM's namespace; MAC from Harvester's annotation;
            // the address the existing vmnetcfg carries is kept.
            NetworkConfig {
                network_name: "ns1/net-b".into(),
                mac_address: "02:00:00:00:00:01".into(),
                ip_address: Some("10.1.0.5".into()),
            },
        ],
        "absent nic-3, unmanaged nic-4 and MAC-less nic-5 are skipped"
    );
    let mut live = LiveOwners::default();
    live.add_vm(&sample_vm());
    assert_eq!(
        live.get("default/net-a", mac("02:00:00:00:00:02")),
        Some("ns1/vm1")
    );
    assert_eq!(
        live.get("default/net-a", mac("02:00:00:00:00:03")),
        None,
        "absent NIC"
    );
}

#[test]
fn same_network_configs_compares_macs_canonically() {
    let a = vec![NetworkConfig {
        network_name: "default/n".into(),
        mac_address: "AA-BB-CC-DD-EE-FF".into(),
        ip_address: None,
    }];
    let mut b = a.clone();
    b[0].mac_address = "aa:bb:cc:dd:ee:ff".into();
    assert!(same_network_configs(&a, &b));
    b[0].ip_address = Some("10.0.0.1".into());
    assert!(!same_network_configs(&a, &b));
}

#[test]
fn orphans_are_due_after_the_grace_period_and_forgotten_when_owned_again() {
    let mut clock = OrphanClock::default();
    let grace = Duration::from_secs(10);
    let o = (ip("10.0.0.2"), mac("02:00:00:00:00:02"));
    assert!(
        clock
            .observe("p", &[o], Duration::from_secs(0), grace)
            .is_empty()
    );
    assert_eq!(
        clock.next_due(Duration::from_secs(4), grace),
        Some(Duration::from_secs(6))
    );
    assert!(
        clock
            .observe("p", &[o], Duration::from_secs(9), grace)
            .is_empty()
    );
    // Owned again at 9.5 s: the clock starts over.
    assert!(
        clock
            .observe("p", &[], Duration::from_millis(9500), grace)
            .is_empty()
    );
    assert!(
        clock
            .observe("p", &[o], Duration::from_secs(12), grace)
            .is_empty()
    );
    assert_eq!(
        clock.observe("p", &[o], Duration::from_secs(22), grace),
        vec![o]
    );
    assert!(
        clock
            .observe("q", &[], Duration::from_secs(22), grace)
            .is_empty()
    );
    assert_eq!(
        clock.observe("p", &[o], Duration::from_secs(23), grace),
        vec![o],
        "another pool's observation does not reset this one"
    );
}

#[test]
fn ownership_adopts_ownerless_allocations() {
    let mut live = LiveOwners::default();
    live.insert(
        "default/net",
        mac("02:00:00:00:00:01"),
        "default/vm1".into(),
    );
    let h = Held {
        ip: ip("10.0.0.2"),
        mac: mac("02:00:00:00:00:01"),
        owner: None,
    };
    assert_eq!(
        ownership("default/net", &h, &live),
        Ownership::Owned {
            adopt: Some("default/vm1".into())
        }
    );
    let h2 = Held {
        owner: Some("default/vm1".into()),
        ..h.clone()
    };
    assert_eq!(
        ownership("default/net", &h2, &live),
        Ownership::Owned { adopt: None }
    );
    assert_eq!(ownership("other/net", &h, &live), Ownership::Orphan);
}

fn pod(name: &str, rev: &str) -> AgentPod {
    AgentPod {
        name: name.into(),
        ours: true,
        revision: Some(rev.into()),
        ready: true,
        terminating: false,
        node_lost_for: None,
        lease_holder: false,
    }
}

fn input(want: usize, pods: Vec<AgentPod>) -> AgentInput {
    AgentInput {
        pool_ns: "ns".into(),
        pool_name: "p".into(),
        want,
        revision: "r2".into(),
        pods,
        lost_grace: Duration::from_secs(30),
    }
}

#[test]
fn agents_are_created_up_to_want_with_free_names() {
    let plan = plan_agents(&input(2, vec![]));
    assert_eq!(plan.create, vec!["ns-p-agent-r2-0", "ns-p-agent-r2-1"]);
    let plan = plan_agents(&input(2, vec![pod("ns-p-agent-r2-0", "r2")]));
    assert_eq!(plan.create, vec!["ns-p-agent-r2-1"]);
    assert!(plan.delete.is_empty() && plan.force_delete.is_empty());
}

#[test]
fn a_pod_on_a_lost_node_is_force_deleted_after_the_grace_period_then_replaced() {
    let mut lost = pod("ns-p-agent-r2-0", "r2");
    lost.node_lost_for = Some(Duration::from_secs(5));
    let pods = vec![lost.clone(), pod("ns-p-agent-r2-1", "r2")];
    let plan = plan_agents(&input(2, pods.clone()));
    assert_eq!(
        plan,
        AgentPlan::default(),
        "within the grace period nothing happens"
    );
    let mut pods = pods;
    pods[0].node_lost_for = Some(Duration::from_secs(31));
    pods[0].terminating = true;
    let plan = plan_agents(&input(2, pods));
    assert_eq!(plan.force_delete, vec!["ns-p-agent-r2-0"]);
    assert_eq!(
        plan.create,
        vec!["ns-p-agent-r2-2"],
        "the lost pod's name is still taken until it is gone"
    );
}

#[test]
fn an_image_roll_deletes_old_pods_only_once_the_new_ones_are_ready() {
    let mut old = pod("ns-p-agent-r1-0", "r1");
    old.lease_holder = true;
    let plan = plan_agents(&input(1, vec![old.clone()]));
    assert_eq!(plan.create, vec!["ns-p-agent-r2-0"]);
    assert!(plan.delete.is_empty(), "surge: the old one stays");
    let mut new = pod("ns-p-agent-r2-0", "r2");
    new.ready = false;
    let plan = plan_agents(&input(1, vec![old.clone(), new.clone()]));
    assert_eq!(plan, AgentPlan::default(), "the new one is not ready yet");
    new.ready = true;
    let plan = plan_agents(&input(1, vec![old, new]));
    assert_eq!(plan.delete, vec!["ns-p-agent-r1-0"]);
    assert!(plan.create.is_empty());
}

#[test]
fn extra_agents_are_removed_keeping_the_lease_holder() {
    let mut holder = pod("ns-p-agent-r2-2", "r2");
    holder.lease_holder = true;
    let pods = vec![
        pod("ns-p-agent-r2-0", "r2"),
        pod("ns-p-agent-r2-1", "r2"),
        holder,
    ];
    let plan = plan_agents(&input(1, pods));
    assert_eq!(plan.delete.len(), 2);
    assert!(!plan.delete.contains(&"ns-p-agent-r2-2".to_string()));
}

#[test]
fn paused_removes_every_agent_and_the_go_agent_goes_once_ours_is_active() {
    let go = AgentPod {
        ours: false,
        revision: None,
        ..pod("ns-p-agent", "")
    };
    let plan = plan_agents(&input(0, vec![pod("ns-p-agent-r2-0", "r2"), go.clone()]));
    assert_eq!(plan.delete, vec!["ns-p-agent-r2-0"]);
    assert_eq!(plan.delete_go, vec!["ns-p-agent"]);
    let plan = plan_agents(&input(1, vec![pod("ns-p-agent-r2-0", "r2"), go.clone()]));
    assert!(
        plan.delete_go.is_empty(),
        "ours is not the Lease holder yet"
    );
    let mut active = pod("ns-p-agent-r2-0", "r2");
    active.lease_holder = true;
    let plan = plan_agents(&input(1, vec![active, go]));
    assert_eq!(plan.delete_go, vec!["ns-p-agent"]);
}

#[test]
fn a_go_agent_left_terminating_on_a_lost_node_is_force_deleted_too() {
    let mut go = AgentPod {
        ours: false,
        revision: None,
        ..pod("ns-p-agent", "")
    };
    go.terminating = true;
    go.node_lost_for = Some(Duration::from_secs(5));
    let plan = plan_agents(&input(1, vec![go.clone()]));
    assert!(
        plan.force_delete.is_empty(),
        "within the grace period nothing is forced"
    );
    go.node_lost_for = Some(Duration::from_secs(31));
    let plan = plan_agents(&input(1, vec![go.clone()]));
    assert_eq!(plan.force_delete, vec!["ns-p-agent"]);
    assert!(plan.delete_go.is_empty(), "forced, not deleted twice");
    // Not yet Terminating (its node lost before anyone deleted it): forced all the same, as
    // ours would be, without waiting for one of ours to be active.
    go.terminating = false;
    let plan = plan_agents(&input(1, vec![go]));
    assert_eq!(plan.force_delete, vec!["ns-p-agent"]);
    assert!(plan.delete_go.is_empty());
}

#[test]
fn stale_entries_are_status_entries_the_spec_no_longer_lists() {
    let spec = vec![NetworkConfig {
        network_name: "default/a".into(),
        mac_address: "02:00:00:00:00:01".into(),
        ip_address: None,
    }];
    let entry = |net: &str, m: &str, ip: &str| NetworkConfigStatus {
        allocated_ip_address: Some(ip.into()),
        mac_address: Some(m.into()),
        network_name: Some(net.into()),
        state: Some("Allocated".into()),
    };
    let status = vec![
        entry("default/a", "02:00:00:00:00:01", "10.0.0.2"),
        entry("default/a", "02:00:00:00:00:02", "10.0.0.3"),
        // Same MAC moved to another network: stale on the old one.
        entry("default/b", "02:00:00:00:00:01", "10.1.0.2"),
    ];
    assert_eq!(
        stale_entries(&spec, &status),
        vec![
            ("default/a".into(), mac("02:00:00:00:00:02"), ip("10.0.0.3")),
            ("default/b".into(), mac("02:00:00:00:00:01"), ip("10.1.0.2")),
        ]
    );
}

#[test]
fn a_release_waits_for_an_admission_in_flight_then_confirms_every_owner_the_store_names() {
    let now: k8s_openapi::jiff::Timestamp = "2026-01-01T00:00:10Z".parse().expect("time");
    let window = Duration::from_secs(12);
    let claim = |admitted_at, owner| Some(ClaimSeen { admitted_at, owner });
    // Touched 10 s ago, a 12 s window: 2 s more.
    assert_eq!(
        release_gate(
            claim(Some("2026-01-01T00:00:00Z"), Some("ns/vm")),
            None,
            now,
            window
        ),
        ReleaseGate::Wait(Duration::from_secs(2))
    );
    // Out of the window: the claim's owner, and the address object's when it differs.
    assert_eq!(
        release_gate(
            claim(Some("2025-12-31T00:00:00Z"), Some("ns/vm")),
            Some("ns/vm"),
            now,
            window
        ),
        ReleaseGate::Confirm(vec!["ns/vm".into()])
    );
    assert_eq!(
        release_gate(claim(None, Some("ns/a")), Some("ns/b"), now, window),
        ReleaseGate::Confirm(vec!["ns/a".into(), "ns/b".into()])
    );
    // Two address objects of the MAC (the claim's and the one a lagging cache saw): every
    // owner either names, once.
    assert_eq!(
        release_gate(
            claim(None, Some("ns/a")),
            ["ns/b", "ns/a", "ns/c"],
            now,
            window
        ),
        ReleaseGate::Confirm(vec!["ns/a".into(), "ns/b".into(), "ns/c".into()])
    );
    // No claim (gone, or a half-released allocation): the address object's owner still has
    // to be confirmed gone. An unreadable admission time does not hold a release forever.
    assert_eq!(
        release_gate(None, Some("ns/vm"), now, window),
        ReleaseGate::Confirm(vec!["ns/vm".into()])
    );
    assert_eq!(
        release_gate(claim(Some("yesterday"), None), None, now, window),
        ReleaseGate::Confirm(Vec::new())
    );
}
