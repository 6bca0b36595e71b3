//! The lease table: a pure function of one pool, recomputed from scratch on every change.
//! In the cluster its inputs are the IPPool's spec (options, exclusions, server IP, router)
//! and the pool's allocations as its `IPPoolAddress` objects hold them
//! ([`LeaseTable::from_allocations`]); offline, one IPPool manifest whose
//! `status.ipv4.allocated` lists the leases ([`LeaseTable::from_pool`]). Nothing is patched in
//! place, so an edit of the pool's options reaches every client at its next renewal and a
//! restarted agent serves every lease at once (the Go agent applies diffs and snapshots the
//! options into each lease at creation: harvester/harvester#7015).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr};

use ipnet::Ipv4Net;

use super::search::{DomainError, check_domain, encode_domain_search};
use crate::crd::{IPPool, IPv4Config, MARK_EXCLUDED, MARK_RESERVED};
use crate::ipam::{IpamError, parse_cidr};
use crate::mac::MacAddr;

/// Lease time when the pool sets none (or a value ≤ 0). A documented deviation: the Go
/// agent uses one year, so an option edit could take months to reach a client.
pub const DEFAULT_LEASE_TIME: u32 = 3600;

/// The DHCP options of a pool, parsed and ready for the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolOptions {
    /// Server identifier (option 54) and the address replies come from.
    pub server_ip: Ipv4Addr,
    /// The subnet; its mask is option 1.
    pub subnet: Ipv4Net,
    /// Option 3, only when the pool sets a router.
    pub router: Option<Ipv4Addr>,
    /// Option 6.
    pub dns: Vec<Ipv4Addr>,
    /// Option 15.
    pub domain_name: Option<String>,
    /// Option 119, as the pool lists it.
    pub domain_search: Vec<String>,
    /// Option 119 in RFC 3397 wire format (empty when there is no search list).
    pub domain_search_wire: Vec<u8>,
    /// Option 42: addresses; host names were resolved by the adapter.
    pub ntp: Vec<Ipv4Addr>,
    /// Option 51, seconds.
    pub lease_time: u32,
}

impl PoolOptions {
    pub fn subnet_mask(&self) -> Ipv4Addr {
        self.subnet.netmask()
    }

    /// T1 (option 58): 50 % of the lease, as RFC 2131 §4.4.5 suggests.
    pub fn renewal_time(&self) -> u32 {
        self.lease_time / 2
    }

    /// T2 (option 59): 87.5 % of the lease (RFC 2131 §4.4.5).
    pub fn rebinding_time(&self) -> u32 {
        // u64: 7 × lease time overflows u32 above ~19 years.
        (u64::from(self.lease_time) * 7 / 8) as u32
    }
}

/// The pool cannot be served at all.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TableError {
    #[error("IPPool {pool} has no spec.ipv4Config; there is nothing to serve")]
    NoIpv4Config { pool: String },
    #[error(
        "IPPool {pool} has no spec.ipv4Config.serverIP; the agent needs it as the DHCP server identifier (the webhook fills it in on create)"
    )]
    NoServerIp { pool: String },
    #[error("IPPool {pool}: {source}")]
    Address {
        pool: String,
        #[source]
        source: IpamError,
    },
    #[error("IPPool {pool}: serverIP {server_ip} is not within cidr {cidr}")]
    ServerOutsideSubnet {
        pool: String,
        server_ip: Ipv4Addr,
        cidr: Ipv4Net,
    },
}

/// Something in the pool that the table leaves out; the rest is served. The adapter logs
/// these so that an operator sees why a client gets no answer or misses an option.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TableIssue {
    /// A `status.ipv4.allocated` key is not an IPv4 address.
    BadAddress {
        key: String,
    },
    /// A `status.ipv4.allocated` value is neither a MAC nor EXCLUDED/RESERVED.
    BadMac {
        ip: Ipv4Addr,
        value: String,
    },
    /// An allocated address is outside the pool's subnet: a client could not use it.
    OutsideSubnet {
        ip: Ipv4Addr,
        mac: MacAddr,
    },
    /// One MAC holds two addresses; the lower one is served.
    DuplicateMac {
        mac: MacAddr,
        served: Ipv4Addr,
        ignored: Ipv4Addr,
    },
    /// An allocation of an address that is not IPv4 (a DHCPv4 agent cannot lease it).
    NotIpv4 {
        ip: IpAddr,
        mac: MacAddr,
    },
    /// An allocation of an address the pool's spec keeps from clients.
    Blocked {
        ip: Ipv4Addr,
        mac: MacAddr,
        why: Blocked,
    },
    BadRouter {
        value: String,
    },
    BadDns {
        value: String,
    },
    BadNtp {
        value: String,
    },
    /// An NTP host name with no resolved IPv4 address (yet).
    UnresolvedNtp {
        name: String,
    },
    BadDomainName {
        error: DomainError,
    },
    BadDomainSearch {
        error: DomainError,
    },
}

