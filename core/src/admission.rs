//! Admission decisions as pure functions: IPPool defaults and rules, and what a
//! VirtualMachineNetworkConfig or a VirtualMachine asks the pools for. The webhook adapter
//! reads the cluster, calls these, and commits.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

use crate::alloc::{AllocRequest, Allocation, MacChoice, mac_seed};
use crate::crd::{IPPool, VirtualMachineNetworkConfig};
use crate::ipam::{IpamError, PoolLayout, parse_cidr};
use crate::kubevirt::VirtualMachine;
use crate::mac::MacAddr;

/// The most addresses one pool may span: the hosts of a /16. Each allocation is an object of
/// its own (the allocation store), so the pool's size no longer meets etcd's object limit; the bound
/// keeps the IPAM bitmap (2 × 8 KiB) and a full list of the pool's objects small.
pub const MAX_POOL_ADDRESSES: u32 = 65_534;

/// VM annotation with a static address for one NIC (Harvester 1.9 UI).
pub const STATIC_IP_ANNOTATION_PREFIX: &str = "static-ip.harvesterhci.io/";
/// VM annotation where the webhook records what it allocated (JSON list of `NicAllocation`).
pub const ALLOCATIONS_ANNOTATION: &str = "dhcp.harvesterhci.io/allocations";

/// `<namespace>/<name>` of a network reference; a bare name means the `default` namespace
/// (as upstream's webhook reads it).
pub fn network_key(network_name: &str) -> String {
    match network_name.trim().rsplit_once('/') {
        Some((ns, name)) => format!("{ns}/{name}"),
        None => format!("default/{}", network_name.trim()),
    }
}

/// A default the IPPool mutator fills in: JSON pointer, value, and whether the key exists
/// (then it is replaced, else added).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldDefault {
    pub path: &'static str,
    pub value: String,
    pub exists: bool,
}

fn str_at<'a>(v: &'a serde_json::Value, path: &str) -> Option<&'a str> {
    v.pointer(path).and_then(serde_json::Value::as_str)
}

/// The defaults of an IPPool on CREATE: `pool.start`/`pool.end` span the subnet's host
/// addresses, and `serverIP` is the lowest host address that is not the router nor excluded,
/// preferring one outside the range (so it does not cost a client address).
pub fn ippool_defaults(pool: &serde_json::Value) -> Result<Vec<FieldDefault>, String> {
    let Some(cidr) = str_at(pool, "/spec/ipv4Config/cidr") else {
        return Ok(Vec::new()); // the schema reports the missing cidr
    };
    let net = parse_cidr(cidr).map_err(|e| format!("spec.ipv4Config.cidr: {e}"))?;
    if net.prefix_len() > 30 {
        return Err(format!(
            "spec.ipv4Config.cidr: {}",
            IpamError::PrefixTooLong {
                cidr: net,
                prefix: net.prefix_len()
            }
        ));
    }
    let first = u32::from(net.network()) + 1;
    let last = u32::from(net.broadcast()) - 1;
    let mut out = Vec::new();
    let mut field = |path: &'static str, computed: u32| -> Result<u32, String> {
        match str_at(pool, path).map(str::trim) {
            Some(text) if !text.is_empty() => {
                text.parse::<Ipv4Addr>().map(u32::from).map_err(|_| {
                    format!(
                        "{}: {text:?} is not a valid IPv4 address",
                        path.trim_start_matches("/spec/").replace('/', ".")
                    )
                })
            }
            existing => {
                out.push(FieldDefault {
                    path,
                    value: Ipv4Addr::from(computed).to_string(),
                    exists: existing.is_some(),
                });
                Ok(computed)
            }
        }
    };
    let start = field("/spec/ipv4Config/pool/start", first)?;
    let end = field("/spec/ipv4Config/pool/end", last)?;
    let server_missing =
        str_at(pool, "/spec/ipv4Config/serverIP").is_none_or(|s| s.trim().is_empty());
    if server_missing {
        let mut masked: std::collections::HashSet<u32> = pool
            .pointer("/spec/ipv4Config/pool/exclude")
            .and_then(serde_json::Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|v| v.as_str()?.trim().parse::<Ipv4Addr>().ok().map(u32::from))
            .collect();
        if let Some(router) =
            str_at(pool, "/spec/ipv4Config/router").and_then(|r| r.trim().parse::<Ipv4Addr>().ok())
        {
            masked.insert(u32::from(router));
        }
        // The first free address of a span: at most one step more than there are masked
        // addresses, whatever the size of the network (a /0 must not be walked).
        let first_free = |from: u32, to: u32| (from..=to).find(|a| !masked.contains(a));
        let below = (start > first)
            .then(|| first_free(first, (start - 1).min(last)))
            .flatten();
        let above = || {
            (end < last)
                .then(|| first_free((end + 1).max(first), last))
                .flatten()
        };
        let server = below
            .or_else(above)
            .or_else(|| first_free(first, last))
            .ok_or_else(|| {
                format!(
                    "no address of {net} is left for the DHCP server; set spec.ipv4Config.serverIP"
                )
            })?;
        out.push(FieldDefault {
            path: "/spec/ipv4Config/serverIP",
            value: Ipv4Addr::from(server).to_string(),
            exists: str_at(pool, "/spec/ipv4Config/serverIP").is_some(),
        });
    }
    Ok(out)
}

