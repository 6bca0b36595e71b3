use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;

use super::*;
use crate::crd::{IPv4Config, Pool};

fn config(cidr: &str, start: &str, end: &str, server: &str) -> IPv4Config {
    IPv4Config {
        cidr: cidr.into(),
        server_ip: server.into(),
        pool: Pool {
            start: start.into(),
            end: end.into(),
            exclude: None,
        },
        ..Default::default()
    }
}

fn ipam(cfg: &IPv4Config) -> Ipam {
    Ipam::new(PoolLayout::from_config(cfg).expect("valid layout")).expect("valid pool")
}

fn ip(text: &str) -> Ipv4Addr {
    text.parse().expect("test address")
}

#[test]
fn seed_sample_net_48() {
    let mut cfg = config(
        "192.168.48.0/24",
        "192.168.48.81",
        "192.168.48.90",
        "192.168.48.77",
    );
    cfg.router = Some("192.168.48.1".into());
    cfg.pool.exclude = Some(vec!["192.168.48.81".into(), "192.168.48.90".into()]);
    let mut pool = ipam(&cfg);
    // 81..=90 is ten addresses, two excluded; server and router are outside the range.
    assert_eq!((pool.used(), pool.available()), (0, 8));
    assert_eq!(pool.allocate_lowest(), Ok(ip("192.168.48.82")));
    assert_eq!(pool.state(ip("192.168.48.81")), AddrState::Excluded);
    assert_eq!((pool.used(), pool.available()), (1, 7));
}

#[test]
fn layout_errors_are_precise() {
    let cases: &[(IPv4Config, &str)] = &[
        (
            config("10.0.0.0/31", "10.0.0.0", "10.0.0.1", ""),
            "too small: a /31",
        ),
        (
            config("10.0.0.1/32", "10.0.0.1", "10.0.0.1", ""),
            "too small: a /32",
        ),
        (
            config("fd00::/64", "fd00::1", "fd00::9", ""),
            "IPv6 is not supported yet: cidr",
        ),
        (
            config("10.0.0.0/24", "fd00::1", "10.0.0.9", ""),
            "IPv6 is not supported yet: pool start",
        ),
        (
            config("10.0.0.0/24", "10.0.0.2", "10.0.0.9", "::1"),
            "IPv6 is not supported yet: serverIP",
        ),
        (
            config("10.0.0.0/33", "10.0.0.1", "10.0.0.9", ""),
            "not a valid IPv4 CIDR",
        ),
        (
            config("banana", "10.0.0.1", "10.0.0.9", ""),
            "not a valid IPv4 CIDR",
        ),
        (
            config("10.0.0.0/24", "10.0.1.1", "10.0.0.9", ""),
            "pool start 10.0.1.1 is not within subnet 10.0.0.0/24",
        ),
        (
            config("10.0.0.0/24", "10.0.0.1", "10.0.1.9", ""),
            "pool end 10.0.1.9 is not within subnet",
        ),
        (
            config("10.0.0.0/24", "10.0.0.9", "10.0.0.1", ""),
            "pool end 10.0.0.1 is less than pool start 10.0.0.9",
        ),
        (
            config("10.0.0.0/24", "10.0.0.1", "10.0.0.9", "10.0.1.1"),
            "serverIP 10.0.1.1 is not within subnet",
        ),
        (
            config("10.0.0.0/24", "10.0.0.1", "10.0.0.x", ""),
            "pool end \"10.0.0.x\" is not a valid IPv4 address",
        ),
        (
            config("10.0.0.0/24", "10.0.0.0", "10.0.0.0", ""),
            "holds no usable address",
        ),
        (
            config("10.0.0.0/24", "10.0.0.255", "10.0.0.255", ""),
            "holds no usable address",
        ),
    ];
    for (cfg, want) in cases {
        let err = PoolLayout::from_config(cfg).expect_err(want).to_string();
        assert!(err.contains(want), "got {err:?}, want {want:?}");
    }
    let mut bad_router = config("10.0.0.0/24", "10.0.0.1", "10.0.0.9", "");
    bad_router.router = Some("10.0.0.256".into());
    let err = PoolLayout::from_config(&bad_router)
        .expect_err("router")
        .to_string();
    assert!(err.contains("router \"10.0.0.256\""), "{err}");
    let mut bad_exclude = config("10.0.0.0/24", "10.0.0.1", "10.0.0.9", "");
    bad_exclude.pool.exclude = Some(vec!["10.0.0.3".into(), "nope".into()]);
    let err = PoolLayout::from_config(&bad_exclude)
        .expect_err("exclude")
        .to_string();
    assert!(err.contains("pool exclude entry \"nope\""), "{err}");
}

