//! The pool of Python threads and the [`Executor`] implementation.
//!
//! Threading model: async callers queue a job in the [`FairQueue`] (one FIFO
//! per user, served round robin, a cap on each user's running calls); a
//! bounded set of OS threads, attached to the interpreter for their whole
//! life, take jobs from it; a call blocked in I/O releases the GIL, so other
//! calls proceed. A control thread (also outside
//! tokio) delivers timeouts and cancellations, which need the GIL. No tokio
//! or actix worker ever attaches to Python.

use std::collections::HashMap;
use std::os::raw::{c_long, c_ulong};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use crossbeam_channel::{Receiver, Sender};
use ksrpc_core::auth::User;
use ksrpc_core::chain::CallChain;
use ksrpc_core::native::{Outcome, RemoteError, Value};
use ksrpc_core::{compat, CallOutcome, ChainSeen, CompatReply, CompatRequest, ExecError, Executor, NativeRequest};
use pyo3::prelude::*;
use pyo3::types::PyBytes;
use tokio::sync::{oneshot, watch};

use crate::fair::FairQueue;
use crate::gate::Gate;
use crate::interp::Host;
use crate::interp::{self, describe};
use crate::{PythonConfig, StartError};

/// A user's rules as seen from Python: `rules.allows("os") -> bool`, and
/// `rules.first_match("os") -> (pattern, allowed) | None` (the rule that
/// decides a module, for the capability check's package rule).
#[pyclass(frozen, name = "Rules", module = "ksrpc_rs")]
struct PyRules {
    user: Arc<User>,
}

#[pymethods]
impl PyRules {
    fn allows(&self, module: &str) -> bool {
        self.user.rules.allows(module)
    }

    fn first_match(&self, module: &str) -> Option<(String, bool)> {
        self.user
            .rules
            .first_match(module)
            .map(|r| (r.pattern.to_string(), r.verdict == ksrpc_core::rules::Verdict::Allow))
    }

    fn __repr__(&self) -> String {
        format!("<rules of {}>", self.user.name)
    }
}

/// A reply pickle owned by Python, exposed to Rust without a copy.
struct PyBytesOwner {
    _obj: Py<PyBytes>,
    ptr: usize,
    len: usize,
}

impl AsRef<[u8]> for PyBytesOwner {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: `bytes` objects are immutable and `_obj` keeps this one
        // alive, so the buffer stays valid and unchanged for our lifetime.
        unsafe { std::slice::from_raw_parts(self.ptr as *const u8, self.len) }
    }
}

fn zero_copy(obj: Bound<'_, PyBytes>) -> Bytes {
    let slice = obj.as_bytes();
    let (ptr, len) = (slice.as_ptr() as usize, slice.len());
    Bytes::from_owner(PyBytesOwner { _obj: obj.unbind(), ptr, len })
}

/// What a job runs, and where its answer goes.
enum Work {
    /// A compat request pickle; the answer is a pickled reply.
    Compat { payload: Bytes, reply: oneshot::Sender<Result<CompatReply, ExecError>> },
    /// A native chain; the answer is an outcome to encode.
    Native { chain: CallChain<Value>, reply: oneshot::Sender<Result<Outcome, ExecError>> },
}

struct Job {
    id: u64,
    user: Arc<User>,
    work: Work,
    cancelled: Arc<AtomicBool>,
}

impl crate::fair::Stale for Job {
    fn is_stale(&self) -> bool {
        self.cancelled.load(Ordering::SeqCst)
    }
}

enum Control {
    /// The call overran its timeout: interrupt it and replace its thread.
    Timeout(u64),
    /// The client went away: cancel a pending coroutine.
    Cancel(u64),
    /// A pool thread waits for a busy lane (see the executor's `_Lanes`):
    /// add a thread so calls into other packages need not wait for it.
    Lend,
}

