//! Where the upstream test binaries are: built once per machine by `e2e/build-bins.sh` into
//! a cache keyed by their versions (e2e/go/VERSIONS). kube-apiserver, etcd, kubectl and helm
//! are required ([`bin_dir`]); kube-controller-manager and cert-manager are looked up only
//! by the tests that need them.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

const VERSIONS: &str = include_str!("../go/VERSIONS");

fn version(key: &str) -> Option<&'static str> {
    VERSIONS.lines().find_map(|line| {
        line.trim()
            .strip_prefix(key)
            .and_then(|rest| rest.strip_prefix('='))
    })
}

/// The cache key `build-bins.sh` uses for the pinned versions.
pub fn cache_key() -> Result<String> {
    match (
        version("K8S_VERSION"),
        version("ETCD_VERSION"),
        version("HELM_VERSION"),
    ) {
        (Some(k), Some(e), Some(h)) => Ok(format!("k8s-{k}_etcd-{e}_helm-{h}")),
        _ => bail!("e2e/go/VERSIONS lacks K8S_VERSION, ETCD_VERSION or HELM_VERSION"),
    }
}

/// The directory holding kube-apiserver, etcd, kubectl and helm.
pub fn bin_dir() -> Result<PathBuf> {
    let dir = match std::env::var_os("VM_DHCP_BIN_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => {
            let root = std::env::var_os("VM_DHCP_BIN_CACHE")
                .map(PathBuf::from)
                .or_else(|| {
                    std::env::var_os("XDG_CACHE_HOME").map(|c| Path::new(&c).join("vm-dhcp/bins"))
                })
                .or_else(|| {
                    std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache/vm-dhcp/bins"))
                })
                .unwrap_or_else(|| PathBuf::from("/tmp/vm-dhcp/bins"));
            root.join(cache_key()?)
        }
    };
    for bin in ["kube-apiserver", "etcd", "kubectl", "helm"] {
        if !dir.join(bin).is_file() {
            bail!(
                "{} is missing: build the e2e binaries with `make e2e-bins` (or set VM_DHCP_BIN_DIR)",
                dir.join(bin).display()
            );
        }
    }
    Ok(dir)
}

fn built(path: PathBuf) -> Result<PathBuf> {
    if !path.exists() {
        bail!(
            "{} is missing: run e2e/build-bins.sh (or `make e2e-bins`) to build it (or set \
             VM_DHCP_BIN_DIR to the directory it prints)",
            path.display()
        );
    }
    Ok(path)
}

/// kube-controller-manager, from the same module and version as kube-apiserver.
pub fn kube_controller_manager() -> Result<PathBuf> {
    built(bin_dir()?.join("kube-controller-manager"))
}

/// The pinned cert-manager module version (e2e/go/VERSIONS).
pub fn cert_manager_version() -> Result<&'static str> {
    version("CERT_MANAGER_VERSION").context("e2e/go/VERSIONS lacks CERT_MANAGER_VERSION")
}

/// `<bin dir>/cert-manager-<version>/`: our launcher of cert-manager's controller and CA
/// injector (`cert-manager controller|cainjector`, module e2e/go/certmanager) and `crds/`.
pub fn cert_manager_dir() -> Result<PathBuf> {
    Ok(bin_dir()?.join(format!("cert-manager-{}", cert_manager_version()?)))
}

/// The cert-manager launcher binary (`cert-manager controller|cainjector|version`).
pub fn cert_manager() -> Result<PathBuf> {
    built(cert_manager_dir()?.join("cert-manager"))
}

/// cert-manager's CRD manifests (one CRD per `.yaml` file), copied from the module's
/// `deploy/crds` at build time, sorted by file name.
pub fn cert_manager_crds() -> Result<Vec<PathBuf>> {
    let dir = built(cert_manager_dir()?.join("crds"))?;
    let mut files = std::fs::read_dir(&dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<Vec<_>>>()?;
    files.retain(|f| f.extension().is_some_and(|e| e == "yaml"));
    files.sort();
    if files.is_empty() {
        bail!("no CRDs in {}", dir.display());
    }
    Ok(files)
}

/// The `vm-dhcp` binary of this build: the e2e crate does not depend on the binary crate,
/// so it is found next to the running test binary (`make e2e` builds it first).
pub fn vm_dhcp_binary() -> PathBuf {
    let mut dir = std::env::current_exe().expect("test binary path");
    dir.pop();
    if dir.ends_with("deps") || dir.ends_with("examples") {
        dir.pop();
    }
    let bin = dir.join("vm-dhcp");
    assert!(
        bin.is_file(),
        "{} missing: run `cargo build --bin vm-dhcp` first (make e2e does)",
        bin.display()
    );
    bin
}

/// busybox (its `udhcpc` is the DHCP client of the cluster tests), from PATH.
pub fn busybox() -> String {
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join("busybox"))
                .find(|p| p.is_file())
        })
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| panic!("busybox not found in PATH (apt-get install busybox)"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn cache_key_matches_the_build_script_formula() {
        let key = super::cache_key().expect("VERSIONS is complete");
        assert!(key.starts_with("k8s-v1.34."), "{key}");
        assert!(
            key.contains("_etcd-v3.") && key.contains("_helm-v3."),
            "{key}"
        );
    }

    #[test]
    fn cert_manager_version_is_pinned() {
        let v = super::cert_manager_version().expect("VERSIONS pins cert-manager");
        assert!(v.starts_with("v1."), "{v}");
    }
}
