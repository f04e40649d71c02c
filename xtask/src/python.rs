//! Finding a Python >= 3.12 and making the venvs the suites need.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

/// Packages of the venv the server embeds during tests.
pub const SERVER_PACKAGES: &[&str] = &["dill", "numexpr", "numpy", "pandas<3", "pyarrow", "pytest", "pytest-timeout"];
/// Packages of the venv the real 0.8.1 client runs in.
pub const CLIENT_PACKAGES: &[&str] = &["ksrpc==0.8.1", "nest_asyncio", "numpy", "pandas<3", "pytest", "pytest-timeout"];

/// A Python >= 3.12 that really runs: `KSRPC_CLIENT_PYTHON`, then pyenv's
/// versions, then `python3.1x` on PATH. Fails listing what was tried.
pub fn find_python() -> Result<PathBuf> {
    let mut tried = Vec::new();
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Ok(p) = std::env::var("KSRPC_CLIENT_PYTHON") {
        candidates.push(p.into());
    }
    let pyenv_root = std::env::var("PYENV_ROOT").ok().map(PathBuf::from).or_else(|| {
        let out = Command::new("pyenv").arg("root").output().ok()?;
        out.status.success().then(|| PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
    });
    if let Some(root) = pyenv_root {
        if let Ok(entries) = std::fs::read_dir(root.join("versions")) {
            let mut versions: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
            versions.sort();
            // Prefer the oldest supported minor: closest to what SDKs pin.
            for v in versions {
                candidates.push(v.join("bin/python3"));
            }
        }
    }
    for minor in 12..=19 {
        candidates.push(format!("python3.{minor}").into());
    }
    for c in candidates {
        match version_of(&c) {
            Some((3, minor)) if minor >= 12 => return Ok(c),
            Some((major, minor)) => tried.push(format!("{} (Python {major}.{minor})", c.display())),
            None => tried.push(format!("{} (does not run)", c.display())),
        }
    }
    bail!("no Python >= 3.12 found (the ksrpc 0.8.1 client needs it); tried:\n  {}", tried.join("\n  "))
}

/// (major, minor) of a Python executable, if it runs.
pub fn version_of(python: &Path) -> Option<(u32, u32)> {
    let out = Command::new(python)
        .args(["-c", "import sys; print(sys.version_info[0], sys.version_info[1])"])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let mut it = text.split_whitespace().map(|s| s.parse::<u32>().ok());
    Some((it.next()??, it.next()??))
}

/// Creates (or reuses) a venv at `dir` from `python` with `packages`
/// installed. A stamp file records what was installed, so a second run
/// costs nothing and a changed package list reinstalls.
pub fn ensure_venv(python: &Path, dir: &Path, packages: &[&str]) -> Result<PathBuf> {
    let bin = dir.join("bin/python");
    let stamp = dir.join("ksrpc-xtask.stamp");
    let want = format!("{}\n{}", python.display(), packages.join("\n"));
    if bin.exists() && std::fs::read_to_string(&stamp).ok().as_deref() == Some(want.as_str()) {
        return Ok(bin);
    }
    if dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("removing stale venv {}", dir.display()))?;
    }
    run(Command::new(python).arg("-m").arg("venv").arg(dir)).context("creating venv")?;
    run(Command::new(&bin).args(["-m", "pip", "install", "--quiet", "--upgrade", "pip"])).context("upgrading pip")?;
    run(Command::new(&bin).args(["-m", "pip", "install", "--quiet"]).args(packages))
        .with_context(|| format!("installing {packages:?}"))?;
    std::fs::write(&stamp, want)?;
    Ok(bin)
}

fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}
