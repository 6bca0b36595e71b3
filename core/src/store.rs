//! The allocation store: one `IPPoolAddress` object per allocated address and one
//! `IPPoolMACClaim` per (pool, MAC). Their names make the two uniqueness rules atomic in etcd:
//! creating an address object reserves the address (AlreadyExists: someone holds it), creating
//! a claim reserves the MAC in the pool's network. Everything else (the IPAM bitmap, the MAC
//! index, the pool status, the agents' lease tables, the views) is derived from these objects
//! and can be rebuilt at any time.
//!
//! The protocol, for one NIC (the webhook runs it; the controller only releases):
//! 1. the claim `<pool>.<mac>` names the address the MAC holds or is taking; an admission
//!    creates it, or touches it (`admittedAt`) when it exists, so a release decided before the
//!    admission fails on its resourceVersion precondition;
//! 2. the address object `<pool>.<address>` is created for the claim's address; AlreadyExists
//!    with another MAC means another admission won the address: pick again, move the claim;
//! 3. release (controller): delete the claim, then the address object, each with the
//!    resourceVersion it decided on as precondition. An address object whose MAC's claim does
//!    not name it, or a claim whose address object does not hold its MAC, is half-made (a
//!    crash between two writes) and swept after a grace period.
//!
//! This module is pure: names, labels, the per-pool index and the pool status projection.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr};

use crate::controller::shorten;
use crate::crd::{
    IPPoolAddress, IPPoolAddressSpec, IPPoolMACClaim, IPPoolMACClaimSpec, IPv4Status,
    MARK_EXCLUDED, MARK_RESERVED,
};
use crate::ipam::{AddrState, Ipam, IpamError, PoolLayout};
use crate::mac::MacAddr;

/// Label on address objects and claims: the IPPool's name (the NAD label of the same key
/// names the pool too).
pub const POOL_LABEL: &str = "network.harvesterhci.io/ippool-name";
/// Label on address objects and claims: the VM network as `<namespace>.<name>`.
pub const NETWORK_LABEL: &str = "network.harvesterhci.io/network";
/// Label on address objects and claims: the MAC with `-` for `:`.
pub const MAC_LABEL: &str = "network.harvesterhci.io/mac";
/// IPPool annotation set once its allocations live in address objects. A pool without it
/// whose status lists allocations (the Go version's, or vm-dhcp's before the store) is
/// migrated by the controller before admission allocates in it.
pub const STORE_ANNOTATION: &str = "network.harvesterhci.io/allocation-store";
pub const STORE_OBJECTS: &str = "objects";
/// The pool status lists every allocation (`status.ipv4.allocated`, `owners`,
/// `staticAddresses`) up to this many; above it they are left out (an etcd object holds
/// about 1.5 MiB) and the condition `AllocationsListed` says where to look.
pub const PROJECTION_MAX_ENTRIES: usize = 10_000;
/// The condition telling whether `status.ipv4.allocated` lists every allocation.
pub const LISTED_CONDITION: &str = "AllocationsListed";

/// `<pool>.<address>`: IPv4 as dotted quad (always four segments at the end, so the name is
/// unambiguous), IPv6 fully expanded with `-` for `:`.
pub fn address_object_name(pool: &str, ip: IpAddr) -> String {
    let addr = match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => v6
            .segments()
            .iter()
            .map(|s| format!("{s:04x}"))
            .collect::<Vec<_>>()
            .join("-"),
    };
    let max_pool = 253 - addr.len() - 1;
    format!("{}.{addr}", shorten(pool, max_pool))
}

/// `<pool>.<mac>` with `-` for `:`.
pub fn claim_object_name(pool: &str, mac: MacAddr) -> String {
    let mac = mac_label(mac);
    format!("{}.{mac}", shorten(pool, 253 - mac.len() - 1))
}

pub fn mac_label(mac: MacAddr) -> String {
    mac.to_string().replace(':', "-")
}

/// The value of `NETWORK_LABEL` for a network `<namespace>/<name>`.
pub fn network_label(network: &str) -> String {
    shorten(&network.replace('/', "."), 63)
}

/// The labels of a pool's address objects and claims for one MAC.
pub fn labels(pool: &str, network: &str, mac: MacAddr) -> BTreeMap<String, String> {
    BTreeMap::from([
        (POOL_LABEL.to_string(), shorten(pool, 63)),
        (NETWORK_LABEL.to_string(), network_label(network)),
        (MAC_LABEL.to_string(), mac_label(mac)),
    ])
}

