//! Benchmark of the aggregated API through the real aggregator (not CI; `make
//! bench-apiserver`): one IPPool with 16,000 allocations (16,000 IPPoolAddress objects, as
//! the webhook writes them; the pool status stays empty), listed as kubectl and Steve ask
//! (JSON, Table, pages of 500), then 100 concurrent watchers receiving one new allocation.
//! Prints latency and size figures, and the engine's time for that one change (from the
//! server's `vm_dhcp_apiserver_source_apply_seconds`).

#[path = "../tests/apiserver/setup.rs"]
mod setup;

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures::{AsyncBufReadExt, StreamExt};
use kube::api::{Api, PostParams};
use serde_json::{Value, json};
use vm_dhcp_core::crd::{IPPool, IPPoolAddress};
use vm_dhcp_core::store::{Holding, address_object};
use vm_dhcp_e2e::ControlPlane;

const ALLOCATIONS: usize = 16_000;
const WATCHERS: usize = 100;
const ROUNDS: usize = 10;
/// Address objects created at once while filling the pool.
const CREATORS: usize = 32;

fn address(i: usize) -> String {
    // 10.200.0.10 onwards, in a /17.
    let n = 10 + i;
    format!("10.200.{}.{}", n / 256, n % 256)
}

fn mac(i: usize) -> String {
    format!(
        "02:00:00:{:02x}:{:02x}:{:02x}",
        i >> 16,
        (i >> 8) & 0xff,
        i & 0xff
    )
}

/// The IPPoolAddress of allocation `i` of pool `<ns>/big`.
fn allocation(ns: &str, i: usize) -> IPPoolAddress {
    let h = Holding {
        ip: address(i).parse().expect("ip"),
        mac: mac(i).parse().expect("mac"),
        owner: Some(format!("{ns}/vm-{i}")),
        static_: false,
        interface: Some("nic-1".into()),
    };
    address_object(ns, "big", &format!("{ns}/big"), &h)
}

/// The engine's apply histogram: (sum of seconds, count).
async fn apply_seconds(metrics_port: u16) -> Result<(f64, u64)> {
    let (code, text) = vm_dhcp_e2e::plain_get(metrics_port, "/metrics").await?;
    if code != 200 {
        bail!("/metrics: {code}");
    }
    let value = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse::<f64>().ok())
    };
    Ok((
        value("vm_dhcp_apiserver_source_apply_seconds_sum ").unwrap_or(0.0),
        value("vm_dhcp_apiserver_source_apply_seconds_count ").unwrap_or(0.0) as u64,
    ))
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

async fn timed_get(
    client: &kube::Client,
    path: &str,
    accept: &str,
) -> Result<(Duration, usize, Value)> {
    let req = http::Request::get(path)
        .header("Accept", accept)
        .body(Vec::new())?;
    let t0 = Instant::now();
    let text = client.request_text(req).await?;
    let elapsed = t0.elapsed();
    let doc: Value = serde_json::from_str(&text)?;
    Ok((elapsed, text.len(), doc))
}

