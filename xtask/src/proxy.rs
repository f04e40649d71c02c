//! A real nginx in front of our server, configured with the block the
//! README's deployment section shows (read from README.md, so the README and
//! the suite cannot drift apart). xtask installs nginx with apt-get when the
//! machine lacks it.

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::test::root;

/// nginx (one process: `master_process off`, so killing it leaves no
/// worker behind), stopped when dropped.
pub struct Nginx {
    child: Child,
    /// The base URL through nginx (`http://127.0.0.1:PORT/api/v1`).
    pub url: String,
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The nginx binary, installed from Debian's packages when missing.
pub fn nginx_binary() -> Result<PathBuf> {
    let find = || ["/usr/sbin/nginx", "/usr/bin/nginx"].into_iter().map(PathBuf::from).find(|p| p.exists());
    if let Some(p) = find() {
        return Ok(p);
    }
    eprintln!("    nginx is missing: installing it with apt-get");
    let apt = |args: &[&str]| {
        Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    };
    // Wait for another apt (unattended upgrades on a fresh VM) instead of failing.
    let install = ["-o", "DPkg::Lock::Timeout=600", "install", "-y", "-q", "--no-install-recommends", "nginx"];
    if !apt(&install) {
        // A fresh machine has no package lists yet.
        apt(&["-o", "DPkg::Lock::Timeout=600", "update", "-q"]);
        apt(&install);
    }
    find().context("nginx is not installed and `apt-get install nginx` did not install it")
}

/// The README's nginx block (the fenced ```nginx code of the deployment
/// section).
pub fn readme_block() -> Result<String> {
    let readme = std::fs::read_to_string(root().join("README.md"))?;
    let start = readme.find("```nginx\n").context("README.md has no ```nginx block")? + "```nginx\n".len();
    let len = readme[start..].find("```").context("the README's nginx block does not end")?;
    Ok(readme[start..start + len].to_owned())
}

/// The README's block made to run here: listening on `port` of loopback,
/// passing to `upstream` (`127.0.0.1:PORT`), inside a complete config whose
/// files all live in `dir`.
pub fn config(block: &str, port: u16, upstream: &str, dir: &Path) -> Result<String> {
    let (listen, pass) = ("listen 80;", "proxy_pass http://127.0.0.1:8080;");
    if !block.contains(listen) || !block.contains(pass) {
        bail!("the README's nginx block no longer has `{listen}` and `{pass}`: update xtask/src/proxy.rs with it");
    }
    let server = block
        .replace(listen, &format!("listen 127.0.0.1:{port};"))
        .replace(pass, &format!("proxy_pass http://{upstream};"));
    let d = dir.display();
    Ok(format!(
        "daemon off;\nmaster_process off;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
         events {{ worker_connections 256; }}\n\
         http {{\n    access_log {d}/access.log;\n    client_body_temp_path {d}/body;\n    \
         proxy_temp_path {d}/proxy;\n    fastcgi_temp_path {d}/fastcgi;\n    uwsgi_temp_path {d}/uwsgi;\n    \
         scgi_temp_path {d}/scgi;\n{server}\n}}\n"
    ))
}

/// Starts nginx in front of the server at `server_url` with the README's
/// config; returns once it accepts connections.
pub fn start(server_url: &str, dir: &Path) -> Result<Nginx> {
    let binary = nginx_binary()?;
    std::fs::create_dir_all(dir)?;
    let upstream = server_url
        .strip_prefix("http://")
        .and_then(|rest| rest.split('/').next())
        .with_context(|| format!("not an http URL: {server_url}"))?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let conf = dir.join("nginx.conf");
    std::fs::write(&conf, config(&readme_block()?, port, upstream, dir)?)?;
    let log = std::fs::File::create(dir.join("nginx.out"))?;
    let child = Command::new(&binary)
        .arg("-c")
        .arg(&conf)
        .arg("-p")
        .arg(dir)
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting {}", binary.display()))?;
    let mut nginx = Nginx { child, url: format!("http://127.0.0.1:{port}/api/v1") };
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Ok(Some(status)) = nginx.child.try_wait() {
            let out = std::fs::read_to_string(dir.join("nginx.out")).unwrap_or_default();
            bail!("nginx exited ({status}):\n{out}");
        }
        if Instant::now() > deadline {
            bail!("nginx did not listen on {port} within 20 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(nginx)
}

/// The native protocol through the proxy (Rust client): a call over
/// `POST /v2/call`, and over `/v2/ws` a call and a 100 MB reply. Returns
/// (passed, failed), one per check, printing each failure.
pub fn native_checks(url: &str, (user, password): (&str, &str)) -> (u64, u64) {
    use ksrpc_client::{Client, Transport, Value};
    let rt = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("    FAILED native checks through nginx: {e}");
            return (0, 1);
        }
    };
    let mut tally = (0, 0);
    let mut check = |name: &str, r: Result<()>| match r {
        Ok(()) => {
            eprintln!("    ok: {name}");
            tally.0 += 1;
        }
        Err(e) => {
            eprintln!("    FAILED: {name}: {e:#}");
            tally.1 += 1;
        }
    };
    for transport in [Transport::Http, Transport::WebSocket] {
        let r = rt.block_on(async {
            let client = Client::builder(url).credentials(user, password).transport(transport).connect().await?;
            let three = client.module("ksrpc.server.demo").call("add", (1, 2)).await?;
            anyhow::ensure!(three == Value::Int(3), "add(1, 2) gave {three:?}");
            if transport == Transport::WebSocket {
                let batches =
                    client.module("ksrpc.server.demo").call("create_1d_array", (100,)).record_batches().await?;
                let rows: usize = batches.iter().map(|b| b.num_rows()).sum();
                anyhow::ensure!(rows == 100 << 17, "the 100 MB array came back with {rows} rows");
            }
            Ok(())
        });
        check(&format!("native {transport:?} through nginx"), r);
    }
    tally
}
