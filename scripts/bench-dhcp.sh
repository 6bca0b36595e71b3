#!/usr/bin/env bash
# make bench-dhcp: perfdhcp against the vm-dhcp agent (offline mode, preloaded with the MACs
# perfdhcp draws from) and Kea 2.2 in the same run, same namespaces, same CPU pinning
# (perfdhcp on CPU 0, the server on CPU 1), following docs/dhcp.md §3. Not run in CI.
#
#   scripts/bench-dhcp.sh <release vm-dhcp binary>        QUICK=1 for a 2-minute smoke run
#
# Needs root, 2+ cores, iproute2, python3 and Debian's kea-dhcp4-server + kea-admin (perfdhcp).
set -euo pipefail
AGENT=${1:?usage: scripts/bench-dhcp.sh <path to a release vm-dhcp binary>}
HERE=$(cd "$(dirname "$0")" && pwd)
PY="python3 $HERE/bench-dhcp.py"

[ "$(id -u)" = 0 ] || { echo "bench-dhcp: needs root (network namespaces)" >&2; exit 1; }
for tool in perfdhcp kea-dhcp4 taskset python3 ip; do
    command -v "$tool" >/dev/null || {
        echo "bench-dhcp: $tool not found; apt-get install kea-dhcp4-server kea-admin util-linux python3 iproute2" >&2
        exit 1
    }
done
[ "$(nproc)" -ge 2 ] || { echo "bench-dhcp: needs 2 cores (generator and server pinned apart)" >&2; exit 1; }

if [ "${QUICK:-0}" = 1 ]; then
    RUNS=1; PERIOD=3; RATES=1000,10000
else
    RUNS=3; PERIOD=10; RATES=1000,5000,10000,12000,13000,14000,15000,16000
fi
LEASES=16000 CLIENTS=3000
SRV=vmdb-srv CLI=vmdb-cli
DIR=$(mktemp -d -t vm-dhcp-bench.XXXXXX)
echo "bench-dhcp: work dir $DIR"
SERVER_PID=
stop_server() {
    [ -n "$SERVER_PID" ] || return 0
    kill "$SERVER_PID" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$SERVER_PID" 2>/dev/null || true
    SERVER_PID=
}
cleanup() {
    stop_server
    ip netns del "$CLI" 2>/dev/null || true
    ip netns del "$SRV" 2>/dev/null || true
}
trap cleanup EXIT
cleanup

# Two namespaces joined by a veth pair; perfdhcp acts as a relay from 192.168.48.2.
ip netns add "$SRV"; ip netns add "$CLI"
ip link add vsrv netns "$SRV" type veth peer name vcli netns "$CLI"
ip -n "$SRV" link set lo up; ip -n "$CLI" link set lo up
ip -n "$SRV" addr add 192.168.48.77/18 dev vsrv; ip -n "$SRV" link set vsrv up
ip -n "$CLI" addr add 192.168.48.2/18 dev vcli; ip -n "$CLI" link set vcli up

$PY prepare "$DIR" --leases "$LEASES" --clients "$CLIENTS" --iface vsrv
sweep() {
    $PY sweep --name "$1" --pid "$SERVER_PID" --rates "$RATES" --runs "$RUNS" --period "$PERIOD" \
        --macs "$DIR/macs.txt" --server-ns "$SRV" --client-ns "$CLI" --client-iface vcli \
        --out "$DIR/$1.json"
}
# Both servers see every client once before measuring (Kea allocates then; the agent's
# table is preloaded), with the same command.
warmup() {
    ip netns exec "$CLI" taskset -c 0 perfdhcp -4 -l vcli -r 1000 -M "$DIR/macs.txt" -p 10 \
        192.168.48.77 > /dev/null 2>&1 || true
}
rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }

echo "== vm-dhcp agent (offline, $LEASES leases)"
ip netns exec "$SRV" taskset -c 1 "$AGENT" agent --ippool-file "$DIR/pool.yaml" --nic vsrv \
    --http-addr 127.0.0.1:18080 > "$DIR/agent.log" 2>&1 &
SERVER_PID=$!
for _ in $(seq 100); do
    ip netns exec "$SRV" python3 -c 'import urllib.request,sys; urllib.request.urlopen("http://127.0.0.1:18080/readyz", timeout=1)' \
        2>/dev/null && break
    kill -0 "$SERVER_PID" 2>/dev/null || { echo "agent died:"; cat "$DIR/agent.log"; exit 1; }
    sleep 0.2
done
AGENT_RSS_LOADED=$(rss_kib "$SERVER_PID")
warmup
sweep agent
AGENT_RSS=$(rss_kib "$SERVER_PID")
echo "  agent RSS: $((AGENT_RSS_LOADED / 1024)) MiB with the table loaded, $((AGENT_RSS / 1024)) MiB after the sweep"
stop_server

echo "== Kea 2.2 (memfile, single-threaded)"
export KEA_PIDFILE_DIR=$DIR KEA_LOCKFILE_DIR=$DIR
ip netns exec "$SRV" kea-dhcp4 -t "$DIR/kea-dhcp4.json" > "$DIR/kea-check.log" 2>&1 \
    || { echo "Kea rejects its configuration:"; cat "$DIR/kea-check.log"; exit 1; }
ip netns exec "$SRV" taskset -c 1 kea-dhcp4 -c "$DIR/kea-dhcp4.json" > "$DIR/kea.out" 2>&1 &
SERVER_PID=$!
sleep 2
kill -0 "$SERVER_PID" 2>/dev/null || { echo "Kea died:"; cat "$DIR/kea.out"; exit 1; }
warmup
sweep kea
KEA_RSS=$(rss_kib "$SERVER_PID")
stop_server

$PY summary "$DIR/agent.json" "$DIR/kea.json" --agent-rss-kib "$AGENT_RSS" --kea-rss-kib "$KEA_RSS" \
    --leases "$LEASES" --clients "$CLIENTS" --runs "$RUNS" --period "$PERIOD" | tee "$DIR/summary.txt"
echo "bench-dhcp: raw results in $DIR"