#[test]
fn slash_30_has_exactly_one_client_address() {
    let mut pool = ipam(&config("10.0.0.0/30", "10.0.0.0", "10.0.0.3", "10.0.0.1"));
    assert_eq!((pool.used(), pool.available()), (0, 1));
    assert_eq!(pool.allocate_lowest(), Ok(ip("10.0.0.2")));
    let err = pool.allocate_lowest().expect_err("full").to_string();
    assert!(
        err.contains("no free address left in pool range 10.0.0.0-10.0.0.3"),
        "{err}"
    );
    assert!(err.contains("1 allocated, 1 excluded or reserved"), "{err}");
}

#[test]
fn network_and_broadcast_are_never_handed_out() {
    let mut pool = ipam(&config("10.0.0.0/29", "10.0.0.0", "10.0.0.7", ""));
    let mut got = Vec::new();
    while let Ok(addr) = pool.allocate_lowest() {
        got.push(addr.to_string());
    }
    assert_eq!(
        got,
        [
            "10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4", "10.0.0.5", "10.0.0.6"
        ]
    );
    assert!(matches!(
        pool.check_static(ip("10.0.0.0")),
        Err(IpamError::NetworkAddress { .. })
    ));
    assert!(matches!(
        pool.check_static(ip("10.0.0.7")),
        Err(IpamError::BroadcastAddress { .. })
    ));
}

#[test]
fn static_errors_name_the_real_reason() {
    let mut cfg = config("10.0.0.0/24", "10.0.0.10", "10.0.0.20", "10.0.0.10");
    cfg.router = Some("10.0.0.11".into());
    cfg.pool.exclude = Some(vec!["10.0.0.12".into(), "10.0.0.200".into()]);
    let mut pool = ipam(&cfg);
    assert_eq!(pool.allocate_static(ip("10.0.0.15")), Ok(ip("10.0.0.15")));
    let cases = [
        ("10.0.0.12", "address 10.0.0.12 is excluded from the pool"),
        ("10.0.0.10", "address 10.0.0.10 is reserved"),
        ("10.0.0.11", "address 10.0.0.11 is reserved"),
        ("10.0.0.15", "address 10.0.0.15 is already allocated"),
        (
            "10.0.0.21",
            "address 10.0.0.21 is outside the pool range 10.0.0.10-10.0.0.20",
        ),
        (
            "10.0.1.1",
            "address 10.0.1.1 is not within subnet 10.0.0.0/24",
        ),
        ("10.0.0.255", "broadcast address"),
        ("10.0.0.0", "network address"),
    ];
    for (addr, want) in cases {
        let err = pool.allocate_static(ip(addr)).expect_err(addr).to_string();
        assert!(err.contains(want), "{addr}: got {err:?}, want {want:?}");
    }
    // Exclusions outside the range change nothing: 11 addresses, 3 blocked, 1 used.
    assert_eq!((pool.used(), pool.available()), (1, 7));
}

