//! Table tests of the lease table and the reply decision: every message type, client state
//! and option; plus a property test of the packet path.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use dhcproto::v4::{
    DhcpOption, Flags, HType, Message, MessageType, Opcode, OptionCode, UnknownOption,
};
use dhcproto::{Decodable, Decoder, Encodable, Encoder};
use proptest::prelude::*;

use super::decide::code;
use super::*;
use crate::crd::IPPool;
use crate::mac::MacAddr;

const SERVER: Ipv4Addr = Ipv4Addr::new(192, 168, 48, 77);
const ROUTER: Ipv4Addr = Ipv4Addr::new(192, 168, 48, 1);
const LEASED: Ipv4Addr = Ipv4Addr::new(192, 168, 48, 86);
const OTHER: Ipv4Addr = Ipv4Addr::new(192, 168, 48, 88);
const KNOWN: &str = "c6:d6:82:39:d3:c3";
const UPPER: &str = "FA:E7:60:2E:37:DD"; // stored upper-case in the pool
const UPPER_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 48, 87);
const STRANGER: &str = "02:00:00:00:00:99";

/// The seed README's net-48 pool with two allocations (one MAC in upper case).
const SEED_POOL: &str = r#"
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
    - pool.ntp.org
    - 17.253.116.253
    leaseTime: 300
  networkName: default/net-48
status:
  ipv4:
    allocated:
      192.168.48.81: EXCLUDED
      192.168.48.90: EXCLUDED
      192.168.48.77: RESERVED
      192.168.48.86: c6:d6:82:39:d3:c3
      192.168.48.87: FA:E7:60:2E:37:DD
    used: 2
    available: 6
"#;

fn pool_from(yaml: &str) -> IPPool {
    serde_yaml::from_str(yaml).expect("test pool is valid YAML")
}

fn resolved() -> BTreeMap<String, Vec<Ipv4Addr>> {
    BTreeMap::from([(
        "pool.ntp.org".to_string(),
        vec![Ipv4Addr::new(122, 117, 253, 246)],
    )])
}

fn seed_table() -> LeaseTable {
    LeaseTable::from_pool(&pool_from(SEED_POOL), &resolved()).expect("seed pool is servable")
}

fn table_with(edit: impl FnOnce(&mut IPPool)) -> Result<LeaseTable, TableError> {
    let mut pool = pool_from(SEED_POOL);
    edit(&mut pool);
    LeaseTable::from_pool(&pool, &resolved())
}

fn mac(text: &str) -> MacAddr {
    text.parse().expect("test MAC")
}

fn message(mac_text: &str, message_type: MessageType) -> Message {
    let mut msg = Message::new_with_id(
        0xdead_beef,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        &mac(mac_text).octets(),
    );
    msg.opts_mut().insert(DhcpOption::MessageType(message_type));
    msg
}

fn with_prl(mut msg: Message, codes: &[u8]) -> Message {
    msg.opts_mut().insert(DhcpOption::ParameterRequestList(
        codes.iter().map(|c| OptionCode::from(*c)).collect(),
    ));
    msg
}

fn discover(mac_text: &str) -> Message {
    message(mac_text, MessageType::Discover)
}

fn selecting(mac_text: &str, server: Ipv4Addr, requested: Ipv4Addr) -> Message {
    let mut msg = message(mac_text, MessageType::Request);
    msg.opts_mut().insert(DhcpOption::ServerIdentifier(server));
    msg.opts_mut()
        .insert(DhcpOption::RequestedIpAddress(requested));
    msg
}

fn init_reboot(mac_text: &str, requested: Ipv4Addr) -> Message {
    let mut msg = message(mac_text, MessageType::Request);
    msg.opts_mut()
        .insert(DhcpOption::RequestedIpAddress(requested));
    msg
}

fn renewing(mac_text: &str, ciaddr: Ipv4Addr) -> Message {
    let mut msg = message(mac_text, MessageType::Request);
    msg.set_ciaddr(ciaddr);
    msg
}

fn outgoing(decision: &Decision) -> &Outgoing {
    decision
        .reply
        .outgoing()
        .unwrap_or_else(|| panic!("expected a reply, got {:?}", decision.reply))
}

fn opt_u32(packet: &ReplyPacket, code: u8) -> Option<u32> {
    packet
        .option(code)
        .map(|d| u32::from_be_bytes(d.try_into().expect("4-byte option")))
}

fn opt_addrs(packet: &ReplyPacket, code: u8) -> Vec<Ipv4Addr> {
    packet
        .option(code)
        .map(|d| {
            d.chunks(4)
                .map(|c| Ipv4Addr::new(c[0], c[1], c[2], c[3]))
                .collect()
        })
        .unwrap_or_default()
}

/// Encodes a reply and decodes it with dhcproto, as a client would.
fn on_the_wire(packet: &ReplyPacket) -> Message {
    Message::decode(&mut Decoder::new(&packet.encode())).expect("reply decodes")
}

// ---------------------------------------------------------------- lease table

#[test]
fn seed_pool_options() {
    let table = seed_table();
    let o = table.options();
    assert_eq!(table.pool(), "default/net-48");
    assert_eq!(o.server_ip, SERVER);
    assert_eq!(o.subnet_mask(), Ipv4Addr::new(255, 255, 255, 0));
    assert_eq!(o.router, Some(ROUTER));
    assert_eq!(o.dns, vec![Ipv4Addr::new(1, 1, 1, 1)]);
    assert_eq!(o.domain_name.as_deref(), Some("aibao.moe"));
    assert_eq!(o.domain_search, vec!["aibao.moe".to_string()]);
    assert_eq!(o.domain_search_wire, b"\x05aibao\x03moe\x00");
    assert_eq!(
        o.ntp,
        vec![
            Ipv4Addr::new(122, 117, 253, 246),
            Ipv4Addr::new(17, 253, 116, 253)
        ]
    );
    assert_eq!(o.lease_time, 300);
    assert_eq!(o.renewal_time(), 150);
    assert_eq!(o.rebinding_time(), 262);
    assert_eq!(table.len(), 2, "EXCLUDED and RESERVED are not leases");
    assert!(table.issues().is_empty(), "{:?}", table.issues());
}

