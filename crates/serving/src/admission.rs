//! Who may talk to this node over replication, and what they may say. Links are
//! mutual TLS with node certificates the committed state still counts as members',
//! connections are bounded per address ([`start_replication`]), and every replication
//! and forwarding frame from another node is checked against the committed cluster
//! state before a volume or the forwarding handler sees it. The TLS
//! handshake already proved which node sent it; this decides whether that node may say
//! it: only the primary the state names writes to replicas at the current epoch, only
//! a volume's members answer for it, nobody writes past a volume's end or claims an
//! epoch the cluster never committed, and only nodes that serve a target forward for it.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use cluster::state::{ClusterState, NodeId};
use replication::net::{Admission, Claim, Verdict};
use tokio::sync::watch;

use crate::reconcile::target_nodes;

/// Replication connections held at once: few from strangers (nobody but nodes has
/// business there), slots of their own for members (a link per peer, and reconnects).
const REPLICATION_LIMITS: cluster::limits::Limits = cluster::limits::Limits {
    strangers: 64,
    members: 64,
    per_source: 8,
};

/// Starts this node's replication endpoint: its certificate on every link, peers
/// admitted only as members, connections bounded, frames judged by [`StateAdmission`];
/// with `plaintext`, traffic in the clear after the handshake where the peer agrees.
pub async fn start_replication(
    node: &cluster::ClusterNode,
    plaintext: bool,
) -> Result<Arc<replication::net::ReplicationNet>, crate::ServingError> {
    let identity = node.identity();
    let tls = identity.tls()?;
    let state = node.state();
    let members = node.state();
    let limiter = cluster::limits::ConnectionLimiter::new(REPLICATION_LIMITS);
    let security = replication::net::LinkSecurity {
        server: tls.link_server,
        client: tls.client,
        admit: Arc::new(move |certs| {
            let peer = cluster::identity::peer_cert(Some(certs))
                .ok_or("the peer showed no certificate")??;
            cluster::identity::check_member(&state.borrow(), &peer)?;
            Ok(replication::NodeId(peer.node))
        }),
        plaintext,
        admit_connection: Some(Arc::new(move |ip| {
            let member = cluster::limits::is_member_address(&members.borrow(), ip);
            limiter
                .admit(ip, member)
                .map(|slot| Box::new(slot) as Box<dyn Send + Sync>)
                .map_err(|why| why.to_string())
        })),
    };
    if plaintext {
        tracing::warn!("replication traffic goes in the clear to nodes that also run with --replication-tls off (keep it on a dedicated network)");
    }
    let net = replication::net::ReplicationNet::start(
        replication::NodeId(identity.node_id),
        security,
        identity.addresses.replication,
    )
    .await
    .map_err(|source| crate::ServingError::Io {
        what: format!(
            "starting the replication listener on {}",
            identity.addresses.replication
        ),
        source,
    })?;
    net.set_admission(Arc::new(StateAdmission::new(
        identity.node_id,
        node.state(),
    )));
    Ok(net)
}

/// The admission of a node, over the state it has applied.
pub struct StateAdmission {
    me: NodeId,
    state: watch::Receiver<Arc<ClusterState>>,
}

impl StateAdmission {
    /// Judges frames arriving at node `me`.
    pub fn new(me: NodeId, state: watch::Receiver<Arc<ClusterState>>) -> StateAdmission {
        StateAdmission { me, state }
    }
}

impl Admission for StateAdmission {
    fn check(&self, from: replication::NodeId, claim: &Claim<'_>) -> Verdict {
        judge(&self.state.borrow(), self.me, from.0, claim)
    }

    fn state_changed(&self) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        let mut rx = self.state.clone();
        Box::pin(async move {
            rx.borrow_and_update();
            // Bounded: a change between the check and this wait is caught on the next
            // round rather than missed.
            let _ = tokio::time::timeout(Duration::from_millis(50), rx.changed()).await;
        })
    }
}

