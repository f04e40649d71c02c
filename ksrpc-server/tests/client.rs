//! The Rust client against the real `ksrpc-server` binary, its embedded
//! CPython and the test venv (numpy, pandas, pyarrow), over HTTP and the
//! multiplexed WebSocket.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt, TryStreamExt};
use ksrpc_client::{batches_to_value, Client, Error, Transport, Value, SELF};
use serde_bytes::ByteBuf;

const BIN: &str = env!("CARGO_BIN_EXE_ksrpc-server");
const ADMIN: (&str, &str) = ("admin", "admin-pw");
const LIMITED: (&str, &str) = ("limited", "limited-pw");

/// The server binary on a free loopback port; killed on drop.
struct Server {
    child: Child,
    base: String,
    _dir: tempfile::TempDir,
}

impl Server {
    fn start() -> Server {
        Server::start_with(4, "")
    }

    /// A server with `threads` Python threads and `extra` TOML appended.
    fn start_with(threads: usize, extra: &str) -> Server {
        Server::start_logging(threads, extra, "warn", None)
    }

    /// [`Server::start_with`] with `RUST_LOG` set to `log` and the log
    /// written to `log_file` (else to the test's stderr).
    fn start_logging(threads: usize, extra: &str, log: &str, log_file: Option<&std::path::Path>) -> Server {
        Server::start_env(threads, extra, log, log_file, &[])
    }

    /// [`Server::start_logging`] with extra environment variables (config
    /// keys of sections the template already has: `KSRPC_SERVER__...`).
    fn start_env(
        threads: usize,
        extra: &str,
        log: &str,
        log_file: Option<&std::path::Path>,
        env: &[(&str, &str)],
    ) -> Server {
        let venv = std::env::var("KSRPC_TEST_VENV").expect("KSRPC_TEST_VENV is not set: run `cargo xtask test`");
        let modules = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/python/server_modules");
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("server.toml");
        std::fs::write(
            &config,
            format!(
                r#"
[server]
port = 0
[users.admin]
password = "{}"
rules = ["allow *"]
[users.limited]
password = "{}"
rules = ["allow ksrpc.server.demo", "allow bench_mod", "allow capsdk", "deny capsdk.secret*", "deny *"]
[python]
venv = {venv:?}
path = [{modules:?}]
threads = {threads}
parallel_modules = ["bench_mod"]
{extra}
"#,
                ADMIN.1, LIMITED.1
            ),
        )
        .unwrap();
        let mut child = Command::new(BIN)
            .arg("--config")
            .arg(&config)
            .env("RUST_LOG", log)
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(log_file.map_or_else(Stdio::inherit, |f| std::fs::File::create(f).unwrap().into()))
            .spawn()
            .unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        while !line.contains("listening on") {
            line.clear();
            assert!(Instant::now() < deadline, "the server did not start");
            assert_ne!(stdout.read_line(&mut line).unwrap(), 0, "the server exited");
        }
        let base = line.trim().rsplit(' ').next().unwrap().to_owned();
        // Keep draining stdout so the server never blocks on a full pipe.
        std::thread::spawn(move || std::io::copy(&mut stdout, &mut std::io::sink()));
        Server { child, base, _dir: dir }
    }

    /// The URL as given to the Python client for `transport`.
    fn url(&self, transport: Transport) -> String {
        match transport {
            Transport::Http => self.base.clone(),
            Transport::WebSocket => format!("{}/ws", self.base.replacen("http://", "ws://", 1)),
        }
    }

    /// The config file the server was started with.
    fn config(&self) -> std::path::PathBuf {
        self._dir.path().join("server.toml")
    }

