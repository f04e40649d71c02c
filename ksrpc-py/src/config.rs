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
    /// Most calls one user may have in flight.
    pub max_calls_per_user: usize,
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
    /// `fnmatch` patterns of modules whose calls all run on one dedicated
    /// thread (SDKs that keep their session in thread-locals).
    pub serial_modules: Vec<String>,
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
            call_timeout: 600.0,
            handle_ttl: 600.0,
            handle_cap: 64,
            unpickle_allow: Vec::new(),
            allow_code: false,
            serial_modules: Vec::new(),
            max_reply_bytes: 2 << 30,
        }
    }
}

impl PythonConfig {
    /// The call timeout as a [`Duration`] (clamped to something sane).
    pub fn call_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.call_timeout.clamp(0.001, 86_400.0 * 7.0))
    }
}
