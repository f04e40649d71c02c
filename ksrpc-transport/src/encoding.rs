//! When native encoding and decoding leave the async worker: small messages
//! are (de)coded inline, big ones on the blocking pool. Both transports
//! follow this one policy.

use actix_web::web;
use ksrpc_core::codec::Limits;
use ksrpc_core::native::{self, ClientMessage, ServerMessage};
use ksrpc_core::Reservation;

use crate::TransportError;

/// Compressed bytes up to this many are inflated on the async worker (at
/// most a few milliseconds, bounded by `MAX_DECODED_SLICE` per slice); more
/// on the blocking pool. For HTTP bodies (a batch) and compat WS slices.
pub const INLINE_DECODE: usize = 4 * 1024;

/// What decoding a native message may hold: its bytes, and what it decodes
/// to (the declared size, or the limit when it declares none) with room for
/// the decoded values themselves.
pub fn decode_charge(wire: &[u8], limits: Limits) -> u64 {
    let decoded = native::declared_size(wire).unwrap_or(limits.max_decoded).min(limits.max_decoded);
    // every value takes at least one decoded byte and one slot in memory
    let slot = std::mem::size_of::<native::Value>() as u64;
    let values = native::MAX_VALUES as u64 * slot;
    wire.len() as u64 + decoded + decoded.saturating_mul(slot).min(values)
}

/// Decodes a native client message, on the blocking pool unless it is
/// small; `held` must already hold [`decode_charge`] and afterwards holds
/// the decoded message's weight.
pub async fn decode_client_message(
    wire: Vec<u8>,
    limits: Limits,
    held: &mut Reservation,
) -> Result<Result<ClientMessage, native::NativeError>, TransportError> {
    let message = if native::is_light(&wire, native::INLINE_BYTES) {
        native::decode_compressed::<ClientMessage>(&wire, limits)
    } else {
        web::block(move || native::decode_compressed::<ClientMessage>(&wire, limits))
            .await
            .map_err(|e| TransportError::Internal(Box::new(e)))?
    };
    if let Ok(m) = &message {
        held.force(message_weight(m));
    }
    Ok(message)
}

/// Roughly the bytes a decoded client message holds.
fn message_weight(m: &ClientMessage) -> u64 {
    match m {
        ClientMessage::Call { chain, .. } => chain
            .calls
            .iter()
            .filter_map(|c| c.args.as_ref())
            .flat_map(|a| a.positional.iter().chain(a.keyword.iter().map(|(_, v)| v)))
            .map(|v| v.weight() as u64)
            .sum::<u64>()
            .max(64),
        _ => 64,
    }
}

/// Encodes a server message, off the async worker when it is big.
pub async fn encode_server_message(message: ServerMessage) -> Result<Vec<u8>, TransportError> {
    let big = matches!(&message, ServerMessage::Reply { outcome: native::Outcome::Ok(v), .. } if v.weight() > native::INLINE_BYTES);
    if !big {
        return Ok(native::encode_compressed(&message));
    }
    web::block(move || native::encode_compressed(&message)).await.map_err(|e| TransportError::Internal(Box::new(e)))
}
