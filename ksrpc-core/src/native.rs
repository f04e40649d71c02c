//! The native protocol's data model and messages (see `docs/protocol.md`).
//!
//! Unlike the compat protocol (pickles in, pickles out, so every request is
//! code), native messages carry explicit [`Value`]s that any language can
//! produce. Messages are serialized with postcard and carried by the
//! [`Zstd`](crate::codec::Zstd) codec. postcard rather than the design
//! card's bincode: bincode 3 is an empty release and 2.x is flagged
//! unmaintained, while postcard is maintained, serde-based, compact (varint
//! integers) and has a documented, stable wire format.
//!
//! Every message starts with the protocol version; a decoder refuses any
//! version it does not speak with [`NativeError::UnsupportedVersion`]
//! before reading further. Nesting is limited ([`MAX_DEPTH`]) so a hostile
//! message cannot exhaust the stack.

use std::cell::Cell;
use std::num::NonZeroU64;

use serde::{Deserialize, Deserializer, Serialize};
use serde_bytes::ByteBuf;

use crate::chain::CallChain;
use crate::codec::zstd_codec;
pub use crate::codec::zstd_codec::declared_size;

/// The native protocol version this build speaks.
pub const VERSION: u16 = 1;

/// Deepest nesting of values a decoder accepts.
pub const MAX_DEPTH: usize = 128;

/// Most values one message may hold. A value is a few bytes encoded but 32
/// in memory, so this bounds what decoding can allocate (128 MiB of values,
/// beside the bytes of strings and tables); big data goes as a `Table`.
pub const MAX_VALUES: usize = 4 << 20;

/// An explicit value: what a native call carries instead of a pickle.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub enum Value {
    /// Python `None`.
    None,
    /// A boolean.
    Bool(bool),
    /// An integer that fits in 64 bits.
    Int(i64),
    /// Any other integer, as decimal digits with an optional leading `-`.
    BigInt(String),
    /// A 64-bit float.
    Float(f64),
    /// A string.
    Str(String),
    /// Bytes.
    Bytes(ByteBuf),
    /// A list.
    List(Vec<Value>),
    /// A tuple.
    Tuple(Vec<Value>),
    /// A dict: ordered pairs, keys of any value type.
    Dict(Vec<(Value, Value)>),
    /// A lazy call chain, resolved on the server before the call (the
    /// compat protocol's `RpcClient` argument).
    Chain(Box<CallChain<Value>>),
    /// The `Self` marker: replaced by the object a builtin is applied to.
    SelfRef,
    /// A table as an Apache Arrow IPC stream (a DataFrame without pickle).
    Table(ByteBuf),
    /// A pickled Python object with no other form; accepted only from users
    /// who may send code anyway.
    Pickle(ByteBuf),
}

impl Value {
    /// Roughly how many bytes the value holds in memory (each value's own
    /// slot, plus strings, bytes and tables by length), which is also more
    /// than it takes encoded: the memory budget charges it, and transports
    /// encode small replies inline and big ones off the async workers.
    pub fn weight(&self) -> usize {
        const SLOT: usize = std::mem::size_of::<Value>();
        SLOT + match self {
            Value::Str(s) | Value::BigInt(s) => s.len(),
            Value::Bytes(b) | Value::Table(b) | Value::Pickle(b) => b.len(),
            Value::List(v) | Value::Tuple(v) => v.iter().map(Value::weight).sum::<usize>(),
            Value::Dict(v) => v.iter().map(|(k, v)| k.weight() + v.weight()).sum::<usize>(),
            Value::Chain(c) => {
                c.module.len()
                    + c.calls
                        .iter()
                        .map(|call| {
                            call.name.len()
                                + call.args.as_ref().map_or(0, |a| {
                                    a.positional.iter().map(Value::weight).sum::<usize>()
                                        + a.keyword.iter().map(|(k, v)| k.len() + v.weight()).sum::<usize>()
                                })
                        })
                        .sum::<usize>()
            }
            _ => 0,
        }
    }
}

macro_rules! value_from {
    ($($t:ty => $v:ident via $conv:expr),* $(,)?) => {
        $(impl From<$t> for Value {
            fn from(x: $t) -> Self {
                Value::$v($conv(x))
            }
        })*
    };
}

