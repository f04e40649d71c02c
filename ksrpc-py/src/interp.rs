//! Starting the embedded interpreter, preparing `sys.path`, and serving
//! the bundled Python modules from memory.

use std::path::{Path, PathBuf};

use pyo3::prelude::*;
use pyo3::types::{PyCFunction, PyDict, PyList};

use crate::{PythonConfig, StartError};

/// What the Python executor tells the pool, as callbacks.
pub(crate) struct Hooks {
    /// A call is about to wait for its package's busy lane (called from a
    /// pool thread, attached): the pool should add a thread meanwhile.
    pub(crate) lend: Box<dyn Fn() + Send + Sync>,
    /// A compat call's chain summary and cache chain (`None`: never
    /// cacheable), once unpickled: the summary for a timeout's log line, the
    /// cache chain for `Executor::call_compat_seen` (the chain is only known
    /// in Python).
    pub(crate) note: Box<dyn Fn(u64, String, Option<String>) + Send + Sync>,
}

impl std::fmt::Debug for Hooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Hooks")
    }
}

/// The pure-Python modules the server ships: a minimal `ksrpc` package (the
/// client stand-ins that request pickles name, and the demo module) and the
/// executor logic, as (module name, is a package, source).
const BUNDLED: &[(&str, bool, &str)] = &[
    ("ksrpc", true, include_str!("../python/ksrpc/__init__.py")),
    ("ksrpc.client", false, include_str!("../python/ksrpc/client.py")),
    ("ksrpc.server", true, include_str!("../python/ksrpc/server/__init__.py")),
    ("ksrpc.server.demo", false, include_str!("../python/ksrpc/server/demo.py")),
    ("ksrpc_executor", true, include_str!("../python/ksrpc_executor/__init__.py")),
    ("ksrpc_executor.names", false, include_str!("../python/ksrpc_executor/names.py")),
    ("ksrpc_executor.trampoline", false, include_str!("../python/ksrpc_executor/trampoline.py")),
    ("ksrpc_executor.sharing", false, include_str!("../python/ksrpc_executor/sharing.py")),
    ("ksrpc_executor.build_budget", false, include_str!("../python/ksrpc_executor/build_budget.py")),
    ("ksrpc_executor.unpicklers", false, include_str!("../python/ksrpc_executor/unpicklers.py")),
    ("ksrpc_executor.requests", false, include_str!("../python/ksrpc_executor/requests.py")),
    ("ksrpc_executor.replies", false, include_str!("../python/ksrpc_executor/replies.py")),
    ("ksrpc_executor.lanes", false, include_str!("../python/ksrpc_executor/lanes.py")),
    ("ksrpc_executor.stubs", false, include_str!("../python/ksrpc_executor/stubs.py")),
    ("ksrpc_executor.executor", false, include_str!("../python/ksrpc_executor/executor.py")),
    ("ksrpc_capability", false, include_str!("../python/ksrpc_capability.py")),
];

/// The finder that serves [`BUNDLED`] from memory (see its docstring).
const BUNDLE_FINDER: &str = include_str!("../python/bundle_finder.py");

/// Formats a Python exception with its traceback, for errors and logs.
pub(crate) fn describe(py: Python<'_>, err: &PyErr) -> String {
    let tb = err.traceback(py).and_then(|tb| tb.format().ok()).unwrap_or_default();
    format!("{tb}{err}")
}

/// Makes the bundled modules importable without writing a file: finders on
/// `sys.meta_path` serve them from the texts compiled into this binary, the
/// executor's own modules before anything on `sys.path` (no planted file can
/// replace them) and the `ksrpc` stand-in after it (an installed `ksrpc`
/// still wins).
fn install_bundle(py: Python<'_>) -> PyResult<()> {
    let globals = PyDict::new(py);
    globals.set_item("__name__", "ksrpc_bundle_finder")?;
    let code = std::ffi::CString::new(BUNDLE_FINDER).expect("the finder's source has no NUL");
    py.run(&code, Some(&globals), None)?;
    let (private, standins) = (PyDict::new(py), PyDict::new(py));
    for (name, is_package, text) in BUNDLED {
        let to = if name.starts_with("ksrpc_") { &private } else { &standins };
        to.set_item(name, (text, is_package))?;
    }
    let install = globals.get_item("install")?.expect("bundle_finder.py defines install");
    install.call1((private, standins)).map(drop)
}

/// The site-packages directory of `venv` and its Python version (`3.12`).
fn venv_site_packages(venv: &Path) -> Result<(PathBuf, String), StartError> {
    let lib = venv.join("lib");
    let entries = std::fs::read_dir(&lib)
        .map_err(|e| StartError::Venv(venv.display().to_string(), format!("no lib directory: {e}")))?;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(version) = name.strip_prefix("python") {
            let site = entry.path().join("site-packages");
            if site.is_dir() {
                return Ok((site, version.to_owned()));
            }
        }
    }
    Err(StartError::Venv(venv.display().to_string(), "no lib/pythonX.Y/site-packages".into()))
}

