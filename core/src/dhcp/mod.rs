//! DHCPv4 for one pool, without I/O: the lease table computed from an IPPool, the RFC 2131
//! reply decision, the reply's wire format and the lease book (activity the agent
//! observes). The agent adapter owns sockets, clocks, files and counters.

pub mod book;
pub mod decide;
pub mod search;
pub mod table;
pub mod wire;

pub use book::{Activity, LeaseBook, LeaseState, LeaseView};
pub use decide::{
    ClientState, Decision, Destination, LeaseEvent, Malformed, NoReply, Outgoing, Processed, Reply,
    decide, message_type_label, process,
};
pub use search::{DomainError, encode_domain_search};
pub use table::{
    Blocked, DEFAULT_LEASE_TIME, LeaseTable, PoolOptions, TableError, TableIssue, ntp_names,
};
pub use wire::ReplyPacket;

#[cfg(test)]
mod tests;
