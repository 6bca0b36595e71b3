//! Address management for one pool: two bitmaps over the host addresses of `[start, end]`
//! (a /16 range costs 2 × 8 KiB), lowest-free allocation with a moving hint, and a rebuild
//! from `status.ipv4.allocated`, which stays the one source of truth: this structure is
//! always derived from it and can be thrown away at any time.
//!
//! Documented behaviour at the edges:
//! - the network and broadcast addresses are never handed out, even when the range
//!   includes them;
//! - a /31 or /32 network is refused: it leaves no address for a client beside the server;
//!   a /30 leaves exactly one client address;
//! - the server IP and the router are `RESERVED` when inside the range; `exclude` entries
//!   inside it are `EXCLUDED`; entries outside it are ignored (they cannot be handed out).

use std::collections::BTreeMap;
use std::fmt;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

use crate::crd::{IPv4Config, MARK_EXCLUDED, MARK_RESERVED};
use crate::mac::MacAddr;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IpamError {
    #[error("IPv6 is not supported yet: {field} is {value:?}; use an IPv4 address or CIDR")]
    Ipv6NotSupported { field: &'static str, value: String },
    #[error("{field} {value:?} is not a valid IPv4 address")]
    InvalidAddress { field: &'static str, value: String },
    #[error("cidr {value:?} is not a valid IPv4 CIDR (expected e.g. 192.168.48.0/24)")]
    InvalidCidr { value: String },
    #[error(
        "cidr {cidr} is too small: a /{prefix} network has no address for a client beside the DHCP server; use /30 or a shorter prefix"
    )]
    PrefixTooLong { cidr: Ipv4Net, prefix: u8 },
    #[error("{field} {ip} is not within subnet {cidr}")]
    NotInSubnet {
        field: &'static str,
        ip: Ipv4Addr,
        cidr: Ipv4Net,
    },
    #[error("pool end {end} is less than pool start {start}")]
    EndBeforeStart { start: Ipv4Addr, end: Ipv4Addr },
    #[error(
        "pool range {start}-{end} holds no usable address (network {network} and broadcast {broadcast} are never handed out)"
    )]
    EmptyRange {
        start: Ipv4Addr,
        end: Ipv4Addr,
        network: Ipv4Addr,
        broadcast: Ipv4Addr,
    },
    #[error("address {ip} is outside the pool range {start}-{end}")]
    OutsideRange {
        ip: Ipv4Addr,
        start: Ipv4Addr,
        end: Ipv4Addr,
    },
    #[error("address {ip} is the network address of {cidr} and cannot be assigned")]
    NetworkAddress { ip: Ipv4Addr, cidr: Ipv4Net },
    #[error("address {ip} is the broadcast address of {cidr} and cannot be assigned")]
    BroadcastAddress { ip: Ipv4Addr, cidr: Ipv4Net },
    #[error("address {ip} is excluded from the pool (spec.ipv4Config.pool.exclude)")]
    Excluded { ip: Ipv4Addr },
    #[error("address {ip} is reserved for the DHCP server or the router")]
    Reserved { ip: Ipv4Addr },
    #[error("address {ip} is already allocated")]
    AlreadyAllocated { ip: Ipv4Addr },
    #[error("address {ip} is not allocated")]
    NotAllocated { ip: Ipv4Addr },
    #[error(
        "no free address left in pool range {start}-{end} ({used} allocated, {blocked} excluded or reserved)"
    )]
    Exhausted {
        start: Ipv4Addr,
        end: Ipv4Addr,
        used: u32,
        blocked: u32,
    },
}

fn parse_v4(field: &'static str, text: &str) -> Result<Ipv4Addr, IpamError> {
    let text = text.trim();
    text.parse().map_err(|_| {
        if text.contains(':') {
            IpamError::Ipv6NotSupported {
                field,
                value: text.to_string(),
            }
        } else {
            IpamError::InvalidAddress {
                field,
                value: text.to_string(),
            }
        }
    })
}

/// Parses a CIDR the way upstream does (host bits allowed: `192.168.30.1/24` is the
/// network `192.168.30.0/24`).
pub fn parse_cidr(text: &str) -> Result<Ipv4Net, IpamError> {
    let text = text.trim();
    match text.parse::<ipnet::IpNet>() {
        Ok(ipnet::IpNet::V4(net)) => Ok(net.trunc()),
        Ok(ipnet::IpNet::V6(_)) => Err(IpamError::Ipv6NotSupported {
            field: "cidr",
            value: text.to_string(),
        }),
        Err(_) if text.contains(':') => Err(IpamError::Ipv6NotSupported {
            field: "cidr",
            value: text.to_string(),
        }),
        Err(_) => Err(IpamError::InvalidCidr {
            value: text.to_string(),
        }),
    }
}

