//! The two transports: HTTP (a request per call) and the multiplexed
//! WebSocket (one socket, calls matched to replies by id).

use std::collections::HashMap;
use std::num::NonZeroU64;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use ksrpc_core::chain::CallChain;
use ksrpc_core::codec::Limits;
use ksrpc_core::mux::{self, Reassembler};
use ksrpc_core::native::{self, ClientMessage, Outcome, ServerMessage, Value};
use reqwest::Url;
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

use crate::{ClientBuilder, Error, Progress, Transport};
/// A call's successful outcome.
#[derive(Debug)]
pub(crate) enum Reply {
    Value(Value),
    Handle(NonZeroU64),
    Exhausted,
}

fn reply_of(outcome: Outcome) -> Result<Reply, Error> {
    match outcome {
        Outcome::Ok(v) => Ok(Reply::Value(v)),
        Outcome::Handle(h) => Ok(Reply::Handle(h)),
        Outcome::Exhausted => Ok(Reply::Exhausted),
        Outcome::Err(e) => Err(Error::Remote(e)),
    }
}

/// rustls needs a process-wide crypto provider; ring is built in.
fn install_crypto_provider() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // Fails only when the application installed one already: keep it.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// A rustls configuration trusting the public web roots plus `extra` (PEM).
fn rustls_config(extra: &[Vec<u8>], alpn: &[&[u8]]) -> Result<rustls::ClientConfig, Error> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    let mut roots = rustls::RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() };
    for pem in extra {
        let mut added = 0;
        for cert in CertificateDer::pem_slice_iter(pem) {
            let cert = cert.map_err(|e| Error::Connection(format!("reading a root certificate: {e}")))?;
            roots.add(cert).map_err(|e| Error::Connection(format!("adding a root certificate: {e}")))?;
            added += 1;
        }
        if added == 0 {
            return Err(Error::Connection("no certificate in the PEM given as a root".into()));
        }
    }
    let mut config = rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

fn timestamp() -> String {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
    format!("{now:.3}")
}

async fn encode(message: ClientMessage) -> Result<Vec<u8>, Error> {
    let big = match &message {
        ClientMessage::Call { chain, .. } => Value::Chain(Box::new(chain.clone())).weight() > native::INLINE_BYTES,
        _ => false,
    };
    if big {
        tokio::task::spawn_blocking(move || native::encode_compressed(&message))
            .await
            .map_err(|e| Error::Protocol(Box::new(e)))
    } else {
        Ok(native::encode_compressed(&message))
    }
}

fn decode_server(wire: &[u8], limits: Limits) -> Result<ServerMessage, Error> {
    native::decode_compressed::<ServerMessage>(wire, limits).map_err(|e| Error::Protocol(Box::new(e)))
}

async fn decode_server_off_thread(wire: Vec<u8>, limits: Limits) -> Result<ServerMessage, Error> {
    if native::is_light(&wire, native::INLINE_BYTES) {
        return decode_server(&wire, limits);
    }
    tokio::task::spawn_blocking(move || decode_server(&wire, limits)).await.map_err(|e| Error::Protocol(Box::new(e)))?
}

pub(crate) enum Conn {
    Http(HttpConn),
    Ws(WsConn),
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Conn::Http(h) => write!(f, "Http({})", h.endpoint),
            Conn::Ws(w) => write!(f, "WebSocket({})", w.endpoint),
        }
    }
}

/// The URL with its path's trailing `/` (and, for WebSockets, a trailing
/// `/ws`, as the Python client's WebSocket URLs end) removed.
fn base_url(url: &str) -> Result<(Url, Transport), Error> {
    let mut url = Url::parse(url).map_err(|e| Error::Url(format!("{url}: {e}")))?;
    let transport = match url.scheme() {
        "http" | "https" => Transport::Http,
        "ws" | "wss" => Transport::WebSocket,
        other => return Err(Error::Url(format!("{url}: scheme {other} (use http, https, ws or wss)"))),
    };
    let mut path = url.path().trim_end_matches('/').to_owned();
    if transport == Transport::WebSocket && path.ends_with("/ws") {
        path.truncate(path.len() - 3);
    }
    url.set_path(&path);
    Ok((url, transport))
}

