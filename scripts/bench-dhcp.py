#!/usr/bin/env python3
"""Helpers of scripts/bench-dhcp.sh (make bench-dhcp).

  prepare  DIR N          the MAC list perfdhcp draws from (-M), the agent's pool with an
                          allocation for each of them, and Kea's configuration
  sweep    ...            perfdhcp at increasing offered rates, R runs of P seconds each,
                          recording ACKs, drops, latency and the server's CPU time
  summary  A.json B.json  the comparison table and the ratios

The sweep follows the recipe in docs/dhcp.md §3: perfdhcp runs in
the client namespace pinned to CPU 0, the server in the server namespace pinned to CPU 1;
drop % is 1 − ACKs / DISCOVERs; server CPU is utime+stime from /proc/PID/stat.
"""
import argparse
import ipaddress
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import time

SUBNET = ipaddress.ip_network("192.168.0.0/18")
SERVER_IP = "192.168.48.77"
CLIENT_IP = "192.168.48.2"
# Two ranges around 192.168.48.x, where the server and perfdhcp's relay address live.
RANGES = [("192.168.0.100", "192.168.47.255"), ("192.168.49.0", "192.168.63.250")]


def addresses():
    for start, end in RANGES:
        a, b = int(ipaddress.ip_address(start)), int(ipaddress.ip_address(end))
        for n in range(a, b + 1):
            yield ipaddress.ip_address(n)


def prepare(args):
    os.makedirs(args.dir, exist_ok=True)
    macs = [f"02:42:{(i >> 24) & 0xff:02x}:{(i >> 16) & 0xff:02x}:{(i >> 8) & 0xff:02x}:{i & 0xff:02x}"
            for i in range(1, args.leases + 1)]
    # perfdhcp draws from the first --clients of them (3,000 as in docs/dhcp.md §4, so that
    # Kea's figures compare with the recorded ones); the agent's table holds all of them.
    with open(os.path.join(args.dir, "macs.txt"), "w") as f:
        f.write("\n".join(macs[: args.clients]) + "\n")
    ips = addresses()
    allocated = {str(next(ips)): mac for mac in macs}
    pool = {
        "apiVersion": "network.harvesterhci.io/v1alpha1", "kind": "IPPool",
        "metadata": {"name": "bench", "namespace": "default"},
        "spec": {"networkName": "default/bench", "ipv4Config": {
            "serverIP": SERVER_IP, "cidr": str(SUBNET),
            "pool": {"start": RANGES[0][0], "end": RANGES[-1][1]},
            "router": SERVER_IP, "dns": [SERVER_IP], "leaseTime": 7200}},
        "status": {"ipv4": {"allocated": allocated, "used": len(allocated),
                            "available": 0}},
    }
    # JSON is YAML: the agent reads it as a manifest.
    with open(os.path.join(args.dir, "pool.yaml"), "w") as f:
        json.dump(pool, f)
    # Kea: the recipe's configuration (memfile persisted, LFC off, single-threaded) on the
    # same subnet and ranges as the agent's pool.
    kea = {"Dhcp4": {
        "interfaces-config": {"interfaces": [args.iface], "dhcp-socket-type": "raw"},
        "lease-database": {"type": "memfile", "persist": True,
                           "name": os.path.join(args.dir, "kea-leases4.csv"), "lfc-interval": 0},
        "valid-lifetime": 7200, "renew-timer": 3600, "rebind-timer": 6300,
        "multi-threading": {"enable-multi-threading": False},
        "subnet4": [{"id": 1, "subnet": str(SUBNET),
                     "pools": [{"pool": f"{s} - {e}"} for s, e in RANGES],
                     "option-data": [{"name": "routers", "data": SERVER_IP},
                                     {"name": "domain-name-servers", "data": SERVER_IP}]}],
        "loggers": [{"name": "kea-dhcp4",
                     "output_options": [{"output": os.path.join(args.dir, "kea.log")}],
                     "severity": "WARN"}]}}
    with open(os.path.join(args.dir, "kea-dhcp4.json"), "w") as f:
        json.dump(kea, f, indent=1)


def cpu_ticks(pid):
    with open(f"/proc/{pid}/stat") as f:
        parts = f.read().rsplit(")", 1)[1].split()
    return int(parts[11]) + int(parts[12])


def rcvbuf_errors(ns):
    out = subprocess.run(["ip", "netns", "exec", ns, "cat", "/proc/net/snmp"],
                         capture_output=True, text=True).stdout
    lines = [l.split() for l in out.splitlines() if l.startswith("Udp:")]
    return int(lines[1][lines[0].index("RcvbufErrors")])


def parse(out):
    r = {}
    for b in re.split(r"\*\*\*Statistics for: ", out)[1:]:
        name = "do" if b.startswith("DISCOVER-OFFER") else "ra"
        def g(k):
            m = re.search(k + r": ([\d.]+)", b)
            return float(m.group(1)) if m else None
        r[name + "_sent"] = int(g("sent packets") or 0)
        r[name + "_recv"] = int(g("received packets") or 0)
        r[name + "_avg"] = g("avg delay")
    return r


