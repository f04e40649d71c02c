//! `GET {prefix}/v2/ws`: the native protocol with many calls in flight on
//! one socket (framing in [`ksrpc_core::mux`], messages in
//! [`ksrpc_core::native`], spec in `docs/protocol.md`).
//!
//! One task per socket reads frames, starts a task per call, and writes
//! replies as they complete. Replies go out one slice at a time, round
//! robin, so a small reply waits at most a slice behind a 100 MB one.
//! `Cancel` aborts the call's task (which cancels it in the executor) and
//! drops whatever of its reply was not sent yet. A socket that closes takes
//! its calls with it.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_web::{web, HttpRequest, HttpResponse};
use actix_ws::{AggregatedMessage, AggregatedMessageStream, CloseCode, Session};
use bytes::Bytes;
use futures_util::{FutureExt, StreamExt};
use ksrpc_core::auth::User;
use ksrpc_core::mux::{self, Header, Reassembler};
use ksrpc_core::native::{self, ClientMessage, Outcome, RemoteError, ServerMessage};
use ksrpc_core::Reservation;
use ksrpc_core::{ExecError, NativeRequest};
use ksrpc_transport::cached::{self, CacheMark};
use ksrpc_transport::{caller_of, log_call, outcome_of, CallStats, Caller, ServerState, TransportError};
use tokio::sync::{mpsc, Semaphore};
use tokio::task::AbortHandle;

use crate::{close_reason, HALF_SENT_IDLE};

/// Calls of one socket that run at once; more wait in line (not refused:
/// a client may well put a hundred small calls in flight).
pub const CALLS_PER_SOCKET: usize = 32;

/// How often a socket waiting for memory budget looks again.
const BUDGET_RETRY: Duration = Duration::from_millis(50);

/// Calls of one socket accepted but not answered yet (running or waiting for
/// one of the [`CALLS_PER_SOCKET`] places); beyond it, or beyond the
/// encoded-size limit of their messages together, the socket is not read
/// until calls finish.
pub const QUEUED_PER_SOCKET: usize = 1024;

pub(crate) async fn upgrade(
    req: HttpRequest,
    body: web::Payload,
    state: web::Data<ServerState>,
) -> Result<HttpResponse, actix_web::Error> {
    let (user, caller) = caller_of(&req)?;
    let (response, session, messages) = actix_ws::handle(&req, body)?;
    let messages =
        messages.max_frame_size(mux::MAX_FRAME).aggregate_continuations().max_continuation_size(mux::MAX_FRAME);
    actix_web::rt::spawn(Socket::new(state.into_inner(), user, caller, session).serve(messages));
    Ok(response)
}

/// A reply being sent, slice by slice.
struct Outgoing {
    id: u64,
    data: Bytes,
    sent: usize,
}

/// A call that finished: its id and encoded reply (`None`: nothing to send).
type Finished = (u64, Option<Bytes>);

struct Socket {
    state: Arc<ServerState>,
    user: Arc<User>,
    caller: Caller,
    session: Session,
    reassembler: Reassembler,
    /// Calls not answered yet: their task and the size of their message.
    in_flight: HashMap<u64, (AbortHandle, u64)>,
    /// Encoded bytes of the calls in `in_flight`.
    queued_bytes: u64,
    /// `CloseHandle` tasks not finished yet (they have no id of their own,
    /// and count against [`QUEUED_PER_SOCKET`] like calls).
    closing: usize,
    /// When the last binary frame arrived (the half-sent clock).
    last_frame: Instant,
    outgoing: VecDeque<Outgoing>,
    /// Unsent bytes of the replies in `outgoing`.
    outgoing_bytes: u64,
    /// What the socket holds (half-received messages, accepted calls'
    /// messages, unsent replies), charged to the memory budget.
    held: Reservation,
    done_tx: mpsc::UnboundedSender<Finished>,
    done_rx: mpsc::UnboundedReceiver<Finished>,
    permits: Arc<Semaphore>,
}

/// Why serving stops: a close to send (code and reason), or nothing (the
/// client left).
type Stop = Option<(CloseCode, String)>;

