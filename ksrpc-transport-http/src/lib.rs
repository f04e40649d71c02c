//! ksrpc-transport-http: the actix-web side of ksrpc, 0.8.1 compatible.
//!
//! - [`guard`]: middleware for every route (WebSocket upgrade included):
//!   the `X-Timestamp` window, then HTTP Basic auth; nothing is read before
//!   both pass. The authenticated [`User`] goes into the request extensions.
//! - [`routes`]: `GET|POST {prefix}/generate_204` and `POST {prefix}/chunk`.
//! - [`TransportError`]: every failure, mapped to a status in one place.
//!
//! The request body is decoded while it streams in (limits enforced as it
//! arrives); the reply is encoded slice by slice on the rayon pool and
//! streamed out with chunked transfer encoding, which the 0.8.1 client needs.

pub mod cached;
mod error;
pub mod forwarded;
mod reply;
pub mod stopping;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::middleware::Next;
use actix_web::{web, HttpMessage, HttpRequest, HttpResponse};
use bytes::Bytes;
use futures_util::StreamExt;
use ksrpc_core::auth::{check_timestamp, parse_basic, AuthError, Peer, User, UserStore};
use ksrpc_core::budget::{MemoryBudget, Reservation};
use ksrpc_core::codec::{ChunkedZlib, Codec, Limits, BORDER};
use ksrpc_core::native::{self, ClientMessage, ServerMessage};
use ksrpc_core::{CompatReply, CompatRequest, Executor, NativeRequest};
use tokio::sync::oneshot;

pub use error::TransportError;
pub use reply::{cached_reply, log_call, outcome_of, stream_reply, CallStats, Caller, ClientIp, SEND_TIMEOUT};
pub use stopping::{StopTrigger, Stopping};

/// What every route needs; registered once as `web::Data<HttpState>`.
#[derive(Clone)]
pub struct HttpState {
    /// Users and their rules.
    pub users: Arc<UserStore>,
    /// Runs the calls.
    pub executor: Arc<dyn Executor>,
    /// The compat framing, with the configured level and slice size.
    pub codec: ChunkedZlib,
    /// Limits on one request body.
    pub limits: Limits,
    /// Seconds `X-Timestamp` may differ from now; `<= 0` disables the check.
    pub timestamp_window: f64,
    /// Native HTTP calls in flight, for `Cancel`.
    pub in_flight: InFlight,
    /// Bytes of requests and replies in flight, per user and in total.
    pub budget: Arc<MemoryBudget>,
    /// A request body that sends nothing for this long is answered 408.
    pub body_idle: Duration,
    /// A reply piece a client does not take for this long drops the client
    /// (it stopped reading); see [`SEND_TIMEOUT`] for the default.
    pub send_timeout: Duration,
    /// The result cache, when `[cache] enabled` (see [`cached`]).
    pub cache: Option<Arc<ksrpc_cache::ResultCache>>,
    /// Proxies whose `X-Forwarded-For` names the client
    /// (`server.trusted_proxies`; see [`forwarded`]).
    pub trusted_proxies: Vec<forwarded::Cidr>,
    /// Set when the server starts stopping (see [`stopping`]).
    pub stopping: Stopping,
}

/// Native HTTP calls in flight by (user, request id), so that a `Cancel`
/// posted on another connection stops one: a server cannot hear an HTTP
/// client leave while its call runs, so the client says so.
#[derive(Clone, Debug, Default)]
pub struct InFlight(Arc<Mutex<HashMap<CallKey, Registration>>>);

/// A registration's token and the sender that cancels its call.
type Registration = (u64, oneshot::Sender<()>);

/// Tells one registration from a later one of the same key.
static NEXT_TOKEN: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// (user name, request id).
type CallKey = (String, u64);

impl InFlight {
    fn register(&self, user: &str, id: u64) -> Option<(oneshot::Receiver<()>, InFlightGuard)> {
        let mut map = self.0.lock().expect("in-flight map poisoned");
        let key = (user.to_owned(), id);
        if map.contains_key(&key) {
            return None;
        }
        let (tx, rx) = oneshot::channel();
        let token = NEXT_TOKEN.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        map.insert(key.clone(), (token, tx));
        Some((rx, InFlightGuard { map: self.clone(), key, token }))
    }

