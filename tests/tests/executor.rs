//! The executor on the real embedded CPython: concurrency, timeouts,
//! cancellation, caps, and calls that try to stop or escape the server.

use std::sync::Arc;
use std::time::Duration;

use ksrpc_core::{CallOutcome, CompatRequest, ExecError, Executor};
use ksrpc_tests::{executor, request, seen, user};

const DEMO: &str = "ksrpc.server.demo";

fn call(name: &str, args: &str) -> String {
    format!("[RpcCall({name:?}, {args}, {{}})]")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_blocking_calls_meet_at_a_barrier() {
    // One user: the pool of 4 lets half of it run one user's calls by
    // default, so allow three here.
    let ex = Arc::new(executor(|c| c.max_running_per_user = Some(3)));
    let admin = user("admin", &["allow *"]);
    let payload = request("", "bench_mod", &call("barrier_wait", "(3, 5.0)"), 0);
    // Spawn all three before awaiting any (a lazy iterator would run them one by one).
    let calls: Vec<_> = (0..3)
        .map(|_| {
            let (ex, admin, payload) = (ex.clone(), admin.clone(), payload.clone());
            tokio::spawn(async move { ex.call_compat(CompatRequest { user: admin, payload }).await })
        })
        .collect();
    for c in calls {
        let reply = c.await.unwrap().unwrap();
        let s = seen(&reply.body);
        assert_eq!((s.status, s.data.as_str()), (200, "True"), "{s:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn system_exit_is_a_500_and_the_next_call_works() {
    let ex = executor(|_| {});
    let admin = user("admin", &["allow *"]);
    for code in ["sys.exit", "builtins.exit"] {
        let (module, name) = code.split_once('.').unwrap();
        let reply = ex
            .call_compat(CompatRequest { user: admin.clone(), payload: request("", module, &call(name, "(3,)"), 0) })
            .await
            .unwrap();
        let s = seen(&reply.body);
        assert_eq!(s.status, 500, "{s:?}");
        assert_ne!(s.kind, "SystemExit", "a SystemExit would exit the client program: {s:?}");
        assert!(s.data.contains("SystemExit"), "{s:?}");
    }
    let reply = ex
        .call_compat(CompatRequest { user: admin, payload: request("", DEMO, &call("add", "(1, 2)"), 0) })
        .await
        .unwrap();
    assert_eq!(seen(&reply.body).data, "3");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_over_the_timeout_becomes_a_timeout_error_and_its_thread_is_freed() {
    let ex = executor(|c| {
        c.call_timeout = 0.5;
        c.threads = 1;
    });
    let admin = user("admin", &["allow *"]);
    let reply = ex
        .call_compat(CompatRequest {
            user: admin.clone(),
            payload: request("", "bench_mod", &call("spin", "(60.0,)"), 0),
        })
        .await
        .unwrap();
    let s = seen(&reply.body);
    assert_eq!((s.status, s.kind.as_str()), (500, "TimeoutError"), "{s:?}");
    // The log line names the chain (Python told it before the timeout).
    assert_eq!((reply.summary.as_str(), &reply.outcome), ("bench_mod.spin(1 arg)", &CallOutcome::Timeout));
    // The spinning call is interrupted, so even with one thread the next call runs.
    let reply = ex
        .call_compat(CompatRequest { user: admin, payload: request("", DEMO, &call("add", "(1, 2)"), 0) })
        .await
        .unwrap();
    assert_eq!(seen(&reply.body).data, "3");
    for _ in 0..100 {
        if ex.running() == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the timed-out call is still running");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coroutine_whose_client_left_is_cancelled() {
    let ex = executor(|_| {});
    let admin = user("admin", &["allow *"]);
    let payload = request("", "bench_mod", &call("wait_for_cancel", "(60.0,)"), 0);
    let gone = tokio::time::timeout(
        Duration::from_millis(500),
        ex.call_compat(CompatRequest { user: admin.clone(), payload }),
    );
    assert!(gone.await.is_err(), "the call should still be waiting");
    for _ in 0..100 {
        let reply = ex
            .call_compat(CompatRequest {
                user: admin.clone(),
                payload: request("", "bench_mod", &call("cancelled_count", "()"), 0),
            })
            .await
            .unwrap();
        if seen(&reply.body).data == "1" {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the coroutine was never cancelled");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_user_in_flight_cap() {
    let ex = Arc::new(executor(|c| c.max_calls_per_user = 1));
    let (a, b) = (user("a", &["allow *"]), user("b", &["allow *"]));
    let slow = {
        let (ex, a) = (ex.clone(), a.clone());
        tokio::spawn(async move {
            ex.call_compat(CompatRequest { user: a, payload: request("", "bench_mod", &call("sleep", "(1.0,)"), 0) })
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let second = ex.call_compat(CompatRequest { user: a, payload: request("", DEMO, &call("add", "(1, 2)"), 0) }).await;
    assert!(matches!(second, Err(ExecError::Overloaded(_))), "{second:?}");
    let other = ex.call_compat(CompatRequest { user: b, payload: request("", DEMO, &call("add", "(1, 2)"), 0) }).await;
    assert_eq!(seen(&other.unwrap().body).data, "3");
    assert_eq!(seen(&slow.await.unwrap().unwrap().body).status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reduce_gadget_from_a_limited_user_runs_nothing() {
    let ex = executor(|_| {});
    let limited =
        user("limited", &["allow ksrpc.server.demo", "allow bench_mod", "deny os", "deny builtins", "deny *"]);
    let marker = std::env::temp_dir().join(format!("ksrpc-marker-{}", std::process::id()));
    let setup = format!(
        "import os\nclass Evil:\n    def __reduce__(self):\n        return (os.system, ('touch {}',))\n",
        marker.display()
    );
    let payload = request(&setup, DEMO, "[RpcCall('add', (Evil(), 1), {})]", 0);
    let r = ex.call_compat(CompatRequest { user: limited, payload }).await;
    match r {
        Err(ExecError::BadRequest { message, .. }) => assert!(message.contains("system"), "{message}"),
        other => panic!("expected a refused request, got {other:?}"),
    }
    assert!(!marker.exists(), "the gadget ran");
}

#[test]
fn a_venv_of_another_python_minor_is_refused() {
    let dir = std::env::temp_dir().join(format!("ksrpc-fake-venv-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("lib/python3.2/site-packages")).unwrap();
    let config = ksrpc_py::PythonConfig { venv: Some(dir.clone()), ..ksrpc_py::PythonConfig::default() };
    let err = ksrpc_py::PyExecutor::start(config).unwrap_err();
    assert!(matches!(err, ksrpc_py::StartError::VenvMismatch { .. }), "{err}");
    assert!(err.to_string().contains("3.2"), "{err}");
    std::fs::remove_dir_all(dir).ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sys_executable_is_the_venv_python_and_the_venv_imports() {
    let ex = executor(|_| {});
    let admin = user("admin", &["allow *"]);
    let reply = ex
        .call_compat(CompatRequest {
            user: admin.clone(),
            payload: request("", "sys", "[RpcCall('executable', None, None)]", 0),
        })
        .await
        .unwrap();
    let venv = ksrpc_tests::test_venv();
    assert_eq!(
        seen(&reply.body).data,
        format!("{:?}", venv.join("bin/python").display().to_string()).replace('"', "'")
    );
    // dill lives only in the venv: importing it proves its site-packages are on sys.path.
    let reply = ex
        .call_compat(CompatRequest {
            user: admin,
            payload: request("", "dill", "[RpcCall('__name__', None, None)]", 0),
        })
        .await
        .unwrap();
    assert_eq!(seen(&reply.body).data, "'dill'");
}

/// Each compat reply says how its call ended, for the log line: a result, a
/// refusal by the rules, an exception's type, a generator's end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compat_replies_say_how_the_call_ended() {
    let ex = executor(|_| {});
    let admin = user("admin", &["allow *"]);
    let limited = user("limited", &["allow ksrpc.server.demo", "deny *"]);
    let run = |who: &Arc<ksrpc_core::User>, module: &str, calls: &str, ref_id: u64| {
        ex.call_compat(CompatRequest { user: who.clone(), payload: request("", module, calls, ref_id) })
    };
    assert_eq!(run(&admin, DEMO, &call("add", "(1, 2)"), 0).await.unwrap().outcome, CallOutcome::Ok);
    let refused = run(&limited, "os", &call("getcwd", "()"), 0).await.unwrap().outcome;
    assert_eq!(refused, CallOutcome::Refused("import of 'os' is not allowed for user 'limited' (rule deny *)".into()));
    let div = run(&admin, DEMO, &call("div", "(1, 0)"), 0).await.unwrap();
    assert_eq!(div.outcome, CallOutcome::Error("ZeroDivisionError".into()));
    // A generator: its handle, one item, then the end.
    let made = run(&admin, "bench_mod", &call("countdown", "(1,)"), 0).await.unwrap();
    assert_eq!(made.outcome, CallOutcome::Ok);
    let handle = seen(&made.body).ref_id;
    assert_ne!(handle, 0);
    let next = "[RpcCall('countdown', None, None), RpcCall('__anext__', (), {})]";
    assert_eq!(run(&admin, "bench_mod", next, handle).await.unwrap().outcome, CallOutcome::Ok);
    assert_eq!(run(&admin, "bench_mod", next, handle).await.unwrap().outcome, CallOutcome::End);
}