#[test]
fn lowest_free_after_release_and_release_errors() {
    let mut pool = ipam(&config("10.0.0.0/24", "10.0.0.1", "10.0.0.254", "10.0.0.1"));
    for _ in 0..100 {
        pool.allocate_lowest().expect("room");
    }
    pool.release(ip("10.0.0.7")).expect("allocated");
    pool.release(ip("10.0.0.50")).expect("allocated");
    assert_eq!(pool.allocate_lowest(), Ok(ip("10.0.0.7")));
    assert_eq!(pool.allocate_lowest(), Ok(ip("10.0.0.50")));
    assert_eq!(pool.allocate_lowest(), Ok(ip("10.0.0.102")));
    for addr in ["10.0.0.1", "10.0.0.200", "10.0.1.1"] {
        let err = pool.release(ip(addr)).expect_err(addr).to_string();
        assert_eq!(err, format!("address {addr} is not allocated"));
    }
}

#[test]
fn slash_16_fills_exactly() {
    let mut pool = ipam(&config(
        "10.1.0.0/16",
        "10.1.0.0",
        "10.1.255.255",
        "10.1.0.1",
    ));
    assert_eq!(pool.available(), 65_533);
    let mut last = None;
    while let Ok(addr) = pool.allocate_lowest() {
        last = Some(addr);
    }
    assert_eq!(last, Some(ip("10.1.255.254")));
    assert_eq!((pool.used(), pool.available()), (65_533, 0));
    assert!(pool.memory_bytes() < 64 * 1024, "{}", pool.memory_bytes());
}