struct Shared {
    executor: Py<PyAny>,
    config: PythonConfig,
    /// Jobs waiting for a thread, per user; also counts each user's
    /// running calls until they really end.
    queue: FairQueue<Job>,
    control: Sender<Control>,
    /// Call id -> Python thread ident of the thread running it. Only
    /// touched while attached to the interpreter, so the control thread and
    /// the workers cannot race on it.
    running: Mutex<HashMap<u64, c_ulong>>,
    /// Call id -> the chain of a compat call in flight (told by Python once
    /// unpickled), for the log line of a call that outruns its timeout.
    summaries: Arc<Mutex<HashMap<u64, String>>>,
    /// Call id -> who wants the compat call's cache chain as soon as Python
    /// has read the request (`Executor::call_compat_seen`).
    seen: Arc<Mutex<HashMap<u64, ChainSeen>>>,
    per_user: Mutex<HashMap<String, usize>>,
    next_id: AtomicU64,
    workers: AtomicUsize,
    shutting_down: AtomicBool,
    /// Set by [`PyExecutor::cut_calls`]: every caller still waiting is
    /// answered `ShuttingDown` at once.
    cut: watch::Sender<bool>,
    gate: Arc<Gate>,
    /// Dropped by [`PyExecutor::join`]: every pool and control thread
    /// waiting on it then ends.
    stop: Mutex<Option<Sender<()>>>,
    stopped: Receiver<()>,
    /// Every thread the pool started (they attach to the interpreter).
    threads: Mutex<Vec<JoinHandle<()>>>,
    /// When the last call started or ended (for idle stops).
    last_activity: Mutex<Instant>,
}

/// The embedded-CPython executor. Cheap to clone.
#[derive(Clone)]
pub struct PyExecutor {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for PyExecutor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PyExecutor").field("threads", &self.shared.workers.load(Ordering::Relaxed)).finish()
    }
}

impl PyExecutor {
    /// Starts the embedded interpreter (when this process has none yet),
    /// the thread pool and the control thread.
    pub fn start(config: PythonConfig) -> Result<Self, StartError> {
        Self::start_in(config, Host::Embedded)
    }

    /// Starts the pool inside the interpreter that loaded us (the Python
    /// extension): `sys.executable` and the venv are the host's own, so
    /// `python.venv` is refused. Call it while attached; the pool's threads
    /// take the GIL whenever the host lets go of it.
    pub fn start_in_host(config: PythonConfig) -> Result<Self, StartError> {
        if let Some(venv) = &config.venv {
            return Err(StartError::HostVenv(venv.display().to_string()));
        }
        Self::start_in(config, Host::Extension)
    }

    fn start_in(config: PythonConfig, host: Host) -> Result<Self, StartError> {
        let (control_tx, control_rx) = crossbeam_channel::unbounded();
        let lender = control_tx.clone();
        let summaries: Arc<Mutex<HashMap<u64, String>>> = Arc::default();
        let seen: Arc<Mutex<HashMap<u64, ChainSeen>>> = Arc::default();
        let (noted, told) = (summaries.clone(), seen.clone());
        let hooks = interp::Hooks {
            lend: Box::new(move || drop(lender.send(Control::Lend))),
            note: Box::new(move |id, summary, chain| {
                noted.lock().expect("summaries poisoned").insert(id, summary);
                let waiting = told.lock().expect("seen poisoned").remove(&id);
                if let Some(tell) = waiting {
                    tell(chain.as_deref());
                }
            }),
        };
        let executor = interp::start(&config, host, hooks)?;
        let (stop_tx, stop_rx) = crossbeam_channel::bounded(0);
        let shared = Arc::new(Shared {
            executor,
            queue: FairQueue::new(config.running_cap()),
            config,
            control: control_tx,
            running: Mutex::new(HashMap::new()),
            summaries,
            seen,
            per_user: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            workers: AtomicUsize::new(0),
            shutting_down: AtomicBool::new(false),
            cut: watch::Sender::new(false),
            gate: Gate::new(1)?,
            stop: Mutex::new(Some(stop_tx)),
            stopped: stop_rx,
            threads: Mutex::new(Vec::new()),
            last_activity: Mutex::new(Instant::now()),
        });
        for _ in 0..shared.config.threads.max(1) {
            spawn_worker(&shared)?;
        }
        let s = shared.clone();
        let control =
            std::thread::Builder::new().name("ksrpc-py-control".into()).spawn(move || control_loop(&s, &control_rx))?;
        shared.threads.lock().expect("threads poisoned").push(control);
        Ok(PyExecutor { shared })
    }

