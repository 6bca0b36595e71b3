//! Label and field selectors as the Kubernetes API accepts them in `?labelSelector=` and
//! `?fieldSelector=`. kube-core can evaluate selectors but has no parser for their string
//! form, so this is a small one following `k8s.io/apimachinery/pkg/labels` and `.../fields`.

use std::collections::BTreeMap;
use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid selector {input:?}: {reason}")]
pub struct SelectorError {
    pub input: String,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Equals,
    NotEquals,
    In,
    NotIn,
    Exists,
    DoesNotExist,
    GreaterThan,
    LessThan,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Requirement {
    pub key: String,
    pub op: Op,
    pub values: Vec<String>,
}

/// A parsed label selector: every requirement must hold (AND). Empty selects everything.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LabelSelector {
    pub requirements: Vec<Requirement>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    Ident(String),
    Eq,
    DoubleEq,
    NotEq,
    Bang,
    Gt,
    Lt,
    Open,
    Close,
    Comma,
}

fn lex(input: &str) -> Result<Vec<Token>, String> {
    let mut tokens = Vec::new();
    let mut chars = input.chars().peekable();
    while let Some(&c) = chars.peek() {
        match c {
            c if c.is_whitespace() => {
                chars.next();
            }
            '(' | ')' | ',' | '<' | '>' => {
                chars.next();
                tokens.push(match c {
                    '(' => Token::Open,
                    ')' => Token::Close,
                    ',' => Token::Comma,
                    '<' => Token::Lt,
                    _ => Token::Gt,
                });
            }
            '=' => {
                chars.next();
                if chars.peek() == Some(&'=') {
                    chars.next();
                    tokens.push(Token::DoubleEq);
                } else {
                    tokens.push(Token::Eq);
                }
            }
            '!' => {
                chars.next();
                if chars.peek() == Some(&'=') {
                    chars.next();
                    tokens.push(Token::NotEq);
                } else {
                    tokens.push(Token::Bang);
                }
            }
            _ => {
                let mut word = String::new();
                while let Some(&c) = chars.peek() {
                    if c.is_whitespace() || "()=,!<>".contains(c) {
                        break;
                    }
                    word.push(c);
                    chars.next();
                }
                tokens.push(Token::Ident(word));
            }
        }
    }
    Ok(tokens)
}

/// `[prefix/]name`: name up to 63 of `[A-Za-z0-9_.-]`, starting and ending alphanumeric; the
/// prefix a DNS subdomain.
fn valid_key(key: &str) -> bool {
    let (prefix, name) = match key.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    let alnum_ends = |s: &str| {
        s.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
            && s.chars().last().is_some_and(|c| c.is_ascii_alphanumeric())
    };
    let name_ok = !name.is_empty()
        && name.len() <= 63
        && alnum_ends(name)
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    let prefix_ok = prefix.is_none_or(|p| {
        !p.is_empty()
            && p.len() <= 253
            && alnum_ends(p)
            && p.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "-.".contains(c))
    });
    name_ok && prefix_ok
}

/// A label value: empty, or up to 63 of `[A-Za-z0-9_.-]` starting and ending alphanumeric.
fn valid_value(value: &str) -> bool {
    value.is_empty()
        || (value.len() <= 63
            && value
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphanumeric())
            && value
                .chars()
                .last()
                .is_some_and(|c| c.is_ascii_alphanumeric())
            && value
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)))
}

