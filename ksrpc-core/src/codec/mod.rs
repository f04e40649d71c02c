//! Codecs: how a payload becomes bytes on the wire and back.
//!
//! A [`Codec`] is independent of any transport. Encoding consumes an ordered
//! stream of payload chunks and emits wire pieces in order through a callback,
//! so a transport can start sending before the whole payload is encoded.
//! Decoding is incremental ([`StreamDecoder`]): the transport feeds bytes as
//! they arrive, split anywhere, and the decoder enforces [`Limits`] while it
//! goes, so a bomb or an oversized body is refused with bounded memory.

mod chunked_zlib;
mod inflate;
pub(crate) mod zstd_codec;

pub use chunked_zlib::{
    ChunkedZlib, Level, LevelParseError, WsDecoder, WsEvent, WsFrame, BORDER, DEFAULT_MAX_ENCODED_SLICE,
    DEFAULT_SLICE_SIZE, EOF,
};
pub use inflate::MAX_DECODED_SLICE;
pub use zstd_codec::Zstd;

use bytes::Bytes;

/// Size limits a decoder enforces while it decodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Most bytes accepted from the wire for one message.
    pub max_encoded: u64,
    /// Most bytes one message may decode to.
    pub max_decoded: u64,
}

impl Limits {
    /// Limits that refuse nothing a 64-bit address space could hold; for tests.
    pub const UNLIMITED: Limits = Limits { max_encoded: u64::MAX, max_decoded: u64::MAX };
}

impl Default for Limits {
    /// 256 MiB on the wire, 512 MiB decoded: a 100 MB upload passes, a
    /// 1 GiB-of-zeros bomb does not.
    fn default() -> Self {
        Limits { max_encoded: 256 << 20, max_decoded: 512 << 20 }
    }
}

/// Every way encoding or decoding can fail.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CodecError {
    /// More bytes arrived than [`Limits::max_encoded`] allows.
    #[error("request body exceeds the limit of {limit} bytes")]
    EncodedTooLarge {
        /// The limit that was exceeded.
        limit: u64,
    },
    /// The payload decodes to more than [`Limits::max_decoded`].
    #[error("payload decodes to more than the limit of {limit} bytes")]
    DecodedTooLarge {
        /// The limit that was exceeded.
        limit: u64,
    },
    /// One slice grew past the largest slice a peer may send without a border.
    #[error("no chunk border within {limit} bytes: not chunked-zlib framing")]
    MissingBorder {
        /// The largest encoded slice accepted.
        limit: usize,
    },
    /// A WebSocket binary slice (or several before a border) grew past the
    /// largest encoded slice accepted.
    #[error("an encoded slice is larger than the limit of {limit} bytes")]
    SliceTooLarge {
        /// The largest encoded slice accepted.
        limit: usize,
    },
    /// One slice inflates to more than [`MAX_DECODED_SLICE`]: clients send
    /// slices of 128 KiB, so this is a bomb, not a payload.
    #[error("slice {index} decodes past the limit of {limit} bytes for one slice (bomb?)")]
    SliceInflatesTooMuch {
        /// Zero-based index of the slice.
        index: usize,
        /// The most one slice may decode to.
        limit: u64,
    },
    /// A slice is not a valid zlib (or zstd) stream.
    #[error("slice {index} is corrupt: {reason}")]
    Corrupt {
        /// Zero-based index of the slice.
        index: usize,
        /// What the decompressor reported.
        reason: String,
    },
    /// A slice ended before its compressed stream did.
    #[error("slice {index} is truncated")]
    TruncatedSlice {
        /// Zero-based index of the slice.
        index: usize,
    },
    /// Bytes follow the end of a slice's compressed stream.
    #[error("slice {index} has {extra} bytes after its end")]
    TrailingBytes {
        /// Zero-based index of the slice.
        index: usize,
        /// How many bytes follow.
        extra: usize,
    },
    /// Two borders with nothing between them.
    #[error("empty slice {index}")]
    EmptySlice {
        /// Zero-based index of the slice.
        index: usize,
    },
    /// The message ended in the middle of a slice (no final border / EOF).
    #[error("message ends inside a slice ({pending} bytes after the last border)")]
    Truncated {
        /// Bytes received after the last complete slice.
        pending: usize,
    },
    /// The message carried no payload at all.
    #[error("empty message")]
    Empty,
    /// The consumer of encoded output went away; encoding stopped early.
    #[error("the receiver went away")]
    Cancelled,
    /// The compressor itself failed (should not happen; kept for honesty).
    #[error("compression failed: {0}")]
    Compress(String),
}

/// What an encoder's output callback answers: go on, or stop (the peer is gone).
pub type Flow = std::ops::ControlFlow<()>;

/// A payload codec: framing plus compression, with no knowledge of transports.
pub trait Codec: Send + Sync + std::fmt::Debug {
    /// A short name for logs (`chunked-zlib`, `zstd`).
    fn name(&self) -> &'static str;

    /// Encodes the payload given as ordered chunks; calls `emit` with each
    /// piece of wire bytes in order. Stops with [`CodecError::Cancelled`]
    /// when `emit` answers `Break`. Never emits an empty piece.
    fn encode(
        &self,
        payload: &mut dyn Iterator<Item = Bytes>,
        emit: &mut dyn FnMut(Bytes) -> Flow,
    ) -> Result<(), CodecError>;

    /// A decoder for one message under `limits`.
    fn decoder(&self, limits: Limits) -> Box<dyn StreamDecoder>;
}

/// Incremental decoder of one message.
pub trait StreamDecoder: Send {
    /// Feeds the next bytes of the message, split anywhere.
    fn feed(&mut self, bytes: &[u8]) -> Result<(), CodecError>;
    /// Ends the message and returns its payload.
    fn finish(self: Box<Self>) -> Result<Vec<u8>, CodecError>;
    /// Bytes the decoder holds now (input not yet decoded, and output), for
    /// the memory budget.
    fn buffered(&self) -> u64;
}

/// Encodes a whole payload into one buffer; for tests and small messages.
pub fn encode_to_vec(codec: &dyn Codec, payload: Bytes) -> Result<Vec<u8>, CodecError> {
    let mut out = Vec::new();
    codec.encode(&mut std::iter::once(payload), &mut |piece| {
        out.extend_from_slice(&piece);
        Flow::Continue(())
    })?;
    Ok(out)
}

/// Decodes a whole message in one go; for tests and small messages.
pub fn decode_all(codec: &dyn Codec, wire: &[u8], limits: Limits) -> Result<Vec<u8>, CodecError> {
    let mut dec = codec.decoder(limits);
    dec.feed(wire)?;
    dec.finish()
}