fn with_scheme(mut url: Url, transport: Transport) -> Result<Url, Error> {
    let secure = matches!(url.scheme(), "https" | "wss");
    let scheme = match (transport, secure) {
        (Transport::Http, false) => "http",
        (Transport::Http, true) => "https",
        (Transport::WebSocket, false) => "ws",
        (Transport::WebSocket, true) => "wss",
    };
    url.set_scheme(scheme).map_err(|()| Error::Url(format!("{url}: cannot use scheme {scheme}")))?;
    Ok(url)
}

fn basic(credentials: &Option<(String, String)>) -> Option<String> {
    credentials.as_ref().map(|(user, password)| {
        format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}")))
    })
}

impl Conn {
    pub(crate) async fn connect(b: &ClientBuilder) -> Result<Conn, Error> {
        install_crypto_provider();
        let (base, implied) = base_url(&b.url)?;
        let transport = b.transport.unwrap_or(implied);
        let base = with_scheme(base, transport)?;
        let auth = basic(&b.credentials);
        match transport {
            Transport::Http => {
                let endpoint = Url::parse(&format!("{}/v2/call", base.as_str().trim_end_matches('/')))
                    .map_err(|e| Error::Url(e.to_string()))?;
                let mut http = reqwest::Client::builder().connect_timeout(b.connect_timeout);
                if let Some(proxy) = &b.proxy {
                    let mut p = reqwest::Proxy::all(proxy.url.as_str())
                        .map_err(|e| Error::Url(format!("proxy {}: {e}", proxy.url)))?;
                    if let Some((user, password)) = &proxy.credentials {
                        p = p.basic_auth(user, password);
                    }
                    http = http.proxy(p);
                }
                if !b.tls_roots.is_empty() {
                    http = http.tls_backend_preconfigured(rustls_config(&b.tls_roots, &[b"http/1.1"])?);
                }
                let http = http.build().map_err(|e| Error::Connection(e.to_string()))?;
                let next_id = Arc::new(AtomicU64::new(random_id_base()));
                let turns = Arc::new(tokio::sync::Semaphore::new(MAX_HTTP_IN_FLIGHT));
                Ok(Conn::Http(HttpConn { http, endpoint, auth, limits: b.limits, next_id, turns }))
            }
            Transport::WebSocket => {
                if let Some(proxy) = &b.proxy {
                    return Err(Error::Url(format!(
                        "the WebSocket transport does not go through a proxy ({}); use an http(s):// URL for \
                         calls through it",
                        proxy.url
                    )));
                }
                let endpoint = format!("{}/v2/ws", base.as_str().trim_end_matches('/'));
                let tls = if b.tls_roots.is_empty() {
                    None
                } else {
                    Some(tokio_tungstenite::Connector::Rustls(Arc::new(rustls_config(&b.tls_roots, &[])?)))
                };
                let conn = tokio::time::timeout(b.connect_timeout, WsConn::connect(endpoint, auth, b.limits, tls))
                    .await
                    .map_err(|_| Error::Connection(format!("no connection within {:?}", b.connect_timeout)))??;
                Ok(Conn::Ws(conn))
            }
        }
    }

    pub(crate) fn transport(&self) -> Transport {
        match self {
            Conn::Http(_) => Transport::Http,
            Conn::Ws(_) => Transport::WebSocket,
        }
    }

    fn next_id(&self) -> u64 {
        match self {
            Conn::Http(h) => h.next_id.fetch_add(1, Ordering::Relaxed),
            Conn::Ws(w) => w.shared.next_id.fetch_add(1, Ordering::Relaxed),
        }
    }

