//! The client without async: each call blocks the calling thread.
//!
//! A [`Client`] owns a small tokio runtime (two worker threads) that runs
//! the connection; calls from any number of threads share the connection
//! (on a WebSocket they are in flight at the same time).

use std::sync::Arc;
use std::time::Duration;

#[cfg(feature = "arrow")]
use arrow_array::RecordBatch;
use serde::de::DeserializeOwned;

use crate::{ClientBuilder, Error, IntoArgs, Transport, Value};

/// A blocking client. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Client {
    runtime: Arc<tokio::runtime::Runtime>,
    inner: crate::Client,
}

impl Client {
    /// Connects with `builder`'s settings.
    pub fn connect(builder: ClientBuilder) -> Result<Client, Error> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("ksrpc-client")
            .enable_all()
            .build()
            .map_err(|e| Error::Connection(format!("starting the client runtime: {e}")))?;
        let inner = runtime.block_on(builder.connect())?;
        Ok(Client { runtime: Arc::new(runtime), inner })
    }

    /// The transport in use.
    pub fn transport(&self) -> Transport {
        self.inner.transport()
    }

    /// A chain rooted at the module `name`.
    pub fn module(&self, name: impl Into<String>) -> Chain {
        Chain { runtime: self.runtime.clone(), chain: self.inner.module(name) }
    }

    /// Runs a chain built elsewhere.
    pub fn chain(&self, chain: crate::CallChain<Value>) -> Chain {
        Chain { runtime: self.runtime.clone(), chain: self.inner.chain(chain) }
    }
}

/// A lazy call chain of the blocking client; see [`crate::Chain`].
#[derive(Clone, Debug)]
pub struct Chain {
    runtime: Arc<tokio::runtime::Runtime>,
    chain: crate::Chain,
}

impl Chain {
    fn map(self, f: impl FnOnce(crate::Chain) -> crate::Chain) -> Self {
        Chain { runtime: self.runtime, chain: f(self.chain) }
    }

    /// Attribute access: `.name`.
    pub fn attr(self, name: impl Into<String>) -> Self {
        self.map(|c| c.attr(name))
    }

    /// A call: `.name(args)`.
    pub fn call(self, name: impl Into<String>, args: impl IntoArgs) -> Self {
        self.map(|c| c.call(name, args))
    }

    /// Subscription: `[key]`.
    pub fn get_item(self, key: impl Into<Value>) -> Self {
        self.map(|c| c.get_item(key))
    }

    /// This call's timeout.
    pub fn timeout(self, timeout: Duration) -> Self {
        self.map(|c| c.timeout(timeout))
    }

    /// Reports progress while the reply arrives.
    pub fn on_progress(self, progress: impl Fn(u64, Option<u64>) + Send + Sync + 'static) -> Self {
        self.map(|c| c.on_progress(progress))
    }

    /// Runs the chain; the result as a [`Value`].
    pub fn value(self) -> Result<Value, Error> {
        self.runtime.block_on(self.chain.value())
    }

    /// Runs the chain and deserializes the result.
    pub fn collect<T: DeserializeOwned>(self) -> Result<T, Error> {
        self.runtime.block_on(self.chain.collect())
    }

    /// Runs the chain; a table result as Arrow record batches.
    #[cfg(feature = "arrow")]
    pub fn record_batches(self) -> Result<Vec<RecordBatch>, Error> {
        self.runtime.block_on(self.chain.record_batches())
    }

    /// Runs a generator chain and collects every item.
    pub fn collect_stream(self) -> Result<Vec<Value>, Error> {
        use futures_util::TryStreamExt;
        self.runtime.block_on(async move { self.chain.stream().await?.try_collect().await })
    }
}

impl From<Chain> for Value {
    fn from(chain: Chain) -> Self {
        chain.chain.into()
    }
}