    /// Stops `user`'s call `id`; false when there is none.
    fn cancel(&self, user: &str, id: u64) -> bool {
        let entry = self.0.lock().expect("in-flight map poisoned").remove(&(user.to_owned(), id));
        entry.is_some_and(|(_, tx)| tx.send(()).is_ok())
    }
}

/// Unregisters a call when its handler ends, however it ends.
struct InFlightGuard {
    map: InFlight,
    key: (String, u64),
    token: u64,
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        // Only our own registration: after a Cancel, a new call may have
        // registered under the same key.
        let mut map = self.map.0.lock().expect("in-flight map poisoned");
        if map.get(&self.key).is_some_and(|(token, _)| *token == self.token) {
            map.remove(&self.key);
        }
    }
}

impl std::fmt::Debug for HttpState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpState")
            .field("codec", &self.codec)
            .field("limits", &self.limits)
            .field("timestamp_window", &self.timestamp_window)
            .field("in_flight", &self.in_flight)
            .field("budget", &self.budget)
            .field("body_idle", &self.body_idle)
            .field("send_timeout", &self.send_timeout)
            .field("stopping", &self.stopping.is_set())
            .finish()
    }
}

fn now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

/// The pre-body checks, as actix middleware (`middleware::from_fn(guard)`).
/// Order as in the original: timestamp (403), then Basic auth (401).
pub async fn guard(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let state = req
        .app_data::<web::Data<HttpState>>()
        .ok_or_else(|| TransportError::Internal("HttpState is not registered".into()))?
        .clone();
    let header = |name: &str| req.headers().get(name).map(|v| v.as_bytes());
    check_timestamp(header("X-Timestamp"), now(), state.timestamp_window).map_err(TransportError::Forbidden)?;
    let (name, password) = parse_basic(header("Authorization")).map_err(|_| TransportError::Unauthorized)?;
    let ip = forwarded::client_ip(req.peer_addr().map(|a| a.ip()), header("X-Forwarded-For"), &state.trusted_proxies);
    req.extensions_mut().insert(ClientIp(ip));
    let user = authenticate(&state.users, name, password, Peer::of(ip)).await?;
    req.extensions_mut().insert(user);
    let mut res = next.call(req).await?;
    // Stopping: no connection is kept alive for another request.
    if state.stopping.is_set() && res.status() != actix_web::http::StatusCode::SWITCHING_PROTOCOLS {
        res.response_mut().head_mut().set_connection_type(actix_web::http::ConnectionType::Close);
    }
    Ok(res)
}

/// Verifies credentials: a cached success costs a keyed hash; a miss runs
/// argon2 on the blocking pool, never on an async worker. A failure is
/// logged and its 401 held back by the store's penalty for (name, peer),
/// waited out here without holding a thread or a verification place.
async fn authenticate(
    users: &Arc<UserStore>,
    name: String,
    password: String,
    peer: Peer,
) -> Result<Arc<User>, TransportError> {
    if let Some(user) = users.verify_cached(&name, &password) {
        return Ok(user);
    }
    let store = users.clone();
    let user = name.clone();
    let verified = web::block(move || store.verify_from(&user, &password, peer))
        .await
        .map_err(|e| TransportError::Internal(e.to_string()))?;
    match verified {
        Ok(user) => Ok(user),
        Err(AuthError::Throttled) => {
            tracing::warn!(user = ?name, %peer, reason = "throttled", "login refused: too many logins in progress from this address");
            Err(TransportError::Throttled)
        }
        Err(AuthError::Busy) => {
            tracing::warn!(user = ?name, %peer, reason = "busy", "login refused: too many logins in progress");
            Err(TransportError::Overloaded("too many logins in progress; retry shortly".into()))
        }
        Err(_) => {
            let delay = users.penalty(&name, peer);
            // A flood must not fill the disk: past the limiter's burst only
            // a count is logged.
            match FAILED_LOGINS.admit(Instant::now()) {
                LogAdmit::Log { unlogged } => {
                    if unlogged > 0 {
                        tracing::warn!(
                            count = unlogged,
                            "failed logins not logged (at most {} per {} s)",
                            FAILED_LOGINS.burst,
                            FAILED_LOGINS.window.as_secs()
                        );
                    }
                    tracing::warn!(user = ?name, %peer, reason = "wrong password or unknown user", delay_ms = delay.as_millis() as u64, "login failed");
                }
                LogAdmit::Skip => {}
            }
            if !delay.is_zero() {
                actix_web::rt::time::sleep(delay).await;
            }
            Err(TransportError::Unauthorized)
        }
    }
}

