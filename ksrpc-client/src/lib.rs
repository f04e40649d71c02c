//! ksrpc-client: the Rust client of ksrpc's native protocol.
//!
//! Not written yet (issue 7 of the tracker). Until then, Python users keep
//! the unmodified `ksrpc==0.8.1` client, which this server speaks.