async fn list_figures(client: &kube::Client, label: &str, path: &str, accept: &str) -> Result<()> {
    let mut times = Vec::new();
    let mut bytes = 0;
    for _ in 0..ROUNDS {
        let (t, b, doc) = timed_get(client, path, accept).await?;
        let n = doc["items"]
            .as_array()
            .or_else(|| doc["rows"].as_array())
            .map_or(0, Vec::len);
        if n != ALLOCATIONS {
            bail!("{label}: {n} items, expected {ALLOCATIONS}");
        }
        times.push(t);
        bytes = b;
    }
    times.sort();
    println!(
        "  {label:<28} p50 {:>9}  min {:>9}  max {:>9}  {:>6.2} MiB",
        ms(percentile(&times, 0.5)),
        ms(times[0]),
        ms(times[times.len() - 1]),
        bytes as f64 / (1024.0 * 1024.0)
    );
    Ok(())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let cp = ControlPlane::shared().await;
    let api = setup::start(cp, &[]).await?;
    println!(
        "vm-dhcp apiserver (release) on 127.0.0.1:{}, behind kube-apiserver's aggregator",
        api.port
    );
    let ns = cp.namespace("benchaggr").await;
    let client = cp.client().await;

    let pool: IPPool = serde_json::from_value(json!({
        "apiVersion": "network.harvesterhci.io/v1alpha1", "kind": "IPPool",
        "metadata": {"name": "big", "namespace": ns.name},
        "spec": {"networkName": format!("{}/big", ns.name), "ipv4Config": {
            "cidr": "10.200.0.0/17", "serverIP": "10.200.0.2",
            "pool": {"start": "10.200.0.10", "end": "10.200.127.250"}}}
    }))?;
    let pools: Api<IPPool> = Api::namespaced(client.clone(), &ns.name);
    pools.create(&PostParams::default(), &pool).await?;
    let objects: Api<IPPoolAddress> = Api::namespaced(client.clone(), &ns.name);
    let t0 = Instant::now();
    let created: Vec<Result<IPPoolAddress, kube::Error>> =
        futures::stream::iter((0..ALLOCATIONS).map(|i| {
            let objects = objects.clone();
            let obj = allocation(&ns.name, i);
            async move { objects.create(&PostParams::default(), &obj).await }
        }))
        .buffer_unordered(CREATORS)
        .collect()
        .await;
    if let Some(Err(e)) = created.into_iter().find(Result::is_err) {
        bail!("creating the address objects: {e}");
    }
    let filled = t0.elapsed();
    println!(
        "{ALLOCATIONS} IPPoolAddress objects created in {} ({CREATORS} at a time, {:.0}/s)",
        ms(filled),
        ALLOCATIONS as f64 / filled.as_secs_f64()
    );
    let path = format!(
        "/apis/dhcp.harvesterhci.io/v1alpha1/namespaces/{}/ipamallocations",
        ns.name
    );
    let deadline = Instant::now() + Duration::from_secs(120);
    let list_rv = loop {
        let (_, _, doc) = timed_get(&client, &path, "application/json").await?;
        if doc["items"].as_array().map_or(0, Vec::len) == ALLOCATIONS {
            break doc["metadata"]["resourceVersion"]
                .as_str()
                .context("list resourceVersion")?
                .to_string();
        }
        if Instant::now() > deadline {
            bail!(
                "the view never reached {ALLOCATIONS} objects:\n{}",
                api.log_tail(20)
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    println!(
        "view caught up {} after the last create answered",
        ms(t0.elapsed() - filled)
    );

    println!("list of {ALLOCATIONS} ipamallocations through the aggregator, {ROUNDS} rounds:");
    list_figures(&client, "JSON", &path, "application/json").await?;
    list_figures(
        &client,
        "Table (kubectl get)",
        &path,
        "application/json;as=Table;v=v1;g=meta.k8s.io,application/json",
    )
    .await?;
    list_figures(
        &client,
        "Table+Object (Steve)",
        &format!("{path}?includeObject=Object"),
        "application/json;as=Table;v=v1;g=meta.k8s.io",
    )
    .await?;
    // kubectl's default: pages of 500.
    let mut paged = Vec::new();
    for _ in 0..ROUNDS {
        let t0 = Instant::now();
        let mut next = String::new();
        let mut n = 0;
        let mut pages = 0;
        loop {
            let p = if next.is_empty() {
                format!("{path}?limit=500")
            } else {
                format!("{path}?limit=500&continue={next}")
            };
            let (_, _, doc) = timed_get(&client, &p, "application/json").await?;
            n += doc["items"].as_array().map_or(0, Vec::len);
            pages += 1;
            match doc["metadata"]["continue"].as_str() {
                Some(c) => next = c.to_string(),
                None => break,
            }
        }
        if n != ALLOCATIONS {
            bail!("paged list: {n} items in {pages} pages");
        }
        paged.push(t0.elapsed());
    }
    paged.sort();
    println!(
        "  {:<28} p50 {:>9}  min {:>9}  max {:>9}  (32 pages)",
        "JSON, limit=500 (all pages)",
        ms(percentile(&paged, 0.5)),
        ms(paged[0]),
        ms(paged[paged.len() - 1])
    );

    // 100 watchers from the list's version, then one new allocation.
    let mut streams = Vec::new();
    for _ in 0..WATCHERS {
        let req = http::Request::get(format!(
            "{path}?watch=true&resourceVersion={list_rv}&allowWatchBookmarks=true"
        ))
        .body(Vec::new())?;
        streams.push(client.request_stream(req).await?);
    }
    let new_ip = address(ALLOCATIONS);
    let mut tasks = tokio::task::JoinSet::new();
    let (go_tx, go_rx) = tokio::sync::watch::channel::<Option<Instant>>(None);
    for stream in streams {
        let want = new_ip.clone();
        let mut go = go_rx.clone();
        tasks.spawn(async move {
            let mut lines = stream.lines();
            let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
            loop {
                let line = tokio::time::timeout_at(deadline, lines.next()).await;
                let Ok(Some(Ok(line))) = line else {
                    return None;
                };
                if line.contains(&want) {
                    let started = go.wait_for(Option::is_some).await.ok().and_then(|s| *s)?;
                    return Some((started.elapsed(), line.len()));
                }
            }
        });
    }
    let (sum_before, count_before) = apply_seconds(api.metrics_port).await?;
    let t0 = Instant::now();
    go_tx.send_replace(Some(t0));
    objects
        .create(&PostParams::default(), &allocation(&ns.name, ALLOCATIONS))
        .await?;
    let write = t0.elapsed();
    let mut got = Vec::new();
    let mut bytes = 0;
    while let Some(done) = tasks.join_next().await {
        if let Ok(Some((t, b))) = done {
            got.push(t);
            bytes = b;
        }
    }
    got.sort();
    if got.is_empty() {
        bail!("no watcher saw the new allocation:\n{}", api.log_tail(20));
    }
    let (sum_after, count_after) = apply_seconds(api.metrics_port).await?;
    println!(
        "{WATCHERS} watchers through the aggregator, one new allocation (the IPPoolAddress create took {}):",
        ms(write)
    );
    println!(
        "  received by {}/{WATCHERS}; from the create: p50 {}  p99 {}  max {}; event {bytes} bytes",
        got.len(),
        ms(percentile(&got, 0.5)),
        ms(percentile(&got, 0.99)),
        ms(got[got.len() - 1])
    );
    println!(
        "  engine time for it, pool of {ALLOCATIONS}: {:.3} ms over {} batches (the object's event, the IPPool identity list that released it)",
        (sum_after - sum_before) * 1000.0,
        count_after - count_before
    );
    api.process.lock().unwrap_or_else(|e| e.into_inner()).kill();
    let _ = cp
        .kubectl(&["delete", "apiservice", setup::APISERVICE])
        .await;
    Ok(())
}
