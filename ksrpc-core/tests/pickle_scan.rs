//! The fast-path pickle scan against pickles made by a real CPython.

use std::process::Command;

use ksrpc_core::pickle_scan::mutations_stay_local;

/// Runs a Python snippet that prints `name hex` lines of pickles.
fn pickles() -> Vec<(String, Vec<u8>)> {
    let script = r#"
import pickle, sys, types, collections, datetime
m = types.ModuleType("ksrpc.client"); sys.modules["ksrpc"] = types.ModuleType("ksrpc"); sys.modules["ksrpc.client"] = m
class RpcCall:
    def __init__(self, name, args, kwargs): self.name, self.args, self.kwargs = name, args, kwargs
RpcCall.__module__ = "ksrpc.client"; m.RpcCall = RpcCall
class Point:
    def __init__(self): self.x = 1
def req(calls): return dict(module="ksrpc.server.demo", calls=calls, ref_id=0)
safe = {
  "add": req([RpcCall("add", (1, 2), {})]),
  "kwargs": req([RpcCall("f", [1, "two", 3.0, None, True], {"k": [1, 2], "d": {"a": b"x" * 300}})]),
  "attr": req([RpcCall("PASSWORD", None, None)]),
  "shared": req([RpcCall("f", ("same", "same"), {})] * 3),
  "tuples": req([RpcCall("f", ((1,), (1, 2), (1, 2, 3), (1, 2, 3, 4), frozenset([1]), {1, 2}), {})]),
}
unsafe = {
  # An instance of a class that is not a client stand-in: NEWOBJ result unknown.
  "foreign object": req([RpcCall("f", (Point(),), {})]),
  "reduce result mutated": req([RpcCall("f", (collections.OrderedDict(a=1),), {})]),
}
for proto in (3, 4, 5):
    for name, obj in safe.items():
        print("safe", f"{name}/p{proto}", pickle.dumps(obj, protocol=proto).hex(), sep="\t")
    for name, obj in unsafe.items():
        print("unsafe", f"{name}/p{proto}", pickle.dumps(obj, protocol=proto).hex(), sep="\t")
print("unsafe", "protocol 2", pickle.dumps(safe["add"], protocol=2).hex(), sep="\t")
print("unsafe", "protocol 0", pickle.dumps(safe["add"], protocol=0).hex(), sep="\t")
# BUILD straight onto a global class: GLOBAL, state, BUILD.
print("unsafe", "build on a global", (b"\x80\x04cksrpc.client\nRpcCall\n}X\x01\x00\x00\x00aK\x01sb.").hex(), sep="\t")
print("unsafe", "append to a global", (b"\x80\x04cbuiltins\nlist\nK\x01a.").hex(), sep="\t")
print("unsafe", "persistent id", (b"\x80\x04X\x01\x00\x00\x00aQ.").hex(), sep="\t")
print("unsafe", "truncated", pickle.dumps(safe["add"], protocol=4)[:-7].hex(), sep="\t")
print("unsafe", "empty", "", sep="\t")
"#;
    let out = Command::new("python3").arg("-c").arg(script).output().expect("python3 must be installed");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            let mut it = l.splitn(3, '\t');
            let kind = it.next().unwrap();
            let name = it.next().unwrap();
            let hex = it.next().unwrap_or("");
            let bytes = (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap()).collect();
            (format!("{kind} {name}"), bytes)
        })
        .collect()
}

#[test]
fn plain_requests_are_fast_and_anything_else_is_careful() {
    let all = pickles();
    assert!(all.len() > 20);
    for (name, bytes) in all {
        let want = name.starts_with("safe");
        assert_eq!(mutations_stay_local(&bytes), want, "{name}");
    }
}

#[test]
fn garbage_never_panics() {
    let mut x = 1u64;
    for len in 0..2000usize {
        let mut v = vec![0x80, 4];
        for _ in 0..len % 64 {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            v.push((x >> 56) as u8);
        }
        let _ = mutations_stay_local(&v);
    }
}

/// `MARK POP` pops the mark in CPython, not the item below it; a scan that
/// popped the item lost track of an unknown call result and let a later
/// BUILD on it through (found by review).
#[test]
fn mark_pop_does_not_desync_the_stack() {
    // {} ; GLOBAL ksrpc.client RpcCall ; () REDUCE -> unknown ; MARK POP ; state ; BUILD on the unknown
    let p = b"\x80\x04}cksrpc.client\nRpcCall\n)R(0}X\x01\x00\x00\x00aK\x01sb.";
    assert!(!mutations_stay_local(p));
}