/// What one allocation says: the address, the MAC, and who asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holding {
    pub ip: IpAddr,
    pub mac: MacAddr,
    pub owner: Option<String>,
    pub static_: bool,
    pub interface: Option<String>,
}

/// The address object of `h` in pool `<ns>/<pool>` serving `network`.
pub fn address_object(ns: &str, pool: &str, network: &str, h: &Holding) -> IPPoolAddress {
    let mut obj = IPPoolAddress::new(
        &address_object_name(pool, h.ip),
        IPPoolAddressSpec {
            ippool: pool.to_string(),
            address: h.ip.to_string(),
            mac_address: h.mac.to_string(),
            owner: h.owner.clone(),
            static_: h.static_,
            interface: h.interface.clone(),
        },
    );
    obj.metadata.namespace = Some(ns.to_string());
    obj.metadata.labels = Some(labels(pool, network, h.mac));
    obj
}

/// The claim of `h.mac` in pool `<ns>/<pool>`, naming `h.ip`.
pub fn claim_object(
    ns: &str,
    pool: &str,
    network: &str,
    h: &Holding,
    admitted_at: Option<String>,
) -> IPPoolMACClaim {
    let mut obj = IPPoolMACClaim::new(
        &claim_object_name(pool, h.mac),
        IPPoolMACClaimSpec {
            ippool: pool.to_string(),
            mac_address: h.mac.to_string(),
            address: h.ip.to_string(),
            owner: h.owner.clone(),
            static_: h.static_,
            interface: h.interface.clone(),
            admitted_at,
        },
    );
    obj.metadata.namespace = Some(ns.to_string());
    obj.metadata.labels = Some(labels(pool, network, h.mac));
    obj
}

/// Why an object of the store cannot be read (it is left alone and reported).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind} {name}: {what}")]
pub struct BadObject {
    pub kind: &'static str,
    pub name: String,
    pub what: String,
}

fn parse_ip(text: &str) -> Option<IpAddr> {
    text.trim().parse().ok()
}

/// The holding an address object records.
pub fn holding_of_address(obj: &IPPoolAddress) -> Result<Holding, BadObject> {
    let s = &obj.spec;
    let fields = (
        &s.address,
        &s.mac_address,
        &s.owner,
        s.static_,
        &s.interface,
    );
    holding_of("IPPoolAddress", &obj.metadata.name, fields)
}

/// The holding a claim records (the address it names).
pub fn holding_of_claim(obj: &IPPoolMACClaim) -> Result<Holding, BadObject> {
    let s = &obj.spec;
    let fields = (
        &s.address,
        &s.mac_address,
        &s.owner,
        s.static_,
        &s.interface,
    );
    holding_of("IPPoolMACClaim", &obj.metadata.name, fields)
}

/// A holding from the fields both kinds share: address, MAC, owner, static, interface.
fn holding_of(
    kind: &'static str,
    name: &Option<String>,
    (address, mac, owner, static_, interface): (
        &String,
        &String,
        &Option<String>,
        bool,
        &Option<String>,
    ),
) -> Result<Holding, BadObject> {
    let bad = |what: String| BadObject {
        kind,
        name: name.clone().unwrap_or_default(),
        what,
    };
    let ip = parse_ip(address).ok_or_else(|| bad(format!("address {address:?} is not an IP")))?;
    let mac = mac.parse().map_err(|e| bad(format!("macAddress: {e}")))?;
    Ok(Holding {
        ip,
        mac,
        owner: owner.clone().filter(|o| !o.is_empty()),
        static_,
        interface: interface.clone(),
    })
}

/// One pool's allocations as its address objects say, with the IPAM bitmap over them. Fed
/// by watch events (`upsert`, `remove`); rebuilt when the pool's spec changes.
#[derive(Debug, Clone)]
pub struct PoolIndex {
    ipam: Ipam,
    entries: BTreeMap<IpAddr, Holding>,
    by_mac: HashMap<MacAddr, IpAddr>,
}

impl PoolIndex {
    pub fn new(layout: PoolLayout) -> Result<Self, IpamError> {
        Ok(PoolIndex {
            ipam: Ipam::new(layout)?,
            entries: BTreeMap::new(),
            by_mac: HashMap::new(),
        })
    }

