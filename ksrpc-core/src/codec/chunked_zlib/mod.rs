//! The chunked-zlib framing of ksrpc 0.8.1: the payload is cut into slices,
//! each compressed on its own into a complete zlib stream. Over HTTP every
//! slice is followed by [`BORDER`]; over WebSocket a slice is one binary
//! message, the border one text message, and [`EOF`] a final text message.
//!
//! One job per module: the level setting (`level`), the ordered parallel
//! pipeline that cuts and compresses slices (`pipeline`), the zlib writer of
//! one slice (`writer`), and the decoders of both forms (`decode`); this
//! module holds the framing constants and the codec itself.

mod decode;
mod level;
mod pipeline;
mod writer;

use bytes::Bytes;
use memchr::memmem;

use super::{Codec, CodecError, Flow, Limits, StreamDecoder};
use decode::HttpDecoder;
pub use decode::{WsDecoder, WsEvent};
pub use level::{Level, LevelParseError};

/// The 15-byte separator after every slice: CR CR CR, space, `ChUnKeD`, space, LF LF LF.
pub const BORDER: &[u8; 15] = b"\r\r\r ChUnKeD \n\n\n";
/// The text message that ends a WebSocket message sequence.
pub const EOF: &str = "EOF";
/// Slice size of the 0.8.1 client and server: 128 KiB.
pub const DEFAULT_SLICE_SIZE: usize = 128 * 1024;
/// Largest encoded slice a peer may send before a border; the 0.8.1 client's
/// slices are at most ~128 KiB, so 4 MiB is generous and still refuses a
/// border-less body early.
pub const DEFAULT_MAX_ENCODED_SLICE: usize = 4 << 20;

/// The chunked-zlib codec (HTTP framing through [`Codec`]; WebSocket framing
/// through [`ChunkedZlib::encode_ws`] and [`WsDecoder`]).
#[derive(Clone, Debug)]
pub struct ChunkedZlib {
    /// Payload bytes per slice (the last slice may be shorter).
    pub slice_size: usize,
    /// Compression level of each slice.
    pub level: Level,
    /// Largest encoded slice accepted when decoding.
    pub max_encoded_slice: usize,
}

impl Default for ChunkedZlib {
    fn default() -> Self {
        ChunkedZlib { slice_size: DEFAULT_SLICE_SIZE, level: Level::Auto, max_encoded_slice: DEFAULT_MAX_ENCODED_SLICE }
    }
}

/// One piece of WebSocket output.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WsFrame {
    /// A binary message: one compressed slice.
    Binary(Bytes),
    /// A text message ([`BORDER`] or [`EOF`]).
    Text(&'static str),
}

impl ChunkedZlib {
    /// A codec with the given level and default slice size.
    pub fn with_level(level: Level) -> Self {
        ChunkedZlib { level, ..ChunkedZlib::default() }
    }

    /// Encodes for WebSocket: per slice a binary frame and a border text
    /// frame, then [`EOF`].
    pub fn encode_ws(
        &self,
        payload: &mut dyn Iterator<Item = Bytes>,
        emit: &mut dyn FnMut(WsFrame) -> Flow,
    ) -> Result<(), CodecError> {
        let border = std::str::from_utf8(BORDER).expect("border is ASCII");
        self.encode_slices(payload, false, &mut |slice| {
            emit(WsFrame::Binary(slice))?;
            emit(WsFrame::Text(border))
        })?;
        match emit(WsFrame::Text(EOF)) {
            Flow::Continue(()) => Ok(()),
            Flow::Break(()) => Err(CodecError::Cancelled),
        }
    }

    /// The WebSocket frames of a body in the HTTP form (`z(s1) BORDER ...`,
    /// as [`Codec::encode`] makes it, where no slice contains the border):
    /// each slice as a binary frame (a view, not a copy) and a border text
    /// frame. [`EOF`] is not included. The result cache keeps one form and
    /// serves both transports from it.
    pub fn ws_frames_of_http(body: &Bytes) -> Vec<WsFrame> {
        let border = std::str::from_utf8(BORDER).expect("border is ASCII");
        let mut frames = Vec::new();
        let mut at = 0;
        for end in memmem::find_iter(body, BORDER) {
            frames.push(WsFrame::Binary(body.slice(at..end)));
            frames.push(WsFrame::Text(border));
            at = end + BORDER.len();
        }
        frames
    }

    /// A WebSocket message-sequence decoder under `limits`.
    pub fn ws_decoder(&self, limits: Limits) -> WsDecoder {
        WsDecoder::new(limits, self.max_encoded_slice)
    }

    fn encode_slices(
        &self,
        payload: &mut dyn Iterator<Item = Bytes>,
        with_border: bool,
        emit: &mut dyn FnMut(Bytes) -> Flow,
    ) -> Result<(), CodecError> {
        pipeline::encode_slices(self.slice_size, self.level, with_border, payload, emit)
    }
}

impl Codec for ChunkedZlib {
    fn name(&self) -> &'static str {
        "chunked-zlib"
    }

    fn encode(
        &self,
        payload: &mut dyn Iterator<Item = Bytes>,
        emit: &mut dyn FnMut(Bytes) -> Flow,
    ) -> Result<(), CodecError> {
        self.encode_slices(payload, true, emit)
    }

    fn decoder(&self, limits: Limits) -> Box<dyn StreamDecoder> {
        Box::new(HttpDecoder::new(limits, self.max_encoded_slice))
    }
}
