//! ksrpc-transport-http: the HTTP routes of ksrpc, 0.8.1 compatible, and
//! the native protocol's `POST {prefix}/v2/call`.
//!
//! - [`routes`]: `GET|POST {prefix}/generate_204`, `POST {prefix}/chunk`
//!   and `POST {prefix}/v2/call`, behind `ksrpc_transport::guard`.
//! - [`stream_reply`] and [`cached_reply`]: the chunked compat reply.
//!
//! The request body is decoded while it streams in (limits enforced as it
//! arrives); the reply is encoded slice by slice on the rayon pool and
//! streamed out with chunked transfer encoding, which the 0.8.1 client needs.
//! What this crate shares with the WebSocket transport (state, auth, errors,
//! the log line, the cache, encoding policy) is in `ksrpc-transport`.

mod reply;

use std::time::{Duration, Instant};

use actix_web::{web, HttpRequest, HttpResponse};
use bytes::Bytes;
use futures_util::StreamExt;
use ksrpc_core::budget::Reservation;
use ksrpc_core::codec::{Codec, BORDER};
use ksrpc_core::native::{self, ClientMessage, ServerMessage};
use ksrpc_core::{CompatRequest, NativeRequest};
use ksrpc_transport::{
    admit_compat_reply, cached, caller_of, decode_charge, decode_client_message, log_call, native_refusal, outcome_of,
    outcome_weight, over_budget, CallStats, ServerState, TransportError, INLINE_DECODE,
};

pub use reply::{cached_reply, stream_reply};

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

/// The next piece of a request body, or 408 when none comes for `idle`
/// (a client that stops half-way does not pin its buffers).
async fn next_piece(body: &mut web::Payload, idle: Duration) -> Result<Option<Bytes>, TransportError> {
    match tokio::time::timeout(idle, body.next()).await {
        Err(_) => Err(TransportError::BodyIdle(idle.as_secs_f64())),
        Ok(None) => Ok(None),
        Ok(Some(piece)) => {
            piece.map(Some).map_err(|e| TransportError::BadRequest(format!("reading the body: {e}").into()))
        }
    }
}

/// Feeds the request body to `decoder` as it arrives (limits apply while it
/// streams in), batched and decoded off the async worker when big; every
/// byte held is charged to `held`. Returns the payload and the bytes read.
async fn read_body(
    body: &mut web::Payload,
    state: &ServerState,
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
async fn discard_rest(body: &mut web::Payload, state: &ServerState, mut seen: u64) {
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
    state: &ServerState,
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
                    .map_err(|e| TransportError::Internal(Box::new(e)))??
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
    state: &ServerState,
    held: &mut Reservation,
) -> Result<Vec<u8>, TransportError> {
    let limit = state.limits.max_encoded;
    let mut out = Vec::new();
    while let Some(piece) = next_piece(body, state.body_idle).await? {
        if (out.len() + piece.len()) as u64 > limit {
            return Err(TransportError::TooLarge(format!("request body exceeds the limit of {limit} bytes").into()));
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
    state: web::Data<ServerState>,
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

/// One native call per request: `Call` or `Next` in, `Reply` out (see
/// `docs/protocol.md`). A message this server cannot read (another version,
/// bad bytes) is answered 400 with a `Refused` message saying why.
async fn v2_call(
    req: HttpRequest,
    mut body: web::Payload,
    state: web::Data<ServerState>,
) -> Result<HttpResponse, TransportError> {
    let started = Instant::now();
    let (user, caller) = caller_of(&req)?;
    let mut held = state.budget.reservation(&user.name);
    let wire = read_raw(&mut body, &state, &mut held).await?;
    let bytes_in = wire.len() as u64;
    let refuse_with =
        |status, reason: String| native_response(status, native::encode_compressed(&ServerMessage::Refused { reason }));
    let refuse = |reason: String| refuse_with(actix_web::http::StatusCode::BAD_REQUEST, reason);
    held.resize(decode_charge(&wire, state.limits))?;
    let message = match decode_client_message(wire, state.limits, &mut held).await? {
        Ok(m) => m,
        Err(e) => return Ok(refuse_with(native_refusal(&e).0, e.to_string())),
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
