//! Replication traffic over TCP: one connection per (primary node, replica node) pair,
//! opened by the primary side and shared by all the volumes between them. Frames are
//! binary (the data is sent as is, without a copy into the frame).
//!
//! Every link is mutual TLS with the nodes' own certificates ([`LinkSecurity`]): each
//! side learns the other's node id from its certificate and asks the committed cluster
//! state whether that node is a member, so nothing captured on the wire can be replayed
//! and no stranger can speak as a node. With `--replication-tls off` on both ends (a
//! dedicated back-end network), the TLS handshake still authenticates both nodes, and
//! the traffic after it goes in the clear.
//!
//! Link state drives the protocol: when the connection to a replica node comes up or
//! breaks, every primary volume with a replica there hears `link_up` / `link_down`.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use crate::message::{Message, NodeId};
use crate::volume::{PrimaryVolume, ReplicaVolume, Transport};

mod frame;

use frame::{
    bad, decode_incoming, encode_forward, read_frame, Frame, Incoming, FORWARD_REPLY,
    FORWARD_REQUEST,
};
pub use frame::{decode, encode, ForwardBody};

/// What the connecting side sends first: this, then the mode it asks for.
const MAGIC: &[u8; 4] = b"BWR2";
/// Mode: traffic inside TLS.
const MODE_TLS: u8 = b'T';
/// Mode: TLS handshake, then traffic in the clear (both ends opted out).
const MODE_PLAIN: u8 = b'P';
/// How long a new connection has for the mode exchange and the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// Names the node a verified certificate chain belongs to, if the committed cluster
/// state counts it as a member.
pub type AdmitPeer = Arc<dyn Fn(&[CertificateDer<'_>]) -> Result<NodeId, String> + Send + Sync>;

/// Admits a new connection from an address before its handshake, or says why not; what
/// it returns is held for as long as the connection lives (a slot of a bounded pool).
pub type AdmitConnection =
    Arc<dyn Fn(std::net::IpAddr) -> Result<Box<dyn Send + Sync>, String> + Send + Sync>;

/// How replication links authenticate peers and protect traffic.
#[derive(Clone)]
pub struct LinkSecurity {
    /// For accepted links: requires a node certificate the cluster CA issued.
    pub server: Arc<rustls::ServerConfig>,
    /// For links this node opens: shows its own certificate.
    pub client: Arc<rustls::ClientConfig>,
    /// The node a verified peer certificate chain belongs to, if the committed cluster
    /// state counts it as a member (an error says why not).
    pub admit: AdmitPeer,
    /// Send traffic in the clear after the handshake (`--replication-tls off`); used
    /// only when the other end opted out too.
    pub plaintext: bool,
    /// Bounds the connections the listener holds (per source, with slots kept for
    /// members); `None` admits all (tests of this crate alone).
    pub admit_connection: Option<AdmitConnection>,
}

/// What an incoming frame claims, for the committed cluster state to judge.
#[derive(Clone, Copy, Debug)]
pub enum Claim<'a> {
    /// A volume message.
    Volume {
        /// The volume.
        volume: &'a str,
        /// Sent by a primary to a replica (as opposed to a replica's answer).
        to_replica: bool,
        /// The epoch it was sent in.
        epoch: crate::message::Epoch,
        /// A replica's `Fenced`: it claims to have seen `epoch`.
        fenced: bool,
        /// For a write: the byte just past its end.
        write_end: Option<u64>,
    },
    /// A SCSI command or task management function forwarded for a target.
    Forward {
        /// The target.
        target: &'a str,
    },
}

impl<'a> Claim<'a> {
    fn of(frame: &'a Incoming) -> Option<Claim<'a>> {
        Some(match frame {
            Incoming::Volume(volume, msg) => Claim::Volume {
                volume,
                to_replica: msg.to_replica(),
                epoch: msg.epoch(),
                fenced: matches!(msg, Message::Fenced { .. }),
                write_end: match msg {
                    Message::Write {
                        offset, payload, ..
                    } => Some(offset.saturating_add(payload.len())),
                    _ => None,
                },
            },
            Incoming::ForwardRequest { target, .. } => Claim::Forward { target },
            // Matched against the request it answers instead.
            Incoming::ForwardReply { .. } => return None,
        })
    }
}

/// The committed state's judgement of a [`Claim`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Consistent with the committed state.
    Accept,
    /// Names an epoch this node's state has not reached yet: asked again when the
    /// state changes (a promotion may be committed but not yet applied here).
    Ahead,
    /// Contradicts the committed state; dropped.
    Refuse(String),
}

/// Judges every incoming frame against the committed cluster state before a volume
/// or the forwarding handler sees it.
pub trait Admission: Send + Sync {
    /// The verdict on `claim` from `from` (already authenticated by its certificate).
    fn check(&self, from: NodeId, claim: &Claim<'_>) -> Verdict;
    /// Resolves when the state may have changed (or after a short while).
    fn state_changed(&self)
        -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + '_>>;
}

/// Says when something keyed by `K` is due to be logged again: at most once a minute
/// per key, so a peer that keeps sending what is refused cannot flood the log. The
/// table forgets keys a minute old once it holds many.
struct OncePerMinute<K>(Mutex<HashMap<K, std::time::Instant>>);

impl<K> Default for OncePerMinute<K> {
    fn default() -> Self {
        OncePerMinute(Mutex::default())
    }
}

impl<K: std::hash::Hash + Eq> OncePerMinute<K> {
    const EVERY: Duration = Duration::from_secs(60);

    fn due(&self, key: K) -> bool {
        let now = std::time::Instant::now();
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if m.len() > 4096 {
            m.retain(|_, t| now.duration_since(*t) < Self::EVERY);
        }
        let due = m
            .get(&key)
            .is_none_or(|t| now.duration_since(*t) >= Self::EVERY);
        if due {
            m.insert(key, now);
        }
        due
    }
}

/// How long a frame that names an epoch ahead of this node's state waits for it.
const AHEAD_WAIT: Duration = Duration::from_secs(2);

/// One side of an established link: TLS, or the bare socket after a TLS handshake.
trait LinkStream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static> LinkStream for T {}

/// Runs a TLS handshake reading exactly one record at a time, so that not a byte past
/// the handshake is consumed: the socket then carries the traffic in the clear.
async fn handshake_exact<D>(
    conn: &mut rustls::ConnectionCommon<D>,
    s: &mut TcpStream,
) -> io::Result<()> {
    loop {
        while conn.wants_write() {
            let mut out = Vec::new();
            conn.write_tls(&mut out)?;
            s.write_all(&out).await?;
        }
        if !conn.is_handshaking() {
            return Ok(());
        }
        let mut record = vec![0u8; 5];
        s.read_exact(&mut record).await?;
        let len = usize::from(u16::from_be_bytes([record[3], record[4]]));
        if len > 18 << 10 {
            return Err(bad("TLS record too large"));
        }
        record.resize(5 + len, 0);
        s.read_exact(&mut record[5..]).await?;
        conn.read_tls(&mut record.as_slice())?;
        conn.process_new_packets()
            .map_err(|e| io::Error::new(io::ErrorKind::PermissionDenied, e))?;
    }
}
/// How long a forwarded command may wait for its answer before it is failed as
/// transitioning (a primary stopped, not disconnected, answers nothing).
pub const FORWARD_TIMEOUT: Duration = Duration::from_secs(15);

/// Executes SCSI commands that other nodes forward here (their ports are
/// active/non-optimized: this node is primary). The body is the caller's encoding.
pub trait ForwardHandler: Send + Sync {
    /// Handles one request for `target` from `from`; the answer goes to `reply`.
    fn request(&self, from: NodeId, target: String, body: Bytes, reply: ForwardReply);
}

/// Where the answer to one forwarded request goes (back on the link it came in on).
pub struct ForwardReply {
    tx: Option<mpsc::UnboundedSender<Frame>>,
    target: String,
    id: u64,
}

impl ForwardReply {
    /// Sends the answer; it is lost if the link went down meanwhile (the sender then
    /// fails the request itself).
    pub fn send(self, body: impl Into<ForwardBody>) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(encode_forward(
                FORWARD_REPLY,
                &self.target,
                self.id,
                body.into(),
            ));
        }
    }
}