/// What a pool's spec says about its addresses, parsed and checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolLayout {
    pub cidr: Ipv4Net,
    pub start: Ipv4Addr,
    pub end: Ipv4Addr,
    pub server_ip: Option<Ipv4Addr>,
    pub router: Option<Ipv4Addr>,
    pub exclude: Vec<Ipv4Addr>,
}

impl PoolLayout {
    /// Checks the addresses of an IPPool's `spec.ipv4Config`. An empty `serverIP` is allowed
    /// (the mutating webhook fills it in); every other address must parse.
    pub fn from_config(config: &IPv4Config) -> Result<Self, IpamError> {
        let cidr = parse_cidr(&config.cidr)?;
        if cidr.prefix_len() > 30 {
            return Err(IpamError::PrefixTooLong {
                cidr,
                prefix: cidr.prefix_len(),
            });
        }
        let in_subnet = |field: &'static str, ip: Ipv4Addr| {
            if cidr.contains(&ip) {
                Ok(ip)
            } else {
                Err(IpamError::NotInSubnet { field, ip, cidr })
            }
        };
        let start = in_subnet("pool start", parse_v4("pool start", &config.pool.start)?)?;
        let end = in_subnet("pool end", parse_v4("pool end", &config.pool.end)?)?;
        if end < start {
            return Err(IpamError::EndBeforeStart { start, end });
        }
        let server_ip = match config.server_ip.trim() {
            "" => None,
            text => Some(in_subnet("serverIP", parse_v4("serverIP", text)?)?),
        };
        let router = match config.router.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(text) => Some(in_subnet("router", parse_v4("router", text)?)?),
        };
        let exclude = config
            .pool
            .exclude
            .iter()
            .flatten()
            .map(|text| parse_v4("pool exclude entry", text))
            .collect::<Result<Vec<_>, _>>()?;
        let layout = PoolLayout {
            cidr,
            start,
            end,
            server_ip,
            router,
            exclude,
        };
        layout.host_span()?;
        Ok(layout)
    }

    /// The part of `[start, end]` that may ever be handed out: without the network and
    /// broadcast addresses.
    fn host_span(&self) -> Result<(u32, u32), IpamError> {
        let network = self.cidr.network();
        let broadcast = self.cidr.broadcast();
        let first = u32::from(self.start).max(u32::from(network) + 1);
        let last = u32::from(self.end).min(u32::from(broadcast) - 1);
        if first > last {
            return Err(IpamError::EmptyRange {
                start: self.start,
                end: self.end,
                network,
                broadcast,
            });
        }
        Ok((first, last))
    }
}

/// What one address of a pool is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddrState {
    Free,
    Allocated,
    Reserved,
    Excluded,
    /// Not part of the range (or the network/broadcast address): never handed out.
    OutOfRange,
}

/// Something in a `status.ipv4.allocated` map that rebuild could not take as it is. The
/// address is never handed out in any of these cases (safety first); the entry stays in
/// the map for an operator to look at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RebuildIssue {
    /// The key is not an IPv4 address.
    BadKey { key: String },
    /// An address outside the range holds a MAC.
    OutsideRange { ip: Ipv4Addr, value: String },
    /// The value is neither a MAC nor a known mark; the address is kept blocked.
    UnknownMark { ip: Ipv4Addr, value: String },
    /// A MAC holds an address the spec excludes or reserves.
    MacOnBlocked { ip: Ipv4Addr, value: String },
}

impl fmt::Display for RebuildIssue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::BadKey { key } => write!(f, "allocated key {key:?} is not an IPv4 address"),
            Self::OutsideRange { ip, value } => {
                write!(f, "{ip} ({value}) is outside the pool range")
            }
            Self::UnknownMark { ip, value } => write!(
                f,
                "{ip} is marked {value:?}, which is neither a MAC address nor {MARK_EXCLUDED}/{MARK_RESERVED}; it stays blocked"
            ),
            Self::MacOnBlocked { ip, value } => write!(
                f,
                "{ip} is allocated to {value} but the spec excludes or reserves it"
            ),
        }
    }
}

/// The allocation state of one pool.
#[derive(Clone, PartialEq, Eq)]
pub struct Ipam {
    layout: PoolLayout,
    /// First host address of the range, as a number; slot `i` is `base + i`.
    base: u32,
    slots: u32,
    /// 1 = not free (allocated, reserved, excluded, or padding past the last slot).
    occupied: Vec<u64>,
    /// 1 = allocated to a MAC.
    allocated: Vec<u64>,
    /// Reserved slots (server IP, router): at most a handful.
    reserved: Vec<u32>,
    used: u32,
    blocked: u32,
    /// No word before this one has a free slot.
    hint: usize,
}

