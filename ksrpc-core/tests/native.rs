//! Native protocol messages: every value type round-trips, and hostile
//! bytes (other versions, deep nesting, garbage, truncation) are refused
//! with an error, never a panic or a stack overflow.

use std::num::NonZeroU64;

use ksrpc_core::chain::{Args, Call, CallChain};
use ksrpc_core::native::{
    decode, encode, ClientMessage, NativeError, Outcome, RemoteError, ServerMessage, Value, MAX_DEPTH, VERSION,
};
use proptest::prelude::*;
use serde_bytes::ByteBuf;

fn leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::None),
        Just(Value::SelfRef),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::Int),
        "-?[1-9][0-9]{19,60}".prop_map(Value::BigInt),
        any::<f64>().prop_filter("NaN is not equal to itself", |f| !f.is_nan()).prop_map(Value::Float),
        ".{0,40}".prop_map(Value::Str),
        proptest::collection::vec(any::<u8>(), 0..64).prop_map(|b| Value::Bytes(ByteBuf::from(b))),
        proptest::collection::vec(any::<u8>(), 0..64).prop_map(|b| Value::Table(ByteBuf::from(b))),
        proptest::collection::vec(any::<u8>(), 0..64).prop_map(|b| Value::Pickle(ByteBuf::from(b))),
    ]
}

fn value() -> impl Strategy<Value = Value> {
    leaf().prop_recursive(5, 64, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::List),
            proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Tuple),
            proptest::collection::vec((inner.clone(), inner.clone()), 0..4).prop_map(Value::Dict),
            (proptest::collection::vec(inner.clone(), 0..3), proptest::collection::vec(("[a-z]{1,8}", inner), 0..3))
                .prop_map(|(positional, keyword)| {
                    let chain = CallChain::new("ksrpc.server.demo")
                        .then(Call { name: "add".into(), args: Some(Args { positional, keyword }) });
                    Value::Chain(Box::new(chain))
                }),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]
    #[test]
    fn every_value_round_trips_in_a_call_and_a_reply(v in value(), id in any::<u64>()) {
        let chain = CallChain::new("m").then(Call { name: "f".into(), args: Some(Args { positional: vec![v.clone()], keyword: vec![("k".into(), v.clone())] }) });
        let call = ClientMessage::Call { id, chain };
        prop_assert_eq!(decode::<ClientMessage>(&encode(&call)).unwrap(), call);
        let reply = ServerMessage::Reply { id, outcome: Outcome::Ok(v) };
        prop_assert_eq!(decode::<ServerMessage>(&encode(&reply)).unwrap(), reply);
    }

    #[test]
    fn garbage_and_truncation_are_errors(bytes in proptest::collection::vec(any::<u8>(), 0..512), cut in 0usize..64) {
        let _ = decode::<ClientMessage>(&bytes);
        let _ = decode::<ServerMessage>(&bytes);
        let good = encode(&ClientMessage::Call { id: 7, chain: CallChain::new("m").then(Call::method("f", vec![Value::Str("x".repeat(100))])) });
        let cut = cut.min(good.len() - 1);
        prop_assert!(decode::<ClientMessage>(&good[..cut]).is_err());
    }
}

#[test]
fn every_message_kind_round_trips() {
    let h = NonZeroU64::new(42).unwrap();
    let msgs = vec![
        ClientMessage::Next { id: 1, handle: h },
        ClientMessage::Cancel { id: 2 },
        ClientMessage::CloseHandle { handle: h },
        ClientMessage::Call {
            id: 3,
            chain: CallChain { module: "m".into(), calls: vec![Call::attr("x")], handle: Some(h) },
        },
    ];
    for m in msgs {
        assert_eq!(decode::<ClientMessage>(&encode(&m)).unwrap(), m);
    }
    let err =
        RemoteError { kind: "ZeroDivisionError".into(), message: "division by zero".into(), traceback: "tb".into() };
    for outcome in [Outcome::Handle(h), Outcome::Exhausted, Outcome::Err(err)] {
        let m = ServerMessage::Reply { id: 9, outcome };
        assert_eq!(decode::<ServerMessage>(&encode(&m)).unwrap(), m);
    }
    let refused = ServerMessage::Refused { reason: "bad".into() };
    assert_eq!(decode::<ServerMessage>(&encode(&refused)).unwrap(), refused);
}

#[test]
fn another_version_is_refused_before_anything_else_is_read() {
    let mut bytes = encode(&ClientMessage::Cancel { id: 1 });
    // The version is the first varint: VERSION < 128 is one byte.
    assert_eq!(bytes[0] as u16, VERSION);
    bytes[0] = 9;
    assert_eq!(decode::<ClientMessage>(&bytes), Err(NativeError::UnsupportedVersion { got: 9 }));
    // Even when the rest is garbage.
    assert_eq!(decode::<ClientMessage>(&[9, 0xff, 0xff]), Err(NativeError::UnsupportedVersion { got: 9 }));
}

