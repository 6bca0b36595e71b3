#!/usr/bin/env bash
# What `make test` needs from a Debian machine, checked before anything is built: the
# packages the tests run (network namespaces, real DHCP clients), installed when missing if
# we are root (or named, with the command to install them, if not); Go for the e2e binaries;
# and root itself, which the tests that make network namespaces need (they fail saying so
# without it; VM_DHCP_TESTS_SKIP_MISSING=1 makes them skip instead). Used by `make test`
# and .ci/run. Exit status 1 when something is missing that we could not install.
set -euo pipefail

# Debian package : a program it provides (what the tests run).
packages=(
    "iproute2:ip"             # ip netns, veth pairs, addresses
    "isc-dhcp-client:dhclient" # the ISC client (tests/agent_netns.rs)
    "udhcpc:udhcpc"           # busybox's client, as Debian packages it
    "busybox:busybox"         # busybox udhcpc in the guests of the e2e tests
    "make:make"
    "time:/usr/bin/time"      # the benchmarks' resource figures
)

have() { if [[ $1 == /* ]]; then [[ -x $1 ]]; else command -v "$1" >/dev/null 2>&1; fi; }

missing=()
for entry in "${packages[@]}"; do
    pkg=${entry%%:*} prog=${entry#*:}
    have "$prog" || missing+=("$pkg")
done

if ((${#missing[@]})); then
    if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
        echo "test-deps: installing ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    else
        echo "test-deps: the tests need the Debian packages: ${missing[*]}" >&2
        echo "test-deps: install them with: sudo apt-get install ${missing[*]}" >&2
        exit 1
    fi
fi

command -v cargo >/dev/null || { echo "test-deps: cargo not found: install Rust with rustup" >&2; exit 1; }
if ! command -v go >/dev/null && [[ ! -x /usr/local/go/bin/go ]]; then
    echo "test-deps: go not found (it builds kube-apiserver, etcd, kubectl and helm for the e2e tests once): install it from https://go.dev/dl into /usr/local/go" >&2
    exit 1
fi
if [[ $(id -u) != 0 ]]; then
    if [[ ${VM_DHCP_TESTS_SKIP_MISSING:-0} == 1 ]]; then
        echo "test-deps: not root: the tests that make network namespaces will be skipped (VM_DHCP_TESTS_SKIP_MISSING=1)" >&2
    else
        echo "test-deps: not root: the tests that make network namespaces will fail; run as root, or set VM_DHCP_TESTS_SKIP_MISSING=1 to skip them" >&2
    fi
fi
echo "test-deps: ok"
