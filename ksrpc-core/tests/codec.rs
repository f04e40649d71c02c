//! Codec behaviour over every codec: round trips under random read splits,
//! limits, bombs, truncation and corruption. One parametrised suite, not a
//! copy per codec.

use bytes::Bytes;
use flate2::{Compress, Compression, FlushCompress};
use ksrpc_core::codec::{
    decode_all, encode_to_vec, ChunkedZlib, Codec, CodecError, Flow, Level, Limits, WsEvent, WsFrame, Zstd, BORDER,
    EOF, MAX_DECODED_SLICE,
};
use proptest::prelude::*;

/// Every codec configuration the suite runs over.
fn codecs() -> Vec<Box<dyn Codec>> {
    vec![
        Box::new(ChunkedZlib::default()),
        Box::new(ChunkedZlib::with_level(Level::Fixed(0))),
        Box::new(ChunkedZlib::with_level(Level::Fixed(6))),
        Box::new(ChunkedZlib { slice_size: 1000, ..ChunkedZlib::with_level(Level::Fixed(1)) }),
        Box::new(ChunkedZlib { slice_size: 777, ..ChunkedZlib::with_level(Level::Auto) }),
        Box::new(Zstd::default()),
    ]
}

/// Decodes `wire` fed in pieces cut at `cuts` (sorted positions).
fn decode_split(codec: &dyn Codec, wire: &[u8], cuts: &[usize], limits: Limits) -> Result<Vec<u8>, CodecError> {
    let mut dec = codec.decoder(limits);
    let mut at = 0;
    for &c in cuts {
        let c = c.min(wire.len()).max(at);
        dec.feed(&wire[at..c])?;
        at = c;
    }
    dec.feed(&wire[at..])?;
    dec.finish()
}

fn payload_strategy() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 1..20_000),
        // Compressible: few distinct bytes, long runs.
        proptest::collection::vec(prop_oneof![Just(b'a'), Just(b'b'), Just(b'\r'), Just(b'\n')], 1..40_000),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]
    #[test]
    fn round_trip_every_codec_any_split(
        payload in payload_strategy(),
        cuts in proptest::collection::vec(0usize..60_000, 0..12),
        chunking in 1usize..5000,
    ) {
        let mut cuts = cuts;
        cuts.sort_unstable();
        for codec in codecs() {
            // Feed the encoder the payload in arbitrary chunks, too.
            let chunks: Vec<Bytes> = payload.chunks(chunking).map(Bytes::copy_from_slice).collect();
            let mut wire = Vec::new();
            codec.encode(&mut chunks.into_iter(), &mut |p| { assert!(!p.is_empty()); wire.extend_from_slice(&p); Flow::Continue(()) }).unwrap();
            let got = decode_split(codec.as_ref(), &wire, &cuts, Limits::default()).unwrap();
            prop_assert_eq!(&got, &payload, "codec {:?}", codec);
        }
    }

    #[test]
    fn ws_framing_round_trips(payload in payload_strategy(), level in 0u32..10) {
        let codec = ChunkedZlib { slice_size: 3000, ..ChunkedZlib::with_level(Level::Fixed(level)) };
        let mut frames = Vec::new();
        codec.encode_ws(&mut std::iter::once(Bytes::from(payload.clone())), &mut |f| { frames.push(f); Flow::Continue(()) }).unwrap();
        let mut dec = codec.ws_decoder(Limits::default());
        let mut done = None;
        for f in frames {
            match f {
                WsFrame::Binary(b) => dec.binary(&b).unwrap(),
                WsFrame::Text(t) => if let WsEvent::Done(p) = dec.text(t).unwrap() { done = Some(p) },
            }
        }
        prop_assert_eq!(done.unwrap(), payload);
    }

    /// Garbage never panics, whatever the codec and split.
    #[test]
    fn garbage_is_an_error_not_a_panic(garbage in proptest::collection::vec(any::<u8>(), 0..5000), cut in 0usize..5000) {
        for codec in codecs() {
            let _ = decode_split(codec.as_ref(), &garbage, &[cut], Limits::default());
        }
    }
}

