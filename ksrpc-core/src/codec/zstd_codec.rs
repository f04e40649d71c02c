//! zstd, all of it: the streaming codec of the native protocol (one zstd
//! stream per message, with the same [`Limits`] as the chunked-zlib codec),
//! the whole-message path the native protocol uses (a context kept per
//! thread for small messages, zstd's worker threads for big ones, a decoder
//! that allocates a declared size only when it is plausible), the declared
//! size of a frame, and the frame splice that serves a cached outcome.

use bytes::Bytes;
use zstd::stream::raw::{DParameter, Decoder, Encoder, InBuffer, Operation, OutBuffer};

use super::{Codec, CodecError, Flow, Limits, StreamDecoder};

/// Output is emitted in pieces of about this size.
const PIECE: usize = 128 * 1024;

/// Bounds of the decoding window (log2 of bytes) a frame may ask for: the
/// decoder allocates the window a frame header declares, so it follows
/// `max_decoded` (no window bigger than the biggest message allowed), at
/// least 2 MiB (what zstd's level 3 declares for a stream of unknown size)
/// and at most 8 MiB (what levels up to 19 use; zstd's own default cap is
/// 128 MiB). Our encoders never declare more than 2 MiB.
const WINDOW_LOG_MIN: u32 = 21;
const WINDOW_LOG_MAX: u32 = 23;

/// The largest window log a decoder under `limits` accepts.
pub(crate) fn window_log_max(limits: &Limits) -> u32 {
    let needed = u64::BITS - limits.max_decoded.saturating_sub(1).leading_zeros();
    needed.clamp(WINDOW_LOG_MIN, WINDOW_LOG_MAX)
}

/// zstd compression of a whole message, streamed.
#[derive(Clone, Debug)]
pub struct Zstd {
    /// zstd level (1..=19; 3 is zstd's default and a good speed/size trade).
    pub level: i32,
}

impl Default for Zstd {
    fn default() -> Self {
        Zstd { level: 3 }
    }
}

fn io_err(e: std::io::Error) -> CodecError {
    CodecError::Compress(e.to_string())
}

impl Codec for Zstd {
    fn name(&self) -> &'static str {
        "zstd"
    }

    fn encode(
        &self,
        payload: &mut dyn Iterator<Item = Bytes>,
        emit: &mut dyn FnMut(Bytes) -> Flow,
    ) -> Result<(), CodecError> {
        let mut enc = Encoder::new(self.level).map_err(io_err)?;
        let mut out = vec![0u8; PIECE];
        let mut filled = 0usize;
        let mut flush = |buf: &mut Vec<u8>, filled: &mut usize, force: bool| -> Result<(), CodecError> {
            if *filled > 0 && (force || *filled == buf.len()) {
                let piece = Bytes::copy_from_slice(&buf[..*filled]);
                *filled = 0;
                if emit(piece).is_break() {
                    return Err(CodecError::Cancelled);
                }
            }
            Ok(())
        };
        for chunk in payload {
            let mut input = InBuffer::around(&chunk);
            while input.pos < chunk.len() {
                let mut output = OutBuffer::around_pos(&mut out[..], filled);
                enc.run(&mut input, &mut output).map_err(io_err)?;
                filled = output.pos();
                flush(&mut out, &mut filled, false)?;
            }
        }
        loop {
            let mut output = OutBuffer::around_pos(&mut out[..], filled);
            let remaining = enc.finish(&mut output, true).map_err(io_err)?;
            filled = output.pos();
            flush(&mut out, &mut filled, remaining == 0)?;
            if remaining == 0 {
                return Ok(());
            }
        }
    }

    fn decoder(&self, limits: Limits) -> Box<dyn StreamDecoder> {
        Box::new(ZstdDecoder { dec: None, out: Vec::new(), seen: 0, limits, frame_done: false, started: false })
    }
}

struct ZstdDecoder {
    dec: Option<Decoder<'static>>,
    out: Vec<u8>,
    seen: u64,
    limits: Limits,
    /// The last byte fed completed a frame.
    frame_done: bool,
    started: bool,
}

