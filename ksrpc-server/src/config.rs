//! The server configuration: built-in defaults < TOML file (`--config PATH`
//! or `KSRPC_CONFIG`) < `KSRPC_*` environment (`KSRPC_SERVER__PORT=9000`) <
//! command-line flags. Unknown keys are errors that name the key.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use ksrpc_core::codec::{ChunkedZlib, Level, Limits, DEFAULT_MAX_ENCODED_SLICE, DEFAULT_SLICE_SIZE};
use ksrpc_py::PythonConfig;
use serde::{Deserialize, Serialize};

/// The whole configuration file.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Where and how to listen.
    pub server: ServerSection,
    /// Users by name. Empty: one `admin` with a random password, demo only.
    pub users: BTreeMap<String, UserSection>,
    /// What a request may cost.
    pub limits: LimitsSection,
    /// The chunked-zlib framing of replies.
    pub codec: CodecSection,
    /// The embedded interpreter.
    pub python: PythonSection,
    /// The result cache.
    pub cache: CacheSection,
}

/// `[server]`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerSection {
    /// Address to bind; the default only accepts local connections.
    pub host: String,
    /// TCP port (0 picks a free one and prints it).
    pub port: u16,
    /// URL prefix of the routes; may hold `{name}` placeholders.
    pub path: String,
    /// Seconds `X-Timestamp` may differ from the server clock; 0 disables.
    pub timestamp_window: f64,
    /// Seconds in-flight calls get to finish on SIGINT/SIGTERM.
    pub shutdown_grace: u64,
    /// HTTP worker threads (0 = one per core).
    pub workers: usize,
    /// `[server.tls]`: serve HTTPS and WSS with this certificate and key.
    pub tls: Option<crate::tls::TlsSection>,
    /// Reverse proxies (addresses or networks) whose `X-Forwarded-For`
    /// names the client, for logs and the login throttle; empty: the
    /// header is ignored.
    pub trusted_proxies: Vec<String>,
}

impl Default for ServerSection {
    fn default() -> Self {
        ServerSection {
            host: "127.0.0.1".into(),
            port: 8080,
            path: "/api/v1".into(),
            timestamp_window: 30.0,
            shutdown_grace: 30,
            workers: 0,
            tls: None,
            trusted_proxies: Vec::new(),
        }
    }
}

/// `[users.NAME]`: exactly one of `password` and `password_hash`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UserSection {
    /// Plain-text password (works; the server warns at start-up).
    pub password: Option<String>,
    /// argon2id PHC hash from `ksrpc-server hash-password`.
    pub password_hash: Option<String>,
    /// Ordered `allow PATTERN` / `deny PATTERN` rules; no match denies.
    pub rules: Vec<String>,
}

/// `[limits]`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsSection {
    /// Most request bytes on the wire.
    pub max_body_bytes: u64,
    /// Most bytes a request may decode to.
    pub max_decoded_bytes: u64,
    /// Largest pickled reply; bigger results become a 500 reply.
    pub max_reply_bytes: u64,
    /// Seconds a call may run.
    pub call_timeout: f64,
    /// Calls one user may have in flight (queued or running).
    pub max_calls_per_user: usize,
    /// Calls of one user running on a Python thread at once; 0 = half of
    /// `python.threads`. Calls stuck past their timeout keep counting.
    pub max_running_per_user: usize,
    /// Bytes of requests being read and replies being sent, all users
    /// together; past it new requests get 503.
    pub max_inflight_bytes: u64,
    /// The same for one user.
    pub max_inflight_bytes_per_user: u64,
    /// Seconds a request body may send nothing before it is answered 408.
    pub body_idle_timeout: f64,
    /// Seconds a client may leave a reply piece untaken (it stopped
    /// reading) before it is dropped.
    pub send_timeout: f64,
    /// Seconds an idle generator handle lives.
    pub handle_ttl: f64,
    /// Generator handles per user.
    pub handle_cap: usize,
}