    async fn client(&self, transport: Transport, (user, password): (&str, &str)) -> Client {
        Client::builder(self.url(transport)).credentials(user, password).connect().await.unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const BOTH: [Transport; 2] = [Transport::Http, Transport::WebSocket];

fn s(x: &str) -> Value {
    Value::Str(x.into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_values_errors_and_rules_over_both_transports() {
    let server = Server::start();
    for transport in BOTH {
        let client = server.client(transport, ADMIN).await;
        assert_eq!(client.transport(), transport);
        let demo = client.module("ksrpc.server.demo");
        let sum: i64 = demo.clone().call("add", (1, 2)).collect().await.unwrap();
        assert_eq!(sum, 3, "{transport:?}");
        let joined: String = demo.clone().call("add", ("a", "b")).collect().await.unwrap();
        assert_eq!(joined, "ab");
        let big = "123456789012345678901234567890";
        let v = demo.clone().call("add", (Value::BigInt(big.into()), 1)).await.unwrap();
        assert_eq!(v, Value::BigInt("123456789012345678901234567891".into()));
        // attribute, Self, get_item, keywords, a chain as an argument
        assert_eq!(demo.clone().attr("PASSWORD").await.unwrap(), Value::Int(123_456));
        let n: usize = demo.clone().attr("LIST").call("__len__", ()).collect().await.unwrap();
        assert_eq!(n, 5);
        let n: usize = demo.clone().attr("LIST").call("len", (SELF,)).collect().await.unwrap();
        assert_eq!(n, 5);
        assert_eq!(demo.clone().attr("LIST").get_item(-1).await.unwrap(), Value::Int(5));
        let kw = demo.clone().call_kw("add", (), [("a", 2), ("b", 40)]);
        assert_eq!(kw.await.unwrap(), Value::Int(42));
        let nested = demo.clone().call("add", (demo.clone().attr("PASSWORD"), 1));
        assert_eq!(nested.await.unwrap(), Value::Int(123_457));
        let pairs =
            client.module("builtins").call("dict", (Value::List(vec![Value::Tuple(vec![Value::Int(1), s("one")])]),));
        assert_eq!(pairs.await.unwrap(), Value::Dict(vec![(Value::Int(1), s("one"))]));
        // A Python exception arrives with its type, message and traceback.
        let err = demo.clone().call("div", (1, 0)).await.unwrap_err();
        let remote = err.remote().unwrap_or_else(|| panic!("{err}"));
        assert_eq!(remote.kind, "ZeroDivisionError");
        assert!(remote.traceback.contains("div"), "{}", remote.traceback);
        // A generator result is refused by value() and read by stream().
        let err = demo.clone().call("sync_counter", ()).await.unwrap_err();
        assert!(err.to_string().contains("stream"), "{err}");
        let items: Vec<Value> =
            client.module("bench_mod").call("countdown", (4,)).stream().await.unwrap().try_collect().await.unwrap();
        assert_eq!(items, vec![Value::Int(4), Value::Int(3), Value::Int(2), Value::Int(1)]);
        let items: Vec<Value> =
            demo.clone().call("async_counter", ()).stream().await.unwrap().try_collect().await.unwrap();
        assert!(!items.is_empty());
        // returned(): a value or a generator, for callers that cannot know which.
        match demo.clone().call("add", (1, 1)).returned().await.unwrap() {
            ksrpc_client::Returned::Value(v) => assert_eq!(v, Value::Int(2)),
            other => panic!("add returned {other:?}"),
        }
        match demo.clone().call("sync_counter", ()).returned().await.unwrap() {
            ksrpc_client::Returned::Generator(g) => {
                assert_eq!(
                    g.try_collect::<Vec<Value>>().await.unwrap(),
                    vec![Value::Int(1), Value::Int(2), Value::Int(3)]
                )
            }
            other => panic!("sync_counter returned {other:?}"),
        }
        // Dropping a stream early closes the generator; the connection goes on.
        let mut stream = client.module("bench_mod").call("countdown", (1000,)).stream().await.unwrap();
        assert_eq!(stream.next().await.unwrap().unwrap(), Value::Int(1000));
        drop(stream);
        assert_eq!(demo.clone().call("add", (2, 2)).await.unwrap(), Value::Int(4));

        // Rules: the limited user reaches the demo module and nothing else.
        let limited = server.client(transport, LIMITED).await;
        assert_eq!(limited.module("ksrpc.server.demo").call("add", (1, 1)).await.unwrap(), Value::Int(2));
        for forbidden in [
            limited.module("os").call("getcwd", ()),
            limited.module("ksrpc.server.demo").attr("random").attr("_os").call("getcwd", ()),
            limited.module("ksrpc.server.demo").attr("add").attr("__globals__"),
            limited.module("builtins").call("len", ((1, 2).into_value(),)),
        ] {
            let err = forbidden.clone().await.unwrap_err();
            let remote = err.remote().unwrap_or_else(|| panic!("{forbidden:?}: {err}"));
            assert!(matches!(remote.kind.as_str(), "PermissionError" | "AttributeError"), "{forbidden:?}: {remote:?}");
        }
        // A pickle value is refused for a user without builtins.
        let pickled = limited
            .module("bench_mod")
            .call("echo", (Value::Pickle(ByteBuf::from(b"\x80\x04K\x01.".to_vec())),))
            .await
            .unwrap_err();
        assert_eq!(pickled.remote().map(|r| r.kind.as_str()), Some("PermissionError"), "{pickled}");

        // Wrong password: a clear error, on both transports.
        let err = Client::builder(server.url(transport)).credentials("admin", "wrong").connect().await;
        let err = match err {
            Ok(c) => c.module("ksrpc.server.demo").call("add", (1, 2)).await.unwrap_err(),
            Err(e) => e,
        };
        assert!(matches!(err, Error::Unauthorized), "{transport:?}: {err}");
    }
}

/// Turns a tuple into a `Value::Tuple` (test shorthand).
trait IntoValue {
    fn into_value(self) -> Value;
}

impl IntoValue for (i64, i64) {
    fn into_value(self) -> Value {
        Value::Tuple(vec![self.0.into(), self.1.into()])
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dataframes_cross_as_arrow_record_batches() {
    use arrow_array::{Array, Float64Array, Int64Array, StringArray};

    let server = Server::start();
    for transport in BOTH {
        let client = server.client(transport, ADMIN).await;
        let batches = client.module("bench_mod").call("market_frame", (5000,)).record_batches().await.unwrap();
        let rows: usize = batches.iter().map(|b| b.num_rows()).sum();
        assert_eq!(rows, 5000);
        let schema = batches[0].schema();
        let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
        for want in ["date", "code", "open", "high", "low", "close", "volume"] {
            assert!(names.contains(&want), "{names:?}");
        }
        let close = batches[0].column_by_name("close").unwrap().as_any().downcast_ref::<Float64Array>().unwrap();
        assert!(close.iter().all(|c| c.is_some_and(|c| c > 0.0)));

        // A RecordBatch as an argument arrives as a pandas DataFrame.
        let batch = arrow_array::RecordBatch::try_from_iter([
            ("code", Arc::new(StringArray::from(vec!["600000", "600001", "600002"])) as Arc<dyn Array>),
            ("volume", Arc::new(Int64Array::from(vec![1, 2, 3])) as Arc<dyn Array>),
        ])
        .unwrap();
        let table = batches_to_value(std::slice::from_ref(&batch)).unwrap();
        let (n, columns, dtypes): (usize, Vec<String>, Vec<String>) =
            client.module("bench_mod").call("frame_summary", (table.clone(),)).collect().await.unwrap();
        assert_eq!((n, columns), (3, vec!["code".to_owned(), "volume".to_owned()]));
        assert_eq!(dtypes[1], "int64");
        // and back: DataFrame -> RecordBatch -> DataFrame -> RecordBatch is lossless
        let echoed = client.module("bench_mod").call("echo", (table,)).record_batches().await.unwrap();
        assert_eq!(echoed[0].num_rows(), 3);
        assert_eq!(echoed[0].column_by_name("volume").unwrap().as_ref(), batch.column(1).as_ref());
        assert_eq!(echoed[0].column_by_name("code").unwrap().as_ref(), batch.column(0).as_ref());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_calls_in_flight_on_one_websocket_and_small_ones_pass_a_big_reply() {
    let server = Server::start();
    let client = server.client(Transport::WebSocket, ADMIN).await;
    let received = Arc::new(AtomicU64::new(0));
    let total = Arc::new(AtomicU64::new(0));
    let (r, t) = (received.clone(), total.clone());
    let big = client
        .module("ksrpc.server.demo")
        .call("create_1d_array", (100,))
        .on_progress(move |got, all| {
            r.store(got, Ordering::SeqCst);
            if let Some(all) = all {
                t.store(all, Ordering::SeqCst);
            }
        })
        .value();
    let big = tokio::spawn(big);
    // Mixed sizes: small sums, 1 MB strings, small frames; all at once.
    let mut calls = Vec::new();
    for i in 0..99i64 {
        let c = client.clone();
        calls.push(tokio::spawn(async move {
            let demo = c.module("ksrpc.server.demo");
            match i % 3 {
                0 => assert_eq!(demo.call("add", (i, i)).await.unwrap(), Value::Int(2 * i)),
                1 => {
                    let s: String =
                        c.module("builtins").attr("str").call("__mul__", ("x", 1 << 20)).collect().await.unwrap();
                    assert_eq!(s.len(), 1 << 20);
                }
                _ => {
                    let b = c.module("bench_mod").call("market_frame", (100 + i,)).record_batches().await.unwrap();
                    assert_eq!(b.iter().map(|b| b.num_rows()).sum::<usize>() as i64, 100 + i);
                }
            }
        }));
    }
    for c in calls {
        c.await.unwrap();
    }
    // Now that the big reply is arriving, a small call must overtake it.
    let deadline = Instant::now() + Duration::from_secs(120);
    while received.load(Ordering::SeqCst) == 0 {
        assert!(Instant::now() < deadline, "the big reply never started");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let small = client.module("ksrpc.server.demo").call("add", (20, 22)).await.unwrap();
    let (got, all) = (received.load(Ordering::SeqCst), total.load(Ordering::SeqCst));
    assert_eq!(small, Value::Int(42));
    assert!(got < all, "the small call finished only after the whole big reply ({got} of {all} bytes)");
    let array = big.await.unwrap().unwrap();
    match array {
        Value::Table(ipc) => assert!(ipc.len() >= 100 << 20, "{}", ipc.len()),
        other => panic!("expected a table, got {:.80}", format!("{other:?}")),
    }
}

/// Cancelling a call whose reply is partly received leaves the socket
/// healthy: the server finishes that reply and the client discards it, so
/// no half-received message stays in the client's buffers. (Were the rest
/// dropped, six leftovers of at least 12 MB each would pass the client's
/// 64 MiB limit and kill the socket.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_replies_mid_transfer_leaves_the_socket_healthy() {
    let server = Server::start();
    let limits = ksrpc_client::Limits { max_encoded: 64 << 20, max_decoded: 64 << 20 };
    let client = Client::builder(server.url(Transport::WebSocket))
        .credentials(ADMIN.0, ADMIN.1)
        .reply_limits(limits)
        .connect()
        .await
        .unwrap();
    for _ in 0..6 {
        let started = Arc::new(tokio::sync::Notify::new());
        let s = started.clone();
        let big = client.module("ksrpc.server.demo").call("create_1d_array", (40,)).on_progress(move |got, total| {
            if total.is_some_and(|t| got * 10 >= t * 3) {
                s.notify_one();
            }
        });
        tokio::select! {
            biased;
            () = started.notified() => {} // dropping `big` here cancels it
            r = big.value() => panic!("the call finished before it was cancelled: {:?}", r.map(|_| ())),
        }
        assert_eq!(client.module("ksrpc.server.demo").call("add", (1, 2)).await.unwrap(), Value::Int(3));
        // Let the rest of the cancelled reply drain before the next one.
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let whole = client.module("ksrpc.server.demo").call("create_1d_array", (40,)).record_batches().await.unwrap();
    assert_eq!(whole.iter().map(|b| b.num_rows()).sum::<usize>(), 40 << 17);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeouts_and_dropped_calls_cancel_on_the_server() {
    let server = Server::start();
    for transport in [Transport::WebSocket, Transport::Http] {
        let client = server.client(transport, ADMIN).await;
        let bench = client.module("bench_mod");
        let before: u64 = bench.clone().call("cancelled_count", ()).collect().await.unwrap();
        let err = bench.clone().call("wait_for_cancel", (30.0,)).timeout(Duration::from_millis(300)).await.unwrap_err();
        assert!(matches!(err, Error::Timeout(_)), "{err}");
        // The server notices and cancels the coroutine.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let now: u64 = bench.clone().call("cancelled_count", ()).collect().await.unwrap();
            if now > before {
                break;
            }
            assert!(Instant::now() < deadline, "{transport:?}: the call was not cancelled on the server");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(bench.call("echo", (7,)).await.unwrap(), Value::Int(7));
    }
}

/// Waits up to `within` for `text` to appear in the file at `path`.
fn wait_for_line(path: &std::path::Path, text: &str, within: Duration) -> String {
    let deadline = Instant::now() + within;
    loop {
        let log = std::fs::read_to_string(path).unwrap_or_default();
        if log.contains(text) {
            return log;
        }
        assert!(Instant::now() < deadline, "no {text:?} in the log within {within:?}:\n{log}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits up to `within` for the server process to exit; its status.
fn exit_within(server: &mut Server, within: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = server.child.try_wait().unwrap() {
            return status;
        }
        assert!(Instant::now() < deadline, "the server did not exit within {within:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn signal(server: &Server, name: &str) {
    assert!(Command::new("kill")
        .arg(format!("-{name}"))
        .arg(server.child.id().to_string())
        .status()
        .unwrap()
        .success());
}

/// SIGTERM: a line says how many calls the server waits for and for how
/// long; at the end of `server.shutdown_grace` the calls still running are
/// answered that the server is shutting down (with a log line each), and
/// the server exits. Before, such calls were dropped with their connection,
/// no reason given and nothing logged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_waits_out_the_grace_then_answers_the_calls_still_running() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("server.log");
    let mut server = Server::start_env(4, "", "info", Some(&log), &[("KSRPC_SERVER__SHUTDOWN_GRACE", "2")]);
    let mut calls = Vec::new();
    for transport in BOTH {
        let client = server.client(transport, ADMIN).await;
        calls.push(tokio::spawn(async move { client.module("bench_mod").call("sleep", (60.0,)).await }));
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    signal(&server, "TERM");
    let waiting = wait_for_line(&log, "waiting up to 2 s for 2 calls in flight", Duration::from_secs(5));
    assert!(waiting.contains("SIGTERM"), "{waiting}");
    // A 60 s sleep answered "shutting down" was cut, not waited for.
    for call in calls {
        let err = tokio::time::timeout(Duration::from_secs(20), call).await.expect("answered").unwrap().unwrap_err();
        assert!(err.to_string().contains("shutting down"), "{err}");
    }
    let status = exit_within(&mut server, Duration::from_secs(20));
    assert!(status.success(), "{status:?}");
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(log.contains("shutdown grace over: cutting 2 calls still in flight"), "{log}");
    assert_eq!(log.matches("call cut: the server is shutting down").count(), 2, "a line per cut call:\n{log}");
}

/// SIGTERM with idle connections open (a native WebSocket, a 0.8.1
/// WebSocket, an HTTP keep-alive connection) and a big reply on its way
/// over each transport: the replies arrive whole, the idle sockets are
/// closed with 1001, and the server exits as soon as the last reply is out,
/// not at the end of its 120 s grace (before, an idle WebSocket held it
/// there: actix's graceful stop waits for every connection).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_closes_idle_connections_and_lets_replies_finish() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("server.log");
    let mut server = Server::start_env(4, "", "info", Some(&log), &[("KSRPC_SERVER__SHUTDOWN_GRACE", "120")]);
    let (mut idle_native, ()) = ws_connect(&server).await;
    let (mut idle_compat, ()) = ws_connect_to(&server, "/ws").await;
    let keep_alive = server.client(Transport::Http, ADMIN).await;
    assert_eq!(keep_alive.module("bench_mod").call("echo", (7,)).await.unwrap(), Value::Int(7));
    let mut big = Vec::new();
    for transport in BOTH {
        let client = server.client(transport, ADMIN).await;
        big.push(tokio::spawn(async move {
            // Built on the server for this call (about a second), then sent.
            let batches = client.module("bench_mod").call("market_frame", (1_000_000, 7)).record_batches().await?;
            Ok::<_, ksrpc_client::Error>(batches.iter().map(|b| b.num_rows()).sum::<usize>())
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let signalled = Instant::now();
    signal(&server, "TERM");
    for (transport, call) in BOTH.iter().zip(big) {
        let rows = tokio::time::timeout(Duration::from_secs(60), call).await.expect("answered").unwrap();
        let rows = rows.unwrap_or_else(|e| panic!("{transport:?}: {e}\n{}", std::fs::read_to_string(&log).unwrap()));
        assert_eq!(rows, 1_000_000, "{transport:?}");
    }
    for (name, ws) in [("native", &mut idle_native), ("0.8.1", &mut idle_compat)] {
        let (_, code) = read_until_close(ws).await;
        assert_eq!(code, Some(1001), "the idle {name} socket is closed as going away");
    }
    let status = exit_within(&mut server, Duration::from_secs(30));
    assert!(status.success(), "{status:?}");
    eprintln!("exited {:?} after SIGTERM (grace 120 s)", signalled.elapsed());
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(!log.contains("call cut"), "nothing was cut:\n{log}");
}

/// A second signal stops at once, without waiting out a long grace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_stops_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("server.log");
    let mut server = Server::start_env(4, "", "info", Some(&log), &[("KSRPC_SERVER__SHUTDOWN_GRACE", "120")]);
    let client = server.client(Transport::WebSocket, ADMIN).await;
    let call = tokio::spawn(async move { client.module("bench_mod").call("sleep", (60.0,)).await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    signal(&server, "INT");
    wait_for_line(&log, "waiting up to 120 s for 1 calls in flight", Duration::from_secs(5));
    signal(&server, "INT");
    // Well inside the 120 s grace the first signal granted.
    exit_within(&mut server, Duration::from_secs(10));
    let err = tokio::time::timeout(Duration::from_secs(10), call).await.expect("answered").unwrap().unwrap_err();
    assert!(!err.to_string().is_empty());
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(log.contains("second SIGINT: stopping at once"), "{log}");
}

/// Any value (other than chains and markers, which the server resolves, and
/// tables and pickles, tested on their own) comes back from `echo` as sent.
#[test]
fn every_value_type_round_trips_through_the_server() {
    use proptest::prelude::*;

    fn key() -> impl Strategy<Value = Value> {
        // Python merges equal keys (1 == 1.0 == True), so keys are of kinds
        // that never compare equal, and unique.
        prop_oneof!["[a-z]{0,6}".prop_map(Value::Str), any::<i64>().prop_map(Value::Int)]
    }
    fn leaf() -> impl Strategy<Value = Value> {
        prop_oneof![
            Just(Value::None),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::Int),
            (any::<bool>(), "[1-9][0-9]{19,40}").prop_map(|(neg, d)| Value::BigInt(if neg {
                format!("-{d}")
            } else {
                d
            })),
            any::<f64>().prop_map(Value::Float),
            ".{0,12}".prop_map(Value::Str),
            proptest::collection::vec(any::<u8>(), 0..40).prop_map(|b| Value::Bytes(ByteBuf::from(b))),
        ]
    }
    let value = leaf().prop_recursive(3, 40, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::List),
            proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Tuple),
            proptest::collection::vec((key(), inner), 0..6).prop_map(|pairs| {
                let mut seen = Vec::new();
                Value::Dict(
                    pairs
                        .into_iter()
                        .filter(|(k, _)| {
                            !seen.contains(k) && {
                                seen.push(k.clone());
                                true
                            }
                        })
                        .collect(),
                )
            }),
        ]
    });
    /// Equality with NaN equal to itself (it round-trips bit for bit).
    fn same(a: &Value, b: &Value) -> bool {
        match (a, b) {
            (Value::Float(x), Value::Float(y)) => x.to_bits() == y.to_bits(),
            (Value::List(x), Value::List(y)) | (Value::Tuple(x), Value::Tuple(y)) => {
                x.len() == y.len() && x.iter().zip(y).all(|(a, b)| same(a, b))
            }
            (Value::Dict(x), Value::Dict(y)) => {
                x.len() == y.len() && x.iter().zip(y).all(|((ka, va), (kb, vb))| same(ka, kb) && same(va, vb))
            }
            _ => a == b,
        }
    }

    let server = Server::start();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let clients = rt.block_on(async {
        [server.client(Transport::Http, ADMIN).await, server.client(Transport::WebSocket, ADMIN).await]
    });
    let config = proptest::test_runner::Config { cases: 96, failure_persistence: None, ..Default::default() };
    proptest::test_runner::TestRunner::new(config)
        .run(&value, |v| {
            for client in &clients {
                let got = rt.block_on(client.module("bench_mod").call("echo", (v.clone(),)).value()).unwrap();
                prop_assert!(same(&got, &v), "{:?}: sent {v:?}, got {got:?}", client.transport());
            }
            Ok(())
        })
        .unwrap();
}

/// A TLS front for the server, as users put one (or frp with TLS) before
/// it: TLS on a loopback port with a fresh self-signed certificate for
/// `localhost`, forwarding plain bytes to the server. Returns the port and
/// the certificate (PEM).
async fn tls_front(server: &Server) -> (u16, String) {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let upstream = server.base.trim_start_matches("http://").split('/').next().unwrap().to_owned();
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let pem = cert.cert.pem();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(cert.signing_key.serialize_der().into());
    let config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(vec![cert.cert.der().clone()], key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, upstream) = (acceptor.clone(), upstream.clone());
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else { return };
                let Ok(mut plain) = tokio::net::TcpStream::connect(upstream).await else { return };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
            });
        }
    });
    (port, pem)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_and_wss_through_a_tls_front_with_a_private_root() {
    let server = Server::start();
    let (port, pem) = tls_front(&server).await;
    calls_over_tls_need_the_root(&port.to_string(), &pem).await;
}

/// Over `https://localhost:PORT` and `wss://`: a call and a table go through
/// with `pem` as the root; without it the certificate is refused and no call
/// goes through.
async fn calls_over_tls_need_the_root(port: &str, pem: &str) {
    for url in [format!("https://localhost:{port}/api/v1"), format!("wss://localhost:{port}/api/v1/ws")] {
        let client = Client::builder(&url)
            .add_root_certificate_pem(pem.to_owned())
            .credentials(ADMIN.0, ADMIN.1)
            .connect()
            .await
            .unwrap();
        assert_eq!(client.module("ksrpc.server.demo").call("add", (1, 2)).await.unwrap(), Value::Int(3), "{url}");
        let frame = client.module("bench_mod").call("market_frame", (300,)).record_batches().await.unwrap();
        assert_eq!(frame.iter().map(|b| b.num_rows()).sum::<usize>(), 300);
        let untrusted = async {
            let c = Client::builder(&url).credentials(ADMIN.0, ADMIN.1).connect().await?;
            c.module("ksrpc.server.demo").call("add", (1, 2)).await
        };
        let err = untrusted.await.unwrap_err();
        assert!(matches!(err, Error::Connection(_)), "{url}: {err}");
    }
}

/// A fresh self-signed certificate for `localhost` written as PEM files:
/// (dir holding `cert.pem` and `key.pem`, the certificate's PEM).
fn self_signed_files() -> (tempfile::TempDir, String) {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("cert.pem"), cert.cert.pem()).unwrap();
    std::fs::write(dir.path().join("key.pem"), cert.signing_key.serialize_pem()).unwrap();
    (dir, cert.cert.pem())
}

/// `[server.tls]`: the server's own HTTPS and WSS on its one port, trusted
/// through a private root; refused without it, and plain HTTP gets nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_and_wss_from_the_servers_own_tls_with_a_private_root() {
    let (certs, pem) = self_signed_files();
    let tls = format!(
        "[server.tls]\ncert = {:?}\nkey = {:?}\n",
        certs.path().join("cert.pem").display().to_string(),
        certs.path().join("key.pem").display().to_string()
    );
    let server = Server::start_with(4, &tls);
    assert!(server.base.starts_with("https://127.0.0.1:"), "the listening line says https: {}", server.base);
    let port = server.base.trim_start_matches("https://127.0.0.1:").split('/').next().unwrap().to_owned();
    calls_over_tls_need_the_root(&port, &pem).await;
    // Plain HTTP on the TLS port: no answer a client could take for a reply.
    let plain = Client::builder(format!("http://127.0.0.1:{port}/api/v1")).credentials(ADMIN.0, ADMIN.1);
    let attempt = async { plain.connect().await?.module("ksrpc.server.demo").call("add", (1, 2)).await };
    assert!(tokio::time::timeout(Duration::from_secs(30), attempt).await.expect("answered or closed").is_err());
}

#[test]
fn the_blocking_client_works_from_plain_threads() {
    let server = Server::start();
    let client = ksrpc_client::blocking::Client::connect(
        Client::builder(server.url(Transport::WebSocket)).credentials(ADMIN.0, ADMIN.1),
    )
    .unwrap();
    let threads: Vec<_> = (0..4i64)
        .map(|i| {
            let c = client.clone();
            std::thread::spawn(move || c.module("ksrpc.server.demo").call("add", (i, 1)).collect::<i64>().unwrap())
        })
        .collect();
    let sums: Vec<i64> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    assert_eq!(sums, vec![1, 2, 3, 4]);
    let items = client.module("bench_mod").call("countdown", (2,)).collect_stream().unwrap();
    assert_eq!(items, vec![Value::Int(2), Value::Int(1)]);
}

// ---------------------------------------------------------------------------
// Raw wire: what a hostile or outdated peer gets.
// ---------------------------------------------------------------------------

fn basic(user: &str, password: &str) -> String {
    use base64::Engine;
    format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}")))
}

fn timestamp() -> String {
    format!("{}", std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64())
}

/// `varint(version) ++ postcard(message)`, zstd-compressed.
fn versioned(version: u16, message: &ksrpc_core::native::ClientMessage) -> Vec<u8> {
    let mut out = postcard::to_allocvec(&version).unwrap();
    out = postcard::to_extend(message, out).unwrap();
    zstd::encode_all(&out[..], 3).unwrap()
}

fn add_call(id: u64) -> ksrpc_core::native::ClientMessage {
    let chain = ksrpc_core::CallChain::new("ksrpc.server.demo")
        .then(ksrpc_core::Call::method("add", vec![Value::Int(1), Value::Int(2)]));
    ksrpc_core::native::ClientMessage::Call { id, chain }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_protocol_version_is_refused_with_a_reason() {
    let server = Server::start();
    let http = reqwest_like_post(&format!("{}/v2/call", server.base), versioned(2, &add_call(1))).await;
    assert_eq!(http.0, 400);
    let refused: ksrpc_core::native::ServerMessage =
        ksrpc_core::native::decode_compressed(&http.1, ksrpc_core::Limits::default()).unwrap();
    assert!(
        matches!(&refused, ksrpc_core::native::ServerMessage::Refused { reason } if reason.contains("version 2")),
        "{refused:?}"
    );

    let (mut ws, _) = ws_connect(&server).await;
    let frame =
        ksrpc_core::mux::frame(ksrpc_core::mux::Header { id: 1, fin: true, total: None }, &versioned(9, &add_call(1)));
    ws.send(tungstenite::Message::Binary(frame)).await.unwrap();
    let (refused, close) = read_until_close(&mut ws).await;
    assert!(refused.iter().any(|r| r.contains("version 9")), "{refused:?}");
    assert_eq!(close, Some(1008));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_frames_close_the_socket_with_a_reason_and_others_go_on() {
    use ksrpc_core::mux::{frame, Header};
    let server = Server::start();
    let witness = server.client(Transport::WebSocket, ADMIN).await;
    let cases: Vec<(&str, Vec<Vec<u8>>, u16)> = vec![
        ("reserved flags", vec![vec![0x80, 1, 2, 3]], 1002),
        ("empty frame", vec![vec![]], 1002),
        ("truncated varint", vec![vec![1, 0xff]], 1002),
        ("not zstd", vec![frame(Header { id: 1, fin: true, total: None }, b"garbage!").to_vec()], 1007),
        (
            "zstd of garbage",
            vec![frame(
                Header { id: 1, fin: true, total: None },
                &zstd::encode_all(&b"\x01\xff\xff\xff"[..], 1).unwrap(),
            )
            .to_vec()],
            1007,
        ),
        ("announced 1 TiB", vec![frame(Header { id: 1, fin: false, total: Some(1 << 40) }, b"x").to_vec()], 1009),
        (
            "zstd bomb",
            vec![frame(
                Header { id: 1, fin: true, total: None },
                &zstd::encode_all(&vec![0u8; 600 << 20][..], 1).unwrap(),
            )
            .to_vec()],
            1007,
        ),
        (
            "duplicate id",
            vec![frame(Header { id: 5, fin: true, total: None }, &versioned(1, &sleep_call(5))).to_vec(); 2],
            1008,
        ),
        (
            "request id 0",
            vec![frame(Header { id: 0, fin: true, total: None }, &versioned(1, &add_call(0))).to_vec()],
            1008,
        ),
    ];
    for (name, frames, code) in cases {
        let (mut ws, _) = ws_connect(&server).await;
        for f in frames {
            ws.send(tungstenite::Message::Binary(f.into())).await.unwrap();
        }
        let (refused, close) = read_until_close(&mut ws).await;
        assert_eq!(close, Some(code), "{name}: {refused:?}");
        assert!(!refused.is_empty(), "{name}: a Refused message says why");
        // Everyone else is still served.
        assert_eq!(witness.module("ksrpc.server.demo").call("add", (1, 2)).await.unwrap(), Value::Int(3), "{name}");
    }
    // Text frames are not part of the protocol.
    let (mut ws, _) = ws_connect(&server).await;
    ws.send(tungstenite::Message::Text("hello".into())).await.unwrap();
    assert_eq!(read_until_close(&mut ws).await.1, Some(1003));
}

fn sleep_call(id: u64) -> ksrpc_core::native::ClientMessage {
    sleep_for(id, 1.0)
}

fn sleep_for(id: u64, seconds: f64) -> ksrpc_core::native::ClientMessage {
    let chain =
        ksrpc_core::CallChain::new("bench_mod").then(ksrpc_core::Call::method("sleep", vec![Value::Float(seconds)]));
    ksrpc_core::native::ClientMessage::Call { id, chain }
}

/// `CloseHandle` messages used to start a task each outside the socket's
/// backpressure: while the socket's call places were all taken, a client
/// could queue any number of them (each a task and a message held). Now
/// they count against the 1024 accepted-and-unanswered messages like calls,
/// so past that the socket is not read (seen here: a ping sent after 1100 of
/// them is answered only once the calls holding the places end).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_handle_floods_count_against_the_sockets_backpressure() {
    use ksrpc_core::mux::{frame, Header};
    use ksrpc_core::native::ClientMessage;
    let server = Server::start_with(40, "[limits]\nmax_running_per_user = 32");
    let (mut ws, _) = ws_connect(&server).await;
    let send = |id: u64, m: &ClientMessage| {
        tungstenite::Message::Binary(frame(Header { id, fin: true, total: None }, &versioned(1, m)))
    };
    for id in 1..=32 {
        ws.send(send(id, &sleep_for(id, 3.0))).await.unwrap();
    }
    for i in 0..1100u64 {
        let handle = std::num::NonZeroU64::new(1_000_000 + i).unwrap();
        ws.send(send(100 + i, &ClientMessage::CloseHandle { handle })).await.unwrap();
    }
    let pinged = Instant::now();
    ws.send(tungstenite::Message::Ping(b"still reading?".to_vec().into())).await.unwrap();
    let mut replies = 0;
    let pong_after = loop {
        let msg = tokio::time::timeout(Duration::from_secs(60), ws.next()).await.expect("the pong comes");
        match msg {
            Some(Ok(tungstenite::Message::Pong(_))) => break pinged.elapsed(),
            Some(Ok(tungstenite::Message::Binary(_))) => replies += 1,
            Some(Ok(_)) => {}
            other => panic!("the socket ended: {other:?}"),
        }
    };
    assert!(
        pong_after >= Duration::from_millis(1500),
        "the socket was read past 1024 pending messages: pong after {pong_after:?}, {replies} replies before it"
    );
}

type RawWs = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;
use tokio_tungstenite::tungstenite;

async fn ws_connect(server: &Server) -> (RawWs, ()) {
    ws_connect_to(server, "/v2/ws").await
}

/// A raw WebSocket to `path` under the server's base, as the admin.
async fn ws_connect_to(server: &Server, path: &str) -> (RawWs, ()) {
    use tungstenite::client::IntoClientRequest;
    let url = format!("{}{path}", server.base.replacen("http://", "ws://", 1));
    let mut request = url.into_client_request().unwrap();
    request.headers_mut().insert("Authorization", basic(ADMIN.0, ADMIN.1).parse().unwrap());
    request.headers_mut().insert("X-Timestamp", timestamp().parse().unwrap());
    let (ws, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    (ws, ())
}

/// Reads until the server closes; returns the `Refused` reasons seen and
/// the close code.
async fn read_until_close(ws: &mut RawWs) -> (Vec<String>, Option<u16>) {
    let mut reasons = Vec::new();
    let mut reassembler = ksrpc_core::mux::Reassembler::new(ksrpc_core::Limits::default());
    let deadline = Duration::from_secs(30);
    loop {
        let msg = tokio::time::timeout(deadline, ws.next()).await.expect("the server closes the socket");
        match msg {
            Some(Ok(tungstenite::Message::Binary(b))) => {
                if let Some(m) = reassembler.push(&b).unwrap().message {
                    if let Ok(ksrpc_core::native::ServerMessage::Refused { reason }) =
                        ksrpc_core::native::decode_compressed(&m, ksrpc_core::Limits::default())
                    {
                        reasons.push(reason);
                    }
                }
            }
            Some(Ok(tungstenite::Message::Close(c))) => return (reasons, c.map(|c| u16::from(c.code))),
            Some(Ok(_)) => {}
            Some(Err(_)) | None => return (reasons, None),
        }
    }
}

/// Starts a compat upload (`POST /chunk`) announcing `total` bytes and
/// sends `first` of them; the connection stays open.
async fn start_upload(
    server: &Server,
    (user, password): (&str, &str),
    total: usize,
    first: &[u8],
) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let rest = server.base.strip_prefix("http://").unwrap();
    let (host, path) = rest.split_once('/').unwrap();
    let mut stream = tokio::net::TcpStream::connect(host).await.unwrap();
    let head = format!(
        "POST /{path}/chunk HTTP/1.1\r\nHost: {host}\r\nAuthorization: {}\r\nX-Timestamp: {}\r\n\
         Content-Length: {total}\r\n\r\n",
        basic(user, password),
        timestamp(),
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(first).await.unwrap();
    stream
}

/// The status line's code of the response on `stream`, or `None` when none
/// comes within `wait`.
async fn status_within(stream: &mut tokio::net::TcpStream, wait: Duration) -> Option<u16> {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::new();
    let read = async {
        let mut buf = [0u8; 4096];
        while !got.windows(2).any(|w| w == b"\r\n") {
            let n = stream.read(&mut buf).await.ok()?;
            if n == 0 {
                return None;
            }
            got.extend_from_slice(&buf[..n]);
        }
        String::from_utf8_lossy(&got).split(' ').nth(1)?.parse().ok()
    };
    tokio::time::timeout(wait, read).await.ok().flatten()
}

/// Three unfinished uploads of a few KiB each could pin 1.5 GiB of decoded
/// payload: nothing bounded the bytes requests hold. With a memory budget
/// (here 120 MB per user), a user's second big unfinished upload is answered
/// 503 at once, another user's upload and calls go on, and closing the first
/// gives its bytes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unfinished_uploads_cannot_take_the_memory_of_others() {
    let server = Server::start_with(
        4,
        "[limits]\nmax_inflight_bytes = 400000000\nmax_inflight_bytes_per_user = 120000000\nbody_idle_timeout = 30.0",
    );
    // Nine slices of 8 MiB of zeros, ~8 KiB each on the wire: 72 MiB decoded.
    let slice = {
        let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::best());
        std::io::Write::write_all(&mut z, &vec![0u8; ksrpc_core::codec::MAX_DECODED_SLICE as usize]).unwrap();
        let mut s = z.finish().unwrap();
        s.extend_from_slice(ksrpc_core::codec::BORDER);
        s
    };
    let part = slice.repeat(9);
    let total = part.len() * 100;
    let mut first = start_upload(&server, ADMIN, total, &part).await;
    assert_eq!(status_within(&mut first, Duration::from_secs(2)).await, None, "the first upload is read and waits");
    let mut second = start_upload(&server, ADMIN, total, &part).await;
    assert_eq!(
        status_within(&mut second, Duration::from_secs(20)).await,
        Some(503),
        "the same user's second big unfinished upload is refused at once"
    );
    // Another user is not affected: a complete upload of the same size is
    // read to its end (then refused for not being a pickle), and calls work.
    let mut other = start_upload(&server, LIMITED, part.len(), &part).await;
    assert_eq!(status_within(&mut other, Duration::from_secs(20)).await, Some(400));
    let client = server.client(Transport::Http, LIMITED).await;
    assert_eq!(client.module("ksrpc.server.demo").call("add", (1, 2)).await.unwrap(), Value::Int(3));
    // Closing the first upload gives its bytes back: the user may upload again.
    drop(first);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut again = start_upload(&server, ADMIN, part.len(), &part).await;
    assert_eq!(status_within(&mut again, Duration::from_secs(20)).await, Some(400));
}

/// A body that stops sending is answered 408 after `limits.body_idle_timeout`
/// (it used to wait forever, holding what it had sent).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_stops_sending_gets_408() {
    let server = Server::start_with(4, "[limits]\nbody_idle_timeout = 1.0");
    let mut stalled = start_upload(&server, ADMIN, 1 << 20, b"x").await;
    assert_eq!(status_within(&mut stalled, Duration::from_secs(20)).await, Some(408));
}

/// A bare HTTP/1.1 POST with credentials; returns status and body.
async fn reqwest_like_post(url: &str, body: Vec<u8>) -> (u16, Vec<u8>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = url.strip_prefix("http://").unwrap();
    let (host, path) = rest.split_once('/').unwrap();
    let mut stream = tokio::net::TcpStream::connect(host).await.unwrap();
    let head = format!(
        "POST /{path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: {}\r\nX-Timestamp: {}\r\n\
         Content-Type: application/x-ksrpc-native\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        basic(ADMIN.0, ADMIN.1),
        timestamp(),
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(&body).await.unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.unwrap();
    let split = response.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let head = String::from_utf8_lossy(&response[..split]).to_string();
    let status: u16 = head.split(' ').nth(1).unwrap().parse().unwrap();
    let body = response[split + 4..].to_vec();
    assert!(!head.to_ascii_lowercase().contains("transfer-encoding: chunked"), "{head}");
    (status, body)
}

// ---------------------------------------------------------------------------
// The `ksrpc` command line (built next to the server by `cargo xtask test`).
// ---------------------------------------------------------------------------

fn ksrpc_bin() -> std::path::PathBuf {
    let bin = std::path::Path::new(BIN).with_file_name("ksrpc");
    assert!(bin.exists(), "{} is missing: `cargo build -p ksrpc-client` (cargo xtask test does)", bin.display());
    bin
}

/// Runs `ksrpc call URL EXPR extra...` with a clean credential environment.
fn ksrpc_call(url: &str, expr: &str, extra: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let mut cmd = Command::new(ksrpc_bin());
    cmd.args(["call", url, expr]).args(extra).arg("--quiet").stdin(Stdio::null());
    for var in ["KSRPC_USER", "KSRPC_PASSWORD", "KSRPC_NETRC", "NETRC"] {
        cmd.env_remove(var);
    }
    cmd.env("HOME", "/nonexistent");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.code().unwrap_or(-1), text(&out.stdout), text(&out.stderr))
}

#[test]
fn the_ksrpc_command_line_calls_prints_writes_files_and_fails_clearly() {
    let server = Server::start();
    let creds = [("KSRPC_USER", ADMIN.0), ("KSRPC_PASSWORD", ADMIN.1)];
    for transport in BOTH {
        let url = server.url(transport);
        let (code, out, err) = ksrpc_call(&url, "ksrpc.server.demo.add(1, 2)", &[], &creds);
        assert_eq!((code, out.trim()), (0, "3"), "{transport:?}: {err}");
        let (code, out, _) = ksrpc_call(&url, "bench_mod.echo({'a': (1, 2.5, None), 'b': b'hi'})", &[], &creds);
        assert_eq!(code, 0);
        let json: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(json, serde_json::json!({"a": [1, 2.5, null], "b": {"base64": "aGk="}}));
        // A generator prints one JSON document per item.
        let (code, out, _) = ksrpc_call(&url, "bench_mod.countdown(3)", &[], &creds);
        assert_eq!((code, out.split_whitespace().collect::<Vec<_>>()), (0, vec!["3", "2", "1"]));
        // A Python exception: exit 1, the server's error on stderr, nothing on stdout.
        let (code, out, err) = ksrpc_call(&url, "ksrpc.server.demo.div(1, 0)", &[], &creds);
        assert_eq!(code, 1, "{err}");
        assert!(out.is_empty(), "{out}");
        assert!(err.starts_with("ZeroDivisionError: "), "{err}");
        assert!(err.contains("server traceback"), "{err}");
        // Wrong password, and a forbidden module for the limited user.
        let (code, _, err) =
            ksrpc_call(&url, "ksrpc.server.demo.add(1, 2)", &["--user", "admin", "--password", "nope"], &[]);
        assert_eq!(code, 2);
        assert!(err.contains("wrong user or password"), "{err}");
        assert!(!err.contains("nope"), "the password is never echoed: {err}");
        // A wrong path and a port nobody listens on: the cause and where it was tried.
        let wrong = url.replacen("/api/v1", "/api/v9", 1);
        let (code, _, err) = ksrpc_call(&wrong, "ksrpc.server.demo.add(1, 2)", &[], &creds);
        assert_eq!(code, 2, "{err}");
        assert!(err.contains("server.path") && err.contains("/api/v9"), "{transport:?}: {err}");
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let port = url.split(':').nth(2).unwrap().split('/').next().unwrap();
        let refused = url.replacen(port, &closed.to_string(), 1);
        let (code, _, err) = ksrpc_call(&refused, "ksrpc.server.demo.add(1, 2)", &[], &creds);
        assert_eq!(code, 2, "{err}");
        assert!(
            err.to_lowercase().contains("connection refused") && err.contains(&closed.to_string()),
            "{transport:?}: {err}"
        );
        let limited = [("KSRPC_USER", LIMITED.0), ("KSRPC_PASSWORD", LIMITED.1)];
        let (code, _, err) = ksrpc_call(&url, "os.getcwd()", &[], &limited);
        assert_eq!(code, 1);
        assert!(err.starts_with("PermissionError"), "{err}");
    }
    let url = server.url(Transport::Http);
    // Credentials from a netrc file; none at all is a clear error, not a prompt.
    let dir = tempfile::tempdir().unwrap();
    let netrc = dir.path().join("netrc");
    std::fs::write(&netrc, format!("machine 127.0.0.1\n  login {}\n  password {}\n", ADMIN.0, ADMIN.1)).unwrap();
    let netrc_env = [("KSRPC_NETRC", netrc.to_str().unwrap())];
    let (code, out, err) = ksrpc_call(&url, "ksrpc.server.demo.add(2, 2)", &[], &netrc_env);
    assert_eq!((code, out.trim()), (0, "4"), "{err}");
    let (code, _, err) = ksrpc_call(&url, "ksrpc.server.demo.add(2, 2)", &["--user", "admin"], &[]);
    assert_eq!(code, 2);
    assert!(err.contains("no password for admin"), "{err}");
    let (code, _, err) = ksrpc_call(&url, "ksrpc.server.demo.add(1,", &[], &creds);
    assert_eq!(code, 2);
    assert!(err.contains("parsing"), "{err}");

    // Tables: printed as a table, or written as Arrow, CSV and Parquet files
    // that pyarrow reads back.
    let (code, out, err) = ksrpc_call(&url, "bench_mod.market_frame(120)", &["--max-rows", "5"], &creds);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("| close") || out.contains("close |"), "{out}");
    assert!(out.contains("120 rows in all"), "{out}");
    let python = std::path::Path::new(&std::env::var("KSRPC_TEST_VENV").unwrap()).join("bin/python");
    for (ext, reader) in [
        ("parquet", "import pyarrow.parquet as m; t = m.read_table(p)"),
        ("arrow", "import pyarrow.ipc as m; t = m.open_file(p).read_all()"),
        ("csv", "import pyarrow.csv as m; t = m.read_csv(p)"),
    ] {
        let file = dir.path().join(format!("frame.{ext}"));
        let (code, out, err) =
            ksrpc_call(&url, "bench_mod.market_frame(120)", &["--out", file.to_str().unwrap()], &creds);
        assert_eq!(code, 0, "{ext}: {err}");
        assert!(out.is_empty());
        let check = Command::new(&python)
            .args([
                "-c",
                &format!("import sys; p = sys.argv[1]; {reader}; print(t.num_rows, 'close' in t.column_names)"),
            ])
            .arg(&file)
            .output()
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&check.stdout).trim(),
            "120 True",
            "{ext}: {}",
            String::from_utf8_lossy(&check.stderr)
        );
    }
    let (code, _, err) = ksrpc_call(&url, "ksrpc.server.demo.add(1, 2)", &["--out", "x.parquet"], &creds);
    assert_eq!(code, 2);
    assert!(err.contains("needs a table"), "{err}");
    // .json writes a table as records.
    let json_file = dir.path().join("frame.json");
    let (code, _, err) =
        ksrpc_call(&url, "bench_mod.market_frame(120)", &["--out", json_file.to_str().unwrap()], &creds);
    assert_eq!(code, 0, "{err}");
    let rows: Vec<serde_json::Value> = serde_json::from_str(&std::fs::read_to_string(&json_file).unwrap()).unwrap();
    assert_eq!(rows.len(), 120);
    assert!(rows[0]["close"].is_number() && rows[0]["code"] == "600000", "{:?}", rows[0]);
    // --out is checked before the call (the call would take 30 s), and a
    // generator is refused at its second item.
    for (out, says) in [("x.xlsx", "unknown extension"), ("/nonexistent-dir/x.csv", "does not exist")] {
        let (code, _, err) = ksrpc_call(&url, "bench_mod.sleep(30)", &["--out", out, "--timeout", "20"], &creds);
        assert_eq!(code, 2);
        assert!(err.contains(says) && !err.contains("timed out"), "{err}");
    }
    let (code, _, err) = ksrpc_call(&url, "bench_mod.countdown(1000)", &["--out", "x.json"], &creds);
    assert_eq!(code, 2);
    assert!(err.contains("generator"), "{err}");
    // Without pyarrow on the server a table comes as records, and still
    // prints as a table and writes every format.
    let hide = "builtins.exec(\"import sys; sys.modules['pyarrow'] = None\")";
    let (code, _, err) = ksrpc_call(&url, hide, &[], &creds);
    assert_eq!(code, 0, "{err}");
    let (code, out, err) = ksrpc_call(&url, "bench_mod.market_frame(120)", &["--max-rows", "5"], &creds);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("| close") || out.contains("close |"), "{out}");
    assert!(out.contains("120 rows in all"), "{out}");
    let csv = dir.path().join("records.csv");
    let (code, _, err) = ksrpc_call(&url, "bench_mod.market_frame(120)", &["--out", csv.to_str().unwrap()], &creds);
    assert_eq!(code, 0, "{err}");
    let text = std::fs::read_to_string(&csv).unwrap();
    assert_eq!(text.lines().count(), 121, "{text}");
    assert!(text.starts_with("date,code,open,high,low,close,volume"), "{text}");
}

/// One row of `tests/python/capability_table.json` (shared with the 0.8.1
/// client suite and the executor's Python tests).
#[derive(serde::Deserialize)]
struct CapabilityRow {
    module: String,
    chain: String,
    limited: String,
    star: String,
}

/// The row's chain as the CLI parses it, rooted at the row's module: the
/// parser takes the dotted path before the first call as the module, so the
/// part of it after the row's module becomes attribute steps again.
fn row_chain(row: &CapabilityRow, marker: &str) -> ksrpc_core::chain::CallChain<Value> {
    let text = format!("{}.{}", row.module, row.chain.replace("{marker}", marker));
    let mut chain = ksrpc_client::expr::parse(&text).unwrap_or_else(|e| panic!("{text}: {e}"));
    let rest = chain.module.strip_prefix(&row.module).unwrap_or_else(|| panic!("{text}: module {}", chain.module));
    let attrs: Vec<_> = rest.split('.').filter(|s| !s.is_empty()).map(ksrpc_core::chain::Call::attr).collect();
    chain.calls.splice(0..0, attrs);
    chain.module.clone_from(&row.module);
    chain
}

/// The capability rule over the native protocol: every row of the shared
/// table as the limited user (what the row expects, and no file written) and
/// as the admin (`allow *`: the same chain is not refused there).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capability_table_over_the_native_protocol() {
    let table = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/python/capability_table.json");
    let rows: Vec<CapabilityRow> = serde_json::from_str(&std::fs::read_to_string(table).unwrap()).unwrap();
    assert!(rows.len() >= 100);
    let server = Server::start();
    let dir = tempfile::tempdir().unwrap();
    let mut failures = Vec::new();
    for transport in BOTH {
        let limited = server.client(transport, LIMITED).await;
        let admin = server.client(transport, ADMIN).await;
        for (i, row) in rows.iter().enumerate() {
            for (who, client, expect) in [("limited", &limited, &row.limited), ("star", &admin, &row.star)] {
                let marker = dir.path().join(format!("m{i}-{who}-{transport:?}"));
                let chain = row_chain(row, &marker.display().to_string());
                let got = match client.chain(chain).value().await {
                    Ok(_) => "ok".to_owned(),
                    Err(Error::Remote(e)) if e.kind == "PermissionError" => "refused".to_owned(),
                    Err(Error::Remote(e)) => format!("error:{}", e.kind),
                    Err(e) => format!("client error {e}"),
                };
                let written: Vec<_> = std::fs::read_dir(dir.path())
                    .unwrap()
                    .filter_map(Result::ok)
                    .filter(|e| {
                        e.file_name().to_string_lossy().starts_with(&*marker.file_name().unwrap().to_string_lossy())
                    })
                    .map(|e| e.path())
                    .collect();
                for path in &written {
                    std::fs::remove_file(path).unwrap();
                }
                if &got != expect || (who == "limited" && !written.is_empty()) {
                    failures.push(format!(
                        "{transport:?} {who} {}.{}: expected {expect}, got {got}, wrote {written:?}",
                        row.module, row.chain
                    ));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{} rows failed:\n{}", failures.len(), failures.join("\n"));
}

/// One raw `GET generate_204` from the loopback address `source` (Linux
/// routes all of 127/8 to lo, so tests can be several clients); the status.
async fn probe_from(server: &Server, source: [u8; 4], credentials: (&str, &str)) -> u16 {
    probe_with(server, source, credentials, "").await
}

/// [`probe_from`] with `headers` (`Name: value\r\n` lines) added.
async fn probe_with(server: &Server, source: [u8; 4], (user, password): (&str, &str), headers: &str) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let url = server.base.strip_prefix("http://").unwrap();
    let (addr, path) = url.split_once('/').unwrap();
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind((std::net::Ipv4Addr::from(source), 0).into()).unwrap();
    let mut stream = socket.connect(addr.parse().unwrap()).await.unwrap();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
    let request = format!(
        "GET /{path}/generate_204 HTTP/1.1\r\nHost: {addr}\r\nAuthorization: {}\r\nX-Timestamp: {now}\r\n{headers}Connection: close\r\n\r\n",
        basic(user, password)
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut head = vec![0u8; 12];
    stream.read_exact(&mut head).await.unwrap();
    String::from_utf8_lossy(&head[9..12]).parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logins_cannot_be_used_against_other_people() {
    let server = Arc::new(Server::start());
    // An argon2 flood of random names from 127.0.0.3: past its few places it
    // is answered 429 without CPU, while admin's first (uncached) login from
    // another address gets in.
    let flood: Vec<_> = (0..64)
        .map(|i| {
            let server = server.clone();
            tokio::spawn(async move { probe_from(&server, [127, 0, 0, 3], (&format!("random{i}"), "x")).await })
        })
        .collect();
    let admin = probe_from(&server, [127, 0, 0, 4], ADMIN).await;
    let mut statuses = Vec::new();
    for f in flood {
        statuses.push(f.await.unwrap());
    }
    assert_eq!(admin, 204, "a real login during someone else's flood");
    assert!(statuses.iter().all(|s| [401, 429].contains(s)), "{statuses:?}");
    assert!(statuses.contains(&429), "the flood was never throttled: {statuses:?}");
    // Lockout as a weapon: 21 wrong passwords for `limited` (over the 20
    // failures that start delaying), then its right password, uncached, from
    // the guessing address itself and from another: both get in.
    for _ in 0..21 {
        assert_eq!(probe_from(&server, [127, 0, 0, 5], (LIMITED.0, "guess")).await, 401);
    }
    assert_eq!(probe_from(&server, [127, 0, 0, 5], LIMITED).await, 204, "refused after someone's failures");
    for _ in 0..21 {
        assert_eq!(probe_from(&server, [127, 0, 0, 6], (ADMIN.0, "guess")).await, 401);
    }
    assert_eq!(probe_from(&server, [127, 0, 0, 7], ADMIN).await, 204);
}

/// A 0.8.1 request for `demo.create_1d_array(mb)`, pickled by the client
/// venv's Python (dill, as that client does) and chunk-zlib encoded.
fn compat_request(mb: u32) -> Vec<u8> {
    let python = std::env::var("KSRPC_CLIENT_PYTHON_BIN").expect("KSRPC_CLIENT_PYTHON_BIN is set by cargo xtask test");
    let code = format!(
        "import sys, dill; from ksrpc.client import RpcCall; sys.stdout.buffer.write(dill.dumps(dict(\
         module='ksrpc.server.demo', calls=[RpcCall('create_1d_array', ({mb},), {{}})], ref_id=0)))"
    );
    let out = Command::new(python).args(["-c", &code]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    ksrpc_core::codec::encode_to_vec(&ksrpc_core::ChunkedZlib::default(), out.stdout.into()).unwrap()
}

/// Reads what `stream` still delivers (after the peer gave up, only what
/// the kernel had buffered) until EOF, an error or 30 s; returns the bytes.
async fn drain<S: tokio::io::AsyncRead + Unpin>(stream: &mut S) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    let mut all = Vec::new();
    let mut buf = vec![0u8; 1 << 20];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while let Ok(Ok(n)) = tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
        if n == 0 {
            break;
        }
        all.extend_from_slice(&buf[..n]);
    }
    all
}

/// A client that asks for a 100 MB reply and stops reading used to pin the
/// reply (and, over HTTP, a blocking thread of the encoder) for as long as
/// it stayed connected. With `limits.send_timeout` (2 s here) the server
/// gives up: reading afterwards yields only what was already in flight,
/// never the whole reply, over compat HTTP, compat WebSocket and `/v2/ws`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_stop_reading_are_dropped_after_the_send_timeout() {
    use tokio::io::AsyncWriteExt;
    let server = Server::start_with(4, "[limits]\nsend_timeout = 2.0");
    let request = compat_request(100);
    let rest = server.base.strip_prefix("http://").unwrap().to_owned();
    let (host, path) = rest.split_once('/').unwrap();

    // compat HTTP: the chunked body never reaches its final 0-size chunk.
    let mut http = tokio::net::TcpStream::connect(host).await.unwrap();
    let head = format!(
        "POST /{path}/chunk HTTP/1.1\r\nHost: {host}\r\nAuthorization: {}\r\nX-Timestamp: {}\r\nContent-Length: {}\r\n\r\n",
        basic(ADMIN.0, ADMIN.1),
        timestamp(),
        request.len()
    );
    http.write_all(head.as_bytes()).await.unwrap();
    http.write_all(&request).await.unwrap();

    // compat WebSocket: slices, borders and EOF in; the reply's EOF never comes.
    let mut compat_ws = {
        use tungstenite::client::IntoClientRequest;
        let mut req = server.url(Transport::WebSocket).into_client_request().unwrap();
        req.headers_mut().insert("Authorization", basic(ADMIN.0, ADMIN.1).parse().unwrap());
        req.headers_mut().insert("X-Timestamp", timestamp().parse().unwrap());
        let config = tungstenite::protocol::WebSocketConfig::default().max_message_size(None).max_frame_size(None);
        tokio_tungstenite::connect_async_with_config(req, Some(config), false).await.unwrap().0
    };
    // The request is one compressed slice followed by its border.
    let border = std::str::from_utf8(ksrpc_core::codec::BORDER).unwrap();
    let slice = &request[..request.len() - border.len()];
    compat_ws.send(tungstenite::Message::Binary(slice.to_vec().into())).await.unwrap();
    compat_ws.send(tungstenite::Message::Text(border.into())).await.unwrap();
    compat_ws.send(tungstenite::Message::Text("EOF".into())).await.unwrap();

    // v2: one call, its reply never finishes.
    let (mut v2, _) = ws_connect(&server).await;
    let chain = ksrpc_core::CallChain::new("ksrpc.server.demo")
        .then(ksrpc_core::Call::method("create_1d_array", vec![Value::Int(100)]));
    let call = ksrpc_core::native::ClientMessage::Call { id: 1, chain };
    let frame = ksrpc_core::mux::frame(ksrpc_core::mux::Header { id: 1, fin: true, total: None }, &versioned(1, &call));
    v2.send(tungstenite::Message::Binary(frame)).await.unwrap();

    // Nobody reads for longer than the send timeout (plus the call's own time).
    tokio::time::sleep(Duration::from_secs(8)).await;

    let got = drain(&mut http).await;
    assert!(got.starts_with(b"HTTP/1.1 200"), "{:?}", String::from_utf8_lossy(&got[..got.len().min(80)]));
    assert!(got.len() < 100 << 20, "the whole reply was kept for a client that stopped reading");
    assert!(!got.ends_with(b"\r\n0\r\n\r\n"), "the chunked reply was finished");

    let mut eof = false;
    let mut bytes = 0usize;
    while let Ok(Some(Ok(m))) = tokio::time::timeout(Duration::from_secs(30), compat_ws.next()).await {
        match m {
            tungstenite::Message::Text(t) if t.as_str() == "EOF" => eof = true,
            tungstenite::Message::Binary(b) => bytes += b.len(),
            tungstenite::Message::Close(_) => break,
            _ => {}
        }
    }
    assert!(!eof && bytes < 100 << 20, "the compat WebSocket reply was finished ({bytes} bytes)");

    let mut fin = false;
    let mut close = None;
    while let Ok(Some(Ok(m))) = tokio::time::timeout(Duration::from_secs(30), v2.next()).await {
        match m {
            tungstenite::Message::Binary(b) => fin |= ksrpc_core::mux::parse(&b).is_ok_and(|(h, _)| h.id == 1 && h.fin),
            tungstenite::Message::Close(c) => {
                close = c.map(|c| u16::from(c.code));
                break;
            }
            _ => {}
        }
    }
    assert!(!fin, "the v2 reply was finished for a client that stopped reading");
    assert!(matches!(close, None | Some(1008)), "{close:?}");
    // The server is fine for everyone else.
    let client = server.client(Transport::WebSocket, ADMIN).await;
    assert_eq!(client.module("ksrpc.server.demo").call("add", (1, 2)).await.unwrap(), Value::Int(3));
}

/// Decoding a compat request body never runs on a connection worker (an
/// actix arbiter thread) beyond a few KiB: bigger batches go to the
/// blocking pool, so a slice inflating 64-fold cannot stall the other
/// connections of that worker. Seen in the server's own debug line for each
/// batch it decodes (the old code decoded every piece on the worker).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_bodies_are_decoded_off_the_connection_workers() {
    use tokio::io::AsyncWriteExt;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("server.log");
    let server = Server::start_logging(4, "", "warn,ksrpc_transport_http=debug", Some(&log));
    // 1 MiB of random bytes: stored slices, about 1 MiB on the wire.
    let python = std::env::var("KSRPC_CLIENT_PYTHON_BIN").expect("KSRPC_CLIENT_PYTHON_BIN is set by cargo xtask test");
    let code = "import os, sys, dill; from ksrpc.client import RpcCall; sys.stdout.buffer.write(dill.dumps(dict(\
                module='ksrpc.server.demo', calls=[RpcCall('add', (os.urandom(1 << 20), b''), {})], ref_id=0)))";
    let out = Command::new(python).args(["-c", code]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let body = ksrpc_core::codec::encode_to_vec(&ksrpc_core::ChunkedZlib::default(), out.stdout.into()).unwrap();
    assert!(body.len() > 1 << 20);
    let mut upload = start_upload(&server, ADMIN, body.len(), &body).await;
    assert_eq!(status_within(&mut upload, Duration::from_secs(30)).await, Some(200));
    upload.shutdown().await.ok();
    drop(server);
    let text = std::fs::read_to_string(&log).unwrap();
    let batches: Vec<(u64, String)> = text
        .lines()
        .filter(|l| l.contains("decoding a request batch"))
        .map(|l| {
            let after = |key: &str| l.split(key).nth(1).unwrap_or("");
            let bytes = after("bytes=").split_whitespace().next().unwrap_or("").parse().unwrap_or(0);
            // a quoted value: the worker threads' names hold spaces
            let thread = after("thread=\"").split('"').next().unwrap_or("").to_owned();
            (bytes, thread)
        })
        .collect();
    let big: Vec<_> = batches.iter().filter(|(bytes, _)| *bytes > 4096).collect();
    assert!(!big.is_empty(), "no batch of the 1 MiB body was logged: {batches:?}");
    for (bytes, thread) in &big {
        // actix runs each connection worker on an arbiter thread
        // (`actix-rt|system:0|arbiter:N`), the server on `ksrpc-http`
        let worker = thread.starts_with("actix-rt|") || thread == "ksrpc-http";
        assert!(!worker, "{bytes} bytes decoded on the connection worker {thread:?}");
    }
}

/// With the result cache on, identical 0.8.1 requests whose chain is not
/// cacheable run side by side: three `barrier_wait(3)` at once meet at the
/// barrier. Which chain a compat request names is only known once Python
/// has read it, so identical requests wait for the first of them (single
/// flight); it used to hold them until it ended (three 1 s calls took 2 s,
/// and these three broke the barrier), now until Python has read it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identical_uncacheable_compat_calls_do_not_wait_for_each_other() {
    // 8 threads: a user may run 4 calls at once.
    let server = Server::start_with(8, "[cache]\nenabled = true\nttl = [\"bench_mod.cached_* 600\"]\n");
    let python = std::env::var("KSRPC_CLIENT_PYTHON_BIN").expect("KSRPC_CLIENT_PYTHON_BIN is set by cargo xtask test");
    let script = r#"
import asyncio, sys
from ksrpc.client import RpcClient
from ksrpc.connections.http import HttpConnection
from ksrpc.connections.websocket import WebSocketConnection
http_url, ws_url, user, password = sys.argv[1:5]

async def main():
    async with HttpConnection(http_url, username=user, password=password) as conn:
        bench = RpcClient("bench_mod", conn)
        print("http", await asyncio.gather(*(bench.barrier_wait(3, 5.0) for _ in range(3)), return_exceptions=True))
    conns = [WebSocketConnection(ws_url, username=user, password=password) for _ in range(3)]
    try:
        got = await asyncio.gather(*(RpcClient("bench_mod", c).barrier_wait(3, 5.0) for c in conns), return_exceptions=True)
        print("ws", got)
    finally:
        for c in conns:
            await c.__aexit__()

asyncio.run(main())
"#;
    let out = Command::new(python)
        .args(["-c", script, &server.base, &server.base.replacen("http://", "ws://", 1), ADMIN.0, ADMIN.1])
        .env("PRINT_PROGRESS", "0")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    for transport in ["http", "ws"] {
        let line = stdout.lines().find(|l| l.starts_with(transport)).unwrap_or_default();
        assert_eq!(line, format!("{transport} [True, True, True]"), "{stdout}");
    }
}

/// The result cache on the native protocol, as a deployment sees it: hits
/// served without running the call (counted on the server), shared by users
/// with the same rules and never given to a user the rules refuse, one run
/// for concurrent identical calls, tables through the cache, entries that
/// survive a `kill -9` and restart, damaged files dropped, and
/// `ksrpc-server cache stats|clear`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_result_cache_serves_hits_without_the_call_and_survives_a_restart() {
    const TWIN: (&str, &str) = ("twin", "twin-pw");
    let cache_dir = tempfile::tempdir().unwrap();
    let extra = format!(
        "[users.twin]\npassword = \"{}\"\nrules = [\"allow *\"]\n[cache]\nenabled = true\npath = {:?}\n\
         ttl = [\"cache_probe.cached_* 600\", \"cache_probe.brief 1\"]\n",
        TWIN.1,
        cache_dir.path()
    );
    let server = Server::start_with(8, &extra);
    let runs = |client: &Client, tag: &str| {
        let probe = client.module("cache_probe");
        let tag = tag.to_owned();
        async move { probe.call("runs", (tag,)).collect::<u64>().await.unwrap() }
    };
    for transport in BOTH {
        let tag = format!("{transport:?}");
        let admin = server.client(transport, ADMIN).await;
        let probe = admin.module("cache_probe");
        for _ in 0..3 {
            let sq: i64 = probe.clone().call("cached_square", (tag.as_str(), 7)).collect().await.unwrap();
            assert_eq!(sq, 49);
        }
        assert_eq!(runs(&admin, &tag).await, 1, "{transport:?}: hits do not run the call");
        // Same rules, another user: the same entry.
        let twin = server.client(transport, TWIN).await;
        let sq: i64 = twin.module("cache_probe").call("cached_square", (tag.as_str(), 7)).collect().await.unwrap();
        assert_eq!((sq, runs(&admin, &tag).await), (49, 1));
        // Rules that refuse the call: refused, never the cached answer.
        let limited = server.client(transport, LIMITED).await;
        let err = limited.module("cache_probe").call("cached_square", (tag.as_str(), 7)).await.unwrap_err();
        assert_eq!(err.remote().map(|r| r.kind.as_str()), Some("PermissionError"), "{err}");
        assert_eq!(runs(&admin, &tag).await, 1);
        // A table through the cache: the same record batches.
        let frame = format!("{tag}-frame");
        let first = probe.clone().call("cached_frame", (frame.as_str(), 20_000)).record_batches().await.unwrap();
        let again = probe.clone().call("cached_frame", (frame.as_str(), 20_000)).record_batches().await.unwrap();
        assert_eq!(first, again);
        assert_eq!(runs(&admin, &frame).await, 1);
    }
    // Concurrent identical calls on one socket: one run.
    let ws = server.client(Transport::WebSocket, ADMIN).await;
    let calls = (0..8).map(|_| ws.module("cache_probe").call("cached_square", ("flight", 3, 0.5)).collect::<i64>());
    let got = futures_util::future::try_join_all(calls).await.unwrap();
    assert_eq!((got, runs(&ws, "flight").await), (vec![9; 8], 1));

    // kill -9, restart on the same directory: served from disk (the fresh
    // interpreter has counted nothing).
    drop((ws, server));
    let server = Server::start_with(8, &extra);
    let admin = server.client(Transport::Http, ADMIN).await;
    let sq: i64 = admin.module("cache_probe").call("cached_square", ("Http", 7)).collect().await.unwrap();
    assert_eq!((sq, runs(&admin, "Http").await), (49, 0), "served from the disk tier");

    // The CLI reads the same directory.
    let stats = cli_in(&server, "stats");
    assert!(stats.contains("entries: 5 ") && stats.contains("damaged: 0"), "{stats}");

    // Damaged entries (truncated, garbage) are dropped, never served: the call runs.
    drop((admin, server));
    for (i, file) in std::fs::read_dir(cache_dir.path()).unwrap().enumerate() {
        let path = file.unwrap().path();
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, if i % 2 == 0 { &bytes[..bytes.len() / 2] } else { &b"\x80\x04garbage"[..] }).unwrap();
    }
    let server = Server::start_with(8, &extra);
    let admin = server.client(Transport::WebSocket, ADMIN).await;
    for tag in ["Http", "WebSocket"] {
        let sq: i64 = admin.module("cache_probe").call("cached_square", (tag, 7)).collect().await.unwrap();
        assert_eq!((sq, runs(&admin, tag).await), (49, 1), "{tag}: a damaged entry is not served");
    }
    let cleared = cli_in(&server, "clear");
    assert!(cleared.starts_with("removed "), "{cleared}");
    assert!(cli_in(&server, "stats").contains("entries: 0 "));
}