#[test]
fn macs_match_whatever_their_case() {
    let table = seed_table();
    assert_eq!(table.address_of(&mac("fa:e7:60:2e:37:dd")), Some(UPPER_IP));
    assert_eq!(table.address_of(&mac("C6:D6:82:39:D3:C3")), Some(LEASED));
    let d = decide(&table, &discover("fa:e7:60:2e:37:dd"));
    assert_eq!(outgoing(&d).packet.yiaddr, UPPER_IP);
}

#[test]
fn lease_time_defaults_to_an_hour() {
    for lease in [None, Some(0), Some(-5)] {
        let table = table_with(|p| {
            if let Some(c) = p.spec.ipv4_config.as_mut() {
                c.lease_time = lease;
            }
        })
        .expect("servable");
        assert_eq!(table.options().lease_time, DEFAULT_LEASE_TIME, "{lease:?}");
        assert_eq!(table.options().renewal_time(), 1800);
        assert_eq!(table.options().rebinding_time(), 3150);
    }
    let huge = table_with(|p| {
        if let Some(c) = p.spec.ipv4_config.as_mut() {
            c.lease_time = Some(i64::MAX);
        }
    })
    .expect("servable");
    assert_eq!(huge.options().lease_time, u32::MAX);
    assert_eq!(huge.options().rebinding_time(), 3_758_096_383);
}

#[test]
fn broken_allocations_are_skipped_and_reported() {
    let table = table_with(|p| {
        let allocated = p
            .status
            .as_mut()
            .and_then(|s| s.ipv4.as_mut())
            .and_then(|v| v.allocated.as_mut())
            .expect("seed has allocations");
        allocated.insert("not-an-ip".into(), "02:00:00:00:00:01".into());
        allocated.insert("192.168.48.83".into(), "zz:zz".into());
        allocated.insert("10.0.0.5".into(), "02:00:00:00:00:05".into());
        // Same MAC as .86 at a higher and a lower address (string order ≠ numeric order).
        allocated.insert("192.168.48.100".into(), KNOWN.into());
        allocated.insert("192.168.48.9".into(), KNOWN.to_uppercase());
    })
    .expect("servable");
    let issues: Vec<String> = table.issues().iter().map(|i| i.to_string()).collect();
    assert!(
        issues.iter().any(|i| i.contains("\"not-an-ip\"")),
        "{issues:?}"
    );
    assert!(issues.iter().any(|i| i.contains("\"zz:zz\"")), "{issues:?}");
    assert!(issues.iter().any(|i| i.contains("10.0.0.5")), "{issues:?}");
    assert_eq!(
        table
            .issues()
            .iter()
            .filter(|i| matches!(i, TableIssue::DuplicateMac { .. }))
            .count(),
        2
    );
    assert_eq!(
        table.address_of(&mac(KNOWN)),
        Some(Ipv4Addr::new(192, 168, 48, 9)),
        "the numerically lowest address wins"
    );
    assert_eq!(table.address_of(&mac("02:00:00:00:00:05")), None);
}

#[test]
fn unservable_pools_say_why() {
    let err = table_with(|p| p.spec.ipv4_config = None).expect_err("no config");
    assert!(err.to_string().contains("default/net-48"), "{err}");
    let err = table_with(|p| {
        if let Some(c) = p.spec.ipv4_config.as_mut() {
            c.server_ip = String::new();
        }
    })
    .expect_err("no server ip");
    assert!(err.to_string().contains("serverIP"), "{err}");
    let err = table_with(|p| {
        if let Some(c) = p.spec.ipv4_config.as_mut() {
            c.server_ip = "10.1.1.1".into();
        }
    })
    .expect_err("server outside");
    assert!(
        matches!(err, TableError::ServerOutsideSubnet { .. }),
        "{err}"
    );
    let err = table_with(|p| {
        if let Some(c) = p.spec.ipv4_config.as_mut() {
            c.cidr = "192.168.48.0/33".into();
        }
    })
    .expect_err("bad cidr");
    assert!(err.to_string().contains("192.168.48.0/33"), "{err}");
}

#[test]
fn bad_options_are_left_out_and_reported() {
    let table = table_with(|p| {
        if let Some(c) = p.spec.ipv4_config.as_mut() {
            c.router = Some("nope".into());
            c.dns = Some(vec!["1.1.1.1".into(), "dns.example".into()]);
            c.ntp = Some(vec!["unresolved.example".into(), "1.2.3".into()]);
            c.domain_name = Some("bad..name".into());
            c.domain_search = Some(vec!["ok.example".into(), "bücher.de".into()]);
        }
    })
    .expect("still servable");
    let o = table.options();
    assert_eq!(o.router, None);
    assert_eq!(o.dns, vec![Ipv4Addr::new(1, 1, 1, 1)]);
    assert!(o.ntp.is_empty());
    assert_eq!(o.domain_name, None);
    assert!(o.domain_search.is_empty() && o.domain_search_wire.is_empty());
    let issues: Vec<String> = table.issues().iter().map(|i| i.to_string()).collect();
    for needle in [
        "\"nope\"",
        "\"dns.example\"",
        "\"unresolved.example\"",
        "\"1.2.3\"",
        "domainName",
        "domainSearch",
    ] {
        assert!(
            issues.iter().any(|i| i.contains(needle)),
            "{needle}: {issues:?}"
        );
    }
    // Leases are still served.
    assert_eq!(table.address_of(&mac(KNOWN)), Some(LEASED));
}

#[test]
fn ntp_names_are_what_the_adapter_resolves() {
    let mut pool = pool_from(SEED_POOL);
    if let Some(c) = pool.spec.ipv4_config.as_mut() {
        c.ntp = Some(vec![
            "pool.ntp.org".into(),
            "10.0.0.1".into(),
            "time.example".into(),
            "pool.ntp.org".into(),
        ]);
    }
    assert_eq!(ntp_names(&pool), vec!["pool.ntp.org", "time.example"]);
    let table = LeaseTable::from_pool(&pool, &resolved()).expect("servable");
    assert_eq!(
        table.options().ntp,
        vec![
            Ipv4Addr::new(122, 117, 253, 246),
            Ipv4Addr::new(10, 0, 0, 1)
        ],
        "duplicates dropped, unresolved left out"
    );
    assert!(table.issues().contains(&TableIssue::UnresolvedNtp {
        name: "time.example".into()
    }));
}

