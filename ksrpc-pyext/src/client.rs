//! `ksrpc_rs._native`'s client half: the Rust client of the native protocol
//! (`ksrpc-client`) for Python. The Python face, with the 0.8.1 client's
//! API, is `python/ksrpc_rs/client.py` and `connections/`.
//!
//! Rust does the sockets, zstd, frame reassembly and reading of replies on
//! its own runtime (two threads, `ksrpc-client-N`), never holding the GIL.
//! Every operation returns a [`Pending`] at once and settles later by
//! calling `done(ok, value)` from a thread that holds the GIL: the Python
//! side resolves a `concurrent.futures.Future` with it, which an asyncio
//! task awaits (`asyncio.wrap_future`) and a synchronous caller waits on,
//! so neither needs the other's event loop. Results are turned into Python
//! objects on that thread (tables through pyarrow, reading the reply's own
//! bytes without a copy), not on the event loop.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use futures_util::StreamExt;
use ksrpc_client::{Args, Call, CallChain, Client, Error, Proxy, Returned, Value, ValueStream};
use ksrpc_py::convert::{from_py_with, table_to_python};
use pyo3::exceptions::{PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyBytes, PyDict, PyFloat, PyList, PyString, PyTuple};
use serde_bytes::ByteBuf;

/// The client runtime, started on first use and shared by every client of
/// the process.
fn runtime() -> PyResult<&'static tokio::runtime::Runtime> {
    static RT: OnceLock<Result<tokio::runtime::Runtime, String>> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("ksrpc-client")
            .enable_all()
            .build()
            .map_err(|e| e.to_string())
    })
    .as_ref()
    .map_err(|e| PyRuntimeError::new_err(format!("starting the client runtime: {e}")))
}

/// Set by [`client_atexit`]: the interpreter is exiting, and no thread of
/// the client may attach to it any more.
static CLOSING: AtomicBool = AtomicBool::new(false);
/// Threads of the client inside (or about to enter) the interpreter.
static ATTACHED: AtomicUsize = AtomicUsize::new(0);

/// Runs `f` attached to Python, unless the interpreter is exiting. A thread
/// that woke up into CPython's finalization would be ended with
/// `pthread_exit` (before 3.14), unwinding through Rust frames: a crash at
/// exit. [`client_atexit`] stops new entries and waits for those inside.
fn with_python<R>(f: impl for<'py> FnOnce(Python<'py>) -> R) -> Option<R> {
    ATTACHED.fetch_add(1, Ordering::SeqCst);
    let out = if CLOSING.load(Ordering::SeqCst) { None } else { Python::try_attach(f) };
    ATTACHED.fetch_sub(1, Ordering::SeqCst);
    out
}

/// Called by `atexit` (registered by `ksrpc_rs`): from now on replies are
/// dropped instead of delivered, and the threads already delivering one
/// are waited for (up to 5 s), detached so they can finish.
#[pyfunction]
pub fn client_atexit(py: Python<'_>) {
    CLOSING.store(true, Ordering::SeqCst);
    py.detach(|| {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while ATTACHED.load(Ordering::SeqCst) > 0 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
    });
}

/// How a table result is given to Python.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TableAs {
    /// What it was made from: a DataFrame, Series or numpy array.
    Pandas,
    /// A `pyarrow.Table`.
    Arrow,
    /// A polars DataFrame.
    Polars,
}

impl TableAs {
    fn parse(s: &str) -> PyResult<TableAs> {
        match s {
            "pandas" => Ok(TableAs::Pandas),
            "arrow" | "pyarrow" => Ok(TableAs::Arrow),
            "polars" => Ok(TableAs::Polars),
            other => {
                Err(PyValueError::new_err(format!("tables= must be 'pandas', 'arrow' or 'polars', not {other:?}")))
            }
        }
    }
}

/// Bytes of a reply kept alive for as long as pyarrow reads them: the base
/// of a `pyarrow.foreign_buffer`, so a table result is read where it
/// arrived.
#[pyclass(frozen, module = "ksrpc_rs._native")]
struct ReplyBytes(ByteBuf);

#[pymethods]
impl ReplyBytes {
    fn __len__(&self) -> usize {
        self.0.len()
    }
}

