//! Objects as the Go version writes them, and the seed README's samples, survive a
//! deserialize → serialize round trip without losing a field.

use serde::Serialize;
use serde::de::DeserializeOwned;
use vm_dhcp_core::crd::{IPPool, VirtualMachineNetworkConfig};

fn roundtrip<T: DeserializeOwned + Serialize>(value: serde_json::Value) {
    let typed: T = serde_json::from_value(value.clone()).expect("deserializes");
    let back = serde_json::to_value(&typed).expect("serializes");
    assert_eq!(back, value, "a field was lost or changed in the round trip");
}

fn yaml(text: &str) -> serde_json::Value {
    serde_yaml::from_str(text).expect("fixture is YAML")
}

#[test]
fn go_written_ippool_roundtrips() {
    roundtrip::<IPPool>(
        serde_json::from_str(include_str!("fixtures/go-ippool.json")).expect("json"),
    );
}

#[test]
fn go_written_vmnetcfg_roundtrips() {
    roundtrip::<VirtualMachineNetworkConfig>(
        serde_json::from_str(include_str!("fixtures/go-vmnetcfg.json")).expect("json"),
    );
}

#[test]
fn seed_samples_roundtrip() {
    roundtrip::<IPPool>(yaml(include_str!("fixtures/seed-ippool.yaml")));
    roundtrip::<VirtualMachineNetworkConfig>(yaml(include_str!("fixtures/seed-vmnetcfg.yaml")));
}

#[test]
fn singular_network_config_is_not_a_field() {
    // The seed README's vmnetcfg says `networkConfig`; the CRD has no such field, so the
    // apiserver prunes it. We read it the same way: it is ignored, never mistaken for data.
    let cfg: VirtualMachineNetworkConfig = serde_json::from_value(serde_json::json!({
        "apiVersion": "network.harvesterhci.io/v1alpha1", "kind": "VirtualMachineNetworkConfig",
        "metadata": {"name": "test-vm", "namespace": "default"},
        "spec": {"vmName": "test-vm", "networkConfig": [
            {"macAddress": "fa:cf:8e:50:82:fc", "networkName": "default/net-48"}]}
    }))
    .expect("deserializes");
    assert_eq!(cfg.spec.network_configs, None);
}
