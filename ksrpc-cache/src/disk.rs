//! The disk tier's files: one per entry, written atomically, checked on load.
//!
//! A file is `<key in hex>.ksrc`:
//!
//! ```text
//! magic "KSRPCC\0\x01" | key (32) | kind (1) | expires, ms since the epoch (u64 LE)
//! | summary length (u32 LE) | summary (UTF-8) | body length (u64 LE) | body
//! | SHA-256 of everything before it (32)
//! ```
//!
//! It is written to a temporary name in the same directory, synced, then
//! renamed over its final name, so no reader (this process or another) ever
//! sees half an entry, and a `kill -9` leaves at most a temporary file that
//! the next start removes. A file that does not pass every check (magic,
//! key equal to its name, lengths equal to the file's, checksum) is deleted
//! and never interpreted further: the body is bytes sent as they are, never
//! unpickled on the server.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use sha2::{Digest, Sha256};

use crate::{CacheKey, Entry, Kind};

const MAGIC: &[u8; 8] = b"KSRPCC\0\x01";
/// The extension of entry files.
pub const EXTENSION: &str = "ksrc";
const TMP_EXTENSION: &str = "tmp";
/// Temporary files older than this are left over from a killed writer.
const STALE_TMP: Duration = Duration::from_secs(3600);
/// Bytes before the summary.
const FIXED: usize = 8 + 32 + 1 + 8 + 4;

