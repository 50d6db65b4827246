//! The admin HTTPS listener: the web console (`/`), its API (`/api/...`) and
//! `/metrics`.
//!
//! TLS with this node's certificate (issued by the cluster CA). A token admits, given
//! as `Authorization: Bearer TOKEN` or typed into the sign-in form (which sets a
//! session cookie for this node), with what its role allows ([`cluster::auth`]):
//! `admin` everything, `viewer` the console and its API without actions, `metrics`
//! only `/metrics`. Without one every path answers 401 and nothing else; `/` adds the
//! sign-in form to its 401. A token revoked or expired stops working at once, also
//! for the sessions it opened. Failed attempts are logged and limited per client
//! address. No CHAP secret ever leaves through this listener.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use axum::extract::{ConnectInfo, Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Form, Json, Router};
use cluster::state::Command;
use cluster::ClusterNode;
use futures_util::Stream;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio_rustls::server::TlsStream;
use tracing::{info, warn};

use serving::Serving;

/// Default port of the admin HTTPS listener (next to iSCSI 3260, control 3261,
/// replication 3262).
pub const HTTP_PORT: u16 = 3263;

/// Failed credentials a client address may present per [`FAILURE_WINDOW`].
const FAILURES_ALLOWED: u32 = 5;
const FAILURE_WINDOW: Duration = Duration::from_secs(60);
/// A console session lasts this long.
const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);
const COOKIE: &str = "bulwark_session";

const LOGIN_HTML: &str = include_str!("console/login.html");
const CONSOLE_HTML: &str = include_str!("console/index.html");
const CONSOLE_JS: &str = include_str!("console/console.js");
const CONSOLE_CSS: &str = include_str!("console/console.css");

/// What the listener serves from.
pub struct AdminHttp {
    node: ClusterNode,
    serving: Option<Arc<Serving>>,
    server: iscsi_target::Server,
    alerts: Arc<crate::alerts::Alerts>,
    /// The fingerprint of the cluster CA: a token must name it.
    ca_fingerprint: String,
    metrics_open: bool,
    /// Console sessions: cookie id → (expiry, the token secret that opened it; checked
    /// again at every request).
    sessions: Mutex<HashMap<String, (Instant, String)>>,
    failures: Mutex<HashMap<IpAddr, (u32, Instant)>>,
    /// The console's view (state plus every node's status) as JSON, newest first.
    status: watch::Sender<Arc<String>>,
}

/// Options of the listener.
pub struct HttpOptions {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Serve `/metrics` without a credential (for scrapers on a trusted network).
    pub metrics_open: bool,
}

impl AdminHttp {
    /// Binds `options.listen` and serves until the process ends.
    pub async fn start(
        options: HttpOptions,
        node: ClusterNode,
        serving: Option<Arc<Serving>>,
        server: iscsi_target::Server,
        alerts: Arc<crate::alerts::Alerts>,
    ) -> Result<Arc<AdminHttp>> {
        let identity = node.identity().clone();
        let ca_fingerprint = identity.token()?.fingerprint;
        let tls = identity.tls()?.https_server;
        let tcp = tokio::net::TcpListener::bind(options.listen)
            .await
            .with_context(|| {
                format!(
                    "cannot listen on {} for the console and metrics (--http)",
                    options.listen
                )
            })?;
        let http = Arc::new(AdminHttp {
            node,
            serving,
            server,
            alerts,
            ca_fingerprint,
            metrics_open: options.metrics_open,
            sessions: Mutex::new(HashMap::new()),
            failures: Mutex::new(HashMap::new()),
            status: watch::channel(Arc::new(String::new())).0,
        });
        tokio::spawn(http.clone().publish_status());
        let app = Router::new()
            .route("/", get(console))
            .route("/console.js", get(console_js))
            .route("/console.css", get(console_css))
            .route("/login", post(login))
            .route("/logout", post(logout))
            .route("/metrics", get(metrics))
            .route("/api/status", get(api_status))
            .route("/api/whoami", get(api_whoami))
            .route("/api/stream", get(api_stream))
            .route("/api/volumes/{name}/move", post(api_move))
            .route("/api/volumes/{name}/verify", post(api_verify))
            .fallback(not_found)
            .with_state(http.clone());
        let listener =
            TlsListener::start(tcp, tokio_rustls::TlsAcceptor::from(tls), http.node.state())?;
        tokio::spawn(async move {
            let svc = app.into_make_service_with_connect_info::<ClientAddr>();
            if let Err(e) = axum::serve(listener, svc).await {
                warn!(error = %e, "the admin HTTPS listener stopped");
            }
        });
        Ok(http)
    }

