//! ksrpc-transport: what the HTTP and the WebSocket transports share, so
//! neither depends on the other.
//!
//! - [`ServerState`]: the state every route reads (users, executor, codec,
//!   limits, memory budget, result cache, stopping flag).
//! - [`guard`]: the pre-body checks of every route (timestamp, then Basic
//!   auth) and [`caller_of`], the authenticated user they leave behind.
//! - [`TransportError`]: every refusal, mapped in one place to its HTTP
//!   status and its WebSocket close code.
//! - [`log_call`]: the one per-call log line.
//! - [`cached`]: the result cache on the call path of all four transports.
//! - [`encoding`]: when native (de)coding leaves the async worker;
//!   [`admit`]: replies against the memory budget.
//! - [`stopping`]: the flag that closes idle connections when the server stops.
//! - [`forwarded`]: the client address behind trusted proxies.

pub mod admit;
mod auth;
pub mod cached;
mod call_log;
pub mod encoding;
mod error;
pub mod forwarded;
mod state;
pub mod stopping;

pub use admit::{admit_compat_reply, outcome_weight, over_budget};
pub use auth::{caller_of, guard, user_of, LogAdmit, LogLimiter};
pub use call_log::{log_call, outcome_of, CallStats, Caller, ClientIp};
pub use encoding::{decode_charge, decode_client_message, encode_server_message, INLINE_DECODE};
pub use error::{close, mux_refusal, native_refusal, Cause, TransportError};
pub use state::{InFlight, InFlightGuard, ServerState, SEND_TIMEOUT};
pub use stopping::{StopTrigger, Stopping};