impl StreamDecoder for ZstdDecoder {
    fn feed(&mut self, bytes: &[u8]) -> Result<(), CodecError> {
        self.seen += bytes.len() as u64;
        if self.seen > self.limits.max_encoded {
            return Err(CodecError::EncodedTooLarge { limit: self.limits.max_encoded });
        }
        if bytes.is_empty() {
            return Ok(());
        }
        self.started = true;
        let dec = match &mut self.dec {
            Some(d) => d,
            None => {
                let mut dec = Decoder::new().map_err(io_err)?;
                dec.set_parameter(DParameter::WindowLogMax(window_log_max(&self.limits))).map_err(io_err)?;
                self.dec.insert(dec)
            }
        };
        let mut input = InBuffer::around(bytes);
        let mut scratch = [0u8; 32 * 1024];
        loop {
            let pos_before = input.pos;
            let mut output = OutBuffer::around(&mut scratch[..]);
            let hint = dec
                .run(&mut input, &mut output)
                .map_err(|e| CodecError::Corrupt { index: 0, reason: e.to_string() })?;
            let produced = output.pos();
            if self.out.len() as u64 + produced as u64 > self.limits.max_decoded {
                self.out = Vec::new();
                return Err(CodecError::DecodedTooLarge { limit: self.limits.max_decoded });
            }
            self.out.extend_from_slice(&scratch[..produced]);
            // A call that consumed and produced nothing (after the frame ended)
            // says nothing about the frame; only a call that moved may end it.
            if produced > 0 || input.pos > pos_before {
                self.frame_done = hint == 0;
            }
            if input.pos == bytes.len() && produced < scratch.len() {
                return Ok(());
            }
        }
    }

    fn finish(self: Box<Self>) -> Result<Vec<u8>, CodecError> {
        if !self.started {
            return Err(CodecError::Empty);
        }
        if !self.frame_done {
            return Err(CodecError::TruncatedSlice { index: 0 });
        }
        Ok(self.out)
    }

    fn buffered(&self) -> u64 {
        self.out.len() as u64
    }
}

/// Messages up to this size are (de)compressed in one call with a context
/// kept per thread: creating a zstd context costs more than compressing a
/// small call.
const BULK_MAX: usize = 4 << 20;
/// Largest declared expansion decoded in one call; beyond it the streaming
/// decoder (which stops at the limit as bytes come out) is used.
const BULK_MAX_RATIO: u64 = 64;
/// Messages from this size are compressed by zstd's own worker threads at a
/// fast level: big arrays and tables, where speed matters more than the last
/// few percent of size (see `compress_parallel`).
const MULTITHREAD_FROM: usize = 4 << 20;

thread_local! {
    static COMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Compressor<'static>>> =
        const { std::cell::RefCell::new(None) };
    static DECOMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { std::cell::RefCell::new(None) };
}

/// A whole native message compressed: one frame with its content size,
/// small messages with a context kept per thread, big ones in parallel.
pub fn compress_message(raw: Vec<u8>) -> Vec<u8> {
    if raw.len() <= BULK_MAX {
        let bulk = COMPRESSOR.with(|c| {
            let mut c = c.borrow_mut();
            let compressor = match c.as_mut() {
                Some(compressor) => compressor,
                None => c.insert(zstd::bulk::Compressor::new(Zstd::default().level).ok()?),
            };
            compressor.compress(&raw).ok()
        });
        if let Some(wire) = bulk {
            return wire;
        }
    }
    if raw.len() >= MULTITHREAD_FROM {
        if let Some(wire) = compress_parallel(&raw) {
            return wire;
        }
    }
    super::encode_to_vec(&Zstd::default(), raw.into()).expect("zstd compression into memory cannot fail")
}

