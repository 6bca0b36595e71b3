//! The pure domain of vm-dhcp: custom resource types, IPAM, MAC rules, and DHCP (lease
//! table and reply decision).
//!
//! Nothing here does I/O: no async runtime, no Kubernetes client, no sockets. Adapters
//! (webhook, apiserver, the binary) call into it; it is tested with plain `cargo test`.

pub mod admission;
pub mod alloc;
pub mod controller;
pub mod crd;
pub mod dhcp;
pub mod ipam;
pub mod kubevirt;
pub mod lease;
pub mod mac;
pub mod nics;
pub mod store;

pub use ipam::{AddrState, Ipam, IpamError, PoolLayout, RebuildIssue};
pub use mac::{MacAddr, MacError};
