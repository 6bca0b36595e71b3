//! `vm-dhcp`: one binary, one subcommand per component.

mod agent;
mod apiserver;
mod cli;
mod controller;
mod kube_client;
mod lease;
mod logging;
mod metrics_http;
mod tls;
mod webhook;

use anyhow::Context;

fn main() -> anyhow::Result<()> {
    let cli = cli::parse();
    logging::set_format(cli.log_format);
    let result = match cli.command {
        cli::Command::Crd(args) => print_crds(args),
        cli::Command::Agent(args) => agent::run(args),
        cli::Command::Webhook(args) => webhook::run(args),
        cli::Command::Controller(args) => controller::run(args),
        cli::Command::Apiserver(args) => apiserver::run(args),
    };
    match (result, cli.log_format) {
        // The fatal error is a log line like the others, for whoever parses them.
        (Err(e), cli::LogFormat::Json) => {
            let line = serde_json::json!({
                "timestamp": k8s_openapi::jiff::Timestamp::now().to_string(),
                "level": "ERROR",
                "fields": {"message": format!("{e:#}")},
                "target": "vm_dhcp",
            });
            eprintln!("{line}");
            std::process::exit(1);
        }
        (result, _) => result,
    }
}

fn print_crds(args: cli::CrdArgs) -> anyhow::Result<()> {
    let manifests = vm_dhcp_core::crd::crd_manifests().context("rendering the CRDs as YAML")?;
    match args.output_dir {
        Some(dir) => {
            for (name, yaml) in manifests {
                let path = dir.join(name);
                std::fs::write(&path, yaml)
                    .with_context(|| format!("writing {}", path.display()))?;
            }
        }
        None => {
            let docs: Vec<String> = manifests.into_iter().map(|(_, yaml)| yaml).collect();
            print!("{}", docs.join("---\n"));
        }
    }
    Ok(())
}
