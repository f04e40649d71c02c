//! The chunked-zlib framing of ksrpc 0.8.1: the payload is cut into slices,
//! each compressed on its own into a complete zlib stream. Over HTTP every
//! slice is followed by [`BORDER`]; over WebSocket a slice is one binary
//! message, the border one text message, and [`EOF`] a final text message.

use std::collections::VecDeque;
use std::fmt;
use std::str::FromStr;
use std::sync::mpsc;

use bytes::{Buf, Bytes, BytesMut};
use flate2::{Compress, Compression, FlushCompress, Status};
use memchr::memmem;

use super::inflate::SliceInflater;
use super::{Codec, CodecError, Flow, Limits, StreamDecoder};

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

/// In `auto` mode, a slice whose level-1 sample shrinks less than this ratio
/// is sent as stored blocks: compressing random float64 data costs ~20x the
/// CPU for a few percent of bytes.
const AUTO_STORED_RATIO: f64 = 0.95;
/// Bytes of each slice that `auto` compresses at level 1 to judge it.
const AUTO_SAMPLE: usize = 16 * 1024;

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
        WsDecoder {
            pending: Vec::new(),
            seen: 0,
            limits,
            max_slice: self.max_encoded_slice,
            inflater: SliceInflater::new(limits),
        }
    }

    /// Cuts the payload into slices and compresses them in parallel on the
    /// rayon pool, emitting them in order as soon as each is ready. A single
    /// small slice is compressed inline (no hand-off for small replies).
    fn encode_slices(
        &self,
        payload: &mut dyn Iterator<Item = Bytes>,
        with_border: bool,
        emit: &mut dyn FnMut(Bytes) -> Flow,
    ) -> Result<(), CodecError> {
        let size = self.slice_size.max(1);
        let level = self.level;
        let window = 2 * rayon::current_num_threads().max(1);
        let mut inflight: VecDeque<mpsc::Receiver<Vec<u8>>> = VecDeque::new();
        // The first slice waits until we know whether a second one exists.
        let mut first: Option<Bytes> = None;

        {
            let mut submit =
                |slice: Bytes, inflight: &mut VecDeque<mpsc::Receiver<Vec<u8>>>| -> Result<(), CodecError> {
                    if inflight.len() >= window {
                        let rx = inflight.pop_front().expect("window is non-empty");
                        send(&rx, emit)?;
                    }
                    let (tx, rx) = mpsc::sync_channel(1);
                    rayon::spawn(move || {
                        // The receiver may be gone if the peer left; nothing to do then.
                        let _ = tx.send(compress_slice(&slice, level, with_border));
                    });
                    inflight.push_back(rx);
                    Ok(())
                };
            let mut push = |slice: Bytes,
                            first: &mut Option<Bytes>,
                            inflight: &mut VecDeque<mpsc::Receiver<Vec<u8>>>|
             -> Result<(), CodecError> {
                if let Some(f) = first.take() {
                    submit(f, inflight)?;
                    submit(slice, inflight)
                } else if inflight.is_empty() {
                    *first = Some(slice);
                    Ok(())
                } else {
                    submit(slice, inflight)
                }
            };

            let mut pending = BytesMut::new();
            for mut chunk in payload {
                while !chunk.is_empty() {
                    if pending.is_empty() && chunk.len() >= size {
                        push(chunk.split_to(size), &mut first, &mut inflight)?;
                        continue;
                    }
                    let take = (size - pending.len()).min(chunk.len());
                    pending.extend_from_slice(&chunk.split_to(take));
                    if pending.len() == size {
                        push(pending.split().freeze(), &mut first, &mut inflight)?;
                    }
                }
            }
            if !pending.is_empty() {
                push(pending.freeze(), &mut first, &mut inflight)?;
            }
        }
        if let Some(only) = first {
            let out = compress_slice(&only, level, with_border);
            return flow(emit(Bytes::from(out)));
        }
        while let Some(rx) = inflight.pop_front() {
            send(&rx, emit)?;
        }
        Ok(())
    }
}

fn flow(f: Flow) -> Result<(), CodecError> {
    match f {
        Flow::Continue(()) => Ok(()),
        Flow::Break(()) => Err(CodecError::Cancelled),
    }
}

fn send(rx: &mpsc::Receiver<Vec<u8>>, emit: &mut dyn FnMut(Bytes) -> Flow) -> Result<(), CodecError> {
    let out = rx.recv().map_err(|_| CodecError::Compress("a compression worker panicked".into()))?;
    flow(emit(Bytes::from(out)))
}

/// Compresses one slice into a complete zlib stream. With `with_border`
/// (HTTP, where the peer splits on [`BORDER`] blindly) the output never
/// contains the border and is followed by it; WebSocket binary messages are
/// never scanned, so they need no check.
pub(crate) fn compress_slice(data: &[u8], level: Level, with_border: bool) -> Vec<u8> {
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

/// The Adler-32 checksum that ends a zlib stream (RFC 1950).
fn adler32(data: &[u8]) -> u32 {
    const MOD: u32 = 65_521;
    let (mut a, mut b) = (1u32, 0u32);
    // 5552 is the most bytes that cannot overflow `b` before a reduction.
    for chunk in data.chunks(5552) {
        for &byte in chunk {
            a += u32::from(byte);
            b += a;
        }
        a %= MOD;
        b %= MOD;
    }
    (b << 16) | a
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
        Box::new(HttpDecoder {
            buf: BytesMut::new(),
            scanned: 0,
            seen: 0,
            limits,
            max_slice: self.max_encoded_slice,
            inflater: SliceInflater::new(limits),
        })
    }
}

/// Decoder of the HTTP body form: `z(s1) BORDER z(s2) BORDER ...`.
struct HttpDecoder {
    buf: BytesMut,
    /// Bytes of `buf` already known to hold no complete border.
    scanned: usize,
    seen: u64,
    limits: Limits,
    max_slice: usize,
    inflater: SliceInflater,
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
