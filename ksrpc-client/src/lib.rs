//! ksrpc-client: the Rust client of ksrpc's native protocol.
//!
//! ```no_run
//! # async fn demo() -> Result<(), ksrpc_client::Error> {
//! use ksrpc_client::Client;
//!
//! // The URL as given to the Python client; `ws://…/ws` for the WebSocket.
//! let client = Client::builder("http://127.0.0.1:8080/api/v1").credentials("admin", "secret").connect().await?;
//! let demo = client.module("ksrpc.server.demo");
//! let sum: i64 = demo.call("add", (1, 2)).collect().await?;
//! assert_eq!(sum, 3);
//! # Ok(()) }
//! ```
//!
//! - [`Client`]: one connection: HTTP (`POST {url}/v2/call`, a request per
//!   call, at most 32 on the wire at once, the rest waiting in the client) or one multiplexed WebSocket (`{url}/v2/ws`, any number of calls
//!   in flight, replies in completion order). TLS through rustls.
//! - [`Chain`]: a lazy call chain that reads like the Python client's;
//!   nothing is sent until it is awaited, [`Chain::collect`]ed into any
//!   `serde::Deserialize` type, read as Arrow [`RecordBatch`]es, or
//!   [`Chain::stream`]ed (a generator). Dropping a call in flight cancels it
//!   on the server.
//! - [`blocking::Client`]: the same without async.
//! - [`from_value`]: `serde` deserialization straight from a [`Value`].
//! - [`expr`]: parses `ksrpc.server.demo.add(1, 2)` into a chain (the CLI's
//!   input); [`netrc`]: credentials from a netrc file.
//!
//! Protocol: `docs/protocol.md` in the repository.

mod conn;
mod de;
mod error;
#[cfg(feature = "arrow")]
mod table;

pub mod blocking;
pub mod expr;
pub mod netrc;

use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

#[cfg(feature = "arrow")]
pub use arrow_array::RecordBatch;
use futures_util::Stream;
pub use ksrpc_core::chain::{Args, Call, CallChain};
pub use ksrpc_core::codec::Limits;
pub use ksrpc_core::native::{RemoteError, Value};
use serde::de::DeserializeOwned;

pub use de::{from_value, DeError};
pub use error::Error;
#[cfg(feature = "arrow")]
pub use table::{batches_to_value, value_to_batches};

use conn::Conn;

/// The `Self` marker: in a builtin's arguments, stands for the object the
/// chain has reached so far (`builtins.len(Self)`).
pub const SELF: Value = Value::SelfRef;

/// Called as a big reply arrives: bytes received so far and, when the
/// server announced it, the total.
pub type Progress = Arc<dyn Fn(u64, Option<u64>) + Send + Sync>;

/// Which transport a [`Client`] uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// `POST {url}/v2/call`, one request per call.
    Http,
    /// One WebSocket, `{url}/v2/ws`, many calls in flight.
    WebSocket,
}

/// Builds a [`Client`].
#[derive(Clone, Debug)]
pub struct ClientBuilder {
    url: String,
    credentials: Option<(String, String)>,
    transport: Option<Transport>,
    timeout: Option<Duration>,
    connect_timeout: Duration,
    limits: Limits,
    tls_roots: Vec<Vec<u8>>,
    proxy: Option<Proxy>,
}

/// An HTTP(S) proxy for the HTTP transport (see [`ClientBuilder::proxy`]).
#[derive(Clone, Debug)]
pub struct Proxy {
    /// `http://host:port` (or `https://`, `socks5://` where reqwest has it).
    pub url: String,
    /// Basic credentials for the proxy.
    pub credentials: Option<(String, String)>,
}

impl ClientBuilder {
    /// Sends HTTP calls through a proxy. The WebSocket transport does not go
    /// through proxies: connecting fails with [`Error::Url`] rather than
    /// silently going around one.
    pub fn proxy(mut self, proxy: Proxy) -> Self {
        self.proxy = Some(proxy);
        self
    }

