//! Allocation decisions for one pool, as the webhook's committer makes them inside one
//! optimistic-concurrency update of `status.ipv4`.
//!
//! An allocation is identified by (network, MAC): asking again for the same MAC by the same
//! owner returns the address it holds. A MAC bound by another owner is refused (conflicting
//! static MAC). Only additions are made here: releasing is the controller's business.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::Ipv4Addr;

use crate::crd::IPv4Status;
use crate::ipam::{AddrState, Ipam, IpamError, PoolLayout, RebuildIssue};
use crate::mac::MacAddr;

/// How the MAC of a request is known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MacChoice {
    Given(MacAddr),
    /// Pick a stable locally administered MAC from this seed that no one holds in the network.
    Generate {
        seed: u64,
    },
}

/// One NIC's request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllocRequest {
    /// `<namespace>/<name>` of the VM (and so of its vmnetcfg).
    pub owner: String,
    pub mac: MacChoice,
    /// A static address, or `None` for the lowest free one.
    pub want: Option<Ipv4Addr>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Allocation {
    pub mac: MacAddr,
    pub ip: Ipv4Addr,
    /// False when the MAC already held the address (an idempotent repeat).
    pub new: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AllocError {
    #[error("MAC address {mac} is already bound to {ip} in this network by {owner}")]
    MacBoundElsewhere {
        mac: MacAddr,
        ip: Ipv4Addr,
        owner: String,
    },
    #[error(
        "MAC address {mac} already holds {held} in this network and cannot also take {wanted}; remove the NIC (or its vmnetcfg entry) first"
    )]
    MacHoldsOther {
        mac: MacAddr,
        held: Ipv4Addr,
        wanted: Ipv4Addr,
    },
    #[error("address {ip} is already allocated to MAC {holder}")]
    AddressTaken { ip: Ipv4Addr, holder: String },
    #[error("{0}")]
    Address(#[from] IpamError),
    #[error("no free locally administered MAC address could be generated")]
    NoMacAvailable,
}

/// One pool's allocations: the IPAM plus the MAC and owner indexes, and what was added
/// since it was read.
#[derive(Debug, Clone)]
pub struct PoolBook {
    ipam: Ipam,
    allocated: BTreeMap<String, String>,
    by_mac: HashMap<MacAddr, Ipv4Addr>,
    owners: BTreeMap<String, String>,
    /// Addresses taken by address (`want`), kept in `status.ipv4.staticAddresses`.
    statics: BTreeSet<String>,
    dirty: bool,
}

impl PoolBook {
    /// Builds the book from a pool's status (absent status: an empty pool).
    pub fn from_status(
        layout: PoolLayout,
        status: Option<&IPv4Status>,
    ) -> Result<(Self, Vec<RebuildIssue>), IpamError> {
        let allocated = status.and_then(|s| s.allocated.clone()).unwrap_or_default();
        let owners = status.and_then(|s| s.owners.clone()).unwrap_or_default();
        let (ipam, issues) = Ipam::rebuild(layout, &allocated)?;
        let statics = status
            .map(|s| s.held_statics(&allocated))
            .unwrap_or_default();
        let by_mac = allocated
            .iter()
            .filter_map(|(ip, mac)| Some((mac.parse().ok()?, ip.parse().ok()?)))
            .filter(|(_, ip)| ipam.state(*ip) == AddrState::Allocated)
            .collect();
        let mut book = PoolBook {
            ipam,
            allocated,
            by_mac,
            owners,
            statics,
            dirty: false,
        };
        // The marks of the spec (server, router, exclusions) belong in the map too, as
        // upstream writes them; adding missing ones is a change worth committing.
        book.write_marks();
        Ok((book, issues))
    }

    fn write_marks(&mut self) {
        let marks: Vec<(String, &str)> = self
            .ipam
            .taken()
            .filter_map(|(ip, state)| match state {
                AddrState::Reserved => Some((ip.to_string(), crate::crd::MARK_RESERVED)),
                AddrState::Excluded => Some((ip.to_string(), crate::crd::MARK_EXCLUDED)),
                _ => None,
            })
            .chain(
                self.ipam
                    .layout()
                    .exclude
                    .iter()
                    .map(|ip| (ip.to_string(), crate::crd::MARK_EXCLUDED)),
            )
            .collect();
        for (ip, mark) in marks {
            if let std::collections::btree_map::Entry::Vacant(slot) = self.allocated.entry(ip) {
                slot.insert(mark.to_string());
                self.dirty = true;
            }
        }
    }

    pub fn ipam(&self) -> &Ipam {
        &self.ipam
    }

    /// The address a MAC holds, and its owner if known.
    pub fn lookup(&self, mac: MacAddr) -> Option<(Ipv4Addr, Option<&str>)> {
        let ip = *self.by_mac.get(&mac)?;
        Some((ip, self.owners.get(&ip.to_string()).map(String::as_str)))
    }

    /// Has anything been added since the book was read?
    pub fn is_dirty(&self) -> bool {
        self.dirty
    }

    /// The status to write back: the map as read plus what was added, and exact counts.
    pub fn status(&self) -> IPv4Status {
        IPv4Status {
            allocated: Some(self.allocated.clone()),
            owners: (!self.owners.is_empty()).then(|| self.owners.clone()),
            static_addresses: (!self.statics.is_empty())
                .then(|| self.statics.iter().cloned().collect()),
            used: i64::from(self.ipam.used()),
            available: i64::from(self.ipam.available()),
        }
    }

