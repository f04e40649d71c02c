//! ksrpc-transport-ws: `GET {prefix}/ws`, the 0.8.1 WebSocket sequence, and
//! `GET {prefix}/v2/ws`, the native protocol multiplexed ([`v2`]).
//!
//! Per call the client sends binary slices, a text border after each, and a
//! text `EOF`; the reply comes back the same way. Calls follow one another on
//! one socket. Auth ran at the upgrade (the HTTP [`guard`] middleware).
//! While a call runs, the socket is still read, so a client that leaves
//! cancels its call instead of holding the executor.
//!
//! [`guard`]: ksrpc_transport::guard

use std::time::{Duration, Instant};

use actix_web::{web, HttpRequest, HttpResponse};
use actix_ws::{AggregatedMessage, AggregatedMessageStream, CloseCode, CloseReason, Session};
use bytes::Bytes;
use futures_util::StreamExt;
use ksrpc_core::auth::User;
use ksrpc_core::codec::{Codec, Flow, WsEvent, WsFrame, EOF};
use ksrpc_core::ChunkedZlib;
use ksrpc_core::{compat, CompatReply, CompatRequest, ExecError};
use ksrpc_transport::cached::{self, Store};
use ksrpc_transport::{caller_of, log_call, CallStats, Caller, ServerState, TransportError, INLINE_DECODE};
use std::sync::Arc;

/// A request (or, on `/v2/ws`, a message) that stops half-way is dropped
/// after this long without a message.
pub(crate) const HALF_SENT_IDLE: Duration = Duration::from_secs(300);

/// The reason of the close (1001) a socket gets when the server stops.
pub(crate) const SHUTTING_DOWN: &str = "the server is shutting down";

pub mod v2;

/// Registers `GET {prefix}/ws` and `GET {prefix}/v2/ws`.
pub fn routes(prefix: &str) -> impl FnOnce(&mut web::ServiceConfig) + '_ {
    move |cfg| {
        cfg.service(web::resource(format!("{prefix}/ws")).route(web::get().to(upgrade)))
            .service(web::resource(format!("{prefix}/v2/ws")).route(web::get().to(v2::upgrade)));
    }
}

async fn upgrade(
    req: HttpRequest,
    body: web::Payload,
    state: web::Data<ServerState>,
) -> Result<HttpResponse, actix_web::Error> {
    let (user, caller) = caller_of(&req)?;
    let (response, session, messages) = actix_ws::handle(&req, body)?;
    // actix's default frame limit (64 KiB) is below the client's ~128 KiB
    // slices; allow a whole encoded slice per frame.
    let messages = messages.max_frame_size(state.codec.max_encoded_slice + 1024).aggregate_continuations();
    actix_web::rt::spawn(serve(state.into_inner(), (user, caller), session, messages));
    Ok(response)
}

pub(crate) fn close_reason(code: CloseCode, text: impl Into<String>) -> Option<CloseReason> {
    Some(CloseReason { code, description: Some(text.into()) })
}

