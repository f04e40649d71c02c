//! The `ksrpc-rs` wheel: built once by maturin (stable ABI, CPython 3.9+,
//! manylinux2014 through zig), installed into fresh venvs of every CPython
//! 3.9 and later that pyenv has here, and tested there with the real 0.8.1
//! client. `cargo xtask wheel` only builds it.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::python;
use crate::suite::{self, Kind};
use crate::test::{pytest, root, Env};

/// Tests of the smoke run on every minor: a call, a DataFrame, a refused
/// module, `SystemExit`.
const SMOKE: &[&str] = &[
    "test_compat.py::test_eager_call",
    "test_compat.py::test_eager_dataframe",
    "test_compat.py::test_forbidden_import_for_limited_user",
    "test_security.py::test_system_exit_is_an_error_reply",
];

fn tools(env: &Env) -> Result<PathBuf> {
    let venv = root().join("target/xtask/venv-tools");
    python::ensure_venv(&env.python, &venv, &["maturin>=1.7,<2", "ziglang"])?;
    Ok(venv.join("bin"))
}

/// Builds the wheel into `target/wheels/` and returns its path.
pub fn build(env: &Env) -> Result<PathBuf> {
    let bin = tools(env)?;
    let out = root().join("target/wheels");
    if out.exists() {
        for e in std::fs::read_dir(&out)?.flatten() {
            if e.file_name().to_string_lossy().starts_with("ksrpc_rs-") {
                std::fs::remove_file(e.path())?;
            }
        }
    }
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default());
    let status = Command::new(bin.join("maturin"))
        .args(["build", "--release", "--zig", "--compatibility", "manylinux2014", "--manifest-path"])
        .arg(root().join("ksrpc-pyext/Cargo.toml"))
        .arg("--out")
        .arg(&out)
        .arg("--interpreter")
        .arg(&env.python)
        .env("PATH", path)
        .env("CARGO_TARGET_DIR", root().join("target/xtask/wheel"))
        .env_remove("VIRTUAL_ENV")
        .env_remove("PYO3_PYTHON")
        .status()
        .context("running maturin")?;
    if !status.success() {
        bail!("maturin build failed ({status})");
    }
    let wheel = std::fs::read_dir(&out)?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("ksrpc_rs-")))
        .context("maturin wrote no ksrpc_rs wheel")?;
    let name = wheel.file_name().unwrap_or_default().to_string_lossy().into_owned();
    eprintln!("    built {name}");
    if !(name.contains("abi3") && name.contains("manylinux")) {
        bail!("{name}: expected an abi3 manylinux wheel");
    }
    Ok(wheel)
}

/// The Python client on every minor (the full client suite runs on 3.12):
/// a server and a client in one interpreter, both transports, sync and
/// async, a generator and an error.
const CLIENT_SMOKE: &str = r#"
import asyncio, ksrpc_rs
from ksrpc_rs.client import RpcClient, rpc_iterator
from ksrpc_rs.connections import SmartConnection
srv = ksrpc_rs.serve({"server": {"port": 0}, "users": {"u": {"password": "pw", "rules": ["allow ksrpc.server.demo"]}}})
try:
    for url in (srv.url, "ws" + srv.url[4:]):
        conn = SmartConnection(url, username="u", password="pw")
        assert RpcClient("ksrpc.server.demo", conn, to_sync=True).add(1, 2) == 3
        async def main():
            demo = RpcClient("ksrpc.server.demo", conn)
            assert await asyncio.gather(demo.add(1, 2), demo.add(3, 4)) == [3, 7]
            assert [i async for i in rpc_iterator(demo.sync_counter())] == [1, 2, 3]
            try:
                await demo.div(1, 0)
            except ZeroDivisionError as e:
                assert "div" in e.server_traceback
            else:
                raise AssertionError("no ZeroDivisionError")
        asyncio.run(main())
finally:
    srv.stop()
print("client smoke ok")
"#;

fn client_smoke(python: &Path, minor: u32) -> Result<(u64, u64, u64)> {
    eprintln!("    native client smoke on python 3.{minor}");
    let out = Command::new(python).args(["-c", CLIENT_SMOKE]).env("PATH", "/usr/bin:/bin").output()?;
    if out.status.success() {
        return Ok((1, 0, 0));
    }
    eprintln!("    FAILED: {}", String::from_utf8_lossy(&out.stderr));
    Ok((0, 1, 0))
}