    fn holder(&self, ip: Ipv4Addr) -> String {
        let key = ip.to_string();
        let mac = self.allocated.get(&key).cloned().unwrap_or_default();
        match self.owners.get(&key) {
            Some(owner) => format!("{mac} (owner {owner})"),
            None => mac,
        }
    }

    fn generate_mac(&self, owner: &str, seed: u64) -> Result<MacAddr, AllocError> {
        generate_mac(owner, seed, |mac| {
            self.lookup(mac).map(|(_, o)| o.map(str::to_string))
        })
    }

    /// Allocates one NIC's address, or returns the one its MAC already holds.
    pub fn allocate(&mut self, req: &AllocRequest) -> Result<Allocation, AllocError> {
        self.allocate_inner(req).map(|(a, _)| a)
    }

    /// As `allocate`; also says whether an ownerless allocation was adopted.
    fn allocate_inner(&mut self, req: &AllocRequest) -> Result<(Allocation, bool), AllocError> {
        let mac = match req.mac {
            MacChoice::Given(mac) => mac,
            MacChoice::Generate { seed } => self.generate_mac(&req.owner, seed)?,
        };
        if let Some((held, owner)) = self.lookup(mac) {
            match owner {
                Some(owner) if owner != req.owner => {
                    return Err(AllocError::MacBoundElsewhere {
                        mac,
                        ip: held,
                        owner: owner.to_string(),
                    });
                }
                _ => {}
            }
            if let Some(wanted) = req.want.filter(|w| *w != held) {
                return Err(AllocError::MacHoldsOther { mac, held, wanted });
            }
            let adopted = owner.is_none();
            if adopted {
                // An allocation the Go version made: whoever asks for it first adopts it, and
                // one asked for by address (a static-ip annotation) is static.
                self.owners.insert(held.to_string(), req.owner.clone());
                if req.want == Some(held) {
                    self.statics.insert(held.to_string());
                }
                self.dirty = true;
            }
            let found = Allocation {
                mac,
                ip: held,
                new: false,
            };
            return Ok((found, adopted));
        }
        let ip = match req.want {
            Some(ip) => match self.ipam.allocate_static(ip) {
                Err(IpamError::AlreadyAllocated { ip }) => {
                    return Err(AllocError::AddressTaken {
                        ip,
                        holder: self.holder(ip),
                    });
                }
                other => other?,
            },
            None => self.ipam.allocate_lowest()?,
        };
        let key = ip.to_string();
        self.allocated.insert(key.clone(), mac.to_string());
        if req.want.is_some() {
            self.statics.insert(key.clone());
        } else {
            self.statics.remove(&key);
        }
        self.owners.insert(key, req.owner.clone());
        self.by_mac.insert(mac, ip);
        self.dirty = true;
        Ok((Allocation { mac, ip, new: true }, false))
    }

    /// Allocates every request or none: on the first error, what this call added is undone.
    pub fn allocate_all(&mut self, reqs: &[AllocRequest]) -> Result<Vec<Allocation>, AllocError> {
        let mut done: Vec<(Allocation, bool)> = Vec::with_capacity(reqs.len());
        let dirty_before = self.dirty;
        for req in reqs {
            match self.allocate_inner(req) {
                Ok(a) => done.push(a),
                Err(e) => {
                    for (a, adopted) in &done {
                        let key = a.ip.to_string();
                        if a.new {
                            let _ = self.ipam.release(a.ip);
                            self.allocated.remove(&key);
                            self.by_mac.remove(&a.mac);
                        }
                        if a.new || *adopted {
                            self.owners.remove(&key);
                            self.statics.remove(&key);
                        }
                    }
                    self.dirty = dirty_before;
                    return Err(e);
                }
            }
        }
        Ok(done.into_iter().map(|(a, _)| a).collect())
    }
}

/// A stable locally administered MAC from `seed` that nobody but `owner` holds: `holder`
/// says who holds a MAC (`Some(None)`: held, owner unknown). The same seed gives the same
/// MAC on every retry and in every replica.
pub fn generate_mac(
    owner: &str,
    seed: u64,
    holder: impl Fn(MacAddr) -> Option<Option<String>>,
) -> Result<MacAddr, AllocError> {
    for attempt in 0..64u64 {
        let h = fnv1a((seed ^ attempt.wrapping_mul(0x9e37_79b9_7f4a_7c15)).to_le_bytes());
        let b = h.to_be_bytes();
        // Locally administered (bit 1), unicast (bit 0 clear).
        let mac = MacAddr([(b[0] & 0xfc) | 0x02, b[1], b[2], b[3], b[4], b[5]]);
        match holder(mac) {
            None => return Ok(mac),
            Some(Some(o)) if o == owner => return Ok(mac),
            Some(_) => continue,
        }
    }
    Err(AllocError::NoMacAvailable)
}

/// FNV-1a: stable across versions and platforms (std's hasher is not), so a generated MAC
/// is the same on every retry and in every replica.
fn fnv1a(bytes: impl IntoIterator<Item = u8>) -> u64 {
    bytes.into_iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// A stable seed for a generated MAC: the same VM NIC gets the same MAC on every retry.
pub fn mac_seed(namespace: &str, vm: &str, interface: &str) -> u64 {
    fnv1a(
        namespace
            .bytes()
            .chain([0])
            .chain(vm.bytes())
            .chain([0])
            .chain(interface.bytes()),
    )
}

#[cfg(test)]
mod tests;
