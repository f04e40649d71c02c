//! Users from the config, the generated default admin, logging and
//! `hash-password`: start-up pieces both front ends share.

use std::io::{BufRead, IsTerminal};

use anyhow::{Context, Result};
use ksrpc_core::auth::{hash_password, AuthTuning, PasswordSource, UserStore};
use ksrpc_core::RuleSet;

use crate::Config;

/// Rules of the generated default user: the demo module only.
pub const DEFAULT_RULES: &[&str] = &["allow ksrpc.server.demo", "deny *"];

/// The `admin` user made when the config has no users: its password is
/// shown once by the front end (stderr, or the notebook cell), never logged.
#[derive(Debug)]
pub struct GeneratedAdmin {
    /// The random password.
    pub password: String,
}

impl GeneratedAdmin {
    /// The text a front end shows once.
    pub fn announcement(&self) -> String {
        format!(
            "\nNo users configured: created user `admin` with password `{}`\n\
             (rules: {DEFAULT_RULES:?}). Configure [users] to choose your own.\n",
            self.password
        )
    }
}

/// The user store of `config`, and the generated admin when it has none.
pub fn build_users(config: &Config) -> Result<(UserStore, Option<GeneratedAdmin>)> {
    let mut store = UserStore::new(AuthTuning::default());
    if config.users.is_empty() {
        let password: String = {
            use rand::distr::{Alphanumeric, SampleString};
            Alphanumeric.sample_string(&mut rand::rng(), 20)
        };
        store.add_plain("admin", &password, RuleSet::parse(DEFAULT_RULES)?);
        return Ok((store, Some(GeneratedAdmin { password })));
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
    Ok((store, None))
}

/// Log lines to stderr through a background writer (a write(2) per call on
/// the HTTP worker cost ~10% of small-call throughput). The returned guard
/// flushes on drop; `None` when a subscriber is already installed (a second
/// `serve()` in one Python process). `KSRPC_LOG_FORMAT=json` writes one JSON
/// object per line (fields at the top level) for log collectors.
pub fn init_logging() -> Option<tracing_appender::non_blocking::WorkerGuard> {
    let (writer, guard) = tracing_appender::non_blocking(std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info,actix_server=warn".into()),
        )
        .with_writer(writer);
    let format = std::env::var("KSRPC_LOG_FORMAT").unwrap_or_default();
    let started = match format.as_str() {
        // One JSON object per line, the event's fields at the top level.
        "json" => builder.json().flatten_event(true).try_init(),
        _ => builder.with_ansi(std::io::stderr().is_terminal()).try_init(),
    };
    if !matches!(format.as_str(), "" | "text" | "json") {
        tracing::warn!("KSRPC_LOG_FORMAT={format:?} is neither \"text\" nor \"json\": logging as text");
    }
    started.ok().map(|()| guard)
}

/// `hash-password` with the password piped in: an argon2id hash of the
/// first line of `input`.
pub fn hash_password_from(input: &mut dyn BufRead) -> Result<String> {
    let mut line = String::new();
    input.read_line(&mut line)?;
    let password = line.trim_end_matches(['\r', '\n']);
    anyhow::ensure!(!password.is_empty(), "empty password");
    Ok(hash_password(password))
}

/// `hash-password` on a terminal: asks twice through `ask` (the binary
/// reads without echo), and refuses an empty password or two that differ.
pub fn hash_password_asked(ask: &mut dyn FnMut(&str) -> std::io::Result<String>) -> Result<String> {
    let first = ask("password: ").context("reading the password")?;
    anyhow::ensure!(!first.is_empty(), "empty password");
    let again = ask("the same password again: ").context("reading the password")?;
    anyhow::ensure!(first == again, "the two passwords differ; nothing was hashed");
    Ok(hash_password(&first))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn asked(answers: &[&str]) -> Result<String> {
        let mut answers = answers.iter().map(|a| a.to_string());
        hash_password_asked(&mut |_| Ok(answers.next().expect("asked too often")))
    }

    #[test]
    fn a_terminal_password_is_asked_twice_and_must_match() {
        let hash = asked(&["s3cret", "s3cret"]).unwrap();
        assert!(hash.starts_with("$argon2id$") && !hash.contains("s3cret"), "{hash}");
        assert!(asked(&["s3cret", "s3cre"]).unwrap_err().to_string().contains("differ"));
        assert!(asked(&[""]).unwrap_err().to_string().contains("empty"));
    }

    #[test]
    fn a_piped_password_is_the_first_line() {
        let hash = hash_password_from(&mut "pw\nignored\n".as_bytes()).unwrap();
        assert!(hash.starts_with("$argon2id$"));
        assert!(hash_password_from(&mut "\n".as_bytes()).is_err());
    }
}
