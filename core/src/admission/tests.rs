use serde_json::json;

use super::*;
use crate::crd::IPPool;

fn pool(spec: serde_json::Value) -> IPPool {
    serde_json::from_value(json!({
        "apiVersion": "network.harvesterhci.io/v1alpha1", "kind": "IPPool",
        "metadata": {"name": "net-48", "namespace": "default"},
        "spec": spec
    }))
    .expect("IPPool")
}

fn seed_spec() -> serde_json::Value {
    json!({"networkName": "default/net-48", "ipv4Config": {
        "serverIP": "192.168.48.77", "cidr": "192.168.48.0/24",
        "pool": {"start": "192.168.48.81", "end": "192.168.48.90", "exclude": ["192.168.48.81", "192.168.48.90"]},
        "router": "192.168.48.1", "dns": ["1.1.1.1"], "domainName": "aibao.moe",
        "domainSearch": ["aibao.moe"], "ntp": ["pool.ntp.org"], "leaseTime": 300}})
}

#[test]
fn defaults_fill_missing_and_empty_fields() {
    let raw = json!({"spec": {"ipv4Config": {"cidr": "10.0.0.0/24", "serverIP": "", "router": "10.0.0.1",
        "pool": {"exclude": ["10.0.0.2"]}}}});
    let got = ippool_defaults(&raw).expect("defaults");
    assert_eq!(
        got,
        vec![
            FieldDefault {
                path: "/spec/ipv4Config/pool/start",
                value: "10.0.0.1".into(),
                exists: false
            },
            FieldDefault {
                path: "/spec/ipv4Config/pool/end",
                value: "10.0.0.254".into(),
                exists: false
            },
            // The whole subnet is the range: the lowest unmasked address (not router, not excluded).
            FieldDefault {
                path: "/spec/ipv4Config/serverIP",
                value: "10.0.0.3".into(),
                exists: true
            },
        ]
    );
    // With a range given, the server goes outside it.
    let raw = json!({"spec": {"ipv4Config": {"cidr": "10.0.0.0/24", "router": "10.0.0.1",
        "pool": {"start": "10.0.0.100", "end": "10.0.0.200"}}}});
    let got = ippool_defaults(&raw).expect("defaults");
    assert_eq!(
        got,
        vec![FieldDefault {
            path: "/spec/ipv4Config/serverIP",
            value: "10.0.0.2".into(),
            exists: false
        }]
    );
    assert!(
        ippool_defaults(&seed_spec_obj())
            .expect("complete")
            .is_empty()
    );
}

#[test]
fn server_address_of_a_whole_internet_pool_is_found_without_walking_it() {
    // Defaults are computed before validation refuses the size: they must stay cheap.
    let raw = json!({"spec": {"ipv4Config": {"cidr": "0.0.0.0/0",
        "pool": {"exclude": ["0.0.0.1", "0.0.0.2"]}}}});
    let got = ippool_defaults(&raw).expect("defaults");
    let server = got
        .iter()
        .find(|d| d.path == "/spec/ipv4Config/serverIP")
        .map(|d| d.value.as_str());
    assert_eq!(server, Some("0.0.0.3"));
    // A range that leaves room above it only: the first free address after the end.
    let raw = json!({"spec": {"ipv4Config": {"cidr": "10.0.0.0/8", "router": "10.255.255.253",
        "pool": {"start": "10.0.0.1", "end": "10.255.255.252"}}}});
    let got = ippool_defaults(&raw).expect("defaults");
    assert_eq!(
        got,
        vec![FieldDefault {
            path: "/spec/ipv4Config/serverIP",
            value: "10.255.255.254".into(),
            exists: false
        }]
    );
}

fn seed_spec_obj() -> serde_json::Value {
    json!({"spec": seed_spec()})
}

#[test]
fn default_errors_are_clear() {
    for (raw, want) in [
        (
            json!({"spec": {"ipv4Config": {"cidr": "fd00::/64"}}}),
            "IPv6 is not supported yet",
        ),
        (
            json!({"spec": {"ipv4Config": {"cidr": "10.0.0.0/31"}}}),
            "too small",
        ),
        (
            json!({"spec": {"ipv4Config": {"cidr": "10.0.0.0/24", "pool": {"start": "x"}}}}),
            "ipv4Config.pool.start: \"x\" is not a valid IPv4 address",
        ),
    ] {
        let err = ippool_defaults(&raw).expect_err(want);
        assert!(err.contains(want), "{err}");
    }
}

