//! ksrpc-cache: the result cache (0.8.1's `CACHE_*`, done right).
//!
//! What is cached is the *encoded reply* (the compat protocol's chunked
//! HTTP body, or the native protocol's zstd frame of the outcome), so a hit
//! is served without Python and without re-encoding. Entries are keyed by a
//! SHA-256 of the canonical request (the request pickle, or the native
//! chain), the server's policy and the user's **rule set**: a user is served
//! only what a user with exactly their rules computed, so a cached answer
//! never reaches someone whose rules would have refused the call, and no
//! credential is part of a key.
//!
//! Which calls are cached is decided by [`TtlRules`] on the dotted chain
//! (`module.attr.attr`): first matching pattern wins, no match is not
//! cached. Concurrent misses of one key run the call once ([`Begin::Miss`]
//! with a [`Fill`]: the others wait for it). Memory and disk are both
//! bounded, least recently used evicted; the disk tier ([`disk`]) survives a
//! restart.

pub mod disk;
mod lru;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use ksrpc_core::rules::{Pattern, RuleSet, Verdict};
use sha2::{Digest, Sha256};
use tokio::sync::watch;

use crate::lru::Lru;

/// Which protocol an entry's bytes belong to (part of the key).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Kind {
    /// The 0.8.1 protocol: the whole chunked body of the HTTP form.
    Compat = 1,
    /// The native protocol: one zstd frame of the encoded `Outcome`.
    Native = 2,
}

impl Kind {
    fn from_byte(b: u8) -> Option<Kind> {
        match b {
            1 => Some(Kind::Compat),
            2 => Some(Kind::Native),
            _ => None,
        }
    }
}

/// A cache key: SHA-256 over the key's parts (see [`ResultCache::key`]).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct CacheKey(pub [u8; 32]);

impl CacheKey {
    /// Lower-case hex, the entry's file name on disk.
    pub fn hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Parses 64 lower-case hex digits.
    pub fn from_hex(s: &str) -> Option<CacheKey> {
        if s.len() != 64 || !s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, o) in out.iter_mut().enumerate() {
            *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
        }
        Some(CacheKey(out))
    }
}

impl std::fmt::Debug for CacheKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CacheKey({})", &self.hex()[..16])
    }
}

/// One cached reply.
#[derive(Clone, Debug)]
pub struct Entry {
    /// Which protocol the bytes are for.
    pub kind: Kind,
    /// The encoded reply (see [`Kind`]).
    pub body: Bytes,
    /// The chain as the call's log line showed it (argument counts only).
    pub summary: String,
    /// When the entry stops being served.
    pub expires: SystemTime,
}

impl Entry {
    /// What the entry is charged in memory.
    fn weight(&self) -> u64 {
        self.body.len() as u64 + self.summary.len() as u64 + 128
    }
}

/// Error for a `ttl` line that is not `PATTERN SECONDS`.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid cache ttl {0:?}: expected \"PATTERN SECONDS\" with SECONDS a whole number > 0")]
pub struct TtlParseError(pub String);

/// The ordered `cache.ttl` list: `PATTERN SECONDS`, matched (fnmatch, as
/// the rules) against the dotted chain; the first match decides; no match
/// means the call is not cached.
#[derive(Clone, Debug, Default)]
pub struct TtlRules(Vec<(Pattern, Duration)>);

impl TtlRules {
    /// Parses the configured lines.
    pub fn parse<S: AsRef<str>>(lines: &[S]) -> Result<TtlRules, TtlParseError> {
        let mut out = Vec::with_capacity(lines.len());
        for line in lines {
            let line = line.as_ref().trim();
            let bad = || TtlParseError(line.to_owned());
            let (pattern, seconds) = line.rsplit_once(char::is_whitespace).ok_or_else(bad)?;
            let seconds: u64 = seconds.parse().map_err(|_| bad())?;
            let pattern = pattern.trim();
            if seconds == 0 || pattern.is_empty() {
                return Err(bad());
            }
            out.push((Pattern::new(pattern), Duration::from_secs(seconds)));
        }
        Ok(TtlRules(out))
    }

    /// How long a result of `chain` (`module.attr.attr`) is kept, if at all.
    pub fn ttl_for(&self, chain: &str) -> Option<Duration> {
        self.0.iter().find(|(p, _)| p.matches(chain)).map(|(_, d)| *d)
    }

