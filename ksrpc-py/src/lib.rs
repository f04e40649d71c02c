//! ksrpc-py: the embedded-CPython executor.
//!
//! - [`interp`] starts the interpreter once, adds the configured venv and
//!   paths, and serves the server's own minimal `ksrpc` package and the
//!   executor's modules from memory (nothing is written to disk).
//! - [`PyExecutor`] implements the core [`Executor`](ksrpc_core::Executor)
//!   trait: calls run on a bounded pool of Python threads (never on a tokio
//!   or actix worker), coroutines on one asyncio loop thread (inside
//!   `ksrpc_executor`), with per-call timeouts, one queue per user served
//!   round robin and a cap on each user's running calls ([`fair`]).
//! - The Python half (the `python/ksrpc_executor/` package) decodes requests with a
//!   restricted unpickler, resolves chains under the user's rules and
//!   pickles replies.
//!
//! `PyErr` leaves this crate only from [`convert`], whose callers are
//! Python-facing (the wheel's client); the executor's failures become
//! [`ExecError`] or a pickled 500 reply.
//!
//! [`ExecError`]: ksrpc_core::ExecError

pub mod config;
pub mod convert;
mod fair;
mod gate;
pub mod interp;
mod pool;

pub use config::PythonConfig;
pub use interp::Host;
pub use pool::PyExecutor;

/// Errors of starting the executor.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The configured venv does not exist or has no site-packages.
    #[error("virtualenv {0}: {1}")]
    Venv(String, String),
    /// The venv was made by another Python minor than the one embedded.
    #[error("virtualenv {venv} is Python {venv_version}, but this server embeds Python {ours}; rebuild with PYO3_PYTHON pointing at a {venv_version} interpreter or use a {ours} venv")]
    VenvMismatch {
        /// The venv path.
        venv: String,
        /// Its Python version (`3.12`).
        venv_version: String,
        /// The embedded Python version.
        ours: String,
    },
    /// `python.venv` was set for a server running inside a Python process,
    /// whose packages are its own.
    #[error("python.venv = {0:?} makes no sense when the server runs inside your Python process: install packages into this interpreter (or start the `ksrpc-server` binary with that venv)")]
    HostVenv(String),
    /// Starting the executor's threads failed.
    #[error("starting the executor's threads: {0}")]
    Io(#[from] std::io::Error),
    /// Python raised while setting up (message and traceback).
    #[error("python start-up failed: {0}")]
    Python(String),
}
