//! The WebSocket message-sequence decoder: the input is cut into messages,
//! each byte-tagged binary or text.
#![no_main]
use ksrpc_core::codec::{ChunkedZlib, Limits, BORDER, EOF};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut dec = ChunkedZlib::default().ws_decoder(Limits { max_encoded: 1 << 20, max_decoded: 4 << 20 });
    let border = std::str::from_utf8(BORDER).unwrap();
    for msg in data.split(|b| *b == 0xFF) {
        let r = match msg.first() {
            Some(0) => dec.text(border).map(drop),
            Some(1) => dec.text(EOF).map(drop),
            Some(2) => dec.text(&String::from_utf8_lossy(&msg[1..])).map(drop),
            Some(_) => dec.binary(&msg[1..]),
            None => Ok(()),
        };
        if r.is_err() {
            return;
        }
    }
});
