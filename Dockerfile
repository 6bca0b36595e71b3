# syntax=docker/dockerfile:1
# One image, one binary: `vm-dhcp <controller|agent|webhook|apiserver>`.
#
# The default user is non-root (65532) for the controller, webhook and apiserver. The agent
# must run as UID 0 with NET_ADMIN and NET_RAW: it binds port 67 to a device
# (SO_BINDTODEVICE) and adds the pool's server address to its interface, and capabilities
# added to a non-root container's bounding set are not in its effective set. The chart's
# agent pods therefore set `runAsUser: 0` and add exactly those two capabilities.

ARG RUST_VERSION=1.95
FROM --platform=$BUILDPLATFORM rust:${RUST_VERSION}-bookworm AS builder
ARG TARGETARCH
WORKDIR /src
RUN case "$TARGETARCH" in \
      amd64) echo x86_64-unknown-linux-gnu > /rust-target ;; \
      arm64) echo aarch64-unknown-linux-gnu > /rust-target && \
             apt-get update && apt-get install -y --no-install-recommends gcc-aarch64-linux-gnu libc6-dev-arm64-cross && \
             rm -rf /var/lib/apt/lists/* ;; \
      *) echo "unsupported TARGETARCH $TARGETARCH" >&2; exit 1 ;; \
    esac && rustup target add "$(cat /rust-target)"
ENV CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin vm-dhcp --target "$(cat /rust-target)" && \
    cp "target/$(cat /rust-target)/release/vm-dhcp" /vm-dhcp

FROM debian:bookworm-slim
# iproute2: the agent's `ip` (src/agent/netif.rs) adds and removes the pool's server address
# on its interface (--manage-server-ip). ca-certificates: TLS to the Kubernetes API.
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates iproute2 && \
    rm -rf /var/lib/apt/lists/*
COPY --from=builder /vm-dhcp /usr/bin/vm-dhcp
USER 65532:65532
ENTRYPOINT ["/usr/bin/vm-dhcp"]
CMD ["--help"]
