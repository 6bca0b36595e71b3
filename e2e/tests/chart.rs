//! The Helm chart (chart/), rendered by the pinned helm and read back as objects:
//! - its webhook configurations are the ones the binary registers itself in self-managed
//!   mode (`vm_dhcp_webhook::config`): a template that drifts from the code, or code that
//!   drifts from the template, fails here;
//! - `helm lint` is clean; both certificate modes render what they promise (Deployments with
//!   their subcommand and flags, Services, the APIService with a verifiable caBundle or the
//!   cainjector annotation, Issuers and Certificates only with cert-manager), and cert-manager
//!   mode fails clearly on a cluster without cert-manager;
//! - RBAC: what each component's ServiceAccount may do, evaluated from the rendered
//!   bindings and roles, and the roles aggregated to view/edit/admin;
//! - monitoring objects only with the Prometheus Operator, a dashboard that uses only
//!   metric names the code exports; the Go chart's value keys; the Harvester Addon manifest;
//!   the image carries every program the binary runs;
//! - the kube-apiserver accepts every rendered object (server-side dry run), the CEL
//!   matchConditions included.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde::Deserialize as _;
use serde_json::{Value, json};
use vm_dhcp_e2e::ControlPlane;
use vm_dhcp_webhook::config::{
    Endpoint, VM_HAS_MULTUS_CONDITION, VM_MATCH_CONDITION, webhook_configurations,
};

/// The Harvester add-on's release and namespace: the fullname is the release name, so
/// every object has the Go chart's name.
const RELEASE: &str = "harvester-vm-dhcp-controller";
const NAMESPACE: &str = "harvester-system";
const WEBHOOK: &str = "harvester-vm-dhcp-controller-webhook";
const APISERVER: &str = "harvester-vm-dhcp-controller-apiserver";
const INJECT_CA_FROM: &str = "cert-manager.io/inject-ca-from";
const TEMPLATE: &str = "templates/webhook-configurations.yaml";
const CERT_MANAGER: [&str; 4] = [
    "--set",
    "certificates.mode=cert-manager",
    "--api-versions",
    "cert-manager.io/v1",
];
const MONITORING: [&str; 2] = ["--api-versions", "monitoring.coreos.com/v1"];

fn repo_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn chart_dir() -> PathBuf {
    repo_dir().join("chart")
}

fn helm() -> std::process::Command {
    let helm = vm_dhcp_e2e::bins::bin_dir()
        .expect("e2e binaries (VM_DHCP_BIN_DIR)")
        .join("helm");
    std::process::Command::new(helm)
}

/// `helm template <release> chart --namespace <ns> <args>`: (success, stdout, stderr).
fn helm_template_as(release: &str, namespace: &str, args: &[&str]) -> (bool, String, String) {
    let out = helm()
        .arg("template")
        .arg(release)
        .arg(chart_dir())
        .args(["--namespace", namespace])
        .args(args)
        .output()
        .expect("running helm");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn helm_template(args: &[&str]) -> (bool, String, String) {
    helm_template_as(RELEASE, NAMESPACE, args)
}

fn render(args: &[&str]) -> String {
    let (ok, stdout, stderr) = helm_template(args);
    assert!(ok, "helm template {args:?} failed:\n{stderr}");
    stdout
}

/// The rendered objects of the whole chart.
fn objects(args: &[&str]) -> Vec<Value> {
    documents(&render(args))
}

/// Every non-empty YAML document of a rendered chart.
fn documents(yaml: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(yaml)
        .map(|doc| Value::deserialize(doc).expect("rendered YAML parses"))
        .filter(|doc| !doc.is_null())
        .collect()
}

fn of_kind<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| d["kind"] == kind).collect()
}

/// The one rendered object of `kind`.
fn only(docs: &[Value], kind: &str) -> Value {
    let found = of_kind(docs, kind);
    assert_eq!(found.len(), 1, "expected one {kind}, got {}", found.len());
    found[0].clone()
}

/// The rendered object of `kind` named `name`.
fn named<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| {
            let names: Vec<String> = of_kind(docs, kind)
                .iter()
                .map(|d| d["metadata"]["name"].to_string())
                .collect();
            panic!("no {kind} {name}; rendered: {names:?}")
        })
}

fn names(docs: &[Value], kind: &str) -> BTreeSet<String> {
    of_kind(docs, kind)
        .iter()
        .filter_map(|d| d["metadata"]["name"].as_str().map(String::from))
        .collect()
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

/// The first container of a Deployment.
fn container(deploy: &Value) -> &Value {
    &deploy["spec"]["template"]["spec"]["containers"][0]
}

fn args(deploy: &Value) -> Vec<String> {
    strings(&container(deploy)["args"])
}

/// The value following `flag` in a container's args.
fn flag(args: &[String], flag: &str) -> Option<String> {
    args.iter()
        .position(|a| a == flag)
        .and_then(|i| args.get(i + 1).cloned())
}

/// The Secret volume mounted at `path` in a Deployment's first container.
fn secret_mounted_at(deploy: &Value, path: &str) -> Option<String> {
    let mount = container(deploy)["volumeMounts"]
        .as_array()?
        .iter()
        .find(|m| m["mountPath"] == path)?;
    let volume = deploy["spec"]["template"]["spec"]["volumes"]
        .as_array()?
        .iter()
        .find(|v| v["name"] == mount["name"])?;
    volume["secret"]["secretName"].as_str().map(String::from)
}

fn b64(s: &str) -> Vec<u8> {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD
        .decode(s)
        .expect("valid base64")
}

// --- webhook configurations = the binary's -------------------------------------------

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
fn assert_same_as_binary(values: &[&str], service: &str) -> Option<String> {
    let docs = objects(values);
    let mut mutating = only(&docs, "MutatingWebhookConfiguration");
    let mut validating = only(&docs, "ValidatingWebhookConfiguration");
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
        "MutatingWebhookConfiguration: chart {values:?} (left) differs from webhook/src/config.rs (right):\n{}",
        diff(&mutating, &want_mutating)
    );
    assert_eq!(
        validating,
        want_validating,
        "ValidatingWebhookConfiguration: chart {values:?} (left) differs from webhook/src/config.rs (right):\n{}",
        diff(&validating, &want_validating)
    );
    // The Service they call exists and is the webhook's --name.
    let svc = named(&docs, "Service", service);
    assert_eq!(svc["spec"]["ports"][0]["port"], 443);
    let deploy = named(&docs, "Deployment", &format!("{RELEASE}-webhook"));
    assert_eq!(flag(&args(deploy), "--name").as_deref(), Some(service));
    m_inject
}