/// The authenticated user that [`guard`] stored on the request.
pub fn user_of(req: &HttpRequest) -> Result<Arc<User>, TransportError> {
    req.extensions().get::<Arc<User>>().cloned().ok_or(TransportError::Unauthorized)
}

/// The user and client address [`guard`] stored on the request.
pub fn caller_of(req: &HttpRequest) -> Result<(Arc<User>, Caller), TransportError> {
    let user = user_of(req)?;
    let peer = req.extensions().get::<ClientIp>().copied().unwrap_or(ClientIp(None));
    let caller = Caller { user: user.name.clone(), peer };
    Ok((user, caller))
}

/// A bound on log lines of one kind: at most `burst` per `window`; the rest
/// are counted and the count is logged with the next line let through.
#[derive(Debug)]
pub struct LogLimiter {
    /// Lines let through per window.
    pub burst: u32,
    /// The window.
    pub window: Duration,
    /// (window start, lines logged in it, lines skipped since the last one logged)
    state: Mutex<Option<(Instant, u32, u64)>>,
}

/// What [`LogLimiter::admit`] decided.
#[derive(Debug, PartialEq, Eq)]
pub enum LogAdmit {
    /// Log the line; `unlogged` lines were skipped before it.
    Log {
        /// Lines skipped since the last one logged.
        unlogged: u64,
    },
    /// Skip it (counted).
    Skip,
}

impl LogLimiter {
    /// A limiter letting `burst` lines through per `window`.
    pub const fn new(burst: u32, window: Duration) -> LogLimiter {
        LogLimiter { burst, window, state: Mutex::new(None) }
    }

    /// Whether a line at `now` may be logged.
    pub fn admit(&self, now: Instant) -> LogAdmit {
        let mut state = self.state.lock().expect("log limiter poisoned");
        let (start, logged, skipped) = state.get_or_insert((now, 0, 0));
        if now.duration_since(*start) >= self.window {
            (*start, *logged) = (now, 0);
        }
        if *logged < self.burst {
            *logged += 1;
            LogAdmit::Log { unlogged: std::mem::take(skipped) }
        } else {
            *skipped += 1;
            LogAdmit::Skip
        }
    }
}

/// Failed logins: 20 lines per 10 s at most (a password-guessing flood of
/// any size costs a line per half second).
static FAILED_LOGINS: LogLimiter = LogLimiter::new(20, Duration::from_secs(10));

/// Registers the HTTP routes under `prefix` (which may hold `{name}`
/// placeholders, one path segment each).
pub fn routes(prefix: &str) -> impl FnOnce(&mut web::ServiceConfig) + '_ {
    move |cfg| {
        cfg.service(
            web::resource(format!("{prefix}/generate_204"))
                .route(web::get().to(generate_204))
                .route(web::post().to(generate_204)),
        )
        .service(web::resource(format!("{prefix}/chunk")).route(web::post().to(chunk)))
        .service(web::resource(format!("{prefix}/v2/call")).route(web::post().to(v2_call)));
    }
}

/// The redirect probe of the 0.8.1 client.
async fn generate_204() -> HttpResponse {
    HttpResponse::NoContent().finish()
}

/// Body bytes gathered before they are decoded in one go, off the async
/// worker; with [`MAX_INFLATE_RATIO`] this bounds what one decoding step may
/// allocate before it is charged.
const DECODE_BATCH: usize = 64 * 1024;
/// Most bytes zlib can inflate one input byte to (deflate's limit is about
/// 1032): a batch is charged this much before it is decoded, and the
/// difference given back after.
const MAX_INFLATE_RATIO: u64 = 1032;
/// Compressed bytes up to this many are inflated on the async worker (at
/// most a few milliseconds, bounded by `MAX_DECODED_SLICE` per slice); more
/// on the blocking pool. For HTTP bodies (a batch) and compat WS slices.
pub const INLINE_DECODE: usize = 4 * 1024;