    /// Ends the pool and control threads once their current call (if any)
    /// returns, waiting up to `grace` for them; returns how many are still
    /// running then (blocked in C: a Python thread cannot be killed). Call
    /// [`close`](Self::close) first, and never while attached to the
    /// interpreter: an ending thread takes the GIL one last time.
    pub fn join(&self, grace: Duration) -> usize {
        self.shared.shutting_down.store(true, Ordering::SeqCst);
        self.shared.queue.close();
        drop(self.shared.stop.lock().expect("stop poisoned").take());
        let deadline = Instant::now() + grace;
        let mut threads = std::mem::take(&mut *self.shared.threads.lock().expect("threads poisoned"));
        while Instant::now() < deadline && threads.iter().any(|t| !t.is_finished()) {
            std::thread::sleep(Duration::from_millis(10));
        }
        let (done, stuck): (Vec<_>, Vec<_>) = threads.drain(..).partition(JoinHandle::is_finished);
        for t in done {
            let _ = t.join();
        }
        stuck.len()
    }

    /// How long no call has been running (`None` while one is).
    pub fn idle_for(&self) -> Option<Duration> {
        let busy = !self.shared.per_user.lock().expect("per-user map poisoned").is_empty();
        (!busy).then(|| self.shared.last_activity.lock().expect("activity poisoned").elapsed())
    }

    /// Stops accepting calls and shuts the asyncio loop down. Calls already
    /// running finish on their threads.
    pub fn close(&self) {
        self.shared.shutting_down.store(true, Ordering::SeqCst);
        Python::attach(|py| {
            if let Err(e) = self.shared.executor.bind(py).call_method0("close") {
                tracing::warn!("closing the Python executor: {}", describe(py, &e));
            }
        });
    }

    /// Calls in flight (queued or running), all users together.
    pub fn in_flight(&self) -> usize {
        self.shared.per_user.lock().expect("per-user map poisoned").values().sum()
    }

    /// Ends every call still in flight (the end of a shutdown grace): each
    /// caller is answered [`ExecError::ShuttingDown`] at once, so its client
    /// gets a reply saying so, and its job is cancelled (a coroutine is
    /// cancelled, a thread is interrupted). No new call is taken after it.
    pub fn cut_calls(&self) {
        self.shared.shutting_down.store(true, Ordering::SeqCst);
        self.shared.cut.send_replace(true);
    }

    /// Calls currently running on a Python thread.
    pub fn running(&self) -> usize {
        self.shared.running.lock().expect("running map poisoned").len()
    }
}

fn spawn_worker(shared: &Arc<Shared>) -> std::io::Result<()> {
    let n = shared.workers.fetch_add(1, Ordering::SeqCst);
    let slot = shared.next_id.fetch_add(1, Ordering::Relaxed);
    let s = shared.clone();
    let thread = std::thread::Builder::new().name(format!("ksrpc-py-{n}")).spawn(move || worker_loop(&s, slot))?;
    shared.threads.lock().expect("threads poisoned").push(thread);
    Ok(())
}