/// The paths where two JSON values differ, for a readable failure.
fn diff(chart: &Value, code: &Value) -> String {
    fn walk(a: &Value, b: &Value, path: String, out: &mut Vec<String>) {
        match (a, b) {
            (Value::Object(x), Value::Object(y)) => {
                let keys: BTreeSet<&String> = x.keys().chain(y.keys()).collect();
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
    // "<fullname>-webhook", the binary's default --name for the add-on release.
    for args in [
        &[][..],
        &["--set", "certificates.mode=self-managed"][..],
        &["--set", "webhook.tls.mode=self-managed"][..],
    ] {
        let injection = assert_same_as_binary(args, WEBHOOK);
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
    let injection = assert_same_as_binary(&CERT_MANAGER, WEBHOOK);
    assert_eq!(
        injection.as_deref(),
        Some("harvester-system/harvester-vm-dhcp-controller-webhook"),
        "the Certificate defaults to the webhook Service name"
    );
    // The older key still selects the mode.
    let injection = assert_same_as_binary(
        &[
            "--set",
            "webhook.tls.mode=cert-manager",
            "--api-versions",
            "cert-manager.io/v1",
        ],
        WEBHOOK,
    );
    assert!(injection.is_some(), "webhook.tls.mode=cert-manager");
    let mut with_names = CERT_MANAGER.to_vec();
    with_names.extend([
        "--set",
        "webhook.service.name=vm-dhcp-hooks",
        "--set",
        "webhook.tls.certManager.certificate=vm-dhcp-serving",
    ]);
    let injection = assert_same_as_binary(&with_names, "vm-dhcp-hooks");
    assert_eq!(
        injection.as_deref(),
        Some("harvester-system/vm-dhcp-serving")
    );
    // ... and that Certificate is the one rendered, for that Service.
    let docs = objects(&with_names);
    let cert = named(&docs, "Certificate", "vm-dhcp-serving");
    assert!(
        strings(&cert["spec"]["dnsNames"]).contains(&"vm-dhcp-hooks.harvester-system.svc".into())
    );
}

#[test]
fn disabled_webhook_renders_no_webhook_and_a_bad_mode_is_refused() {
    let docs = objects(&["--set", "webhook.enabled=false"]);
    let kinds: Vec<String> = docs
        .iter()
        .map(|d| format!("{} {}", d["kind"], d["metadata"]["name"]))
        .collect();
    assert!(
        kinds
            .iter()
            .all(|k| !k.contains("WebhookConfiguration") && !k.contains("-webhook")),
        "webhook.enabled=false still renders webhook objects: {kinds:?}"
    );
    for (key, value) in [
        ("webhook.tls.mode", "cert-manger"),
        ("certificates.mode", "self-signed"),
    ] {
        let (ok, _, stderr) = helm_template(&["--set", &format!("{key}={value}")]);
        assert!(!ok, "a misspelt {key} must fail the render");
        assert!(
            stderr.contains(&format!(
                "{key} must be self-managed or cert-manager, not \"{value}\""
            )),
            "{stderr}"
        );
    }
    let (ok, _, stderr) = helm_template(&[
        "--set",
        "webhook.tls.mode=self-managed",
        "--set",
        "certificates.mode=cert-manager",
        "--api-versions",
        "cert-manager.io/v1",
    ]);
    assert!(!ok, "contradicting modes must fail");
    assert!(stderr.contains("set only certificates.mode"), "{stderr}");
}

// --- lint, components, certificate modes --------------------------------------------------

#[test]
fn helm_lint_is_clean() {
    for values in [
        vec![],
        vec![
            "--set",
            "webhook.replicaCount=2",
            "--set",
            "apiserver.enabled=false",
        ],
    ] {
        let out = helm()
            .arg("lint")
            .arg("--strict")
            .arg(chart_dir())
            .args(["--namespace", NAMESPACE])
            .args(&values)
            .output()
            .expect("running helm lint");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "helm lint --strict {values:?} failed:\n{stdout}\n{stderr}"
        );
        assert!(
            stdout.contains("1 chart(s) linted, 0 chart(s) failed"),
            "{stdout}"
        );
        for noise in ["[WARNING]", "[ERROR]"] {
            assert!(
                !stdout.contains(noise),
                "helm lint {values:?} reports:\n{stdout}"
            );
        }
    }
}

/// The three Deployments: their subcommand, ServiceAccount, probes and resources.
fn check_components(docs: &[Value]) {
    let deployments = names(docs, "Deployment");
    let want: BTreeSet<String> = [
        RELEASE.to_string(),
        format!("{RELEASE}-webhook"),
        APISERVER.into(),
    ]
    .into();
    assert_eq!(deployments, want);
    let mut accounts = BTreeSet::new();
    for (name, subcommand, port) in [
        (RELEASE.to_string(), "controller", "metrics"),
        (format!("{RELEASE}-webhook"), "webhook", "https"),
        (APISERVER.to_string(), "apiserver", "https"),
    ] {
        let d = named(docs, "Deployment", &name);
        let c = container(d);
        assert_eq!(
            args(d).first().map(String::as_str),
            Some(subcommand),
            "{name}"
        );
        assert_eq!(
            c["image"], "rancher/harvester-vm-dhcp:0.1.0",
            "{name}: the one image"
        );
        for (probe, path) in [
            ("livenessProbe", "/healthz"),
            ("readinessProbe", "/readyz"),
            ("startupProbe", "/healthz"),
        ] {
            assert_eq!(c[probe]["httpGet"]["path"], path, "{name} {probe}");
            assert_eq!(c[probe]["httpGet"]["port"], port, "{name} {probe}");
        }
        let scheme = if port == "https" {
            json!("HTTPS")
        } else {
            Value::Null
        };
        assert_eq!(c["readinessProbe"]["httpGet"]["scheme"], scheme, "{name}");
        assert!(
            c["resources"]["requests"]["memory"].is_string(),
            "{name}: resources"
        );
        assert_eq!(
            c["securityContext"]["allowPrivilegeEscalation"], false,
            "{name}"
        );
        let pod = &d["spec"]["template"]["spec"];
        assert_eq!(pod["securityContext"]["runAsNonRoot"], true, "{name}");
        let sa = pod["serviceAccountName"]
            .as_str()
            .expect("serviceAccountName");
        named(docs, "ServiceAccount", sa);
        accounts.insert(sa.to_string());
        // The selector selects the pod template.
        let selector = d["spec"]["selector"]["matchLabels"]
            .as_object()
            .expect("selector");
        for (k, v) in selector {
            assert_eq!(&d["spec"]["template"]["metadata"]["labels"][k], v, "{name}");
        }
    }
    assert_eq!(accounts.len(), 3, "one ServiceAccount per component");
    assert!(names(docs, "ServiceAccount").contains(&format!("{RELEASE}-agent")));

    let controller = args(named(docs, "Deployment", RELEASE));
    assert_eq!(flag(&controller, "--namespace").as_deref(), Some(NAMESPACE));
    assert_eq!(
        flag(&controller, "--leader-election-namespace").as_deref(),
        Some(NAMESPACE)
    );
    assert_eq!(
        flag(&controller, "--service-account-name"),
        Some(format!("{RELEASE}-agent"))
    );
    assert_eq!(
        flag(&controller, "--image").as_deref(),
        Some("rancher/harvester-vm-dhcp:0.1.0")
    );
    assert_eq!(
        flag(&controller, "--http-addr").as_deref(),
        Some("0.0.0.0:8080")
    );

    let webhook = args(named(docs, "Deployment", &format!("{RELEASE}-webhook")));
    assert_eq!(flag(&webhook, "--name").as_deref(), Some(WEBHOOK));
    assert_eq!(flag(&webhook, "--namespace").as_deref(), Some(NAMESPACE));
    assert_eq!(flag(&webhook, "--https-port").as_deref(), Some("8443"));
    assert_eq!(flag(&webhook, "--service-port").as_deref(), Some("443"));
    assert_eq!(
        flag(&webhook, "--service-cidr").as_deref(),
        Some("10.53.0.0/16")
    );

    // Services: the webhook's (443 -> https), the aggregated API's (443 -> https, and its
    // plain metrics), the controller's metrics (the Go chart's "<fullname>", 8080).
    let svc = named(docs, "Service", WEBHOOK);
    assert_eq!(
        svc["spec"]["ports"],
        json!([{"name": "https", "port": 443, "targetPort": "https", "protocol": "TCP"}])
    );
    let svc = named(docs, "Service", APISERVER);
    assert_eq!(
        svc["spec"]["ports"][0],
        json!({"name": "https", "port": 443, "targetPort": "https", "protocol": "TCP"})
    );
    assert_eq!(svc["spec"]["ports"][1]["name"], "metrics");
    let svc = named(docs, "Service", RELEASE);
    assert_eq!(
        svc["spec"]["ports"],
        json!([{"name": "metrics", "port": 8080, "targetPort": "metrics", "protocol": "TCP"}])
    );
    // Every Service selects its component's pods.
    for (svc, deploy) in [
        (WEBHOOK.to_string(), format!("{RELEASE}-webhook")),
        (APISERVER.to_string(), APISERVER.to_string()),
        (RELEASE.to_string(), RELEASE.to_string()),
    ] {
        assert_eq!(
            named(docs, "Service", &svc)["spec"]["selector"],
            named(docs, "Deployment", &deploy)["spec"]["selector"]["matchLabels"],
            "Service {svc}"
        );
    }
}

/// The APIService: our group only, the aggregated API's Service.
fn check_apiservice(docs: &[Value]) -> Value {
    let api = only(docs, "APIService");
    assert_eq!(api["metadata"]["name"], "v1alpha1.dhcp.harvesterhci.io");
    assert_eq!(api["spec"]["group"], "dhcp.harvesterhci.io");
    assert_eq!(api["spec"]["version"], "v1alpha1");
    assert_eq!(
        api["spec"]["service"],
        json!({"name": APISERVER, "namespace": NAMESPACE, "port": 443})
    );
    assert!(api["spec"].get("insecureSkipTLSVerify").is_none());
    api
}

/// Verifies that `cert_pem` is a serving certificate for `dns_name` issued by `ca_pem`,
/// as the kube-apiserver will when it calls the Service.
fn verify_serving_cert(ca_pem: &[u8], cert_pem: &[u8], dns_name: &str) {
    use rustls::client::danger::ServerCertVerifier as _;
    let mut roots = rustls::RootCertStore::empty();
    for ca in rustls_pemfile::certs(&mut &ca_pem[..]) {
        roots.add(ca.expect("CA PEM")).expect("CA certificate");
    }
    let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
        std::sync::Arc::new(roots),
        std::sync::Arc::new(rustls::crypto::ring::default_provider()),
    )
    .build()
    .expect("verifier");
    let chain: Vec<_> = rustls_pemfile::certs(&mut &cert_pem[..])
        .collect::<Result<_, _>>()
        .expect("certificate PEM");
    let name = rustls::pki_types::ServerName::try_from(dns_name.to_string()).expect("DNS name");
    verifier
        .verify_server_cert(
            &chain[0],
            &chain[1..],
            &name,
            &[],
            rustls::pki_types::UnixTime::now(),
        )
        .unwrap_or_else(|e| panic!("the serving certificate does not verify for {dns_name}: {e}"));
}

#[test]
fn self_managed_mode_renders_the_components_and_a_verifiable_apiservice_ca() {
    let docs = objects(&[]);
    check_components(&docs);
    for kind in ["Certificate", "Issuer", "ClusterIssuer"] {
        assert!(
            of_kind(&docs, kind).is_empty(),
            "self-managed renders no {kind}"
        );
    }
    // The webhook manages its own certificate: no files.
    let webhook = named(&docs, "Deployment", &format!("{RELEASE}-webhook"));
    assert_eq!(flag(&args(webhook), "--tls-cert-file"), None);
    assert!(container(webhook)["volumeMounts"].is_null());

    // The aggregated API serves the chart-generated pair, whose CA is the caBundle.
    let apiserver = named(&docs, "Deployment", APISERVER);
    let a = args(apiserver);
    assert_eq!(
        flag(&a, "--tls-cert-file").as_deref(),
        Some("/etc/vm-dhcp/tls/tls.crt")
    );
    assert_eq!(
        flag(&a, "--tls-private-key-file").as_deref(),
        Some("/etc/vm-dhcp/tls/tls.key")
    );
    let secret_name = secret_mounted_at(apiserver, "/etc/vm-dhcp/tls").expect("TLS volume");
    assert_eq!(secret_name, format!("{APISERVER}-tls"));
    let secret = named(&docs, "Secret", &secret_name);
    assert_eq!(secret["type"], "kubernetes.io/tls");
    let api = check_apiservice(&docs);
    assert!(api["metadata"]["annotations"].get(INJECT_CA_FROM).is_none());
    let ca_bundle = api["spec"]["caBundle"]
        .as_str()
        .expect("self-managed caBundle");
    assert_eq!(
        ca_bundle, secret["data"]["ca.crt"],
        "the caBundle is the Secret's CA"
    );
    verify_serving_cert(
        &b64(ca_bundle),
        &b64(secret["data"]["tls.crt"].as_str().expect("tls.crt")),
        &format!("{APISERVER}.{NAMESPACE}.svc"),
    );
    assert!(
        secret["data"]["tls.key"]
            .as_str()
            .is_some_and(|k| !k.is_empty())
    );
}

#[test]
fn cert_manager_mode_renders_issuers_certificates_and_injection() {
    let docs = objects(&CERT_MANAGER);
    check_components(&docs);
    // self-signed Issuer -> CA Certificate -> CA Issuer -> serving Certificates.
    let issuers = of_kind(&docs, "Issuer");
    assert_eq!(issuers.len(), 2);
    let selfsigned = issuers
        .iter()
        .find(|i| i["spec"].get("selfSigned").is_some())
        .expect("self-signed Issuer");
    let ca_issuer = issuers
        .iter()
        .find(|i| i["spec"].get("ca").is_some())
        .expect("CA Issuer");
    let certs = of_kind(&docs, "Certificate");
    assert_eq!(certs.len(), 3, "CA, webhook, aggregated API");
    let ca_cert = certs
        .iter()
        .find(|c| c["spec"]["isCA"] == true)
        .expect("CA Certificate");
    assert_eq!(
        ca_cert["spec"]["issuerRef"]["name"],
        selfsigned["metadata"]["name"]
    );
    assert_eq!(
        ca_issuer["spec"]["ca"]["secretName"],
        ca_cert["spec"]["secretName"]
    );
    for (service, deploy) in [
        (WEBHOOK, format!("{RELEASE}-webhook")),
        (APISERVER, APISERVER.to_string()),
    ] {
        let cert = named(&docs, "Certificate", service);
        assert_eq!(
            cert["spec"]["issuerRef"]["name"],
            ca_issuer["metadata"]["name"]
        );
        assert_eq!(cert["spec"]["issuerRef"]["kind"], "Issuer");
        let dns = strings(&cert["spec"]["dnsNames"]);
        for want in [
            format!("{service}.{NAMESPACE}.svc"),
            format!("{service}.{NAMESPACE}.svc.cluster.local"),
        ] {
            assert!(dns.contains(&want), "{service}: {dns:?} lacks {want}");
        }
        // The Deployment serves that Certificate's Secret, from files.
        let d = named(&docs, "Deployment", &deploy);
        assert_eq!(
            secret_mounted_at(d, "/etc/vm-dhcp/tls").as_deref(),
            cert["spec"]["secretName"].as_str(),
            "{deploy}"
        );
        let a = args(d);
        assert_eq!(
            flag(&a, "--tls-cert-file").as_deref(),
            Some("/etc/vm-dhcp/tls/tls.crt")
        );
        assert_eq!(
            flag(&a, "--tls-private-key-file").as_deref(),
            Some("/etc/vm-dhcp/tls/tls.key")
        );
    }
    let api = check_apiservice(&docs);
    assert_eq!(
        api["metadata"]["annotations"][INJECT_CA_FROM],
        format!("{NAMESPACE}/{APISERVER}")
    );
    assert!(
        api["spec"].get("caBundle").is_none(),
        "cainjector writes it"
    );
    assert!(
        of_kind(&docs, "Secret").is_empty(),
        "cert-manager makes every Secret"
    );
}

#[test]
fn cert_manager_mode_fails_clearly_without_cert_manager() {
    for args in [
        &["--set", "certificates.mode=cert-manager"][..],
        &["--set", "webhook.tls.mode=cert-manager"][..],
        // Another API group is no substitute.
        &[
            "--set",
            "certificates.mode=cert-manager",
            "--api-versions",
            "monitoring.coreos.com/v1",
        ][..],
    ] {
        let (ok, _, stderr) = helm_template(args);
        assert!(!ok, "{args:?} rendered without cert-manager");
        assert!(
            stderr.contains("does not serve cert-manager.io/v1: install cert-manager first"),
            "{args:?}: {stderr}"
        );
    }
}

#[test]
fn pod_disruption_budgets_only_for_replicated_components() {
    assert!(of_kind(&objects(&[]), "PodDisruptionBudget").is_empty());
    let docs = objects(&[
        "--set",
        "webhook.replicaCount=2",
        "--set",
        "apiserver.replicaCount=3",
    ]);
    let pdbs = of_kind(&docs, "PodDisruptionBudget");
    assert_eq!(pdbs.len(), 2);
    for deploy in [format!("{RELEASE}-webhook"), APISERVER.to_string()] {
        let d = named(&docs, "Deployment", &deploy);
        let pdb = named(&docs, "PodDisruptionBudget", &deploy);
        assert_eq!(
            pdb["spec"]["selector"]["matchLabels"],
            d["spec"]["selector"]["matchLabels"]
        );
        assert_eq!(pdb["spec"]["maxUnavailable"], 1);
    }
}

/// Rolling upgrades drop no request: the webhook and the aggregated API keep serving a few
/// seconds after their endpoint goes (a preStop sleep action, from Kubernetes 1.30 on), and
/// a new replica is Ready before an old one goes. Older clusters are refused clearly.
#[test]
fn rolling_upgrades_keep_admission_and_the_api_available() {
    let docs = objects(&[]);
    for deploy in [format!("{RELEASE}-webhook"), APISERVER.to_string()] {
        let d = named(&docs, "Deployment", &deploy);
        assert_eq!(
            container(d)["lifecycle"]["preStop"]["sleep"]["seconds"],
            5,
            "{deploy}"
        );
        assert_eq!(
            d["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"], 0,
            "{deploy}"
        );
    }
    let docs = objects(&["--kube-version", "1.29.3"]);
    for d in of_kind(&docs, "Deployment") {
        assert!(
            container(d)["lifecycle"].is_null(),
            "{}: no sleep action before 1.30",
            d["metadata"]["name"]
        );
    }
    let (ok, _, stderr) = helm_template(&["--kube-version", "1.27.3"]);
    assert!(!ok, "matchConditions need Kubernetes 1.28");
    assert!(stderr.contains("chart requires kubeVersion"), "{stderr}");
}

// --- RBAC -------------------------------------------------------------------------------

fn rule_allows(rule: &Value, group: &str, resource: &str, verb: &str, name: Option<&str>) -> bool {
    let has = |field: &str, want: &str| strings(&rule[field]).iter().any(|v| v == want || v == "*");
    let names = strings(&rule["resourceNames"]);
    has("apiGroups", group)
        && has("resources", resource)
        && has("verbs", verb)
        && (names.is_empty() || name.is_some_and(|n| names.iter().any(|x| x == n)))
}

/// Whether the rendered RBAC lets ServiceAccount `sa` (release namespace) do `verb` on
/// `group/resource` (named `name`) in `namespace` (None: cluster-wide).
fn can(
    docs: &[Value],
    sa: &str,
    verb: &str,
    group: &str,
    resource: &str,
    namespace: Option<&str>,
    name: Option<&str>,
) -> bool {
    let subject = json!({"kind": "ServiceAccount", "name": sa, "namespace": NAMESPACE});
    let bound = |b: &Value| {
        b["subjects"]
            .as_array()
            .is_some_and(|s| s.contains(&subject))
    };
    let role_allows = |kind: &str, role: &str, ns: Option<&str>| {
        docs.iter()
            .filter(|r| {
                r["kind"] == kind
                    && r["metadata"]["name"] == role
                    && (kind == "ClusterRole" || r["metadata"]["namespace"].as_str() == ns)
            })
            .flat_map(|r| r["rules"].as_array().cloned().unwrap_or_default())
            .any(|rule| rule_allows(&rule, group, resource, verb, name))
    };
    let cluster = of_kind(docs, "ClusterRoleBinding")
        .into_iter()
        .filter(|b| bound(b))
        .any(|b| {
            role_allows(
                "ClusterRole",
                b["roleRef"]["name"].as_str().unwrap_or(""),
                None,
            )
        });
    let local = of_kind(docs, "RoleBinding")
        .into_iter()
        .filter(|b| bound(b))
        .any(|b| {
            let ns = b["metadata"]["namespace"].as_str();
            namespace.is_some()
                && ns == namespace
                && role_allows(
                    b["roleRef"]["kind"].as_str().unwrap_or(""),
                    b["roleRef"]["name"].as_str().unwrap_or(""),
                    ns,
                )
        });
    cluster || local
}

const NET: &str = "network.harvesterhci.io";
const RECORDS: [&str; 2] = ["ippooladdresses", "ippoolmacclaims"];
const WRITES: [&str; 5] = ["create", "update", "patch", "delete", "deletecollection"];

#[test]
fn each_service_account_can_do_what_its_component_does_and_no_more() {
    let sa = |c: &str| format!("{RELEASE}-{c}");
    let (controller, agent, webhook, apiserver) = (
        RELEASE.to_string(),
        sa("agent"),
        sa("webhook"),
        sa("apiserver"),
    );
    for mode in [&[][..], &CERT_MANAGER[..]] {
        let docs = objects(mode);
        let can =
            |who: &str,
             verb: &str,
             group: &str,
             res: &str,
             ns: Option<&str>,
             name: Option<&str>| { can(&docs, who, verb, group, res, ns, name) };
        // The allocation records: written by the webhook and the controller only.
        for res in RECORDS {
            for verb in ["create", "get", "list", "watch", "update", "delete"] {
                assert!(
                    can(&webhook, verb, NET, res, None, None),
                    "webhook {verb} {res}"
                );
                assert!(
                    can(&controller, verb, NET, res, None, None),
                    "controller {verb} {res}"
                );
            }
        }
        for who in [&agent, &apiserver] {
            for verb in ["get", "list", "watch"] {
                for res in ["ippools", "ippooladdresses"] {
                    assert!(can(who, verb, NET, res, None, None), "{who} {verb} {res}");
                }
            }
            for res in RECORDS.iter().chain(&["ippools"]) {
                for verb in WRITES {
                    assert!(
                        !can(who, verb, NET, res, Some(NAMESPACE), None),
                        "{who} must not {verb} {res}"
                    );
                }
            }
        }
        // The controller: pools and vmnetcfgs, agent pods and Leases in its namespace only.
        for verb in ["create", "delete", "update", "patch"] {
            assert!(can(
                &controller,
                verb,
                NET,
                "virtualmachinenetworkconfigs",
                None,
                None
            ));
        }
        assert!(can(
            &controller,
            "update",
            NET,
            "ippools/status",
            None,
            None
        ));
        assert!(can(
            &controller,
            "create",
            "",
            "pods",
            Some(NAMESPACE),
            None
        ));
        assert!(!can(
            &controller,
            "create",
            "",
            "pods",
            Some("default"),
            None
        ));
        assert!(can(
            &controller,
            "update",
            "coordination.k8s.io",
            "leases",
            Some(NAMESPACE),
            None
        ));
        assert!(can(
            &controller,
            "create",
            "events.k8s.io",
            "events",
            None,
            None
        ));
        assert!(!can(
            &controller,
            "get",
            "",
            "secrets",
            Some(NAMESPACE),
            Some("anything")
        ));
        // The agents: their pool's Lease.
        assert!(can(
            &agent,
            "create",
            "coordination.k8s.io",
            "leases",
            Some(NAMESPACE),
            None
        ));
        assert!(can(
            &agent,
            "update",
            "coordination.k8s.io",
            "leases",
            Some(NAMESPACE),
            None
        ));
        assert!(!can(&agent, "create", "", "pods", Some(NAMESPACE), None));
        // ...and check who reads their leases: TokenReview + SubjectAccessReview, the
        // aggregated API being allowed to get dhcpleases (its token is what it presents).
        assert!(can(
            &agent,
            "create",
            "authentication.k8s.io",
            "tokenreviews",
            None,
            None
        ));
        assert!(can(
            &agent,
            "create",
            "authorization.k8s.io",
            "subjectaccessreviews",
            None,
            None
        ));
        assert!(can(
            &apiserver,
            "get",
            "dhcp.harvesterhci.io",
            "dhcpleases",
            Some(NAMESPACE),
            None
        ));
        for who in [&agent, &webhook, &controller] {
            assert!(
                !can(
                    who,
                    "get",
                    "dhcp.harvesterhci.io",
                    "dhcpleases",
                    Some(NAMESPACE),
                    None
                ),
                "{who} must not read the agents' leases"
            );
        }
        // The aggregated API: its sources, delegated authorization, the front-proxy settings.
        assert!(can(&apiserver, "watch", "", "pods", None, None));
        assert!(!can(
            &apiserver,
            "create",
            "",
            "pods",
            Some(NAMESPACE),
            None
        ));
        let delegator = of_kind(&docs, "ClusterRoleBinding").into_iter().any(|b| {
            b["roleRef"]["name"] == "system:auth-delegator"
                && b["subjects"][0]["name"] == apiserver.as_str()
        });
        assert!(delegator, "the aggregated API needs system:auth-delegator");
        let reader = of_kind(&docs, "RoleBinding").into_iter().any(|b| {
            b["metadata"]["namespace"] == "kube-system"
                && b["roleRef"]["name"] == "extension-apiserver-authentication-reader"
                && b["subjects"][0]["name"] == apiserver.as_str()
        });
        assert!(
            reader,
            "the aggregated API reads kube-system/extension-apiserver-authentication"
        );
        // The webhook: pools (read only: the status is the controller's projection), the
        // allocation records (create = reserve, patch = adopt, delete = roll back), NADs.
        assert!(can(&webhook, "watch", NET, "ippools", None, None));
        assert!(!can(&webhook, "update", NET, "ippools/status", None, None));
        assert!(!can(&webhook, "patch", NET, "ippools/status", None, None));
        for verb in ["create", "patch", "delete"] {
            for res in RECORDS {
                assert!(
                    can(&webhook, verb, NET, res, None, None),
                    "webhook {verb} {res}"
                );
            }
        }
        for res in RECORDS {
            assert!(
                can(&controller, "deletecollection", NET, res, None, None),
                "the controller deletes a deleted pool's {res}"
            );
        }
        assert!(can(
            &webhook,
            "get",
            "k8s.cni.cncf.io",
            "network-attachment-definitions",
            None,
            None
        ));
        assert!(!can(&webhook, "delete", NET, "ippools", None, None));
        // Its own certificate and configurations in self-managed mode, nothing in cert-manager mode.
        let self_managed = mode.is_empty();
        let admission = "admissionregistration.k8s.io";
        for kind in [
            "mutatingwebhookconfigurations",
            "validatingwebhookconfigurations",
        ] {
            assert_eq!(
                can(&webhook, "patch", admission, kind, None, Some(WEBHOOK)),
                self_managed,
                "{mode:?} patch {kind}"
            );
            assert!(
                !can(
                    &webhook,
                    "patch",
                    admission,
                    kind,
                    None,
                    Some("someone-else")
                ),
                "only its own {kind}"
            );
            assert!(
                !can(&webhook, "create", admission, kind, None, None),
                "never new {kind}"
            );
        }
        let tls = format!("{WEBHOOK}-tls");
        assert_eq!(
            can(&webhook, "get", "", "secrets", Some(NAMESPACE), Some(&tls)),
            self_managed
        );
        assert_eq!(
            can(&webhook, "create", "", "secrets", Some(NAMESPACE), None),
            self_managed
        );
        assert!(
            !can(
                &webhook,
                "get",
                "",
                "secrets",
                Some(NAMESPACE),
                Some("other")
            ),
            "only its own Secret"
        );
    }
}

#[test]
fn aggregated_roles_let_users_read_everything_and_edit_only_pools_and_vmnetcfgs() {
    let docs = objects(&[]);
    let label = |role: &Value, which: &str| {
        role["metadata"]["labels"][format!("rbac.authorization.k8s.io/aggregate-to-{which}")]
            == "true"
    };
    let roles = of_kind(&docs, "ClusterRole");
    let aggregated: Vec<&&Value> = roles
        .iter()
        .filter(|r| ["view", "edit", "admin"].iter().any(|w| label(r, w)))
        .collect();
    let allows = |which: &str, verb: &str, group: &str, res: &str| {
        aggregated
            .iter()
            .filter(|r| label(r, which))
            .flat_map(|r| r["rules"].as_array().cloned().unwrap_or_default())
            .any(|rule| rule_allows(&rule, group, res, verb, None))
    };
    let dhcp = ["ipamallocations", "macaddresses", "dhcpleases"];
    let network = [
        "ippools",
        "virtualmachinenetworkconfigs",
        "ippooladdresses",
        "ippoolmacclaims",
    ];
    for which in ["view", "edit", "admin"] {
        for verb in ["get", "list", "watch"] {
            for res in dhcp {
                assert!(
                    allows(which, verb, "dhcp.harvesterhci.io", res),
                    "{which}: {verb} {res}"
                );
            }
            for res in network {
                assert!(allows(which, verb, NET, res), "{which}: {verb} {res}");
            }
        }
        for verb in WRITES {
            for res in dhcp {
                assert!(
                    !allows(which, verb, "dhcp.harvesterhci.io", res),
                    "{which}: {verb} {res} (read-only views)"
                );
            }
            for res in RECORDS {
                assert!(
                    !allows(which, verb, NET, res),
                    "{which}: {verb} {res} (written by vm-dhcp only)"
                );
            }
            for res in ["ippools/status", "virtualmachinenetworkconfigs/status"] {
                assert!(!allows(which, verb, NET, res), "{which}: {verb} {res}");
            }
        }
    }
    for res in ["ippools", "virtualmachinenetworkconfigs"] {
        for verb in ["create", "update", "patch", "delete"] {
            assert!(
                !allows("view", verb, NET, res),
                "view must not {verb} {res}"
            );
            assert!(allows("edit", verb, NET, res), "edit: {verb} {res}");
            assert!(allows("admin", verb, NET, res), "admin: {verb} {res}");
        }
    }
    // Nothing else is aggregated into the users' roles.
    for role in &aggregated {
        for rule in role["rules"].as_array().expect("rules") {
            for group in strings(&rule["apiGroups"]) {
                assert!(
                    group == NET || group == "dhcp.harvesterhci.io",
                    "{} aggregates {group}",
                    role["metadata"]["name"]
                );
            }
        }
    }
}

// --- monitoring -----------------------------------------------------------------------------

/// Metric names the code registers, with their prefixes, read from the sources: a
/// registry prefix (`with_prefix("…")`) applies to the registrations of its directory.
fn exported_metrics() -> BTreeSet<String> {
    fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).expect("source directory").flatten() {
            let path = entry.path();
            if path.is_dir() {
                rust_files(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    /// The string literals following `marker` in `text`.
    fn literals_after<'a>(text: &'a str, marker: &str) -> Vec<&'a str> {
        text.match_indices(marker)
            .filter_map(|(i, _)| {
                let rest = text[i + marker.len()..].trim_start();
                let rest = rest.strip_prefix('"')?;
                rest.split('"').next()
            })
            .collect()
    }
    let mut files = Vec::new();
    for dir in ["src", "webhook/src", "apiserver/src"] {
        rust_files(&repo_dir().join(dir), &mut files);
    }
    let mut by_dir: BTreeMap<PathBuf, (Option<String>, Vec<String>)> = BTreeMap::new();
    for file in files {
        let text = std::fs::read_to_string(&file).expect("reading source");
        let entry = by_dir
            .entry(file.parent().expect("dir").to_path_buf())
            .or_default();
        if let Some(prefix) = literals_after(&text, "with_prefix(").first() {
            entry.0 = Some(prefix.to_string());
        }
        entry.1.extend(
            literals_after(&text, ".register(")
                .into_iter()
                .map(String::from),
        );
    }
    let mut out = BTreeSet::new();
    for (prefix, metrics) in by_dir.into_values() {
        for m in metrics {
            out.insert(match &prefix {
                Some(p) => format!("{p}_{m}"),
                None => m,
            });
        }
    }
    out
}

/// Our metric names in a PromQL expression (kube-apiserver's are not ours).
fn our_metrics(expr: &str) -> Vec<String> {
    expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("vmdhcp") || w.starts_with("vm_dhcp"))
        .map(String::from)
        .collect()
}

#[test]
fn monitoring_objects_only_with_the_prometheus_operator() {
    let without = objects(&[]);
    for kind in ["ServiceMonitor", "PodMonitor"] {
        assert!(
            of_kind(&without, kind).is_empty(),
            "{kind} without monitoring.coreos.com/v1"
        );
    }
    assert!(
        of_kind(&without, "ConfigMap").is_empty(),
        "no dashboard without monitoring"
    );

    for mode in [&[][..], &CERT_MANAGER[..]] {
        let mut args = MONITORING.to_vec();
        args.extend(mode);
        let docs = objects(&args);
        let monitors = of_kind(&docs, "ServiceMonitor");
        assert_eq!(monitors.len(), 3, "controller, webhook, aggregated API");
        // Each selects its Service's labels and names one of its ports.
        for sm in &monitors {
            let selector = sm["spec"]["selector"]["matchLabels"]
                .as_object()
                .expect("selector");
            let services: Vec<&Value> = of_kind(&docs, "Service")
                .into_iter()
                .filter(|s| {
                    selector
                        .iter()
                        .all(|(k, v)| &s["metadata"]["labels"][k] == v)
                })
                .collect();
            assert_eq!(services.len(), 1, "{}: one Service", sm["metadata"]["name"]);
            let port = &sm["spec"]["endpoints"][0]["port"];
            assert!(
                services[0]["spec"]["ports"]
                    .as_array()
                    .expect("ports")
                    .iter()
                    .any(|p| &p["name"] == port),
                "{}: port {port}",
                sm["metadata"]["name"]
            );
        }
        // The webhook is scraped over HTTPS and verified with the CA it really uses.
        let webhook_sm = named(&docs, "ServiceMonitor", &format!("{RELEASE}-webhook"));
        let endpoint = &webhook_sm["spec"]["endpoints"][0];
        assert_eq!(endpoint["scheme"], "https");
        assert_eq!(
            endpoint["tlsConfig"]["serverName"],
            format!("{WEBHOOK}.{NAMESPACE}.svc")
        );
        let ca_secret = endpoint["tlsConfig"]["ca"]["secret"]["name"]
            .as_str()
            .expect("CA secret");
        if mode.is_empty() {
            assert_eq!(
                ca_secret,
                format!("{WEBHOOK}-tls"),
                "the webhook's self-managed Secret"
            );
        } else {
            assert_eq!(
                Some(ca_secret),
                named(&docs, "Certificate", WEBHOOK)["spec"]["secretName"].as_str()
            );
        }
        // The agents, which have no Service: a PodMonitor on the labels the controller
        // gives them, with the pool as a label.
        let pm = only(&docs, "PodMonitor");
        assert_eq!(
            pm["spec"]["selector"]["matchLabels"]["network.harvesterhci.io/vm-dhcp-controller"],
            "agent"
        );
        let endpoint = &pm["spec"]["podMetricsEndpoints"][0];
        assert_eq!(endpoint["port"], "http");
        assert!(
            endpoint["relabelings"]
                .as_array()
                .expect("relabelings")
                .iter()
                .any(|r| r["targetLabel"] == "ippool")
        );
    }

    // The dashboard, for rancher-monitoring's sidecar.
    let docs = objects(&MONITORING);
    let cm = only(&docs, "ConfigMap");
    assert_eq!(cm["metadata"]["namespace"], "cattle-dashboards");
    assert_eq!(cm["metadata"]["labels"]["grafana_dashboard"], "1");
    let moved = objects(&[
        "--api-versions",
        "monitoring.coreos.com/v1",
        "--set",
        "monitoring.dashboard.namespace=monitoring",
    ]);
    assert_eq!(
        only(&moved, "ConfigMap")["metadata"]["namespace"],
        "monitoring"
    );
    let json_text = cm["data"]
        .as_object()
        .and_then(|d| d.values().next())
        .and_then(Value::as_str)
        .expect("dashboard JSON");
    let dashboard: Value = serde_json::from_str(json_text).expect("the dashboard is JSON");
    let panels = dashboard["panels"].as_array().expect("panels");
    let titles: Vec<&str> = panels.iter().filter_map(|p| p["title"].as_str()).collect();
    for want in [
        "Pool usage",
        "Addresses allocated and released",
        "Admission latency",
        "Admission refusals",
        "DHCP answers per second by message type",
        "Active agents per pool",
    ] {
        assert!(
            titles.contains(&want),
            "dashboard lacks {want:?}: {titles:?}"
        );
    }
    // Every metric it queries is one the code exports (counters end in _total,
    // histograms in _bucket/_sum/_count on the wire).
    let exported = exported_metrics();
    for required in [
        "vmdhcpcontroller_ippool_used",
        "vmdhcp_webhook_admissions",
        "vmdhcp_agent_replies",
        "vmdhcp_agent_active",
    ] {
        assert!(
            exported.contains(required),
            "source scan missed {required}: {exported:?}"
        );
    }
    let mut used = BTreeSet::new();
    for panel in panels {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().expect("expr");
            assert!(
                !expr.contains("__WEBHOOK_NAME__"),
                "placeholder left in {expr}"
            );
            for metric in our_metrics(expr) {
                let base = ["_total", "_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|s| metric.strip_suffix(s).filter(|b| exported.contains(*b)))
                    .unwrap_or(&metric);
                assert!(
                    exported.contains(base),
                    "panel {:?} queries {metric}, which the code does not export ({exported:?})",
                    panel["title"]
                );
                used.insert(base.to_string());
            }
        }
    }
    for required in [
        "vmdhcpcontroller_ippool_used",
        "vmdhcp_webhook_allocations_committed",
        "vmdhcp_agent_replies",
        "vmdhcp_agent_active",
        "vmdhcp_webhook_admissions",
    ] {
        assert!(
            used.contains(required),
            "the dashboard does not use {required}"
        );
    }
    // The admission latency panel names our webhooks in kube-apiserver's metric.
    assert!(json_text.contains(&format!("[.]{WEBHOOK}[.]harvesterhci[.]io")));
}

// --- Go chart values, Addon, image --------------------------------------------------------

#[test]
fn the_go_charts_value_keys_are_accepted() {
    // The Go chart's values (harvester/charts), every key set to a non-default value.
    let go_values = r#"
replicaCount: 2
image:
  repository: registry.example/vm-dhcp
  pullPolicy: Always
  tag: v9.9.9
agent:
  image:
    repository: registry.example/vm-dhcp-agent
    pullPolicy: IfNotPresent
    tag: v9.9.8
webhook:
  replicaCount: 3
  image:
    repository: registry.example/vm-dhcp-webhook
    pullPolicy: Never
    tag: v9.9.7
  httpsPort: 9443
  service:
    type: NodePort
    port: 8444
  resources:
    limits:
      memory: 300Mi
serviceCIDR: 10.43.0.0/16
imagePullSecrets:
  - name: pull
nameOverride: dhcp
fullnameOverride: my-dhcp
serviceAccount:
  create: true
  automount: false
  annotations:
    example.com/role: dhcp
  name: dhcp-sa
podAnnotations:
  example.com/scrape: "yes"
podLabels:
  team: net
podSecurityContext:
  fsGroup: 2000
securityContext:
  runAsUser: 1000
resources:
  limits:
    cpu: 200m
service:
  type: ClusterIP
  metricsPort: 9090
volumes: []
volumeMounts: []
nodeSelector:
  kubernetes.io/os: linux
tolerations:
  - key: node-role.kubernetes.io/control-plane
    operator: Exists
affinity:
  nodeAffinity:
    preferredDuringSchedulingIgnoredDuringExecution:
      - weight: 1
        preference:
          matchExpressions: [{key: a, operator: Exists}]
"#;
    let file = std::env::temp_dir().join(format!("vm-dhcp-go-values-{}.yaml", std::process::id()));
    std::fs::write(&file, go_values).expect("writing values");
    let docs = objects(&["-f", file.to_str().expect("utf-8 path")]);
    let _ = std::fs::remove_file(&file);

    let controller = named(&docs, "Deployment", "my-dhcp");
    let webhook = named(&docs, "Deployment", "my-dhcp-webhook");
    let apiserver = named(&docs, "Deployment", "my-dhcp-apiserver");
    assert_eq!(controller["spec"]["replicas"], 2, "replicaCount");
    assert_eq!(webhook["spec"]["replicas"], 3, "webhook.replicaCount");
    assert_eq!(
        container(controller)["image"],
        "registry.example/vm-dhcp:v9.9.9"
    );
    assert_eq!(container(controller)["imagePullPolicy"], "Always");
    assert_eq!(
        container(apiserver)["image"],
        "registry.example/vm-dhcp:v9.9.9",
        "the one image"
    );
    assert_eq!(
        container(webhook)["image"],
        "registry.example/vm-dhcp-webhook:v9.9.7",
        "webhook.image"
    );
    assert_eq!(container(webhook)["imagePullPolicy"], "Never");
    let c = args(controller);
    assert_eq!(
        flag(&c, "--image").as_deref(),
        Some("registry.example/vm-dhcp-agent:v9.9.8"),
        "agent.image"
    );
    assert_eq!(
        flag(&c, "--service-account-name").as_deref(),
        Some("dhcp-sa-agent")
    );
    assert_eq!(
        flag(&c, "--http-addr").as_deref(),
        Some("0.0.0.0:9090"),
        "service.metricsPort"
    );
    assert_eq!(flag(&c, "--name").as_deref(), Some("my-dhcp"));
    let w = args(webhook);
    assert_eq!(
        flag(&w, "--https-port").as_deref(),
        Some("9443"),
        "webhook.httpsPort"
    );
    assert_eq!(
        flag(&w, "--service-port").as_deref(),
        Some("8444"),
        "webhook.service.port"
    );
    assert_eq!(
        flag(&w, "--service-cidr").as_deref(),
        Some("10.43.0.0/16"),
        "serviceCIDR"
    );
    assert_eq!(
        flag(&w, "--name").as_deref(),
        Some("my-dhcp-webhook"),
        "fullnameOverride"
    );
    assert_eq!(container(webhook)["ports"][0]["containerPort"], 9443);
    assert_eq!(
        container(webhook)["resources"]["limits"]["memory"],
        "300Mi",
        "webhook.resources"
    );
    assert_eq!(
        container(controller)["resources"]["limits"]["cpu"],
        "200m",
        "resources"
    );
    let svc = named(&docs, "Service", "my-dhcp-webhook");
    assert_eq!(svc["spec"]["type"], "NodePort", "webhook.service.type");
    assert_eq!(svc["spec"]["ports"][0]["port"], 8444);
    assert_eq!(
        named(&docs, "Service", "my-dhcp")["spec"]["ports"][0]["port"],
        9090
    );
    let hooks = only(&docs, "MutatingWebhookConfiguration");
    assert_eq!(
        hooks["webhooks"][0]["clientConfig"]["service"]["port"],
        8444
    );
    assert_eq!(
        hooks["webhooks"][0]["clientConfig"]["service"]["name"],
        "my-dhcp-webhook"
    );
    // ServiceAccounts: serviceAccount.name, annotations, automount.
    let accounts = names(&docs, "ServiceAccount");
    let want: BTreeSet<String> = [
        "dhcp-sa",
        "dhcp-sa-agent",
        "dhcp-sa-webhook",
        "dhcp-sa-apiserver",
    ]
    .map(String::from)
    .into();
    assert_eq!(accounts, want);
    for sa in of_kind(&docs, "ServiceAccount") {
        assert_eq!(sa["metadata"]["annotations"]["example.com/role"], "dhcp");
        assert_eq!(sa["automountServiceAccountToken"], false);
        // The agent pods (made by the controller) get the pull secrets from theirs.
        assert_eq!(sa["imagePullSecrets"], json!([{"name": "pull"}]));
    }
    assert_eq!(
        controller["spec"]["template"]["spec"]["serviceAccountName"],
        "dhcp-sa"
    );
    // Pods: annotations, labels, security contexts, pull secrets, scheduling.
    for d in [controller, webhook, apiserver] {
        let t = &d["spec"]["template"];
        assert_eq!(t["metadata"]["annotations"]["example.com/scrape"], "yes");
        assert_eq!(t["metadata"]["labels"]["team"], "net");
        // Merged into the chart's hardened defaults, as Helm merges values.
        assert_eq!(t["spec"]["securityContext"]["fsGroup"], 2000);
        assert_eq!(t["spec"]["securityContext"]["runAsNonRoot"], true);
        assert_eq!(container(d)["securityContext"]["runAsUser"], 1000);
        assert_eq!(t["spec"]["imagePullSecrets"], json!([{"name": "pull"}]));
        assert_eq!(
            t["spec"]["nodeSelector"],
            json!({"kubernetes.io/os": "linux"})
        );
        assert_eq!(
            t["spec"]["tolerations"][0]["key"],
            "node-role.kubernetes.io/control-plane"
        );
        assert!(t["spec"]["affinity"]["nodeAffinity"].is_object());
        // nameOverride names the selector labels, as in the Go chart.
        let name = d["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"]
            .as_str()
            .expect("name label");
        assert!(name.starts_with("dhcp"), "{name}");
    }
    // The Go chart's selectors, which a Deployment cannot change on upgrade.
    assert_eq!(
        controller["spec"]["selector"]["matchLabels"],
        json!({"app.kubernetes.io/name": "dhcp", "app.kubernetes.io/instance": RELEASE})
    );
    assert_eq!(
        webhook["spec"]["selector"]["matchLabels"],
        json!({"app.kubernetes.io/name": "dhcp-webhook", "app.kubernetes.io/instance": RELEASE})
    );
    // Replicated: disruption budgets.
    assert_eq!(
        names(&docs, "PodDisruptionBudget"),
        BTreeSet::from(["my-dhcp".to_string(), "my-dhcp-webhook".to_string()])
    );
}

/// Every key path of a YAML mapping, e.g. "webhook.service.port".
fn key_paths(v: &Value, prefix: &str, out: &mut BTreeSet<String>) {
    if let Some(map) = v.as_object() {
        for (k, child) in map {
            let path = if prefix.is_empty() {
                k.clone()
            } else {
                format!("{prefix}.{k}")
            };
            out.insert(path.clone());
            key_paths(child, &path, out);
        }
    }
}

#[test]
fn the_harvester_addon_names_this_chart_and_its_values() {
    let read_yaml = |path: PathBuf| -> Value {
        let text =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    };
    let addon = read_yaml(repo_dir().join("deploy/harvester-vm-dhcp-controller.yaml"));
    let chart = read_yaml(chart_dir().join("Chart.yaml"));
    let values = read_yaml(chart_dir().join("values.yaml"));
    // As the Go add-on (harvester/experimental-addons): same object, so Harvester's Add-ons
    // page shows it and enabling it installs release harvester-vm-dhcp-controller.
    assert_eq!(addon["apiVersion"], "harvesterhci.io/v1beta1");
    assert_eq!(addon["kind"], "Addon");
    assert_eq!(addon["metadata"]["name"], RELEASE);
    assert_eq!(addon["metadata"]["namespace"], NAMESPACE);
    assert_eq!(
        addon["metadata"]["labels"]["addon.harvesterhci.io/experimental"],
        "true"
    );
    assert_eq!(addon["spec"]["enabled"], false);
    assert_eq!(addon["spec"]["repo"], "https://charts.harvesterhci.io");
    assert_eq!(
        addon["spec"]["chart"], chart["name"],
        "the Addon installs this chart"
    );
    assert_eq!(
        addon["spec"]["version"], chart["version"],
        "... at this version"
    );
    // Its values are this chart's.
    let content = addon["spec"]["valuesContent"]
        .as_str()
        .expect("valuesContent");
    let addon_values: Value = serde_yaml::from_str(content).expect("valuesContent is YAML");
    let (mut known, mut given) = (BTreeSet::new(), BTreeSet::new());
    key_paths(&values, "", &mut known);
    key_paths(&addon_values, "", &mut given);
    assert!(given.contains("serviceCIDR"), "the docs' one setting");
    let unknown: Vec<&String> = given.difference(&known).collect();
    assert!(
        unknown.is_empty(),
        "valuesContent keys not in chart/values.yaml: {unknown:?}"
    );
    // Rendered as Harvester's helm-controller would: the webhook's name is the binary's
    // default, and the values take effect.
    let file =
        std::env::temp_dir().join(format!("vm-dhcp-addon-values-{}.yaml", std::process::id()));
    std::fs::write(&file, content).expect("writing values");
    let (ok, out, err) =
        helm_template_as(RELEASE, NAMESPACE, &["-f", file.to_str().expect("utf-8")]);
    let _ = std::fs::remove_file(&file);
    assert!(ok, "the Addon's values do not render: {err}");
    let docs = documents(&out);
    let webhook = named(&docs, "Deployment", &format!("{RELEASE}-webhook"));
    assert_eq!(flag(&args(webhook), "--name").as_deref(), Some(WEBHOOK));
    assert_eq!(
        webhook["spec"]["replicas"], addon_values["webhook"]["replicaCount"],
        "webhook.replicaCount from the Addon"
    );
    assert_eq!(
        flag(&args(webhook), "--service-cidr").as_deref(),
        addon_values["serviceCIDR"].as_str()
    );
}

/// Programs the code starts (`Command::new("…")`), each with the Debian package that
/// provides it in the image.
const PROGRAM_PACKAGES: [(&str, &str); 1] = [("ip", "iproute2")];

#[test]
fn the_image_carries_every_program_the_binary_runs_and_is_non_root() {
    fn scan(dir: &Path, found: &mut BTreeMap<String, PathBuf>) {
        for entry in std::fs::read_dir(dir).expect("source directory").flatten() {
            let path = entry.path();
            if path.is_dir() {
                scan(&path, found);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let text = std::fs::read_to_string(&path).expect("reading source");
                // Test modules start programs the image never runs (udhcpc, ...).
                let text = text.split("#[cfg(test)]").next().unwrap_or_default();
                for (i, _) in text.match_indices("Command::new(\"") {
                    let rest = &text[i + "Command::new(\"".len()..];
                    if let Some(program) = rest.split('"').next() {
                        found.insert(program.to_string(), path.clone());
                    }
                }
            }
        }
    }
    let mut programs = BTreeMap::new();
    for dir in ["src", "core/src", "webhook/src", "apiserver/src"] {
        scan(&repo_dir().join(dir), &mut programs);
    }
    let dockerfile = std::fs::read_to_string(repo_dir().join("Dockerfile")).expect("Dockerfile");
    // The runtime stage: after the last FROM.
    let runtime = dockerfile.rsplit("\nFROM ").next().expect("a FROM");
    let installed: BTreeSet<&str> = runtime
        .lines()
        .filter(|l| l.contains("apt-get install"))
        .flat_map(|l| l.split_whitespace())
        .filter(|w| !w.starts_with('-') && !["apt-get", "install", "&&", "\\", "RUN"].contains(w))
        .collect();
    for (program, source) in &programs {
        let package = PROGRAM_PACKAGES
            .iter()
            .find(|(p, _)| p == program)
            .map(|(_, pkg)| *pkg)
            .unwrap_or_else(|| {
                panic!(
                    "{} runs `{program}`: add its package to the Dockerfile and to PROGRAM_PACKAGES",
                    source.display()
                )
            });
        assert!(
            installed.contains(package),
            "{} runs `{program}`, but the image does not install {package} (installs {installed:?})",
            source.display()
        );
    }
    let user = runtime
        .lines()
        .filter_map(|l| l.strip_prefix("USER "))
        .next_back()
        .expect("the runtime stage sets USER");
    let uid = user.split(':').next().unwrap_or_default();
    assert!(
        uid.parse::<u32>().is_ok_and(|u| u != 0),
        "the image's user must be a numeric non-root UID (runAsNonRoot), not {user:?}"
    );
    assert_eq!(
        named(&objects(&[]), "Deployment", RELEASE)["spec"]["template"]["spec"]["securityContext"]
            ["runAsUser"]
            .to_string(),
        uid,
        "the chart runs the image's user"
    );
}

// --- against a real kube-apiserver -----------------------------------------------------------

/// Every rendered object that a plain kube-apiserver knows (cert-manager and Prometheus
/// Operator kinds left out), in server-side dry run.
async fn dry_run(cp: &ControlPlane, yaml: &str, what: &str) -> Vec<Value> {
    let docs: Vec<Value> = documents(yaml)
        .into_iter()
        .filter(|d| {
            let api = d["apiVersion"].as_str().unwrap_or_default();
            !api.starts_with("cert-manager.io/") && !api.starts_with("monitoring.coreos.com/")
        })
        .collect();
    let file = cp.dir.join(format!("chart-{what}.json"));
    let list = json!({"apiVersion": "v1", "kind": "List", "items": docs});
    std::fs::write(&file, serde_json::to_vec(&list).expect("JSON"))
        .expect("writing rendered chart");
    let file_arg = file.display().to_string();
    let out = cp
        .kubectl(&["create", "--dry-run=server", "-o", "json", "-f", &file_arg])
        .await;
    assert!(
        out.status.success(),
        "kube-apiserver refused the {what} chart:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // One JSON document per object (or a List of them).
    let items: Vec<Value> = serde_json::Deserializer::from_slice(&out.stdout)
        .into_iter::<Value>()
        .collect::<Result<Vec<_>, _>>()
        .expect("kubectl JSON")
        .into_iter()
        .flat_map(|v| match v["items"].as_array() {
            Some(items) if v["kind"] == "List" => items.clone(),
            _ => vec![v],
        })
        .collect();
    assert_eq!(items.len(), docs.len(), "{what}: every object accepted");
    items
}

/// The kube-apiserver validates what `helm install` would create: every object of both
/// modes (schemas, the preStop sleep action, RBAC rules, the APIService), and the webhook
/// configurations with their matchConditions compiled as CEL. Server-side dry run, so
/// nothing is left to intercept anything.
#[tokio::test]
async fn the_apiserver_accepts_the_rendered_chart() {
    let cp = ControlPlane::shared().await;
    let ns = cp.namespace("chart").await;
    for (what, mode) in [
        ("self-managed", &[][..]),
        ("cert-manager", &CERT_MANAGER[..]),
    ] {
        let (ok, yaml, stderr) = helm_template_as(RELEASE, &ns.name, mode);
        assert!(ok, "{stderr}");
        let items = dry_run(cp, &yaml, what).await;
        let kinds: BTreeSet<&str> = items.iter().filter_map(|i| i["kind"].as_str()).collect();
        for kind in [
            "Deployment",
            "Service",
            "APIService",
            "ClusterRole",
            "RoleBinding",
            "MutatingWebhookConfiguration",
        ] {
            assert!(
                kinds.contains(kind),
                "{what}: {kind} missing from {kinds:?}"
            );
        }

        // The webhook configurations alone, as the apiserver keeps them: the conditions
        // the code evaluates.
        let mut show = mode.to_vec();
        show.extend(["--show-only", TEMPLATE]);
        let (ok, yaml, stderr) = helm_template_as(RELEASE, &ns.name, &show);
        assert!(ok, "{stderr}");
        let items = dry_run(cp, &yaml, &format!("{what}-webhooks")).await;
        let kinds: Vec<&str> = items.iter().filter_map(|i| i["kind"].as_str()).collect();
        assert_eq!(
            kinds,
            [
                "MutatingWebhookConfiguration",
                "ValidatingWebhookConfiguration"
            ],
            "{what}"
        );
        assert!(items.iter().all(|i| i["metadata"]["name"] == WEBHOOK));
        let vm_hook = &items[0]["webhooks"][2];
        assert_eq!(
            vm_hook["matchConditions"][0]["expression"], VM_HAS_MULTUS_CONDITION,
            "{what}"
        );
        assert_eq!(
            vm_hook["matchConditions"][1]["expression"], VM_MATCH_CONDITION,
            "{what}"
        );
    }
}

/// Self-managed mode generates the aggregated API's CA once: an upgrade (rendered with the
/// cluster at hand, so `lookup` sees the Secret) keeps the Secret and the caBundle, so the
/// running pods and the APIService never disagree.
#[tokio::test]
async fn self_managed_apiserver_ca_is_kept_across_upgrades() {
    let cp = ControlPlane::shared().await;
    let ns = cp.namespace("chart-ca").await;
    let kubeconfig = cp.kubeconfig_path.display().to_string();
    let ca_and_secret = |docs: &[Value]| {
        let secret = named(docs, "Secret", &format!("{APISERVER}-tls")).clone();
        (
            only(docs, "APIService")["spec"]["caBundle"].clone(),
            secret["data"].clone(),
            secret,
        )
    };
    // First install: nothing to look up, a new pair.
    let (ok, yaml, stderr) = helm_template_as(
        RELEASE,
        &ns.name,
        &["--dry-run=server", "--kubeconfig", &kubeconfig],
    );
    assert!(ok, "{stderr}");
    let (first_ca, first_data, secret) = ca_and_secret(&documents(&yaml));
    let (ok, yaml, _) = helm_template_as(RELEASE, &ns.name, &[]);
    assert!(ok);
    let (other_ca, _, _) = ca_and_secret(&documents(&yaml));
    assert_ne!(
        first_ca, other_ca,
        "without the Secret each render makes a new CA"
    );
    // The release's Secret exists: the next render reuses it.
    let file = cp.dir.join(format!("chart-ca-{}.json", ns.name));
    std::fs::write(&file, serde_json::to_vec(&secret).expect("JSON")).expect("writing Secret");
    let out = cp
        .kubectl(&["create", "-f", &file.display().to_string()])
        .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (ok, yaml, stderr) = helm_template_as(
        RELEASE,
        &ns.name,
        &["--dry-run=server", "--kubeconfig", &kubeconfig],
    );
    assert!(ok, "{stderr}");
    let (ca, data, _) = ca_and_secret(&documents(&yaml));
    assert_eq!(ca, first_ca, "the caBundle survives an upgrade");
    assert_eq!(data, first_data, "the serving pair survives an upgrade");
}

/// `helm install --dry-run=server` against the control plane: cert-manager mode is refused
/// while the cluster lacks cert-manager.io/v1, and NOTES.txt, as `helm install` prints it,
/// says how to check the install with this release's names.
#[tokio::test]
async fn install_refuses_cert_manager_mode_without_it_and_notes_say_how_to_check() {
    let cp = ControlPlane::shared().await;
    let ns = cp.namespace("chart-notes").await;
    let kubeconfig = cp.kubeconfig_path.display().to_string();
    let install = |values: &[&str]| {
        helm()
            .args(["install", RELEASE])
            .arg(chart_dir())
            .args([
                "--namespace",
                &ns.name,
                "--kubeconfig",
                &kubeconfig,
                "--dry-run=server",
            ])
            .args(values)
            .output()
            .expect("helm install --dry-run")
    };
    let cert_manager = ["--set", "certificates.mode=cert-manager"];
    let out = install(&cert_manager);
    assert!(
        !out.status.success(),
        "cert-manager mode installed without cert-manager"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("does not serve cert-manager.io/v1: install cert-manager first"),
        "{stderr}"
    );

    // cert-manager's Issuer and Certificate kinds (schemaless stand-ins: the real
    // cert-manager is not needed to render and map the objects).
    for (plural, kind) in [("issuers", "Issuer"), ("certificates", "Certificate")] {
        let crd = json!({
            "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
            "metadata": {"name": format!("{plural}.cert-manager.io")},
            "spec": {"group": "cert-manager.io", "scope": "Namespaced",
                "names": {"plural": plural, "singular": kind.to_lowercase(), "kind": kind,
                          "listKind": format!("{kind}List")},
                "versions": [{"name": "v1", "served": true, "storage": true,
                    "schema": {"openAPIV3Schema": {"type": "object",
                                                   "x-kubernetes-preserve-unknown-fields": true}}}]}
        });
        let file = cp.dir.join(format!("chart-cert-manager-{plural}.json"));
        std::fs::write(&file, serde_json::to_vec(&crd).expect("JSON")).expect("writing CRD");
        let out = cp
            .kubectl(&["apply", "-f", &file.display().to_string()])
            .await;
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let out = cp
            .kubectl(&[
                "wait",
                "--for=condition=Established",
                "--timeout=30s",
                &format!("crd/{plural}.cert-manager.io"),
            ])
            .await;
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    for (mode, values) in [
        ("self-managed", &[][..]),
        ("cert-manager", &cert_manager[..]),
    ] {
        // Discovery may lag the CRD by a moment.
        let mut out = install(values);
        for _ in 0..20 {
            if out.status.success() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            out = install(values);
        }
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{mode}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let notes = stdout
            .split("NOTES:")
            .nth(1)
            .unwrap_or_else(|| panic!("{mode}: no NOTES in\n{stdout}"));
        let ns = &ns.name;
        for want in [
            format!("kubectl -n {ns} rollout status deployment/{RELEASE}-webhook"),
            format!("kubectl -n {ns} rollout status deployment/{APISERVER}"),
            format!("kubectl get mutatingwebhookconfiguration {WEBHOOK}"),
            "kubectl get apiservice v1alpha1.dhcp.harvesterhci.io".to_string(),
            "kubectl get ipamallocations.dhcp.harvesterhci.io -A".to_string(),
            format!("certificates {mode}"),
        ] {
            assert!(
                notes.contains(&want),
                "{mode}: NOTES lack {want:?}:\n{notes}"
            );
        }
        assert_eq!(
            notes.contains("get issuers,certificates"),
            mode == "cert-manager",
            "{mode}: the Certificates are checked only where they exist"
        );
    }
}
