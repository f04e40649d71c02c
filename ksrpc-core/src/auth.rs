//! Users, passwords and the checks that run before any body is read: the
//! `X-Timestamp` window and HTTP Basic authentication.
//!
//! Passwords are argon2id PHC hashes. Plain-text passwords from a config are
//! hashed at load time and flagged so the server can warn. Verification
//! costs the same for an unknown user as for a wrong password. Because the
//! 0.8.1 client sends Basic auth on every call and argon2 costs ~30 ms, a
//! successful verification is cached under a keyed hash of `user:password`
//! for a while.
//!
//! Logins cannot be turned into a weapon against other people: repeated
//! failures for one (name, client address) only *delay* that key's later
//! failed answers ([`UserStore::penalty`]); a correct password is never
//! refused because of failures, whoever made them. Uncached verifications
//! (argon2 work) are bounded per client address and in total, so a flood of
//! random names from one client is answered `Throttled` without CPU while
//! other clients still log in.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use argon2::password_hash::{PasswordHash, PasswordHasher, SaltString};
use argon2::{Argon2, Block, Params};
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::rules::RuleSet;

/// Every way the pre-body checks refuse a request.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    /// Missing or malformed credentials, unknown user or wrong password:
    /// deliberately one variant, so a caller cannot tell them apart.
    #[error("unauthorized")]
    Unauthorized,
    /// This client address already has as many uncached verifications in
    /// progress as it may (429; retry shortly).
    #[error("too many logins in progress from this address")]
    Throttled,
    /// The server already has as many uncached verifications waiting or
    /// running as it takes (503).
    #[error("too many logins in progress")]
    Busy,
    /// A stored password hash is not a valid PHC string.
    #[error(
        "users.{0}.password_hash is not an argon2 hash ({1}); make one with `ksrpc-server hash-password` \
         (or `python -m ksrpc_rs hash-password`)"
    )]
    BadHash(String, String),
}

/// How a user's password was configured.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PasswordSource {
    /// An argon2 PHC hash (`$argon2id$...`).
    Hash,
    /// Plain text in the config (hashed at load time; the server warns).
    PlainText,
}

/// One user: a name, their rules, and a password hash.
#[derive(Debug)]
pub struct User {
    /// The user name.
    pub name: String,
    /// What the user may reach.
    pub rules: RuleSet,
    /// How the password was given.
    pub source: PasswordSource,
    phc: String,
}

/// The argon2id hasher with the crate's recommended parameters
/// (19 MiB, 2 passes, 1 lane).
fn argon2() -> Argon2<'static> {
    Argon2::default()
}

/// Hashes `password` into an argon2id PHC string with a random salt.
pub fn hash_password(password: &str) -> String {
    let salt = SaltString::generate(&mut argon2::password_hash::rand_core::OsRng);
    argon2().hash_password(password.as_bytes(), &salt).expect("argon2 with default parameters cannot fail").to_string()
}

/// Tunables of [`UserStore`].
#[derive(Clone, Copy, Debug)]
pub struct AuthTuning {
    /// How long a successful verification is remembered.
    pub cache_ttl: Duration,
    /// How many argon2 verifications may run at once.
    pub max_concurrent_hashes: usize,
    /// Failures per (name, client address) within `failure_window` before
    /// that key's further failed answers are delayed.
    pub max_failures: u32,
    /// The window for `max_failures`.
    pub failure_window: Duration,
    /// How long a failed answer over `max_failures` is held back (doubling
    /// with every further failure, up to 32 times this).
    pub failure_delay: Duration,
    /// Uncached verifications one client address may have in progress.
    pub max_misses_per_peer: usize,
    /// Uncached verifications the server takes at once (running or waiting
    /// for an argon2 slot).
    pub max_misses: usize,
}

impl Default for AuthTuning {
    fn default() -> Self {
        AuthTuning {
            cache_ttl: Duration::from_secs(300),
            max_concurrent_hashes: std::thread::available_parallelism().map_or(2, |n| n.get()),
            max_failures: 20,
            failure_window: Duration::from_secs(60),
            failure_delay: Duration::from_secs(1),
            max_misses_per_peer: 4,
            max_misses: 64,
        }
    }
}

/// Where a login attempt comes from: the client's IP address, an IPv6
/// address reduced to its /64 (one host usually holds a whole /64), or
/// unknown. Behind a reverse proxy every client is the proxy's address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Peer(Option<IpAddr>);

