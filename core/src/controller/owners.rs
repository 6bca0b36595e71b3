//! Who may hold an address, indexed by network, kept up to date from watch events: a pool's
//! reconcile reads the owners of its own network only, never every VM and vmnetcfg of the
//! cluster.
//!
//! Fed one object at a time (`apply_*` on add or change, `remove` on delete). A watch that
//! lists again (after a gap, deletions may have been missed) brackets its objects with
//! [`OwnerIndex::relist_begin`] and [`OwnerIndex::relist_done`]: what the list did not
//! carry is dropped.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use super::LiveOwners;
use crate::admission::network_key;
use crate::crd::VirtualMachineNetworkConfig;
use crate::kubevirt::VirtualMachine;
use crate::mac::MacAddr;

/// Which object a claim comes from. vmnetcfgs sort first: their entries win over a VM's NIC
/// when both name a MAC (as they were inserted first before).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Source {
    Cfg { namespace: String, name: String },
    Vm { namespace: String, name: String },
}

/// The kind of a [`Source`]: the VM and vmnetcfg watches relist independently, and may do
/// so at the same time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Cfg,
    Vm,
}

impl Kind {
    /// The source of this kind named `namespace/name`.
    pub fn source(self, namespace: String, name: String) -> Source {
        match self {
            Kind::Cfg => Source::Cfg { namespace, name },
            Kind::Vm => Source::Vm { namespace, name },
        }
    }
}

impl Source {
    fn kind(&self) -> Kind {
        match self {
            Source::Cfg { .. } => Kind::Cfg,
            Source::Vm { .. } => Kind::Vm,
        }
    }
}

/// (network key, MAC, owner `<namespace>/<vm>`).
type Claim = (String, MacAddr, String);

#[derive(Debug, Default)]
pub struct OwnerIndex {
    by_source: HashMap<Source, Vec<Claim>>,
    by_network: HashMap<String, HashMap<MacAddr, BTreeMap<Source, String>>>,
    /// Every source applied and not removed, claims or not (what a relist is compared to).
    known: HashSet<Source>,
    /// Sources seen since `relist_begin`, per kind being relisted.
    relisting: HashMap<Kind, HashSet<Source>>,
}

impl OwnerIndex {
    /// A vmnetcfg added or changed (one being deleted claims nothing). Returns the networks
    /// whose owners changed (none when only its status did).
    pub fn apply_cfg(&mut self, cfg: &VirtualMachineNetworkConfig) -> BTreeSet<String> {
        let namespace = cfg.metadata.namespace.clone().unwrap_or_default();
        let source = Source::Cfg {
            namespace: namespace.clone(),
            name: cfg.metadata.name.clone().unwrap_or_default(),
        };
        let mut claims = Vec::new();
        if cfg.metadata.deletion_timestamp.is_none() {
            let owner = format!("{namespace}/{}", cfg.spec.vm_name);
            for e in cfg.spec.network_configs.iter().flatten() {
                if let Ok(mac) = e.mac_address.parse::<MacAddr>() {
                    claims.push((network_key(&e.network_name), mac, owner.clone()));
                }
            }
        }
        self.set(source, claims)
    }

    /// A VM added or changed: every NIC on a known MAC (one being deleted claims nothing).
    /// Returns the networks whose owners changed.
    pub fn apply_vm(&mut self, vm: &VirtualMachine) -> BTreeSet<String> {
        let namespace = vm.metadata.namespace.clone().unwrap_or_default();
        let name = vm.metadata.name.clone().unwrap_or_default();
        let mut claims = Vec::new();
        if vm.metadata.deletion_timestamp.is_none() {
            let mut live = LiveOwners::default();
            live.add_vm(vm);
            claims = live.into_claims();
        }
        self.set(Source::Vm { namespace, name }, claims)
    }

    /// Returns the networks whose owners changed.
    pub fn remove(&mut self, source: &Source) -> BTreeSet<String> {
        let changed = self.set(source.clone(), Vec::new());
        self.known.remove(source);
        changed
    }

    /// A relist of one kind starts.
    pub fn relist_begin(&mut self, kind: Kind) {
        self.relisting.insert(kind, HashSet::new());
    }

