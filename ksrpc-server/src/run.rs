//! The HTTP and WebSocket server on a thread of its own: started and
//! stopped the same way by the binary and by the Python extension.

use std::net::SocketAddr;
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use actix_web::dev::ServerHandle;
use actix_web::{middleware, web, App, HttpServer};
use anyhow::{anyhow, Context, Result};
use ksrpc_core::auth::UserStore;
use ksrpc_py::PyExecutor;
use ksrpc_transport::{guard, ServerState, StopTrigger, Stopping};

use crate::config::path_cut_by_client;
use crate::Config;

/// Who handles SIGINT and SIGTERM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Signals {
    /// The server (the binary): either signal stops it gracefully.
    Own,
    /// The host process (a notebook kernel, a script): the server installs
    /// no handler; the host stops it with [`Running::stop`].
    Host,
}

/// A server that accepts calls until stopped.
#[derive(Debug)]
pub struct Running {
    addrs: Vec<SocketAddr>,
    path: String,
    /// `http` or `https`.
    scheme: &'static str,
    handle: ServerHandle,
    /// Tells every connection the server is stopping.
    stop: StopTrigger,
    executor: PyExecutor,
    grace: Duration,
    thread: Option<JoinHandle<Result<()>>>,
}

type Ready = Result<(Vec<SocketAddr>, ServerHandle, StopTrigger)>;

/// Binds and starts serving on a new thread; returns once the server is
/// listening (and, with [`Signals::Own`], its signal handlers are in place)
/// or with the bind error, which names the address.
pub fn start(config: Config, users: UserStore, executor: PyExecutor, signals: Signals) -> Result<Running> {
    let path = config.server.path.clone();
    let scheme = if config.server.tls.is_some() { "https" } else { "http" };
    let grace = Duration::from_secs(config.server.shutdown_grace);
    let (tx, rx) = mpsc::channel::<Ready>();
    let server_executor = executor.clone();
    let thread = std::thread::Builder::new()
        .name("ksrpc-http".into())
        .spawn(move || actix_web::rt::System::new().block_on(serve(config, users, server_executor, signals, tx)))?;
    match rx.recv() {
        Ok(Ok((addrs, handle, stop))) => {
            Ok(Running { addrs, path, scheme, handle, stop, executor, grace, thread: Some(thread) })
        }
        Ok(Err(e)) => {
            let _ = thread.join();
            Err(e)
        }
        Err(_) => match thread.join() {
            Ok(Err(e)) => Err(e),
            _ => Err(anyhow!("the server thread ended before it listened")),
        },
    }
}

impl Running {
    /// The base URLs, as the 0.8.1 client takes them (`http://127.0.0.1:8080/api/v1`,
    /// `https://...` with `[server.tls]`).
    pub fn urls(&self) -> Vec<String> {
        self.addrs.iter().map(|a| format!("{}://{a}{}", self.scheme, self.path)).collect()
    }

    /// The bound addresses.
    pub fn addrs(&self) -> &[SocketAddr] {
        &self.addrs
    }

    /// Whether the server has stopped (a signal, or [`stop`](Self::stop)).
    pub fn is_finished(&self) -> bool {
        self.thread.as_ref().is_none_or(JoinHandle::is_finished)
    }

    /// Stops accepting connections, lets calls in flight finish (up to
    /// `server.shutdown_grace`, then the rest are cut: each is answered that
    /// the server is shutting down) and waits for the server thread. Never
    /// call it while attached to the interpreter: the calls it waits for
    /// need the GIL.
    pub fn stop(&mut self) -> Result<()> {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        rt.block_on(drain(&self.handle, &self.stop, &self.executor, self.grace, std::future::pending()));
        self.wait_thread()
    }

    /// [`stop`](Self::stop) without the grace: the calls in flight are cut
    /// at once (the host process is exiting).
    pub fn stop_now(&mut self) -> Result<()> {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        if rt.block_on(drain(
            &self.handle,
            &self.stop,
            &self.executor,
            self.grace,
            std::future::ready("the host process is exiting"),
        )) == Drained::Forced
        {
            // The connections still open are dropped with the process.
            return Ok(());
        }
        self.wait_thread()
    }

    /// Waits until the server stops by itself (a signal).
    pub fn wait(mut self) -> Result<()> {
        self.wait_thread()
    }

    fn wait_thread(&mut self) -> Result<()> {
        match self.thread.take() {
            Some(t) => t.join().map_err(|_| anyhow!("the server thread panicked"))?,
            None => Ok(()),
        }
    }
}

async fn serve(
    config: Config,
    users: UserStore,
    executor: PyExecutor,
    signals: Signals,
    ready: mpsc::Sender<Ready>,
) -> Result<()> {
    let (addrs, server, stop) = match bind(&config, users, executor.clone()) {
        Ok(bound) => bound,
        Err(e) => {
            let _ = ready.send(Err(e));
            return Ok(());
        }
    };
    // Signal handlers are installed before anyone hears that we listen: a
    // SIGTERM right after start-up must still stop the server gracefully
    // (actix's own are disabled: they would only run with the server future).
    let handle = server.handle();
    // Sent when a second signal asks to stop at once.
    let (forced_tx, forced_rx) = tokio::sync::oneshot::channel::<()>();
    if signals == Signals::Own {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
        let handle = handle.clone();
        let stop = stop.clone();
        let grace = Duration::from_secs(config.server.shutdown_grace);
        actix_web::rt::spawn(async move {
            let first = tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
            };
            tracing::info!(signal = first, "stopping (send the signal again to stop at once)");
            let second = async move {
                tokio::select! {
                    _ = term.recv() => "second SIGTERM",
                    _ = int.recv() => "second SIGINT",
                }
            };
            if drain(&handle, &stop, &executor, grace, second).await == Drained::Forced {
                let _ = forced_tx.send(());
            }
        });
    }
    let _ = ready.send(Ok((addrs, handle, stop)));
    tokio::select! {
        stopped = server => stopped?,
        // The connections still open are dropped with the process.
        Ok(()) = forced_rx => {}
    }
    Ok(())
}