#[test]
fn rebuild_reports_what_it_cannot_take_and_blocks_it() {
    let mut cfg = config("10.0.0.0/24", "10.0.0.10", "10.0.0.20", "10.0.0.10");
    cfg.pool.exclude = Some(vec!["10.0.0.12".into()]);
    let allocated: BTreeMap<String, String> = [
        ("10.0.0.10", "RESERVED"),
        ("10.0.0.12", "EXCLUDED"),
        ("10.0.0.99", "EXCLUDED"),
        ("10.0.0.13", "AA:BB:CC:DD:EE:01"),
        ("10.0.0.14", "SOMETHING"),
        ("10.0.0.30", "aa:bb:cc:dd:ee:02"),
        ("10.0.0.12x", "aa:bb:cc:dd:ee:03"),
        ("10.0.0.16", "RESERVED"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let (mut pool, issues) =
        Ipam::rebuild(PoolLayout::from_config(&cfg).expect("layout"), &allocated).expect("rebuild");
    let text: Vec<String> = issues.iter().map(ToString::to_string).collect();
    assert_eq!(
        text,
        [
            "allocated key \"10.0.0.12x\" is not an IPv4 address",
            "10.0.0.14 is marked \"SOMETHING\", which is neither a MAC address nor EXCLUDED/RESERVED; it stays blocked",
            "10.0.0.30 (aa:bb:cc:dd:ee:02) is outside the pool range",
        ]
    );
    assert_eq!(pool.state(ip("10.0.0.13")), AddrState::Allocated);
    assert_eq!(pool.state(ip("10.0.0.14")), AddrState::Excluded);
    assert_eq!(pool.state(ip("10.0.0.16")), AddrState::Reserved);
    // 11 slots: 10 reserved, 12 excluded, 13 used, 14 unknown, 16 reserved.
    assert_eq!((pool.used(), pool.available()), (1, 6));
    assert_eq!(pool.allocate_lowest(), Ok(ip("10.0.0.11")));
    assert_eq!(pool.allocate_lowest(), Ok(ip("10.0.0.15")));
    assert_eq!(pool.allocate_lowest(), Ok(ip("10.0.0.17")));
}

#[test]
fn mac_on_an_excluded_address_is_reported() {
    let mut cfg = config("10.0.0.0/24", "10.0.0.10", "10.0.0.20", "10.0.0.10");
    cfg.pool.exclude = Some(vec!["10.0.0.12".into()]);
    let allocated = BTreeMap::from([("10.0.0.12".to_string(), "aa:bb:cc:dd:ee:01".to_string())]);
    let (pool, issues) =
        Ipam::rebuild(PoolLayout::from_config(&cfg).expect("layout"), &allocated).expect("rebuild");
    assert_eq!(issues.len(), 1);
    assert!(issues[0].to_string().contains("excludes or reserves"));
    assert_eq!(pool.state(ip("10.0.0.12")), AddrState::Excluded);
}

/// One step of the property test; offsets index the /26 test pool.
#[derive(Debug, Clone)]
enum Op {
    Lowest,
    Static(u8),
    Release(u8),
    Rebuild,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => Just(Op::Lowest),
        2 => any::<u8>().prop_map(|o| Op::Static(o % 70)),
        3 => any::<u8>().prop_map(|o| Op::Release(o % 70)),
        1 => Just(Op::Rebuild),
    ]
}

proptest! {
    /// Random allocate/static/release/rebuild sequences never hand out one address twice
    /// and keep `used`/`available` exact against a plain model.
    #[test]
    fn never_double_assigns_and_counts_stay_exact(ops in proptest::collection::vec(op(), 1..300)) {
        let mut cfg = config("172.16.0.0/26", "172.16.0.0", "172.16.0.63", "172.16.0.1");
        cfg.router = Some("172.16.0.2".into());
        cfg.pool.exclude = Some(vec!["172.16.0.5".into(), "172.16.0.40".into(), "172.16.9.9".into()]);
        let layout = PoolLayout::from_config(&cfg).expect("layout");
        let mut pool = Ipam::new(layout.clone()).expect("pool");
        // 62 host addresses; server, router and two exclusions are blocked.
        let blocked: BTreeSet<Ipv4Addr> =
            ["172.16.0.1", "172.16.0.2", "172.16.0.5", "172.16.0.40"].map(ip).into();
        let hosts = 62u32;
        let mut model: BTreeSet<Ipv4Addr> = BTreeSet::new();
        for op in ops {
            match op {
                Op::Lowest => match pool.allocate_lowest() {
                    Ok(addr) => {
                        prop_assert!(!blocked.contains(&addr));
                        let lowest = (1..63).map(|o| Ipv4Addr::new(172, 16, 0, o))
                            .find(|a| !blocked.contains(a) && !model.contains(a));
                        prop_assert_eq!(Some(addr), lowest, "not the lowest free address");
                        prop_assert!(model.insert(addr), "{} handed out twice", addr);
                    }
                    Err(e) => {
                        prop_assert!(matches!(e, IpamError::Exhausted { .. }), "{}", e);
                        prop_assert_eq!(model.len() as u32 + blocked.len() as u32, hosts);
                    }
                },
                Op::Static(o) => {
                    let addr = Ipv4Addr::new(172, 16, 0, o);
                    let free = (1..=62).contains(&o) && !blocked.contains(&addr) && !model.contains(&addr);
                    let got = pool.allocate_static(addr);
                    prop_assert_eq!(got.is_ok(), free, "static {} gave {:?}", addr, got);
                    if free { model.insert(addr); }
                }
                Op::Release(o) => {
                    let addr = Ipv4Addr::new(172, 16, 0, o);
                    prop_assert_eq!(pool.release(addr).is_ok(), model.remove(&addr));
                }
                Op::Rebuild => {
                    let mut map: BTreeMap<String, String> = model.iter().enumerate()
                        .map(|(i, a)| (a.to_string(), format!("02:00:00:00:00:{:02x}", i)))
                        .collect();
                    map.insert("172.16.0.1".into(), "RESERVED".into());
                    map.insert("172.16.0.5".into(), "EXCLUDED".into());
                    map.insert("172.16.9.9".into(), "EXCLUDED".into());
                    let (rebuilt, issues) = Ipam::rebuild(layout.clone(), &map).expect("rebuild");
                    prop_assert!(issues.is_empty(), "{:?}", issues);
                    prop_assert_eq!(
                        rebuilt.taken().collect::<Vec<_>>(),
                        pool.taken().collect::<Vec<_>>()
                    );
                    pool = rebuilt;
                }
            }
            prop_assert_eq!(pool.used(), model.len() as u32);
            prop_assert_eq!(pool.available(), hosts - blocked.len() as u32 - model.len() as u32);
        }
    }
}
