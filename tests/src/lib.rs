//! Shared helpers of the end-to-end tests: an executor on the real embedded
//! CPython with the test venv, request pickles made by that Python, and
//! reply inspection.

use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use ksrpc_core::auth::{AuthTuning, User, UserStore};
use ksrpc_core::RuleSet;
use ksrpc_py::{PyExecutor, PythonConfig};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};

/// The venv `cargo xtask test` made for the server. The end-to-end tests
/// fail without it rather than silently testing less.
pub fn test_venv() -> PathBuf {
    std::env::var_os("KSRPC_TEST_VENV")
        .map(PathBuf::from)
        .expect("KSRPC_TEST_VENV is not set: run the suite with `cargo xtask test`")
}

/// The directory of server-side test modules (`bench_mod`).
pub fn server_modules() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("python/server_modules")
}

/// An executor on the embedded interpreter with the test venv.
pub fn executor(tweak: impl FnOnce(&mut PythonConfig)) -> PyExecutor {
    // bench_mod is thread-safe and the pool's tests (fairness, timeouts)
    // need its calls to run at once; the lanes have their own tests.
    let mut config = PythonConfig {
        venv: Some(test_venv()),
        path: vec![server_modules()],
        threads: 4,
        parallel_modules: vec!["bench_mod".into()],
        ..PythonConfig::default()
    };
    tweak(&mut config);
    PyExecutor::start(config).expect("the executor starts")
}

/// A verified user with `rules`.
pub fn user(name: &str, rules: &[&str]) -> Arc<User> {
    let mut store = UserStore::new(AuthTuning::default());
    store.add_plain(name, "pw", RuleSet::parse(rules).expect("valid rules"));
    store.verify(name, "pw").expect("just added")
}

/// Pickles the request `dict(module=..., calls=[...], ref_id=...)` where
/// `calls` is a Python expression over `RpcCall` (the stand-in class, named
/// `ksrpc.client.RpcCall` exactly as the real client's) and `Self`. `setup`
/// runs first (imports, helper classes).
pub fn request(setup: &str, module: &str, calls: &str, ref_id: u64) -> Bytes {
    Python::attach(|py| {
        let globals = PyDict::new(py);
        let code = format!(
            "import pickle\nfrom ksrpc.client import RpcCall, RpcClient, Self\n{setup}\n\
             payload = pickle.dumps(dict(module={module:?}, calls={calls}, ref_id={ref_id}), protocol=4)\n"
        );
        let code = std::ffi::CString::new(code).expect("no NUL in test code");
        py.run(&code, Some(&globals), None).expect("the request pickles");
        let payload = globals.get_item("payload").expect("lookup").expect("payload set");
        Bytes::copy_from_slice(payload.cast::<PyBytes>().expect("bytes").as_bytes())
    })
}

/// A reply as the client sees it: the status and `repr(data)`.
#[derive(Debug)]
pub struct Seen {
    /// The reply's `status`.
    pub status: i64,
    /// `repr()` of the reply's `data`.
    pub data: String,
    /// `type(data).__name__`.
    pub kind: String,
    /// The reply's `ref_id`.
    pub ref_id: u64,
}

/// Unpickles a reply with the embedded Python.
pub fn seen(reply: &[u8]) -> Seen {
    Python::attach(|py| {
        let d =
            py.import("pickle").and_then(|p| p.call_method1("loads", (PyBytes::new(py, reply),))).expect("reply loads");
        let get = |k: &str| d.get_item(k).expect("reply has the key");
        let data = get("data");
        Seen {
            status: get("status").extract().expect("int status"),
            data: data.repr().expect("repr").to_string(),
            kind: data.get_type().name().expect("type name").to_string(),
            ref_id: get("ref_id").extract().expect("int ref_id"),
        }
    })
}