impl Socket {
    fn new(state: Arc<ServerState>, user: Arc<User>, caller: Caller, session: Session) -> Self {
        let (done_tx, done_rx) = mpsc::unbounded_channel();
        let held = state.budget.reservation(&user.name);
        Socket {
            held,
            outgoing_bytes: 0,
            reassembler: Reassembler::new(state.limits),
            state,
            user,
            caller,
            session,
            in_flight: HashMap::new(),
            queued_bytes: 0,
            closing: 0,
            last_frame: Instant::now(),
            outgoing: VecDeque::new(),
            done_tx,
            done_rx,
            permits: Arc::new(Semaphore::new(CALLS_PER_SOCKET)),
        }
    }

    async fn serve(mut self, mut messages: AggregatedMessageStream) {
        let stop = loop {
            // Only frames move the half-sent clock (not pings, not replies).
            let half_sent = self.reassembler.open_streams() > 0;
            let deadline = tokio::time::Instant::from_std(self.last_frame + HALF_SENT_IDLE);
            let idle = async move {
                if half_sent {
                    tokio::time::sleep_until(deadline).await;
                } else {
                    std::future::pending::<()>().await;
                }
            };
            let sending = !self.outgoing.is_empty();
            // Nothing in flight either way: a stopping server closes the socket.
            let quiet = !sending && !half_sent && self.in_flight.is_empty() && self.closing == 0;
            let stopping = self.state.stopping.clone();
            // Backpressure: with too much accepted and unanswered, stop
            // reading until calls finish.
            // Memory: a frame is read only while the budget has room for it.
            let reading = self.in_flight.len() + self.closing < QUEUED_PER_SOCKET
                && self.queued_bytes < self.state.limits.max_encoded
                && self.held.has_room_for(mux::MAX_FRAME as u64);
            let step = tokio::select! {
                msg = messages.next(), if reading => self.on_message(msg).await,
                Some((id, reply)) = self.done_rx.recv() => {
                    if id == 0 {
                        self.closing -= 1;
                    }
                    // A call cancelled after it finished sends nothing.
                    if let Some((_, weight)) = self.in_flight.remove(&id) {
                        self.queued_bytes -= weight;
                        if let Some(data) = reply {
                            let data = self.admit_reply(id, data);
                            self.outgoing_bytes += data.len() as u64;
                            self.outgoing.push_back(Outgoing { id, data, sent: 0 });
                        }
                    }
                    self.recount();
                    Ok(())
                }
                () = std::future::ready(()), if sending => self.send_slice().await,
                () = idle => Err(Some((CloseCode::Policy, "a message was left half-sent".into()))),
                () = stopping.wait(), if quiet => match messages.next().now_or_never() {
                    // A frame that came with the stop is read, not dropped:
                    // the socket closes once what it starts is answered.
                    Some(msg) if reading => self.on_message(msg).await,
                    _ => Err(Some((CloseCode::Away, crate::SHUTTING_DOWN.into()))),
                },
                // Not reading for want of budget: look again soon (the bytes
                // may be freed by other sockets, which do not wake this one).
                () = tokio::time::sleep(BUDGET_RETRY), if !reading => Ok(()),
            };
            if let Err(stop) = step {
                break stop;
            }
        };
        for (_, (task, _)) in self.in_flight.drain() {
            task.abort();
        }
        self.held.force(0);
        if let Some((code, reason)) = stop {
            let close = self.session.close(close_reason(code, reason));
            let _ = tokio::time::timeout(Duration::from_secs(5), close).await;
        }
    }

    /// Charges what the socket holds now; bytes already here are counted
    /// even past the budget (reading stops until they are gone).
    fn recount(&mut self) {
        self.held.force(self.reassembler.buffered() + self.queued_bytes + self.outgoing_bytes);
    }

    /// A finished call's reply, or, when it would pass the memory budget, a
    /// small error reply in its place (the client is told, nothing is held).
    fn admit_reply(&mut self, id: u64, data: Bytes) -> Bytes {
        let holding = self.reassembler.buffered() + self.queued_bytes + self.outgoing_bytes;
        match self.held.resize(holding + data.len() as u64) {
            Ok(()) => data,
            Err(e) => {
                tracing::warn!(user = %self.user.name, id, "reply refused: {e}");
                let outcome = Outcome::Err(ksrpc_transport::over_budget(&e));
                Bytes::from(native::encode_compressed(&ServerMessage::Reply { id, outcome }))
            }
        }
    }

