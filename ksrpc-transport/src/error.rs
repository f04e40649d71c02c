//! Every way a request fails, mapped in one place to its HTTP status and to
//! the close code a WebSocket ends with.

use actix_web::http::{header, StatusCode};
use actix_web::{HttpResponse, ResponseError};
use ksrpc_core::mux::MuxError;
use ksrpc_core::native::NativeError;
use ksrpc_core::{CodecError, ExecError};

/// What caused a refusal: a typed error kept whole (`source()` reaches it),
/// or a message.
pub type Cause = Box<dyn std::error::Error + Send + Sync>;

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
    BadRequest(#[source] Cause),
    /// The body or its decoded payload exceeds a limit (413).
    #[error("payload too large: {0}")]
    TooLarge(#[source] Cause),
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
    Internal(#[source] Cause),
}

impl From<CodecError> for TransportError {
    fn from(e: CodecError) -> Self {
        match e {
            CodecError::EncodedTooLarge { .. }
            | CodecError::DecodedTooLarge { .. }
            | CodecError::SliceTooLarge { .. }
            | CodecError::SliceInflatesTooMuch { .. } => TransportError::TooLarge(Box::new(e)),
            CodecError::Cancelled | CodecError::Compress(_) => TransportError::Internal(Box::new(e)),
            _ => TransportError::BadRequest(Box::new(e)),
        }
    }
}

impl From<ExecError> for TransportError {
    fn from(e: ExecError) -> Self {
        match e {
            ExecError::BadRequest { message, .. } => TransportError::BadRequest(message.into()),
            ExecError::Overloaded(m) => TransportError::Overloaded(m),
            ExecError::ShuttingDown => TransportError::ShuttingDown,
            ExecError::Internal(m) => TransportError::Internal(m.into()),
        }
    }
}

/// WebSocket close codes (RFC 6455, section 7.4.1) a refusal ends a socket with.
pub mod close {
    /// 1002: the WebSocket framing of the native protocol is broken.
    pub const PROTOCOL: u16 = 1002;
    /// 1007: the message is not valid (bad framing or request).
    pub const INVALID: u16 = 1007;
    /// 1008: the message breaks a rule of the server (auth, a silent client).
    pub const POLICY: u16 = 1008;
    /// 1009: the message is too big.
    pub const SIZE: u16 = 1009;
    /// 1011: the server failed.
    pub const ERROR: u16 = 1011;
    /// 1012: the server is restarting (shutting down).
    pub const RESTART: u16 = 1012;
    /// 1013: try again later (busy, over the memory budget).
    pub const AGAIN: u16 = 1013;
}

/// How a native message this server cannot read (another protocol
/// version, bytes that do not decode) is refused: the HTTP status of
/// `POST /v2/call`'s answer, and the close code of `/v2/ws`; both send a
/// `Refused` message saying why first.
pub fn native_refusal(e: &NativeError) -> (StatusCode, u16) {
    match e {
        NativeError::UnsupportedVersion { .. } => (StatusCode::BAD_REQUEST, close::POLICY),
        _ => (StatusCode::BAD_REQUEST, close::INVALID),
    }
}

/// The close code of `/v2/ws` for frames that do not reassemble (an HTTP
/// request carries one message and no frames, so this is WebSocket only).
pub fn mux_refusal(e: &MuxError) -> u16 {
    match e {
        MuxError::MessageTooLarge { .. } | MuxError::BufferedTooLarge { .. } => close::SIZE,
        MuxError::TooManyStreams => close::POLICY,
        MuxError::Malformed(_) | MuxError::ReservedFlags(_) => close::PROTOCOL,
    }
}

impl TransportError {
    /// The WebSocket close code for this refusal: the socket's counterpart
    /// of [`ResponseError::status_code`].
    pub fn close_code(&self) -> u16 {
        match self {
            TransportError::Forbidden(_) | TransportError::Unauthorized | TransportError::BodyIdle(_) => close::POLICY,
            TransportError::BadRequest(_) => close::INVALID,
            TransportError::TooLarge(_) => close::SIZE,
            TransportError::Throttled | TransportError::Overloaded(_) | TransportError::OverBudget(_) => close::AGAIN,
            TransportError::ShuttingDown => close::RESTART,
            TransportError::Internal(_) => close::ERROR,
        }
    }

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

#[cfg(test)]
mod tests {
    use super::*;

    /// Each refusal has one HTTP status and one close code, and the two say
    /// the same thing.
    #[test]
    fn every_refusal_maps_to_a_status_and_a_close_code() {
        let budget = ksrpc_core::MemoryBudget::new(1, 1);
        let over = budget.reservation("u").resize(2).unwrap_err();
        let cases: Vec<(TransportError, u16, u16)> = vec![
            (TransportError::Unauthorized, 401, close::POLICY),
            (TransportError::Throttled, 429, close::AGAIN),
            (TransportError::BadRequest("x".into()), 400, close::INVALID),
            (TransportError::TooLarge("x".into()), 413, close::SIZE),
            (TransportError::BodyIdle(60.0), 408, close::POLICY),
            (TransportError::OverBudget(over), 503, close::AGAIN),
            (TransportError::Overloaded("x".into()), 503, close::AGAIN),
            (TransportError::ShuttingDown, 503, close::RESTART),
            (TransportError::Internal("x".into()), 500, close::ERROR),
        ];
        for (e, status, code) in cases {
            assert_eq!((e.status_code().as_u16(), e.close_code()), (status, code), "{e}");
        }
        // Codec errors: limits are 413 / 1009, bad framing 400 / 1007.
        let too_big = TransportError::from(CodecError::EncodedTooLarge { limit: 1 });
        assert_eq!((too_big.status_code().as_u16(), too_big.close_code()), (413, close::SIZE));
        let bad = TransportError::from(CodecError::MissingBorder { limit: 1 });
        assert_eq!((bad.status_code().as_u16(), bad.close_code()), (400, close::INVALID));
    }

    /// Native messages that do not read: 400 over HTTP; over a WebSocket
    /// 1008 for another version, 1007 for bad bytes.
    #[test]
    fn native_refusals_map_to_a_status_and_a_close_code() {
        let version = NativeError::UnsupportedVersion { got: 9 };
        assert_eq!(native_refusal(&version), (StatusCode::BAD_REQUEST, close::POLICY));
        let bad = NativeError::Malformed("x".into());
        assert_eq!(native_refusal(&bad), (StatusCode::BAD_REQUEST, close::INVALID));
        assert_eq!(mux_refusal(&MuxError::TooManyStreams), close::POLICY);
    }

    /// A codec error stays a typed error behind the refusal: `source()`
    /// reaches it, and the message the client reads is unchanged.
    #[test]
    fn the_codec_error_is_the_source() {
        use std::error::Error as _;
        let e = TransportError::from(CodecError::MissingBorder { limit: 7 });
        let source = e.source().and_then(|s| s.downcast_ref::<CodecError>());
        assert!(matches!(source, Some(CodecError::MissingBorder { limit: 7 })), "{e:?}");
        assert_eq!(e.to_string(), format!("bad request: {}", CodecError::MissingBorder { limit: 7 }));
    }
}
