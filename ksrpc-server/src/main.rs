//! `ksrpc-server`: serve the Python modules of this machine to ksrpc clients.
//!
//! `cargo run -p ksrpc-server` starts a safe default server; see the README
//! for the configuration reference. The wiring lives in the library
//! (`lib.rs`), shared with the `ksrpc_rs` Python extension.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use ksrpc_py::PyExecutor;
use ksrpc_server::{
    build_users, hash_password_asked, hash_password_from, init_logging, start, Config, Overrides, Signals,
};

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
    /// Load the configuration as start-up does (every key, the users'
    /// password hashes and rules, the path, TLS files, the cache's ttl, the
    /// venv) and print what would be served, without serving; exit 1 with
    /// the first error.
    Check,
    /// The result cache's disk tier (`[cache] path` of the config).
    Cache {
        #[command(subcommand)]
        action: CacheAction,
    },
}

#[derive(Debug, Subcommand)]
enum CacheAction {
    /// Entries, bytes, expired entries and damaged files on disk.
    Stats,
    /// Delete every entry file (other files in the directory are left alone).
    /// A running server keeps what it holds in memory until it restarts.
    Clear,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    if let Some(Command::HashPassword) = cli.command {
        let stdin = std::io::stdin();
        // On a terminal: asked twice, without echo; piped: the first line.
        let hash = if stdin.is_terminal() {
            hash_password_asked(&mut |prompt| rpassword::prompt_password(prompt))?
        } else {
            hash_password_from(&mut stdin.lock())?
        };
        writeln!(std::io::stdout().lock(), "{hash}")?;
        return Ok(());
    }
    let _flush_on_exit = init_logging();
    let overrides = Overrides { host: cli.host, port: cli.port, path: cli.path };
    let config = Config::load(cli.config.as_deref(), &overrides)?;
    if let Some(Command::Cache { action }) = cli.command {
        return cache_command(&config, action);
    }
    if let Some(Command::Check) = cli.command {
        return check_command(&config);
    }
    let (users, generated) = build_users(&config)?;
    if let Some(admin) = generated {
        // Printed once, to stderr, outside the log (logs never carry secrets).
        eprintln!("{}", admin.announcement());
    }
    let executor = PyExecutor::start(config.python()).context("starting the embedded Python")?;
    let running = start(config, users, executor.clone(), Signals::Own)?;
    {
        // A stable line on stdout that scripts (and xtask) wait for.
        let mut out = std::io::stdout().lock();
        for url in running.urls() {
            writeln!(out, "ksrpc-server listening on {url}")?;
        }
        out.flush()?;
    }
    running.wait()?;
    // The executor is closed outside the server's runtime: closing takes the
    // GIL, which no actix or tokio thread may hold.
    tracing::info!("stopped accepting calls; shutting the executor down");
    executor.close();
    Ok(())
}

/// `ksrpc-server check`: what [`Config::load`] checks, the users as
/// start-up builds them, and the venv; then a summary on stdout.
fn check_command(config: &Config) -> Result<()> {
    let (users, generated) = build_users(config)?;
    if let Some(venv) = &config.python.venv {
        if !venv.join("bin/python").exists() {
            anyhow::bail!("python.venv {} has no bin/python", venv.display());
        }
    }
    let mut out = std::io::stdout().lock();
    let scheme = if config.server.tls.is_some() { "https" } else { "http" };
    let (host, port, path) = (&config.server.host, config.server.port, &config.server.path);
    writeln!(out, "configuration OK")?;
    writeln!(out, "would listen on {scheme}://{host}:{port}{path} (port 0: a free one)")?;
    if generated.is_some() {
        writeln!(out, "users: none configured; an admin with a random password is made at start-up (demo only)")?;
    }
    for user in users.users() {
        let password = match user.source {
            ksrpc_core::auth::PasswordSource::Hash => "password hash",
            ksrpc_core::auth::PasswordSource::PlainText => "plain-text password (store a password_hash instead)",
        };
        writeln!(out, "user {}: {} rules, {password}", user.name, user.rules.rules().len())?;
    }
    let python = config.python();
    writeln!(out, "python: {} threads; parallel packages {:?}", python.threads, python.parallel_modules)?;
    if config.cache.enabled {
        let tier = config.cache.path.as_ref().map_or_else(|| "memory only".to_owned(), |p| p.display().to_string());
        writeln!(out, "cache: on ({tier}), {} ttl rules", config.cache.ttl.len())?;
    }
    Ok(())
}

/// `ksrpc-server cache stats|clear`.
fn cache_command(config: &Config, action: CacheAction) -> Result<()> {
    let Some(dir) = &config.cache.path else {
        anyhow::bail!("the configuration sets no [cache] path: the cache lives in the server's memory only");
    };
    let mut out = std::io::stdout().lock();
    match action {
        CacheAction::Stats => {
            let scan = ksrpc_cache::disk::scan(dir).with_context(|| format!("reading {}", dir.display()))?;
            let (n, bytes) = scan.entries();
            let (expired, expired_bytes) = scan.expired(std::time::SystemTime::now());
            writeln!(out, "directory: {}", dir.display())?;
            writeln!(out, "enabled: {}", config.cache.enabled)?;
            writeln!(out, "entries: {n} ({bytes} bytes of at most {})", config.cache.max_disk_bytes)?;
            writeln!(out, "expired: {expired} ({expired_bytes} bytes; removed when next looked up or at start)")?;
            writeln!(out, "damaged: {} (removed at start)", scan.bad.len())?;
            writeln!(out, "unfinished writes: {} (removed at start)", scan.stale.len())?;
            writeln!(out, "memory bound: {} bytes", config.cache.max_memory_bytes)?;
            for line in &config.cache.ttl {
                writeln!(out, "ttl: {line}")?;
            }
        }
        CacheAction::Clear => {
            let (files, bytes) =
                ksrpc_cache::disk::clear(dir).with_context(|| format!("clearing {}", dir.display()))?;
            writeln!(out, "removed {files} files ({bytes} bytes) from {}", dir.display())?;
        }
    }
    Ok(())
}