impl LabelSelector {
    /// Parses `a=b,a==b,a!=b,a in (x,y),a notin (x),a,!a,a>1,a<1`.
    pub fn parse(input: &str) -> Result<Self, SelectorError> {
        let fail = |reason: String| SelectorError {
            input: input.to_string(),
            reason,
        };
        let tokens = lex(input).map_err(fail)?;
        let mut requirements = Vec::new();
        let mut pos = 0;
        let ident = |t: Option<&Token>| match t {
            Some(Token::Ident(s)) => Some(s.clone()),
            _ => None,
        };
        while pos < tokens.len() {
            let negated = tokens[pos] == Token::Bang;
            if negated {
                pos += 1;
            }
            let key = ident(tokens.get(pos))
                .ok_or_else(|| fail(format!("expected a label key at token {}", pos + 1)))?;
            if !valid_key(&key) {
                return Err(fail(format!(
                    "{key:?} is not a valid label key (a name of at most 63 letters, digits, '-', '_' or '.', optionally prefixed by a DNS subdomain and '/')"
                )));
            }
            pos += 1;
            let req = if negated {
                Requirement {
                    key,
                    op: Op::DoesNotExist,
                    values: Vec::new(),
                }
            } else {
                match tokens.get(pos) {
                    None | Some(Token::Comma) => Requirement {
                        key,
                        op: Op::Exists,
                        values: Vec::new(),
                    },
                    Some(
                        op @ (Token::Eq | Token::DoubleEq | Token::NotEq | Token::Gt | Token::Lt),
                    ) => {
                        let op = match op {
                            Token::NotEq => Op::NotEquals,
                            Token::Gt => Op::GreaterThan,
                            Token::Lt => Op::LessThan,
                            _ => Op::Equals,
                        };
                        pos += 1;
                        // `a=` selects an empty value.
                        let value = match tokens.get(pos) {
                            Some(Token::Ident(v)) => {
                                pos += 1;
                                v.clone()
                            }
                            None | Some(Token::Comma) => String::new(),
                            Some(t) => {
                                return Err(fail(format!(
                                    "expected a value after the operator of {key:?}, found {t:?}"
                                )));
                            }
                        };
                        if matches!(op, Op::GreaterThan | Op::LessThan) {
                            if value.parse::<i64>().is_err() {
                                return Err(fail(format!(
                                    "{key:?}: '>' and '<' need an integer, not {value:?}"
                                )));
                            }
                        } else if !valid_value(&value) {
                            return Err(fail(format!(
                                "{value:?} is not a valid label value (at most 63 letters, digits, '-', '_' or '.')"
                            )));
                        }
                        Requirement {
                            key,
                            op,
                            values: vec![value],
                        }
                    }
                    Some(Token::Ident(word)) if word == "in" || word == "notin" => {
                        let op = if word == "in" { Op::In } else { Op::NotIn };
                        pos += 1;
                        if tokens.get(pos) != Some(&Token::Open) {
                            return Err(fail(format!("expected '(' after {word} for {key:?}")));
                        }
                        pos += 1;
                        let mut values = Vec::new();
                        loop {
                            match tokens.get(pos) {
                                Some(Token::Ident(v)) => {
                                    if !valid_value(v) {
                                        return Err(fail(format!(
                                            "{v:?} is not a valid label value"
                                        )));
                                    }
                                    values.push(v.clone());
                                    pos += 1;
                                }
                                // `in (a,)` and `in ()` have an empty value.
                                Some(Token::Comma) | Some(Token::Close) => {
                                    values.push(String::new())
                                }
                                _ => {
                                    return Err(fail(format!(
                                        "unterminated value list of {key:?}"
                                    )));
                                }
                            }
                            match tokens.get(pos) {
                                Some(Token::Comma) => pos += 1,
                                Some(Token::Close) => {
                                    pos += 1;
                                    break;
                                }
                                _ => {
                                    return Err(fail(format!(
                                        "expected ',' or ')' in the values of {key:?}"
                                    )));
                                }
                            }
                        }
                        Requirement { key, op, values }
                    }
                    Some(t) => {
                        return Err(fail(format!(
                            "unexpected {t:?} after {key:?}: expected =, ==, !=, in, notin or ','"
                        )));
                    }
                }
            };
            requirements.push(req);
            match tokens.get(pos) {
                None => break,
                Some(Token::Comma) => {
                    pos += 1;
                    if pos == tokens.len() {
                        return Err(fail("trailing ','".into()));
                    }
                }
                Some(t) => {
                    return Err(fail(format!(
                        "expected ',' between requirements, found {t:?}"
                    )));
                }
            }
        }
        Ok(LabelSelector { requirements })
    }