#[test]
fn deep_nesting_is_refused_without_overflowing_the_stack() {
    // A hand-made message: a call whose argument is a list nested 1,000,000
    // deep, 2 bytes per level (variant tag 7 = List, length 1).
    let mut bytes =
        encode(&ClientMessage::Call { id: 1, chain: CallChain::new("m").then(Call::method("f", vec![Value::None])) });
    // The message ends [.., None variant, keyword len 0, handle None].
    let none_at = bytes.len() - 3;
    assert_eq!(&bytes[none_at..], [0, 0, 0]);
    let mut deep = bytes[..none_at].to_vec();
    for _ in 0..1_000_000 {
        deep.extend_from_slice(&[7, 1]);
    }
    deep.extend_from_slice(&bytes[none_at..]);
    assert_eq!(decode::<ClientMessage>(&deep).unwrap_err(), NativeError::TooDeep);
    // Nesting up to the limit is fine.
    let mut v = Value::None;
    for _ in 0..MAX_DEPTH - 1 {
        v = Value::List(vec![v]);
    }
    let ok = ClientMessage::Call { id: 1, chain: CallChain::new("m").then(Call::method("f", vec![v])) };
    bytes = encode(&ok);
    assert_eq!(decode::<ClientMessage>(&bytes).unwrap(), ok);
}

#[test]
fn bigint_must_be_decimal() {
    for bad in ["", "-", "12a", "0x10", "1 2"] {
        let bytes = encode(&ServerMessage::Reply { id: 1, outcome: Outcome::Ok(Value::BigInt(bad.into())) });
        assert!(decode::<ServerMessage>(&bytes).is_err(), "{bad:?}");
    }
}

#[test]
fn trailing_bytes_are_an_error() {
    let mut bytes = encode(&ClientMessage::Cancel { id: 1 });
    bytes.push(0);
    assert!(matches!(decode::<ClientMessage>(&bytes), Err(NativeError::Malformed(_))));
}

/// A cached outcome frame spliced behind a new id decodes, with the limits
/// a client uses, to exactly the reply `encode_compressed` would have sent:
/// small (one-shot, single-segment frames), big and compressible, big and
/// incompressible (the parallel encoder's windowed frames), every id width.
#[test]
fn a_cached_outcome_becomes_the_reply_of_any_id() {
    use ksrpc_core::codec::Limits;
    use ksrpc_core::native::{decode_compressed, encode_compressed, encode_outcome, reply_from_outcome};
    let mut noise = Vec::with_capacity(12 << 20);
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    while noise.len() < 12 << 20 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        noise.extend_from_slice(&x.to_le_bytes());
    }
    let outcomes = [
        Outcome::Ok(Value::Int(3)),
        Outcome::Ok(Value::Str("x".repeat(200_000))),
        Outcome::Ok(Value::Table(ByteBuf::from((0..20u32 << 20).map(|i| (i / 7) as u8).collect::<Vec<u8>>()))),
        Outcome::Ok(Value::Bytes(ByteBuf::from(noise))),
        Outcome::Err(RemoteError { kind: "ValueError".into(), message: "m".into(), traceback: "t".into() }),
    ];
    let limits = Limits { max_encoded: 1 << 30, max_decoded: 1 << 30 };
    for outcome in outcomes {
        let frame = encode_outcome(&outcome);
        for id in [0u64, 1, 127, 128, 300_000, u64::MAX] {
            let wire = reply_from_outcome(id, &frame).expect("our own frames splice");
            let message: ServerMessage = decode_compressed(&wire, limits).unwrap();
            assert_eq!(message, ServerMessage::Reply { id, outcome: outcome.clone() });
            let direct = encode_compressed(&ServerMessage::Reply { id, outcome: outcome.clone() });
            let direct: ServerMessage = decode_compressed(&direct, limits).unwrap();
            assert_eq!(message, direct);
            // Through the streaming decoder too (no one-shot shortcut).
            let mut out = Vec::new();
            zstd::stream::copy_decode(&wire[..], &mut out).unwrap();
            assert_eq!(decode::<ServerMessage>(&out).unwrap(), message);
        }
    }
    // Not ours: refused, never spliced into nonsense.
    assert!(reply_from_outcome(1, b"not zstd at all").is_none());
    let mut two = encode_outcome(&Outcome::Exhausted);
    two.extend_from_slice(&encode_outcome(&Outcome::Exhausted));
    assert!(reply_from_outcome(1, &two).is_none());
    let mut enc = zstd::stream::Encoder::new(Vec::new(), 3).unwrap();
    enc.include_checksum(true).unwrap();
    std::io::Write::write_all(&mut enc, &postcard::to_allocvec(&Outcome::Exhausted).unwrap()).unwrap();
    assert!(reply_from_outcome(1, &enc.finish().unwrap()).is_none(), "a checksummed frame is not spliced");
}
