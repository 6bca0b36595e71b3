//! A VM and its vmnetcfg (same namespace and name): the vmnetcfg follows the VM (created,
//! updated, deleted by us; the garbage collector is never relied upon), its finalizer
//! releases what it held, entries dropped from its spec are released, and its status shows
//! what the pools hold for it.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::Arc;

use anyhow::{Context, Result};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::{Resource, ResourceExt};
use vm_dhcp_core::admission::network_key;
use vm_dhcp_core::controller::{self as decide, set_condition};
use vm_dhcp_core::crd::{
    NetworkConfigStatus, VirtualMachineNetworkConfig, VirtualMachineNetworkConfigSpec,
};
use vm_dhcp_core::kubevirt::VirtualMachine;
use vm_dhcp_core::mac::MacAddr;

use super::pool::{release, set_finalizers};
use super::{Ctx, get, is_conflict, is_not_found, now_text};

/// The (network, MAC, address) entries a vmnetcfg's status and spec mention.
fn all_entries(cfg: &VirtualMachineNetworkConfig) -> BTreeMap<String, Vec<(MacAddr, Ipv4Addr)>> {
    let mut out: BTreeMap<String, Vec<(MacAddr, Ipv4Addr)>> = BTreeMap::new();
    for s in cfg
        .status
        .iter()
        .flat_map(|s| s.network_configs.iter().flatten())
    {
        if let (Some(n), Some(m), Some(ip)) = (
            s.network_name.as_deref(),
            s.mac_address.as_deref().and_then(|m| m.parse().ok()),
            s.allocated_ip_address
                .as_deref()
                .and_then(|i| i.parse().ok()),
        ) {
            out.entry(network_key(n)).or_default().push((m, ip));
        }
    }
    for e in cfg.spec.network_configs.iter().flatten() {
        if let (Ok(m), Some(ip)) = (
            e.mac_address.parse(),
            e.ip_address.as_deref().and_then(|i| i.parse().ok()),
        ) {
            out.entry(network_key(&e.network_name))
                .or_default()
                .push((m, ip));
        }
    }
    out
}

fn owned_by_vm(cfg: &VirtualMachineNetworkConfig) -> Option<String> {
    cfg.owner_references()
        .iter()
        .find(|o| o.kind == "VirtualMachine" && o.api_version.starts_with("kubevirt.io/"))
        .map(|o| o.uid.clone())
}

