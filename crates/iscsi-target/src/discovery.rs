//! SendTargets (RFC 7143 §12.3 and Appendix C): the targets an initiator may see, each
//! with every portal and its portal group tag.

use std::net::SocketAddr;

use iscsi_proto::text::TextPairs;

use crate::registry::Shared;
use crate::TargetConfig;

/// Whether `initiator` may see and log in to `target` (its ACL).
pub(crate) fn allowed(target: &TargetConfig, initiator: &str) -> bool {
    match &target.allowed_initiators {
        None => true,
        Some(list) => list.iter().any(|i| i.eq_ignore_ascii_case(initiator)),
    }
}

/// Formats a portal as `TargetAddress` wants it: `host:port,tag`, IPv6 in brackets. A
/// wildcard listening address is replaced by the address the initiator reached us on.
fn target_address(addr: SocketAddr, tag: u16, local: Option<SocketAddr>) -> String {
    let ip = if addr.ip().is_unspecified() {
        local.map(|l| l.ip()).unwrap_or(addr.ip())
    } else {
        addr.ip()
    };
    match ip {
        std::net::IpAddr::V4(v4) => format!("{v4}:{},{tag}", addr.port()),
        std::net::IpAddr::V6(v6) => format!("[{v6}]:{},{tag}", addr.port()),
    }
}

/// Answers `SendTargets=<value>`: `All`, a target name, or empty for the session's own
/// target.
pub(crate) fn send_targets(
    shared: &Shared,
    value: &str,
    initiator: &str,
    session_target: Option<&str>,
    local: Option<SocketAddr>,
) -> TextPairs {
    let mut out = TextPairs::default();
    for t in shared.targets() {
        let wanted = match value {
            "All" => session_target.is_none(),
            "" => session_target == Some(t.name.as_str()),
            name => name == t.name,
        };
        if !wanted || !allowed(&t, initiator) {
            continue;
        }
        out.push("TargetName", t.name.clone());
        for p in t.portals.iter().chain(&t.remote_portals) {
            out.push("TargetAddress", target_address(p.addr, p.group_tag, local));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        let a: SocketAddr = "127.0.0.2:3260".parse().unwrap();
        assert_eq!(target_address(a, 2, None), "127.0.0.2:3260,2");
        let a: SocketAddr = "[::1]:3260".parse().unwrap();
        assert_eq!(target_address(a, 1, None), "[::1]:3260,1");
        let a: SocketAddr = "0.0.0.0:3260".parse().unwrap();
        let l: SocketAddr = "10.0.0.5:3260".parse().unwrap();
        assert_eq!(target_address(a, 1, Some(l)), "10.0.0.5:3260,1");
    }
}
