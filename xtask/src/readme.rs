//! The README's examples, run (`cargo xtask test`, step "README examples").
//!
//! Every fenced block of README.md in a language a user runs (`sh`, `toml`,
//! `python`, `rust`, `nginx`) carries its role in an HTML comment on the
//! line before it, invisible on GitHub: `<!-- readme: ROLE -->`. A block
//! without one fails the step, so a new example cannot go unchecked. Roles:
//!
//! - `config`: our TOML; `ksrpc-server check --config FILE` must accept it.
//! - `python-client`: the 0.8.1 client's quick start, run with the client
//!   venv against a server started here as the quick start starts it (no
//!   users: a generated admin, the demo only); `http://127.0.0.1:8080` and
//!   `<printed at start-up>` are replaced by its address and the password it
//!   printed.
//! - `native-client`: the Python client of the native protocol, run in the
//!   3.12 venv the wheel step installed the wheel in, against the same
//!   server and with the same replacements (`ws://127.0.0.1:8080` too).
//! - `notebook-cell`: run in the 3.12 venv the wheel step installed the wheel
//!   in, in a directory with a `ksrpc.toml` (port 0) and a stand-in
//!   `jqdatasdk` module; the harness then prints `srv.url` and stops it.
//! - `rust-example PATH`: the block must be the file PATH, an example of the
//!   workspace; it runs against the same server.
//! - `sh-cli`: each command runs in bash with the `ksrpc` binary built here
//!   (`cargo run -p ksrpc-client --bin ksrpc --` and `ksrpc` both mean it;
//!   `cargo install` is not run), the same replacements as above; a `# TEXT`
//!   line after a command is output it must print (TEXT up to two spaces).
//! - `nginx-suite`: the block the nginx suite configures nginx from
//!   (`proxy::readme_block`).
//! - `skip: REASON`: not run here, and REASON says why.
//!
//! In every role but `skip`, a `print(...)  # TOKEN` (Python) or
//! `// prints "TEXT"` (Rust) comment is output the block must produce.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::suite::Server;
use crate::test::{root, Env};

/// A fenced block of README.md.
#[derive(Debug)]
pub struct Block {
    /// 1-based line of the opening fence.
    pub line: usize,
    /// The fence's language.
    pub lang: String,
    /// The role from the comment before it.
    pub role: String,
    /// The text between the fences.
    pub body: String,
}

const LANGS: &[&str] = &["sh", "toml", "python", "rust", "nginx"];
const ADDRESS: &str = "http://127.0.0.1:8080";
const WS_ADDRESS: &str = "ws://127.0.0.1:8080";
const PASSWORD_PLACEHOLDER: &str = "<printed at start-up>";

/// The blocks of `text` in the languages above, each with its role.
pub fn blocks(text: &str) -> Result<Vec<Block>> {
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let Some(info) = lines[i].strip_prefix("```") else {
            i += 1;
            continue;
        };
        let lang = info.split_whitespace().next().unwrap_or("").to_owned();
        let end = (i + 1..lines.len())
            .find(|&j| lines[j].starts_with("```"))
            .with_context(|| format!("README.md:{}: the block does not end", i + 1))?;
        if LANGS.contains(&lang.as_str()) {
            let role = i
                .checked_sub(1)
                .and_then(|p| lines[p].trim().strip_prefix("<!-- readme:"))
                .and_then(|r| r.strip_suffix("-->"))
                .map(|r| r.trim().to_owned())
                .with_context(|| {
                    format!(
                        "README.md:{}: a ```{lang} block needs `<!-- readme: ROLE -->` on the line before it",
                        i + 1
                    )
                })?;
            let body = lines[i + 1..end].iter().map(|l| format!("{l}\n")).collect();
            out.push(Block { line: i + 1, lang, role, body });
        }
        i = end + 1;
    }
    Ok(out)
}

/// What the examples run against: a server with the default rules.
struct Fixture {
    server: Server,
    password: String,
}

impl Fixture {
    /// The server as `cargo run -p ksrpc-server` starts it (no users: an
    /// admin with a generated password and the default rules), on a free
    /// port, with the server venv (pandas, pyarrow).
    fn start(env: &Env, dir: &Path) -> Result<Fixture> {
        let config = dir.join("server.toml");
        let venv = env.server_venv.display().to_string();
        std::fs::write(&config, format!("[server]\nport = 0\n\n[python]\nvenv = {venv:?}\n"))?;
        let binary = env.target_dir.join("debug/ksrpc-server");
        let server = Server::start(&binary, &config, dir.join("server.log"))?;
        let log = server.log();
        let marker = "created user `admin` with password `";
        let password = log
            .split_once(marker)
            .and_then(|(_, rest)| rest.split_once('`'))
            .map(|(pw, _)| pw.to_owned())
            .with_context(|| format!("the server printed no generated password:\n{log}"))?;
        Ok(Fixture { server, password })
    }

    /// `http://127.0.0.1:PORT` of the server.
    fn address(&self) -> &str {
        self.server.url.strip_suffix("/api/v1").unwrap_or(&self.server.url)
    }

