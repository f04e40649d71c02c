//! The client's one error type.

use std::time::Duration;

use ksrpc_core::native::RemoteError;

/// Every way a call can fail.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The call ran and raised on the server.
    #[error("{}: {}", .0.kind, .0.message)]
    Remote(RemoteError),
    /// The server could not read a message (another protocol version,
    /// malformed bytes) and ended the exchange.
    #[error("the server refused the message: {0}")]
    Refused(String),
    /// Wrong user or password.
    #[error("wrong user or password (HTTP 401)")]
    Unauthorized,
    /// The server refused the request's timestamp: the clocks differ by more
    /// than the server's window. Holds the server's explanation (both clocks
    /// and the window) when it sent one.
    #[error("the server refused the request's timestamp (HTTP 403): {0}")]
    Forbidden(String),
    /// Any other HTTP status.
    #[error("HTTP {status}: {body}")]
    Http {
        /// The status.
        status: u16,
        /// The start of the body.
        body: String,
    },
    /// Connecting or talking to the server failed.
    #[error("connection: {0}")]
    Connection(String),
    /// The call took longer than its timeout and was cancelled.
    #[error("no reply within {0:?}; the call was cancelled")]
    Timeout(Duration),
    /// The server's reply could not be read.
    #[error("protocol: {0}")]
    Protocol(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The result does not fit the type asked for.
    #[error("the result does not fit the requested type: {0}")]
    Deserialize(String),
    /// The result is not an Arrow table, or not a valid one.
    #[error("arrow: {0}")]
    Arrow(String),
    /// The URL is not one the client can use.
    #[error("bad URL {0}")]
    Url(String),
}

impl Error {
    /// The server-side exception, when the call raised.
    pub fn remote(&self) -> Option<&RemoteError> {
        match self {
            Error::Remote(e) => Some(e),
            _ => None,
        }
    }
}
