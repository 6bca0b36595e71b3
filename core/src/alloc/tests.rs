use std::collections::BTreeMap;

use super::*;
use crate::crd::{IPv4Config, Pool};

fn layout() -> PoolLayout {
    PoolLayout::from_config(&IPv4Config {
        cidr: "10.0.0.0/24".into(),
        server_ip: "10.0.0.10".into(),
        pool: Pool {
            start: "10.0.0.10".into(),
            end: "10.0.0.20".into(),
            exclude: Some(vec!["10.0.0.12".into()]),
        },
        ..Default::default()
    })
    .expect("layout")
}

fn mac(n: u8) -> MacAddr {
    MacAddr([0x52, 0x54, 0, 0, 0, n])
}

fn req(owner: &str, m: u8, want: Option<&str>) -> AllocRequest {
    AllocRequest {
        owner: owner.into(),
        mac: MacChoice::Given(mac(m)),
        want: want.map(|w| w.parse().expect("ip")),
    }
}

fn empty() -> PoolBook {
    PoolBook::from_status(layout(), None).expect("book").0
}

#[test]
fn marks_are_written_and_counts_exact() {
    let book = empty();
    assert!(book.is_dirty(), "missing marks must be committed");
    let status = book.status();
    let map = status.allocated.expect("map");
    assert_eq!(map.get("10.0.0.10").map(String::as_str), Some("RESERVED"));
    assert_eq!(map.get("10.0.0.12").map(String::as_str), Some("EXCLUDED"));
    assert_eq!((status.used, status.available), (0, 9));
}

#[test]
fn same_owner_same_mac_is_idempotent() {
    let mut book = empty();
    let a = book.allocate(&req("ns/vm1", 1, None)).expect("first");
    assert_eq!((a.ip.to_string().as_str(), a.new), ("10.0.0.11", true));
    let b = book.allocate(&req("ns/vm1", 1, None)).expect("again");
    assert_eq!((b.ip, b.new), (a.ip, false));
    let c = book
        .allocate(&req("ns/vm1", 1, Some("10.0.0.11")))
        .expect("static same");
    assert_eq!(c.ip, a.ip);
    assert_eq!(book.status().used, 1);
}

#[test]
fn a_mac_bound_by_another_owner_is_refused_with_the_holder() {
    let mut book = empty();
    book.allocate(&req("ns/vm1", 1, None)).expect("first");
    let err = book
        .allocate(&req("ns/vm2", 1, None))
        .expect_err("conflict")
        .to_string();
    assert_eq!(
        err,
        "MAC address 52:54:00:00:00:01 is already bound to 10.0.0.11 in this network by ns/vm1"
    );
}

#[test]
fn static_errors_name_the_holder_or_reason() {
    let mut book = empty();
    book.allocate(&req("ns/vm1", 1, Some("10.0.0.15")))
        .expect("static");
    let err = book
        .allocate(&req("ns/vm2", 2, Some("10.0.0.15")))
        .expect_err("taken")
        .to_string();
    assert_eq!(
        err,
        "address 10.0.0.15 is already allocated to MAC 52:54:00:00:00:01 (owner ns/vm1)"
    );
    let err = book
        .allocate(&req("ns/vm2", 2, Some("10.0.0.12")))
        .expect_err("excl")
        .to_string();
    assert!(err.contains("excluded"), "{err}");
    let err = book
        .allocate(&req("ns/vm2", 2, Some("10.0.0.10")))
        .expect_err("resv")
        .to_string();
    assert!(err.contains("reserved"), "{err}");
    let err = book
        .allocate(&req("ns/vm2", 2, Some("10.0.0.99")))
        .expect_err("out")
        .to_string();
    assert!(err.contains("outside the pool range"), "{err}");
    let err = book
        .allocate(&req("ns/vm1", 1, Some("10.0.0.16")))
        .expect_err("other")
        .to_string();
    assert!(err.contains("already holds 10.0.0.15"), "{err}");
}

#[test]
fn allocate_all_is_all_or_nothing() {
    let mut book = empty();
    book.allocate(&req("ns/vm1", 1, Some("10.0.0.15")))
        .expect("static");
    let before = book.status();
    let err = book
        .allocate_all(&[req("ns/vm2", 2, None), req("ns/vm2", 3, Some("10.0.0.15"))])
        .expect_err("second fails");
    assert!(matches!(err, AllocError::AddressTaken { .. }));
    assert_eq!(
        book.status(),
        before,
        "the first NIC's allocation was undone"
    );
    assert!(book.lookup(mac(2)).is_none());
    let ok = book
        .allocate_all(&[req("ns/vm2", 2, None), req("ns/vm2", 3, None)])
        .expect("both");
    assert_eq!(ok.len(), 2);
    assert_eq!(book.status().used, 3);
}