#[test]
fn encoded_slices_never_contain_the_border_even_when_the_payload_is_all_borders() {
    let payload: Vec<u8> = BORDER.iter().copied().cycle().take(1 << 20).collect();
    let codec = ChunkedZlib::with_level(Level::Fixed(0));
    let wire = encode_to_vec(&codec, Bytes::from(payload.clone())).unwrap();
    // Split exactly like the 0.8.1 client: every border ends a slice.
    let pieces: Vec<&[u8]> = split_on_border(&wire);
    assert_eq!(pieces.len(), payload.len().div_ceil(codec.slice_size));
    let mut back = Vec::new();
    for p in pieces {
        let mut d = flate2::Decompress::new(true);
        let mut out = Vec::with_capacity(codec.slice_size + 1);
        d.decompress_vec(p, &mut out, flate2::FlushDecompress::Finish).unwrap();
        back.extend(out);
    }
    assert_eq!(back, payload);
}

fn split_on_border(wire: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    let mut rest = wire;
    while let Some(at) = memchr::memmem::find(rest, BORDER) {
        out.push(&rest[..at]);
        rest = &rest[at + BORDER.len()..];
    }
    assert!(rest.is_empty(), "wire must end with a border");
    out
}

/// Big payloads in one feed and in odd splits (the proptest sizes stay small).
#[test]
fn big_payloads_round_trip_through_every_codec() {
    let payload = Bytes::from([noise(3 << 20), b"0123456789".repeat(300_000)].concat());
    for codec in codecs() {
        let wire = encode_to_vec(codec.as_ref(), payload.clone()).unwrap();
        assert_eq!(decode_all(codec.as_ref(), &wire, Limits::UNLIMITED).unwrap(), payload, "{codec:?}");
        let cuts: Vec<usize> = (1..7).map(|i| wire.len() * i / 7 + i).collect();
        assert_eq!(decode_split(codec.as_ref(), &wire, &cuts, Limits::default()).unwrap(), payload, "{codec:?}");
    }
}

#[test]
fn auto_stores_random_data_and_compresses_text() {
    let random = noise(200_000);
    let text: Vec<u8> = b"2024-01-02,SH600000,10.12,10.50,9.98,10.31,123456\n".repeat(4000);
    let auto = ChunkedZlib::with_level(Level::Auto);
    let r = encode_to_vec(&auto, Bytes::from(random.clone())).unwrap();
    assert!(r.len() > random.len(), "random data should go out stored ({} vs {})", r.len(), random.len());
    let t = encode_to_vec(&auto, Bytes::from(text.clone())).unwrap();
    let six = encode_to_vec(&ChunkedZlib::with_level(Level::Fixed(6)), Bytes::from(text)).unwrap();
    assert_eq!(t.len(), six.len(), "compressible data should get level 6");
}

#[test]
fn encoding_streams_in_order_and_stops_when_the_receiver_leaves() {
    let payload = Bytes::from(noise(40 * 128 * 1024));
    for codec in codecs() {
        let mut pieces = 0;
        let r = codec.encode(&mut std::iter::once(payload.clone()), &mut |_| {
            pieces += 1;
            if pieces == 3 {
                Flow::Break(())
            } else {
                Flow::Continue(())
            }
        });
        assert_eq!(r, Err(CodecError::Cancelled), "{codec:?}");
        assert_eq!(pieces, 3);
    }
}

