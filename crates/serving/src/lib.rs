//! What a storage node serves, kept equal to what the cluster state says: between the
//! control plane (`cluster`), replication (`replication`), SCSI execution (`scsi`) and
//! the iSCSI server (`iscsi-target`). The binary wires it up; everything a node does
//! to serve the cluster's targets lives here:
//!
//! - [`reconcile`]: the loop that turns the committed state into running roles
//!   (primary or replica of each volume, leases), targets and LUNs, ALUA port groups
//!   and persistent reservations kept in the cluster;
//! - [`forward`]: SCSI commands through a non-optimized port, executed by the primary;
//! - [`admission`]: which node may say what over replication and forwarding links;
//! - [`vip`]: virtual IPs that follow a target's primary;
//! - [`lu_identity`]: serial numbers and NAA identifiers that never change.

pub mod admission;
pub mod forward;
pub mod lu_identity;
pub mod reconcile;
pub mod snapshots;
pub mod space;
pub mod vip;

#[cfg(test)]
pub(crate) mod test_support {
    use cluster::state::{ClusterState, Command, NodeAddresses};

    /// A cluster state with storage nodes n1 … n`count` on 127.0.0.1 … (1 TiB each).
    pub(crate) fn state_with_nodes(count: u8) -> ClusterState {
        let mut st = ClusterState::default();
        for i in 1..=count {
            let a = |port| std::net::SocketAddr::from(([127, 0, 0, i], port));
            st.apply(&Command::AddNode {
                name: format!("n{i}"),
                addresses: NodeAddresses {
                    control: a(3261),
                    replication: a(3262),
                    portals: vec![a(3260)],
                },
                capacity_bytes: 1 << 40,
                public_key: None,
            })
            .unwrap();
        }
        st
    }
}

pub use reconcile::{
    port_group_of, port_groups, target_nodes, FailoverCounts, Serving, REGION_SIZE,
};

/// Why serving could not start or keep up with the cluster state. Each says what failed
/// and where; the reconcile loop logs it and tries again at the next state change.
#[derive(Debug, thiserror::Error)]
pub enum ServingError {
    /// A volume's file could not be opened, created or grown.
    #[error("volume {volume}: {source}")]
    Store {
        /// Volume name (or what was being done to it).
        volume: String,
        /// What the store said.
        source: blockstore::StoreError,
    },
    /// A file or folder of this node's data could not be used.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        source: std::io::Error,
    },
    /// A LUN could not be added to a target.
    #[error("{target} LUN {lun}: {reason}")]
    Lun {
        /// Target IQN.
        target: String,
        /// LUN.
        lun: u64,
        /// Why.
        reason: String,
    },
    /// The node's certificate cannot serve replication links.
    #[error("replication: {0}")]
    Identity(#[from] cluster::identity::IdentityError),
    /// A lock was poisoned by a panic elsewhere in this process.
    #[error("internal state poisoned by an earlier panic ({0}); restart the node")]
    Poisoned(&'static str),
}
