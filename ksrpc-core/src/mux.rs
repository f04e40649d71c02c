//! Framing of the multiplexed WebSocket (`GET {path}/v2/ws`).
//!
//! Many native messages travel on one socket at once, in both directions. A
//! message (zstd-compressed, see [`crate::native`]) is cut into slices of at
//! most [`SLICE`] bytes and every slice is one binary WebSocket message:
//!
//! ```text
//! flags: u8 | varint(stream id) | [varint(total encoded length) if flags & TOTAL] | slice bytes
//! ```
//!
//! - `FIN` (bit 0) marks a message's last slice; `TOTAL` (bit 1) may be set
//!   on a first slice to announce the message's encoded length (progress
//!   bars). Other bits are reserved and refused.
//! - The stream id is the request id of the message (`Call`, `Next`,
//!   `Cancel`; any unused id for `CloseHandle`), and a reply uses the id of
//!   its request, so slices of different messages interleave freely: a big
//!   reply does not hold a small one behind it.
//! - [`Reassembler`] joins slices under [`Limits`]: bytes per message, bytes
//!   held for all unfinished messages, and a cap on unfinished messages.

use std::collections::HashMap;

use bytes::{BufMut, Bytes, BytesMut};

use crate::codec::Limits;

/// The last slice of a message.
pub const FIN: u8 = 1;
/// A varint total length follows the stream id.
pub const TOTAL: u8 = 2;
/// Bytes of a message per WebSocket frame. Small enough that a small reply
/// waits at most one such frame behind a big one.
pub const SLICE: usize = 256 * 1024;
/// Most unfinished messages a peer may have open at once.
pub const MAX_OPEN_STREAMS: usize = 1024;
/// The largest frame a peer sends: a slice plus the longest header.
pub const MAX_FRAME: usize = SLICE + 1 + 10 + 10;

/// Every way a frame is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MuxError {
    /// The frame is too short or its header is malformed.
    #[error("malformed frame: {0}")]
    Malformed(&'static str),
    /// Reserved flag bits are set.
    #[error("reserved frame flags {0:#04x}")]
    ReservedFlags(u8),
    /// One message grew past [`Limits::max_encoded`].
    #[error("message {id} exceeds the limit of {limit} bytes")]
    MessageTooLarge {
        /// The stream.
        id: u64,
        /// The limit.
        limit: u64,
    },
    /// The unfinished messages together hold more than [`Limits::max_encoded`].
    #[error("unfinished messages exceed the limit of {limit} bytes")]
    BufferedTooLarge {
        /// The limit.
        limit: u64,
    },
    /// More than [`MAX_OPEN_STREAMS`] unfinished messages.
    #[error("more than {MAX_OPEN_STREAMS} unfinished messages")]
    TooManyStreams,
}

fn put_varint(out: &mut BytesMut, mut v: u64) {
    while v >= 0x80 {
        out.put_u8((v as u8) | 0x80);
        v >>= 7;
    }
    out.put_u8(v as u8);
}

fn take_varint(buf: &mut &[u8]) -> Result<u64, MuxError> {
    let mut v = 0u64;
    for i in 0..10 {
        let (&b, rest) = buf.split_first().ok_or(MuxError::Malformed("truncated varint"))?;
        *buf = rest;
        if i == 9 && b > 1 {
            return Err(MuxError::Malformed("varint overflows 64 bits"));
        }
        v |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err(MuxError::Malformed("varint longer than 10 bytes"))
}

/// One frame's header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// The stream (request) id.
    pub id: u64,
    /// Last slice of the message.
    pub fin: bool,
    /// The message's encoded length, when announced.
    pub total: Option<u64>,
}

/// Builds one frame.
pub fn frame(header: Header, slice: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(slice.len() + 21);
    let flags = if header.fin { FIN } else { 0 } | if header.total.is_some() { TOTAL } else { 0 };
    out.put_u8(flags);
    put_varint(&mut out, header.id);
    if let Some(total) = header.total {
        put_varint(&mut out, total);
    }
    out.put_slice(slice);
    out.freeze()
}