pub(super) async fn reconcile(ctx: &Arc<Ctx>, ns: &str, name: &str) -> Result<()> {
    let vm = get(&ctx.stores.vms, ns, name).filter(|v| v.meta().deletion_timestamp.is_none());
    let cfg = get(&ctx.stores.cfgs, ns, name);
    let cfgs: Api<VirtualMachineNetworkConfig> = Api::namespaced(ctx.client.clone(), ns);

    if let Some(cfg) = cfg
        .as_ref()
        .filter(|c| c.meta().deletion_timestamp.is_some())
    {
        let ours = cfg
            .finalizers()
            .iter()
            .any(|f| f == decide::FINALIZER || f.starts_with(decide::GO_FINALIZER_PREFIX));
        if ours {
            for (network, entries) in all_entries(cfg) {
                release(
                    ctx,
                    &network,
                    &entries,
                    Some((ns, name)),
                    &format!("vmnetcfg {ns}/{name} deleted"),
                )
                .await?;
            }
            set_finalizers(&cfgs, &**cfg, true).await?;
        }
        return Ok(());
    }

    let managed = |n: &str| ctx.pool_for_network(n).is_some();
    match (&vm, &cfg) {
        (Some(vm), _) => {
            let existing = cfg
                .as_ref()
                .and_then(|c| c.spec.network_configs.clone())
                .unwrap_or_default();
            let desired = decide::desired_network_configs(vm, managed, &existing, |net, mac| {
                ctx.pool_for_network(net).and_then(|p| ctx.held_ip(&p, mac))
            });
            match &cfg {
                None if desired.is_empty() => return Ok(()),
                None => {
                    let mut obj = VirtualMachineNetworkConfig::new(
                        name,
                        VirtualMachineNetworkConfigSpec {
                            vm_name: name.to_string(),
                            network_configs: Some(desired),
                            paused: None,
                        },
                    );
                    obj.metadata.namespace = Some(ns.to_string());
                    obj.metadata.labels = Some(BTreeMap::from([(
                        decide::VM_NAME_LABEL.to_string(),
                        name.to_string(),
                    )]));
                    obj.metadata.finalizers = Some(vec![decide::FINALIZER.to_string()]);
                    obj.metadata.owner_references = Some(vec![
                        serde_json::from_value(serde_json::json!({
                            "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine",
                            "name": name, "uid": vm.uid().unwrap_or_default()}))
                        .context("owner reference")?,
                    ]);
                    match cfgs.create(&PostParams::default(), &obj).await {
                        Ok(_) => {
                            tracing::info!(vmnetcfg = %format!("{ns}/{name}"), "vmnetcfg created for its VM")
                        }
                        Err(e) if is_conflict(&e) => {}
                        Err(e) => {
                            return Err(e)
                                .with_context(|| format!("creating vmnetcfg {ns}/{name}"));
                        }
                    }
                    return Ok(());
                }
                Some(c) if !decide::same_network_configs(&existing, &desired) => {
                    // Only a vmnetcfg that follows this VM is rewritten (a user's own is not).
                    if owned_by_vm(c).is_some_and(|uid| Some(uid) != vm.uid()) {
                        return Ok(());
                    }
                    let patch = serde_json::json!({
                        "metadata": {"resourceVersion": c.resource_version()},
                        "spec": {"networkConfigs": desired}});
                    match cfgs
                        .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
                        .await
                    {
                        Ok(_) => {
                            tracing::info!(vmnetcfg = %format!("{ns}/{name}"), "vmnetcfg updated from its VM")
                        }
                        Err(e) if is_conflict(&e) => {}
                        Err(e) => {
                            return Err(e)
                                .with_context(|| format!("updating vmnetcfg {ns}/{name}"));
                        }
                    }
                    return Ok(()); // the update comes back as an event
                }
                Some(_) => {}
            }
        }
        (None, Some(c)) => {
            if let Some(uid) = owned_by_vm(c) {
                // The VM is gone (or is another VM now): its vmnetcfg goes, by us.
                let current = get(&ctx.stores.vms, ns, name).and_then(|v| v.uid());
                if current.is_none_or(|u| u != uid) || vm.is_none() {
                    // The VMs' watch may lag the vmnetcfgs' (after an outage each backs off
                    // on its own; a new leader's caches are its own): the VM is read from
                    // the apiserver before its vmnetcfg goes.
                    let vms: Api<VirtualMachine> = Api::namespaced(ctx.client.clone(), ns);
                    let live = vms
                        .get_opt(name)
                        .await
                        .with_context(|| format!("reading VM {ns}/{name}"))?
                        .filter(|v| v.meta().deletion_timestamp.is_none());
                    if live.is_some_and(|v| v.uid().as_deref() == Some(uid.as_str())) {
                        return Ok(()); // its watch event reconciles it again
                    }
                    let dp = DeleteParams {
                        preconditions: Some(kube::api::Preconditions {
                            uid: c.uid(),
                            resource_version: None,
                        }),
                        ..DeleteParams::default()
                    };
                    match cfgs.delete(name, &dp).await {
                        Ok(_) => {
                            tracing::info!(vmnetcfg = %format!("{ns}/{name}"), "VM gone: vmnetcfg deleted")
                        }
                        Err(e) if is_not_found(&e) || is_conflict(&e) => {}
                        Err(e) => {
                            return Err(e)
                                .with_context(|| format!("deleting vmnetcfg {ns}/{name}"));
                        }
                    }
                    return Ok(());
                }
            }
        }
        (None, None) => return Ok(()),
    }

    let Some(cfg) = cfg else {
        return Ok(());
    };
    set_finalizers(&cfgs, &*cfg, false).await?;
    let spec = cfg.spec.network_configs.clone().unwrap_or_default();
    let status_entries = cfg
        .status
        .as_ref()
        .and_then(|s| s.network_configs.clone())
        .unwrap_or_default();
    // Entries the spec no longer lists (a NIC removed): give their addresses back.
    let mut stale: BTreeMap<String, Vec<(MacAddr, Ipv4Addr)>> = BTreeMap::new();
    for (network, mac, ip) in decide::stale_entries(&spec, &status_entries) {
        stale.entry(network).or_default().push((mac, ip));
    }
    for (network, entries) in &stale {
        release(
            ctx,
            network,
            entries,
            None,
            &format!("entry removed from vmnetcfg {ns}/{name}"),
        )
        .await?;
    }
    let paused = cfg.spec.paused == Some(true);
    let mut entries = Vec::new();
    let mut missing = Vec::new();
    for e in &spec {
        let network = network_key(&e.network_name);
        let Some(pool) = ctx.pool_for_network(&network) else {
            continue; // unmanaged network
        };
        let ip = e
            .mac_address
            .parse::<MacAddr>()
            .ok()
            .and_then(|m| ctx.held_ip(&pool, m));
        if ip.is_none() {
            missing.push(format!("{} on {network}", e.mac_address));
        }
        entries.push(NetworkConfigStatus {
            allocated_ip_address: ip.map(|i| i.to_string()),
            mac_address: Some(e.mac_address.clone()),
            network_name: Some(e.network_name.clone()),
            state: Some(
                if ip.is_some() && !paused {
                    "Allocated"
                } else {
                    "Pending"
                }
                .into(),
            ),
        });
    }
    let now = now_text();
    let mut conditions = cfg
        .status
        .as_ref()
        .and_then(|s| s.conditions.clone())
        .unwrap_or_default();
    let disabled = decide::disabled_message("vmnetcfg", ns, name);
    let allocated: Result<(), String> = if paused {
        Err(disabled.clone())
    } else if spec.is_empty() {
        Err(format!("no network configs found for vmnetcfg {ns}/{name}"))
    } else if !missing.is_empty() {
        Err(format!(
            "no address is allocated for {} (the webhook allocates at admission; is it registered?)",
            missing.join(", ")
        ))
    } else {
        Ok(())
    };
    let insynced: Result<(), String> = if paused { Err(disabled) } else { Ok(()) };
    for (type_, r) in [("Allocated", allocated), ("InSynced", insynced)] {
        match r {
            Ok(()) => set_condition(&mut conditions, type_, true, "", "", &now),
            Err(m) => set_condition(&mut conditions, type_, false, "Error", &m, &now),
        };
    }
    set_condition(&mut conditions, "Disabled", paused, "", "", &now);
    let have = cfg.status.clone().unwrap_or_default();
    let same_conditions = {
        let strip = |c: &[vm_dhcp_core::crd::Condition]| -> Vec<(String, String, Option<String>, Option<String>)> {
            c.iter().map(|c| (c.type_.clone(), c.status.clone(), c.reason.clone(), c.message.clone())).collect()
        };
        strip(have.conditions.as_deref().unwrap_or_default()) == strip(&conditions)
    };
    if have.network_configs.clone().unwrap_or_default() == entries && same_conditions {
        return Ok(());
    }
    let patch =
        serde_json::json!({"status": {"networkConfigs": entries, "conditions": conditions}});
    match cfgs
        .patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        Ok(_) => Ok(()),
        Err(e) if is_not_found(&e) => Ok(()),
        Err(e) => Err(e).with_context(|| format!("writing the status of vmnetcfg {ns}/{name}")),
    }
}
