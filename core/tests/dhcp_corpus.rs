//! The packet decoder and the reply decision against hostile input: every file of the
//! committed corpus (`core/tests/corpus/dhcp`, written by `scripts/dhcp-corpus.py`: malformed,
//! truncated and odd requests), then random mutations of them. Nothing panics, and whatever
//! the agent answers is sane: a BOOTREPLY to that very transaction, from our server
//! identifier, offering or acknowledging only the address the table holds for that MAC.
//!
//! Deterministic by default; a long run: `PROPTEST_CASES=1000000 cargo test --release -p
//! vm-dhcp-core --test dhcp_corpus` (`PROPTEST_RNG_SEED=<n>` for other inputs).

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;

use dhcproto::v4::{Message, Opcode};
use dhcproto::{Decodable, Decoder};
use proptest::prelude::*;
use proptest::test_runner::TestRunner;
use vm_dhcp_core::crd::IPPool;
use vm_dhcp_core::dhcp::{LeaseTable, Processed, Reply, process};
use vm_dhcp_core::mac::MacAddr;

#[allow(dead_code)]
#[path = "../../tests/support/fuzz_harness.rs"]
mod fuzz_harness;

const SEED_POOL: &str = include_str!("fixtures/seed-ippool.yaml");
const SERVER: Ipv4Addr = Ipv4Addr::new(192, 168, 48, 77);

/// The seed pool serving the corpus's known client and the captured clients' MAC.
fn table() -> LeaseTable {
    let pool: IPPool = serde_yaml::from_str(SEED_POOL).expect("seed pool");
    let held = [
        ("192.168.48.86", "02:00:5e:10:00:86"),
        ("192.168.48.87", "02:00:00:aa:bb:01"),
    ];
    LeaseTable::from_allocations(
        &pool,
        held.iter().map(|(ip, mac)| {
            (
                ip.parse::<IpAddr>().expect("ip"),
                mac.parse::<MacAddr>().expect("mac"),
            )
        }),
        &BTreeMap::new(),
    )
    .expect("servable")
}

fn corpus() -> Vec<(String, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/corpus/dhcp");
    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "bin"))
        .map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            (name, std::fs::read(e.path()).expect("corpus file"))
        })
        .collect();
    files.sort();
    assert!(files.len() >= 100, "the corpus lost files: {}", files.len());
    files
}

/// What the agent would do with `bytes`; fails (without panicking) when an answer breaks
/// an invariant.
fn check(bytes: &[u8], table: &LeaseTable) -> Result<Processed, String> {
    let processed = process(bytes, table);
    let Processed::Handled { decision, .. } = &processed else {
        return Ok(processed);
    };
    let Some(out) = decision.reply.outgoing() else {
        return Ok(processed);
    };
    let wire = out.packet.encode();
    let back = Message::decode(&mut Decoder::new(&wire))
        .map_err(|e| format!("our reply does not decode: {e}"))?;
    if back.opcode() != Opcode::BootReply {
        return Err("the reply is not a BOOTREPLY".into());
    }
    if wire[4..8] != bytes[4..8] {
        return Err("the reply's xid is not the request's".into());
    }
    if out.packet.option(54) != Some(&SERVER.octets()[..]) {
        return Err(format!(
            "server identifier {:?}, not ours",
            out.packet.option(54)
        ));
    }
    if wire.len() > 1500 {
        return Err(format!("a reply of {} bytes", wire.len()));
    }
    let mac = (out.packet.hlen == 6).then(|| {
        let mut m = [0u8; 6];
        m.copy_from_slice(&out.packet.chaddr[..6]);
        MacAddr(m)
    });
    let held = mac.and_then(|m| table.address_of(&m));
    let yiaddr = out.packet.yiaddr;
    match &decision.reply {
        Reply::Offer(_) if Some(yiaddr) != held => {
            Err(format!("offered {yiaddr} to {mac:?}, which holds {held:?}"))
        }
        Reply::Ack(_) if !yiaddr.is_unspecified() && Some(yiaddr) != held => Err(format!(
            "acknowledged {yiaddr} to {mac:?}, which holds {held:?}"
        )),
        Reply::Nak(_) if !yiaddr.is_unspecified() => Err(format!("a NAK with yiaddr {yiaddr}")),
        _ => Ok(processed),
    }
}