    /// Keeps `status` current while a console watches: at once on a state change
    /// (a new primary shows within a moment), and with every node's status twice a
    /// second.
    async fn publish_status(self: Arc<Self>) {
        let mut state = self.node.state();
        let statuses = Arc::new(Mutex::new(None));
        let (refreshed_tx, mut refreshed) = mpsc::channel::<()>(1);
        {
            let (me, statuses) = (self.clone(), statuses.clone());
            tokio::spawn(async move {
                loop {
                    if me.status.receiver_count() > 0 {
                        let (_, nodes) = me.node.gather_status().await;
                        if let Ok(mut s) = statuses.lock() {
                            *s = Some(nodes);
                        }
                        let _ = refreshed_tx.try_send(());
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            });
        }
        loop {
            tokio::select! {
                changed = state.changed() => if changed.is_err() { return },
                _ = refreshed.recv() => {}
            }
            let st = state.borrow_and_update().clone();
            let nodes = statuses.lock().ok().and_then(|s| s.clone());
            let Some(nodes) = nodes else { continue };
            let view = view(&self.node.identity().name, &st, &nodes);
            self.status
                .send_replace(Arc::new(serde_json::to_string(&view).unwrap_or_default()));
        }
    }

    /// The token holder a presented token string names, if it is valid now.
    fn holder_of(&self, token: &str) -> Option<cluster::auth::Holder> {
        let secret = self.secret_of(token)?;
        self.node.authenticate(&secret).ok()
    }

    /// The secret of a token of this cluster (one that names our CA).
    fn secret_of(&self, token: &str) -> Option<String> {
        let t: cluster::Token = token.trim().parse().ok()?;
        cluster::identity::secrets_match(&t.fingerprint, &self.ca_fingerprint).then_some(t.secret)
    }

    /// Who the request comes from (bearer or session cookie), if anyone valid.
    fn signed_in(&self, headers: &HeaderMap) -> Option<cluster::auth::Holder> {
        if let Some(token) = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
        {
            return self.holder_of(token);
        }
        let id = cookie(headers, COOKIE)?;
        let secret = {
            let mut sessions = self.sessions.lock().ok()?;
            let now = Instant::now();
            sessions.retain(|_, (exp, _)| *exp > now);
            sessions.get(id)?.1.clone()
        };
        self.node.authenticate(&secret).ok()
    }

    /// Whether `ip` may try a credential now.
    fn may_try(&self, ip: IpAddr) -> bool {
        let mut f = match self.failures.lock() {
            Ok(f) => f,
            Err(_) => return false,
        };
        let now = Instant::now();
        f.retain(|_, (_, since)| now.duration_since(*since) < FAILURE_WINDOW);
        f.get(&ip).is_none_or(|(n, _)| *n < FAILURES_ALLOWED)
    }

    fn failed(&self, ip: IpAddr, what: &str) {
        let n = self
            .failures
            .lock()
            .map(|mut f| {
                let e = f.entry(ip).or_insert((0, Instant::now()));
                e.0 += 1;
                e.0
            })
            .unwrap_or(0);
        warn!(client = %ip, failures = n, "{what} with a wrong credential");
    }

    /// The credential check of every protected path: `None` to go on, or the
    /// 401/403/429 to answer. `need` is what the path does.
    fn check(&self, ip: IpAddr, headers: &HeaderMap, need: Need) -> Option<Response> {
        if !self.may_try(ip) {
            return Some(too_many());
        }
        match self.signed_in(headers) {
            Some(h) if need.allowed(h.role) => None,
            Some(h) => Some(
                (
                    StatusCode::FORBIDDEN,
                    format!("a {} token cannot {}\n", h.role, need.what()),
                )
                    .into_response(),
            ),
            None => {
                if headers.contains_key(header::AUTHORIZATION) {
                    self.failed(ip, "request");
                }
                Some(unauthorized(None))
            }
        }
    }
}

/// What a path does, for the role check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Need {
    /// The console, its script, status and events.
    Read,
    /// A console action (move, verify).
    Act,
    /// `/metrics`.
    Metrics,
}

impl Need {
    fn allowed(self, role: cluster::auth::Role) -> bool {
        use cluster::auth::Role;
        match role {
            Role::Admin => true,
            Role::Viewer => matches!(self, Need::Read | Need::Metrics),
            Role::Metrics => self == Need::Metrics,
            Role::Join => false,
        }
    }