/// Reads a frame's header; returns it and the slice.
pub fn parse(frame: &[u8]) -> Result<(Header, &[u8]), MuxError> {
    let (&flags, mut rest) = frame.split_first().ok_or(MuxError::Malformed("empty frame"))?;
    if flags & !(FIN | TOTAL) != 0 {
        return Err(MuxError::ReservedFlags(flags));
    }
    let id = take_varint(&mut rest)?;
    let total = if flags & TOTAL != 0 { Some(take_varint(&mut rest)?) } else { None };
    Ok((Header { id, fin: flags & FIN != 0, total }, rest))
}

/// Cuts an encoded message into frames of at most [`SLICE`] bytes each; a
/// message of more than one slice announces its total on the first.
pub fn frames(id: u64, message: &Bytes) -> impl Iterator<Item = Bytes> + '_ {
    let n = message.len().div_ceil(SLICE).max(1);
    (0..n).map(move |i| {
        let start = i * SLICE;
        let end = (start + SLICE).min(message.len());
        let total = (i == 0 && n > 1).then_some(message.len() as u64);
        frame(Header { id, fin: i + 1 == n, total }, &message[start..end])
    })
}

/// Joins slices into whole messages, under limits.
#[derive(Debug)]
pub struct Reassembler {
    limits: Limits,
    open: HashMap<u64, Open>,
    buffered: u64,
}

impl Reassembler {
    /// An empty reassembler enforcing `limits.max_encoded` per message and
    /// over all unfinished messages together.
    pub fn new(limits: Limits) -> Self {
        Reassembler { limits, open: HashMap::new(), buffered: 0 }
    }

    /// Takes one frame; returns the stream id, the total its first slice
    /// announced (if any) and the bytes received so far for it, and the
    /// whole message once its last slice arrived.
    pub fn push(&mut self, frame: &[u8]) -> Result<Pushed, MuxError> {
        let (header, slice) = parse(frame)?;
        let limit = self.limits.max_encoded;
        let open = self.open.get(&header.id);
        let have = open.map_or(0, |o| o.bytes.len()) as u64;
        let total = open.and_then(|o| o.total).or(header.total);
        let grown = have + slice.len() as u64;
        if grown > limit || total.is_some_and(|t| t > limit) {
            return Err(MuxError::MessageTooLarge { id: header.id, limit });
        }
        let pushed = |message| Pushed { id: header.id, received: grown, total, message };
        if header.fin && open.is_none() {
            return Ok(pushed(Some(slice.to_vec())));
        }
        if self.buffered + slice.len() as u64 > limit {
            return Err(MuxError::BufferedTooLarge { limit });
        }
        if open.is_none() && self.open.len() >= MAX_OPEN_STREAMS {
            return Err(MuxError::TooManyStreams);
        }
        // No capacity is reserved from an announced total: a peer cannot
        // make us allocate ahead of the bytes it actually sent.
        let entry = self.open.entry(header.id).or_insert_with(|| Open { bytes: Vec::new(), total });
        entry.bytes.extend_from_slice(slice);
        self.buffered += slice.len() as u64;
        if header.fin {
            let message = self.open.remove(&header.id).map(|o| o.bytes).unwrap_or_default();
            self.buffered -= message.len() as u64;
            return Ok(pushed(Some(message)));
        }
        Ok(pushed(None))
    }

    /// Forgets an unfinished message (its call was cancelled).
    pub fn forget(&mut self, id: u64) {
        if let Some(o) = self.open.remove(&id) {
            self.buffered -= o.bytes.len() as u64;
        }
    }

    /// Bytes of half-received messages held.
    pub fn buffered(&self) -> u64 {
        self.buffered
    }

    /// Unfinished messages.
    pub fn open_streams(&self) -> usize {
        self.open.len()
    }
}

/// An unfinished message.
#[derive(Debug)]
struct Open {
    bytes: Vec<u8>,
    /// The total its first slice announced.
    total: Option<u64>,
}

/// What [`Reassembler::push`] learnt from a frame.
#[derive(Debug)]
pub struct Pushed {
    /// The stream.
    pub id: u64,
    /// Bytes of this message received so far.
    pub received: u64,
    /// The total the message's first slice announced, if it did.
    pub total: Option<u64>,
    /// The whole encoded message, when this was its last slice.
    pub message: Option<Vec<u8>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(n: u64) -> Limits {
        Limits { max_encoded: n, max_decoded: n }
    }

