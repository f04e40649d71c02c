//! `cargo xtask bench [--quick]`: our server and the original Python ksrpc
//! 0.8.1 server, started side by side on loopback with equivalent configs,
//! measured with the same workloads in the same run. Prints a Markdown table
//! (workload, original, ours, ratio) and writes JSON to `target/bench/`.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use base64::Engine;
use bytes::Bytes;
use ksrpc_core::codec::{encode_to_vec, ChunkedZlib, Level};
use serde_json::{json, Value};

use ksrpc_client::Transport;

use crate::suite::Server;
use crate::test::{root, Env};
use crate::{python, rust_client};

const USER: &str = "admin";
const PASSWORD: &str = "bench-password";
const PACKAGES_ORIG: &[&str] = &["ksrpc==0.8.1", "dill", "numpy", "pandas<3"];

/// Sizes of one run: full, or `--quick` for a smoke run.
struct Plan {
    mb: u64,
    rows: u64,
    repeat: u64,
    seconds: u64,
}

impl Plan {
    const FULL: Plan = Plan { mb: 100, rows: 1_000_000, repeat: 3, seconds: 10 };
    const QUICK: Plan = Plan { mb: 10, rows: 100_000, repeat: 1, seconds: 2 };
}

fn build_release(env: &Env) -> Result<()> {
    eprintln!("==> building our server (release)");
    let status = env.cargo().args(["build", "--release", "-p", "ksrpc-server"]).status()?;
    anyhow::ensure!(status.success(), "building the server failed");
    Ok(())
}

/// A server under test: its base URL and process id (for RSS).
struct Target {
    url: String,
    pid: u32,
}

/// The original server, stopped when dropped.
struct Original {
    child: Child,
}

