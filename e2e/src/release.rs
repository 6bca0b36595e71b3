//! The chart (`chart/`) installed for real with the pinned helm, on a control plane with
//! kube-controller-manager ([`ControlPlane::with_controllers`]), its pods run by the node
//! simulator's in-cluster kubelet ([`NodeSim::start_in_cluster`]): what `make demo` and
//! `e2e/tests/install.rs` share. The images are names only: the simulated kubelet runs the
//! local `vm-dhcp` binary for [`IMAGE_REPOSITORY`] (any tag), see [`programs`].
//!
//! [`NodeSim::start_in_cluster`]: crate::nodesim::NodeSim::start_in_cluster

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::{Value, json};
use vm_dhcp_core::admission::{ALLOCATIONS_ANNOTATION, NicAllocation};
use vm_dhcp_core::crd::{IPPool, VirtualMachineNetworkConfig};
use vm_dhcp_core::kubevirt::{NetworkAttachmentDefinition, VirtualMachine};

use crate::cluster::ControlPlane;
use crate::proc::run_dir;

/// The Harvester add-on's release name: the chart's fullname is the release name, so every
/// object has the Go chart's name.
pub const RELEASE: &str = "harvester-vm-dhcp-controller";
/// The webhook's Service and configurations for [`RELEASE`].
pub const WEBHOOK: &str = "harvester-vm-dhcp-controller-webhook";
/// The aggregated API's APIService.
pub const APISERVICE: &str = "v1alpha1.dhcp.harvesterhci.io";
/// The image repository the releases are installed with (`image.repository`).
pub const IMAGE_REPOSITORY: &str = "registry.local/vm-dhcp";
/// The label every pod of a release carries (`app.kubernetes.io/instance=<release>`).
pub const INSTANCE_LABEL: &str = "app.kubernetes.io/instance";

/// The chart directory.
pub fn chart_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../chart")
}

/// What the simulated kubelet runs: the local `vm-dhcp` binary for any image of
/// [`IMAGE_REPOSITORY`] (the chart's components and the agents the controller makes).
pub fn programs() -> HashMap<String, PathBuf> {
    let short = IMAGE_REPOSITORY
        .rsplit('/')
        .next()
        .unwrap_or(IMAGE_REPOSITORY);
    HashMap::from([(short.to_string(), crate::bins::vm_dhcp_binary())])
}

/// `--set` flags for the one image at `tag`.
pub fn image_values(tag: &str) -> Vec<String> {
    vec![
        "--set".into(),
        format!("image.repository={IMAGE_REPOSITORY}"),
        "--set".into(),
        format!("image.tag={tag}"),
    ]
}

/// Runs the pinned helm against `cp` (its caches and configuration in the run directory).
pub async fn helm(cp: &ControlPlane, args: &[&str]) -> Result<std::process::Output> {
    let home = run_dir()?.join("helm");
    std::fs::create_dir_all(&home)?;
    tokio::process::Command::new(cp.bin_dir.join("helm"))
        .args(args)
        .arg("--kubeconfig")
        .arg(&cp.kubeconfig_path)
        .env("HELM_CACHE_HOME", home.join("cache"))
        .env("HELM_CONFIG_HOME", home.join("config"))
        .env("HELM_DATA_HOME", home.join("data"))
        .kill_on_drop(true)
        .output()
        .await
        .context("running helm")
}