    async fn exchange(
        &self,
        id: u64,
        message: ClientMessage,
        progress: Option<Progress>,
        timeout: Option<Duration>,
    ) -> Result<Reply, Error> {
        let fut = async {
            match self {
                Conn::Http(h) => h.exchange(id, message, progress).await,
                Conn::Ws(w) => w.exchange(id, message, progress).await,
            }
        };
        match timeout {
            // Dropping the exchange on timeout cancels the call (see WsCall).
            Some(t) => tokio::time::timeout(t, fut).await.map_err(|_| Error::Timeout(t))?,
            None => fut.await,
        }
    }

    /// Runs a chain.
    pub(crate) async fn run(
        &self,
        chain: CallChain<Value>,
        progress: Option<Progress>,
        timeout: Option<Duration>,
    ) -> Result<Reply, Error> {
        let id = self.next_id();
        self.exchange(id, ClientMessage::Call { id, chain }, progress, timeout).await
    }

    /// Advances a generator handle.
    pub(crate) async fn next(&self, handle: NonZeroU64, timeout: Option<Duration>) -> Result<Reply, Error> {
        let id = self.next_id();
        self.exchange(id, ClientMessage::Next { id, handle }, None, timeout).await
    }

    /// Frees a generator handle, in the background: called from `Drop`.
    pub(crate) fn close_handle(&self, handle: NonZeroU64) {
        match self {
            Conn::Ws(w) => w.send_quiet(ClientMessage::CloseHandle { handle }),
            Conn::Http(h) => {
                if let Ok(rt) = tokio::runtime::Handle::try_current() {
                    let conn = h.clone();
                    rt.spawn(async move {
                        if let Err(e) = conn.post(ClientMessage::CloseHandle { handle }, None).await {
                            tracing::debug!("closing generator handle: {e}");
                        }
                    });
                }
            }
        }
    }
}

#[derive(Clone)]
pub(crate) struct HttpConn {
    http: reqwest::Client,
    endpoint: Url,
    auth: Option<String>,
    limits: Limits,
    next_id: Arc<AtomicU64>,
    /// Calls this client has on the wire at once (see [`MAX_HTTP_IN_FLIGHT`]).
    turns: Arc<tokio::sync::Semaphore>,
}

/// Most HTTP calls one client sends at once; the rest queue in the client.
/// Half the server's default per-user bound, so two clients of one user fit.
pub(crate) const MAX_HTTP_IN_FLIGHT: usize = 32;

/// An HTTP call in flight; dropped before its reply, it posts a `Cancel`
/// (the server cannot tell that an HTTP client left).
struct HttpCall<'a> {
    conn: &'a HttpConn,
    id: u64,
    done: bool,
}

impl Drop for HttpCall<'_> {
    fn drop(&mut self) {
        if self.done || self.id == 0 {
            return;
        }
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let (conn, id) = (self.conn.clone(), self.id);
            rt.spawn(async move {
                if let Err(e) = conn.post(ClientMessage::Cancel { id }, None).await {
                    tracing::debug!("cancelling request {id}: {e}");
                }
            });
        }
    }
}

/// A random first request id: request ids of one user's HTTP clients must
/// not collide, since `Cancel` names a call by (user, id).
fn random_id_base() -> u64 {
    // Without the OS's randomness (never on the platforms we build for), the
    // clock still keeps two clients of one process apart.
    let random = getrandom::u64()
        .unwrap_or_else(|_| SystemTime::now().duration_since(UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64));
    // Two bits of room: ids count up from here for the client's lifetime.
    (random >> 2).max(1)
}

impl HttpConn {
    async fn exchange(&self, id: u64, message: ClientMessage, progress: Option<Progress>) -> Result<Reply, Error> {
        // A request per call: the server answers 503 past its per-user bound
        // of calls in flight (64 by default), so more wait their turn here.
        let _turn = self.turns.acquire().await.map_err(|_| Error::Connection("the client is closed".into()))?;
        let mut call = HttpCall { conn: self, id, done: false };
        let reply = self.post(message, progress).await;
        call.done = true;
        match reply? {
            ServerMessage::Reply { id: got, outcome } if got == id => reply_of(outcome),
            ServerMessage::Reply { id: got, .. } => {
                Err(Error::Protocol(format!("reply to request {got}, expected {id}").into()))
            }
            ServerMessage::Refused { reason } => Err(Error::Refused(reason)),
        }
    }

