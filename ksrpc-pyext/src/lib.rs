//! `ksrpc_rs._native`: the ksrpc server inside the interpreter that imports
//! it (a notebook kernel, a script, `python -m ksrpc_rs`), and the native
//! protocol's client for Python ([`client`]).
//!
//! The wiring is `ksrpc-server`'s (config layers, users, the generated
//! admin, limits, the HTTP/WS server); what differs from the binary is only
//! that calls run in *this* interpreter ([`PyExecutor::start_in_host`]:
//! modules the host imported or logged in are what calls reach) and that the
//! host owns the signals ([`Signals::Host`]). The Python face (`serve()`,
//! `Server`, the command line) is `python/ksrpc_rs/`.
//!
//! GIL discipline: the host's thread holds the GIL while it calls us, and
//! the pool threads need it to run calls, so everything that waits (binding,
//! stopping, joining) waits detached.

mod client;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use ksrpc_py::PyExecutor;
use ksrpc_server::{build_users, init_logging, start, Config, Overrides, Running, Signals};
use pyo3::exceptions::{PyOSError, PyRuntimeError, PyValueError};
use pyo3::prelude::*;

/// One server per process: the pool, the asyncio loop and the logs are the
/// process's.
static SERVING: AtomicBool = AtomicBool::new(false);
static LOG_GUARD: OnceLock<Option<tracing_appender::non_blocking::WorkerGuard>> = OnceLock::new();
/// The running server, for [`stop_at_exit`].
static CURRENT: Mutex<Option<Arc<Inner>>> = Mutex::new(None);

/// What `stop()` and the idle watcher share.
struct Inner {
    running: Mutex<Option<Running>>,
    executor: PyExecutor,
    grace: Duration,
}

impl Inner {
    /// Stops the server, closes the executor and joins its threads; a no-op
    /// the second time. Must run detached (it takes the GIL itself).
    fn shutdown(&self) -> anyhow::Result<()> {
        self.shutdown_within(self.grace)
    }

    /// [`shutdown`](Self::shutdown) with `grace` for the calls in flight
    /// (zero: they are cut at once).
    fn shutdown_within(&self, grace: Duration) -> anyhow::Result<()> {
        let Some(mut running) = self.running.lock().expect("running poisoned").take() else {
            return Ok(());
        };
        let stopped = if grace.is_zero() { running.stop_now() } else { running.stop() };
        self.executor.close(); // attaches itself
        let stuck = self.executor.join(grace + Duration::from_secs(5));
        if stuck > 0 {
            tracing::warn!(threads = stuck, "Python threads still blocked in a call after the grace period");
        }
        SERVING.store(false, Ordering::SeqCst);
        stopped
    }

    fn is_running(&self) -> bool {
        self.running.lock().expect("running poisoned").as_ref().is_some_and(|r| !r.is_finished())
    }
}

/// A running server (`ksrpc_rs.serve()` wraps it).
#[pyclass(frozen, name = "NativeServer", module = "ksrpc_rs._native")]
struct NativeServer {
    inner: Arc<Inner>,
    urls: Vec<String>,
    announcement: Option<String>,
    warnings: Vec<String>,
}

#[pymethods]
impl NativeServer {
    /// The base URLs, as the 0.8.1 client takes them.
    #[getter]
    fn urls(&self) -> Vec<String> {
        self.urls.clone()
    }

    /// The generated admin's password notice (no users configured), once.
    #[getter]
    fn announcement(&self) -> Option<String> {
        self.announcement.clone()
    }

    /// Warnings about the configuration for the host to show.
    #[getter]
    fn warnings(&self) -> Vec<String> {
        self.warnings.clone()
    }

    /// Whether the server still accepts calls.
    #[getter]
    fn running(&self) -> bool {
        self.inner.is_running()
    }

    /// Seconds since the last call ended, `None` while one runs.
    fn idle_seconds(&self) -> Option<f64> {
        self.inner.executor.idle_for().map(|d| d.as_secs_f64())
    }

    /// Stops accepting calls, lets those in flight finish (up to
    /// `server.shutdown_grace`), closes the executor and joins its threads.
    fn stop(&self, py: Python<'_>) -> PyResult<()> {
        let inner = self.inner.clone();
        py.detach(move || inner.shutdown()).map_err(|e| PyRuntimeError::new_err(format!("{e:#}")))
    }

    /// Waits up to `timeout` seconds for the server to stop; returns whether
    /// it has. Signals are checked between short waits, so Ctrl-C arrives.
    fn wait(&self, py: Python<'_>, timeout: f64) -> PyResult<bool> {
        let deadline = std::time::Instant::now() + Duration::from_secs_f64(timeout.clamp(0.0, 86_400.0));
        loop {
            if !self.inner.is_running() {
                return Ok(true);
            }
            let now = std::time::Instant::now();
            if now >= deadline {
                return Ok(false);
            }
            let step = (deadline - now).min(Duration::from_millis(100));
            py.detach(|| std::thread::sleep(step));
            py.check_signals()?;
        }
    }
}