/// Which interpreter the executor runs in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Host {
    /// One this process embeds (the `ksrpc-server` binary): started here,
    /// with the configured venv and `sys.executable` set to a real python.
    Embedded,
    /// The interpreter that imported the `ksrpc_rs` extension: its
    /// `sys.executable`, site-packages and `sys.modules` are used as they are.
    Extension,
}

/// Starts the interpreter (a no-op when already running, e.g. when loaded
/// into a Python process), sets up `sys.path` and returns the executor
/// object of the `ksrpc_executor` package.
///
/// `hooks` are what the executor tells the pool (see [`Hooks`]).
pub(crate) fn start(config: &PythonConfig, host: Host, hooks: Hooks) -> Result<Py<PyAny>, StartError> {
    Python::initialize();
    let venv = match host {
        Host::Embedded => config.venv.clone().or_else(|| std::env::var_os("VIRTUAL_ENV").map(PathBuf::from)),
        Host::Extension => None,
    };
    Python::attach(|py| {
        let py_err = |e: PyErr| StartError::Python(describe(py, &e));
        let sys = py.import("sys").map_err(py_err)?;
        let ours: String = {
            let vi = sys.getattr("version_info").map_err(py_err)?;
            let major: u32 = vi.getattr("major").and_then(|v| v.extract()).map_err(py_err)?;
            let minor: u32 = vi.getattr("minor").and_then(|v| v.extract()).map_err(py_err)?;
            format!("{major}.{minor}")
        };
        if let Some(venv) = &venv {
            let (site, version) = venv_site_packages(venv)?;
            if version != ours {
                return Err(StartError::VenvMismatch { venv: venv.display().to_string(), venv_version: version, ours });
            }
            // addsitedir also processes .pth files (editable installs).
            py.import("site")
                .and_then(|site_mod| site_mod.call_method1("addsitedir", (site.to_string_lossy().as_ref(),)))
                .map_err(py_err)?;
        }
        // An embedded interpreter guesses sys.executable from PATH (often a
        // pyenv shim of another version); SDKs that start subprocesses need
        // the real one: the venv's python, else the one we were built with.
        let executable = venv
            .as_ref()
            .map(|v| v.join("bin/python"))
            .or_else(|| option_env!("KSRPC_BUILD_PYTHON").map(PathBuf::from))
            .filter(|p| host == Host::Embedded && p.exists());
        if let Some(exe) = executable {
            sys.setattr("executable", exe.to_string_lossy().as_ref()).map_err(py_err)?;
        }
        let path = sys.getattr("path").map_err(py_err)?;
        let path = path.cast::<PyList>().map_err(|e| StartError::Python(e.to_string()))?;
        for extra in &config.path {
            path.append(extra.to_string_lossy().as_ref()).map_err(py_err)?;
        }
        // Last on sys.meta_path: an installed real ksrpc package wins over ours.
        install_bundle(py).map_err(py_err)?;

        let version: String = sys.getattr("version").and_then(|v| v.extract()).map_err(py_err)?;
        let executable: String = sys.getattr("executable").and_then(|v| v.extract()).unwrap_or_default();
        let paths: Vec<String> = path.extract().map_err(py_err)?;
        tracing::info!(python = %version.replace('\n', " "), executable = %executable, ?host, "Python ready");
        tracing::info!(sys_path = ?paths, "sys.path");

        let module = py.import("ksrpc_executor").map_err(py_err)?;
        let kwargs = pyo3::types::PyDict::new(py);
        kwargs.set_item("unpickle_allow", PyList::new(py, &config.unpickle_allow).map_err(py_err)?).map_err(py_err)?;
        kwargs.set_item("allow_code", config.allow_code).map_err(py_err)?;
        kwargs.set_item("handle_ttl", config.handle_ttl).map_err(py_err)?;
        kwargs.set_item("handle_cap", config.handle_cap).map_err(py_err)?;
        kwargs.set_item("call_timeout", config.call_timeout).map_err(py_err)?;
        kwargs.set_item("serial_modules", PyList::new(py, &config.serial_modules).map_err(py_err)?).map_err(py_err)?;
        kwargs
            .set_item("parallel_modules", PyList::new(py, &config.parallel_modules).map_err(py_err)?)
            .map_err(py_err)?;
        let Hooks { lend, note } = hooks;
        let lend = PyCFunction::new_closure(
            py,
            Some(c"lend"),
            Some(c"Asks the pool for a thread while this one waits for a busy lane."),
            move |_args, _kwargs| lend(),
        )
        .map_err(py_err)?;
        kwargs.set_item("lend", lend).map_err(py_err)?;
        let note = PyCFunction::new_closure(
            py,
            Some(c"note"),
            Some(c"Tells the pool a compat call's chain (call_id, summary, cache_chain_or_None)."),
            move |args, _kwargs| -> PyResult<()> {
                let (id, summary, chain): (u64, String, Option<String>) = args.extract()?;
                note(id, summary, chain);
                Ok(())
            },
        )
        .map_err(py_err)?;
        kwargs.set_item("note", note).map_err(py_err)?;
        let executor = module.getattr("Executor").and_then(|cls| cls.call((), Some(&kwargs))).map_err(py_err)?;
        Ok(executor.unbind())
    })
}