/// What the IPPool validator knows of the cluster.
#[derive(Debug, Clone, Default)]
pub struct PoolContext {
    /// Other IPPools: (`<namespace>/<name>`, network key).
    pub others: Vec<(String, String)>,
    /// The cluster's Service CIDR, which a pool must not overlap.
    pub service_cidr: Option<Ipv4Net>,
}

fn is_hostname(name: &str) -> bool {
    let name = name.strip_suffix('.').unwrap_or(name);
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

fn overlaps(a: Ipv4Net, b: Ipv4Net) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

/// Every rule an IPPool must satisfy on CREATE (`old` = None) and UPDATE.
pub fn validate_ippool(
    pool: &IPPool,
    old: Option<&IPPool>,
    ctx: &PoolContext,
) -> Result<(), String> {
    let me = format!(
        "{}/{}",
        pool.metadata.namespace.as_deref().unwrap_or_default(),
        pool.metadata.name.as_deref().unwrap_or_default()
    );
    let network = network_key(&pool.spec.network_name);
    if pool.spec.network_name.trim().is_empty() || network.ends_with('/') {
        return Err("spec.networkName must name a VM network as <namespace>/<name>".into());
    }
    if let Some((other, _)) = ctx
        .others
        .iter()
        .find(|(name, net)| *net == network && *name != me)
    {
        return Err(format!(
            "network {network} already has IPPool {other}; a network is served by one IPPool"
        ));
    }
    let cfg = pool
        .spec
        .ipv4_config
        .as_ref()
        .ok_or("spec.ipv4Config is required")?;
    let layout = PoolLayout::from_config(cfg).map_err(|e| format!("spec.ipv4Config: {e}"))?;
    let net = layout.cidr;
    let (network_ip, broadcast) = (net.network(), net.broadcast());
    let special = |field: &str, ip: Ipv4Addr| -> Result<(), String> {
        if ip == network_ip {
            Err(format!("{field} {ip} is the network address of {net}"))
        } else if ip == broadcast {
            Err(format!("{field} {ip} is the broadcast address of {net}"))
        } else {
            Ok(())
        }
    };
    special("spec.ipv4Config.pool.start", layout.start)?;
    special("spec.ipv4Config.pool.end", layout.end)?;
    let server = layout.server_ip.ok_or(
        "spec.ipv4Config.serverIP is required (the mutating webhook fills it in when absent)",
    )?;
    special("spec.ipv4Config.serverIP", server)?;
    if let Some(router) = layout.router {
        special("spec.ipv4Config.router", router)?;
        if router == server {
            return Err(format!(
                "spec.ipv4Config.serverIP {server} is the same as the router"
            ));
        }
    }
    if old.is_none() {
        for ip in &layout.exclude {
            if !net.contains(ip) {
                return Err(format!(
                    "spec.ipv4Config.pool.exclude entry {ip} is not within subnet {net}"
                ));
            }
        }
    }
    let size = u32::from(layout.end) - u32::from(layout.start) + 1;
    if size > MAX_POOL_ADDRESSES {
        return Err(format!(
            "pool range {}-{} spans {size} addresses; one IPPool holds at most {MAX_POOL_ADDRESSES} (a /16): use a smaller range",
            layout.start, layout.end
        ));
    }
    for dns in cfg.dns.iter().flatten() {
        dns.trim()
            .parse::<Ipv4Addr>()
            .map_err(|_| format!("spec.ipv4Config.dns entry {dns:?} is not an IPv4 address"))?;
    }
    for ntp in cfg.ntp.iter().flatten() {
        if ntp.trim().parse::<Ipv4Addr>().is_err() && !is_hostname(ntp.trim()) {
            return Err(format!(
                "spec.ipv4Config.ntp entry {ntp:?} is neither an IPv4 address nor a host name"
            ));
        }
    }
    for name in cfg
        .domain_name
        .iter()
        .chain(cfg.domain_search.iter().flatten())
    {
        if !is_hostname(name.trim()) {
            return Err(format!(
                "domain {name:?} in spec.ipv4Config is not a valid DNS name"
            ));
        }
    }
    if cfg.lease_time.is_some_and(|t| t < 0) {
        return Err("spec.ipv4Config.leaseTime must not be negative".into());
    }
    if let Some(svc) = ctx.service_cidr.filter(|svc| overlaps(net, *svc)) {
        return Err(format!(
            "cidr {net} overlaps the cluster service cidr {svc}"
        ));
    }
    if old.is_some() {
        let key = server.to_string();
        let occupant = pool
            .status
            .as_ref()
            .and_then(|s| s.ipv4.as_ref())
            .and_then(|s| s.allocated.as_ref())
            .and_then(|m| m.get(&key))
            .filter(|v| *v != crate::crd::MARK_RESERVED);
        if let Some(occupant) = occupant {
            return Err(format!(
                "spec.ipv4Config.serverIP {server} is already occupied ({occupant})"
            ));
        }
    }
    Ok(())
}

/// Why an IPPool may not be deleted yet: it still has allocated addresses.
///
/// `holdings` are the pool's address objects (the truth); without them (no cache) the pool
/// status is read, as the Go version does.
pub fn validate_ippool_delete(
    pool: &IPPool,
    holdings: Option<&[crate::store::Holding]>,
) -> Result<(), String> {
    let from_status;
    let list = match holdings {
        Some(h) => h,
        None => {
            from_status = crate::store::holdings_in_status(
                pool.status.as_ref().and_then(|s| s.ipv4.as_ref()),
            );
            &from_status[..]
        }
    };
    let held: Vec<String> = list
        .iter()
        .map(|h| match &h.owner {
            Some(owner) => format!("{} ({owner})", h.ip),
            None => format!("{} ({})", h.ip, h.mac),
        })
        .collect();
    if held.is_empty() {
        return Ok(());
    }
    let shown: Vec<&str> = held.iter().take(5).map(String::as_str).collect();
    Err(format!(
        "{} address(es) are still allocated: {}{}; delete those VMs or their VirtualMachineNetworkConfigs first",
        held.len(),
        shown.join(", "),
        if held.len() > shown.len() {
            ", …"
        } else {
            ""
        }
    ))
}

/// One NIC's request, with where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NicPlan {
    /// Index in `spec.networkConfigs` (vmnetcfg) or in the VM's interfaces.
    pub index: usize,
    /// Interface name (VM only).
    pub interface: String,
    /// Network key `<namespace>/<name>`.
    pub network: String,
    pub request: AllocRequest,
}

