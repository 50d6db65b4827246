//! iSCSI names (RFC 7143 §4.2.7; RFC 3720 §3.2.6): the `iqn.`, `eui.` and `naa.` formats,
//! checked before a name from the network is used, stored or logged.
//!
//! RFC 7143 builds names from ASCII lower-case letters, digits, `-`, `.` and `:`, plus
//! whatever else the iSCSI stringprep profile (RFC 3722) lets through. We implement no
//! stringprep, so that "else" is empty here: a name with any other character (a space, a
//! control character such as `\n`, `_`, `/`, non-ASCII) is refused.
//!
//! Case: iSCSI names are case-insensitive; RFC 3722's profile maps upper case to lower
//! case before names are compared. An ASCII upper-case letter is therefore accepted here
//! (it is a lower-case letter before normalisation), the RFC's own examples write the
//! hex digits of `eui.` and `naa.` names in upper case, and some initiators put a host
//! name with capitals into their `iqn.`. Callers compare names with
//! [`str::eq_ignore_ascii_case`]; a name to be stored (a control-plane object) should be
//! stored in its normal form, [`str::to_ascii_lowercase`].

use std::fmt;

use thiserror::Error;

/// Longest iSCSI name in bytes (RFC 7143 §4.2.7: "iSCSI names ... MUST NOT be larger than
/// 223 bytes").
pub const NAME_BYTES_MAX: usize = 223;

/// Why a string is not an iSCSI name. The messages say what is wrong and how a good name
/// looks, so the control plane can show them to an administrator as they are.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum NameError {
    /// The name is empty.
    #[error("the iSCSI name is empty")]
    Empty,
    /// Longer than [`NAME_BYTES_MAX`].
    #[error("the iSCSI name is {0} bytes long; at most 223 are allowed (RFC 7143 §4.2.7)")]
    TooLong(usize),
    /// A character outside a–z, A–Z, 0–9, `-`, `.`, `:`.
    #[error(
        "character {} at byte {at} is not allowed in an iSCSI name; use letters a-z, digits, \
         '-', '.' and ':' (RFC 7143 §4.2.7)",
        Shown(*.ch)
    )]
    Character {
        /// The character.
        ch: char,
        /// Its byte offset in the name.
        at: usize,
    },
    /// Neither `iqn.`, `eui.` nor `naa.`.
    #[error(
        "an iSCSI name starts with \"iqn.\", \"eui.\" or \"naa.\", e.g. \
         iqn.2001-04.com.example:storage (RFC 7143 §4.2.7)"
    )]
    Type,
    /// `iqn.` not followed by a `yyyy-mm.` date.
    #[error(
        "an iqn. name continues with the date yyyy-mm (month 01 to 12) and a '.', e.g. \
         iqn.2001-04.com.example"
    )]
    Date,
    /// No reversed domain name after the date, or one with an empty label.
    #[error(
        "an iqn. name needs the reversed domain name of its naming authority after the \
         date, with no empty part between dots, e.g. iqn.2001-04.com.example"
    )]
    NamingAuthority,
    /// A `:` with nothing after it.
    #[error("nothing follows the ':' of the iqn. name; drop the ':' or add a unique string")]
    EmptyUniqueName,
    /// `eui.` not followed by exactly 16 hex digits.
    #[error("an eui. name is \"eui.\" followed by 16 hexadecimal digits (an EUI-64)")]
    Eui,
    /// `naa.` not followed by 16 or 32 hex digits.
    #[error(
        "an naa. name is \"naa.\" followed by 16 or 32 hexadecimal digits (an NAA 64- or \
         128-bit identifier)"
    )]
    Naa,
}

/// Checks that `name` is an iSCSI name in one of the three formats of RFC 7143 §4.2.7:
///
/// - `iqn.` + `yyyy-mm` + `.` + reversed domain name, then optionally `:` and a unique
///   string (`iqn.1993-08.org.debian:01:abcdef`, `iqn.2008-11.org.linux-kvm`);
/// - `eui.` + 16 hex digits (`eui.02004567A425678D`);
/// - `naa.` + 16 or 32 hex digits (`naa.52004567BA64678D`).
///
/// At most 223 bytes of ASCII letters (either case, see the module doc), digits, `-`,
/// `.`, `:` and `_`. RFC 3720 §3.2.6.2 does not list `_`, but initiators put it in
/// names (QEMU appends the VM's name, and VM names often have one); it is harmless
/// here (no separator, no control character), so it is tolerated as LIO does. The
/// first problem found is returned.
pub fn check_iscsi_name(name: &str) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty);
    }
    if name.len() > NAME_BYTES_MAX {
        return Err(NameError::TooLong(name.len()));
    }
    if let Some((at, ch)) = name
        .char_indices()
        .find(|(_, c)| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | ':' | '_')))
    {
        return Err(NameError::Character { ch, at });
    }
    // From here on the name is ASCII, so byte slicing cannot split a character.
    let prefix = name.get(..4).unwrap_or("").to_ascii_lowercase();
    let rest = name.get(4..).unwrap_or("");
    match prefix.as_str() {
        "iqn." => check_iqn(rest),
        "eui." if hex_digits(rest, &[16]) => Ok(()),
        "eui." => Err(NameError::Eui),
        "naa." if hex_digits(rest, &[16, 32]) => Ok(()),
        "naa." => Err(NameError::Naa),
        _ => Err(NameError::Type),
    }
}

