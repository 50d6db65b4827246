//! Node-to-node and CLI-to-node RPC: TLS (see [`crate::identity`]), then a hello frame,
//! then request and response frames in turn. A frame is a 4-byte big-endian length and
//! a JSON document. A node proves who it is with its certificate during the TLS
//! handshake; a client without one (the CLI, a joining node) with the token's secret
//! in the hello. What a caller may ask depends on which it is ([`Caller`]).
//!
//! One transport serves Raft, forwarded writes, joins and the admin API: the control
//! plane's traffic is small, and one authenticated path is one thing to get right.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;

use openraft::error::{InstallSnapshotError, RaftError};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use crate::identity::{self, ClusterCert, Token};
use crate::state::{Applied, ClusterState, Command, NodeAddresses, NodeId, Refused};
use crate::status::NodeStatus;
use crate::store::TypeConfig;

/// Largest frame accepted: a snapshot chunk or the whole state with room to spare.
pub const MAX_FRAME: usize = 16 << 20;

/// How long a peer has to finish TLS and the hello.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// The first frame a client sends.
#[derive(Serialize, Deserialize)]
pub struct Hello {
    /// The cluster secret (hex); empty from a node, which shows its certificate.
    pub secret: String,
    /// Who is calling, for the log: "node N" or "cli".
    pub from: String,
}

/// A request.
#[derive(Debug, Serialize, Deserialize)]
#[allow(clippy::large_enum_variant)]
pub enum Request {
    /// Raft AppendEntries.
    AppendEntries(AppendEntriesRequest<TypeConfig>),
    /// Raft RequestVote.
    Vote(VoteRequest<NodeId>),
    /// Raft InstallSnapshot (one chunk).
    InstallSnapshot(InstallSnapshotRequest<TypeConfig>),
    /// Commit a command; a follower forwards it to the leader.
    Write(Command),
    /// Commit each of these commands, proposed together (a follower forwarding what
    /// queued while its earlier batches were out). Only from members.
    Writes(Vec<Command>),
    /// A new node asks to join.
    Join {
        /// Its name.
        name: String,
        /// The public key of the key it made (hex of the uncompressed P-256 point):
        /// the cluster CA issues its certificate for it.
        public_key: String,
        /// Its addresses.
        addresses: NodeAddresses,
        /// Its capacity.
        capacity_bytes: u64,
    },
    /// This node's copy of the cluster state, secrets redacted.
    State,
    /// This node's copy of the cluster state with CHAP secrets (admins and nodes).
    StateWithSecrets,
    /// This node's own status (Raft view, liveness, sessions, events).
    Status,
    /// Every reachable node's status plus the cluster state, gathered by this node.
    ClusterStatus,
    /// The primary `node` asks the Raft leader for the leases of `volumes` (name,
    /// epoch), all in one round: one leadership check for every volume a node is
    /// primary of, however many.
    RenewLeases {
        /// The primary.
        node: NodeId,
        /// Volume name and the primary's epoch of each.
        volumes: Vec<(String, u64)>,
    },
}

/// Who is calling, as the control listener established it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Caller {
    /// A member, by the certificate it showed.
    Node(NodeId),
    /// A token holder.
    Token(crate::auth::Holder),
}

impl Request {
    /// Whether `caller` may make this request ([`crate::auth`] has the table). Raft,
    /// leases and the commands that only nodes issue (promotions, in-sync changes,
    /// reservations) are accepted only from node certificates, never from a token.
    pub fn allowed(&self, caller: &Caller) -> Result<(), String> {
        use crate::auth::Role;
        let role = match caller {
            Caller::Node(_) => return Ok(()),
            Caller::Token(h) => h.role,
        };
        let node_only = match self {
            Request::AppendEntries(_) | Request::Vote(_) | Request::InstallSnapshot(_) => {
                Some("Raft messages are")
            }
            Request::RenewLeases { .. } => Some("lease renewals are"),
            Request::Writes(_) => Some("forwarded batches are"),
            Request::Write(cmd) if cmd.node_only() => Some("this command is"),
            _ => None,
        };
        if let Some(what) = node_only {
            return Err(format!(
                "{what} accepted only from cluster nodes (with their certificate), not with a token"
            ));
        }
        let ok = match role {
            Role::Admin => true,
            Role::Viewer => matches!(
                self,
                Request::State | Request::Status | Request::ClusterStatus
            ),
            Role::Join => matches!(self, Request::Join { .. }),
            Role::Metrics => false,
        };
        if ok {
            return Ok(());
        }
        Err(match role {
            Role::Viewer => {
                "a viewer token only reads status and configuration; this needs an admin token"
                    .into()
            }
            Role::Join => "a join token only joins a node (`bulwark cluster join`)".into(),
            Role::Metrics => "a metrics token only reads /metrics over HTTPS".into(),
            Role::Admin => unreachable!("admins may do all but node-only requests"),
        })
    }
}

