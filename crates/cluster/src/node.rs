//! A running cluster member: Raft over the store and the RPC transport, the control
//! listener (`node/requests.rs`), failure detection, and the leader's duties: failover
//! and fencing (`node/failover.rs`), membership (`node/membership.rs`), elections of
//! primaries (`node/election.rs`), upkeep (`node/upkeep.rs`) and hand-overs.
//!
//! Membership follows the cluster state: a node record committed by a join becomes a
//! Raft learner, caught-up online learners are promoted until there are 3 (or 5) voters,
//! and a node removed from the state is removed from the membership. Only the leader
//! acts, so these steps never race each other.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use openraft::error::{
    ClientWriteError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::{BasicNode, ChangeMembers, Raft, ServerState, SnapshotPolicy};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::failover::{FailoverTiming, LeaseBook, Member};
use crate::heartbeat::{self, Liveness};
use crate::identity::{ClusterCert, Identity, IdentityError, NodeCert, NodeKey, NodeTls, Token};
use crate::rpc::{read_frame, write_frame, Caller, Client, Hello, Request, Response, RpcError};
use crate::state::{Applied, ClusterState, Command, NodeAddresses, NodeId, NodeRole, Refused};
use crate::status::EventKind;
use crate::status::{EventLog, NodeStatus, PeerLiveness, RaftView};
use crate::store::{LogStore, StateMachineStore, Store, StoreError, TypeConfig};

mod election;
mod failover;
mod forward;
mod handover;
mod membership;
mod requests;
mod upkeep;

pub use handover::HandOver;
use requests::accept_loop;
pub use requests::CONTROL_LIMITS;

/// How a node runs.
#[derive(Clone, Debug)]
pub struct NodeOptions {
    /// The node's data folder (holds `cluster/`).
    pub data_dir: PathBuf,
    /// Storage node or witness.
    pub role: NodeRole,
    /// Bytes of volume data this node offers.
    pub capacity_bytes: u64,
    /// Whether the data folder can share blocks between files (reflinks), for
    /// snapshots; `None` when not checked.
    pub shares_blocks: Option<bool>,
    /// Take a snapshot (and compact the log) every this many entries.
    pub snapshot_every: u64,
    /// Raft leader heartbeat.
    pub raft_heartbeat: Duration,
    /// Raft election timeout, lower bound (the upper bound is twice this).
    pub election_timeout: Duration,
    /// Where the fence command and alert programs must be ([`crate::hooks`]).
    pub hooks_dir: PathBuf,
}

impl NodeOptions {
    /// Defaults for a node with data in `data_dir`.
    pub fn new(data_dir: PathBuf) -> Self {
        NodeOptions {
            data_dir,
            role: NodeRole::Storage,
            capacity_bytes: 0,
            shares_blocks: None,
            snapshot_every: 1000,
            raft_heartbeat: Duration::from_millis(100),
            election_timeout: Duration::from_millis(400),
            hooks_dir: PathBuf::from(crate::hooks::DEFAULT_HOOKS_DIR),
        }
    }
}