fn worker_loop(shared: &Shared, slot: u64) {
    // The thread stays attached to the interpreter for its whole life and
    // only releases the GIL while it waits: attaching per call created and
    // destroyed a Python thread state each time (measured: 84 us of Python
    // thread CPU per small call against 37 us for the call itself).
    Python::attach(|py| {
        // SAFETY: plain FFI call returning the OS thread id Python uses for this thread.
        let ident = unsafe { pyo3::ffi::PyThread_get_thread_ident() };
        let mut inside = false;
        loop {
            // Pass the gate first, then take the next job: jobs leave the
            // queue in the fair queue's order whichever thread the gate lets in.
            let job = py.detach(|| {
                if !inside {
                    shared.gate.enter(slot);
                    inside = true;
                }
                shared.queue.take()
            });
            let Some((key, job)) = job else {
                shared.gate.leave(slot);
                return;
            };
            if job.cancelled.load(Ordering::SeqCst) {
                shared.queue.done(&key);
                continue;
            }
            shared.gate.begin(slot);
            shared.running.lock().expect("running map poisoned").insert(job.id, ident);
            let Job { id, user, work, .. } = job;
            let answer = match work {
                Work::Compat { payload, reply } => Answer::Compat(run_compat(py, shared, id, &user, &payload), reply),
                Work::Native { chain, reply } => Answer::Native(run_native(py, shared, id, &user, &chain), reply),
            };
            shared.running.lock().expect("running map poisoned").remove(&id);
            // Only now, however long ago its caller gave up, is the call off
            // its user's account.
            shared.queue.done(&key);
            // A timeout that raced with the end of the call must not hit the
            // next call on this thread.
            // SAFETY: attached; a NULL exception clears any pending one.
            unsafe { pyo3::ffi::PyThreadState_SetAsyncExc(ident as c_long, std::ptr::null_mut()) };
            inside = shared.gate.finish(slot);
            // The caller may have gone (timeout, client left): nothing to do then.
            answer.send();
            // Threads added to replace stuck ones retire once the pool is back to size.
            let target = shared.config.threads.max(1);
            if shared.workers.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |w| (w > target).then(|| w - 1)).is_ok()
            {
                if inside {
                    shared.gate.leave(slot);
                }
                return;
            }
        }
    });
}

/// A finished job's answer, sent once the GIL bookkeeping is done.
enum Answer {
    Compat(Result<CompatReply, ExecError>, oneshot::Sender<Result<CompatReply, ExecError>>),
    Native(Result<Outcome, ExecError>, oneshot::Sender<Result<Outcome, ExecError>>),
}

impl Answer {
    fn send(self) {
        match self {
            Answer::Compat(r, tx) => drop(tx.send(r)),
            Answer::Native(r, tx) => drop(tx.send(r)),
        }
    }
}

fn run_native(
    py: Python<'_>,
    shared: &Shared,
    id: u64,
    user: &Arc<User>,
    chain: &CallChain<Value>,
) -> Result<Outcome, ExecError> {
    let internal = |e: PyErr| ExecError::Internal(describe(py, &e));
    let executor = shared.executor.bind(py);
    let rules = Py::new(py, PyRules { user: user.clone() }).map_err(internal)?;
    let client = py.import("ksrpc.client").map_err(internal)?;
    let load_pickle =
        |data: &[u8]| executor.call_method1("load_pickle_value", (rules.bind(py), PyBytes::new(py, data)));
    let cx = crate::convert::ToPy { client: &client, load_pickle: &load_pickle };
    let calls = match crate::convert::calls_to_py(py, &chain.calls, &cx) {
        Ok(calls) => calls,
        Err(e) => return Ok(Outcome::Err(remote_error(py, &e))),
    };
    let handle = chain.handle.map_or(0, std::num::NonZeroU64::get);
    let result = executor
        .call_method1("run_native", (id, user.name.as_str(), rules.bind(py), chain.module.as_str(), calls, handle))
        .map_err(internal)?;
    let kind: String = result.get_item(0).and_then(|k| k.extract()).map_err(internal)?;
    Ok(match kind.as_str() {
        "ok" => {
            let obj = result.get_item(1).map_err(internal)?;
            match crate::convert::from_py(py, &obj, 0) {
                // The same bound as a compat reply's pickle (before encoding:
                // the encoded reply is this size or smaller).
                Ok(v) if v.weight() as u64 > shared.config.max_reply_bytes => Outcome::Err(RemoteError {
                    kind: "MemoryError".into(),
                    message: over_reply_limit(v.weight() as u64, shared.config.max_reply_bytes),
                    traceback: String::new(),
                }),
                Ok(v) => Outcome::Ok(v),
                Err(e) => Outcome::Err(remote_error(py, &e)),
            }
        }
        "handle" => {
            let h: u64 = result.get_item(1).and_then(|h| h.extract()).map_err(internal)?;
            std::num::NonZeroU64::new(h).map_or(Outcome::Exhausted, Outcome::Handle)
        }
        "exhausted" => Outcome::Exhausted,
        _ => {
            let (_, kind, message, traceback): (String, String, String, String) = result.extract().map_err(internal)?;
            Outcome::Err(RemoteError { kind, message, traceback })
        }
    })
}