    /// Sends the next slice of the reply at the front, then moves it to the
    /// back if more remains.
    async fn send_slice(&mut self) -> Result<(), Stop> {
        let Some(mut out) = self.outgoing.pop_front() else { return Ok(()) };
        let end = (out.sent + mux::SLICE).min(out.data.len());
        let total = (out.sent == 0 && end < out.data.len()).then_some(out.data.len() as u64);
        let frame = mux::frame(Header { id: out.id, fin: end == out.data.len(), total }, &out.data[out.sent..end]);
        // A peer that stops reading must not pin this socket's calls and
        // replies forever.
        match tokio::time::timeout(self.state.send_timeout, self.session.binary(frame)).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return Err(None),
            Err(_) => return Err(Some((CloseCode::Policy, "the client stopped reading".into()))),
        }
        self.outgoing_bytes -= (end - out.sent) as u64;
        out.sent = end;
        if out.sent < out.data.len() {
            self.outgoing.push_back(out);
        }
        self.recount();
        Ok(())
    }

    async fn on_message(
        &mut self,
        msg: Option<Result<AggregatedMessage, actix_ws::ProtocolError>>,
    ) -> Result<(), Stop> {
        match msg {
            None => Err(None),
            Some(Err(e)) => {
                let code =
                    if matches!(e, actix_ws::ProtocolError::Overflow) { CloseCode::Size } else { CloseCode::Protocol };
                Err(Some((code, e.to_string())))
            }
            Some(Ok(AggregatedMessage::Binary(frame))) => self.on_frame(&frame).await,
            Some(Ok(AggregatedMessage::Text(_))) => {
                Err(Some((CloseCode::Unsupported, "the v2 socket carries binary frames only".into())))
            }
            Some(Ok(AggregatedMessage::Ping(p))) => self.session.pong(&p).await.map_err(|_| None),
            Some(Ok(AggregatedMessage::Pong(_))) => Ok(()),
            Some(Ok(AggregatedMessage::Close(_))) => Err(Some((CloseCode::Normal, String::new()))),
        }
    }

    /// Sends `Refused` on stream 0, then stops with `code`.
    async fn refuse(&mut self, code: CloseCode, reason: String) -> Result<(), Stop> {
        tracing::warn!(user = %self.user.name, "v2 websocket refused: {reason}");
        let message = native::encode_compressed(&ServerMessage::Refused { reason: reason.clone() });
        for frame in mux::frames(0, &Bytes::from(message)) {
            if self.session.binary(frame).await.is_err() {
                return Err(None);
            }
        }
        Err(Some((code, reason)))
    }

    async fn on_frame(&mut self, frame: &[u8]) -> Result<(), Stop> {
        self.last_frame = Instant::now();
        let pushed = match self.reassembler.push(frame) {
            Ok(p) => p,
            Err(e) => {
                return self.refuse(CloseCode::from(ksrpc_transport::mux_refusal(&e)), e.to_string()).await;
            }
        };
        self.recount();
        let Some(wire) = pushed.message else { return Ok(()) };
        let weight = wire.len() as u64;
        let limits = self.state.limits;
        // The message is decoded under a reservation of its own, held until
        // it is accepted below (then counted in `queued_bytes`). While the
        // budget has no room for it the socket waits (and reads nothing);
        // only a wait beyond the half-sent idle time closes it.
        let mut decoding = self.state.budget.reservation(&self.user.name);
        let charge = ksrpc_transport::decode_charge(&wire, limits);
        let waiting = Instant::now();
        while let Err(e) = decoding.resize(charge) {
            if waiting.elapsed() > HALF_SENT_IDLE {
                let e = TransportError::from(e);
                return Err(Some((CloseCode::from(e.close_code()), e.to_string())));
            }
            tokio::time::sleep(BUDGET_RETRY).await;
        }
        let decoded = match ksrpc_transport::decode_client_message(wire, limits, &mut decoding).await {
            Ok(decoded) => decoded,
            Err(e) => return Err(Some((CloseCode::from(e.close_code()), e.to_string()))),
        };
        drop(decoding);
        let message = match decoded {
            Ok(m) => m,
            Err(e) => {
                let (_, code) = ksrpc_transport::native_refusal(&e);
                return self.refuse(CloseCode::from(code), e.to_string()).await;
            }
        };
        if let ClientMessage::Cancel { id } = message {
            self.cancel(id);
            return Ok(());
        }
        if let ClientMessage::Call { id: 0, .. } | ClientMessage::Next { id: 0, .. } = message {
            return self.refuse(CloseCode::Policy, "request id 0 is reserved".into()).await;
        }
        let Some((id, chain)) = message.into_work() else { return Ok(()) };
        if id != 0 && self.in_flight.contains_key(&id) {
            return self.refuse(CloseCode::Policy, format!("request id {id} is already in flight")).await;
        }
        let task = actix_web::rt::spawn(run_call(
            self.state.clone(),
            (self.user.clone(), self.caller.clone()),
            self.permits.clone(),
            (id, weight),
            chain,
            self.done_tx.clone(),
        ));
        if id == 0 {
            self.closing += 1;
        } else {
            self.in_flight.insert(id, (task.abort_handle(), weight));
            self.queued_bytes += weight;
        }
        self.recount();
        Ok(())
    }

    /// Stops call `id`: aborting its task drops the executor's future, which
    /// cancels the call. A reply not started is dropped; one already partly
    /// sent is finished (the peer's reassembler would otherwise hold its
    /// first slices forever), and the peer discards it.
    fn cancel(&mut self, id: u64) {
        if let Some((task, weight)) = self.in_flight.remove(&id) {
            task.abort();
            self.queued_bytes -= weight;
        }
        let mut dropped = 0u64;
        self.outgoing.retain(|o| {
            let keep = o.id != id || o.sent > 0;
            if !keep {
                dropped += o.data.len() as u64;
            }
            keep
        });
        self.outgoing_bytes -= dropped;
        self.reassembler.forget(id);
        self.recount();
    }
}