impl Default for LimitsSection {
    fn default() -> Self {
        let py = PythonConfig::default();
        let lim = Limits::default();
        LimitsSection {
            max_body_bytes: lim.max_encoded,
            max_decoded_bytes: lim.max_decoded,
            max_reply_bytes: py.max_reply_bytes,
            call_timeout: py.call_timeout,
            max_calls_per_user: py.max_calls_per_user,
            max_running_per_user: 0,
            max_inflight_bytes: 4 << 30,
            max_inflight_bytes_per_user: 1 << 30,
            body_idle_timeout: 60.0,
            send_timeout: 300.0,
            handle_ttl: py.handle_ttl,
            handle_cap: py.handle_cap,
        }
    }
}

/// `[codec]`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CodecSection {
    /// Payload bytes per slice.
    pub slice_size: usize,
    /// `0`..`9`, or `"auto"` (stored for incompressible slices, else 6).
    pub level: LevelSetting,
}

impl Default for CodecSection {
    fn default() -> Self {
        CodecSection { slice_size: DEFAULT_SLICE_SIZE, level: LevelSetting::Name("auto".into()) }
    }
}

/// A level as TOML allows writing it: `6` or `"auto"`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(untagged)]
pub enum LevelSetting {
    /// `level = 6`
    Number(u32),
    /// `level = "auto"` (or `"6"`)
    Name(String),
}

impl LevelSetting {
    fn parse(&self) -> Result<Level> {
        Ok(match self {
            LevelSetting::Number(n) => n.to_string().parse()?,
            LevelSetting::Name(s) => s.parse()?,
        })
    }
}

/// `[python]`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PythonSection {
    /// Virtualenv whose site-packages are added (default `$VIRTUAL_ENV`).
    pub venv: Option<PathBuf>,
    /// Extra `sys.path` entries.
    pub path: Vec<PathBuf>,
    /// Python threads for synchronous calls.
    pub threads: usize,
    /// Extra `module:name` globals the request unpickler accepts.
    pub unpickle_allow: Vec<String>,
    /// Accept dill code (lambdas) from users allowed `builtins`.
    pub allow_code: bool,
    /// Patterns of modules whose calls all share one dedicated thread.
    pub serial_modules: Vec<String>,
    /// Patterns of packages whose calls run in parallel (every other
    /// third-party package runs one call at a time).
    pub parallel_modules: Vec<String>,
}

impl Default for PythonSection {
    fn default() -> Self {
        let py = PythonConfig::default();
        PythonSection {
            venv: None,
            path: Vec::new(),
            threads: py.threads,
            unpickle_allow: Vec::new(),
            allow_code: false,
            serial_modules: Vec::new(),
            parallel_modules: Vec::new(),
        }
    }
}

/// `[cache]`: results of the calls `ttl` names, kept as encoded replies.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheSection {
    /// Off by default: caching serves a stored answer instead of calling.
    pub enabled: bool,
    /// Directory of the disk tier (survives restarts); none: memory only.
    pub path: Option<PathBuf>,
    /// Bound of the memory tier (least recently used evicted).
    pub max_memory_bytes: u64,
    /// Bound of the disk tier (least recently used evicted).
    pub max_disk_bytes: u64,
    /// `PATTERN SECONDS`, first match on the dotted chain wins; no match is
    /// not cached.
    pub ttl: Vec<String>,
}

impl Default for CacheSection {
    fn default() -> Self {
        CacheSection {
            enabled: false,
            path: None,
            max_memory_bytes: 1 << 30,
            max_disk_bytes: 10 << 30,
            ttl: Vec::new(),
        }
    }
}

/// Command-line values that override everything else.
#[derive(Debug, Default, Serialize)]
pub struct Overrides {
    /// `--host`
    pub host: Option<String>,
    /// `--port`
    pub port: Option<u16>,
    /// `--path`
    pub path: Option<String>,
}

