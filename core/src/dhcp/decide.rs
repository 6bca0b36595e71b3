//! The reply decision: (lease table, request) → what to answer and where to send it, as
//! RFC 2131 says. Pure: the adapter owns the socket, the clock and the counters.
//!
//! Allocation happens at admission (the webhook), never here: a client the pool has no
//! allocation for gets silence, and so does a REQUEST that names another server.

use std::net::{Ipv4Addr, SocketAddrV4};

use dhcproto::v4::{DhcpOption, HType, Message, MessageType, Opcode, OptionCode};
use dhcproto::{Decodable, Decoder};

use super::table::{LeaseTable, PoolOptions};
use super::wire::{
    BROADCAST_FLAG, DEFAULT_MAX_MESSAGE_LEN, FIXED_HEADER_LEN, MAGIC_COOKIE, ReplyPacket,
};
use crate::mac::MacAddr;

pub const SERVER_PORT: u16 = 67;
pub const CLIENT_PORT: u16 = 68;

/// Option codes the agent writes.
pub mod code {
    pub const SUBNET_MASK: u8 = 1;
    pub const ROUTER: u8 = 3;
    pub const DNS: u8 = 6;
    pub const DOMAIN_NAME: u8 = 15;
    pub const NTP: u8 = 42;
    pub const LEASE_TIME: u8 = 51;
    pub const MESSAGE_TYPE: u8 = 53;
    pub const SERVER_ID: u8 = 54;
    pub const MESSAGE: u8 = 56;
    pub const RENEWAL_TIME: u8 = 58;
    pub const REBINDING_TIME: u8 = 59;
    pub const CLIENT_ID: u8 = 61;
    pub const DOMAIN_SEARCH: u8 = 119;
}

/// Options that stay in a reply however small the client's buffer: what a client cannot
/// configure itself without (RFC 2131 §4.3.1 and the agent's contract: mask, router, lease,
/// server id), T1/T2 that go with the lease, and the client identifier RFC 6842 requires.
const MANDATORY: [u8; 8] = [
    code::MESSAGE_TYPE,
    code::SERVER_ID,
    code::LEASE_TIME,
    code::RENEWAL_TIME,
    code::REBINDING_TIME,
    code::SUBNET_MASK,
    code::ROUTER,
    code::CLIENT_ID,
];

/// The configuration options a pool can carry, in code order (used when a client sends no
/// parameter request list).
const CONFIG_CODES: [u8; 6] = [
    code::SUBNET_MASK,
    code::ROUTER,
    code::DNS,
    code::DOMAIN_NAME,
    code::NTP,
    code::DOMAIN_SEARCH,
];

/// Where a reply goes (RFC 2131 §4.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Destination {
    /// `giaddr` was set: back to the relay agent, port 67.
    Relay(Ipv4Addr),
    /// The client has an address (`ciaddr`): unicast to it, port 68.
    Unicast(Ipv4Addr),
    /// 255.255.255.255:68. For a client without an address we broadcast even when its
    /// broadcast flag is clear: unicasting to `yiaddr` would need an ARP entry installed
    /// first, and broadcast works with every client (upstream does the same).
    Broadcast,
}

impl Destination {
    pub fn socket_addr(self) -> SocketAddrV4 {
        match self {
            Destination::Relay(ip) => SocketAddrV4::new(ip, SERVER_PORT),
            Destination::Unicast(ip) => SocketAddrV4::new(ip, CLIENT_PORT),
            Destination::Broadcast => SocketAddrV4::new(Ipv4Addr::BROADCAST, CLIENT_PORT),
        }
    }
}

/// A reply ready to encode and send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outgoing {
    pub packet: ReplyPacket,
    pub destination: Destination,
}

