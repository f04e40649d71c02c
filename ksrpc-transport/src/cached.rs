//! The result cache on the call path: the lookup before a call, the store
//! after it, and the `cache=` field of the per-call log line. Both
//! protocols and all four transports (compat HTTP and WebSocket, native
//! HTTP and WebSocket) go through these functions.
//!
//! The user's rules are part of every key (see `ksrpc_cache`), so a hit is
//! only ever an answer a user with the same rules computed: the rules'
//! decision on the chain is the one a miss would have made.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use actix_web::web;
use bytes::{Bytes, BytesMut};
use ksrpc_cache::{Begin, Entry, Fill, Kind, ResultCache};
use ksrpc_core::auth::User;
use ksrpc_core::native::{self, Outcome, ServerMessage, Value};
use ksrpc_core::{CallChain, ChainSeen, CompatReply, CompatRequest, ExecError};

use crate::{encode_server_message, ServerState, TransportError};
use ksrpc_core::native::INLINE_BYTES;

/// The `cache=` field of a call's log line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CacheMark {
    /// Served from the cache.
    Hit,
    /// A cacheable call that was not in the cache: it ran (and its result
    /// was stored, unless it raised or was too big).
    Miss,
    /// Not cacheable (no cache, no ttl pattern matches, a generator, an
    /// error, a chain passed as an argument).
    Skip,
}

impl fmt::Display for CacheMark {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CacheMark::Hit => "hit",
            CacheMark::Miss => "miss",
            CacheMark::Skip => "skip",
        })
    }
}

/// Where a compat call starts.
#[derive(Debug)]
pub enum CompatStart {
    /// Serve this HTTP-form body (no Python, no encoding).
    Hit(Arc<Entry>),
    /// Run the call; with a fill, this call computes the key for others.
    Run(Option<Fill>),
}

/// Looks a compat request up (its decoded pickle is the canonical request;
/// which chain it names is only known once Python has read it, so every
/// request is hashed: a big one on the blocking pool, not on the worker).
pub async fn compat_begin(state: &ServerState, user: &User, payload: &Bytes) -> CompatStart {
    let Some(cache) = &state.cache else { return CompatStart::Run(None) };
    let key = if payload.len() <= INLINE_BYTES {
        cache.key(Kind::Compat, &user.rules, payload)
    } else {
        let (cache, rules, payload) = (cache.clone(), user.rules.clone(), payload.clone());
        match web::block(move || cache.key(Kind::Compat, &rules, &payload)).await {
            Ok(key) => key,
            // No blocking thread: run uncached rather than fail the call.
            Err(_) => return CompatStart::Run(None),
        }
    };
    match cache.begin(key).await {
        Begin::Hit(e) => CompatStart::Hit(e),
        Begin::Miss(fill) => CompatStart::Run(fill),
    }
}

/// Runs a compat call. When this call holds its key's fill, the executor
/// tells the request's chain as soon as Python has read it, and a chain no
/// ttl pattern names releases the fill there and then: identical requests
/// waiting for this one run now, in parallel, instead of after it (which
/// chain a compat request names is unknown until it is unpickled, so the
/// first identical requests of a key always wait for the first). Returns the
/// reply and the fill, when still held.
pub async fn run_compat(
    state: &ServerState,
    request: CompatRequest,
    fill: Option<Fill>,
) -> (Result<CompatReply, ExecError>, Option<Fill>) {
    let (Some(cache), Some(fill)) = (state.cache.clone(), fill) else {
        return (state.executor.call_compat(request).await, None);
    };
    let slot = Arc::new(std::sync::Mutex::new(Some(fill)));
    let held = slot.clone();
    let seen: ChainSeen = Box::new(move |chain| {
        if chain.and_then(|c| cache.ttl_for(c)).is_none() {
            let fill = held.lock().expect("fill poisoned").take();
            if let Some(fill) = fill {
                fill.never();
            }
        }
    });
    let reply = state.executor.call_compat_seen(request, seen).await;
    let fill = slot.lock().expect("fill poisoned").take();
    (reply, fill)
}

/// Collects a fresh reply's encoded pieces and stores them when the whole
/// reply was encoded.
#[derive(Debug)]
pub struct Store {
    cache: Arc<ResultCache>,
    fill: Fill,
    ttl: Duration,
    pieces: Vec<Bytes>,
    bytes: u64,
    too_big: bool,
}

impl Store {
    /// Keeps a piece of the reply (a view, not a copy).
    pub fn push(&mut self, piece: &Bytes) {
        if self.too_big {
            return;
        }
        self.bytes += piece.len() as u64;
        if !self.cache.fits(self.bytes) {
            self.too_big = true;
            self.pieces = Vec::new();
        } else {
            self.pieces.push(piece.clone());
        }
    }

    /// Stores the collected reply. Does file I/O with a disk tier: call it
    /// from a blocking thread, or through [`Store::finish_async`].
    pub fn finish(self, summary: String) {
        if self.too_big {
            return;
        }
        let mut body = BytesMut::with_capacity(self.bytes as usize);
        for p in &self.pieces {
            body.extend_from_slice(p);
        }
        self.fill.commit(Kind::Compat, body.freeze(), summary, self.ttl);
    }