    async fn post(&self, message: ClientMessage, progress: Option<Progress>) -> Result<ServerMessage, Error> {
        let body = encode(message).await?;
        let mut request = self
            .http
            .post(self.endpoint.clone())
            .header(reqwest::header::CONTENT_TYPE, "application/x-ksrpc-native")
            .header("X-Timestamp", timestamp())
            .body(body);
        if let Some(auth) = &self.auth {
            request = request.header(reqwest::header::AUTHORIZATION, auth);
        }
        let response = request.send().await.map_err(|e| Error::Connection(with_causes(&e)))?;
        let status = response.status().as_u16();
        let native = response
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"application/x-ksrpc-native"));
        match status {
            200 => {}
            400 if native => {}
            401 => return Err(Error::Unauthorized),
            403 => {
                let text = response.text().await.unwrap_or_default();
                return Err(Error::Forbidden(text.chars().take(500).collect()));
            }
            _ => {
                let text = response.text().await.unwrap_or_default();
                let mut body: String = text.chars().take(500).collect();
                if status == 404 {
                    body = format!(
                        "no ksrpc server answers at {}: is the URL's path the server's server.path? {body}",
                        self.endpoint
                    );
                }
                return Err(Error::Http { status, body });
            }
        }
        let total = response.content_length();
        let mut wire = Vec::with_capacity(total.unwrap_or(0).min(self.limits.max_encoded) as usize);
        let mut body = response.bytes_stream();
        while let Some(piece) = body.next().await {
            let piece = piece.map_err(|e| Error::Connection(e.to_string()))?;
            if (wire.len() + piece.len()) as u64 > self.limits.max_encoded {
                return Err(Error::Protocol(
                    format!("reply over the limit of {} bytes", self.limits.max_encoded).into(),
                ));
            }
            wire.extend_from_slice(&piece);
            if let Some(p) = &progress {
                p(wire.len() as u64, total);
            }
        }
        decode_server_off_thread(wire, self.limits).await
    }
}

type WsStream = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

struct Pending {
    reply: oneshot::Sender<Result<Reply, Error>>,
    progress: Option<Progress>,
}

struct WsShared {
    pending: Mutex<HashMap<u64, Pending>>,
    /// Why the socket ended, once it has: new calls fail with it.
    closed: Mutex<Option<String>>,
    next_id: AtomicU64,
}

impl WsShared {
    fn fail_all(&self, error: impl Fn() -> Error) {
        let pending: Vec<Pending> =
            self.pending.lock().expect("pending map poisoned").drain().map(|(_, p)| p).collect();
        for p in pending {
            let _ = p.reply.send(Err(error()));
        }
    }
}

pub(crate) struct WsConn {
    endpoint: String,
    shared: Arc<WsShared>,
    outbound: mpsc::UnboundedSender<Bytes>,
    reader: tokio::task::AbortHandle,
}

impl Drop for WsConn {
    fn drop(&mut self) {
        // The writer ends when `outbound` drops; the reader is stopped here.
        self.reader.abort();
    }
}

