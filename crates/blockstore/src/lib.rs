//! Local backing stores for Bulwark logical units.
//!
//! * [`FileStore`]: a sparse file (thin provisioning: discard punches holes, holes are
//!   reported as deallocated) or a raw block device, optionally with `O_DIRECT`.
//! * [`NullStore`]: reads zeroes, discards writes (benchmarks of the protocol path).
//! * Test only: a [`FileStore`] with a [`volatile`] cache that a power cut takes back.
//!
//! Every store implements [`block_device::BlockDevice`] and its durability contract.
#![warn(missing_docs)]

mod file;
mod null;
pub mod volatile;

pub use file::{FileStore, OpenOptions};
pub use null::NullStore;

use thiserror::Error;

/// Why a store could not be opened.
#[derive(Debug, Error)]
pub enum StoreError {
    /// The path could not be opened or created.
    #[error("cannot open {path}: {source}")]
    Open {
        /// The path.
        path: std::path::PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The size is not usable.
    #[error("{path}: size {size} bytes is not a positive multiple of the {block_size}-byte logical block")]
    BadSize {
        /// The path.
        path: std::path::PathBuf,
        /// Its size.
        size: u64,
        /// Logical block size.
        block_size: u32,
    },
    /// The file system cannot share blocks between files, which a copy in
    /// milliseconds that takes no space (a snapshot, a clone) needs.
    #[error("{path}: the file system does not share blocks between files (reflink), which snapshots and clones need; put the data folder on XFS (reflink is on by default since xfsprogs 5.1) or btrfs ({source})")]
    NoReflink {
        /// The store.
        path: std::path::PathBuf,
        /// What the file system answered.
        source: std::io::Error,
    },
    /// Another OS error while preparing the store.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: std::path::PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
}