    /// Whether no call can be cached.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// What the cache is told at start-up.
#[derive(Clone, Debug)]
pub struct CacheSettings {
    /// The disk tier's directory (created if missing); `None`: memory only.
    pub path: Option<PathBuf>,
    /// Bound of the memory tier.
    pub max_memory_bytes: u64,
    /// Bound of the disk tier.
    pub max_disk_bytes: u64,
    /// An entry bigger than this is never stored (the replies' own limit).
    pub max_entry_bytes: u64,
    /// Which calls are cached, and for how long.
    pub ttl: TtlRules,
    /// Server settings that change what a call may do (e.g. whether code
    /// may be sent): part of every key, so entries made under other
    /// settings are never served.
    pub policy: Vec<u8>,
}

/// Counters since start.
#[derive(Debug, Default)]
struct Counters {
    hits: AtomicU64,
    misses: AtomicU64,
    stores: AtomicU64,
    evictions: AtomicU64,
    dropped_files: AtomicU64,
}

/// The cache's numbers, for logs and `cache stats`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stats {
    /// Entries and bytes in memory.
    pub memory: (usize, u64),
    /// Entries and bytes on disk.
    pub disk: (usize, u64),
    /// Hits served since start.
    pub hits: u64,
    /// Lookups that found nothing and ran the call.
    pub misses: u64,
    /// Entries stored.
    pub stores: u64,
    /// Entries evicted by a bound or expiry.
    pub evictions: u64,
    /// Disk files dropped as corrupt or foreign.
    pub dropped_files: u64,
}

/// Keys known not to be cacheable (their chain matches no ttl pattern):
/// they skip single-flight. At most this many are remembered.
const MAX_NEGATIVE: u64 = 65_536;

#[derive(Debug)]
struct State {
    memory: Lru<CacheKey, Arc<Entry>>,
    /// Entry files by key: size, and expiry.
    disk: Lru<CacheKey, SystemTime>,
    negative: Lru<CacheKey, ()>,
    /// Calls computing a key now; a waiter's `changed()` ends when the
    /// leader's [`Fill`] is dropped.
    inflight: HashMap<CacheKey, watch::Receiver<()>>,
}

/// The result cache; share it as `Arc<ResultCache>`.
#[derive(Debug)]
pub struct ResultCache {
    settings: CacheSettings,
    state: Mutex<State>,
    counters: Counters,
}

/// What [`ResultCache::begin`] found.
#[derive(Debug)]
pub enum Begin {
    /// Serve this.
    Hit(Arc<Entry>),
    /// Run the call. With a [`Fill`], this call computes the key for every
    /// caller waiting on it: commit the reply or drop the fill. Without one,
    /// the call is known not to be cacheable, or another caller's
    /// computation ended without an entry (errors are not cached).
    Miss(Option<Fill>),
}

/// The right (and the duty) to store the result of one key: dropping it
/// without [`Fill::commit`] releases the callers waiting for it.
#[derive(Debug)]
pub struct Fill {
    cache: Arc<ResultCache>,
    key: CacheKey,
    _done: watch::Sender<()>,
}

impl ResultCache {
    /// A cache with `settings`; reads the disk tier's directory (creating
    /// it), drops leftovers of killed writers and files that do not read,
    /// and evicts down to the disk bound.
    pub fn open(settings: CacheSettings) -> std::io::Result<Arc<ResultCache>> {
        let mut state = State { memory: Lru::new(), disk: Lru::new(), negative: Lru::new(), inflight: HashMap::new() };
        let cache_counters = Counters::default();
        if let Some(dir) = &settings.path {
            std::fs::create_dir_all(dir)?;
            let scan = disk::scan(dir)?;
            for path in scan.stale.iter().chain(&scan.bad) {
                tracing::warn!(file = %path.display(), "result cache: dropping a file that is not a whole entry");
                let _ = std::fs::remove_file(path);
                cache_counters.dropped_files.fetch_add(1, Ordering::Relaxed);
            }
            let now = SystemTime::now();
            for found in scan.entries {
                if found.expires <= now {
                    let _ = std::fs::remove_file(disk::entry_path(dir, &found.key));
                    continue;
                }
                state.disk.insert(found.key, found.expires, found.size);
            }
            for (key, _) in state.disk.shrink_to(settings.max_disk_bytes) {
                let _ = std::fs::remove_file(disk::entry_path(dir, &key));
            }
        }
        Ok(Arc::new(ResultCache { settings, state: Mutex::new(state), counters: cache_counters }))
    }