impl Peer {
    /// The peer of a connection from `addr` (`None`: unknown).
    pub fn of(addr: Option<IpAddr>) -> Peer {
        Peer(addr.map(|a| match a {
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => IpAddr::V4(v4),
                None => IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into()),
            },
            v4 => v4,
        }))
    }

    /// An attempt whose origin is not known (all such share one budget).
    pub const UNKNOWN: Peer = Peer(None);
}

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(a) => write!(f, "{a}"),
            None => f.write_str("unknown"),
        }
    }
}

/// Uncached verifications in progress, per peer and in total.
#[derive(Debug, Default)]
struct Misses {
    per_peer: HashMap<Peer, usize>,
    total: usize,
}

/// A verification admitted by [`UserStore::admit`]; gives its place back
/// when dropped.
struct Admission<'a> {
    store: &'a UserStore,
    peer: Peer,
}

impl Drop for Admission<'_> {
    fn drop(&mut self) {
        let mut m = self.store.misses.lock().expect("auth misses poisoned");
        m.total -= 1;
        if let Some(n) = m.per_peer.get_mut(&self.peer) {
            *n -= 1;
            if *n == 0 {
                m.per_peer.remove(&self.peer);
            }
        }
    }
}

/// Successful verifications: keyed hash of `user:password` -> (user, expiry).
type VerifiedCache = Mutex<HashMap<[u8; 32], (Arc<User>, Instant)>>;

/// The configured users and the verification machinery.
pub struct UserStore {
    users: HashMap<String, Arc<User>>,
    /// Verified against for unknown users, so they cost the same.
    dummy_phc: String,
    cache_key: [u8; 32],
    cache: VerifiedCache,
    /// Failures per (name, peer): count and when the window started.
    failures: Mutex<HashMap<(String, Peer), (u32, Instant)>>,
    misses: Mutex<Misses>,
    /// Argon2 working memory, one buffer per concurrent verification,
    /// allocated once: argon2 needs 19 MiB per run, and allocating it on
    /// whatever thread verifies left every such thread's malloc arena
    /// holding ~58 MiB (measured: 1.2 GiB RSS after 64 clients logged in).
    slots: (Mutex<Vec<Vec<Block>>>, Condvar),
    tuning: AuthTuning,
}

impl std::fmt::Debug for UserStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UserStore").field("users", &self.users.keys().collect::<Vec<_>>()).finish()
    }
}

/// Most cached verifications kept; the cache is cleared when full.
const CACHE_CAP: usize = 4096;

impl UserStore {
    /// An empty store.
    pub fn new(tuning: AuthTuning) -> Self {
        let mut cache_key = [0u8; 32];
        rand::fill(&mut cache_key);
        UserStore {
            users: HashMap::new(),
            dummy_phc: hash_password("ksrpc dummy password for unknown users"),
            cache_key,
            cache: Mutex::new(HashMap::new()),
            failures: Mutex::new(HashMap::new()),
            misses: Mutex::new(Misses::default()),
            slots: (Mutex::new((0..tuning.max_concurrent_hashes.max(1)).map(|_| Vec::new()).collect()), Condvar::new()),
            tuning,
        }
    }

    /// Adds a user with an argon2 PHC hash.
    pub fn add_hashed(&mut self, name: &str, phc: &str, rules: RuleSet) -> Result<(), AuthError> {
        PasswordHash::new(phc).map_err(|e| AuthError::BadHash(name.to_owned(), e.to_string()))?;
        self.insert(name, phc.to_owned(), rules, PasswordSource::Hash);
        Ok(())
    }

    /// Adds a user with a plain-text password (hashed now, flagged).
    pub fn add_plain(&mut self, name: &str, password: &str, rules: RuleSet) {
        self.insert(name, hash_password(password), rules, PasswordSource::PlainText);
    }

    fn insert(&mut self, name: &str, phc: String, rules: RuleSet, source: PasswordSource) {
        let user = User { name: name.to_owned(), rules, source, phc };
        self.users.insert(name.to_owned(), Arc::new(user));
    }

    /// The users, for start-up warnings.
    pub fn users(&self) -> impl Iterator<Item = &Arc<User>> {
        self.users.values()
    }

    /// [`verify_from`](Self::verify_from) an unknown peer.
    pub fn verify(&self, user: &str, password: &str) -> Result<Arc<User>, AuthError> {
        self.verify_from(user, password, Peer::UNKNOWN)
    }

