//! `ksrpc`: call a Python function on a ksrpc server from the shell.
//!
//! ```text
//! ksrpc call http://127.0.0.1:8080/api/v1 'ksrpc.server.demo.add(1, 2)'
//! ksrpc call ws://127.0.0.1:8080/api/v1/ws 'bench_mod.market_frame(1000)' --out frame.parquet
//! ```
//!
//! Results print as JSON (tables as a text table); `--out` writes a table
//! as Arrow IPC, CSV or Parquet, or any value as JSON. Credentials come from
//! `--user`/`--password`, `KSRPC_USER`/`KSRPC_PASSWORD`, or a netrc file
//! (`KSRPC_NETRC`, `NETRC`, `~/.netrc`); a missing password is asked for
//! without echo when a terminal is attached. A failed call exits 1 with the
//! server's error on stderr; a usage or connection error exits 2.
#![allow(clippy::print_stdout, clippy::print_stderr)] // a command-line tool: stdout is its interface

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use base64::Engine;
use clap::{Parser, Subcommand};
use futures_util::StreamExt;
use ksrpc_client::{value_to_batches, Client, Error, RecordBatch, Transport, Value};

#[derive(Parser, Debug)]
#[command(name = "ksrpc", version, about = "Call Python functions on a ksrpc server")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run one call and print its result.
    Call(CallArgs),
}