impl Drop for Original {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn start_original(env: &Env, venv_python: &Path, dir: &Path) -> Result<(Original, String)> {
    let port = free_port()?;
    let config = dir.join("config_server.py");
    std::fs::write(
        &config,
        format!(
            "PORT = {port}\nHOST = \"127.0.0.1\"\nPATH = \"/api/v1\"\nTIMESTAMP_CHECK = 30\n\
             USER_CREDENTIALS = {{\"{USER}\": \"{PASSWORD}\"}}\nUSER_RULES = {{\"{USER}\": {{\"*\": True}}}}\n\
             CACHE_ENABLE = True\nCACHE_PATH = \"orig-cache\"\n\
             CACHE_TIMEOUT = {{\"bench_mod.cached_market_frame\": 600}}\n"
        ),
    )?;
    let log = std::fs::File::create(dir.join("original.log"))?;
    let child = Command::new(venv_python)
        .args(["-m", "ksrpc.run_app"])
        .env("CONFIG_SERVER", &config)
        .env("PYTHONPATH", root().join("tests/python/server_modules"))
        .current_dir(dir)
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("starting the original server")?;
    let _ = env;
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok((Original { child }, format!("http://127.0.0.1:{port}/api/v1")));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("the original server did not start; see {}", dir.join("original.log").display())
}

/// Our config; `embedded`: the binary's (venv and module path), else the
/// wheel's (its interpreter has the packages; modules come by PYTHONPATH).
fn our_config(env: &Env, dir: &Path, embedded: bool) -> Result<PathBuf> {
    let file = dir.join(if embedded { "ours.toml" } else { "ours-wheel.toml" });
    // bench_mod is thread-safe: its calls run in parallel, as the
    // original's concurrent benchmark rows assume.
    let python = if embedded {
        format!(
            "[python]\nvenv = \"{}\"\npath = [\"{}\"]\nparallel_modules = [\"bench_mod\"]\n",
            env.server_venv.display(),
            root().join("tests/python/server_modules").display()
        )
    } else {
        String::from("[python]\nparallel_modules = [\"bench_mod\"]\n")
    };
    std::fs::write(
        &file,
        format!(
            "[server]\nhost = \"127.0.0.1\"\nport = 0\npath = \"/api/v1\"\ntimestamp_window = 30.0\n\n\
             [users.{USER}]\npassword = \"{PASSWORD}\"\nrules = [\"allow *\"]\n\n\
             [cache]\nenabled = true\npath = {cache:?}\nttl = [\"bench_mod.cached_market_frame 600\"]\n\n{python}",
            cache = dir.join(if embedded { "ours-cache" } else { "wheel-cache" }),
        ),
    )?;
    Ok(file)
}

/// Runs one workload of `bench_client.py` and returns its JSON result.
fn client(env: &Env, workload: &str, url: &str, opts: &Value) -> Result<Value> {
    client_with(&env.client_python, false, workload, url, opts)
}

/// A workload of `bench_client.py` run by `python`; `native`: through our
/// Python client (`ksrpc_rs`, which that python must have) instead of 0.8.1's.
fn client_with(python: &Path, native: bool, workload: &str, url: &str, opts: &Value) -> Result<Value> {
    let script = root().join("xtask/bench/bench_client.py");
    let mut command = Command::new(python);
    if native {
        command.env("KSRPC_BENCH_CLIENT", "ksrpc_rs");
    }
    let out = command
        .arg(&script)
        .args([workload, url, USER, PASSWORD, &opts.to_string()])
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .stderr(Stdio::inherit())
        .output()
        .context("running the bench client")?;
    if !out.status.success() {
        bail!("{workload} against {url} failed: {}", String::from_utf8_lossy(&out.stdout));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let last = text.lines().last().context("no output")?;
    serde_json::from_str(last).with_context(|| format!("bad JSON: {last}"))
}

const FLOOR_HEADER: &str = "\nThe 0.8.1 client's floor: the same downloads from a replay server that answers \
with reply bytes recorded before the clock starts (`xtask/src/floor.rs`), and the function's own time in \
the server's Python; a ratio of 1.00 means our server adds nothing to what the 0.8.1 client and the \
function cost\n\n";

/// The function's own time (median of three after a warm-up) in the
/// server's Python: `demo.create_1d_array(mb)` and `bench_mod.market_frame(rows)`.
fn function_seconds(env: &Env, plan: &Plan) -> Result<(f64, f64)> {
    let code = format!(
        "import contextlib, importlib, io, json, statistics, time\n\
         demo = importlib.import_module('ksrpc.server.demo')\n\
         import bench_mod\n\
         def median(f, *a):\n    ts = []\n    for _ in range(4):\n        t = time.perf_counter(); f(*a); ts.append(time.perf_counter() - t)\n    return statistics.median(ts[1:])\n\
         with contextlib.redirect_stdout(io.StringIO()):\n    r = [median(demo.create_1d_array, {}), median(bench_mod.market_frame, {})]\n\
         print(json.dumps(r))\n",
        plan.mb, plan.rows
    );
    let path = std::env::join_paths([root().join("ksrpc-py/python"), root().join("tests/python/server_modules")])?;
    let out = Command::new(env.server_venv.join("bin/python"))
        .args(["-c", &code])
        .env("PYTHONPATH", path)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .stderr(Stdio::inherit())
        .output()?;
    anyhow::ensure!(out.status.success(), "timing the functions failed");
    let v: Vec<f64> = serde_json::from_slice(&out.stdout)?;
    Ok((v[0], v[1]))
}

/// The floor table: (a) and (b) against our server and against the replay
/// server in front of it (`crate::floor`), back to back, plus the function's
/// own time; each row is ours / (floor + function).
fn floor_table(env: &Env, ours_url: &str, plan: &Plan) -> Result<(String, Value)> {
    eprintln!("==> the 0.8.1 client's floor");
    let floor = crate::floor::Floor::start(ours_url)?;
    let (array_fn, frame_fn) = function_seconds(env, plan)?;
    let mut table = String::from(
        "| workload | ours | floor (replay) | function | ours / (floor + function) |\n\
         | --- | ---: | ---: | ---: | ---: |\n",
    );
    let mut raw = Vec::new();
    for transport in ["http", "ws"] {
        let cases = [
            (
                format!("(a) download {} MB float64 array, {transport}", plan.mb),
                "download_array",
                json!({"transport": transport, "mb": plan.mb, "repeat": plan.repeat}),
                array_fn,
            ),
            (
                format!("(b) download {}-row market DataFrame, {transport}", plan.rows),
                "download_frame",
                json!({"transport": transport, "rows": plan.rows, "repeat": plan.repeat}),
                frame_fn,
            ),
        ];
        for (name, workload, opts, function) in cases {
            let ours = client(env, workload, ours_url, &opts)?;
            let (recorded, replayed) = floor.counts();
            let replay = client(env, workload, &floor.url, &opts)?;
            let (recorded2, replayed2) = floor.counts();
            // Every timed call must have been a replay: the warm-up runs
            // record (at most the frame's two distinct calls), the rest replay.
            anyhow::ensure!(
                recorded2 - recorded <= 2 && replayed2 - replayed >= plan.repeat,
                "the floor server recorded {} and replayed {} calls: the timed runs were not replays",
                recorded2 - recorded,
                replayed2 - replayed
            );
            let (o, f) = (ours["seconds"].as_f64().unwrap_or(f64::NAN), replay["seconds"].as_f64().unwrap_or(f64::NAN));
            eprintln!("    {name}: ours {o:.3} s, floor {f:.3} s, function {function:.3} s");
            table
                .push_str(&format!("| {name} | {o:.2} s | {f:.2} s | {function:.2} s | {:.2} |\n", o / (f + function)));
            raw.push(json!({"name": name, "ours": ours, "floor": replay, "function_seconds": function}));
        }
    }
    Ok((table, Value::Array(raw)))
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

/// Samples a process's RSS every 10 ms while `f` runs; returns (idle, peak) in bytes.
fn with_rss<T>(pid: u32, f: impl FnOnce() -> Result<T>) -> Result<(T, u64, u64)> {
    let idle = rss_kib(pid) * 1024;
    let stop = Arc::new(AtomicBool::new(false));
    let peak = Arc::new(AtomicU64::new(idle));
    let sampler = {
        let (stop, peak) = (stop.clone(), peak.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                peak.fetch_max(rss_kib(pid) * 1024, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(10));
            }
        })
    };
    let r = f();
    stop.store(true, Ordering::Relaxed);
    let _ = sampler.join();
    Ok((r?, idle, peak.load(Ordering::Relaxed)))
}

/// A TCP proxy on loopback that counts the bytes flowing back to the client.
struct CountingProxy {
    port: u16,
    down: Arc<AtomicU64>,
}

impl CountingProxy {
    fn start(upstream_port: u16) -> Result<CountingProxy> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        let down = Arc::new(AtomicU64::new(0));
        let counter = down.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let Ok(up) = TcpStream::connect(("127.0.0.1", upstream_port)) else { continue };
                let (mut c_read, mut u_write) = (conn.try_clone().expect("clone"), up.try_clone().expect("clone"));
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut c_read, &mut u_write);
                    let _ = u_write.shutdown(std::net::Shutdown::Write);
                });
                let counter = counter.clone();
                let (mut u_read, mut c_write) = (up, conn);
                std::thread::spawn(move || {
                    let mut buf = vec![0u8; 256 * 1024];
                    while let Ok(n) = u_read.read(&mut buf) {
                        if n == 0 || c_write.write_all(&buf[..n]).is_err() {
                            break;
                        }
                        counter.fetch_add(n as u64, Ordering::Relaxed);
                    }
                    let _ = c_write.shutdown(std::net::Shutdown::Write);
                });
            }
        });
        Ok(CountingProxy { port, down })
    }
}

