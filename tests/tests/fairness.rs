//! Fair execution on the real embedded CPython: one user flooding the pool
//! with blocking calls, or holding threads with calls that ignore their
//! timeout, must not keep another user's call from running.
//!
//! Every assertion is about order (which call finished before which), never
//! about how fast something ran; the generous timeouts only stop a starved
//! test from hanging.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ksrpc_core::{CompatReply, CompatRequest, ExecError, Executor};
use ksrpc_py::PyExecutor;
use ksrpc_tests::{executor, request, seen, user};

const DEMO: &str = "ksrpc.server.demo";

fn call(name: &str, args: &str) -> String {
    format!("[RpcCall({name:?}, {args}, {{}})]")
}

/// Starts `n` calls of `bench_mod.sleep(seconds)` as `name`; the counter
/// goes up as each one returns.
fn flood(
    ex: &Arc<PyExecutor>,
    name: &str,
    n: usize,
    seconds: f64,
    finished: &Arc<AtomicUsize>,
) -> Vec<tokio::task::JoinHandle<Result<CompatReply, ExecError>>> {
    let who = user(name, &["allow *"]);
    let payload = request("", "bench_mod", &call("sleep", &format!("({seconds},)")), 0);
    (0..n)
        .map(|_| {
            let (ex, who, payload, finished) = (ex.clone(), who.clone(), payload.clone(), finished.clone());
            tokio::spawn(async move {
                let r = ex.call_compat(CompatRequest { user: who, payload }).await;
                finished.fetch_add(1, Ordering::SeqCst);
                r
            })
        })
        .collect()
}