    fn what(self) -> &'static str {
        match self {
            Need::Read => "read the console (it reads /metrics only)",
            Need::Act => "change the cluster; it needs an admin token",
            Need::Metrics => "read /metrics",
        }
    }
}

fn too_many() -> Response {
    (
        StatusCode::TOO_MANY_REQUESTS,
        [(header::RETRY_AFTER, FAILURE_WINDOW.as_secs().to_string())],
        "too many failed sign-ins from this address; wait a minute\n",
    )
        .into_response()
}

/// 401: with the sign-in form for the console page, a plain line otherwise.
fn unauthorized(page: Option<&str>) -> Response {
    let mut r = match page {
        Some(html) => (
            StatusCode::UNAUTHORIZED,
            [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
            html.to_string(),
        )
            .into_response(),
        None => (
            StatusCode::UNAUTHORIZED,
            "sign in: Authorization: Bearer <cluster token>\n",
        )
            .into_response(),
    };
    r.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer realm=\"bulwark\""),
    );
    secure_headers(r)
}

fn secure_headers(mut r: Response) -> Response {
    let h = r.headers_mut();
    // Everything the console needs comes from this listener: no inline script, no
    // other origin, no framing.
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
        ),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

type Http = State<Arc<AdminHttp>>;
type Peer = ConnectInfo<ClientAddr>;

/// The client's address, for the sign-in limits and the log.
#[derive(Clone, Copy, Debug)]
struct ClientAddr(SocketAddr);

impl ClientAddr {
    fn ip(&self) -> IpAddr {
        self.0.ip()
    }
}

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, TlsListener>>
    for ClientAddr
{
    fn connect_info(stream: axum::serve::IncomingStream<'_, TlsListener>) -> Self {
        ClientAddr(*stream.remote_addr())
    }
}