fn port_of(url: &str) -> u16 {
    url.trim_start_matches("http://").split(['/', ':']).nth(1).and_then(|p| p.parse().ok()).expect("URL has a port")
}

/// The compat request body of `demo.add(1, 2)` exactly as the 0.8.1 client
/// makes it (dill pickle, chunked zlib at level 6).
fn add_body(env: &Env) -> Result<Vec<u8>> {
    demo_request(env, "RpcCall('add', (1, 2), {})")
}

/// The compat request body of one demo call (`call`, an `RpcCall(...)`
/// expression) as the 0.8.1 client makes it: the client venv's dill pickle,
/// chunked zlib at level 6.
pub fn demo_request(env: &Env, call: &str) -> Result<Vec<u8>> {
    let code = format!(
        "import sys, dill; from ksrpc.client import RpcCall; \
         sys.stdout.buffer.write(dill.dumps(dict(module='ksrpc.server.demo', calls=[{call}], ref_id=0)))"
    );
    let out = Command::new(&env.client_python).args(["-c", &code]).output()?;
    anyhow::ensure!(out.status.success(), "pickling the request {call} failed");
    Ok(encode_to_vec(&ChunkedZlib::with_level(Level::Fixed(6)), Bytes::from(out.stdout))?)
}

/// Parses one complete chunked HTTP response at the start of `buf`:
/// `Some((status, length, body))`, or `None` when more bytes are needed.
pub(crate) fn parse_response(buf: &[u8]) -> Result<Option<(u16, usize, Vec<u8>)>> {
    let Some(head_end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else { return Ok(None) };
    let head = std::str::from_utf8(&buf[..head_end])?;
    let status: u16 = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).context("status line")?;
    let chunked = head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    anyhow::ensure!(chunked, "reply is not chunked (status {status}): {head}");
    let mut at = head_end + 4;
    let mut body = Vec::new();
    loop {
        let Some(eol) = buf[at..].windows(2).position(|w| w == b"\r\n") else { return Ok(None) };
        let size = usize::from_str_radix(std::str::from_utf8(&buf[at..at + eol])?.trim(), 16)?;
        let data = at + eol + 2;
        at = data + size + 2;
        if at > buf.len() {
            return Ok(None);
        }
        if size == 0 {
            return Ok(Some((status, at, body)));
        }
        body.extend_from_slice(&buf[data..data + size]);
    }
}

/// Whether a compat reply body is `add(1, 2)`'s answer: it decodes (the
/// 0.8.1 framing), and the reply pickle holds `status` 200 and `data` 3. A
/// 0.8.1 error reply is HTTP 200 too, with `status` 500 inside: not a success.
fn is_add_result(body: &[u8]) -> bool {
    use memchr::memmem;
    let Ok(pickle) = ksrpc_core::codec::decode_all(&ChunkedZlib::default(), body, ksrpc_core::Limits::UNLIMITED) else {
        return false;
    };
    // protocol >= 4 dict keys: SHORT_BINUNICODE, MEMOIZE, then BININT1.
    memmem::find(&pickle, b"\x8c\x06status\x94K\xc8").is_some()
        && memmem::find(&pickle, b"\x8c\x04data\x94K\x03").is_some()
}

/// One keep-alive connection replaying `request` until `stop`: the
/// latencies in seconds of the replies that were the right result, and how
/// many were not.
async fn connection(port: u16, head: String, body: Arc<Vec<u8>>, stop: Instant) -> Result<(Vec<f64>, u64)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    stream.set_nodelay(true)?;
    let mut buf = Vec::with_capacity(64 * 1024);
    let mut lat = Vec::new();
    let mut wrong = 0;
    while Instant::now() < stop {
        let ts = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs_f64();
        let request = [head.replace("{ts}", &ts.to_string()).as_bytes(), &body, b"\r\n0\r\n\r\n"].concat();
        let t = Instant::now();
        stream.write_all(&request).await?;
        let (status, len, reply) = loop {
            if let Some(done) = parse_response(&buf)? {
                break done;
            }
            if stream.read_buf(&mut buf).await? == 0 {
                bail!("the server closed the connection");
            }
        };
        buf.drain(..len);
        anyhow::ensure!(status == 200, "status {status}");
        if is_add_result(&reply) {
            lat.push(t.elapsed().as_secs_f64());
        } else {
            wrong += 1;
        }
    }
    Ok((lat, wrong))
}