#[test]
fn seed_pool_is_valid() {
    validate_ippool(&pool(seed_spec()), None, &PoolContext::default()).expect("seed pool is valid");
}

#[test]
fn every_ippool_rule_has_its_message() {
    let ctx = PoolContext::default();
    let with = |path: &str, value: serde_json::Value| {
        let mut spec = seed_spec();
        *spec.pointer_mut(path).expect(path) = value;
        pool(spec)
    };
    let cases = [
        (
            with("/networkName", json!("")),
            "spec.networkName must name a VM network",
        ),
        (
            with("/ipv4Config/cidr", json!("fd00::/64")),
            "IPv6 is not supported yet",
        ),
        (
            with("/ipv4Config/pool/start", json!("192.168.48.0")),
            "pool.start 192.168.48.0 is the network address",
        ),
        (
            with("/ipv4Config/pool/end", json!("192.168.48.255")),
            "pool.end 192.168.48.255 is the broadcast address",
        ),
        (
            with("/ipv4Config/pool/end", json!("192.168.48.80")),
            "pool end 192.168.48.80 is less than pool start",
        ),
        (
            with("/ipv4Config/serverIP", json!("")),
            "serverIP is required",
        ),
        (
            with("/ipv4Config/serverIP", json!("192.168.48.255")),
            "serverIP 192.168.48.255 is the broadcast address",
        ),
        (
            with("/ipv4Config/serverIP", json!("192.168.49.1")),
            "serverIP 192.168.49.1 is not within subnet",
        ),
        (
            with("/ipv4Config/router", json!("192.168.48.0")),
            "router 192.168.48.0 is the network address",
        ),
        (
            with("/ipv4Config/router", json!("192.168.48.77")),
            "is the same as the router",
        ),
        (
            with("/ipv4Config/pool/exclude", json!(["10.1.1.1"])),
            "exclude entry 10.1.1.1 is not within subnet",
        ),
        (
            with("/ipv4Config/pool/exclude", json!(["nope"])),
            "pool exclude entry \"nope\"",
        ),
        (
            with("/ipv4Config/dns", json!(["8.8.8.x"])),
            "dns entry \"8.8.8.x\" is not an IPv4 address",
        ),
        (
            with("/ipv4Config/ntp", json!(["bad_host!"])),
            "ntp entry \"bad_host!\" is neither",
        ),
        (
            with("/ipv4Config/domainName", json!("-bad.example")),
            "domain \"-bad.example\"",
        ),
        (
            with("/ipv4Config/domainSearch", json!(["ok.example", "a..b"])),
            "domain \"a..b\"",
        ),
        (
            with("/ipv4Config/leaseTime", json!(-5)),
            "leaseTime must not be negative",
        ),
    ];
    for (p, want) in cases {
        let err = validate_ippool(&p, None, &ctx).expect_err(want);
        assert!(err.contains(want), "got {err:?}, want {want:?}");
    }
    let mut no_cfg = seed_spec();
    no_cfg.as_object_mut().expect("obj").remove("ipv4Config");
    let err = validate_ippool(&pool(no_cfg), None, &ctx).expect_err("no cfg");
    assert_eq!(err, "spec.ipv4Config is required");
}

#[test]
fn a_sixteen_is_accepted_and_a_larger_range_is_refused() {
    let spec = json!({"networkName": "default/big", "ipv4Config": {"serverIP": "10.0.0.1", "cidr": "10.0.0.0/16",
        "pool": {"start": "10.0.0.2", "end": "10.0.255.254"}}});
    validate_ippool(&pool(spec), None, &PoolContext::default()).expect("a /16 pool");
    let spec = json!({"networkName": "default/big", "ipv4Config": {"serverIP": "10.0.0.1", "cidr": "10.0.0.0/15",
        "pool": {"start": "10.0.0.2", "end": "10.1.0.10"}}});
    let err = validate_ippool(&pool(spec), None, &PoolContext::default()).expect_err("too big");
    assert!(
        err.contains("spans 65545 addresses; one IPPool holds at most 65534 (a /16)"),
        "{err}"
    );
}