async fn add_as(ex: &PyExecutor, name: &str) -> String {
    let reply = ex
        .call_compat(CompatRequest {
            user: user(name, &["allow *"]),
            payload: request("", DEMO, &call("add", "(1, 2)"), 0),
        })
        .await
        .expect("the call is accepted");
    let s = seen(&reply.body);
    format!("{} {}", s.status, s.data)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_user_flooding_blocking_calls_does_not_starve_another() {
    // 64 calls (the in-flight cap) of 6 s each from `a` on a pool of 4: in
    // one shared FIFO, `b`'s call would wait for all of them (~96 s).
    let ex = Arc::new(executor(|c| c.threads = 4));
    let finished = Arc::new(AtomicUsize::new(0));
    let calls = flood(&ex, "a", 64, 6.0, &finished);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let b = tokio::time::timeout(Duration::from_secs(30), add_as(&ex, "b")).await;
    assert_eq!(b.as_deref().ok(), Some("200 3"), "b's call starved behind a's queue");
    assert_eq!(finished.load(Ordering::SeqCst), 0, "b should be answered while a's first calls still sleep");
    for c in calls {
        c.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_third_user_is_served_next_not_after_two_queues() {
    // Pool 4, cap 2 per user: a and b fill it and each queue 20 more. Round
    // robin gives c the first thread that frees up; a FIFO would serve c
    // after all 40 queued calls.
    let ex = Arc::new(executor(|c| c.threads = 4));
    let finished = Arc::new(AtomicUsize::new(0));
    let mut calls = flood(&ex, "a", 22, 1.0, &finished);
    calls.extend(flood(&ex, "b", 22, 1.0, &finished));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let c = tokio::time::timeout(Duration::from_secs(60), add_as(&ex, "c")).await;
    assert_eq!(c.as_deref().ok(), Some("200 3"));
    let before_c = finished.load(Ordering::SeqCst);
    assert!(before_c <= 8, "c was served only after {before_c} of a's and b's queued calls");
    for c in calls {
        c.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stuck_calls_are_charged_to_their_user_and_others_are_still_served() {
    // `time.sleep` in C ignores the timeout's asynchronous exception, so
    // these calls hold their threads for 25 s after answering TimeoutError.
    let ex = Arc::new(executor(|c| {
        c.threads = 2;
        c.call_timeout = 1.0;
    }));
    let finished = Arc::new(AtomicUsize::new(0));
    let stuck = flood(&ex, "a", 8, 25.0, &finished);
    for c in stuck {
        let s = seen(&c.await.unwrap().unwrap().body);
        assert_eq!((s.status, s.kind.as_str()), (500, "TimeoutError"), "{s:?}");
    }
    // a keeps at most its cap (1 of 2 threads) busy, stuck or not.
    assert!(ex.running() <= 1, "a holds {} threads with stuck calls", ex.running());
    for round in 0..3 {
        assert_eq!(add_as(&ex, "b").await, "200 3", "round {round}: b was not served");
    }
    // a's own new calls wait behind its stuck one (and time out), but never
    // take b's thread.
    let a_again = add_as(&ex, "a").await;
    assert!(a_again.starts_with("500"), "{a_again}");
    assert_eq!(add_as(&ex, "b").await, "200 3");
}

/// Calls `fakesdk.<name>(args)` as `who`, counting it in `finished` when it
/// returns.
fn sdk_call(
    ex: &Arc<PyExecutor>,
    who: &str,
    name: &str,
    args: &str,
    finished: &Arc<AtomicUsize>,
) -> tokio::task::JoinHandle<String> {
    let (ex, who, finished) = (ex.clone(), user(who, &["allow *"]), finished.clone());
    let payload = request("", "fakesdk", &call(name, args), 0);
    tokio::spawn(async move {
        let reply = ex.call_compat(CompatRequest { user: who, payload }).await.expect("accepted");
        finished.fetch_add(1, Ordering::SeqCst);
        let s = seen(&reply.body);
        format!("{} {}", s.status, s.data)
    })
}

/// Four users ask the thread-unsafe fake SDK for 1..=4 at once and get
/// their answers back; `(wrong answers, replies)`.
async fn four_sdk_queries(ex: &Arc<PyExecutor>) -> (usize, Vec<String>) {
    let finished = Arc::new(AtomicUsize::new(0));
    let calls: Vec<_> =
        (1..=4).map(|i| sdk_call(ex, &format!("u{i}"), "query", &format!("({i}, 1.0)"), &finished)).collect();
    let mut replies = Vec::new();
    for c in calls {
        replies.push(c.await.expect("the call task"));
    }
    let wrong = replies.iter().enumerate().filter(|(i, r)| **r != format!("200 {}", i + 1)).count();
    (wrong, replies)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thread_unsafe_sdk_is_called_one_call_at_a_time_by_default() {
    let ex = Arc::new(executor(|c| c.threads = 8));
    let (wrong, replies) = four_sdk_queries(&ex).await;
    assert_eq!(wrong, 0, "concurrent calls into one package must not overlap: {replies:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_sdk_opted_into_parallel_modules_is_called_from_many_threads() {
    // What the default prevents: the same four calls, the package opted
    // into the pool, read each other's answers.
    let ex = Arc::new(executor(|c| {
        c.threads = 8;
        c.parallel_modules.push("fakesdk".into());
    }));
    let (wrong, replies) = four_sdk_queries(&ex).await;
    assert!(wrong > 0, "expected overlapping calls to read each other's answers: {replies:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_lane_does_not_take_the_pool_from_other_packages() {
    // Pool 4, cap 2 per user: a and b each send two slow SDK calls. One
    // runs in the SDK's lane and three pool threads wait for it; without a
    // thread lent for each wait, c's call into another package would wait
    // for the first SDK call to end.
    let ex = Arc::new(executor(|c| c.threads = 4));
    let finished = Arc::new(AtomicUsize::new(0));
    let calls: Vec<_> = ["a", "a", "b", "b"].iter().map(|u| sdk_call(&ex, u, "block", "(3.0,)", &finished)).collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let c = tokio::time::timeout(Duration::from_secs(60), add_as(&ex, "c")).await;
    assert_eq!(c.as_deref().ok(), Some("200 3"));
    assert_eq!(finished.load(Ordering::SeqCst), 0, "c waited for an SDK call to end");
    for c in calls {
        c.abort();
    }
}