#[test]
fn every_corpus_packet_is_handled_as_its_name_says() {
    let table = table();
    let mut answered = 0;
    for (name, bytes) in corpus() {
        let processed = check(&bytes, &table).unwrap_or_else(|e| panic!("{name}: {e}"));
        match (&processed, name.split('-').next()) {
            (Processed::Malformed(_), Some("malformed")) => {}
            (other, Some("malformed")) => panic!("{name}: {other:?}, not malformed"),
            (Processed::Handled { decision, .. }, Some("silent")) => {
                assert!(
                    decision.reply.outgoing().is_none(),
                    "{name}: answered {:?}",
                    decision.reply
                );
            }
            (other, Some("silent")) => panic!("{name}: {other:?}, not decoded"),
            (Processed::Handled { decision, .. }, Some("any")) => {
                answered += usize::from(decision.reply.outgoing().is_some());
            }
            (_, Some("any")) => {}
            (_, prefix) => panic!("{name}: unknown prefix {prefix:?}"),
        }
    }
    // The corpus reaches the decision, not only the decoder.
    println!("{answered} corpus packets answered");
    assert!(
        answered >= 10,
        "only {answered} corpus packets were answered"
    );
}

/// One mutation of a corpus packet.
#[derive(Debug, Clone)]
enum Mutation {
    Set { at: usize, value: u8 },
    Truncate(usize),
    Insert { at: usize, bytes: Vec<u8> },
    Splice { other: usize, from: usize },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        4 => (any::<usize>(), any::<u8>()).prop_map(|(at, value)| Mutation::Set { at, value }),
        1 => any::<usize>().prop_map(Mutation::Truncate),
        2 => (any::<usize>(), proptest::collection::vec(any::<u8>(), 1..8))
            .prop_map(|(at, bytes)| Mutation::Insert { at, bytes }),
        1 => (any::<usize>(), any::<usize>()).prop_map(|(other, from)| Mutation::Splice { other, from }),
    ]
}

fn apply(bytes: &mut Vec<u8>, m: &Mutation, corpus: &[(String, Vec<u8>)]) {
    match m {
        Mutation::Set { at, value } if !bytes.is_empty() => {
            // Mostly where the decoder decides things: header, cookie, first options.
            let len = bytes.len().min(320);
            bytes[at % len] = *value;
        }
        Mutation::Set { .. } => {}
        Mutation::Truncate(at) => bytes.truncate(at % (bytes.len() + 1)),
        Mutation::Insert { at, bytes: more } => {
            let at = if bytes.len() > 240 {
                240 + at % (bytes.len() - 239)
            } else {
                at % (bytes.len() + 1)
            };
            bytes.splice(at..at, more.iter().copied());
        }
        Mutation::Splice { other, from } => {
            let other = &corpus[other % corpus.len()].1;
            let from = from % (other.len() + 1);
            let keep = bytes.len().min(240 + from % 64);
            bytes.truncate(keep);
            bytes.extend_from_slice(&other[from..]);
        }
    }
}

#[test]
fn mutated_corpus_packets_never_panic_nor_misanswer() {
    let table = table();
    let corpus = corpus();
    fuzz_harness::count_panics();
    fuzz_harness::reset_panics();
    let mut runner = TestRunner::new(fuzz_harness::config(3000, 0x0dc9_c0de));
    let n = corpus.len();
    let result = runner.run(
        &(0..n, proptest::collection::vec(mutation(), 1..6)),
        |(i, mutations)| {
            let mut bytes = corpus[i].1.clone();
            for m in &mutations {
                apply(&mut bytes, m, &corpus);
            }
            check(&bytes, &table).map_err(|e| {
                TestCaseError::fail(format!("{} mutated by {mutations:?}: {e}", corpus[i].0))
            })?;
            Ok(())
        },
    );
    if let Err(e) = result {
        panic!("{e}");
    }
    assert_eq!(fuzz_harness::panics(), 0, "the decoder panicked");
}