/// The small-call load generator: `conns` keep-alive connections replaying
/// a pre-encoded request for `seconds`, multiplexed on one thread (so it
/// costs the server's two cores as little as possible); returns req/s, p50
/// and p99 in ms.
fn load(url: &str, body: &[u8], conns: usize, seconds: u64) -> Result<Value> {
    let port = port_of(url);
    let path = format!("/{}/chunk", url.trim_start_matches("http://").split_once('/').map_or("api/v1", |x| x.1));
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{PASSWORD}"));
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Basic {auth}\r\nX-Timestamp: {{ts}}\r\n\
         Content-Type: application/octet-stream\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n",
        body.len()
    );
    let body = Arc::new(body.to_vec());
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let started = Instant::now();
    let stop = started + Duration::from_secs(seconds);
    let (mut lat, wrong): (Vec<f64>, u64) = rt.block_on(async {
        let tasks: Vec<_> =
            (0..conns).map(|_| tokio::spawn(connection(port, head.clone(), body.clone(), stop))).collect();
        let (mut all, mut wrong) = (Vec::new(), 0);
        for t in tasks {
            let (lat, w) = t.await??;
            all.extend(lat);
            wrong += w;
        }
        Ok::<_, anyhow::Error>((all, wrong))
    })?;
    let elapsed = started.elapsed().as_secs_f64();
    lat.sort_by(f64::total_cmp);
    // Throughput counts right answers only; any wrong one fails the row.
    anyhow::ensure!(wrong == 0, "{wrong} replies were not add(1, 2) == 3 (an error reply inside HTTP 200?)");
    anyhow::ensure!(!lat.is_empty(), "no call completed");
    let pct = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)] * 1000.0;
    Ok(json!({"rps": lat.len() as f64 / elapsed, "p50_ms": pct(0.5), "p99_ms": pct(0.99), "calls": lat.len()}))
}

/// A row of the table: name, unit, original, ours, and whether higher is better.
/// The original's figure in the first row whose name starts with `prefix`.
fn original_in(rows: &[Row], prefix: &str) -> f64 {
    rows.iter().find(|r| r.name.starts_with(prefix)).map_or(f64::NAN, |r| r.original)
}

struct Row {
    name: String,
    unit: &'static str,
    original: f64,
    ours: f64,
    higher_better: bool,
}

impl Row {
    fn ratio(&self) -> f64 {
        if self.higher_better {
            self.ours / self.original
        } else {
            self.original / self.ours
        }
    }
}

/// `cargo xtask bench codec`: encode and decode MiB/s of the chunked-zlib
/// codec for random float64 data and a compressible CSV-like payload, at
/// level 6 and `auto`, plus zstd, on all cores.
fn codec_bench() -> Result<()> {
    use ksrpc_core::codec::{decode_all, Codec, Limits, Zstd};
    let size = 64usize << 20;
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let floats: Vec<u8> = (0..size / 8)
        .flat_map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ((x >> 11) as f64 / (1u64 << 53) as f64).to_le_bytes()
        })
        .collect();
    let mut csv = Vec::with_capacity(size);
    let mut i = 0u64;
    while csv.len() < size {
        let price = 10.0 + (i % 977) as f64 * 0.01;
        csv.extend_from_slice(
            format!(
                "2024-{:02}-{:02},SH{:06},{price:.2},{:.2},{:.2},{:.2},{}\n",
                i % 12 + 1,
                i % 28 + 1,
                600_000 + i % 2000,
                price * 1.01,
                price * 0.99,
                price * 1.005,
                1000 + i * 37 % 100_000
            )
            .as_bytes(),
        );
        i += 1;
    }
    csv.truncate(size);
    let codecs: Vec<(&str, Box<dyn Codec>)> = vec![
        ("chunked-zlib level 6", Box::new(ChunkedZlib::with_level(Level::Fixed(6)))),
        ("chunked-zlib auto", Box::new(ChunkedZlib::with_level(Level::Auto))),
        ("chunked-zlib level 1", Box::new(ChunkedZlib::with_level(Level::Fixed(1)))),
        ("zstd level 3", Box::new(Zstd::default())),
    ];
    let mut out =
        String::from("| payload | codec | ratio | encode MiB/s | decode MiB/s |\n| --- | --- | ---: | ---: | ---: |\n");
    for (pname, payload) in [("random float64", &floats), ("CSV-like text", &csv)] {
        let payload = Bytes::from(payload.clone());
        for (cname, codec) in &codecs {
            let t = Instant::now();
            let wire = encode_to_vec(codec.as_ref(), payload.clone())?;
            let enc = t.elapsed().as_secs_f64();
            let t = Instant::now();
            let back = decode_all(codec.as_ref(), &wire, Limits::UNLIMITED)?;
            let dec = t.elapsed().as_secs_f64();
            anyhow::ensure!(back == payload, "{cname} did not round-trip");
            let mib = size as f64 / (1 << 20) as f64;
            out.push_str(&format!(
                "| {pname} | {cname} | {:.3} | {:.0} | {:.0} |\n",
                wire.len() as f64 / size as f64,
                mib / enc,
                mib / dec
            ));
        }
    }
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    writeln!(
        std::io::stdout().lock(),
        "codec bench: 64 MiB payloads, {cores} cores (decode is one stream, one core)\n\n{out}"
    )?;
    Ok(())
}