    /// The same holdings over a new layout (the spec's exclusions changed).
    pub fn relayout(&self, layout: PoolLayout) -> Result<Self, IpamError> {
        let mut next = PoolIndex::new(layout)?;
        for h in self.entries.values() {
            next.upsert(h.clone());
        }
        Ok(next)
    }

    pub fn layout(&self) -> &PoolLayout {
        self.ipam.layout()
    }

    pub fn ipam(&self) -> &Ipam {
        &self.ipam
    }

    /// Records an address object (created or updated).
    pub fn upsert(&mut self, h: Holding) {
        if let Some(old) = self.entries.get(&h.ip)
            && old.mac != h.mac
            && self.by_mac.get(&old.mac) == Some(&h.ip)
        {
            self.by_mac.remove(&old.mac);
        }
        if let IpAddr::V4(v4) = h.ip
            && self.ipam.state(v4) == AddrState::Free
        {
            let _ = self.ipam.allocate_static(v4);
        }
        self.by_mac.insert(h.mac, h.ip);
        self.entries.insert(h.ip, h);
    }

    /// Forgets an address object (deleted).
    pub fn remove(&mut self, ip: IpAddr) -> Option<Holding> {
        let h = self.entries.remove(&ip)?;
        if self.by_mac.get(&h.mac) == Some(&ip) {
            self.by_mac.remove(&h.mac);
            // Another address of the same MAC (a half-made leftover) takes its place.
            if let Some(other) = self.entries.values().find(|o| o.mac == h.mac) {
                self.by_mac.insert(h.mac, other.ip);
            }
        }
        if let IpAddr::V4(v4) = ip {
            let _ = self.ipam.release(v4);
        }
        Some(h)
    }

    pub fn get(&self, ip: IpAddr) -> Option<&Holding> {
        self.entries.get(&ip)
    }

    /// The address a MAC holds, per the address objects.
    pub fn of_mac(&self, mac: MacAddr) -> Option<&Holding> {
        self.by_mac.get(&mac).and_then(|ip| self.entries.get(ip))
    }