/// The callback of one request sent with [`ReplicationNet::forward`]: the answer, or
/// `None` when the link went down or the answer did not come in time.
pub type ForwardDone = Box<dyn FnOnce(Option<Bytes>) + Send>;

struct PendingForward {
    node: NodeId,
    sent: std::time::Instant,
    done: ForwardDone,
}

/// This node's replication endpoint: its listener, its links to other nodes, and the
/// volumes it serves as primary or replica.
pub struct ReplicationNet {
    me: NodeId,
    security: LinkSecurity,
    /// Outgoing links (to replica nodes), by node.
    outgoing: Mutex<HashMap<NodeId, mpsc::UnboundedSender<Frame>>>,
    /// Incoming links (from primary nodes), by node.
    incoming: Mutex<HashMap<NodeId, mpsc::UnboundedSender<Frame>>>,
    /// Where each node listens.
    addrs: Mutex<HashMap<NodeId, SocketAddr>>,
    primaries: Mutex<HashMap<String, Arc<PrimaryVolume>>>,
    replicas: Mutex<HashMap<String, Arc<ReplicaVolume>>>,
    /// Links that are up now (outgoing, by node).
    up: Mutex<std::collections::BTreeSet<NodeId>>,
    /// Outgoing links leave from the replication address.
    local: std::net::IpAddr,
    /// Executes what other nodes forward here.
    forward_handler: Mutex<Option<Arc<dyn ForwardHandler>>>,
    /// Requests forwarded from here that wait for their answer, by id.
    forwards: Mutex<HashMap<u64, PendingForward>>,
    next_forward: std::sync::atomic::AtomicU64,
    /// Judges incoming frames; unset accepts everything (tests of this crate alone).
    /// Set once at start, read on every frame without a lock.
    admission: std::sync::OnceLock<Arc<dyn Admission>>,
    /// Frames refused by admission, in all.
    refused: std::sync::atomic::AtomicU64,
    /// Refused frames are logged once a minute per peer node.
    refusal_logged: OncePerMinute<NodeId>,
    /// Refused connections are logged once a minute per address.
    connection_refusals_logged: OncePerMinute<std::net::IpAddr>,
}