fn remote_error(py: Python<'_>, e: &PyErr) -> RemoteError {
    RemoteError {
        kind: e.get_type(py).name().map(|n| n.to_string()).unwrap_or_else(|_| "Exception".into()),
        message: e.value(py).str().map(|s| s.to_string()).unwrap_or_default(),
        traceback: describe(py, e),
    }
}

/// What the Python executor's `handle` returns: reply status, bad-request
/// message, reply bytes, chain summary, cache chain, and (type, message) of
/// what the call raised.
type Handled<'py> = (u16, Option<String>, Bound<'py, PyBytes>, String, Option<String>, Option<(String, String)>);

fn run_compat(
    py: Python<'_>,
    shared: &Shared,
    id: u64,
    user: &Arc<User>,
    payload: &Bytes,
) -> Result<CompatReply, ExecError> {
    let internal = |e: PyErr| ExecError::Internal(describe(py, &e));
    let rules = Py::new(py, PyRules { user: user.clone() }).map_err(internal)?;
    let py_payload = PyBytes::new(py, payload);
    // Pickles that provably mutate only their own objects may be loaded by
    // the C unpickler (see ksrpc_core::pickle_scan).
    let fast = ksrpc_core::pickle_scan::mutations_stay_local(payload);
    let result = shared
        .executor
        .bind(py)
        .call_method1("handle", (id, user.name.as_str(), rules, py_payload, fast))
        .map_err(internal)?;
    let (status, bad_request, reply, summary, cache_chain, raised): Handled<'_> = result.extract().map_err(internal)?;
    let outcome = raised.map_or(CallOutcome::Ok, |(kind, message)| CallOutcome::of_exception(&kind, &message));
    if let Some(message) = bad_request {
        return Err(ExecError::BadRequest { message, reply: zero_copy(reply), summary });
    }
    let len = reply.as_bytes().len() as u64;
    if len > shared.config.max_reply_bytes {
        let msg = over_reply_limit(len, shared.config.max_reply_bytes);
        let body = compat::error_reply("", "MemoryError", &msg, "", &compat::utc_now_iso());
        let outcome = CallOutcome::Error("MemoryError".into());
        return Ok(CompatReply { status: 500, body: body.into(), summary, cache_chain: None, outcome });
    }
    Ok(CompatReply { status, body: zero_copy(reply), summary, cache_chain, outcome })
}

/// The error message of a reply over `python.max_reply_bytes`.
fn over_reply_limit(len: u64, limit: u64) -> String {
    format!("the reply is {len} bytes, over the server's limit of {limit} (python.max_reply_bytes)")
}