/// Failures of a node or of a request to the cluster.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// Identity files.
    #[error(transparent)]
    Identity(#[from] IdentityError),
    /// Raft store.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Listening failed.
    #[error("cannot listen for the control plane on {addr}: {source}")]
    Listen {
        /// Address.
        addr: SocketAddr,
        /// Cause.
        source: std::io::Error,
    },
    /// Raft refused to start or failed.
    #[error("raft: {0}")]
    Raft(String),
    /// No leader answered in time.
    #[error("the cluster has no reachable leader ({0}); check `bulwark status` — a majority of voters must be up")]
    NoLeader(String),
    /// A request to another node failed.
    #[error(transparent)]
    Rpc(#[from] RpcError),
    /// The other side answered with an error.
    #[error("{0}")]
    Remote(String),
}

/// How long a node that forwarded a write waits to apply it itself before it answers
/// (see `ClusterNode::write_via`).
const READ_YOUR_WRITE: Duration = Duration::from_secs(2);

/// How long a node may see no leader before it reports the quorum lost: longer than
/// an election takes.
const QUORUM_GRACE: Duration = Duration::from_secs(3);

/// How long a primary's lease lasts from the moment the Raft leader confirmed its own
/// leadership. A primary counts it from before it asked, minus a margin for clock rate
/// differences, so it stops serving before the leader could promote anyone else.
pub const LEASE: Duration = Duration::from_millis(800);

/// The leader's failover timing: a lease, and a margin for message delay and clock
/// rates before it believes one over.
pub const FAILOVER_TIMING: FailoverTiming = FailoverTiming {
    lease: LEASE,
    margin: Duration::from_millis(200),
};

/// What the serving layer tells the cluster about this node's iSCSI side.
pub type LocalInfo = Arc<dyn Fn() -> crate::status::LocalReport + Send + Sync>;

struct Inner {
    identity: Identity,
    options: NodeOptions,
    raft: Raft<TypeConfig>,
    store: Arc<Store>,
    state: watch::Receiver<Arc<ClusterState>>,
    liveness: Arc<Liveness>,
    events: Arc<EventLog>,
    peers: Peers,
    local_info: Mutex<Option<LocalInfo>>,
    /// Set when the cluster no longer knows this node (removed while it was down).
    removed: watch::Sender<bool>,
    /// Leader only: leases granted, since when it leads, epochs first seen.
    leases: Mutex<LeaseBook<Instant>>,
    /// When this node last heard a Raft leader, and when it started.
    contact: election::LeaderContact,
    /// Commands on their way to the leader, batched.
    forwarder: forward::Forwarder,
}

/// A running cluster member. Cheap to clone.
#[derive(Clone)]
pub struct ClusterNode {
    inner: Arc<Inner>,
}

/// Clients of the other members, by control address.
#[derive(Clone)]
struct Peers {
    tls: NodeTls,
    from: String,
    local: Option<std::net::IpAddr>,
    clients: Arc<Mutex<HashMap<SocketAddr, Arc<Client>>>>,
}

impl Peers {
    fn client(&self, addr: SocketAddr) -> Result<Arc<Client>, NodeError> {
        let mut map = self
            .clients
            .lock()
            .map_err(|_| NodeError::Raft("peer table poisoned".into()))?;
        if let Some(c) = map.get(&addr) {
            return Ok(c.clone());
        }
        let mut c = Client::for_node(addr, &self.tls, &self.from);
        if let Some(ip) = self.local {
            c = c.bind_from(ip);
        }
        let c = Arc::new(c);
        map.insert(addr, c.clone());
        Ok(c)
    }
}

/// openraft's network: one [`PeerNetwork`] per target node.
struct NetworkFactory {
    peers: Peers,
}

struct PeerNetwork {
    target: NodeId,
    addr: Result<SocketAddr, String>,
    peers: Peers,
}

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = PeerNetwork;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> PeerNetwork {
        PeerNetwork {
            target,
            addr: node
                .addr
                .parse()
                .map_err(|e| format!("bad node address {:?}: {e}", node.addr)),
            peers: self.peers.clone(),
        }
    }
}

type RpcResult<T, E = openraft::error::Infallible> =
    Result<T, RPCError<NodeId, BasicNode, RaftError<NodeId, E>>>;

impl PeerNetwork {
    async fn call<E: std::error::Error>(
        &self,
        req: Request,
        timeout: Duration,
    ) -> Result<Response, RPCError<NodeId, BasicNode, RaftError<NodeId, E>>> {
        let addr = self
            .addr
            .clone()
            .map_err(|e| RPCError::Unreachable(Unreachable::new(&NodeError::Remote(e))))?;
        let client = self
            .peers
            .client(addr)
            .map_err(|e| RPCError::Unreachable(Unreachable::new(&e)))?;
        client.call(&req, timeout).await.map_err(|e| match e {
            RpcError::Unreachable { .. }
            | RpcError::Tls { .. }
            | RpcError::Refused { .. }
            | RpcError::NotAMember { .. } => RPCError::Unreachable(Unreachable::new(&e)),
            _ => RPCError::Network(NetworkError::new(&e)),
        })
    }

    fn unexpected<E: std::error::Error>(
        &self,
        r: Response,
    ) -> RPCError<NodeId, BasicNode, RaftError<NodeId, E>> {
        RPCError::Network(NetworkError::new(&NodeError::Remote(format!(
            "unexpected answer from node {}: {r:?}",
            self.target
        ))))
    }
}