/// Why a file was not accepted as an entry.
#[derive(Debug, thiserror::Error)]
pub enum BadEntry {
    /// Reading it failed.
    #[error("cannot read: {0}")]
    Io(#[from] io::Error),
    /// Not a cache entry of this format.
    #[error("not a ksrpc cache entry (foreign or from another version)")]
    Foreign,
    /// Cut short, too long, or a checksum mismatch.
    #[error("corrupt: {0}")]
    Corrupt(&'static str),
}

/// The entry file of `key` under `dir`.
pub fn entry_path(dir: &Path, key: &CacheKey) -> PathBuf {
    dir.join(format!("{}.{EXTENSION}", key.hex()))
}

fn millis(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Writes `entry` atomically (temporary file, sync, rename); returns the
/// file's size.
pub(crate) fn write(dir: &Path, key: &CacheKey, entry: &Entry) -> io::Result<u64> {
    let mut head = Vec::with_capacity(FIXED + entry.summary.len() + 8);
    head.extend_from_slice(MAGIC);
    head.extend_from_slice(&key.0);
    head.push(entry.kind as u8);
    head.extend_from_slice(&millis(entry.expires).to_le_bytes());
    head.extend_from_slice(&(entry.summary.len() as u32).to_le_bytes());
    head.extend_from_slice(entry.summary.as_bytes());
    head.extend_from_slice(&(entry.body.len() as u64).to_le_bytes());
    let mut sum = Sha256::new();
    sum.update(&head);
    sum.update(&entry.body);
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    let tmp = dir.join(format!(".{}.{}.{nanos}.{TMP_EXTENSION}", key.hex(), std::process::id()));
    let result = (|| {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(&head)?;
        f.write_all(&entry.body)?;
        f.write_all(&sum.finalize())?;
        f.sync_data()?;
        fs::rename(&tmp, entry_path(dir, key))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map(|()| (head.len() + entry.body.len() + 32) as u64)
}

/// Reads and checks the entry of `key`. Only the header's fields are parsed
/// (fixed-size integers and a UTF-8 summary), after the checksum passed.
pub(crate) fn read(dir: &Path, key: &CacheKey) -> Result<Entry, BadEntry> {
    let bytes = fs::read(entry_path(dir, key))?;
    parse(&bytes, Some(key)).map(|(entry, _)| entry)
}

/// Checks and parses a whole entry file; with `expect`, its key must be it.
fn parse(bytes: &[u8], expect: Option<&CacheKey>) -> Result<(Entry, CacheKey), BadEntry> {
    if bytes.len() < 8 || &bytes[..8] != MAGIC {
        return Err(BadEntry::Foreign);
    }
    if bytes.len() < FIXED + 8 + 32 {
        return Err(BadEntry::Corrupt("shorter than a header"));
    }
    let (data, sum) = bytes.split_at(bytes.len() - 32);
    if Sha256::digest(data).as_slice() != sum {
        return Err(BadEntry::Corrupt("checksum mismatch"));
    }
    let head = parse_head(data)?;
    if expect.is_some_and(|k| *k != head.key) {
        return Err(BadEntry::Corrupt("the key inside is not the file's"));
    }
    let body_at = data.len() - head.body_len as usize;
    let entry = Entry {
        kind: head.kind,
        body: Bytes::copy_from_slice(&data[body_at..]),
        summary: head.summary,
        expires: head.expires,
    };
    Ok((entry, head.key))
}

struct Head {
    key: CacheKey,
    kind: Kind,
    expires: SystemTime,
    summary: String,
    body_len: u64,
}

/// The header fields; `data` is the file without its checksum (or, for a
/// header-only read, a prefix with the whole header).
fn parse_head(data: &[u8]) -> Result<Head, BadEntry> {
    if data.len() < FIXED || &data[..8] != MAGIC {
        return Err(BadEntry::Foreign);
    }
    let key = CacheKey(data[8..40].try_into().expect("32 bytes"));
    let kind = Kind::from_byte(data[40]).ok_or(BadEntry::Corrupt("unknown entry kind"))?;
    let expires = UNIX_EPOCH + Duration::from_millis(u64::from_le_bytes(data[41..49].try_into().expect("8 bytes")));
    let summary_len = u32::from_le_bytes(data[49..53].try_into().expect("4 bytes")) as usize;
    let rest = &data[FIXED..];
    if rest.len() < summary_len + 8 {
        return Err(BadEntry::Corrupt("shorter than its header says"));
    }
    let summary = std::str::from_utf8(&rest[..summary_len]).map_err(|_| BadEntry::Corrupt("summary is not UTF-8"))?;
    let body_len = u64::from_le_bytes(rest[summary_len..summary_len + 8].try_into().expect("8 bytes"));
    Ok(Head { key, kind, expires, summary: summary.to_owned(), body_len })
}

/// One entry file found by [`scan`].
#[derive(Debug)]
pub(crate) struct Found {
    pub(crate) key: CacheKey,
    pub(crate) size: u64,
    pub(crate) expires: SystemTime,
    pub(crate) used: SystemTime,
}

/// What a directory holds, for start-up and `cache stats`.
#[derive(Debug, Default)]
pub struct Scan {
    /// Entry files whose header reads, with what it says.
    pub(crate) entries: Vec<Found>,
    /// Entry files whose header does not read, or whose name is not its key.
    pub bad: Vec<PathBuf>,
    /// Temporary files of writers that never finished (older than an hour).
    pub stale: Vec<PathBuf>,
}

impl Scan {
    /// Entries and their bytes.
    pub fn entries(&self) -> (usize, u64) {
        (self.entries.len(), self.entries.iter().map(|e| e.size).sum())
    }

    /// Entries past their expiry at `now`, and their bytes.
    pub fn expired(&self, now: SystemTime) -> (usize, u64) {
        let e: Vec<_> = self.entries.iter().filter(|e| e.expires <= now).collect();
        (e.len(), e.iter().map(|e| e.size).sum())
    }
}

/// Reads the directory: the header of every entry file (bodies are checked
/// when loaded), and the temporary files left by killed writers. Other
/// files are not ours and are left alone.
pub fn scan(dir: &Path) -> io::Result<Scan> {
    let mut out = Scan::default();
    let now = SystemTime::now();
    for item in fs::read_dir(dir)? {
        let item = item?;
        let path = item.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else { continue };
        let meta = match item.metadata() {
            Ok(m) if m.is_file() => m,
            _ => continue,
        };
        if name.starts_with('.') && name.ends_with(&format!(".{TMP_EXTENSION}")) {
            let age = meta.modified().ok().and_then(|m| now.duration_since(m).ok()).unwrap_or_default();
            if age >= STALE_TMP {
                out.stale.push(path);
            }
            continue;
        }
        let Some(stem) = name.strip_suffix(&format!(".{EXTENSION}")) else { continue };
        let Some(key) = CacheKey::from_hex(stem) else { continue };
        let head = read_head(&path);
        match head {
            Ok(h) if h.key == key => out.entries.push(Found {
                key,
                size: meta.len(),
                expires: h.expires,
                used: meta.modified().unwrap_or(UNIX_EPOCH),
            }),
            _ => out.bad.push(path),
        }
    }
    out.entries.sort_by_key(|e| e.used);
    Ok(out)
}

fn read_head(path: &Path) -> Result<Head, BadEntry> {
    use std::io::Read;
    let mut buf = vec![0u8; FIXED + 4096];
    let mut f = fs::File::open(path)?;
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    parse_head(&buf[..n])
}

/// Deletes every entry file and leftover temporary file under `dir`;
/// returns how many files and bytes went. Other files are left alone.
pub fn clear(dir: &Path) -> io::Result<(usize, u64)> {
    let scan = scan(dir)?;
    let mut files = 0;
    let mut bytes = 0;
    let doomed = scan.entries.iter().map(|e| entry_path(dir, &e.key)).chain(scan.bad).chain(scan.stale);
    for path in doomed {
        let size = fs::metadata(&path).map_or(0, |m| m.len());
        if fs::remove_file(&path).is_ok() {
            files += 1;
            bytes += size;
        }
    }
    Ok((files, bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> Entry {
        Entry {
            kind: Kind::Compat,
            body: Bytes::from_static(b"reply bytes"),
            summary: "m.f(1 arg)".into(),
            expires: UNIX_EPOCH + Duration::from_secs(4_000_000_000),
        }
    }

    #[test]
    fn a_written_entry_reads_back_and_every_damage_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let key = CacheKey([7; 32]);
        let size = write(dir.path(), &key, &entry()).unwrap();
        let back = read(dir.path(), &key).unwrap();
        assert_eq!(
            (back.kind, &back.body[..], back.summary.as_str()),
            (Kind::Compat, &b"reply bytes"[..], "m.f(1 arg)")
        );
        assert_eq!(back.expires, entry().expires);
        let path = entry_path(dir.path(), &key);
        assert_eq!(fs::metadata(&path).unwrap().len(), size);
        let good = fs::read(&path).unwrap();

        // Truncated anywhere, one bit flipped anywhere, garbage, empty, another key.
        for cut in [0, 5, 8, 40, FIXED + 3, good.len() - 33, good.len() - 1] {
            fs::write(&path, &good[..cut]).unwrap();
            assert!(read(dir.path(), &key).is_err(), "cut at {cut}");
        }
        for at in [0, 9, 40, 45, 50, FIXED + 1, good.len() - 20, good.len() - 1] {
            let mut bad = good.clone();
            bad[at] ^= 1;
            fs::write(&path, &bad).unwrap();
            assert!(read(dir.path(), &key).is_err(), "flip at {at}");
        }
        fs::write(&path, b"\x80\x04\x95garbage that looks like a pickle.").unwrap();
        assert!(matches!(read(dir.path(), &key), Err(BadEntry::Foreign)));
        let other = CacheKey([8; 32]);
        fs::write(entry_path(dir.path(), &other), &good).unwrap();
        assert!(matches!(read(dir.path(), &other), Err(BadEntry::Corrupt(_))));
    }

    #[test]
    fn scan_and_clear_touch_only_our_files() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), &CacheKey([1; 32]), &entry()).unwrap();
        fs::write(dir.path().join(format!("{}.{EXTENSION}", CacheKey([2; 32]).hex())), b"junk").unwrap();
        fs::write(dir.path().join("notes.txt"), b"the user's").unwrap();
        let s = scan(dir.path()).unwrap();
        assert_eq!(s.entries().0, 1);
        assert_eq!(s.bad.len(), 1);
        assert_eq!(clear(dir.path()).unwrap().0, 2);
        assert!(dir.path().join("notes.txt").exists());
        assert_eq!(scan(dir.path()).unwrap().entries().0, 0);
    }
}