#[test]
fn option_edits_change_the_table() {
    let before = seed_table();
    let after = table_with(|p| {
        if let Some(c) = p.spec.ipv4_config.as_mut() {
            c.dns = Some(vec!["9.9.9.9".into()]);
        }
    })
    .expect("servable");
    assert_ne!(before, after);
    let d = decide(&after, &renewing(KNOWN, LEASED));
    assert_eq!(
        opt_addrs(&outgoing(&d).packet, code::DNS),
        vec![Ipv4Addr::new(9, 9, 9, 9)]
    );
}

// ---------------------------------------------------------------- DISCOVER

#[test]
fn discover_gets_an_offer_with_every_option() {
    let table = seed_table();
    let mut msg = discover(KNOWN);
    msg.set_flags(Flags::default().set_broadcast());
    let d = decide(&table, &msg);
    let Reply::Offer(out) = &d.reply else {
        panic!("expected OFFER: {:?}", d.reply);
    };
    assert_eq!(
        d.event,
        Some(LeaseEvent::Offered {
            mac: mac(KNOWN),
            ip: LEASED
        })
    );
    assert_eq!(out.destination, Destination::Broadcast);
    assert_eq!(
        out.destination.socket_addr().to_string(),
        "255.255.255.255:68"
    );
    let p = &out.packet;
    assert_eq!(p.xid, 0xdead_beef);
    assert_eq!(p.flags, 0x8000);
    assert_eq!(p.yiaddr, LEASED);
    assert_eq!(p.ciaddr, Ipv4Addr::UNSPECIFIED);
    assert_eq!(p.siaddr, SERVER);
    assert_eq!(&p.chaddr[..6], &mac(KNOWN).octets());
    // No parameter request list: every configured option, in code order.
    assert_eq!(
        p.option_codes(),
        vec![53, 54, 51, 58, 59, 1, 3, 6, 15, 42, 119]
    );
    assert_eq!(p.option(code::MESSAGE_TYPE), Some(&[2u8][..]));
    assert_eq!(opt_addrs(p, code::SERVER_ID), vec![SERVER]);
    assert_eq!(opt_u32(p, code::LEASE_TIME), Some(300));
    assert_eq!(opt_u32(p, code::RENEWAL_TIME), Some(150));
    assert_eq!(opt_u32(p, code::REBINDING_TIME), Some(262));
    assert_eq!(
        opt_addrs(p, code::SUBNET_MASK),
        vec![Ipv4Addr::new(255, 255, 255, 0)]
    );
    assert_eq!(opt_addrs(p, code::ROUTER), vec![ROUTER]);
    assert_eq!(opt_addrs(p, code::DNS), vec![Ipv4Addr::new(1, 1, 1, 1)]);
    assert_eq!(p.option(code::DOMAIN_NAME), Some(&b"aibao.moe"[..]));
    assert_eq!(
        p.option(code::DOMAIN_SEARCH),
        Some(&b"\x05aibao\x03moe\x00"[..])
    );
    assert_eq!(opt_addrs(p, code::NTP).len(), 2);
}

#[test]
fn offer_decodes_as_a_client_sees_it() {
    let table = seed_table();
    let d = decide(&table, &with_prl(discover(KNOWN), &[1, 3, 6, 15, 119, 42]));
    let msg = on_the_wire(&outgoing(&d).packet);
    assert_eq!(msg.opcode(), Opcode::BootReply);
    assert_eq!(msg.xid(), 0xdead_beef);
    assert_eq!(msg.yiaddr(), LEASED);
    assert_eq!(msg.chaddr(), &mac(KNOWN).octets());
    assert_eq!(msg.opts().msg_type(), Some(MessageType::Offer));
    assert_eq!(
        msg.opts().get(OptionCode::DomainSearch),
        Some(&DhcpOption::DomainSearch(vec![
            "aibao.moe.".parse().expect("name")
        ]))
    );
    assert_eq!(
        msg.opts().get(OptionCode::DomainNameServer),
        Some(&DhcpOption::DomainNameServer(vec![Ipv4Addr::new(
            1, 1, 1, 1
        )]))
    );
    assert_eq!(
        msg.opts().get(OptionCode::AddressLeaseTime),
        Some(&DhcpOption::AddressLeaseTime(300))
    );
}

#[test]
fn unknown_mac_gets_silence() {
    let table = seed_table();
    for msg in [
        discover(STRANGER),
        init_reboot(STRANGER, LEASED),
        renewing(STRANGER, LEASED),
        selecting(STRANGER, SERVER, LEASED),
        message(STRANGER, MessageType::Inform),
    ] {
        let d = decide(&table, &msg);
        assert_eq!(d.reply, Reply::None(NoReply::UnknownMac(mac(STRANGER))));
        assert_eq!(d.event, None);
    }
    assert_eq!(
        NoReply::UnknownMac(mac(STRANGER)).drop_reason(),
        Some("unknown_mac")
    );
}

#[test]
fn relayed_discover_goes_back_to_the_relay() {
    let table = seed_table();
    let mut msg = discover(KNOWN);
    msg.set_giaddr(Ipv4Addr::new(192, 168, 48, 2));
    msg.set_hops(1);
    let d = decide(&table, &msg);
    let out = outgoing(&d);
    assert_eq!(
        out.destination,
        Destination::Relay(Ipv4Addr::new(192, 168, 48, 2))
    );
    assert_eq!(out.destination.socket_addr().to_string(), "192.168.48.2:67");
    assert_eq!(out.packet.giaddr, Ipv4Addr::new(192, 168, 48, 2));
    assert_eq!(out.packet.flags, 0, "flags are copied, not invented");
}

// ---------------------------------------------------------------- parameter request list

#[test]
fn requested_options_come_in_the_clients_order() {
    let table = seed_table();
    let d = decide(
        &table,
        &with_prl(discover(KNOWN), &[6, 15, 1, 119, 3, 42, 28, 12]),
    );
    assert_eq!(
        outgoing(&d).packet.option_codes(),
        vec![53, 54, 51, 58, 59, 6, 15, 1, 119, 3, 42],
        "unknown requests (28, 12) are skipped"
    );
}

