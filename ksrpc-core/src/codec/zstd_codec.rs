//! The zstd codec of the native protocol: one zstd stream per message, with
//! the same [`Limits`] as the chunked-zlib codec.

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
