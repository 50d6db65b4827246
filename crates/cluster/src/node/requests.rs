//! The control listener: connections accepted within limits, callers authenticated,
//! and the requests they make answered (cluster writes, joins, status, leases).

use super::*;

impl ClusterNode {
    /// Leader side of a lease renewal: granted only after confirming leadership with a
    /// quorum, so a deposed leader cut off from the others never grants one. One
    /// confirmation serves every volume of the request.
    pub(super) async fn grant_leases(&self, volumes: &[(String, u64)], node: NodeId) -> Response {
        let me = self.id();
        let m = self.inner.raft.metrics().borrow().clone();
        if m.current_leader != Some(me) {
            return Response::NotLeader(self.leader_addr());
        }
        let checked = Instant::now();
        if self.inner.raft.ensure_linearizable().await.is_err() {
            return Response::NotLeader(None);
        }
        let st = self.inner.state.borrow().clone();
        let Ok(mut book) = self.inner.leases.lock() else {
            return Response::Error("the lease book is poisoned".into());
        };
        let answers = volumes
            .iter()
            .map(|(volume, epoch)| match st.volumes.get(volume) {
                Some(v) if v.primary == node && v.epoch == *epoch => {
                    book.grant(volume, *epoch, checked);
                    Ok(())
                }
                Some(v) => Err(format!(
                    "volume {volume} is at epoch {} with primary {}; node {node} at epoch {epoch} is deposed",
                    v.epoch, v.primary
                )),
                None => Err(format!("no volume {volume}")),
            })
            .collect();
        Response::Leases(answers)
    }

    async fn cluster_status(&self) -> Response {
        let (state, nodes) = self.gather_status().await;
        Response::ClusterStatus {
            state: crate::auth::redacted(&state),
            nodes,
        }
    }