#[test]
fn unrequested_options_are_left_out_but_mask_and_router_stay() {
    let table = seed_table();
    let d = decide(&table, &with_prl(discover(KNOWN), &[6]));
    assert_eq!(
        outgoing(&d).packet.option_codes(),
        vec![53, 54, 51, 58, 59, 6, 1, 3]
    );
    let d = decide(&table, &with_prl(discover(KNOWN), &[]));
    assert_eq!(
        outgoing(&d).packet.option_codes(),
        vec![53, 54, 51, 58, 59, 1, 3]
    );
}

#[test]
fn no_router_means_no_option_3_even_when_asked() {
    let table = table_with(|p| {
        if let Some(c) = p.spec.ipv4_config.as_mut() {
            c.router = None;
        }
    })
    .expect("servable");
    let d = decide(&table, &with_prl(discover(KNOWN), &[3, 1, 6]));
    assert_eq!(
        outgoing(&d).packet.option_codes(),
        vec![53, 54, 51, 58, 59, 1, 6]
    );
    let d = decide(&table, &discover(KNOWN));
    assert!(outgoing(&d).packet.option(code::ROUTER).is_none());
}

#[test]
fn empty_options_are_not_sent() {
    let table = table_with(|p| {
        if let Some(c) = p.spec.ipv4_config.as_mut() {
            c.dns = None;
            c.ntp = Some(vec![]);
            c.domain_name = None;
            c.domain_search = Some(vec![]);
        }
    })
    .expect("servable");
    let d = decide(&table, &with_prl(discover(KNOWN), &[6, 15, 42, 119]));
    assert_eq!(
        outgoing(&d).packet.option_codes(),
        vec![53, 54, 51, 58, 59, 1, 3]
    );
}

#[test]
fn client_identifier_is_echoed() {
    let table = seed_table();
    let mut msg = discover(KNOWN);
    let id = vec![1, 0xc6, 0xd6, 0x82, 0x39, 0xd3, 0xc3];
    msg.opts_mut()
        .insert(DhcpOption::ClientIdentifier(id.clone()));
    let d = decide(&table, &msg);
    assert_eq!(outgoing(&d).packet.option(code::CLIENT_ID), Some(&id[..]));
}

#[test]
fn replies_fit_the_clients_buffer() {
    let long_search: Vec<String> = (0..40)
        .map(|i| format!("zone{i:02}.example{i:02}.org"))
        .collect();
    let table = table_with(|p| {
        if let Some(c) = p.spec.ipv4_config.as_mut() {
            c.domain_search = Some(long_search.clone());
        }
    })
    .expect("servable");
    assert!(table.options().domain_search_wire.len() > 400);
    // Default buffer (576-byte datagrams): option 119 does not fit and goes, the rest stays.
    let d = decide(&table, &with_prl(discover(KNOWN), &[1, 3, 6, 15, 119]));
    let p = &outgoing(&d).packet;
    assert!(p.encode().len() <= 548, "{}", p.encode().len());
    assert_eq!(p.option_codes(), vec![53, 54, 51, 58, 59, 1, 3, 6, 15]);
    // A client that takes 1500-byte datagrams gets it, split over several option 119s.
    let mut msg = with_prl(discover(KNOWN), &[1, 3, 6, 15, 119]);
    msg.opts_mut().insert(DhcpOption::MaxMessageSize(1500));
    let d = decide(&table, &msg);
    let p = &outgoing(&d).packet;
    assert_eq!(
        p.option(119).map(<[u8]>::len),
        Some(table.options().domain_search_wire.len())
    );
    let decoded = on_the_wire(p);
    let Some(DhcpOption::DomainSearch(names)) = decoded.opts().get(OptionCode::DomainSearch) else {
        panic!("option 119 missing after decoding");
    };
    assert_eq!(
        names.len(),
        40,
        "RFC 3396 concatenation gives back every name"
    );
}

// ---------------------------------------------------------------- REQUEST

#[test]
fn selecting_our_offer_is_acked() {
    let table = seed_table();
    let d = decide(
        &table,
        &with_prl(selecting(KNOWN, SERVER, LEASED), &[1, 3, 6]),
    );
    let Reply::Ack(out) = &d.reply else {
        panic!("expected ACK: {:?}", d.reply);
    };
    assert_eq!(d.state, Some(ClientState::Selecting));
    assert_eq!(
        d.event,
        Some(LeaseEvent::Acked {
            mac: mac(KNOWN),
            ip: LEASED
        })
    );
    assert_eq!(out.destination, Destination::Broadcast);
    assert_eq!(out.packet.yiaddr, LEASED);
    assert_eq!(out.packet.option(code::MESSAGE_TYPE), Some(&[5u8][..]));
    assert_eq!(out.packet.option_codes(), vec![53, 54, 51, 58, 59, 1, 3, 6]);
}

#[test]
fn selecting_another_server_is_silence() {
    let table = seed_table();
    let elsewhere = Ipv4Addr::new(192, 168, 48, 5);
    for who in [KNOWN, STRANGER] {
        let d = decide(&table, &selecting(who, elsewhere, LEASED));
        assert_eq!(d.reply, Reply::None(NoReply::OtherServer(elsewhere)));
        assert_eq!(d.event, None);
    }
}

#[test]
fn selecting_a_wrong_address_is_naked() {
    let table = seed_table();
    let d = decide(&table, &selecting(KNOWN, SERVER, OTHER));
    assert!(matches!(d.reply, Reply::Nak(_)), "{:?}", d.reply);
    assert_eq!(d.state, Some(ClientState::Selecting));
}

#[test]
fn init_reboot_right_address_is_acked() {
    let table = seed_table();
    let d = decide(&table, &init_reboot(KNOWN, LEASED));
    assert_eq!(d.state, Some(ClientState::InitReboot));
    let Reply::Ack(out) = &d.reply else {
        panic!("expected ACK: {:?}", d.reply);
    };
    assert_eq!(out.packet.yiaddr, LEASED);
    assert_eq!(out.destination, Destination::Broadcast);
}