    /// The relist of `kind` is complete: sources of that kind it did not carry were deleted
    /// during the gap, with no event; they are dropped. Returns them (their workloads need a
    /// reconcile: a VM gone takes its vmnetcfg and addresses with it) and the networks whose
    /// owners changed.
    pub fn relist_done(&mut self, kind: Kind) -> (Vec<Source>, BTreeSet<String>) {
        let mut changed = BTreeSet::new();
        let Some(seen) = self.relisting.remove(&kind) else {
            return (Vec::new(), changed);
        };
        let stale: Vec<Source> = self
            .known
            .iter()
            .filter(|s| s.kind() == kind && !seen.contains(*s))
            .cloned()
            .collect();
        for s in &stale {
            changed.extend(self.remove(s));
        }
        (stale, changed)
    }

    /// Replaces what `source` claims; returns the networks of the claims that changed.
    fn set(&mut self, source: Source, claims: Vec<Claim>) -> BTreeSet<String> {
        if let Some(seen) = self.relisting.get_mut(&source.kind()) {
            seen.insert(source.clone());
        }
        self.known.insert(source.clone());
        let old = self
            .by_source
            .get(&source)
            .map(Vec::as_slice)
            .unwrap_or_default();
        if old == claims.as_slice() {
            return BTreeSet::new();
        }
        let changed: BTreeSet<String> = old
            .iter()
            .chain(&claims)
            .map(|(network, _, _)| network.clone())
            .collect();
        if let Some(old) = self.by_source.remove(&source) {
            for (network, mac, _) in old {
                if let Some(macs) = self.by_network.get_mut(&network) {
                    if let Some(sources) = macs.get_mut(&mac) {
                        sources.remove(&source);
                        if sources.is_empty() {
                            macs.remove(&mac);
                        }
                    }
                    if macs.is_empty() {
                        self.by_network.remove(&network);
                    }
                }
            }
        }
        if claims.is_empty() {
            return changed;
        }
        for (network, mac, owner) in &claims {
            self.by_network
                .entry(network.clone())
                .or_default()
                .entry(*mac)
                .or_default()
                .insert(source.clone(), owner.clone());
        }
        self.by_source.insert(source, claims);
        changed
    }

    /// The owners on one network, leaving out vmnetcfg `skip` (`(namespace, name)`: one
    /// being reconciled away).
    pub fn live(&self, network: &str, skip: Option<(&str, &str)>) -> LiveOwners {
        let mut live = LiveOwners::default();
        let network = network_key(network);
        let Some(macs) = self.by_network.get(&network) else {
            return live;
        };
        for (mac, sources) in macs {
            let owner = sources.iter().find(|(s, _)| match (s, skip) {
                (Source::Cfg { namespace, name }, Some((ns, n))) => !(namespace == ns && name == n),
                _ => true,
            });
            if let Some((_, owner)) = owner {
                live.insert(&network, *mac, owner.clone());
            }
        }
        live
    }

