//! The chart's webhook configurations (chart/templates/webhook-configurations.yaml) are the
//! ones the binary registers itself in self-managed mode (`vm_dhcp_webhook::config`): a
//! template that drifts from the code, or code that drifts from the template, fails here.
//! Rendered by the pinned helm, and checked by the real kube-apiserver (the CEL
//! matchConditions must compile there, which no YAML comparison can tell).

use std::path::{Path, PathBuf};

use serde::Deserialize as _;
use serde_json::Value;
use vm_dhcp_e2e::ControlPlane;
use vm_dhcp_webhook::config::{
    Endpoint, VM_HAS_MULTUS_CONDITION, VM_MATCH_CONDITION, webhook_configurations,
};

const NAMESPACE: &str = "harvester-system";
const INJECT_CA_FROM: &str = "cert-manager.io/inject-ca-from";
const TEMPLATE: &str = "templates/webhook-configurations.yaml";

fn chart_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../chart")
}

/// `helm template test chart --namespace harvester-system <args>`: (success, stdout, stderr).
fn helm_template(args: &[&str]) -> (bool, String, String) {
    let helm = vm_dhcp_e2e::bins::bin_dir()
        .expect("e2e binaries (VM_DHCP_BIN_DIR)")
        .join("helm");
    let out = std::process::Command::new(helm)
        .arg("template")
        .arg("test")
        .arg(chart_dir())
        .args(["--namespace", NAMESPACE])
        .args(args)
        .output()
        .expect("running helm");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn render(args: &[&str]) -> String {
    let (ok, stdout, stderr) = helm_template(args);
    assert!(ok, "helm template {args:?} failed:\n{stderr}");
    stdout
}

/// Every non-empty YAML document of a rendered chart.
fn documents(yaml: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(yaml)
        .map(|doc| Value::deserialize(doc).expect("rendered YAML parses"))
        .filter(|doc| !doc.is_null())
        .collect()
}

/// The one rendered object of `kind`.
fn only(docs: &[Value], kind: &str) -> Value {
    let found: Vec<&Value> = docs.iter().filter(|d| d["kind"] == kind).collect();
    assert_eq!(found.len(), 1, "expected one {kind}, got {}", found.len());
    found[0].clone()
}

/// The rendered (mutating, validating) configurations of the whole chart.
fn rendered(args: &[&str]) -> (Value, Value) {
    let docs = documents(&render(args));
    (
        only(&docs, "MutatingWebhookConfiguration"),
        only(&docs, "ValidatingWebhookConfiguration"),
    )
}

/// What the binary registers for the chart's Service, caBundle removed (the chart renders
/// none: the binary or cainjector writes it).
fn expected(service: &str) -> (Value, Value) {
    let endpoint = Endpoint::Service {
        namespace: NAMESPACE.into(),
        name: service.into(),
        port: 443,
    };
    let (mutating, validating) = webhook_configurations(service, &endpoint, "");
    let mut mutating = serde_json::to_value(mutating).expect("serialize mutating");
    let mut validating = serde_json::to_value(validating).expect("serialize validating");
    for config in [&mut mutating, &mut validating] {
        for hook in config["webhooks"].as_array_mut().expect("webhooks") {
            hook["clientConfig"]
                .as_object_mut()
                .expect("clientConfig")
                .remove("caBundle");
        }
    }
    (mutating, validating)
}

/// Asserts the rendered configuration has no caBundle, and takes its cert-manager
/// annotation off (returned), leaving what must equal the binary's configuration.
fn take_injection(config: &mut Value) -> Option<String> {
    let kind = config["kind"].as_str().unwrap_or("?").to_string();
    for hook in config["webhooks"].as_array().expect("rendered webhooks") {
        assert!(
            hook["clientConfig"].get("caBundle").is_none(),
            "{kind} {}: the chart must not render a caBundle",
            hook["name"]
        );
    }
    let metadata = config["metadata"].as_object_mut().expect("metadata");
    let annotations = metadata.get_mut("annotations")?.as_object_mut()?;
    let value = annotations.remove(INJECT_CA_FROM);
    if annotations.is_empty() {
        metadata.remove("annotations");
    }
    value.map(|v| v.as_str().expect("annotation is a string").to_string())
}

/// The rendered configurations, injection annotation removed, equal the binary's.
fn assert_same_as_binary(args: &[&str], service: &str) -> Option<String> {
    let (mut mutating, mut validating) = rendered(args);
    let m_inject = take_injection(&mut mutating);
    let v_inject = take_injection(&mut validating);
    assert_eq!(
        m_inject, v_inject,
        "both configurations take their CA from the same place"
    );
    let (want_mutating, want_validating) = expected(service);
    assert_eq!(
        mutating,
        want_mutating,
        "MutatingWebhookConfiguration: chart {args:?} (left) differs from webhook/src/config.rs (right):\n{}",
        diff(&mutating, &want_mutating)
    );
    assert_eq!(
        validating,
        want_validating,
        "ValidatingWebhookConfiguration: chart {args:?} (left) differs from webhook/src/config.rs (right):\n{}",
        diff(&validating, &want_validating)
    );
    m_inject
}

/// The paths where two JSON values differ, for a readable failure.
fn diff(chart: &Value, code: &Value) -> String {
    fn walk(a: &Value, b: &Value, path: String, out: &mut Vec<String>) {
        match (a, b) {
            (Value::Object(x), Value::Object(y)) => {
                let keys: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
                for k in keys {
                    let (va, vb) = (
                        x.get(k).unwrap_or(&Value::Null),
                        y.get(k).unwrap_or(&Value::Null),
                    );
                    walk(va, vb, format!("{path}.{k}"), out);
                }
            }
            (Value::Array(x), Value::Array(y)) if x.len() == y.len() => {
                for (i, (va, vb)) in x.iter().zip(y).enumerate() {
                    walk(va, vb, format!("{path}[{i}]"), out);
                }
            }
            _ if a != b => out.push(format!("  {path}: chart {a} / code {b}")),
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(chart, code, String::new(), &mut out);
    out.join("\n")
}

#[test]
fn self_managed_configurations_are_the_binarys_without_ca_bundle() {
    // Default values are self-managed, the Go version's mode; the Service defaults to
    // "<release>-webhook".
    for args in [&[][..], &["--set", "webhook.tls.mode=self-managed"][..]] {
        let injection = assert_same_as_binary(args, "test-webhook");
        assert_eq!(
            injection, None,
            "self-managed {args:?}: no cert-manager annotation"
        );
    }
    let injection = assert_same_as_binary(
        &["--set", "webhook.service.name=vm-dhcp-hooks"],
        "vm-dhcp-hooks",
    );
    assert_eq!(injection, None);
}

#[test]
fn cert_manager_configurations_are_the_binarys_with_the_injection_annotation() {
    let injection =
        assert_same_as_binary(&["--set", "webhook.tls.mode=cert-manager"], "test-webhook");
    assert_eq!(
        injection.as_deref(),
        Some("harvester-system/test-webhook"),
        "the Certificate defaults to the webhook Service name"
    );
    let injection = assert_same_as_binary(
        &[
            "--set",
            "webhook.tls.mode=cert-manager",
            "--set",
            "webhook.service.name=vm-dhcp-hooks",
            "--set",
            "webhook.tls.certManager.certificate=vm-dhcp-serving",
        ],
        "vm-dhcp-hooks",
    );
    assert_eq!(
        injection.as_deref(),
        Some("harvester-system/vm-dhcp-serving")
    );
}

#[test]
fn disabled_webhook_renders_no_configuration_and_a_bad_mode_is_refused() {
    let docs = documents(&render(&["--set", "webhook.enabled=false"]));
    assert!(
        docs.iter().all(|d| !d["kind"]
            .as_str()
            .unwrap_or_default()
            .ends_with("WebhookConfiguration")),
        "webhook.enabled=false still renders a webhook configuration"
    );
    let (ok, _, stderr) = helm_template(&["--set", "webhook.tls.mode=cert-manger"]);
    assert!(!ok, "a misspelt webhook.tls.mode must fail the render");
    assert!(
        stderr.contains("webhook.tls.mode must be self-managed or cert-manager"),
        "{stderr}"
    );
}

/// The kube-apiserver validates the rendered configurations as it would on install:
/// names, rules, selectors, and the matchConditions compiled as CEL. Server-side dry run,
/// so no configuration is left to intercept anything.
#[tokio::test]
async fn the_apiserver_accepts_the_rendered_configurations() {
    let cp = ControlPlane::shared().await;
    for mode in ["self-managed", "cert-manager"] {
        let yaml = render(&[
            "--set",
            &format!("webhook.tls.mode={mode}"),
            "--show-only",
            TEMPLATE,
        ]);
        let file = cp.dir.join(format!("chart-webhooks-{mode}.yaml"));
        std::fs::write(&file, &yaml).expect("writing rendered configurations");
        let file_arg = file.display().to_string();
        let out = cp
            .kubectl(&["create", "--dry-run=server", "-o", "json", "-f", &file_arg])
            .await;
        assert!(
            out.status.success(),
            "kube-apiserver refused the {mode} configurations:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        // One JSON document per object.
        let items: Vec<Value> = serde_json::Deserializer::from_slice(&out.stdout)
            .into_iter::<Value>()
            .collect::<Result<_, _>>()
            .expect("kubectl JSON");
        let kinds: Vec<&str> = items.iter().filter_map(|i| i["kind"].as_str()).collect();
        assert_eq!(
            kinds,
            [
                "MutatingWebhookConfiguration",
                "ValidatingWebhookConfiguration"
            ],
            "{mode}"
        );
        assert!(
            items
                .iter()
                .all(|i| i["metadata"]["name"] == "test-webhook")
        );
        // What the apiserver kept is the condition the code evaluates.
        let vm_hook = &items[0]["webhooks"][2];
        assert_eq!(
            vm_hook["matchConditions"][0]["expression"], VM_HAS_MULTUS_CONDITION,
            "{mode}"
        );
        assert_eq!(
            vm_hook["matchConditions"][1]["expression"], VM_MATCH_CONDITION,
            "{mode}"
        );
    }
}
