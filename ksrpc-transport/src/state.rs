//! The state every route of both transports shares (`web::Data<ServerState>`),
//! and the registry of native HTTP calls a `Cancel` can reach.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ksrpc_core::auth::UserStore;
use ksrpc_core::budget::MemoryBudget;
use ksrpc_core::codec::{ChunkedZlib, Limits};
use ksrpc_core::Executor;
use tokio::sync::oneshot;

use crate::{forwarded, Stopping};

/// Longest a reply's next piece may wait for a client that stopped reading,
/// unless `limits.send_timeout` says otherwise.
pub const SEND_TIMEOUT: Duration = Duration::from_secs(300);

/// What every route needs; registered once as `web::Data<ServerState>`.
#[derive(Clone)]
pub struct ServerState {
    /// Users and their rules.
    pub users: Arc<UserStore>,
    /// Runs the calls.
    pub executor: Arc<dyn Executor>,
    /// The compat framing, with the configured level and slice size.
    pub codec: ChunkedZlib,
    /// Limits on one request body.
    pub limits: Limits,
    /// Seconds `X-Timestamp` may differ from now; `<= 0` disables the check.
    pub timestamp_window: f64,
    /// Native HTTP calls in flight, for `Cancel`.
    pub in_flight: InFlight,
    /// Bytes of requests and replies in flight, per user and in total.
    pub budget: Arc<MemoryBudget>,
    /// A request body that sends nothing for this long is answered 408.
    pub body_idle: Duration,
    /// A reply piece a client does not take for this long drops the client
    /// (it stopped reading); see [`SEND_TIMEOUT`] for the default.
    pub send_timeout: Duration,
    /// The result cache, when `[cache] enabled` (see [`cached`]).
    pub cache: Option<Arc<ksrpc_cache::ResultCache>>,
    /// Proxies whose `X-Forwarded-For` names the client
    /// (`server.trusted_proxies`; see [`forwarded`]).
    pub trusted_proxies: Vec<forwarded::Cidr>,
    /// Set when the server starts stopping (see [`stopping`]).
    pub stopping: Stopping,
}

/// Native HTTP calls in flight by (user, request id), so that a `Cancel`
/// posted on another connection stops one: a server cannot hear an HTTP
/// client leave while its call runs, so the client says so.
#[derive(Clone, Debug, Default)]
pub struct InFlight(Arc<Mutex<HashMap<CallKey, Registration>>>);

/// A registration's token and the sender that cancels its call.
type Registration = (u64, oneshot::Sender<()>);

/// Tells one registration from a later one of the same key.
static NEXT_TOKEN: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// (user name, request id).
type CallKey = (String, u64);

impl InFlight {
    /// Registers `user`'s call `id`: the receiver fires on a `Cancel`, the
    /// guard unregisters it when dropped. `None` when that id is in flight.
    pub fn register(&self, user: &str, id: u64) -> Option<(oneshot::Receiver<()>, InFlightGuard)> {
        let mut map = self.0.lock().expect("in-flight map poisoned");
        let key = (user.to_owned(), id);
        if map.contains_key(&key) {
            return None;
        }
        let (tx, rx) = oneshot::channel();
        let token = NEXT_TOKEN.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        map.insert(key.clone(), (token, tx));
        Some((rx, InFlightGuard { map: self.clone(), key, token }))
    }

    /// Stops `user`'s call `id`; false when there is none.
    pub fn cancel(&self, user: &str, id: u64) -> bool {
        let entry = self.0.lock().expect("in-flight map poisoned").remove(&(user.to_owned(), id));
        entry.is_some_and(|(_, tx)| tx.send(()).is_ok())
    }
}

/// Unregisters a call when its handler ends, however it ends.
#[derive(Debug)]
pub struct InFlightGuard {
    map: InFlight,
    key: (String, u64),
    token: u64,
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        // Only our own registration: after a Cancel, a new call may have
        // registered under the same key.
        let mut map = self.map.0.lock().expect("in-flight map poisoned");
        if map.get(&self.key).is_some_and(|(token, _)| *token == self.token) {
            map.remove(&self.key);
        }
    }
}

impl std::fmt::Debug for ServerState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerState")
            .field("codec", &self.codec)
            .field("limits", &self.limits)
            .field("timestamp_window", &self.timestamp_window)
            .field("in_flight", &self.in_flight)
            .field("budget", &self.budget)
            .field("body_idle", &self.body_idle)
            .field("send_timeout", &self.send_timeout)
            .field("stopping", &self.stopping.is_set())
            .finish()
    }
}
