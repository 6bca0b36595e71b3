//! Command line: every flag also reads an environment variable.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "vm-dhcp",
    version,
    about = "Managed DHCP for KubeVirt virtual machines on Harvester"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Print the CustomResourceDefinitions (IPPool, VirtualMachineNetworkConfig) as YAML.
    Crd(CrdArgs),
    /// Serve DHCPv4 for one IP pool on one interface.
    Agent(AgentArgs),
    /// Serve the admission webhooks (allocation at admission) over HTTPS.
    Webhook(crate::webhook::WebhookArgs),
    /// Reconcile pools, agents and vmnetcfgs; release addresses; sweep leaks (leader-elected).
    Controller(crate::controller::ControllerArgs),
    /// Serve the aggregated API dhcp.harvesterhci.io/v1alpha1 (ipamallocations, macaddresses,
    /// dhcpleases) over HTTPS.
    Apiserver(crate::apiserver::ApiserverArgs),
}

#[derive(Args, Debug)]
pub struct CrdArgs {
    /// Write one file per CRD into this directory (as chart/crds holds them) instead of
    /// printing a multi-document YAML stream.
    #[arg(long, env = "VM_DHCP_CRD_OUTPUT_DIR")]
    pub output_dir: Option<PathBuf>,
}

#[derive(Args, Debug, Clone)]
pub struct AgentArgs {
    /// The IPPool to serve, as <namespace>/<name> (cluster mode, watched through the API).
    #[arg(long, env = "IPPOOL_REF")]
    pub ippool_ref: Option<String>,

    /// Serve the IPPool in this YAML file (with status.ipv4.allocated) instead of watching the
    /// cluster; the file is reloaded when it changes. Offline mode: no cluster needed.
    #[arg(long, env = "VM_DHCP_AGENT_IPPOOL_FILE")]
    pub ippool_file: Option<PathBuf>,

    /// Network interface to serve DHCP on (the pool's VM network).
    #[arg(long, env = "VM_DHCP_AGENT_NIC", default_value = "eth1")]
    pub nic: String,

    /// Receive and decide, log each reply that would be sent, send nothing.
    #[arg(long, env = "VM_DHCP_AGENT_DRY_RUN")]
    pub dry_run: bool,

    /// Name of this agent (used in logs).
    #[arg(long, env = "VM_DHCP_AGENT_NAME")]
    pub name: Option<String>,

    /// Address of the HTTP server (/healthz, /readyz, /leases, /api/v1/leases, /metrics).
    /// Default: 127.0.0.1:8080 and <pod IP>:8080 (--pod-ip, else the address of the
    /// interface holding the default route), never --nic's network; a wildcard is refused.
    #[arg(long, env = "VM_DHCP_AGENT_HTTP_ADDR")]
    pub http_addr: Option<SocketAddr>,

    /// The pod's address on the pod network (downward API status.podIP), where the HTTP
    /// server listens besides loopback.
    #[arg(long, env = "POD_IP")]
    pub pod_ip: Option<std::net::IpAddr>,

    /// Kubeconfig for cluster mode (in-cluster configuration when absent).
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,

    /// Active/standby (cluster mode): only the holder of this coordination.k8s.io Lease,
    /// <namespace>/<name>, answers; its holderIdentity is --name.
    #[arg(long, env = "VM_DHCP_AGENT_LEASE_LOCK")]
    pub lease_lock: Option<String>,

    /// Lease duration: a standby takes over this long after the holder's last renewal.
    #[arg(
        long,
        env = "VM_DHCP_AGENT_LEASE_DURATION_SECONDS",
        default_value_t = 5
    )]
    pub lease_duration_seconds: u64,

    /// The Lease holder adds the pool's server IP to --nic (and announces it by gratuitous
    /// ARP); a standby keeps it off. Needs --lease-lock and CAP_NET_ADMIN.
    #[arg(long, env = "VM_DHCP_AGENT_MANAGE_SERVER_IP")]
    pub manage_server_ip: bool,

    /// Seconds between full rebuilds of the lease table, which also re-resolve NTP server
    /// names.
    #[arg(long, env = "VM_DHCP_AGENT_RESYNC_SECONDS", default_value_t = 300)]
    pub resync_seconds: u64,

    /// Log at debug level (RUST_LOG, when set, takes precedence).
    #[arg(long, env = "VM_DHCP_AGENT_DEBUG")]
    pub debug: bool,

    /// Log at trace level (RUST_LOG, when set, takes precedence).
    #[arg(long, env = "VM_DHCP_AGENT_TRACE")]
    pub trace: bool,
}
