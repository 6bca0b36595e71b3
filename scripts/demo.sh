#!/usr/bin/env bash
# The product installed with its Helm chart, as a user installs it (e2e/examples/demo.rs): a
# local kube-apiserver, etcd and kube-controller-manager, real cert-manager, two simulated
# nodes whose kubelet runs every pod (the chart's Deployments and the DHCP agents) as the
# local vm-dhcp binary, `helm install ./chart --set certificates.mode=cert-manager`, then a
# VM network, its IPPool, a VM, and a guest whose real DHCP client gets the address the
# webhook allocated to its VM; the kubectl views at the end.
#
#   scripts/demo.sh        (make demo)       DEMO_EXIT=1: stop after the last step
#
# Needs root (network and mount namespaces, overlayfs), Rust, Go (kube-apiserver, etcd,
# kube-controller-manager, kubectl, helm and cert-manager are built from their Go modules once
# into ~/.cache/vm-dhcp: about 12 minutes the first time, see e2e/README.md), iproute2 and
# busybox (installed with apt-get when missing). Nothing leaves the namespaces it makes.
set -euo pipefail
cd "$(dirname "$0")/.."
die() { echo "demo: $*" >&2; exit 1; }

[[ $EUID -eq 0 ]] || die "needs root to create network namespaces; run: sudo make demo"
if ! command -v busybox >/dev/null || ! command -v ip >/dev/null; then
    command -v apt-get >/dev/null || die "busybox and iproute2 are needed"
    echo "==> installing busybox and iproute2 (apt-get)"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends busybox iproute2; } >/dev/null ||
        die "apt-get could not install busybox and iproute2"
fi
command -v go >/dev/null || export PATH="$PATH:/usr/local/go/bin"
command -v go >/dev/null || die "go not found (kube-apiserver and etcd are built from their Go modules)"

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/vm-dhcp/target}"
echo "==> building vm-dhcp, and the control plane, helm and cert-manager once (see e2e/README.md)"
cargo build --locked --quiet --bin vm-dhcp
bins=$(e2e/build-bins.sh | tail -1)
VM_DHCP_BIN_DIR="$bins" cargo run --locked --quiet -p vm-dhcp-e2e --example demo