#[test]
fn init_reboot_wrong_address_is_naked_by_broadcast() {
    let table = seed_table();
    let d = decide(&table, &init_reboot(KNOWN, OTHER));
    assert_eq!(d.state, Some(ClientState::InitReboot));
    assert_eq!(
        d.event,
        Some(LeaseEvent::Naked {
            mac: mac(KNOWN),
            requested: Some(OTHER)
        })
    );
    let Reply::Nak(out) = &d.reply else {
        panic!("expected NAK: {:?}", d.reply);
    };
    assert_eq!(out.destination, Destination::Broadcast);
    let p = &out.packet;
    assert_eq!(p.yiaddr, Ipv4Addr::UNSPECIFIED);
    assert_eq!(p.ciaddr, Ipv4Addr::UNSPECIFIED);
    assert_eq!(p.siaddr, Ipv4Addr::UNSPECIFIED);
    assert_eq!(p.option_codes(), vec![53, 54, 56]);
    assert_eq!(p.option(code::MESSAGE_TYPE), Some(&[6u8][..]));
    assert_eq!(opt_addrs(p, code::SERVER_ID), vec![SERVER]);
    let text = String::from_utf8_lossy(p.option(code::MESSAGE).expect("message"));
    assert!(text.contains("192.168.48.88"), "{text}");
    assert_eq!(on_the_wire(p).opts().msg_type(), Some(MessageType::Nak));
}

#[test]
fn renewing_is_acked_by_unicast() {
    let table = seed_table();
    let d = decide(&table, &renewing(KNOWN, LEASED));
    assert_eq!(d.state, Some(ClientState::RenewingOrRebinding));
    let Reply::Ack(out) = &d.reply else {
        panic!("expected ACK: {:?}", d.reply);
    };
    assert_eq!(out.destination, Destination::Unicast(LEASED));
    assert_eq!(
        out.destination.socket_addr().to_string(),
        "192.168.48.86:68"
    );
    assert_eq!(
        out.packet.ciaddr, LEASED,
        "ciaddr from the REQUEST is echoed"
    );
    assert_eq!(out.packet.yiaddr, LEASED);
    assert_eq!(opt_u32(&out.packet, code::LEASE_TIME), Some(300));
}

#[test]
fn rebinding_with_broadcast_flag_still_goes_to_ciaddr() {
    // §4.1: a client with an address gets unicast, whatever its broadcast flag says.
    let table = seed_table();
    let mut msg = renewing(KNOWN, LEASED);
    msg.set_flags(Flags::default().set_broadcast());
    let d = decide(&table, &msg);
    assert_eq!(outgoing(&d).destination, Destination::Unicast(LEASED));
}

#[test]
fn renewing_the_wrong_address_is_naked_by_broadcast() {
    let table = seed_table();
    let d = decide(&table, &renewing(KNOWN, OTHER));
    let Reply::Nak(out) = &d.reply else {
        panic!("expected NAK: {:?}", d.reply);
    };
    assert_eq!(out.destination, Destination::Broadcast);
}

#[test]
fn nak_through_a_relay_sets_the_broadcast_bit() {
    let table = seed_table();
    let mut msg = init_reboot(KNOWN, OTHER);
    msg.set_giaddr(Ipv4Addr::new(192, 168, 48, 2));
    let d = decide(&table, &msg);
    let Reply::Nak(out) = &d.reply else {
        panic!("expected NAK: {:?}", d.reply);
    };
    assert_eq!(
        out.destination,
        Destination::Relay(Ipv4Addr::new(192, 168, 48, 2))
    );
    assert_eq!(out.packet.flags & 0x8000, 0x8000);
}

#[test]
fn request_matching_no_state_is_dropped() {
    let table = seed_table();
    let d = decide(&table, &message(KNOWN, MessageType::Request));
    assert_eq!(d.reply, Reply::None(NoReply::InvalidRequest));
}

// ---------------------------------------------------------------- RELEASE, DECLINE, INFORM

#[test]
fn release_is_recorded_without_a_reply() {
    let table = seed_table();
    let mut msg = message(KNOWN, MessageType::Release);
    msg.set_ciaddr(LEASED);
    msg.opts_mut().insert(DhcpOption::ServerIdentifier(SERVER));
    let d = decide(&table, &msg);
    assert_eq!(d.reply, Reply::None(NoReply::Released));
    assert_eq!(NoReply::Released.drop_reason(), None, "not a drop");
    assert_eq!(
        d.event,
        Some(LeaseEvent::Released {
            mac: mac(KNOWN),
            ip: LEASED
        })
    );

    msg.set_ciaddr(OTHER);
    let d = decide(&table, &msg);
    assert!(matches!(
        d.reply,
        Reply::None(NoReply::NotClientsAddress { .. })
    ));
    assert_eq!(d.event, None);

    msg.set_ciaddr(LEASED);
    msg.opts_mut()
        .insert(DhcpOption::ServerIdentifier(Ipv4Addr::new(192, 168, 48, 5)));
    assert!(matches!(
        decide(&table, &msg).reply,
        Reply::None(NoReply::OtherServer(_))
    ));
}

#[test]
fn decline_is_recorded_as_a_conflict() {
    let table = seed_table();
    let mut msg = message(KNOWN, MessageType::Decline);
    msg.opts_mut().insert(DhcpOption::ServerIdentifier(SERVER));
    msg.opts_mut()
        .insert(DhcpOption::RequestedIpAddress(LEASED));
    let d = decide(&table, &msg);
    assert_eq!(d.reply, Reply::None(NoReply::Declined));
    assert_eq!(
        d.event,
        Some(LeaseEvent::Declined {
            mac: mac(KNOWN),
            ip: LEASED
        })
    );

    msg.opts_mut().insert(DhcpOption::RequestedIpAddress(OTHER));
    assert!(matches!(
        decide(&table, &msg).reply,
        Reply::None(NoReply::NotClientsAddress { .. })
    ));
}

