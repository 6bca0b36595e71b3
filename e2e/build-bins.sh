#!/usr/bin/env bash
# Build kube-apiserver, kube-controller-manager, etcd, kubectl and helm at the
# versions pinned in e2e/go/VERSIONS (modules in e2e/go/kube and e2e/go/helm), and
# our cert-manager launcher (module e2e/go/certmanager) with cert-manager's CRDs,
# into a per-version cache directory, once.
#
#   BIN_DIR=$(e2e/build-bins.sh | tail -1)
#
# Cache dir: ${VM_DHCP_BIN_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/vm-dhcp/bins}/<key>
#   key = k8s-${K8S_VERSION}_etcd-${ETCD_VERSION}_helm-${HELM_VERSION}
# cert-manager goes to <dir>/cert-manager-${CERT_MANAGER_VERSION}/{cert-manager,crds/}.
# If everything is already there, nothing is built. Each binary is linked
# under a temporary name and renamed into place, so an interrupted build never
# leaves a file that looks finished. Logs go to stderr; the last line on stdout
# is the directory.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cd "$here"

log() { printf 'build-bins: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# shellcheck source=go/VERSIONS
. "$here/go/VERSIONS"
: "${K8S_VERSION:?}" "${ETCD_VERSION:?}" "${HELM_VERSION:?}" "${CERT_MANAGER_VERSION:?}"

key="k8s-${K8S_VERSION}_etcd-${ETCD_VERSION}_helm-${HELM_VERSION}"
cache_root=${VM_DHCP_BIN_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/vm-dhcp/bins}
dir="$cache_root/$key"
bins=(kube-apiserver kube-controller-manager etcd kubectl helm)
cm_dir="$dir/cert-manager-$CERT_MANAGER_VERSION"

all_present() {
    local b
    for b in "${bins[@]}"; do [[ -x "$dir/$b" ]] || return 1; done
    [[ -x "$cm_dir/cert-manager" && -d "$cm_dir/crds" ]]
}

if all_present; then
    log "up to date: $dir"
    printf '%s\n' "$dir"
    exit 0
fi

command -v go >/dev/null 2>&1 || die "go not found on PATH (need Go >= 1.26)"

export GOTOOLCHAIN=local CGO_ENABLED=0 GOWORK=off
export GOFLAGS="-mod=readonly -buildvcs=false"

go_minor=$(go env GOVERSION | sed -nE 's/^go1\.([0-9]+).*/\1/p')
[[ -n "$go_minor" && "$go_minor" -ge 26 ]] \
    || die "$(go env GOVERSION) is too old: helm $HELM_VERSION needs go >= 1.26.0 (GOTOOLCHAIN=local)"

modver() { (cd "$1" && go list -m -f '{{.Version}}' "$2"); }
check_pin() { # module-dir module want
    local got
    got=$(modver "$1" "$2") || die "go list -m $2 failed in e2e/$1"
    [[ "$got" == "$3" ]] || die "e2e/go/VERSIONS says $2 $3 but e2e/$1/go.mod selects $got"
}
check_pin go/kube k8s.io/kubernetes "$K8S_VERSION"
check_pin go/kube go.etcd.io/etcd/server/v3 "$ETCD_VERSION"
check_pin go/helm helm.sh/helm/v3 "$HELM_VERSION"
check_pin go/certmanager github.com/cert-manager/cert-manager "$CERT_MANAGER_VERSION"

mkdir -p "$dir"

# Serialise concurrent callers (e.g. parallel test runs) on the same key.
if command -v flock >/dev/null 2>&1; then
    exec 9>"$dir/.lock"
    flock 9
    if all_present; then
        log "up to date (built by another process): $dir"
        printf '%s\n' "$dir"
        exit 0
    fi
fi
# Leftovers of killed builds; and our own temp files if we are interrupted.
mkdir -p "$cm_dir"
rm -rf "$dir"/.*.tmp.* "$cm_dir"/.*.tmp.* 2>/dev/null || true
trap 'rm -rf "$dir"/.*.tmp.$$ "$cm_dir"/.*.tmp.$$' EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

k8s_minor=$(echo "$K8S_VERSION" | cut -d. -f2)
kube_ver_flags=""
for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    kube_ver_flags+=" -X $p.gitVersion=$K8S_VERSION -X $p.gitMajor=1 -X $p.gitMinor=$k8s_minor -X $p.gitTreeState=clean"
done

# helm's Makefile derives the default Kubernetes version of `helm template`/lint
# from the k8s.io/client-go it was built with (major+1, minor).
helm_cg=$(modver go/helm k8s.io/client-go)  # e.g. v0.37.0
helm_k8s_minor=$(echo "$helm_cg" | cut -d. -f2)
helm_ver_flags="-X helm.sh/helm/v3/internal/version.version=$HELM_VERSION -X helm.sh/helm/v3/internal/version.gitTreeState=clean"
for p in helm.sh/helm/v3/pkg/lint/rules helm.sh/helm/v3/pkg/chartutil; do
    helm_ver_flags+=" -X $p.k8sVersionMajor=1 -X $p.k8sVersionMinor=$helm_k8s_minor"
done

cm_ver_flags="-X github.com/cert-manager/cert-manager/pkg/util.AppVersion=$CERT_MANAGER_VERSION"

build() { # name module-dir package extra-ldflags [output-dir]
    local name=$1 mod=$2 pkg=$3 ldx=$4 out=${5:-$dir}
    if [[ -x "$out/$name" ]]; then
        log "$name: already built"
        return
    fi
    local tmp="$out/.$name.tmp.$$"
    log "$name: go build $pkg (in e2e/$mod)"
    local start=$SECONDS
    (cd "$mod" && go build -trimpath -ldflags "-s -w$ldx" -o "$tmp" "$pkg") >&2 \
        || { rm -f "$tmp"; die "$name: build failed"; }
    mv -f "$tmp" "$out/$name"
    log "$name: done in $((SECONDS - start))s"
}

# cert-manager's CRDs, from the module's deploy/crds (copied, never committed).
copy_cm_crds() {
    if [[ -d "$cm_dir/crds" ]]; then
        log "cert-manager CRDs: already there"
        return
    fi
    local src tmp="$cm_dir/.crds.tmp.$$"
    src=$(cd go/certmanager && go list -m -f '{{.Dir}}' github.com/cert-manager/cert-manager) \
        || die "cannot locate the cert-manager module (go mod download in e2e/go/certmanager)"
    [[ -d "$src/deploy/crds" ]] || die "$src/deploy/crds is missing"
    mkdir -p "$tmp"
    cp "$src"/deploy/crds/*.yaml "$tmp"/
    chmod -R u+w "$tmp"
    mv -T "$tmp" "$cm_dir/crds"
    log "cert-manager CRDs: $(find "$cm_dir/crds" -name '*.yaml' | wc -l) files from $src/deploy/crds"
}

log "building into $dir"
build etcd           go/kube go.etcd.io/etcd/server/v3            ""
build kube-apiserver go/kube k8s.io/kubernetes/cmd/kube-apiserver " $kube_ver_flags"
build kubectl        go/kube k8s.io/kubernetes/cmd/kubectl        " $kube_ver_flags"
build helm           go/helm helm.sh/helm/v3/cmd/helm              " $helm_ver_flags"
build kube-controller-manager go/kube k8s.io/kubernetes/cmd/kube-controller-manager " $kube_ver_flags"
build cert-manager   go/certmanager .                              " $cm_ver_flags" "$cm_dir"
copy_cm_crds

all_present || die "binaries missing after build in $dir"
log "ok: $dir"
printf '%s\n' "$dir"
