//! The one per-call log line of every protocol and transport, and who a
//! call came from.

use std::time::Instant;

use ksrpc_core::{native, CallOutcome, CompatReply};

use crate::cached::CacheMark;

/// The client's address as the server believes it (the connection's peer,
/// or what a trusted proxy says; see [`crate::forwarded`]); `-` unknown.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClientIp(pub Option<std::net::IpAddr>);

impl std::fmt::Display for ClientIp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(ip) => write!(f, "{ip}"),
            None => f.write_str("-"),
        }
    }
}

/// Who made a call: the user and the client's address.
#[derive(Clone, Debug)]
pub struct Caller {
    /// The authenticated user's name.
    pub user: String,
    /// Where the call came from.
    pub peer: ClientIp,
}

/// How one call went, for [`log_call`].
#[derive(Debug)]
pub struct CallStats<'a> {
    /// The chain, with argument counts and no values.
    pub summary: &'a str,
    /// The reply's status (200, or 500 when the call raised).
    pub status: u16,
    /// How the call ended.
    pub outcome: &'a CallOutcome,
    /// The result cache's part.
    pub cache: CacheMark,
    /// Request bytes on the wire.
    pub bytes_in: u64,
    /// Reply bytes on the wire.
    pub bytes_out: u64,
}

impl<'a> CallStats<'a> {
    /// The stats of a compat call answered with `reply`.
    pub fn of_reply(reply: &'a CompatReply, cache: CacheMark, bytes_in: u64, bytes_out: u64) -> Self {
        CallStats { summary: &reply.summary, status: reply.status, outcome: &reply.outcome, cache, bytes_in, bytes_out }
    }

    /// The stats of a call answered from the result cache.
    pub fn hit(summary: &'a str, bytes_in: u64, bytes_out: u64) -> Self {
        CallStats { summary, status: 200, outcome: &CallOutcome::Ok, cache: CacheMark::Hit, bytes_in, bytes_out }
    }
}

/// The one per-call log line of every protocol and transport: `what` names
/// the protocol (`call`: 0.8.1, `native call`, `native ws call`), then user,
/// peer, chain (argument counts only), reply status, outcome (`ok`, `end` of
/// a generator, `refused` by the rules (with `reason`, naming the rule),
/// `timeout`, `error:<Type>`), the result cache's part, bytes in and out,
/// milliseconds. Refused and timed out calls are warnings: an admin acts on
/// them.
pub fn log_call(what: &'static str, caller: &Caller, call: CallStats<'_>, started: Instant) {
    let ms = started.elapsed().as_millis() as u64;
    let CallStats { summary, status, outcome, cache, bytes_in, bytes_out } = call;
    macro_rules! line {
        ($level:ident; $($extra:tt)*) => {
            tracing::$level!(
                user = %caller.user,
                peer = %caller.peer,
                chain = %summary,
                status,
                outcome = %outcome,
                $($extra)*
                cache = %cache,
                bytes_in,
                bytes_out,
                ms,
                "{what}"
            )
        };
    }
    match outcome {
        CallOutcome::Refused(reason) => line!(warn; reason = %reason,),
        CallOutcome::Timeout => line!(warn;),
        _ => line!(info;),
    }
}

/// How a native call ended.
pub fn outcome_of(outcome: &native::Outcome) -> CallOutcome {
    match outcome {
        native::Outcome::Err(e) => CallOutcome::of_exception(&e.kind, &e.message),
        native::Outcome::Exhausted => CallOutcome::End,
        _ => CallOutcome::Ok,
    }
}