/// A reply value as a Python object.
fn to_python<'py>(py: Python<'py>, v: Value, tables: TableAs) -> PyResult<Bound<'py, PyAny>> {
    Ok(match v {
        Value::None => py.None().into_bound(py),
        Value::Bool(b) => PyBool::new(py, b).to_owned().into_any(),
        Value::Int(i) => i.into_pyobject(py)?.into_any(),
        Value::BigInt(s) => py.get_type::<pyo3::types::PyInt>().call1((s,))?,
        Value::Float(f) => PyFloat::new(py, f).into_any(),
        Value::Str(s) => PyString::new(py, &s).into_any(),
        Value::Bytes(b) => PyBytes::new(py, &b).into_any(),
        Value::List(items) => {
            PyList::new(py, items.into_iter().map(|i| to_python(py, i, tables)).collect::<PyResult<Vec<_>>>()?)?
                .into_any()
        }
        Value::Tuple(items) => {
            PyTuple::new(py, items.into_iter().map(|i| to_python(py, i, tables)).collect::<PyResult<Vec<_>>>()?)?
                .into_any()
        }
        Value::Dict(pairs) => {
            let d = PyDict::new(py);
            for (k, v) in pairs {
                d.set_item(to_python(py, k, tables)?, to_python(py, v, tables)?)?;
            }
            d.into_any()
        }
        Value::Table(bytes) => table(py, bytes, tables)?,
        // The server pickles what has no native form; like the 0.8.1 client,
        // this client trusts its own server's pickles.
        Value::Pickle(bytes) => py.import("pickle")?.call_method1("loads", (PyBytes::new(py, &bytes),))?,
        Value::Chain(_) | Value::SelfRef => {
            return Err(PyTypeError::new_err("the server sent a chain as a result, which is not a value"))
        }
    })
}

fn table<'py>(py: Python<'py>, bytes: ByteBuf, tables: TableAs) -> PyResult<Bound<'py, PyAny>> {
    let pa = py.import("pyarrow").map_err(|_| {
        pyo3::exceptions::PyImportError::new_err("the result is a table, which needs pyarrow (pip install pyarrow)")
    })?;
    let (address, len) = (bytes.as_ptr() as usize, bytes.len());
    let owner = Bound::new(py, ReplyBytes(bytes))?;
    // The buffer keeps `owner` (and so the bytes, never changed) alive.
    let buffer = pa.call_method1("foreign_buffer", (address, len, owner))?;
    let table = pa.getattr("ipc")?.call_method1("open_stream", (buffer,))?.call_method0("read_all")?;
    match tables {
        TableAs::Arrow => Ok(table),
        TableAs::Pandas => table_to_python(&table),
        TableAs::Polars => py
            .import("polars")
            .map_err(|_| pyo3::exceptions::PyImportError::new_err("tables='polars' needs polars (pip install polars)"))?
            .call_method1("from_arrow", (table,)),
    }
}

/// An argument as a value: the shared converter, plus the client's own
/// objects: a lazy chain (`RpcClient`) and the `Self` marker, which carry
/// `_ksrpc_native_` = `"chain"` (with `_ksrpc_chain_()`) or `"self"`, and
/// functions and lambdas, pickled with dill as the 0.8.1 client did.
fn argument(py: Python<'_>, obj: &Bound<'_, PyAny>) -> PyResult<Value> {
    let extra = |o: &Bound<'_, PyAny>| -> PyResult<Option<Value>> {
        if o.is_instance(&py.import("types")?.getattr("FunctionType")?)? {
            // code: the server takes it only from users allowed `builtins`, with python.allow_code
            let pickled = py.import("ksrpc_rs.client")?.call_method1("_pickle_function", (o,))?;
            return Ok(Some(Value::Pickle(ByteBuf::from(pickled.extract::<Vec<u8>>()?))));
        }
        let Ok(tag) = o.get_type().getattr("_ksrpc_native_") else { return Ok(None) };
        match tag.extract::<String>()?.as_str() {
            "self" => Ok(Some(Value::SelfRef)),
            "chain" => {
                let spec = o.call_method0("_ksrpc_chain_")?;
                let (module, calls): (String, Bound<'_, PyAny>) = spec.extract()?;
                Ok(Some(Value::Chain(Box::new(chain_of(py, module, &calls)?))))
            }
            other => Err(PyTypeError::new_err(format!("unknown _ksrpc_native_ tag {other:?}"))),
        }
    };
    from_py_with(py, obj, 0, Some(&extra))
}

/// `calls`: a list of `(name, args, kwargs)`, `args` None for an attribute.
fn chain_of(py: Python<'_>, module: String, calls: &Bound<'_, PyAny>) -> PyResult<CallChain<Value>> {
    let mut chain = CallChain::new(module);
    for item in calls.try_iter()? {
        let (name, args, kwargs): (String, Option<Bound<'_, PyAny>>, Option<Bound<'_, PyDict>>) = item?.extract()?;
        let args = match args {
            None => None,
            Some(args) => {
                let positional = args.try_iter()?.map(|a| argument(py, &a?)).collect::<PyResult<Vec<_>>>()?;
                let mut keyword = Vec::new();
                if let Some(kwargs) = kwargs {
                    for (k, v) in kwargs.iter() {
                        keyword.push((k.extract::<String>()?, argument(py, &v)?));
                    }
                }
                Some(Args { positional, keyword })
            }
        };
        chain.calls.push(Call { name, args });
    }
    Ok(chain)
}