#[derive(clap::Args, Debug)]
struct CallArgs {
    /// The server URL as given to the Python client: http(s)://host:port/api/v1
    /// or ws(s)://host:port/api/v1/ws.
    url: String,
    /// The call, as in Python: 'ksrpc.server.demo.add(1, 2)'.
    expr: String,
    /// User name (else KSRPC_USER, else the netrc file).
    #[arg(short, long, env = "KSRPC_USER")]
    user: Option<String>,
    /// Password (else KSRPC_PASSWORD, else the netrc file, else a prompt).
    /// Prefer the environment or netrc: arguments are visible to other users.
    #[arg(short, long, env = "KSRPC_PASSWORD", hide_env_values = true)]
    password: Option<String>,
    /// Use the WebSocket even for an http(s) URL.
    #[arg(long)]
    ws: bool,
    /// Give up (and cancel the call) after this many seconds.
    #[arg(long)]
    timeout: Option<f64>,
    /// Write the result to a file: .arrow/.ipc, .csv or .parquet for tables,
    /// .json for anything.
    #[arg(short, long)]
    out: Option<PathBuf>,
    /// Rows of a table to print (the rest is summarized).
    #[arg(long, default_value_t = 50)]
    max_rows: usize,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let Command::Call(args) = cli.command;
    let runtime = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ksrpc: starting the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(call(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => match e.downcast_ref::<Error>() {
            Some(Error::Remote(remote)) => {
                eprintln!("{}: {}", remote.kind, remote.message);
                if !remote.traceback.is_empty() {
                    eprintln!("\nserver traceback:\n{}", remote.traceback.trim_end());
                }
                ExitCode::from(1)
            }
            _ => {
                eprintln!("ksrpc: {e:#}");
                ExitCode::from(2)
            }
        },
    }
}

/// User and password from the flags/environment, then netrc, then a prompt.
fn credentials(args: &CallArgs) -> Result<Option<(String, String)>> {
    let host = reqwest_host(&args.url);
    let from_netrc = || -> Option<(String, String)> {
        let path = ksrpc_client::netrc::default_path()?;
        let text = std::fs::read_to_string(path).ok()?;
        ksrpc_client::netrc::lookup(&text, host.as_deref()?)
    };
    match (&args.user, &args.password) {
        (Some(u), Some(p)) => Ok(Some((u.clone(), p.clone()))),
        (user, None) => {
            if let Some((u, p)) = from_netrc().filter(|(u, _)| user.as_ref().is_none_or(|want| want == u)) {
                return Ok(Some((u, p)));
            }
            let Some(user) = user else { return Ok(None) };
            if !std::io::IsTerminal::is_terminal(&std::io::stdin()) {
                bail!("no password for {user}: set KSRPC_PASSWORD, use a netrc file, or run in a terminal");
            }
            let password =
                rpassword::prompt_password(format!("password for {user}: ")).context("reading the password")?;
            Ok(Some((user.clone(), password)))
        }
        (None, Some(p)) => {
            let user =
                from_netrc().map(|(u, _)| u).context("a password was given without a user (--user or KSRPC_USER)")?;
            Ok(Some((user, p.clone())))
        }
    }
}

fn reqwest_host(url: &str) -> Option<String> {
    let rest = url.split_once("://")?.1;
    let authority = rest.split('/').next()?;
    let host = authority.rsplit_once('@').map_or(authority, |x| x.1);
    Some(host.rsplit_once(':').map_or(host, |x| x.0).to_owned())
}

async fn call(args: CallArgs) -> Result<()> {
    let chain = ksrpc_client::expr::parse(&args.expr).with_context(|| format!("parsing {:?}", args.expr))?;
    let mut builder = Client::builder(&args.url);
    if let Some((user, password)) = credentials(&args)? {
        builder = builder.credentials(user, password);
    }
    if args.ws {
        builder = builder.transport(Transport::WebSocket);
    }
    let client = builder.connect().await?;
    let mut chain = client.chain(chain);
    if let Some(t) = args.timeout {
        chain = chain.timeout(Duration::try_from_secs_f64(t).context("--timeout")?);
    }
    if !args.quiet {
        let bar = indicatif::ProgressBar::hidden();
        bar.set_style(
            indicatif::ProgressStyle::with_template("{bytes}/{total_bytes} {wide_bar} {bytes_per_sec} {eta}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        let shown = std::sync::atomic::AtomicBool::new(false);
        chain = chain.on_progress(move |got, total| {
            if let Some(total) = total.filter(|t| *t >= 1 << 20) {
                if !shown.swap(true, std::sync::atomic::Ordering::Relaxed) {
                    bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
                    bar.set_length(total);
                }
                bar.set_position(got);
                if got >= total {
                    bar.finish_and_clear();
                }
            }
        });
    }
    let mut items = chain.stream().await?;
    let mut results = Vec::new();
    while let Some(item) = items.next().await {
        let item = item?;
        if args.out.is_none() {
            print_value(&item, args.max_rows)?;
        }
        results.push(item);
    }
    if let Some(out) = &args.out {
        let [value] = results.as_slice() else {
            bail!("--out needs exactly one result; the call yielded {}", results.len());
        };
        write_out(out, value)?;
        eprintln!("wrote {}", out.display());
    }
    Ok(())
}

fn print_value(value: &Value, max_rows: usize) -> Result<()> {
    let mut stdout = std::io::stdout().lock();
    if let Value::Table(_) = value {
        let batches = value_to_batches(value)?;
        let rows: usize = batches.iter().map(RecordBatch::num_rows).sum();
        let shown = head(&batches, max_rows);
        writeln!(stdout, "{}", arrow_cast::pretty::pretty_format_batches(&shown)?)?;
        if rows > max_rows {
            writeln!(stdout, "... {rows} rows in all ({max_rows} shown; --out FILE for everything)")?;
        }
        return Ok(());
    }
    writeln!(stdout, "{}", serde_json::to_string_pretty(&to_json(value))?)?;
    Ok(())
}

/// The first `n` rows of a table.
fn head(batches: &[RecordBatch], n: usize) -> Vec<RecordBatch> {
    let mut left = n;
    let mut out = Vec::new();
    for b in batches {
        if left == 0 {
            break;
        }
        let take = b.num_rows().min(left);
        out.push(b.slice(0, take));
        left -= take;
    }
    out
}

/// A value as JSON: tuples are arrays, dicts with string keys objects (other
/// keys: an array of `[key, value]` pairs), big ints and non-finite floats
/// strings, bytes `{"base64": ...}`, tables and pickles a summary.
fn to_json(value: &Value) -> serde_json::Value {
    use serde_json::{json, Value as J};
    match value {
        Value::None => J::Null,
        Value::Bool(b) => J::Bool(*b),
        Value::Int(i) => json!(i),
        Value::BigInt(s) => J::String(s.clone()),
        Value::Float(f) if f.is_finite() => json!(f),
        Value::Float(f) => J::String(f.to_string()),
        Value::Str(s) => J::String(s.clone()),
        Value::Bytes(b) => json!({ "base64": base64::engine::general_purpose::STANDARD.encode(b) }),
        Value::List(items) | Value::Tuple(items) => J::Array(items.iter().map(to_json).collect()),
        Value::Dict(pairs) if pairs.iter().all(|(k, _)| matches!(k, Value::Str(_))) => J::Object(
            pairs
                .iter()
                .map(|(k, v)| (if let Value::Str(k) = k { k.clone() } else { String::new() }, to_json(v)))
                .collect(),
        ),
        Value::Dict(pairs) => J::Array(pairs.iter().map(|(k, v)| J::Array(vec![to_json(k), to_json(v)])).collect()),
        Value::Table(_) => match value_to_batches(value) {
            Ok(b) => json!({ "table_rows": b.iter().map(RecordBatch::num_rows).sum::<usize>() }),
            Err(e) => json!({ "table_error": e.to_string() }),
        },
        Value::Pickle(b) => json!({ "pickle_bytes": b.len() }),
        Value::Chain(c) => J::String(c.summary().to_string()),
        Value::SelfRef => J::String("Self".into()),
    }
}

fn write_out(path: &Path, value: &Value) -> Result<()> {
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
    let create = || std::fs::File::create(path).with_context(|| format!("creating {}", path.display()));
    let table = || value_to_batches(value).with_context(|| format!("--out {} needs a table result", path.display()));
    match ext.as_str() {
        "json" => {
            let mut f = create()?;
            serde_json::to_writer_pretty(&mut f, &to_json(value))?;
            f.write_all(b"\n")?;
        }
        "arrow" | "ipc" | "feather" => {
            let batches = table()?;
            let schema = batches.first().map(|b| b.schema()).context("the table has no batch")?;
            let mut w = arrow_ipc::writer::FileWriter::try_new(create()?, &schema)?;
            for b in &batches {
                w.write(b)?;
            }
            w.finish()?;
        }
        "csv" => {
            let batches = table()?;
            let mut w = arrow_csv::WriterBuilder::new().with_header(true).build(create()?);
            for b in &batches {
                w.write(b)?;
            }
        }
        "parquet" => {
            let batches = table()?;
            let schema = batches.first().map(|b| b.schema()).context("the table has no batch")?;
            let props = parquet::file::properties::WriterProperties::builder()
                .set_compression(parquet::basic::Compression::ZSTD(Default::default()))
                .build();
            let mut w = parquet::arrow::ArrowWriter::try_new(create()?, schema, Some(props))?;
            for b in &batches {
                w.write(b)?;
            }
            w.close()?;
        }
        other => bail!("--out: unknown extension {other:?} (use .arrow, .csv, .parquet or .json)"),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_for_netrc() {
        assert_eq!(reqwest_host("http://127.0.0.1:8080/api/v1").as_deref(), Some("127.0.0.1"));
        assert_eq!(reqwest_host("wss://data.example.com/api/v1/ws").as_deref(), Some("data.example.com"));
        assert_eq!(reqwest_host("nonsense"), None);
    }

    #[test]
    fn json_forms() {
        let v = Value::Dict(vec![(Value::Str("a".into()), Value::Tuple(vec![Value::Int(1), Value::Float(f64::NAN)]))]);
        assert_eq!(to_json(&v).to_string(), r#"{"a":[1,"NaN"]}"#);
        let v = Value::Dict(vec![(Value::Int(1), Value::BigInt("123456789012345678901234567890".into()))]);
        assert_eq!(to_json(&v).to_string(), r#"[[1,"123456789012345678901234567890"]]"#);
        let v = Value::Bytes(serde_bytes::ByteBuf::from(b"hi".to_vec()));
        assert_eq!(to_json(&v).to_string(), r#"{"base64":"aGk="}"#);
    }
}