#[test]
fn one_pool_per_network_and_service_cidr() {
    let ctx = PoolContext {
        others: vec![("other/pool-x".into(), "default/net-48".into())],
        service_cidr: None,
    };
    let err = validate_ippool(&pool(seed_spec()), None, &ctx).expect_err("dup");
    assert!(
        err.contains("network default/net-48 already has IPPool other/pool-x"),
        "{err}"
    );
    // The pool itself is not a duplicate of itself (UPDATE).
    let ctx = PoolContext {
        others: vec![("default/net-48".into(), "default/net-48".into())],
        service_cidr: None,
    };
    validate_ippool(&pool(seed_spec()), Some(&pool(seed_spec())), &ctx).expect("self");
    let ctx = PoolContext {
        others: vec![],
        service_cidr: Some("192.168.0.0/16".parse().expect("net")),
    };
    let err = validate_ippool(&pool(seed_spec()), None, &ctx).expect_err("overlap");
    assert!(
        err.contains("overlaps the cluster service cidr 192.168.0.0/16"),
        "{err}"
    );
}

#[test]
fn update_refuses_a_server_ip_that_is_occupied() {
    let mut p = pool(seed_spec());
    p.status = Some(serde_json::from_value(json!({"ipv4": {"allocated": {"192.168.48.77": "aa:bb:cc:dd:ee:ff"}, "used": 1, "available": 7}})).expect("status"));
    let err = validate_ippool(&p, Some(&p.clone()), &PoolContext::default()).expect_err("occupied");
    assert!(
        err.contains("serverIP 192.168.48.77 is already occupied (aa:bb:cc:dd:ee:ff)"),
        "{err}"
    );
}

#[test]
fn delete_is_refused_while_addresses_are_allocated() {
    let mut p = pool(seed_spec());
    validate_ippool_delete(&p, None).expect("no status");
    p.status = Some(serde_json::from_value(json!({"ipv4": {
        "allocated": {"192.168.48.81": "EXCLUDED", "192.168.48.82": "aa:bb:cc:dd:ee:01", "192.168.48.83": "aa:bb:cc:dd:ee:02"},
        "owners": {"192.168.48.82": "default/vm1"}, "used": 2, "available": 6}})).expect("status"));
    let err = validate_ippool_delete(&p, None).expect_err("held");
    assert_eq!(
        err,
        "2 address(es) are still allocated: 192.168.48.82 (default/vm1), 192.168.48.83 (aa:bb:cc:dd:ee:02); delete those VMs or their VirtualMachineNetworkConfigs first"
    );
}

fn vmnetcfg(entries: serde_json::Value) -> VirtualMachineNetworkConfig {
    serde_json::from_value(json!({
        "apiVersion": "network.harvesterhci.io/v1alpha1", "kind": "VirtualMachineNetworkConfig",
        "metadata": {"name": "vm1", "namespace": "ns"},
        "spec": {"vmName": "vm1", "networkConfigs": entries}
    }))
    .expect("vmnetcfg")
}

#[test]
fn vmnetcfg_plans_and_rejections() {
    let managed = |n: &str| n == "default/net-48";
    let cfg = vmnetcfg(json!([
        {"networkName": "default/net-48", "macAddress": "AA-BB-CC-00-00-01"},
        {"networkName": "default/unmanaged", "macAddress": "aa:bb:cc:00:00:02"},
        {"networkName": "default/net-48", "macAddress": "aa:bb:cc:00:00:03", "ipAddress": "192.168.48.85"}
    ]));
    let plans = plan_vmnetcfg(&cfg, "ns", managed).expect("plans");
    assert_eq!(plans.len(), 2, "the unmanaged network is left alone");
    assert_eq!(plans[0].request.owner, "ns/vm1");
    assert_eq!(
        plans[0].request.mac,
        MacChoice::Given("aa:bb:cc:00:00:01".parse().expect("mac"))
    );
    assert_eq!(
        (plans[1].index, plans[1].request.want),
        (2, Some("192.168.48.85".parse().expect("ip")))
    );
    for (entries, want) in [
        (
            json!([{"networkName": "default/net-48", "macAddress": "zz"}]),
            "spec.networkConfigs[0].macAddress: invalid MAC address \"zz\"",
        ),
        (
            json!([{"networkName": "default/net-48", "macAddress": "aa:bb:cc:00:00:01"},
                {"networkName": "default/net-48", "macAddress": "AA:BB:CC:00:00:01"}]),
            "spec.networkConfigs[1].macAddress aa:bb:cc:00:00:01 is already used by spec.networkConfigs[0]",
        ),
        (
            json!([{"networkName": "default/net-48", "macAddress": "aa:bb:cc:00:00:01", "ipAddress": "1.2.3"}]),
            "spec.networkConfigs[0].ipAddress \"1.2.3\" is not an IPv4 address",
        ),
    ] {
        let err = plan_vmnetcfg(&vmnetcfg(entries), "ns", managed).expect_err(want);
        assert!(err.starts_with(want), "got {err:?}, want {want:?}");
    }
}