impl Config {
    /// Loads the layers in order. `file` comes from `--config` or `KSRPC_CONFIG`.
    pub fn load(file: Option<&Path>, overrides: &Overrides) -> Result<Config> {
        Config::load_layers(file, None, overrides)
    }

    /// Loads the layers in order, with `values` (a JSON object shaped like
    /// the file: `ksrpc_rs.serve(config={...})`) merged over the file.
    pub fn load_layers(file: Option<&Path>, values: Option<&str>, overrides: &Overrides) -> Result<Config> {
        let mut fig = Figment::from(Serialized::defaults(Config::default()));
        if let Some(file) = file {
            if !file.exists() {
                bail!("config file {} does not exist", file.display());
            }
            fig = fig.merge(Toml::file_exact(file));
        }
        if let Some(values) = values {
            let values: serde_json::Value = serde_json::from_str(values).context("config values are not JSON")?;
            if !values.is_object() {
                bail!("the config values must be a mapping of sections");
            }
            fig = fig.merge(Serialized::defaults(values));
        }
        // Only section keys (`KSRPC_SECTION__KEY`): other KSRPC_* variables
        // (KSRPC_CONFIG, the CLI's KSRPC_CLIENT_*) are not config keys.
        fig = fig.merge(Env::prefixed("KSRPC_").filter(|k| k.as_str().contains("__")).split("__"));
        let mut server = serde_json::Map::new();
        if let Some(h) = &overrides.host {
            server.insert("host".into(), h.clone().into());
        }
        if let Some(p) = overrides.port {
            server.insert("port".into(), p.into());
        }
        if let Some(p) = &overrides.path {
            server.insert("path".into(), p.clone().into());
        }
        if !server.is_empty() {
            fig = fig.merge(Serialized::default("server", server));
        }
        let mut config: Config = fig.extract().context("invalid configuration")?;
        config.server.path = server_path(&config.server.path)?;
        config.validate()?;
        Ok(config)
    }

    /// Checks what serde cannot (`server.path` is checked and trimmed by
    /// [`server_path`] before this).
    fn validate(&self) -> Result<()> {
        let seconds = [
            ("server.timestamp_window", self.server.timestamp_window, true),
            ("limits.call_timeout", self.limits.call_timeout, false),
            ("limits.handle_ttl", self.limits.handle_ttl, false),
            ("limits.body_idle_timeout", self.limits.body_idle_timeout, false),
            ("limits.send_timeout", self.limits.send_timeout, false),
        ];
        for (key, value, zero_ok) in seconds {
            if !value.is_finite() || value < 0.0 || (value == 0.0 && !zero_ok) {
                let want = if zero_ok { "a finite number >= 0" } else { "a finite number > 0" };
                bail!("{key} must be {want} of seconds (got {value})");
            }
        }
        if let Some(tls) = &self.server.tls {
            // Read now, so a bad file stops start-up before anything else runs.
            tls.server_config()?;
        }
        self.codec.level.parse()?;
        self.trusted_proxies()?;
        ksrpc_cache::TtlRules::parse(&self.cache.ttl).context("cache.ttl")?;
        if self.cache.enabled && self.cache.ttl.is_empty() {
            tracing::warn!("cache.enabled is set but cache.ttl names no call: nothing will be cached");
        }
        if self.codec.slice_size == 0 || self.codec.slice_size > DEFAULT_MAX_ENCODED_SLICE / 2 {
            bail!("codec.slice_size must be between 1 and {}", DEFAULT_MAX_ENCODED_SLICE / 2);
        }
        for (name, u) in &self.users {
            match (&u.password, &u.password_hash) {
                (Some(_), Some(_)) => bail!("users.{name}: set password or password_hash, not both"),
                (None, None) => bail!("users.{name}: needs password or password_hash"),
                _ => {}
            }
            ksrpc_core::RuleSet::parse(&u.rules).with_context(|| format!("users.{name}.rules"))?;
        }
        Ok(())
    }

