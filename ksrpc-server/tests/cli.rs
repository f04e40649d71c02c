//! The `ksrpc-server` binary as a user runs it.

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

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
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !line.contains("listening on") && Instant::now() < deadline {
        line.clear();
        if stdout.read_line(&mut line).unwrap() == 0 {
            break;
        }
    }
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