/// A response.
#[derive(Debug, Serialize, Deserialize)]
#[allow(clippy::large_enum_variant)]
pub enum Response {
    /// Raft AppendEntries.
    AppendEntries(Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>>),
    /// Raft RequestVote.
    Vote(Result<VoteResponse<NodeId>, RaftError<NodeId>>),
    /// Raft InstallSnapshot.
    InstallSnapshot(
        Result<InstallSnapshotResponse<NodeId>, RaftError<NodeId, InstallSnapshotError>>,
    ),
    /// The committed command's result.
    Written(Result<Applied, Refused>),
    /// For each command of a [`Request::Writes`], in order: its result and the index of
    /// its log entry (0 if it was refused before it reached the log), or why it was not
    /// committed.
    WrittenEach(Vec<Result<Committed, String>>),
    /// Welcome: what a joining node needs.
    Joined {
        /// Its id.
        node_id: NodeId,
        /// The cluster id.
        cluster_id: String,
        /// The cluster CA's certificate and key.
        cert: ClusterCert,
        /// The node's certificate, issued by the CA for the key it sent, PEM.
        node_cert_pem: String,
        /// Control addresses of the members.
        seeds: Vec<SocketAddr>,
    },
    /// A copy of the state.
    State(ClusterState),
    /// One node's status.
    Status(NodeStatus),
    /// The cluster's status.
    ClusterStatus {
        /// The state, as the answering node has it.
        state: ClusterState,
        /// Node id → its status or why it could not be asked.
        nodes: BTreeMap<NodeId, Result<NodeStatus, String>>,
    },
    /// For each volume asked, in order: its lease is granted for [`crate::node::LEASE`]
    /// from when the leader checked, or why not.
    Leases(Vec<Result<(), String>>),
    /// The caller's node certificate is not a member's (removed, or another key): the
    /// answer to its hello.
    NotAMember(String),
    /// This node is not the Raft leader; try the one named, if known.
    NotLeader(Option<SocketAddr>),
    /// The request could not be served; the message says why and what to do.
    Error(String),
}

/// A command's result and the index of its log entry (0 if it was refused before it
/// reached the log).
pub type Committed = (Result<Applied, Refused>, u64);

/// RPC failures.
#[derive(Clone, Debug, thiserror::Error)]
pub enum RpcError {
    /// TCP connect failed or timed out.
    #[error("cannot reach {addr}: {detail}")]
    Unreachable {
        /// Address.
        addr: SocketAddr,
        /// Cause.
        detail: String,
    },
    /// TLS failed (wrong cluster, wrong fingerprint).
    #[error("TLS with {addr} failed: {detail}")]
    Tls {
        /// Address.
        addr: SocketAddr,
        /// Cause.
        detail: String,
    },
    /// The server refused our credentials.
    #[error("{addr} refused this client: {detail}")]
    Refused {
        /// Address.
        addr: SocketAddr,
        /// What the server said.
        detail: String,
    },
    /// The server does not count this node as a member of the cluster.
    #[error("{addr} refused this node: {detail}")]
    NotAMember {
        /// Address.
        addr: SocketAddr,
        /// What the server said.
        detail: String,
    },
    /// The connection broke or a frame was bad.
    #[error("connection to {addr} failed: {detail}")]
    Io {
        /// Address.
        addr: SocketAddr,
        /// Cause.
        detail: String,
    },
    /// No answer in time.
    #[error("{addr} did not answer within {0:?}", .timeout)]
    Timeout {
        /// Address.
        addr: SocketAddr,
        /// The timeout.
        timeout: Duration,
    },
}