async fn console(State(h): Http, ConnectInfo(peer): Peer, headers: HeaderMap) -> Response {
    if !h.may_try(peer.ip()) {
        return too_many();
    }
    match h.signed_in(&headers) {
        Some(holder) if Need::Read.allowed(holder.role) => {}
        Some(holder) => {
            return (
                StatusCode::FORBIDDEN,
                format!("a {} token cannot {}\n", holder.role, Need::Read.what()),
            )
                .into_response()
        }
        None => return unauthorized(Some(LOGIN_HTML)),
    }
    secure_headers(
        (
            [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
            CONSOLE_HTML,
        )
            .into_response(),
    )
}

// The script and style sheet hold no data; they are protected like everything else so
// that nothing at all is readable before sign-in.
async fn console_js(State(h): Http, ConnectInfo(peer): Peer, headers: HeaderMap) -> Response {
    asset(
        &h,
        peer,
        &headers,
        "text/javascript; charset=utf-8",
        CONSOLE_JS,
    )
}

async fn console_css(State(h): Http, ConnectInfo(peer): Peer, headers: HeaderMap) -> Response {
    asset(&h, peer, &headers, "text/css", CONSOLE_CSS)
}

fn asset(
    h: &AdminHttp,
    peer: ClientAddr,
    headers: &HeaderMap,
    content_type: &'static str,
    body: &'static str,
) -> Response {
    if let Some(r) = h.check(peer.ip(), headers, Need::Read) {
        return r;
    }
    secure_headers(([(header::CONTENT_TYPE, content_type)], body).into_response())
}

#[derive(serde::Deserialize)]
struct SignIn {
    token: String,
}

async fn login(State(h): Http, ConnectInfo(peer): Peer, Form(form): Form<SignIn>) -> Response {
    if !h.may_try(peer.ip()) {
        return too_many();
    }
    let holder = h.holder_of(&form.token);
    let (Some(secret), Some(holder)) = (h.secret_of(&form.token), holder) else {
        h.failed(peer.ip(), "console sign-in");
        return unauthorized(Some(LOGIN_HTML));
    };
    if !Need::Read.allowed(holder.role) {
        h.failed(
            peer.ip(),
            "console sign-in (token of a role without the console)",
        );
        return unauthorized(Some(LOGIN_HTML));
    }
    let id = format!(
        "{}{}",
        cluster::identity::random_hex16(),
        cluster::identity::random_hex16()
    );
    if let Ok(mut s) = h.sessions.lock() {
        s.insert(id.clone(), (Instant::now() + SESSION_TTL, secret));
    }
    info!(client = %peer.ip(), token = %holder.id, role = %holder.role, "console sign-in");
    let cookie = format!(
        "{COOKIE}={id}; Path=/; Secure; HttpOnly; SameSite=Strict; Max-Age={}",
        SESSION_TTL.as_secs()
    );
    secure_headers(
        (
            StatusCode::SEE_OTHER,
            [(header::SET_COOKIE, cookie), (header::LOCATION, "/".into())],
        )
            .into_response(),
    )
}

async fn logout(State(h): Http, headers: HeaderMap) -> Response {
    if let (Some(id), Ok(mut s)) = (cookie(&headers, COOKIE), h.sessions.lock()) {
        s.remove(id);
    }
    (
        StatusCode::SEE_OTHER,
        [
            (
                header::SET_COOKIE,
                format!("{COOKIE}=; Path=/; Secure; HttpOnly; SameSite=Strict; Max-Age=0"),
            ),
            (header::LOCATION, "/".into()),
        ],
    )
        .into_response()
}

async fn not_found(State(h): Http, ConnectInfo(peer): Peer, headers: HeaderMap) -> Response {
    if let Some(r) = h.check(peer.ip(), &headers, Need::Metrics) {
        return r;
    }
    (StatusCode::NOT_FOUND, "no such page\n").into_response()
}

async fn metrics(State(h): Http, ConnectInfo(peer): Peer, headers: HeaderMap) -> Response {
    if !h.metrics_open {
        if let Some(r) = h.check(peer.ip(), &headers, Need::Metrics) {
            return r;
        }
    }
    let status = h.node.status().await;
    let state = h.node.state().borrow().clone();
    let text = {
        let src = crate::metrics::Sources {
            status: &status,
            state: &state,
            server: &h.server,
            serving: h.serving.as_ref(),
            alert_deliveries: h.alerts.deliveries(),
        };
        crate::metrics::encode(&status.name, crate::metrics::snapshot(&src))
    };
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

/// Who the console runs for: it shows its actions only to a role that may use them.
async fn api_whoami(State(h): Http, ConnectInfo(peer): Peer, headers: HeaderMap) -> Response {
    if let Some(r) = h.check(peer.ip(), &headers, Need::Read) {
        return r;
    }
    let holder = h.signed_in(&headers);
    secure_headers(
        Json(serde_json::json!({
            "role": holder.as_ref().map(|h| h.role),
            "token": holder.map(|h| h.id),
        }))
        .into_response(),
    )
}

async fn api_status(State(h): Http, ConnectInfo(peer): Peer, headers: HeaderMap) -> Response {
    if let Some(r) = h.check(peer.ip(), &headers, Need::Read) {
        return r;
    }
    let (state, nodes) = h.node.gather_status().await;
    secure_headers(Json(view(&h.node.identity().name, &state, &nodes)).into_response())
}

/// What the console shows: the state, every node's status, and each target's paths
/// with their ALUA states (as every node computes them).
fn view(
    me: &str,
    state: &cluster::ClusterState,
    nodes: &std::collections::BTreeMap<u64, Result<cluster::status::NodeStatus, String>>,
) -> serde_json::Value {
    let paths: serde_json::Map<String, serde_json::Value> = state
        .targets
        .values()
        .map(|t| {
            let groups: Vec<serde_json::Value> = serving::port_groups(state, t)
                .iter()
                .map(|g| {
                    let node = state.nodes.get(&u64::from(g.id));
                    serde_json::json!({
                        "node": node.map(|n| n.name.clone()),
                        "portals": node.map(|n| n.addresses.portals.clone()),
                        "state": g.state.to_string(),
                    })
                })
                .collect();
            (t.iqn.clone(), groups.into())
        })
        .collect();
    serde_json::json!({
        "me": me,
        "state": cluster::auth::redacted(state),
        "nodes": nodes,
        "paths": paths,
    })
}

/// Server-sent events: the console's view, each time it changes.
async fn api_stream(State(h): Http, ConnectInfo(peer): Peer, headers: HeaderMap) -> Response {
    if let Some(r) = h.check(peer.ip(), &headers, Need::Read) {
        return r;
    }
    let rx = h.status.subscribe();
    let stream = status_stream(rx);
    secure_headers(
        Sse::new(stream)
            .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
            .into_response(),
    )
}

fn status_stream(
    rx: watch::Receiver<Arc<String>>,
) -> impl Stream<Item = Result<SseEvent, std::convert::Infallible>> {
    futures_util::stream::unfold((rx, true), |(mut rx, first)| async move {
        if !first {
            rx.changed().await.ok()?;
        }
        loop {
            let json = rx.borrow_and_update().clone();
            if !json.is_empty() {
                let ev = SseEvent::default().event("status").data(json.as_str());
                return Some((Ok(ev), (rx, false)));
            }
            rx.changed().await.ok()?;
        }
    })
}

/// Actions from the console carry this header: a form on another site cannot set it,
/// so a signed-in browser cannot be made to act by a foreign page (with the
/// SameSite=Strict cookie, a second line of defence).
fn from_console(headers: &HeaderMap) -> bool {
    headers
        .get("x-bulwark-console")
        .is_some_and(|v| v.as_bytes() == b"1")
}

#[derive(serde::Deserialize)]
struct MoveTo {
    to: String,
}

async fn api_move(
    State(h): Http,
    ConnectInfo(peer): Peer,
    Path(name): Path<String>,
    headers: HeaderMap,
    Json(body): Json<MoveTo>,
) -> Response {
    if let Some(r) = h.check(peer.ip(), &headers, Need::Act) {
        return r;
    }
    if !from_console(&headers) {
        return (StatusCode::FORBIDDEN, "missing X-Bulwark-Console: 1\n").into_response();
    }
    info!(client = %peer.ip(), volume = %name, to = %body.to, "console: planned move");
    commit(
        &h,
        Command::MoveVolume {
            volume: name,
            node: body.to,
        },
    )
    .await
}

async fn api_verify(
    State(h): Http,
    ConnectInfo(peer): Peer,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Some(r) = h.check(peer.ip(), &headers, Need::Act) {
        return r;
    }
    if !from_console(&headers) {
        return (StatusCode::FORBIDDEN, "missing X-Bulwark-Console: 1\n").into_response();
    }
    info!(client = %peer.ip(), volume = %name, "console: verify");
    commit(
        &h,
        Command::StartVerify {
            volume: name,
            repair: false,
        },
    )
    .await
}

async fn commit(h: &AdminHttp, cmd: Command) -> Response {
    match h.node.write(cmd).await {
        Ok(Ok(_)) => Json(serde_json::json!({ "ok": true })).into_response(),
        Ok(Err(refused)) => (
            StatusCode::CONFLICT,
            Json(serde_json::json!({ "ok": false, "error": refused.to_string() })),
        )
            .into_response(),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({ "ok": false, "error": e.to_string() })),
        )
            .into_response(),
    }
}