impl fmt::Display for TableIssue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::BadAddress { key } => write!(
                f,
                "status.ipv4.allocated key {key:?} is not an IPv4 address; entry ignored"
            ),
            Self::BadMac { ip, value } => write!(
                f,
                "status.ipv4.allocated[{ip}] is {value:?}, which is neither a MAC address nor {MARK_EXCLUDED}/{MARK_RESERVED}; no lease for it"
            ),
            Self::OutsideSubnet { ip, mac } => write!(
                f,
                "{ip} (allocated to {mac}) is outside the pool's cidr; no lease for it"
            ),
            Self::DuplicateMac {
                mac,
                served,
                ignored,
            } => write!(
                f,
                "MAC {mac} holds both {served} and {ignored}; serving {served} (one allocation is stale: remove it)"
            ),
            Self::NotIpv4 { ip, mac } => write!(
                f,
                "{ip} (allocated to {mac}) is not an IPv4 address; no DHCPv4 lease for it"
            ),
            Self::Blocked { ip, mac, why } => write!(
                f,
                "{ip} (allocated to {mac}) is {why}; no lease for it (release the allocation)"
            ),
            Self::BadRouter { value } => write!(
                f,
                "router {value:?} is not an IPv4 address; option 3 left out"
            ),
            Self::BadDns { value } => write!(
                f,
                "dns entry {value:?} is not an IPv4 address; left out of option 6"
            ),
            Self::BadNtp { value } => write!(
                f,
                "ntp entry {value:?} is neither an IPv4 address nor a host name; left out of option 42"
            ),
            Self::UnresolvedNtp { name } => write!(
                f,
                "ntp server {name:?} has no resolved IPv4 address; left out of option 42 until it resolves"
            ),
            Self::BadDomainName { error } => write!(f, "domainName left out (option 15): {error}"),
            Self::BadDomainSearch { error } => {
                write!(f, "domainSearch left out (option 119): {error}")
            }
        }
    }
}

/// Why the spec keeps an address from clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Blocked {
    /// `spec.ipv4Config.serverIP`: the agent itself answers from it.
    ServerIp,
    /// `spec.ipv4Config.router`.
    Router,
    /// Listed in `spec.ipv4Config.pool.exclude`.
    Excluded,
}

impl fmt::Display for Blocked {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::ServerIp => "the pool's serverIP",
            Self::Router => "the pool's router",
            Self::Excluded => "excluded by spec.ipv4Config.pool.exclude",
        })
    }
}

/// MAC → address for one pool, plus the pool's options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseTable {
    pool: String,
    options: PoolOptions,
    by_mac: HashMap<MacAddr, Ipv4Addr>,
    issues: Vec<TableIssue>,
}

/// What one NTP entry of the pool is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NtpEntry {
    Address(Ipv4Addr),
    /// A host name the adapter has to resolve.
    Name(String),
    Invalid(String),
}

pub fn classify_ntp(entry: &str) -> NtpEntry {
    let entry = entry.trim();
    if let Ok(ip) = entry.parse::<Ipv4Addr>() {
        return NtpEntry::Address(ip);
    }
    // A host name is a domain name with at least one letter (so "1.2.3" is not one).
    if check_domain(entry).is_ok() && entry.bytes().any(|b| b.is_ascii_alphabetic()) {
        NtpEntry::Name(entry.to_string())
    } else {
        NtpEntry::Invalid(entry.to_string())
    }
}

/// The NTP host names of a pool: what the adapter resolves before it builds the table.
pub fn ntp_names(pool: &IPPool) -> Vec<String> {
    let mut names: Vec<String> = pool
        .spec
        .ipv4_config
        .iter()
        .flat_map(|c| c.ntp.iter().flatten())
        .filter_map(|e| match classify_ntp(e) {
            NtpEntry::Name(name) => Some(name),
            _ => None,
        })
        .collect();
    names.sort();
    names.dedup();
    names
}

fn pool_name(pool: &IPPool) -> String {
    match (&pool.metadata.namespace, &pool.metadata.name) {
        (Some(ns), Some(name)) => format!("{ns}/{name}"),
        (None, Some(name)) => name.clone(),
        _ => "<unnamed>".to_string(),
    }
}

