//! ksrpc-core: everything of ksrpc that is neither Python nor a transport.
//!
//! - [`chain`]: the call-chain AST shared by the compat and native protocols.
//! - [`rules`]: `fnmatch`-exact module rules, first match wins, default deny.
//! - [`auth`]: users, argon2id passwords, Basic auth and timestamp checks.
//! - [`budget`]: the memory budget of bytes in flight, per user and server-wide.
//! - [`codec`]: the [`codec::Codec`] trait, chunked zlib (0.8.1 framing) and zstd.
//! - [`compat`]: replies the server must build without Python.
//! - [`executor`]: the trait transports call to run a request.
//! - [`native`]: the native protocol's `Value` and messages (postcard, versioned).
//! - [`mux`]: slices of many native messages interleaved on one WebSocket.
//! - [`pickle_scan`]: the static request-pickle scan behind the executor's fast path.
//!
//! This crate must not depend on actix, pyo3, reqwest or a tokio runtime
//! (a tidy test in `tests/tidy.rs` enforces it).

pub mod auth;
pub mod budget;
pub mod chain;
pub mod codec;
pub mod compat;
pub mod executor;
pub mod mux;
pub mod native;
pub mod pickle_scan;
pub mod rules;

pub use auth::{AuthError, Peer, User, UserStore};
pub use budget::{BudgetError, MemoryBudget, Reservation};
pub use chain::{Args, Call, CallChain};
pub use codec::{ChunkedZlib, Codec, CodecError, Level, Limits, Zstd};
pub use executor::{CallOutcome, ChainSeen, CompatReply, CompatRequest, ExecError, Executor, NativeRequest};
pub use rules::{Pattern, RuleSet};
