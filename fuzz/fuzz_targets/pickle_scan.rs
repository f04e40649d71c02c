//! The request-pickle scan that picks the executor's fast path: any bytes,
//! never a panic or a hang.
#![no_main]
use ksrpc_core::pickle_scan::mutations_stay_local;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = mutations_stay_local(data);
});
