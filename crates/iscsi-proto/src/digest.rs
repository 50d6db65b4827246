//! CRC32C header and data digests (RFC 7143 §13.1; the digest covers the data segment
//! including its padding).

/// CRC32C of `parts` taken as one byte string.
pub fn crc32c(parts: &[&[u8]]) -> u32 {
    parts.iter().fold(0, |crc, p| crc32c::crc32c_append(crc, p))
}

/// Bytes of padding after a data segment of `len` bytes (segments end on 4-byte bounds).
pub fn pad_len(len: usize) -> usize {
    (4 - len % 4) % 4
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3720_vector() {
        // RFC 3720 B.4: 32 bytes of zeroes.
        assert_eq!(crc32c(&[&[0u8; 32]]), 0x8a91_36aa);
        assert_eq!(crc32c(&[&[0u8; 16], &[0u8; 16]]), 0x8a91_36aa);
        assert_eq!(crc32c(&[&[0xffu8; 32]]), 0x62a8_ab43);
    }

    #[test]
    fn padding() {
        assert_eq!(pad_len(0), 0);
        assert_eq!(pad_len(1), 3);
        assert_eq!(pad_len(4), 0);
        assert_eq!(pad_len(7), 1);
    }
}
