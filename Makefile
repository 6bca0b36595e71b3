# vm-dhcp — see README.md. Every target works on a fresh Debian machine with Rust and Go.

SHELL := /bin/bash
CARGO ?= cargo
# One target directory outside the checkout, shared by every clone on this machine (CI
# clones afresh each run: this keeps it from building the world cold every time).
export CARGO_TARGET_DIR ?= $(HOME)/.cache/vm-dhcp/target
ARGS ?=

# Container image (the seed's variables): REPO=<registry/org> PUSH=true ARCH=amd64|arm64
REPO ?= rancher
TAG ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
ARCH ?= $(shell uname -m | sed -e 's/x86_64/amd64/' -e 's/aarch64/arm64/')
PUSH ?= false
IMAGE ?= $(REPO)/harvester-vm-dhcp:$(TAG)

.PHONY: all build test unit e2e e2e-bins lint fmt crds bench bench-webhook image \
        run-controller run-agent run-webhook run-apiserver

all: build

build:
	$(CARGO) build --release --locked --bin vm-dhcp

## test: unit tests of every crate, then the end-to-end tests (real kube-apiserver + etcd).
## First installs (as root) or names the Debian packages the tests need (scripts/test-deps.sh).
test: test-deps e2e-bins
	VM_DHCP_BIN_DIR="$$(e2e/build-bins.sh | tail -1)" $(CARGO) test --workspace --locked

.PHONY: test-deps
test-deps:
	scripts/test-deps.sh

unit:
	$(CARGO) test --workspace --locked --exclude vm-dhcp-e2e

e2e: e2e-bins
	$(CARGO) build --locked --bin vm-dhcp
	VM_DHCP_BIN_DIR="$$(e2e/build-bins.sh | tail -1)" $(CARGO) test --locked -p vm-dhcp-e2e

## e2e-bins: build kube-apiserver, kube-controller-manager, etcd, kubectl, helm and the cert-manager
## launcher once into the cache (see e2e/README.md).
e2e-bins:
	e2e/build-bins.sh >/dev/null

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings

fmt:
	$(CARGO) fmt --all

## crds: regenerate chart/crds from `vm-dhcp crd` (a test fails when they drift).
crds:
	rm -f chart/crds/*.yaml
	$(CARGO) run --quiet --locked --bin vm-dhcp -- crd --output-dir chart/crds

bench:
	$(CARGO) bench --locked -p vm-dhcp-core

## bench-webhook: VM creates through the real apiserver: no webhook, the floor webhook, vm-dhcp
## with 2 and 1 replicas, at 32 and 4 clients, pools holding 0, 1,000 and 60,000 allocations.
## etcd syncs to disk as in production (BENCH_WEBHOOK_NO_FSYNC=1 to skip it).
bench-webhook: e2e-bins
	VM_DHCP_BIN_DIR="$$(e2e/build-bins.sh | tail -1)" \
	VM_DHCP_E2E_ETCD_FSYNC=$$([ "$${BENCH_WEBHOOK_NO_FSYNC:-0}" = 1 ] && echo 0 || echo 1) \
	$(CARGO) run --release --locked -p vm-dhcp-e2e --example bench_webhook

## bench-apiserver: 16,000 allocations listed through the aggregator; 100 watchers get one change.
.PHONY: bench-apiserver
bench-apiserver: e2e-bins
	$(CARGO) build --release --locked --bin vm-dhcp
	VM_DHCP_BIN_DIR="$$(e2e/build-bins.sh | tail -1)" $(CARGO) run --release --locked -p vm-dhcp-e2e --example bench_apiserver

## bench-controller: controller start against 10,000 VMs/vmnetcfgs and 16,000 allocations.
.PHONY: bench-controller
bench-controller: e2e-bins
	$(CARGO) build --release --locked --bin vm-dhcp
	VM_DHCP_BIN_DIR="$$(e2e/build-bins.sh | tail -1)" $(CARGO) run --release --locked -p vm-dhcp-e2e --example bench_controller

## chaos: the fault-injection suite (root, not CI): with VMs created and deleted through the
## webhooks and guests renewing DHCP, each fault in turn (kill -9 of a webhook replica, the
## controller leader, the active agent, the aggregated apiserver; kube-apiserver and etcd
## restarts; an agent cut from the apiserver; a node lost; etcd out of space); prints the table.
## CHAOS_FAULTS=agent,etcd,... picks faults (see e2e/examples/chaos.rs).
.PHONY: chaos
chaos: e2e-bins
	$(CARGO) build --locked --bin vm-dhcp
	VM_DHCP_BIN_DIR="$$(e2e/build-bins.sh | tail -1)" $(CARGO) run --locked -p vm-dhcp-e2e --example chaos

## demo: the whole product on a local control plane: webhook, controller, aggregated API, agents
## on simulated nodes and a guest's real DHCP client (root). DEMO_EXIT=1 stops after the last step.
.PHONY: demo
demo:
	scripts/demo.sh

## demo-agent: the DHCP agent offline in a network namespace, a real DHCP client in another (root).
.PHONY: demo-agent
demo-agent:
	$(CARGO) build --locked --bin vm-dhcp
	scripts/demo-agent.sh "$(CARGO_TARGET_DIR)/debug/vm-dhcp"

## bench-dhcp: perfdhcp against the agent and Kea 2.2, same namespaces and pinning (root; not in CI).
.PHONY: bench-dhcp
bench-dhcp:
	$(CARGO) build --release --locked --bin vm-dhcp
	scripts/bench-dhcp.sh "$(CARGO_TARGET_DIR)/release/vm-dhcp"

run-controller:
	$(CARGO) run --locked --bin vm-dhcp -- controller $(ARGS)

run-agent:
	$(CARGO) run --locked --bin vm-dhcp -- agent $(ARGS)

run-webhook:
	$(CARGO) run --locked --bin vm-dhcp -- webhook $(ARGS)

run-apiserver:
	$(CARGO) run --locked --bin vm-dhcp -- apiserver $(ARGS)

## image: build the container image with docker buildx (needs a Docker engine).
image:
	docker buildx build --platform linux/$(ARCH) -t $(IMAGE) \
		$(if $(filter true,$(PUSH)),--push,--load) .