    /// The codec replies are encoded with.
    pub fn codec(&self) -> ChunkedZlib {
        ChunkedZlib {
            slice_size: self.codec.slice_size,
            level: self.codec.level.parse().expect("validated"),
            max_encoded_slice: DEFAULT_MAX_ENCODED_SLICE,
        }
    }

    /// The result cache, when enabled: opens the disk tier (reading what a
    /// previous run left there).
    pub fn cache(&self) -> Result<Option<std::sync::Arc<ksrpc_cache::ResultCache>>> {
        if !self.cache.enabled {
            return Ok(None);
        }
        let settings = self.cache_settings()?;
        let dir = settings.path.clone();
        let cache = ksrpc_cache::ResultCache::open(settings)
            .with_context(|| format!("opening the result cache at {:?}", dir.unwrap_or_default()))?;
        let s = cache.stats();
        tracing::info!(entries_on_disk = s.disk.0, bytes_on_disk = s.disk.1, "result cache enabled");
        Ok(Some(cache))
    }

    /// What the result cache is opened with.
    pub fn cache_settings(&self) -> Result<ksrpc_cache::CacheSettings> {
        Ok(ksrpc_cache::CacheSettings {
            path: self.cache.path.clone(),
            max_memory_bytes: self.cache.max_memory_bytes,
            max_disk_bytes: self.cache.max_disk_bytes,
            max_entry_bytes: self.limits.max_reply_bytes,
            ttl: ksrpc_cache::TtlRules::parse(&self.cache.ttl).context("cache.ttl")?,
            // What a call may do beyond its user's rules: entries made under
            // other settings are never served.
            policy: format!("allow_code={} unpickle_allow={:?}", self.python.allow_code, self.python.unpickle_allow)
                .into_bytes(),
        })
    }

    /// The memory budget of bytes in flight.
    pub fn budget(&self) -> std::sync::Arc<ksrpc_core::MemoryBudget> {
        ksrpc_core::MemoryBudget::new(self.limits.max_inflight_bytes, self.limits.max_inflight_bytes_per_user)
    }

    /// Limits on one request.
    pub fn limits(&self) -> Limits {
        Limits { max_encoded: self.limits.max_body_bytes, max_decoded: self.limits.max_decoded_bytes }
    }

    /// `server.trusted_proxies`, parsed.
    pub fn trusted_proxies(&self) -> Result<Vec<ksrpc_transport::forwarded::Cidr>> {
        self.server
            .trusted_proxies
            .iter()
            .map(|p| p.parse().with_context(|| "server.trusted_proxies".to_owned()))
            .collect()
    }

    /// The executor's settings.
    pub fn python(&self) -> PythonConfig {
        PythonConfig {
            venv: self.python.venv.clone(),
            path: self.python.path.clone(),
            threads: self.python.threads.max(1),
            max_calls_per_user: self.limits.max_calls_per_user.max(1),
            max_running_per_user: (self.limits.max_running_per_user > 0).then_some(self.limits.max_running_per_user),
            call_timeout: self.limits.call_timeout,
            handle_ttl: self.limits.handle_ttl,
            handle_cap: self.limits.handle_cap.max(1),
            unpickle_allow: self.python.unpickle_allow.clone(),
            allow_code: self.python.allow_code,
            serial_modules: self.python.serial_modules.clone(),
            parallel_modules: self.python.parallel_modules.clone(),
            max_reply_bytes: self.limits.max_reply_bytes,
        }
    }
}