/// The next piece of a request body, or 408 when none comes for `idle`
/// (a client that stops half-way does not pin its buffers).
async fn next_piece(body: &mut web::Payload, idle: Duration) -> Result<Option<Bytes>, TransportError> {
    match tokio::time::timeout(idle, body.next()).await {
        Err(_) => Err(TransportError::BodyIdle(idle.as_secs_f64())),
        Ok(None) => Ok(None),
        Ok(Some(piece)) => piece.map(Some).map_err(|e| TransportError::BadRequest(format!("reading the body: {e}"))),
    }
}

/// Feeds the request body to `decoder` as it arrives (limits apply while it
/// streams in), batched and decoded off the async worker when big; every
/// byte held is charged to `held`. Returns the payload and the bytes read.
async fn read_body(
    body: &mut web::Payload,
    state: &HttpState,
    held: &mut Reservation,
) -> Result<(Vec<u8>, u64), TransportError> {
    let mut seen = 0u64;
    let result = decode_body(body, state, held, &mut seen).await;
    if result.as_ref().is_err_and(TransportError::ends_body_early) {
        held.force(0);
        discard_rest(body, state, seen).await;
    }
    result
}

/// Reads and drops what is left of a refused request's body, up to the
/// body limit (and while it keeps coming), so the answer is sent after the
/// whole request and the connection stays in step (actix could otherwise
/// leave a half-read chunked body neither drained nor closed). Holds no
/// memory: every piece is dropped as it arrives.
async fn discard_rest(body: &mut web::Payload, state: &HttpState, mut seen: u64) {
    while seen <= state.limits.max_encoded {
        match tokio::time::timeout(state.body_idle, body.next()).await {
            Ok(Some(Ok(piece))) => seen += piece.len() as u64,
            _ => return,
        }
    }
}

/// [`read_body`] proper; `seen` counts the body bytes read.
async fn decode_body(
    body: &mut web::Payload,
    state: &HttpState,
    held: &mut Reservation,
    seen: &mut u64,
) -> Result<(Vec<u8>, u64), TransportError> {
    let mut decoder = state.codec.decoder(state.limits);
    let mut bytes_in = 0u64;
    let mut batch: Vec<Bytes> = Vec::new();
    let mut batched = 0usize;
    loop {
        let piece = next_piece(body, state.body_idle).await?;
        let end = piece.is_none();
        if let Some(piece) = piece {
            bytes_in += piece.len() as u64;
            *seen = bytes_in;
            batched += piece.len();
            batch.push(piece);
            held.resize(decoder.buffered() + batched as u64)?;
        }
        if batched >= DECODE_BATCH || (end && batched > 0) {
            // Charged before it is decoded: what the batch may inflate to (its
            // own bytes, and the slice it completes, 8 MiB at most).
            let room = state.limits.max_decoded.saturating_sub(decoder.buffered());
            let slices = 1 + batch.iter().map(|p| memchr::memmem::find_iter(p, BORDER).count() + 1).sum::<usize>();
            let may_grow = (batched as u64)
                .saturating_mul(MAX_INFLATE_RATIO)
                .min((slices as u64).saturating_mul(ksrpc_core::codec::MAX_DECODED_SLICE))
                .min(room);
            held.resize(decoder.buffered() + batched as u64 + may_grow)?;
            let pieces = std::mem::take(&mut batch);
            decoder = if batched <= INLINE_DECODE {
                feed(decoder, &pieces)?
            } else {
                web::block(move || feed(decoder, &pieces))
                    .await
                    .map_err(|e| TransportError::Internal(e.to_string()))??
            };
            batched = 0;
            held.resize(decoder.buffered())?;
        }
        if end {
            break;
        }
    }
    Ok((decoder.finish()?, bytes_in))
}

fn feed(
    mut decoder: Box<dyn ksrpc_core::codec::StreamDecoder>,
    pieces: &[Bytes],
) -> Result<Box<dyn ksrpc_core::codec::StreamDecoder>, TransportError> {
    // Where decoding runs is part of the design (never on a connection
    // worker for more than a few KiB): said at debug level, and tested.
    let bytes: usize = pieces.iter().map(Bytes::len).sum();
    let thread = std::thread::current();
    tracing::debug!(bytes, thread = thread.name().unwrap_or("unnamed"), "decoding a request batch");
    for p in pieces {
        decoder.feed(p)?;
    }
    Ok(decoder)
}

