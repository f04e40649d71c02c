//! The decoders of both forms: the HTTP body (`z(s1) BORDER z(s2) BORDER
//! ...`, fed as it streams in) and the WebSocket message sequence (binary
//! slices, text borders, text `EOF`), each inflating under [`Limits`].

use std::fmt;

use bytes::{Buf, BytesMut};
use memchr::memmem;

use super::{BORDER, EOF};
use crate::codec::inflate::SliceInflater;
use crate::codec::{CodecError, Limits, StreamDecoder};

/// Decoder of the HTTP body form: `z(s1) BORDER z(s2) BORDER ...`.
pub(super) struct HttpDecoder {
    buf: BytesMut,
    /// Bytes of `buf` already known to hold no complete border.
    scanned: usize,
    seen: u64,
    limits: Limits,
    max_slice: usize,
    inflater: SliceInflater,
}

impl HttpDecoder {
    /// A decoder under `limits` refusing encoded slices over `max_slice`.
    pub(super) fn new(limits: Limits, max_slice: usize) -> Self {
        HttpDecoder {
            buf: BytesMut::new(),
            scanned: 0,
            seen: 0,
            limits,
            max_slice,
            inflater: SliceInflater::new(limits),
        }
    }
}

impl StreamDecoder for HttpDecoder {
    fn feed(&mut self, bytes: &[u8]) -> Result<(), CodecError> {
        self.seen += bytes.len() as u64;
        if self.seen > self.limits.max_encoded {
            return Err(CodecError::EncodedTooLarge { limit: self.limits.max_encoded });
        }
        self.buf.extend_from_slice(bytes);
        loop {
            // A border may straddle two feeds: rescan the last 14 bytes.
            let from = self.scanned.saturating_sub(BORDER.len() - 1);
            match memmem::find(&self.buf[from..], BORDER) {
                Some(at) => {
                    let end = from + at;
                    self.inflater.slice(&self.buf[..end])?;
                    self.buf.advance(end + BORDER.len());
                    self.scanned = 0;
                }
                None => {
                    self.scanned = self.buf.len();
                    if self.buf.len() > self.max_slice + BORDER.len() {
                        return Err(CodecError::MissingBorder { limit: self.max_slice });
                    }
                    return Ok(());
                }
            }
        }
    }

    fn finish(self: Box<Self>) -> Result<Vec<u8>, CodecError> {
        if !self.buf.is_empty() {
            return Err(CodecError::Truncated { pending: self.buf.len() });
        }
        if self.inflater.slices() == 0 {
            return Err(CodecError::Empty);
        }
        Ok(self.inflater.into_payload())
    }

    fn buffered(&self) -> u64 {
        self.buf.len() as u64 + self.inflater.decoded()
    }
}

/// What a WebSocket text message meant to the decoder.
#[derive(Debug, PartialEq, Eq)]
pub enum WsEvent {
    /// The message sequence goes on.
    More,
    /// [`EOF`] arrived: the decoded payload.
    Done(Vec<u8>),
}

/// Decoder of the WebSocket message sequence: binary slices, text borders,
/// text [`EOF`]. Unknown text messages are ignored, as the 0.8.1 client does.
pub struct WsDecoder {
    pending: Vec<u8>,
    seen: u64,
    limits: Limits,
    max_slice: usize,
    inflater: SliceInflater,
}

impl fmt::Debug for WsDecoder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WsDecoder")
            .field("pending", &self.pending.len())
            .field("seen", &self.seen)
            .field("slices", &self.inflater.slices())
            .finish()
    }
}

impl WsDecoder {
    /// A decoder under `limits` refusing encoded slices over `max_slice`.
    pub(super) fn new(limits: Limits, max_slice: usize) -> Self {
        WsDecoder { pending: Vec::new(), seen: 0, limits, max_slice, inflater: SliceInflater::new(limits) }
    }

    /// A binary message: (part of) a compressed slice.
    pub fn binary(&mut self, data: &[u8]) -> Result<(), CodecError> {
        self.seen += data.len() as u64;
        if self.seen > self.limits.max_encoded {
            return Err(CodecError::EncodedTooLarge { limit: self.limits.max_encoded });
        }
        if self.pending.len() + data.len() > self.max_slice {
            return Err(CodecError::SliceTooLarge { limit: self.max_slice });
        }
        self.pending.extend_from_slice(data);
        Ok(())
    }

    /// A text message: a border ends a slice, [`EOF`] ends the payload.
    pub fn text(&mut self, text: &str) -> Result<WsEvent, CodecError> {
        if text.as_bytes() == BORDER {
            let piece = std::mem::take(&mut self.pending);
            self.inflater.slice(&piece)?;
            Ok(WsEvent::More)
        } else if text == EOF {
            if !self.pending.is_empty() {
                return Err(CodecError::Truncated { pending: self.pending.len() });
            }
            if self.inflater.slices() == 0 {
                return Err(CodecError::Empty);
            }
            let done = std::mem::replace(&mut self.inflater, SliceInflater::new(self.limits));
            self.seen = 0;
            Ok(WsEvent::Done(done.into_payload()))
        } else {
            Ok(WsEvent::More)
        }
    }

    /// Encoded bytes of the slice not yet ended by a border.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Bytes the decoder holds (a slice not yet inflated, and output), for
    /// the memory budget.
    pub fn buffered(&self) -> u64 {
        self.pending.len() as u64 + self.inflater.decoded()
    }

    /// Bytes received since the last complete slice (for idle-timeout logs).
    pub fn has_partial(&self) -> bool {
        !self.pending.is_empty() || self.inflater.slices() > 0
    }
}