value_from! {
    bool => Bool via std::convert::identity,
    i8 => Int via i64::from,
    i16 => Int via i64::from,
    i32 => Int via i64::from,
    i64 => Int via std::convert::identity,
    u8 => Int via i64::from,
    u16 => Int via i64::from,
    u32 => Int via i64::from,
    f32 => Float via f64::from,
    f64 => Float via std::convert::identity,
    String => Str via std::convert::identity,
    &str => Str via str::to_owned,
}

/// Unsigned and 128-bit integers beyond `i64` become [`Value::BigInt`].
macro_rules! value_from_wide {
    ($($t:ty),*) => {
        $(impl From<$t> for Value {
            fn from(x: $t) -> Self {
                i64::try_from(x).map_or_else(|_| Value::BigInt(x.to_string()), Value::Int)
            }
        })*
    };
}
value_from_wide!(u64, usize, i128, u128);

impl From<()> for Value {
    fn from((): ()) -> Self {
        Value::None
    }
}

impl<T: Into<Value>> From<Option<T>> for Value {
    fn from(x: Option<T>) -> Self {
        x.map_or(Value::None, Into::into)
    }
}

impl<T: Into<Value>> From<Vec<T>> for Value {
    fn from(x: Vec<T>) -> Self {
        Value::List(x.into_iter().map(Into::into).collect())
    }
}

impl From<&[u8]> for Value {
    fn from(x: &[u8]) -> Self {
        Value::Bytes(ByteBuf::from(x))
    }
}

impl From<CallChain<Value>> for Value {
    fn from(chain: CallChain<Value>) -> Self {
        Value::Chain(Box::new(chain))
    }
}

/// The derived decoder of [`Value`]; [`Value`]'s own decoder wraps it with
/// the depth limit.
#[derive(Deserialize)]
#[serde(rename = "Value")]
enum ValueRepr {
    None,
    Bool(bool),
    Int(i64),
    BigInt(String),
    Float(f64),
    Str(String),
    Bytes(ByteBuf),
    List(Vec<Value>),
    Tuple(Vec<Value>),
    Dict(Vec<(Value, Value)>),
    Chain(Box<CallChain<Value>>),
    SelfRef,
    Table(ByteBuf),
    Pickle(ByteBuf),
}

// The decode's nesting depth and value count live in thread-locals, reset by
// [`decode`] before each message: serde's `Deserialize` has no context
// parameter, and threading one through (a `DeserializeSeed` for `Value` and
// for every container and chain type that holds one) would double this
// module for the same check. A decode never yields, so one thread decodes one
// message at a time.
thread_local! {
    static DEPTH: Cell<usize> = const { Cell::new(0) };
    /// Set when a decode on this thread hit [`MAX_DEPTH`]: postcard turns
    /// custom errors into a generic one, and the reason matters to the peer.
    static TOO_DEEP: Cell<bool> = const { Cell::new(false) };
    /// Values decoded so far in the current message, and whether a decode
    /// on this thread passed [`MAX_VALUES`].
    static VALUES: Cell<usize> = const { Cell::new(0) };
    static TOO_MANY: Cell<bool> = const { Cell::new(false) };
}

/// Counts nesting while a value decodes; restores the count on drop.
struct DepthGuard;

impl DepthGuard {
    fn enter<E: serde::de::Error>() -> Result<DepthGuard, E> {
        let values = VALUES.with(|v| {
            v.set(v.get() + 1);
            v.get()
        });
        if values > MAX_VALUES {
            TOO_MANY.with(|t| t.set(true));
            return Err(E::custom(format!("more than {MAX_VALUES} values in one message")));
        }
        DEPTH.with(|d| {
            if d.get() >= MAX_DEPTH {
                TOO_DEEP.with(|t| t.set(true));
                return Err(E::custom(format!("values nested deeper than {MAX_DEPTH}")));
            }
            d.set(d.get() + 1);
            Ok(DepthGuard)
        })
    }
}

impl Drop for DepthGuard {
    fn drop(&mut self) {
        DEPTH.with(|d| d.set(d.get().saturating_sub(1)));
    }
}

