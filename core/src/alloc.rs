//! What one NIC asks a pool for, what it gets, why it is refused, and the stable MACs
//! generated for NICs that have none. The allocation itself is made through the store
//! (`crate::store`, and the webhook's allocator).
//!
//! An allocation is identified by (network, MAC): asking again for the same MAC by the same
//! owner returns the address it holds. A MAC bound by another owner is refused (conflicting
//! static MAC). Only additions are made at admission: releasing is the controller's business.

use std::net::Ipv4Addr;

use crate::ipam::IpamError;
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
