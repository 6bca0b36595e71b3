#!/usr/bin/env bash
# The DHCP agent with no cluster: two network namespaces joined by a veth pair, the agent
# offline (--ippool-file) in one with the seed README's net-48 pool, a real DHCP client
# (busybox udhcpc, else ISC dhclient) in the other. Prints what the client configured, then
# removes everything it made (also on error or Ctrl-C).
#
#   scripts/demo-agent.sh [path/to/vm-dhcp]      (make demo-agent builds it first)
#
# Needs root (namespaces), iproute2 and udhcpc or dhclient (Debian: busybox, isc-dhcp-client).
# Nothing leaves the two namespaces; /etc is never touched (the client's resolv.conf is
# written to a scratch directory).
set -euo pipefail

BIN=${1:-${VM_DHCP_BIN:-vm-dhcp}}
die() { echo "demo-agent: $*" >&2; exit 1; }

[[ $EUID -eq 0 ]] || die "needs root to create network namespaces; run: sudo make demo-agent"
# On a fresh Debian machine, bring what the demo needs (a real DHCP client, iproute2).
if ! busybox udhcpc --help >/dev/null 2>&1 && ! command -v dhclient >/dev/null || ! command -v ip >/dev/null; then
    if command -v apt-get >/dev/null; then
        echo "==> installing busybox and iproute2 (apt-get)"
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends busybox iproute2; } >/dev/null ||
            die "apt-get could not install busybox and iproute2"
    fi
fi
command -v ip >/dev/null || die "iproute2 (ip) not found; apt-get install iproute2"
[[ -x $BIN ]] || BIN=$(command -v "$BIN" 2>/dev/null) || die "vm-dhcp binary not found; run: make demo-agent"
# DEMO_CLIENT=dhclient|udhcpc picks one; default: udhcpc if present.
CLIENT=${DEMO_CLIENT:-}
if [[ -z $CLIENT ]]; then
    if busybox udhcpc --help >/dev/null 2>&1; then CLIENT=udhcpc
    elif command -v dhclient >/dev/null; then CLIENT=dhclient
    else die "no DHCP client; apt-get install busybox (udhcpc) or isc-dhcp-client (dhclient)"
    fi
fi
case $CLIENT in
    udhcpc) busybox udhcpc --help >/dev/null 2>&1 || die "busybox udhcpc not found; apt-get install busybox" ;;
    dhclient) command -v dhclient >/dev/null || die "dhclient not found; apt-get install isc-dhcp-client" ;;
    *) die "DEMO_CLIENT must be udhcpc or dhclient, not $CLIENT" ;;
esac

ID=$$
SRV_NS=vdemo-srv-$ID CLI_NS=vdemo-cli-$ID
SRV_IF=vdm${ID}s CLI_IF=vdm${ID}c            # ≤ 15 bytes
CLIENT_MAC=c6:d6:82:39:d3:c3                  # the seed README's VM NIC
WORK=$(mktemp -d -t vm-dhcp-demo.XXXXXX)
AGENT_PID=

cleanup() {
    local rc=$?
    [[ -n $AGENT_PID ]] && kill "$AGENT_PID" 2>/dev/null && wait "$AGENT_PID" 2>/dev/null
    [[ -f $WORK/dhclient.pid ]] && kill "$(cat "$WORK/dhclient.pid")" 2>/dev/null
    ip netns del "$CLI_NS" 2>/dev/null || true
    ip netns del "$SRV_NS" 2>/dev/null || true
    if ((rc != 0)) && [[ -f $WORK/agent.log ]]; then
        echo "--- agent log ---" >&2; cat "$WORK/agent.log" >&2
    fi
    rm -rf "$WORK"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# The seed README's pool, with the allocation the webhook would have written for the VM
# (status.ipv4.allocated is the one source of truth; the agent only serves it). NTP is an
# address: the demo namespaces have no DNS to resolve pool.ntp.org with.
cat >"$WORK/pool.yaml" <<EOF
apiVersion: network.harvesterhci.io/v1alpha1
kind: IPPool
metadata:
  name: net-48
  namespace: default
spec:
  ipv4Config:
    serverIP: 192.168.48.77
    cidr: 192.168.48.0/24
    pool:
      start: 192.168.48.81
      end: 192.168.48.90
      exclude:
      - 192.168.48.81
      - 192.168.48.90
    router: 192.168.48.1
    dns:
    - 1.1.1.1
    domainName: aibao.moe
    domainSearch:
    - aibao.moe
    ntp:
    - 192.168.48.1
    leaseTime: 300
  networkName: default/net-48
status:
  ipv4:
    allocated:
      192.168.48.77: RESERVED
      192.168.48.81: EXCLUDED
      192.168.48.90: EXCLUDED
      192.168.48.86: $CLIENT_MAC
    used: 1
    available: 7
EOF

# The client's hook: configure the interface, the default route and a private resolv.conf.
cat >"$WORK/hook.sh" <<EOF
#!/bin/sh
PATH=/usr/sbin:/usr/bin:/sbin:/bin
case "\${reason:-\$1}" in
  bound|renew)
    ip addr replace "\$ip/\$subnet" dev "\$interface"
    [ -n "\$router" ] && ip route replace default via "\${router%% *}" dev "\$interface"
    { for d in \$dns; do echo "nameserver \$d"; done; [ -n "\$search" ] && echo "search \$search"; } >"$WORK/resolv.conf"
    echo "lease=\$lease" >"$WORK/lease" ;;
  BOUND|RENEW|REBOOT)
    ip addr replace "\$new_ip_address/\$new_subnet_mask" dev "\$interface"
    [ -n "\$new_routers" ] && ip route replace default via "\${new_routers%% *}" dev "\$interface"
    { for d in \$new_domain_name_servers; do echo "nameserver \$d"; done; [ -n "\$new_domain_search" ] && echo "search \$new_domain_search"; } >"$WORK/resolv.conf"
    echo "lease=\$new_dhcp_lease_time" >"$WORK/lease" ;;
  PREINIT) ip link set dev "\$interface" up ;;
  deconfig) ip -4 addr flush dev "\$interface" ;;
