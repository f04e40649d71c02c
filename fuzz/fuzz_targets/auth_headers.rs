//! The pre-body checks: Basic auth header, timestamp header, rule patterns.
#![no_main]
use ksrpc_core::auth::{check_timestamp, parse_basic};
use ksrpc_core::rules::Pattern;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = parse_basic(Some(data));
    let _ = check_timestamp(Some(data), 1.7e9, 30.0);
    if let Ok(s) = std::str::from_utf8(data) {
        let (p, n) = s.split_at(s.len() / 2);
        let _ = Pattern::new(p).matches(n);
    }
});