impl<'de> Deserialize<'de> for Value {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let _guard = DepthGuard::enter()?;
        Ok(match ValueRepr::deserialize(d)? {
            ValueRepr::None => Value::None,
            ValueRepr::Bool(b) => Value::Bool(b),
            ValueRepr::Int(i) => Value::Int(i),
            ValueRepr::BigInt(s) => {
                let digits = s.strip_prefix('-').unwrap_or(&s);
                if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(serde::de::Error::custom("BigInt must be decimal digits"));
                }
                Value::BigInt(s)
            }
            ValueRepr::Float(f) => Value::Float(f),
            ValueRepr::Str(s) => Value::Str(s),
            ValueRepr::Bytes(b) => Value::Bytes(b),
            ValueRepr::List(v) => Value::List(v),
            ValueRepr::Tuple(v) => Value::Tuple(v),
            ValueRepr::Dict(v) => Value::Dict(v),
            ValueRepr::Chain(c) => Value::Chain(c),
            ValueRepr::SelfRef => Value::SelfRef,
            ValueRepr::Table(b) => Value::Table(b),
            ValueRepr::Pickle(b) => Value::Pickle(b),
        })
    }
}

/// A failure raised by the call on the server.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RemoteError {
    /// The exception's class, a builtin (`ZeroDivisionError`): the server
    /// sends an exception of another module as its nearest builtin base, its
    /// message starting with `module.Class: ` (as for the 0.8.1 client).
    pub kind: String,
    /// `str()` of the exception.
    pub message: String,
    /// The server-side traceback.
    pub traceback: String,
}

/// What a client sends.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum ClientMessage {
    /// Run a chain; `id` matches the reply (unique per connection).
    Call {
        /// Request id.
        id: u64,
        /// What to run.
        chain: CallChain<Value>,
    },
    /// Advance a generator handle by one item.
    Next {
        /// Request id.
        id: u64,
        /// The handle a previous reply gave out.
        handle: NonZeroU64,
    },
    /// Stop a call in flight (its reply, if any, is dropped).
    Cancel {
        /// The request id of the call.
        id: u64,
    },
    /// Free a generator handle before it is exhausted.
    CloseHandle {
        /// The handle.
        handle: NonZeroU64,
    },
}

impl ClientMessage {
    /// What the executor runs for this message: the request id and a chain.
    /// `Next` is the chain `<handle>` with no calls, `CloseHandle` is
    /// `<handle>.close()` (id 0: nobody waits for it); `Cancel` runs nothing.
    pub fn into_work(self) -> Option<(u64, CallChain<Value>)> {
        let on_handle = |handle, calls| CallChain { module: String::new(), calls, handle: Some(handle) };
        match self {
            ClientMessage::Call { id, chain } => Some((id, chain)),
            ClientMessage::Next { id, handle } => Some((id, on_handle(handle, Vec::new()))),
            ClientMessage::CloseHandle { handle } => {
                Some((0, on_handle(handle, vec![crate::chain::Call::method("close", Vec::new())])))
            }
            ClientMessage::Cancel { .. } => None,
        }
    }
}

/// The outcome of one call.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Outcome {
    /// The call's result.
    Ok(Value),
    /// The result is a generator: advance it with [`ClientMessage::Next`].
    Handle(NonZeroU64),
    /// A generator handle is exhausted.
    Exhausted,
    /// The call raised.
    Err(RemoteError),
}

/// What the server sends.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum ServerMessage {
    /// The answer to the request `id`.
    Reply {
        /// The request id.
        id: u64,
        /// What happened.
        outcome: Outcome,
    },
    /// The server could not read a message (version, format); the
    /// connection ends after this.
    Refused {
        /// Why, in one line.
        reason: String,
    },
}

/// Every way reading a native message fails.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NativeError {
    /// The message is of a protocol version this build does not speak.
    #[error("unsupported native protocol version {got} (this server speaks {VERSION})")]
    UnsupportedVersion {
        /// The version the message carries.
        got: u16,
    },
    /// Values nested deeper than [`MAX_DEPTH`].
    #[error("values nested deeper than {MAX_DEPTH}")]
    TooDeep,
    /// More than [`MAX_VALUES`] values in one message (send big data as a
    /// table).
    #[error("more than {MAX_VALUES} values in one message; send big data as a table")]
    TooManyValues,
    /// The bytes are not a valid message.
    #[error("malformed native message: {0}")]
    Malformed(String),
}