/// Starts a server in this interpreter. `config_path`: a TOML file;
/// `values`: JSON of the same shape, merged over it; then `KSRPC_*`
/// variables; then `host`/`port`/`path`. `idle_timeout`: seconds without a
/// call after which the server stops itself.
#[pyfunction]
#[pyo3(signature = (config_path=None, values=None, host=None, port=None, path=None, idle_timeout=None))]
fn start_server(
    py: Python<'_>,
    config_path: Option<PathBuf>,
    values: Option<String>,
    host: Option<String>,
    port: Option<u16>,
    path: Option<String>,
    idle_timeout: Option<f64>,
) -> PyResult<NativeServer> {
    if let Some(t) = idle_timeout {
        if !(t.is_finite() && t > 0.0) {
            return Err(PyValueError::new_err(format!("idle_timeout must be a positive number of seconds, not {t}")));
        }
    }
    if SERVING.swap(true, Ordering::SeqCst) {
        return Err(PyRuntimeError::new_err(
            "a ksrpc_rs server is already running in this process; stop() it before serving again",
        ));
    }
    let started = start_inner(py, config_path, values, Overrides { host, port, path }, idle_timeout);
    if started.is_err() {
        SERVING.store(false, Ordering::SeqCst);
    }
    started
}

fn start_inner(
    py: Python<'_>,
    config_path: Option<PathBuf>,
    values: Option<String>,
    overrides: Overrides,
    idle_timeout: Option<f64>,
) -> PyResult<NativeServer> {
    LOG_GUARD.get_or_init(init_logging);
    let config = Config::load_layers(config_path.as_deref(), values.as_deref(), &overrides)
        .map_err(|e| PyValueError::new_err(format!("{e:#}")))?;
    let mut warnings = Vec::new();
    if !config.python.path.is_empty() {
        warnings.push(format!(
            "python.path {:?} is added to this interpreter's sys.path; inside your own Python you can \
             also change sys.path yourself",
            config.python.path
        ));
    }
    let (users, generated) = build_users(&config).map_err(|e| PyValueError::new_err(format!("{e:#}")))?;
    let executor = PyExecutor::start_in_host(config.python()).map_err(|e| PyRuntimeError::new_err(e.to_string()))?;
    let grace = Duration::from_secs(config.server.shutdown_grace);
    let exec = executor.clone();
    let running = match py.detach(move || start(config, users, exec, Signals::Host)) {
        Ok(running) => running,
        Err(e) => {
            executor.close();
            let _ = py.detach(|| executor.join(Duration::from_secs(5)));
            return Err(PyOSError::new_err(format!("{e:#}")));
        }
    };
    let urls = running.urls();
    let inner = Arc::new(Inner { running: Mutex::new(Some(running)), executor, grace });
    *CURRENT.lock().expect("current poisoned") = Some(inner.clone());
    if let Some(limit) = idle_timeout {
        watch_idle(inner.clone(), Duration::from_secs_f64(limit)).map_err(|e| PyOSError::new_err(e.to_string()))?;
    }
    Ok(NativeServer { inner, urls, announcement: generated.map(|g| g.announcement()), warnings })
}

/// Stops the server once no call has run for `limit` (0.8.1's
/// `run_notebook` idle stop).
fn watch_idle(inner: Arc<Inner>, limit: Duration) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("ksrpc-idle".into())
        .spawn(move || {
            while inner.is_running() {
                std::thread::sleep(Duration::from_millis(200).min(limit));
                if inner.executor.idle_for().is_some_and(|idle| idle >= limit) {
                    tracing::info!(seconds = limit.as_secs_f64(), "no call for the idle timeout: stopping");
                    if let Err(e) = inner.shutdown() {
                        tracing::warn!("idle stop: {e:#}");
                    }
                    return;
                }
            }
        })
        .map(drop)
}

/// Stops the running server at once, if there is one: the calls in flight
/// are answered that the server is shutting down and the pool's threads end
/// before the interpreter finalizes (`ksrpc_rs` registers it with
/// `atexit`). A pool thread that woke up during finalization would be ended
/// by CPython (before 3.14) with `pthread_exit`, unwinding through Rust
/// frames: a crash at exit.
#[pyfunction]
fn stop_at_exit(py: Python<'_>) -> PyResult<()> {
    let Some(inner) = CURRENT.lock().expect("current poisoned").take() else {
        return Ok(());
    };
    py.detach(move || inner.shutdown_within(Duration::ZERO)).map_err(|e| PyRuntimeError::new_err(format!("{e:#}")))
}

/// An argon2id hash of `password`, for `password_hash` in the config.
#[pyfunction]
fn hash_password(password: &str) -> PyResult<String> {
    if password.is_empty() {
        return Err(PyValueError::new_err("empty password"));
    }
    Ok(ksrpc_core::auth::hash_password(password))
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(start_server, m)?)?;
    m.add_function(wrap_pyfunction!(hash_password, m)?)?;
    m.add_function(wrap_pyfunction!(stop_at_exit, m)?)?;
    m.add_class::<NativeServer>()?;
    client::register(m)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
