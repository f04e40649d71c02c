//! `ksrpc-server`: serve the Python modules of this machine to ksrpc clients.
//!
//! `cargo run -p ksrpc-server` starts a safe default server; see the README
//! for the configuration reference.

mod config;

use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use actix_web::{middleware, web, App, HttpServer};
use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use ksrpc_core::auth::{hash_password, AuthTuning, PasswordSource, UserStore};
use ksrpc_core::RuleSet;
use ksrpc_py::PyExecutor;
use ksrpc_transport_http::{guard, HttpState};

use crate::config::{path_cut_by_client, Config, Overrides};

/// The ksrpc server: call this machine's Python modules from anywhere.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// TOML config file (also `KSRPC_CONFIG`).
    #[arg(long, env = "KSRPC_CONFIG", global = true)]
    config: Option<PathBuf>,
    /// Address to bind (overrides `server.host`).
    #[arg(long)]
    host: Option<String>,
    /// Port to bind (overrides `server.port`; 0 picks a free port).
    #[arg(long)]
    port: Option<u16>,
    /// URL prefix (overrides `server.path`).
    #[arg(long)]
    path: Option<String>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print an argon2id hash of a password read from stdin, for `password_hash`.
    HashPassword,
}

/// Rules of the generated default user: the demo module only.
const DEFAULT_RULES: &[&str] = &["allow ksrpc.server.demo", "deny *"];

fn main() -> Result<()> {
    let cli = Cli::parse();
    if let Some(Command::HashPassword) = cli.command {
        return print_hash();
    }
    // Log lines are written by a background thread: a write(2) per call on
    // the HTTP worker cost ~10% of small-call throughput.
    let (writer, _flush_on_exit) = tracing_appender::non_blocking(std::io::stderr());
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info,actix_server=warn".into()),
        )
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(writer)
        .init();
    let overrides = Overrides { host: cli.host, port: cli.port, path: cli.path };
    let config = Config::load(cli.config.as_deref(), &overrides)?;
    let users = Arc::new(build_users(&config)?);
    let executor = PyExecutor::start(config.python()).context("starting the embedded Python")?;
    actix_web::rt::System::new().block_on(serve(config, users, executor.clone()))?;
    // Outside the async runtime: closing takes the GIL, which no actix or
    // tokio thread may hold.
    tracing::info!("stopped accepting calls; shutting the executor down");
    executor.close();
    Ok(())
}

fn print_hash() -> Result<()> {
    if std::io::stdin().is_terminal() {
        eprint!("password (input is visible; pipe it in to avoid that): ");
        std::io::stderr().flush().ok();
    }
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    let password = line.trim_end_matches(['\r', '\n']);
    anyhow::ensure!(!password.is_empty(), "empty password");
    let mut out = std::io::stdout().lock();
    writeln!(out, "{}", hash_password(password))?;
    Ok(())
}

fn build_users(config: &Config) -> Result<UserStore> {
    let mut store = UserStore::new(AuthTuning::default());
    if config.users.is_empty() {
        let password: String = {
            use rand::distr::{Alphanumeric, SampleString};
            Alphanumeric.sample_string(&mut rand::rng(), 20)
        };
        store.add_plain("admin", &password, RuleSet::parse(DEFAULT_RULES)?);
        // Printed once, to stderr, outside the log (logs never carry secrets).
        eprintln!(
            "\nNo users configured: created user `admin` with password `{password}`\n\
             (rules: {DEFAULT_RULES:?}). Configure [users] to choose your own.\n"
        );
        return Ok(store);
    }
    for (name, user) in &config.users {
        let rules = RuleSet::parse(&user.rules)?;
        if rules.rules().is_empty() {
            tracing::warn!(user = %name, "user has no rules: every call will be refused");
        }
        match (&user.password, &user.password_hash) {
            (Some(pw), None) => store.add_plain(name, pw, rules),
            (None, Some(hash)) => store.add_hashed(name, hash, rules)?,
            _ => unreachable!("validated by Config::load"),
        }
    }
    for u in store.users() {
        if u.source == PasswordSource::PlainText {
            tracing::warn!(
                user = %u.name,
                "plain-text password in the config; store `password_hash` from `ksrpc-server hash-password` instead"
            );
        }
    }
    Ok(store)
}

async fn serve(config: Config, users: Arc<UserStore>, executor: PyExecutor) -> Result<()> {
    let path = config.server.path.clone();
    if let Some(set) = path_cut_by_client(&path) {
        tracing::warn!(
            "server.path {path:?} ends in a character of {set:?}: the 0.8.1 client's URL cache \
             (`rstrip({set:?})`) will cut it after the first call; end the path with e.g. a digit"
        );
    }
    let host_is_loopback = matches!(config.server.host.as_str(), "127.0.0.1" | "localhost" | "::1");
    if !host_is_loopback {
        tracing::warn!(
            host = %config.server.host,
            "listening beyond loopback without TLS: passwords and data travel in clear; \
             put a TLS proxy (or an frp tunnel with TLS) in front"
        );
    }
    let state = web::Data::new(HttpState {
        users,
        executor: Arc::new(executor),
        codec: config.codec(),
        limits: config.limits(),
        timestamp_window: config.server.timestamp_window,
        in_flight: Default::default(),
    });
    let app_path = path.clone();
    let mut server = HttpServer::new(move || {
        App::new()
            .app_data(state.clone())
            .wrap(middleware::from_fn(guard))
            .configure(ksrpc_transport_http::routes(&app_path))
            .configure(ksrpc_transport_ws::routes(&app_path))
    })
    .shutdown_timeout(config.server.shutdown_grace)
    .client_request_timeout(Duration::from_secs(60));
    if config.server.workers > 0 {
        server = server.workers(config.server.workers);
    }
    let server = server
        .bind((config.server.host.as_str(), config.server.port))
        .with_context(|| format!("binding {}:{}", config.server.host, config.server.port))?;
    let addrs = server.addrs();
    // Our own signal handlers, installed before the "listening" line: a
    // SIGTERM right after start-up must still stop the server gracefully
    // (actix installs its handlers only once the server future runs).
    let server = server.disable_signals().run();
    let handle = server.handle();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    actix_web::rt::spawn(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: stopping gracefully"),
            _ = int.recv() => tracing::info!("SIGINT: stopping gracefully"),
        }
        handle.stop(true).await;
    });
    {
        // A stable line on stdout that scripts (and xtask) wait for.
        let mut out = std::io::stdout().lock();
        for addr in &addrs {
            writeln!(out, "ksrpc-server listening on http://{addr}{path}")?;
        }
        out.flush()?;
    }
    server.await?;
    Ok(())
}
