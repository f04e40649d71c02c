//! The zstd codec of the native protocol: one zstd stream per message, with
//! the same [`Limits`] as the chunked-zlib codec.

use bytes::Bytes;
use zstd::stream::raw::{Decoder, Encoder, InBuffer, Operation, OutBuffer};

use super::{Codec, CodecError, Flow, Limits, StreamDecoder};

/// Output is emitted in pieces of about this size.
const PIECE: usize = 128 * 1024;

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
            None => self.dec.insert(Decoder::new().map_err(io_err)?),
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
}
