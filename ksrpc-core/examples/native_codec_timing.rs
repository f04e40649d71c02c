//! Times the native message codec on a 100 MB table-like payload
//! (`cargo run --release -p ksrpc-core --example native_codec_timing`).
#![allow(clippy::print_stdout)]
use std::time::Instant;

use ksrpc_core::codec::Limits;
use ksrpc_core::native::{decode_compressed, encode_compressed, Outcome, ServerMessage, Value};

fn main() {
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let floats: Vec<u8> = (0..(100usize << 20) / 8)
        .flat_map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ((x >> 11) as f64 / (1u64 << 53) as f64).to_le_bytes()
        })
        .collect();
    let t = Instant::now();
    let msg = ServerMessage::Reply { id: 1, outcome: Outcome::Ok(Value::Table(floats.into())) };
    let wire = encode_compressed(&msg);
    let enc = t.elapsed();
    let t = Instant::now();
    let back: ServerMessage = decode_compressed(&wire, Limits::UNLIMITED).unwrap();
    let dec = t.elapsed();
    assert_eq!(back, msg);
    let t = Instant::now();
    let raw = zstd::bulk::decompress(&wire, 200 << 20).unwrap();
    let z = t.elapsed();
    let t = Instant::now();
    let _: ServerMessage = ksrpc_core::native::decode(&raw).unwrap();
    println!("of which zstd {z:?}, postcard {:?}", t.elapsed());
    for level in [-1, -3, -7] {
        let t = Instant::now();
        let w = zstd::bulk::compress(&raw, level).unwrap();
        let e = t.elapsed();
        let t = Instant::now();
        let _ = zstd::bulk::decompress(&w, 200 << 20).unwrap();
        println!("level {level}: encode {e:?} decode {:?} ratio {:.3}", t.elapsed(), w.len() as f64 / raw.len() as f64);
    }
    println!(
        "100 MiB random float64: encode {enc:?}, decode {dec:?}, ratio {:.3}",
        wire.len() as f64 / (100 << 20) as f64
    );
}
