//! Benchmark of allocation at admission (issue 12): 1,000 VirtualMachine creates through the
//! real kube-apiserver + etcd at 32 and at 4 concurrent clients, in one run, for
//! - no webhook;
//! - the floor webhook (one small object created per admission, then allowed: the least any
//!   synchronous allocator can cost);
//! - vm-dhcp with 2 replicas, then with 1 (the second replica killed);
//!
//! with the pool holding 0, 1,000 and 60,000 allocations (a /16 pool filled to 60,000
//! through admission first). Prints every figure, the ratios and the targets. etcd syncs to
//! disk as in production unless BENCH_WEBHOOK_NO_FSYNC=1 (the mode is printed).
//! Run with `make bench-webhook` (not in CI: it takes several minutes).

use std::time::{Duration, Instant};

use futures::StreamExt;
use kube::api::{Api, PostParams};
use vm_dhcp_core::kubevirt::VirtualMachine;
use vm_dhcp_e2e::webhooks::{create_pool, floor_webhook, pool, setup, vm};
use vm_dhcp_e2e::{ControlPlane, TestNamespace};

const VMS: usize = 1000;
const WARMUP: usize = 64;
const CLIENT_COUNTS: [usize; 2] = [32, 4];
const FILL: usize = 60_000;

struct Run {
    took: Duration,
    latencies: Vec<Duration>,
    retries: usize,
}

impl Run {
    fn rate(&self) -> f64 {
        self.latencies.len() as f64 / self.took.as_secs_f64()
    }
    fn pct(&self, p: f64) -> Duration {
        let i = ((self.latencies.len() as f64 - 1.0) * p).round() as usize;
        self.latencies[i]
    }
}

