//! Text key=value pairs (RFC 7143 §6): null-terminated `key=value` strings in the data
//! segment of Login and Text PDUs.

use thiserror::Error;

/// Longest key name (RFC 7143 §6.1: 63 bytes).
pub const KEY_LEN_MAX: usize = 63;
/// Longest value we accept (RFC 7143 §6.1: 8192 bytes for some keys, 255 for most).
pub const VALUE_LEN_MAX: usize = 8192;

/// Why a text segment could not be parsed.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum TextError {
    /// A pair has no `=`.
    #[error("text pair without '=': {0:?}")]
    MissingEquals(String),
    /// A key or value is too long or not UTF-8.
    #[error("malformed text key or value")]
    Malformed,
}

/// An ordered list of key=value pairs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TextPairs(pub Vec<(String, String)>);

impl TextPairs {
    /// Parses a data segment. Empty strings between nulls are skipped (padding).
    pub fn parse(data: &[u8]) -> Result<TextPairs, TextError> {
        let mut out = Vec::new();
        for item in data.split(|b| *b == 0) {
            if item.is_empty() {
                continue;
            }
            let s = std::str::from_utf8(item).map_err(|_| TextError::Malformed)?;
            let (k, v) = s
                .split_once('=')
                .ok_or_else(|| TextError::MissingEquals(s.to_string()))?;
            if k.is_empty() || k.len() > KEY_LEN_MAX || v.len() > VALUE_LEN_MAX {
                return Err(TextError::Malformed);
            }
            out.push((k.to_string(), v.to_string()));
        }
        Ok(TextPairs(out))
    }

    /// The value of the first pair with this key.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// Appends a pair.
    pub fn push(&mut self, key: impl Into<String>, value: impl Into<String>) {
        self.0.push((key.into(), value.into()));
    }

    /// Encodes as null-terminated pairs.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for (k, v) in &self.0 {
            out.extend_from_slice(k.as_bytes());
            out.push(b'=');
            out.extend_from_slice(v.as_bytes());
            out.push(0);
        }
        out
    }

    /// Whether there are no pairs.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_pairs() {
        let t = TextPairs::parse(b"InitiatorName=iqn.x\0SessionType=Normal\0\0").unwrap();
        assert_eq!(t.get("SessionType"), Some("Normal"));
        assert_eq!(t.0.len(), 2);
        assert!(TextPairs::parse(b"novalue\0").is_err());
    }

    proptest! {
        #[test]
        fn roundtrip(pairs in proptest::collection::vec(("[A-Za-z][A-Za-z0-9.]{0,20}", "[ -<>-~]{0,40}"), 0..8)) {
            let t = TextPairs(pairs);
            prop_assert_eq!(TextPairs::parse(&t.encode()).unwrap(), t);
        }
    }
}
