//! RFC 3397 "Domain Search" (option 119): a list of domain names in DNS wire format
//! (RFC 1035 §3.1) where a name may end in a compression pointer (RFC 1035 §4.1.4) to a
//! suffix written earlier. Offsets count from the start of the option data, which spans
//! every option 119 instance once they are concatenated (RFC 3396), so the encoder works on
//! the whole list and the caller splits the result.

use std::collections::HashMap;

/// Why a domain search entry cannot be put on the wire.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DomainError {
    #[error("domain {name:?} has an empty label (two dots in a row, or a leading dot)")]
    EmptyLabel { name: String },
    #[error("domain {name:?} has a label longer than 63 bytes")]
    LabelTooLong { name: String },
    #[error("domain {name:?} is longer than 255 bytes in wire format")]
    NameTooLong { name: String },
    #[error(
        "domain {name:?} has a character that is not printable ASCII; write internationalized names in punycode (xn--…)"
    )]
    NotAscii { name: String },
    #[error("domain search entry is empty")]
    Empty,
}

/// A compression pointer holds a 14-bit offset.
const MAX_POINTER_OFFSET: usize = 0x3fff;

/// The labels of one name, checked. A single trailing dot (the root) is allowed.
fn labels(name: &str) -> Result<Vec<&str>, DomainError> {
    let trimmed = name.trim();
    let trimmed = trimmed.strip_suffix('.').unwrap_or(trimmed);
    if trimmed.is_empty() {
        return Err(DomainError::Empty);
    }
    if !trimmed.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(DomainError::NotAscii {
            name: name.to_string(),
        });
    }
    let labels: Vec<&str> = trimmed.split('.').collect();
    let mut wire_len = 1; // the root label
    for label in &labels {
        if label.is_empty() {
            return Err(DomainError::EmptyLabel {
                name: name.to_string(),
            });
        }
        if label.len() > 63 {
            return Err(DomainError::LabelTooLong {
                name: name.to_string(),
            });
        }
        wire_len += 1 + label.len();
    }
    if wire_len > 255 {
        return Err(DomainError::NameTooLong {
            name: name.to_string(),
        });
    }
    Ok(labels)
}

/// Checks one domain name without encoding it.
pub fn check_domain(name: &str) -> Result<(), DomainError> {
    labels(name).map(|_| ())
}

