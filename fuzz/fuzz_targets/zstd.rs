//! The zstd decoder of the native protocol under small limits.
#![no_main]
use ksrpc_core::codec::{Codec, Limits, Zstd};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut dec = Zstd::default().decoder(Limits { max_encoded: 1 << 20, max_decoded: 4 << 20 });
    if dec.feed(data).is_ok() {
        let _ = dec.finish();
    }
});
