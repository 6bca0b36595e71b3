//! Command line: every flag `--some-flag` also reads the environment variable
//! `VM_DHCP_SOME_FLAG`; the names the Go version used (`IPPOOL_REF`, `AGENT_IMAGE`,
//! `AGENT_NAMESPACE`, ...) and earlier names of ours are read as aliases when the canonical
//! variable is not set. `--kubeconfig` takes one path or several separated by `:`; without
//! it, `KUBECONFIG` (also several paths) and then the in-cluster service account are used.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Arg, ArgMatches, Args, CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};

#[derive(Parser, Debug)]
#[command(
    name = "vm-dhcp",
    version,
    about = "Managed DHCP for KubeVirt virtual machines on Harvester"
)]
pub struct Cli {
    /// Log format on stderr: `text` (human-readable) or `json` (one object per line).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// Prefix of every flag's environment variable.
pub const ENV_PREFIX: &str = "VM_DHCP_";

/// Environment variables never taken as aliases: `KUBECONFIG` is read by the client itself
/// (with several paths), not as one `--kubeconfig` path.
const NOT_ALIASES: &[&str] = &["KUBECONFIG"];

/// The variable of a flag: `--lease-lock` reads `VM_DHCP_LEASE_LOCK`.
pub fn env_name(long: &str) -> String {
    format!(
        "{ENV_PREFIX}{}",
        long.to_ascii_uppercase().replace('-', "_")
    )
}

/// One flag's environment: the canonical variable, or the alias when only the alias is set
/// (`is_set` tells whether a variable is set); the alias is named in the help.
fn with_env(arg: Arg, is_set: &dyn Fn(&str) -> bool) -> Arg {
    let Some(long) = arg.get_long().map(str::to_string) else {
        return arg;
    };
    if matches!(long.as_str(), "help" | "version") {
        return arg;
    }
    let canonical = env_name(&long);
    let alias = arg
        .get_env()
        .and_then(|e| e.to_str())
        .map(str::to_string)
        .filter(|a| *a != canonical);
    match alias {
        Some(alias) if NOT_ALIASES.contains(&alias.as_str()) => arg.env(canonical),
        Some(alias) => {
            let help = arg.get_help().map(|h| h.to_string()).unwrap_or_default();
            let arg = arg.help(format!("{help} (also read from ${alias})"));
            if !is_set(&canonical) && is_set(&alias) {
                arg.env(alias)
            } else {
                arg.env(canonical)
            }
        }
        None => arg.env(canonical),
    }
}

/// The command line with every flag's environment variable named as above.
pub fn command_with(is_set: &dyn Fn(&str) -> bool) -> clap::Command {
    Cli::command()
        .mut_args(|a| with_env(a, is_set))
        .mut_subcommands(|sub| sub.mut_args(|a| with_env(a, is_set)))
}

/// Parses the process's arguments and environment; exits with clap's message on an error.
pub fn parse() -> Cli {
    let is_set = |name: &str| std::env::var_os(name).is_some();
    let matches: ArgMatches = command_with(&is_set).get_matches();
    Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit())
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

    /// Kubeconfig for cluster mode, one path or several separated by `:` (default:
    /// $KUBECONFIG, ~/.kube/config, then the in-cluster service account).
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

#[cfg(test)]
mod tests {
    use super::*;

    fn every_flag(cmd: &clap::Command) -> Vec<(String, Arg)> {
        let mut out: Vec<(String, Arg)> = cmd
            .get_arguments()
            .map(|a| (cmd.get_name().to_string(), a.clone()))
            .collect();
        for sub in cmd.get_subcommands() {
            out.extend(every_flag(sub));
        }
        out
    }

    #[test]
    fn every_flag_has_help_and_its_vm_dhcp_variable() {
        let cmd = command_with(&|_| false);
        let mut seen = 0;
        let mut without_help = Vec::new();
        for (sub, arg) in every_flag(&cmd) {
            let Some(long) = arg.get_long() else { continue };
            if matches!(long, "help" | "version") {
                continue;
            }
            seen += 1;
            let help = arg.get_help().map(|h| h.to_string()).unwrap_or_default();
            if help.trim().is_empty() {
                without_help.push(format!("{sub} --{long}"));
            }
            assert_eq!(
                arg.get_env().and_then(|e| e.to_str()),
                Some(env_name(long).as_str()),
                "{sub} --{long}"
            );
        }
        assert!(
            without_help.is_empty(),
            "flags without help: {without_help:?}"
        );
        assert!(seen > 60, "only {seen} flags seen");
    }

    /// Flag `--long` of subcommand `sub`.
    fn flag(cmd: &clap::Command, sub: &str, long: &str) -> Arg {
        cmd.find_subcommand(sub)
            .and_then(|s| s.get_arguments().find(|a| a.get_long() == Some(long)))
            .cloned()
            .unwrap_or_else(|| panic!("{sub} --{long}"))
    }

    #[test]
    fn upstream_names_are_aliases_when_the_canonical_variable_is_unset() {
        let only_alias = command_with(&|n| n == "IPPOOL_REF");
        let m = only_alias
            .clone()
            .try_get_matches_from(["vm-dhcp", "agent"])
            .expect("parses");
        let agent = m.subcommand_matches("agent").expect("agent");
        // clap reads the alias: the variable itself is not set in this test, so the flag is
        // unset, but the argument is bound to the alias.
        assert!(agent.get_one::<String>("ippool_ref").is_none());
        let arg = flag(&only_alias, "agent", "ippool-ref");
        assert_eq!(arg.get_env().and_then(|e| e.to_str()), Some("IPPOOL_REF"));
        assert!(
            arg.get_help()
                .is_some_and(|h| h.to_string().contains("also read from $IPPOOL_REF"))
        );
        let both = command_with(&|n| n == "IPPOOL_REF" || n == "VM_DHCP_IPPOOL_REF");
        let arg = flag(&both, "agent", "ippool-ref");
        assert_eq!(
            arg.get_env().and_then(|e| e.to_str()),
            Some("VM_DHCP_IPPOOL_REF")
        );
        // KUBECONFIG is the client's, never one --kubeconfig path.
        let kc = command_with(&|n| n == "KUBECONFIG");
        let arg = flag(&kc, "controller", "kubeconfig");
        assert_eq!(
            arg.get_env().and_then(|e| e.to_str()),
            Some("VM_DHCP_KUBECONFIG")
        );
    }

    #[test]
    fn log_format_is_global_and_checked() {
        let cmd = command_with(&|_| false);
        let m = cmd
            .clone()
            .try_get_matches_from(["vm-dhcp", "crd", "--log-format", "json"])
            .expect("parses");
        let cli = Cli::from_arg_matches(&m).expect("cli");
        assert_eq!(cli.log_format, LogFormat::Json);
        let err = cmd
            .try_get_matches_from(["vm-dhcp", "crd", "--log-format", "xml"])
            .expect_err("xml is no format");
        assert!(err.to_string().contains("xml"), "{err}");
    }
}
