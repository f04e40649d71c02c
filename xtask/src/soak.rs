//! `cargo xtask soak [MINUTES]`: a bounded mixed load on loopback against
//! our server, watching it for wrong answers, crashes, starved users and
//! growth. `cargo xtask test` runs it for 2 minutes.
//!
//! The load, all at once for the whole run:
//! - the unmodified 0.8.1 Python client (`soak/soak_client.py`): small calls,
//!   a DataFrame, generators dropped after one item, errors, over HTTP and WS;
//! - the Rust client on the native protocol: small calls of a `victim` user
//!   whose every call must finish within [`STARVED`], 10 MB replies,
//!   generators dropped half-way, errors;
//! - raw 0.8.1 requests for a 10 MB reply whose clients vanish after the
//!   first 64 KiB, and slow readers that take 64 KiB a second for 5 s;
//! - wrong passwords from another loopback address;
//! - a `flood` user keeping 16 blocking `sleep(2)` calls in flight.
//!
//! The server's RSS, threads and open files are sampled every second. After
//! a warm-up (the first 30% of the run) the peak of the last 20% may exceed
//! the peak of the 20% after warm-up by at most [`RSS_GROWTH`] bytes,
//! [`THREAD_GROWTH`] threads and [`FD_GROWTH`] files.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use base64::Engine;
use futures_util::StreamExt;
use ksrpc_client::{Client, Error, Transport, Value};
use serde_json::json;

use crate::suite::Kind;
use crate::test::{root, Env};

/// A victim's call taking longer than this is a starved user.
const STARVED: Duration = Duration::from_secs(10);
/// Growth allowed after warm-up (see the module doc).
const RSS_GROWTH: u64 = 160 << 20;
const THREAD_GROWTH: u64 = 8;
const FD_GROWTH: u64 = 64;

const ADMIN: (&str, &str) = ("admin", "soak-admin-pw");
const VICTIM: (&str, &str) = ("victim", "soak-victim-pw");
const FLOOD: (&str, &str) = ("flood", "soak-flood-pw");

/// One sample of the server process.
#[derive(Clone, Copy, Debug)]
struct Sample {
    at: f64,
    rss: u64,
    threads: u64,
    fds: u64,
}

fn sample(pid: u32, started: Instant) -> Option<Sample> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| -> Option<u64> {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
    };
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count() as u64;
    Some(Sample { at: started.elapsed().as_secs_f64(), rss: field("VmRSS:")? * 1024, threads: field("Threads:")?, fds })
}

/// Counts of what the load did, and the failures seen.
#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    failures: Mutex<Vec<String>>,
    worst_victim_ms: AtomicU64,
}

impl Tally {
    fn fail(&self, what: String) {
        let mut f = self.failures.lock().expect("tally poisoned");
        if f.len() < 20 {
            eprintln!("    soak failure: {what}");
            f.push(what);
        }
    }
}

fn write_config(env: &Env, dir: &std::path::Path) -> Result<PathBuf> {
    let file = dir.join("soak.toml");
    let modules = root().join("tests/python/server_modules");
    std::fs::write(
        &file,
        format!(
            r#"[server]
host = "127.0.0.1"
port = 0
timestamp_window = 600.0

[users.admin]
password = "{}"
rules = ["allow *"]

[users.victim]
password = "{}"
rules = ["allow ksrpc.server.demo", "deny *"]

[users.flood]
password = "{}"
rules = ["allow bench_mod", "deny *"]

[limits]
call_timeout = 60.0

[python]
venv = "{}"
path = ["{}"]
threads = 8
parallel_modules = ["bench_mod"]  # thread-safe; the flood is about the pool
"#,
            ADMIN.1,
            VICTIM.1,
            FLOOD.1,
            env.server_venv.display(),
            modules.display()
        ),
    )?;
    Ok(file)
}