    /// The block with the README's address and password made this server's.
    fn localize(&self, text: &str) -> String {
        let ws = self.address().replacen("http://", "ws://", 1);
        text.replace(ADDRESS, self.address()).replace(WS_ADDRESS, &ws).replace(PASSWORD_PLACEHOLDER, &self.password)
    }
}

/// Runs every block; returns (passed, failed) with a line per block.
pub fn run(env: &Env, wheel_python: Option<&Path>) -> Result<(u64, u64, u64)> {
    let text = std::fs::read_to_string(root().join("README.md"))?;
    let blocks = blocks(&text)?;
    let dir = root().join("target/xtask/readme");
    if dir.exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    std::fs::create_dir_all(&dir)?;
    for binary in [["build", "-p", "ksrpc-server"], ["build", "-p", "ksrpc-client"]] {
        if !env.cargo().args(binary).status()?.success() {
            bail!("cargo {} failed", binary.join(" "));
        }
    }
    let fixture = Fixture::start(env, &dir)?;
    let (mut passed, mut failed, mut skipped) = (0, 0, 0);
    for (n, block) in blocks.iter().enumerate() {
        let work = dir.join(format!("block-{n}"));
        std::fs::create_dir_all(&work)?;
        let what = format!("README.md:{} ```{} ({})", block.line, block.lang, block.role);
        match run_block(env, &fixture, block, &work, wheel_python) {
            Ok(true) => {
                passed += 1;
                eprintln!("    ok    {what}");
            }
            Ok(false) => {
                skipped += 1;
                eprintln!("    skip  {what}");
            }
            Err(e) => {
                failed += 1;
                eprintln!("    FAIL  {what}: {e:#}");
            }
        }
    }
    if failed > 0 {
        eprintln!("--- the examples' server log ---\n{}", fixture.server.log());
    }
    Ok((passed, failed, skipped))
}

/// Runs one block: Ok(true) when it ran and did what it says, Ok(false) for
/// a skip.
fn run_block(env: &Env, fixture: &Fixture, block: &Block, work: &Path, wheel: Option<&Path>) -> Result<bool> {
    let (role, arg) = block.role.split_once([' ', ':']).map_or((block.role.as_str(), ""), |(r, a)| (r, a.trim()));
    match (role, block.lang.as_str()) {
        ("skip", _) => {
            if arg.is_empty() {
                bail!("a skip must say why: `<!-- readme: skip: REASON -->`");
            }
            Ok(false)
        }
        ("config", "toml") => {
            let file = work.join("config.toml");
            std::fs::write(&file, &block.body)?;
            let out = Command::new(env.target_dir.join("debug/ksrpc-server"))
                .args(["check", "--config"])
                .arg(&file)
                .env_remove("VIRTUAL_ENV")
                .output()?;
            expect_success("ksrpc-server check", &out)?;
            Ok(true)
        }
        ("python-client", "python") => {
            let script = work.join("quickstart.py");
            std::fs::write(&script, fixture.localize(&block.body))?;
            let out = Command::new(&env.client_python).arg(&script).current_dir(work).output()?;
            expect_success("the quick start", &out)?;
            expect_prints(&block.body, &out.stdout)?;
            Ok(true)
        }
        ("native-client", "python") => {
            let python = wheel.context("the wheel step did not leave a 3.12 venv with the wheel")?;
            let script = work.join("native_client.py");
            std::fs::write(&script, fixture.localize(&block.body))?;
            let out = Command::new(python).arg(&script).current_dir(work).output()?;
            expect_success("the native client example", &out)?;
            expect_prints(&block.body, &out.stdout)?;
            Ok(true)
        }
        ("notebook-cell", "python") => {
            let python = wheel.context("the wheel step did not leave a 3.12 venv with the wheel")?;
            std::fs::write(work.join("jqdatasdk.py"), "def auth(user, password):\n    pass\n")?;
            std::fs::write(
                work.join("ksrpc.toml"),
                format!(
                    "[server]\nport = 0\n\n[users.admin]\npassword = {:?}\nrules = [\"allow jqdatasdk\"]\n",
                    fixture.password
                ),
            )?;
            let script = work.join("cell.py");
            std::fs::write(&script, format!("{}\nprint(srv.url)\nsrv.stop()\n", block.body))?;
            let out = Command::new(python).arg(&script).current_dir(work).env("PYTHONPATH", work).output()?;
            expect_success("the notebook cell", &out)?;
            let url = String::from_utf8_lossy(&out.stdout);
            let url = url.lines().last().unwrap_or("");
            if !(url.starts_with("http://127.0.0.1:") && url.ends_with("/api/v1")) {
                bail!("srv.url is {url:?}");
            }
            Ok(true)
        }
        ("rust-example", "rust") => {
            let path = root().join(arg);
            let file = std::fs::read_to_string(&path).with_context(|| format!("reading {arg}"))?;
            if file != block.body {
                bail!("the block differs from {arg}: copy one into the other");
            }
            let name = Path::new(arg).file_stem().and_then(|s| s.to_str()).context("an example file name")?;
            let package = arg.split('/').next().unwrap_or_default();
            let out = env
                .cargo()
                .args(["run", "--quiet", "-p", package, "--example", name])
                .env("KSRPC_URL", &fixture.server.url)
                .env("KSRPC_PASSWORD", &fixture.password)
                .output()?;
            expect_success("the Rust example", &out)?;
            expect_prints(&block.body, &out.stdout)?;
            Ok(true)
        }
        ("sh-cli", "sh") => {
            run_cli_block(env, fixture, &block.body, work)?;
            Ok(true)
        }
        ("nginx-suite", "nginx") => {
            if crate::proxy::readme_block()? != block.body {
                bail!("the nginx suite reads another block (proxy::readme_block takes the first ```nginx)");
            }
            Ok(true)
        }
        _ => bail!("unknown role {:?} for a ```{} block", block.role, block.lang),
    }
}