/// Why nothing is sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NoReply {
    /// A BOOTREPLY or unknown op code: servers only answer clients.
    NotBootRequest,
    /// Not Ethernet with 6-byte addresses: the pool's allocations are Ethernet MACs.
    UnsupportedHardware { htype: u8, hlen: u8 },
    /// A BOOTP request without option 53.
    NoMessageType,
    /// A message type a server does not answer (OFFER, ACK, lease query, …).
    UnsupportedMessageType(u8),
    /// No allocation for this MAC in the pool (allocation happens at admission).
    UnknownMac(MacAddr),
    /// The client chose (or talks to) another server.
    OtherServer(Ipv4Addr),
    /// A REQUEST with no server identifier, no requested address and no ciaddr matches no
    /// client state of RFC 2131 §4.3.2.
    InvalidRequest,
    /// A RELEASE or DECLINE about an address the client does not hold here.
    NotClientsAddress {
        mac: MacAddr,
        claimed: Ipv4Addr,
        held: Ipv4Addr,
    },
    /// RELEASE recorded (RELEASE has no reply).
    Released,
    /// DECLINE recorded (DECLINE has no reply).
    Declined,
}

impl NoReply {
    /// The `reason` label of the drop counter, or `None` when the message was handled and a
    /// reply is simply not part of the protocol (RELEASE, DECLINE).
    pub fn drop_reason(&self) -> Option<&'static str> {
        Some(match self {
            NoReply::NotBootRequest => "not_boot_request",
            NoReply::UnsupportedHardware { .. } => "unsupported_hardware",
            NoReply::NoMessageType => "no_message_type",
            NoReply::UnsupportedMessageType(_) => "unsupported_message_type",
            NoReply::UnknownMac(_) => "unknown_mac",
            NoReply::OtherServer(_) => "other_server",
            NoReply::InvalidRequest => "invalid_request",
            NoReply::NotClientsAddress { .. } => "not_clients_address",
            NoReply::Released | NoReply::Declined => return None,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Offer(Outgoing),
    Ack(Outgoing),
    Nak(Outgoing),
    None(NoReply),
}

impl Reply {
    pub fn outgoing(&self) -> Option<&Outgoing> {
        match self {
            Reply::Offer(o) | Reply::Ack(o) | Reply::Nak(o) => Some(o),
            Reply::None(_) => None,
        }
    }

    /// The `type` label of the reply counter.
    pub fn kind(&self) -> &'static str {
        match self {
            Reply::Offer(_) => "offer",
            Reply::Ack(_) => "ack",
            Reply::Nak(_) => "nak",
            Reply::None(_) => "none",
        }
    }
}

/// The client state a REQUEST reveals (RFC 2131 §4.3.2). RENEWING (unicast) and REBINDING
/// (broadcast) look the same in the message and get the same answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientState {
    Selecting,
    InitReboot,
    RenewingOrRebinding,
}

/// What the agent learns about a lease from a message, for its lease book.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseEvent {
    Offered {
        mac: MacAddr,
        ip: Ipv4Addr,
    },
    Acked {
        mac: MacAddr,
        ip: Ipv4Addr,
    },
    Naked {
        mac: MacAddr,
        requested: Option<Ipv4Addr>,
    },
    Released {
        mac: MacAddr,
        ip: Ipv4Addr,
    },
    /// The client found the address in use by another host (RFC 2131 §4.4.1): an address
    /// conflict an operator has to resolve, because the allocation is static.
    Declined {
        mac: MacAddr,
        ip: Ipv4Addr,
    },
    Informed {
        mac: MacAddr,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub reply: Reply,
    pub event: Option<LeaseEvent>,
    /// Set for REQUESTs.
    pub state: Option<ClientState>,
}

impl Decision {
    fn none(reason: NoReply) -> Self {
        Decision {
            reply: Reply::None(reason),
            event: None,
            state: None,
        }
    }
}

/// The `type` label of the request counter.
pub fn message_type_label(message_type: Option<MessageType>) -> &'static str {
    match message_type {
        Some(MessageType::Discover) => "discover",
        Some(MessageType::Request) => "request",
        Some(MessageType::Decline) => "decline",
        Some(MessageType::Release) => "release",
        Some(MessageType::Inform) => "inform",
        Some(_) => "other",
        None => "bootp",
    }
}

