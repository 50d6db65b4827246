//! Bounds on connections a listener holds at once, so that a flood of strangers (or a
//! slowloris holding each connection open) cannot take the slots the cluster itself
//! needs: each source address has a cap, and the cluster's members have slots of their
//! own that strangers never use. A member is recognised by its source address (nodes
//! connect from their own addresses); it still proves who it is with its certificate
//! afterwards, so an address alone grants a slot, never access.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// How many connections a listener admits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// From addresses that are not members', in all.
    pub strangers: usize,
    /// From members' addresses, in all.
    pub members: usize,
    /// From any one address that is not a member's.
    pub per_source: usize,
}

/// Counts the connections a listener holds.
#[derive(Debug)]
pub struct ConnectionLimiter {
    limits: Limits,
    counts: Mutex<Counts>,
}

#[derive(Debug, Default)]
struct Counts {
    strangers: usize,
    members: usize,
    by_source: HashMap<IpAddr, usize>,
}

/// One admitted connection; dropping it gives the slot back.
#[derive(Debug)]
pub struct Slot {
    limiter: Arc<ConnectionLimiter>,
    source: IpAddr,
    member: bool,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let Ok(mut c) = self.limiter.counts.lock() else {
            return;
        };
        if self.member {
            c.members = c.members.saturating_sub(1);
        } else {
            c.strangers = c.strangers.saturating_sub(1);
            if let Some(n) = c.by_source.get_mut(&self.source) {
                *n -= 1;
                if *n == 0 {
                    c.by_source.remove(&self.source);
                }
            }
        }
    }
}

/// Why a connection was not admitted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The source holds its share already.
    SourceFull,
    /// Every slot of its kind is taken.
    Full,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Refusal::SourceFull => "too many connections from this address",
            Refusal::Full => "too many connections",
        })
    }
}

impl ConnectionLimiter {
    /// A limiter with `limits`.
    pub fn new(limits: Limits) -> Arc<ConnectionLimiter> {
        Arc::new(ConnectionLimiter {
            limits,
            counts: Mutex::default(),
        })
    }

    /// Admits a connection from `source` (a member's address if `member`), or says
    /// why not.
    pub fn admit(self: &Arc<Self>, source: IpAddr, member: bool) -> Result<Slot, Refusal> {
        let mut c = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        if member {
            if c.members >= self.limits.members {
                return Err(Refusal::Full);
            }
            c.members += 1;
        } else {
            let from_source = c.by_source.get(&source).copied().unwrap_or(0);
            if from_source >= self.limits.per_source {
                return Err(Refusal::SourceFull);
            }
            if c.strangers >= self.limits.strangers {
                return Err(Refusal::Full);
            }
            c.strangers += 1;
            *c.by_source.entry(source).or_default() += 1;
        }
        Ok(Slot {
            limiter: self.clone(),
            source,
            member,
        })
    }
}

/// Whether `ip` is one of the addresses of a member in `state`.
pub fn is_member_address(state: &crate::state::ClusterState, ip: IpAddr) -> bool {
    state
        .nodes
        .values()
        .any(|n| n.addresses.networks().contains(&ip))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strangers_cannot_take_members_slots_and_each_source_has_a_cap() {
        let l = ConnectionLimiter::new(Limits {
            strangers: 4,
            members: 2,
            per_source: 2,
        });
        let a: IpAddr = [198, 18, 0, 1].into();
        let b: IpAddr = [198, 18, 0, 2].into();
        let c: IpAddr = [198, 18, 0, 3].into();
        let m: IpAddr = [198, 18, 1, 1].into();
        let a1 = l.admit(a, false).unwrap();
        let _a2 = l.admit(a, false).unwrap();
        assert_eq!(l.admit(a, false).unwrap_err(), Refusal::SourceFull);
        let _b1 = l.admit(b, false).unwrap();
        let _b2 = l.admit(b, false).unwrap();
        assert_eq!(l.admit(c, false).unwrap_err(), Refusal::Full);
        // Members still get in.
        let _m1 = l.admit(m, true).unwrap();
        let _m2 = l.admit(m, true).unwrap();
        assert_eq!(l.admit(m, true).unwrap_err(), Refusal::Full);
        // A closed connection gives its slot back.
        drop(a1);
        let _c1 = l.admit(c, false).unwrap();
    }
}
