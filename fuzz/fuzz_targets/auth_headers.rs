//! The pre-body checks: Basic auth header, timestamp header, rule patterns.
#![no_main]
use ksrpc_core::auth::{check_timestamp, parse_basic};
use ksrpc_core::rules::Pattern;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = parse_basic(Some(data));
    let _ = check_timestamp(Some(data), 1.7e9, 30.0);
    if let Ok(s) = std::str::from_utf8(data) {
        // Split at a character boundary: half the pattern, half the name.
        let mid = s.char_indices().nth(s.chars().count() / 2).map_or(s.len(), |(i, _)| i);
        let (p, n) = s.split_at(mid);
        let _ = Pattern::new(p).matches(n);
    }
});