    /// Trusts the CA (or self-signed) certificates in `pem` for `https` and
    /// `wss`, in addition to the public web roots (Mozilla's list, through
    /// `webpki-roots`). Without any, the platform's verifier is used for
    /// HTTP and the public web roots for WebSocket.
    pub fn add_root_certificate_pem(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.tls_roots.push(pem.into());
        self
    }

    /// User and password for HTTP Basic auth.
    pub fn credentials(mut self, user: impl Into<String>, password: impl Into<String>) -> Self {
        self.credentials = Some((user.into(), password.into()));
        self
    }

    /// Overrides the transport the URL's scheme implies (`http(s)`: HTTP,
    /// `ws(s)`: WebSocket).
    pub fn transport(mut self, transport: Transport) -> Self {
        self.transport = Some(transport);
        self
    }

    /// Longest a call may take before it is cancelled (default: none).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Longest connecting may take (default 30 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Limits on one reply (default: 4 GiB on the wire and decoded).
    pub fn reply_limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// Connects (for HTTP: prepares the connection pool; the first call
    /// connects).
    pub async fn connect(self) -> Result<Client, Error> {
        let conn = Conn::connect(&self).await?;
        Ok(Client { inner: Arc::new(Inner { conn, timeout: self.timeout }) })
    }
}

struct Inner {
    conn: Conn,
    timeout: Option<Duration>,
}

/// A connection to a ksrpc server. Cheap to clone; clones share the
/// connection.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").field("conn", &self.inner.conn).field("timeout", &self.inner.timeout).finish()
    }
}

impl Client {
    /// Starts building a client for `url`, the URL as given to the Python
    /// client: `http://host:port/api/v1`, or `ws://host:port/api/v1/ws`.
    pub fn builder(url: impl Into<String>) -> ClientBuilder {
        ClientBuilder {
            url: url.into(),
            credentials: None,
            transport: None,
            timeout: None,
            connect_timeout: Duration::from_secs(30),
            limits: Limits { max_encoded: 4 << 30, max_decoded: 4 << 30 },
            tls_roots: Vec::new(),
            proxy: None,
        }
    }

    /// The transport in use.
    pub fn transport(&self) -> Transport {
        self.inner.conn.transport()
    }

    /// A chain rooted at the module `name` (`"ksrpc.server.demo"`).
    pub fn module(&self, name: impl Into<String>) -> Chain {
        Chain { client: self.clone(), chain: CallChain::new(name), timeout: None, progress: None }
    }

    /// Runs a chain built elsewhere (for example parsed from text).
    pub fn chain(&self, chain: CallChain<Value>) -> Chain {
        Chain { client: self.clone(), chain, timeout: None, progress: None }
    }
}

/// Arguments of a call: `()`, a tuple of up to eight values, a `Vec<Value>`
/// or an [`Args`] with keywords.
pub trait IntoArgs {
    /// The arguments.
    fn into_args(self) -> Args<Value>;
}

impl IntoArgs for Args<Value> {
    fn into_args(self) -> Args<Value> {
        self
    }
}

impl IntoArgs for Vec<Value> {
    fn into_args(self) -> Args<Value> {
        Args { positional: self, keyword: Vec::new() }
    }
}

macro_rules! tuple_args {
    ($($t:ident),*) => {
        impl<$($t: Into<Value>),*> IntoArgs for ($($t,)*) {
            #[allow(non_snake_case)]
            fn into_args(self) -> Args<Value> {
                let ($($t,)*) = self;
                Args { positional: vec![$($t.into()),*], keyword: Vec::new() }
            }
        }
    };
}
tuple_args!();
tuple_args!(A);
tuple_args!(A, B);
tuple_args!(A, B, C);
tuple_args!(A, B, C, D);
tuple_args!(A, B, C, D, E);
tuple_args!(A, B, C, D, E, F);
tuple_args!(A, B, C, D, E, F, G);
tuple_args!(A, B, C, D, E, F, G, H);