/// How [`drain`] ended.
#[derive(Debug, PartialEq, Eq)]
enum Drained {
    /// Every connection finished (within the grace, or after the calls
    /// still running at its end were cut).
    Finished,
    /// `interrupt` came first (a second signal): the calls in flight were
    /// cut and the server should stop without waiting for its connections.
    Forced,
}

/// Stops the server: no new connections; calls in flight get `grace`, then
/// the ones still in flight are cut (each caller is answered that the server
/// is shutting down, and its transport logs the call as usual). `interrupt`
/// resolving first (a second signal) cuts them at once. Connections close
/// as soon as they are idle (`stop`: a WebSocket with nothing in flight
/// closes with 1001, an HTTP reply ends its connection), so the server
/// exits once the last call is answered, not at the end of the grace.
async fn drain(
    handle: &ServerHandle,
    stop: &StopTrigger,
    executor: &PyExecutor,
    grace: Duration,
    interrupt: impl std::future::Future<Output = &'static str>,
) -> Drained {
    let calls = executor.in_flight();
    tracing::info!(
        calls,
        grace_s = grace.as_secs(),
        "no new connections; waiting up to {} s for {calls} calls in flight (server.shutdown_grace)",
        grace.as_secs()
    );
    stop.trigger();
    let stopping = handle.stop(true);
    tokio::pin!(stopping, interrupt);
    let cut = |why: &str| {
        let calls = executor.in_flight();
        if calls > 0 {
            tracing::warn!(
                calls,
                "{why}: cutting {calls} calls still in flight; each is answered that the server is shutting down"
            );
        }
        executor.cut_calls();
    };
    tokio::select! {
        () = &mut stopping => return Drained::Finished,
        reason = &mut interrupt => {
            cut(&format!("{reason}: stopping at once"));
            // A moment for the cut calls' answers to leave.
            tokio::time::sleep(Duration::from_millis(200)).await;
            return Drained::Forced;
        }
        () = tokio::time::sleep(grace) => cut("shutdown grace over"),
    }
    tokio::select! {
        () = &mut stopping => Drained::Finished,
        reason = &mut interrupt => {
            tracing::warn!("{reason}: stopping at once");
            Drained::Forced
        }
    }
}

fn bind(
    config: &Config,
    users: UserStore,
    executor: PyExecutor,
) -> Result<(Vec<SocketAddr>, actix_web::dev::Server, StopTrigger)> {
    let path = config.server.path.clone();
    if let Some(set) = path_cut_by_client(&path) {
        tracing::warn!(
            "server.path {path:?} ends in a character of {set:?}: the 0.8.1 client's URL cache \
             (`rstrip({set:?})`) will cut it after the first call; end the path with e.g. a digit"
        );
    }
    let host_is_loopback = matches!(config.server.host.as_str(), "127.0.0.1" | "localhost" | "::1");
    let tls = config.server.tls.as_ref().map(crate::tls::TlsSection::server_config).transpose()?;
    if !host_is_loopback && tls.is_none() {
        tracing::warn!(
            host = %config.server.host,
            "listening beyond loopback without TLS: passwords and data travel in clear; \
             set [server.tls] cert and key, or put a TLS proxy (or an frp tunnel with TLS) in front"
        );
    }
    let (stop, stopping) = Stopping::new();
    let state = web::Data::new(ServerState {
        users: Arc::new(users),
        executor: Arc::new(executor),
        codec: config.codec(),
        limits: config.limits(),
        timestamp_window: config.server.timestamp_window,
        in_flight: Default::default(),
        budget: config.budget(),
        body_idle: Duration::from_secs_f64(config.limits.body_idle_timeout.min(1e9)),
        send_timeout: Duration::from_secs_f64(config.limits.send_timeout.min(1e9)),
        cache: config.cache()?,
        trusted_proxies: config.trusted_proxies()?,
        stopping,
    });
    let app_path = path;
    let mut server = HttpServer::new(move || {
        App::new()
            .app_data(state.clone())
            .wrap(middleware::from_fn(guard))
            .configure(ksrpc_transport_http::routes(&app_path))
            .configure(ksrpc_transport_ws::routes(&app_path))
    })
    // Past the grace the calls still running are cut (see `drain`); their
    // answers then get a few seconds to leave before connections are dropped.
    .shutdown_timeout(config.server.shutdown_grace.saturating_add(5))
    .client_request_timeout(Duration::from_secs(60));
    if config.server.workers > 0 {
        server = server.workers(config.server.workers);
    }
    let addr = (config.server.host.as_str(), config.server.port);
    let server = match tls {
        Some(tls) => server.bind_rustls_0_23(addr, tls),
        None => server.bind(addr),
    }
    .with_context(|| format!("binding {}:{}", config.server.host, config.server.port))?;
    Ok((server.addrs(), server.disable_signals().run(), stop))
}
