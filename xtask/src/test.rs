//! `cargo xtask test`: every check CI runs, in order, each step timed, then
//! one closing `xtask: N passed, N failed, N skipped` line.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};

use crate::python;

/// Test counts gathered from every runner.
#[derive(Default, Debug)]
struct Tally {
    passed: u64,
    failed: u64,
    skipped: u64,
    broken_steps: Vec<String>,
}

/// Whether this is a CI run (`CI` set to anything but empty or `false`).
pub fn ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0")
}

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask is in the workspace").to_path_buf()
}

fn step<T>(name: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    eprintln!("\n==> {name}");
    let t = Instant::now();
    let r = f();
    eprintln!("<== {name}: {} in {:.1}s", if r.is_ok() { "ok" } else { "FAILED" }, t.elapsed().as_secs_f64());
    r
}

/// The environment every cargo call of the suite shares: the Python pyo3
/// builds against, and a target dir of its own so that switching between
/// `cargo run` (system python3) and the suite (Python >= 3.12) does not
/// rebuild pyo3 back and forth.
pub struct Env {
    pub python: PathBuf,
    pub target_dir: PathBuf,
    pub server_venv: PathBuf,
    pub client_python: PathBuf,
}

impl Env {
    pub fn cargo(&self) -> Command {
        let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
        c.current_dir(root())
            .env("PYO3_PYTHON", &self.python)
            .env("CARGO_TARGET_DIR", &self.target_dir)
            .env("KSRPC_TEST_VENV", &self.server_venv)
            .env("KSRPC_CLIENT_PYTHON_BIN", &self.client_python)
            .env_remove("VIRTUAL_ENV");
        if ci() {
            // A CI clone builds once: incremental state would only add
            // gigabytes to a disk that is shared and sometimes short.
            c.env("CARGO_INCREMENTAL", "0");
        }
        c
    }

    pub fn prepare() -> Result<Env> {
        let python = step("find Python >= 3.12", python::find_python)?;
        let (_, minor) = python::version_of(&python).context("python stopped running")?;
        eprintln!("    using {} (3.{minor})", python.display());
        let base = root().join("target/xtask");
        let server_venv = base.join(format!("venv-server-3.{minor}"));
        let client_venv = base.join(format!("venv-client-3.{minor}"));
        step("server venv", || python::ensure_venv(&python, &server_venv, python::SERVER_PACKAGES))?;
        let client_python =
            step("client venv", || python::ensure_venv(&python, &client_venv, python::CLIENT_PACKAGES))?;
        Ok(Env { python, target_dir: base.join(format!("py3.{minor}")), server_venv, client_python })
    }
}

pub fn run(args: &[String]) -> Result<()> {
    let started = Instant::now();
    let mut tally = Tally::default();
    let fast = args.iter().any(|a| a == "--rust-only");

    let fmt = step("cargo fmt --check", || {
        check(Command::new("cargo").current_dir(root()).args(["fmt", "--all", "--", "--check"]))
    });
    record_step(&mut tally, "fmt", fmt);

    let env = Env::prepare()?;
    crate::disk::report_before(&root().join("target"));
    let clippy = step("cargo clippy -D warnings", || {
        // The extension is linted on its own: built with the workspace, its
        // stable-ABI pyo3 features would apply to the binary's crates too.
        check(env.cargo().args([
            "clippy",
            "--workspace",
            "--exclude",
            "ksrpc-pyext",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]))?;
        check(env.cargo().args(["clippy", "-p", "ksrpc-pyext", "--", "-D", "warnings"]))
    });
    record_step(&mut tally, "clippy", clippy);

    let rust = step("Rust tests (nextest)", || nextest(&env));
    match rust {
        Ok((p, f, s)) => {
            tally.passed += p;
            tally.failed += f;
            tally.skipped += s;
        }
        Err(e) => record_step(&mut tally, "nextest", Err(e)),
    }

    if !fast {
        let py = step("Python executor tests (pytest, server venv)", || {
            let python = env.server_venv.join("bin/python");
            pytest(&python, &[root().join("ksrpc-py/python/tests_py")], &[], "executor")
        });
        add(&mut tally, "executor pytest", py);
        let suite =
            step("real ksrpc 0.8.1 client suite (HTTP and WebSocket; TLS; through nginx)", || crate::suite::run(&env));
        add(&mut tally, "client suite", suite);
        let soak =
            step("soak (2 minutes of mixed load)", || crate::soak::run(&env, std::time::Duration::from_secs(120)));
        add(&mut tally, "soak", soak);
        let wheel =
            step("the ksrpc-rs wheel on CPython 3.9-3.13 (build, install, suites)", || crate::wheel::test(&env));
        let wheel_python = wheel.is_ok().then(crate::wheel::full_venv_python);
        add(&mut tally, "wheel", wheel);
        let readme = step("README examples", || crate::readme::run(&env, wheel_python.as_deref()));
        add(&mut tally, "readme", readme);
    }

    eprintln!("\nxtask test took {:.0}s", started.elapsed().as_secs_f64());
    crate::disk::report_after(&root().join("target"));
    for s in &tally.broken_steps {
        eprintln!("step failed: {s}");
    }
    println!(
        "xtask: {} passed, {} failed, {} skipped",
        tally.passed,
        tally.failed + tally.broken_steps.len() as u64,
        tally.skipped
    );
    if tally.failed > 0 || !tally.broken_steps.is_empty() {
        bail!("the test suite failed");
    }
    Ok(())
}

