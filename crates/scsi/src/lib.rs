//! SCSI target core for Bulwark: SPC-4 and SBC-3 command execution over a [`BlockDevice`].
//!
//! No sockets and no threads here: the transport (the `target` crate) hands a
//! [`ScsiRequest`] to [`TargetDevice::execute`] and sends back the [`ScsiResponse`].
//! Execution is blocking (it reads and writes the device), so the transport calls it off
//! its async runtime threads.
#![warn(missing_docs)]
#![forbid(unsafe_code)]
#![cfg_attr(
    not(test),
    deny(clippy::indexing_slicing, clippy::unwrap_used, clippy::expect_used)
)]
// `is_multiple_of` is newer than the workspace's rust-version (1.80).
#![allow(clippy::manual_is_multiple_of)]

pub mod alua;
pub mod cdb;
mod commands;
mod lu;
mod mode;
mod pr;
mod sanitize;
mod sbc;
pub mod sense;
mod spc;
pub mod stats;
mod target_device;
#[cfg(test)]
mod tests;
mod vpd;
mod xcopy;

pub use block_device::{BlockDevice, Extent, Provisioning, WriteDone};

/// The storage seam, re-exported: the trait lives in its own crate so the stores
/// implement it without depending on SCSI.
pub mod device {
    pub use block_device::*;
}

/// The in-memory device for tests, re-exported from `block-device`.
pub mod testing {
    pub use block_device::mem::*;
}
pub use sense::{check_condition, Sense, SenseKey};
pub use spc::encode_lun;
pub use target_device::{
    ForwardedCommand, ForwardedTaskManagement, Forwarder, LuConfig, Preempted, RemotePaths,
    ReservationStore, ScsiError, TargetDevice, SANITIZE_BYTES_PER_S_DEFAULT,
};

use bytes::Bytes;

/// SCSI status codes (SAM-5 §5.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum ScsiStatus {
    /// GOOD.
    Good = 0x00,
    /// CHECK CONDITION: sense data describes the error.
    CheckCondition = 0x02,
    /// CONDITION MET (PRE-FETCH).
    ConditionMet = 0x04,
    /// BUSY.
    Busy = 0x08,
    /// RESERVATION CONFLICT.
    ReservationConflict = 0x18,
    /// TASK SET FULL.
    TaskSetFull = 0x28,
    /// ACA ACTIVE.
    AcaActive = 0x30,
    /// TASK ABORTED.
    TaskAborted = 0x40,
}

/// Task attribute of a command (SAM-5 §8.9).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum TaskAttribute {
    /// Untagged (treated as simple).
    Untagged,
    /// SIMPLE.
    #[default]
    Simple,
    /// ORDERED.
    Ordered,
    /// HEAD OF QUEUE.
    HeadOfQueue,
    /// ACA.
    Aca,
}

/// A SCSI target port as seen by the logical units (SPC-4 §4.3.4, VPD 0x83).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TargetPort {
    /// SCSI target port name, for iSCSI `<target iqn>,t,0x<tpgt as 4 hex digits>`.
    pub name: String,
    /// Relative target port identifier (1-based).
    pub relative_id: u16,
    /// Target port group this port belongs to.
    pub group: u16,
}

/// An I_T nexus: one initiator port talking to one target port (SAM-5 §4.7).
/// Unit attentions, reservations and registrations are kept per I_T nexus.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ItNexus {
    /// iSCSI initiator name (the initiator device name).
    pub initiator_name: String,
    /// Initiator session identifier (ISID), part of the initiator port name
    /// `<initiator name>,i,0x<isid as 12 hex digits>`.
    pub isid: [u8; 6],
    /// The target port.
    pub target_port: TargetPort,
}

impl ItNexus {
    /// The SCSI initiator port name: `<name>,i,0x<isid>` (RFC 7143 §4.4.2 / SPC-4 TransportID).
    pub fn initiator_port_name(&self) -> String {
        let mut s = format!("{},i,0x", self.initiator_name);
        for b in self.isid {
            s.push_str(&format!("{b:02x}"));
        }
        s
    }
}

/// One SCSI command handed to the target device.
#[derive(Debug)]
pub struct ScsiRequest<'a> {
    /// The I_T nexus the command arrived on.
    pub nexus: &'a ItNexus,
    /// Logical unit number as the 8-byte SAM LUN field decoded to a flat LUN (0..16383).
    pub lun: u64,
    /// The CDB, exactly as received (trailing padding of the 16-byte iSCSI field included).
    pub cdb: &'a [u8],
    /// Data-Out buffer: all data the initiator sent for this command (may be shorter than
    /// the CDB asks for if the initiator sent less; the command then fails as SBC says).
    /// `Bytes`, so a command forwarded to another node takes it without a copy.
    pub data_out: &'a Bytes,
    /// Expected data transfer length from the transport, in bytes (Data-In direction for
    /// reads). Data-In longer than this is truncated by the transport, which reports the
    /// residual.
    pub expected_data_in_len: u32,
    /// Task attribute.
    pub attr: TaskAttribute,
    /// When the command arrived at the target (its command PDU), for the latency
    /// histogram of [`stats::IoStats`].
    pub arrived: std::time::Instant,
}

/// The result of a SCSI command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScsiResponse {
    /// Status.
    pub status: ScsiStatus,
    /// Sense data (fixed or descriptor format as the control mode page's D_SENSE says),
    /// present with CHECK CONDITION.
    pub sense: Option<Bytes>,
    /// Data-In: the bytes the command returns, already cut to its allocation length.
    pub data_in: Bytes,
}

/// Where a command's response goes, exactly once (see [`TargetDevice::execute_then`]).
/// Dropped without a response — a handler panicked, a device lost a completion — it
/// answers CHECK CONDITION, HARDWARE ERROR, so an initiator never waits for a command
/// that is gone.
pub struct Responder(Option<Box<dyn FnOnce(ScsiResponse) + Send>>);

impl Responder {
    /// A responder that hands the response to `f`.
    pub fn new(f: impl FnOnce(ScsiResponse) + Send + 'static) -> Responder {
        Responder(Some(Box::new(f)))
    }

    /// Sends the response.
    pub fn send(mut self, response: ScsiResponse) {
        if let Some(f) = self.0.take() {
            f(response);
        }
    }
}

impl Drop for Responder {
    fn drop(&mut self) {
        if let Some(f) = self.0.take() {
            f(check_condition(
                Sense::HARDWARE_ERROR_INTERNAL_TARGET_FAILURE,
            ));
        }
    }
}

impl std::fmt::Debug for Responder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Responder")
    }
}

/// Task management functions that reach the logical units (SAM-5 §7).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResetKind {
    /// LOGICAL UNIT RESET of one LUN.
    LogicalUnit,
    /// TARGET WARM RESET.
    TargetWarm,
    /// TARGET COLD RESET.
    TargetCold,
}