impl fmt::Debug for Ipam {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ipam")
            .field("layout", &self.layout)
            .field("slots", &self.slots)
            .field("used", &self.used)
            .field("blocked", &self.blocked)
            .finish_non_exhaustive()
    }
}

const fn bit(slot: u32) -> (usize, u64) {
    ((slot / 64) as usize, 1u64 << (slot % 64))
}

impl Ipam {
    /// An empty pool: the server IP and router reserved and the exclusions taken out.
    pub fn new(layout: PoolLayout) -> Result<Self, IpamError> {
        let (first, last) = layout.host_span()?;
        let slots = last - first + 1;
        let words = slots.div_ceil(64) as usize;
        let mut occupied = vec![0u64; words];
        if slots % 64 != 0 {
            occupied[words - 1] = !0u64 << (slots % 64);
        }
        let mut ipam = Ipam {
            base: first,
            slots,
            occupied,
            allocated: vec![0u64; words],
            reserved: Vec::new(),
            used: 0,
            blocked: 0,
            hint: 0,
            layout,
        };
        for ip in [ipam.layout.server_ip, ipam.layout.router]
            .into_iter()
            .flatten()
        {
            ipam.block(ip, true);
        }
        for ip in ipam.layout.exclude.clone() {
            ipam.block(ip, false);
        }
        Ok(ipam)
    }

    /// Rebuilds a pool from `status.ipv4.allocated`. Entries it cannot take as they are are
    /// returned as issues; none of them makes an address allocatable.
    pub fn rebuild(
        layout: PoolLayout,
        allocated: &BTreeMap<String, String>,
    ) -> Result<(Self, Vec<RebuildIssue>), IpamError> {
        let mut ipam = Ipam::new(layout)?;
        let mut issues = Vec::new();
        for (key, value) in allocated {
            let Ok(ip) = key.trim().parse::<Ipv4Addr>() else {
                issues.push(RebuildIssue::BadKey { key: key.clone() });
                continue;
            };
            match value.as_str() {
                MARK_EXCLUDED | MARK_RESERVED => {
                    // Marks outside the range are normal (upstream writes every exclude entry).
                    if ipam.state(ip) == AddrState::Free {
                        ipam.block(ip, value == MARK_RESERVED);
                    }
                }
                mac if mac.parse::<MacAddr>().is_ok() => match ipam.state(ip) {
                    AddrState::Free => {
                        ipam.mark_allocated(ip);
                    }
                    AddrState::Allocated => {}
                    AddrState::Reserved | AddrState::Excluded => {
                        issues.push(RebuildIssue::MacOnBlocked {
                            ip,
                            value: value.clone(),
                        });
                    }
                    AddrState::OutOfRange => issues.push(RebuildIssue::OutsideRange {
                        ip,
                        value: value.clone(),
                    }),
                },
                _ => {
                    if ipam.state(ip) == AddrState::Free {
                        ipam.block(ip, false);
                    }
                    issues.push(RebuildIssue::UnknownMark {
                        ip,
                        value: value.clone(),
                    });
                }
            }
        }
        Ok((ipam, issues))
    }

    pub fn layout(&self) -> &PoolLayout {
        &self.layout
    }

    /// Addresses allocated to a MAC.
    pub fn used(&self) -> u32 {
        self.used
    }

    /// Addresses that can still be allocated.
    pub fn available(&self) -> u32 {
        self.slots - self.used - self.blocked
    }

    /// Heap and inline bytes this pool takes.
    pub fn memory_bytes(&self) -> usize {
        std::mem::size_of::<Self>()
            + (self.occupied.capacity() + self.allocated.capacity()) * 8
            + self.reserved.capacity() * 4
            + self.layout.exclude.capacity() * 4
    }

    fn slot(&self, ip: Ipv4Addr) -> Option<u32> {
        let n = u32::from(ip);
        (n >= self.base && n - self.base < self.slots).then(|| n - self.base)
    }

    pub fn state(&self, ip: Ipv4Addr) -> AddrState {
        let Some(slot) = self.slot(ip) else {
            return AddrState::OutOfRange;
        };
        let (w, m) = bit(slot);
        if self.allocated[w] & m != 0 {
            AddrState::Allocated
        } else if self.occupied[w] & m == 0 {
            AddrState::Free
        } else if self.reserved.contains(&slot) {
            AddrState::Reserved
        } else {
            AddrState::Excluded
        }
    }

    fn block(&mut self, ip: Ipv4Addr, reserved: bool) {
        if let Some(slot) = self.slot(ip) {
            let (w, m) = bit(slot);
            if self.occupied[w] & m == 0 {
                self.occupied[w] |= m;
                self.blocked += 1;
                if reserved {
                    self.reserved.push(slot);
                }
            }
        }
    }

