//! The ksrpc server as a library: configuration, users and the HTTP/WS
//! server around a [`PyExecutor`].
//!
//! Two front ends start it the same way: the `ksrpc-server` binary
//! (`main.rs`, an embedded interpreter, its own signal handlers) and the
//! `ksrpc_rs` Python extension (`ksrpc-pyext`, the interpreter that imported
//! it, the host's signals). Only what differs between them is a parameter
//! ([`Signals`], and [`PyExecutor::start`] or
//! [`PyExecutor::start_in_host`]).
//!
//! [`PyExecutor`]: ksrpc_py::PyExecutor
//! [`PyExecutor::start`]: ksrpc_py::PyExecutor::start
//! [`PyExecutor::start_in_host`]: ksrpc_py::PyExecutor::start_in_host

pub mod config;
mod run;
pub mod tls;
mod users;

pub use config::{Config, Overrides};
pub use run::{start, Running, Signals};
pub use users::{build_users, hash_password_asked, hash_password_from, init_logging, GeneratedAdmin, DEFAULT_RULES};
