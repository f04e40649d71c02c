//! What the suite costs in disk: the free space where the target dir lives,
//! checked before the build and reported with the target dir's size after
//! it. CI's disk is shared and its free space varies; a run that fills it
//! fails in whichever step writes next, far from the cause, so the numbers
//! are printed where the cause can be read.

use std::path::Path;
use std::process::Command;

/// A clean `CI=true cargo xtask test` left 14 GB under `target/` before the
/// dev profile dropped dependency debug info; this is that bound with room
/// to spare, and only a warning: a warm target dir needs far less.
const WARN_BELOW: u64 = 12 << 30;

/// Bytes free to this user on the filesystem holding `path` (`df -Pk`;
/// `None` if `df` is missing or says something else).
pub fn free_bytes(path: &Path) -> Option<u64> {
    let existing = path.ancestors().find(|p| p.exists())?;
    let out = Command::new("df").arg("-Pk").arg(existing).output().ok()?;
    let text = String::from_utf8(out.stdout).ok()?;
    let fields: Vec<&str> = text.lines().nth(1)?.split_whitespace().collect();
    fields.get(3)?.parse::<u64>().ok().map(|kib| kib * 1024)
}

/// Bytes in the files under `path` (symlinks not followed; unreadable
/// entries skipped).
pub fn tree_bytes(path: &Path) -> u64 {
    let Ok(meta) = std::fs::symlink_metadata(path) else { return 0 };
    if !meta.is_dir() {
        return meta.len();
    }
    std::fs::read_dir(path).map(|entries| entries.flatten().map(|e| tree_bytes(&e.path())).sum()).unwrap_or(0)
}

pub fn gib(bytes: u64) -> String {
    format!("{:.1} GiB", bytes as f64 / (1u64 << 30) as f64)
}

/// One line before the build: the free space, and a warning when it is
/// below what a clean run needs.
pub fn report_before(target: &Path) {
    match free_bytes(target) {
        Some(free) if free < WARN_BELOW => eprintln!(
            "    disk: only {} free for {} (a clean run needs about {}); a step may fail with \
             'No space left on device'",
            gib(free),
            target.display(),
            gib(WARN_BELOW)
        ),
        Some(free) => eprintln!("    disk: {} free for {}", gib(free), target.display()),
        None => eprintln!("    disk: could not read the free space (df)"),
    }
}

/// One line after the run: what the target dir holds and what is left.
pub fn report_after(target: &Path) {
    let free = free_bytes(target).map_or_else(|| "unknown".to_owned(), gib);
    eprintln!("disk: {} holds {}; {free} free", target.display(), gib(tree_bytes(target)));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_a_tree_and_reads_free_space() {
        let dir = std::env::temp_dir().join(format!("xtask-disk-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("a/b")).unwrap();
        std::fs::write(dir.join("a/x"), vec![0u8; 1000]).unwrap();
        std::fs::write(dir.join("a/b/y"), vec![0u8; 24]).unwrap();
        assert_eq!(tree_bytes(&dir), 1024);
        assert!(free_bytes(&dir.join("not/yet/made")).is_some_and(|b| b > 0));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