/// Sends the raw 0.8.1 request and reads its reply: `slow` reads 64 KiB a
/// second for 5 s; otherwise 64 KiB at once. Then the client vanishes.
async fn raw_reader(base: &str, body: &[u8], slow: bool) -> Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = base.strip_prefix("http://").context("http URL")?;
    let (host, path) = rest.split_once('/').context("URL with a path")?;
    let mut s = tokio::net::TcpStream::connect(host).await?;
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{}:{}", ADMIN.0, ADMIN.1));
    let ts = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs_f64();
    let head = format!(
        "POST /{path}/chunk HTTP/1.1\r\nHost: {host}\r\nAuthorization: Basic {auth}\r\nX-Timestamp: {ts}\r\n\
         Content-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await?;
    s.write_all(body).await?;
    let mut buf = vec![0u8; 64 << 10];
    let rounds = if slow { 5 } else { 1 };
    for round in 0..rounds {
        let mut got = 0;
        while got < buf.len() {
            let n = tokio::time::timeout(Duration::from_secs(60), s.read(&mut buf[got..]))
                .await
                .context("no reply bytes for 60 s")??;
            if n == 0 {
                bail!("the server closed after {got} bytes");
            }
            got += n;
        }
        if round == 0 {
            anyhow::ensure!(buf.starts_with(b"HTTP/1.1 200"), "not a 200 reply");
        }
        if slow {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
    Ok(())
}

async fn connect(url: &str, (user, password): (&str, &str), transport: Transport) -> Result<Client> {
    Ok(Client::builder(url).credentials(user, password).transport(transport).connect().await?)
}

/// The native actors; each loops until `stop`.
async fn native_load(url: String, tally: Arc<Tally>, stop: Instant) -> Result<()> {
    let victim = connect(&url, VICTIM, Transport::WebSocket).await?;
    let admin = connect(&url, ADMIN, Transport::WebSocket).await?;
    let flood = connect(&url, FLOOD, Transport::WebSocket).await?;
    let mut tasks = tokio::task::JoinSet::new();
    {
        let (t, c) = (tally.clone(), victim.clone());
        tasks.spawn(async move {
            let mut i = 0i64;
            while Instant::now() < stop {
                let started = Instant::now();
                match c.module("ksrpc.server.demo").call("add", (i, 1)).await {
                    Ok(Value::Int(v)) if v == i + 1 => {
                        t.ok.fetch_add(1, Ordering::Relaxed);
                    }
                    other => t.fail(format!("victim add({i}, 1) gave {other:?}")),
                }
                let ms = started.elapsed().as_millis() as u64;
                t.worst_victim_ms.fetch_max(ms, Ordering::Relaxed);
                if started.elapsed() > STARVED {
                    t.fail(format!("the victim waited {ms} ms for add({i}, 1)"));
                }
                i += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
    }
    {
        let (t, c) = (tally.clone(), admin.clone());
        tasks.spawn(async move {
            while Instant::now() < stop {
                match c.module("ksrpc.server.demo").call("create_1d_array", (10,)).record_batches().await {
                    Ok(b) if b.iter().map(|b| b.num_rows()).sum::<usize>() == 10 << 17 => {
                        t.ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(_) => t.fail("a 10 MB array came back with the wrong row count".into()),
                    Err(e) => t.fail(format!("10 MB array: {e}")),
                }
            }
        });
    }
    {
        let (t, c) = (tally.clone(), admin.clone());
        tasks.spawn(async move {
            while Instant::now() < stop {
                match c.module("bench_mod").call("countdown", (5,)).stream().await {
                    Ok(mut s) => match (s.next().await, s.next().await) {
                        (Some(Ok(Value::Int(5))), Some(Ok(Value::Int(4)))) => {
                            t.ok.fetch_add(1, Ordering::Relaxed);
                        }
                        other => t.fail(format!("countdown(5) began {other:?}")),
                    }, // dropped half-way: the server closes the generator
                    Err(e) => t.fail(format!("countdown: {e}")),
                }
                match c.module("ksrpc.server.demo").call("div", (1, 0)).await {
                    Err(Error::Remote(r)) if r.kind == "ZeroDivisionError" => {
                        t.ok.fetch_add(1, Ordering::Relaxed);
                    }
                    other => t.fail(format!("div(1, 0) gave {other:?}")),
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
    }
    for _ in 0..16 {
        let (t, c) = (tally.clone(), flood.clone());
        tasks.spawn(async move {
            while Instant::now() < stop {
                match c.module("bench_mod").call("sleep", (2.0,)).await {
                    Ok(_) => {
                        t.ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => t.fail(format!("flood sleep(2): {e}")),
                }
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.context("a load task panicked")?;
    }
    Ok(())
}

/// Raw readers that vanish or read slowly, and wrong passwords from
/// another loopback address.
async fn hostile_load(url: String, body: Arc<Vec<u8>>, tally: Arc<Tally>, stop: Instant) {
    let mut tasks = tokio::task::JoinSet::new();
    for slow in [false, true] {
        let (t, u, b) = (tally.clone(), url.clone(), body.clone());
        tasks.spawn(async move {
            while Instant::now() < stop {
                match raw_reader(&u, &b, slow).await {
                    Ok(()) => {
                        t.ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => t.fail(format!("{} reader: {e}", if slow { "slow" } else { "vanishing" })),
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
    }
    {
        let (t, u) = (tally.clone(), url.clone());
        tasks.spawn(async move {
            while Instant::now() < stop {
                match wrong_password(&u).await {
                    Ok(401 | 429) => {
                        t.ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(s) => t.fail(format!("a wrong password got HTTP {s}")),
                    Err(e) => t.fail(format!("wrong password probe: {e}")),
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        });
    }
    while tasks.join_next().await.is_some() {}
}

/// `generate_204` with a wrong password from 127.0.0.2; the status.
async fn wrong_password(base: &str) -> Result<u16> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = base.strip_prefix("http://").context("http URL")?;
    let (host, path) = rest.split_once('/').context("URL with a path")?;
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind("127.0.0.2:0".parse()?)?;
    let mut s = socket.connect(host.parse()?).await?;
    let auth = base64::engine::general_purpose::STANDARD.encode("admin:not-the-password");
    let ts = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs_f64();
    let req = format!(
        "GET /{path}/generate_204 HTTP/1.1\r\nHost: {host}\r\nAuthorization: Basic {auth}\r\nX-Timestamp: {ts}\r\n\
         Connection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await?;
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(60), s.read_to_end(&mut out)).await??;
    String::from_utf8_lossy(&out).split(' ').nth(1).and_then(|c| c.parse().ok()).context("no status line")
}

/// Runs the soak for `duration` against the debug server binary; returns
/// (checks passed, checks failed).
pub fn run(env: &Env, duration: Duration) -> Result<(u64, u64, u64)> {
    let status = env.cargo().args(["build", "-p", "ksrpc-server"]).status()?;
    anyhow::ensure!(status.success(), "building ksrpc-server failed");
    let dir = root().join("target/xtask/soak");
    std::fs::create_dir_all(&dir)?;
    let config = write_config(env, &dir)?;
    let server = Kind::Binary(env.target_dir.join("debug/ksrpc-server")).start(&config, dir.join("server.log"))?;
    let pid = server.pid();
    eprintln!("    soaking {} for {} s", server.url, duration.as_secs());
    let body = Arc::new(crate::bench::demo_request(env, "RpcCall('create_1d_array', (10,), {})")?);
    let started = Instant::now();
    let stop = started + duration;
    let tally = Arc::new(Tally::default());

    // Its stdout goes to a file: the 0.8.1 client prints every server
    // traceback there, and an unread pipe would block it once full.
    let py_log = dir.join("python-client.out");
    let python = std::process::Command::new(&env.client_python)
        .arg(root().join("xtask/soak/soak_client.py"))
        .args([&server.url, ADMIN.0, ADMIN.1, &duration.as_secs().to_string()])
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .stdout(std::fs::File::create(&py_log)?)
        .stderr(std::process::Stdio::null())
        .spawn()
        .context("starting the 0.8.1 soak client")?;

    let samples = Arc::new(Mutex::new(Vec::<Sample>::new()));
    let sampler = {
        let samples = samples.clone();
        std::thread::spawn(move || {
            while Instant::now() < stop {
                match sample(pid, started) {
                    Some(s) => samples.lock().expect("samples poisoned").push(s),
                    None => return false, // the server is gone
                }
                std::thread::sleep(Duration::from_secs(1));
            }
            true
        })
    };
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    // Every actor stops at `stop`; a call stuck past that (plus a minute)
    // is a failure, never a hang of the run.
    let load = rt.block_on(async {
        let hostile = tokio::spawn(hostile_load(server.url.clone(), body, tally.clone(), stop));
        let native = native_load(server.url.clone(), tally.clone(), stop);
        let late = tokio::time::Instant::from_std(stop + Duration::from_secs(60));
        let native = tokio::time::timeout_at(late, native)
            .await
            .unwrap_or_else(|_| Err(anyhow::anyhow!("stuck past the end of the run")));
        if tokio::time::timeout_at(late + Duration::from_secs(5), hostile).await.is_err() {
            tally.fail("the raw readers or the password probe were stuck past the end of the run".into());
        }
        native
    });
    rt.shutdown_timeout(Duration::from_secs(5));
    if let Err(e) = load {
        tally.fail(format!("the native load stopped: {e:#}"));
    }
    let alive = sampler.join().unwrap_or(false);
    let py_deadline = stop + Duration::from_secs(90);
    let mut python = python;
    while python.try_wait()?.is_none() && Instant::now() < py_deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    if python.try_wait()?.is_none() {
        let _ = python.kill();
        tally.fail("the 0.8.1 client was stuck past the end of the run".into());
    }
    let py = python.wait()?;
    // The result is the last line (the client prints server tracebacks before it).
    let py_text = std::fs::read_to_string(&py_log).unwrap_or_default();
    let py_out = py_text.lines().last().unwrap_or_default().trim().to_owned();
    if !py.success() {
        tally.fail(format!("the 0.8.1 client: {py_out}"));
    }
    if !alive || sample(pid, started).is_none() {
        tally.fail("the server died".into());
    }

    let samples = samples.lock().expect("samples poisoned").clone();
    let secs = duration.as_secs_f64();
    let window = |from: f64, to: f64| samples.iter().filter(move |s| s.at >= from * secs && s.at < to * secs);
    let peak = |from: f64, to: f64, f: fn(&Sample) -> u64| window(from, to).map(f).max().unwrap_or(0);
    let growth = |f: fn(&Sample) -> u64| peak(0.8, 1.01, f).saturating_sub(peak(0.3, 0.5, f));
    let (rss, threads, fds) = (growth(|s| s.rss), growth(|s| s.threads), growth(|s| s.fds));
    if rss > RSS_GROWTH {
        tally.fail(format!("RSS grew by {} MiB after warm-up (bound {} MiB)", rss >> 20, RSS_GROWTH >> 20));
    }
    if threads > THREAD_GROWTH {
        tally.fail(format!("threads grew by {threads} after warm-up (bound {THREAD_GROWTH})"));
    }
    if fds > FD_GROWTH {
        tally.fail(format!("open files grew by {fds} after warm-up (bound {FD_GROWTH})"));
    }
    let failures = tally.failures.lock().expect("tally poisoned").clone();
    let summary = json!({
        "seconds": secs,
        "checks_ok": tally.ok.load(Ordering::Relaxed),
        "failures": failures,
        "worst_victim_ms": tally.worst_victim_ms.load(Ordering::Relaxed),
        "python_client": serde_json::from_str::<serde_json::Value>(&py_out).unwrap_or(json!(py_out)),
        "growth_after_warmup": {"rss_mib": rss >> 20, "threads": threads, "fds": fds},
        "peak_rss_mib": peak(0.0, 1.01, |s| s.rss) >> 20,
        "samples": samples.iter().map(|s| json!([s.at, s.rss >> 20, s.threads, s.fds])).collect::<Vec<_>>(),
    });
    std::fs::write(dir.join("soak.json"), serde_json::to_string_pretty(&summary)?)?;
    eprintln!(
        "    soak: {} checks ok, {} failures, victim worst {} ms, growth after warm-up: RSS {} MiB, {threads} threads, \
         {fds} files; peak RSS {} MiB (target/xtask/soak/soak.json)",
        tally.ok.load(Ordering::Relaxed),
        failures.len(),
        tally.worst_victim_ms.load(Ordering::Relaxed),
        rss >> 20,
        peak(0.0, 1.01, |s| s.rss) >> 20
    );
    drop(server);
    // One check per kind of guarantee: answers, liveness, fairness, growth.
    let failed = u64::from(!failures.is_empty());
    Ok((1 - failed, failed, 0))
}

/// `cargo xtask soak [MINUTES]` (default 2).
pub fn main(args: &[String]) -> Result<()> {
    let minutes: f64 = args.first().map(|m| m.parse()).transpose().context("MINUTES must be a number")?.unwrap_or(2.0);
    if !(minutes > 0.0 && minutes <= 24.0 * 60.0) {
        bail!("MINUTES must be between 0 and 1440");
    }
    let env = Env::prepare()?;
    let (_, failed, _) = run(&env, Duration::from_secs_f64(minutes * 60.0))?;
    if failed > 0 {
        bail!("the soak failed; see target/xtask/soak/soak.json and server.log");
    }
    if minutes >= 30.0 {
        record(&env)?;
    }
    println!("soak passed ({minutes} min); summary in target/xtask/soak/soak.json");
    Ok(())
}

/// A run of 30 minutes or more is the one the README reports: its summary
/// goes to `docs/soak.md` (with the commit and machine) and into the README
/// between its soak markers.
fn record(env: &Env) -> Result<()> {
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root().join("target/xtask/soak/soak.json"))?)?;
    let g = &summary["growth_after_warmup"];
    let py = &summary["python_client"];
    let text = format!(
        "A {:.0}-minute `cargo xtask soak` passed: {} checked answers and no failure; the 0.8.1 client made \
         {} calls (plus {} DataFrames, {} dropped generators and {} errors checked); the victim's slowest call \
         took {} ms while a flood user kept 16 blocking calls in flight; after warm-up the server grew by {} MiB \
         RSS, {} threads and {} open files (bounds: {} MiB, {} and {}); its peak RSS was {} MiB.\n",
        summary["seconds"].as_f64().unwrap_or(0.0) / 60.0,
        summary["checks_ok"],
        py["add"],
        py["frame"],
        py["generator_dropped"],
        py["error"],
        summary["worst_victim_ms"],
        g["rss_mib"],
        g["threads"],
        g["fds"],
        RSS_GROWTH >> 20,
        THREAD_GROWTH,
        FD_GROWTH,
        summary["peak_rss_mib"],
    );
    let file = root().join("docs/soak.md");
    std::fs::write(&file, format!("{}\n{text}", crate::bench::provenance(env, "soak")?))?;
    crate::bench::update_readme("<!-- soak:begin -->", "<!-- soak:end -->", &text, &file, "soak")?;
    eprintln!("wrote {}", file.display());
    Ok(())
}