    /// The settings it was opened with.
    pub fn settings(&self) -> &CacheSettings {
        &self.settings
    }

    /// How long a result of `chain` is kept, if it is cached at all.
    pub fn ttl_for(&self, chain: &str) -> Option<Duration> {
        self.settings.ttl.ttl_for(chain)
    }

    /// The key of a request: its kind, the server policy, the user's rule
    /// set (each rule's verdict and pattern, in order) and the canonical
    /// request bytes, each length-prefixed.
    pub fn key(&self, kind: Kind, rules: &RuleSet, request: &[u8]) -> CacheKey {
        let mut h = Sha256::new();
        let mut part = |bytes: &[u8]| {
            h.update((bytes.len() as u64).to_le_bytes());
            h.update(bytes);
        };
        part(b"ksrpc-cache/1");
        part(&self.settings.policy);
        part(&[kind as u8]);
        part(&(rules.rules().len() as u64).to_le_bytes());
        for rule in rules.rules() {
            part(&[match rule.verdict {
                Verdict::Allow => 1,
                Verdict::Deny => 2,
            }]);
            part(rule.pattern.as_str().as_bytes());
        }
        part(request);
        CacheKey(h.finalize().into())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Looks `key` up: a live entry in memory or on disk is a hit; a key
    /// another call is computing is waited for (once); otherwise this call
    /// becomes the one that computes it.
    pub async fn begin(self: &Arc<Self>, key: CacheKey) -> Begin {
        let mut waited = false;
        loop {
            let (wait, fill, from_disk) = {
                let mut s = self.lock();
                let now = SystemTime::now();
                match s.memory.get(&key).cloned() {
                    Some(e) if e.expires > now => {
                        self.counters.hits.fetch_add(1, Ordering::Relaxed);
                        return Begin::Hit(e);
                    }
                    Some(_) => {
                        s.memory.remove(&key);
                        self.counters.evictions.fetch_add(1, Ordering::Relaxed);
                    }
                    None => {}
                }
                if s.negative.get(&key).is_some() {
                    self.counters.misses.fetch_add(1, Ordering::Relaxed);
                    return Begin::Miss(None);
                }
                if let Some(rx) = s.inflight.get(&key) {
                    if waited {
                        self.counters.misses.fetch_add(1, Ordering::Relaxed);
                        return Begin::Miss(None);
                    }
                    (Some(rx.clone()), None, false)
                } else {
                    let on_disk = match s.disk.peek(&key).copied() {
                        Some(expires) if expires > now => true,
                        Some(_) => {
                            self.forget_file(&mut s, &key);
                            false
                        }
                        None => false,
                    };
                    // Checked and registered under one lock: one leader per key.
                    let (tx, rx) = watch::channel(());
                    s.inflight.insert(key, rx);
                    (None, Some(Fill { cache: self.clone(), key, _done: tx }), on_disk)
                }
            };
            if let Some(mut rx) = wait {
                let _ = rx.changed().await;
                waited = true;
                continue;
            }
            let fill = fill.expect("a caller that does not wait leads");
            if from_disk {
                if let Some(entry) = self.load(key).await {
                    self.counters.hits.fetch_add(1, Ordering::Relaxed);
                    return Begin::Hit(entry);
                }
            }
            self.counters.misses.fetch_add(1, Ordering::Relaxed);
            return Begin::Miss(Some(fill));
        }
    }

    /// Reads an entry file on the blocking pool; a good one goes to memory
    /// (when it fits), a bad one is deleted.
    async fn load(self: &Arc<Self>, key: CacheKey) -> Option<Arc<Entry>> {
        let dir = self.settings.path.clone()?;
        let read = tokio::task::spawn_blocking({
            let dir = dir.clone();
            move || disk::read(&dir, &key)
        })
        .await;
        let mut s = self.lock();
        match read {
            Ok(Ok(entry)) if entry.expires > SystemTime::now() => {
                let entry = Arc::new(entry);
                s.disk.get(&key);
                self.put_memory(&mut s, key, entry.clone());
                Some(entry)
            }
            Ok(Ok(_)) => {
                self.forget_file(&mut s, &key);
                None
            }
            Ok(Err(e)) => {
                tracing::warn!(key = %key.hex(), "result cache: dropping an entry file: {e}");
                self.counters.dropped_files.fetch_add(1, Ordering::Relaxed);
                self.forget_file(&mut s, &key);
                None
            }
            Err(_) => None,
        }
    }

    fn forget_file(&self, s: &mut State, key: &CacheKey) {
        if s.disk.remove(key).is_some() {
            self.counters.evictions.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(dir) = &self.settings.path {
            let _ = std::fs::remove_file(disk::entry_path(dir, key));
        }
    }

    fn put_memory(&self, s: &mut State, key: CacheKey, entry: Arc<Entry>) {
        let weight = entry.weight();
        if weight > self.settings.max_memory_bytes {
            return;
        }
        s.memory.insert(key, entry, weight);
        let gone = s.memory.shrink_to(self.settings.max_memory_bytes).len();
        self.counters.evictions.fetch_add(gone as u64, Ordering::Relaxed);
    }

    /// Whether an entry of `bytes` could be stored in some tier.
    pub fn fits(&self, bytes: u64) -> bool {
        let s = &self.settings;
        bytes <= s.max_entry_bytes
            && (bytes + 1024 <= s.max_memory_bytes || (s.path.is_some() && bytes + 1024 <= s.max_disk_bytes))
    }

    /// The numbers now.
    pub fn stats(&self) -> Stats {
        let s = self.lock();
        let c = &self.counters;
        Stats {
            memory: (s.memory.len(), s.memory.bytes()),
            disk: (s.disk.len(), s.disk.bytes()),
            hits: c.hits.load(Ordering::Relaxed),
            misses: c.misses.load(Ordering::Relaxed),
            stores: c.stores.load(Ordering::Relaxed),
            evictions: c.evictions.load(Ordering::Relaxed),
            dropped_files: c.dropped_files.load(Ordering::Relaxed),
        }
    }
}

impl Fill {
    /// Stores the encoded reply for `ttl`: in memory first (the callers
    /// waiting for it are then served from there), then on disk. Does file
    /// I/O when there is a disk tier: call it from a blocking thread.
    pub fn commit(self, kind: Kind, body: Bytes, summary: String, ttl: Duration) {
        let cache = self.cache.clone();
        if !cache.fits(body.len() as u64) {
            return;
        }
        let entry = Arc::new(Entry { kind, body, summary, expires: SystemTime::now() + ttl });
        cache.counters.stores.fetch_add(1, Ordering::Relaxed);
        {
            let mut s = cache.lock();
            cache.put_memory(&mut s, self.key, entry.clone());
        }
        let in_memory = cache.lock().memory.peek(&self.key).is_some();
        let key = self.key;
        if in_memory {
            drop(self); // the waiters find it in memory
        }
        let Some(dir) = &cache.settings.path else { return };
        if entry.weight() > cache.settings.max_disk_bytes {
            return;
        }
        match disk::write(dir, &key, &entry) {
            Ok(size) => {
                let mut s = cache.lock();
                s.disk.insert(key, entry.expires, size);
                let gone = s.disk.shrink_to(cache.settings.max_disk_bytes);
                cache.counters.evictions.fetch_add(gone.len() as u64, Ordering::Relaxed);
                drop(s);
                for (k, _) in gone {
                    let _ = std::fs::remove_file(disk::entry_path(dir, &k));
                }
            }
            Err(e) => tracing::warn!(key = %key.hex(), "result cache: writing an entry file: {e}"),
        }
    }

    /// The call's chain matches no ttl pattern: later calls of this key
    /// skip the wait.
    pub fn never(self) {
        let mut s = self.cache.lock();
        s.negative.insert(self.key, (), 1);
        s.negative.shrink_to(MAX_NEGATIVE);
    }
}

impl Drop for Fill {
    fn drop(&mut self) {
        self.cache.lock().inflight.remove(&self.key);
    }
}

#[cfg(test)]
mod tests;
