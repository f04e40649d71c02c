//! Bounded zlib inflation of one slice at a time, shared by the HTTP and
//! WebSocket decoders of the chunked-zlib framing.

use std::sync::Mutex;

use flate2::{Decompress, FlushDecompress, Status};

use super::{CodecError, Limits};

/// How much output space is added per step; bounds over-allocation when a
/// slice turns out to exceed the decoded limit.
const STEP: usize = 256 * 1024;

/// The most one slice may inflate to: 64 times the 128 KiB slices the
/// 0.8.1 client (and ours) send. It bounds the work of decoding one slice
/// (a few milliseconds), and a bomb is refused at its first slice.
pub const MAX_DECODED_SLICE: u64 = 8 << 20;

/// Inflate states kept for reuse across messages: a fresh one costs an
/// allocation and zeroing per request.
static POOL: Mutex<Vec<Decompress>> = Mutex::new(Vec::new());
const POOL_CAP: usize = 64;

/// Accumulates the decoded payload of one message, slice by slice.
pub(crate) struct SliceInflater {
    out: Vec<u8>,
    limits: Limits,
    slices: usize,
    /// Always `Some` until dropped (then returned to the pool).
    inflater: Option<Decompress>,
}

impl SliceInflater {
    pub(crate) fn new(limits: Limits) -> Self {
        let inflater = POOL.lock().ok().and_then(|mut p| p.pop()).unwrap_or_else(|| Decompress::new(true));
        SliceInflater { out: Vec::new(), limits, slices: 0, inflater: Some(inflater) }
    }

    /// Inflates one complete zlib stream and appends its output, stopping as
    /// soon as the decoded limit would be passed.
    pub(crate) fn slice(&mut self, piece: &[u8]) -> Result<(), CodecError> {
        let index = self.slices;
        if piece.is_empty() {
            return Err(CodecError::EmptySlice { index });
        }
        let inflater = self.inflater.as_mut().expect("present until dropped");
        inflater.reset(true);
        // Past the message's limit: DecodedTooLarge; past the slice's own
        // bound (reached first when more room is left): SliceInflatesTooMuch.
        let message_limit = self.limits.max_decoded;
        let slice_limit = (self.out.len() as u64).saturating_add(MAX_DECODED_SLICE);
        let limit = message_limit.min(slice_limit);
        let too_large = |limit: u64| {
            if limit == message_limit {
                CodecError::DecodedTooLarge { limit }
            } else {
                CodecError::SliceInflatesTooMuch { index, limit: MAX_DECODED_SLICE }
            }
        };
        loop {
            let room = limit.saturating_sub(self.out.len() as u64);
            // One byte beyond the limit lets us tell "exactly at" from "over".
            let want = (room.saturating_add(1)).min(STEP as u64) as usize;
            let need = self.out.len() + want;
            if need > self.out.capacity() {
                // Grow geometrically, but never past limit + 1: a bomb costs
                // at most the limit, not twice it.
                let cap_max = usize::try_from(limit.saturating_add(1)).unwrap_or(usize::MAX);
                let target = (self.out.capacity().saturating_mul(2)).min(cap_max).max(need);
                self.out.reserve_exact(target - self.out.len());
            }
            let in_before = inflater.total_in();
            let out_before = self.out.len();
            let consumed = in_before as usize;
            let status = inflater
                .decompress_vec(&piece[consumed..], &mut self.out, FlushDecompress::None)
                .map_err(|e| CodecError::Corrupt { index, reason: e.to_string() })?;
            if self.out.len() as u64 > limit {
                self.out = Vec::new();
                return Err(too_large(limit));
            }
            let used = inflater.total_in() as usize;
            match status {
                Status::StreamEnd => {
                    if used != piece.len() {
                        return Err(CodecError::TrailingBytes { index, extra: piece.len() - used });
                    }
                    break;
                }
                Status::Ok | Status::BufError => {
                    let progressed = inflater.total_in() != in_before || self.out.len() != out_before;
                    if used == piece.len() && !progressed {
                        return Err(CodecError::TruncatedSlice { index });
                    }
                    if !progressed && self.out.len() as u64 == limit {
                        // No room left and the stream wants to go on.
                        return Err(too_large(limit));
                    }
                }
            }
        }
        self.slices += 1;
        Ok(())
    }

    /// Decoded bytes held so far.
    pub(crate) fn decoded(&self) -> u64 {
        self.out.len() as u64
    }

    pub(crate) fn slices(&self) -> usize {
        self.slices
    }

    pub(crate) fn into_payload(mut self) -> Vec<u8> {
        std::mem::take(&mut self.out)
    }
}

impl Drop for SliceInflater {
    fn drop(&mut self) {
        if let Ok(mut pool) = POOL.lock() {
            if pool.len() < POOL_CAP {
                pool.extend(self.inflater.take());
            }
        }
    }
}
