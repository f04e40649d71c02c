//! Replies against the memory budget: what a reply holds until it is sent,
//! and the error reply a caller gets instead when it would pass the budget.

use ksrpc_core::native;
use ksrpc_core::{CompatReply, Reservation};

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