    #[test]
    fn round_trip_interleaved() {
        let a = Bytes::from((0..(3 * SLICE + 17)).map(|i| i as u8).collect::<Vec<_>>());
        let b = Bytes::from_static(b"small");
        let mut r = Reassembler::new(Limits::default());
        let mut fa = frames(7, &a);
        let first = r.push(&fa.next().unwrap()).unwrap();
        assert_eq!(first.total, Some(a.len() as u64));
        assert!(first.message.is_none());
        // a small message completes while the big one is half-way
        let small = r.push(&frames(u64::MAX, &b).next().unwrap()).unwrap();
        assert_eq!((small.id, small.message.as_deref()), (u64::MAX, Some(&b"small"[..])));
        let mut done = None;
        for f in fa {
            let p = r.push(&f).unwrap();
            assert_eq!(p.total, Some(a.len() as u64), "every slice reports the announced total");
            done = p.message;
        }
        assert_eq!(done.as_deref(), Some(&a[..]));
        assert_eq!(r.open_streams(), 0);
        assert_eq!(r.buffered, 0);
    }

    #[test]
    fn empty_message_is_one_frame() {
        let frames: Vec<_> = frames(1, &Bytes::new()).collect();
        assert_eq!(frames.len(), 1);
        let mut r = Reassembler::new(Limits::default());
        assert_eq!(r.push(&frames[0]).unwrap().message, Some(Vec::new()));
    }

    #[test]
    fn hostile_headers_are_refused() {
        let mut r = Reassembler::new(Limits::default());
        assert_eq!(r.push(&[]).unwrap_err(), MuxError::Malformed("empty frame"));
        assert_eq!(r.push(&[0x80, 1]).unwrap_err(), MuxError::ReservedFlags(0x80));
        assert_eq!(r.push(&[FIN, 0x80]).unwrap_err(), MuxError::Malformed("truncated varint"));
        assert!(matches!(
            r.push(&[FIN, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f]),
            Err(MuxError::Malformed(_))
        ));
        assert_eq!(r.push(&[FIN | TOTAL, 1]).unwrap_err(), MuxError::Malformed("truncated varint"));
    }

    #[test]
    fn limits_per_message_buffered_and_streams() {
        let mut r = Reassembler::new(limits(100));
        r.push(&frame(Header { id: 1, fin: false, total: None }, &[0; 60])).unwrap();
        assert_eq!(
            r.push(&frame(Header { id: 1, fin: true, total: None }, &[0; 41])).unwrap_err(),
            MuxError::MessageTooLarge { id: 1, limit: 100 }
        );
        assert_eq!(
            r.push(&frame(Header { id: 2, fin: false, total: None }, &[0; 41])).unwrap_err(),
            MuxError::BufferedTooLarge { limit: 100 }
        );
        assert_eq!(
            r.push(&frame(Header { id: 3, fin: false, total: Some(1 << 40) }, &[])).unwrap_err(),
            MuxError::MessageTooLarge { id: 3, limit: 100 }
        );
        r.forget(1);
        assert_eq!(r.buffered, 0);
        let mut r = Reassembler::new(Limits::default());
        for id in 0..MAX_OPEN_STREAMS as u64 {
            r.push(&frame(Header { id, fin: false, total: None }, b"x")).unwrap();
        }
        let extra = frame(Header { id: u64::MAX, fin: false, total: None }, b"x");
        assert_eq!(r.push(&extra).unwrap_err(), MuxError::TooManyStreams);
        // an open stream may still grow
        r.push(&frame(Header { id: 5, fin: true, total: None }, b"y")).unwrap();
    }

    #[test]
    fn an_empty_first_slice_does_not_leave_the_stream_open() {
        let mut r = Reassembler::new(Limits::default());
        assert!(r.push(&frame(Header { id: 5, fin: false, total: Some(3) }, b"")).unwrap().message.is_none());
        assert_eq!(
            r.push(&frame(Header { id: 5, fin: true, total: None }, b"abc")).unwrap().message.as_deref(),
            Some(&b"abc"[..])
        );
        assert_eq!(r.open_streams(), 0);
    }

    #[test]
    fn varints_round_trip() {
        for v in [0, 1, 127, 128, 300, u64::from(u32::MAX), u64::MAX] {
            let f = frame(Header { id: v, fin: true, total: Some(v) }, b"z");
            let (h, s) = parse(&f).unwrap();
            assert_eq!((h.id, h.total, s), (v, Some(v), &b"z"[..]));
        }
    }
}
