//! The agent pod of a pool, as plain typed data (k8s-openapi): what the controller creates.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Affinity, Capabilities, Container, ContainerPort, EnvVar, EnvVarSource, HTTPGetAction,
    NodeAffinity, NodeSelector, NodeSelectorRequirement, NodeSelectorTerm, ObjectFieldSelector,
    Pod, PodAffinityTerm, PodAntiAffinity, PodSpec, Probe, SecurityContext, Toleration,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::{
    AGENT_LABEL, AGENT_LABEL_VALUE, MANAGED_BY_LABEL, MANAGED_BY_VALUE, MULTUS_ANNOTATION,
    NODE_NETWORK_LABEL_PREFIX, POOL_NAME_LABEL, POOL_NAMESPACE_LABEL, REVISION_LABEL,
    WITNESS_LABEL, lease_name,
};

/// Taints a lost node gets; agents tolerate them for the lost-node grace only.
pub const UNREACHABLE_TAINT: &str = "node.kubernetes.io/unreachable";
pub const NOT_READY_TAINT: &str = "node.kubernetes.io/not-ready";
/// The interface the pool's network is attached as in the agent pod.
pub const AGENT_NIC: &str = "eth1";
/// The agent's HTTP port (probes, metrics, the lease view).
pub const AGENT_HTTP_PORT: i32 = 8080;

/// What an agent pod is made of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentPodSpec<'a> {
    pub name: &'a str,
    /// Namespace of the agent pods and their Lease.
    pub namespace: &'a str,
    pub pool_ns: &'a str,
    pub pool_name: &'a str,
    pub image: &'a str,
    pub revision: &'a str,
    pub service_account: &'a str,
    /// Cluster network whose nodes may run the agent.
    pub cluster_network: &'a str,
    /// The pool's NetworkAttachmentDefinition (namespace, name).
    pub nad: (&'a str, &'a str),
    pub lease_duration_seconds: u64,
    pub lost_node_grace_seconds: u64,
    pub dry_run: bool,
    pub on_witness_nodes: bool,
}

fn requirement(key: String, operator: &str) -> NodeSelectorRequirement {
    NodeSelectorRequirement {
        key,
        operator: operator.to_string(),
        values: Some(vec!["true".to_string()]),
    }
}

fn toleration(key: &str, seconds: u64) -> Toleration {
    Toleration {
        key: Some(key.to_string()),
        operator: Some("Exists".to_string()),
        effect: Some("NoExecute".to_string()),
        toleration_seconds: Some(i64::try_from(seconds).unwrap_or(i64::MAX)),
        ..Toleration::default()
    }
}

fn probe(path: &str, period: i32, failures: Option<i32>) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_string()),
            port: IntOrString::Int(AGENT_HTTP_PORT),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        failure_threshold: failures,
        ..Probe::default()
    }
}