/// An error of the Rust client as the Python exception
/// `ksrpc_rs.errors.from_native` builds for it.
fn py_error(py: Python<'_>, e: Error) -> PyErr {
    let build = |errors: Bound<'_, PyModule>| -> PyResult<PyErr> {
        let args: Bound<'_, PyTuple> = match e {
            Error::Remote(r) => ("remote", r.kind, r.message, r.traceback).into_pyobject(py)?,
            Error::Unauthorized => ("unauthorized", e.to_string()).into_pyobject(py)?,
            Error::Forbidden(m) => ("forbidden", m).into_pyobject(py)?,
            Error::Refused(m) => ("refused", m).into_pyobject(py)?,
            Error::Http { status, body } => ("http", format!("HTTP {status}: {body}"), status).into_pyobject(py)?,
            Error::Connection(m) => ("connection", m).into_pyobject(py)?,
            Error::Timeout(t) => ("timeout", e.to_string(), t.as_secs_f64()).into_pyobject(py)?,
            Error::Url(m) => ("url", m).into_pyobject(py)?,
            other => ("protocol", other.to_string()).into_pyobject(py)?,
        };
        Ok(PyErr::from_value(errors.getattr("from_native")?.call1(args)?))
    };
    py.import("ksrpc_rs.errors").and_then(build).unwrap_or_else(|e| e)
}

/// What an operation settles with, before it is a Python object.
enum Outcome {
    Client(Client),
    Returned(Returned, TableAs),
    Item(Option<Value>, TableAs),
}

/// An operation in flight: settles by calling `done(ok, value)`;
/// `cancel()` stops it (a call is cancelled on the server).
#[pyclass(frozen, module = "ksrpc_rs._native")]
#[derive(Debug)]
pub struct Pending {
    abort: Mutex<Option<tokio::task::AbortHandle>>,
    /// Set by `cancel`: a result already being converted is dropped, not
    /// delivered.
    cancelled: Arc<AtomicBool>,
}

#[pymethods]
impl Pending {
    /// Stops the operation; `done` is not called. A no-op once settled.
    fn cancel(&self) {
        self.cancelled.store(true, Ordering::SeqCst);
        if let Some(a) = self.abort.lock().expect("pending poisoned").take() {
            a.abort();
        }
    }
}

/// Runs `fut` on the client runtime; its outcome becomes a Python object
/// and `done(ok, value)` is called with it on a blocking thread, after the
/// last of the call's `progress` reports.
fn spawn<F>(fut: F, done: Py<PyAny>, progress: Option<Arc<Progress>>) -> PyResult<Pending>
where
    F: std::future::Future<Output = Result<Outcome, Error>> + Send + 'static,
{
    let rt = runtime()?;
    let cancelled = Arc::new(AtomicBool::new(false));
    let seen_cancel = cancelled.clone();
    let task = rt.spawn(async move {
        let outcome = fut.await;
        // Converting takes the GIL and may run pyarrow: not on a runtime worker.
        let settled = tokio::task::spawn_blocking(move || {
            // Aborting the task does not stop this closure once it runs.
            if seen_cancel.load(Ordering::SeqCst) {
                return;
            }
            if let Some(p) = progress {
                p.drain();
            }
            if seen_cancel.load(Ordering::SeqCst) {
                return;
            }
            with_python(|py| {
                let (ok, value) = match outcome.map_err(|e| py_error(py, e)).and_then(|o| settle(py, o)) {
                    Ok(v) => (true, v),
                    Err(e) => (false, e.into_value(py).into_any()),
                };
                if let Err(e) = done.call1(py, (ok, value)) {
                    e.write_unraisable(py, Some(done.bind(py)));
                }
            });
        });
        if let Err(e) = settled.await {
            tracing::warn!("settling a client call: {e}");
        }
    });
    Ok(Pending { abort: Mutex::new(Some(task.abort_handle())), cancelled })
}

