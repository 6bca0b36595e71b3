//! The control plane with kube-controller-manager, and real cert-manager on it.
//!
//! cert-manager: a self-signed Issuer → a CA Certificate → a CA Issuer → a serving
//! Certificate for a Service DNS name (and 127.0.0.1); the issued Secret chains to the CA;
//! the CA injector fills the caBundle of a ValidatingWebhookConfiguration annotated with
//! `cert-manager.io/inject-ca-from`, and kube-apiserver then calls the webhook served with
//! the issued certificate. kube-controller-manager: Deployments get ReplicaSets and Pods and
//! their dependents are collected, a deleted namespace goes away, an aggregated ClusterRole
//! gets the rules of the ClusterRoles labelled for it, and a Service gets Endpoints and an
//! EndpointSlice.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::Json;
use axum::routing::post;
use k8s_openapi::api::admissionregistration::v1::ValidatingWebhookConfiguration;
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::{
    ConfigMap, Endpoints, Namespace, Node, Pod, Secret, Service, ServiceAccount,
};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::rbac::v1::ClusterRole;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::core::{DynamicObject, GroupVersionKind};
use kube::discovery::ApiResource;
use kube::{Client, Resource, ResourceExt};
use rustls::client::danger::ServerCertVerifier;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use vm_dhcp_e2e::ControlPlane;
use vm_dhcp_e2e::certmanager::CertManager;
use vm_dhcp_e2e::pki::{Ca, CertPair};

fn obj<T: serde::de::DeserializeOwned>(value: serde_json::Value) -> T {
    serde_json::from_value(value).expect("test object shape")
}

/// Polls `check` every 100 ms until it yields a value; panics with `what` after `timeout`.
async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn cert_manager_api(client: &Client, ns: &str, kind: &str) -> Api<DynamicObject> {
    let gvk = GroupVersionKind::gvk("cert-manager.io", "v1", kind);
    let plural = format!("{}s", kind.to_lowercase());
    Api::namespaced_with(
        client.clone(),
        ns,
        &ApiResource::from_gvk_with_plural(&gvk, &plural),
    )
}

fn is_ready(obj: &DynamicObject) -> bool {
    obj.data["status"]["conditions"]
        .as_array()
        .is_some_and(|c| {
            c.iter()
                .any(|c| c["type"] == "Ready" && c["status"] == "True")
        })
}