fn control_loop(shared: &Arc<Shared>, rx: &Receiver<Control>) {
    loop {
        let msg = crossbeam_channel::select! {
            recv(rx) -> msg => match msg { Ok(msg) => msg, Err(_) => return },
            recv(shared.stopped) -> _ => return,
        };
        let (id, timeout) = match msg {
            Control::Timeout(id) => (id, true),
            Control::Cancel(id) => (id, false),
            Control::Lend => {
                // The waiting thread finishes its call later and the pool
                // shrinks back to size then (see `worker_loop`).
                if shared.workers.load(Ordering::SeqCst) < shared.config.threads.max(1) + MAX_EXTRA_THREADS {
                    if let Err(e) = spawn_worker(shared) {
                        tracing::error!("spawning a Python thread for a call waiting on its lane: {e}");
                    }
                }
                continue;
            }
        };
        let stuck = Python::attach(|py| {
            if let Err(e) = shared.executor.bind(py).call_method1("cancel", (id,)) {
                tracing::warn!("cancelling call {id}: {}", describe(py, &e));
            }
            let running = shared.running.lock().expect("running map poisoned");
            match (timeout, running.get(&id)) {
                (true, Some(&ident)) => {
                    let exc = py.get_type::<pyo3::exceptions::PyTimeoutError>();
                    // SAFETY: attached; `ident` is a live thread running call `id`
                    // (the map is only changed while attached).
                    unsafe { pyo3::ffi::PyThreadState_SetAsyncExc(ident as c_long, exc.as_ptr()) };
                    true
                }
                _ => false,
            }
        });
        // The interrupted thread may be blocked in C for a long time (an
        // asynchronous exception does not reach `time.sleep` or a socket
        // read): give the pool a fresh thread so the other users keep
        // `threads` of them. The stuck call stays charged to its user (see
        // `FairQueue`), so stuck threads number at most the users' caps;
        // MAX_EXTRA_THREADS is a last bound on top.
        if stuck {
            if shared.workers.load(Ordering::SeqCst) >= shared.config.threads.max(1) + MAX_EXTRA_THREADS {
                tracing::error!(call = id, "a call is stuck past its timeout and the pool has no replacement left");
            } else if let Err(e) = spawn_worker(shared) {
                tracing::error!("spawning a replacement Python thread: {e}");
            }
        }
    }
}

/// Most threads started to replace ones stuck past their call's timeout
/// (beyond `python.threads`); past it a stuck thread is not replaced and an
/// error is logged.
const MAX_EXTRA_THREADS: usize = 1024;

/// Frees a user's in-flight slot and, when the caller goes away before the
/// call ends, tells the executor to cancel it.
struct CallGuard<'a> {
    shared: &'a Shared,
    user: &'a str,
    id: u64,
    cancelled: Arc<AtomicBool>,
    finished: bool,
}

impl Drop for CallGuard<'_> {
    fn drop(&mut self) {
        if !self.finished {
            self.cancelled.store(true, Ordering::SeqCst);
            let _ = self.shared.control.send(Control::Cancel(self.id));
        }
        *self.shared.last_activity.lock().expect("activity poisoned") = Instant::now();
        self.shared.summaries.lock().expect("summaries poisoned").remove(&self.id);
        self.shared.seen.lock().expect("seen poisoned").remove(&self.id);
        let mut per_user = self.shared.per_user.lock().expect("per-user map poisoned");
        if let Some(n) = per_user.get_mut(self.user) {
            *n -= 1;
            if *n == 0 {
                per_user.remove(self.user);
            }
        }
    }
}