impl ReplicationNet {
    /// Listens on `listen` and returns the endpoint.
    pub async fn start(
        me: NodeId,
        security: LinkSecurity,
        listen: SocketAddr,
    ) -> io::Result<Arc<ReplicationNet>> {
        let listener = TcpListener::bind(listen).await.map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot listen for replication on {listen}: {e}"),
            )
        })?;
        let net = Arc::new(ReplicationNet {
            me,
            security,
            outgoing: Mutex::default(),
            incoming: Mutex::default(),
            addrs: Mutex::default(),
            primaries: Mutex::default(),
            replicas: Mutex::default(),
            up: Mutex::default(),
            local: listen.ip(),
            forward_handler: Mutex::default(),
            forwards: Mutex::default(),
            next_forward: std::sync::atomic::AtomicU64::new(1),
            admission: std::sync::OnceLock::new(),
            refused: std::sync::atomic::AtomicU64::new(0),
            refusal_logged: OncePerMinute::default(),
            connection_refusals_logged: OncePerMinute::default(),
        });
        let weak = Arc::downgrade(&net);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let Some(n) = weak.upgrade() else { return };
                n.fail_forwards(|p| p.sent.elapsed() >= FORWARD_TIMEOUT);
            }
        });
        let n = net.clone();
        tokio::spawn(async move {
            loop {
                match listener.accept().await {
                    Ok((s, peer)) => {
                        let slot = match &n.security.admit_connection {
                            Some(admit) => match admit(peer.ip()) {
                                Ok(slot) => Some(slot),
                                Err(why) => {
                                    tracing::debug!(%peer, %why, "closed a replication connection at accept");
                                    continue;
                                }
                            },
                            None => None,
                        };
                        let n = n.clone();
                        tokio::spawn(async move {
                            let _slot = slot;
                            if let Err(e) = n.serve_incoming(s, peer).await {
                                tracing::debug!(%peer, error = %e, "replication connection ended");
                            }
                        });
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "replication accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        });
        Ok(net)
    }

    /// Where `node` listens for replication; links to it are kept up from now on.
    pub fn set_peer(self: &Arc<Self>, node: NodeId, addr: SocketAddr) {
        if node == self.me {
            return;
        }
        let new = {
            let mut a = self.addrs.lock().unwrap_or_else(|e| e.into_inner());
            a.insert(node, addr) != Some(addr)
        };
        if new {
            let n = self.clone();
            tokio::spawn(async move { n.keep_link(node, addr).await });
        }
    }

    /// Sets what judges incoming frames against the committed cluster state (once; a
    /// second call changes nothing).
    pub fn set_admission(&self, a: Arc<dyn Admission>) {
        let _ = self.admission.set(a);
    }

    /// Frames from authenticated peers refused because they contradict the committed
    /// cluster state.
    pub fn refused_frames(&self) -> u64 {
        self.refused.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Logs a refused connection, once a minute per source address.
    fn log_refusal(&self, source: std::net::IpAddr, e: &io::Error) {
        self.refused
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if self.connection_refusals_logged.due(source) {
            tracing::warn!(peer = %source, error = %e, "refused a replication connection (logged once a minute per address)");
        }
    }

    /// Whether `frame` from `peer` is consistent with the committed state, waiting a
    /// little for a state that is behind. A refusal is counted, and logged once a
    /// minute per peer.
    async fn admitted(&self, peer: NodeId, frame: &Incoming) -> bool {
        let Some(claim) = Claim::of(frame) else {
            return true;
        };
        let Some(adm) = self.admission.get() else {
            return true;
        };
        let deadline = tokio::time::Instant::now() + AHEAD_WAIT;
        let why = loop {
            match adm.check(peer, &claim) {
                Verdict::Accept => return true,
                Verdict::Refuse(why) => break why,
                Verdict::Ahead if tokio::time::Instant::now() >= deadline => {
                    break format!(
                        "{claim:?} is ahead of the committed state (an epoch, volume or size it has not reached)"
                    );
                }
                Verdict::Ahead => {
                    let _ = tokio::time::timeout_at(deadline, adm.state_changed()).await;
                }
            }
        };
        self.refused
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let log = self.refusal_logged.due(peer);
        if log {
            tracing::warn!(node = peer.0, %why, "refused a replication frame that contradicts the cluster state (logged once a minute per node)");
        }
        false
    }

    /// Sets what executes requests forwarded to this node.
    pub fn set_forward_handler(&self, h: Arc<dyn ForwardHandler>) {
        *self
            .forward_handler
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(h);
    }

    /// Forwards `body` for `target` to `node` over the link to it; `done` gets the
    /// answer, or `None` at once when there is no link, later when it breaks or the
    /// answer takes longer than [`FORWARD_TIMEOUT`].
    pub fn forward(
        &self,
        node: NodeId,
        target: &str,
        body: impl Into<ForwardBody>,
        done: ForwardDone,
    ) {
        let tx = self
            .outgoing
            .lock()
            .ok()
            .and_then(|m| m.get(&node).cloned());
        let Some(tx) = tx else {
            return done(None);
        };
        let id = self
            .next_forward
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.forwards
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(
                id,
                PendingForward {
                    node,
                    sent: std::time::Instant::now(),
                    done,
                },
            );
        if tx
            .send(encode_forward(FORWARD_REQUEST, target, id, body.into()))
            .is_err()
        {
            self.fail_forwards(|p| p.node == node);
        }
    }

    fn fail_forwards(&self, which: impl Fn(&PendingForward) -> bool) {
        let failed: Vec<PendingForward> = {
            let mut m = self.forwards.lock().unwrap_or_else(|e| e.into_inner());
            let ids: Vec<u64> = m
                .iter()
                .filter(|(_, p)| which(p))
                .map(|(id, _)| *id)
                .collect();
            ids.into_iter().filter_map(|id| m.remove(&id)).collect()
        };
        for p in failed {
            (p.done)(None);
        }
    }

    fn incoming_frame(&self, peer: NodeId, frame: Incoming) {
        match frame {
            Incoming::Volume(vol, msg) => self.route(peer, vol, msg),
            Incoming::ForwardRequest { target, id, body } => {
                let handler = self
                    .forward_handler
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .clone();
                let tx = self
                    .incoming
                    .lock()
                    .ok()
                    .and_then(|m| m.get(&peer).cloned());
                let reply = ForwardReply {
                    tx,
                    target: target.clone(),
                    id,
                };
                match handler {
                    Some(h) => h.request(peer, target, body, reply),
                    // Dropped: the sender times the request out.
                    None => drop(reply),
                }
            }
            Incoming::ForwardReply { id, body } => {
                // Only the node the request went to may answer it.
                let p = {
                    let mut m = self.forwards.lock().unwrap_or_else(|e| e.into_inner());
                    match m.get(&id) {
                        Some(p) if p.node == peer => m.remove(&id),
                        _ => None,
                    }
                };
                match p {
                    Some(p) => (p.done)(Some(body)),
                    None => {
                        self.refused
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        tracing::debug!(
                            node = peer.0,
                            id,
                            "dropped a forwarding reply to no request sent there"
                        );
                    }
                }
            }
        }
    }

    /// The nodes whose replication links are up now.
    pub fn up_nodes(&self) -> std::collections::BTreeSet<NodeId> {
        self.up.lock().map(|u| u.clone()).unwrap_or_default()
    }

    /// Registers a primary volume: it hears about links to its replicas.
    pub fn add_primary(&self, name: &str, p: Arc<PrimaryVolume>) {
        let up: Vec<NodeId> = self
            .up
            .lock()
            .map(|u| u.iter().copied().collect())
            .unwrap_or_default();
        for n in up {
            p.link_up(n);
        }
        if let Ok(mut m) = self.primaries.lock() {
            m.insert(name.to_string(), p);
        }
    }

    /// Unregisters a primary volume.
    pub fn remove_primary(&self, name: &str) -> Option<Arc<PrimaryVolume>> {
        self.primaries.lock().ok().and_then(|mut m| m.remove(name))
    }

    /// Registers a replica volume.
    pub fn add_replica(&self, name: &str, r: Arc<ReplicaVolume>) {
        if let Ok(mut m) = self.replicas.lock() {
            m.insert(name.to_string(), r);
        }
    }

    /// Unregisters a replica volume.
    pub fn remove_replica(&self, name: &str) -> Option<Arc<ReplicaVolume>> {
        self.replicas.lock().ok().and_then(|mut m| m.remove(name))
    }

    /// The transport a volume named `volume` sends through.
    pub fn transport(self: &Arc<Self>, volume: &str) -> Arc<dyn Transport> {
        Arc::new(VolumeTransport {
            net: self.clone(),
            volume: volume.to_string(),
        })
    }

    fn route(&self, from: NodeId, volume: String, msg: Message) {
        let to_replica = msg.to_replica();
        if to_replica {
            let r = self
                .replicas
                .lock()
                .ok()
                .and_then(|m| m.get(&volume).cloned());
            if let Some(r) = r {
                r.deliver(from, msg);
            }
        } else {
            let p = self
                .primaries
                .lock()
                .ok()
                .and_then(|m| m.get(&volume).cloned());
            if let Some(p) = p {
                p.deliver(from, msg);
            }
        }
    }

    /// Whether this node sends replication traffic in the clear.
    pub fn plaintext(&self) -> bool {
        self.security.plaintext
    }

    /// The node a verified TLS peer is, if the cluster admits it.
    fn admit(&self, certs: Option<&[CertificateDer<'_>]>) -> io::Result<NodeId> {
        let certs = certs.unwrap_or(&[]);
        (self.security.admit)(certs)
            .map_err(|why| io::Error::new(io::ErrorKind::PermissionDenied, why))
    }

    /// Accepts a link: the mode exchange, the TLS handshake (a node certificate is
    /// required), and the check that the peer is a member.
    async fn accept_link(&self, mut s: TcpStream) -> io::Result<(NodeId, Box<dyn LinkStream>)> {
        let mut hello = [0u8; 5];
        s.read_exact(&mut hello).await?;
        if &hello[..4] != MAGIC {
            return Err(bad(
                "not a replication connection (or a node of another version)",
            ));
        }
        let mode = if hello[4] == MODE_PLAIN && self.security.plaintext {
            MODE_PLAIN
        } else {
            MODE_TLS
        };
        s.write_all(&[mode]).await?;
        if mode == MODE_PLAIN {
            let mut conn = rustls::ServerConnection::new(self.security.server.clone())
                .map_err(io::Error::other)?;
            handshake_exact(&mut conn, &mut s).await?;
            let from = self.admit(conn.peer_certificates())?;
            Ok((from, Box::new(s)))
        } else {
            let tls = tokio_rustls::TlsAcceptor::from(self.security.server.clone())
                .accept(s)
                .await?;
            let from = self.admit(tls.get_ref().1.peer_certificates())?;
            Ok((from, Box::new(tls)))
        }
    }

    /// Opens a link to `node`: the mode exchange, the TLS handshake with this node's
    /// certificate, and the check that the server is `node` and a member.
    async fn open_link(&self, node: NodeId, mut s: TcpStream) -> io::Result<Box<dyn LinkStream>> {
        let ask = if self.security.plaintext {
            MODE_PLAIN
        } else {
            MODE_TLS
        };
        s.write_all(&[MAGIC[0], MAGIC[1], MAGIC[2], MAGIC[3], ask])
            .await?;
        let mut mode = [0u8; 1];
        s.read_exact(&mut mode).await?;
        // The server may only keep or raise protection, never lower it.
        if mode[0] != MODE_TLS && !(mode[0] == MODE_PLAIN && ask == MODE_PLAIN) {
            return Err(bad("the peer chose a mode this node did not offer"));
        }
        let name = ServerName::try_from("bulwark-cluster").map_err(io::Error::other)?;
        let (peer, stream): (NodeId, Box<dyn LinkStream>) = if mode[0] == MODE_PLAIN {
            let mut conn = rustls::ClientConnection::new(self.security.client.clone(), name)
                .map_err(io::Error::other)?;
            handshake_exact(&mut conn, &mut s).await?;
            (self.admit(conn.peer_certificates())?, Box::new(s))
        } else {
            let tls = tokio_rustls::TlsConnector::from(self.security.client.clone())
                .connect(name, s)
                .await?;
            (
                self.admit(tls.get_ref().1.peer_certificates())?,
                Box::new(tls),
            )
        };
        if peer != node {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!("the replication address of node {node} answered as node {peer}"),
            ));
        }
        Ok(stream)
    }

    async fn serve_incoming(self: Arc<Self>, s: TcpStream, addr: SocketAddr) -> io::Result<()> {
        let _ = s.set_nodelay(true);
        let (from, stream) =
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, self.accept_link(s)).await {
                Ok(Ok(l)) => l,
                Ok(Err(e)) => {
                    self.log_refusal(addr.ip(), &e);
                    return Err(e);
                }
                Err(_) => return Err(bad("no handshake in time")),
            };
        let (tx, rx) = mpsc::unbounded_channel::<Frame>();
        if let Ok(mut m) = self.incoming.lock() {
            m.insert(from, tx);
        }
        self.exchange(from, stream, rx).await
    }

    /// Runs one established link with `peer`: frames queued on `rx` go out (those
    /// queued together in one write, flushed when the queue is empty), frames read are
    /// routed to the volumes; returns when either side fails.
    async fn exchange(
        &self,
        peer: NodeId,
        stream: Box<dyn LinkStream>,
        mut rx: mpsc::UnboundedReceiver<Frame>,
    ) -> io::Result<()> {
        let (rd, wr) = tokio::io::split(stream);
        let writer = tokio::spawn(async move {
            let mut wr = tokio::io::BufWriter::with_capacity(256 << 10, wr);
            while let Some(first) = rx.recv().await {
                let mut next = Some(first);
                while let Some((h, d)) = next.take() {
                    if wr.write_all(&h).await.is_err() {
                        return;
                    }
                    if let Some(d) = d {
                        if wr.write_all(&d).await.is_err() {
                            return;
                        }
                    }
                    next = rx.try_recv().ok();
                }
                if wr.flush().await.is_err() {
                    return;
                }
            }
        });
        // Buffered: a burst of frames costs one read, not two per frame.
        let mut rd = tokio::io::BufReader::with_capacity(256 << 10, rd);
        let result = loop {
            match read_frame(&mut rd).await.and_then(decode_incoming) {
                Ok(frame) => {
                    if self.admitted(peer, &frame).await {
                        self.incoming_frame(peer, frame)
                    }
                }
                Err(e) => break Err(e),
            }
        };
        writer.abort();
        result
    }

    async fn connect(&self, addr: SocketAddr) -> io::Result<TcpStream> {
        let socket = if self.local.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        socket.bind(SocketAddr::new(self.local, 0))?;
        socket.connect(addr).await
    }

    /// Keeps the outgoing link to `node` up, reconnecting with a short backoff, and
    /// tells the primaries when it goes up or down.
    async fn keep_link(self: Arc<Self>, node: NodeId, addr: SocketAddr) {
        loop {
            let current = self.addrs.lock().ok().and_then(|a| a.get(&node).copied());
            if current != Some(addr) {
                return; // replaced by a newer address
            }
            match tokio::time::timeout(Duration::from_secs(1), self.connect(addr)).await {
                Ok(Ok(s)) => {
                    if let Err(e) = self.run_link(node, s).await {
                        tracing::debug!(node = node.0, error = %e, "replication link down");
                    }
                    self.link_changed(node, false);
                }
                _ => tokio::time::sleep(Duration::from_millis(100)).await,
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn run_link(self: &Arc<Self>, node: NodeId, s: TcpStream) -> io::Result<()> {
        let _ = s.set_nodelay(true);
        let stream = tokio::time::timeout(HANDSHAKE_TIMEOUT, self.open_link(node, s))
            .await
            .map_err(|_| bad("no handshake in time"))?
            .inspect_err(|e| {
                tracing::warn!(node = node.0, error = %e, "cannot open the replication link");
            })?;
        let (tx, rx) = mpsc::unbounded_channel::<Frame>();
        if let Ok(mut m) = self.outgoing.lock() {
            m.insert(node, tx);
        }
        self.link_changed(node, true);
        let result = self.exchange(node, stream, rx).await;
        if let Ok(mut m) = self.outgoing.lock() {
            m.remove(&node);
        }
        result
    }

    fn link_changed(&self, node: NodeId, up: bool) {
        if !up {
            // Requests forwarded over the link will not be answered.
            self.fail_forwards(|p| p.node == node);
        }
        if let Ok(mut u) = self.up.lock() {
            if up {
                u.insert(node);
            } else {
                u.remove(&node);
            }
        }
        let prims: Vec<Arc<PrimaryVolume>> = self
            .primaries
            .lock()
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default();
        for p in prims {
            if up {
                p.link_up(node);
            } else {
                p.link_down(node);
            }
        }
    }
}

struct VolumeTransport {
    net: Arc<ReplicationNet>,
    volume: String,
}

impl Transport for VolumeTransport {
    fn send(&self, to: NodeId, msg: Message) {
        let to_replica = msg.to_replica();
        let map = if to_replica {
            &self.net.outgoing
        } else {
            &self.net.incoming
        };
        let tx = map.lock().ok().and_then(|m| m.get(&to).cloned());
        if let Some(tx) = tx {
            let _ = tx.send(encode(&self.volume, &msg));
        }
    }
}