    /// How many objects claim anything (for metrics and tests).
    pub fn sources(&self) -> usize {
        self.by_source.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn cfg(name: &str, entries: &[(&str, &str)]) -> VirtualMachineNetworkConfig {
        let configs: Vec<_> = entries
            .iter()
            .map(|(net, mac)| json!({"networkName": net, "macAddress": mac}))
            .collect();
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "ns"},
            "spec": {"vmName": name, "networkConfigs": configs}
        }))
        .expect("cfg")
    }

    fn vm(name: &str, nics: &[(&str, &str, &str)]) -> VirtualMachine {
        let interfaces: Vec<_> = nics
            .iter()
            .map(|(nic, _, mac)| json!({"name": nic, "bridge": {}, "macAddress": mac}))
            .collect();
        let networks: Vec<_> = nics
            .iter()
            .map(|(nic, net, _)| json!({"name": nic, "multus": {"networkName": net}}))
            .collect();
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "ns"},
            "spec": {"template": {"spec": {
                "domain": {"devices": {"interfaces": interfaces}}, "networks": networks}}}
        }))
        .expect("vm")
    }

    fn mac(text: &str) -> MacAddr {
        text.parse().expect("mac")
    }

    #[test]
    fn owners_are_read_per_network_and_follow_changes_and_deletes() {
        let mut idx = OwnerIndex::default();
        idx.apply_vm(&vm("a", &[("n1", "ns/net-1", "02:00:00:00:00:01")]));
        idx.apply_vm(&vm("b", &[("n1", "ns/net-2", "02:00:00:00:00:02")]));
        let one = idx.live("ns/net-1", None);
        assert_eq!(one.get("ns/net-1", mac("02:00:00:00:00:01")), Some("ns/a"));
        assert_eq!(one.len(), 1, "only its own network");
        // The same claims again (a status or label change): nothing to wake.
        assert!(
            idx.apply_vm(&vm("b", &[("n1", "ns/net-2", "02:00:00:00:00:02")]))
                .is_empty()
        );
        // A NIC moved to another network: both networks' owners changed.
        let moved = idx.apply_vm(&vm("b", &[("n1", "ns/net-3", "02:00:00:00:00:02")]));
        assert_eq!(
            moved,
            BTreeSet::from(["ns/net-2".to_string(), "ns/net-3".to_string()])
        );
        idx.apply_vm(&vm("b", &[("n1", "ns/net-2", "02:00:00:00:00:02")]));
        // A hot-unplugged NIC: the VM no longer claims the MAC.
        assert_eq!(
            idx.apply_vm(&vm("a", &[])),
            BTreeSet::from(["ns/net-1".to_string()])
        );
        assert!(idx.live("ns/net-1", None).is_empty());
        idx.remove(&Source::Vm {
            namespace: "ns".into(),
            name: "b".into(),
        });
        assert!(idx.live("ns/net-2", None).is_empty());
        assert_eq!(idx.sources(), 0);
    }

    #[test]
    fn a_vmnetcfg_being_reconciled_away_can_be_left_out_while_its_vm_still_counts() {
        let mut idx = OwnerIndex::default();
        idx.apply_cfg(&cfg("a", &[("ns/net-1", "02:00:00:00:00:01")]));
        assert_eq!(idx.live("net-1", Some(("ns", "a"))).len(), 0);
        idx.apply_vm(&vm("a", &[("n1", "ns/net-1", "02:00:00:00:00:01")]));
        let live = idx.live("ns/net-1", Some(("ns", "a")));
        assert_eq!(live.get("ns/net-1", mac("02:00:00:00:00:01")), Some("ns/a"));
    }

    #[test]
    fn a_relist_drops_what_was_deleted_during_a_watch_gap() {
        let mut idx = OwnerIndex::default();
        idx.apply_cfg(&cfg("a", &[("ns/net-1", "02:00:00:00:00:01")]));
        idx.apply_cfg(&cfg("b", &[("ns/net-1", "02:00:00:00:00:02")]));
        idx.apply_vm(&vm("c", &[("n1", "ns/net-1", "02:00:00:00:00:03")]));
        idx.apply_vm(&vm("d", &[("n1", "ns/net-1", "02:00:00:00:00:04")]));
        // Both watches relist at once (as at start), their events interleaved.
        idx.relist_begin(Kind::Cfg);
        idx.relist_begin(Kind::Vm);
        idx.apply_cfg(&cfg("b", &[("ns/net-1", "02:00:00:00:00:02")]));
        idx.apply_vm(&vm("d", &[("n1", "ns/net-1", "02:00:00:00:00:04")]));
        let (gone, changed) = idx.relist_done(Kind::Cfg);
        assert_eq!(
            gone,
            vec![Source::Cfg {
                namespace: "ns".into(),
                name: "a".into()
            }]
        );
        assert_eq!(changed, BTreeSet::from(["ns/net-1".to_string()]));
        let live = idx.live("ns/net-1", None);
        assert_eq!(live.get("ns/net-1", mac("02:00:00:00:00:01")), None);
        assert_eq!(live.get("ns/net-1", mac("02:00:00:00:00:02")), Some("ns/b"));
        // The VM relist is not done yet: nothing of that kind is dropped by the other's end.
        assert_eq!(live.get("ns/net-1", mac("02:00:00:00:00:03")), Some("ns/c"));
        // A VM without NICs is known too: its deletion during the gap is found.
        idx.apply_vm(&vm("e", &[]));
        idx.relist_begin(Kind::Vm);
        idx.apply_vm(&vm("d", &[("n1", "ns/net-1", "02:00:00:00:00:04")]));
        let (gone, _) = idx.relist_done(Kind::Vm);
        let names: BTreeSet<String> = gone
            .iter()
            .map(|s| match s {
                Source::Vm { name, .. } | Source::Cfg { name, .. } => name.clone(),
            })
            .collect();
        assert_eq!(names, BTreeSet::from(["c".to_string(), "e".to_string()]));
        let live = idx.live("ns/net-1", None);
        assert_eq!(live.get("ns/net-1", mac("02:00:00:00:00:03")), None);
        assert_eq!(live.get("ns/net-1", mac("02:00:00:00:00:04")), Some("ns/d"));
        assert_eq!(live.get("ns/net-1", mac("02:00:00:00:00:02")), Some("ns/b"));
    }
}