impl LeaseTable {
    /// Computes the table from a whole pool whose `status.ipv4.allocated` lists the leases
    /// (the offline mode's manifest). `ntp_resolved` maps each NTP host name of the pool (see
    /// [`ntp_names`]) to its IPv4 addresses; a name missing there is left out and reported.
    pub fn from_pool(
        pool: &IPPool,
        ntp_resolved: &BTreeMap<String, Vec<Ipv4Addr>>,
    ) -> Result<Self, TableError> {
        let name = pool_name(pool);
        let config = pool
            .spec
            .ipv4_config
            .as_ref()
            .ok_or_else(|| TableError::NoIpv4Config { pool: name.clone() })?;
        let mut issues = Vec::new();
        let options = parse_options(&name, config, ntp_resolved, &mut issues)?;
        let mut leases = Leases::new(&options, 0);
        let allocated = pool
            .status
            .as_ref()
            .and_then(|s| s.ipv4.as_ref())
            .and_then(|v4| v4.allocated.as_ref());
        for (key, value) in allocated.into_iter().flatten() {
            if value == MARK_EXCLUDED || value == MARK_RESERVED {
                continue;
            }
            let Ok(ip) = key.trim().parse::<Ipv4Addr>() else {
                issues.push(TableIssue::BadAddress { key: key.clone() });
                continue;
            };
            let Ok(mac) = value.parse::<MacAddr>() else {
                issues.push(TableIssue::BadMac {
                    ip,
                    value: value.clone(),
                });
                continue;
            };
            leases.add(ip, mac, &mut issues);
        }
        Ok(LeaseTable {
            pool: name,
            by_mac: leases.by_mac,
            options,
            issues,
        })
    }

    /// Computes the table from a pool's spec (options, exclusions, server IP, router) and
    /// its allocations as the pool's address objects hold them; the pool's status is not
    /// read. An allocation of the server IP, the router or an excluded address is left out
    /// and reported (the spec keeps those from clients), as is one outside the subnet or
    /// not IPv4; a MAC holding two addresses gets the lower one.
    pub fn from_allocations(
        pool: &IPPool,
        allocations: impl IntoIterator<Item = (IpAddr, MacAddr)>,
        ntp_resolved: &BTreeMap<String, Vec<Ipv4Addr>>,
    ) -> Result<Self, TableError> {
        let name = pool_name(pool);
        let config = pool
            .spec
            .ipv4_config
            .as_ref()
            .ok_or_else(|| TableError::NoIpv4Config { pool: name.clone() })?;
        let mut issues = Vec::new();
        let options = parse_options(&name, config, ntp_resolved, &mut issues)?;
        // The CRD validates each entry as IPv4; one that does not parse blocks nothing.
        let excluded: HashSet<Ipv4Addr> = config
            .pool
            .exclude
            .iter()
            .flatten()
            .filter_map(|e| e.trim().parse().ok())
            .collect();
        let allocations = allocations.into_iter();
        let mut leases = Leases::new(&options, allocations.size_hint().0);
        for (ip, mac) in allocations {
            let IpAddr::V4(ip) = ip else {
                issues.push(TableIssue::NotIpv4 { ip, mac });
                continue;
            };
            let why = if ip == options.server_ip {
                Some(Blocked::ServerIp)
            } else if options.router == Some(ip) {
                Some(Blocked::Router)
            } else if excluded.contains(&ip) {
                Some(Blocked::Excluded)
            } else {
                None
            };
            if let Some(why) = why {
                issues.push(TableIssue::Blocked { ip, mac, why });
                continue;
            }
            leases.add(ip, mac, &mut issues);
        }
        Ok(LeaseTable {
            pool: name,
            by_mac: leases.by_mac,
            options,
            issues,
        })
    }

    /// `<namespace>/<name>` of the pool this table serves.
    pub fn pool(&self) -> &str {
        &self.pool
    }

    pub fn options(&self) -> &PoolOptions {
        &self.options
    }

    /// The address allocated to a MAC (MACs are canonical, so case never matters).
    pub fn address_of(&self, mac: &MacAddr) -> Option<Ipv4Addr> {
        self.by_mac.get(mac).copied()
    }

    pub fn len(&self) -> usize {
        self.by_mac.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_mac.is_empty()
    }

    /// Every lease, by address.
    pub fn leases(&self) -> Vec<(MacAddr, Ipv4Addr)> {
        let mut leases: Vec<(MacAddr, Ipv4Addr)> =
            self.by_mac.iter().map(|(m, ip)| (*m, *ip)).collect();
        leases.sort_by_key(|(mac, ip)| (*ip, *mac));
        leases
    }

