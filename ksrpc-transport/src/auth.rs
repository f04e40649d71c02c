//! Who is calling: the pre-body checks every route passes (the `X-Timestamp`
//! window, then HTTP Basic auth), the authenticated user and client address
//! they leave on the request, and the bound on failed-login log lines.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::middleware::Next;
use actix_web::{web, HttpMessage, HttpRequest};
use ksrpc_core::auth::{check_timestamp, parse_basic, AuthError, Peer, User, UserStore};

use crate::{forwarded, Caller, ClientIp, ServerState, TransportError};

fn now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

/// The pre-body checks, as actix middleware (`middleware::from_fn(guard)`).
/// Order as in the original: timestamp (403), then Basic auth (401).
pub async fn guard(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let state = req
        .app_data::<web::Data<ServerState>>()
        .ok_or_else(|| TransportError::Internal("ServerState is not registered".into()))?
        .clone();
    let header = |name: &str| req.headers().get(name).map(|v| v.as_bytes());
    check_timestamp(header("X-Timestamp"), now(), state.timestamp_window).map_err(TransportError::Forbidden)?;
    let (name, password) = parse_basic(header("Authorization")).map_err(|_| TransportError::Unauthorized)?;
    let ip = forwarded::client_ip(req.peer_addr().map(|a| a.ip()), header("X-Forwarded-For"), &state.trusted_proxies);
    req.extensions_mut().insert(ClientIp(ip));
    let user = authenticate(&state.users, name, password, Peer::of(ip)).await?;
    req.extensions_mut().insert(user);
    let mut res = next.call(req).await?;
    // Stopping: no connection is kept alive for another request.
    if state.stopping.is_set() && res.status() != actix_web::http::StatusCode::SWITCHING_PROTOCOLS {
        res.response_mut().head_mut().set_connection_type(actix_web::http::ConnectionType::Close);
    }
    Ok(res)
}

/// Verifies credentials: a cached success costs a keyed hash; a miss runs
/// argon2 on the blocking pool, never on an async worker. A failure is
/// logged and its 401 held back by the store's penalty for (name, peer),
/// waited out here without holding a thread or a verification place.
async fn authenticate(
    users: &Arc<UserStore>,
    name: String,
    password: String,
    peer: Peer,
) -> Result<Arc<User>, TransportError> {
    if let Some(user) = users.verify_cached(&name, &password) {
        return Ok(user);
    }
    let store = users.clone();
    let user = name.clone();
    let verified = web::block(move || store.verify_from(&user, &password, peer))
        .await
        .map_err(|e| TransportError::Internal(Box::new(e)))?;
    match verified {
        Ok(user) => Ok(user),
        Err(AuthError::Throttled) => {
            tracing::warn!(user = ?name, %peer, reason = "throttled", "login refused: too many logins in progress from this address");
            Err(TransportError::Throttled)
        }
        Err(AuthError::Busy) => {
            tracing::warn!(user = ?name, %peer, reason = "busy", "login refused: too many logins in progress");
            Err(TransportError::Overloaded("too many logins in progress; retry shortly".into()))
        }
        Err(_) => {
            let delay = users.penalty(&name, peer);
            // A flood must not fill the disk: past the limiter's burst only
            // a count is logged.
            match FAILED_LOGINS.admit(Instant::now()) {
                LogAdmit::Log { unlogged } => {
                    if unlogged > 0 {
                        tracing::warn!(
                            count = unlogged,
                            "failed logins not logged (at most {} per {} s)",
                            FAILED_LOGINS.burst,
                            FAILED_LOGINS.window.as_secs()
                        );
                    }
                    tracing::warn!(user = ?name, %peer, reason = "wrong password or unknown user", delay_ms = delay.as_millis() as u64, "login failed");
                }
                LogAdmit::Skip => {}
            }
            if !delay.is_zero() {
                actix_web::rt::time::sleep(delay).await;
            }
            Err(TransportError::Unauthorized)
        }
    }
}

/// The authenticated user that [`guard`] stored on the request.
pub fn user_of(req: &HttpRequest) -> Result<Arc<User>, TransportError> {
    req.extensions().get::<Arc<User>>().cloned().ok_or(TransportError::Unauthorized)
}

/// The user and client address [`guard`] stored on the request.
pub fn caller_of(req: &HttpRequest) -> Result<(Arc<User>, Caller), TransportError> {
    let user = user_of(req)?;
    let peer = req.extensions().get::<ClientIp>().copied().unwrap_or(ClientIp(None));
    let caller = Caller { user: user.name.clone(), peer };
    Ok((user, caller))
}

/// A bound on log lines of one kind: at most `burst` per `window`; the rest
/// are counted and the count is logged with the next line let through.
#[derive(Debug)]
pub struct LogLimiter {
    /// Lines let through per window.
    pub burst: u32,
    /// The window.
    pub window: Duration,
    /// (window start, lines logged in it, lines skipped since the last one logged)
    state: Mutex<Option<(Instant, u32, u64)>>,
}

/// What [`LogLimiter::admit`] decided.
#[derive(Debug, PartialEq, Eq)]
pub enum LogAdmit {
    /// Log the line; `unlogged` lines were skipped before it.
    Log {
        /// Lines skipped since the last one logged.
        unlogged: u64,
    },
    /// Skip it (counted).
    Skip,
}

impl LogLimiter {
    /// A limiter letting `burst` lines through per `window`.
    pub const fn new(burst: u32, window: Duration) -> LogLimiter {
        LogLimiter { burst, window, state: Mutex::new(None) }
    }

    /// Whether a line at `now` may be logged.
    pub fn admit(&self, now: Instant) -> LogAdmit {
        let mut state = self.state.lock().expect("log limiter poisoned");
        let (start, logged, skipped) = state.get_or_insert((now, 0, 0));
        if now.duration_since(*start) >= self.window {
            (*start, *logged) = (now, 0);
        }
        if *logged < self.burst {
            *logged += 1;
            LogAdmit::Log { unlogged: std::mem::take(skipped) }
        } else {
            *skipped += 1;
            LogAdmit::Skip
        }
    }
}

/// Failed logins: 20 lines per 10 s at most (a password-guessing flood of
/// any size costs a line per half second).
static FAILED_LOGINS: LogLimiter = LogLimiter::new(20, Duration::from_secs(10));

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_per_window_then_a_count_of_the_rest() {
        let limiter = LogLimiter::new(3, Duration::from_secs(10));
        let t0 = Instant::now();
        let admitted: Vec<LogAdmit> = (0..5).map(|i| limiter.admit(t0 + Duration::from_millis(i))).collect();
        assert_eq!(
            admitted[..3],
            [LogAdmit::Log { unlogged: 0 }, LogAdmit::Log { unlogged: 0 }, LogAdmit::Log { unlogged: 0 }]
        );
        assert_eq!(admitted[3..], [LogAdmit::Skip, LogAdmit::Skip]);
        // The next window lets lines through again, the first one with the count.
        assert_eq!(limiter.admit(t0 + Duration::from_secs(11)), LogAdmit::Log { unlogged: 2 });
        assert_eq!(limiter.admit(t0 + Duration::from_secs(12)), LogAdmit::Log { unlogged: 0 });
    }
}