/// `count` creates by `clients` concurrent clients, each VM named `<prefix>-<i>`; a refused
/// create is retried (as a client would) and counted.
async fn creates(
    ns: &TestNamespace,
    network: &str,
    prefix: &str,
    count: usize,
    clients: usize,
) -> Run {
    let vms: Api<VirtualMachine> = ns.api();
    let t0 = Instant::now();
    let results: Vec<(Duration, usize)> = futures::stream::iter(0..count)
        .map(|i| {
            let vms = vms.clone();
            let obj = vm(&ns.name, &format!("{prefix}-{i:05}"), network);
            async move {
                let t = Instant::now();
                for attempt in 0..5 {
                    match vms.create(&PostParams::default(), &obj).await {
                        Ok(_) => return (t.elapsed(), attempt),
                        // A refused attempt may have been admitted after all.
                        Err(kube::Error::Api(s)) if s.code == 409 && attempt > 0 => {
                            return (t.elapsed(), attempt);
                        }
                        Err(kube::Error::Api(s)) if s.code == 409 => {
                            panic!(
                                "VM {} exists already: the benchmark reuses a name",
                                s.message
                            )
                        }
                        Err(e) if attempt == 4 => panic!("VM create kept failing: {e}"),
                        Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                    }
                }
                unreachable!()
            }
        })
        .buffer_unordered(clients)
        .collect()
        .await;
    let took = t0.elapsed();
    let retries = results.iter().map(|(_, r)| r).sum();
    let mut latencies: Vec<Duration> = results.into_iter().map(|(d, _)| d).collect();
    latencies.sort();
    Run {
        took,
        latencies,
        retries,
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// One measured row.
struct Row {
    state: usize,
    clients: usize,
    variant: &'static str,
    run: Run,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let cp = ControlPlane::shared().await;
    let fsync = vm_dhcp_e2e::cluster::etcd_fsync();
    eprintln!(
        "control plane up in {:.2} s; etcd {}",
        cp.startup.as_secs_f64(),
        if fsync {
            "syncs to disk (as production)"
        } else {
            "runs with --unsafe-no-fsync"
        }
    );

    let plain = cp.namespace("bench-plain").await;
    let plain_net = format!("{}/net", plain.name);
    let floor = cp.namespace("bench-floor").await;
    floor_webhook(cp, &floor).await;
    let floor_net = format!("{}/net", floor.name);
    let (ns, mut replicas) = setup(cp, "bench-vmdhcp", 2).await;
    // One /16 pool per (state, replica count); the 60,000 one is shared by both counts.
    let pools = [
        ("p0-2", "10.100"),
        ("p0-1", "10.101"),
        ("p1k-2", "10.102"),
        ("p1k-1", "10.103"),
        ("p60k", "10.104"),
    ];
    for (name, prefix) in pools {
        let p = pool(
            &ns.name,
            name,
            &format!("{prefix}.0.0/16"),
            &format!("{prefix}.0.2"),
            &format!("{prefix}.255.254"),
            None,
        );
        create_pool(&ns, &replicas, &p).await;
    }
    let network = |pool: &str| format!("{}/{pool}", ns.name);

    // Warm every path's connections (a client's first requests take ~2 s here).
    creates(&plain, &plain_net, "warm", WARMUP, 32).await;
    creates(&floor, &floor_net, "warm", WARMUP, 32).await;
    creates(&ns, &network("p0-2"), "warm", WARMUP, 32).await;

    for name in ["p1k-2", "p1k-1"] {
        creates(&ns, &network(name), &format!("fill-{name}"), 1000, 32).await;
    }
    let fill = creates(&ns, &network("p60k"), "fill-p60k", FILL, 32).await;
    println!(
        "a /16 pool filled to {FILL} allocations through admission (2 replicas, 32 clients) in {:.1} s: {:.0} creates/s, p50 {:.1} ms, p99 {:.1} ms, {} retries",
        fill.took.as_secs_f64(),
        fill.rate(),
        ms(fill.pct(0.5)),
        ms(fill.pct(0.99)),
        fill.retries
    );

    let mut rows: Vec<Row> = Vec::new();
    let state_pool = |state: usize, replicas: usize| match (state, replicas) {
        (0, 2) => "p0-2",
        (0, _) => "p0-1",
        (1000, 2) => "p1k-2",
        (1000, _) => "p1k-1",
        _ => "p60k",
    };
    for state in [0, 1000, FILL] {
        for clients in CLIENT_COUNTS {
            let tag = format!("s{state}-c{clients}");
            let run = creates(&plain, &plain_net, &tag, VMS, clients).await;
            rows.push(Row {
                state,
                clients,
                variant: "no webhook",
                run,
            });
            let run = creates(&floor, &floor_net, &tag, VMS, clients).await;
            rows.push(Row {
                state,
                clients,
                variant: "floor webhook",
                run,
            });
            let run = creates(&ns, &network(state_pool(state, 2)), &tag, VMS, clients).await;
            rows.push(Row {
                state,
                clients,
                variant: "vm-dhcp 2 replicas",
                run,
            });
        }
    }
    let races: Vec<u64> = replicas
        .iter()
        .map(|r| r.webhook.metrics.conflicts())
        .collect();
    replicas[1].kill();
    for state in [0, 1000, FILL] {
        for clients in CLIENT_COUNTS {
            let tag = format!("s{state}-c{clients}-one");
            let run = creates(&ns, &network(state_pool(state, 1)), &tag, VMS, clients).await;
            rows.push(Row {
                state,
                clients,
                variant: "vm-dhcp 1 replica",
                run,
            });
        }
    }

    println!(
        "\n{VMS} VM creates per row, real kube-apiserver + etcd ({}); pool holding N allocations before the row:",
        if fsync {
            "etcd fsync on"
        } else {
            "etcd --unsafe-no-fsync"
        }
    );
    println!(
        "| N | clients | variant | creates/s | p50 ms | p99 ms | vs floor | vs no webhook | retries |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    let find = |state: usize, clients: usize, variant: &str| {
        rows.iter()
            .find(|r| r.state == state && r.clients == clients && r.variant == variant)
            .map(|r| &r.run)
    };
    for r in &rows {
        let floor = find(r.state, r.clients, "floor webhook").map_or(f64::NAN, Run::rate);
        let plain = find(r.state, r.clients, "no webhook").map_or(f64::NAN, Run::rate);
        println!(
            "| {} | {} | {} | {:.0} | {:.1} | {:.1} | {:.0} % | {:.0} % | {} |",
            r.state,
            r.clients,
            r.variant,
            r.run.rate(),
            ms(r.run.pct(0.5)),
            ms(r.run.pct(0.99)),
            100.0 * r.run.rate() / floor,
            100.0 * r.run.rate() / plain,
            r.run.retries
        );
    }
    println!("\naddress races lost and picked again (2 replicas phase): {races:?}");

    println!("\ntargets:");
    let verdict = |ok: bool| if ok { "met" } else { "MISSED" };
    for state in [0, 1000, FILL] {
        for variant in ["vm-dhcp 1 replica", "vm-dhcp 2 replicas"] {
            let (Some(v), Some(f), Some(p)) = (
                find(state, 32, variant),
                find(state, 32, "floor webhook"),
                find(state, 32, "no webhook"),
            ) else {
                continue;
            };
            let (vf, vp) = (v.rate() / f.rate(), v.rate() / p.rate());
            println!(
                "N={state}, 32 clients, {variant}: {:.0} % of the floor webhook (>= 50 %: {}), {:.0} % of no webhook (>= 40 %: {})",
                100.0 * vf,
                verdict(vf >= 0.5),
                100.0 * vp,
                verdict(vp >= 0.4)
            );
            let (Some(v4), Some(p4)) = (find(state, 4, variant), find(state, 4, "no webhook"))
            else {
                continue;
            };
            let added = ms(v4.pct(0.99)) - ms(p4.pct(0.99));
            println!(
                "N={state}, 4 clients, {variant}: p99 {:.1} ms = no webhook + {added:.1} ms (<= +10 ms: {})",
                ms(v4.pct(0.99)),
                verdict(added <= 10.0)
            );
        }
        if let (Some(two), Some(one)) = (
            find(state, 32, "vm-dhcp 2 replicas"),
            find(state, 32, "vm-dhcp 1 replica"),
        ) {
            println!(
                "N={state}, 32 clients: 2 replicas {:.0}/s vs 1 replica {:.0}/s (2 >= 1: {})",
                two.rate(),
                one.rate(),
                verdict(two.rate() >= one.rate())
            );
        }
    }
    for variant in ["vm-dhcp 1 replica", "vm-dhcp 2 replicas"] {
        for clients in CLIENT_COUNTS {
            if let (Some(big), Some(small)) =
                (find(FILL, clients, variant), find(1000, clients, variant))
            {
                let d_rate = big.rate() / small.rate() - 1.0;
                let d_p99 = ms(big.pct(0.99)) / ms(small.pct(0.99)) - 1.0;
                println!(
                    "{variant}, {clients} clients: at {FILL} vs 1,000 allocations throughput {:+.0} %, p99 {:+.0} % (within 15 %: {})",
                    100.0 * d_rate,
                    100.0 * d_p99,
                    verdict(d_rate.abs() <= 0.15 && d_p99 <= 0.15)
                );
            }
        }
    }
}
