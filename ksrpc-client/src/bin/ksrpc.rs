//! `ksrpc`: call a Python function on a ksrpc server from the shell.
//!
//! ```text
//! ksrpc call http://127.0.0.1:8080/api/v1 'ksrpc.server.demo.add(1, 2)'
//! ksrpc call ws://127.0.0.1:8080/api/v1/ws 'ksrpc.server.demo.test()' --out frame.parquet
//! ```
//!
//! Results print as JSON (tables as a text table); `--out` writes a table
//! as Arrow IPC, CSV or Parquet, or any value as JSON (a table as records).
//! A table is an Arrow result, or the records (a list of dicts) a server
//! without pyarrow sends instead. Credentials come from
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
    if let Some(out) = &args.out {
        OutKind::of(out)?; // before the call: a wrong --out must not cost a call
    }
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
        } else if !results.is_empty() {
            // Dropping the stream closes the generator on the server.
            bail!("--out writes one result, and {} is a generator (it yielded more than one); without --out each item prints", args.expr);
        }
        results.push(item);
    }
    if let Some(out) = &args.out {
        let [value] = results.as_slice() else {
            bail!("--out needs a result; the generator {} yielded none", args.expr);
        };
        write_out(out, value)?;
        eprintln!("wrote {}", out.display());
    }
    Ok(())
}

/// What `--out` writes, from the file's extension.
#[derive(Clone, Copy, Debug, PartialEq)]
enum OutKind {
    Json,
    Arrow,
    Csv,
    Parquet,
}

impl OutKind {
    /// The kind of `path`, checked before the call: a known extension and a
    /// directory that exists.
    fn of(path: &Path) -> Result<OutKind> {
        let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
        let kind = match ext.as_str() {
            "json" => OutKind::Json,
            "arrow" | "ipc" | "feather" => OutKind::Arrow,
            "csv" => OutKind::Csv,
            "parquet" => OutKind::Parquet,
            other => bail!("--out: unknown extension {other:?} (use .arrow, .csv, .parquet or .json)"),
        };
        let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
        if !dir.is_dir() {
            bail!("--out: the directory {} does not exist", dir.display());
        }
        Ok(kind)
    }
}

/// A table result as record batches: Arrow as sent, or records (a list of
/// dicts with the same string keys, scalar values) read into one batch.
fn table_batches(value: &Value) -> Result<Vec<RecordBatch>> {
    if let Value::Table(_) = value {
        return Ok(value_to_batches(value)?);
    }
    let rows = records(value).context("not a table (an Arrow table, or records: a list of dicts)")?;
    let names: Vec<String> = match rows.first() {
        Some(Value::Dict(pairs)) => {
            pairs.iter().map(|(k, _)| to_json(k).as_str().unwrap_or_default().to_owned()).collect()
        }
        _ => Vec::new(),
    };
    let rows: Vec<serde_json::Value> = rows.into_iter().map(to_json).collect();
    let inferred = arrow_json::reader::infer_json_schema_from_iterator(rows.iter().map(|r| Ok(r.clone())))?;
    // Inference orders the columns by name; keep the table's order.
    let fields: Vec<_> = names.iter().map(|n| inferred.field_with_name(n).cloned()).collect::<Result<_, _>>()?;
    let schema = arrow_schema::Schema::new(fields);
    let mut decoder = arrow_json::ReaderBuilder::new(std::sync::Arc::new(schema)).build_decoder()?;
    decoder.serialize(&rows)?;
    Ok(decoder.flush()?.into_iter().collect())
}

/// The rows of `value` when it is records: a non-empty list of dicts with
/// the same string keys in the same order and scalar values.
fn records(value: &Value) -> Option<Vec<&Value>> {
    let Value::List(rows) = value else { return None };
    let keys = |row: &Value| -> Option<Vec<String>> {
        let Value::Dict(pairs) = row else { return None };
        pairs
            .iter()
            .map(|(k, v)| match (k, v) {
                (Value::Str(k), Value::None | Value::Bool(_) | Value::Int(_) | Value::Float(_) | Value::Str(_)) => {
                    Some(k.clone())
                }
                _ => None,
            })
            .collect()
    };
    let first = keys(rows.first()?)?;
    rows.iter().all(|r| keys(r).as_ref() == Some(&first)).then(|| rows.iter().collect())
}

