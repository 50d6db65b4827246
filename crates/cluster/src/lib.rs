//! Bulwark's control plane: the cluster configuration replicated with Raft (openraft
//! over a redb store), authenticated node-to-node and admin RPC over TLS, and failure
//! detection by heartbeats on every network.
//!
//! Layers: [`state`] is the pure state machine (objects and commands, validated in
//! apply); [`store`] persists the Raft log and state; [`rpc`] and [`identity`] are the
//! transport and its trust; [`heartbeat`] detects failures; [`node`] runs it all.

pub mod auth;
pub mod client;
pub mod failover;
pub mod heartbeat;
pub mod hooks;
pub mod identity;
pub mod limits;
pub mod node;
pub mod rpc;
pub mod state;
pub mod status;
pub mod store;

pub use client::AdminClient;
pub use identity::{Identity, Token};
pub use node::{ClusterNode, NodeError, NodeOptions};
pub use state::{Applied, ClusterState, Command, NodeRole, Refused};