    pub fn is_empty(&self) -> bool {
        self.requirements.is_empty()
    }

    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.requirements.iter().all(|r| {
            let got = labels.get(&r.key);
            match r.op {
                Op::Equals => got.is_some_and(|v| *v == r.values[0]),
                // As in Kubernetes: a missing label is "not equal".
                Op::NotEquals => got.is_none_or(|v| *v != r.values[0]),
                Op::In => got.is_some_and(|v| r.values.contains(v)),
                Op::NotIn => got.is_none_or(|v| !r.values.contains(v)),
                Op::Exists => got.is_some(),
                Op::DoesNotExist => got.is_none(),
                Op::GreaterThan | Op::LessThan => {
                    let (Some(have), Ok(want)) = (
                        got.and_then(|v| v.parse::<i64>().ok()),
                        r.values[0].parse::<i64>(),
                    ) else {
                        return false;
                    };
                    if r.op == Op::GreaterThan {
                        have > want
                    } else {
                        have < want
                    }
                }
            }
        })
    }
}

/// One term of a field selector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldRequirement {
    pub field: String,
    pub value: String,
    pub equal: bool,
}

/// A parsed field selector (`a=b,c!=d`, with `\` escaping `,`, `=` and `\` in values).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct FieldSelector {
    pub requirements: Vec<FieldRequirement>,
}

