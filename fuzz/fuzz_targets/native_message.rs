//! The native-protocol message decoder: any bytes, as either direction's
//! message; errors only, never a panic or a stack overflow.
#![no_main]
use ksrpc_core::native::{decode, ClientMessage, ServerMessage};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = decode::<ClientMessage>(data);
    let _ = decode::<ServerMessage>(data);
});