    /// What the table left out of the pool, for the adapter to log.
    pub fn issues(&self) -> &[TableIssue] {
        &self.issues
    }
}

/// The MAC → address map being filled, with the checks both sources share.
struct Leases<'a> {
    options: &'a PoolOptions,
    by_mac: HashMap<MacAddr, Ipv4Addr>,
}

impl<'a> Leases<'a> {
    fn new(options: &'a PoolOptions, capacity: usize) -> Self {
        Leases {
            options,
            by_mac: HashMap::with_capacity(capacity),
        }
    }

    fn add(&mut self, ip: Ipv4Addr, mac: MacAddr, issues: &mut Vec<TableIssue>) {
        if !self.options.subnet.contains(&ip) {
            issues.push(TableIssue::OutsideSubnet { ip, mac });
            return;
        }
        match self.by_mac.get_mut(&mac) {
            None => {
                self.by_mac.insert(mac, ip);
            }
            Some(held) => {
                // Sources iterate in any order (status keys in string order); serve the
                // numerically lowest address so the choice does not depend on it.
                let (served, ignored) = if ip < *held { (ip, *held) } else { (*held, ip) };
                *held = served;
                issues.push(TableIssue::DuplicateMac {
                    mac,
                    served,
                    ignored,
                });
            }
        }
    }
}

fn parse_options(
    pool: &str,
    config: &IPv4Config,
    ntp_resolved: &BTreeMap<String, Vec<Ipv4Addr>>,
    issues: &mut Vec<TableIssue>,
) -> Result<PoolOptions, TableError> {
    let address_error = |source| TableError::Address {
        pool: pool.to_string(),
        source,
    };
    let subnet = parse_cidr(&config.cidr).map_err(address_error)?;
    let server_text = config.server_ip.trim();
    if server_text.is_empty() {
        return Err(TableError::NoServerIp {
            pool: pool.to_string(),
        });
    }
    let server_ip: Ipv4Addr = server_text.parse().map_err(|_| {
        address_error(IpamError::InvalidAddress {
            field: "serverIP",
            value: server_text.to_string(),
        })
    })?;
    if !subnet.contains(&server_ip) {
        return Err(TableError::ServerOutsideSubnet {
            pool: pool.to_string(),
            server_ip,
            cidr: subnet,
        });
    }
    let router = match config.router.as_deref().map(str::trim) {
        None | Some("") => None,
        Some(text) => match text.parse() {
            Ok(ip) => Some(ip),
            Err(_) => {
                issues.push(TableIssue::BadRouter {
                    value: text.to_string(),
                });
                None
            }
        },
    };
    let mut dns = Vec::new();
    for entry in config.dns.iter().flatten() {
        match entry.trim().parse() {
            Ok(ip) => dns.push(ip),
            Err(_) => issues.push(TableIssue::BadDns {
                value: entry.clone(),
            }),
        }
    }
    let mut ntp = Vec::new();
    for entry in config.ntp.iter().flatten() {
        match classify_ntp(entry) {
            NtpEntry::Address(ip) => ntp.push(ip),
            NtpEntry::Name(name) => match ntp_resolved.get(&name) {
                Some(addrs) if !addrs.is_empty() => ntp.extend(addrs.iter().copied()),
                _ => issues.push(TableIssue::UnresolvedNtp { name }),
            },
            NtpEntry::Invalid(value) => issues.push(TableIssue::BadNtp { value }),
        }
    }
    let mut seen = Vec::with_capacity(ntp.len());
    ntp.retain(|ip| {
        let fresh = !seen.contains(ip);
        seen.push(*ip);
        fresh
    });
    let domain_name = match config.domain_name.as_deref().map(str::trim) {
        None | Some("") => None,
        Some(name) => match check_domain(name) {
            Ok(()) => Some(name.to_string()),
            Err(error) => {
                issues.push(TableIssue::BadDomainName { error });
                None
            }
        },
    };
    let domain_search: Vec<String> = config
        .domain_search
        .iter()
        .flatten()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect();
    let (domain_search, domain_search_wire) = match encode_domain_search(&domain_search) {
        Ok(wire) => (domain_search, wire),
        Err(error) => {
            issues.push(TableIssue::BadDomainSearch { error });
            (Vec::new(), Vec::new())
        }
    };
    let lease_time = match config.lease_time {
        Some(t) if t > 0 => u32::try_from(t).unwrap_or(u32::MAX),
        _ => DEFAULT_LEASE_TIME,
    };
    Ok(PoolOptions {
        server_ip,
        subnet,
        router,
        dns,
        domain_name,
        domain_search,
        domain_search_wire,
        ntp,
        lease_time,
    })
}
