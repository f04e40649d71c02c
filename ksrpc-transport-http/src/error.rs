//! Every way an HTTP request fails, mapped to a status in one place.

use actix_web::http::{header, StatusCode};
use actix_web::{HttpResponse, ResponseError};
use ksrpc_core::{CodecError, ExecError};

/// A failed HTTP request.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// Timestamp missing, not finite or outside the window (403, as the
    /// original, with the reason in the body).
    #[error("Forbidden: {0}")]
    Forbidden(#[from] ksrpc_core::auth::TimestampError),
    /// Credentials missing, malformed or wrong (401 + `WWW-Authenticate`).
    #[error("Unauthorized")]
    Unauthorized,
    /// This client address already has as many logins being verified as it
    /// may (429 + `Retry-After`).
    #[error("too many logins in progress from this address; retry shortly")]
    Throttled,
    /// The body is not valid chunked-zlib framing or the request pickle is
    /// not a valid call (400).
    #[error("bad request: {0}")]
    BadRequest(String),
    /// The body or its decoded payload exceeds a limit (413).
    #[error("payload too large: {0}")]
    TooLarge(String),
    /// The body sent nothing for this many seconds (408).
    #[error("the request body sent nothing for {0} s (limits.body_idle_timeout)")]
    BodyIdle(f64),
    /// The memory budget of bytes in flight (the user's or the server's) is
    /// spent (503 + `Retry-After`).
    #[error("busy: {0}")]
    OverBudget(#[from] ksrpc_core::BudgetError),
    /// Too many calls in flight (503).
    #[error("busy: {0}")]
    Overloaded(String),
    /// The server is shutting down (503).
    #[error("the server is shutting down")]
    ShuttingDown,
    /// A server bug (500).
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<CodecError> for TransportError {
    fn from(e: CodecError) -> Self {
        match e {
            CodecError::EncodedTooLarge { .. }
            | CodecError::DecodedTooLarge { .. }
            | CodecError::SliceTooLarge { .. }
            | CodecError::SliceInflatesTooMuch { .. } => TransportError::TooLarge(e.to_string()),
            CodecError::Cancelled | CodecError::Compress(_) => TransportError::Internal(e.to_string()),
            _ => TransportError::BadRequest(e.to_string()),
        }
    }
}

impl From<ExecError> for TransportError {
    fn from(e: ExecError) -> Self {
        match e {
            ExecError::BadRequest { message, .. } => TransportError::BadRequest(message),
            ExecError::Overloaded(m) => TransportError::Overloaded(m),
            ExecError::ShuttingDown => TransportError::ShuttingDown,
            ExecError::Internal(m) => TransportError::Internal(m),
        }
    }
}

impl TransportError {
    /// Whether this refusal can come while the request body is still
    /// arriving, and the rest of it should be read (and dropped) before the
    /// answer: a framing error. Size limits, the memory budget and a silent
    /// client are answered at once, and the connection closed.
    pub fn ends_body_early(&self) -> bool {
        matches!(self, TransportError::BadRequest(_))
    }
}

impl ResponseError for TransportError {
    fn status_code(&self) -> StatusCode {
        match self {
            TransportError::Forbidden(_) => StatusCode::FORBIDDEN,
            TransportError::Unauthorized => StatusCode::UNAUTHORIZED,
            TransportError::Throttled => StatusCode::TOO_MANY_REQUESTS,
            TransportError::BadRequest(_) => StatusCode::BAD_REQUEST,
            TransportError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            TransportError::BodyIdle(_) => StatusCode::REQUEST_TIMEOUT,
            TransportError::Overloaded(_) | TransportError::OverBudget(_) | TransportError::ShuttingDown => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            TransportError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn error_response(&self) -> HttpResponse {
        let mut res = HttpResponse::build(self.status_code());
        res.insert_header((header::CONTENT_TYPE, "text/plain; charset=utf-8"));
        if matches!(self, TransportError::Unauthorized) {
            res.insert_header((header::WWW_AUTHENTICATE, r#"Basic realm="Restricted Area""#));
        }
        // The body was not read to its end (too large, over budget, silent): the
        // connection cannot be reused.
        if matches!(self, TransportError::TooLarge(_) | TransportError::BodyIdle(_) | TransportError::OverBudget(_)) {
            res.force_close();
        }
        if matches!(self, TransportError::Throttled | TransportError::OverBudget(_)) {
            res.insert_header((header::RETRY_AFTER, "1"));
        }
        res.body(self.to_string())
    }
}