impl FieldSelector {
    pub fn parse(input: &str) -> Result<Self, SelectorError> {
        let fail = |reason: String| SelectorError {
            input: input.to_string(),
            reason,
        };
        let mut terms = Vec::new();
        let mut current = String::new();
        let mut escaped = false;
        for c in input.chars() {
            if escaped {
                current.push('\\');
                current.push(c);
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == ',' {
                terms.push(std::mem::take(&mut current));
            } else {
                current.push(c);
            }
        }
        if escaped {
            return Err(fail("ends with an unfinished '\\' escape".into()));
        }
        terms.push(current);
        let mut requirements = Vec::new();
        for term in terms {
            if term.trim().is_empty() {
                continue;
            }
            // The operator is the first unescaped `!=`, `==` or `=`.
            let bytes = term.as_bytes();
            let mut split = None;
            let mut i = 0;
            while i < bytes.len() {
                match bytes[i] {
                    b'\\' => i += 2,
                    b'!' if bytes.get(i + 1) == Some(&b'=') => {
                        split = Some((i, 2, false));
                        break;
                    }
                    b'=' if bytes.get(i + 1) == Some(&b'=') => {
                        split = Some((i, 2, true));
                        break;
                    }
                    b'=' => {
                        split = Some((i, 1, true));
                        break;
                    }
                    _ => i += 1,
                }
            }
            let Some((at, len, equal)) = split else {
                return Err(fail(format!(
                    "{term:?} has no operator: use field=value, field==value or field!=value"
                )));
            };
            let field = term[..at].trim().to_string();
            if field.is_empty() {
                return Err(fail(format!("{term:?} has no field name")));
            }
            requirements.push(FieldRequirement {
                field,
                value: unescape(&term[at + len..]),
                equal,
            });
        }
        Ok(FieldSelector { requirements })
    }

    pub fn is_empty(&self) -> bool {
        self.requirements.is_empty()
    }

    /// The value of `metadata.name=X` when the selector pins one name (single-object watches
    /// and the name an authorization check is about).
    pub fn pinned_name(&self) -> Option<&str> {
        self.requirements
            .iter()
            .find(|r| r.equal && r.field == "metadata.name")
            .map(|r| r.value.as_str())
    }
}

fn unescape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            if let Some(next) = chars.next() {
                out.push(next);
            }
        } else {
            out.push(c);
        }
    }
    out
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Op::Equals => "=",
            Op::NotEquals => "!=",
            Op::In => "in",
            Op::NotIn => "notin",
            Op::Exists => "exists",
            Op::DoesNotExist => "!",
            Op::GreaterThan => ">",
            Op::LessThan => "<",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn sel(text: &str) -> LabelSelector {
        LabelSelector::parse(text).unwrap_or_else(|e| panic!("{text:?}: {e}"))
    }

    #[test]
    fn every_operator_parses() {
        let s = sel("a=b, c==d ,e!=f,g in (h, i),j notin (k),l,!m,n>1,o<2");
        let ops: Vec<Op> = s.requirements.iter().map(|r| r.op.clone()).collect();
        assert_eq!(
            ops,
            vec![
                Op::Equals,
                Op::Equals,
                Op::NotEquals,
                Op::In,
                Op::NotIn,
                Op::Exists,
                Op::DoesNotExist,
                Op::GreaterThan,
                Op::LessThan
            ]
        );
        assert_eq!(s.requirements[3].values, vec!["h", "i"]);
        assert_eq!(s.requirements[0].key, "a");
    }

    #[test]
    fn prefixed_keys_and_empty_values() {
        let s = sel("dhcp.harvesterhci.io/pool=net-48,x=");
        assert_eq!(s.requirements[0].key, "dhcp.harvesterhci.io/pool");
        assert_eq!(s.requirements[1].values, vec![""]);
        assert!(sel("").is_empty());
    }

    #[test]
    fn matching_follows_kubernetes() {
        let l = labels(&[("pool", "net-48"), ("state", "allocated"), ("n", "5")]);
        assert!(sel("pool=net-48").matches(&l));
        assert!(!sel("pool=net-49").matches(&l));
        assert!(sel("pool!=net-49").matches(&l));
        assert!(sel("missing!=x").matches(&l), "absent label is not equal");
        assert!(sel("state in (static,allocated)").matches(&l));
        assert!(!sel("state notin (static,allocated)").matches(&l));
        assert!(sel("missing notin (x)").matches(&l));
        assert!(!sel("missing in (x)").matches(&l));
        assert!(sel("pool").matches(&l));
        assert!(!sel("!pool").matches(&l));
        assert!(sel("!missing").matches(&l));
        assert!(sel("n>4,n<6").matches(&l));
        assert!(!sel("n>5").matches(&l));
        assert!(!sel("pool=net-48,state=static").matches(&l), "AND");
    }

    #[test]
    fn malformed_selectors_are_rejected_with_a_reason() {
        for bad in [
            "a=b,", "=b", "a in b", "a in (b", "a b", "a=(b)", "a>x", "-a=b", "a=b c", "a=b/c",
            "!a=b",
        ] {
            let err = LabelSelector::parse(bad).expect_err(bad);
            assert!(!err.reason.is_empty(), "{bad}");
        }
    }

    #[test]
    fn field_selectors_with_escapes() {
        let f = FieldSelector::parse("metadata.name=x,mac==52:54:00:aa:bb:cc,state!=free")
            .expect("parse");
        assert_eq!(f.requirements.len(), 3);
        assert_eq!(f.requirements[1].value, "52:54:00:aa:bb:cc");
        assert!(!f.requirements[2].equal);
        assert_eq!(f.pinned_name(), Some("x"));
        let f = FieldSelector::parse(r"owner=a\,b\=c").expect("escaped");
        assert_eq!(f.requirements[0].value, "a,b=c");
        assert!(FieldSelector::parse("").expect("empty").is_empty());
        assert!(FieldSelector::parse("nooperator").is_err());
        assert!(FieldSelector::parse("=x").is_err());
        assert!(FieldSelector::parse("a=b\\").is_err());
    }
}