/// Serves one socket until the client closes it or breaks the protocol.
async fn serve(
    state: Arc<ServerState>,
    (user, caller): (Arc<User>, Caller),
    mut session: Session,
    mut messages: AggregatedMessageStream,
) {
    let mut decoder = state.codec.ws_decoder(state.limits);
    // What the socket holds (a request being decoded, then its reply),
    // charged to the user's and the server's memory budget.
    let mut held = state.budget.reservation(&user.name);
    let mut bytes_in = 0u64;
    let mut started = Instant::now();
    loop {
        let next = if decoder.has_partial() {
            match tokio::time::timeout(HALF_SENT_IDLE, messages.next()).await {
                Ok(m) => m,
                Err(_) => {
                    let _ = session.close(close_reason(CloseCode::Policy, "request left half-sent")).await;
                    return;
                }
            }
        } else {
            // Between calls: a stopping server closes the socket now, unless
            // a request has already arrived (read first: it is served).
            tokio::select! {
                biased;
                m = messages.next() => m,
                () = state.stopping.wait() => {
                    let _ = session.close(close_reason(CloseCode::Away, SHUTTING_DOWN)).await;
                    return;
                }
            }
        };
        let msg = match next {
            Some(Ok(m)) => m,
            Some(Err(e)) => {
                tracing::debug!(user = %user.name, "websocket protocol error: {e}");
                let code =
                    if matches!(e, actix_ws::ProtocolError::Overflow) { CloseCode::Size } else { CloseCode::Protocol };
                let _ = session.close(close_reason(code, e.to_string())).await;
                return;
            }
            None => return,
        };
        let event = match msg {
            AggregatedMessage::Binary(b) => {
                if !decoder.has_partial() {
                    started = Instant::now();
                }
                bytes_in += b.len() as u64;
                decoder.binary(&b).map(|()| WsEvent::More)
            }
            AggregatedMessage::Text(t) => {
                bytes_in += t.len() as u64;
                if decoder.pending() <= INLINE_DECODE {
                    decoder.text(&t)
                } else {
                    // A border inflates the slice before it: off the async worker.
                    let (d, r) = match web::block(move || {
                        let r = decoder.text(&t);
                        (decoder, r)
                    })
                    .await
                    {
                        Ok(done) => done,
                        Err(_) => return,
                    };
                    decoder = d;
                    r
                }
            }
            AggregatedMessage::Ping(p) => {
                if session.pong(&p).await.is_err() {
                    return;
                }
                Ok(WsEvent::More)
            }
            AggregatedMessage::Pong(_) => Ok(WsEvent::More),
            AggregatedMessage::Close(_) => {
                let _ = session.close(None).await;
                return;
            }
        };
        // A framing error is reported as such below, not as a budget refusal.
        let charged = match &event {
            Ok(WsEvent::Done(p)) => Some(p.len() as u64),
            Ok(WsEvent::More) => Some(decoder.buffered()),
            Err(_) => None,
        };
        if let Some(Err(e)) = charged.map(|bytes| held.resize(bytes)) {
            let e = TransportError::from(e);
            tracing::warn!(user = %user.name, peer = %caller.peer, bytes_in, "websocket request refused: {e}");
            let _ = session.close(close_reason(CloseCode::from(e.close_code()), e.to_string())).await;
            return;
        }
        let payload = match event {
            Ok(WsEvent::More) => continue,
            Ok(WsEvent::Done(p)) => p,
            Err(e) => {
                let e = TransportError::from(e);
                tracing::warn!(user = %user.name, peer = %caller.peer, bytes_in, "websocket request refused: {e}");
                let _ = session.close(close_reason(CloseCode::from(e.close_code()), e.to_string())).await;
                return;
            }
        };
        let payload = Bytes::from(payload);
        let fill = match cached::compat_begin(&state, &user, &payload).await {
            cached::CompatStart::Hit(entry) => {
                held.force(0);
                let mut sent = 0u64;
                for frame in ChunkedZlib::ws_frames_of_http(&entry.body).into_iter().chain([WsFrame::Text(EOF)]) {
                    match send_frame(&mut session, frame, state.send_timeout).await {
                        Some(n) => sent += n,
                        None => return,
                    }
                }
                let stats = CallStats::hit(&entry.summary, bytes_in, sent);
                log_call("call", &caller, stats, started);
                bytes_in = 0;
                continue;
            }
            cached::CompatStart::Run(fill) => fill,
        };
        let request = CompatRequest { user: user.clone(), payload };
        // Keep reading while the call runs: a close or a vanished client
        // drops the call future, which cancels the call.
        let call = cached::run_compat(&state, request, fill);
        tokio::pin!(call);
        let (outcome, fill) = loop {
            tokio::select! {
                outcome = &mut call => break outcome,
                msg = messages.next() => match msg {
                    Some(Ok(AggregatedMessage::Ping(p))) => {
                        if session.pong(&p).await.is_err() { return; }
                    }
                    Some(Ok(AggregatedMessage::Close(_))) | Some(Err(_)) | None => return,
                    // The 0.8.1 client keeps one call in flight; anything else
                    // now is out of protocol and ignored.
                    Some(Ok(_)) => {}
                },
            }
        };
        let reply = match outcome {
            Ok(r) => r,
            Err(ExecError::BadRequest { message, reply, summary }) => {
                tracing::warn!(user = %user.name, peer = %caller.peer, chain = %summary, "bad request: {message}");
                let outcome = ksrpc_core::CallOutcome::Error("BadRequest".into());
                CompatReply { status: 500, body: reply, summary, cache_chain: None, outcome }
            }
            Err(e) => {
                let t: TransportError = e.into();
                let body = compat::error_reply("", "RuntimeError", &t.to_string(), "", &compat::utc_now_iso());
                let outcome = ksrpc_core::CallOutcome::Error("RuntimeError".into());
                CompatReply { status: 500, body: body.into(), summary: "<not run>".into(), cache_chain: None, outcome }
            }
        };
        let reply = ksrpc_transport::admit_compat_reply(reply, &mut held, &user.name);
        let (mark, store) = cached::compat_after(&state, fill, &reply);
        match send_reply(&state, &mut session, &reply, store).await {
            Some(bytes_out) => {
                let stats = CallStats::of_reply(&reply, mark, bytes_in, bytes_out);
                log_call("call", &caller, stats, started)
            }
            None => return,
        }
        held.force(0);
        bytes_in = 0;
    }
}