/// What a vmnetcfg asks for. Entries on networks for which `managed` is false are left alone.
pub fn plan_vmnetcfg(
    cfg: &VirtualMachineNetworkConfig,
    namespace: &str,
    managed: impl Fn(&str) -> bool,
) -> Result<Vec<NicPlan>, String> {
    let owner = format!("{namespace}/{}", cfg.spec.vm_name);
    let mut seen: BTreeMap<MacAddr, usize> = BTreeMap::new();
    let mut plans = Vec::new();
    for (i, entry) in cfg.spec.network_configs.iter().flatten().enumerate() {
        let mac: MacAddr = entry
            .mac_address
            .parse()
            .map_err(|e| format!("spec.networkConfigs[{i}].macAddress: {e}"))?;
        if let Some(first) = seen.insert(mac, i) {
            return Err(format!(
                "spec.networkConfigs[{i}].macAddress {mac} is already used by spec.networkConfigs[{first}]"
            ));
        }
        let want = match entry
            .ip_address
            .as_deref()
            .map(str::trim)
            .filter(|s| !s.is_empty())
        {
            Some(text) => Some(text.parse::<Ipv4Addr>().map_err(|_| {
                format!("spec.networkConfigs[{i}].ipAddress {text:?} is not an IPv4 address")
            })?),
            None => None,
        };
        let network = network_key(&entry.network_name);
        if managed(&network) {
            plans.push(NicPlan {
                index: i,
                interface: String::new(),
                network,
                request: AllocRequest {
                    owner: owner.clone(),
                    mac: MacChoice::Given(mac),
                    want,
                },
            });
        }
    }
    Ok(plans)
}