    /// Checks `user:password` from `peer`. CPU-bound (argon2) on a cache
    /// miss: call it from a blocking thread, not an async worker. A miss
    /// first needs a place among the bounded verifications in progress
    /// ([`AuthError::Throttled`] per peer, [`AuthError::Busy`] in total);
    /// a failure is recorded against (user, peer), see [`penalty`](Self::penalty).
    pub fn verify_from(&self, user: &str, password: &str, peer: Peer) -> Result<Arc<User>, AuthError> {
        let key = self.cache_key(user, password);
        if let Some(found) = self.cached(&key) {
            return Ok(found);
        }
        let _admitted = self.admit(peer)?;
        let known = self.users.get(user);
        let phc = known.map_or(self.dummy_phc.as_str(), |u| u.phc.as_str());
        // Many clients logging in at once with the same credentials: the
        // first verification fills the cache for the others waiting here.
        let ok = match self.with_slot(|memory| match self.cached(&key) {
            Some(found) => Err(found),
            None => Ok(verify_phc(phc, password, memory)),
        }) {
            Err(found) => return Ok(found),
            Ok(ok) => ok,
        };
        match known {
            Some(u) if ok => {
                let mut cache = self.cache.lock().expect("auth cache poisoned");
                if cache.len() >= CACHE_CAP {
                    cache.clear();
                }
                cache.insert(key, (u.clone(), Instant::now() + self.tuning.cache_ttl));
                drop(cache);
                self.failures.lock().expect("auth failures poisoned").remove(&(user.to_owned(), peer));
                Ok(u.clone())
            }
            _ => {
                self.record_failure(user, peer);
                Err(AuthError::Unauthorized)
            }
        }
    }

    /// The user if `user:password` verified recently (no argon2 work): the
    /// fast path an async caller may take before falling back to
    /// [`UserStore::verify`] on a blocking thread.
    pub fn verify_cached(&self, user: &str, password: &str) -> Option<Arc<User>> {
        self.cached(&self.cache_key(user, password))
    }

    fn cache_key(&self, user: &str, password: &str) -> [u8; 32] {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.cache_key).expect("any key length works");
        mac.update(user.as_bytes());
        mac.update(&[0]);
        mac.update(password.as_bytes());
        mac.finalize().into_bytes().into()
    }

    fn cached(&self, key: &[u8; 32]) -> Option<Arc<User>> {
        let mut cache = self.cache.lock().expect("auth cache poisoned");
        match cache.get(key) {
            Some((u, until)) if *until > Instant::now() => Some(u.clone()),
            Some(_) => {
                cache.remove(key);
                None
            }
            None => None,
        }
    }

    /// How long to hold back the answer to a failed attempt for `user`
    /// from `peer`: zero up to `max_failures` failures in the window, then
    /// `failure_delay`, doubling per further failure up to 32 times it. A
    /// delay, never a refusal: the right password still gets in at once.
    /// The caller waits (asynchronously) before answering 401.
    pub fn penalty(&self, user: &str, peer: Peer) -> Duration {
        let failures = self.failures.lock().expect("auth failures poisoned");
        match failures.get(&(user.to_owned(), peer)) {
            Some((n, since)) if *n > self.tuning.max_failures && since.elapsed() < self.tuning.failure_window => {
                self.tuning.failure_delay * (1u32 << (n - self.tuning.max_failures - 1).min(5))
            }
            _ => Duration::ZERO,
        }
    }

    /// A place for one uncached verification from `peer`, or why not.
    fn admit(&self, peer: Peer) -> Result<Admission<'_>, AuthError> {
        let mut m = self.misses.lock().expect("auth misses poisoned");
        if m.total >= self.tuning.max_misses.max(1) {
            return Err(AuthError::Busy);
        }
        let n = m.per_peer.entry(peer).or_insert(0);
        if *n >= self.tuning.max_misses_per_peer.max(1) {
            return Err(AuthError::Throttled);
        }
        *n += 1;
        m.total += 1;
        Ok(Admission { store: self, peer })
    }

    fn record_failure(&self, user: &str, peer: Peer) {
        let mut failures = self.failures.lock().expect("auth failures poisoned");
        if failures.len() >= CACHE_CAP {
            // Keys with one failure go first: a flood of random names must
            // not wipe the count of a name someone is really guessing at.
            let window = self.tuning.failure_window;
            failures.retain(|_, (n, since)| since.elapsed() < window && *n > 1);
            if failures.len() >= CACHE_CAP {
                failures.clear();
            }
        }
        let entry = failures.entry((user.to_owned(), peer)).or_insert((0, Instant::now()));
        if entry.1.elapsed() >= self.tuning.failure_window {
            *entry = (0, Instant::now());
        }
        entry.0 += 1;
    }

    /// Runs `f` with one of the bounded argon2 working-memory buffers.
    fn with_slot<T>(&self, f: impl FnOnce(&mut Vec<Block>) -> T) -> T {
        let (lock, cv) = &self.slots;
        let mut free = lock.lock().expect("auth slots poisoned");
        let mut memory = loop {
            match free.pop() {
                Some(m) => break m,
                None => free = cv.wait(free).expect("auth slots poisoned"),
            }
        };
        drop(free);
        let out = f(&mut memory);
        lock.lock().expect("auth slots poisoned").push(memory);
        cv.notify_one();
        out
    }
}

