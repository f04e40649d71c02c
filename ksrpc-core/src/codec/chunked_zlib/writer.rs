//! The zlib writer of one slice: a complete zlib stream per slice, at the
//! configured level or, in `auto` mode, stored when a sample shows the slice
//! does not compress; over HTTP, never containing the border.

use flate2::{Compress, Compression, FlushCompress, Status};
use memchr::memmem;

use super::{Level, BORDER};

/// In `auto` mode, a slice whose level-1 sample shrinks less than this ratio
/// is sent as stored blocks: compressing random float64 data costs ~20x the
/// CPU for a few percent of bytes.
const AUTO_STORED_RATIO: f64 = 0.95;
/// Bytes of each slice that `auto` compresses at level 1 to judge it.
const AUTO_SAMPLE: usize = 16 * 1024;

/// Compresses one slice into a complete zlib stream. With `with_border`
/// (HTTP, where the peer splits on [`BORDER`] blindly) the output never
/// contains the border and is followed by it; WebSocket binary messages are
/// never scanned, so they need no check.
pub(super) fn compress_slice(data: &[u8], level: Level, with_border: bool) -> Vec<u8> {
    let first = match level {
        Level::Fixed(n) => n.min(9),
        Level::Auto => auto_level(data),
    };
    if level == Level::Auto && data.len() <= TINY {
        // Not worth a compressor: a tiny reply goes out stored, with no state.
        let mut out = stored(data, if with_border { BORDER.len() } else { 0 });
        if !with_border {
            return out;
        }
        if memmem::find(&out, BORDER).is_none() {
            out.extend_from_slice(BORDER);
            return out;
        }
    }
    if !with_border {
        return deflate(data, first, 0);
    }
    // Another level changes the bytes: stored blocks (0) of a payload full of
    // borders always contain one, level 1 and 9 use different matchers.
    for lvl in [first, 6, 1, 9, 3] {
        let mut out = deflate(data, lvl, BORDER.len());
        if memmem::find(&out, BORDER).is_none() {
            out.extend_from_slice(BORDER);
            return out;
        }
    }
    // Practically unreachable: cut the slice in two smaller slices. This
    // terminates: a one-byte slice compresses to fewer than 15 bytes.
    let mid = data.len() / 2;
    let mut out = compress_slice(&data[..mid], Level::Fixed(6), true);
    out.extend_from_slice(&compress_slice(&data[mid..], Level::Fixed(6), true));
    out
}

/// In `auto` mode, slices up to this size are sent stored: compressing a
/// 200-byte reply saves nothing worth a compressor's set-up cost.
const TINY: usize = 2048;

/// A zlib stream of `data` in stored blocks, written directly (no deflate
/// state to allocate or reset), with `spare` bytes of capacity at the end.
fn stored(data: &[u8], spare: usize) -> Vec<u8> {
    let blocks = data.len().div_ceil(65_535).max(1);
    let mut out = Vec::with_capacity(2 + blocks * 5 + data.len() + 4 + spare);
    out.extend_from_slice(&[0x78, 0x01]);
    let mut chunks = data.chunks(65_535).peekable();
    if data.is_empty() {
        out.extend_from_slice(&[1, 0, 0, 0xff, 0xff]);
    }
    while let Some(chunk) = chunks.next() {
        let last = chunks.peek().is_none();
        let len = chunk.len() as u16;
        out.push(u8::from(last));
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&(!len).to_le_bytes());
        out.extend_from_slice(chunk);
    }
    out.extend_from_slice(&adler32(data).to_be_bytes());
    out
}

/// The Adler-32 checksum that ends a zlib stream (RFC 1950), from zlib-rs
/// (flate2's backend, SIMD where the CPU has it).
fn adler32(data: &[u8]) -> u32 {
    zlib_rs::adler32::adler32(1, data)
}

fn auto_level(data: &[u8]) -> u32 {
    let sample = &data[..data.len().min(AUTO_SAMPLE)];
    if sample.len() < 64 {
        return 6;
    }
    let packed = deflate(sample, 1, 0);
    if packed.len() as f64 >= sample.len() as f64 * AUTO_STORED_RATIO {
        0
    } else {
        6
    }
}

thread_local! {
    /// One deflate state per level and thread, reset between slices: a fresh
    /// state costs ~270 KB of allocation and zeroing, which dominated small
    /// replies (perf: 8% of server time in memset at 8k calls/s).
    static DEFLATERS: std::cell::RefCell<Vec<(u32, Compress)>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// One complete zlib stream of `data` at `level`, with `spare` bytes of
/// capacity left at the end (for the border, without a reallocation).
fn deflate(data: &[u8], level: u32, spare: usize) -> Vec<u8> {
    DEFLATERS.with(|cell| {
        let mut states = cell.borrow_mut();
        let idx = match states.iter().position(|(l, _)| *l == level) {
            Some(i) => i,
            None => {
                states.push((level, Compress::new(Compression::new(level), true)));
                states.len() - 1
            }
        };
        let c = &mut states[idx].1;
        c.reset();
        // Stored blocks cost 5 bytes per 64 KiB plus 6 bytes of zlib header and
        // checksum; compressed output is smaller in all but pathological cases.
        let mut out = Vec::with_capacity(data.len() + data.len() / 8192 + 64 + spare);
        loop {
            let consumed = c.total_in() as usize;
            let status = c
                .compress_vec(&data[consumed..], &mut out, FlushCompress::Finish)
                .expect("deflate with Finish on an in-memory buffer cannot fail");
            if status == Status::StreamEnd {
                return out;
            }
            out.reserve(out.capacity().max(1024));
        }
    })
}