/// HTTPS connections held at once: per source address, in all, and for the
/// cluster's members (another node's console proxying, scrapers on a node).
const HTTP_LIMITS: cluster::limits::Limits = cluster::limits::Limits {
    strangers: 256,
    members: 32,
    per_source: 32,
};

/// How long a connection may pass no byte either way before it is closed. The event
/// stream sends a keep-alive every 15 s, so a watching console is never idle this long.
const HTTP_IDLE: Duration = Duration::from_secs(60);

/// How long a client has for the TLS handshake.
const HTTP_HANDSHAKE: Duration = Duration::from_secs(10);

/// TLS connections, handshaken off the accept loop so that one slow client cannot
/// hold the others up, each holding a slot of [`HTTP_LIMITS`] for its lifetime.
struct TlsListener {
    rx: mpsc::Receiver<(Limited, SocketAddr)>,
    local: SocketAddr,
}

impl TlsListener {
    fn start(
        tcp: tokio::net::TcpListener,
        acceptor: tokio_rustls::TlsAcceptor,
        state: watch::Receiver<Arc<cluster::ClusterState>>,
    ) -> Result<Self> {
        let local = tcp.local_addr()?;
        let (tx, rx) = mpsc::channel(64);
        let limiter = cluster::limits::ConnectionLimiter::new(HTTP_LIMITS);
        tokio::spawn(async move {
            loop {
                let (sock, peer) = match tcp.accept().await {
                    Ok(s) => s,
                    Err(e) => {
                        warn!(error = %e, "admin listener accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let member = cluster::limits::is_member_address(&state.borrow(), peer.ip());
                let slot = match limiter.admit(peer.ip(), member) {
                    Ok(slot) => slot,
                    Err(why) => {
                        tracing::debug!(client = %peer, %why, "closed an HTTPS connection at accept");
                        continue;
                    }
                };
                let (acceptor, tx) = (acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    match tokio::time::timeout(HTTP_HANDSHAKE, acceptor.accept(sock)).await {
                        Ok(Ok(tls)) => {
                            let conn = Limited {
                                io: tls,
                                _slot: slot,
                                idle: Box::pin(tokio::time::sleep(HTTP_IDLE)),
                            };
                            let _ = tx.send((conn, peer)).await;
                        }
                        Ok(Err(e)) => {
                            tracing::debug!(client = %peer, error = %e, "TLS handshake failed")
                        }
                        Err(_) => tracing::debug!(client = %peer, "TLS handshake timed out"),
                    }
                });
            }
        });
        Ok(TlsListener { rx, local })
    }
}

/// An HTTPS connection with its slot, closed after [`HTTP_IDLE`] without traffic.
struct Limited {
    io: TlsStream<TcpStream>,
    _slot: cluster::limits::Slot,
    idle: std::pin::Pin<Box<tokio::time::Sleep>>,
}

impl Limited {
    fn progressed(&mut self) {
        self.idle
            .as_mut()
            .reset(tokio::time::Instant::now() + HTTP_IDLE);
    }

    fn poll_idle<T>(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<T>> {
        match std::future::Future::poll(self.idle.as_mut(), cx) {
            std::task::Poll::Ready(()) => std::task::Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "idle HTTPS connection closed",
            ))),
            std::task::Poll::Pending => std::task::Poll::Pending,
        }
    }
}

impl tokio::io::AsyncRead for Limited {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        match std::pin::Pin::new(&mut self.io).poll_read(cx, buf) {
            std::task::Poll::Ready(r) => {
                if buf.filled().len() > before {
                    self.progressed();
                }
                std::task::Poll::Ready(r)
            }
            std::task::Poll::Pending => self.poll_idle(cx),
        }
    }
}

impl tokio::io::AsyncWrite for Limited {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        data: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        match std::pin::Pin::new(&mut self.io).poll_write(cx, data) {
            std::task::Poll::Ready(r) => {
                if matches!(r, Ok(n) if n > 0) {
                    self.progressed();
                }
                std::task::Poll::Ready(r)
            }
            std::task::Poll::Pending => self.poll_idle(cx),
        }
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = Limited;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.rx.recv().await {
            Some(c) => c,
            // The accept task never ends while the listener lives.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}