/// Verifies `password` against an argon2 PHC string using `memory` as the
/// working buffer (grown once to the hash's memory cost, then reused).
/// The comparison of the computed and stored hash is constant-time.
fn verify_phc(phc: &str, password: &str, memory: &mut Vec<Block>) -> bool {
    let Ok(hash) = PasswordHash::new(phc) else { return false };
    let (Ok(algorithm), Some(salt), Some(expected)) =
        (argon2::Algorithm::try_from(hash.algorithm), hash.salt, hash.hash)
    else {
        return false;
    };
    let Ok(params) = Params::try_from(&hash) else { return false };
    let version = hash.version.and_then(|v| argon2::Version::try_from(v).ok()).unwrap_or_default();
    let blocks = params.block_count();
    if memory.len() < blocks {
        memory.resize(blocks, Block::default());
    }
    let mut salt_buf = [0u8; 64];
    let Ok(salt) = salt.decode_b64(&mut salt_buf) else { return false };
    let mut out = vec![0u8; expected.len()];
    let argon = Argon2::new(algorithm, version, params);
    if argon.hash_password_into_with_memory(password.as_bytes(), salt, &mut out, &mut memory[..blocks]).is_err() {
        return false;
    }
    subtle::ConstantTimeEq::ct_eq(out.as_slice(), expected.as_bytes()).into()
}

/// Parses `Authorization: Basic base64(user:password)`. Every malformed
/// header (absent, wrong scheme, bad base64, no colon, not UTF-8, empty user
/// or password) is the same [`AuthError::Unauthorized`]. The scheme is
/// case-sensitive, as in the original.
pub fn parse_basic(header: Option<&[u8]>) -> Result<(String, String), AuthError> {
    let header = header.ok_or(AuthError::Unauthorized)?;
    let encoded = header.strip_prefix(b"Basic ").ok_or(AuthError::Unauthorized)?;
    let decoded =
        base64::engine::general_purpose::STANDARD.decode(encoded.trim_ascii()).map_err(|_| AuthError::Unauthorized)?;
    let text = String::from_utf8(decoded).map_err(|_| AuthError::Unauthorized)?;
    let (user, password) = text.split_once(':').ok_or(AuthError::Unauthorized)?;
    if user.is_empty() || password.is_empty() {
        return Err(AuthError::Unauthorized);
    }
    Ok((user.to_owned(), password.to_owned()))
}

/// Why a request's `X-Timestamp` was refused (403); the message says what
/// to do, as the original's does for a skew.
#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum TimestampError {
    /// No `X-Timestamp` header.
    #[error(
        "no X-Timestamp header: send the client's time in seconds since the epoch (the 0.8.1 client does), \
         or set server.timestamp_window = 0 to turn the check off"
    )]
    Missing,
    /// A header that is not a finite decimal number (at most 64 bytes of it
    /// are quoted).
    #[error("X-Timestamp {0:?} is not a finite number of seconds since the epoch")]
    NotANumber(String),
    /// The clocks differ by more than the window.
    #[error(
        "the time difference between server and client is too large: client {client:.3} - server {server:.3} \
         = {:.1} s, more than server.timestamp_window = {window} s; set the clock of the machine that is wrong \
         (NTP), or widen the window",
        client - server
    )]
    Skew {
        /// The client's X-Timestamp.
        client: f64,
        /// The server's clock when the request came.
        server: f64,
        /// `server.timestamp_window`.
        window: f64,
    },
}