fn settle(py: Python<'_>, outcome: Outcome) -> PyResult<Py<PyAny>> {
    Ok(match outcome {
        Outcome::Client(client) => Py::new(py, NativeClient { client })?.into_any(),
        Outcome::Returned(Returned::Value(v), tables) => {
            (false, to_python(py, v, tables)?).into_pyobject(py)?.unbind().into_any()
        }
        Outcome::Returned(Returned::Generator(stream), tables) => {
            let stream = NativeStream { stream: Arc::new(tokio::sync::Mutex::new(Some(stream))), tables };
            (true, Py::new(py, stream)?).into_pyobject(py)?.unbind().into_any()
        }
        Outcome::Item(Some(v), tables) => (true, to_python(py, v, tables)?).into_pyobject(py)?.unbind().into_any(),
        Outcome::Item(None, _) => (false, py.None()).into_pyobject(py)?.unbind().into_any(),
    })
}

fn seconds(name: &str, s: Option<f64>) -> PyResult<Option<Duration>> {
    s.map(|s| {
        Duration::try_from_secs_f64(s)
            .ok()
            .filter(|d| !d.is_zero())
            .ok_or_else(|| PyValueError::new_err(format!("{name} must be a positive number of seconds, not {s}")))
    })
    .transpose()
}

/// Connects to `url`; settles with a `NativeClient`.
#[pyfunction]
#[pyo3(signature = (url, done, *, username=None, password=None, timeout=None, connect_timeout=30.0, transport=None, proxy=None, proxy_auth=None, ca_pem=None))]
#[allow(clippy::too_many_arguments)]
pub fn connect(
    url: String,
    done: Py<PyAny>,
    username: Option<String>,
    password: Option<String>,
    timeout: Option<f64>,
    connect_timeout: f64,
    transport: Option<&str>,
    proxy: Option<String>,
    proxy_auth: Option<(String, String)>,
    ca_pem: Option<Vec<u8>>,
) -> PyResult<Pending> {
    let mut builder = Client::builder(url);
    if let (Some(u), Some(p)) = (username, password) {
        builder = builder.credentials(u, p);
    }
    if let Some(t) = seconds("timeout", timeout)? {
        builder = builder.timeout(t);
    }
    if let Some(t) = seconds("connect_timeout", Some(connect_timeout))? {
        builder = builder.connect_timeout(t);
    }
    match transport {
        None => {}
        Some("http") => builder = builder.transport(ksrpc_client::Transport::Http),
        Some("websocket") => builder = builder.transport(ksrpc_client::Transport::WebSocket),
        Some(other) => {
            return Err(PyValueError::new_err(format!("transport must be 'http' or 'websocket', not {other:?}")))
        }
    }
    if let Some(url) = proxy {
        builder = builder.proxy(Proxy { url, credentials: proxy_auth });
    }
    if let Some(pem) = ca_pem {
        builder = builder.add_root_certificate_pem(pem);
    }
    spawn(async move { builder.connect().await.map(Outcome::Client) }, done, None)
}

/// A connection (one WebSocket, or HTTP's connection pool).
#[pyclass(frozen, module = "ksrpc_rs._native")]
#[derive(Debug)]
pub struct NativeClient {
    client: Client,
}

#[pymethods]
impl NativeClient {
    /// Runs `module` + `calls` (a list of `(name, args, kwargs)`); settles
    /// with `(False, value)` or `(True, NativeStream)` for a generator.
    /// `progress(received, total_or_None)` is called as a big reply arrives.
    #[pyo3(signature = (module, calls, done, *, timeout=None, tables="pandas", progress=None))]
    #[allow(clippy::too_many_arguments)]
    fn call(
        &self,
        py: Python<'_>,
        module: String,
        calls: &Bound<'_, PyAny>,
        done: Py<PyAny>,
        timeout: Option<f64>,
        tables: &str,
        progress: Option<Py<PyAny>>,
    ) -> PyResult<Pending> {
        let tables = TableAs::parse(tables)?;
        let mut chain = self.client.chain(chain_of(py, module, calls)?);
        if let Some(t) = seconds("timeout", timeout)? {
            chain = chain.timeout(t);
        }
        let progress = progress.map(Progress::new);
        if let Some(p) = &progress {
            chain = chain.on_progress(p.reporter());
        }
        spawn(async move { chain.returned().await.map(|r| Outcome::Returned(r, tables)) }, done, progress)
    }

    /// `"http"` or `"websocket"`.
    #[getter]
    fn transport(&self) -> &'static str {
        match self.client.transport() {
            ksrpc_client::Transport::Http => "http",
            ksrpc_client::Transport::WebSocket => "websocket",
        }
    }
}

