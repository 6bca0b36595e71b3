//! One reading of a VirtualMachine's NICs, shared by admission and the controller so that
//! they can never disagree on which MAC a NIC has.
//!
//! A NIC on a Multus network (hot-unplugged ones and the pod network left out) declares its
//! MAC in `spec...interfaces[i].macAddress`, else Harvester's `harvesterhci.io/mac-address`
//! annotation names it (Harvester ≥ 1.6 keeps observed MACs only there during the first
//! run). The webhook records what it allocated in `dhcp.harvesterhci.io/allocations`.
//!
//! Admission reads strictly: an unreadable spec MAC or MAC annotation rejects the request
//! (see [`crate::admission::plan_vm`]). The controller reads what is stored, which it cannot
//! reject: it skips what it cannot read and falls back to the webhook's record
//! ([`NicReading::known_mac`]).

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use crate::admission::{ALLOCATIONS_ANNOTATION, NicAllocation, network_key};
use crate::kubevirt::VirtualMachine;
use crate::mac::{MAC_ANNOTATION, MacAddr, nic_mac, parse_mac_annotation};

/// The NICs of one VM as read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmNics {
    /// Whether Harvester's MAC annotation could be read (absent reads as `Ok`); when not,
    /// the NICs were read without it.
    pub mac_annotation: Result<(), String>,
    pub nics: Vec<NicReading>,
}

/// One NIC on a Multus network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NicReading {
    /// Index in `spec.template.spec.domain.devices.interfaces`.
    pub index: usize,
    pub interface: String,
    /// Network key `<namespace>/<name>` (a bare name means the VM's namespace).
    pub network: String,
    /// The MAC the VM declares: the spec's, else the annotation's entry; `Ok(None)` when
    /// neither knows it yet. `Err` names the field and why it cannot be read.
    pub declared: Result<Option<MacAddr>, String>,
    /// The webhook's record for this NIC (interface and network match).
    pub record: Option<NicAllocation>,
}

impl NicReading {
    /// The MAC as far as it is known: the declared one when readable, else the record's.
    pub fn known_mac(&self) -> Option<MacAddr> {
        self.declared
            .clone()
            .ok()
            .flatten()
            .or_else(|| self.record.as_ref()?.mac_address.parse().ok())
    }

    /// The address the webhook recorded, if it recorded it for [`Self::known_mac`].
    pub fn recorded_ip(&self) -> Option<Ipv4Addr> {
        let record = self.record.as_ref()?;
        let mac = self.known_mac()?;
        if record.mac_address.parse::<MacAddr>().ok() != Some(mac) {
            return None;
        }
        record.ip_address.parse().ok()
    }
}

