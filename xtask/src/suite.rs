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
pub fn write_config(
    dir: &Path,
    env: &Env,
    kind: &Kind,
    path: &str,
    (admin, limited): (&str, &str),
    tls: Option<&Tls>,
) -> Result<PathBuf> {
    let file = dir.join(format!("config{}.toml", path.replace(['/', '{', '}'], "_")));
    // The binary embeds Python and is told where the packages are; the wheel
    // runs in its venv's interpreter, which already has them.
    let python_paths = match kind {
        Kind::Binary(_) => {
            format!("venv = \"{}\"\npath = [\"{}\"]\n", env.server_venv.display(), server_modules().display())
        }
        Kind::Wheel(_) => String::new(),
    };
    let tls = match tls {
        Some(t) => format!("\n[server.tls]\ncert = {:?}\nkey = {:?}\n", t.cert.display(), t.key.display()),
        None => String::new(),
    };
    let text = format!(
        r#"[server]
host = "127.0.0.1"
port = 0
path = "{path}"
timestamp_window = 600.0
{tls}
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

# test_cache.py: cache_probe counts its runs, so the suite sees hits on the server.
[cache]
enabled = true
ttl = ["cache_probe.cached_* 600", "cache_probe.brief 1"]
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
    let binary = Kind::Binary(env.target_dir.join("debug/ksrpc-server"));
    let (p, f, s) = run_against(env, &binary, "suite", &[])?;
    // The same compat tests over the server's own TLS ([server.tls]): the
    // unmodified client over https:// and wss://, trusting a CA made here.
    let dir = root().join("target/xtask/suite-tls");
    let tls = Tls::generate(&dir)?;
    let (tp, tf, ts) = run_with(env, &binary, "suite-tls", &["test_compat.py"], Front::Tls(&tls))?;
    // And through a real nginx configured as the README says.
    let (np, nf, ns) = run_with(env, &binary, "suite-nginx", &["test_compat.py"], Front::Nginx)?;
    Ok((p + tp + np, f + tf + nf, s + ts + ns))
}

/// What stands between the client and the server in a run.
#[derive(Clone, Copy)]
enum Front<'a> {
    /// Nothing: plain HTTP to the server.
    Direct,
    /// The server's own TLS.
    Tls(&'a Tls),
    /// nginx with the README's configuration (plain HTTP on loopback).
    Nginx,
}

/// A private CA and a server certificate it signed for `127.0.0.1` and
/// `localhost`, as PEM files.
pub struct Tls {
    /// The CA certificate: what the client trusts (`SSL_CERT_FILE`).
    pub ca: PathBuf,
    /// The server's certificate.
    pub cert: PathBuf,
    /// The server's private key.
    pub key: PathBuf,
}

impl Tls {
    /// Makes a fresh CA and server certificate under `dir`.
    pub fn generate(dir: &Path) -> Result<Tls> {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
        std::fs::create_dir_all(dir)?;
        let mut ca_params = CertificateParams::new(Vec::new())?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.distinguished_name.push(DnType::CommonName, "ksrpc test CA");
        let ca_key = KeyPair::generate()?;
        let ca_cert = ca_params.self_signed(&ca_key)?;
        let server_key = KeyPair::generate()?;
        let server_params = CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])?;
        let server_cert = server_params.signed_by(&server_key, &Issuer::from_params(&ca_params, &ca_key))?;
        let tls = Tls { ca: dir.join("ca.pem"), cert: dir.join("server.pem"), key: dir.join("server-key.pem") };
        std::fs::write(&tls.ca, ca_cert.pem())?;
        std::fs::write(&tls.cert, server_cert.pem())?;
        std::fs::write(&tls.key, server_key.serialize_pem())?;
        Ok(tls)
    }
}

/// Runs the real-client suite (or the test files `select` names) against a
/// server of `kind`; `name` keeps its files apart from other runs.
pub fn run_against(env: &Env, kind: &Kind, name: &str, select: &[&str]) -> Result<(u64, u64, u64)> {
    run_with(env, kind, name, select, Front::Direct)
}

fn run_with(env: &Env, kind: &Kind, name: &str, select: &[&str], front: Front<'_>) -> Result<(u64, u64, u64)> {
    let tls = match front {
        Front::Tls(t) => Some(t),
        _ => None,
    };
    let dir = root().join("target/xtask").join(name);
    std::fs::create_dir_all(&dir)?;
    let markers = dir.join("markers");
    std::fs::create_dir_all(&markers)?;
    let (admin, limited) = (random_password(), random_password() + "-l");
    let users = (admin.as_str(), limited.as_str());
    let admin_password = admin.clone();
    let main_cfg = write_config(&dir, env, kind, "/api/v1", users, tls)?;
    let dyn_cfg = write_config(&dir, env, kind, "/api/v1/{time}", users, tls)?;
    let server = kind.start(&main_cfg, dir.join("server.log"))?;
    let dynamic = kind.start(&dyn_cfg, dir.join("server-dynamic.log"))?;
    eprintln!("    servers at {} and {}", server.url, dynamic.url);
    if tls.is_some() && !server.url.starts_with("https://") {
        bail!("a server with [server.tls] announced {}", server.url);
    }
    let nginx = match front {
        Front::Nginx => Some(crate::proxy::start(&server.url, &dir.join("nginx"))?),
        _ => None,
    };
    let url = nginx.as_ref().map_or_else(|| server.url.clone(), |n| n.url.clone());
    if let Some(n) = &nginx {
        eprintln!("    nginx at {} in front of {}", n.url, server.url);
    }
    let mut envs = vec![
        ("KSRPC_TEST_URL", url.clone()),
        ("KSRPC_TEST_DYNAMIC_URL", dynamic.url.clone()),
        ("KSRPC_TEST_ADMIN_USER", "admin".to_owned()),
        ("KSRPC_TEST_ADMIN_PASSWORD", admin),
        ("KSRPC_TEST_LIMITED_USER", "limited".to_owned()),
        ("KSRPC_TEST_LIMITED_PASSWORD", limited),
        ("KSRPC_TEST_MARKER_DIR", markers.display().to_string()),
        ("PYTHONDONTWRITEBYTECODE", "1".to_owned()),
    ];
    if let Some(tls) = tls {
        // aiohttp's default SSL context trusts what OpenSSL's default paths
        // name; this variable points them at our CA alone.
        envs.push(("SSL_CERT_FILE", tls.ca.display().to_string()));
    }
    let mut paths = vec![root().join("tests/python")];
    if !select.is_empty() {
        paths = select.iter().map(|s| root().join("tests/python").join(s)).collect();
    }
    let mut result = pytest(&env.client_python, &paths, &envs, name);
    if nginx.is_some() {
        let (p, f) = crate::proxy::native_checks(&url, ("admin", &admin_password));
        if let Ok((tp, tf, _)) = &mut result {
            *tp += p;
            *tf += f;
        }
    }
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
