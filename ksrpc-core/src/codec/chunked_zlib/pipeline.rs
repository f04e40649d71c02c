//! The ordered pipeline of the encoder: the payload is cut into slices that
//! are compressed in parallel on the rayon pool, and emitted in order as
//! soon as each is ready, with at most two slices per worker in flight.

use std::collections::VecDeque;
use std::sync::mpsc;

use bytes::{Bytes, BytesMut};

use super::writer::compress_slice;
use super::Level;
use crate::codec::{CodecError, Flow};

/// Cuts the payload into slices of `slice_size` and compresses them in
/// parallel on the rayon pool, emitting them in order as soon as each is
/// ready. A single small slice is compressed inline (no hand-off for small
/// replies).
pub(super) fn encode_slices(
    slice_size: usize,
    level: Level,
    with_border: bool,
    payload: &mut dyn Iterator<Item = Bytes>,
    emit: &mut dyn FnMut(Bytes) -> Flow,
) -> Result<(), CodecError> {
    let size = slice_size.max(1);
    let window = 2 * rayon::current_num_threads().max(1);
    let mut inflight: VecDeque<mpsc::Receiver<Vec<u8>>> = VecDeque::new();
    // The first slice waits until we know whether a second one exists.
    let mut first: Option<Bytes> = None;

    {
        let mut submit = |slice: Bytes, inflight: &mut VecDeque<mpsc::Receiver<Vec<u8>>>| -> Result<(), CodecError> {
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
