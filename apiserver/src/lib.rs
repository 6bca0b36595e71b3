//! The aggregated API `dhcp.harvesterhci.io/v1alpha1`: read-only views of the IPAM.
//! Never `network.harvesterhci.io`: an APIService there would hide the CRDs of that group.

use axum::Json;
use axum::Router;
use axum::routing::get;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{
    APIGroup, APIResource, APIResourceList, GroupVersionForDiscovery,
};

pub const GROUP: &str = "dhcp.harvesterhci.io";
pub const VERSION: &str = "v1alpha1";

fn group_version() -> String {
    format!("{GROUP}/{VERSION}")
}

/// The resources this server serves, as discovery lists them.
pub fn resources() -> Vec<APIResource> {
    vec![APIResource {
        name: "ipamallocations".into(),
        singular_name: "ipamallocation".into(),
        kind: "IPAMAllocation".into(),
        namespaced: true,
        short_names: Some(vec!["ipamalloc".into()]),
        categories: Some(vec!["vm-dhcp".into()]),
        verbs: vec!["get".into(), "list".into(), "watch".into()],
        ..Default::default()
    }]
}

pub fn api_group() -> APIGroup {
    let version = GroupVersionForDiscovery {
        group_version: group_version(),
        version: VERSION.into(),
    };
    APIGroup {
        name: GROUP.into(),
        preferred_version: Some(version.clone()),
        versions: vec![version],
        server_address_by_client_cidrs: None,
    }
}

pub fn api_resource_list() -> APIResourceList {
    APIResourceList {
        group_version: group_version(),
        resources: resources(),
    }
}

/// The discovery routes (the served resources come with the aggregated API issue).
pub fn router() -> Router {
    Router::new()
        .route(
            &format!("/apis/{GROUP}"),
            get(|| async { Json(api_group()) }),
        )
        .route(
            &format!("/apis/{GROUP}/{VERSION}"),
            get(|| async { Json(api_resource_list()) }),
        )
}