/// Verifies that the PEM chain `leaf_pem` (leaf first) is valid for `name` under the roots
/// in `ca_pem`, as a TLS client would.
fn verify_chain(ca_pem: &str, leaf_pem: &str, name: &str) -> Result<(), String> {
    let pem = |text: &str| -> Vec<CertificateDer<'static>> {
        rustls_pemfile::certs(&mut text.as_bytes())
            .collect::<Result<_, _>>()
            .expect("PEM certificates")
    };
    let mut roots = rustls::RootCertStore::empty();
    for cert in pem(ca_pem) {
        roots.add(cert).map_err(|e| e.to_string())?;
    }
    let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
        Arc::new(roots),
        Arc::new(rustls::crypto::ring::default_provider()),
    )
    .build()
    .map_err(|e| e.to_string())?;
    let chain = pem(leaf_pem);
    let (leaf, intermediates) = chain.split_first().ok_or("empty tls.crt")?;
    verifier
        .verify_server_cert(
            leaf,
            intermediates,
            &ServerName::try_from(name.to_string()).map_err(|e| e.to_string())?,
            &[],
            UnixTime::now(),
        )
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// Prints cert-manager's logs if the test fails.
struct CertManagerLogs(&'static CertManager);

impl Drop for CertManagerLogs {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("cert-manager logs:\n{}", self.0.logs(60));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cert_manager_issues_a_ca_chain_and_injects_the_ca_bundle() {
    let t0 = Instant::now();
    let cp = ControlPlane::with_controllers().await;
    let cm = CertManager::shared().await;
    let _logs = CertManagerLogs(cm);
    eprintln!(
        "control plane with controllers: {:.2} s (kube-controller-manager working {:.2} s after \
         its start); cert-manager CRDs established in {:.2} s; cert-manager controller and \
         cainjector ready {:.2} s after their start ({:.2} s since this test began)",
        cp.startup.as_secs_f64(),
        cp.controllers_startup.unwrap_or_default().as_secs_f64(),
        cm.crds_applied.as_secs_f64(),
        cm.startup.as_secs_f64(),
        t0.elapsed().as_secs_f64(),
    );
    let ns = cp.namespace("certmgr").await;
    let client = ns.client.clone();
    let issuers = cert_manager_api(&client, &ns.name, "Issuer");
    let certs = cert_manager_api(&client, &ns.name, "Certificate");
    let pp = PostParams::default();
    let issuer_ref = |name: &str| serde_json::json!({"name": name, "kind": "Issuer", "group": "cert-manager.io"});

    let t_issue = Instant::now();
    issuers
        .create(
            &pp,
            &obj(serde_json::json!({
                "apiVersion": "cert-manager.io/v1", "kind": "Issuer",
                "metadata": {"name": "selfsigned"},
                "spec": {"selfSigned": {}}
            })),
        )
        .await
        .expect("creating the self-signed Issuer");
    certs
        .create(
            &pp,
            &obj(serde_json::json!({
                "apiVersion": "cert-manager.io/v1", "kind": "Certificate",
                "metadata": {"name": "ca"},
                "spec": {
                    "isCA": true,
                    "commonName": "vm-dhcp-e2e-cert-manager-ca",
                    "secretName": "ca",
                    "privateKey": {"algorithm": "ECDSA", "size": 256},
                    "issuerRef": issuer_ref("selfsigned")
                }
            })),
        )
        .await
        .expect("creating the CA Certificate");
    issuers
        .create(
            &pp,
            &obj(serde_json::json!({
                "apiVersion": "cert-manager.io/v1", "kind": "Issuer",
                "metadata": {"name": "ca"},
                "spec": {"ca": {"secretName": "ca"}}
            })),
        )
        .await
        .expect("creating the CA Issuer");
    let service_name = format!("webhook.{}.svc", ns.name);
    certs
        .create(
            &pp,
            &obj(serde_json::json!({
                "apiVersion": "cert-manager.io/v1", "kind": "Certificate",
                "metadata": {"name": "serving"},
                "spec": {
                    "secretName": "serving-tls",
                    "dnsNames": [service_name, format!("{service_name}.cluster.local")],
                    "ipAddresses": ["127.0.0.1"],
                    "usages": ["server auth", "digital signature"],
                    "privateKey": {"algorithm": "ECDSA", "size": 256},
                    "issuerRef": issuer_ref("ca")
                }
            })),
        )
        .await
        .expect("creating the serving Certificate");

    let ready = |name: &'static str| {
        let certs = certs.clone();
        async move { certs.get(name).await.ok().filter(is_ready) }
    };
    eventually(
        "the CA Certificate to be Ready",
        Duration::from_secs(60),
        || ready("ca"),
    )
    .await;
    let t_ca = t_issue.elapsed();
    eventually(
        "the serving Certificate to be Ready",
        Duration::from_secs(60),
        || ready("serving"),
    )
    .await;
    let t_serving = t_issue.elapsed();
    eprintln!(
        "certificates issued: CA Ready {:.2} s, serving certificate Ready {:.2} s after the \
         self-signed Issuer was created",
        t_ca.as_secs_f64(),
        t_serving.as_secs_f64()
    );
    cm.check_alive().expect("cert-manager is running");

    let secrets: Api<Secret> = ns.api();
    let text = |secret: &Secret, key: &str| -> String {
        let data = secret.data.as_ref().expect("Secret has data");
        let value = data
            .get(key)
            .unwrap_or_else(|| panic!("Secret lacks {key}"));
        assert!(!value.0.is_empty(), "{key} is empty");
        String::from_utf8(value.0.clone()).expect("PEM is text")
    };
    let ca_secret = secrets.get("ca").await.expect("the CA Secret");
    let ca_pem = text(&ca_secret, "tls.crt");
    let serving = secrets
        .get("serving-tls")
        .await
        .expect("the serving Secret");
    let (tls_crt, tls_key, ca_crt) = (
        text(&serving, "tls.crt"),
        text(&serving, "tls.key"),
        text(&serving, "ca.crt"),
    );
    assert_eq!(
        ca_crt.trim(),
        ca_pem.trim(),
        "ca.crt of the serving Secret is the CA Certificate's certificate"
    );
    for name in [service_name.as_str(), "127.0.0.1"] {
        verify_chain(&ca_pem, &tls_crt, name)
            .unwrap_or_else(|e| panic!("tls.crt does not chain to the CA for {name}: {e}"));
    }
    // The check can fail: another CA, and a name the certificate lacks, are refused.
    let stranger = Ca::new("not-the-cert-manager-ca").expect("a CA");
    assert!(verify_chain(&stranger.cert_pem(), &tls_crt, &service_name).is_err());
    assert!(verify_chain(&ca_pem, &tls_crt, "other.example.svc").is_err());

    // A webhook served with the issued certificate; the CA injector fills its caBundle and
    // kube-apiserver must then trust it.
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    let router = axum::Router::new().route(
        "/validate",
        post(move |Json(review): Json<serde_json::Value>| {
            let counter = counter.clone();
            async move {
                counter.fetch_add(1, Ordering::SeqCst);
                let request = &review["request"];
                let allowed = request["name"] != "deny-me";
                Json(serde_json::json!({
                    "apiVersion": "admission.k8s.io/v1",
                    "kind": "AdmissionReview",
                    "response": {
                        "uid": request["uid"],
                        "allowed": allowed,
                        "status": {"code": 403, "message": "denied by the cert-manager e2e webhook"}
                    }
                }))
            }
        }),
    );
    let port = vm_dhcp_e2e::tls::serve(
        router,
        &CertPair {
            cert: tls_crt.clone(),
            key: tls_key,
        },
    )
    .await
    .expect("serving the webhook with the issued certificate");

    let webhooks: Api<ValidatingWebhookConfiguration> = Api::all(client.clone());
    let vwc_name = format!("e2e-cert-manager-{}", ns.name);
    let t_inject = Instant::now();
    webhooks
        .create(
            &pp,
            &obj(serde_json::json!({
                "metadata": {
                    "name": vwc_name,
                    "annotations": {
                        "cert-manager.io/inject-ca-from": format!("{}/serving", ns.name)
                    }
                },
                "webhooks": [{
                    "name": "check.e2e.vm-dhcp.io",
                    "clientConfig": {"url": format!("https://127.0.0.1:{port}/validate")},
                    "rules": [{
                        "operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"],
                        "resources": ["configmaps"]
                    }],
                    "namespaceSelector": {
                        "matchLabels": {"kubernetes.io/metadata.name": ns.name}
                    },
                    "objectSelector": {"matchLabels": {"e2e-webhook": "yes"}},
                    "failurePolicy": "Fail",
                    "sideEffects": "None",
                    "admissionReviewVersions": ["v1"],
                    "timeoutSeconds": 5
                }]
            })),
        )
        .await
        .expect("creating the ValidatingWebhookConfiguration");
    let bundle = eventually(
        "the CA injector to fill the caBundle",
        Duration::from_secs(60),
        || {
            let webhooks = webhooks.clone();
            let name = vwc_name.clone();
            async move {
                let vwc = webhooks.get(&name).await.ok()?;
                let bundle = vwc.webhooks?.first()?.client_config.ca_bundle.clone()?;
                (!bundle.0.is_empty()).then_some(bundle.0)
            }
        },
    )
    .await;
    eprintln!(
        "caBundle injected {:.2} s after the ValidatingWebhookConfiguration was created",
        t_inject.elapsed().as_secs_f64()
    );
    assert_eq!(
        String::from_utf8_lossy(&bundle).trim(),
        ca_crt.trim(),
        "the injected caBundle is the serving Secret's ca.crt"
    );

    let configmaps: Api<ConfigMap> = ns.api();
    let labelled = |name: &str| -> ConfigMap {
        obj(serde_json::json!({
            "metadata": {"name": name, "labels": {"e2e-webhook": "yes"}},
            "data": {"k": "v"}
        }))
    };
    // The injected bundle reaches kube-apiserver's webhook client shortly after the update.
    eventually(
        "kube-apiserver to call the webhook over TLS with the injected CA",
        Duration::from_secs(30),
        || {
            let configmaps = configmaps.clone();
            let cm = labelled("allowed");
            async move { configmaps.create(&PostParams::default(), &cm).await.ok() }
        },
    )
    .await;
    assert!(calls.load(Ordering::SeqCst) >= 1, "the webhook was called");
    let denied = configmaps
        .create(&pp, &labelled("deny-me"))
        .await
        .expect_err("the webhook denies deny-me");
    assert!(
        denied
            .to_string()
            .contains("denied by the cert-manager e2e webhook"),
        "{denied}"
    );

    webhooks
        .delete(&vwc_name, &DeleteParams::default())
        .await
        .expect("deleting the ValidatingWebhookConfiguration");
    cm.check_alive().expect("cert-manager is still running");
}