/// Big messages: level 1 on zstd's worker threads, or level -1 (literals
/// left uncompressed, decoding at memcpy-like speed) when a 1 MiB sample
/// from the middle shrinks by less than 10% (random floats, packed data).
fn compress_parallel(raw: &[u8]) -> Option<Vec<u8>> {
    let mid = raw.len() / 2;
    let sample = &raw[mid.saturating_sub(512 << 10)..(mid + (512 << 10)).min(raw.len())];
    let sampled = zstd::bulk::compress(sample, 1).ok()?.len();
    let level = if sampled * 10 > sample.len() * 9 { -1 } else { 1 };
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get()).min(8) as u32;
    let mut out = Vec::with_capacity(raw.len() / 2 + 1024);
    let mut encoder = zstd::stream::write::Encoder::new(&mut out, level).ok()?;
    encoder.multithread(workers).ok()?;
    encoder.set_pledged_src_size(Some(raw.len() as u64)).ok()?;
    std::io::Write::write_all(&mut encoder, raw).ok()?;
    encoder.finish().ok()?;
    Some(out)
}

/// Undoes [`compress_message`] under `limits`. One frame with a declared
/// size decodes in one call into a buffer of exactly that size, when the
/// size is within the limit and plausible for the input (a bomb's declared
/// size is refused before allocating); anything else (no declared size,
/// several frames, over the limits, corrupt) takes the streaming decoder,
/// which enforces the limits as it goes and names the failure.
pub fn decompress_message(wire: &[u8], limits: Limits) -> Result<Vec<u8>, CodecError> {
    if let Ok(Some(size)) = zstd::zstd_safe::get_frame_content_size(wire) {
        if size <= limits.max_decoded && size <= (wire.len() as u64).saturating_mul(BULK_MAX_RATIO) {
            let bulk = DECOMPRESSOR.with(|d| {
                let mut d = d.borrow_mut();
                let decompressor = match d.as_mut() {
                    Some(decompressor) => decompressor,
                    None => d.insert(zstd::bulk::Decompressor::new().ok()?),
                };
                decompressor.decompress(wire, size as usize).ok()
            });
            if let Some(bytes) = bulk.filter(|b| b.len() as u64 == size) {
                return Ok(bytes);
            }
        }
    }
    super::decode_all(&Zstd::default(), wire, limits)
}

/// The decoded size a message declares: only when it is one zstd frame
/// (frames after the first would decode beyond what the first declares).
pub fn declared_size(wire: &[u8]) -> Option<u64> {
    let first = zstd::zstd_safe::find_frame_compressed_size(wire).ok()?;
    if first != wire.len() {
        return None;
    }
    zstd::zstd_safe::get_frame_content_size(wire).ok().flatten()
}