/// Characters the 0.8.1 client's `str(url).rstrip("/chunk")` (and `"/ws"`,
/// `"/generate_204"`) strips from the end of a cached base URL.
/// `server.path` as the server routes it: trailing slashes trimmed as the
/// original does (`"/api/v1/"` serves `/api/v1`; `"/"` serves the routes at
/// the root), then checked so a bad path is a config error naming the key,
/// never a panic in a worker. A `{name}` placeholder (letters, digits, `_`)
/// matches any one path segment: `"/api/v1/{time}"` serves the 0.8.1
/// README's "dynamic URL" `http://host:8080/api/v1/{time}` as the client
/// sends it, and `/api/v1/<anything>` as well.
pub fn server_path(path: &str) -> Result<String> {
    let trimmed = path.trim_end_matches('/');
    let bad = |why: &str| anyhow!("server.path {path:?} {why}");
    if !path.starts_with('/') {
        return Err(bad("must start with '/'"));
    }
    let mut names = Vec::new();
    let mut chars = trimmed.chars();
    while let Some(c) = chars.next() {
        match c {
            '{' => {
                let (mut name, mut closed) = (String::new(), false);
                for c in chars.by_ref() {
                    if c == '}' {
                        closed = true;
                        break;
                    }
                    name.push(c);
                }
                if !closed {
                    return Err(bad("has a '{' without its '}' (a placeholder is written {name})"));
                }
                if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                    return Err(bad("has a placeholder whose name is not letters, digits or '_' ({name})"));
                }
                if names.contains(&name) {
                    return Err(bad("names a placeholder twice"));
                }
                names.push(name);
            }
            '}' => return Err(bad("has a '}' without its '{'")),
            '*' | '?' | '#' => return Err(bad("may not hold '*', '?' or '#'")),
            c if c.is_whitespace() || c.is_control() => return Err(bad("may not hold spaces or control characters")),
            _ => {}
        }
    }
    if trimmed.contains("//") {
        return Err(bad("has an empty segment ('//')"));
    }
    Ok(trimmed.to_owned())
}

const RSTRIP_SETS: [&str; 3] = ["/chunk", "/ws", "/generate_204"];