fn server_identifier(msg: &Message) -> Option<Ipv4Addr> {
    match msg.opts().get(OptionCode::ServerIdentifier) {
        Some(DhcpOption::ServerIdentifier(ip)) => Some(*ip),
        _ => None,
    }
}

fn requested_ip(msg: &Message) -> Option<Ipv4Addr> {
    match msg.opts().get(OptionCode::RequestedIpAddress) {
        Some(DhcpOption::RequestedIpAddress(ip)) => Some(*ip),
        _ => None,
    }
}

fn nonzero(ip: Ipv4Addr) -> Option<Ipv4Addr> {
    (!ip.is_unspecified()).then_some(ip)
}

/// RFC 2131 §4.1, in order: relay, NAK broadcast, unicast to a configured client,
/// otherwise broadcast.
pub fn destination(msg: &Message, is_nak: bool) -> Destination {
    if let Some(relay) = nonzero(msg.giaddr()) {
        Destination::Relay(relay)
    } else if is_nak {
        Destination::Broadcast
    } else if let Some(client) = nonzero(msg.ciaddr()) {
        Destination::Unicast(client)
    } else {
        Destination::Broadcast
    }
}

/// The largest reply the client takes (option 57, which counts the IP and UDP headers;
/// RFC 2132 §9.10 makes 576 the smallest legal value).
fn max_reply_len(msg: &Message) -> usize {
    match msg.opts().get(OptionCode::MaxMessageSize) {
        Some(DhcpOption::MaxMessageSize(size)) if *size >= 576 => usize::from(*size) - 28,
        _ => DEFAULT_MAX_MESSAGE_LEN,
    }
}

fn config_option(options: &PoolOptions, code: u8) -> Option<Vec<u8>> {
    let addrs = |list: &[Ipv4Addr]| {
        (!list.is_empty()).then(|| list.iter().flat_map(|ip| ip.octets()).collect())
    };
    match code {
        code::SUBNET_MASK => Some(options.subnet_mask().octets().to_vec()),
        code::ROUTER => options.router.map(|ip| ip.octets().to_vec()),
        code::DNS => addrs(&options.dns),
        code::DOMAIN_NAME => options.domain_name.as_ref().map(|d| d.as_bytes().to_vec()),
        code::NTP => addrs(&options.ntp),
        code::DOMAIN_SEARCH => {
            (!options.domain_search_wire.is_empty()).then(|| options.domain_search_wire.clone())
        }
        _ => None,
    }
}

/// The options of an OFFER or ACK: message type and server id first, then the lease
/// times, then what the client asked for in the order it asked (RFC 2132 §9.8), then the
/// mandatory mask and router if it did not ask; every configured option when it sent no
/// list. Options the client did not ask for are left out: RFC 2131 §4.3.1 lets the server
/// send only the requested ones, and it keeps replies small.
fn assemble_options(
    options: &PoolOptions,
    msg: &Message,
    message_type: MessageType,
    with_lease: bool,
) -> Vec<(u8, Vec<u8>)> {
    let mut out: Vec<(u8, Vec<u8>)> = vec![
        (code::MESSAGE_TYPE, vec![u8::from(message_type)]),
        (code::SERVER_ID, options.server_ip.octets().to_vec()),
    ];
    if with_lease {
        out.push((code::LEASE_TIME, options.lease_time.to_be_bytes().to_vec()));
        out.push((
            code::RENEWAL_TIME,
            options.renewal_time().to_be_bytes().to_vec(),
        ));
        out.push((
            code::REBINDING_TIME,
            options.rebinding_time().to_be_bytes().to_vec(),
        ));
    }
    let push = |out: &mut Vec<(u8, Vec<u8>)>, code: u8| {
        if out.iter().any(|(c, _)| *c == code) {
            return;
        }
        if let Some(data) = config_option(options, code) {
            out.push((code, data));
        }
    };
    match msg.opts().get(OptionCode::ParameterRequestList) {
        Some(DhcpOption::ParameterRequestList(list)) => {
            for requested in list {
                push(&mut out, u8::from(*requested));
            }
            push(&mut out, code::SUBNET_MASK);
            push(&mut out, code::ROUTER);
        }
        _ => {
            for code in CONFIG_CODES {
                push(&mut out, code);
            }
        }
    }
    if let Some(DhcpOption::ClientIdentifier(id)) = msg.opts().get(OptionCode::ClientIdentifier) {
        out.push((code::CLIENT_ID, id.clone()));
    }
    out
}