pub fn run(args: &[String]) -> Result<()> {
    if args.first().map(String::as_str) == Some("codec") {
        return codec_bench();
    }
    if args.first().map(String::as_str) == Some("load") {
        // `cargo xtask bench load URL CONNS SECONDS`: only the small-call load
        // generator, against any server whose `admin` uses the bench password.
        let env = Env::prepare()?;
        let (url, conns, secs) = (&args[1], args[2].parse()?, args[3].parse()?);
        let v = load(url, &add_body(&env)?, conns, secs)?;
        writeln!(std::io::stdout().lock(), "{v}")?;
        return Ok(());
    }
    if args.first().map(String::as_str) == Some("native") {
        // `cargo xtask bench native URL [MB ROWS SECONDS]`: only the Rust
        // client rows, against a running server of ours (bench password).
        let url = args.get(1).context("usage: bench native URL [MB ROWS SECONDS]")?;
        let num = |i: usize, default: u64| args.get(i).map_or(Ok(default), |s| s.parse::<u64>());
        let (mb, rows, secs) = (num(2, 100)?, num(3, 1_000_000)?, num(4, 5)?);
        let creds = (USER, PASSWORD);
        let mut out = std::io::stdout().lock();
        let (rps, v) = rust_client::small_calls_ws(url, creds, 64, secs)?;
        writeln!(out, "64 in flight on one WebSocket: {rps:.0} req/s {v}")?;
        for transport in [Transport::Http, Transport::WebSocket] {
            let array = ("ksrpc.server.demo", "create_1d_array", mb as i64);
            let (a, _) = rust_client::download(url, transport, creds, array, (mb << 17) as usize, 3)?;
            let frame = ("bench_mod", "market_frame", rows as i64);
            let (b, _) = rust_client::download(url, transport, creds, frame, rows as usize, 3)?;
            writeln!(out, "{transport:?}: {mb} MB array {a:.3} s, {rows}-row frame {b:.3} s")?;
        }
        return Ok(());
    }
    if args.first().map(String::as_str) == Some("floor") {
        // `cargo xtask bench floor [--quick]`: only the floor table, against
        // a fresh release server of ours.
        let quick = args.iter().any(|a| a == "--quick");
        let plan = if quick { Plan::QUICK } else { Plan::FULL };
        let env = Env::prepare()?;
        build_release(&env)?;
        let dir = root().join("target/bench");
        std::fs::create_dir_all(&dir)?;
        let ours = Server::start(
            &env.target_dir.join("release/ksrpc-server"),
            &our_config(&env, &dir, true)?,
            dir.join("ours.log"),
        )?;
        let (table, _) = floor_table(&env, &ours.url, &plan)?;
        writeln!(std::io::stdout().lock(), "{FLOOR_HEADER}{table}")?;
        return Ok(());
    }
    let quick = args.iter().any(|a| a == "--quick");
    let plan = if quick { Plan::QUICK } else { Plan::FULL };
    let env = Env::prepare()?;
    let base = root().join("target/xtask");
    let orig_python =
        python::ensure_venv(&env.python, &base.join("venv-orig-3.12"), PACKAGES_ORIG).context("original venv")?;
    build_release(&env)?;
    let dir = root().join("target/bench");
    std::fs::create_dir_all(&dir)?;
    // Every run starts with empty result caches (misses must be misses).
    for cache in ["orig-cache", "ours-cache", "wheel-cache"] {
        let _ = std::fs::remove_dir_all(dir.join(cache));
    }
    let ours_server = Server::start(
        &env.target_dir.join("release/ksrpc-server"),
        &our_config(&env, &dir, true)?,
        dir.join("ours.log"),
    )?;
    let (orig_server, orig_url) = start_original(&env, &orig_python, &dir)?;
    let targets = [
        Target { url: orig_url, pid: orig_server.child.id() },
        Target { url: ours_server.url.clone(), pid: ours_server.pid() },
    ];
    let body = add_body(&env)?;
    let mut rows: Vec<Row> = Vec::new();
    let mut raw = serde_json::Map::new();
    let mut both = |name: String,
                    unit: &'static str,
                    higher_better: bool,
                    f: &mut dyn FnMut(&Target) -> Result<(f64, Value)>|
     -> Result<()> {
        eprintln!("==> {name}");
        let (o, ov) = f(&targets[0])?;
        let (u, uv) = f(&targets[1])?;
        eprintln!("    original {o:.3} {unit}, ours {u:.3} {unit}");
        raw.insert(name.clone(), json!({"original": ov, "ours": uv}));
        rows.push(Row { name, unit, original: o, ours: u, higher_better });
        Ok(())
    };
    let mb = plan.mb;
    for transport in ["http", "ws"] {
        let opts = json!({"transport": transport, "mb": mb, "repeat": plan.repeat});
        both(format!("(a) download {mb} MB float64 array, {transport}"), "s", false, &mut |t| {
            let v = client(&env, "download_array", &t.url, &opts)?;
            Ok((v["seconds"].as_f64().unwrap_or(f64::NAN), v))
        })?;
    }
    let rows_n = plan.rows;
    for transport in ["http", "ws"] {
        let opts = json!({"transport": transport, "rows": rows_n, "repeat": 1});
        both(format!("(b) download {rows_n}-row market DataFrame, {transport}"), "s", false, &mut |t| {
            let v = client(&env, "download_frame", &t.url, &opts)?;
            Ok((v["seconds"].as_f64().unwrap_or(f64::NAN), v))
        })?;
    }
    // The result cache, same config on both: `bench_mod.cached_market_frame`
    // cached for 600 s (the original on disk, ours in memory and on disk).
    for (what, hit) in [("miss (computed and stored)", false), ("hit", true)] {
        for transport in ["http", "ws"] {
            let opts = json!({"transport": transport, "rows": rows_n, "repeat": plan.repeat, "hit": hit});
            both(format!("(h) result cache, {rows_n}-row DataFrame, {what}, {transport}"), "s", false, &mut |t| {
                let v = client(&env, "cached_frame", &t.url, &opts)?;
                Ok((v["seconds"].as_f64().unwrap_or(f64::NAN), v))
            })?;
        }
    }
    both(format!("(b) bytes on the wire, {rows_n}-row DataFrame"), "MiB", false, &mut |t| {
        let proxy = CountingProxy::start(port_of(&t.url))?;
        let url = t.url.replace(&format!(":{}/", port_of(&t.url)), &format!(":{}/", proxy.port));
        let before = proxy.down.load(Ordering::Relaxed);
        // One download of the frame (plus the 1000-row warm-up call, ~0.1% of the bytes).
        let opts = json!({"transport": "http", "rows": rows_n, "repeat": 1, "warmup": false});
        let v = client(&env, "download_frame", &url, &opts)?;
        let bytes = proxy.down.load(Ordering::Relaxed) - before;
        Ok((bytes as f64 / (1 << 20) as f64, json!({"bytes": bytes, "client": v})))
    })?;
    both(format!("(c) upload {mb} MB float64 array, http"), "s", false, &mut |t| {
        let v = client(&env, "upload_array", &t.url, &json!({"mb": mb, "repeat": 1}))?;
        Ok((v["seconds"].as_f64().unwrap_or(f64::NAN), v))
    })?;
    for conns in [1usize, 16, 64] {
        both(format!("(d) add(1, 2) at {conns} connections (Rust load generator)"), "req/s", true, &mut |t| {
            let v = load(&t.url, &body, conns, plan.seconds)?;
            Ok((v["rps"].as_f64().unwrap_or(f64::NAN), v))
        })?;
    }
    both("(d) add(1, 2) at 64 connections: p99 latency".into(), "ms", false, &mut |t| {
        let v = load(&t.url, &body, 64, plan.seconds.min(5))?;
        Ok((v["p99_ms"].as_f64().unwrap_or(f64::NAN), v))
    })?;
    both("(d) add(1, 2) at 16 tasks (0.8.1 Python client)".into(), "req/s", true, &mut |t| {
        let v = client(&env, "small_calls", &t.url, &json!({"concurrency": 16, "seconds": plan.seconds}))?;
        Ok((v["rps"].as_f64().unwrap_or(f64::NAN), v))
    })?;
    let mut blocking = Vec::new();
    both("(e) three blocking sleep(1) gathered".into(), "s", false, &mut |t| {
        let v = client(&env, "blocking", &t.url, &json!({}))?;
        blocking.push(v.clone());
        Ok((v["gather_3x1s_seconds"].as_f64().unwrap_or(f64::NAN), v))
    })?;
    let payload = (mb << 20) as f64;
    // Pitfall 10's definition: growth beyond the result object's own size
    // (the demo's `astype` makes that copy on either server).
    both(
        format!("(f) peak server RSS growth during (a) beyond the {mb} MB result, x payload"),
        "x",
        false,
        &mut |t| {
            let opts = json!({"transport": "http", "mb": mb, "repeat": 1});
            let (v, idle, peak) = with_rss(t.pid, || client(&env, "download_array", &t.url, &opts))?;
            let growth = peak.saturating_sub(idle) as f64;
            Ok((
                (growth - payload) / payload,
                json!({"idle": idle, "peak": peak, "growth_x": growth / payload, "client": v}),
            ))
        },
    )?;

    // The Rust client on the native protocol, against the original server
    // with its own Python client (the rows above, same run).
    let original_of = |prefix: &str| original_in(&rows, prefix);
    let creds = (USER, PASSWORD);
    let mut rust_rows = Vec::new();
    for (transport, name) in [(Transport::Http, "http"), (Transport::WebSocket, "ws")] {
        eprintln!("==> (g) Rust client, {name}");
        let (a, av) = rust_client::download(
            &ours_server.url,
            transport,
            creds,
            ("ksrpc.server.demo", "create_1d_array", mb as i64),
            (mb << 17) as usize,
            plan.repeat,
        )?;
        let (b, bv) = rust_client::download(
            &ours_server.url,
            transport,
            creds,
            ("bench_mod", "market_frame", rows_n as i64),
            rows_n as usize,
            plan.repeat,
        )?;
        raw.insert(format!("(g) Rust client {name}"), json!({"array": av, "frame": bv}));
        rust_rows.push(Row {
            name: format!("(g) Rust client, v2 {name}: download {mb} MB array (vs (a) original)"),
            unit: "s",
            original: original_of(&format!("(a) download {mb} MB float64 array, {name}")),
            ours: a,
            higher_better: false,
        });
        rust_rows.push(Row {
            name: format!("(g) Rust client, v2 {name}: {rows_n}-row DataFrame as Arrow (vs (b) original)"),
            unit: "s",
            original: original_of(&format!("(b) download {rows_n}-row market DataFrame, {name}")),
            ours: b,
            higher_better: false,
        });
    }
    eprintln!("==> (g) Rust client, 64 calls in flight on one WebSocket");
    let (rps, v) = rust_client::small_calls_ws(&ours_server.url, creds, 64, plan.seconds)?;
    raw.insert("(g) Rust client 64 in flight".into(), v);
    rust_rows.push(Row {
        name: "(g) Rust client: add(i, 1) at 64 in flight on one WebSocket (vs (d) original, 64 connections)".into(),
        unit: "req/s",
        original: original_of("(d) add(1, 2) at 64 connections (Rust"),
        ours: rps,
        higher_better: true,
    });
    rows.extend(rust_rows);

    rows.push(Row {
        name: "(e) add(1, 2) issued during a 2 s blocking call".into(),
        unit: "ms",
        original: blocking[0]["add_during_block_ms"].as_f64().unwrap_or(f64::NAN),
        ours: blocking[1]["add_during_block_ms"].as_f64().unwrap_or(f64::NAN),
        higher_better: false,
    });
    // The 0.8.1 client's floor: the big downloads again, ours against a
    // replay server in front of ours, back to back.
    drop(orig_server);
    let (floor, floor_raw) = floor_table(&env, &ours_server.url, &plan)?;
    raw.insert("(floor) the 0.8.1 client's floor".into(), floor_raw);
    // The wheel (`python -m ksrpc_rs`, calls in the host interpreter) against
    // the binary, same workloads, same run: (a), (b) and (d).
    eprintln!("==> the wheel server");
    let wheel_python = crate::wheel::bench_python(&env)?;
    let wheel_kind = crate::suite::Kind::Wheel(wheel_python);
    let wheel_server = wheel_kind.start(&our_config(&env, &dir, false)?, dir.join("wheel.log"))?;
    let mut wheel_rows = Vec::new();
    let binary_of = |name: &str| rows.iter().find(|r| r.name == name).map_or(f64::NAN, |r| r.ours);
    let mut wheel_row = |name: String, unit: &'static str, higher_better: bool, value: f64| {
        eprintln!("    {name}: binary {:.3} {unit}, wheel {value:.3} {unit}", binary_of(&name));
        wheel_rows.push(Row { original: binary_of(&name), name, unit, ours: value, higher_better });
    };
    for transport in ["http", "ws"] {
        let opts = json!({"transport": transport, "mb": mb, "repeat": plan.repeat});
        let v = client(&env, "download_array", &wheel_server.url, &opts)?;
        wheel_row(
            format!("(a) download {mb} MB float64 array, {transport}"),
            "s",
            false,
            v["seconds"].as_f64().unwrap_or(f64::NAN),
        );
        let opts = json!({"transport": transport, "rows": rows_n, "repeat": 1});
        let v = client(&env, "download_frame", &wheel_server.url, &opts)?;
        wheel_row(
            format!("(b) download {rows_n}-row market DataFrame, {transport}"),
            "s",
            false,
            v["seconds"].as_f64().unwrap_or(f64::NAN),
        );
    }
    for conns in [1usize, 16, 64] {
        let v = load(&wheel_server.url, &body, conns, plan.seconds)?;
        wheel_row(
            format!("(d) add(1, 2) at {conns} connections (Rust load generator)"),
            "req/s",
            true,
            v["rps"].as_f64().unwrap_or(f64::NAN),
        );
    }
    drop(wheel_server);
    // Our Python client (the wheel's ksrpc_rs.client, native protocol)
    // against the binary, with the 0.8.1 client's workloads: the same
    // script, other imports.
    let mut py_rows = Vec::new();
    for transport in ["http", "ws"] {
        eprintln!("==> (i) ksrpc_rs Python client, {transport}");
        let python = crate::wheel::full_venv_python();
        let opts = json!({"transport": transport, "mb": mb, "repeat": plan.repeat});
        let a = client_with(&python, true, "download_array", &ours_server.url, &opts)?;
        let opts = json!({"transport": transport, "rows": rows_n, "repeat": 1});
        let b = client_with(&python, true, "download_frame", &ours_server.url, &opts)?;
        let opts = json!({"transport": transport, "concurrency": 16, "seconds": plan.seconds});
        let d = client_with(&python, true, "small_calls", &ours_server.url, &opts)?;
        raw.insert(format!("(i) ksrpc_rs Python client {transport}"), json!({"array": a, "frame": b, "small": d}));
        let secs = |v: &Value, k: &str| v[k].as_f64().unwrap_or(f64::NAN);
        py_rows.push(Row {
            name: format!("(i) ksrpc_rs Python client, v2 {transport}: download {mb} MB array (vs (a) original)"),
            unit: "s",
            original: original_in(&rows, &format!("(a) download {mb} MB float64 array, {transport}")),
            ours: secs(&a, "seconds"),
            higher_better: false,
        });
        py_rows.push(Row {
            name: format!(
                "(i) ksrpc_rs Python client, v2 {transport}: {rows_n}-row DataFrame as Arrow (vs (b) original)"
            ),
            unit: "s",
            original: original_in(&rows, &format!("(b) download {rows_n}-row market DataFrame, {transport}")),
            ours: secs(&b, "seconds"),
            higher_better: false,
        });
        py_rows.push(Row {
            name: format!(
                "(i) ksrpc_rs Python client, v2 {transport}: add(1, 2) at 16 tasks on one connection (vs (d) original, \
                 0.8.1 client)"
            ),
            unit: "req/s",
            original: original_in(&rows, "(d) add(1, 2) at 16 tasks (0.8.1 Python client)"),
            ours: secs(&d, "rps"),
            higher_better: true,
        });
    }
    rows.extend(py_rows);
    let mut wheel_table = String::from(
        "| workload | binary | wheel (python -m ksrpc_rs) | wheel vs binary |\n| --- | ---: | ---: | ---: |\n",
    );
    for r in &wheel_rows {
        let ratio = if r.higher_better { r.ours / r.original } else { r.original / r.ours };
        wheel_table.push_str(&format!(
            "| {} | {:.2} {} | {:.2} {} | {ratio:.2} |\n",
            r.name, r.original, r.unit, r.ours, r.unit
        ));
    }
    raw.insert(
        "(w) wheel vs binary".into(),
        json!(wheel_rows
            .iter()
            .map(|r| json!({"name": r.name, "binary": r.original, "wheel": r.ours}))
            .collect::<Vec<_>>()),
    );

    let mut table =
        String::from("| workload | original 0.8.1 | ours | ours vs original |\n| --- | ---: | ---: | ---: |\n");
    for r in &rows {
        table.push_str(&format!(
            "| {} | {:.2} {} | {:.2} {} | {:.1}x {} |\n",
            r.name,
            r.original,
            r.unit,
            r.ours,
            r.unit,
            r.ratio(),
            if r.higher_better { "more" } else { "faster/smaller" }
        ));
    }
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let header = format!(
        "ksrpc bench ({}), {cpus} cores, Python 3.12 client and servers, loopback\n\n",
        if quick { "--quick" } else { "full" }
    );
    let wheel_header = "\nThe wheel against the binary (ratio: >= 1 is as fast as the binary or faster)\n\n";
    let mut out = std::io::stdout().lock();
    writeln!(out, "{header}{table}{FLOOR_HEADER}{floor}{wheel_header}{wheel_table}")?;
    std::fs::write(dir.join("bench.md"), format!("{header}{table}{FLOOR_HEADER}{floor}{wheel_header}{wheel_table}"))?;
    // The committed record: what ran, where, and every row; a full run also
    // becomes the README's table.
    let record = format!(
        "{}
{header}{table}{FLOOR_HEADER}{floor}{wheel_header}{wheel_table}",
        provenance(&env, "bench")?
    );
    let committed = root().join(if quick { "docs/bench-quick.md" } else { "docs/bench.md" });
    std::fs::write(&committed, &record)?;
    eprintln!("wrote {}", committed.display());
    if !quick {
        let ratios: Vec<f64> = rows.iter().map(Row::ratio).filter(|r| r.is_finite()).collect();
        let (lo, hi) = ratios.iter().fold((f64::INFINITY, 0.0f64), |(lo, hi), r| (lo.min(*r), hi.max(*r)));
        let status = format!(
            "Over all {} rows of the last full bench (`{}`, same run, same machine), ours is \
             {lo:.1}x to {hi:.1}x the original (a ratio above 1 is better for ours; the table below has every row).\n",
            ratios.len(),
            committed.strip_prefix(root()).unwrap_or(&committed).display()
        );
        update_readme(
            "<!-- bench:begin -->",
            "<!-- bench:end -->",
            &format!("{header}{table}{FLOOR_HEADER}{floor}{wheel_header}{wheel_table}"),
            &committed,
            "bench",
        )?;
        update_readme("<!-- status:begin -->", "<!-- status:end -->", &status, &committed, "bench")?;
    }
    std::fs::write(
        dir.join("bench.json"),
        serde_json::to_string_pretty(&json!({"quick": quick, "cores": cpus, "results": raw}))?,
    )?;
    eprintln!("wrote {} and bench.json", dir.join("bench.md").display());
    Ok(())
}