impl PyExecutor {
    /// Queues a job for `user` and waits for its answer, with the per-user
    /// cap, the call timeout (answered by `on_timeout`) and cancellation when
    /// the caller goes away.
    async fn submit<T>(
        &self,
        user: &Arc<User>,
        seen: Option<ChainSeen>,
        work: impl FnOnce(oneshot::Sender<Result<T, ExecError>>) -> Work,
        on_timeout: impl FnOnce(String, Option<String>) -> T,
    ) -> Result<T, ExecError> {
        let shared = &*self.shared;
        if shared.shutting_down.load(Ordering::SeqCst) {
            return Err(ExecError::ShuttingDown);
        }
        {
            let mut per_user = shared.per_user.lock().expect("per-user map poisoned");
            let n = per_user.entry(user.name.clone()).or_insert(0);
            if *n >= shared.config.max_calls_per_user {
                return Err(ExecError::Overloaded(format!("user {} already has {} calls in flight", user.name, n)));
            }
            *n += 1;
        }
        *shared.last_activity.lock().expect("activity poisoned") = Instant::now();
        let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
        let cancelled = Arc::new(AtomicBool::new(false));
        let mut guard = CallGuard { shared, user: &user.name, id, cancelled: cancelled.clone(), finished: false };
        if let Some(seen) = seen {
            shared.seen.lock().expect("seen poisoned").insert(id, seen);
        }
        let (tx, rx) = oneshot::channel();
        let job = Job { id, user: user.clone(), work: work(tx), cancelled };
        let key: Arc<str> = Arc::from(user.name.as_str());
        shared.queue.push(&key, job).map_err(|_| ExecError::ShuttingDown)?;
        let timeout = shared.config.call_timeout();
        let mut cut = shared.cut.subscribe();
        let answer = tokio::select! {
            answer = tokio::time::timeout(timeout, rx) => answer,
            // Cut at the end of the shutdown grace: the guard cancels the job.
            _ = cut.wait_for(|cut| *cut) => {
                tracing::warn!(user = %user.name, call = id, "call cut: the server is shutting down");
                return Err(ExecError::ShuttingDown);
            }
        };
        match answer {
            Ok(Ok(outcome)) => {
                guard.finished = true;
                outcome
            }
            Ok(Err(_)) => {
                guard.finished = true;
                Err(ExecError::Internal("the Python thread running the call vanished".into()))
            }
            Err(_) => {
                guard.finished = true;
                guard.cancelled.store(true, Ordering::SeqCst);
                let _ = shared.control.send(Control::Timeout(id));
                let summary = shared.summaries.lock().expect("summaries poisoned").remove(&id);
                let msg = format!("the call ran longer than the server's limit of {:.0} s", timeout.as_secs_f64());
                Ok(on_timeout(msg, summary))
            }
        }
    }
}

#[async_trait::async_trait]
impl Executor for PyExecutor {
    async fn call_compat(&self, request: CompatRequest) -> Result<CompatReply, ExecError> {
        self.compat(request, None).await
    }

    async fn call_compat_seen(&self, request: CompatRequest, seen: ChainSeen) -> Result<CompatReply, ExecError> {
        self.compat(request, Some(seen)).await
    }

    async fn call_native(&self, request: NativeRequest) -> Result<Outcome, ExecError> {
        let chain = request.chain;
        self.submit(
            &request.user,
            None,
            |reply| Work::Native { chain, reply },
            |message, _| Outcome::Err(RemoteError { kind: "TimeoutError".into(), message, traceback: String::new() }),
        )
        .await
    }
}

impl PyExecutor {
    async fn compat(&self, request: CompatRequest, seen: Option<ChainSeen>) -> Result<CompatReply, ExecError> {
        let payload = request.payload;
        self.submit(
            &request.user,
            seen,
            |reply| Work::Compat { payload, reply },
            |msg, summary| {
                let body = compat::error_reply("", "TimeoutError", &msg, "", &compat::utc_now_iso());
                // The chain, when Python had unpickled it before the timeout.
                let summary = summary.unwrap_or_else(|| String::from("<still unpickling>"));
                CompatReply {
                    status: 500,
                    body: body.into(),
                    summary,
                    cache_chain: None,
                    outcome: CallOutcome::Timeout,
                }
            },
        )
        .await
    }
}