/// What a VirtualMachine asks for: each NIC on a managed network (absent NICs and the pod
/// network skipped), its MAC from the spec, else Harvester's annotation, else a generated
/// one; a static address from `static-ip.harvesterhci.io/<nic>`.
pub fn plan_vm(
    vm: &VirtualMachine,
    managed: impl Fn(&str) -> bool,
) -> Result<Vec<NicPlan>, String> {
    let namespace = vm.metadata.namespace.as_deref().unwrap_or_default();
    let name = vm.metadata.name.as_deref().unwrap_or_default();
    let owner = format!("{namespace}/{name}");
    let annotations = vm.metadata.annotations.clone().unwrap_or_default();
    let read = crate::nics::read(vm);
    read.mac_annotation?;
    let mut plans = Vec::new();
    for nic in read.nics {
        if !managed(&nic.network) {
            continue;
        }
        let mac = match nic.declared? {
            Some(mac) => MacChoice::Given(mac),
            None => MacChoice::Generate {
                seed: mac_seed(namespace, name, &nic.interface),
            },
        };
        let key = format!("{STATIC_IP_ANNOTATION_PREFIX}{}", nic.interface);
        let want = match annotations
            .get(&key)
            .map(|s| s.trim())
            .filter(|s| !s.is_empty())
        {
            Some(text) => Some(
                text.parse::<Ipv4Addr>()
                    .map_err(|_| format!("annotation {key}: {text:?} is not an IPv4 address"))?,
            ),
            None => None,
        };
        plans.push(NicPlan {
            index: nic.index,
            interface: nic.interface,
            network: nic.network,
            request: AllocRequest {
                owner: owner.clone(),
                mac,
                want,
            },
        });
    }
    Ok(plans)
}

/// One NIC's result, as recorded in the VM's `dhcp.harvesterhci.io/allocations` annotation.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NicAllocation {
    pub interface: String,
    pub network: String,
    pub mac_address: String,
    pub ip_address: String,
}

pub fn nic_allocation(plan: &NicPlan, a: &Allocation) -> NicAllocation {
    NicAllocation {
        interface: plan.interface.clone(),
        network: plan.network.clone(),
        mac_address: a.mac.to_string(),
        ip_address: a.ip.to_string(),
    }
}

#[cfg(test)]
mod tests;