/// Serializes `message` behind the version field.
pub fn encode<T: Serialize>(message: &T) -> Vec<u8> {
    let out = postcard::to_allocvec(&VERSION).expect("a u16 always serializes");
    postcard::to_extend(message, out).expect("serializing into a Vec cannot fail")
}

/// [`encode`] then zstd: the bytes a transport sends (one zstd frame with
/// its content size).
pub fn encode_compressed<T: Serialize>(message: &T) -> Vec<u8> {
    zstd_codec::compress_message(encode(message))
}

/// The outcome alone, postcard then zstd (one frame with its content
/// size): what the result cache keeps, so that a hit becomes a reply with
/// [`reply_from_outcome`] without encoding or compressing again.
pub fn encode_outcome(outcome: &Outcome) -> Vec<u8> {
    zstd_codec::compress_message(postcard::to_allocvec(outcome).expect("serializing into a Vec cannot fail"))
}

/// The wire bytes of `ServerMessage::Reply { id, outcome }` from the frame
/// [`encode_outcome`] made, exactly what [`encode_compressed`] would decode
/// to. The message is the version, the variant and the id (a few bytes)
/// followed by the outcome, so the new frame is a header, one raw block
/// with those bytes, then the outcome frame's blocks as they are: the
/// blocks' matches reach back only within the outcome, and a raw block
/// changes neither the repeat offsets nor the entropy tables. `None` when
/// the frame is not one this can splice (a checksum, a dictionary, no
/// content size, or not one whole frame).
pub fn reply_from_outcome(id: u64, frame: &[u8]) -> Option<Vec<u8>> {
    let mut prefix = postcard::to_allocvec(&VERSION).expect("a u16 always serializes");
    prefix.push(0); // ServerMessage::Reply, the first variant
    let prefix = postcard::to_extend(&id, prefix).expect("serializing into a Vec cannot fail");
    zstd_codec::prepend_raw_block(&prefix, frame)
}

/// The most work done where it is, on an async worker: a native message of
/// at most this many bytes (on the wire, decoded, or a value of this
/// weight) is encoded or decoded inline, a bigger one on a blocking thread.
/// The server's transports and the client share this one bound; it also
/// decides which result-cache work (hashing a request, splicing a cached
/// reply) stays inline.
pub const INLINE_BYTES: usize = 64 * 1024;

/// Whether decoding `wire` is cheap enough to do on an async worker: small
/// on the wire and declaring a small decoded size (a frame without a
/// declared size, or one that expands a lot, counts as heavy).
pub fn is_light(wire: &[u8], at_most: usize) -> bool {
    wire.len() <= at_most && declared_size(wire).is_some_and(|n| n <= at_most as u64)
}

/// Undoes [`encode_compressed`] under `limits`, then [`decode`]s.
pub fn decode_compressed<T: serde::de::DeserializeOwned>(
    wire: &[u8],
    limits: crate::codec::Limits,
) -> Result<T, NativeError> {
    if wire.len() as u64 > limits.max_encoded {
        return Err(NativeError::Malformed(format!("message exceeds the limit of {} bytes", limits.max_encoded)));
    }
    let bytes = zstd_codec::decompress_message(wire, limits).map_err(|e| NativeError::Malformed(e.to_string()))?;
    decode(&bytes)
}

/// Reads the version field, then the message; trailing bytes are an error.
pub fn decode<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, NativeError> {
    let (version, rest): (u16, &[u8]) =
        postcard::take_from_bytes(bytes).map_err(|e| NativeError::Malformed(e.to_string()))?;
    if version != VERSION {
        return Err(NativeError::UnsupportedVersion { got: version });
    }
    DEPTH.with(|d| d.set(0));
    TOO_DEEP.with(|t| t.set(false));
    VALUES.with(|v| v.set(0));
    TOO_MANY.with(|t| t.set(false));
    let (message, rest) = postcard::take_from_bytes(rest).map_err(|e| {
        if TOO_DEEP.with(Cell::get) {
            NativeError::TooDeep
        } else if TOO_MANY.with(Cell::get) {
            NativeError::TooManyValues
        } else {
            NativeError::Malformed(e.to_string())
        }
    })?;
    if !rest.is_empty() {
        return Err(NativeError::Malformed(format!("{} bytes after the message", rest.len())));
    }
    Ok(message)
}
