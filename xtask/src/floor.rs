//! The 0.8.1 client's floor: a replay server that answers each compat call
//! with reply bytes it already holds, so what remains of a timed call is what
//! the unmodified 0.8.1 client itself costs to send, receive, unzip and
//! unpickle.
//!
//! The first time a request is seen (the bench client's discarded warm-up
//! runs) it is forwarded to our server and the reply body is recorded, keyed
//! by the request's exact bytes in the HTTP form; from then on the same
//! request is answered from memory without looking at it: over HTTP one
//! chunk per slice and border (as our server sends them), over WebSocket a
//! binary message per slice, a border text message, and `EOF`. Nothing is
//! unpickled, compressed or copied per call, so `ours - floor` is what our
//! server adds to the function's own time.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use ksrpc_core::codec::{ChunkedZlib, WsFrame, BORDER};
use memchr::memmem;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufWriter};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

/// Largest request head or recorded request the replay server accepts
/// (bench requests are a few hundred bytes).
const MAX_REQUEST: usize = 1 << 20;

/// What the replay server knows: the upstream to record from and the
/// replies recorded so far.
struct State {
    /// `host:port` of our server.
    upstream: String,
    replies: Mutex<HashMap<Vec<u8>, Bytes>>,
    recorded: AtomicU64,
    replayed: AtomicU64,
}

/// A running replay server; stopped when dropped.
pub struct Floor {
    /// Base URL with the same path as the upstream's (`http://127.0.0.1:PORT/api/v1`).
    pub url: String,
    state: Arc<State>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Drop for Floor {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

impl Floor {
    /// Starts a replay server in front of `upstream` (our server's base URL).
    pub fn start(upstream: &str) -> Result<Floor> {
        let rest = upstream.strip_prefix("http://").context("upstream must be http://")?;
        let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
        let state = Arc::new(State {
            upstream: host.to_owned(),
            replies: Mutex::new(HashMap::new()),
            recorded: AtomicU64::new(0),
            replayed: AtomicU64::new(0),
        });
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
        let listener = runtime.block_on(TcpListener::bind("127.0.0.1:0"))?;
        let port = listener.local_addr()?.port();
        let accept_state = state.clone();
        runtime.spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let state = accept_state.clone();
                tokio::spawn(async move {
                    if let Err(e) = serve(stream, state).await {
                        eprintln!("    floor server: {e:#}");
                    }
                });
            }
        });
        Ok(Floor { url: format!("http://127.0.0.1:{port}/{path}"), state, runtime: Some(runtime) })
    }

    /// (recorded, replayed) calls so far.
    pub fn counts(&self) -> (u64, u64) {
        (self.state.recorded.load(Ordering::Relaxed), self.state.replayed.load(Ordering::Relaxed))
    }
}

/// A request head: method, path, headers with lower-case names.
struct Head {
    method: String,
    path: String,
    headers: Vec<(String, String)>,
}

impl Head {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }
}