#[tokio::test]
async fn deployments_get_replicasets_and_pods_and_their_dependents_are_collected() {
    let cp = ControlPlane::with_controllers().await;
    let ns = cp.namespace("kcm-deploy").await;
    let deployments: Api<Deployment> = ns.api();
    let replicasets: Api<ReplicaSet> = ns.api();
    let pods: Api<Pod> = ns.api();
    let t0 = Instant::now();
    let deployment = deployments
        .create(
            &PostParams::default(),
            &obj(serde_json::json!({
                "metadata": {"name": "web"},
                "spec": {
                    "replicas": 2,
                    "selector": {"matchLabels": {"app": "web"}},
                    "template": {
                        "metadata": {"labels": {"app": "web"}},
                        "spec": {"containers": [{"name": "web", "image": "example.invalid/web:1"}]}
                    }
                }
            })),
        )
        .await
        .expect("creating the Deployment");
    let uid = deployment.meta().uid.clone().expect("uid");

    let owned_by = |meta: &kube::api::ObjectMeta, uid: &str| {
        meta.owner_references
            .iter()
            .flatten()
            .any(|o| o.uid == uid && o.controller == Some(true))
    };
    let rs = eventually(
        "the Deployment's ReplicaSet",
        Duration::from_secs(30),
        || {
            let replicasets = replicasets.clone();
            let uid = uid.clone();
            async move {
                replicasets
                    .list(&ListParams::default())
                    .await
                    .ok()?
                    .items
                    .into_iter()
                    .find(|rs| owned_by(rs.meta(), &uid))
            }
        },
    )
    .await;
    let rs_uid = rs.meta().uid.clone().expect("uid");
    let owned_pods = eventually("the ReplicaSet's two Pods", Duration::from_secs(30), || {
        let pods = pods.clone();
        let rs_uid = rs_uid.clone();
        async move {
            let owned: Vec<Pod> = pods
                .list(&ListParams::default())
                .await
                .ok()?
                .items
                .into_iter()
                .filter(|p| owned_by(p.meta(), &rs_uid))
                .collect();
            (owned.len() == 2).then_some(owned)
        }
    })
    .await;
    eprintln!(
        "Deployment → ReplicaSet → 2 Pods in {:.2} s",
        t0.elapsed().as_secs_f64()
    );
    for pod in &owned_pods {
        assert_eq!(
            pod.labels().get("app").map(String::as_str),
            Some("web"),
            "pods are made from the template"
        );
    }

    let t1 = Instant::now();
    deployments
        .delete("web", &DeleteParams::background())
        .await
        .expect("deleting the Deployment");
    eventually(
        "the garbage collector to delete the ReplicaSet and its Pods",
        Duration::from_secs(60),
        || {
            let (replicasets, pods) = (replicasets.clone(), pods.clone());
            async move {
                let rs_left = replicasets.list(&ListParams::default()).await.ok()?.items;
                let pods_left = pods.list(&ListParams::default()).await.ok()?.items;
                (rs_left.is_empty() && pods_left.is_empty()).then_some(())
            }
        },
    )
    .await;
    eprintln!(
        "ReplicaSet and Pods collected {:.2} s after the Deployment was deleted",
        t1.elapsed().as_secs_f64()
    );
}