/// Runs one call and hands its encoded reply to the socket's writer.
async fn run_call(
    state: Arc<ServerState>,
    (user, caller): (Arc<User>, Caller),
    permits: Arc<Semaphore>,
    (id, bytes_in): (u64, u64),
    chain: ksrpc_core::CallChain<native::Value>,
    done: mpsc::UnboundedSender<Finished>,
) {
    let Ok(_permit) = permits.acquire_owned().await else {
        let _ = done.send((id, None));
        return;
    };
    let started = Instant::now();
    let summary = chain.summary().to_string();
    let (mark, store) = match cached::native_begin(&state, &user, &chain).await {
        cached::NativeStart::Hit(entry) => {
            let reply = match cached::native_hit(id, entry).await {
                Ok(bytes) => Bytes::from(bytes),
                Err(e) => internal_error(id, e.to_string()),
            };
            let stats = CallStats::hit(&summary, bytes_in, reply.len() as u64);
            log_call("native ws call", &caller, stats, started);
            let _ = done.send((id, Some(reply)));
            return;
        }
        cached::NativeStart::Run(mark, store) => (mark, store),
    };
    let outcome = match state.executor.call_native(NativeRequest { user: user.clone(), chain }).await {
        Ok(outcome) => outcome,
        Err(e) => Outcome::Err(exec_error(&e)),
    };
    let status = if matches!(outcome, Outcome::Err(_)) { 500 } else { 200 };
    let call_outcome = outcome_of(&outcome);
    let mark = if status == 200 { mark } else { CacheMark::Skip };
    if id == 0 {
        // CloseHandle: nobody waits for an answer.
        let _ = done.send((0, None));
        return;
    }
    let reply = match cached::native_reply(&state, id, outcome, store, &summary).await {
        Ok(bytes) => Bytes::from(bytes),
        Err(e) => internal_error(id, e.to_string()),
    };
    let stats = CallStats {
        summary: &summary,
        status,
        outcome: &call_outcome,
        cache: mark,
        bytes_in,
        bytes_out: reply.len() as u64,
    };
    log_call("native ws call", &caller, stats, started);
    let _ = done.send((id, Some(reply)));
}

/// The reply to `id` when its encoding failed.
fn internal_error(id: u64, message: String) -> Bytes {
    let error = RemoteError { kind: "InternalError".into(), message, traceback: String::new() };
    Bytes::from(native::encode_compressed(&ServerMessage::Reply { id, outcome: Outcome::Err(error) }))
}

/// A call that never ran, as the error its caller sees.
fn exec_error(e: &ExecError) -> RemoteError {
    let kind = match e {
        ExecError::BadRequest { .. } => "BadRequest",
        ExecError::Overloaded(_) => "Overloaded",
        ExecError::ShuttingDown => "ShuttingDown",
        ExecError::Internal(_) => "InternalError",
    };
    RemoteError { kind: kind.into(), message: e.to_string(), traceback: String::new() }
}
