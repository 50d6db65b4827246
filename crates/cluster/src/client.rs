//! The admin client the CLI uses: one node's control address and the cluster token.

use std::net::SocketAddr;
use std::time::Duration;

use crate::node::NodeError;
use crate::rpc::{Client, Request, Response};
use crate::state::{Applied, ClusterState, Command, Refused};
use crate::status::NodeStatus;
use crate::Token;

/// How long an admin request may take: a write waits up to 10 s for a leader.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(15);

/// A connection to one node's admin API.
pub struct AdminClient {
    client: Client,
}

/// The whole cluster as one node sees it.
pub type ClusterView = (
    ClusterState,
    std::collections::BTreeMap<u64, Result<NodeStatus, String>>,
);

impl AdminClient {
    /// A client of the node at `addr`, admitted by `token`.
    pub fn new(addr: SocketAddr, token: &Token) -> Result<AdminClient, NodeError> {
        Ok(AdminClient {
            client: Client::new(addr, token, "cli")?,
        })
    }

    /// A client of the node at `addr` with a node's own certificate (root on a node,
    /// with its data folder): it needs no token, so it works even after every admin
    /// token was revoked.
    pub fn for_node(
        addr: SocketAddr,
        identity: &crate::Identity,
    ) -> Result<AdminClient, NodeError> {
        Ok(AdminClient {
            client: Client::for_node(addr, &identity.tls()?, "cli (node certificate)"),
        })
    }

    async fn call(&self, req: Request) -> Result<Response, NodeError> {
        match self.client.call(&req, ADMIN_TIMEOUT).await? {
            Response::Error(e) => Err(NodeError::Remote(e)),
            r => Ok(r),
        }
    }

    /// Commits a command; the outer error is a transport or leader failure, the inner
    /// one the cluster's refusal.
    pub async fn write(&self, cmd: Command) -> Result<Result<Applied, Refused>, NodeError> {
        match self.call(Request::Write(cmd)).await? {
            Response::Written(r) => Ok(r),
            other => Err(unexpected(other)),
        }
    }

    /// The node's copy of the state.
    pub async fn state(&self) -> Result<ClusterState, NodeError> {
        match self.call(Request::State).await? {
            Response::State(s) => Ok(s),
            other => Err(unexpected(other)),
        }
    }

    /// The node's copy of the state with CHAP secrets (admin tokens and nodes only).
    pub async fn state_with_secrets(&self) -> Result<ClusterState, NodeError> {
        match self.call(Request::StateWithSecrets).await? {
            Response::State(s) => Ok(s),
            other => Err(unexpected(other)),
        }
    }

    /// The node's own status.
    pub async fn status(&self) -> Result<NodeStatus, NodeError> {
        match self.call(Request::Status).await? {
            Response::Status(s) => Ok(s),
            other => Err(unexpected(other)),
        }
    }

    /// The state and every reachable node's status.
    pub async fn cluster_status(&self) -> Result<ClusterView, NodeError> {
        match self.call(Request::ClusterStatus).await? {
            Response::ClusterStatus { state, nodes } => Ok((state, nodes)),
            other => Err(unexpected(other)),
        }
    }
}

fn unexpected(r: Response) -> NodeError {
    NodeError::Remote(format!("unexpected answer from the node: {r:?}"))
}