/// Reads until `\r\n\r\n`; `None` at a clean end of the connection. Bytes
/// after the head stay in `buf`.
async fn read_head(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Result<Option<Head>> {
    loop {
        if let Some(end) = memmem::find(buf, b"\r\n\r\n") {
            let text = String::from_utf8(buf[..end].to_vec())?;
            buf.drain(..end + 4);
            let mut lines = text.split("\r\n");
            let mut first = lines.next().unwrap_or_default().split(' ');
            let (method, path) =
                (first.next().unwrap_or_default().to_owned(), first.next().unwrap_or_default().to_owned());
            let headers = lines
                .filter_map(|l| l.split_once(':'))
                .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
                .collect();
            return Ok(Some(Head { method, path, headers }));
        }
        anyhow::ensure!(buf.len() < MAX_REQUEST, "request head too long");
        if stream.read_buf(buf).await? == 0 {
            anyhow::ensure!(buf.is_empty(), "connection closed inside a request head");
            return Ok(None);
        }
    }
}

/// Reads a request body (chunked or `Content-Length`) from `buf` and the stream.
async fn read_body(stream: &mut TcpStream, buf: &mut Vec<u8>, head: &Head) -> Result<Vec<u8>> {
    async fn fill(stream: &mut TcpStream, buf: &mut Vec<u8>, want: usize) -> Result<()> {
        while buf.len() < want {
            anyhow::ensure!(buf.len() < MAX_REQUEST, "request too long");
            if stream.read_buf(buf).await? == 0 {
                bail!("connection closed inside a request body");
            }
        }
        Ok(())
    }
    if let Some(len) = head.header("content-length") {
        let len: usize = len.parse()?;
        anyhow::ensure!(len <= MAX_REQUEST, "request too long");
        fill(stream, buf, len).await?;
        return Ok(buf.drain(..len).collect());
    }
    anyhow::ensure!(head.header("transfer-encoding").is_some_and(|t| t.contains("chunked")), "no body length");
    let mut body = Vec::new();
    loop {
        let eol = loop {
            if let Some(eol) = memmem::find(buf, b"\r\n") {
                break eol;
            }
            let want = buf.len() + 1;
            fill(stream, buf, want).await?;
        };
        let size = usize::from_str_radix(std::str::from_utf8(&buf[..eol])?.split(';').next().unwrap_or("").trim(), 16)?;
        fill(stream, buf, eol + 2 + size + 2).await?;
        body.extend_from_slice(&buf[eol + 2..eol + 2 + size]);
        anyhow::ensure!(body.len() <= MAX_REQUEST, "request too long");
        buf.drain(..eol + 2 + size + 2);
        if size == 0 {
            return Ok(body);
        }
    }
}

impl State {
    /// The recorded reply to `request`, recording it from upstream the first
    /// time (with the client's own credentials and timestamp).
    async fn reply(self: &Arc<State>, request: Vec<u8>, head: &Head, chunk_path: String) -> Result<Bytes> {
        if let Some(reply) = self.replies.lock().expect("floor map").get(&request) {
            self.replayed.fetch_add(1, Ordering::Relaxed);
            return Ok(reply.clone());
        }
        let (auth, ts) =
            (head.header("authorization").unwrap_or_default(), head.header("x-timestamp").unwrap_or_default());
        let head_text = format!(
            "POST {chunk_path} HTTP/1.1\r\nHost: {}\r\nAuthorization: {auth}\r\nX-Timestamp: {ts}\r\n\
             Content-Type: application/octet-stream\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            self.upstream,
            request.len()
        );
        let upstream = self.upstream.clone();
        let sent = request.clone();
        let reply = tokio::task::spawn_blocking(move || -> Result<Bytes> {
            let mut s = std::net::TcpStream::connect(&upstream)?;
            s.write_all(head_text.as_bytes())?;
            s.write_all(&sent)?;
            let mut buf = Vec::new();
            s.read_to_end(&mut buf)?;
            let (status, _, body) = crate::bench::parse_response(&buf)?.context("incomplete upstream reply")?;
            anyhow::ensure!(status == 200, "upstream answered {status}");
            Ok(Bytes::from(body))
        })
        .await??;
        self.recorded.fetch_add(1, Ordering::Relaxed);
        self.replies.lock().expect("floor map").insert(request, reply.clone());
        Ok(reply)
    }
}

/// `/api/v1/ws` or `/api/v1/chunk` -> `/api/v1/chunk`.
fn chunk_path(path: &str) -> String {
    let base = path.rsplit_once('/').map_or("", |(base, _)| base);
    format!("{base}/chunk")
}

async fn serve(mut stream: TcpStream, state: Arc<State>) -> Result<()> {
    stream.set_nodelay(true)?;
    let mut buf = Vec::new();
    while let Some(head) = read_head(&mut stream, &mut buf).await? {
        if head.header("upgrade").is_some_and(|u| u.eq_ignore_ascii_case("websocket")) {
            anyhow::ensure!(buf.is_empty(), "bytes before the upgrade was answered");
            return serve_ws(stream, state, head).await;
        }
        if head.method != "POST" {
            stream.write_all(b"HTTP/1.1 204 No Content\r\n\r\n").await?;
            continue;
        }
        let request = read_body(&mut stream, &mut buf, &head).await?;
        let reply = state.reply(request, &head, chunk_path(&head.path)).await?;
        let mut out = BufWriter::with_capacity(64 * 1024, &mut stream);
        out.write_all(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\n\
              content-disposition: 0.pkl.chunked.zip\r\ntransfer-encoding: chunked\r\n\r\n",
        )
        .await?;
        // One HTTP chunk per slice and its border, as our server sends them.
        for frame in ChunkedZlib::ws_frames_of_http(&reply) {
            match frame {
                WsFrame::Binary(slice) => {
                    out.write_all(format!("{:x}\r\n", slice.len() + BORDER.len()).as_bytes()).await?;
                    out.write_all(&slice).await?;
                }
                WsFrame::Text(_) => out.write_all(&[BORDER.as_slice(), b"\r\n"].concat()).await?,
            }
        }
        out.write_all(b"0\r\n\r\n").await?;
        out.flush().await?;
    }
    Ok(())
}

async fn serve_ws(mut stream: TcpStream, state: Arc<State>, head: Head) -> Result<()> {
    let key = head.header("sec-websocket-key").context("no Sec-WebSocket-Key")?;
    let answer = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {}\r\n\r\n",
        derive_accept_key(key.as_bytes())
    );
    stream.write_all(answer.as_bytes()).await?;
    let mut ws = WebSocketStream::from_raw_socket(stream, Role::Server, None).await;
    let border = std::str::from_utf8(BORDER).expect("ASCII");
    let path = chunk_path(&head.path);
    let mut request = Vec::new();
    while let Some(message) = ws.next().await {
        // The 0.8.1 client may leave without a closing handshake.
        let Ok(message) = message else { break };
        match message {
            Message::Binary(data) => request.extend_from_slice(&data),
            Message::Text(text) if text.as_str() == border => request.extend_from_slice(BORDER),
            Message::Text(text) if text.as_str() == "EOF" => {
                let reply = state.reply(std::mem::take(&mut request), &head, path.clone()).await?;
                for frame in ChunkedZlib::ws_frames_of_http(&reply) {
                    ws.feed(match frame {
                        WsFrame::Binary(slice) => Message::Binary(slice),
                        WsFrame::Text(text) => Message::text(text),
                    })
                    .await?;
                }
                ws.send(Message::text("EOF")).await?;
            }
            Message::Close(_) => break,
            _ => {}
        }
        anyhow::ensure!(request.len() <= MAX_REQUEST, "request too long");
    }
    Ok(())
}