/// [`helm`] that must succeed: its stdout.
pub async fn helm_ok(cp: &ControlPlane, args: &[&str]) -> Result<String> {
    let out = helm(cp, args).await?;
    if !out.status.success() {
        bail!(
            "helm {}:\n{}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// kubectl against `cp` that must succeed: its stdout.
pub async fn kubectl(cp: &ControlPlane, args: &[&str]) -> Result<String> {
    let out = cp.kubectl(args).await;
    if !out.status.success() {
        bail!(
            "kubectl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Polls `check` every 250 ms until it gives a value, or fails after `timeout` with `what`
/// and `context()`.
pub async fn until<T, F, Fut>(
    what: &str,
    timeout: Duration,
    context: impl Fn() -> String,
    mut check: F,
) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("{what} did not happen within {timeout:?}\n{}", context());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn condition_true(conditions: &Value, type_: &str) -> bool {
    conditions.as_array().is_some_and(|cs| {
        cs.iter()
            .any(|c| c["type"] == type_ && c["status"] == "True")
    })
}

/// Is the pod Ready (and not being deleted)?
pub fn pod_ready(p: &Pod) -> bool {
    p.metadata.deletion_timestamp.is_none()
        && p.status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// A one-line account of the release's pods and Deployments, for failure messages.
pub async fn describe(client: &Client, ns: &str) -> String {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), ns);
    let mut out = String::new();
    for p in pods
        .list(&ListParams::default())
        .await
        .map(|l| l.items)
        .unwrap_or_default()
    {
        let waiting: Vec<String> = p
            .status
            .iter()
            .flat_map(|s| s.container_statuses.iter().flatten())
            .filter_map(|c| {
                let w = c.state.as_ref()?.waiting.as_ref()?;
                Some(format!(
                    "{}: {} {}",
                    c.name,
                    w.reason.clone().unwrap_or_default(),
                    w.message.clone().unwrap_or_default()
                ))
            })
            .collect();
        out.push_str(&format!(
            "pod {} on {:?}: ready {} {}\n",
            p.name_any(),
            p.spec.as_ref().and_then(|s| s.node_name.clone()),
            pod_ready(&p),
            waiting.join("; ")
        ));
    }
    for d in deployments
        .list(&ListParams::default())
        .await
        .map(|l| l.items)
        .unwrap_or_default()
    {
        out.push_str(&format!(
            "deployment {}: {:?}\n",
            d.name_any(),
            d.status
                .map(|s| (s.replicas, s.updated_replicas, s.ready_replicas))
        ));
    }
    out
}

/// Waits until every Deployment of release `release` in `ns` is rolled out (all replicas
/// updated, ready and available, none left over) and every pod of the release is Ready.
pub async fn wait_rolled_out(
    client: &Client,
    ns: &str,
    release: &str,
    timeout: Duration,
) -> Result<()> {
    let selector = format!("{INSTANCE_LABEL}={release}");
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), ns);
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let lp = ListParams::default().labels(&selector);
    let mut described = String::new();
    let deadline = Instant::now() + timeout;
    loop {
        let ds = deployments.list(&lp).await?.items;
        let rolled = !ds.is_empty()
            && ds.iter().all(|d| {
                let want = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
                let generation = d.metadata.generation.unwrap_or(0);
                d.status.as_ref().is_some_and(|s| {
                    s.observed_generation.unwrap_or(0) >= generation
                        && s.updated_replicas.unwrap_or(0) == want
                        && s.ready_replicas.unwrap_or(0) == want
                        && s.available_replicas.unwrap_or(0) == want
                        && s.replicas.unwrap_or(0) == want
                })
            });
        let ps = pods.list(&lp).await?.items;
        let ready = !ps.is_empty() && ps.iter().all(pod_ready);
        if rolled && ready {
            return Ok(());
        }
        if Instant::now() > deadline {
            if described.is_empty() {
                described = describe(client, ns).await;
            }
            bail!("release {release} not rolled out within {timeout:?}:\n{described}");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Waits until every cert-manager Certificate in `ns` is Ready; their names.
pub async fn wait_certificates_ready(cp: &ControlPlane, ns: &str) -> Result<Vec<String>> {
    until(
        "every Certificate Ready",
        Duration::from_secs(120),
        String::new,
        || async {
            let text = kubectl(
                cp,
                &[
                    "get",
                    "certificates.cert-manager.io",
                    "-n",
                    ns,
                    "-o",
                    "json",
                ],
            )
            .await
            .ok()?;
            let list: Value = serde_json::from_str(&text).ok()?;
            let items = list["items"].as_array()?;
            let ready = !items.is_empty()
                && items
                    .iter()
                    .all(|c| condition_true(&c["status"]["conditions"], "Ready"));
            ready.then(|| {
                items
                    .iter()
                    .filter_map(|c| c["metadata"]["name"].as_str().map(str::to_string))
                    .collect()
            })
        },
    )
    .await
}

/// The caBundles of the webhook configurations `webhook` (every webhook of both) and of
/// the APIService, once all are set: (mutating, validating, APIService), base64 as stored.
pub async fn wait_ca_bundles(cp: &ControlPlane, webhook: &str) -> Result<(String, String, String)> {
    until(
        "caBundles in both webhook configurations and the APIService",
        Duration::from_secs(120),
        String::new,
        || async {
            let mut found = Vec::new();
            for kind in [
                "mutatingwebhookconfiguration",
                "validatingwebhookconfiguration",
            ] {
                let text = kubectl(cp, &["get", kind, webhook, "-o", "json"])
                    .await
                    .ok()?;
                let config: Value = serde_json::from_str(&text).ok()?;
                let bundles: Vec<&str> = config["webhooks"]
                    .as_array()?
                    .iter()
                    .map(|w| w["clientConfig"]["caBundle"].as_str().unwrap_or(""))
                    .collect();
                let first = bundles.first()?.to_string();
                if first.is_empty() || bundles.iter().any(|b| *b != first) {
                    return None;
                }
                found.push(first);
            }
            let text = kubectl(cp, &["get", "apiservice", APISERVICE, "-o", "json"])
                .await
                .ok()?;
            let service: Value = serde_json::from_str(&text).ok()?;
            let bundle = service["spec"]["caBundle"].as_str().unwrap_or("");
            if bundle.is_empty() {
                return None;
            }
            Some((found[0].clone(), found[1].clone(), bundle.to_string()))
        },
    )
    .await
}

/// Waits until the APIService is Available (kube-apiserver reached the aggregated API
/// through the Service's endpoints and verified it with the caBundle).
pub async fn wait_apiservice_available(cp: &ControlPlane) -> Result<()> {
    until(
        "the APIService Available",
        Duration::from_secs(120),
        String::new,
        || async {
            let text = kubectl(cp, &["get", "apiservice", APISERVICE, "-o", "json"])
                .await
                .ok()?;
            let service: Value = serde_json::from_str(&text).ok()?;
            condition_true(&service["status"]["conditions"], "Available").then_some(())
        },
    )
    .await
}

/// A VM network: a NetworkAttachmentDefinition `ns/name` on cluster network `cn` (agents
/// go to nodes labelled `network.harvesterhci.io/<cn>=true`). Returns "ns/name".
pub async fn vm_network(client: &Client, ns: &str, name: &str, cn: &str) -> Result<String> {
    let nad: NetworkAttachmentDefinition = serde_json::from_value(json!({
        "apiVersion": "k8s.cni.cncf.io/v1", "kind": "NetworkAttachmentDefinition",
        "metadata": {"name": name, "namespace": ns,
                     "labels": {"network.harvesterhci.io/clusternetwork": cn}},
        "spec": {"config": json!({"cniVersion": "0.3.1", "name": name, "type": "bridge",
                 "bridge": format!("{cn}-br"), "promiscMode": true, "vlan": 0, "ipam": {}}).to_string()}
    }))?;
    Api::<NetworkAttachmentDefinition>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &nad)
        .await
        .with_context(|| format!("creating NAD {ns}/{name}"))?;
    Ok(format!("{ns}/{name}"))
}

/// Creates the IPPool `ns/name` for `network` (no serverIP: the webhook's mutator picks it),
/// retrying for `timeout` while admission is not available yet.
pub async fn ippool(
    client: &Client,
    ns: &str,
    name: &str,
    network: &str,
    ipv4: Value,
    timeout: Duration,
) -> Result<IPPool> {
    let pool: IPPool = serde_json::from_value(json!({
        "apiVersion": "network.harvesterhci.io/v1alpha1", "kind": "IPPool",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"networkName": network, "ipv4Config": ipv4}
    }))?;
    let api: Api<IPPool> = Api::namespaced(client.clone(), ns);
    let deadline = Instant::now() + timeout;
    loop {
        match api.create(&PostParams::default(), &pool).await {
            Ok(p) => return Ok(p),
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(e) => return Err(e).context(format!("creating IPPool {ns}/{name}")),
        }
    }
}

/// Is the pool Registered, CacheReady and AgentReady?
pub fn pool_ready(p: &IPPool) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| {
            ["Registered", "CacheReady", "AgentReady"]
                .iter()
                .all(|t| cs.iter().any(|c| c.type_ == *t && c.status == "True"))
        })
}

/// Waits until IPPool `ns/name` is Registered, CacheReady and AgentReady.
pub async fn wait_pool_ready(
    client: &Client,
    ns: &str,
    name: &str,
    timeout: Duration,
    context: impl Fn() -> String,
) -> Result<IPPool> {
    let api: Api<IPPool> = Api::namespaced(client.clone(), ns);
    until(
        "the pool's agents becoming ready",
        timeout,
        context,
        || async { api.get(name).await.ok().filter(pool_ready) },
    )
    .await
}

/// The VirtualMachine `ns/name` with one bridge NIC on `network` and no MAC.
pub fn vm_object(ns: &str, name: &str, network: &str) -> Result<VirtualMachine> {
    Ok(serde_json::from_value(json!({
        "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"runStrategy": "Halted", "template": {"spec": {
            "domain": {"devices": {"interfaces": [{"name": "nic-1", "bridge": {}}]}},
            "networks": [{"name": "nic-1", "multus": {"networkName": network}}]}}}
    }))?)
}

