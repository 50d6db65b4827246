//! Sans-IO iSCSI (RFC 7143): the PDU codec, text keys, login negotiation, CHAP, CRC32C
//! digests and serial-number arithmetic.
//!
//! Nothing here owns a socket or a clock. The transport reads a basic header segment,
//! asks [`pdu::Bhs`] how much follows, reads that, and builds a [`pdu::Pdu`]; replies go
//! the other way through [`pdu::Pdu::encode_header`]. The full-feature phase of a
//! connection is the state machine [`session::Session`].
#![warn(missing_docs)]
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::indexing_slicing))]

pub mod chap;
pub mod digest;
pub mod login;
pub mod name;
pub mod pdu;
pub mod serial;
pub mod session;
pub mod text;

pub use name::{check_iscsi_name, NameError};
pub use serial::SerialNumber;