/// Where and from what a bench ran: the commit (and whether the tree had
/// uncommitted changes), the machine, and the tool versions.
pub fn provenance(env: &Env, command: &str) -> Result<String> {
    let run = |cmd: &mut Command| -> String {
        cmd.output().ok().map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned()).unwrap_or_default()
    };
    let commit = run(Command::new("git").current_dir(root()).args(["rev-parse", "--short=12", "HEAD"]));
    let dirty = !run(Command::new("git").current_dir(root()).args(["status", "--porcelain", "--untracked-files=no"]))
        .is_empty();
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines().find(|l| l.starts_with("model name")).map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let mem_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| m.lines().next().and_then(|l| l.split_whitespace().nth(1)).and_then(|k| k.parse::<f64>().ok()))
        .map_or(0.0, |kib| kib / (1024.0 * 1024.0));
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let python = run(Command::new(&env.python).arg("--version"));
    let rustc = run(Command::new("rustc").arg("--version"));
    let date = run(Command::new("date").args(["-u", "+%Y-%m-%d %H:%M UTC"]));
    Ok(format!(
        "<!-- written by `cargo xtask {command}`; do not edit by hand -->\n\
         # {command} record\n\n\
         - commit: `{commit}`{}\n- date: {date}\n- machine: {cores} cores ({cpu}), {mem_gib:.0} GiB RAM\n\
         - {python}; {rustc}\n",
        if dirty { " with uncommitted changes" } else { "" }
    ))
}

/// Puts `text` (from a full run) into README.md between the markers.
pub fn update_readme(begin: &str, end: &str, text: &str, record: &Path, command: &str) -> Result<()> {
    let path = root().join("README.md");
    let readme = std::fs::read_to_string(&path)?;
    let (Some(b), Some(e)) = (readme.find(begin), readme.find(end)) else {
        bail!("README.md has no {begin} ... {end} markers");
    };
    let name = record.strip_prefix(root()).unwrap_or(record).display();
    let body = format!("{begin}\n<!-- from {name}, written by `cargo xtask {command}` -->\n{text}{end}");
    std::fs::write(&path, format!("{}{body}{}", &readme[..b], &readme[e + end.len()..]))?;
    eprintln!("updated README.md between {begin} and {end}");
    Ok(())
}