/// Writes one frame.
pub async fn write_frame<T: Serialize>(
    w: &mut (impl AsyncWrite + Unpin),
    msg: &T,
) -> std::io::Result<()> {
    let json = serde_json::to_vec(msg).map_err(std::io::Error::other)?;
    if json.len() > MAX_FRAME {
        return Err(std::io::Error::other(format!(
            "frame of {} bytes exceeds the {MAX_FRAME}-byte limit",
            json.len()
        )));
    }
    let mut buf = Vec::with_capacity(json.len() + 4);
    buf.extend_from_slice(&(json.len() as u32).to_be_bytes());
    buf.extend_from_slice(&json);
    w.write_all(&buf).await?;
    w.flush().await
}

/// Reads one frame.
pub async fn read_frame<T: DeserializeOwned>(
    r: &mut (impl AsyncRead + Unpin),
) -> std::io::Result<T> {
    let len = r.read_u32().await? as usize;
    if len > MAX_FRAME {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("frame of {len} bytes exceeds the {MAX_FRAME}-byte limit"),
        ));
    }
    let mut buf = vec![0; len];
    r.read_exact(&mut buf).await?;
    serde_json::from_slice(&buf)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

/// Reads a frame of at most 4 KiB: the hello, before the peer is authenticated, so a
/// stranger cannot make the node allocate a large buffer.
pub async fn read_small_frame<T: DeserializeOwned>(
    r: &mut (impl AsyncRead + Unpin),
) -> std::io::Result<T> {
    let len = r.read_u32().await? as usize;
    if len > 4096 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "hello frame too large",
        ));
    }
    let mut buf = vec![0; len];
    r.read_exact(&mut buf).await?;
    serde_json::from_slice(&buf)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

type Conn = TlsStream<TcpStream>;

/// Connects to `addr`, from `local` when given.
pub async fn connect_from(
    local: Option<std::net::IpAddr>,
    addr: SocketAddr,
) -> std::io::Result<TcpStream> {
    let Some(ip) = local else {
        return TcpStream::connect(addr).await;
    };
    let socket = if ip.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.bind(SocketAddr::new(ip, 0))?;
    socket.connect(addr).await
}

/// A client of one node: authenticated TLS connections, kept open and reused.
pub struct Client {
    addr: SocketAddr,
    tls: tokio_rustls::TlsConnector,
    hello_secret: String,
    from: String,
    /// Source address for connections (a node connects from its own control address,
    /// so firewalls and partitions see which node talks).
    local: Option<std::net::IpAddr>,
    idle: Mutex<Vec<Conn>>,
    /// Connections open at once, at most [`MAX_CONNECTIONS`]: calls beyond wait for one.
    open: tokio::sync::Semaphore,
}

/// Connections one client holds to one node at once. The server admits a bounded
/// number from all members together ([`crate::node::CONTROL_LIMITS`]); a node that
/// opened one per concurrent call could take them all and leave Raft none.
pub const MAX_CONNECTIONS: usize = 8;

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Client({})", self.addr)
    }
}

impl Client {
    /// A client of the node at `addr` that trusts the certificate in `token` and proves
    /// itself with its secret. `from` names the caller in the server's log.
    pub fn new(
        addr: SocketAddr,
        token: &Token,
        from: &str,
    ) -> Result<Client, identity::IdentityError> {
        Ok(Client {
            addr,
            tls: tokio_rustls::TlsConnector::from(identity::client_config(&token.fingerprint)?),
            hello_secret: token.secret.clone(),
            from: from.to_string(),
            local: None,
            idle: Mutex::new(Vec::new()),
            open: tokio::sync::Semaphore::new(MAX_CONNECTIONS),
        })
    }