    async fn handle(&self, req: Request, caller: &Caller) -> Response {
        if let Err(why) = req.allowed(caller) {
            return Response::Error(why);
        }
        if let Request::Write(cmd) = &req {
            if let Err(refused) = cmd.check_names() {
                return Response::Written(Err(refused));
            }
        }
        let raft = &self.inner.raft;
        match req {
            Request::AppendEntries(r) => {
                let resp = raft.append_entries(r).await;
                if resp
                    .as_ref()
                    .is_ok_and(|r| !matches!(r, AppendEntriesResponse::HigherVote(_)))
                {
                    self.inner.contact.heard();
                }
                Response::AppendEntries(resp)
            }
            Request::Vote(_) if !self.inner.contact.may_vote() => Response::Error(format!(
                "node {} started less than {} ms ago and may have heard a leader just before; it votes once that has passed",
                self.inner.identity.name,
                election::silence().as_millis()
            )),
            Request::Vote(r) => Response::Vote(raft.vote(r).await),
            Request::InstallSnapshot(r) => {
                let resp = raft.install_snapshot(r).await;
                if resp.as_ref().is_ok_and(|r| r.vote.is_committed()) {
                    self.inner.contact.heard();
                }
                Response::InstallSnapshot(resp)
            }
            Request::Write(cmd) => match self.write_via(cmd, false).await {
                Ok(r) => Response::Written(r),
                Err(e) => Response::Error(e.to_string()),
            },
            Request::Writes(cmds) if cmds.len() > forward::MAX_BATCH => Response::Error(format!(
                "a batch of {} commands is over the limit of {}",
                cmds.len(),
                forward::MAX_BATCH
            )),
            Request::Writes(cmds) => {
                // Proposed together: openraft appends what arrives at once in one write.
                let mut each = tokio::task::JoinSet::new();
                let n = cmds.len();
                for (i, cmd) in cmds.into_iter().enumerate() {
                    let node = self.clone();
                    each.spawn(async move {
                        let answer = match cmd.check_names() {
                            // Refused before it reached the log: no index to wait for.
                            Err(refused) => Ok((Err(refused), 0)),
                            Ok(()) => match node.commit_via(cmd, false).await {
                                Ok((r, Some(index))) => Ok((r, index)),
                                Ok((r, None)) => Ok((r, 0)),
                                Err(e) => Err(e.to_string()),
                            },
                        };
                        (i, answer)
                    });
                }
                let mut answers: Vec<Result<crate::rpc::Committed, String>> =
                    (0..n).map(|_| Err("not answered".to_string())).collect();
                while let Some(done) = each.join_next().await {
                    match done {
                        Ok((i, answer)) => answers[i] = answer,
                        Err(e) => warn!(error = %e, "a batched write's task failed"),
                    }
                }
                Response::WrittenEach(answers)
            }
            Request::Join {
                name,
                public_key,
                addresses,
                capacity_bytes,
            } => {
                let key = match parse_public_key(&public_key) {
                    Ok(k) => k,
                    Err(e) => return Response::Error(e),
                };
                // A join token is spent before the node is admitted: two joins with
                // one token cannot both pass.
                if let Caller::Token(h) = caller {
                    if h.role == crate::auth::Role::Join {
                        let spend = Command::UseToken {
                            id: h.id.clone(),
                            now_unix_ms: crate::auth::now_unix_ms(),
                        };
                        match self.write(spend).await {
                            Ok(Ok(_)) => {}
                            Ok(Err(refused)) => return Response::Written(Err(refused)),
                            Err(e) => return Response::Error(e.to_string()),
                        }
                    }
                }
                let cmd = Command::AddNode {
                    name: name.clone(),
                    addresses,
                    capacity_bytes,
                    public_key: Some(crate::identity::hex(&key)),
                };
                match self.write(cmd).await {
                    Ok(Ok(Applied::NodeAdded(node_id))) => {
                        let node_cert_pem =
                            match self.inner.identity.cert.issue_node_cert(node_id, &key) {
                                Ok(c) => c,
                                Err(e) => return Response::Error(e.to_string()),
                            };
                        self.inner.events.push(
                            EventKind::Membership,
                            format!("node {name} joined as id {node_id}"),
                        );
                        let seeds = self
                            .inner
                            .state
                            .borrow()
                            .nodes
                            .values()
                            .map(|n| n.addresses.control)
                            .collect();
                        Response::Joined {
                            node_id,
                            cluster_id: self.inner.identity.cluster_id.clone(),
                            cert: self.inner.identity.cert.clone(),
                            node_cert_pem,
                            seeds,
                        }
                    }
                    Ok(other) => Response::Written(other),
                    Err(e) => Response::Error(e.to_string()),
                }
            }
            Request::State => Response::State(crate::auth::redacted(&self.inner.state.borrow())),
            Request::StateWithSecrets => Response::State((**self.inner.state.borrow()).clone()),
            Request::Status => Response::Status(self.status().await),
            Request::ClusterStatus => self.cluster_status().await,
            Request::RenewLeases { node, volumes } => match caller {
                Caller::Node(id) if *id != node => Response::Error(format!(
                    "node {id} asked for the leases of node {node}; a node renews only its own"
                )),
                _ => self.grant_leases(&volumes, node).await,
            },
        }
    }
}

/// Control connections served at once: from addresses that are not members', from
/// any one such address, and from members (slots strangers never take, so a flood
/// cannot block Raft or lease renewals). More are closed at accept.
pub const CONTROL_LIMITS: crate::limits::Limits = crate::limits::Limits {
    strangers: 256,
    members: 64,
    per_source: 16,
};

