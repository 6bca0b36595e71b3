//! The agents' identity in a test namespace: what the chart grants them, narrowed to it.

use k8s_openapi::api::authentication::v1::TokenRequest;
use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::api::rbac::v1::{ClusterRoleBinding, Role, RoleBinding};
use kube::Api;
use kube::api::PostParams;
use serde_json::json;

use crate::TestNamespace;

/// Creates the ServiceAccount `name` with a Role and RoleBinding (also named `name`) that let
/// an agent read its IPPool and the pool's address objects (its leases) and hold its Lease
/// (chart/templates/rbac-controller.yaml), and a ClusterRoleBinding to
/// `system:auth-delegator` (TokenReviews and SubjectAccessReviews: an agent checks who reads
/// its leases).
pub async fn agent_service_account(ns: &TestNamespace, name: &str) {
    let sa: ServiceAccount =
        serde_json::from_value(json!({"metadata": {"name": name}})).expect("service account");
    ns.api::<ServiceAccount>()
        .create(&PostParams::default(), &sa)
        .await
        .expect("create service account");
    let role: Role = serde_json::from_value(json!({
        "metadata": {"name": name},
        "rules": [
            {"apiGroups": ["network.harvesterhci.io"],
             "resources": ["ippools", "ippooladdresses"],
             "verbs": ["get", "list", "watch"]},
            {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"],
             "verbs": ["get", "list", "watch", "create", "update", "patch"]}
        ]
    }))
    .expect("role");
    ns.api::<Role>()
        .create(&PostParams::default(), &role)
        .await
        .expect("create role");
    let binding: RoleBinding = serde_json::from_value(json!({
        "metadata": {"name": name},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
        "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": ns.name}]
    }))
    .expect("binding");
    ns.api::<RoleBinding>()
        .create(&PostParams::default(), &binding)
        .await
        .expect("create binding");
    let delegator: ClusterRoleBinding = serde_json::from_value(json!({
        "metadata": {"name": format!("vm-dhcp-e2e-agent-reviews-{}-{name}", ns.name)},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                    "name": "system:auth-delegator"},
        "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": ns.name}]
    }))
    .expect("cluster role binding");
    let bindings: Api<ClusterRoleBinding> = Api::all(ns.client.clone());
    match bindings.create(&PostParams::default(), &delegator).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 409 => {}
        Err(e) => panic!("create the agents' auth-delegator binding: {e}"),
    }
}

/// The ServiceAccount `lease-reader` in `ns`, allowed to get `dhcpleases` there (what the
/// aggregated API's identity may), and a token of it (an hour): what an agent's lease
/// endpoints accept. Tests read agents with it as the aggregated API does.
pub async fn lease_reader_token(ns: &TestNamespace) -> String {
    const NAME: &str = "lease-reader";
    let sa: ServiceAccount =
        serde_json::from_value(json!({"metadata": {"name": NAME}})).expect("service account");
    let sas = ns.api::<ServiceAccount>();
    match sas.create(&PostParams::default(), &sa).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 409 => {}
        Err(e) => panic!("create service account {NAME}: {e}"),
    }
    let role: Role = serde_json::from_value(json!({
        "metadata": {"name": NAME},
        "rules": [{"apiGroups": ["dhcp.harvesterhci.io"], "resources": ["dhcpleases"],
                   "verbs": ["get"]}]
    }))
    .expect("role");
    let binding: RoleBinding = serde_json::from_value(json!({
        "metadata": {"name": NAME},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": NAME},
        "subjects": [{"kind": "ServiceAccount", "name": NAME, "namespace": ns.name}]
    }))
    .expect("binding");
    for r in [
        ns.api::<Role>()
            .create(&PostParams::default(), &role)
            .await
            .map(|_| ()),
        ns.api::<RoleBinding>()
            .create(&PostParams::default(), &binding)
            .await
            .map(|_| ()),
    ] {
        match r {
            Ok(()) => {}
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(e) => panic!("lease reader RBAC: {e}"),
        }
    }
    let request: TokenRequest =
        serde_json::from_value(json!({"spec": {"audiences": [], "expirationSeconds": 3600}}))
            .expect("token request");
    let token = sas
        .create_subresource::<TokenRequest, TokenRequest>(
            "token",
            NAME,
            &PostParams::default(),
            &request,
        )
        .await
        .expect("TokenRequest for the lease reader");
    token.status.expect("token status").token
}
