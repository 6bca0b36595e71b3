//! MAC addresses: one canonical form (lower-case, colon-separated) so that `AA-BB-…` from a
//! user and `aa:bb:…` from KubeVirt name the same NIC. Upstream compares them as raw strings,
//! which makes a lease silently miss when the case differs.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Harvester's VM annotation: a JSON map interface name → observed MAC.
pub const MAC_ANNOTATION: &str = "harvesterhci.io/mac-address";

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MacAddr(pub [u8; 6]);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MacError {
    #[error(
        "invalid MAC address {0:?}: expected six two-digit hex bytes separated by ':' or '-', e.g. 52:54:00:ab:cd:ef"
    )]
    Malformed(String),
    #[error(
        "invalid {annotation} annotation: {reason}; expected a JSON object of interface name to MAC address"
    )]
    Annotation {
        annotation: &'static str,
        reason: String,
    },
}

impl MacAddr {
    pub fn octets(&self) -> [u8; 6] {
        self.0
    }

    /// A locally administered unicast address (bit 1 of the first octet set, bit 0 clear).
    pub fn is_locally_administered_unicast(&self) -> bool {
        self.0[0] & 0b11 == 0b10
    }
}

impl FromStr for MacAddr {
    type Err = MacError;

    fn from_str(text: &str) -> Result<Self, MacError> {
        let malformed = || MacError::Malformed(text.to_string());
        let sep = match text.as_bytes().get(2) {
            Some(b':') => ':',
            Some(b'-') => '-',
            _ => return Err(malformed()),
        };
        let mut out = [0u8; 6];
        let mut parts = text.split(sep);
        for byte in &mut out {
            let part = parts.next().ok_or_else(malformed)?;
            if part.len() != 2 || !part.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(malformed());
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| malformed())?;
        }
        if parts.next().is_some() {
            return Err(malformed());
        }
        Ok(MacAddr(out))
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

impl fmt::Debug for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl Serialize for MacAddr {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MacAddr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// Parses Harvester's `harvesterhci.io/mac-address` annotation (interface name → MAC).
pub fn parse_mac_annotation(value: &str) -> Result<BTreeMap<String, MacAddr>, MacError> {
    let raw: BTreeMap<String, String> =
        serde_json::from_str(value).map_err(|e| MacError::Annotation {
            annotation: MAC_ANNOTATION,
            reason: e.to_string(),
        })?;
    raw.into_iter()
        .map(|(nic, mac)| match mac.parse() {
            Ok(mac) => Ok((nic, mac)),
            Err(e) => Err(MacError::Annotation {
                annotation: MAC_ANNOTATION,
                reason: format!("interface {nic:?}: {e}"),
            }),
        })
        .collect()
}

/// The MAC of one VM interface: the spec's `macAddress` if set, else the annotation entry for
/// that interface (Harvester ≥ 1.6 keeps observed MACs only there during the first run);
/// `None` when neither knows it yet. A malformed spec MAC is an error, never skipped.
pub fn nic_mac(
    spec_mac: Option<&str>,
    annotation: Option<&BTreeMap<String, MacAddr>>,
    interface: &str,
) -> Result<Option<MacAddr>, MacError> {
    match spec_mac.map(str::trim).filter(|m| !m.is_empty()) {
        Some(mac) => mac.parse().map(Some),
        None => Ok(annotation.and_then(|a| a.get(interface)).copied()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_both_separators_and_normalizes() {
        for text in ["AA:bb:0C:dd:EE:0f", "aa-BB-0c-DD-ee-0F"] {
            let mac: MacAddr = text.parse().expect(text);
            assert_eq!(mac.to_string(), "aa:bb:0c:dd:ee:0f");
        }
    }

    #[test]
    fn rejects_malformed_with_the_input_in_the_message() {
        for bad in [
            "",
            "aa:bb:cc:dd:ee",
            "aa:bb:cc:dd:ee:ff:00",
            "aa:bb-cc:dd:ee:ff",
            "aabb.ccdd.eeff",
            "a:bb:cc:dd:ee:ff",
            "gg:bb:cc:dd:ee:ff",
            "aa:bb:cc:dd:ee:f",
            "aa:bb:cc:dd:ee:+f",
            "ａa:bb:cc:dd:ee:ff",
        ] {
            let err = bad.parse::<MacAddr>().expect_err(bad);
            assert!(err.to_string().contains(&format!("{bad:?}")), "{err}");
        }
    }

    #[test]
    fn spec_mac_wins_over_annotation() {
        let ann =
            parse_mac_annotation(r#"{"nic-1":"52:54:00:00:00:01","nic-2":"52-54-00-00-00-02"}"#)
                .expect("valid annotation");
        let spec = nic_mac(Some("52:54:00:00:00:ff"), Some(&ann), "nic-1").expect("ok");
        assert_eq!(
            spec.map(|m| m.to_string()).as_deref(),
            Some("52:54:00:00:00:ff")
        );
        let from_ann = nic_mac(Some(""), Some(&ann), "nic-2").expect("ok");
        assert_eq!(
            from_ann.map(|m| m.to_string()).as_deref(),
            Some("52:54:00:00:00:02")
        );
        assert_eq!(nic_mac(None, Some(&ann), "nic-3").expect("ok"), None);
        assert_eq!(nic_mac(None, None, "nic-1").expect("ok"), None);
        assert!(nic_mac(Some("zz"), Some(&ann), "nic-1").is_err());
    }

    #[test]
    fn bad_annotation_is_a_clear_error() {
        let err = parse_mac_annotation("[]").expect_err("not a map");
        assert!(err.to_string().contains(MAC_ANNOTATION), "{err}");
        let err = parse_mac_annotation(r#"{"nic-1":"nope"}"#).expect_err("bad mac");
        assert!(err.to_string().contains("\"nope\""), "{err}");
    }

    #[test]
    fn locally_administered() {
        assert!(
            "02:00:00:00:00:01"
                .parse::<MacAddr>()
                .expect("mac")
                .is_locally_administered_unicast()
        );
        assert!(
            "52:54:00:00:00:01"
                .parse::<MacAddr>()
                .expect("mac")
                .is_locally_administered_unicast()
        );
        assert!(
            !"00:16:3e:00:00:01"
                .parse::<MacAddr>()
                .expect("mac")
                .is_locally_administered_unicast()
        );
        assert!(
            !"03:00:00:00:00:01"
                .parse::<MacAddr>()
                .expect("mac")
                .is_locally_administered_unicast()
        );
    }
}