#[test]
fn inform_gets_options_without_a_lease() {
    let table = seed_table();
    let mut msg = with_prl(message(KNOWN, MessageType::Inform), &[6, 15, 1]);
    msg.set_ciaddr(LEASED);
    let d = decide(&table, &msg);
    let Reply::Ack(out) = &d.reply else {
        panic!("expected ACK: {:?}", d.reply);
    };
    assert_eq!(d.event, Some(LeaseEvent::Informed { mac: mac(KNOWN) }));
    assert_eq!(out.destination, Destination::Unicast(LEASED));
    let p = &out.packet;
    assert_eq!(p.yiaddr, Ipv4Addr::UNSPECIFIED);
    assert_eq!(p.ciaddr, LEASED);
    assert_eq!(p.option_codes(), vec![53, 54, 6, 15, 1, 3]);
    assert!(p.option(code::LEASE_TIME).is_none());
}

#[test]
fn other_message_types_and_odd_packets_are_dropped() {
    let table = seed_table();
    for t in [MessageType::Offer, MessageType::Ack, MessageType::Nak] {
        let d = decide(&table, &message(KNOWN, t));
        assert_eq!(
            d.reply,
            Reply::None(NoReply::UnsupportedMessageType(u8::from(t)))
        );
    }
    let mut reply = discover(KNOWN);
    reply.set_opcode(Opcode::BootReply);
    assert_eq!(
        decide(&table, &reply).reply,
        Reply::None(NoReply::NotBootRequest)
    );

    let mut bootp = discover(KNOWN);
    bootp.opts_mut().remove(OptionCode::MessageType);
    assert_eq!(
        decide(&table, &bootp).reply,
        Reply::None(NoReply::NoMessageType)
    );

    let mut token_ring = discover(KNOWN);
    token_ring.set_htype(HType::from(6));
    assert!(matches!(
        decide(&table, &token_ring).reply,
        Reply::None(NoReply::UnsupportedHardware { htype: 6, hlen: 6 })
    ));
    let mut long_hw = discover(KNOWN);
    long_hw.set_chaddr(&[1; 16]);
    assert!(matches!(
        decide(&table, &long_hw).reply,
        Reply::None(NoReply::UnsupportedHardware { hlen: 16, .. })
    ));
}

#[test]
fn request_type_labels() {
    assert_eq!(message_type_label(Some(MessageType::Discover)), "discover");
    assert_eq!(message_type_label(Some(MessageType::Request)), "request");
    assert_eq!(message_type_label(Some(MessageType::Release)), "release");
    assert_eq!(message_type_label(Some(MessageType::Decline)), "decline");
    assert_eq!(message_type_label(Some(MessageType::Inform)), "inform");
    assert_eq!(message_type_label(Some(MessageType::Offer)), "other");
    assert_eq!(message_type_label(None), "bootp");
}

// ---------------------------------------------------------------- packet path

fn encode(msg: &Message) -> Vec<u8> {
    let mut buf = Vec::new();
    msg.encode(&mut Encoder::new(&mut buf))
        .expect("test message encodes");
    buf
}

#[test]
fn process_sorts_garbage_from_messages() {
    let table = seed_table();
    assert_eq!(
        process(&[0u8; 100], &table),
        Processed::Malformed(Malformed::TooShort(100))
    );
    let mut bytes = encode(&discover(KNOWN));
    bytes[236] = 0;
    assert_eq!(
        process(&bytes, &table),
        Processed::Malformed(Malformed::BadCookie)
    );
    let Processed::Handled {
        message_type,
        decision,
    } = process(&encode(&discover(KNOWN)), &table)
    else {
        panic!("a DISCOVER is handled");
    };
    assert_eq!(message_type, Some(MessageType::Discover));
    assert!(matches!(decision.reply, Reply::Offer(_)));
}

/// A DISCOVER shaped like ISC dhclient 4.4's: its default parameter request list, a client
/// identifier and a host name.
fn dhclient_discover() -> Vec<u8> {
    let mut msg = with_prl(
        discover(KNOWN),
        &[1, 28, 2, 3, 15, 6, 119, 12, 44, 47, 26, 121, 42],
    );
    msg.opts_mut()
        .insert(DhcpOption::Unknown(UnknownOption::new(
            OptionCode::from(61),
            vec![1, 0xc6, 0xd6, 0x82, 0x39, 0xd3, 0xc3],
        )));
    msg.opts_mut().insert(DhcpOption::Hostname("vm-1".into()));
    encode(&msg)
}

/// Requests captured with tcpdump from ISC dhclient 4.4.3 (with a `request` list) and
/// busybox udhcpc 1.35 asking this agent for 192.168.48.86 from 192.168.48.77; chaddr is
/// rewritten to the pool's MAC so that they reach the whole decision.
const CAPTURED: [(&str, &[u8]); 4] = [
    (
        "dhclient DISCOVER",
        include_bytes!("testdata/dhclient-discover.bin"),
    ),
    (
        "dhclient REQUEST",
        include_bytes!("testdata/dhclient-request.bin"),
    ),
    (
        "udhcpc DISCOVER",
        include_bytes!("testdata/udhcpc-discover.bin"),
    ),
    (
        "udhcpc REQUEST",
        include_bytes!("testdata/udhcpc-request.bin"),
    ),
];

fn captured(bytes: &[u8]) -> Vec<u8> {
    let mut bytes = bytes.to_vec();
    bytes[28..34].copy_from_slice(&mac(KNOWN).octets());
    bytes
}

