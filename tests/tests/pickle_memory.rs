//! The pickle scan against CPython's C unpickler and its memory.
//!
//! The executor hands a request pickle to the C unpickler only when
//! `ksrpc_core::pickle_scan` says so; the C unpickler trusts opcode arguments
//! that size an allocation (a `LONG_BINPUT` index grows its memo array to
//! twice the index first). These tests show that allocation is real in this
//! CPython, that the scan sends such pickles to the careful unpickler, and,
//! over thousands of generated hostile pickles, that whatever the scan lets
//! through loads within bounded memory (measured with tracemalloc, in a
//! child process).

use std::sync::OnceLock;

use ksrpc_core::pickle_scan::mutations_stay_local;
use ksrpc_core::{CompatRequest, ExecError, Executor};
use ksrpc_py::PyExecutor;
use ksrpc_tests::{executor, user};
use proptest::prelude::*;

/// The embedded interpreter, started once by an executor.
fn python() -> &'static PyExecutor {
    static EX: OnceLock<PyExecutor> = OnceLock::new();
    EX.get_or_init(|| executor(|_| {}))
}

/// What CPython's C unpickler does with each of `pickles` (every global
/// refused), in one process of its own (the test venv's Python): the peak of
/// traced memory in bytes for each, or `Err(how it died)`. Out of process
/// because a hostile pickle can crash the C unpickler outright, and because
/// tracemalloc in the test's own interpreter (with the pool's threads) left
/// the test process crashing at exit.
fn c_unpickler_peaks(pickles: &[Vec<u8>]) -> Result<Vec<usize>, String> {
    let python = ksrpc_tests::test_venv().join("bin/python");
    let code = "import io, pickle, sys, tracemalloc\n\
                class U(pickle.Unpickler):\n    def find_class(self, m, n): raise pickle.UnpicklingError(m)\n\
                for line in sys.stdin:\n\
                \x20   tracemalloc.start()\n\
                \x20   try: U(io.BytesIO(bytes.fromhex(line.strip()))).load()\n\
                \x20   except Exception: pass\n\
                \x20   print(tracemalloc.get_traced_memory()[1], flush=True)\n\
                \x20   tracemalloc.stop()\n";
    let input: String =
        pickles.iter().map(|p| p.iter().map(|b| format!("{b:02x}")).collect::<String>() + "\n").collect();
    let mut child = std::process::Command::new(python)
        .args(["-c", code])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("running the test venv's python");
    let mut stdin = child.stdin.take().expect("piped");
    let writer = std::thread::spawn(move || std::io::Write::write_all(&mut stdin, input.as_bytes()));
    let out = child.wait_with_output().expect("the probe's output");
    let _ = writer.join();
    let peaks: Vec<usize> = String::from_utf8_lossy(&out.stdout).lines().filter_map(|l| l.parse().ok()).collect();
    if out.status.success() && peaks.len() == pickles.len() {
        Ok(peaks)
    } else {
        Err(format!(
            "{} after {} of {} ({})",
            out.status,
            peaks.len(),
            pickles.len(),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn c_unpickler_peak(data: &[u8]) -> Result<usize, String> {
    c_unpickler_peaks(&[data.to_vec()]).map(|p| p[0])
}

/// What any pickle may make the C unpickler allocate: small fixed costs plus
/// a few pointers per byte of input.
fn bound(len: usize) -> usize {
    (1 << 20) + 64 * len
}

/// Resets the process's peak RSS (`VmHWM`) to its current RSS (Linux 4.0+).
fn reset_peak_rss() {
    std::fs::write("/proc/self/clear_refs", "5").expect("resetting the peak RSS through /proc/self/clear_refs");
}

/// The process's peak RSS since the last reset, in bytes. A peak, not the
/// RSS afterwards: a memo array is big enough to be mmapped, and freed with
/// the unpickler, so it leaves no trace in the RSS once the call is over.
fn peak_rss_bytes() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).expect("VmHWM in /proc/self/status");
    let kib: usize = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib * 1024
}

fn rss_bytes() -> usize {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: usize = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

#[test]
fn a_big_memo_index_makes_the_c_unpickler_allocate_and_the_scan_refuses_it() {
    // N ; LONG_BINPUT 0x00ffffff ; STOP: 9 bytes
    let evil = b"\x80\x04Nr\xff\xff\xff\x00.";
    let peak = c_unpickler_peak(evil).expect("the C unpickler survives it");
    assert!(peak > 100 << 20, "the C unpickler allocated only {peak} bytes: the attack is gone from CPython?");
    assert!(!mutations_stay_local(evil), "the scan let a 256 MiB memo index through");
    assert!(!mutations_stay_local(b"\x80\x04Nr\xff\xff\xff\x03."));
}

/// PROTO 4, N, then a FRAME of 3 bytes holding `r 00 00`: LONG_BINPUT's
/// 4-byte index runs past the frame's end. Read straight through, the index
/// is 0 and the pickle goes on `K <high>` `.`; CPython's C unpickler drops
/// the 2 bytes left in its frame buffer and reads the index from the next 4
/// bytes of the file instead, `00 00 4B <high>`: a memo index of
/// `high << 24 | 0x4B0000` (and twice that many pointers allocated).
fn index_across_a_frame_end(high: u8) -> Vec<u8> {
    let mut p = b"\x80\x04N\x95\x03\x00\x00\x00\x00\x00\x00\x00r\x00\x00\x00\x00K".to_vec();
    p.extend_from_slice(&[high, b'.']);
    p
}

#[test]
fn a_memo_index_across_a_frame_end_is_read_from_other_bytes_and_the_scan_refuses_it() {
    let evil = index_across_a_frame_end(1); // index 0x014B0000: 347 MB of memo for 21 bytes
                                            // In its own process: the C unpickler sometimes crashes on it instead
                                            // (both are the attack: the server would lose the memory or the process).
    match c_unpickler_peak(&evil) {
        Ok(peak) => {
            assert!(peak > 100 << 20, "the C unpickler allocated only {peak} bytes: it reads frames differently now?")
        }
        Err(died) => assert!(died.contains("signal"), "the probe failed without crashing: {died}"),
    }
    assert!(!mutations_stay_local(&evil), "the scan read index 0 where the C unpickler reads 0x014B0000");
    // An opcode that ends exactly at its frame's end is fine.
    let framed = b"\x80\x04\x95\x07\x00\x00\x00\x00\x00\x00\x00Nr\x00\x00\x00\x00.";
    assert!(mutations_stay_local(framed));
}

/// Sends `payload` three times as a user with no rights; each must be a bad
/// request, and the process's peak RSS must not grow by 128 MiB or more.
async fn three_bad_requests_in_bounded_memory(payload: &'static [u8]) {
    let ex = python();
    let nobody = user("nobody", &[]);
    // warm up first: the interpreter's own first-call allocations are not the memo
    let warm = bytes::Bytes::from_static(b"\x80\x04N.");
    let _ = ex.call_compat(CompatRequest { user: nobody.clone(), payload: warm }).await;
    let before = rss_bytes();
    reset_peak_rss();
    for _ in 0..3 {
        let request = CompatRequest { user: nobody.clone(), payload: bytes::Bytes::from_static(payload) };
        match ex.call_compat(request).await {
            Err(ExecError::BadRequest { message, .. }) => assert!(!message.is_empty()),
            other => panic!("not a request, so a bad-request reply; got {other:?}"),
        }
    }
    let grown = peak_rss_bytes().saturating_sub(before);
    assert!(grown < 128 << 20, "peak RSS grew by {grown} bytes during the calls");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_executor_does_not_allocate_for_a_memo_index() {
    // 0x03ffffff: CPython's C unpickler would take 1 GiB (and 5 s with the GIL)
    three_bad_requests_in_bounded_memory(b"\x80\x04Nr\xff\xff\xff\x03.").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_executor_does_not_allocate_for_a_memo_index_across_a_frame_end() {
    // index 0x034B0000: CPython's C unpickler would take 885 MB
    let payload: &'static [u8] = index_across_a_frame_end(3).leak();
    three_bad_requests_in_bounded_memory(payload).await;
}

/// One opcode: mostly plain pushes and container building (so that many
/// generated pickles are ones the scan accepts), and memo, frame and sized
/// opcodes whose arguments lie about sizes and indexes.
fn opcode() -> impl Strategy<Value = Vec<u8>> {
    let le = |op: u8, n: u64, width: usize| {
        let mut v = vec![op];
        v.extend_from_slice(&n.to_le_bytes()[..width]);
        v
    };
    let size = || {
        prop_oneof![
            0u64..8,
            Just(255u64),
            Just(0xffff),
            Just(0x00ff_ffff),
            Just(0x7fff_ffff),
            any::<u32>().prop_map(u64::from),
            any::<u64>()
        ]
    };
    let plain = prop_oneof![
        Just(vec![b'N']),
        Just(vec![0x88]),
        Just(vec![b']']),
        Just(vec![b'}']),
        Just(vec![b')']),
        Just(vec![b'(']),
        Just(vec![0x94]),
        Just(vec![b'2']),
        any::<u8>().prop_map(|b| vec![b'K', b]),
        "[a-z]{0,6}".prop_map(|t| [vec![0x8c, t.len() as u8], t.into_bytes()].concat()),
    ];
    let building = prop_oneof![
        Just(vec![b'a']),
        Just(vec![b'e']),
        Just(vec![b's']),
        Just(vec![b'u']),
        Just(vec![b'l']),
        Just(vec![b't']),
        Just(vec![b'd']),
        Just(vec![0x85]),
        Just(vec![0x86]),
        Just(vec![b'0']),
        Just(vec![b'1']),
    ];
    let memo = prop_oneof![
        (0u8..4).prop_map(|b| vec![b'q', b]),
        any::<u8>().prop_map(|b| vec![b'q', b]),
        (0u8..4).prop_map(|b| vec![b'h', b]),
        size().prop_map(move |n| le(b'r', n, 4)),
        (0u64..4).prop_map(move |n| le(b'r', n, 4)),
        size().prop_map(move |n| le(b'j', n, 4)),
        (0u64..100_000_000).prop_map(|n| format!("p{n}\n").into_bytes()),
        (0u64..4).prop_map(|n| format!("p{n}\n").into_bytes()),
        (0u64..100_000_000).prop_map(|n| format!("g{n}\n").into_bytes()),
    ];
    let sized = prop_oneof![
        size().prop_map(move |n| le(0x95, n, 8)),
        (0u64..16).prop_map(move |n| le(0x95, n, 8)),
        size().prop_map(move |n| le(0x8e, n, 8)),
        size().prop_map(move |n| le(0x8d, n, 8)),
        size().prop_map(move |n| le(0x96, n, 8)),
        size().prop_map(move |n| le(b'B', n, 4)),
        size().prop_map(move |n| le(b'X', n, 4)),
        size().prop_map(move |n| le(0x8b, n, 4)),
        (0u64..4).prop_map(move |n| [le(0x8b, n, 4), vec![1; n as usize]].concat()),
        proptest::collection::vec(any::<u8>(), 0..8),
    ];
    prop_oneof![8 => plain, 3 => building, 3 => memo, 2 => sized]
}

/// Whatever the scan sends to the fast path loads within bounded memory
/// (4000 generated pickles; a good share of them must take the fast path, or
/// the test would prove nothing).
#[test]
fn what_the_scan_lets_through_loads_in_bounded_memory() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::{Config, TestRunner};
    // Generated first, then measured in one child process (no shrinking: a
    // failure names the pickle itself).
    let mut runner = TestRunner::new(Config { failure_persistence: None, ..Config::default() });
    let strategy = (proptest::collection::vec(opcode(), 1..12), proptest::bool::weighted(0.9));
    let mut fast = Vec::new();
    for _ in 0..4000 {
        let (ops, stop) = strategy.new_tree(&mut runner).expect("a generated case").current();
        let mut data = b"\x80\x04".to_vec();
        for op in &ops {
            data.extend_from_slice(op);
        }
        if stop {
            data.push(b'.');
        }
        if mutations_stay_local(&data) {
            fast.push(data);
        }
    }
    assert!(fast.len() >= 200, "only {} of 4000 generated pickles took the fast path", fast.len());
    let peaks =
        c_unpickler_peaks(&fast).unwrap_or_else(|died| panic!("the C unpickler died on a fast-path pickle: {died}"));
    for (data, peak) in fast.iter().zip(peaks) {
        assert!(peak <= bound(data.len()), "{} bytes of pickle took {peak} bytes: {data:?}", data.len());
    }
}
