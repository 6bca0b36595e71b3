//! IPAM speed and size. Targets: allocating every address of a /16 one at a
//! time and rebuilding a /16 from a 65,000-entry `allocated` map each under 20 ms, and under
//! 64 KiB of memory per /16 pool. Criterion prints the times; the memory is printed here.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::net::Ipv4Addr;

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use vm_dhcp_core::crd::{IPv4Config, Pool};
use vm_dhcp_core::store::{Holding, PoolIndex};
use vm_dhcp_core::{Ipam, PoolLayout};

fn slash16() -> PoolLayout {
    PoolLayout::from_config(&IPv4Config {
        cidr: "10.10.0.0/16".into(),
        server_ip: "10.10.0.1".into(),
        pool: Pool {
            start: "10.10.0.2".into(),
            end: "10.10.255.254".into(),
            exclude: None,
        },
        ..Default::default()
    })
    .expect("valid /16 layout")
}

fn allocated_map(n: u32) -> BTreeMap<String, String> {
    (0..n)
        .map(|i| {
            let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 10, 0, 2)) + i);
            let [_, _, a, b] = i.to_be_bytes();
            (ip.to_string(), format!("02:00:00:01:{a:02x}:{b:02x}"))
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let layout = slash16();
    let map = allocated_map(65_000);

    let mut full = Ipam::new(layout.clone()).expect("pool");
    while full.allocate_lowest().is_ok() {}
    let (rebuilt, issues) = Ipam::rebuild(layout.clone(), &map).expect("rebuild");
    assert!(issues.is_empty());
    println!(
        "memory per /16 pool: empty {} B, full {} B, rebuilt from 65,000 entries {} B (target < 65536 B)",
        Ipam::new(layout.clone()).expect("pool").memory_bytes(),
        full.memory_bytes(),
        rebuilt.memory_bytes()
    );

    let mut group = c.benchmark_group("ipam");
    group.sample_size(20);
    group.bench_function("allocate every address of a /16", |b| {
        b.iter(|| {
            let mut pool = Ipam::new(layout.clone()).expect("pool");
            let mut n = 0u32;
            while pool.allocate_lowest().is_ok() {
                n += 1;
            }
            black_box(n)
        })
    });
    group.bench_function("rebuild a /16 from 65,000 allocated entries", |b| {
        b.iter(|| black_box(Ipam::rebuild(layout.clone(), black_box(&map)).expect("rebuild")))
    });
    // The in-process part of an admission (target < 50 µs): choosing the address in a /16
    // index holding 60,000 allocations, and recording one (what the watch does).
    let mut index = PoolIndex::new(layout.clone()).expect("index");
    for (ip, mac) in allocated_map(60_000) {
        index.upsert(Holding {
            ip: ip.parse().expect("ip"),
            mac: mac.parse().expect("mac"),
            owner: Some("bench/vm".into()),
            static_: false,
            interface: None,
        });
    }
    group.bench_function(
        "pick the lowest free address in a /16 holding 60,000",
        |b| b.iter(|| black_box(index.lowest_free(|_| false).expect("room"))),
    );
    group.bench_function("pick the 500th free address (after lost races)", |b| {
        b.iter(|| black_box(index.nth_free(500, |_| false).expect("room")))
    });
    let next = index.lowest_free(|_| false).expect("room");
    group.bench_function("record one address object in the index", |b| {
        b.iter_batched_ref(
            || index.clone(),
            |index| {
                index.upsert(Holding {
                    ip: std::net::IpAddr::V4(next),
                    mac: "02:00:00:99:99:99".parse().expect("mac"),
                    owner: None,
                    static_: false,
                    interface: None,
                })
            },
            BatchSize::LargeInput,
        )
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