fn chaddr16(mac: MacAddr) -> [u8; 16] {
    let mut chaddr = [0u8; 16];
    chaddr[..6].copy_from_slice(&mac.octets());
    chaddr
}

struct Header {
    yiaddr: Ipv4Addr,
    ciaddr: Ipv4Addr,
    siaddr: Ipv4Addr,
}

fn build(
    msg: &Message,
    mac: MacAddr,
    header: Header,
    options: Vec<(u8, Vec<u8>)>,
    is_nak: bool,
) -> Outgoing {
    let destination = destination(msg, is_nak);
    let mut flags = u16::from(msg.flags());
    if is_nak && matches!(destination, Destination::Relay(_)) {
        // §4.3.2: a NAK through a relay asks the relay to broadcast it.
        flags |= BROADCAST_FLAG;
    }
    let mut packet = ReplyPacket {
        htype: u8::from(msg.htype()),
        hlen: msg.hlen(),
        xid: msg.xid(),
        flags,
        ciaddr: header.ciaddr,
        yiaddr: header.yiaddr,
        siaddr: header.siaddr,
        giaddr: msg.giaddr(),
        chaddr: chaddr16(mac),
        options,
    };
    // Drop requested extras from the end until the reply fits the client's buffer.
    let limit = max_reply_len(msg).max(FIXED_HEADER_LEN + MAGIC_COOKIE.len() + 64);
    while packet.unpadded_len() > limit {
        match packet
            .options
            .iter()
            .rposition(|(c, _)| !MANDATORY.contains(c))
        {
            Some(i) => {
                packet.options.remove(i);
            }
            None => break,
        }
    }
    Outgoing {
        packet,
        destination,
    }
}

fn lease_reply(
    table: &LeaseTable,
    msg: &Message,
    mac: MacAddr,
    ip: Ipv4Addr,
    message_type: MessageType,
) -> Outgoing {
    let options = table.options();
    let ciaddr = if message_type == MessageType::Ack {
        msg.ciaddr()
    } else {
        Ipv4Addr::UNSPECIFIED
    };
    build(
        msg,
        mac,
        Header {
            yiaddr: ip,
            ciaddr,
            siaddr: options.server_ip,
        },
        assemble_options(options, msg, message_type, true),
        false,
    )
}

fn nak(
    table: &LeaseTable,
    msg: &Message,
    mac: MacAddr,
    requested: Option<Ipv4Addr>,
    state: ClientState,
) -> Decision {
    let server_ip = table.options().server_ip;
    let text = match requested {
        Some(ip) => format!("{ip} is not allocated to {mac} in this pool; restart with DISCOVER"),
        None => format!("no address requested by {mac}; restart with DISCOVER"),
    };
    let mut options = vec![
        (code::MESSAGE_TYPE, vec![u8::from(MessageType::Nak)]),
        (code::SERVER_ID, server_ip.octets().to_vec()),
        (code::MESSAGE, text.into_bytes()),
    ];
    if let Some(DhcpOption::ClientIdentifier(id)) = msg.opts().get(OptionCode::ClientIdentifier) {
        options.push((code::CLIENT_ID, id.clone()));
    }
    let outgoing = build(
        msg,
        mac,
        Header {
            yiaddr: Ipv4Addr::UNSPECIFIED,
            ciaddr: Ipv4Addr::UNSPECIFIED,
            siaddr: Ipv4Addr::UNSPECIFIED,
        },
        options,
        true,
    );
    Decision {
        reply: Reply::Nak(outgoing),
        event: Some(LeaseEvent::Naked { mac, requested }),
        state: Some(state),
    }
}