/// `ksrpc-server cache <action>` with the server's config; its stdout.
fn cli_in(server: &Server, action: &str) -> String {
    let out = Command::new(BIN).arg("--config").arg(server.config()).args(["cache", action]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// The log an admin reads: every call line names the peer and how the call
/// ended (refused by the rules, an exception's type, a timeout with its
/// chain, a generator's end); `X-Forwarded-For` counts only from a trusted
/// proxy; a flood of failed logins is bounded; `KSRPC_LOG_FORMAT=json`
/// writes the same fields as JSON.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_lines_name_the_peer_and_the_outcome_and_failed_logins_are_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("server.log");
    let extra = "[limits]\ncall_timeout = 1.0\n";
    let env = [("KSRPC_SERVER__TRUSTED_PROXIES", "[\"127.0.0.2\"]"), ("KSRPC_LOG_FORMAT", "json")];
    let server = Server::start_env(4, extra, "info", Some(&log), &env);
    let admin = server.client(Transport::Http, ADMIN).await;
    let limited = server.client(Transport::WebSocket, LIMITED).await;
    let _: i64 = admin.module("ksrpc.server.demo").call("add", (1, 2)).collect().await.unwrap();
    assert!(limited.module("os").call("getcwd", ()).await.is_err());
    assert!(admin.module("ksrpc.server.demo").call("div", (1, 0)).await.is_err());
    assert!(admin.module("bench_mod").call("sleep", (5.0,)).await.is_err());
    let items: Vec<Value> =
        admin.module("bench_mod").call("countdown", (1,)).stream().await.unwrap().try_collect().await.unwrap();
    assert_eq!(items.len(), 1);
    // Through the trusted proxy 127.0.0.2 the forwarded address counts; from
    // 127.0.0.3 the header is the client's own claim and is ignored.
    let forwarded = "X-Forwarded-For: 203.0.113.7\r\n";
    assert_eq!(probe_with(&server, [127, 0, 0, 2], ("mallory", "guess"), forwarded).await, 401);
    assert_eq!(probe_with(&server, [127, 0, 0, 3], ("mallory", "guess"), forwarded).await, 401);
    // A flood of 60 failed logins (different names: no penalty delays).
    for i in 0..60 {
        assert_eq!(probe_from(&server, [127, 0, 0, 4], (&format!("guess{i}"), "x")).await, 401);
    }
    drop(server);
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<serde_json::Value> = text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    assert!(lines.len() > 10, "the log is not JSON lines:\n{text}");
    let call = |chain: &str| {
        lines
            .iter()
            .find(|l| l["chain"] == chain && l["message"].as_str().is_some_and(|m| m.ends_with("call")))
            .unwrap_or_else(|| panic!("no call line for {chain}:\n{text}"))
    };
    let add = call("ksrpc.server.demo.add(2 args)");
    assert_eq!(
        (&add["outcome"], &add["peer"], &add["level"]),
        (&serde_json::json!("ok"), &serde_json::json!("127.0.0.1"), &serde_json::json!("INFO"))
    );
    let refused = call("os.getcwd()");
    assert_eq!(
        (&refused["outcome"], &refused["user"], &refused["level"]),
        (&serde_json::json!("refused"), &serde_json::json!("limited"), &serde_json::json!("WARN"))
    );
    assert!(refused["reason"].as_str().unwrap_or_default().contains("(rule deny *)"), "the refusing rule: {refused}");
    assert_eq!(call("ksrpc.server.demo.div(2 args)")["outcome"], serde_json::json!("error:ZeroDivisionError"));
    assert_eq!(call("bench_mod.sleep(1 arg)")["outcome"], serde_json::json!("timeout"));
    assert!(lines.iter().any(|l| l["outcome"] == "end"), "no generator end line:\n{text}");
    let failed: Vec<&serde_json::Value> = lines.iter().filter(|l| l["message"] == "login failed").collect();
    assert_eq!(failed[0]["peer"], serde_json::json!("203.0.113.7"), "through the trusted proxy");
    assert_eq!(failed[1]["peer"], serde_json::json!("127.0.0.3"), "the untrusted peer's own header is ignored");
    assert!(failed.len() <= 20, "{} failed-login lines for 62 failures: not bounded", failed.len());
}
