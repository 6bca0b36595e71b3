//! The webhook configurations, generated here so that the chart, the self-managed mode and
//! the tests register exactly the same rules.
//!
//! Narrowness matters: a webhook outage must not block unrelated writes. VirtualMachines
//! reach us only when they have a Multus NIC, and then updates only when their template or a
//! static-IP annotation changed, or when no allocation is recorded yet (`matchConditions`);
//! status updates never do (the rules name the main resource only).

use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, ValidatingWebhookConfiguration,
};
use serde_json::json;

use crate::{
    PATH_MUTATE_IPPOOL, PATH_MUTATE_VM, PATH_MUTATE_VMNETCFG, PATH_VALIDATE_IPPOOL,
    PATH_VALIDATE_VMNETCFG,
};

/// Where the apiserver reaches the webhook.
#[derive(Debug, Clone)]
pub enum Endpoint {
    /// The in-cluster Service (port 443 in the chart).
    Service {
        namespace: String,
        name: String,
        port: i32,
    },
    /// A URL base such as `https://127.0.0.1:8443` (tests, out-of-cluster runs).
    Url(String),
}

impl Endpoint {
    fn client_config(&self, path: &str, ca_bundle: &str) -> serde_json::Value {
        match self {
            Endpoint::Service {
                namespace,
                name,
                port,
            } => json!({
                "service": {"namespace": namespace, "name": name, "path": path, "port": port},
                "caBundle": ca_bundle,
            }),
            Endpoint::Url(base) => json!({
                "url": format!("{}{path}", base.trim_end_matches('/')),
                "caBundle": ca_bundle,
            }),
        }
    }
}

/// Allocation webhooks answer well within the apiserver's own request timeout.
const TIMEOUT_SECONDS: i32 = 10;

/// The first CEL condition of the VirtualMachine webhook: the VM has a Multus NIC (only those
/// can be on a network with an IPPool). VMs on the pod network alone never wait on us, even
/// on CREATE.
pub const VM_HAS_MULTUS_CONDITION: &str = "has(object.spec.template) \
    && has(object.spec.template.spec) && has(object.spec.template.spec.networks) \
    && object.spec.template.spec.networks.exists(n, has(n.multus))";

/// The second: a CREATE, or an UPDATE that changed the NICs or a static-IP annotation, or
/// of a VM with no allocation recorded yet.
pub const VM_MATCH_CONDITION: &str = "request.operation == 'CREATE' \
    || !has(oldObject.spec.template) || !has(object.spec.template) \
    || object.spec.template != oldObject.spec.template \
    || !has(object.metadata.annotations) \
    || !('dhcp.harvesterhci.io/allocations' in object.metadata.annotations) \
    || object.metadata.annotations.exists(k, k.startsWith('static-ip.harvesterhci.io/') \
         && (!has(oldObject.metadata.annotations) || !(k in oldObject.metadata.annotations) \
             || oldObject.metadata.annotations[k] != object.metadata.annotations[k]))";

fn rule(group: &str, version: &str, resource: &str, ops: &[&str]) -> serde_json::Value {
    json!({"apiGroups": [group], "apiVersions": [version], "resources": [resource],
           "operations": ops, "scope": "Namespaced"})
}

/// (mutating, validating) configurations, both named `name`. `ca_bundle` is base64 PEM.
pub fn webhook_configurations(
    name: &str,
    endpoint: &Endpoint,
    ca_bundle: &str,
) -> (MutatingWebhookConfiguration, ValidatingWebhookConfiguration) {
    let net = "network.harvesterhci.io";
    let common = |hook: &str, path: &str, rules: serde_json::Value, side_effects: &str| {
        json!({
            "name": format!("{hook}.{name}.harvesterhci.io"),
            "clientConfig": endpoint.client_config(path, ca_bundle),
            "rules": rules,
            "failurePolicy": "Fail",
            "sideEffects": side_effects,
            "admissionReviewVersions": ["v1"],
            "timeoutSeconds": TIMEOUT_SECONDS,
            "matchPolicy": "Equivalent",
        })
    };
    let mut vm = common(
        "virtualmachines.mutator",
        PATH_MUTATE_VM,
        json!([rule(
            "kubevirt.io",
            "v1",
            "virtualmachines",
            &["CREATE", "UPDATE"]
        )]),
        "NoneOnDryRun",
    );
    vm["reinvocationPolicy"] = "IfNeeded".into();
    vm["matchConditions"] = json!([
        {"name": "has-multus-nics", "expression": VM_HAS_MULTUS_CONDITION},
        {"name": "nics-or-static-ips-changed", "expression": VM_MATCH_CONDITION},
    ]);
    let mutating = json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": name, "labels": {"app.kubernetes.io/name": "vm-dhcp"}},
        "webhooks": [
            common("ippools.mutator", PATH_MUTATE_IPPOOL,
                   json!([rule(net, "v1alpha1", "ippools", &["CREATE"])]), "None"),
            common("vmnetcfgs.mutator", PATH_MUTATE_VMNETCFG,
                   json!([rule(net, "v1alpha1", "virtualmachinenetworkconfigs", &["CREATE", "UPDATE"])]),
                   "NoneOnDryRun"),
            vm,
        ]
    });
    let validating = json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingWebhookConfiguration",
        "metadata": {"name": name, "labels": {"app.kubernetes.io/name": "vm-dhcp"}},
        "webhooks": [
            common("ippools.validator", PATH_VALIDATE_IPPOOL,
                   json!([rule(net, "v1alpha1", "ippools", &["CREATE", "UPDATE", "DELETE"])]), "None"),
            common("vmnetcfgs.validator", PATH_VALIDATE_VMNETCFG,
                   json!([rule(net, "v1alpha1", "virtualmachinenetworkconfigs", &["CREATE", "UPDATE"])]), "None"),
        ]
    });
    (
        serde_json::from_value(mutating).expect("static mutating configuration shape"),
        serde_json::from_value(validating).expect("static validating configuration shape"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configurations_build_and_are_narrow() {
        let endpoint = Endpoint::Service {
            namespace: "harvester-system".into(),
            name: "vm-dhcp-webhook".into(),
            port: 443,
        };
        let (mutating, validating) = webhook_configurations("vm-dhcp-webhook", &endpoint, "Q0E=");
        let hooks = mutating.webhooks.expect("mutating webhooks");
        assert_eq!(hooks.len(), 3);
        for hook in &hooks {
            assert_eq!(hook.failure_policy.as_deref(), Some("Fail"));
            assert_eq!(hook.timeout_seconds, Some(10));
            let svc = hook
                .client_config
                .service
                .as_ref()
                .expect("service reference");
            assert_eq!(
                (svc.namespace.as_str(), svc.port),
                ("harvester-system", Some(443))
            );
        }
        let vm = &hooks[2];
        assert_eq!(vm.side_effects, "NoneOnDryRun");
        assert_eq!(vm.reinvocation_policy.as_deref(), Some("IfNeeded"));
        let conditions = vm.match_conditions.as_ref().expect("match conditions");
        assert!(conditions[0].expression.contains("has(n.multus)"));
        assert!(
            conditions[1]
                .expression
                .contains("object.spec.template != oldObject.spec.template")
        );
        let rules = vm.rules.as_ref().expect("rules");
        // The main resource only: status updates never reach us.
        assert_eq!(
            rules[0].resources.as_deref(),
            Some(&["virtualmachines".to_string()][..])
        );
        let validators = validating.webhooks.expect("validating webhooks");
        assert_eq!(validators.len(), 2);
        assert!(validators.iter().all(|h| h.side_effects == "None"));
    }
}