/// The part of an `iqn.` name after the type: `yyyy-mm.authority[:unique]`.
fn check_iqn(rest: &str) -> Result<(), NameError> {
    let b = rest.as_bytes();
    let digits =
        |r: std::ops::Range<usize>| b.get(r).is_some_and(|d| d.iter().all(u8::is_ascii_digit));
    let month_ok = rest
        .get(5..7)
        .and_then(|m| m.parse::<u8>().ok())
        .is_some_and(|m| (1..=12).contains(&m));
    if !(digits(0..4)
        && b.get(4) == Some(&b'-')
        && digits(5..7)
        && month_ok
        && b.get(7) == Some(&b'.'))
    {
        return Err(NameError::Date);
    }
    let after_date = rest.get(8..).unwrap_or("");
    let (authority, unique) = match after_date.split_once(':') {
        Some((a, u)) => (a, Some(u)),
        None => (after_date, None),
    };
    if authority.is_empty() || authority.split('.').any(str::is_empty) {
        return Err(NameError::NamingAuthority);
    }
    if unique.is_some_and(str::is_empty) {
        return Err(NameError::EmptyUniqueName);
    }
    Ok(())
}

fn hex_digits(s: &str, lens: &[usize]) -> bool {
    lens.contains(&s.len()) && s.bytes().all(|c| c.is_ascii_hexdigit())
}

/// A character as an error message shows it: printable ASCII quoted, anything else as its
/// code point, so a control character or a look-alike cannot hide in a log or a terminal.
struct Shown(char);

impl fmt::Display for Shown {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_ascii_graphic() {
            write!(f, "'{}'", self.0)
        } else {
            write!(f, "U+{:04X}", u32::from(self.0))
        }
    }
}

/// Characters of a name a log line shows at most; the rest is summarised.
pub const LOGGED_CHARS_MAX: usize = 64;

/// A string from the network made safe for one log line: at most [`LOGGED_CHARS_MAX`]
/// characters, printable ASCII as it is, everything else (control characters, quotes,
/// backslashes, non-ASCII) escaped as by [`char::escape_default`], and a longer string cut
/// with the number of bytes it had. Formatting allocates nothing.
#[derive(Clone, Copy, Debug)]
pub struct Loggable<'a>(pub &'a str);