def sweep(args):
    tck = os.sysconf("SC_CLK_TCK")
    results = []
    for rate in [int(x) for x in args.rates.split(",")]:
        runs = []
        for i in range(args.runs):
            cmd = ["ip", "netns", "exec", args.client_ns, "taskset", "-c", args.client_cpu,
                   "perfdhcp", "-4", "-l", args.client_iface, "-r", str(rate),
                   "-M", args.macs, "-p", str(args.period), SERVER_IP]
            e0 = rcvbuf_errors(args.server_ns)
            c0 = cpu_ticks(args.pid)
            p = subprocess.run(cmd, capture_output=True, text=True)
            c1 = cpu_ticks(args.pid)
            e1 = rcvbuf_errors(args.server_ns)
            r = parse(p.stdout + p.stderr)
            sent, acks = r.get("do_sent", 0), r.get("ra_recv", 0)
            cpu = (c1 - c0) / tck
            r.update(rate=rate, run=i, rc=p.returncode, server_cpu_s=cpu,
                     srv_rcvbuf_err=e1 - e0,
                     drop_pct=100.0 * (sent - acks) / sent if sent else 100.0,
                     acks_per_s=acks / args.period,
                     cpu_us_per_dora=1e6 * cpu / acks if acks else None,
                     latency_ms=(r["do_avg"] + r["ra_avg"])
                     if r.get("do_avg") is not None and r.get("ra_avg") is not None else None)
            if not sent:
                print(f"  perfdhcp sent nothing (rc {p.returncode}):\n{p.stderr[-600:]}",
                      file=sys.stderr)
            runs.append(r)
            time.sleep(1)
        def med(k):
            v = [x[k] for x in runs if x.get(k) is not None]
            return statistics.median(v) if v else None
        s = {"name": args.name, "rate": rate, "drop_pct": med("drop_pct"),
             "acks_per_s": med("acks_per_s"), "latency_ms": med("latency_ms"),
             "cpu_us_per_dora": med("cpu_us_per_dora"), "runs": runs}
        results.append(s)
        print(f"  {args.name:6} {rate:>6}/s offered: {s['acks_per_s'] or 0:>8.0f} ACK/s, "
              f"drop {s['drop_pct']:.2f} %, latency {fmt(s['latency_ms'], '.3f')} ms, "
              f"CPU {fmt(s['cpu_us_per_dora'], '.1f')} µs/DORA", flush=True)
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
        # Past the knee, but never before 10,000/s: CPU per DORA is compared there.
        if rate >= 10000 and s["drop_pct"] is not None and s["drop_pct"] > args.stop_drop:
            break


def fmt(v, spec):
    return "—" if v is None else format(v, spec)


def figures(path):
    with open(path) as f:
        rows = json.load(f)
    sustained = max((r["rate"] for r in rows if r["drop_pct"] is not None and r["drop_pct"] < 1.0),
                    default=None)
    at = {r["rate"]: r for r in rows}
    return {
        "name": rows[0]["name"] if rows else path,
        "sustained": sustained,
        "latency_1k": at.get(1000, {}).get("latency_ms"),
        "cpu_10k": at.get(10000, {}).get("cpu_us_per_dora"),
        "max_rate_tried": max((r["rate"] for r in rows), default=None),
    }


def summary(args):
    a, b = figures(args.agent), figures(args.kea)
    a["rss"] = args.agent_rss_kib / 1024 if args.agent_rss_kib else None
    b["rss"] = args.kea_rss_kib / 1024 if args.kea_rss_kib else None

    def ratio(x, y):
        return "—" if x is None or y in (None, 0) else f"{x / y:.2f}"

    rows = [
        ("highest offered rate with < 1 % drops (DORA/s)", "sustained", "d", "agent/Kea"),
        ("average latency at 1,000/s (ms, DO + RA)", "latency_1k", ".3f", "agent/Kea"),
        ("server CPU per DORA at 10,000/s (µs)", "cpu_10k", ".1f", "agent/Kea"),
        (f"resident memory, {args.leases} leases (MiB)", "rss", ".1f", "agent/Kea"),
    ]
    print()
    print(f"| {'':48} | {'vm-dhcp agent':>13} | {'Kea 2.2':>9} | {'agent/Kea':>9} |")
    print(f"|{'-' * 50}|{'-' * 15}|{'-' * 11}|{'-' * 11}|")
    for label, key, spec, _ in rows:
        print(f"| {label:48} | {fmt(a[key], spec):>13} | {fmt(b[key], spec):>9} | "
              f"{ratio(a[key], b[key]):>9} |")
    print()
    print(f"(each figure a median of {args.runs} runs of {args.period} s; perfdhcp draws from "
          f"{args.clients} MACs; rates tried up to {a['max_rate_tried']}/s for the agent and "
          f"{b['max_rate_tried']}/s for Kea; load average at the end: {os.getloadavg()[0]:.2f})")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("dir")
    p.add_argument("--leases", type=int, default=16000)
    p.add_argument("--clients", type=int, default=3000)
    p.add_argument("--iface", required=True)
    s = sub.add_parser("sweep")
    for k in ("name", "macs", "out", "server-ns", "client-ns", "client-iface"):
        s.add_argument("--" + k, required=True)
    s.add_argument("--pid", type=int, required=True)
    s.add_argument("--rates", required=True)
    s.add_argument("--runs", type=int, default=3)
    s.add_argument("--period", type=int, default=10)
    s.add_argument("--client-cpu", default="0")
    s.add_argument("--stop-drop", type=float, default=5.0)
    m = sub.add_parser("summary")
    m.add_argument("agent")
    m.add_argument("kea")
    m.add_argument("--agent-rss-kib", type=int)
    m.add_argument("--kea-rss-kib", type=int)
    m.add_argument("--leases", type=int, default=16000)
    m.add_argument("--clients", type=int, default=3000)
    m.add_argument("--runs", type=int, default=3)
    m.add_argument("--period", type=int, default=10)
    a = ap.parse_args()
    {"prepare": prepare, "sweep": sweep, "summary": summary}[a.cmd](a)


if __name__ == "__main__":
    main()
