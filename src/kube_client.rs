//! The Kubernetes client every subcommand uses.

use std::path::Path;

use anyhow::{Context, Result};

/// A client from `--kubeconfig`/KUBECONFIG when given, else the usual inference (the user's
/// kubeconfig, then the in-cluster service account).
pub async fn client(kubeconfig: Option<&Path>) -> Result<kube::Client> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {} (--kubeconfig)", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .with_context(|| format!("loading kubeconfig {}", path.display()))?
        }
        None => kube::Config::infer()
            .await
            .context("no --kubeconfig/KUBECONFIG and no in-cluster service account found")?,
    };
    kube::Client::try_from(config).context("building the Kubernetes client")
}