/// Checks the client's `X-Timestamp` (seconds since the epoch, decimal)
/// against `now`. A missing header or anything that is not a finite number
/// is refused; a window `<= 0` disables the check.
pub fn check_timestamp(header: Option<&[u8]>, now: f64, window: f64) -> Result<(), TimestampError> {
    if window.is_nan() || window <= 0.0 {
        return Ok(());
    }
    let raw = header.ok_or(TimestampError::Missing)?;
    let quoted = || String::from_utf8_lossy(&raw[..raw.len().min(64)]).into_owned();
    let value = std::str::from_utf8(raw)
        .ok()
        .and_then(|s| s.trim().parse::<f64>().ok())
        .filter(|v| v.is_finite())
        .ok_or_else(|| TimestampError::NotANumber(quoted()))?;
    if (now - value).abs() > window {
        return Err(TimestampError::Skew { client: value, server: now, window });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b64(s: &[u8]) -> Vec<u8> {
        let mut v = b"Basic ".to_vec();
        v.extend(base64::engine::general_purpose::STANDARD.encode(s).into_bytes());
        v
    }

    #[test]
    fn basic_header_parses() {
        assert_eq!(parse_basic(Some(&b64(b"admin:pw:with:colons"))), Ok(("admin".into(), "pw:with:colons".into())));
    }

    #[test]
    fn every_malformed_header_is_the_same_error() {
        let cases: Vec<Option<Vec<u8>>> = vec![
            None,
            Some(b"".to_vec()),
            Some(b"Basic".to_vec()),
            Some(b"Basic ".to_vec()),
            Some(b"basic YWRtaW46cHc=".to_vec()),
            Some(b"Bearer YWRtaW46cHc=".to_vec()),
            Some(b"Basic !!!notbase64".to_vec()),
            Some(b64(b"no-colon")),
            Some(b64(b":password")),
            Some(b64(b"user:")),
            Some(b64(b"\xff\xfe:\xff")),
        ];
        for case in cases {
            assert_eq!(parse_basic(case.as_deref()), Err(AuthError::Unauthorized), "{case:?}");
        }
    }

    #[test]
    fn timestamp_window() {
        let now = 1_000_000.0;
        assert!(check_timestamp(Some(b"1000000.5"), now, 30.0).is_ok());
        assert!(check_timestamp(Some(b"999900"), now, 30.0).is_err());
        assert_eq!(check_timestamp(None, now, 30.0), Err(TimestampError::Missing));
        // The skew message names both clocks and the window, as the original's does.
        let skew = check_timestamp(Some(b"999900"), now, 30.0).unwrap_err().to_string();
        for part in ["999900.000", "1000000.000", "-100.0 s", "server.timestamp_window = 30 s"] {
            assert!(skew.contains(part), "{part}: {skew}");
        }
        let long = check_timestamp(Some(&[b'x'; 1000]), now, 30.0).unwrap_err().to_string();
        assert!(long.len() < 200, "a hostile header is not echoed whole: {long}");
        for bad in [&b"nan"[..], b"inf", b"-inf", b"abc", b"", b"\xff"] {
            assert!(check_timestamp(Some(bad), now, 30.0).is_err(), "{bad:?}");
        }
        assert!(check_timestamp(None, now, 0.0).is_ok(), "window 0 disables");
        assert!(check_timestamp(Some(b"nan"), now, -1.0).is_ok());
    }

    #[test]
    fn verify_accepts_right_and_refuses_wrong_and_unknown() {
        let mut store = UserStore::new(AuthTuning::default());
        store.add_plain("admin", "secret", RuleSet::parse(&["allow *"]).unwrap());
        let phc = hash_password("hashed-pw");
        store.add_hashed("h", &phc, RuleSet::default()).unwrap();
        assert_eq!(store.verify("admin", "secret").unwrap().name, "admin");
        // Second time comes from the cache; still the same user.
        assert_eq!(store.verify("admin", "secret").unwrap().name, "admin");
        assert_eq!(store.verify("h", "hashed-pw").unwrap().source, PasswordSource::Hash);
        assert_eq!(store.verify("admin", "wrong").unwrap_err(), AuthError::Unauthorized);
        assert_eq!(store.verify("nobody", "secret").unwrap_err(), AuthError::Unauthorized);
        assert!(store.add_hashed("bad", "not-a-phc", RuleSet::default()).is_err());
    }

    #[test]
    fn repeated_failures_delay_only_their_own_name_and_address() {
        let tuning = AuthTuning { max_failures: 2, failure_delay: Duration::from_secs(1), ..AuthTuning::default() };
        let mut store = UserStore::new(tuning);
        store.add_plain("u", "pw", RuleSet::default());
        let (a, b) = (Peer::of(Some([10, 0, 0, 1].into())), Peer::of(Some([10, 0, 0, 2].into())));
        for _ in 0..2 {
            assert!(store.verify_from("u", "guess", a).is_err());
        }
        assert_eq!(store.penalty("u", a), Duration::ZERO, "up to max_failures: no delay");
        let delays: Vec<_> = (0..8)
            .map(|_| {
                assert!(store.verify_from("u", "guess", a).is_err());
                store.penalty("u", a).as_secs()
            })
            .collect();
        assert_eq!(delays, [1, 2, 4, 8, 16, 32, 32, 32]);
        assert_eq!(store.penalty("u", b), Duration::ZERO, "another address is not delayed");
        assert_eq!(store.penalty("v", a), Duration::ZERO, "another name is not delayed");
        // The right password, even from the guessing address, gets in and
        // clears that key's record.
        assert_eq!(store.verify_from("u", "pw", a).unwrap().name, "u");
        assert_eq!(store.penalty("u", a), Duration::ZERO);
    }

    #[test]
    fn uncached_verifications_are_bounded_per_peer_and_in_total() {
        let tuning = AuthTuning { max_misses_per_peer: 2, max_misses: 3, ..AuthTuning::default() };
        let mut store = UserStore::new(tuning);
        store.add_plain("u", "pw", RuleSet::default());
        let (a, b, c) = (Peer::of(Some([10, 0, 0, 1].into())), Peer::of(Some([10, 0, 0, 2].into())), Peer::of(None));
        let a1 = store.admit(a).unwrap();
        let a2 = store.admit(a).unwrap();
        assert_eq!(store.admit(a).err(), Some(AuthError::Throttled));
        // The flooding address's verifications in progress refuse it only.
        assert_eq!(store.verify_from("u", "pw", a).unwrap_err(), AuthError::Throttled);
        let b1 = store.admit(b).unwrap();
        assert_eq!(store.admit(c).err(), Some(AuthError::Busy), "the total bound");
        assert_eq!(store.verify_from("u", "pw", b).unwrap_err(), AuthError::Busy);
        drop(a1);
        assert_eq!(store.verify_from("u", "pw", b).unwrap().name, "u");
        // A cached login needs no place at all.
        let _a3 = store.admit(a).unwrap();
        assert_eq!(store.verify_from("u", "pw", b).unwrap().name, "u");
        drop((a2, b1));
        assert_eq!(store.misses.lock().unwrap().total, 1);
    }

    #[test]
    fn ipv6_peers_are_their_slash_64_and_mapped_v4_is_v4() {
        let p = |s: &str| Peer::of(Some(s.parse().unwrap()));
        assert_eq!(p("2001:db8:1:2::1"), p("2001:db8:1:2:ffff::9"));
        assert_ne!(p("2001:db8:1:2::1"), p("2001:db8:1:3::1"));
        assert_eq!(p("::ffff:10.0.0.1"), p("10.0.0.1"));
        assert_eq!(p("2001:db8:1:2::1").to_string(), "2001:db8:1:2::");
    }

    #[test]
    fn a_random_name_flood_does_not_reset_a_guessed_names_count() {
        let tuning = AuthTuning { max_failures: 1, ..AuthTuning::default() };
        let mut store = UserStore::new(tuning);
        store.add_plain("admin", "pw", RuleSet::default());
        let a = Peer::of(Some([10, 0, 0, 1].into()));
        for _ in 0..3 {
            let _ = store.verify_from("admin", "guess", a);
        }
        let before = store.penalty("admin", a);
        assert!(before > Duration::ZERO);
        for i in 0..CACHE_CAP + 10 {
            store.record_failure(&format!("random{i}"), a);
        }
        assert_eq!(store.penalty("admin", a), before);
    }

    #[test]
    fn failures_of_others_never_refuse_a_correct_uncached_password() {
        // The attack: anyone sends wrong passwords for `admin`; the real
        // admin's first (uncached) login must still get in.
        let tuning = AuthTuning { max_failures: 2, failure_delay: Duration::from_millis(1), ..AuthTuning::default() };
        let mut store = UserStore::new(tuning);
        store.add_plain("admin", "pw", RuleSet::default());
        for _ in 0..5 {
            assert_eq!(store.verify("admin", "guess").unwrap_err(), AuthError::Unauthorized);
        }
        assert_eq!(store.verify("admin", "pw").unwrap().name, "admin");
    }
}