/// Reads a whole body as it is (no decoding), within `limit` bytes, charged
/// to `held`.
async fn read_raw(
    body: &mut web::Payload,
    state: &HttpState,
    held: &mut Reservation,
) -> Result<Vec<u8>, TransportError> {
    let limit = state.limits.max_encoded;
    let mut out = Vec::new();
    while let Some(piece) = next_piece(body, state.body_idle).await? {
        if (out.len() + piece.len()) as u64 > limit {
            return Err(TransportError::TooLarge(format!("request body exceeds the limit of {limit} bytes")));
        }
        held.resize((out.len() + piece.len()) as u64)?;
        out.extend_from_slice(&piece);
    }
    Ok(out)
}

/// One compat call: decode the body as it arrives, run it, stream the reply.
async fn chunk(
    req: HttpRequest,
    mut body: web::Payload,
    state: web::Data<HttpState>,
) -> Result<HttpResponse, TransportError> {
    let started = Instant::now();
    let (user, caller) = caller_of(&req)?;
    let mut held = state.budget.reservation(&user.name);
    let (payload, bytes_in) = read_body(&mut body, &state, &mut held).await?;
    let payload = Bytes::from(payload);
    let fill = match cached::compat_begin(&state, &user, &payload).await {
        cached::CompatStart::Hit(entry) => return Ok(cached_reply(entry, &caller, bytes_in, started)),
        cached::CompatStart::Run(fill) => fill,
    };
    // The payload stays charged while the call runs (it is in Python's hands).
    held.resize(payload.len() as u64)?;
    let (reply, fill) = cached::run_compat(&state, CompatRequest { user: user.clone(), payload }, fill).await;
    let reply = reply.inspect_err(|e| {
        let summary = match e {
            ksrpc_core::ExecError::BadRequest { summary, .. } => summary.as_str(),
            _ => "<not run>",
        };
        tracing::warn!(user = %user.name, peer = %caller.peer, chain = %summary, bytes_in, error = %e, "call refused");
    })?;
    // Then the reply, until its last byte is sent.
    let reply = admit_compat_reply(reply, &mut held, &user.name);
    let cache = cached::compat_after(&state, fill, &reply);
    Ok(stream_reply(&state.codec, reply, caller, bytes_in, started, held, state.send_timeout, cache))
}

/// The media type of native-protocol bodies (zstd-compressed postcard).
pub const NATIVE_CONTENT_TYPE: &str = "application/x-ksrpc-native";

fn native_response(status: actix_web::http::StatusCode, body: Vec<u8>) -> HttpResponse {
    HttpResponse::build(status).content_type(NATIVE_CONTENT_TYPE).body(body)
}

/// A 200 native response (with a length, not chunked) sent in 256 KiB
/// pieces. The reply and `held` are kept until the last piece is taken; a
/// piece the client does not take within `send_timeout` (it stopped
/// reading) ends the response short, which drops the connection, and gives
/// the bytes back at once.
fn native_response_held(body: Vec<u8>, held: Reservation, send_timeout: Duration) -> HttpResponse {
    const PIECE: usize = 256 * 1024;
    let len = body.len() as u64;
    if body.len() <= PIECE {
        // One piece, ready at once: actix writes it with the headers. A body
        // that arrives after the headers were written goes out as a second
        // small packet, which Nagle holds until the client acknowledges the
        // first, and the client delays that acknowledgement: 40 ms a call.
        let piece = futures_util::stream::once(async move {
            let _held = held; // given back when the body is taken
            Ok::<Bytes, actix_web::Error>(Bytes::from(body))
        });
        return HttpResponse::Ok()
            .content_type(NATIVE_CONTENT_TYPE)
            .body(actix_web::body::SizedStream::new(len, Box::pin(piece)));
    }
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(2);
    actix_web::rt::spawn(async move {
        let _held = held;
        for piece in body.chunks(PIECE) {
            // A copy: a slice of the whole reply would keep all of it alive.
            match tokio::time::timeout(send_timeout, tx.send(Bytes::copy_from_slice(piece))).await {
                Ok(Ok(())) => {}
                _ => return,
            }
        }
    });
    let pieces = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<Bytes, actix_web::Error>(b), rx))
    });
    HttpResponse::Ok().content_type(NATIVE_CONTENT_TYPE).body(actix_web::body::SizedStream::new(len, pieces))
}