/// CPython 3.9 and later from pyenv that really run, as (minor, python).
fn pythons() -> Vec<(u32, PathBuf)> {
    let root = std::env::var("PYENV_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".pyenv"));
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir(root.join("versions"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("bin/python3"))
        .filter_map(|p| match python::version_of(&p) {
            Some((3, minor)) if minor >= 9 => Some((minor, p)),
            _ => None,
        })
        .collect();
    found.sort();
    found.dedup_by_key(|(minor, _)| *minor);
    found
}

/// A fresh venv of `python` with `packages`, and the wheel installed by pip
/// with no cargo on PATH.
fn venv_dir(minor: u32) -> PathBuf {
    root().join(format!("target/xtask/wheel-venv-3.{minor}"))
}

/// The python of the 3.12 venv [`test`] installs the wheel in (with the
/// full suite's packages).
pub fn full_venv_python() -> PathBuf {
    venv_dir(12).join("bin/python")
}

fn venv_with_wheel(python: &Path, minor: u32, packages: &[&str], wheel: &Path) -> Result<PathBuf> {
    let venv = venv_dir(minor);
    let bin = python::ensure_venv(python, &venv, packages)?;
    let status = Command::new(&bin)
        .args(["-m", "pip", "install", "--quiet", "--force-reinstall", "--no-deps"])
        .arg(wheel)
        .env("PATH", "/usr/bin:/bin")
        .status()?;
    if !status.success() {
        bail!("pip install of the wheel into Python 3.{minor} failed");
    }
    Ok(bin)
}

/// The python of a 3.12 venv with a fresh wheel and the bench's packages.
pub fn bench_python(env: &Env) -> Result<PathBuf> {
    let wheel = build(env)?;
    let (minor, python) = pythons().into_iter().find(|(m, _)| *m == 12).context("no CPython 3.12 for the bench")?;
    venv_with_wheel(&python, minor, &full_packages(), &wheel)
}

/// What the 3.12 wheel venv holds: the server venv's packages and the real
/// ksrpc package beside ours (never shadowed).
fn full_packages() -> Vec<&'static str> {
    let mut packages: Vec<&str> = python::SERVER_PACKAGES.to_vec();
    // tqdm: the Python client's default progress bar
    packages.extend(["ksrpc==0.8.1", "nest_asyncio", "tqdm"]);
    packages
}

/// Builds the wheel and runs every wheel suite; returns the counts.
pub fn test(env: &Env) -> Result<(u64, u64, u64)> {
    let wheel = build(env)?;
    let mut total = (0, 0, 0);
    let mut add = |r: (u64, u64, u64)| {
        total.0 += r.0;
        total.1 += r.1;
        total.2 += r.2;
    };
    let found = pythons();
    let minors: Vec<u32> = found.iter().map(|(m, _)| *m).collect();
    eprintln!("    CPython minors here: {minors:?}");
    if !minors.contains(&9) || !minors.contains(&13) {
        bail!("expected pyenv's CPython 3.9 to 3.13 here, found {minors:?}");
    }
    let mut full_python = None;
    for (minor, python) in &found {
        if *minor == 12 {
            // The full suite, the in-process tests and the real ksrpc package beside ours.
            full_python = Some(venv_with_wheel(python, *minor, &full_packages(), &wheel)?);
            continue;
        }
        let bin = venv_with_wheel(python, *minor, &["numpy", "pandas<3"], &wheel)?;
        eprintln!("    smoke suite against python 3.{minor} -m ksrpc_rs");
        add(suite::run_against(env, &Kind::Wheel(bin.clone()), &format!("wheel-3.{minor}"), SMOKE)?);
        add(client_smoke(&bin, *minor)?);
    }
    let py312 = full_python.context("no CPython 3.12 for the full wheel suite")?;
    eprintln!("    full real-client suite against python 3.12 -m ksrpc_rs");
    add(suite::run_against(env, &Kind::Wheel(py312.clone()), "wheel-suite", &[])?);
    // The way notebook users without write access to site-packages install it.
    let target = root().join("target/xtask/wheel-target");
    if target.exists() {
        std::fs::remove_dir_all(&target)?;
    }
    let status = Command::new(&env.python)
        .args(["-m", "pip", "install", "--quiet", "--no-deps", "--target"])
        .arg(&target)
        .arg(&wheel)
        .env("PATH", "/usr/bin:/bin")
        .status()?;
    if !status.success() {
        bail!("pip install --target failed");
    }
    let envs = [
        ("KSRPC_TEST_TARGET_DIR", target.display().to_string()),
        ("KSRPC_TEST_TARGET_PYTHON", env.python.display().to_string()),
        ("KSRPC_TEST_SERVER_MODULES", root().join("tests/python/server_modules").display().to_string()),
        ("PYTHONDONTWRITEBYTECODE", "1".to_owned()),
    ];
    add(pytest(&py312, &[root().join("ksrpc-pyext/tests")], &envs, "wheel-in-process")?);
    Ok(total)
}