    /// [`Store::finish`] from an async task: on the blocking pool when it
    /// writes a file.
    pub fn finish_async(self, summary: String) {
        if self.cache.settings().path.is_some() {
            tokio::task::spawn_blocking(move || self.finish(summary));
        } else {
            self.finish(summary);
        }
    }
}

/// What a fresh compat reply means for the cache: whether to store it, and
/// the log mark. A plain result whose chain matches no ttl pattern marks
/// the key as never cached (later identical calls do not wait).
pub fn compat_after(state: &ServerState, fill: Option<Fill>, reply: &CompatReply) -> (CacheMark, Option<Store>) {
    let Some(cache) = &state.cache else { return (CacheMark::Skip, None) };
    let chain = reply.cache_chain.as_deref().filter(|_| reply.status == 200);
    match chain.map(|c| cache.ttl_for(c)) {
        Some(Some(ttl)) => {
            let store = fill.map(|fill| Store {
                cache: cache.clone(),
                fill,
                ttl,
                pieces: Vec::new(),
                bytes: 0,
                too_big: false,
            });
            (CacheMark::Miss, store)
        }
        Some(None) => {
            if let Some(fill) = fill {
                fill.never();
            }
            (CacheMark::Skip, None)
        }
        None => (CacheMark::Skip, None),
    }
}

/// The dotted chain of a native call when it may be cached: not a
/// generator step, no chain among its arguments.
fn native_chain(chain: &CallChain<Value>) -> Option<String> {
    fn has_chain(v: &Value) -> bool {
        match v {
            Value::Chain(_) => true,
            Value::List(items) | Value::Tuple(items) => items.iter().any(has_chain),
            Value::Dict(pairs) => pairs.iter().any(|(k, v)| has_chain(k) || has_chain(v)),
            _ => false,
        }
    }
    if chain.handle.is_some() {
        return None;
    }
    let mut dotted = chain.module.clone();
    for call in &chain.calls {
        if let Some(args) = &call.args {
            if args.positional.iter().chain(args.keyword.iter().map(|(_, v)| v)).any(has_chain) {
                return None;
            }
        }
        dotted.push('.');
        dotted.push_str(&call.name);
    }
    Some(dotted)
}

/// Where a native call starts.
#[derive(Debug)]
pub enum NativeStart {
    /// The cached outcome frame.
    Hit(Arc<Entry>),
    /// Run the call; with a store, keep its outcome for this long.
    Run(CacheMark, Option<(Fill, Duration)>),
}

/// Looks a native call up: only chains a ttl pattern names are looked up
/// (the chain is explicit, so this is known before the call).
pub async fn native_begin(state: &ServerState, user: &User, chain: &CallChain<Value>) -> NativeStart {
    let Some(cache) = &state.cache else { return NativeStart::Run(CacheMark::Skip, None) };
    let Some(ttl) = native_chain(chain).and_then(|c| cache.ttl_for(&c)) else {
        return NativeStart::Run(CacheMark::Skip, None);
    };
    let request = native::encode(chain);
    match cache.begin(cache.key(Kind::Native, &user.rules, &request)).await {
        Begin::Hit(e) => NativeStart::Hit(e),
        Begin::Miss(fill) => NativeStart::Run(CacheMark::Miss, fill.map(|f| (f, ttl))),
    }
}

/// The reply to request `id` from a cached outcome frame.
pub async fn native_hit(id: u64, entry: Arc<Entry>) -> Result<Vec<u8>, TransportError> {
    let small = entry_is_small(&entry);
    let splice = move || {
        native::reply_from_outcome(id, &entry.body)
            .ok_or_else(|| TransportError::Internal("a cached native reply is not a frame this server writes".into()))
    };
    if small {
        return splice();
    }
    web::block(splice).await.map_err(|e| TransportError::Internal(Box::new(e)))?
}

fn entry_is_small(entry: &Entry) -> bool {
    entry.body.len() <= INLINE_BYTES
}

/// Encodes the reply to `id`; with a store and a result (not an error), the
/// outcome is encoded once, kept, and the reply spliced from it.
pub async fn native_reply(
    state: &ServerState,
    id: u64,
    outcome: Outcome,
    store: Option<(Fill, Duration)>,
    summary: &str,
) -> Result<Vec<u8>, TransportError> {
    let ((fill, ttl), cache) = match (&outcome, store, state.cache.clone()) {
        (Outcome::Ok(_), Some(store), Some(cache)) => (store, cache),
        _ => return encode_server_message(ServerMessage::Reply { id, outcome }).await,
    };
    let small = crate::outcome_weight(&outcome) <= INLINE_BYTES as u64 && cache.settings().path.is_none();
    let summary = summary.to_owned();
    let work = move || {
        let frame = Bytes::from(native::encode_outcome(&outcome));
        let wire = native::reply_from_outcome(id, &frame)
            .unwrap_or_else(|| native::encode_compressed(&ServerMessage::Reply { id, outcome }));
        if cache.fits(frame.len() as u64) {
            fill.commit(Kind::Native, frame, summary, ttl);
        }
        wire
    };
    if small {
        return Ok(work());
    }
    web::block(work).await.map_err(|e| TransportError::Internal(Box::new(e)))
}