/// The pod: the agent on the pool's network as `eth1`, on a node of the cluster network
/// (not a witness unless allowed), never two of one pool and revision on one node, tolerating
/// a lost node only for the grace after which the controller replaces it.
pub fn agent_pod(s: &AgentPodSpec<'_>) -> Pod {
    let lease = lease_name(s.pool_ns, s.pool_name);
    let mut args = vec![
        "agent".to_string(),
        "--ippool-ref".into(),
        format!("{}/{}", s.pool_ns, s.pool_name),
        "--lease-lock".into(),
        format!("{}/{lease}", s.namespace),
        "--lease-duration-seconds".into(),
        s.lease_duration_seconds.to_string(),
        "--manage-server-ip".into(),
        "--nic".into(),
        AGENT_NIC.into(),
    ];
    if s.dry_run {
        args.push("--dry-run".into());
    }
    let selector = BTreeMap::from([
        (POOL_NAMESPACE_LABEL.to_string(), s.pool_ns.to_string()),
        (POOL_NAME_LABEL.to_string(), s.pool_name.to_string()),
        (REVISION_LABEL.to_string(), s.revision.to_string()),
    ]);
    let mut labels = selector.clone();
    labels.insert(AGENT_LABEL.to_string(), AGENT_LABEL_VALUE.to_string());
    labels.insert(MANAGED_BY_LABEL.to_string(), MANAGED_BY_VALUE.to_string());
    let mut node_terms = vec![requirement(
        format!("{NODE_NETWORK_LABEL_PREFIX}{}", s.cluster_network),
        "In",
    )];
    if !s.on_witness_nodes {
        node_terms.push(requirement(WITNESS_LABEL.to_string(), "NotIn"));
    }
    let networks = serde_json::json!([
        {"namespace": s.nad.0, "name": s.nad.1, "interface": AGENT_NIC}
    ])
    .to_string();
    Pod {
        metadata: ObjectMeta {
            name: Some(s.name.to_string()),
            namespace: Some(s.namespace.to_string()),
            labels: Some(labels),
            annotations: Some(BTreeMap::from([(MULTUS_ANNOTATION.to_string(), networks)])),
            ..ObjectMeta::default()
        },
        spec: Some(PodSpec {
            service_account_name: Some(s.service_account.to_string()),
            termination_grace_period_seconds: Some(10),
            affinity: Some(Affinity {
                node_affinity: Some(NodeAffinity {
                    required_during_scheduling_ignored_during_execution: Some(NodeSelector {
                        node_selector_terms: vec![NodeSelectorTerm {
                            match_expressions: Some(node_terms),
                            ..NodeSelectorTerm::default()
                        }],
                    }),
                    ..NodeAffinity::default()
                }),
                pod_anti_affinity: Some(PodAntiAffinity {
                    required_during_scheduling_ignored_during_execution: Some(vec![
                        PodAffinityTerm {
                            label_selector: Some(LabelSelector {
                                match_labels: Some(selector),
                                ..LabelSelector::default()
                            }),
                            topology_key: "kubernetes.io/hostname".to_string(),
                            ..PodAffinityTerm::default()
                        },
                    ]),
                    ..PodAntiAffinity::default()
                }),
                ..Affinity::default()
            }),
            // Lost nodes are handled by the controller (force-delete and replace after the
            // grace), not by waiting out the default 300 s eviction.
            tolerations: Some(vec![
                toleration(UNREACHABLE_TAINT, s.lost_node_grace_seconds),
                toleration(NOT_READY_TAINT, s.lost_node_grace_seconds),
            ]),
            containers: vec![Container {
                name: "agent".to_string(),
                image: Some(s.image.to_string()),
                image_pull_policy: Some("IfNotPresent".to_string()),
                args: Some(args),
                env: Some(vec![EnvVar {
                    name: "VM_DHCP_AGENT_NAME".to_string(),
                    value_from: Some(EnvVarSource {
                        field_ref: Some(ObjectFieldSelector {
                            field_path: "metadata.name".to_string(),
                            ..ObjectFieldSelector::default()
                        }),
                        ..EnvVarSource::default()
                    }),
                    ..EnvVar::default()
                }]),
                ports: Some(vec![ContainerPort {
                    name: Some("http".to_string()),
                    container_port: AGENT_HTTP_PORT,
                    protocol: Some("TCP".to_string()),
                    ..ContainerPort::default()
                }]),
                security_context: Some(SecurityContext {
                    run_as_user: Some(0),
                    run_as_group: Some(0),
                    capabilities: Some(Capabilities {
                        add: Some(vec!["NET_ADMIN".to_string(), "NET_RAW".to_string()]),
                        ..Capabilities::default()
                    }),
                    ..SecurityContext::default()
                }),
                readiness_probe: Some(probe("/readyz", 2, None)),
                liveness_probe: Some(probe("/healthz", 10, Some(6))),
                ..Container::default()
            }],
            ..PodSpec::default()
        }),
        status: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> AgentPodSpec<'static> {
        AgentPodSpec {
            name: "vmdhcp-ns-net-abc123-0",
            namespace: "harvester-system",
            pool_ns: "ns",
            pool_name: "net",
            image: "rancher/harvester-vm-dhcp:v1",
            revision: "abc123",
            service_account: "vm-dhcp-agent",
            cluster_network: "mgmt",
            nad: ("ns", "net"),
            lease_duration_seconds: 5,
            lost_node_grace_seconds: 30,
            dry_run: false,
            on_witness_nodes: false,
        }
    }

    #[test]
    fn the_pod_runs_the_agent_on_the_pools_network_on_eligible_nodes() {
        let pod = agent_pod(&spec());
        let text = serde_json::to_value(&pod).expect("serializes");
        let c = &text["spec"]["containers"][0];
        assert_eq!(c["image"], "rancher/harvester-vm-dhcp:v1");
        let args: Vec<&str> = c["args"]
            .as_array()
            .expect("args")
            .iter()
            .filter_map(|a| a.as_str())
            .collect();
        assert_eq!(
            args,
            [
                "agent",
                "--ippool-ref",
                "ns/net",
                "--lease-lock",
                "harvester-system/vmdhcp-ns-net",
                "--lease-duration-seconds",
                "5",
                "--manage-server-ip",
                "--nic",
                "eth1"
            ]
        );
        assert_eq!(
            text["metadata"]["annotations"][MULTUS_ANNOTATION],
            r#"[{"interface":"eth1","name":"net","namespace":"ns"}]"#
        );
        let terms = &text["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
            ["nodeSelectorTerms"][0]["matchExpressions"];
        assert_eq!(terms[0]["key"], "network.harvesterhci.io/mgmt");
        assert_eq!(terms[1]["key"], WITNESS_LABEL);
        assert_eq!(terms[1]["operator"], "NotIn");
        let anti = &text["spec"]["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
            [0];
        assert_eq!(anti["topologyKey"], "kubernetes.io/hostname");
        assert_eq!(
            anti["labelSelector"]["matchLabels"][REVISION_LABEL],
            "abc123"
        );
        assert_eq!(text["spec"]["tolerations"][0]["tolerationSeconds"], 30);
        assert_eq!(c["readinessProbe"]["httpGet"]["port"], 8080);
        assert_eq!(
            text["metadata"]["labels"][MANAGED_BY_LABEL],
            MANAGED_BY_VALUE
        );
    }

    #[test]
    fn dry_run_and_witness_nodes_are_options() {
        let pod = agent_pod(&AgentPodSpec {
            dry_run: true,
            on_witness_nodes: true,
            ..spec()
        });
        let text = serde_json::to_value(&pod).expect("serializes");
        let args = text["spec"]["containers"][0]["args"]
            .as_array()
            .expect("args");
        assert_eq!(args.last().and_then(|a| a.as_str()), Some("--dry-run"));
        let terms = text["spec"]["affinity"]["nodeAffinity"]
            ["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"][0]
            ["matchExpressions"]
            .as_array()
            .expect("terms");
        assert_eq!(terms.len(), 1, "no witness exclusion");
    }
}