    fn mark_allocated(&mut self, ip: Ipv4Addr) -> Ipv4Addr {
        if let Some(slot) = self.slot(ip) {
            let (w, m) = bit(slot);
            self.occupied[w] |= m;
            self.allocated[w] |= m;
            self.used += 1;
        }
        ip
    }

    /// Takes the lowest free address of the range.
    pub fn allocate_lowest(&mut self) -> Result<Ipv4Addr, IpamError> {
        while let Some(&word) = self.occupied.get(self.hint) {
            if word != !0 {
                let slot = self.hint as u32 * 64 + (!word).trailing_zeros();
                return Ok(self.mark_allocated(Ipv4Addr::from(self.base + slot)));
            }
            self.hint += 1;
        }
        Err(IpamError::Exhausted {
            start: self.layout.start,
            end: self.layout.end,
            used: self.used,
            blocked: self.blocked,
        })
    }

    /// The lowest free address that `skip` does not name, without taking it (the allocation
    /// store takes it by creating its object; `skip` holds the ones being created now).
    pub fn lowest_free(&self, skip: impl Fn(Ipv4Addr) -> bool) -> Result<Ipv4Addr, IpamError> {
        self.nth_free(0, skip)
    }

    /// The `n`-th lowest free address that `skip` does not name (or the last one there is,
    /// when fewer are free): admissions that lost a race spread out instead of all trying
    /// the next lowest one.
    pub fn nth_free(
        &self,
        n: usize,
        skip: impl Fn(Ipv4Addr) -> bool,
    ) -> Result<Ipv4Addr, IpamError> {
        let mut seen = 0;
        let mut last = None;
        for (w, &word) in self.occupied.iter().enumerate().skip(self.hint) {
            let mut free = !word;
            while free != 0 {
                let slot = w as u32 * 64 + free.trailing_zeros();
                let ip = Ipv4Addr::from(self.base + slot);
                if !skip(ip) {
                    if seen == n {
                        return Ok(ip);
                    }
                    seen += 1;
                    last = Some(ip);
                }
                free &= free - 1;
            }
        }
        if let Some(ip) = last {
            return Ok(ip);
        }
        Err(IpamError::Exhausted {
            start: self.layout.start,
            end: self.layout.end,
            used: self.used,
            blocked: self.blocked,
        })
    }

    /// Why `ip` cannot be allocated, or `Ok(())` when it is free.
    pub fn check_static(&self, ip: Ipv4Addr) -> Result<(), IpamError> {
        let cidr = self.layout.cidr;
        match self.state(ip) {
            AddrState::Free => Ok(()),
            AddrState::Allocated => Err(IpamError::AlreadyAllocated { ip }),
            AddrState::Reserved => Err(IpamError::Reserved { ip }),
            AddrState::Excluded => Err(IpamError::Excluded { ip }),
            AddrState::OutOfRange if !cidr.contains(&ip) => Err(IpamError::NotInSubnet {
                field: "address",
                ip,
                cidr,
            }),
            AddrState::OutOfRange if ip == cidr.network() => {
                Err(IpamError::NetworkAddress { ip, cidr })
            }
            AddrState::OutOfRange if ip == cidr.broadcast() => {
                Err(IpamError::BroadcastAddress { ip, cidr })
            }
            AddrState::OutOfRange => Err(IpamError::OutsideRange {
                ip,
                start: self.layout.start,
                end: self.layout.end,
            }),
        }
    }

    /// Takes exactly `ip` (a static request), or says precisely why not.
    pub fn allocate_static(&mut self, ip: Ipv4Addr) -> Result<Ipv4Addr, IpamError> {
        self.check_static(ip)?;
        Ok(self.mark_allocated(ip))
    }

    /// Gives an allocated address back to the pool.
    pub fn release(&mut self, ip: Ipv4Addr) -> Result<(), IpamError> {
        let slot = self
            .slot(ip)
            .filter(|_| self.state(ip) == AddrState::Allocated)
            .ok_or(IpamError::NotAllocated { ip })?;
        let (w, m) = bit(slot);
        self.occupied[w] &= !m;
        self.allocated[w] &= !m;
        self.used -= 1;
        self.hint = self.hint.min(w);
        Ok(())
    }

    /// Every address that is not free, with its state, in address order.
    pub fn taken(&self) -> impl Iterator<Item = (Ipv4Addr, AddrState)> + '_ {
        (0..self.slots)
            .filter(|&slot| {
                let (w, m) = bit(slot);
                self.occupied[w] & m != 0
            })
            .map(|slot| {
                let ip = Ipv4Addr::from(self.base + slot);
                (ip, self.state(ip))
            })
    }
}

#[cfg(test)]
mod tests;
