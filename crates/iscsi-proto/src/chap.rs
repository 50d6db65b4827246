//! CHAP with MD5 (RFC 1994, as RFC 7143 §12.1.3 uses it): challenges, responses and the
//! hex/base64 encodings of binary values (RFC 7143 §6.1).

use md5::{Digest, Md5};

/// CHAP algorithm number of MD5 (CHAP_A=5).
pub const CHAP_MD5: u8 = 5;

/// Computes `MD5(id || secret || challenge)`.
pub fn response(id: u8, secret: &[u8], challenge: &[u8]) -> [u8; 16] {
    let mut h = Md5::new();
    h.update([id]);
    h.update(secret);
    h.update(challenge);
    h.finalize().into()
}

/// Encodes binary as `0x` + lower-case hex.
pub fn encode_hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(2 + bytes.len() * 2);
    s.push_str("0x");
    for b in bytes {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// Decodes a binary value: `0x`/`0X` hex or `0b`/`0B` base64 (RFC 7143 §6.1).
pub fn decode_binary(s: &str) -> Option<Vec<u8>> {
    let (prefix, body) = (s.get(..2)?, s.get(2..)?);
    match prefix {
        "0x" | "0X" => {
            let body = if body.len() % 2 == 1 {
                format!("0{body}")
            } else {
                body.to_string()
            };
            (0..body.len())
                .step_by(2)
                .map(|i| {
                    body.get(i..i + 2)
                        .and_then(|h| u8::from_str_radix(h, 16).ok())
                })
                .collect()
        }
        "0b" | "0B" => decode_base64(body),
        _ => None,
    }
}

fn decode_base64(s: &str) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    let mut acc = 0u32;
    let mut bits = 0;
    for c in s.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            b'=' => break,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    Some(out)
}

/// Compares two byte strings in time independent of where they differ.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_and_base64() {
        assert_eq!(decode_binary("0x0102ff"), Some(vec![1, 2, 255]));
        assert_eq!(decode_binary("0X1"), Some(vec![1]));
        assert_eq!(decode_binary("0bAQL/"), Some(vec![1, 2, 255]));
        assert_eq!(decode_binary("12"), None);
        assert_eq!(encode_hex(&[1, 0xab]), "0x01ab");
    }

    #[test]
    fn md5_response_matches_rfc1994_shape() {
        let r = response(1, b"secret", &[0u8; 16]);
        assert_eq!(r, response(1, b"secret", &[0u8; 16]));
        assert_ne!(r, response(2, b"secret", &[0u8; 16]));
        assert!(constant_time_eq(&r, &r));
        assert!(!constant_time_eq(&r, &[0; 16]));
    }
}