/// How many bytes a reply holds until it is sent (about its encoded size).
pub fn outcome_weight(outcome: &native::Outcome) -> u64 {
    match outcome {
        native::Outcome::Ok(v) => v.weight() as u64,
        _ => 64,
    }
}

/// A compat reply charged to `held` until it is sent, or, when it would pass
/// the memory budget, a 500 reply with a `MemoryError` naming the limit in
/// its place (nothing held). Both compat transports answer this way.
pub fn admit_compat_reply(reply: CompatReply, held: &mut Reservation, user: &str) -> CompatReply {
    match held.resize(reply.body.len() as u64) {
        Ok(()) => reply,
        Err(e) => {
            held.force(0);
            tracing::warn!(user, chain = %reply.summary, "reply refused: {e}");
            let body = ksrpc_core::compat::error_reply(
                "",
                "MemoryError",
                &e.to_string(),
                "",
                &ksrpc_core::compat::utc_now_iso(),
            );
            let outcome = ksrpc_core::CallOutcome::Error("MemoryError".into());
            CompatReply { status: 500, body: body.into(), summary: reply.summary, cache_chain: None, outcome }
        }
    }
}

/// The error a call's caller sees when its reply would pass the budget.
pub fn over_budget(e: &ksrpc_core::BudgetError) -> native::RemoteError {
    native::RemoteError { kind: "MemoryError".into(), message: e.to_string(), traceback: String::new() }
}

/// What decoding a native message may hold: its bytes, and what it decodes
/// to (the declared size, or the limit when it declares none) with room for
/// the decoded values themselves.
pub fn decode_charge(wire: &[u8], limits: Limits) -> u64 {
    let decoded = native::declared_size(wire).unwrap_or(limits.max_decoded).min(limits.max_decoded);
    // every value takes at least one decoded byte and one slot in memory
    let slot = std::mem::size_of::<native::Value>() as u64;
    let values = native::MAX_VALUES as u64 * slot;
    wire.len() as u64 + decoded + decoded.saturating_mul(slot).min(values)
}

/// Decodes a native client message, on the blocking pool unless it is
/// small; `held` must already hold [`decode_charge`] and afterwards holds
/// the decoded message's weight.
pub async fn decode_client_message(
    wire: Vec<u8>,
    limits: Limits,
    held: &mut Reservation,
) -> Result<Result<ClientMessage, native::NativeError>, TransportError> {
    let message = if native::is_light(&wire, INLINE_REPLY) {
        native::decode_compressed::<ClientMessage>(&wire, limits)
    } else {
        web::block(move || native::decode_compressed::<ClientMessage>(&wire, limits))
            .await
            .map_err(|e| TransportError::Internal(e.to_string()))?
    };
    if let Ok(m) = &message {
        held.force(message_weight(m));
    }
    Ok(message)
}

/// Roughly the bytes a decoded client message holds.
fn message_weight(m: &ClientMessage) -> u64 {
    match m {
        ClientMessage::Call { chain, .. } => chain
            .calls
            .iter()
            .filter_map(|c| c.args.as_ref())
            .flat_map(|a| a.positional.iter().chain(a.keyword.iter().map(|(_, v)| v)))
            .map(|v| v.weight() as u64)
            .sum::<u64>()
            .max(64),
        _ => 64,
    }
}

/// Replies smaller than this are encoded on the async worker; bigger ones on
/// the blocking pool.
pub const INLINE_REPLY: usize = 64 * 1024;

/// Encodes a server message, off the async worker when it is big.
pub async fn encode_server_message(message: ServerMessage) -> Result<Vec<u8>, TransportError> {
    let big =
        matches!(&message, ServerMessage::Reply { outcome: native::Outcome::Ok(v), .. } if v.weight() > INLINE_REPLY);
    if !big {
        return Ok(native::encode_compressed(&message));
    }
    web::block(move || native::encode_compressed(&message)).await.map_err(|e| TransportError::Internal(e.to_string()))
}