fn vm(
    annotations: serde_json::Value,
    interfaces: serde_json::Value,
    networks: serde_json::Value,
) -> VirtualMachine {
    serde_json::from_value(json!({
        "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine",
        "metadata": {"name": "vm1", "namespace": "ns", "annotations": annotations},
        "spec": {"template": {"spec": {"domain": {"devices": {"interfaces": interfaces}}, "networks": networks}}}
    }))
    .expect("vm")
}

#[test]
fn vm_plans_take_spec_then_annotation_then_generate() {
    let v = vm(
        json!({"harvesterhci.io/mac-address": "{\"nic-2\":\"52:54:00:00:00:02\"}",
               "static-ip.harvesterhci.io/nic-3": "192.168.48.88"}),
        json!([{"name": "default", "masquerade": {}},
               {"name": "nic-1", "bridge": {}, "macAddress": "52:54:00:00:00:01"},
               {"name": "nic-2", "bridge": {}},
               {"name": "nic-3", "bridge": {}},
               {"name": "nic-4", "bridge": {}, "state": "absent"},
               {"name": "nic-5", "bridge": {}}]),
        json!([{"name": "default", "pod": {}},
               {"name": "nic-1", "multus": {"networkName": "default/net-48"}},
               {"name": "nic-2", "multus": {"networkName": "default/net-48"}},
               {"name": "nic-3", "multus": {"networkName": "net-48"}},
               {"name": "nic-4", "multus": {"networkName": "default/net-48"}},
               {"name": "nic-5", "multus": {"networkName": "default/other"}}]),
    );
    // A bare network name is a NAD in the VM's namespace (Multus semantics).
    let plans = plan_vm(&v, |n| n == "default/net-48" || n == "ns/net-48").expect("plans");
    let names: Vec<&str> = plans.iter().map(|p| p.interface.as_str()).collect();
    assert_eq!(names, ["nic-1", "nic-2", "nic-3"]);
    assert_eq!(
        plans[0].request.mac,
        MacChoice::Given("52:54:00:00:00:01".parse().expect("mac"))
    );
    assert_eq!(
        plans[1].request.mac,
        MacChoice::Given("52:54:00:00:00:02".parse().expect("mac"))
    );
    assert_eq!(
        plans[2].request.mac,
        MacChoice::Generate {
            seed: mac_seed("ns", "vm1", "nic-3")
        }
    );
    assert_eq!(
        plans[2].request.want,
        Some("192.168.48.88".parse().expect("ip"))
    );
    assert_eq!(plans[2].network, "ns/net-48");
    assert!(plans.iter().all(|p| p.request.owner == "ns/vm1"));
}

#[test]
fn vm_plan_errors_name_the_field() {
    let v = vm(
        json!({}),
        json!([{"name": "nic-1", "macAddress": "nope"}]),
        json!([{"name": "nic-1", "multus": {"networkName": "default/net-48"}}]),
    );
    let err = plan_vm(&v, |_| true).expect_err("bad mac");
    assert!(
        err.starts_with("spec.template.spec.domain.devices.interfaces[0].macAddress: invalid MAC"),
        "{err}"
    );
    let v = vm(
        json!({"static-ip.harvesterhci.io/nic-1": "x"}),
        json!([{"name": "nic-1"}]),
        json!([{"name": "nic-1", "multus": {"networkName": "default/net-48"}}]),
    );
    let err = plan_vm(&v, |_| true).expect_err("bad static");
    assert_eq!(
        err,
        "annotation static-ip.harvesterhci.io/nic-1: \"x\" is not an IPv4 address"
    );
    let v = vm(
        json!({"harvesterhci.io/mac-address": "[1]"}),
        json!([]),
        json!([]),
    );
    assert!(
        plan_vm(&v, |_| true)
            .expect_err("bad annotation")
            .contains("harvesterhci.io/mac-address")
    );
}
