//! The lease book: what only the agent knows about each lease (when it was offered, bound,
//! released or declined, and when the client was last heard from). The allocation itself
//! lives in the IPPool; this is activity, served over HTTP by the active agent and lost on
//! restart without harm (a client renewing after a restart is simply bound again).

use std::collections::HashMap;
use std::net::Ipv4Addr;

use super::decide::LeaseEvent;
use super::table::LeaseTable;
use crate::mac::MacAddr;

/// The state of one allocation as the agent sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseState {
    /// Allocated in the pool, never heard from since this agent started.
    StaticNeverSeen,
    Offered,
    Bound,
    /// Bound once, and the lease ran out without a renewal.
    Expired,
    Released,
    /// The client reported the address in use by another host.
    Declined,
}

impl LeaseState {
    pub fn as_str(self) -> &'static str {
        match self {
            LeaseState::StaticNeverSeen => "static-never-seen",
            LeaseState::Offered => "offered",
            LeaseState::Bound => "bound",
            LeaseState::Expired => "expired",
            LeaseState::Released => "released",
            LeaseState::Declined => "declined",
        }
    }
}

/// Times are seconds since the Unix epoch; the adapter passes the clock in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Activity {
    pub ip: Ipv4Addr,
    pub state: LeaseState,
    pub lease_start: Option<u64>,
    pub expires: Option<u64>,
    pub last_seen: u64,
    pub declines: u32,
}

/// One row of the lease view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseView {
    pub mac: MacAddr,
    pub ip: Ipv4Addr,
    pub state: LeaseState,
    pub lease_start: Option<u64>,
    pub expires: Option<u64>,
    pub last_seen: Option<u64>,
    pub declines: u32,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LeaseBook {
    by_mac: HashMap<MacAddr, Activity>,
}

impl LeaseBook {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records what a decision taught us. `lease_time` is the pool's, in seconds.
    pub fn record(&mut self, event: &LeaseEvent, lease_time: u32, now: u64) {
        let (mac, ip) = match *event {
            LeaseEvent::Offered { mac, ip }
            | LeaseEvent::Acked { mac, ip }
            | LeaseEvent::Released { mac, ip }
            | LeaseEvent::Declined { mac, ip } => (mac, Some(ip)),
            LeaseEvent::Naked { mac, .. } | LeaseEvent::Informed { mac } => (mac, None),
        };
        let entry = match (self.by_mac.get_mut(&mac), ip) {
            (Some(entry), _) => entry,
            (None, Some(ip)) => self.by_mac.entry(mac).or_insert(Activity {
                ip,
                state: LeaseState::StaticNeverSeen,
                lease_start: None,
                expires: None,
                last_seen: now,
                declines: 0,
            }),
            // A NAK or INFORM for a client with no lease activity yet: nothing to record
            // beyond "seen", which the view shows once it has an address.
            (None, None) => return,
        };
        entry.last_seen = now;
        match *event {
            LeaseEvent::Offered { ip, .. } => {
                entry.ip = ip;
                entry.state = LeaseState::Offered;
            }
            LeaseEvent::Acked { ip, .. } => {
                entry.ip = ip;
                entry.state = LeaseState::Bound;
                entry.lease_start = Some(now);
                entry.expires = Some(now.saturating_add(u64::from(lease_time)));
            }
            LeaseEvent::Released { .. } => {
                entry.state = LeaseState::Released;
                entry.expires = Some(now);
            }
            LeaseEvent::Declined { .. } => {
                entry.state = LeaseState::Declined;
                entry.declines = entry.declines.saturating_add(1);
            }
            LeaseEvent::Naked { .. } | LeaseEvent::Informed { .. } => {}
        }
    }

    /// Forgets activity of MACs the table no longer holds, or holds at another address
    /// (the allocation changed: old activity says nothing about the new one).
    pub fn retain_table(&mut self, table: &LeaseTable) {
        self.by_mac
            .retain(|mac, activity| table.address_of(mac) == Some(activity.ip));
    }

    pub fn get(&self, mac: &MacAddr) -> Option<&Activity> {
        self.by_mac.get(mac)
    }

    /// One row per lease of the table, by address.
    pub fn view(&self, table: &LeaseTable, now: u64) -> Vec<LeaseView> {
        table
            .leases()
            .into_iter()
            .map(
                |(mac, ip)| match self.by_mac.get(&mac).filter(|a| a.ip == ip) {
                    None => LeaseView {
                        mac,
                        ip,
                        state: LeaseState::StaticNeverSeen,
                        lease_start: None,
                        expires: None,
                        last_seen: None,
                        declines: 0,
                    },
                    Some(a) => LeaseView {
                        mac,
                        ip,
                        state: match (a.state, a.expires) {
                            (LeaseState::Bound, Some(exp)) if exp <= now => LeaseState::Expired,
                            (state, _) => state,
                        },
                        lease_start: a.lease_start,
                        expires: a.expires,
                        last_seen: Some(a.last_seen),
                        declines: a.declines,
                    },
                },
            )
            .collect()
    }
}