/// Reads every NIC of `vm` on a Multus network, in spec order.
pub fn read(vm: &VirtualMachine) -> VmNics {
    let annotations = vm.metadata.annotations.as_ref();
    let (observed, mac_annotation): (Option<BTreeMap<String, MacAddr>>, _) =
        match annotations.and_then(|a| a.get(MAC_ANNOTATION)) {
            None => (None, Ok(())),
            Some(text) => match parse_mac_annotation(text) {
                Ok(map) => (Some(map), Ok(())),
                Err(e) => (None, Err(e.to_string())),
            },
        };
    let records: Vec<NicAllocation> = annotations
        .and_then(|a| a.get(ALLOCATIONS_ANNOTATION))
        .and_then(|a| serde_json::from_str(a).ok())
        .unwrap_or_default();
    let nics = vm
        .multus_nics()
        .into_iter()
        .map(|(index, nic, network)| {
            let declared = nic_mac(nic.mac_address.as_deref(), observed.as_ref(), &nic.name)
                .map_err(|e| {
                    format!("spec.template.spec.domain.devices.interfaces[{index}].macAddress: {e}")
                });
            let record = records
                .iter()
                .find(|r| r.interface == nic.name && network_key(&r.network) == network)
                .cloned();
            NicReading {
                index,
                interface: nic.name.clone(),
                network,
                declared,
                record,
            }
        })
        .collect();
    VmNics {
        mac_annotation,
        nics,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn vm(annotations: serde_json::Value, spec_mac: Option<&str>) -> VirtualMachine {
        let mut nic = json!({"name": "nic-1", "bridge": {}});
        if let Some(mac) = spec_mac {
            nic["macAddress"] = json!(mac);
        }
        serde_json::from_value(json!({
            "metadata": {"name": "vm", "namespace": "ns", "annotations": annotations},
            "spec": {"template": {"spec": {
                "domain": {"devices": {"interfaces": [
                    {"name": "default", "masquerade": {}}, nic,
                    {"name": "gone", "bridge": {}, "state": "absent"}]}},
                "networks": [
                    {"name": "default", "pod": {}},
                    {"name": "nic-1", "multus": {"networkName": "net-1"}},
                    {"name": "gone", "multus": {"networkName": "net-1"}}]}}}
        }))
        .expect("vm")
    }

    fn record(mac: &str, ip: &str) -> String {
        json!([{"interface": "nic-1", "network": "ns/net-1", "macAddress": mac, "ipAddress": ip}])
            .to_string()
    }

    #[test]
    fn spec_then_annotation_then_record() {
        let spec = read(&vm(json!({}), Some("02:00:00:00:00:01")));
        assert_eq!(
            spec.nics.len(),
            1,
            "the pod network and an absent NIC are left out"
        );
        let nic = &spec.nics[0];
        assert_eq!((nic.index, nic.network.as_str()), (1, "ns/net-1"));
        assert_eq!(nic.known_mac(), "02:00:00:00:00:01".parse().ok());

        let annotated = read(&vm(
            json!({MAC_ANNOTATION: r#"{"nic-1":"02:00:00:00:00:02"}"#}),
            None,
        ));
        assert_eq!(
            annotated.nics[0].declared,
            Ok("02:00:00:00:00:02".parse().ok())
        );

        let recorded = read(&vm(
            json!({ALLOCATIONS_ANNOTATION: record("02:00:00:00:00:03", "10.0.0.3")}),
            None,
        ));
        assert_eq!(recorded.nics[0].declared, Ok(None));
        assert_eq!(
            recorded.nics[0].known_mac(),
            "02:00:00:00:00:03".parse().ok()
        );
        assert_eq!(recorded.nics[0].recorded_ip(), "10.0.0.3".parse().ok());
    }

    #[test]
    fn a_record_for_another_mac_gives_no_address() {
        let read = read(&vm(
            json!({ALLOCATIONS_ANNOTATION: record("02:00:00:00:00:03", "10.0.0.3")}),
            Some("02:00:00:00:00:04"),
        ));
        assert_eq!(read.nics[0].known_mac(), "02:00:00:00:00:04".parse().ok());
        assert_eq!(read.nics[0].recorded_ip(), None);
    }

    #[test]
    fn a_malformed_mac_annotation_is_reported_and_read_around() {
        let read = read(&vm(
            json!({
                MAC_ANNOTATION: r#"{"nic-1":"not-a-mac"}"#,
                ALLOCATIONS_ANNOTATION: record("02:00:00:00:00:03", "10.0.0.3"),
            }),
            None,
        ));
        let err = read.mac_annotation.expect_err("malformed annotation");
        assert!(err.contains("not-a-mac"), "{err}");
        // Read without the annotation: nothing declared, the record still known.
        assert_eq!(read.nics[0].declared, Ok(None));
        assert_eq!(read.nics[0].known_mac(), "02:00:00:00:00:03".parse().ok());
    }

    #[test]
    fn a_malformed_spec_mac_names_its_field_and_falls_back_to_the_record() {
        let read = read(&vm(
            json!({ALLOCATIONS_ANNOTATION: record("02:00:00:00:00:03", "10.0.0.3")}),
            Some("zz:zz"),
        ));
        let err = read.nics[0].declared.clone().expect_err("malformed");
        assert!(
            err.starts_with("spec.template.spec.domain.devices.interfaces[1].macAddress"),
            "{err}"
        );
        assert_eq!(read.nics[0].known_mac(), "02:00:00:00:00:03".parse().ok());
    }

    #[test]
    fn admission_rejects_what_the_controller_reads_around() {
        let vm = vm(
            json!({
                MAC_ANNOTATION: r#"{"nic-1":"not-a-mac"}"#,
                ALLOCATIONS_ANNOTATION: record("02:00:00:00:00:03", "10.0.0.3"),
            }),
            None,
        );
        let err = crate::admission::plan_vm(&vm, |_| true).expect_err("admission rejects");
        assert!(
            err.contains(MAC_ANNOTATION) && err.contains("not-a-mac"),
            "{err}"
        );
        let nics = crate::controller::vm_nics(&vm);
        assert_eq!(nics.len(), 1);
        assert_eq!(nics[0].mac, "02:00:00:00:00:03".parse().ok());
        assert_eq!(nics[0].ip, "10.0.0.3".parse().ok());

        let bad_spec = self::vm(json!({}), Some("zz:zz"));
        let err = crate::admission::plan_vm(&bad_spec, |_| true).expect_err("bad spec MAC");
        assert!(err.contains("interfaces[1].macAddress"), "{err}");
        // Not on a managed network: admission does not read it.
        assert_eq!(
            crate::admission::plan_vm(&bad_spec, |_| false),
            Ok(Vec::new())
        );
        assert_eq!(crate::controller::vm_nics(&bad_spec)[0].mac, None);
    }
}
