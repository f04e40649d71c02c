//! The v2 WebSocket frame reassembler, then the message decoder on whatever
//! it completes: any sequence of frames gives messages or errors, never a
//! panic, and holds no more than the limits allow.
#![no_main]
use ksrpc_core::codec::Limits;
use ksrpc_core::mux::Reassembler;
use ksrpc_core::native::{decode_compressed, ClientMessage};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let limits = Limits { max_encoded: 1 << 16, max_decoded: 1 << 20 };
    let mut r = Reassembler::new(limits);
    // The input is a sequence of frames, each prefixed by a one-byte length.
    let mut rest = data;
    while let Some((&n, tail)) = rest.split_first() {
        let n = (n as usize).min(tail.len());
        let (frame, tail) = tail.split_at(n);
        rest = tail;
        match r.push(frame) {
            Ok(p) => {
                if let Some(m) = p.message {
                    assert!(m.len() as u64 <= limits.max_encoded);
                    let _ = decode_compressed::<ClientMessage>(&m, limits);
                }
            }
            Err(_) => return,
        }
    }
});
