//! The `ksrpc-server` binary as a user runs it.

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

const BIN: &str = env!("CARGO_BIN_EXE_ksrpc-server");

#[test]
fn hash_password_prints_an_argon2id_hash_of_stdin() {
    let mut child = Command::new(BIN)
        .arg("hash-password")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"s3cret\n").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let hash = String::from_utf8(out.stdout).unwrap();
    assert!(hash.starts_with("$argon2id$"), "{hash}");
    assert!(!hash.contains("s3cret"));
}

#[test]
fn a_bad_config_is_refused_with_the_key_named() {
    let dir = std::env::temp_dir().join(format!("ksrpc-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("bad.toml");
    std::fs::write(&file, "[server]\nprot = 8080\n").unwrap();
    let out = Command::new(BIN).arg("--config").arg(&file).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("prot"), "{}", String::from_utf8_lossy(&out.stderr));
    std::fs::remove_dir_all(dir).ok();
}

/// `--path "/api/{time"` used to print "listening" and then panic in a
/// worker at the first request; now it is a config error naming the key,
/// and nothing listens.
#[test]
fn a_malformed_path_is_refused_before_listening() {
    let out = Command::new(BIN)
        .args(["--port", "0", "--path", "/api/{time"])
        .env_remove("KSRPC_CONFIG")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!out.status.success(), "{stdout}\n{stderr}");
    assert!(!stdout.contains("listening"), "{stdout}");
    assert!(stderr.contains("server.path") && stderr.contains("{time"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// With no config at all: loopback only, one `admin` with a password printed
/// once on stderr, and a "listening on" line on stdout.
#[test]
fn with_no_config_it_starts_safely_and_prints_a_generated_password() {
    let mut child = Command::new(BIN)
        .args(["--port", "0"])
        .env_remove("KSRPC_CONFIG")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let line = listening_line(&mut child);
    let _ = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status();
    let mut stderr = String::new();
    child.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    let status = child.wait().unwrap();
    assert!(line.starts_with("ksrpc-server listening on http://127.0.0.1:"), "{line:?}\n{stderr}");
    assert!(line.trim_end().ends_with("/api/v1"), "{line:?}");
    assert!(stderr.contains("created user `admin` with password `"), "{stderr}");
    assert_eq!(stderr.matches("with password").count(), 1, "printed once");
    assert!(status.success(), "SIGTERM stops it gracefully: {status:?}\n{stderr}");
}

/// Reads the child's stdout up to its "listening on" line (or its end, or
/// 60 s) and returns that last line.
fn listening_line(child: &mut std::process::Child) -> String {
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !line.contains("listening on") && Instant::now() < deadline {
        line.clear();
        if stdout.read_line(&mut line).unwrap() == 0 {
            break;
        }
    }
    line
}

/// The Python half used to be written to `$TMPDIR/ksrpc-py-<hash of the
/// sources>` and imported from there whenever that directory already held
/// the executor's sources, their contents never checked: another local user could
/// create it first and run code in the server. Plant exactly that directory
/// (a copy of the real sources with one extra line) and check the server
/// neither runs it nor writes anything to the temp dir.
#[test]
fn a_python_bundle_planted_in_the_temp_dir_is_never_imported() {
    let tmp = tempfile::tempdir().unwrap();
    let marker = tmp.path().join("planted-code-ran");
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../ksrpc-py/python");
    let files = [
        "ksrpc/__init__.py",
        "ksrpc/client.py",
        "ksrpc/server/__init__.py",
        "ksrpc/server/demo.py",
        "ksrpc_executor/__init__.py",
        "ksrpc_executor/names.py",
        "ksrpc_executor/trampoline.py",
        "ksrpc_executor/sharing.py",
        "ksrpc_executor/build_budget.py",
        "ksrpc_executor/unpicklers.py",
        "ksrpc_executor/requests.py",
        "ksrpc_executor/replies.py",
        "ksrpc_executor/lanes.py",
        "ksrpc_executor/stubs.py",
        "ksrpc_executor/executor.py",
        "ksrpc_capability.py",
    ];
    // The directory name the server derived from its sources.
    let mut h = Sha256::new();
    for name in files {
        h.update(name.as_bytes());
        h.update([0]);
        h.update(std::fs::read(src.join(name)).unwrap());
    }
    let tag: String = h.finalize().iter().take(8).map(|b| format!("{b:02x}")).collect();
    let planted = tmp.path().join(format!("ksrpc-py-{tag}"));
    for name in files {
        let mut text = std::fs::read_to_string(src.join(name)).unwrap();
        if name == "ksrpc_executor/__init__.py" {
            // right after its `from __future__` line, which must come first
            let plant = format!("\nopen({:?}, 'w').write('planted')\n", marker.display().to_string());
            let at = text.find("from __future__ import annotations").map_or(0, |i| i + text[i..].find('\n').unwrap());
            text.insert_str(at, &plant);
        }
        let path = planted.join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }
    let before = entries(tmp.path());

    let mut child = Command::new(BIN)
        .args(["--port", "0"])
        .env_remove("KSRPC_CONFIG")
        .env("TMPDIR", tmp.path())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let line = listening_line(&mut child);
    let _ = child.kill();
    let _ = child.wait();
    assert!(line.contains("listening on"), "the server started: {line:?}");
    assert!(!marker.exists(), "the server imported code planted in its temp dir");
    assert_eq!(entries(tmp.path()), before, "the server wrote to the temp dir");
}

/// The names under `dir` (recursively), sorted.
fn entries(dir: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            out.push(e.path().strip_prefix(dir).unwrap().display().to_string());
            if e.path().is_dir() {
                stack.push(e.path());
            }
        }
    }
    out.sort();
    out
}

/// A `[server.tls]` whose files are missing or not PEM stops start-up with
/// an error naming the key and the file.
#[test]
fn bad_tls_files_are_refused_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert, "not a certificate\n").unwrap();
    for (case, expect) in [("missing", "server.tls.cert"), ("garbage", "server.tls.cert")] {
        let config = dir.path().join(format!("{case}.toml"));
        let cert_path = if case == "missing" { dir.path().join("nowhere.pem") } else { cert.clone() };
        std::fs::write(
            &config,
            format!(
                "[server]\nport = 0\n[server.tls]\ncert = {:?}\nkey = {:?}\n",
                cert_path.display().to_string(),
                key.display().to_string()
            ),
        )
        .unwrap();
        let out = Command::new(BIN).arg("--config").arg(&config).env("RUST_LOG", "warn").output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{case}: started anyway");
        assert!(stderr.contains(expect), "{case}: {stderr}");
    }
    // only one of the two keys
    let config = dir.path().join("half.toml");
    std::fs::write(&config, format!("[server.tls]\ncert = {:?}\n", cert.display().to_string())).unwrap();
    let out = Command::new(BIN).arg("--config").arg(&config).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("key"), "{}", String::from_utf8_lossy(&out.stderr));
}