fn expect_success(what: &str, out: &std::process::Output) -> Result<()> {
    if !out.status.success() {
        bail!(
            "{what} exited with {}\n--- stdout ---\n{}--- stderr ---\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// The outputs a block's comments promise: `print(...)  # TOKEN` (one word)
/// and `// prints "TEXT"`, in order.
fn promised(body: &str) -> Vec<String> {
    let mut out = Vec::new();
    for line in body.lines() {
        if let Some((code, comment)) = line.split_once("  # ") {
            let comment = comment.trim();
            if code.trim_start().starts_with("print(") && !comment.is_empty() && !comment.contains(' ') {
                out.push(comment.to_owned());
            }
        }
        if let Some(rest) = line.split_once("// prints \"").map(|(_, r)| r) {
            if let Some(text) = rest.strip_suffix('"') {
                out.push(text.to_owned());
            }
        }
    }
    out
}

fn expect_prints(body: &str, stdout: &[u8]) -> Result<()> {
    let printed = String::from_utf8_lossy(stdout);
    let mut lines = printed.lines();
    for want in promised(body) {
        if !lines.any(|l| l.trim() == want) {
            bail!("expected a line {want:?} (in order) in the output:\n{printed}");
        }
    }
    Ok(())
}

/// Runs a shell block command by command (see the module docs).
fn run_cli_block(env: &Env, fixture: &Fixture, body: &str, work: &Path) -> Result<()> {
    let ksrpc: PathBuf = env.target_dir.join("debug/ksrpc");
    let prelude = format!(
        "set -o pipefail\n\
         ksrpc() {{ {ksrpc:?} \"$@\"; }}\n\
         cargo() {{\n\
           if [ \"$1 $2 $3 $4 $5 $6\" = \"run -p ksrpc-client --bin ksrpc --\" ]; then shift 6; ksrpc \"$@\";\n\
           elif [ \"$1\" = install ]; then :;\n\
           else echo \"the README harness runs no cargo $1\" >&2; return 99; fi\n\
         }}\n"
    );
    let localized = fixture.localize(body);
    let lines: Vec<&str> = localized.lines().collect();
    let mut exports = String::new();
    let mut ran = 0;
    for (i, line) in lines.iter().enumerate() {
        let command = line.split("  #").next().unwrap_or("").trim();
        if command.is_empty() || command.starts_with('#') {
            continue;
        }
        if command.starts_with("export ") {
            exports.push_str(command);
            exports.push('\n');
        }
        let script = format!("{prelude}{exports}{command}\n");
        let out = Command::new("bash")
            .arg("-c")
            .arg(&script)
            .current_dir(work)
            .env_remove("KSRPC_USER")
            // What the user would type at the password prompt (no terminal here).
            .env("KSRPC_PASSWORD", &fixture.password)
            .env("NETRC", "/dev/null")
            .env("HOME", work)
            .output()?;
        expect_success(&format!("`{command}`"), &out)?;
        let printed = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        for want in lines[i + 1..].iter().map_while(|l| l.trim().strip_prefix("# ")) {
            let want = want.split("  ").next().unwrap_or("").trim();
            if !printed.contains(want) {
                bail!("`{command}` should print {want:?}; it printed:\n{printed}");
            }
        }
        ran += 1;
    }
    if ran == 0 {
        bail!("the block has no command");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_need_a_role_and_carry_it() {
        let text = "a\n<!-- readme: config -->\n```toml\nx = 1\n```\n```text\nfree\n```\n";
        let b = blocks(text).unwrap();
        assert_eq!(b.len(), 1);
        assert_eq!(
            (b[0].line, b[0].lang.as_str(), b[0].role.as_str(), b[0].body.as_str()),
            (3, "toml", "config", "x = 1\n")
        );
        let err = blocks("```python\nprint(1)\n```\n").unwrap_err().to_string();
        assert!(err.contains("README.md:1") && err.contains("readme: ROLE"), "{err}");
    }

    #[test]
    fn promised_outputs_are_read_from_comments() {
        let body = "print(await demo.add(1, 2))        # 3\nprint(df)  # a DataFrame\n// prints \"3 5 5 rows\"\n";
        assert_eq!(promised(body), ["3", "3 5 5 rows"]);
        assert!(expect_prints(body, b"3\nx\n3 5 5 rows\n").is_ok());
        assert!(expect_prints(body, b"4\n").is_err());
    }
}
