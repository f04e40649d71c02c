//! Bench workloads of the Rust client (`ksrpc-client`, native protocol)
//! against our server: the big downloads over v2 HTTP and WebSocket, and
//! small calls with many in flight on one WebSocket.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use ksrpc_client::{Client, Transport};
use serde_json::{json, Value};

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?)
}

async fn connect(url: &str, transport: Transport, user: &str, password: &str) -> Result<Client> {
    Client::builder(url).credentials(user, password).transport(transport).connect().await.context("connecting")
}

fn median(mut runs: Vec<f64>) -> f64 {
    runs.sort_by(f64::total_cmp);
    runs[runs.len() / 2]
}

/// Times `module.function(arg)` read as Arrow record batches, after one
/// discarded warm-up; checks the row count; returns the median seconds.
pub fn download(
    url: &str,
    transport: Transport,
    (user, password): (&str, &str),
    (module, function, arg): (&str, &str, i64),
    rows: usize,
    repeat: u64,
) -> Result<(f64, Value)> {
    runtime()?.block_on(async {
        let client = connect(url, transport, user, password).await?;
        let mut runs = Vec::new();
        for i in 0..=repeat {
            let t = Instant::now();
            let batches = client.module(module).call(function, (arg,)).record_batches().await?;
            let dt = t.elapsed().as_secs_f64();
            let got: usize = batches.iter().map(|b| b.num_rows()).sum();
            anyhow::ensure!(got == rows, "{function}: {got} rows, expected {rows}");
            if i > 0 {
                runs.push(dt);
            }
        }
        let m = median(runs.clone());
        Ok((m, json!({"seconds": m, "runs": runs})))
    })
}

/// `add(i, 1)` with `in_flight` calls outstanding on one WebSocket for
/// `seconds`; returns req/s and latency percentiles.
pub fn small_calls_ws(
    url: &str,
    (user, password): (&str, &str),
    in_flight: usize,
    seconds: u64,
) -> Result<(f64, Value)> {
    runtime()?.block_on(async {
        let client = connect(url, Transport::WebSocket, user, password).await?;
        let stop = Instant::now() + Duration::from_secs(seconds);
        let started = Instant::now();
        let tasks: Vec<_> = (0..in_flight as i64)
            .map(|i| {
                let demo = client.module("ksrpc.server.demo");
                tokio::spawn(async move {
                    let mut lat = Vec::new();
                    while Instant::now() < stop {
                        let t = Instant::now();
                        let v: i64 = demo.clone().call("add", (i, 1)).collect().await?;
                        anyhow::ensure!(v == i + 1, "add({i}, 1) = {v}");
                        lat.push(t.elapsed().as_secs_f64());
                    }
                    Ok(lat)
                })
            })
            .collect();
        let mut lat = Vec::new();
        for t in tasks {
            lat.extend(t.await??);
        }
        let elapsed = started.elapsed().as_secs_f64();
        lat.sort_by(f64::total_cmp);
        anyhow::ensure!(!lat.is_empty(), "no call completed");
        let pct = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)] * 1000.0;
        let rps = lat.len() as f64 / elapsed;
        Ok((rps, json!({"rps": rps, "p50_ms": pct(0.5), "p99_ms": pct(0.99), "calls": lat.len()})))
    })
}