fn ack_or_nak(
    table: &LeaseTable,
    msg: &Message,
    mac: MacAddr,
    held: Ipv4Addr,
    requested: Option<Ipv4Addr>,
    state: ClientState,
) -> Decision {
    match requested {
        Some(ip) if ip != held => nak(table, msg, mac, Some(ip), state),
        _ => Decision {
            reply: Reply::Ack(lease_reply(table, msg, mac, held, MessageType::Ack)),
            event: Some(LeaseEvent::Acked { mac, ip: held }),
            state: Some(state),
        },
    }
}

/// Decides the answer to one decoded message.
pub fn decide(table: &LeaseTable, msg: &Message) -> Decision {
    if msg.opcode() != Opcode::BootRequest {
        return Decision::none(NoReply::NotBootRequest);
    }
    if msg.htype() != HType::Eth || msg.hlen() != 6 {
        return Decision::none(NoReply::UnsupportedHardware {
            htype: u8::from(msg.htype()),
            hlen: msg.hlen(),
        });
    }
    // hlen is 6 here, so chaddr() cannot slice past its 16 bytes.
    let mut octets = [0u8; 6];
    octets.copy_from_slice(&msg.chaddr()[..6]);
    let mac = MacAddr(octets);
    let Some(message_type) = msg.opts().msg_type() else {
        return Decision::none(NoReply::NoMessageType);
    };
    let server_ip = table.options().server_ip;
    let server_id = server_identifier(msg);
    // A message that names another server is not for us, whoever sent it.
    if let Some(other) = server_id.filter(|id| *id != server_ip) {
        return Decision::none(NoReply::OtherServer(other));
    }
    let held = table.address_of(&mac);
    match message_type {
        MessageType::Discover => match held {
            None => Decision::none(NoReply::UnknownMac(mac)),
            Some(ip) => Decision {
                reply: Reply::Offer(lease_reply(table, msg, mac, ip, MessageType::Offer)),
                event: Some(LeaseEvent::Offered { mac, ip }),
                state: None,
            },
        },
        MessageType::Request => {
            let requested = requested_ip(msg);
            let ciaddr = nonzero(msg.ciaddr());
            let state = if server_id.is_some() {
                ClientState::Selecting
            } else if requested.is_some() {
                ClientState::InitReboot
            } else if ciaddr.is_some() {
                ClientState::RenewingOrRebinding
            } else {
                return Decision::none(NoReply::InvalidRequest);
            };
            // §4.3.2: no record of the client → silence, in every state.
            let Some(held) = held else {
                return Decision::none(NoReply::UnknownMac(mac));
            };
            let wanted = match state {
                // The requested address is what we offered; a SELECTING client that puts it
                // in ciaddr instead (not RFC, seen in the wild) is read the same way.
                ClientState::Selecting => requested.or(ciaddr),
                ClientState::InitReboot => requested,
                ClientState::RenewingOrRebinding => ciaddr,
            };
            ack_or_nak(table, msg, mac, held, wanted, state)
        }
        MessageType::Release => {
            let Some(held) = held else {
                return Decision::none(NoReply::UnknownMac(mac));
            };
            let claimed = msg.ciaddr();
            if claimed != held {
                return Decision::none(NoReply::NotClientsAddress { mac, claimed, held });
            }
            Decision {
                reply: Reply::None(NoReply::Released),
                event: Some(LeaseEvent::Released { mac, ip: held }),
                state: None,
            }
        }
        MessageType::Decline => {
            let Some(held) = held else {
                return Decision::none(NoReply::UnknownMac(mac));
            };
            let claimed = requested_ip(msg).unwrap_or(Ipv4Addr::UNSPECIFIED);
            if claimed != held {
                return Decision::none(NoReply::NotClientsAddress { mac, claimed, held });
            }
            Decision {
                reply: Reply::None(NoReply::Declined),
                event: Some(LeaseEvent::Declined { mac, ip: held }),
                state: None,
            }
        }
        MessageType::Inform => {
            if held.is_none() {
                return Decision::none(NoReply::UnknownMac(mac));
            }
            // §4.3.5: options only; no lease time, no yiaddr; ciaddr echoed.
            let outgoing = build(
                msg,
                mac,
                Header {
                    yiaddr: Ipv4Addr::UNSPECIFIED,
                    ciaddr: msg.ciaddr(),
                    siaddr: server_ip,
                },
                assemble_options(table.options(), msg, MessageType::Ack, false),
                false,
            );
            Decision {
                reply: Reply::Ack(outgoing),
                event: Some(LeaseEvent::Informed { mac }),
                state: None,
            }
        }
        other => Decision::none(NoReply::UnsupportedMessageType(u8::from(other))),
    }
}

