//! Persistent reservations kept in the cluster state, so every node that serves a
//! logical unit (and the next primary) sees the same registrations (SPC-4 §5.13).

use super::*;

/// Persistent reservations of a volume kept in the cluster state: a change completes
/// once the Raft log has it, and a new primary starts from the last one.
pub(super) struct ClusterReservations {
    pub(super) node: ClusterNode,
    pub(super) volume: String,
    pub(super) epoch: u64,
    pub(super) rt: tokio::runtime::Handle,
}

impl std::fmt::Debug for ClusterReservations {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterReservations")
            .field("volume", &self.volume)
            .field("epoch", &self.epoch)
            .finish()
    }
}

impl scsi::ReservationStore for ClusterReservations {
    fn load(&self) -> Option<String> {
        self.node
            .state()
            .borrow()
            .volumes
            .get(&self.volume)
            .and_then(|v| v.reservations.clone())
    }

    fn save(&self, state: &str) -> std::io::Result<()> {
        let cmd = Command::SetReservations {
            volume: self.volume.clone(),
            epoch: self.epoch,
            state: state.to_string(),
        };
        let node = self.node.clone();
        // Called on an I/O thread, never on the runtime.
        let r = self.rt.block_on(async move {
            tokio::time::timeout(Duration::from_secs(5), node.write(cmd)).await
        });
        match r {
            Ok(Ok(Ok(_))) => Ok(()),
            Ok(Ok(Err(refused))) => Err(std::io::Error::other(refused.to_string())),
            Ok(Err(e)) => Err(std::io::Error::other(e.to_string())),
            Err(_) => Err(std::io::Error::other("not committed within 5 s")),
        }
    }
}