#[tokio::test]
async fn a_deleted_namespace_goes_away() {
    let cp = ControlPlane::with_controllers().await;
    let client = cp.client().await;
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let name = format!("kcm-ns-gone-{}", std::process::id());
    namespaces
        .create(
            &PostParams::default(),
            &obj(serde_json::json!({"metadata": {"name": name}})),
        )
        .await
        .expect("creating the namespace");
    // The namespace's own controllers fill it as in a cluster.
    let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), &name);
    eventually(
        "the namespace's default ServiceAccount",
        Duration::from_secs(30),
        || {
            let sas = sas.clone();
            async move { sas.get_opt("default").await.ok().flatten() }
        },
    )
    .await;
    let configmaps: Api<ConfigMap> = Api::namespaced(client.clone(), &name);
    configmaps
        .create(
            &PostParams::default(),
            &obj(serde_json::json!({"metadata": {"name": "content"}, "data": {"k": "v"}})),
        )
        .await
        .expect("creating a ConfigMap in it");

    let t0 = Instant::now();
    namespaces
        .delete(&name, &DeleteParams::default())
        .await
        .expect("deleting the namespace");
    eventually(
        "the deleted namespace to go away (not stay Terminating)",
        Duration::from_secs(60),
        || {
            let namespaces = namespaces.clone();
            let name = name.clone();
            async move {
                match namespaces.get_opt(&name).await {
                    Ok(None) => Some(()),
                    _ => None,
                }
            }
        },
    )
    .await;
    eprintln!(
        "namespace deleted completely in {:.2} s",
        t0.elapsed().as_secs_f64()
    );
}