/// A call's progress callback, kept off the runtime: the thread reading the
/// socket only queues a report (about every percent of the reply, at least
/// 1 MiB apart, and at its end); one blocking task at a time takes the GIL
/// and calls Python with the queued reports in order, so a callback that
/// waits for the GIL never stalls the socket. [`Progress::drain`] delivers
/// what is left before the call settles.
#[derive(Debug)]
struct Progress {
    callback: Py<PyAny>,
    queue: Mutex<Reports>,
    /// Held while calling Python: reports are delivered one at a time.
    delivering: Mutex<()>,
    /// The last report queued (for the throttle).
    last: std::sync::atomic::AtomicU64,
}

/// One progress report: bytes received, and the reply's size when known.
type Report = (u64, Option<u64>);

/// Reports not yet delivered, and whether a task is delivering them.
#[derive(Debug, Default)]
struct Reports(std::collections::VecDeque<Report>, bool);

impl Progress {
    fn new(callback: Py<PyAny>) -> Arc<Self> {
        Arc::new(Self {
            callback,
            queue: Mutex::new(Reports::default()),
            delivering: Mutex::new(()),
            last: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// The callback for [`CallChain::on_progress`].
    fn reporter(self: &Arc<Self>) -> impl Fn(u64, Option<u64>) + Send + Sync + 'static {
        let me = Arc::clone(self);
        move |received, total| me.report(received, total)
    }

    fn report(self: &Arc<Self>, received: u64, total: Option<u64>) {
        let before = self.last.load(Ordering::Relaxed);
        let step = total.map_or(1 << 20, |t| (t / 100).max(1 << 20));
        if received < before + step && Some(received) != total {
            return;
        }
        self.last.store(received, Ordering::Relaxed);
        let mut q = self.queue.lock().expect("progress poisoned");
        q.0.push_back((received, total));
        if q.1 {
            return;
        }
        q.1 = true;
        drop(q);
        let me = Arc::clone(self);
        match runtime() {
            Ok(rt) => drop(rt.spawn_blocking(move || me.drain())),
            Err(_) => self.queue.lock().expect("progress poisoned").1 = false,
        }
    }

    /// Delivers queued reports until none is left, after any delivery under
    /// way. Also called before the call settles, so the last report comes
    /// before the result (a drain task still scheduled then finds nothing).
    fn drain(&self) {
        let _one_at_a_time = self.delivering.lock().expect("progress poisoned");
        loop {
            let next = {
                let mut q = self.queue.lock().expect("progress poisoned");
                match q.0.pop_front() {
                    Some(r) => r,
                    None => {
                        q.1 = false;
                        return;
                    }
                }
            };
            self.deliver(next);
        }
    }

    fn deliver(&self, (received, total): Report) {
        with_python(|py| {
            if let Err(e) = self.callback.call1(py, (received, total)) {
                e.write_unraisable(py, Some(self.callback.bind(py)));
            }
        });
    }
}

/// A generator on the server, one item per `next`.
#[pyclass(frozen, module = "ksrpc_rs._native")]
#[derive(Debug)]
pub struct NativeStream {
    stream: Arc<tokio::sync::Mutex<Option<ValueStream>>>,
    tables: TableAs,
}

#[pymethods]
impl NativeStream {
    /// Settles with `(True, item)`, or `(False, None)` at the end.
    fn next(&self, done: Py<PyAny>) -> PyResult<Pending> {
        let (stream, tables) = (self.stream.clone(), self.tables);
        spawn(
            async move {
                let mut guard = stream.lock().await;
                let Some(s) = guard.as_mut() else { return Ok(Outcome::Item(None, tables)) };
                match s.next().await {
                    Some(Ok(v)) => Ok(Outcome::Item(Some(v), tables)),
                    Some(Err(e)) => Err(e),
                    None => {
                        guard.take();
                        Ok(Outcome::Item(None, tables))
                    }
                }
            },
            done,
            None,
        )
    }

    /// Frees the generator on the server (also done when this object goes).
    fn close(&self) -> PyResult<()> {
        let stream = self.stream.clone();
        // Dropped on the runtime: closing an HTTP handle posts a request.
        runtime()?.spawn(async move {
            stream.lock().await.take();
        });
        Ok(())
    }
}

impl Drop for NativeStream {
    fn drop(&mut self) {
        if let Ok(rt) = runtime() {
            let stream = self.stream.clone();
            rt.spawn(async move {
                stream.lock().await.take();
            });
        }
    }
}

/// Adds the client's functions and classes to `_native`.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(connect, m)?)?;
    m.add_function(wrap_pyfunction!(client_atexit, m)?)?;
    m.add_class::<NativeClient>()?;
    m.add_class::<NativeStream>()?;
    m.add_class::<Pending>()?;
    m.add_class::<ReplyBytes>()?;
    Ok(())
}
