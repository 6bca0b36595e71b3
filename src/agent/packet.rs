//! One datagram through the agent: decode and decide (pure, in core), then count, record
//! and encode. No I/O here, so the whole path is tested without a socket.

use std::net::SocketAddrV4;
use std::sync::atomic::Ordering;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use vm_dhcp_core::dhcp::{LeaseEvent, Processed, Reply, message_type_label, process};

use super::AgentState;

/// A reply to send.
#[derive(Debug)]
pub struct Send {
    pub bytes: Vec<u8>,
    pub to: SocketAddrV4,
    pub kind: &'static str,
    /// For the dry-run log: the client and the address in the reply.
    pub mac: String,
    pub yiaddr: std::net::Ipv4Addr,
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Handles one received datagram; returns what to send, if anything.
pub fn handle(state: &AgentState, bytes: &[u8], now: u64) -> Option<Send> {
    let started = Instant::now();
    let out = handle_inner(state, bytes, now);
    state
        .metrics
        .handling_seconds
        .observe(started.elapsed().as_secs_f64());
    out
}

fn handle_inner(state: &AgentState, bytes: &[u8], now: u64) -> Option<Send> {
    let metrics = &state.metrics;
    let Some(table) = state.current_table() else {
        metrics.drop("no_table");
        return None;
    };
    let (message_type, decision) = match process(bytes, &table) {
        Processed::Malformed(why) => {
            metrics.drop("malformed");
            tracing::debug!(len = bytes.len(), "malformed datagram dropped: {why}");
            return None;
        }
        Processed::Handled {
            message_type,
            decision,
        } => (message_type, decision),
    };
    metrics.request(message_type_label(message_type));
    if !state.active.load(Ordering::Relaxed) {
        metrics.drop("standby");
        return None;
    }
    if let Some(event) = &decision.event {
        state.book().record(event, table.options().lease_time, now);
        if let LeaseEvent::Declined { mac, ip } = event {
            metrics.declines.inc();
            // Not routine traffic: another host answers for this address, and the
            // allocation is static, so the client will keep failing until someone acts.
            tracing::warn!(
                %mac, %ip,
                "DHCPDECLINE: {mac} reports {ip} already in use by another host (address conflict); find the host that holds {ip} on this network"
            );
        }
    }
    match &decision.reply {
        Reply::None(reason) => {
            if let Some(label) = reason.drop_reason() {
                metrics.drop(label);
            }
            tracing::debug!(?reason, "no reply");
            None
        }
        reply @ (Reply::Offer(out) | Reply::Ack(out) | Reply::Nak(out)) => {
            let kind = reply.kind();
            metrics.reply(kind);
            if matches!(reply, Reply::Nak(_)) {
                metrics.naks.inc();
            }
            tracing::debug!(
                kind,
                yiaddr = %out.packet.yiaddr,
                to = %out.destination.socket_addr(),
                state = ?decision.state,
                "reply"
            );
            let chaddr = &out.packet.chaddr;
            Some(Send {
                bytes: out.packet.encode(),
                to: out.destination.socket_addr(),
                kind,
                mac: format!(
                    "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
                    chaddr[0], chaddr[1], chaddr[2], chaddr[3], chaddr[4], chaddr[5]
                ),
                yiaddr: out.packet.yiaddr,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::net::Ipv4Addr;
    use std::sync::Arc;

    use dhcproto::v4::{DhcpOption, Message, MessageType};
    use dhcproto::{Encodable, Encoder};
    use proptest::prelude::*;
    use vm_dhcp_core::crd::IPPool;
    use vm_dhcp_core::dhcp::{LeaseState, LeaseTable};

    use super::*;

    const POOL: &str = r#"
metadata: {name: net-48, namespace: default}
spec:
  networkName: default/net-48
  ipv4Config:
    serverIP: 192.168.48.77
    cidr: 192.168.48.0/24
    pool: {start: 192.168.48.81, end: 192.168.48.90}
    router: 192.168.48.1
status:
  ipv4:
    allocated: {192.168.48.86: "C6:D6:82:39:D3:C3"}
    used: 1
    available: 9
"#;

    fn state() -> AgentState {
        let state = AgentState::new("test".into(), false);
        let pool: IPPool = serde_yaml::from_str(POOL).expect("pool");
        let table = LeaseTable::from_pool(&pool, &BTreeMap::new()).expect("table");
        state.table.send_replace(Some(Arc::new(table)));
        state
    }

    fn packet(mac: [u8; 6], t: MessageType) -> Vec<u8> {
        let mut msg = Message::new(
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
            &mac,
        );
        msg.opts_mut().insert(DhcpOption::MessageType(t));
        let mut buf = Vec::new();
        msg.encode(&mut Encoder::new(&mut buf)).expect("encodes");
        buf
    }

    const KNOWN: [u8; 6] = [0xc6, 0xd6, 0x82, 0x39, 0xd3, 0xc3];

    #[test]
    fn discover_is_answered_counted_and_recorded() {
        let state = state();
        let send = handle(&state, &packet(KNOWN, MessageType::Discover), 100).expect("offer");
        assert_eq!(send.kind, "offer");
        assert_eq!(send.to.to_string(), "255.255.255.255:68");
        let mac = "c6:d6:82:39:d3:c3".parse().expect("mac");
        assert_eq!(
            state.book().get(&mac).map(|a| a.state),
            Some(LeaseState::Offered)
        );
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &state.registry).expect("encode");
        assert!(
            text.contains(r#"vmdhcp_agent_requests_total{type="discover"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"vmdhcp_agent_replies_total{type="offer"} 1"#),
            "{text}"
        );
        assert!(
            text.contains("vmdhcp_agent_handling_seconds_count 1"),
            "{text}"
        );
    }

    #[test]
    fn unknown_mac_standby_and_no_table_are_drops() {
        let state = state();
        assert!(
            handle(
                &state,
                &packet([2, 0, 0, 0, 0, 1], MessageType::Discover),
                0
            )
            .is_none()
        );
        assert_eq!(state.metrics.drops("unknown_mac"), 1);

        state.active.store(false, Ordering::Relaxed);
        assert!(handle(&state, &packet(KNOWN, MessageType::Discover), 0).is_none());
        assert_eq!(state.metrics.drops("standby"), 1);

        let empty = AgentState::new("empty".into(), false);
        assert!(handle(&empty, &packet(KNOWN, MessageType::Discover), 0).is_none());
        assert_eq!(empty.metrics.drops("no_table"), 1);
    }

    #[test]
    fn decline_is_counted() {
        let state = state();
        let mut msg = Message::new(
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
            &KNOWN,
        );
        msg.opts_mut()
            .insert(DhcpOption::MessageType(MessageType::Decline));
        msg.opts_mut()
            .insert(DhcpOption::RequestedIpAddress(Ipv4Addr::new(
                192, 168, 48, 86,
            )));
        let mut buf = Vec::new();
        msg.encode(&mut Encoder::new(&mut buf)).expect("encodes");
        assert!(handle(&state, &buf, 5).is_none());
        assert_eq!(state.metrics.declines.get(), 1);
        assert_eq!(
            state.metrics.drops("declined"),
            0,
            "a DECLINE is not a drop"
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(500))]

        /// Garbage never panics the packet path and is counted as malformed.
        #[test]
        fn random_bytes_are_counted_as_malformed(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let state = state();
            let before = state.metrics.drops("malformed");
            let out = handle(&state, &bytes, 0);
            // Without the magic cookie at 236..240 it cannot be a DHCP message.
            if bytes.len() < 240 || bytes[236..240] != [99, 130, 83, 99] {
                prop_assert!(out.is_none());
                prop_assert_eq!(state.metrics.drops("malformed"), before + 1);
            }
        }

        #[test]
        fn mutated_discovers_never_panic(
            flips in proptest::collection::vec((0usize..300, any::<u8>()), 1..16),
            cut in 0usize..400,
        ) {
            let state = state();
            let mut bytes = packet(KNOWN, MessageType::Discover);
            for (at, value) in flips {
                let i = at % bytes.len();
                bytes[i] = value;
            }
            bytes.truncate(cut);
            let _ = handle(&state, &bytes, 0);
        }
    }
}
