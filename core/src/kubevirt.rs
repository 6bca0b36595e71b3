//! Read-only partial types for the objects we do not own: KubeVirt `VirtualMachine` and the
//! Multus `NetworkAttachmentDefinition`. Only the fields vm-dhcp reads are here; every field
//! defaults, so any real object deserializes. Never write these back with a full PUT (the
//! missing fields would be lost): use merge patches.

use kube::CustomResource;
use serde::{Deserialize, Serialize};

/// A KubeVirt VirtualMachine, reduced to its NICs and networks.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "kubevirt.io",
    version = "v1",
    kind = "VirtualMachine",
    plural = "virtualmachines",
    namespaced,
    schema = "disabled"
)]
#[serde(rename_all = "camelCase")]
pub struct VirtualMachineSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_strategy: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub running: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<VmiTemplate>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct VmiTemplate {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spec: Option<VmiSpec>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct VmiSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<Domain>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub networks: Vec<Network>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Domain {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub devices: Option<Devices>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Devices {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub interfaces: Vec<Interface>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Interface {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac_address: Option<String>,
    /// `""`, `up`, `down` or `absent` (hot-unplugged: treated as removed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Network {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub multus: Option<MultusNetwork>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<serde_json::Value>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct MultusNetwork {
    pub network_name: String,
}

impl VirtualMachine {
    /// The NICs on Multus networks in spec order, hot-unplugged (`state: absent`) ones left
    /// out: (index in the interface list, interface, network as `<namespace>/<name>`). A bare
    /// network name is a NAD in the VM's own namespace, as Multus reads it.
    pub fn multus_nics(&self) -> Vec<(usize, &Interface, String)> {
        let ns = self.metadata.namespace.as_deref().unwrap_or_default();
        let Some(spec) = self.spec.template.as_ref().and_then(|t| t.spec.as_ref()) else {
            return Vec::new();
        };
        let interfaces = spec
            .domain
            .as_ref()
            .and_then(|d| d.devices.as_ref())
            .map(|d| d.interfaces.as_slice())
            .unwrap_or_default();
        interfaces
            .iter()
            .enumerate()
            .filter(|(_, nic)| nic.state.as_deref() != Some("absent"))
            .filter_map(|(i, nic)| {
                let net = spec.networks.iter().find(|n| n.name == nic.name)?;
                let name = net.multus.as_ref()?.network_name.trim();
                let key = match name.rsplit_once('/') {
                    Some((nad_ns, nad)) => format!("{nad_ns}/{nad}"),
                    None => format!("{ns}/{name}"),
                };
                Some((i, nic, key))
            })
            .collect()
    }
}

/// A Multus NetworkAttachmentDefinition (a Harvester "VM network").
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "k8s.cni.cncf.io",
    version = "v1",
    kind = "NetworkAttachmentDefinition",
    plural = "network-attachment-definitions",
    namespaced,
    schema = "disabled"
)]
pub struct NetworkAttachmentDefinitionSpec {
    /// The CNI configuration as JSON text.
    #[serde(default)]
    pub config: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::Resource;

    #[test]
    fn nad_plural_is_the_multus_one() {
        assert_eq!(
            NetworkAttachmentDefinition::plural(&()),
            "network-attachment-definitions"
        );
    }

    #[test]
    fn a_realistic_vm_deserializes() {
        let vm: VirtualMachine = serde_json::from_value(serde_json::json!({
            "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine",
            "metadata": {"name": "vm1", "namespace": "default",
                "annotations": {"harvesterhci.io/mac-address": "{\"nic-1\":\"52:54:00:aa:bb:cc\"}"}},
            "spec": {"runStrategy": "RerunOnFailure", "template": {"metadata": {"labels": {"a": "b"}},
                "spec": {"domain": {"cpu": {"cores": 1}, "devices": {"disks": [], "interfaces": [
                    {"name": "default", "masquerade": {}, "model": "virtio"},
                    {"name": "nic-1", "bridge": {}, "model": "virtio"}]}},
                 "networks": [{"name": "default", "pod": {}},
                              {"name": "nic-1", "multus": {"networkName": "default/net-48"}}]}}}
        }))
        .expect("a real VM shape deserializes");
        let spec = vm
            .spec
            .template
            .and_then(|t| t.spec)
            .expect("template spec");
        assert_eq!(
            spec.networks[1]
                .multus
                .as_ref()
                .map(|m| m.network_name.as_str()),
            Some("default/net-48")
        );
        assert_eq!(
            spec.domain
                .and_then(|d| d.devices)
                .map(|d| d.interfaces.len()),
            Some(2)
        );
    }
}