impl fmt::Display for Loggable<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, c) in self.0.chars().enumerate() {
            if i == LOGGED_CHARS_MAX {
                return write!(f, "...({} bytes)", self.0.len());
            }
            if (c.is_ascii_graphic() && c != '\\' && c != '"') || c == ' ' {
                write!(f, "{c}")?;
            } else {
                write!(f, "{}", c.escape_default())?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_of_real_initiators_and_targets_pass() {
        for good in [
            // open-iscsi on Debian/Ubuntu/Proxmox.
            "iqn.1993-08.org.debian:01:abcdef",
            "iqn.1993-08.org.debian:01:8d2b3f9a1c4e",
            // Red Hat, Windows, VMware (host names with capitals do occur).
            "iqn.1994-05.com.redhat:5a6b7c8d9e0f",
            "iqn.1991-05.com.microsoft:host-01.corp.example.com",
            "iqn.1998-01.com.vmware:ESX01-5f2a3b4c",
            // libiscsi's iscsi-test-cu (both initiators).
            "iqn.2007-10.com.github:sahlberg:libiscsi:iscsi-test",
            "iqn.2007-10.com.github:sahlberg:libiscsi:iscsi-test-2",
            // QEMU without and with a VM UUID.
            "iqn.2008-11.org.linux-kvm",
            "iqn.2008-11.org.linux-kvm:6f1e3c2a-8b4d-4e5f-9a0b-1c2d3e4f5a6b",
            // Our own targets, including a single-label authority the control plane allows.
            "iqn.2026-11.io.bulwark:conformance",
            "iqn.2026-11.x:t",
            // RFC 7143's examples of the other two types.
            "eui.02004567A425678D",
            "eui.02004567a425678d",
            "naa.52004567BA64678D",
            "naa.62004567BA64678D0123456789ABCDEF",
        ] {
            assert_eq!(check_iscsi_name(good), Ok(()), "{good}");
        }
        let longest = format!("iqn.2026-11.io.bulwark:{}", "a".repeat(223 - 23));
        assert_eq!(longest.len(), 223);
        assert_eq!(check_iscsi_name(&longest), Ok(()));
    }

    #[test]
    fn bad_names_are_refused_with_the_reason() {
        let too_long = format!("iqn.2026-11.io.bulwark:{}", "a".repeat(201));
        let cases: Vec<(&str, NameError)> = vec![
            ("", NameError::Empty),
            (&too_long, NameError::TooLong(224)),
            (
                "iqn.1993-08.org.debian:01:ab\ncd",
                NameError::Character { ch: '\n', at: 28 },
            ),
            (
                "iqn.1993-08.org.debian:01:ab cd",
                NameError::Character { ch: ' ', at: 28 },
            ),
            (
                "iqn.2026-11.io.bulwark:my/target",
                NameError::Character { ch: '/', at: 25 },
            ),
            (
                "iqn.2026-11.io.bulwark:\u{0}",
                NameError::Character { ch: '\0', at: 23 },
            ),
            (
                "iqn.2026-11.io.bülwark",
                NameError::Character { ch: 'ü', at: 16 },
            ),
            ("foo", NameError::Type),
            ("iqn", NameError::Type),
            ("iqn:2026-11.x", NameError::Type),
            ("iqn.2026.io.x", NameError::Date),
            ("iqn.26-11.io.x", NameError::Date),
            ("iqn.2026-13.io.x", NameError::Date),
            ("iqn.2026-00.io.x", NameError::Date),
            ("iqn.2026-11", NameError::Date),
            ("iqn.2026-11io.x", NameError::Date),
            ("iqn.2026-11.", NameError::NamingAuthority),
            ("iqn.2026-11.:x", NameError::NamingAuthority),
            ("iqn.2026-11.io..x", NameError::NamingAuthority),
            ("iqn.2026-11.io.x.", NameError::NamingAuthority),
            ("iqn.2026-11.io.x:", NameError::EmptyUniqueName),
            ("eui.123", NameError::Eui),
            ("eui.02004567A425678DAA", NameError::Eui),
            ("eui.02004567A425678G", NameError::Eui),
            ("naa.12345678", NameError::Naa),
            ("naa.52004567BA64678D0", NameError::Naa),
        ];
        for (name, want) in cases {
            assert_eq!(check_iscsi_name(name), Err(want), "{name:?}");
        }
    }

    #[test]
    fn messages_show_bad_characters_safely() {
        let e = check_iscsi_name("iqn.2026-11.io.x:a\nb").unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("U+000A"), "{msg}");
        assert!(!msg.contains('\n'));
        let e = check_iscsi_name("iqn.2026-11.io.x:a/b").unwrap_err();
        assert!(e.to_string().contains("'/'"), "{e}");
        // Tolerated: QEMU names its initiator after the VM, and VM names have them.
        check_iscsi_name("iqn.2008-11.org.linux-kvm:my_vm_01").unwrap();
    }

    #[test]
    fn loggable_escapes_and_truncates() {
        assert_eq!(
            Loggable("iqn.2026-11.io.x:a").to_string(),
            "iqn.2026-11.io.x:a"
        );
        assert_eq!(
            Loggable("a\nb\u{1b}[31m\"\\é").to_string(),
            "a\\nb\\u{1b}[31m\\\"\\\\\\u{e9}"
        );
        let long = "x".repeat(300);
        let shown = Loggable(&long).to_string();
        assert_eq!(shown, format!("{}...(300 bytes)", "x".repeat(64)));
        assert!(!Loggable("\r\n\t").to_string().contains(['\r', '\n', '\t']));
    }

    proptest::proptest! {
        #[test]
        fn never_panics_and_accepts_only_the_alphabet(s in "\\PC{0,300}") {
            if check_iscsi_name(&s).is_ok() {
                proptest::prop_assert!(s.len() <= NAME_BYTES_MAX);
                let alphabet = |c: u8| c.is_ascii_alphanumeric() || b"-.:_".contains(&c);
                proptest::prop_assert!(s.bytes().all(alphabet));
            }
            let shown = Loggable(&s).to_string();
            proptest::prop_assert!(shown.chars().all(|c| c.is_ascii_graphic() || c == ' '));
        }
    }
}