/// `check` loads a configuration as start-up would and reports without
/// serving; each mistake is named (a hash that is no hash, a TLS file that
/// is missing, a venv without Python).
#[test]
fn check_reports_a_configuration_without_serving_and_names_each_mistake() {
    let dir = tempfile::tempdir().unwrap();
    let check = |text: &str| {
        let file = dir.path().join("ksrpc.toml");
        std::fs::write(&file, text).unwrap();
        let out = Command::new(BIN).args(["check", "--config"]).arg(&file).stdin(Stdio::null()).output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let hash = "$argon2id$v=19$m=19456,t=2,p=1$Yio45EorN70QK8gNyLNZcQ$Qv9zTjtBr+/yPDGntQutc1MvBvul3ewtGQj4SGWJchA";
    let good = format!(
        "[server]\nport = 9999\n[users.a]\npassword_hash = \"{hash}\"\nrules = [\"allow x\", \"deny *\"]\n\
         [python]\nparallel_modules = [\"numpy\"]\n"
    );
    let (code, out, err) = check(&good);
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert!(out.contains("configuration OK") && out.contains("http://127.0.0.1:9999/api/v1"), "{out}");
    assert!(out.contains("user a: 2 rules, password hash") && out.contains("[\"numpy\"]"), "{out}");
    assert!(!out.contains("listening"), "{out}");

    let (code, _, err) = check(&good.replace(hash, "$argon2id$..."));
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("users.a.password_hash is not an argon2 hash") && err.contains("hash-password"), "{err}");
    let (code, _, err) =
        check(&format!("{good}[server.tls]\ncert = \"/nonexistent/c.pem\"\nkey = \"/nonexistent/k.pem\"\n"));
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("server.tls.cert"), "{err}");
    let (code, _, err) = check(&good.replace("[python]\n", "[python]\nvenv = \"/nonexistent/venv\"\n"));
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("python.venv"), "{err}");
    let (code, out, _) = check("[server]\nport = 0\n");
    assert_eq!(code, Some(0));
    assert!(out.contains("an admin with a random password"), "{out}");
}