#[test]
fn captured_client_packets_get_the_right_answers() {
    let table = seed_table();
    let expected: [(&str, &[u8], Option<ClientState>); 4] = [
        // dhclient asked for 1,3,6,15,119,42,51,58,59: its order, lease times up front.
        ("offer", &[53, 54, 51, 58, 59, 1, 3, 6, 15, 119, 42], None),
        (
            "ack",
            &[53, 54, 51, 58, 59, 1, 3, 6, 15, 119, 42],
            Some(ClientState::Selecting),
        ),
        // udhcpc asked for 1,3,6,12,15,28,42,119 and sent a client identifier (61).
        (
            "offer",
            &[53, 54, 51, 58, 59, 1, 3, 6, 15, 42, 119, 61],
            None,
        ),
        (
            "ack",
            &[53, 54, 51, 58, 59, 1, 3, 6, 15, 42, 119, 61],
            Some(ClientState::Selecting),
        ),
    ];
    for ((name, bytes), (kind, codes, state)) in CAPTURED.iter().zip(expected) {
        let Processed::Handled { decision, .. } = process(&captured(bytes), &table) else {
            panic!("{name}: not decoded");
        };
        assert_eq!(decision.reply.kind(), kind, "{name}");
        assert_eq!(decision.state, state, "{name}");
        let out = outgoing(&decision);
        assert_eq!(out.packet.yiaddr, LEASED, "{name}");
        assert_eq!(out.destination, Destination::Broadcast, "{name}");
        assert_eq!(out.packet.option_codes(), codes, "{name}");
        assert_eq!(&out.packet.encode()[4..8], &bytes[4..8], "{name}: xid");
    }
}

fn seeds() -> Vec<Vec<u8>> {
    let mut renew = renewing(KNOWN, LEASED);
    renew.opts_mut().insert(DhcpOption::MaxMessageSize(1500));
    vec![
        captured(CAPTURED[0].1),
        captured(CAPTURED[1].1),
        captured(CAPTURED[2].1),
        captured(CAPTURED[3].1),
        dhclient_discover(),
        encode(&selecting(KNOWN, SERVER, LEASED)),
        encode(&init_reboot(KNOWN, OTHER)),
        encode(&renew),
        encode(&message(UPPER, MessageType::Inform)),
    ]
}

fn check_processed(bytes: &[u8], table: &LeaseTable) {
    match process(bytes, table) {
        Processed::Malformed(_) => {}
        Processed::Handled { decision, .. } => {
            if let Some(out) = decision.reply.outgoing() {
                // Whatever we answer is a well-formed reply to that very transaction.
                let wire = out.packet.encode();
                let back = Message::decode(&mut Decoder::new(&wire)).expect("our reply decodes");
                assert_eq!(back.opcode(), Opcode::BootReply);
                assert_eq!(&wire[4..8], &bytes[4..8], "xid copied");
                assert!(back.opts().msg_type().is_some());
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..700)) {
        let table = seed_table();
        check_processed(&bytes, &table);
        if bytes.len() < 240 {
            prop_assert_eq!(process(&bytes, &table), Processed::Malformed(Malformed::TooShort(bytes.len())));
        }
    }

    #[test]
    fn random_options_never_panic(
        seed in 0usize..9,
        options in proptest::collection::vec(
            (any::<u8>(), proptest::collection::vec(any::<u8>(), 0..8), any::<bool>()),
            0..24,
        ),
        end in any::<bool>(),
    ) {
        // A valid header followed by arbitrary option TLVs (some with lying lengths): every
        // option code reaches the decoder.
        let table = seed_table();
        let mut bytes = seeds()[seed][..240].to_vec();
        for (code, data, lie) in options {
            bytes.push(code);
            let len = if lie { data.len() as u8 ^ 0x03 } else { data.len() as u8 };
            bytes.push(len);
            bytes.extend_from_slice(&data);
        }
        if end {
            bytes.push(255);
        }
        check_processed(&bytes, &table);
    }

    #[test]
    fn mutated_real_packets_never_panic(
        seed in 0usize..9,
        flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..12),
        cut in proptest::option::of(any::<usize>()),
    ) {
        let table = seed_table();
        let mut bytes = seeds()[seed].clone();
        for (at, value) in flips {
            let i = at % bytes.len();
            bytes[i] = value;
        }
        if let Some(cut) = cut {
            bytes.truncate(cut % (bytes.len() + 1));
        }
        check_processed(&bytes, &table);
    }
}

#[test]
fn option_lengths_the_decoder_cannot_take_are_malformed() {
    let table = seed_table();
    let header = &encode(&discover(KNOWN))[..240];
    let with = |options: &[u8]| {
        let mut bytes = header.to_vec();
        bytes.extend_from_slice(&[53, 1, 1]);
        bytes.extend_from_slice(options);
        bytes.push(255);
        process(&bytes, &table)
    };
    for (options, code, len) in [
        (&[80u8, 1, 0][..], 80, 1),
        (&[81, 2, 0, 0][..], 81, 2),
        (&[81, 1, 0, 81, 1, 0][..], 81, 2), // joined per RFC 3396, still too short
        (&[94, 2, 0, 0][..], 94, 2),
        (&[151, 0][..], 151, 0),
        (&[153, 3, 0, 0, 0][..], 153, 3),
    ] {
        assert_eq!(
            with(options),
            Processed::Malformed(Malformed::BadOptionLength { code, len }),
            "{options:?}"
        );
    }
    for fine in [
        &[80u8, 0][..],
        &[81, 3, 0, 0, 0][..],
        &[81, 2, 0, 0, 81, 1, 0][..],
        &[94, 3, 1, 2, 0][..],
    ] {
        assert!(matches!(with(fine), Processed::Handled { .. }), "{fine:?}");
    }
}

// ---------------------------------------------------------------- lease book

