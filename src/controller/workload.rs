//! A VM and its vmnetcfg (same namespace and name): what the caches hold of them and of the
//! pools goes to `vm_dhcp_core::controller::plan::plan_workload`, its writes to the writer.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use anyhow::Result;
use kube::{Resource, ResourceExt};
use vm_dhcp_core::controller::LiveOwners;
use vm_dhcp_core::controller::plan::{self, Pools, WorkloadWorld};
use vm_dhcp_core::mac::MacAddr;
use vm_dhcp_core::store::PoolKey;

use super::{Ctx, Key, get, now_text};

/// The pools as the caches show them.
struct CachedPools<'a>(&'a Ctx);

impl Pools for CachedPools<'_> {
    fn pool_of(&self, network: &str) -> Option<PoolKey> {
        self.0
            .pool_for_network(network)
            .map(|p| (p.namespace().unwrap_or_default(), p.name_any()))
    }

    fn held_ip(&self, pool: &PoolKey, mac: MacAddr) -> Option<Ipv4Addr> {
        match self.0.stores.holdings.lock().of_mac(pool, mac)?.ip {
            IpAddr::V4(ip) => Some(ip),
            IpAddr::V6(_) => None,
        }
    }

    fn live(&self, network: &str, skip: Option<(&str, &str)>) -> LiveOwners {
        self.0.owners().live(network, skip)
    }
}

pub(super) async fn reconcile(ctx: &Arc<Ctx>, ns: &str, name: &str) -> Result<()> {
    let vm = get(&ctx.stores.vms, ns, name).filter(|v| v.meta().deletion_timestamp.is_none());
    let cfg = get(&ctx.stores.cfgs, ns, name);
    let world = WorkloadWorld {
        ns,
        name,
        vm: vm.as_deref(),
        cfg: cfg.as_deref(),
    };
    let planned = plan::plan_workload(&world, &CachedPools(ctx), &now_text());
    ctx.apply(Key::Workload(ns.into(), name.into()), planned)
        .await
}
