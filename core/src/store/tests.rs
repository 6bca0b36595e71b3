use super::*;
use crate::crd::{IPv4Config, Pool};

fn layout(start: &str, end: &str, exclude: &[&str]) -> PoolLayout {
    PoolLayout::from_config(&IPv4Config {
        cidr: "10.0.0.0/16".into(),
        server_ip: "10.0.0.1".into(),
        router: Some("10.0.0.2".into()),
        pool: Pool {
            start: start.into(),
            end: end.into(),
            exclude: (!exclude.is_empty()).then(|| exclude.iter().map(|s| s.to_string()).collect()),
        },
        ..Default::default()
    })
    .expect("layout")
}

fn mac(n: u8) -> MacAddr {
    MacAddr([0x02, 0, 0, 0, 0, n])
}

fn holding(ip: &str, n: u8, owner: Option<&str>, static_: bool) -> Holding {
    Holding {
        ip: ip.parse().expect("ip"),
        mac: mac(n),
        owner: owner.map(String::from),
        static_,
        interface: None,
    }
}

#[test]
fn names_are_unambiguous_and_valid() {
    let v4: IpAddr = "10.0.0.5".parse().unwrap();
    assert_eq!(address_object_name("net-1", v4), "net-1.10.0.0.5");
    let v6: IpAddr = "fd00::1".parse().unwrap();
    assert_eq!(
        address_object_name("net-1", v6),
        "net-1.fd00-0000-0000-0000-0000-0000-0000-0001"
    );
    assert_eq!(
        claim_object_name("net-1", mac(7)),
        "net-1.02-00-00-00-00-07"
    );
    // A long pool name is shortened, never past 253 characters, and stays distinct.
    let long = "p".repeat(300);
    let a = address_object_name(&long, v4);
    assert!(a.len() <= 253 && a.ends_with(".10.0.0.5"), "{a}");
    assert_ne!(a, address_object_name(&format!("{long}x"), v4));
    let l = labels("net-1", "default/net-1", mac(7));
    assert_eq!(l[NETWORK_LABEL], "default.net-1");
    assert_eq!(l[MAC_LABEL], "02-00-00-00-00-07");
    assert_eq!(l[POOL_LABEL], "net-1");
}

#[test]
fn objects_round_trip_to_holdings() {
    let h = holding("10.0.0.9", 9, Some("default/vm"), true);
    let a = address_object("default", "net-1", "default/net-1", &h);
    assert_eq!(a.metadata.name.as_deref(), Some("net-1.10.0.0.9"));
    assert_eq!(holding_of_address(&a).unwrap(), h);
    let c = claim_object("default", "net-1", "default/net-1", &h, None);
    assert_eq!(c.metadata.name.as_deref(), Some("net-1.02-00-00-00-00-09"));
    assert_eq!(holding_of_claim(&c).unwrap(), h);
    let mut bad = a.clone();
    bad.spec.mac_address = "nope".into();
    let e = holding_of_address(&bad).unwrap_err();
    assert!(e.to_string().contains("net-1.10.0.0.9") && e.to_string().contains("macAddress"));
}

#[test]
fn index_picks_lowest_free_skipping_in_flight_and_frees_on_remove() {
    let mut ix = PoolIndex::new(layout("10.0.0.1", "10.0.0.6", &["10.0.0.4"])).unwrap();
    // .1 is the server, .2 the router, .4 excluded.
    assert_eq!(ix.lowest_free(|_| false).unwrap().to_string(), "10.0.0.3");
    ix.upsert(holding("10.0.0.3", 3, Some("ns/a"), false));
    assert_eq!(ix.lowest_free(|_| false).unwrap().to_string(), "10.0.0.5");
    let five: Ipv4Addr = "10.0.0.5".parse().unwrap();
    assert_eq!(
        ix.lowest_free(|ip| ip == five).unwrap().to_string(),
        "10.0.0.6"
    );
    ix.upsert(holding("10.0.0.5", 5, None, false));
    ix.upsert(holding("10.0.0.6", 6, None, false));
    assert!(matches!(
        ix.lowest_free(|_| false),
        Err(IpamError::Exhausted { .. })
    ));
    assert_eq!(
        ix.of_mac(mac(5)).map(|h| h.ip.to_string()).as_deref(),
        Some("10.0.0.5")
    );
    assert_eq!(
        ix.describe_holder("10.0.0.3".parse().unwrap()).as_deref(),
        Some("02:00:00:00:00:03 (owner ns/a)")
    );
    ix.remove("10.0.0.3".parse().unwrap());
    assert!(ix.of_mac(mac(3)).is_none());
    assert_eq!(ix.lowest_free(|_| false).unwrap().to_string(), "10.0.0.3");
    assert!(matches!(
        ix.check_static("10.0.0.4".parse().unwrap()),
        Err(IpamError::Excluded { .. })
    ));
    assert!(matches!(
        ix.check_static("10.0.0.5".parse().unwrap()),
        Err(IpamError::AlreadyAllocated { .. })
    ));
    assert!(ix.check_static("10.0.0.3".parse().unwrap()).is_ok());
    assert!(ix.check_static("fd00::1".parse().unwrap()).is_err());
}