/// One zstd frame made of `prefix` (as a raw block) followed by the blocks
/// of `frame`, decoding to `prefix` then what `frame` decodes to: how a
/// cached native outcome becomes a reply without compressing again (see
/// `native::reply_from_outcome`). The blocks' matches reach back only within
/// `frame`'s content, and a raw block changes neither the repeat offsets nor
/// the entropy tables. `None` when `frame` is not one this can splice (a
/// checksum, a dictionary, no content size, or not one whole frame).
pub fn prepend_raw_block(prefix: &[u8], frame: &[u8]) -> Option<Vec<u8>> {
    const MAGIC: [u8; 4] = 0xFD2F_B528u32.to_le_bytes();
    if frame.len() < 6 || frame[..4] != MAGIC || zstd::zstd_safe::find_frame_compressed_size(frame).ok()? != frame.len()
    {
        return None;
    }
    let content = zstd::zstd_safe::get_frame_content_size(frame).ok().flatten()?;
    let fhd = frame[4];
    let (fcs_flag, single, checksum, dict) = (fhd >> 6, fhd & 0x20 != 0, fhd & 0x04 != 0, fhd & 0x03);
    if checksum || dict != 0 || fhd & 0x08 != 0 {
        return None;
    }
    let mut at = 5;
    let window = if single {
        None
    } else {
        at += 1;
        Some(*frame.get(5)?)
    };
    at += match (fcs_flag, single) {
        (0, true) => 1,
        (0, false) => 0,
        (1, _) => 2,
        (2, _) => 4,
        _ => 8,
    };
    let blocks = frame.get(at..)?;
    // A window that covers what the outcome's single segment covered (its
    // whole content, rounded up to a power of two), or the outcome's own.
    let window = window.unwrap_or_else(|| {
        let log = (64 - content.max(1024).saturating_sub(1).leading_zeros()).max(10) as u8;
        (log - 10) << 3
    });
    let total = content.checked_add(prefix.len() as u64)?;
    let mut out = Vec::with_capacity(frame.len() + prefix.len() + 16);
    out.extend_from_slice(&MAGIC);
    out.push(0xC0); // 8-byte content size, windowed, no checksum, no dictionary
    out.push(window);
    out.extend_from_slice(&total.to_le_bytes());
    let raw_block = (prefix.len() as u32) << 3; // not last, raw, size
    out.extend_from_slice(&raw_block.to_le_bytes()[..3]);
    out.extend_from_slice(prefix);
    out.extend_from_slice(blocks);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::decode_all;
    use zstd::stream::raw::CParameter;

    /// One zstd frame of `data` whose header declares a window of
    /// 2^`window_log` bytes and no content size (as a streaming encoder
    /// writes it): a decoder must allocate that window before the first byte.
    fn frame_with_window(data: &[u8], window_log: u32) -> Vec<u8> {
        let mut enc = Encoder::new(3).unwrap();
        enc.set_parameter(CParameter::WindowLog(window_log)).unwrap();
        let mut out = vec![0u8; data.len() + 1024];
        let mut output = OutBuffer::around(&mut out[..]);
        let mut input = InBuffer::around(data);
        enc.run(&mut input, &mut output).unwrap();
        assert_eq!(enc.finish(&mut output, true).unwrap(), 0);
        let n = output.pos();
        out.truncate(n);
        out
    }

    /// A 20-byte message declaring a 128 MiB window made the decoder
    /// allocate 128 MiB whatever `max_decoded` said: the window now follows
    /// the limit (at least 2 MiB, at most 8 MiB).
    #[test]
    fn the_window_a_frame_may_declare_follows_the_decoded_limit() {
        let small = Limits { max_encoded: 1 << 20, max_decoded: 1 << 20 };
        let big_window = frame_with_window(b"a tiny message", 27);
        let err = decode_all(&Zstd::default(), &big_window, small).unwrap_err();
        assert!(matches!(err, CodecError::Corrupt { .. }), "{err:?}");
        assert!(err.to_string().to_lowercase().contains("window") || err.to_string().contains("memory"), "{err}");
        // Under the default limits the cap is 8 MiB: zstd's own default (128 MiB) no longer applies.
        assert!(decode_all(&Zstd::default(), &big_window, Limits::default()).is_err());
        // What zstd levels up to 19 declare still decodes, and so does what our encoders write.
        let ok = frame_with_window(b"a tiny message", 23);
        assert_eq!(decode_all(&Zstd::default(), &ok, Limits::default()).unwrap(), b"a tiny message");
        let ours = crate::codec::encode_to_vec(&Zstd::default(), Bytes::from_static(b"ours")).unwrap();
        assert_eq!(decode_all(&Zstd::default(), &ours, small).unwrap(), b"ours");
        let two_mib = frame_with_window(b"level 3, unknown size", 21);
        let tiny = Limits { max_encoded: 1 << 10, max_decoded: 1 << 10 };
        assert_eq!(decode_all(&Zstd::default(), &two_mib, tiny).unwrap(), b"level 3, unknown size");
    }

    #[test]
    fn window_log_max_is_the_limit_rounded_up_within_bounds() {
        let at = |max_decoded| window_log_max(&Limits { max_encoded: 1, max_decoded });
        assert_eq!(at(1), WINDOW_LOG_MIN);
        assert_eq!(at(1 << 21), 21);
        assert_eq!(at((1 << 22) + 1), 23);
        assert_eq!(at(u64::MAX), WINDOW_LOG_MAX);
    }
}
