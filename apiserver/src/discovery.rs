//! Discovery (legacy and aggregated v2) and OpenAPI v2/v3 documents.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{
    APIGroup, APIGroupList, APIResource, APIResourceList, GroupVersionForDiscovery,
};
use serde_json::{Map, Value, json};

use crate::resources::Resource;
use crate::{GROUP, VERSION, group_version};

pub const V2_MEDIA_TYPE: &str =
    "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList";

const VERBS: [&str; 3] = ["get", "list", "watch"];

/// The resources this server serves, as legacy discovery lists them.
pub fn resources() -> Vec<APIResource> {
    Resource::ALL
        .into_iter()
        .map(|r| {
            let d = r.def();
            APIResource {
                name: d.plural.into(),
                singular_name: d.singular.into(),
                kind: d.kind.into(),
                namespaced: true,
                short_names: Some(d.short_names.iter().map(|s| s.to_string()).collect()),
                categories: Some(vec!["vm-dhcp".into()]),
                verbs: VERBS.iter().map(|v| v.to_string()).collect(),
                ..Default::default()
            }
        })
        .collect()
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

pub fn api_group_list() -> APIGroupList {
    APIGroupList {
        groups: vec![api_group()],
    }
}

pub fn api_resource_list() -> APIResourceList {
    APIResourceList {
        group_version: group_version(),
        resources: resources(),
    }
}

/// `apidiscovery.k8s.io/v2` `APIGroupDiscoveryList` (with kind and apiVersion: the
/// aggregator decodes it by type).
pub fn aggregated_v2() -> Value {
    let resources: Vec<Value> = Resource::ALL
        .into_iter()
        .map(|r| {
            let d = r.def();
            json!({
                "resource": d.plural,
                "responseKind": {"group": GROUP, "version": VERSION, "kind": d.kind},
                "scope": "Namespaced",
                "singularResource": d.singular,
                "verbs": VERBS,
                "shortNames": d.short_names,
                "categories": ["vm-dhcp"],
            })
        })
        .collect();
    json!({
        "kind": "APIGroupDiscoveryList",
        "apiVersion": "apidiscovery.k8s.io/v2",
        "metadata": {},
        "items": [{
            "metadata": {"name": GROUP, "creationTimestamp": null},
            "versions": [{"version": VERSION, "resources": resources, "freshness": "Current"}]
        }]
    })
}

/// A stable ETag for a document (FNV-1a of its JSON).
pub fn etag(doc: &Value) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in doc.to_string().as_bytes() {
        hash ^= u64::from(*b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    format!("\"{hash:016X}\"")
}

const META_PREFIX: &str = "io.k8s.apimachinery.pkg.apis.meta.v1";
const OUR_PREFIX: &str = "io.harvesterhci.dhcp.v1alpha1";

fn kind_schema(r: Resource, refs: &str) -> Value {
    let d = r.def();
    let mut props = Map::new();
    props.insert(
        "apiVersion".into(),
        json!({"type": "string", "description": "APIVersion defines the versioned schema of this representation of an object: dhcp.harvesterhci.io/v1alpha1."}),
    );
    props.insert(
        "kind".into(),
        json!({"type": "string", "description": format!("Kind is the type of this object: {}.", d.kind)}),
    );
    props.insert(
        "metadata".into(),
        json!({"description": "Standard object's metadata: the name is <pool>.<address or MAC with dashes>, the namespace the IPPool's.",
               "allOf": [{"$ref": format!("{refs}{META_PREFIX}.ObjectMeta")}], "default": {}}),
    );
    for (name, type_, description) in d.fields {
        props.insert(
            (*name).into(),
            json!({"type": type_, "description": description}),
        );
    }
    json!({
        "description": d.description,
        "type": "object",
        "properties": props,
        "x-kubernetes-group-version-kind": [{"group": GROUP, "kind": d.kind, "version": VERSION}],
    })
}

fn list_schema(r: Resource, refs: &str) -> Value {
    let d = r.def();
    json!({
        "description": format!("{}List is a list of {}.", d.kind, d.kind),
        "type": "object",
        "required": ["items"],
        "properties": {
            "apiVersion": {"type": "string", "description": "APIVersion of this list."},
            "kind": {"type": "string", "description": "Kind of this list."},
            "items": {"type": "array", "description": format!("The {}.", d.plural),
                      "items": {"allOf": [{"$ref": format!("{refs}{OUR_PREFIX}.{}", d.kind)}], "default": {}}},
            "metadata": {"description": "Standard list metadata.", "allOf": [{"$ref": format!("{refs}{META_PREFIX}.ListMeta")}], "default": {}},
        },
        "x-kubernetes-group-version-kind": [{"group": GROUP, "kind": format!("{}List", d.kind), "version": VERSION}],
    })
}

/// The metadata types, so that the per-group-version OpenAPI v3 document stands alone (as
/// kube-apiserver's own per-group documents do).
fn meta_schemas() -> Vec<(String, Value)> {
    let s = |d: &str| json!({"type": "string", "description": d});
    vec![
        (
            format!("{META_PREFIX}.ObjectMeta"),
            json!({
                "description": "ObjectMeta is metadata that all persisted resources must have.",
                "type": "object",
                "properties": {
                    "name": s("Name must be unique within a namespace."),
                    "namespace": s("Namespace defines the space within which each name must be unique."),
                    "resourceVersion": s("An opaque value that represents the internal version of this object; here a number derived from the source objects' versions."),
                    "labels": {"type": "object", "additionalProperties": {"type": "string", "default": ""},
                               "description": "Map of string keys and values that can be used to organize and categorize objects."},
                    "annotations": {"type": "object", "additionalProperties": {"type": "string", "default": ""},
                                    "description": "Annotations is an unstructured key value map."},
                    "creationTimestamp": s("CreationTimestamp is a timestamp representing the server time when this object was created."),
                    "uid": s("UID is the unique in time and space value for this object."),
                },
            }),
        ),
        (
            format!("{META_PREFIX}.ListMeta"),
            json!({
                "description": "ListMeta describes metadata that synthetic resources must have.",
                "type": "object",
                "properties": {
                    "resourceVersion": s("String that identifies the server's internal version of this list."),
                    "continue": s("Set when more items are available: pass it as ?continue= to get them."),
                    "remainingItemCount": {"type": "integer", "format": "int64", "description": "The number of items left after this page."},
                },
            }),
        ),
    ]
}

fn paths(list_ref: impl Fn(Resource) -> Value, item_ref: impl Fn(Resource) -> Value) -> Value {
    let mut paths = Map::new();
    let gv = format!("/apis/{GROUP}/{VERSION}");
    for r in Resource::ALL {
        let d = r.def();
        let gvk = json!({"group": GROUP, "version": VERSION, "kind": d.kind});
        let op = |action: &str, description: String, response: Value, id: String| {
            json!({"get": {
                "description": description, "operationId": id, "tags": [format!("{GROUP}_{VERSION}")],
                "x-kubernetes-action": action, "x-kubernetes-group-version-kind": gvk,
                "responses": {"200": response, "401": {"description": "Unauthorized"}},
            }})
        };
        let title = d.kind;
        paths.insert(
            format!("{gv}/{}", d.plural),
            op(
                "list",
                format!("list or watch {title} in all namespaces"),
                list_ref(r),
                format!("list{title}ForAllNamespaces"),
            ),
        );
        paths.insert(
            format!("{gv}/namespaces/{{namespace}}/{}", d.plural),
            op(
                "list",
                format!("list or watch {title}"),
                list_ref(r),
                format!("listNamespaced{title}"),
            ),
        );
        paths.insert(
            format!("{gv}/namespaces/{{namespace}}/{}/{{name}}", d.plural),
            op(
                "get",
                format!("read the specified {title}"),
                item_ref(r),
                format!("readNamespaced{title}"),
            ),
        );
    }
    Value::Object(paths)
}

/// Swagger 2.0. The metadata types are referenced, not defined: the aggregator merges this
/// into kube-apiserver's document, which defines them.
pub fn openapi_v2() -> Value {
    let refs = "#/definitions/";
    let mut defs = Map::new();
    for r in Resource::ALL {
        defs.insert(
            format!("{OUR_PREFIX}.{}", r.def().kind),
            kind_schema(r, refs),
        );
        defs.insert(
            format!("{OUR_PREFIX}.{}List", r.def().kind),
            list_schema(r, refs),
        );
    }
    let resp =
        |name: String| json!({"description": "OK", "schema": {"$ref": format!("{refs}{name}")}});
    json!({
        "swagger": "2.0",
        "info": {"title": "vm-dhcp aggregated API", "version": VERSION},
        "paths": paths(
            |r| resp(format!("{OUR_PREFIX}.{}List", r.def().kind)),
            |r| resp(format!("{OUR_PREFIX}.{}", r.def().kind)),
        ),
        "definitions": defs,
    })
}

/// OpenAPI 3.0 for `apis/dhcp.harvesterhci.io/v1alpha1`, self-contained.
pub fn openapi_v3_group_version() -> Value {
    let refs = "#/components/schemas/";
    let mut schemas = Map::new();
    for r in Resource::ALL {
        schemas.insert(
            format!("{OUR_PREFIX}.{}", r.def().kind),
            kind_schema(r, refs),
        );
        schemas.insert(
            format!("{OUR_PREFIX}.{}List", r.def().kind),
            list_schema(r, refs),
        );
    }
    for (name, schema) in meta_schemas() {
        schemas.insert(name, schema);
    }
    let resp = |name: String| json!({"description": "OK", "content": {"application/json": {"schema": {"$ref": format!("{refs}{name}")}}}});
    json!({
        "openapi": "3.0.0",
        "info": {"title": "vm-dhcp aggregated API", "version": VERSION},
        "paths": paths(
            |r| resp(format!("{OUR_PREFIX}.{}List", r.def().kind)),
            |r| resp(format!("{OUR_PREFIX}.{}", r.def().kind)),
        ),
        "components": {"schemas": schemas},
    })
}

/// The v3 root: where the group-version document is, with its hash so clients can cache it.
pub fn openapi_v3_root(gv_doc: &Value) -> Value {
    let hash = etag(gv_doc).trim_matches('"').to_string();
    json!({"paths": {
        format!("apis/{GROUP}/{VERSION}"): {
            "serverRelativeURL": format!("/openapi/v3/apis/{GROUP}/{VERSION}?hash={hash}")
        }
    }})
}
