//! Users, passwords and the checks that run before any body is read: the
//! `X-Timestamp` window and HTTP Basic authentication.
//!
//! Passwords are argon2id PHC hashes. Plain-text passwords from a config are
//! hashed at load time and flagged so the server can warn. Verification
//! costs the same for an unknown user as for a wrong password. Because the
//! 0.8.1 client sends Basic auth on every call and argon2 costs ~30 ms, a
//! successful verification is cached under a keyed hash of `user:password`
//! for a while, concurrent argon2 work is bounded, and repeated failures for
//! one name are refused without spending CPU.

use std::collections::HashMap;
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
    /// `X-Timestamp` missing, not a finite number, or outside the window.
    #[error("timestamp outside the allowed window")]
    StaleTimestamp,
    /// A stored password hash is not a valid PHC string.
    #[error("invalid password hash for user {0:?}: {1}")]
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
    /// Failures per name within `failure_window` before further attempts
    /// for that name are refused without checking.
    pub max_failures: u32,
    /// The window for `max_failures`.
    pub failure_window: Duration,
}

impl Default for AuthTuning {
    fn default() -> Self {
        AuthTuning {
            cache_ttl: Duration::from_secs(300),
            max_concurrent_hashes: std::thread::available_parallelism().map_or(2, |n| n.get()),
            max_failures: 20,
            failure_window: Duration::from_secs(60),
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
    failures: Mutex<HashMap<String, (u32, Instant)>>,
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

    /// Checks `user:password`. CPU-bound (argon2) on a cache miss: call it
    /// from a blocking thread, not an async worker.
    pub fn verify(&self, user: &str, password: &str) -> Result<Arc<User>, AuthError> {
        let key = self.cache_key(user, password);
        if let Some(found) = self.cached(&key) {
            return Ok(found);
        }
        if self.locked_out(user) {
            return Err(AuthError::Unauthorized);
        }
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
                Ok(u.clone())
            }
            _ => {
                self.record_failure(user);
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

    fn locked_out(&self, user: &str) -> bool {
        let failures = self.failures.lock().expect("auth failures poisoned");
        failures
            .get(user)
            .is_some_and(|(n, since)| *n >= self.tuning.max_failures && since.elapsed() < self.tuning.failure_window)
    }

    fn record_failure(&self, user: &str) {
        let mut failures = self.failures.lock().expect("auth failures poisoned");
        if failures.len() >= CACHE_CAP {
            let window = self.tuning.failure_window;
            failures.retain(|_, (_, since)| since.elapsed() < window);
        }
        let entry = failures.entry(user.to_owned()).or_insert((0, Instant::now()));
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

/// Checks the client's `X-Timestamp` (seconds since the epoch, decimal)
/// against `now`. A missing header counts as 0; anything that is not a
/// finite number is refused; a window `<= 0` disables the check.
pub fn check_timestamp(header: Option<&[u8]>, now: f64, window: f64) -> Result<(), AuthError> {
    if window.is_nan() || window <= 0.0 {
        return Ok(());
    }
    let value = match header {
        None => 0.0,
        Some(raw) => {
            std::str::from_utf8(raw).ok().and_then(|s| s.trim().parse::<f64>().ok()).ok_or(AuthError::StaleTimestamp)?
        }
    };
    if !value.is_finite() || (now - value).abs() > window {
        return Err(AuthError::StaleTimestamp);
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
        assert!(check_timestamp(None, now, 30.0).is_err(), "missing counts as 0");
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
    fn repeated_failures_lock_out_the_name_but_not_a_cached_login() {
        let tuning = AuthTuning { max_failures: 2, ..AuthTuning::default() };
        let mut store = UserStore::new(tuning);
        store.add_plain("u", "pw", RuleSet::default());
        store.verify("u", "pw").unwrap();
        for _ in 0..3 {
            assert!(store.verify("u", "guess").is_err());
        }
        assert!(store.verify("u", "pw").is_ok(), "cached success still works");
    }
}
