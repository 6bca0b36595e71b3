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
/// kube-apiserver's own per-group documents do). They carry kube-apiserver's names, and
/// clients merge every group's schemas into one map by name (client-go's
/// `openapi.NewTypeConverter`): whichever group comes last wins. So each one declares every
/// field the real type has, with its type and list semantics, or objects of other groups
/// (with owner references, managed fields, finalizers) would stop converting.
fn meta_schemas(refs: &str) -> Vec<(String, Value)> {
    let s = |d: &str| json!({"type": "string", "description": d, "default": ""});
    let opt_s = |d: &str| json!({"type": "string", "description": d});
    let int64 = |d: &str| json!({"type": "integer", "format": "int64", "description": d});
    let string_map = |d: &str| json!({"type": "object", "additionalProperties": {"type": "string", "default": ""}, "description": d});
    let time = |d: &str| json!({"description": d, "allOf": [{"$ref": format!("{refs}{META_PREFIX}.Time")}]});
    vec![
        (
            format!("{META_PREFIX}.ObjectMeta"),
            json!({
                "description": "ObjectMeta is metadata that all persisted resources must have.",
                "type": "object",
                "properties": {
                    "annotations": string_map("Annotations is an unstructured key value map."),
                    "creationTimestamp": {
                        "description": "When the object was created (RFC 3339, UTC).",
                        "allOf": [{"$ref": format!("{refs}{META_PREFIX}.Time")}], "default": {}},
                    "deletionGracePeriodSeconds": int64("Seconds allowed for graceful termination once deletion is requested."),
                    "deletionTimestamp": time("When the object will be deleted (set by the server when deletion is requested)."),
                    "finalizers": {
                        "description": "Must be empty before the object is deleted from the registry.",
                        "type": "array", "items": {"type": "string", "default": ""},
                        "x-kubernetes-list-type": "set", "x-kubernetes-patch-strategy": "merge"},
                    "generateName": opt_s("Prefix for a name generated by the server when name is empty."),
                    "generation": int64("A sequence number of a specific generation of the desired state."),
                    "labels": string_map("Map of string keys and values that can be used to organize and categorize objects."),
                    "managedFields": {
                        "description": "Which manager set which fields (server-side apply).",
                        "type": "array",
                        "items": {"allOf": [{"$ref": format!("{refs}{META_PREFIX}.ManagedFieldsEntry")}], "default": {}},
                        "x-kubernetes-list-type": "atomic"},
                    "name": opt_s("Name must be unique within a namespace."),
                    "namespace": opt_s("Namespace defines the space within which each name must be unique."),
                    "ownerReferences": {
                        "description": "Objects this object depends on (garbage collection).",
                        "type": "array",
                        "items": {"allOf": [{"$ref": format!("{refs}{META_PREFIX}.OwnerReference")}], "default": {}},
                        "x-kubernetes-list-map-keys": ["uid"], "x-kubernetes-list-type": "map",
                        "x-kubernetes-patch-merge-key": "uid", "x-kubernetes-patch-strategy": "merge"},
                    "resourceVersion": opt_s("An opaque value that represents the internal version of this object; here a number derived from the source objects' versions."),
                    "selfLink": opt_s("Deprecated, not set."),
                    "uid": opt_s("UID is the unique in time and space value for this object."),
                },
            }),
        ),
        (
            format!("{META_PREFIX}.ListMeta"),
            json!({
                "description": "ListMeta describes metadata that synthetic resources must have.",
                "type": "object",
                "properties": {
                    "continue": opt_s("Set when more items are available: pass it as ?continue= to get them."),
                    "remainingItemCount": int64("The number of items left after this page."),
                    "resourceVersion": opt_s("String that identifies the server's internal version of this list."),
                    "selfLink": opt_s("Deprecated, not set."),
                },
            }),
        ),
        (
            format!("{META_PREFIX}.ManagedFieldsEntry"),
            json!({
                "description": "The fields one manager set, and with which operation.",
                "type": "object",
                "properties": {
                    "apiVersion": opt_s("The version of the resource the fields are in."),
                    "fieldsType": opt_s("The format of fieldsV1: always FieldsV1."),
                    "fieldsV1": {"description": "The set of fields.",
                                 "allOf": [{"$ref": format!("{refs}{META_PREFIX}.FieldsV1")}]},
                    "manager": opt_s("Who manages these fields."),
                    "operation": opt_s("Apply or Update."),
                    "subresource": opt_s("The subresource the write went to, if any."),
                    "time": time("When these fields were last set."),
                },
            }),
        ),
        (
            format!("{META_PREFIX}.OwnerReference"),
            json!({
                "description": "An object this one depends on.",
                "type": "object",
                "required": ["apiVersion", "kind", "name", "uid"],
                "properties": {
                    "apiVersion": s("API version of the owner."),
                    "blockOwnerDeletion": {"type": "boolean", "description": "Whether the owner waits for this object's deletion in foreground deletion."},
                    "controller": {"type": "boolean", "description": "Whether this owner is the managing controller."},
                    "kind": s("Kind of the owner."),
                    "name": s("Name of the owner."),
                    "uid": s("UID of the owner."),
                },
                "x-kubernetes-map-type": "atomic",
            }),
        ),
        (
            format!("{META_PREFIX}.Time"),
            json!({"description": "A timestamp in RFC 3339 form, UTC.", "type": "string", "format": "date-time"}),
        ),
        (
            format!("{META_PREFIX}.FieldsV1"),
            json!({"description": "A set of fields, as a JSON trie (server-side apply).", "type": "object"}),
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
    for (name, schema) in meta_schemas(refs) {
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
