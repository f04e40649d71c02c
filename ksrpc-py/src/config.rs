//! Settings of the embedded interpreter and its thread pool.

use std::path::PathBuf;
use std::time::Duration;

/// The `[python]` section of the server config, plus the limits the executor
/// enforces. Every field has a documented default.
#[derive(Clone, Debug, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct PythonConfig {
    /// A virtualenv whose site-packages are added (default: `$VIRTUAL_ENV`).
    pub venv: Option<PathBuf>,
    /// Extra `sys.path` entries (after `PYTHONPATH` and site-packages).
    pub path: Vec<PathBuf>,
    /// Size of the pool of Python threads running synchronous calls.
    pub threads: usize,
    /// Most calls one user may have in flight (queued or running); past it
    /// a call is refused as overloaded.
    pub max_calls_per_user: usize,
    /// Most calls of one user running on a Python thread at once (default:
    /// half of `threads`, at least 1). A call that ignores its timeout keeps
    /// counting until it really ends, so one user never holds more threads
    /// than this, stuck or not.
    pub max_running_per_user: Option<usize>,
    /// Seconds a call may run before it becomes a `TimeoutError` reply.
    pub call_timeout: f64,
    /// Seconds an idle generator handle is kept.
    pub handle_ttl: f64,
    /// Most generator handles per user (least recently used is freed).
    pub handle_cap: usize,
    /// Extra `module:name` (or `module:*`) globals the unpickler accepts, on
    /// top of the built-in plain-data list.
    pub unpickle_allow: Vec<String>,
    /// Accept dill-serialised code (lambdas, local functions) from users
    /// whose rules allow `builtins`. Off by default: dill code from another
    /// Python minor can crash the interpreter.
    pub allow_code: bool,
    /// `fnmatch` patterns of modules whose calls all share one dedicated
    /// thread (several packages that share one session); wins over
    /// `parallel_modules`.
    pub serial_modules: Vec<String>,
    /// `fnmatch` patterns of top-level packages (or modules) whose calls run
    /// in parallel on the pool. Every other third-party package gets a lane:
    /// its calls run one at a time on a thread of its own, so an SDK that
    /// keeps one connection is never called from two threads at once. The
    /// standard library and the `ksrpc` package always run on the pool.
    pub parallel_modules: Vec<String>,
    /// Largest pickled reply in bytes; a bigger result becomes a 500 reply.
    pub max_reply_bytes: u64,
}

impl Default for PythonConfig {
    fn default() -> Self {
        PythonConfig {
            venv: None,
            path: Vec::new(),
            threads: 32,
            max_calls_per_user: 64,
            max_running_per_user: None,
            call_timeout: 600.0,
            handle_ttl: 600.0,
            handle_cap: 64,
            unpickle_allow: Vec::new(),
            allow_code: false,
            serial_modules: Vec::new(),
            parallel_modules: Vec::new(),
            max_reply_bytes: 1 << 30,
        }
    }
}

impl PythonConfig {
    /// Most calls of one user running at once: `max_running_per_user`, or
    /// half the pool.
    pub fn running_cap(&self) -> usize {
        self.max_running_per_user.unwrap_or(self.threads / 2).max(1)
    }

    /// The call timeout as a [`Duration`] (clamped to something sane).
    pub fn call_timeout(&self) -> Duration {
        // `clamp` keeps NaN, which `from_secs_f64` panics on: a non-finite
        // value (the server's config refuses them) means the default.
        let secs = if self.call_timeout.is_nan() { PythonConfig::default().call_timeout } else { self.call_timeout };
        Duration::from_secs_f64(secs.clamp(0.001, 86_400.0 * 7.0))
    }
}