/// One native call per request: `Call` or `Next` in, `Reply` out (see
/// `docs/protocol.md`). A message this server cannot read (another version,
/// bad bytes) is answered 400 with a `Refused` message saying why.
async fn v2_call(
    req: HttpRequest,
    mut body: web::Payload,
    state: web::Data<HttpState>,
) -> Result<HttpResponse, TransportError> {
    let started = Instant::now();
    let (user, caller) = caller_of(&req)?;
    let mut held = state.budget.reservation(&user.name);
    let wire = read_raw(&mut body, &state, &mut held).await?;
    let bytes_in = wire.len() as u64;
    let refuse = |reason: String| {
        native_response(
            actix_web::http::StatusCode::BAD_REQUEST,
            native::encode_compressed(&ServerMessage::Refused { reason }),
        )
    };
    held.resize(decode_charge(&wire, state.limits))?;
    let message = match decode_client_message(wire, state.limits, &mut held).await? {
        Ok(m) => m,
        Err(e) => return Ok(refuse(e.to_string())),
    };
    if let ClientMessage::Cancel { id } = message {
        // Answered `Ok(true)` when the call was found and stopped.
        let found = state.in_flight.cancel(&user.name, id);
        let body = native::encode_compressed(&ServerMessage::Reply { id, outcome: native::Outcome::Ok(found.into()) });
        return Ok(native_response(actix_web::http::StatusCode::OK, body));
    }
    let Some((id, chain)) = message.into_work() else { return Ok(refuse("nothing to run".into())) };
    let summary = chain.summary().to_string();
    let registered = if id == 0 { None } else { state.in_flight.register(&user.name, id) };
    if id != 0 && registered.is_none() {
        return Ok(refuse(format!("request id {id} is already in flight for this user")));
    }
    let (mark, store) = match cached::native_begin(&state, &user, &chain).await {
        cached::NativeStart::Hit(entry) => {
            held.force(0);
            let body = cached::native_hit(id, entry).await?;
            let stats = CallStats::hit(&summary, bytes_in, body.len() as u64);
            log_call("native call", &caller, stats, started);
            return Ok(native_response(actix_web::http::StatusCode::OK, body));
        }
        cached::NativeStart::Run(mark, store) => (mark, store),
    };
    let call = state.executor.call_native(NativeRequest { user: user.clone(), chain });
    let outcome = match registered {
        None => call.await?,
        Some((cancelled, _guard)) => {
            tokio::select! {
                outcome = call => outcome?,
                // Dropping `call` cancels it in the executor.
                _ = cancelled => {
                    let error = native::RemoteError {
                        kind: "Cancelled".into(),
                        message: format!("request {id} was cancelled by the client"),
                        traceback: String::new(),
                    };
                    native::Outcome::Err(error)
                }
            }
        }
    };
    let outcome = match held.resize(outcome_weight(&outcome)) {
        Ok(()) => outcome,
        Err(e) => {
            held.force(0);
            tracing::warn!(user = %user.name, chain = %summary, "reply refused: {e}");
            native::Outcome::Err(over_budget(&e))
        }
    };
    let ok = !matches!(outcome, native::Outcome::Err(_));
    let mark = if ok { mark } else { cached::CacheMark::Skip };
    let call_outcome = outcome_of(&outcome);
    let body = cached::native_reply(&state, id, outcome, store, &summary).await?;
    let bytes_out = body.len() as u64;
    // Held until actix has taken the whole body.
    let response = native_response_held(body, held, state.send_timeout);
    let stats = CallStats {
        summary: &summary,
        status: if ok { 200 } else { 500 },
        outcome: &call_outcome,
        cache: mark,
        bytes_in,
        bytes_out,
    };
    log_call("native call", &caller, stats, started);
    Ok(response)
}

#[cfg(test)]
mod log_limiter_tests {
    use super::*;

    #[test]
    fn a_burst_per_window_then_a_count_of_the_rest() {
        let limiter = LogLimiter::new(3, Duration::from_secs(10));
        let t0 = Instant::now();
        let admitted: Vec<LogAdmit> = (0..5).map(|i| limiter.admit(t0 + Duration::from_millis(i))).collect();
        assert_eq!(
            admitted[..3],
            [LogAdmit::Log { unlogged: 0 }, LogAdmit::Log { unlogged: 0 }, LogAdmit::Log { unlogged: 0 }]
        );
        assert_eq!(admitted[3..], [LogAdmit::Skip, LogAdmit::Skip]);
        // The next window lets lines through again, the first one with the count.
        assert_eq!(limiter.admit(t0 + Duration::from_secs(11)), LogAdmit::Log { unlogged: 2 });
        assert_eq!(limiter.admit(t0 + Duration::from_secs(12)), LogAdmit::Log { unlogged: 0 });
    }
}
