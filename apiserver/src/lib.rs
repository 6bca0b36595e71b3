//! The aggregated API `dhcp.harvesterhci.io/v1alpha1`: read-only views of the IPAM, served
//! the way kube-apiserver's aggregator, kubectl and Rancher Steve expect.
//! Never `network.harvesterhci.io`: an APIService there would hide the CRDs of that group.
//!
//! - [`views`]: the objects, computed purely from the IPPoolAddress objects, the IPPool spec
//!   and the agents' lease documents;
//! - [`store`]: the engine holding sources, views and their change history; it applies the
//!   writes of both kinds in etcd revision order, so every replica gives a change the same
//!   resourceVersion (see its documentation for the rule);
//! - [`http`]: the axum Router (discovery, OpenAPI, get/list/watch, Table, Status errors,
//!   authentication and authorization);
//! - [`auth`]: front-proxy authentication and SubjectAccessReview authorization;
//! - [`selector`]: label and field selector parsing;
//! - [`metrics`]: requests, watches, view sizes and engine timing for `/metrics`.
//!
//! The binary (`vm-dhcp apiserver`) feeds the engine (a snapshot of the IPPools and their
//! IPPoolAddress objects at one revision, then their watches; the agent pods and the agents'
//! lease documents), verifies the aggregator's client certificate in TLS and posts the
//! SubjectAccessReviews.

pub mod auth;
pub mod discovery;
pub mod http;
pub mod metrics;
pub mod resources;
pub mod selector;
pub mod store;
pub mod views;

pub use discovery::{api_group, api_resource_list};
pub use http::{ApiServer, router};
pub use resources::Resource;
pub use store::{Change, Engine, PoolIdentity, SourceKind, SourceObject};

pub const GROUP: &str = "dhcp.harvesterhci.io";
pub const VERSION: &str = "v1alpha1";

pub fn group_version() -> String {
    format!("{GROUP}/{VERSION}")
}