#[tokio::test]
async fn an_aggregated_cluster_role_gets_the_rules_labelled_for_it() {
    let cp = ControlPlane::with_controllers().await;
    let client = cp.client().await;
    let roles: Api<ClusterRole> = Api::all(client);
    let tag = format!("e2e-{}", std::process::id());
    let label = format!("e2e.vm-dhcp.io/aggregate-to-{tag}");
    let (target, source) = (format!("{tag}-aggregate"), format!("{tag}-source"));
    let pp = PostParams::default();
    roles
        .create(
            &pp,
            &obj(serde_json::json!({
                "metadata": {"name": target},
                "aggregationRule": {"clusterRoleSelectors": [{"matchLabels": {label.clone(): "true"}}]}
            })),
        )
        .await
        .expect("creating the aggregated ClusterRole");
    roles
        .create(
            &pp,
            &obj(serde_json::json!({
                "metadata": {"name": source, "labels": {label.clone(): "true"}},
                "rules": [{
                    "apiGroups": ["dhcp.harvesterhci.io"],
                    "resources": ["ipamallocations"],
                    "verbs": ["get", "list", "watch"]
                }]
            })),
        )
        .await
        .expect("creating the labelled ClusterRole");
    let t0 = Instant::now();
    let rules = eventually(
        "the aggregated ClusterRole to get the labelled rules",
        Duration::from_secs(30),
        || {
            let roles = roles.clone();
            let target = target.clone();
            async move {
                let rules = roles.get(&target).await.ok()?.rules.unwrap_or_default();
                (!rules.is_empty()).then_some(rules)
            }
        },
    )
    .await;
    eprintln!(
        "ClusterRole aggregated in {:.2} s",
        t0.elapsed().as_secs_f64()
    );
    assert!(
        rules.iter().any(|r| {
            r.api_groups.as_deref() == Some(&["dhcp.harvesterhci.io".to_string()][..])
                && r.resources.as_deref() == Some(&["ipamallocations".to_string()][..])
                && r.verbs == ["get", "list", "watch"]
        }),
        "{rules:?}"
    );
    // The built-in user-facing roles are aggregated too (empty without the controller).
    let view = roles.get("view").await.expect("the view ClusterRole");
    assert!(
        view.rules.as_ref().is_some_and(|r| r.iter().any(|r| r
            .resources
            .iter()
            .flatten()
            .any(|x| x == "pods"))),
        "view lists pods: {:?}",
        view.rules
    );
    for name in [&target, &source] {
        roles
            .delete(name, &DeleteParams::default())
            .await
            .expect("deleting a test ClusterRole");
    }
}

