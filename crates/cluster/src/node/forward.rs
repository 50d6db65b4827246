//! Commands a follower forwards to the Raft leader, batched per leader address.
//!
//! A node that is primary of many volumes asks for many in-sync-set changes at once
//! when a peer comes back (one per volume), and each used to travel as its own RPC on
//! its own connection. At 256 volumes those took every member slot of the leader's
//! control listener, so Raft's own messages were refused and elections churned (issue
//! 19). Here every forwarded command joins a queue per leader address; one task sends
//! what has queued as one [`Request::Writes`], with at most [`IN_FLIGHT`] batches out at
//! once. The leader proposes a batch's commands together, and openraft appends them to
//! its log in one write.

use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};

use super::*;

/// Batches sent to one leader and not yet answered, at most. While they are out, new
/// commands queue and leave together as the next batch.
const IN_FLIGHT: usize = 4;

/// Commands in one batch, at most; a larger queue leaves as several batches.
pub(super) const MAX_BATCH: usize = 256;

/// Commands waiting for a batch, per leader, at most; more wait for room.
const QUEUE: usize = 1024;

/// How long the leader has to commit a batch.
const BATCH_TIMEOUT: Duration = Duration::from_secs(5);

type Reply = Result<crate::rpc::Committed, NodeError>;

struct Pending {
    cmd: Command,
    reply: oneshot::Sender<Reply>,
}

/// The queues, one per leader address this node has forwarded to.
#[derive(Default)]
pub(super) struct Forwarder {
    queues: Mutex<HashMap<SocketAddr, mpsc::Sender<Pending>>>,
}

impl Forwarder {
    /// Sends `cmd` to the leader at `addr` in the next batch and waits for its result.
    pub(super) async fn forward(&self, peers: &Peers, addr: SocketAddr, cmd: &Command) -> Reply {
        let queue = {
            let mut queues = self
                .queues
                .lock()
                .map_err(|_| NodeError::Raft("forwarding table poisoned".into()))?;
            match queues.get(&addr) {
                Some(q) if !q.is_closed() => q.clone(),
                _ => {
                    let (tx, rx) = mpsc::channel(QUEUE);
                    tokio::spawn(send_batches(peers.client(addr)?, rx));
                    queues.insert(addr, tx.clone());
                    tx
                }
            }
        };
        let (reply, answer) = oneshot::channel();
        let pending = Pending {
            cmd: cmd.clone(),
            reply,
        };
        if queue.send(pending).await.is_err() {
            return Err(NodeError::Raft("the forwarding task stopped".into()));
        }
        answer
            .await
            .map_err(|_| NodeError::Raft("the forwarding task dropped a command".into()))?
    }
}

/// One leader's queue: takes what has queued (up to [`MAX_BATCH`]) whenever fewer than
/// [`IN_FLIGHT`] batches are out, and sends it.
async fn send_batches(client: Arc<Client>, mut queue: mpsc::Receiver<Pending>) {
    let slots = Arc::new(Semaphore::new(IN_FLIGHT));
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let Some(first) = queue.recv().await else {
            return;
        };
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(p) => batch.push(p),
                Err(_) => break,
            }
        }
        tokio::spawn(send_batch(client.clone(), batch, slot));
    }
}

async fn send_batch(client: Arc<Client>, batch: Vec<Pending>, _slot: OwnedSemaphorePermit) {
    let (cmds, replies): (Vec<Command>, Vec<_>) =
        batch.into_iter().map(|p| (p.cmd, p.reply)).unzip();
    let n = cmds.len();
    let answers = match client.call(&Request::Writes(cmds), BATCH_TIMEOUT).await {
        Ok(Response::WrittenEach(answers)) if answers.len() == n => answers
            .into_iter()
            .map(|a| a.map_err(NodeError::Remote))
            .collect(),
        Ok(Response::WrittenEach(answers)) => {
            let e = format!("the leader answered {} of {n} commands", answers.len());
            (0..n).map(|_| Err(NodeError::Remote(e.clone()))).collect()
        }
        Ok(Response::Error(e)) => (0..n).map(|_| Err(NodeError::Remote(e.clone()))).collect(),
        Ok(other) => {
            let e = format!("unexpected answer: {other:?}");
            (0..n).map(|_| Err(NodeError::Remote(e.clone()))).collect()
        }
        Err(e) => (0..n).map(|_| Err(NodeError::Rpc(e.clone()))).collect(),
    };
    let answers: Vec<Reply> = answers;
    for (reply, answer) in replies.into_iter().zip(answers) {
        // The caller may have given up; its command was still committed or refused.
        let _ = reply.send(answer);
    }
}