esac
exit 0
EOF
chmod +x "$WORK/hook.sh"

echo "==> network namespaces $SRV_NS (agent) and $CLI_NS (VM), veth $SRV_IF <-> $CLI_IF"
ip netns add "$SRV_NS"
ip netns add "$CLI_NS"
ip link add "$SRV_IF" netns "$SRV_NS" type veth peer name "$CLI_IF" netns "$CLI_NS" address "$CLIENT_MAC"
ip -n "$SRV_NS" link set lo up
ip -n "$CLI_NS" link set lo up
ip -n "$SRV_NS" addr add 192.168.48.77/24 dev "$SRV_IF"
ip -n "$SRV_NS" link set "$SRV_IF" up
ip -n "$CLI_NS" link set "$CLI_IF" up

echo "==> vm-dhcp agent --ippool-file pool.yaml --nic $SRV_IF (offline, no cluster)"
ip netns exec "$SRV_NS" "$BIN" agent --ippool-file "$WORK/pool.yaml" --nic "$SRV_IF" \
    --http-addr 127.0.0.1:8080 >"$WORK/agent.log" 2>&1 &
AGENT_PID=$!

# HTTP inside the agent's namespace without curl: bash's /dev/tcp.
http_get() {
    ip netns exec "$SRV_NS" bash -c \
        'exec 3<>/dev/tcp/127.0.0.1/8080 && printf "GET %s HTTP/1.0\r\nHost: agent\r\n\r\n" "$1" >&3 && cat <&3' _ "$1" 2>/dev/null
}
for _ in $(seq 1 100); do
    http_get /readyz | head -1 | grep -q ' 200 ' && break
    kill -0 "$AGENT_PID" 2>/dev/null || die "the agent exited"
    sleep 0.1
done
http_get /readyz | head -1 | grep -q ' 200 ' || die "the agent did not become ready"

echo "==> $CLIENT in $CLI_NS asks for an address (MAC $CLIENT_MAC)"
if [[ $CLIENT == udhcpc ]]; then
    ip netns exec "$CLI_NS" busybox udhcpc -i "$CLI_IF" -f -q -n -t 5 -T 2 \
        -O search -s "$WORK/hook.sh" 2>&1 | sed 's/^/    /'
else
    ip netns exec "$CLI_NS" dhclient -4 -1 -v -sf "$WORK/hook.sh" -lf "$WORK/dhclient.leases" \
        -pf "$WORK/dhclient.pid" "$CLI_IF" 2>&1 | grep -E 'DHCP|bound' | sed 's/^/    /'
fi
[[ -f $WORK/lease ]] || die "the client got no lease"

ADDR=$(ip -n "$CLI_NS" -4 -o addr show dev "$CLI_IF" | awk '{print $4}')
ROUTER=$(ip -n "$CLI_NS" route show default | awk '{print $3}')
DNS=$(awk '/^nameserver/ {printf "%s%s", sep, $2; sep=" "}' "$WORK/resolv.conf")
SEARCH=$(awk '/^search/ {$1=""; sub(/^ /, ""); print}' "$WORK/resolv.conf")
LEASE=$(sed 's/lease=//' "$WORK/lease")

echo
echo "The client configured:"
echo "    address   $ADDR"
echo "    router    $ROUTER"
echo "    DNS       $DNS"
echo "    search    $SEARCH"
echo "    lease     ${LEASE}s"
echo
echo "The agent's /leases (the Go agent's shape):"
http_get /leases | sed '1,/^\r\{0,1\}$/d' | sed 's/^/    /'
echo
echo
echo "The agent's /api/v1/leases:"
http_get /api/v1/leases | sed '1,/^\r\{0,1\}$/d' | sed 's/^/    /'
echo
echo
[[ $ADDR == 192.168.48.86/24 && $ROUTER == 192.168.48.1 && $DNS == 1.1.1.1 ]] \
    || die "unexpected configuration (expected 192.168.48.86/24, router 192.168.48.1, DNS 1.1.1.1)"
echo "==> demo OK; cleaning up"