impl WsConn {
    async fn connect(
        endpoint: String,
        auth: Option<String>,
        limits: Limits,
        tls: Option<tokio_tungstenite::Connector>,
    ) -> Result<WsConn, Error> {
        let mut request =
            endpoint.as_str().into_client_request().map_err(|e| Error::Url(format!("{endpoint}: {e}")))?;
        let headers = request.headers_mut();
        let header = |v: &str| v.parse().map_err(|_| Error::Url("credentials are not a valid header".into()));
        if let Some(auth) = &auth {
            headers.insert("Authorization", header(auth)?);
        }
        headers.insert("X-Timestamp", header(&timestamp())?);
        let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
            .max_message_size(Some(mux::MAX_FRAME + 64))
            .max_frame_size(Some(mux::MAX_FRAME + 64));
        let (socket, _) = tokio_tungstenite::connect_async_tls_with_config(request, Some(config), true, tls)
            .await
            .map_err(|e| match &e {
                tokio_tungstenite::tungstenite::Error::Http(r) if r.status() == 401 => Error::Unauthorized,
                tokio_tungstenite::tungstenite::Error::Http(r) if r.status() == 403 => Error::Forbidden(
                    r.body()
                        .as_deref()
                        .map(|b| String::from_utf8_lossy(&b[..b.len().min(500)]).into_owned())
                        .unwrap_or_else(|| "is this machine's clock right? (the server sent no reason)".into()),
                ),
                tokio_tungstenite::tungstenite::Error::Http(r) if r.status() == 404 => Error::Http {
                    status: 404,
                    body: format!("no ksrpc server answers at {endpoint}: is the URL's path the server's server.path?"),
                },
                tokio_tungstenite::tungstenite::Error::Http(r) => {
                    Error::Http { status: r.status().as_u16(), body: String::new() }
                }
                _ => Error::Connection(format!("{endpoint}: {}", with_causes(&e))),
            })?;
        let shared = Arc::new(WsShared {
            pending: Mutex::new(HashMap::new()),
            closed: Mutex::new(None),
            next_id: AtomicU64::new(1),
        });
        let (sink, stream) = socket.split();
        let (outbound, rx) = mpsc::unbounded_channel();
        tokio::spawn(write_loop(sink, rx, shared.clone()));
        let reader = tokio::spawn(read_loop(stream, shared.clone(), limits)).abort_handle();
        Ok(WsConn { endpoint, shared, outbound, reader })
    }

    /// Queues an encoded message's frames.
    fn send_frames(&self, id: u64, wire: Bytes) -> Result<(), Error> {
        for frame in mux::frames(id, &wire) {
            self.outbound.send(frame).map_err(|_| Error::Connection("the WebSocket is closed".into()))?;
        }
        Ok(())
    }

    /// Sends a small message nobody waits for (`Cancel`, `CloseHandle`), on
    /// a fresh stream: the stream of the call it names may still be
    /// half-sent.
    fn send_quiet(&self, message: ClientMessage) {
        let stream = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        let _ = self.send_frames(stream, Bytes::from(native::encode_compressed(&message)));
    }

    async fn exchange(&self, id: u64, message: ClientMessage, progress: Option<Progress>) -> Result<Reply, Error> {
        let (tx, rx) = oneshot::channel();
        {
            // Checked under the pending lock: the reader marks the socket
            // closed before it fails everything pending, so a call either
            // sees the mark or is failed with the rest, never left waiting.
            let mut pending = self.shared.pending.lock().expect("pending map poisoned");
            if let Some(reason) = self.shared.closed.lock().expect("closed flag poisoned").clone() {
                return Err(Error::Connection(reason));
            }
            pending.insert(id, Pending { reply: tx, progress });
        }
        let mut call = WsCall { conn: self, id, done: false };
        let wire = encode(message).await?;
        self.send_frames(id, Bytes::from(wire))?;
        let reply = rx.await.map_err(|_| Error::Connection("the WebSocket closed during the call".into()));
        call.done = true;
        reply?
    }
}

/// A call in flight on the socket; dropped before its reply (timeout, the
/// caller gave up), it tells the server to cancel the call.
struct WsCall<'a> {
    conn: &'a WsConn,
    id: u64,
    done: bool,
}

impl Drop for WsCall<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.conn.shared.pending.lock().expect("pending map poisoned").remove(&self.id);
            self.conn.send_quiet(ClientMessage::Cancel { id: self.id });
        }
    }
}

async fn write_loop(
    mut sink: futures_util::stream::SplitSink<WsStream, Message>,
    mut rx: mpsc::UnboundedReceiver<Bytes>,
    shared: Arc<WsShared>,
) {
    while let Some(frame) = rx.recv().await {
        if let Err(e) = sink.send(Message::Binary(frame)).await {
            let reason = format!("sending: {e}");
            shared.closed.lock().expect("closed flag poisoned").get_or_insert(reason.clone());
            shared.fail_all(|| Error::Connection(reason.clone()));
            return;
        }
    }
    let _ = sink.close().await;
}