/// Sends a reply as binary slices, text borders and `EOF`. Small replies are
/// encoded inline; big ones on the blocking pool, in parallel, streamed.
/// Returns the bytes sent, or `None` when the client went away.
///
/// A reply the result cache keeps is encoded in the HTTP form (the one form
/// the cache stores) and sent as the frames of that form.
async fn send_reply(
    state: &ServerState,
    session: &mut Session,
    reply: &CompatReply,
    store: Option<Store>,
) -> Option<u64> {
    let codec = state.codec.clone();
    let body: Bytes = reply.body.clone();
    let mut sent = 0u64;
    if let Some(store) = store {
        return send_and_store(state, session, reply, store).await;
    }
    if body.len() <= codec.slice_size {
        let mut frames = Vec::with_capacity(3);
        if let Err(e) = codec.encode_ws(&mut std::iter::once(body), &mut |f| {
            frames.push(f);
            Flow::Continue(())
        }) {
            tracing::error!("encoding a websocket reply: {e}");
            return None;
        }
        for frame in frames {
            sent += send_frame(session, frame, state.send_timeout).await?;
        }
        return Some(sent);
    }
    let (tx, mut rx) = tokio::sync::mpsc::channel::<WsFrame>(16);
    tokio::task::spawn_blocking(move || {
        let r = codec.encode_ws(&mut std::iter::once(body), &mut |frame| match tx.blocking_send(frame) {
            Ok(()) => Flow::Continue(()),
            Err(_) => Flow::Break(()),
        });
        if let Err(e) = r {
            tracing::debug!("websocket reply not fully sent: {e}");
        }
    });
    while let Some(frame) = rx.recv().await {
        sent += send_frame(session, frame, state.send_timeout).await?;
    }
    Some(sent)
}

/// [`send_reply`] for a reply the cache keeps: HTTP-form pieces, encoded on
/// the blocking pool, each kept and sent as its WebSocket frames; stored
/// once all of it was encoded.
async fn send_and_store(
    state: &ServerState,
    session: &mut Session,
    reply: &CompatReply,
    mut store: Store,
) -> Option<u64> {
    let codec = state.codec.clone();
    let body = reply.body.clone();
    let summary = reply.summary.clone();
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Bytes>(16);
    let job = tokio::task::spawn_blocking(move || {
        let r = codec.encode(&mut std::iter::once(body), &mut |piece| {
            store.push(&piece);
            match tx.blocking_send(piece) {
                Ok(()) => Flow::Continue(()),
                Err(_) => Flow::Break(()),
            }
        });
        match r {
            Ok(()) => {
                store.finish(summary);
                true
            }
            Err(e) => {
                tracing::debug!("websocket reply not fully sent: {e}");
                false
            }
        }
    });
    let mut sent = 0u64;
    while let Some(piece) = rx.recv().await {
        for frame in ChunkedZlib::ws_frames_of_http(&piece) {
            sent += send_frame(session, frame, state.send_timeout).await?;
        }
    }
    // Only a reply encoded to its end gets its EOF (a cut one is never whole).
    if !job.await.unwrap_or(false) {
        return None;
    }
    Some(sent + send_frame(session, WsFrame::Text(EOF), state.send_timeout).await?)
}

/// Sends one frame; `None` when the client went away or did not take the
/// frame within `timeout` (a client that stopped reading must not pin the
/// socket, its reply, or the encoder's thread).
async fn send_frame(session: &mut Session, frame: WsFrame, timeout: Duration) -> Option<u64> {
    let (n, sending) = match frame {
        WsFrame::Binary(b) => (b.len() as u64, futures_util::future::Either::Left(session.binary(b))),
        WsFrame::Text(t) => (t.len() as u64, futures_util::future::Either::Right(session.text(t))),
    };
    match tokio::time::timeout(timeout, sending).await {
        Ok(Ok(())) => Some(n),
        Ok(Err(_)) => None,
        Err(_) => {
            tracing::warn!("websocket client stopped reading for {:.0} s; closing", timeout.as_secs_f64());
            None
        }
    }
}