/// Whether the client's URL caching would cut characters off `path`.
pub fn path_cut_by_client(path: &str) -> Option<&'static str> {
    let last = path.chars().last()?;
    RSTRIP_SETS.into_iter().find(|set| set.contains(last))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_issue_example_config_loads() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        let hash = ksrpc_core::auth::hash_password("pw");
        std::fs::write(
            &file,
            format!(
                r#"
[server]
host = "127.0.0.1"
port = 8080
path = "/api/v1"
timestamp_window = 600.0      # seconds; 0 turns the check off

[users.admin]
password = "password123"      # plain text works, with a warning at start-up
rules = ["allow *"]

[users.limited]
password_hash = "{hash}"
rules = ["allow ksrpc.server.demo", "allow bench_mod", "deny os", "deny builtins", "deny *"]
"#
            ),
        )
        .unwrap();
        let c = Config::load(Some(&file), &Overrides::default()).unwrap();
        assert_eq!(c.server.timestamp_window, 600.0);
        assert_eq!(c.users.len(), 2);
        assert_eq!(c.codec().level, Level::Auto);
    }

    #[test]
    fn unknown_keys_are_errors_naming_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(&file, "[server]\nprot = 1\n").unwrap();
        let err = format!("{:#}", Config::load(Some(&file), &Overrides::default()).unwrap_err());
        assert!(err.contains("prot"), "{err}");
    }

    #[test]
    fn flags_override_the_file_and_levels_parse() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(&file, "[server]\nport = 1\n[codec]\nlevel = 3\n").unwrap();
        let c = Config::load(Some(&file), &Overrides { port: Some(2), ..Overrides::default() }).unwrap();
        assert_eq!(c.server.port, 2);
        assert_eq!(c.codec().level, Level::Fixed(3));
        std::fs::write(&file, "[codec]\nlevel = 12\n").unwrap();
        assert!(Config::load(Some(&file), &Overrides::default()).is_err());
    }

    #[test]
    fn users_need_exactly_one_password_form_and_valid_rules() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        for bad in [
            "[users.a]\nrules = []\n",
            "[users.a]\npassword = \"x\"\npassword_hash = \"y\"\n",
            "[users.a]\npassword = \"x\"\nrules = [\"permit *\"]\n",
        ] {
            std::fs::write(&file, bad).unwrap();
            assert!(Config::load(Some(&file), &Overrides::default()).is_err(), "{bad}");
        }
    }

    #[test]
    fn non_finite_or_negative_durations_are_errors_naming_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        for (bad, key) in [
            ("[limits]\ncall_timeout = nan\n", "limits.call_timeout"),
            ("[limits]\ncall_timeout = inf\n", "limits.call_timeout"),
            ("[limits]\ncall_timeout = 0.0\n", "limits.call_timeout"),
            ("[limits]\nhandle_ttl = -1.0\n", "limits.handle_ttl"),
            ("[server]\ntimestamp_window = -inf\n", "server.timestamp_window"),
            ("[server]\ntimestamp_window = nan\n", "server.timestamp_window"),
        ] {
            std::fs::write(&file, bad).unwrap();
            let err = format!("{:#}", Config::load(Some(&file), &Overrides::default()).unwrap_err());
            assert!(err.contains(key), "{bad}: {err}");
        }
        std::fs::write(&file, "[server]\ntimestamp_window = 0.0\n[limits]\nmax_running_per_user = 3\n").unwrap();
        let c = Config::load(Some(&file), &Overrides::default()).unwrap();
        assert_eq!((c.server.timestamp_window, c.python().running_cap()), (0.0, 3));
        // 0 = half the pool
        assert_eq!(Config::load(None, &Overrides::default()).unwrap().python().running_cap(), 16);
    }

    #[test]
    fn values_merge_over_the_file_and_unknown_keys_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(&file, "[server]\nport = 1\npath = \"/x\"\n").unwrap();
        let c = Config::load_layers(Some(&file), Some(r#"{"server": {"port": 3}}"#), &Overrides::default()).unwrap();
        assert_eq!((c.server.port, c.server.path.as_str()), (3, "/x"));
        let err = Config::load_layers(None, Some(r#"{"server": {"prot": 3}}"#), &Overrides::default()).unwrap_err();
        assert!(format!("{err:#}").contains("prot"), "{err:#}");
        assert!(Config::load_layers(None, Some("[1]"), &Overrides::default()).is_err());
        // flags still win over the values
        let c = Config::load_layers(
            None,
            Some(r#"{"server": {"port": 3}}"#),
            &Overrides { port: Some(4), ..Overrides::default() },
        )
        .unwrap();
        assert_eq!(c.server.port, 4);
    }

    #[test]
    fn paths_are_trimmed_like_the_original_and_bad_ones_name_the_key() {
        for (given, routed) in [
            ("/api/v1", "/api/v1"),
            ("/api/v1/", "/api/v1"),
            ("/api/v1//", "/api/v1"),
            ("/", ""),
            ("/api/v1/{time}", "/api/v1/{time}"),
        ] {
            assert_eq!(server_path(given).unwrap(), routed, "{given}");
        }
        for bad in [
            "api/v1",
            "/api/{time",
            "/api/time}",
            "/api/{}",
            "/api/{a b}",
            "/api/{t:\\d+}",
            "/{a}/{a}",
            "/a*",
            "/a b",
            "/a//b",
            "",
        ] {
            let err = server_path(bad).unwrap_err().to_string();
            assert!(err.starts_with("server.path"), "{bad}: {err}");
        }
        // Through the loader, from a flag: refused before anything listens.
        let err =
            Config::load(None, &Overrides { path: Some("/api/{time".into()), ..Overrides::default() }).unwrap_err();
        assert!(format!("{err:#}").contains("server.path"), "{err:#}");
        let c = Config::load(None, &Overrides { path: Some("/api/v1/".into()), ..Overrides::default() }).unwrap();
        assert_eq!(c.server.path, "/api/v1");
    }

    #[test]
    fn prefix_cut_detection() {
        assert_eq!(path_cut_by_client("/api/v1"), None);
        assert_eq!(path_cut_by_client("/api/v1/{time}"), None);
        assert!(path_cut_by_client("/rpc").is_some());
        assert!(path_cut_by_client("/api/v2").is_some());
    }
}