/// A lazy call chain: built step by step, sent when awaited.
///
/// `client.module("m").attr("obj").call("f", (1,)).get_item("k")` is
/// `m.obj.f(1)["k"]` on the server. A chain is also a value: pass it as an
/// argument and the server resolves it first (`demo.f(demo.g())`).
#[derive(Clone)]
pub struct Chain {
    client: Client,
    chain: CallChain<Value>,
    timeout: Option<Duration>,
    progress: Option<Progress>,
}

impl std::fmt::Debug for Chain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Chain({})", self.chain.summary())
    }
}

impl Chain {
    /// Attribute access: `.name`.
    pub fn attr(mut self, name: impl Into<String>) -> Self {
        self.chain.calls.push(Call::attr(name));
        self
    }

    /// A call: `.name(args)`.
    pub fn call(mut self, name: impl Into<String>, args: impl IntoArgs) -> Self {
        self.chain.calls.push(Call { name: name.into(), args: Some(args.into_args()) });
        self
    }

    /// A call with keyword arguments: `.name(*args, **kwargs)`.
    pub fn call_kw<K: Into<String>, V: Into<Value>>(
        mut self,
        name: impl Into<String>,
        args: impl IntoArgs,
        kwargs: impl IntoIterator<Item = (K, V)>,
    ) -> Self {
        let mut args = args.into_args();
        args.keyword.extend(kwargs.into_iter().map(|(k, v)| (k.into(), v.into())));
        self.chain.calls.push(Call { name: name.into(), args: Some(args) });
        self
    }

    /// Subscription: `[key]`.
    pub fn get_item(self, key: impl Into<Value>) -> Self {
        self.call("__getitem__", (key.into(),))
    }

    /// This call's timeout (overrides the client's).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Reports progress while the reply arrives.
    pub fn on_progress(mut self, progress: impl Fn(u64, Option<u64>) + Send + Sync + 'static) -> Self {
        self.progress = Some(Arc::new(progress));
        self
    }

    /// The chain as sent.
    pub fn as_call_chain(&self) -> &CallChain<Value> {
        &self.chain
    }

    fn timeout_or_default(&self) -> Option<Duration> {
        self.timeout.or(self.client.inner.timeout)
    }

    /// Runs the chain; the result as a [`Value`]. A generator result is an
    /// error here (its handle is closed): use [`Chain::stream`].
    pub async fn value(self) -> Result<Value, Error> {
        let timeout = self.timeout_or_default();
        let outcome = self.client.inner.conn.run(self.chain, self.progress, timeout).await?;
        match outcome {
            conn::Reply::Value(v) => Ok(v),
            conn::Reply::Handle(h) => {
                self.client.inner.conn.close_handle(h);
                Err(Error::Protocol("the result is a generator: read it with Chain::stream".into()))
            }
            conn::Reply::Exhausted => Err(Error::Protocol("the generator is exhausted".into())),
        }
    }

    /// Runs the chain and deserializes the result into `T`.
    pub async fn collect<T: DeserializeOwned>(self) -> Result<T, Error> {
        let value = self.value().await?;
        from_value(&value).map_err(|e| Error::Deserialize(e.to_string()))
    }

    /// Runs the chain; a table result (a pandas DataFrame, a pyarrow table)
    /// as Arrow record batches.
    #[cfg(feature = "arrow")]
    pub async fn record_batches(self) -> Result<Vec<RecordBatch>, Error> {
        value_to_batches(&self.value().await?)
    }

    /// Runs the chain; its value, or the generator it returned (for a caller
    /// that does not know in advance, such as a dynamic-language binding).
    pub async fn returned(self) -> Result<Returned, Error> {
        let timeout = self.timeout_or_default();
        let client = self.client.clone();
        Ok(match self.client.inner.conn.run(self.chain, self.progress, timeout).await? {
            conn::Reply::Value(v) => Returned::Value(v),
            conn::Reply::Exhausted => Returned::Generator(ValueStream::empty()),
            conn::Reply::Handle(h) => Returned::Generator(ValueStream::generator(client, h, timeout)),
        })
    }

