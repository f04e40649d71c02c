//! The real-client suite: our server, started on a free loopback port with
//! a test config, driven by the unmodified ksrpc 0.8.1 Python client.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::test::{pytest, root, Env};

/// A server process that is stopped (SIGTERM, then SIGKILL) when dropped.
pub struct Server {
    child: Child,
    /// The base URL as given to the client (`http://127.0.0.1:PORT/api/v1`).
    pub url: String,
    log: PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status();
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    /// Starts `binary` with `config` and waits for its "listening on" line.
    pub fn start(binary: &Path, config: &Path, log: PathBuf) -> Result<Server> {
        Server::start_command(Command::new(binary), config, log)
    }

    /// Starts `command --config CONFIG` (the binary, or `python -m ksrpc_rs`)
    /// and waits for its "listening on" line.
    pub fn start_command(mut command: Command, config: &Path, log: PathBuf) -> Result<Server> {
        let log_file = std::fs::File::create(&log)?;
        let mut child = command
            .arg("--config")
            .arg(config)
            .env("RUST_LOG", "info")
            .env_remove("VIRTUAL_ENV")
            .stdout(Stdio::piped())
            .stderr(log_file)
            .spawn()
            .with_context(|| format!("starting {command:?}"))?;
        let stdout = child.stdout.take().expect("piped");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(url) = line.strip_prefix("ksrpc-server listening on ") {
                    let _ = tx.send(url.to_owned());
                }
            }
        });
        match rx.recv_timeout(Duration::from_secs(120)) {
            Ok(url) => Ok(Server { child, url, log }),
            Err(_) => {
                let _ = child.kill();
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                bail!("the server did not start; its log:\n{text}")
            }
        }
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

fn random_password() -> String {
    // Test-only secrets; unpredictability is not the point, uniqueness is.
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    format!("pw-{:x}-{}", t.as_nanos(), std::process::id())
}

/// What serves the suite: the binary with its embedded interpreter, or the
/// wheel's `python -m ksrpc_rs` (whose packages are its own interpreter's,
/// and the test modules come by `PYTHONPATH`).
#[derive(Clone, Debug)]
pub enum Kind {
    /// `ksrpc-server` built by cargo, with the server venv.
    Binary(PathBuf),
    /// The python of a venv the wheel is installed in.
    Wheel(PathBuf),
}

impl Kind {
    /// The server process for `config`, started and waited for.
    pub fn start(&self, config: &Path, log: PathBuf) -> Result<Server> {
        match self {
            Kind::Binary(binary) => Server::start(binary, config, log),
            Kind::Wheel(python) => {
                let mut cmd = Command::new(python);
                cmd.args(["-m", "ksrpc_rs"]).env("PYTHONPATH", server_modules());
                Server::start_command(cmd, config, log)
            }
        }
    }
}

fn server_modules() -> PathBuf {
    root().join("tests/python/server_modules")
}

/// Writes the suite's server config: `admin` (everything, code allowed)
/// and `limited` (the demo, bench and `capsdk` test modules only; the same
/// rules as the native capability test in `ksrpc-server/tests/client.rs`).
pub fn write_config(dir: &Path, env: &Env, kind: &Kind, path: &str, admin: &str, limited: &str) -> Result<PathBuf> {
    let file = dir.join(format!("config{}.toml", path.replace(['/', '{', '}'], "_")));
    // The binary embeds Python and is told where the packages are; the wheel
    // runs in its venv's interpreter, which already has them.
    let python_paths = match kind {
        Kind::Binary(_) => {
            format!("venv = \"{}\"\npath = [\"{}\"]\n", env.server_venv.display(), server_modules().display())
        }
        Kind::Wheel(_) => String::new(),
    };
    let text = format!(
        r#"[server]
host = "127.0.0.1"
port = 0
path = "{path}"
timestamp_window = 600.0

[users.admin]
password = "{admin}"
rules = ["allow *"]

[users.limited]
password = "{limited}"
rules = ["allow ksrpc.server.demo", "allow bench_mod", "allow capsdk", "deny capsdk.secret*", "deny os", "deny builtins", "deny *"]

[limits]
call_timeout = 60.0

[python]
{python_paths}threads = 8
allow_code = true
"#
    );
    std::fs::write(&file, text)?;
    Ok(file)
}

/// Builds the server and runs the Python suite against it.
pub fn run(env: &Env) -> Result<(u64, u64, u64)> {
    let status = env.cargo().args(["build", "-p", "ksrpc-server"]).status()?;
    if !status.success() {
        bail!("building ksrpc-server failed");
    }
    let binary = env.target_dir.join("debug/ksrpc-server");
    run_against(env, &Kind::Binary(binary), "suite", &[])
}

/// Runs the real-client suite (or the tests `-k` selects) against a server
/// of `kind`; `name` keeps its files apart from other runs.
pub fn run_against(env: &Env, kind: &Kind, name: &str, select: &[&str]) -> Result<(u64, u64, u64)> {
    let dir = root().join("target/xtask").join(name);
    std::fs::create_dir_all(&dir)?;
    let markers = dir.join("markers");
    std::fs::create_dir_all(&markers)?;
    let (admin, limited) = (random_password(), random_password() + "-l");
    let main_cfg = write_config(&dir, env, kind, "/api/v1", &admin, &limited)?;
    let dyn_cfg = write_config(&dir, env, kind, "/api/v1/{time}", &admin, &limited)?;
    let server = kind.start(&main_cfg, dir.join("server.log"))?;
    let dynamic = kind.start(&dyn_cfg, dir.join("server-dynamic.log"))?;
    eprintln!("    servers at {} and {}", server.url, dynamic.url);
    let envs = [
        ("KSRPC_TEST_URL", server.url.clone()),
        ("KSRPC_TEST_DYNAMIC_URL", dynamic.url.clone()),
        ("KSRPC_TEST_ADMIN_USER", "admin".to_owned()),
        ("KSRPC_TEST_ADMIN_PASSWORD", admin),
        ("KSRPC_TEST_LIMITED_USER", "limited".to_owned()),
        ("KSRPC_TEST_LIMITED_PASSWORD", limited),
        ("KSRPC_TEST_MARKER_DIR", markers.display().to_string()),
        ("PYTHONDONTWRITEBYTECODE", "1".to_owned()),
    ];
    let mut paths = vec![root().join("tests/python")];
    if !select.is_empty() {
        paths = select.iter().map(|s| root().join("tests/python").join(s)).collect();
    }
    let result = pytest(&env.client_python, &paths, &envs, name);
    if !matches!(result, Ok((_, 0, _))) {
        let log = server.log();
        let tail: Vec<&str> = log.lines().rev().take(60).collect();
        eprintln!("--- last server log lines ---");
        for l in tail.iter().rev() {
            eprintln!("{l}");
        }
    }
    result
}
