//! The reply on the wire. Requests are decoded with `dhcproto`; replies are written here
//! because `dhcproto` keeps options in a map ordered by code, and RFC 2132 §9.8 asks the
//! server to return requested options in the order the client listed them.

use std::net::Ipv4Addr;

/// RFC 2131 §3: the magic cookie that starts the options field.
pub const MAGIC_COOKIE: [u8; 4] = [99, 130, 83, 99];
/// op + htype + hlen + hops + xid + secs + flags + 4 addresses + chaddr + sname + file.
pub const FIXED_HEADER_LEN: usize = 236;
/// RFC 1542 §2.1: relays may drop BOOTP messages shorter than 300 octets; pad up to it.
pub const MIN_MESSAGE_LEN: usize = 300;
/// RFC 2131 §2: every client must accept 576-octet IP datagrams, i.e. 548 octets of DHCP.
pub const DEFAULT_MAX_MESSAGE_LEN: usize = 576 - 20 - 8;

pub const BROADCAST_FLAG: u16 = 0x8000;

/// A BOOTREPLY, header fields and options in the order they go on the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplyPacket {
    pub htype: u8,
    pub hlen: u8,
    pub xid: u32,
    pub flags: u16,
    pub ciaddr: Ipv4Addr,
    pub yiaddr: Ipv4Addr,
    pub siaddr: Ipv4Addr,
    pub giaddr: Ipv4Addr,
    pub chaddr: [u8; 16],
    /// (code, data); data longer than 255 bytes is split as RFC 3396 says.
    pub options: Vec<(u8, Vec<u8>)>,
}

impl ReplyPacket {
    /// The data of an option, if the reply carries it.
    pub fn option(&self, code: u8) -> Option<&[u8]> {
        self.options
            .iter()
            .find(|(c, _)| *c == code)
            .map(|(_, d)| d.as_slice())
    }

    /// The option codes in wire order.
    pub fn option_codes(&self) -> Vec<u8> {
        self.options.iter().map(|(c, _)| *c).collect()
    }

    fn options_len(options: &[(u8, Vec<u8>)]) -> usize {
        options.iter().map(|(_, d)| option_wire_len(d.len())).sum()
    }

    /// Length on the wire before padding: header, cookie, options, end.
    pub fn unpadded_len(&self) -> usize {
        FIXED_HEADER_LEN + MAGIC_COOKIE.len() + Self::options_len(&self.options) + 1
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.unpadded_len().max(MIN_MESSAGE_LEN));
        out.push(2); // BOOTREPLY
        out.push(self.htype);
        out.push(self.hlen);
        out.push(0); // hops
        out.extend_from_slice(&self.xid.to_be_bytes());
        out.extend_from_slice(&0u16.to_be_bytes()); // secs
        out.extend_from_slice(&self.flags.to_be_bytes());
        for addr in [self.ciaddr, self.yiaddr, self.siaddr, self.giaddr] {
            out.extend_from_slice(&addr.octets());
        }
        out.extend_from_slice(&self.chaddr);
        out.resize(FIXED_HEADER_LEN, 0); // sname and file: unused
        out.extend_from_slice(&MAGIC_COOKIE);
        for (code, data) in &self.options {
            if data.is_empty() {
                out.push(*code);
                out.push(0);
            }
            for chunk in data.chunks(255) {
                out.push(*code);
                out.push(chunk.len() as u8); // chunks(255): fits
                out.extend_from_slice(chunk);
            }
        }
        out.push(255);
        if out.len() < MIN_MESSAGE_LEN {
            out.resize(MIN_MESSAGE_LEN, 0);
        }
        out
    }
}

/// Bytes one option takes, including its code and length octets (RFC 3396 splitting).
pub fn option_wire_len(data_len: usize) -> usize {
    if data_len == 0 {
        2
    } else {
        data_len + 2 * data_len.div_ceil(255)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet(options: Vec<(u8, Vec<u8>)>) -> ReplyPacket {
        ReplyPacket {
            htype: 1,
            hlen: 6,
            xid: 0x1234_5678,
            flags: BROADCAST_FLAG,
            ciaddr: Ipv4Addr::UNSPECIFIED,
            yiaddr: Ipv4Addr::new(192, 168, 48, 86),
            siaddr: Ipv4Addr::new(192, 168, 48, 77),
            giaddr: Ipv4Addr::UNSPECIFIED,
            chaddr: [0x52, 0x54, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            options,
        }
    }

    #[test]
    fn header_layout_and_padding() {
        let bytes = packet(vec![(53, vec![2]), (54, vec![192, 168, 48, 77])]).encode();
        assert_eq!(bytes.len(), MIN_MESSAGE_LEN);
        assert_eq!(&bytes[..4], &[2, 1, 6, 0]);
        assert_eq!(&bytes[4..8], &[0x12, 0x34, 0x56, 0x78]);
        assert_eq!(&bytes[10..12], &[0x80, 0x00]);
        assert_eq!(&bytes[16..20], &[192, 168, 48, 86]);
        assert_eq!(&bytes[20..24], &[192, 168, 48, 77]);
        assert_eq!(&bytes[28..34], &[0x52, 0x54, 0, 0, 0, 1]);
        assert_eq!(&bytes[236..240], &MAGIC_COOKIE);
        assert_eq!(&bytes[240..250], &[53, 1, 2, 54, 4, 192, 168, 48, 77, 255]);
        assert!(bytes[250..].iter().all(|b| *b == 0));
    }

    #[test]
    fn long_option_is_split_in_order() {
        let data: Vec<u8> = (0..600u32).map(|i| (i % 251) as u8).collect();
        let p = packet(vec![(119, data.clone())]);
        let bytes = p.encode();
        assert_eq!(p.unpadded_len(), 240 + 600 + 6 + 1);
        assert_eq!(bytes.len(), p.unpadded_len());
        let opts = &bytes[240..];
        assert_eq!(&opts[..2], &[119, 255]);
        assert_eq!(&opts[257..259], &[119, 255]);
        assert_eq!(&opts[514..516], &[119, 90]);
        let mut joined = opts[2..257].to_vec();
        joined.extend_from_slice(&opts[259..514]);
        joined.extend_from_slice(&opts[516..606]);
        assert_eq!(joined, data);
        assert_eq!(opts[606], 255);
    }

    #[test]
    fn wire_len() {
        assert_eq!(option_wire_len(0), 2);
        assert_eq!(option_wire_len(4), 6);
        assert_eq!(option_wire_len(255), 257);
        assert_eq!(option_wire_len(256), 260);
    }
}
