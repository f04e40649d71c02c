//! The boundary between transports and whatever runs the calls.
//!
//! Transports see only this trait; the server plugs in the embedded-CPython
//! executor (`ksrpc-py`), tests plug in an in-memory one.

use std::sync::Arc;

use bytes::Bytes;

use crate::auth::User;
use crate::chain::CallChain;
use crate::native::{Outcome, Value};

/// One compat-protocol call: an authenticated user and the decoded request
/// pickle (not yet unpickled: that happens under the user's rules).
#[derive(Debug, Clone)]
pub struct CompatRequest {
    /// Who is calling; their rules decide what the call may reach.
    pub user: Arc<User>,
    /// The request payload after chunked-zlib decoding.
    pub payload: Bytes,
}

/// How a call ended, for the per-call log line (`outcome=`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallOutcome {
    /// A result, or a generator handle.
    Ok,
    /// A generator had no more items (the 0.8.1 client's `StopAsyncIteration`).
    End,
    /// The user's rules refused it (`PermissionError`): why.
    Refused(String),
    /// It ran past the call timeout (`TimeoutError`).
    Timeout,
    /// It raised: the exception's type name.
    Error(String),
}

impl CallOutcome {
    /// The outcome of a call that raised `kind` (an exception type name)
    /// with `message`.
    pub fn of_exception(kind: &str, message: &str) -> CallOutcome {
        match kind {
            "StopAsyncIteration" | "StopIteration" => CallOutcome::End,
            "PermissionError" => CallOutcome::Refused(message.chars().take(300).collect()),
            "TimeoutError" => CallOutcome::Timeout,
            other => CallOutcome::Error(other.to_owned()),
        }
    }
}

impl std::fmt::Display for CallOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallOutcome::Ok => f.write_str("ok"),
            CallOutcome::End => f.write_str("end"),
            CallOutcome::Refused(_) => f.write_str("refused"),
            CallOutcome::Timeout => f.write_str("timeout"),
            CallOutcome::Error(kind) => write!(f, "error:{kind}"),
        }
    }
}

/// The executor's answer: a pickled reply dict, ready to be encoded.
#[derive(Debug, Clone)]
pub struct CompatReply {
    /// The `status` inside the reply (200, or 500 when the call raised).
    pub status: u16,
    /// The pickled reply dict.
    pub body: Bytes,
    /// The chain for logs, with argument counts and no values.
    pub summary: String,
    /// The dotted chain (`module.attr.attr`) when the reply may be cached:
    /// a plain result of a call that passed no chain as an argument (never
    /// an error or a generator). The result cache matches its ttl patterns
    /// on it.
    pub cache_chain: Option<String>,
    /// How the call ended (the reply's `status` is 500 for all but `Ok`).
    pub outcome: CallOutcome,
}

/// One native-protocol call: an authenticated user and an explicit chain
/// (`chain.handle` set: advance that generator handle instead).
#[derive(Debug, Clone)]
pub struct NativeRequest {
    /// Who is calling.
    pub user: Arc<User>,
    /// What to run.
    pub chain: CallChain<Value>,
}

/// Every way an executor can fail to produce a normal reply.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// The request could not be decoded or validated (bad pickle, refused
    /// global, wrong shape). `reply` is a pickled 500 reply describing it,
    /// for transports that cannot send a status code (WebSocket).
    #[error("bad request: {message}")]
    BadRequest {
        /// Why, in one line.
        message: String,
        /// A pickled 500 reply with the same message.
        reply: Bytes,
        /// The chain if it could be read, for logs.
        summary: String,
    },
    /// Too many calls in flight (for this user or in total).
    #[error("too many calls in flight: {0}")]
    Overloaded(String),
    /// The executor is shutting down.
    #[error("the server is shutting down")]
    ShuttingDown,
    /// The executor itself failed (a bug, or the interpreter is gone).
    #[error("executor failure: {0}")]
    Internal(String),
}

/// Told a compat request's cache chain once the executor has read the
/// request, before the call runs: `Some(chain)` (`module.attr.attr`) when a
/// plain result of the call may be cached under that chain, `None` when its
/// reply never can be (a generator step, a chain among the arguments).
/// Called at most once, from the thread that read the request: it must be
/// quick and must not block. A request that does not read never calls it
/// (the callback is dropped when the call ends).
pub type ChainSeen = Box<dyn FnOnce(Option<&str>) + Send + 'static>;

/// Runs calls. Implementations must never block the calling async task's
/// thread: do the work elsewhere and await it.
#[async_trait::async_trait]
pub trait Executor: Send + Sync + 'static {
    /// Runs one compat-protocol call. A call that raises is still `Ok`
    /// (a reply with status 500); `Err` is for requests that never ran.
    /// Dropping the future tells the executor the client has gone away.
    async fn call_compat(&self, request: CompatRequest) -> Result<CompatReply, ExecError>;

    /// [`call_compat`](Executor::call_compat), calling `seen` with the
    /// request's cache chain as soon as it is known (the result cache lets
    /// identical requests stop waiting for this one when its chain is not
    /// cacheable). The default never calls `seen`.
    async fn call_compat_seen(&self, request: CompatRequest, seen: ChainSeen) -> Result<CompatReply, ExecError> {
        drop(seen);
        self.call_compat(request).await
    }

    /// Runs one native-protocol call. A call that raises is `Ok(Outcome::Err)`.
    async fn call_native(&self, request: NativeRequest) -> Result<Outcome, ExecError>;
}