/// Why a datagram is not a DHCP message at all.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Malformed {
    #[error("{0} bytes is shorter than a DHCP message header with its magic cookie (240)")]
    TooShort(usize),
    #[error("no DHCP magic cookie")]
    BadCookie,
    #[error("option {code} has an impossible length {len}")]
    BadOptionLength { code: u8, len: usize },
    #[error("cannot decode: {0}")]
    Undecodable(String),
}

/// Option lengths that `dhcproto` 0.15 does not guard against: it `debug_assert!`s them or
/// subtracts from them unchecked, so such a packet would panic a debug build (and be
/// misread by a release one). It joins adjacent options of one code first (RFC 3396), so
/// the check applies to each run of them.
fn length_ok(code: u8, len: usize) -> bool {
    match code {
        80 => len == 0,        // rapid commit
        81 => len >= 3,        // client FQDN: flags, rcode1, rcode2, name
        94 => len == 3,        // client network interface identifier
        151 => len >= 1,       // bulk lease query status code
        152..=155 => len == 4, // bulk lease query times
        _ => true,
    }
}

/// Walks the options field the way `dhcproto` groups it and finds the first run whose
/// length it would trip over. The decoder decodes a run as soon as an option with another
/// code (or a pad, or the end) follows it, even when that next option is truncated; a run
/// whose own next piece is truncated is never decoded.
fn find_bad_option_length(options: &[u8]) -> Option<(u8, usize)> {
    let mut i = 0;
    let mut run: Option<(u8, usize)> = None;
    let check = |run: Option<(u8, usize)>| run.filter(|(code, len)| !length_ok(*code, *len));
    while let Some(&code) = options.get(i) {
        if run.is_some_and(|(c, _)| c != code)
            && let Some(bad) = check(run.take())
        {
            return Some(bad);
        }
        if code == 0 {
            i += 1;
            continue;
        }
        if code == 255 {
            return None;
        }
        let len = usize::from(*options.get(i + 1)?);
        if options.len() < i + 2 + len {
            return None;
        }
        run = Some(match run {
            Some((c, total)) => (c, total + len),
            None => (code, len),
        });
        i += 2 + len;
    }
    check(run)
}

/// The whole packet path short of the socket: bytes in, decision out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Processed {
    Malformed(Malformed),
    Handled {
        message_type: Option<MessageType>,
        decision: Decision,
    },
}

pub fn process(bytes: &[u8], table: &LeaseTable) -> Processed {
    let header = FIXED_HEADER_LEN + MAGIC_COOKIE.len();
    if bytes.len() < header {
        return Processed::Malformed(Malformed::TooShort(bytes.len()));
    }
    if bytes[FIXED_HEADER_LEN..header] != MAGIC_COOKIE {
        return Processed::Malformed(Malformed::BadCookie);
    }
    if let Some((code, len)) = find_bad_option_length(&bytes[header..]) {
        return Processed::Malformed(Malformed::BadOptionLength { code, len });
    }
    let msg = match Message::decode(&mut Decoder::new(bytes)) {
        Ok(msg) => msg,
        Err(e) => return Processed::Malformed(Malformed::Undecodable(e.to_string())),
    };
    Processed::Handled {
        message_type: msg.opts().msg_type(),
        decision: decide(table, &msg),
    }
}