#[test]
fn lease_book_follows_a_client() {
    let table = seed_table();
    let m = mac(KNOWN);
    let mut book = LeaseBook::new();
    let view = |book: &LeaseBook, now| {
        book.view(&table, now)
            .into_iter()
            .find(|v| v.mac == m)
            .expect("lease in view")
    };
    assert_eq!(view(&book, 0).state, LeaseState::StaticNeverSeen);
    assert_eq!(view(&book, 0).last_seen, None);

    book.record(&LeaseEvent::Offered { mac: m, ip: LEASED }, 300, 1000);
    assert_eq!(view(&book, 1000).state, LeaseState::Offered);

    book.record(&LeaseEvent::Acked { mac: m, ip: LEASED }, 300, 1001);
    let v = view(&book, 1100);
    assert_eq!(v.state, LeaseState::Bound);
    assert_eq!(
        (v.lease_start, v.expires, v.last_seen),
        (Some(1001), Some(1301), Some(1001))
    );
    assert_eq!(view(&book, 1301).state, LeaseState::Expired);

    book.record(&LeaseEvent::Declined { mac: m, ip: LEASED }, 300, 1400);
    book.record(&LeaseEvent::Declined { mac: m, ip: LEASED }, 300, 1410);
    let v = view(&book, 1410);
    assert_eq!((v.state, v.declines), (LeaseState::Declined, 2));

    book.record(&LeaseEvent::Released { mac: m, ip: LEASED }, 300, 1500);
    let v = view(&book, 1500);
    assert_eq!(
        (v.state, v.expires, v.declines),
        (LeaseState::Released, Some(1500), 2)
    );

    book.record(
        &LeaseEvent::Naked {
            mac: m,
            requested: Some(OTHER),
        },
        300,
        1600,
    );
    assert_eq!(view(&book, 1600).last_seen, Some(1600));

    // The allocation moves to another address: old activity is forgotten.
    let moved = table_with(|p| {
        let allocated = p
            .status
            .as_mut()
            .and_then(|s| s.ipv4.as_mut())
            .and_then(|v| v.allocated.as_mut())
            .expect("allocations");
        allocated.remove("192.168.48.86");
        allocated.insert("192.168.48.84".into(), KNOWN.into());
    })
    .expect("servable");
    book.retain_table(&moved);
    assert_eq!(book.get(&m), None);
    let v = book.view(&moved, 1700);
    assert!(v.iter().any(|l| l.mac == m
        && l.ip == Ipv4Addr::new(192, 168, 48, 84)
        && l.state == LeaseState::StaticNeverSeen));
}

#[test]
fn lease_state_names() {
    let names: Vec<&str> = [
        LeaseState::StaticNeverSeen,
        LeaseState::Offered,
        LeaseState::Bound,
        LeaseState::Expired,
        LeaseState::Released,
        LeaseState::Declined,
    ]
    .iter()
    .map(|s| s.as_str())
    .collect();
    assert_eq!(
        names,
        [
            "static-never-seen",
            "offered",
            "bound",
            "expired",
            "released",
            "declined"
        ]
    );
}

// ------------------------------------------------------------------ from_allocations

fn allocation(ip: &str, mac_text: &str) -> (std::net::IpAddr, MacAddr) {
    (ip.parse().expect("test IP"), mac(mac_text))
}

#[test]
fn allocations_not_the_status_make_the_table() {
    let pool = pool_from(SEED_POOL);
    // The status says KNOWN holds .86 and UPPER .87; the allocations say otherwise.
    let table = LeaseTable::from_allocations(
        &pool,
        [
            allocation("192.168.48.88", KNOWN),
            allocation("192.168.48.84", STRANGER),
        ],
        &resolved(),
    )
    .expect("servable");
    assert_eq!(table.address_of(&mac(KNOWN)), Some(OTHER));
    assert_eq!(
        table.address_of(&mac(STRANGER)),
        Some(Ipv4Addr::new(192, 168, 48, 84))
    );
    assert_eq!(table.address_of(&mac(UPPER)), None, "status only");
    assert_eq!(table.len(), 2);
    assert!(table.issues().is_empty(), "{:?}", table.issues());
    // The options are the spec's, exactly as the offline table reads them.
    assert_eq!(table.options(), seed_table().options());
    assert_eq!(table.pool(), "default/net-48");

    let empty = LeaseTable::from_allocations(&pool, [], &resolved()).expect("servable");
    assert!(empty.is_empty());
}

#[test]
fn allocations_the_spec_keeps_from_clients_are_left_out_and_reported() {
    let table = LeaseTable::from_allocations(
        &pool_from(SEED_POOL),
        [
            allocation("192.168.48.77", "02:00:00:00:00:01"), // serverIP
            allocation("192.168.48.1", "02:00:00:00:00:02"),  // router
            allocation("192.168.48.81", "02:00:00:00:00:03"), // excluded
            allocation("10.0.0.5", "02:00:00:00:00:04"),      // outside the cidr
            allocation("fd00::5", "02:00:00:00:00:05"),       // not IPv4
            // One MAC, two addresses: the lower is served, whatever the order.
            allocation("192.168.48.89", KNOWN),
            allocation("192.168.48.83", KNOWN),
            allocation("192.168.48.86", UPPER),
        ],
        &resolved(),
    )
    .expect("servable");
    assert_eq!(
        table.leases(),
        vec![
            (mac(KNOWN), Ipv4Addr::new(192, 168, 48, 83)),
            (mac(UPPER), LEASED),
        ]
    );
    let issues = table.issues();
    for (ip, why) in [
        (SERVER, Blocked::ServerIp),
        (ROUTER, Blocked::Router),
        (Ipv4Addr::new(192, 168, 48, 81), Blocked::Excluded),
    ] {
        assert!(
            issues.iter().any(
                |i| matches!(i, TableIssue::Blocked { ip: b, why: w, .. } if *b == ip && *w == why)
            ),
            "{ip} {why}: {issues:?}"
        );
    }
    assert!(
        issues
            .iter()
            .any(|i| matches!(i, TableIssue::OutsideSubnet { .. })),
        "{issues:?}"
    );
    assert!(
        issues
            .iter()
            .any(|i| matches!(i, TableIssue::NotIpv4 { .. })),
        "{issues:?}"
    );
    assert!(
        issues.contains(&TableIssue::DuplicateMac {
            mac: mac(KNOWN),
            served: Ipv4Addr::new(192, 168, 48, 83),
            ignored: Ipv4Addr::new(192, 168, 48, 89),
        }),
        "{issues:?}"
    );
    let text: Vec<String> = issues.iter().map(ToString::to_string).collect();
    assert!(
        text.iter()
            .any(|t| t.contains("192.168.48.81") && t.contains("exclude")),
        "{text:?}"
    );
    assert!(
        text.iter()
            .any(|t| t.contains("192.168.48.77") && t.contains("serverIP")),
        "{text:?}"
    );
}

#[test]
fn allocations_over_an_unservable_spec_say_why() {
    let mut pool = pool_from(SEED_POOL);
    pool.spec.ipv4_config = None;
    let err =
        LeaseTable::from_allocations(&pool, [allocation("192.168.48.86", KNOWN)], &resolved())
            .expect_err("no config");
    assert!(matches!(err, TableError::NoIpv4Config { .. }), "{err}");
}