async fn read_loop(mut stream: futures_util::stream::SplitStream<WsStream>, shared: Arc<WsShared>, limits: Limits) {
    let mut reassembler = Reassembler::new(limits);
    let reason = loop {
        let frame = match stream.next().await {
            Some(Ok(Message::Binary(b))) => b,
            Some(Ok(Message::Close(c))) => {
                break c.map_or_else(
                    || "the server closed the WebSocket".to_owned(),
                    |c| format!("the server closed the WebSocket ({}): {}", u16::from(c.code), c.reason),
                );
            }
            Some(Ok(_)) => continue,
            Some(Err(e)) => break format!("reading: {e}"),
            None => break "the server closed the connection".to_owned(),
        };
        let pushed = match reassembler.push(&frame) {
            Ok(p) => p,
            Err(e) => break format!("bad frame from the server: {e}"),
        };
        if pushed.message.is_none() {
            let pending = shared.pending.lock().expect("pending map poisoned");
            if let Some(progress) = pending.get(&pushed.id).and_then(|p| p.progress.clone()) {
                drop(pending);
                progress(pushed.received, pushed.total);
            }
            continue;
        }
        let (stream, wire) = (pushed.id, pushed.message.unwrap_or_default());
        if !native::is_light(&wire, native::INLINE_BYTES) {
            // Big replies decode on the blocking pool so small ones behind
            // them are delivered meanwhile. Their caller is taken out of
            // `pending` now: the reply is here whole, and a close that comes
            // while it decodes (a server stopping once it has sent its last
            // reply) must not fail it.
            let waiting = shared.pending.lock().expect("pending map poisoned").remove(&stream);
            let shared = shared.clone();
            tokio::task::spawn_blocking(move || match (waiting, decode_server(&wire, limits)) {
                (Some(p), Ok(ServerMessage::Reply { id, outcome })) if id == stream => {
                    let _ = p.reply.send(reply_of(outcome));
                }
                (Some(p), Err(e)) => {
                    let _ = p.reply.send(Err(e));
                }
                (waiting, message) => {
                    if let Some(p) = waiting {
                        let _ = p
                            .reply
                            .send(Err(Error::Protocol(format!("stream {stream} carried no reply to it").into())));
                    }
                    deliver(&shared, stream, message);
                }
            });
        } else if let Some(refused) = deliver(&shared, stream, decode_server(&wire, limits)) {
            break refused;
        }
    };
    shared.closed.lock().expect("closed flag poisoned").get_or_insert(reason.clone());
    shared.fail_all(|| Error::Connection(reason.clone()));
}

/// Hands a reply to its caller; returns the reason when the server refused
/// and the socket is over. A reply that cannot be read fails only the call
/// of its stream.
fn deliver(shared: &WsShared, stream: u64, message: Result<ServerMessage, Error>) -> Option<String> {
    match message {
        Ok(ServerMessage::Reply { id, outcome }) => {
            let pending = shared.pending.lock().expect("pending map poisoned").remove(&id);
            // No one waiting: the call was cancelled.
            if let Some(p) = pending {
                let _ = p.reply.send(reply_of(outcome));
            }
            None
        }
        Ok(ServerMessage::Refused { reason }) => {
            shared.closed.lock().expect("closed flag poisoned").get_or_insert(format!("refused: {reason}"));
            shared.fail_all(|| Error::Refused(reason.clone()));
            Some(format!("refused: {reason}"))
        }
        Err(e) => {
            if let Some(p) = shared.pending.lock().expect("pending map poisoned").remove(&stream) {
                let _ = p.reply.send(Err(e));
            }
            None
        }
    }
}

/// An error with its causes: reqwest's own message names only the URL
/// ("error sending request for url (...)"), the cause (connection refused, a
/// DNS failure, a certificate) is in its sources.
fn with_causes(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let more = cause.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = cause.source();
    }
    text
}
