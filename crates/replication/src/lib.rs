//! The replicated volume's protocol, sans-IO: a [`Primary`] and its [`Replica`]s as
//! state machines that take events (a write submitted, a message received, a link up or
//! down, the control plane's decision, time) and return [`Action`]s (send this, write
//! that locally, complete the initiator's write, ask the control plane to change the
//! in-sync set). The driver owns sockets, disks and clocks; the deterministic
//! simulation in this crate's tests drives the same state machines through crashes,
//! partitions and reordering.
//!
//! The model is primary-backup with an in-sync set (ISR) arbitrated by the control
//! plane, DRBD protocol C semantics, as PacificA and Kafka do it:
//!
//! - A write is acknowledged to the initiator only when the primary's local write and
//!   every member of the committed ISR have it. Dropping a silent replica from the ISR
//!   needs a control-plane commit first, so a primary cut off from the control plane
//!   can never acknowledge a write its replicas lack.
//! - Every primary term has an epoch. Replicas persist the highest epoch they have seen
//!   and refuse older ones; a new primary *seals* the ISR at its epoch before serving:
//!   every member reports the regions it may hold unacknowledged writes in (its activity
//!   log), and the new primary rewrites the union of those regions on every member, so
//!   the members are identical before the first new write.
//! - The primary serves only while it holds a lease from the control plane, measured
//!   on its own monotonic clock from before it asked; the control plane promotes a new
//!   primary only after the old lease has expired on its own clock.
//! - While a replica is out of the ISR the primary marks the regions written since in a
//!   dirty bitmap; when the replica returns it joins the stream at the current position
//!   and receives the dirty regions (and those its own activity log names) as ordinary
//!   writes in that stream, then the primary asks the control plane to add it back.

mod activity_log;
mod bitmap;
mod execute;
mod message;
pub mod net;
mod primary;
mod record;
mod replica;
#[cfg(test)]
mod sim;
mod volume;

pub use bitmap::{DirtyMap, RegionSet};
pub use message::{Epoch, Message, NodeId, Payload, Seq};
pub use primary::{Action, Primary, PrimaryConfig, ResyncProgress, VerifyReport, WriteTag};
pub use replica::{Replica, ReplicaAction, ACTIVITY_LOG_SLACK};
pub use volume::{
    ControlPlane, LocalCopy, Notice, PrimaryStats, PrimaryVolume, ReplicaState, ReplicaVolume,
    ResyncStatus, Transport,
};
