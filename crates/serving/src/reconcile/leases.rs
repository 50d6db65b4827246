//! Lease renewals for every primary on this node, in one request per round: the Raft
//! leader confirms its leadership once for all of them, however many volumes a node is
//! primary of (256 LUNs renewed one by one every 200 ms were 1280 leadership checks a
//! second, which drowned the leader; issue 19).

use super::*;

/// The primaries of this node whose leases are kept.
pub(super) struct Leases {
    node: ClusterNode,
    held: Mutex<BTreeMap<String, (u64, Arc<PrimaryVolume>)>>,
    /// A new primary: renew now rather than at the next round.
    wake: tokio::sync::Notify,
}

/// Keeps one primary's lease renewed until [`LeaseHandle::abort`] or drop.
pub(super) struct LeaseHandle {
    leases: Arc<Leases>,
    name: String,
    volume: Arc<PrimaryVolume>,
}

impl LeaseHandle {
    /// No renewal reaches the volume once this returns (a planned move releases the
    /// lease right after).
    pub(super) fn abort(&self) {
        if let Ok(mut held) = self.leases.held.lock() {
            if held
                .get(&self.name)
                .is_some_and(|(_, v)| Arc::ptr_eq(v, &self.volume))
            {
                held.remove(&self.name);
            }
        }
    }
}

impl Drop for LeaseHandle {
    fn drop(&mut self) {
        self.abort();
    }
}

impl Leases {
    pub(super) fn new(node: ClusterNode) -> Arc<Leases> {
        Arc::new(Leases {
            node,
            held: Mutex::default(),
            wake: tokio::sync::Notify::new(),
        })
    }

    /// Renews the lease of `volume`, primary of `name` at `epoch`, from now on.
    pub(super) fn hold(
        self: &Arc<Self>,
        name: &str,
        epoch: u64,
        volume: Arc<PrimaryVolume>,
    ) -> LeaseHandle {
        if let Ok(mut held) = self.held.lock() {
            held.insert(name.to_string(), (epoch, volume.clone()));
        }
        self.wake.notify_one();
        LeaseHandle {
            leases: self.clone(),
            name: name.to_string(),
            volume,
        }
    }

    /// Renews every held lease each round until the process stops.
    pub(super) async fn run(self: Arc<Self>) {
        loop {
            // A failed copy never serves again: its lease lapses, so the leader
            // promotes an in-sync replica.
            let batch: Vec<(String, u64)> = match self.held.lock() {
                Ok(held) => held
                    .iter()
                    .filter(|(_, (_, v))| v.failure().is_none())
                    .map(|(name, (epoch, _))| (name.clone(), *epoch))
                    .collect(),
                Err(_) => return,
            };
            let next = if batch.is_empty() {
                RENEW_EVERY
            } else {
                let sent = Instant::now();
                match self.node.renew_leases(&batch).await {
                    Ok(answers) => {
                        if let Ok(held) = self.held.lock() {
                            for ((name, epoch), answer) in batch.iter().zip(answers) {
                                match (answer, held.get(name)) {
                                    (Ok(()), Some((e, v))) if e == epoch => {
                                        v.lease(sent + cluster::node::LEASE - LEASE_MARGIN)
                                    }
                                    (Err(why), _) => {
                                        tracing::debug!(volume = %name, %why, "lease not renewed")
                                    }
                                    _ => {}
                                }
                            }
                        }
                        RENEW_EVERY
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "leases not renewed");
                        // No leader, or a new one: renew as soon as one answers.
                        RENEW_RETRY
                    }
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(next) => {}
                _ = self.wake.notified() => {}
            }
        }
    }
}