/// Incompressible bytes (xorshift64), deterministic.
fn noise(n: usize) -> Vec<u8> {
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// A zlib stream of `n` zeros, built without holding `n` bytes.
fn zero_bomb(n: usize) -> Vec<u8> {
    let mut c = Compress::new(Compression::new(9), true);
    let zeros = vec![0u8; 1 << 20];
    let mut out = Vec::with_capacity(2 << 20);
    let mut left = n;
    while left > 0 {
        let take = left.min(zeros.len());
        let before = c.total_in();
        c.compress_vec(&zeros[..take], &mut out, FlushCompress::None).unwrap();
        left -= (c.total_in() - before) as usize;
        out.reserve(1 << 16);
    }
    loop {
        out.reserve(1 << 16);
        if c.compress_vec(&[], &mut out, FlushCompress::Finish).unwrap() == flate2::Status::StreamEnd {
            break;
        }
    }
    out
}

/// One slice of a 1 GiB zeros bomb is refused once it has inflated to the
/// per-slice bound (8 MiB, 64 times a client's 128 KiB slice), long before
/// the message's own limit: a bomb costs a few milliseconds, not a second
/// of an async worker.
#[test]
fn one_gib_zlib_bomb_is_refused_at_the_slice_bound() {
    let mut wire = zero_bomb(1 << 30);
    assert!(wire.len() < 2 << 20, "bomb is ~1 MiB on the wire");
    wire.extend_from_slice(BORDER);
    let limits = Limits { max_encoded: 8 << 20, max_decoded: 64 << 20 };
    let err = decode_all(&ChunkedZlib::default(), &wire, limits).unwrap_err();
    let want = CodecError::SliceInflatesTooMuch { index: 0, limit: MAX_DECODED_SLICE };
    assert_eq!(err, want);
    // The same bomb over the WebSocket framing.
    let mut ws = ChunkedZlib::default().ws_decoder(limits);
    ws.binary(&wire[..wire.len() - BORDER.len()]).unwrap();
    assert_eq!(ws.text(std::str::from_utf8(BORDER).unwrap()).unwrap_err(), want);
    // Under a message limit below the slice bound, the message limit speaks.
    let tight = Limits { max_encoded: 8 << 20, max_decoded: 1 << 20 };
    let err = decode_all(&ChunkedZlib::default(), &wire, tight).unwrap_err();
    assert_eq!(err, CodecError::DecodedTooLarge { limit: 1 << 20 });
}

/// Many slices, each within the slice bound, still stop at the message's
/// decoded limit; exactly the slice bound is accepted.
#[test]
fn slices_within_the_bound_add_up_to_the_message_limit() {
    let mut slice = zero_bomb(MAX_DECODED_SLICE as usize);
    slice.extend_from_slice(BORDER);
    let limits = Limits { max_encoded: 8 << 20, max_decoded: 20 << 20 };
    let one = decode_all(&ChunkedZlib::default(), &slice, limits).unwrap();
    assert_eq!(one.len() as u64, MAX_DECODED_SLICE);
    let three = slice.repeat(3);
    let err = decode_all(&ChunkedZlib::default(), &three, limits).unwrap_err();
    assert_eq!(err, CodecError::DecodedTooLarge { limit: 20 << 20 });
}

#[test]
fn zstd_bomb_is_refused_at_the_decoded_limit() {
    let zeros = Bytes::from(vec![0u8; 256 << 20]);
    let wire = encode_to_vec(&Zstd::default(), zeros).unwrap();
    let limits = Limits { max_encoded: 8 << 20, max_decoded: 16 << 20 };
    assert_eq!(
        decode_all(&Zstd::default(), &wire, limits).unwrap_err(),
        CodecError::DecodedTooLarge { limit: 16 << 20 }
    );
}

#[test]
fn every_codec_enforces_both_limits_and_accepts_exactly_the_limit() {
    let payload = Bytes::from(b"0123456789".repeat(10_000));
    for codec in codecs() {
        let wire = encode_to_vec(codec.as_ref(), payload.clone()).unwrap();
        let exact = Limits { max_encoded: wire.len() as u64, max_decoded: payload.len() as u64 };
        assert_eq!(decode_all(codec.as_ref(), &wire, exact).unwrap(), payload, "{codec:?}");
        let small_out = Limits { max_decoded: payload.len() as u64 - 1, ..exact };
        assert!(
            matches!(decode_all(codec.as_ref(), &wire, small_out), Err(CodecError::DecodedTooLarge { .. })),
            "{codec:?}"
        );
        let small_in = Limits { max_encoded: wire.len() as u64 - 1, ..exact };
        assert!(
            matches!(decode_all(codec.as_ref(), &wire, small_in), Err(CodecError::EncodedTooLarge { .. })),
            "{codec:?}"
        );
    }
}

#[test]
fn truncation_anywhere_is_an_error() {
    let payload = Bytes::from((0..300_000u32).map(|i| (i % 251) as u8).collect::<Vec<u8>>());
    for codec in codecs() {
        let wire = encode_to_vec(codec.as_ref(), payload.clone()).unwrap();
        for cut in [0, 1, 10, wire.len() / 3, wire.len() / 2, wire.len() - BORDER.len(), wire.len() - 1] {
            if cut > 0 && wire[..cut].ends_with(BORDER) {
                // A cut right after a border is a shorter valid framing; the
                // transport's end-of-body marks the real end.
                continue;
            }
            let r = decode_all(codec.as_ref(), &wire[..cut], Limits::default());
            assert!(r.is_err(), "{codec:?} accepted a body cut at {cut} of {}", wire.len());
        }
    }
}

#[test]
fn corrupt_slices_are_errors() {
    let payload = Bytes::from(b"hello world ".repeat(50_000));
    let codec = ChunkedZlib::with_level(Level::Fixed(6));
    let wire = encode_to_vec(&codec, payload.clone()).unwrap();
    for at in [0usize, 1, 5, 100, wire.len() / 2] {
        let mut bad = wire.clone();
        bad[at] ^= 0x55;
        let r = decode_all(&codec, &bad, Limits::default());
        // Flipping a bit inside a slice must never yield the original payload silently.
        assert!(r.as_ref().map_or(true, |p| *p != payload), "corruption at {at} went unnoticed");
    }
    // Raw deflate and gzip are not zlib and are refused.
    let mut gz = vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 3];
    gz.extend_from_slice(BORDER);
    assert!(matches!(
        decode_all(&codec, &gz, Limits::default()),
        Err(CodecError::Corrupt { .. } | CodecError::TruncatedSlice { .. })
    ));
    // Two borders in a row: an empty slice.
    let mut empty = wire;
    empty.extend_from_slice(BORDER);
    assert!(matches!(decode_all(&codec, &empty, Limits::default()), Err(CodecError::EmptySlice { .. })));
    // A valid slice followed by junk before the border.
    let mut trailing = encode_to_vec(&codec, Bytes::from_static(b"abc")).unwrap();
    trailing.truncate(trailing.len() - BORDER.len());
    trailing.extend_from_slice(b"junk");
    trailing.extend_from_slice(BORDER);
    assert!(matches!(decode_all(&codec, &trailing, Limits::default()), Err(CodecError::TrailingBytes { .. })));
}