/// Encodes a search list, compressing every suffix already written (DNS names compare
/// case-insensitively, RFC 4343, so the suffix table is keyed in lower case).
pub fn encode_domain_search<S: AsRef<str>>(names: &[S]) -> Result<Vec<u8>, DomainError> {
    let mut out = Vec::new();
    // lower-cased suffix ("apple.com") → offset where its first label starts
    let mut written: HashMap<String, usize> = HashMap::new();
    for name in names {
        let labels = labels(name.as_ref())?;
        let mut pointer = None;
        let mut literal = labels.len();
        for start in 0..labels.len() {
            let suffix = labels[start..].join(".").to_ascii_lowercase();
            if let Some(&offset) = written.get(&suffix) {
                pointer = Some(offset);
                literal = start;
                break;
            }
        }
        for (i, label) in labels[..literal].iter().enumerate() {
            let offset = out.len();
            if offset <= MAX_POINTER_OFFSET {
                written
                    .entry(labels[i..].join(".").to_ascii_lowercase())
                    .or_insert(offset);
            }
            // label length checked above: at most 63
            out.push(label.len() as u8);
            out.extend_from_slice(label.as_bytes());
        }
        match pointer {
            Some(offset) => {
                out.push(0xc0 | (offset >> 8) as u8);
                out.push((offset & 0xff) as u8);
            }
            None => out.push(0),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 3397 §2's example: "eng.apple.com." and "marketing.apple.com.", whose second
    /// name ends in a pointer to offset 4 ("apple.com").
    #[test]
    fn rfc3397_example_bytes() {
        let encoded =
            encode_domain_search(&["eng.apple.com.", "marketing.apple.com."]).expect("valid");
        let mut expected = vec![3];
        expected.extend_from_slice(b"eng");
        expected.push(5);
        expected.extend_from_slice(b"apple");
        expected.push(3);
        expected.extend_from_slice(b"com");
        expected.push(0);
        expected.push(9);
        expected.extend_from_slice(b"marketing");
        expected.extend_from_slice(&[0xc0, 0x04]);
        assert_eq!(encoded, expected);
        assert_eq!(
            encoded.len(),
            27,
            "RFC 3397 splits these 27 bytes in three options of 9"
        );
    }

    #[test]
    fn whole_name_repeated_is_one_pointer_and_case_does_not_matter() {
        let encoded = encode_domain_search(&["Example.COM", "example.com"]).expect("valid");
        let mut expected = vec![7];
        expected.extend_from_slice(b"Example");
        expected.push(3);
        expected.extend_from_slice(b"COM");
        expected.push(0);
        expected.extend_from_slice(&[0xc0, 0x00]);
        assert_eq!(encoded, expected);
    }

    #[test]
    fn pointer_to_a_suffix_of_a_later_label() {
        // "b.c" is written as part of "a.b.c" at offset 2; "x.b.c" points there.
        let encoded = encode_domain_search(&["a.b.c", "x.b.c", "c"]).expect("valid");
        assert_eq!(
            encoded,
            vec![
                1, b'a', 1, b'b', 1, b'c', 0, // a.b.c at 0, b.c at 2, c at 4
                1, b'x', 0xc0, 2, // x + → b.c
                0xc0, 4, // c → offset 4
            ]
        );
    }

    #[test]
    fn seed_search_list() {
        let encoded = encode_domain_search(&["aibao.moe"]).expect("valid");
        assert_eq!(encoded, b"\x05aibao\x03moe\x00");
    }

    #[test]
    fn decodes_with_dhcproto() {
        // dhcproto decodes option 119 with a DNS name parser that follows pointers.
        use dhcproto::v4::{DhcpOption, OptionCode, UnknownOption};
        use dhcproto::{Decodable, Decoder, Encodable, Encoder};
        let names = [
            "eng.apple.com",
            "marketing.apple.com",
            "apple.com",
            "example.org",
        ];
        let data = encode_domain_search(&names).expect("valid");
        let mut buf = Vec::new();
        DhcpOption::Unknown(UnknownOption::new(OptionCode::DomainSearch, data))
            .encode(&mut Encoder::new(&mut buf))
            .expect("encodes");
        let decoded = DhcpOption::decode(&mut Decoder::new(&buf)).expect("decodes");
        let DhcpOption::DomainSearch(decoded) = decoded else {
            panic!("not a domain search option: {decoded:?}");
        };
        let decoded: Vec<String> = decoded.iter().map(|n| n.to_utf8()).collect();
        assert_eq!(
            decoded,
            vec![
                "eng.apple.com.",
                "marketing.apple.com.",
                "apple.com.",
                "example.org."
            ]
        );
    }

    #[test]
    fn rejects_bad_names() {
        assert_eq!(encode_domain_search(&[""]), Err(DomainError::Empty));
        assert_eq!(encode_domain_search(&["."]), Err(DomainError::Empty));
        assert!(matches!(
            encode_domain_search(&["a..b"]),
            Err(DomainError::EmptyLabel { .. })
        ));
        assert!(matches!(
            encode_domain_search(&[format!("{}.com", "a".repeat(64))]),
            Err(DomainError::LabelTooLong { .. })
        ));
        let long = vec!["abcdefghi"; 26].join(".");
        assert!(matches!(
            encode_domain_search(&[long]),
            Err(DomainError::NameTooLong { .. })
        ));
        assert!(matches!(
            encode_domain_search(&["bücher.de"]),
            Err(DomainError::NotAscii { .. })
        ));
        assert!(matches!(
            encode_domain_search(&["has space.com"]),
            Err(DomainError::NotAscii { .. })
        ));
        assert_eq!(encode_domain_search::<&str>(&[]), Ok(vec![]));
    }
}