    /// Runs a chain whose result is a generator and yields its items; a
    /// non-generator result is yielded as the only item. Dropping the
    /// stream before its end closes the generator on the server.
    pub async fn stream(self) -> Result<ValueStream, Error> {
        let timeout = self.timeout_or_default();
        let conn = self.client.clone();
        match self.client.inner.conn.run(self.chain, self.progress, timeout).await? {
            conn::Reply::Value(v) => Ok(ValueStream::once(v)),
            conn::Reply::Exhausted => Ok(ValueStream::empty()),
            conn::Reply::Handle(h) => Ok(ValueStream::generator(conn, h, timeout)),
        }
    }
}

/// What a chain returned: see [`Chain::returned`].
#[derive(Debug)]
pub enum Returned {
    /// A value.
    Value(Value),
    /// A generator on the server, read item by item.
    Generator(ValueStream),
}

impl From<Chain> for Value {
    fn from(chain: Chain) -> Self {
        Value::Chain(Box::new(chain.chain))
    }
}

impl IntoFuture for Chain {
    type Output = Result<Value, Error>;
    type IntoFuture = Pin<Box<dyn Future<Output = Result<Value, Error>> + Send>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(self.value())
    }
}

type NextFuture = Pin<Box<dyn Future<Output = Result<conn::Reply, Error>> + Send>>;

/// The items of a generator on the server, advanced one `Next` at a time.
pub struct ValueStream {
    client: Option<Client>,
    handle: Option<std::num::NonZeroU64>,
    timeout: Option<Duration>,
    first: Option<Value>,
    pending: Option<NextFuture>,
}

impl std::fmt::Debug for ValueStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ValueStream").field("handle", &self.handle).finish()
    }
}

impl ValueStream {
    fn once(v: Value) -> Self {
        ValueStream { client: None, handle: None, timeout: None, first: Some(v), pending: None }
    }

    fn empty() -> Self {
        ValueStream { client: None, handle: None, timeout: None, first: None, pending: None }
    }

    fn generator(client: Client, handle: std::num::NonZeroU64, timeout: Option<Duration>) -> Self {
        ValueStream { client: Some(client), handle: Some(handle), timeout, first: None, pending: None }
    }
}

impl Stream for ValueStream {
    type Item = Result<Value, Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Option<Self::Item>> {
        use std::task::Poll;
        if let Some(v) = self.first.take() {
            return Poll::Ready(Some(Ok(v)));
        }
        let Some(handle) = self.handle else { return Poll::Ready(None) };
        if self.pending.is_none() {
            let client = self.client.clone().expect("a generator stream has a client");
            let timeout = self.timeout;
            self.pending = Some(Box::pin(async move { client.inner.conn.next(handle, timeout).await }));
        }
        let fut = self.pending.as_mut().expect("set above");
        let reply = std::task::ready!(fut.as_mut().poll(cx));
        self.pending = None;
        Poll::Ready(match reply {
            Ok(conn::Reply::Value(v)) => Some(Ok(v)),
            Ok(conn::Reply::Exhausted) => {
                self.handle = None;
                None
            }
            Ok(conn::Reply::Handle(_)) => {
                Some(Err(Error::Protocol("a generator item is itself a generator handle".into())))
            }
            Err(e) => {
                // The server drops a generator that raised; after any other
                // error (timeout, connection) it may still hold it, and Drop
                // asks it to close.
                if matches!(e, Error::Remote(_)) {
                    self.handle = None;
                }
                Some(Err(e))
            }
        })
    }
}

impl Drop for ValueStream {
    fn drop(&mut self) {
        if let (Some(client), Some(handle)) = (&self.client, self.handle) {
            client.inner.conn.close_handle(handle);
        }
    }
}
