//! Native calls on the real embedded CPython: values in, values out, handles,
//! errors and the same rules as the compat protocol.

use std::num::NonZeroU64;

use ksrpc_core::chain::{Args, Call, CallChain};
use ksrpc_core::native::{Outcome, Value};
use ksrpc_core::{Executor, NativeRequest};
use ksrpc_tests::{executor, user};
use serde_bytes::ByteBuf;

const LIMITED: &[&str] = &["allow ksrpc.server.demo", "allow bench_mod", "deny os", "deny builtins", "deny *"];

fn chain(module: &str, calls: Vec<Call<Value>>) -> CallChain<Value> {
    CallChain { module: module.into(), calls, handle: None }
}

fn ok(outcome: Outcome) -> Value {
    match outcome {
        Outcome::Ok(v) => v,
        other => panic!("expected a value, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_cross_both_ways() {
    let ex = executor(|_| {});
    let admin = user("admin", &["allow *"]);
    let run = |c: CallChain<Value>| ex.call_native(NativeRequest { user: admin.clone(), chain: c });
    let add = |a: Value, b: Value| chain("ksrpc.server.demo", vec![Call::method("add", vec![a, b])]);
    assert_eq!(ok(run(add(Value::Int(1), Value::Int(2))).await.unwrap()), Value::Int(3));
    let big = "123456789012345678901234567890";
    assert_eq!(ok(run(add(Value::BigInt(big.into()), Value::Int(0))).await.unwrap()), Value::BigInt(big.into()));
    assert_eq!(ok(run(add(Value::Str("a".into()), Value::Str("b".into()))).await.unwrap()), Value::Str("ab".into()));
    assert_eq!(ok(run(add(Value::Float(0.5), Value::Float(0.25))).await.unwrap()), Value::Float(0.75));
    let b = |x: &[u8]| Value::Bytes(ByteBuf::from(x.to_vec()));
    assert_eq!(ok(run(add(b(b"x"), b(b"y"))).await.unwrap()), b(b"xy"));
    let list = Value::List(vec![Value::None, Value::Bool(true), Value::Tuple(vec![Value::Int(-1)])]);
    assert_eq!(ok(run(add(list.clone(), Value::List(vec![]))).await.unwrap()), list);
    // dict(...) with any keys, through a builtin.
    let pairs = Value::List(vec![Value::Tuple(vec![Value::Int(1), Value::Str("one".into())])]);
    let d = ok(run(chain("builtins", vec![Call::method("dict", vec![pairs])])).await.unwrap());
    assert_eq!(d, Value::Dict(vec![(Value::Int(1), Value::Str("one".into()))]));
    // An attribute, Self with a builtin, and a lazy chain as an argument.
    let attr = chain("ksrpc.server.demo", vec![Call::attr("PASSWORD")]);
    assert_eq!(ok(run(attr.clone()).await.unwrap()), Value::Int(123_456));
    let len = chain("ksrpc.server.demo", vec![Call::attr("LIST"), Call::method("len", vec![Value::SelfRef])]);
    assert_eq!(ok(run(len).await.unwrap()), Value::Int(5));
    let nested = add(Value::Chain(Box::new(attr)), Value::Int(1));
    assert_eq!(ok(run(nested).await.unwrap()), Value::Int(123_457));
    // Keyword arguments.
    let kw = Call {
        name: "add".into(),
        args: Some(Args {
            positional: vec![],
            keyword: vec![("a".into(), Value::Int(2)), ("b".into(), Value::Int(3))],
        }),
    };
    assert_eq!(ok(run(chain("ksrpc.server.demo", vec![kw])).await.unwrap()), Value::Int(5));
    // An object with no native form comes back pickled.
    let point = ok(run(chain("ksrpc.server.demo", vec![Call::attr("point")])).await.unwrap());
    assert!(matches!(point, Value::Pickle(_)), "{point:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generators_become_handles_advanced_one_item_at_a_time() {
    let ex = executor(|_| {});
    let (admin, other) = (user("admin", &["allow *"]), user("other", &["allow *"]));
    let start = chain("ksrpc.server.demo", vec![Call::method("sync_counter", vec![])]);
    let handle = match ex.call_native(NativeRequest { user: admin.clone(), chain: start }).await.unwrap() {
        Outcome::Handle(h) => h,
        other => panic!("{other:?}"),
    };
    let next = |h: NonZeroU64| CallChain { module: String::new(), calls: vec![], handle: Some(h) };
    // Another user's handle is an error, not the end of iteration.
    match ex.call_native(NativeRequest { user: other, chain: next(handle) }).await.unwrap() {
        Outcome::Err(e) => assert_eq!(e.kind, "LookupError", "{e:?}"),
        o => panic!("{o:?}"),
    }
    for want in 1..=3 {
        assert_eq!(
            ok(ex.call_native(NativeRequest { user: admin.clone(), chain: next(handle) }).await.unwrap()),
            Value::Int(want)
        );
    }
    assert_eq!(
        ex.call_native(NativeRequest { user: admin.clone(), chain: next(handle) }).await.unwrap(),
        Outcome::Exhausted
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_and_rules_hold_as_in_the_compat_protocol() {
    let ex = executor(|_| {});
    let limited = user("limited", LIMITED);
    let run = |c: CallChain<Value>| ex.call_native(NativeRequest { user: limited.clone(), chain: c });
    let div = chain("ksrpc.server.demo", vec![Call::method("div", vec![Value::Int(1), Value::Int(0)])]);
    match run(div).await.unwrap() {
        Outcome::Err(e) => {
            assert_eq!(e.kind, "ZeroDivisionError");
            assert!(e.traceback.contains("div"), "{}", e.traceback);
        }
        o => panic!("{o:?}"),
    }
    for refused in [
        chain("os", vec![Call::method("getcwd", vec![])]),
        chain("ksrpc.server.demo", vec![Call::attr("random"), Call::attr("_os")]),
        chain("ksrpc.server.demo", vec![Call::attr("add"), Call::attr("__globals__")]),
        chain("ksrpc.server.demo", vec![Call::attr("LIST"), Call::method("len", vec![Value::SelfRef])]),
    ] {
        match run(refused.clone()).await.unwrap() {
            Outcome::Err(e) => assert_eq!(e.kind, "PermissionError", "{refused:?}: {e:?}"),
            o => panic!("{refused:?} gave {o:?}"),
        }
    }
    // Pickle values are for users who may send code anyway; the limited user's is refused.
    let evil = b"\x80\x04\x95\x1c\x00\x00\x00\x00\x00\x00\x00\x8c\x02os\x94\x8c\x06system\x94\x93\x94\x8c\x04true\x94\x85\x94R\x94.";
    let with_pickle = chain(
        "ksrpc.server.demo",
        vec![Call::method("add", vec![Value::Pickle(ByteBuf::from(evil.to_vec())), Value::Int(1)])],
    );
    match run(with_pickle).await.unwrap() {
        Outcome::Err(e) => assert!(e.message.contains("builtins"), "{e:?}"),
        o => panic!("{o:?}"),
    }
    // From a user allowed everything, the same pickle loads (its global is
    // within the user's rules) and `os.system("true")` returns 0: 0 + 1.
    let admin = user("admin", &["allow *"]);
    let with_pickle = chain(
        "ksrpc.server.demo",
        vec![Call::method("add", vec![Value::Pickle(ByteBuf::from(evil.to_vec())), Value::Int(1)])],
    );
    assert_eq!(ok(ex.call_native(NativeRequest { user: admin, chain: with_pickle }).await.unwrap()), Value::Int(1));
}

/// Tables need pyarrow on the server; without it (here: made unimportable
/// in this test's own interpreter) a DataFrame result comes as records, a
/// table argument is an error that names the package, and everything else
/// still works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_pyarrow_table_results_are_records_and_table_arguments_a_clear_error() {
    let ex = executor(|_| {});
    let admin = user("admin", &["allow *"]);
    let run = |c: CallChain<Value>| ex.call_native(NativeRequest { user: admin.clone(), chain: c });
    // sys.modules["pyarrow"] = None makes `import pyarrow` raise ImportError.
    let hide = chain(
        "sys",
        vec![Call::attr("modules"), Call::method("__setitem__", vec![Value::Str("pyarrow".into()), Value::None])],
    );
    assert_eq!(ok(run(hide).await.unwrap()), Value::None);
    // A DataFrame result: one dict per row, dates as ISO strings.
    let frame = chain("bench_mod", vec![Call::method("market_frame", vec![Value::Int(10)])]);
    let Value::List(rows) = ok(run(frame).await.unwrap()) else { panic!("records are a list") };
    assert_eq!(rows.len(), 10);
    let Value::Dict(first) = &rows[0] else { panic!("a record is a dict: {:?}", rows[0]) };
    let keys: Vec<&Value> = first.iter().map(|(k, _)| k).collect();
    let names = ["date", "code", "open", "high", "low", "close", "volume"].map(|n| Value::Str(n.into()));
    assert_eq!(keys, names.iter().collect::<Vec<_>>());
    assert_eq!(first[0].1, Value::Str("2020-01-01T00:00:00.000".into()));
    assert_eq!(first[1].1, Value::Str("600000".into()));
    assert!(matches!(first[6].1, Value::Int(_)), "{first:?}");
    // A named index becomes the first column.
    let indexed = chain(
        "bench_mod",
        vec![
            Call::method("market_frame", vec![Value::Int(3)]),
            Call::method("set_index", vec![Value::Str("code".into())]),
        ],
    );
    let Value::List(rows) = ok(run(indexed).await.unwrap()) else { panic!("records are a list") };
    let Value::Dict(first) = &rows[0] else { panic!("a record is a dict") };
    assert_eq!(first[0], (Value::Str("code".into()), Value::Str("600000".into())));
    // A table argument cannot be read without pyarrow.
    let table_arg =
        chain("bench_mod", vec![Call::method("frame_summary", vec![Value::Table(ByteBuf::from(b"ARROW1".to_vec()))])]);
    match run(table_arg.clone()).await.unwrap() {
        Outcome::Err(e) => {
            assert_eq!(e.kind, "ImportError", "{e:?}");
            assert!(e.message.contains("pip install pyarrow"), "{e:?}");
        }
        o => panic!("{table_arg:?} gave {o:?}"),
    }
    let add = chain("ksrpc.server.demo", vec![Call::method("add", vec![Value::Int(1), Value::Int(2)])]);
    assert_eq!(ok(run(add).await.unwrap()), Value::Int(3));
}

/// `python.max_reply_bytes` bounds native replies as it bounds compat ones:
/// a result over it is a `MemoryError`, never sent (native replies used to
/// ignore the limit).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_over_max_reply_bytes_are_a_memory_error_on_both_protocols() {
    let ex = executor(|c| c.max_reply_bytes = 1 << 20);
    let admin = user("admin", &["allow *"]);
    let echo = |n: usize| {
        let value = Value::Bytes(ByteBuf::from(vec![7u8; n]));
        chain("bench_mod", vec![Call::method("echo", vec![value])])
    };
    let small = ex.call_native(NativeRequest { user: admin.clone(), chain: echo(100_000) }).await.unwrap();
    assert_eq!(ok(small), Value::Bytes(ByteBuf::from(vec![7u8; 100_000])));
    match ex.call_native(NativeRequest { user: admin.clone(), chain: echo(2 << 20) }).await.unwrap() {
        Outcome::Err(e) => {
            assert_eq!(e.kind, "MemoryError", "{e:?}");
            assert!(e.message.contains("max_reply_bytes"), "{e:?}");
        }
        other => panic!("a 2 MiB reply passed a 1 MiB limit: {}", matches!(other, Outcome::Ok(_))),
    }
    let payload = ksrpc_tests::request("", "bench_mod", "[RpcCall('echo', (b'x' * 2_000_000,), {})]", 0);
    let reply = ex.call_compat(ksrpc_core::CompatRequest { user: admin, payload }).await.unwrap();
    let seen = ksrpc_tests::seen(&reply.body);
    assert_eq!((seen.status, seen.kind.as_str()), (500, "MemoryError"), "{seen:?}");
    assert!(seen.data.contains("max_reply_bytes"), "{seen:?}");
}