#[tokio::test]
async fn services_get_endpoints_and_endpoint_slices() {
    let cp = ControlPlane::with_controllers().await;
    let ns = cp.namespace("kcm-endpoints").await;
    let nodes: Api<Node> = Api::all(ns.client.clone());
    let node = format!("e2e-endpoints-node-{}", std::process::id());
    nodes
        .create(
            &PostParams::default(),
            &obj(serde_json::json!({"metadata": {"name": node}})),
        )
        .await
        .expect("creating a Node");
    let services: Api<Service> = ns.api();
    services
        .create(
            &PostParams::default(),
            &obj(serde_json::json!({
                "metadata": {"name": "web"},
                "spec": {
                    "selector": {"app": "web"},
                    "ports": [{"name": "https", "port": 443, "targetPort": 8443}]
                }
            })),
        )
        .await
        .expect("creating the Service");
    let pods: Api<Pod> = ns.api();
    pods.create(
        &PostParams::default(),
        &obj(serde_json::json!({
            "metadata": {"name": "web-0", "labels": {"app": "web"}},
            "spec": {
                "nodeName": node,
                "containers": [{"name": "web", "image": "example.invalid/web:1",
                                "ports": [{"containerPort": 8443}]}]
            }
        })),
    )
    .await
    .expect("creating the Pod");
    let ip = "10.244.7.9";
    pods.patch_status(
        "web-0",
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({"status": {
            "phase": "Running",
            "podIP": ip,
            "podIPs": [{"ip": ip}],
            "conditions": [{"type": "Ready", "status": "True"}]
        }})),
    )
    .await
    .expect("writing the Pod's status");

    let t0 = Instant::now();
    let slices: Api<EndpointSlice> = ns.api();
    eventually(
        "an EndpointSlice with the ready pod IP",
        Duration::from_secs(30),
        || {
            let slices = slices.clone();
            async move {
                let list = slices
                    .list(&ListParams::default().labels("kubernetes.io/service-name=web"))
                    .await
                    .ok()?;
                list.items
                    .iter()
                    .flat_map(|s| s.endpoints.iter())
                    .any(|e| {
                        e.addresses.iter().any(|a| a == ip)
                            && e.conditions.as_ref().and_then(|c| c.ready) == Some(true)
                    })
                    .then_some(())
            }
        },
    )
    .await;
    let endpoints: Api<Endpoints> = ns.api();
    eventually("Endpoints with the pod IP", Duration::from_secs(30), || {
        let endpoints = endpoints.clone();
        async move {
            let ep = endpoints.get_opt("web").await.ok().flatten()?;
            ep.subsets
                .iter()
                .flatten()
                .flat_map(|s| s.addresses.iter().flatten())
                .any(|a| a.ip == ip)
                .then_some(())
        }
    })
    .await;
    eprintln!(
        "Service endpoints published in {:.2} s",
        t0.elapsed().as_secs_f64()
    );
    nodes
        .delete(&node, &DeleteParams::default())
        .await
        .expect("deleting the Node");
}