    pub fn holdings(&self) -> impl Iterator<Item = &Holding> {
        self.entries.values()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The lowest free address that `skip` (addresses being taken right now) does not name.
    pub fn lowest_free(&self, skip: impl Fn(Ipv4Addr) -> bool) -> Result<Ipv4Addr, IpamError> {
        self.ipam.lowest_free(skip)
    }

    /// The `n`-th lowest free address (see `Ipam::nth_free`).
    pub fn nth_free(
        &self,
        n: usize,
        skip: impl Fn(Ipv4Addr) -> bool,
    ) -> Result<Ipv4Addr, IpamError> {
        self.ipam.nth_free(n, skip)
    }

    /// Why `ip` cannot be taken by a static request (`Ok` when it is free).
    pub fn check_static(&self, ip: IpAddr) -> Result<(), IpamError> {
        match ip {
            IpAddr::V4(v4) => self.ipam.check_static(v4),
            IpAddr::V6(_) => Err(IpamError::Ipv6NotSupported {
                field: "address",
                value: ip.to_string(),
            }),
        }
    }

    /// `holder (owner <owner>)` of an address, for refusals.
    pub fn describe_holder(&self, ip: IpAddr) -> Option<String> {
        let h = self.entries.get(&ip)?;
        Some(match &h.owner {
            Some(owner) => format!("{} (owner {owner})", h.mac),
            None => h.mac.to_string(),
        })
    }

    /// The pool status this store projects: every allocation with the spec's marks, owners
    /// and static addresses while there are at most `max_listed` (`PROJECTION_MAX_ENTRIES`
    /// by default), and the exact counts always.
    pub fn projection(&self, max_listed: usize) -> Projection {
        let used = self.entries.len() as u32;
        let available = self.ipam.available();
        if self.entries.len() > max_listed {
            return Projection {
                ipv4: IPv4Status {
                    allocated: None,
                    owners: None,
                    static_addresses: None,
                    used: i64::from(used),
                    available: i64::from(available),
                },
                listed: false,
            };
        }
        let mut allocated = BTreeMap::new();
        for (ip, state) in self.ipam.taken() {
            let mark = match state {
                AddrState::Reserved => MARK_RESERVED,
                AddrState::Excluded => MARK_EXCLUDED,
                _ => continue,
            };
            allocated.insert(ip.to_string(), mark.to_string());
        }
        for ip in &self.ipam.layout().exclude {
            allocated
                .entry(ip.to_string())
                .or_insert_with(|| MARK_EXCLUDED.to_string());
        }
        let mut owners = BTreeMap::new();
        let mut statics = BTreeSet::new();
        for h in self.entries.values() {
            let key = h.ip.to_string();
            allocated.insert(key.clone(), h.mac.to_string());
            if let Some(o) = &h.owner {
                owners.insert(key.clone(), o.clone());
            }
            if h.static_ {
                statics.insert(key);
            }
        }
        Projection {
            ipv4: IPv4Status {
                allocated: (!allocated.is_empty()).then_some(allocated),
                owners: (!owners.is_empty()).then_some(owners),
                static_addresses: (!statics.is_empty()).then(|| statics.into_iter().collect()),
                used: i64::from(used),
                available: i64::from(available),
            },
            listed: true,
        }
    }
}

/// `(namespace, pool name)`.
pub type PoolKey = (String, String);

/// Every pool's holdings as a watch of the address objects delivers them, with each pool's
/// index built on first use (it needs the pool's layout) and kept up to date after. Follows
/// the watch protocol: `restart` (a new initial list begins), `restart_apply` for each
/// object of it, `restart_done` (it replaces what was held), then `apply`/`delete`.
#[derive(Debug, Default)]
pub struct Holdings {
    pools: HashMap<PoolKey, PoolHoldings>,
    relist: Option<HashMap<PoolKey, PoolHoldings>>,
}

#[derive(Debug, Default)]
struct PoolHoldings {
    entries: BTreeMap<IpAddr, Holding>,
    /// resourceVersion of each address object (preconditions of releases).
    versions: HashMap<IpAddr, String>,
    by_mac: HashMap<MacAddr, IpAddr>,
    index: Option<PoolIndex>,
}

impl PoolHoldings {
    fn insert(&mut self, h: Holding, version: Option<String>) {
        if let Some(old) = self.entries.get(&h.ip)
            && self.by_mac.get(&old.mac) == Some(&h.ip)
        {
            self.by_mac.remove(&old.mac);
        }
        if let Some(index) = &mut self.index {
            index.upsert(h.clone());
        }
        match version {
            Some(v) => self.versions.insert(h.ip, v),
            None => self.versions.remove(&h.ip),
        };
        self.by_mac.insert(h.mac, h.ip);
        self.entries.insert(h.ip, h);
    }

    fn remove(&mut self, ip: IpAddr) {
        if let Some(h) = self.entries.remove(&ip)
            && self.by_mac.get(&h.mac) == Some(&ip)
        {
            self.by_mac.remove(&h.mac);
            if let Some(other) = self.entries.values().find(|o| o.mac == h.mac) {
                self.by_mac.insert(h.mac, other.ip);
            }
        }
        self.versions.remove(&ip);
        if let Some(index) = &mut self.index {
            index.remove(ip);
        }
    }
}

fn key_of(obj: &IPPoolAddress) -> PoolKey {
    (
        obj.metadata.namespace.clone().unwrap_or_default(),
        obj.spec.ippool.clone(),
    )
}

impl Holdings {
    pub fn apply(&mut self, obj: &IPPoolAddress) -> Result<PoolKey, BadObject> {
        let h = holding_of_address(obj)?;
        let key = key_of(obj);
        self.pools
            .entry(key.clone())
            .or_default()
            .insert(h, obj.metadata.resource_version.clone());
        Ok(key)
    }

    pub fn delete(&mut self, obj: &IPPoolAddress) -> Option<PoolKey> {
        let ip = parse_ip(&obj.spec.address)?;
        let key = key_of(obj);
        self.pools.get_mut(&key)?.remove(ip);
        Some(key)
    }

    pub fn restart(&mut self) {
        self.relist = Some(HashMap::new());
    }

    pub fn restart_apply(&mut self, obj: &IPPoolAddress) -> Result<(), BadObject> {
        let h = holding_of_address(obj)?;
        self.relist
            .get_or_insert_with(HashMap::new)
            .entry(key_of(obj))
            .or_default()
            .insert(h, obj.metadata.resource_version.clone());
        Ok(())
    }

    /// The relist replaces everything: indexes are rebuilt on next use.
    pub fn restart_done(&mut self) {
        self.pools = self.relist.take().unwrap_or_default();
    }