fn record_step(t: &mut Tally, name: &str, r: Result<()>) {
    if let Err(e) = r {
        eprintln!("{name}: {e:#}");
        t.broken_steps.push(name.to_owned());
    }
}

fn add(t: &mut Tally, name: &str, r: Result<(u64, u64, u64)>) {
    match r {
        Ok((p, f, s)) => {
            t.passed += p;
            t.failed += f;
            t.skipped += s;
        }
        Err(e) => record_step(t, name, Err(e)),
    }
}

fn check(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("exited with {status}");
    }
    Ok(())
}

/// Runs nextest, echoing its output, and reads the counts off its summary.
fn nextest(env: &Env) -> Result<(u64, u64, u64)> {
    // The `ksrpc` CLI tests (in ksrpc-server) run the binary built next to
    // the server's; nextest does not build other packages' binaries.
    check(env.cargo().args(["build", "-p", "ksrpc-client", "--bin", "ksrpc"]))?;
    let mut child = env
        .cargo()
        .args(["nextest", "run", "--workspace", "--exclude", "ksrpc-pyext", "--no-fail-fast", "--color", "never"])
        .stderr(Stdio::piped())
        .spawn()
        .context("running cargo nextest (is cargo-nextest installed?)")?;
    let mut summary = None;
    for line in BufReader::new(child.stderr.take().expect("piped")).lines() {
        let line = line?;
        eprintln!("{line}");
        if line.contains("tests run:") {
            summary = Some(line);
        }
    }
    let status = child.wait()?;
    let summary = summary.context("nextest printed no summary (build failure?)")?;
    let count = |word: &str| -> u64 {
        let words: Vec<&str> =
            summary.split(|c: char| c == ',' || c.is_whitespace()).filter(|w| !w.is_empty()).collect();
        words.windows(2).find(|w| w[1].starts_with(word)).and_then(|w| w[0].parse().ok()).unwrap_or(0)
    };
    let (p, f, s) = (count("passed"), count("failed") + count("timed"), count("skipped"));
    if !status.success() && f == 0 {
        bail!("nextest exited with {status}");
    }
    Ok((p, f, s))
}

/// Runs pytest with a JUnit report and reads the counts off it.
pub fn pytest(python: &Path, paths: &[PathBuf], envs: &[(&str, String)], name: &str) -> Result<(u64, u64, u64)> {
    let report = root().join(format!("target/xtask/pytest-{name}.xml"));
    let status = Command::new(python)
        .args(["-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider", "--timeout=120"])
        .arg(format!("--junitxml={}", report.display()))
        .args(paths)
        .envs(envs.iter().map(|(k, v)| (*k, v.as_str())))
        .current_dir(root())
        .status()
        .context("running pytest")?;
    let xml = std::fs::read_to_string(&report).with_context(|| format!("pytest wrote no report ({status})"))?;
    let attr = |name: &str| -> u64 {
        xml.find("<testsuite ")
            .and_then(|at| {
                let tag = &xml[at..at + xml[at..].find('>')?];
                let key = format!(" {name}=\"");
                let v = tag.find(&key)? + key.len();
                tag[v..].split('"').next()?.parse().ok()
            })
            .unwrap_or(0)
    };
    let (tests, errors, failures, skipped) = (attr("tests"), attr("errors"), attr("failures"), attr("skipped"));
    if tests == 0 {
        bail!("pytest ran no test ({status})");
    }
    let failed = errors + failures;
    Ok((tests - failed - skipped, failed, skipped))
}

/// `cargo xtask fuzz [SECONDS]`: each fuzz target for a bounded time.
pub fn fuzz(args: &[String]) -> Result<()> {
    let seconds: u64 = args.first().map(|s| s.parse()).transpose()?.unwrap_or(60);
    let has_fuzz = Command::new("cargo").args(["fuzz", "--version"]).output().is_ok_and(|o| o.status.success());
    if !has_fuzz {
        check(Command::new("cargo").args(["install", "cargo-fuzz", "--locked"]))?;
    }
    let dir = root().join("fuzz");
    let out = Command::new("cargo").args(["fuzz", "list"]).current_dir(&dir).env("RUSTC_BOOTSTRAP", "1").output()?;
    let targets: Vec<String> = String::from_utf8_lossy(&out.stdout).lines().map(str::to_owned).collect();
    if targets.is_empty() {
        bail!("no fuzz targets found in {}", dir.display());
    }
    for t in targets {
        step(&format!("fuzz {t} for {seconds}s"), || {
            check(
                Command::new("cargo")
                    .args(["fuzz", "run", &t, "--", &format!("-max_total_time={seconds}"), "-rss_limit_mb=2048"])
                    .current_dir(&dir)
                    .env("RUSTC_BOOTSTRAP", "1"),
            )
        })?;
    }
    Ok(())
}