/// The verdict of the state `st` on `claim` from node `from`, at node `me`.
pub fn judge(st: &ClusterState, me: NodeId, from: NodeId, claim: &Claim<'_>) -> Verdict {
    match *claim {
        Claim::Volume {
            volume,
            to_replica,
            epoch,
            fenced,
            write_end,
        } => {
            // A volume this node has not heard of yet may be being created.
            let Some(v) = st.volumes.get(volume) else {
                return Verdict::Ahead;
            };
            if !v.replicas.contains(&from) {
                return Verdict::Refuse(format!("node {from} holds no replica of volume {volume}"));
            }
            if epoch > replication::Epoch(v.epoch) {
                // Committed elsewhere but not applied here yet, or forged: waited
                // for, then refused.
                return Verdict::Ahead;
            }
            if to_replica {
                // An older primary's message goes through: the replica answers it
                // with Fenced, which is how a deposed primary learns it.
                if epoch == replication::Epoch(v.epoch) && from != v.primary {
                    return Verdict::Refuse(format!(
                        "node {from} is not the primary of volume {volume} at epoch {epoch} (node {} is)",
                        v.primary
                    ));
                }
                if write_end.is_some_and(|end| end > v.size_bytes) {
                    // A resize may not have been applied here yet.
                    return Verdict::Ahead;
                }
            } else if from == v.primary && epoch == replication::Epoch(v.epoch) && !fenced {
                return Verdict::Refuse(format!(
                    "node {from} is the primary of volume {volume}; it sends no replica answers"
                ));
            }
            Verdict::Accept
        }
        Claim::Forward { target } => {
            let Some(t) = st.targets.get(target) else {
                return Verdict::Ahead;
            };
            let nodes = target_nodes(st, t);
            if !nodes.contains(&from) {
                return Verdict::Refuse(format!(
                    "node {from} does not serve target {target}; it may not forward for it"
                ));
            }
            if !nodes.contains(&me) {
                return Verdict::Refuse(format!(
                    "this node does not serve target {target}; node {from} forwarded for it"
                ));
            }
            Verdict::Accept
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cluster::state::Command;

    fn state() -> ClusterState {
        let mut st = crate::test_support::state_with_nodes(3);
        st.apply(&Command::CreateVolume {
            name: "v".into(),
            size_bytes: 1 << 30,
            replicas: 2,
            block_size: 512,
            physical_block_size: None,
            nodes: vec!["n1".into(), "n2".into()],
        })
        .unwrap();
        st.apply(&Command::CreateTarget {
            iqn: "iqn.2026-11.t:a".into(),
            alias: None,
        })
        .unwrap();
        st.apply(&Command::AddLun {
            iqn: "iqn.2026-11.t:a".into(),
            lun: None,
            volume: "v".into(),
        })
        .unwrap();
        st
    }

    fn volume(to_replica: bool, epoch: u64, write_end: Option<u64>) -> Claim<'static> {
        Claim::Volume {
            volume: "v",
            to_replica,
            epoch: replication::Epoch(epoch),
            fenced: false,
            write_end,
        }
    }

    #[test]
    fn only_the_primary_at_its_epoch_writes_inside_the_volume() {
        let st = state();
        let v = &st.volumes["v"];
        let (p, r, e) = (v.primary, v.replicas[1], v.epoch);
        assert_eq!(
            judge(&st, r, p, &volume(true, e, Some(4096))),
            Verdict::Accept
        );
        // A replica, or a node holding nothing, posing as the primary.
        assert!(matches!(
            judge(&st, p, r, &volume(true, e, Some(4096))),
            Verdict::Refuse(_)
        ));
        assert!(matches!(
            judge(&st, r, 3, &volume(true, e, None)),
            Verdict::Refuse(_)
        ));
        // A Seal at an epoch nobody committed (u64::MAX) is never persisted.
        assert_eq!(
            judge(&st, r, p, &volume(true, u64::MAX, None)),
            Verdict::Ahead
        );
        // Past the end: held for a resize to be applied, then refused by the caller.
        assert_eq!(
            judge(&st, r, p, &volume(true, e, Some((1 << 30) + 1))),
            Verdict::Ahead
        );
        // An older epoch reaches the replica, which answers Fenced.
        if e > 0 {
            assert_eq!(
                judge(&st, r, p, &volume(true, e - 1, None)),
                Verdict::Accept
            );
        }
    }

    #[test]
    fn answers_come_from_replicas_and_fenced_names_a_committed_epoch() {
        let st = state();
        let v = &st.volumes["v"];
        let (p, r, e) = (v.primary, v.replicas[1], v.epoch);
        assert_eq!(judge(&st, p, r, &volume(false, e, None)), Verdict::Accept);
        assert!(matches!(
            judge(&st, p, 3, &volume(false, e, None)),
            Verdict::Refuse(_)
        ));
        let fenced = |epoch| Claim::Volume {
            volume: "v",
            to_replica: false,
            epoch,
            fenced: true,
            write_end: None,
        };
        assert_eq!(
            judge(&st, p, r, &fenced(replication::Epoch(e))),
            Verdict::Accept
        );
        assert_eq!(
            judge(&st, p, r, &fenced(replication::Epoch(e + 1))),
            Verdict::Ahead
        );
        // Unknown volume: maybe being created.
        let other = Claim::Volume {
            volume: "w",
            to_replica: true,
            epoch: replication::Epoch(1),
            fenced: false,
            write_end: None,
        };
        assert_eq!(judge(&st, r, p, &other), Verdict::Ahead);
    }

    #[test]
    fn only_nodes_serving_a_target_forward_for_it() {
        let st = state();
        let target = Claim::Forward {
            target: "iqn.2026-11.t:a",
        };
        assert_eq!(judge(&st, 1, 2, &target), Verdict::Accept);
        assert!(matches!(judge(&st, 1, 3, &target), Verdict::Refuse(_)));
        assert!(matches!(judge(&st, 3, 1, &target), Verdict::Refuse(_)));
        assert_eq!(
            judge(&st, 1, 2, &Claim::Forward { target: "iqn.x:y" }),
            Verdict::Ahead
        );
    }
}