impl RaftNetwork<TypeConfig> for PeerNetwork {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<AppendEntriesResponse<NodeId>> {
        match self
            .call(Request::AppendEntries(rpc), option.hard_ttl())
            .await?
        {
            Response::AppendEntries(r) => {
                r.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
            }
            other => Err(self.unexpected(other)),
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<InstallSnapshotResponse<NodeId>, openraft::error::InstallSnapshotError> {
        match self
            .call(Request::InstallSnapshot(rpc), option.hard_ttl())
            .await?
        {
            Response::InstallSnapshot(r) => {
                r.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
            }
            other => Err(self.unexpected(other)),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> RpcResult<VoteResponse<NodeId>> {
        match self.call(Request::Vote(rpc), option.hard_ttl()).await? {
            Response::Vote(r) => {
                r.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
            }
            other => Err(self.unexpected(other)),
        }
    }
}

/// Creates a new cluster in `data_dir` with this node as its only member (id 1). The
/// node bootstraps Raft on its first `serve`.
pub fn init(
    data_dir: &std::path::Path,
    name: &str,
    addresses: NodeAddresses,
) -> Result<Identity, NodeError> {
    crate::state::check_name("node", name).map_err(|e| NodeError::Remote(e.to_string()))?;
    if Identity::exists(data_dir) {
        let existing = Identity::load(data_dir)?;
        return Err(IdentityError::Exists(data_dir.to_path_buf(), existing.cluster_id).into());
    }
    let ca = ClusterCert::generate()?;
    let key = NodeKey::generate()?;
    let identity = Identity {
        cluster_id: crate::identity::random_hex16()[..12].to_string(),
        node_id: 1,
        name: name.to_string(),
        addresses,
        secret: crate::identity::random_hex16(),
        node_cert: Some(NodeCert {
            cert_pem: ca.issue_node_cert(1, &key.public_key())?,
            key_pem: key.pem(),
        }),
        cert: ca,
        seeds: Vec::new(),
        bootstrap: true,
    };
    identity.save(data_dir)?;
    Ok(identity)
}

/// Joins the cluster that `seed` belongs to: the seed (or its leader) commits the new
/// node and hands back the cluster certificate; the identity is written to `data_dir`.
pub async fn join(
    data_dir: &std::path::Path,
    seed: SocketAddr,
    token: &Token,
    name: &str,
    addresses: NodeAddresses,
    capacity_bytes: u64,
) -> Result<Identity, NodeError> {
    crate::state::check_name("node", name).map_err(|e| NodeError::Remote(e.to_string()))?;
    if Identity::exists(data_dir) {
        let existing = Identity::load(data_dir)?;
        return Err(IdentityError::Exists(data_dir.to_path_buf(), existing.cluster_id).into());
    }
    let client = Client::new(seed, token, &format!("joining node {name}"))?;
    // The node's key is made here and never leaves it: only the public key travels.
    let key = NodeKey::generate()?;
    let req = Request::Join {
        name: name.to_string(),
        public_key: crate::identity::hex(&key.public_key()),
        addresses: addresses.clone(),
        capacity_bytes,
    };
    match client.call(&req, Duration::from_secs(15)).await? {
        Response::Joined {
            node_id,
            cluster_id,
            cert,
            node_cert_pem,
            seeds,
        } => {
            if cert.fingerprint()? != token.fingerprint {
                return Err(NodeError::Remote(
                    "the cluster answered with a CA other than the token's; refusing it".into(),
                ));
            }
            let identity = Identity {
                cluster_id,
                node_id,
                name: name.to_string(),
                addresses,
                secret: token.secret.clone(),
                cert,
                node_cert: Some(NodeCert {
                    cert_pem: node_cert_pem,
                    key_pem: key.pem(),
                }),
                seeds,
                bootstrap: false,
            };
            // The certificate must be for this node's key and id.
            identity.tls()?;
            identity.save(data_dir)?;
            Ok(identity)
        }
        Response::Written(Err(refused)) => Err(NodeError::Remote(refused.to_string())),
        Response::Error(e) => Err(NodeError::Remote(e)),
        other => Err(NodeError::Remote(format!(
            "unexpected answer to join: {other:?}"
        ))),
    }
}

impl ClusterNode {
    /// Starts this node from its data folder: opens the store (refusing a damaged one),
    /// starts Raft, the control listener and failure detection.
    pub async fn start(options: NodeOptions) -> Result<ClusterNode, NodeError> {
        let mut identity = Identity::load(&options.data_dir)?;
        let tls = identity.tls()?;
        let store = Store::open(&Identity::dir(&options.data_dir).join("raft.redb"))?;
        let (sm, state) = StateMachineStore::load(store.clone()).await?;
        let events = Arc::new(
            EventLog::new(&identity.name, Some(options.data_dir.join("events.log"))).map_err(
                |source| NodeError::Listen {
                    addr: identity.addresses.control,
                    source,
                },
            )?,
        );
        let peers = Peers {
            tls: tls.clone(),
            from: format!("node {}", identity.name),
            local: Some(identity.addresses.control.ip()),
            clients: Arc::default(),
        };
        let et = options.election_timeout.as_millis() as u64;
        let config = openraft::Config {
            cluster_name: format!("bulwark-{}", identity.cluster_id),
            heartbeat_interval: options.raft_heartbeat.as_millis() as u64,
            election_timeout_min: et,
            // openraft's followers refuse votes for this long after they last heard a
            // leader: at least the election silence, which makes leases safe across
            // elections (`failover::election_silence`).
            election_timeout_max: (et * 2).max(election::silence().as_millis() as u64 + 1),
            snapshot_policy: SnapshotPolicy::LogsSinceLast(options.snapshot_every),
            max_in_snapshot_log_to_keep: options.snapshot_every.min(100),
            // Chunks travel as JSON (a byte is up to 4 characters): stay well inside
            // the RPC frame limit.
            snapshot_max_chunk_size: 1 << 20,
            ..Default::default()
        }
        .validate()
        .map_err(|e| NodeError::Raft(e.to_string()))?;
        let listener = TcpListener::bind(identity.addresses.control)
            .await
            .map_err(|source| NodeError::Listen {
                addr: identity.addresses.control,
                source,
            })?;
        let raft = Raft::new(
            identity.node_id,
            Arc::new(config),
            NetworkFactory {
                peers: peers.clone(),
            },
            LogStore::new(store.clone()),
            sm,
        )
        .await
        .map_err(|e| NodeError::Raft(e.to_string()))?;
        // No candidacy until one election silence after the start (see `election`).
        raft.runtime_config().elect(false);

        if identity.bootstrap {
            let initialized = raft
                .is_initialized()
                .await
                .map_err(|e| NodeError::Raft(e.to_string()))?;
            if !initialized {
                let members = BTreeMap::from([(
                    identity.node_id,
                    BasicNode::new(identity.addresses.control.to_string()),
                )]);
                raft.initialize(members)
                    .await
                    .map_err(|e| NodeError::Raft(e.to_string()))?;
            }
        }

        let node = ClusterNode {
            inner: Arc::new(Inner {
                options: options.clone(),
                raft,
                store,
                state,
                liveness: Arc::default(),
                events,
                peers,
                local_info: Mutex::new(None),
                removed: watch::channel(false).0,
                leases: Mutex::new(LeaseBook::new(FAILOVER_TIMING)),
                contact: election::LeaderContact::new(),
                forwarder: forward::Forwarder::default(),
                identity: identity.clone(),
            }),
        };
        let acceptor = tokio_rustls::TlsAcceptor::from(tls.control_server.clone());
        tokio::spawn(accept_loop(node.clone(), listener, acceptor));
        let incarnation =
            heartbeat::next_incarnation(&Identity::dir(&options.data_dir)).map_err(|source| {
                NodeError::Identity(IdentityError::Io {
                    path: Identity::dir(&options.data_dir).join("incarnation"),
                    source,
                })
            })?;
        tokio::spawn(heartbeat::run(
            identity.node_id,
            identity.node_secret(),
            incarnation,
            identity.addresses.networks(),
            identity.addresses.control.port(),
            node.inner.state.clone(),
            node.inner.liveness.clone(),
            node.inner.events.clone(),
        ));
        tokio::spawn(node.clone().watch_leadership());
        tokio::spawn(node.clone().reconcile_membership());
        tokio::spawn(node.clone().watch_primaries());
        tokio::spawn(node.clone().hasten_elections());
        tokio::spawn(node.clone().watch_redundancy());

        if identity.bootstrap {
            // The founding node adds itself as the first member, once it leads.
            let me = identity.node_id;
            if !node.state().borrow().nodes.contains_key(&me) {
                let public_key = identity
                    .node_cert
                    .as_ref()
                    .and_then(NodeCert::public_key_hex);
                let cmd = Command::AddNode {
                    name: identity.name.clone(),
                    addresses: identity.addresses.clone(),
                    capacity_bytes: options.capacity_bytes,
                    public_key,
                };
                match node.write(cmd).await? {
                    Ok(Applied::NodeAdded(id)) if id == me => {}
                    other => {
                        return Err(NodeError::Raft(format!(
                            "bootstrapping the cluster failed: {other:?}"
                        )))
                    }
                }
            }
            // The token `cluster init` printed becomes the first admin token, so it
            // can be listed and revoked like any other.
            if node.state().borrow().tokens.is_empty() {
                let init = crate::auth::ApiToken {
                    id: crate::auth::INIT_TOKEN_ID.into(),
                    role: crate::auth::Role::Admin,
                    secret_sha256: crate::auth::secret_digest(&identity.secret),
                    created_unix_ms: crate::auth::now_unix_ms(),
                    expires_unix_ms: None,
                    single_use: false,
                    used: false,
                    revoked: false,
                    comment: "printed by cluster init".into(),
                };
                match node.write(Command::CreateToken { token: init }).await? {
                    Ok(_) | Err(Refused::TokenExists(_)) => {}
                    Err(other) => {
                        return Err(NodeError::Raft(format!(
                            "recording the cluster's first token failed: {other}"
                        )))
                    }
                }
            }
            identity.bootstrap = false;
            identity.save(&options.data_dir)?;
            node.inner.events.push(
                EventKind::Membership,
                format!(
                    "cluster {} created by node {}",
                    identity.cluster_id, identity.name
                ),
            );
        }
        tokio::spawn(node.clone().announce());
        info!(node = %identity.name, id = identity.node_id, control = %identity.addresses.control, "cluster node started");
        Ok(node)
    }

    /// This node's id.
    pub fn id(&self) -> NodeId {
        self.inner.identity.node_id
    }

    /// Where the programs this node runs for the cluster must be.
    pub fn hooks_dir(&self) -> &std::path::Path {
        &self.inner.options.hooks_dir
    }

    /// This node's identity.
    pub fn identity(&self) -> &Identity {
        &self.inner.identity
    }

    /// The cluster state as applied here; changes with every committed command.
    pub fn state(&self) -> watch::Receiver<Arc<ClusterState>> {
        self.inner.state.clone()
    }

    /// Resolves when this node learns it is no longer a member: removed from the
    /// state it applied, or refused at start-up as unknown.
    pub async fn removed(&self) {
        let me = self.id();
        let mut state = self.inner.state.clone();
        let mut flag = self.inner.removed.subscribe();
        loop {
            {
                let st = state.borrow_and_update();
                // Ids below next_node_id were handed out; ours missing means removed.
                if !st.nodes.contains_key(&me) && st.next_node_id > me {
                    return;
                }
            }
            if *flag.borrow_and_update() {
                return;
            }
            tokio::select! {
                r = state.changed() => if r.is_err() { std::future::pending::<()>().await },
                r = flag.changed() => if r.is_err() { std::future::pending::<()>().await },
            }
        }
    }

    /// The event log.
    pub fn events(&self) -> Arc<EventLog> {
        self.inner.events.clone()
    }

    /// Registers the source of sessions and served targets for status.
    pub fn set_local_info(&self, f: LocalInfo) {
        if let Ok(mut l) = self.inner.local_info.lock() {
            *l = Some(f);
        }
    }

    /// Stops Raft.
    pub async fn shutdown(&self) {
        let _ = self.inner.raft.shutdown().await;
    }

    /// Commits `cmd` through Raft, forwarding it to the leader when this node is not.
    /// Gives up after 10 s without a leader.
    pub async fn write(&self, cmd: Command) -> Result<Result<Applied, Refused>, NodeError> {
        Ok(self.commit_via(cmd, true).await?.0)
    }

    /// For a client's write ([`Request::Write`]): [`Self::commit_via`], then waits (up
    /// to [`READ_YOUR_WRITE`]) until this node has applied the command too, so that
    /// what the client reads from it next shows it. A follower learns of a commit only
    /// with the leader's next message: `bulwark volume move` through a follower read the
    /// state right after its move committed, found no move under way, and reported that
    /// the move did not happen.
    async fn write_via(
        &self,
        cmd: Command,
        relay: bool,
    ) -> Result<Result<Applied, Refused>, NodeError> {
        let (result, index) = self.commit_via(cmd, relay).await?;
        if let Some(index) = index {
            if let Err(e) = self
                .inner
                .raft
                .wait(Some(READ_YOUR_WRITE))
                .applied_index_at_least(Some(index), "a write forwarded from here")
                .await
            {
                debug!(index, error = %e, "committed, not yet applied here");
            }
        }
        Ok(result)
    }

    /// Commits `cmd`; its result and the index of its log entry (`None` when this node
    /// was refused as no member). With `relay`, a node that knows no leader (it was
    /// down, or removed while down) asks the other members it knows to forward the
    /// command; they forward only to a leader they know, so requests never bounce
    /// between leaderless nodes.
    async fn commit_via(
        &self,
        cmd: Command,
        relay: bool,
    ) -> Result<(Result<Applied, Refused>, Option<u64>), NodeError> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut last = String::from("no leader elected yet");
        let mut next_member = 0usize;
        while Instant::now() < deadline {
            match self.inner.raft.client_write(cmd.clone()).await {
                Ok(r) => return Ok((r.data, Some(r.log_id.index))),
                Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
                    let target = match f.leader_node {
                        Some(node) => Some(node.addr),
                        None if relay => {
                            let others: Vec<String> = self
                                .inner
                                .state
                                .borrow()
                                .nodes
                                .values()
                                .filter(|n| n.id != self.id())
                                .map(|n| n.addresses.control.to_string())
                                .collect();
                            next_member += 1;
                            (!others.is_empty()).then(|| others[next_member % others.len()].clone())
                        }
                        None => None,
                    };
                    if let Some(addr) = target {
                        match self.forward(&addr, &cmd).await {
                            Ok((r, index)) => return Ok((r, Some(index))),
                            // Our own certificate was refused: the cluster removed us.
                            Err(NodeError::Rpc(RpcError::NotAMember { .. })) => {
                                return Ok((Err(Refused::NoSuchNodeId(self.id())), None))
                            }
                            Err(e) => last = e.to_string(),
                        }
                    }
                }
                Err(e) => last = e.to_string(),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(NodeError::NoLeader(last))
    }

    /// Sends `cmd` to the leader at `addr` (in the next batch); its result and log index.
    async fn forward(
        &self,
        addr: &str,
        cmd: &Command,
    ) -> Result<(Result<Applied, Refused>, u64), NodeError> {
        let addr: SocketAddr = addr
            .parse()
            .map_err(|e| NodeError::Remote(format!("bad leader address {addr:?}: {e}")))?;
        self.inner
            .forwarder
            .forward(&self.inner.peers, addr, cmd)
            .await
    }

    fn leader_addr(&self) -> Option<SocketAddr> {
        let leader = self.inner.raft.metrics().borrow().current_leader?;
        self.inner
            .state
            .borrow()
            .nodes
            .get(&leader)
            .map(|n| n.addresses.control)
    }

    /// Renews this node's leases on `volumes` (name, epoch) with the Raft leader, in one
    /// round; for each, in order, whether it was granted.
    pub async fn renew_leases(
        &self,
        volumes: &[(String, u64)],
    ) -> Result<Vec<Result<(), String>>, NodeError> {
        let me = self.id();
        let leader = self.inner.raft.metrics().borrow().current_leader;
        let resp = if leader == Some(me) {
            self.grant_leases(volumes, me).await
        } else {
            let addr = self
                .leader_addr()
                .ok_or_else(|| NodeError::NoLeader("no leader known".into()))?;
            let client = self.inner.peers.client(addr)?;
            let req = Request::RenewLeases {
                node: me,
                volumes: volumes.to_vec(),
            };
            client.call(&req, Duration::from_millis(500)).await?
        };
        match resp {
            Response::Leases(answers) if answers.len() == volumes.len() => Ok(answers),
            Response::NotLeader(_) => Err(NodeError::NoLeader("leadership is changing".into())),
            Response::Error(e) => Err(NodeError::Remote(e)),
            other => Err(NodeError::Remote(format!("unexpected answer: {other:?}"))),
        }
    }

    /// Liveness of `peer` as seen from here.
    pub fn peer_liveness(&self, peer: NodeId) -> Option<PeerLiveness> {
        let st = self.inner.state.borrow().clone();
        let node = st.nodes.get(&peer)?;
        if peer == self.id() {
            let n = node.addresses.networks().len();
            return Some(PeerLiveness {
                node: peer,
                online: true,
                networks: vec![true; n],
                last_heard_ms: Some(0),
            });
        }
        let timeout = Duration::from_millis(st.settings.failure_timeout_ms);
        Some(self.inner.liveness.peer(
            peer,
            node.addresses.networks().len(),
            timeout,
            Instant::now(),
        ))
    }

    /// The Raft leader this node knows, if any.
    pub fn current_leader(&self) -> Option<NodeId> {
        self.inner.raft.metrics().borrow().current_leader
    }

    /// This node's status.
    pub async fn status(&self) -> NodeStatus {
        let m = self.inner.raft.metrics().borrow().clone();
        let membership = m.membership_config.membership();
        let store = self.inner.store.clone();
        let log_entries = tokio::task::spawn_blocking(move || store.log_len().unwrap_or(0))
            .await
            .unwrap_or(0);
        let st = self.inner.state.borrow().clone();
        let peers = st
            .nodes
            .keys()
            .filter_map(|id| self.peer_liveness(*id))
            .collect();
        let local = self
            .inner
            .local_info
            .lock()
            .ok()
            .and_then(|f| f.as_ref().map(|f| f()))
            .unwrap_or_default();
        NodeStatus {
            node: self.id(),
            name: self.inner.identity.name.clone(),
            raft: RaftView {
                state: format!("{:?}", m.state),
                term: m.current_term,
                leader: m.current_leader,
                last_log_index: m.last_log_index,
                last_applied: m.last_applied.map(|l| l.index),
                snapshot_index: m.snapshot.map(|l| l.index),
                purged_index: m.purged.map(|l| l.index),
                log_entries,
                voters: membership.voter_ids().collect(),
                learners: membership.learner_ids().collect(),
            },
            peers,
            sessions: local.sessions,
            serving: local.serving,
            volumes: local.volumes,
            replication_plaintext: local.replication_plaintext,
            disk: local.disk,
            events: self.inner.events.recent(30),
        }
    }

    /// The cluster state and every member's status (an error for those that did not
    /// answer within 700 ms), as `bulwark status` shows them.
    pub async fn gather_status(
        &self,
    ) -> (ClusterState, BTreeMap<NodeId, Result<NodeStatus, String>>) {
        let st = self.inner.state.borrow().clone();
        let mut asks = tokio::task::JoinSet::new();
        for n in st.nodes.values() {
            let (id, addr) = (n.id, n.addresses.control);
            if id == self.id() {
                continue;
            }
            let client = self.inner.peers.client(addr);
            asks.spawn(async move {
                let r = match client {
                    Ok(c) => match c.call(&Request::Status, Duration::from_millis(700)).await {
                        Ok(Response::Status(s)) => Ok(s),
                        Ok(other) => Err(format!("unexpected answer: {other:?}")),
                        Err(e) => Err(e.to_string()),
                    },
                    Err(e) => Err(e.to_string()),
                };
                (id, r)
            });
        }
        let mut nodes = BTreeMap::new();
        nodes.insert(self.id(), Ok(self.status().await));
        while let Some(r) = asks.join_next().await {
            if let Ok((id, r)) = r {
                nodes.insert(id, r);
            }
        }
        ((*st).clone(), nodes)
    }

    /// Who holds the token secret `secret`, by the state this node applied.
    pub fn authenticate(&self, secret: &str) -> Result<crate::auth::Holder, String> {
        crate::auth::authenticate(
            &self.inner.state.borrow(),
            &self.inner.identity.secret,
            secret,
            crate::auth::now_unix_ms(),
        )
    }
}