/// Creates a VM with one NIC on `network` (the webhook picks its MAC and address).
pub async fn create_vm(
    client: &Client,
    ns: &str,
    name: &str,
    network: &str,
) -> Result<VirtualMachine> {
    Api::<VirtualMachine>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &vm_object(ns, name, network)?)
        .await
        .with_context(|| format!("creating VM {ns}/{name}"))
}

/// The first NIC's allocation the webhook recorded on a VM.
pub fn allocation(vm: &VirtualMachine) -> Result<NicAllocation> {
    let record = vm
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(ALLOCATIONS_ANNOTATION))
        .with_context(|| {
            format!(
                "VM {} carries no {ALLOCATIONS_ANNOTATION}: was the webhook called?",
                vm.name_any()
            )
        })?;
    serde_json::from_str::<Vec<NicAllocation>>(record)?
        .into_iter()
        .next()
        .context("no NIC allocated")
}

/// Waits until the controller wrote vmnetcfg `ns/name` with its entries Allocated.
pub async fn wait_vmnetcfg_allocated(
    client: &Client,
    ns: &str,
    name: &str,
    timeout: Duration,
) -> Result<VirtualMachineNetworkConfig> {
    let api: Api<VirtualMachineNetworkConfig> = Api::namespaced(client.clone(), ns);
    until(
        "the controller writing the vmnetcfg",
        timeout,
        String::new,
        || async {
            let cfg = api.get_opt(name).await.ok()??;
            let allocated = cfg
                .status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|cs| {
                    cs.iter()
                        .any(|c| c.type_ == "Allocated" && c.status == "True")
                });
            allocated.then_some(cfg)
        },
    )
    .await
}

/// Binds `user` to the cluster role `view` in namespace `ns` (nothing else), and waits
/// until the aggregation has given `view` the right to list `resource`.
pub async fn bind_view(cp: &ControlPlane, ns: &str, user: &str, resource: &str) -> Result<()> {
    kubectl(
        cp,
        &[
            "create",
            "rolebinding",
            &format!("{user}-view"),
            "--clusterrole=view",
            &format!("--user={user}"),
            "-n",
            ns,
        ],
    )
    .await?;
    until(
        "the view role aggregating the vm-dhcp rules",
        Duration::from_secs(60),
        String::new,
        || async {
            let out = cp
                .kubectl(&["auth", "can-i", "list", resource, "-n", ns, "--as", user])
                .await;
            (String::from_utf8_lossy(&out.stdout).trim() == "yes").then_some(())
        },
    )
    .await
}