#[test]
fn generated_macs_are_stable_local_and_avoid_other_owners() {
    let seed = mac_seed("ns", "vm1", "nic-1");
    assert_eq!(seed, mac_seed("ns", "vm1", "nic-1"));
    assert_ne!(seed, mac_seed("ns", "vm1", "nic-2"));
    let gen_req = |owner: &str| AllocRequest {
        owner: owner.into(),
        mac: MacChoice::Generate { seed },
        want: None,
    };
    let mut book = empty();
    let a = book.allocate(&gen_req("ns/vm1")).expect("generated");
    assert!(a.mac.is_locally_administered_unicast(), "{}", a.mac);
    let again = book.allocate(&gen_req("ns/vm1")).expect("same owner again");
    assert_eq!((again.mac, again.ip, again.new), (a.mac, a.ip, false));
    // Another owner with the same seed gets another MAC, not a conflict.
    let b = book.allocate(&gen_req("ns/other")).expect("other owner");
    assert_ne!(b.mac, a.mac);
    assert_ne!(b.ip, a.ip);
}

#[test]
fn go_era_allocations_without_owner_are_adopted_once() {
    let status = IPv4Status {
        allocated: Some(BTreeMap::from([
            ("10.0.0.10".to_string(), "RESERVED".to_string()),
            ("10.0.0.12".to_string(), "EXCLUDED".to_string()),
            ("10.0.0.13".to_string(), "52:54:00:00:00:07".to_string()),
        ])),
        owners: None,
        static_addresses: None,
        used: 1,
        available: 8,
    };
    let (mut book, issues) = PoolBook::from_status(layout(), Some(&status)).expect("book");
    assert!(issues.is_empty());
    assert!(
        !book.is_dirty(),
        "nothing to write for a complete Go-era status"
    );
    let a = book.allocate(&req("ns/vm7", 7, None)).expect("adopt");
    assert_eq!((a.ip.to_string().as_str(), a.new), ("10.0.0.13", false));
    assert!(book.is_dirty(), "the adoption is recorded");
    assert_eq!(book.lookup(mac(7)), Some((a.ip, Some("ns/vm7"))));
    let err = book
        .allocate(&req("ns/intruder", 7, None))
        .expect_err("now owned");
    assert!(matches!(err, AllocError::MacBoundElsewhere { .. }));
}

#[test]
fn exhaustion_is_reported_with_counts() {
    let mut book = empty();
    for n in 1..=9 {
        book.allocate(&req(&format!("ns/vm{n}"), n, None))
            .expect("room");
    }
    let err = book
        .allocate(&req("ns/vm10", 10, None))
        .expect_err("full")
        .to_string();
    assert!(
        err.contains("no free address left in pool range 10.0.0.10-10.0.0.20"),
        "{err}"
    );
}

#[test]
fn addresses_asked_for_are_listed_static_and_undone_with_the_request() {
    let mut book = empty();
    book.allocate(&req("ns/vm1", 1, None)).expect("dynamic");
    book.allocate(&req("ns/vm2", 2, Some("10.0.0.15")))
        .expect("static");
    // Asking again for the address the MAC holds is no new static allocation.
    book.allocate(&req("ns/vm1", 1, Some("10.0.0.11")))
        .expect("same");
    assert_eq!(
        book.status().static_addresses,
        Some(vec!["10.0.0.15".to_string()])
    );
    // All or nothing: the static one of a failing request is taken back.
    let err = book.allocate_all(&[
        req("ns/vm3", 3, Some("10.0.0.16")),
        req("ns/vm3", 4, Some("10.0.0.15")),
    ]);
    assert!(matches!(err, Err(AllocError::AddressTaken { .. })));
    assert_eq!(
        book.status().static_addresses,
        Some(vec!["10.0.0.15".to_string()])
    );
    // Read back from the status, the list is kept.
    let (again, _) = PoolBook::from_status(layout(), Some(&book.status())).expect("book");
    assert_eq!(
        again.status().static_addresses,
        book.status().static_addresses
    );
}

#[test]
fn a_stale_static_mark_never_makes_a_dynamic_allocation_static() {
    let mut status = empty().status();
    // 10.0.0.11 is marked static but nobody holds it (a hand edit, an older writer).
    status.static_addresses = Some(vec!["10.0.0.11".into()]);
    let (mut book, _) = PoolBook::from_status(layout(), Some(&status)).expect("book");
    assert_eq!(book.status().static_addresses, None, "dropped on read");
    let a = book.allocate(&req("ns/vm1", 1, None)).expect("dynamic");
    assert_eq!(a.ip.to_string(), "10.0.0.11");
    assert_eq!(book.status().static_addresses, None);
}

#[test]
fn a_go_era_allocation_adopted_by_its_static_ip_is_static() {
    let status = IPv4Status {
        allocated: Some(BTreeMap::from([(
            "10.0.0.13".to_string(),
            "52:54:00:00:00:07".to_string(),
        )])),
        owners: None,
        static_addresses: None,
        used: 1,
        available: 8,
    };
    let (mut book, _) = PoolBook::from_status(layout(), Some(&status)).expect("book");
    book.allocate(&req("ns/vm7", 7, Some("10.0.0.13")))
        .expect("adopted");
    assert_eq!(
        book.status().static_addresses,
        Some(vec!["10.0.0.13".to_string()])
    );
}