    /// The index of a pool over `layout` (built, or rebuilt when the layout changed).
    pub fn index(&mut self, key: &PoolKey, layout: &PoolLayout) -> Result<&PoolIndex, IpamError> {
        let pool = self.pools.entry(key.clone()).or_default();
        let index = match pool.index.take() {
            Some(index) if index.layout() == layout => index,
            _ => {
                let mut index = PoolIndex::new(layout.clone())?;
                for h in pool.entries.values() {
                    index.upsert(h.clone());
                }
                index
            }
        };
        Ok(pool.index.insert(index))
    }

    /// A pool's holdings in address order.
    pub fn of_pool(&self, key: &PoolKey) -> impl Iterator<Item = &Holding> {
        self.pools
            .get(key)
            .into_iter()
            .flat_map(|p| p.entries.values())
    }

    pub fn get(&self, key: &PoolKey, ip: IpAddr) -> Option<&Holding> {
        self.pools.get(key).and_then(|p| p.entries.get(&ip))
    }

    /// The address object holding a MAC in a pool.
    pub fn of_mac(&self, key: &PoolKey, mac: MacAddr) -> Option<&Holding> {
        let p = self.pools.get(key)?;
        p.by_mac.get(&mac).and_then(|ip| p.entries.get(ip))
    }

    /// The resourceVersion of an address object, as last seen.
    pub fn version(&self, key: &PoolKey, ip: IpAddr) -> Option<&str> {
        self.pools
            .get(key)
            .and_then(|p| p.versions.get(&ip))
            .map(String::as_str)
    }

    pub fn pools(&self) -> impl Iterator<Item = &PoolKey> {
        self.pools.keys()
    }
}

/// The pool status as the store projects it.
#[derive(Debug, Clone, PartialEq)]
pub struct Projection {
    pub ipv4: IPv4Status,
    /// False when the allocations were left out for size.
    pub listed: bool,
}

/// What a pool status (written by the Go version, or by vm-dhcp before the store) holds, as
/// the holdings to migrate into address objects: MAC entries only (marks come from the
/// spec), with the owners and static flags it recorded.
pub fn holdings_in_status(status: Option<&IPv4Status>) -> Vec<Holding> {
    let Some(status) = status else {
        return Vec::new();
    };
    let allocated = status.allocated.clone().unwrap_or_default();
    let statics = status.held_statics(&allocated);
    allocated
        .iter()
        .filter_map(|(ip, value)| {
            let ip: IpAddr = ip.trim().parse().ok()?;
            let mac: MacAddr = value.parse().ok()?;
            let key = ip.to_string();
            Some(Holding {
                ip,
                mac,
                owner: status
                    .owners
                    .as_ref()
                    .and_then(|o| o.get(&key))
                    .cloned()
                    .filter(|o| !o.is_empty()),
                static_: statics.contains(&key),
                interface: None,
            })
        })
        .collect()
}

/// Does this pool still need its status migrated into address objects?
pub fn needs_migration(
    annotations: Option<&BTreeMap<String, String>>,
    status: Option<&IPv4Status>,
) -> bool {
    let marked = annotations
        .and_then(|a| a.get(STORE_ANNOTATION))
        .is_some_and(|v| v == STORE_OBJECTS);
    !marked && !holdings_in_status(status).is_empty()
}

/// A half-made allocation: what the sweep found and may delete after its grace period.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum HalfMade {
    /// A claim whose address object does not hold its MAC.
    Claim { mac: MacAddr },
    /// An address object whose MAC's claim names another address (or none).
    Address { ip: IpAddr },
}

/// The half-made allocations of a pool: claims without their address object and address
/// objects that no claim names.
pub fn half_made<'a>(
    holdings: impl IntoIterator<Item = &'a Holding>,
    claims: &BTreeMap<MacAddr, IpAddr>,
) -> BTreeSet<HalfMade> {
    let held: BTreeMap<IpAddr, MacAddr> = holdings.into_iter().map(|h| (h.ip, h.mac)).collect();
    let mut out = BTreeSet::new();
    for (mac, ip) in claims {
        if held.get(ip) != Some(mac) {
            out.insert(HalfMade::Claim { mac: *mac });
        }
    }
    for (ip, mac) in &held {
        if claims.get(mac) != Some(ip) {
            out.insert(HalfMade::Address { ip: *ip });
        }
    }
    out
}

#[cfg(test)]
mod tests;