#[test]
fn an_update_that_moves_the_mac_moves_the_index() {
    let mut ix = PoolIndex::new(layout("10.0.0.10", "10.0.0.20", &[])).unwrap();
    ix.upsert(holding("10.0.0.10", 1, None, false));
    ix.upsert(holding("10.0.0.10", 2, None, false));
    assert!(ix.of_mac(mac(1)).is_none());
    assert_eq!(ix.of_mac(mac(2)).unwrap().ip.to_string(), "10.0.0.10");
    assert_eq!(ix.len(), 1);
    assert_eq!(ix.ipam().used(), 1);
}

#[test]
fn projection_lists_marks_owners_statics_and_counts() {
    let mut ix = PoolIndex::new(layout("10.0.0.1", "10.0.0.10", &["10.0.0.9"])).unwrap();
    ix.upsert(holding("10.0.0.3", 3, Some("ns/a"), false));
    ix.upsert(holding("10.0.0.4", 4, Some("ns/b"), true));
    let p = ix.projection(PROJECTION_MAX_ENTRIES);
    assert!(p.listed);
    let allocated = p.ipv4.allocated.unwrap();
    assert_eq!(allocated["10.0.0.1"], MARK_RESERVED);
    assert_eq!(allocated["10.0.0.2"], MARK_RESERVED);
    assert_eq!(allocated["10.0.0.9"], MARK_EXCLUDED);
    assert_eq!(allocated["10.0.0.4"], "02:00:00:00:00:04");
    assert_eq!(p.ipv4.owners.unwrap()["10.0.0.3"], "ns/a");
    assert_eq!(p.ipv4.static_addresses, Some(vec!["10.0.0.4".to_string()]));
    assert_eq!((p.ipv4.used, p.ipv4.available), (2, 5));
    // Relayout keeps the holdings.
    let ix2 = ix
        .relayout(layout("10.0.0.1", "10.0.0.10", &["10.0.0.8", "10.0.0.9"]))
        .unwrap();
    assert_eq!(ix2.projection(PROJECTION_MAX_ENTRIES).ipv4.available, 4);
    assert_eq!(ix2.len(), 2);
}

#[test]
fn a_large_pool_projects_counts_only() {
    let mut ix = PoolIndex::new(layout("10.0.0.3", "10.0.255.254", &[])).unwrap();
    let base = u32::from(Ipv4Addr::new(10, 0, 0, 3));
    for i in 0..=(PROJECTION_MAX_ENTRIES as u32) {
        let b = (i + 1).to_be_bytes();
        ix.upsert(Holding {
            ip: IpAddr::V4(Ipv4Addr::from(base + i)),
            mac: MacAddr([0x02, 1, b[0], b[1], b[2], b[3]]),
            owner: None,
            static_: false,
            interface: None,
        });
    }
    let p = ix.projection(PROJECTION_MAX_ENTRIES);
    assert!(!p.listed);
    assert!(p.ipv4.allocated.is_none() && p.ipv4.owners.is_none());
    assert_eq!(p.ipv4.used, PROJECTION_MAX_ENTRIES as i64 + 1);
    assert_eq!(p.ipv4.used + p.ipv4.available, 65_532);
}

#[test]
fn a_status_to_migrate_gives_its_mac_entries_with_owners_and_statics() {
    let status = IPv4Status {
        allocated: Some(BTreeMap::from([
            ("10.0.0.1".to_string(), MARK_RESERVED.to_string()),
            ("10.0.0.3".to_string(), "02:00:00:00:00:03".to_string()),
            ("10.0.0.4".to_string(), "02:00:00:00:00:04".to_string()),
            ("garbage".to_string(), "02:00:00:00:00:05".to_string()),
        ])),
        owners: Some(BTreeMap::from([(
            "10.0.0.3".to_string(),
            "ns/a".to_string(),
        )])),
        static_addresses: Some(vec!["10.0.0.4".to_string()]),
        used: 2,
        available: 3,
    };
    let got = holdings_in_status(Some(&status));
    assert_eq!(
        got,
        vec![
            holding("10.0.0.3", 3, Some("ns/a"), false),
            holding("10.0.0.4", 4, None, true)
        ]
    );
    assert!(needs_migration(None, Some(&status)));
    let marked = BTreeMap::from([(STORE_ANNOTATION.to_string(), STORE_OBJECTS.to_string())]);
    assert!(!needs_migration(Some(&marked), Some(&status)));
    assert!(!needs_migration(None, None));
}

#[test]
fn half_made_finds_claims_without_addresses_and_addresses_without_claims() {
    let mut ix = PoolIndex::new(layout("10.0.0.10", "10.0.0.20", &[])).unwrap();
    ix.upsert(holding("10.0.0.10", 1, None, false)); // claimed: complete
    ix.upsert(holding("10.0.0.11", 2, None, false)); // no claim
    ix.upsert(holding("10.0.0.12", 4, None, false)); // claim names another address
    let claims = BTreeMap::from([
        (mac(1), "10.0.0.10".parse().unwrap()),
        (mac(3), "10.0.0.13".parse().unwrap()), // no address object
        (mac(4), "10.0.0.14".parse().unwrap()),
    ]);
    let got = half_made(ix.holdings(), &claims);
    let want = BTreeSet::from([
        HalfMade::Claim { mac: mac(3) },
        HalfMade::Claim { mac: mac(4) },
        HalfMade::Address {
            ip: "10.0.0.11".parse().unwrap(),
        },
        HalfMade::Address {
            ip: "10.0.0.12".parse().unwrap(),
        },
    ]);
    assert_eq!(got, want);
}