pub(super) async fn accept_loop(
    node: ClusterNode,
    listener: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
) {
    let limiter = crate::limits::ConnectionLimiter::new(CONTROL_LIMITS);
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, "control accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let member = crate::limits::is_member_address(&node.inner.state.borrow(), peer.ip());
        let slot = match limiter.admit(peer.ip(), member) {
            Ok(slot) => slot,
            Err(why) => {
                debug!(%peer, %why, "closed a control connection at accept");
                node.inner
                    .events
                    .push_refusal(&peer.ip().to_string(), &why.to_string());
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let (node, acceptor) = (node.clone(), acceptor.clone());
        tokio::spawn(async move {
            let _slot = slot;
            let tls = match tokio::time::timeout(
                crate::rpc::HANDSHAKE_TIMEOUT,
                acceptor.accept(stream),
            )
            .await
            {
                Ok(Ok(t)) => t,
                Ok(Err(e)) => {
                    debug!(%peer, error = %e, "refused a control connection: TLS handshake failed");
                    node.inner.events.push_refusal(
                        &peer.ip().to_string(),
                        &format!("TLS handshake failed (not a member of this cluster?): {e}"),
                    );
                    return;
                }
                Err(_) => {
                    debug!(%peer, "refused a control connection: no TLS handshake in time");
                    node.inner
                        .events
                        .push_refusal(&peer.ip().to_string(), "no TLS handshake in time");
                    return;
                }
            };
            serve_connection(node, tls, peer).await;
        });
    }
}

async fn serve_connection(
    node: ClusterNode,
    mut tls: tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
    peer: SocketAddr,
) {
    // A node shows its certificate in the handshake (already verified against the
    // CA); the state must still count it as a member with that key.
    let member = crate::identity::peer_cert(tls.get_ref().1.peer_certificates()).map(|p| {
        p.and_then(|p| {
            crate::identity::check_member(&node.inner.state.borrow(), &p).map(|()| p.node)
        })
    });
    let hello: Hello = match tokio::time::timeout(
        crate::rpc::HANDSHAKE_TIMEOUT,
        crate::rpc::read_small_frame(&mut tls),
    )
    .await
    {
        Ok(Ok(h)) => h,
        _ => {
            debug!(%peer, "refused a control connection: no valid hello");
            node.inner
                .events
                .push_refusal(&peer.ip().to_string(), "no valid hello in time");
            return;
        }
    };
    let caller = match member {
        Some(Ok(id)) => Caller::Node(id),
        Some(Err(why)) => {
            debug!(%peer, %why, "refused a control connection");
            node.inner
                .events
                .push_refusal(&peer.ip().to_string(), &format!("{} ({why})", hello.from));
            let _ = write_frame(&mut tls, &Response::NotAMember(why)).await;
            return;
        }
        None => match node.authenticate(&hello.secret) {
            Ok(holder) => Caller::Token(holder),
            Err(why) => {
                debug!(%peer, %why, "refused a control connection");
                node.inner
                    .events
                    .push_refusal(&peer.ip().to_string(), &format!("{} ({why})", hello.from));
                let _ = write_frame(
                    &mut tls,
                    &Response::Error(format!(
                        "wrong cluster credentials ({why}): use a token that `bulwark cluster init` or `bulwark cluster token create` printed"
                    )),
                )
                .await;
                return;
            }
        },
    };
    if write_frame(&mut tls, &Response::Written(Ok(Applied::Done)))
        .await
        .is_err()
    {
        return;
    }
    loop {
        let req: Request = match read_frame(&mut tls).await {
            Ok(r) => r,
            Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                // Say why rather than drop the connection: the sender would only see a
                // closed connection (a node of another version, or a bug).
                warn!(%peer, error = %e, "undecodable control request");
                let why = Response::Error(format!(
                    "{} cannot decode the request ({e}); are all nodes the same version?",
                    node.identity().name
                ));
                let _ = write_frame(&mut tls, &why).await;
                return;
            }
            Err(e) => {
                if e.kind() != std::io::ErrorKind::UnexpectedEof {
                    debug!(%peer, error = %e, "control connection ended");
                }
                return;
            }
        };
        // A token revoked or expired while the connection is open stops here.
        if let Caller::Token(_) = caller {
            if let Err(why) = node.authenticate(&hello.secret) {
                let _ = write_frame(&mut tls, &Response::Error(why)).await;
                return;
            }
        }
        let resp = node.handle(req, &caller).await;
        if write_frame(&mut tls, &resp).await.is_err() {
            return;
        }
    }
}

/// The public key a joining node sent: hex of an uncompressed P-256 point.
fn parse_public_key(hex: &str) -> Result<Vec<u8>, String> {
    let bytes: Option<Vec<u8>> = (hex.len() == 130)
        .then(|| {
            (0..65)
                .map(|i| u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok())
                .collect()
        })
        .flatten();
    bytes.ok_or_else(|| {
        "the join request's public key is not a P-256 point (130 hex digits); is the joining node the same version?".into()
    })
}
