//! Streaming a compat reply out through the codec.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_web::HttpResponse;
use bytes::Bytes;
use futures_util::stream;
use ksrpc_core::codec::{ChunkedZlib, Codec, Flow};
use ksrpc_core::{CompatReply, Reservation};

use ksrpc_transport::cached::{CacheMark, Store};
use ksrpc_transport::{log_call, CallStats, Caller};

/// Encoded pieces buffered between the encoder and the socket; with the
/// rayon window this bounds the memory of one reply to the payload plus a
/// few compressed slices.
const CHANNEL: usize = 8;

/// Numbers the replies' `Content-Disposition` names.
static REPLY_NUMBER: AtomicU64 = AtomicU64::new(1);

/// The HTTP reply: 200 with a chunked body, slices compressed in parallel
/// and sent as soon as each is ready. A reply that fits in one slice is
/// encoded inline (no thread hand-off for small calls).
///
/// `held` (the reply's share of the memory budget) is given back when the
/// last piece is sent or the client goes away. An encoder whose piece is not
/// taken for `send_timeout` (a client that stopped reading) gives up, so no
/// blocking thread waits forever.
///
/// With a `store`, the encoded pieces are also kept for the result cache
/// and stored once the whole reply is encoded.
#[allow(clippy::too_many_arguments)]
pub fn stream_reply(
    codec: &ChunkedZlib,
    reply: CompatReply,
    caller: Caller,
    bytes_in: u64,
    started: Instant,
    held: Reservation,
    send_timeout: Duration,
    (mark, mut store): (CacheMark, Option<Store>),
) -> HttpResponse {
    let mut res = reply_head();
    if reply.body.len() <= codec.slice_size {
        let mut out = Vec::new();
        let r = codec.encode(&mut std::iter::once(reply.body.clone()), &mut |p| {
            if let Some(s) = store.as_mut() {
                s.push(&p);
            }
            out.push(p);
            Flow::Continue(())
        });
        match r {
            Ok(()) => {
                if let Some(s) = store {
                    s.finish_async(reply.summary.clone());
                }
            }
            Err(e) => tracing::error!("encoding a reply: {e}"),
        }
        let bytes_out = out.iter().map(|p| p.len() as u64).sum();
        let stats = CallStats::of_reply(&reply, mark, bytes_in, bytes_out);
        log_call("call", &caller, stats, started);
        drop(held);
        return res.streaming(stream::iter(out.into_iter().map(Ok::<Bytes, actix_web::Error>)));
    }
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(CHANNEL);
    let codec = codec.clone();
    let runtime = tokio::runtime::Handle::current();
    let complete = Arc::new(AtomicBool::new(false));
    let done = complete.clone();
    tokio::task::spawn_blocking(move || {
        let _held = held;
        let mut bytes_out = 0u64;
        let r = codec.encode(&mut std::iter::once(reply.body.clone()), &mut |piece| {
            bytes_out += piece.len() as u64;
            if let Some(s) = store.as_mut() {
                s.push(&piece);
            }
            match runtime.block_on(tokio::time::timeout(send_timeout, tx.send(piece))) {
                Ok(Ok(())) => Flow::Continue(()),
                Ok(Err(_)) | Err(_) => Flow::Break(()),
            }
        });
        match r {
            Ok(()) => {
                done.store(true, Ordering::Release);
                if let Some(s) = store {
                    s.finish(reply.summary.clone());
                }
            }
            Err(e) => tracing::warn!(user = %caller.user, peer = %caller.peer, "reply not fully sent: {e}"),
        }
        let stats = CallStats::of_reply(&reply, mark, bytes_in, bytes_out);
        log_call("call", &caller, stats, started);
    });
    let body = stream::unfold(Some(rx), move |rx| {
        let complete = complete.clone();
        async move {
            let mut rx = rx?;
            match rx.recv().await {
                Some(b) => Some((Ok::<Bytes, actix_web::Error>(b), Some(rx))),
                // The encoder stopped early (the client stopped reading, or
                // encoding failed): an error ends the response without its
                // final chunk, so no client takes a cut reply for a whole one.
                None if !complete.load(Ordering::Acquire) => {
                    Some((Err(actix_web::error::ErrorInternalServerError("the reply was cut short")), None))
                }
                None => None,
            }
        }
    });
    res.streaming(body)
}

/// The response head every compat reply has: the original's
/// `Content-Disposition`, byte for byte in form: `<number>.pkl.chunked.zip`
/// (aiohttp's `id(request)` there; a counter here), no `attachment;`.
fn reply_head() -> actix_web::HttpResponseBuilder {
    let mut res = HttpResponse::Ok();
    let n = REPLY_NUMBER.fetch_add(1, Ordering::Relaxed);
    res.content_type("application/octet-stream").insert_header(("Content-Disposition", format!("{n}.pkl.chunked.zip")));
    res
}

/// A cached reply (already in the HTTP form), sent in 256 KiB views of the
/// entry: no Python, no encoding, no copy.
pub fn cached_reply(
    entry: std::sync::Arc<ksrpc_cache::Entry>,
    caller: &Caller,
    bytes_in: u64,
    started: Instant,
) -> HttpResponse {
    const PIECE: usize = 256 * 1024;
    let body = entry.body.clone();
    let stats = CallStats::hit(&entry.summary, bytes_in, body.len() as u64);
    log_call("call", caller, stats, started);
    let pieces = (0..body.len())
        .step_by(PIECE)
        .map(move |at| Ok::<Bytes, actix_web::Error>(body.slice(at..(at + PIECE).min(body.len()))));
    reply_head().streaming(stream::iter(pieces.collect::<Vec<_>>()))
}