fn print_value(value: &Value, max_rows: usize) -> Result<()> {
    let mut stdout = std::io::stdout().lock();
    if matches!(value, Value::Table(_)) || records(value).is_some() {
        let batches = table_batches(value)?;
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
/// strings, bytes `{"base64": ...}`, tables records (`[{column: value}]`),
/// pickles a summary.
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
        Value::Table(_) => match table_records(value) {
            Ok(rows) => rows,
            Err(e) => json!({ "table_error": format!("{e:#}") }),
        },
        Value::Pickle(b) => json!({ "pickle_bytes": b.len() }),
        Value::Chain(c) => J::String(c.summary().to_string()),
        Value::SelfRef => J::String("Self".into()),
    }
}

/// An Arrow table as JSON records, `[{column: value, ...}, ...]`.
fn table_records(value: &Value) -> Result<serde_json::Value> {
    let batches = value_to_batches(value)?;
    let mut writer = arrow_json::ArrayWriter::new(Vec::new());
    writer.write_batches(&batches.iter().collect::<Vec<_>>())?;
    writer.finish()?;
    let bytes = writer.into_inner();
    Ok(if bytes.is_empty() { serde_json::Value::Array(Vec::new()) } else { serde_json::from_slice(&bytes)? })
}

fn write_out(path: &Path, value: &Value) -> Result<()> {
    let create = || std::fs::File::create(path).with_context(|| format!("creating {}", path.display()));
    let table = || table_batches(value).with_context(|| format!("--out {} needs a table result", path.display()));
    match OutKind::of(path)? {
        OutKind::Json => {
            let mut f = create()?;
            serde_json::to_writer_pretty(&mut f, &to_json(value))?;
            f.write_all(b"\n")?;
        }
        OutKind::Arrow => {
            let batches = table()?;
            let schema = batches.first().map(|b| b.schema()).context("the table has no batch")?;
            let mut w = arrow_ipc::writer::FileWriter::try_new(create()?, &schema)?;
            for b in &batches {
                w.write(b)?;
            }
            w.finish()?;
        }
        OutKind::Csv => {
            let batches = table()?;
            let mut w = arrow_csv::WriterBuilder::new().with_header(true).build(create()?);
            for b in &batches {
                w.write(b)?;
            }
        }
        OutKind::Parquet => {
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

    fn record(pairs: &[(&str, Value)]) -> Value {
        Value::Dict(pairs.iter().map(|(k, v)| (Value::Str((*k).into()), v.clone())).collect())
    }

    #[test]
    fn records_read_as_a_table_and_tables_write_as_records() {
        let rows = Value::List(vec![
            record(&[("code", Value::Str("600000".into())), ("close", Value::Float(1.5)), ("n", Value::Int(3))]),
            record(&[("code", Value::Str("600001".into())), ("close", Value::None), ("n", Value::Int(4))]),
        ]);
        let batches = table_batches(&rows).unwrap();
        assert_eq!(batches.iter().map(RecordBatch::num_rows).sum::<usize>(), 2);
        let names: Vec<String> = batches[0].schema().fields().iter().map(|f| f.name().clone()).collect();
        assert_eq!(names, ["code", "close", "n"], "the table's column order");
        // Back to JSON records through Arrow (what --out x.json writes for an Arrow table).
        let table = ksrpc_client::batches_to_value(&batches).unwrap();
        assert_eq!(
            to_json(&table),
            serde_json::json!([{"code": "600000", "close": 1.5, "n": 3}, {"code": "600001", "n": 4}])
        );
        // Not records: keys differ, a nested value, not a list.
        let mixed = Value::List(vec![record(&[("a", Value::Int(1))]), record(&[("b", Value::Int(1))])]);
        assert!(records(&mixed).is_none());
        assert!(records(&Value::List(vec![record(&[("a", Value::List(vec![]))])])).is_none());
        assert!(records(&Value::Int(1)).is_none() && records(&Value::List(vec![])).is_none());
    }

    #[test]
    fn out_is_checked_before_the_call() {
        assert_eq!(OutKind::of(Path::new("x.PARQUET")).unwrap(), OutKind::Parquet);
        assert_eq!(OutKind::of(Path::new("x.feather")).unwrap(), OutKind::Arrow);
        let err = OutKind::of(Path::new("x.xlsx")).unwrap_err().to_string();
        assert!(err.contains("unknown extension \"xlsx\""), "{err}");
        let err = OutKind::of(Path::new("/nonexistent-dir/x.csv")).unwrap_err().to_string();
        assert!(err.contains("/nonexistent-dir"), "{err}");
    }
}
