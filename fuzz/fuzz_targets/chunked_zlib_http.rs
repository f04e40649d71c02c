//! The HTTP chunked-zlib body decoder, fed network bytes split at a
//! fuzzer-chosen point, under small limits.
#![no_main]
use ksrpc_core::codec::{ChunkedZlib, Codec, Limits};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (split, body) = match data.split_first() {
        Some((s, b)) => (*s as usize, b),
        None => return,
    };
    let codec = ChunkedZlib { max_encoded_slice: 64 * 1024, ..ChunkedZlib::default() };
    let mut dec = codec.decoder(Limits { max_encoded: 1 << 20, max_decoded: 4 << 20 });
    let at = split.min(body.len());
    if dec.feed(&body[..at]).is_ok() && dec.feed(&body[at..]).is_ok() {
        let _ = dec.finish();
    }
});
