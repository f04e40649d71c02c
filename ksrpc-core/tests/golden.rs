//! Golden vectors produced by CPython (`scripts/gen_golden.py`), and our
//! output checked by a real `python3`.

use std::path::PathBuf;
use std::process::Command;

use bytes::Bytes;
use ksrpc_core::codec::{decode_all, encode_to_vec, ChunkedZlib, Level, Limits, BORDER};
use ksrpc_core::rules::Pattern;

fn golden(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden").join(path)
}

#[test]
fn fnmatch_matches_cpython_on_every_golden_row() {
    let text = std::fs::read_to_string(golden("fnmatch.json")).unwrap();
    let rows: Vec<(String, String, bool)> = serde_json::from_str(&text).unwrap();
    assert!(rows.len() >= 200, "golden file too small: {}", rows.len());
    let mut wrong = Vec::new();
    for (pattern, name, expected) in &rows {
        if Pattern::new(pattern).matches(name) != *expected {
            wrong.push(format!("fnmatch({name:?}, {pattern:?}) should be {expected}"));
        }
    }
    assert!(wrong.is_empty(), "{} of {} rows differ:\n{}", wrong.len(), rows.len(), wrong.join("\n"));
}

#[test]
fn python_zlib_output_at_every_level_decodes() {
    for name in ["text", "random", "zeros"] {
        let payload = std::fs::read(golden(&format!("zlib/{name}.bin"))).unwrap();
        for level in [0, 1, 6, 9] {
            let mut wire = std::fs::read(golden(&format!("zlib/{name}.{level}.z"))).unwrap();
            wire.extend_from_slice(BORDER);
            let got = decode_all(&ChunkedZlib::default(), &wire, Limits::default()).unwrap();
            assert_eq!(got, payload, "{name} at level {level}");
        }
    }
}

/// Our framing, read back by CPython exactly as the 0.8.1 client does:
/// split on the border, `zlib.decompress` every piece.
#[test]
fn python_decodes_our_output_at_every_level() {
    let mut payload = Vec::new();
    for i in 0..40_000u32 {
        payload.extend_from_slice(format!("{i},SH{:06},{:.2}\n", i * 7 % 999_999, f64::from(i) * 0.37).as_bytes());
    }
    payload.extend((0..200_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8));
    let dir = tempdir();
    std::fs::write(dir.join("payload.bin"), &payload).unwrap();
    let mut levels: Vec<Level> = (0..=9).map(Level::Fixed).collect();
    levels.push(Level::Auto);
    for level in &levels {
        let codec = ChunkedZlib { slice_size: 100_000, ..ChunkedZlib::with_level(*level) };
        let wire = encode_to_vec(&codec, Bytes::from(payload.clone())).unwrap();
        std::fs::write(dir.join(format!("wire.{level}")), &wire).unwrap();
    }
    // Tiny slices go out as hand-written stored blocks in auto mode.
    let tiny: Vec<u8> = (0..300u32).map(|i| (i * 7) as u8).collect();
    let auto = ChunkedZlib::with_level(Level::Auto);
    std::fs::write(dir.join("tiny.bin"), &tiny).unwrap();
    std::fs::write(dir.join("tiny.wire"), encode_to_vec(&auto, Bytes::from(tiny)).unwrap()).unwrap();
    std::fs::write(dir.join("one.wire"), encode_to_vec(&auto, Bytes::from_static(b"x")).unwrap()).unwrap();
    let script = r#"
import sys, zlib
d = sys.argv[1]
border = b"\r\r\r ChUnKeD \n\n\n"
for name, want in (("tiny", open(d + "/tiny.bin", "rb").read()), ("one", b"x")):
    wire = open(d + "/" + name + ".wire", "rb").read()
    assert wire.endswith(border) and wire.count(border) == 1, name
    assert zlib.decompress(wire[:-len(border)]) == want, name
payload = open(d + "/payload.bin", "rb").read()
border = b"\r\r\r ChUnKeD \n\n\n"
for level in [str(i) for i in range(10)] + ["auto"]:
    wire = open(d + "/wire." + level, "rb").read()
    assert wire.endswith(border), level
    pieces = wire.split(border)[:-1]
    assert b"".join(zlib.decompress(p) for p in pieces) == payload, level
print("ok")
"#;
    let out = Command::new("python3").arg("-c").arg(script).arg(&dir).output().expect("python3 must be installed");
    assert!(out.status.success(), "python3 failed: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ok");
    std::fs::remove_dir_all(dir).ok();
}

/// The reply the server builds without Python loads in CPython as the dict
/// the 0.8.1 client reads.
#[test]
fn python_loads_the_rust_built_error_reply() {
    let reply = ksrpc_core::compat::error_reply(
        "ksrpc.server.demo",
        "TimeoutError",
        "call exceeded 5 s: ünïcode",
        "Traceback: none",
        "2026-11-25T00:00:00",
    );
    let dir = tempdir();
    std::fs::write(dir.join("reply.pkl"), &reply).unwrap();
    let script = r#"
import pickle, sys
d = pickle.load(open(sys.argv[1] + "/reply.pkl", "rb"))
assert d["status"] == 500 and d["ref_id"] == 0 and d["calls"] == [], d
assert isinstance(d["data"], TimeoutError) and d["data"].args == ("call exceeded 5 s: ünïcode",), d
assert d["type"] == "TimeoutError" and d["module"] == "ksrpc.server.demo" and d["traceback"] == "Traceback: none"
print("ok")
"#;
    let out = Command::new("python3").arg("-c").arg(script).arg(&dir).output().expect("python3 must be installed");
    assert!(out.status.success(), "python3 failed: {}", String::from_utf8_lossy(&out.stderr));
    std::fs::remove_dir_all(dir).ok();
}

fn tempdir() -> PathBuf {
    let dir =
        std::env::temp_dir().join(format!("ksrpc-golden-{}-{:?}", std::process::id(), std::thread::current().id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