    /// A client of the node at `addr` for a member: it shows its node certificate.
    pub fn for_node(addr: SocketAddr, tls: &identity::NodeTls, from: &str) -> Client {
        Client {
            addr,
            tls: tokio_rustls::TlsConnector::from(tls.client.clone()),
            hello_secret: String::new(),
            from: from.to_string(),
            local: None,
            idle: Mutex::new(Vec::new()),
            open: tokio::sync::Semaphore::new(MAX_CONNECTIONS),
        }
    }

    /// Connects from `ip` rather than from whatever address the kernel picks.
    pub fn bind_from(mut self, ip: std::net::IpAddr) -> Client {
        self.local = Some(ip);
        self
    }

    /// The node's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    async fn connect(&self, timeout: Duration) -> Result<Conn, RpcError> {
        let addr = self.addr;
        let tcp = tokio::time::timeout(timeout, connect_from(self.local, addr))
            .await
            .map_err(|_| RpcError::Unreachable {
                addr,
                detail: format!("no connection within {timeout:?}"),
            })?
            .map_err(|e| RpcError::Unreachable {
                addr,
                detail: e.to_string(),
            })?;
        let _ = tcp.set_nodelay(true);
        let mut tls = tokio::time::timeout(timeout, self.tls.connect(identity::server_name(), tcp))
            .await
            .map_err(|_| RpcError::Timeout { addr, timeout })?
            .map_err(|e| RpcError::Tls {
                addr,
                detail: e.to_string(),
            })?;
        let hello = Hello {
            secret: self.hello_secret.clone(),
            from: self.from.clone(),
        };
        let io = |e: std::io::Error| RpcError::Io {
            addr,
            detail: e.to_string(),
        };
        write_frame(&mut tls, &hello).await.map_err(io)?;
        let answer: Response = tokio::time::timeout(timeout, read_frame(&mut tls))
            .await
            .map_err(|_| RpcError::Timeout { addr, timeout })?
            .map_err(|e| RpcError::Refused {
                addr,
                detail: format!("connection closed after hello ({e})"),
            })?;
        match answer {
            Response::Error(detail) => Err(RpcError::Refused { addr, detail }),
            Response::NotAMember(detail) => Err(RpcError::NotAMember { addr, detail }),
            _ => Ok(tls),
        }
    }

    /// Sends `req` and waits at most `timeout` for the answer. A new connection gets at
    /// least 1 s for TCP, TLS and the hello on top, so a short Raft heartbeat deadline
    /// does not make a loaded peer unreachable. A pooled connection that turns out dead
    /// (the peer restarted) is replaced once. Waiting for one of the client's
    /// [`MAX_CONNECTIONS`] counts in `timeout`.
    pub async fn call(&self, req: &Request, timeout: Duration) -> Result<Response, RpcError> {
        let addr = self.addr;
        let _open = match tokio::time::timeout(timeout, self.open.acquire()).await {
            Ok(Ok(permit)) => permit,
            _ => return Err(RpcError::Timeout { addr, timeout }),
        };
        let exchange = async |conn: &mut Conn| -> Result<Response, RpcError> {
            let io = |e: std::io::Error| RpcError::Io {
                addr,
                detail: e.to_string(),
            };
            let work = async {
                write_frame(conn, req).await.map_err(io)?;
                read_frame::<Response>(conn).await.map_err(io)
            };
            match tokio::time::timeout(timeout, work).await {
                Ok(r) => r,
                Err(_) => Err(RpcError::Timeout { addr, timeout }),
            }
        };
        let idle = self.idle.lock().map(|mut v| v.pop()).unwrap_or(None);
        let mut result = None;
        if let Some(mut conn) = idle {
            match exchange(&mut conn).await {
                Ok(r) => result = Some((r, conn)),
                Err(RpcError::Io { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        let (resp, conn) = match result {
            Some(r) => r,
            None => {
                let mut conn = self.connect(timeout.max(Duration::from_secs(1))).await?;
                let r = exchange(&mut conn).await?;
                (r, conn)
            }
        };
        if let Ok(mut v) = self.idle.lock() {
            if v.len() < 4 {
                v.push(conn);
            }
        }
        Ok(resp)
    }
}
