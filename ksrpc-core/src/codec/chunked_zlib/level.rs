//! The compression level setting of the chunked-zlib codec, as written in
//! the config (`codec.level = "auto"` or `0`..`9`).

use std::fmt;
use std::str::FromStr;

/// The compression level of each slice.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Level {
    /// zlib level 0 (stored) to 9.
    Fixed(u32),
    /// Stored blocks for slices that do not compress, level 6 for those that do.
    #[default]
    Auto,
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Level::Fixed(n) => write!(f, "{n}"),
            Level::Auto => f.write_str("auto"),
        }
    }
}

/// Error for a level that is neither `0`..`9` nor `auto`.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid compression level {0:?}: expected 0..=9 or \"auto\"")]
pub struct LevelParseError(pub String);

impl FromStr for Level {
    type Err = LevelParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "auto" => Ok(Level::Auto),
            n => match n.parse::<u32>() {
                Ok(n) if n <= 9 => Ok(Level::Fixed(n)),
                _ => Err(LevelParseError(s.to_owned())),
            },
        }
    }
}
