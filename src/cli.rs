//! Command line: every flag also reads an environment variable.

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
}

#[derive(Args, Debug)]
pub struct CrdArgs {
    /// Write one file per CRD into this directory (as chart/crds holds them) instead of
    /// printing a multi-document YAML stream.
    #[arg(long, env = "VM_DHCP_CRD_OUTPUT_DIR")]
    pub output_dir: Option<PathBuf>,
}