#[test]
fn a_body_without_borders_is_refused_early() {
    let codec = ChunkedZlib { max_encoded_slice: 64 * 1024, ..ChunkedZlib::default() };
    let mut dec = codec.decoder(Limits::default());
    let junk = vec![b'x'; 16 * 1024];
    let mut err = None;
    for _ in 0..10 {
        if let Err(e) = dec.feed(&junk) {
            err = Some(e);
            break;
        }
    }
    assert_eq!(err, Some(CodecError::MissingBorder { limit: 64 * 1024 }));
}

#[test]
fn ws_decoder_ignores_unknown_text_and_rejects_bad_sequences() {
    let codec = ChunkedZlib::default();
    let border = std::str::from_utf8(BORDER).unwrap();
    let slice = {
        let mut w = encode_to_vec(&codec, Bytes::from_static(b"payload")).unwrap();
        w.truncate(w.len() - BORDER.len());
        w
    };
    let mut dec = codec.ws_decoder(Limits::default());
    assert_eq!(dec.text("hello").unwrap(), WsEvent::More);
    dec.binary(&slice[..3]).unwrap();
    dec.binary(&slice[3..]).unwrap();
    assert_eq!(dec.text(border).unwrap(), WsEvent::More);
    assert_eq!(dec.text(EOF).unwrap(), WsEvent::Done(b"payload".to_vec()));
    // Reusable for the next call on the same socket.
    dec.binary(&slice).unwrap();
    dec.text(border).unwrap();
    assert_eq!(dec.text(EOF).unwrap(), WsEvent::Done(b"payload".to_vec()));
    // Binary without a border before EOF, EOF with nothing, garbage slice.
    let mut d = codec.ws_decoder(Limits::default());
    d.binary(&slice).unwrap();
    assert!(matches!(d.text(EOF), Err(CodecError::Truncated { .. })));
    let mut d = codec.ws_decoder(Limits::default());
    assert_eq!(d.text(EOF), Err(CodecError::Empty));
    let mut d = codec.ws_decoder(Limits::default());
    d.binary(b"garbage!").unwrap();
    assert!(d.text(border).is_err());
    // Binary growing past the slice limit without a border.
    let small = ChunkedZlib { max_encoded_slice: 1024, ..ChunkedZlib::default() };
    let mut d = small.ws_decoder(Limits::default());
    assert!(matches!(d.binary(&[0u8; 2048]), Err(CodecError::SliceTooLarge { .. })));
}
