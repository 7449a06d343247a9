//! The HTTP/1.1 fast path: plain requests, over TCP or TLS, proxied without hyper.
//!
//! Nearly every request an edge sees has one shape: HTTP/1.1, a path, one Host header, no
//! body or a small one with Content-Length, for a host with a healthy endpoint. For those,
//! this module reads the head with httparse, writes the upstream request (hop-by-hop headers
//! out, forwarding headers in) in one write on a pooled connection of its own, and copies the
//! response back as its framing says (length, chunked, or until close), all on the client
//! connection's task: no header map, no task or channel per upstream connection, and no
//! timer set per request (see `Deadline`).
//!
//! Anything else is handed to hyper before a byte of it is acted on ([`Outcome::HandOff`]):
//! HTTP/1.0 and HTTP/2's preface, upgrades, `Expect`, `Transfer-Encoding` or more than one
//! `Content-Length` on a request, bodies over 64 KiB, a `Connection` header naming other
//! headers, malformed or oversized heads, unknown hosts and hosts without an endpoint. hyper
//! then serves the connection to its end, with its rules, limits and pages unchanged.
//!
//! What a request gets here is what [`super::proxy`] gives it: the same forwarding headers,
//! the same pick of an endpoint (least outstanding of two), passive ejection after a connect
//! error, a retry only when nothing can have reached the app (a connect error, or an
//! idempotent request whose connection closed before any response byte), the same timeouts,
//! access log line, metrics and error pages.

use std::future::Future;
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::ops::Range;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use hyper::StatusCode;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;

use super::proxy::{
    InFlight, Peer, Proxy, access_log, is_idempotent_name, page_text, request_id_hex,
};
use super::routes::{Route, normalize_host};

/// Request bodies up to this size are read whole and sent with the head; larger ones go to
/// hyper, which streams them.
const MAX_BODY: usize = 64 * 1024;
/// Request headers parsed here; a request with more goes to hyper (which applies the
/// configured limit).
const MAX_REQUEST_HEADERS: usize = 100;
/// Limits on an app's response head.
const MAX_RESPONSE_HEAD: usize = 64 * 1024;
const MAX_RESPONSE_HEADERS: usize = 128;
/// Bytes read from an app at a time.
const READ_SIZE: usize = 16 * 1024;

/// The client-side limits (hyper's, for the requests it serves).
#[derive(Debug, Clone)]
pub struct Limits {
    pub header_read_timeout: Duration,
    pub max_header_bytes: usize,
    pub max_headers: usize,
}

/// How a connection left the fast path.
pub enum Outcome<S> {
    /// Done with: closed by either side, timed out or shut down.
    Closed,
    /// A request the fast path does not take begins at the start of these bytes (read from
    /// the stream already): hyper serves the connection from here.
    HandOff(BytesMut, S),
}

/// The client side of a connection: TCP, or TLS over it.
pub trait Client: AsyncRead + AsyncWrite + Unpin {
    /// The TCP connection under it, to notice the client closing (by a peek).
    fn tcp(&self) -> &TcpStream;
}

impl Client for TcpStream {
    fn tcp(&self) -> &TcpStream {
        self
    }
}

impl Client for tokio_rustls::server::TlsStream<TcpStream> {
    fn tcp(&self) -> &TcpStream {
        self.get_ref().0
    }
}

/// Whether the client closed its connection: Ready(true) on a close, Ready(false) when it
/// sent more (pipelined; nothing more can be told), Pending otherwise.
fn poll_client_gone(client: &impl Client, cx: &mut Context<'_>) -> Poll<bool> {
    let mut byte = [0u8; 1];
    let mut peek = ReadBuf::new(&mut byte);
    match client.tcp().poll_peek(cx, &mut peek) {
        Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => Poll::Ready(true),
        Poll::Ready(Ok(_)) => Poll::Ready(false),
        Poll::Pending => Poll::Pending,
    }
}

/// How long an app may take before the fast path starts watching for the client closing
/// (hyper's path watches from the start; a peek per request would cost a system call).
const PATIENCE: Duration = Duration::from_secs(1);

/// Serves `client` (over `scheme`: `http` or `https`) until it closes or a request needs
/// hyper.
pub async fn serve<S: Client>(
    mut client: S,
    scheme: &'static str,
    proxy: &Proxy,
    peer: &Peer,
    limits: &Limits,
    shutdown: &CancellationToken,
) -> Outcome<S> {
    let mut stop = std::pin::pin!(shutdown.clone().cancelled_owned());
    let mut buf = BytesMut::with_capacity(4096);
    let mut head_deadline = Deadline::new(Instant::now() + limits.header_read_timeout);
    let mut upstream = Upstream::default();
    loop {
        // The next request's head, within the header timeout (which also bounds how long
        // an idle keep-alive connection stays open, as hyper's does).
        head_deadline.set(Instant::now() + limits.header_read_timeout);
        // Bytes already looked at without a line end: a head cannot end among them, so a
        // client sending its head a byte at a time does not get it parsed again each time.
        let mut scanned = 0;
        let plan = loop {
            if buf[scanned..].contains(&b'\n') {
                match inspect(&buf, scheme, proxy, peer, limits, &mut upstream.request) {
                    Inspected::Plan(plan) => break plan,
                    Inspected::HandOff => return Outcome::HandOff(buf, client),
                    Inspected::Partial if buf.len() >= limits.max_header_bytes => {
                        return Outcome::HandOff(buf, client);
                    }
                    Inspected::Partial => {}
                }
            } else if buf.len() >= limits.max_header_bytes {
                return Outcome::HandOff(buf, client);
            }
            scanned = buf.len();
            let idle = buf.is_empty();
            if idle && shutdown.is_cancelled() {
                return Outcome::Closed;
            }
            reserve(&mut buf);
            let mut read = std::pin::pin!(client.read_buf(&mut buf));
            let got = std::future::poll_fn(|cx| {
                if let Poll::Ready(r) = read.as_mut().poll(cx) {
                    return Poll::Ready(Some(r));
                }
                if (idle && stop.as_mut().poll(cx).is_ready()) || head_deadline.poll_expired(cx) {
                    return Poll::Ready(None);
                }
                Poll::Pending
            })
            .await;
            match got {
                Some(Ok(n)) if n > 0 => {}
                // Closed, failed, timed out (hyper closes silently too), or shutting down.
                _ => return Outcome::Closed,
            }
        };
        // A small body comes whole before anything goes upstream.
        let end = plan.head_len + plan.body_len;
        while buf.len() < end {
            reserve(&mut buf);
            match head_deadline.within(client.read_buf(&mut buf)).await {
                Some(Ok(n)) if n > 0 => {}
                _ => return Outcome::Closed,
            }
        }
        upstream.request.extend_from_slice(&buf[plan.head_len..end]);
        let keep_open = forward(&mut client, &buf, &plan, proxy, &mut upstream, shutdown).await;
        buf.advance(end);
        // A large body's buffer is not kept for the connection's life.
        if upstream.request.capacity() > 16 * 1024 {
            upstream.request = Vec::new();
        }
        if !keep_open {
            // A TLS client learns of the end from close_notify (a response read until the
            // close relies on it); on TCP this sends the FIN.
            let _ = tokio::time::timeout(Duration::from_secs(1), client.shutdown()).await;
            return Outcome::Closed;
        }
    }
}

/// Room for a read of at least 1 KiB.
fn reserve(buf: &mut BytesMut) {
    if buf.capacity() - buf.len() < 1024 {
        buf.reserve(4096);
    }
}

/// A request the fast path takes.
struct Plan {
    head_len: usize,
    body_len: usize,
    route: Arc<Route>,
    /// Where the method, path and raw host are in the buffer (for the access log).
    method: Range<usize>,
    path: Range<usize>,
    host: Range<usize>,
    /// The client asked to close after this response.
    close: bool,
    head: bool,
    idempotent: bool,
}

enum Inspected {
    Partial,
    HandOff,
    Plan(Plan),
}

/// Reads a request head from `buf`; for a request the fast path takes, writes the upstream
/// request's head into `out`.
fn inspect(
    buf: &[u8],
    scheme: &str,
    proxy: &Proxy,
    peer: &Peer,
    limits: &Limits,
    out: &mut Vec<u8>,
) -> Inspected {
    let mut headers = [const { MaybeUninit::<httparse::Header>::uninit() }; MAX_REQUEST_HEADERS];
    let n_headers = limits.max_headers.min(MAX_REQUEST_HEADERS);
    let mut req = httparse::Request::new(&mut []);
    let head_len = match req.parse_with_uninit_headers(buf, &mut headers[..n_headers]) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Inspected::Partial,
        Err(_) => return Inspected::HandOff,
    };
    let (Some(method), Some(path), Some(1)) = (req.method, req.path, req.version) else {
        return Inspected::HandOff;
    };
    if !path.starts_with('/') || method == "CONNECT" {
        return Inspected::HandOff;
    }
    let mut host: Option<&[u8]> = None;
    let mut content_length: Option<usize> = None;
    let mut close = false;
    let mut xff: Option<&[u8]> = None;
    let mut forwarded: Option<&[u8]> = None;
    let mut request_id = false;
    // Connection headers that name other headers (those are not forwarded either).
    let mut naming: [&[u8]; 4] = [b""; 4];
    let mut n_naming = 0;
    for h in req.headers.iter() {
        match request_header(h.name) {
            ReqHeader::Host => {
                if host.replace(h.value).is_some() {
                    return Inspected::HandOff;
                }
            }
            ReqHeader::ContentLength => {
                let Some(n) = parse_length(h.value) else {
                    return Inspected::HandOff;
                };
                if content_length.replace(n).is_some() || n > MAX_BODY {
                    return Inspected::HandOff;
                }
            }
            ReqHeader::Connection => {
                let mut names = false;
                for token in h.value.split(|&b| b == b',') {
                    let token = token.trim_ascii();
                    if token.eq_ignore_ascii_case(b"close") {
                        close = true;
                    } else if token.eq_ignore_ascii_case(b"upgrade") {
                        return Inspected::HandOff;
                    } else if !token.eq_ignore_ascii_case(b"keep-alive") && !token.is_empty() {
                        names = true;
                    }
                }
                if names {
                    if n_naming == naming.len() {
                        return Inspected::HandOff;
                    }
                    naming[n_naming] = h.value;
                    n_naming += 1;
                }
            }
            ReqHeader::NotHere => return Inspected::HandOff,
            ReqHeader::Xff => {
                xff.get_or_insert(h.value);
            }
            ReqHeader::Forwarded => {
                forwarded.get_or_insert(h.value);
            }
            ReqHeader::RequestId => request_id = true,
            ReqHeader::Dropped | ReqHeader::Other => {}
        }
    }
    let Some(raw_host) = host else {
        return Inspected::HandOff;
    };
    let Ok(raw_host_str) = std::str::from_utf8(raw_host) else {
        return Inspected::HandOff;
    };
    let Some(route) = proxy.table.get(&normalize_host(raw_host_str)) else {
        return Inspected::HandOff;
    };
    if route.endpoints.is_empty() {
        return Inspected::HandOff;
    }

    // The upstream head: the request line, the client's headers but hop-by-hop ones and
    // those replaced, then the forwarding headers.
    out.clear();
    out.extend_from_slice(method.as_bytes());
    out.push(b' ');
    out.extend_from_slice(path.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let naming = &naming[..n_naming];
    for h in req.headers.iter() {
        let kept = match request_header(h.name) {
            ReqHeader::Other => !named(naming, h.name),
            ReqHeader::Host | ReqHeader::ContentLength | ReqHeader::RequestId => true,
            _ => false,
        };
        if kept {
            out.extend_from_slice(h.name.as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(h.value);
            out.extend_from_slice(b"\r\n");
        }
    }
    out.extend_from_slice(b"x-forwarded-for: ");
    if let Some(prior) = xff {
        out.extend_from_slice(prior);
        out.extend_from_slice(b", ");
    }
    out.extend_from_slice(peer.forwarded_ip().as_bytes());
    out.extend_from_slice(b"\r\nx-forwarded-proto: ");
    out.extend_from_slice(scheme.as_bytes());
    out.extend_from_slice(b"\r\nx-forwarded-host: ");
    out.extend_from_slice(raw_host);
    out.extend_from_slice(b"\r\nforwarded: ");
    if let Some(prior) = forwarded {
        out.extend_from_slice(prior);
        out.extend_from_slice(b", ");
    }
    out.extend_from_slice(b"for=");
    out.extend_from_slice(peer.forwarded_for.as_bytes());
    out.extend_from_slice(b";host=\"");
    out.extend_from_slice(raw_host);
    out.extend_from_slice(b"\";proto=");
    out.extend_from_slice(scheme.as_bytes());
    out.extend_from_slice(b"\r\n");
    if !request_id {
        out.extend_from_slice(b"x-request-id: ");
        out.extend_from_slice(&request_id_hex());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");

    let at = |s: &[u8]| {
        let start = s.as_ptr() as usize - buf.as_ptr() as usize;
        start..start + s.len()
    };
    Inspected::Plan(Plan {
        head_len,
        body_len: content_length.unwrap_or(0),
        method: at(method.as_bytes()),
        path: at(path.as_bytes()),
        host: at(raw_host),
        route,
        close,
        head: method == "HEAD",
        idempotent: is_idempotent_name(method),
    })
}

/// What the fast path does with a request header.
enum ReqHeader {
    Host,
    ContentLength,
    Connection,
    /// Transfer-Encoding, Upgrade, Expect: the request goes to hyper.
    NotHere,
    Xff,
    Forwarded,
    RequestId,
    /// Hop-by-hop, or replaced by the edge's own.
    Dropped,
    Other,
}

fn request_header(name: &str) -> ReqHeader {
    let is = |n: &str| name.eq_ignore_ascii_case(n);
    match name.len() {
        2 if is("te") => ReqHeader::Dropped,
        4 if is("host") => ReqHeader::Host,
        6 if is("expect") => ReqHeader::NotHere,
        7 if is("upgrade") => ReqHeader::NotHere,
        7 if is("trailer") => ReqHeader::Dropped,
        9 if is("forwarded") => ReqHeader::Forwarded,
        10 if is("connection") => ReqHeader::Connection,
        10 if is("keep-alive") => ReqHeader::Dropped,
        12 if is("x-request-id") => ReqHeader::RequestId,
        14 if is("content-length") => ReqHeader::ContentLength,
        15 if is("x-forwarded-for") => ReqHeader::Xff,
        16 if is("proxy-connection") || is("x-forwarded-host") => ReqHeader::Dropped,
        17 if is("transfer-encoding") => ReqHeader::NotHere,
        17 if is("x-forwarded-proto") => ReqHeader::Dropped,
        18 if is("proxy-authenticate") => ReqHeader::Dropped,
        _ => ReqHeader::Other,
    }
}

/// Whether one of these Connection header values names header `name`.
fn named(connection: &[&[u8]], name: &str) -> bool {
    connection.iter().any(|value| {
        value
            .split(|&b| b == b',')
            .any(|token| token.trim_ascii().eq_ignore_ascii_case(name.as_bytes()))
    })
}

/// A Content-Length value: digits only.
fn parse_length(value: &[u8]) -> Option<usize> {
    if value.is_empty() || value.len() > 18 || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(value.iter().fold(0, |n, d| n * 10 + (d - b'0') as usize))
}

/// The connection's buffers and deadline for the upstream side.
#[derive(Default)]
struct Upstream {
    /// The request to send: head, then body.
    request: Vec<u8>,
    /// The response head for the client (or the edge's own page).
    response: Vec<u8>,
    /// Made at the first request that waits for an app.
    deadline: Option<Deadline>,
    /// When to start watching the client while an app is slow.
    patience: Option<Deadline>,
}

/// Why an exchange with an app failed.
enum Failed {
    /// No connection: nothing reached the app.
    Connect(String),
    /// The request could not be written.
    Unsent(String),
    /// The connection closed before any byte of a response.
    Closed(String),
    /// No response head in time.
    Timeout,
    /// A response that cannot be passed on.
    Bad(String),
    /// The client closed its connection while the app was slow to answer.
    ClientGone,
}

/// What waiting for a response head watches besides the app.
struct Waits<'a, C> {
    /// The response-header timeout.
    deadline: &'a mut Deadline,
    /// After it, the client is watched too.
    patience: &'a mut Deadline,
    client: &'a C,
}

/// One request to the route's endpoints and its response to the client; false when the
/// client connection must close.
async fn forward(
    client: &mut impl Client,
    buf: &[u8],
    plan: &Plan,
    proxy: &Proxy,
    upstream: &mut Upstream,
    shutdown: &CancellationToken,
) -> bool {
    let timeouts = &proxy.timeouts;
    let now = Instant::now();
    let mut deadlines = (
        upstream
            .deadline
            .take()
            .unwrap_or_else(|| Deadline::new(now + timeouts.response_headers)),
        upstream
            .patience
            .take()
            .unwrap_or_else(|| Deadline::new(now + PATIENCE)),
    );
    let keep_open = attempts(client, buf, plan, proxy, upstream, &mut deadlines, shutdown).await;
    (upstream.deadline, upstream.patience) = (Some(deadlines.0), Some(deadlines.1));
    keep_open
}

/// [`forward`] with the connection's response deadline: up to two endpoints, each tried on
/// a pooled connection first.
async fn attempts(
    client: &mut impl Client,
    buf: &[u8],
    plan: &Plan,
    proxy: &Proxy,
    upstream: &mut Upstream,
    (deadline, patience): &mut (Deadline, Deadline),
    shutdown: &CancellationToken,
) -> bool {
    let started = std::time::Instant::now();
    let method = std::str::from_utf8(&buf[plan.method.clone()]).unwrap_or_default();
    let path = std::str::from_utf8(&buf[plan.path.clone()]).unwrap_or_default();
    let host = normalize_host(std::str::from_utf8(&buf[plan.host.clone()]).unwrap_or_default());
    let route = &plan.route;
    let metrics = proxy.table.metrics_of(route);
    metrics.requests.inc();
    let timeouts = &proxy.timeouts;
    let mut tried = None;
    let mut failure = None;
    let mut up = take_buffer();
    for attempt in 0..2 {
        let Some(endpoint) = proxy.table.pick(route, tried) else {
            break;
        };
        tried = Some(endpoint.instance_id);
        let guard = InFlight::new(endpoint);
        let endpoint = &guard.0;
        // A pooled connection first; one the app had closed is replaced by a new one.
        let mut pooled = true;
        let result = loop {
            let (mut stream, reused) = match pooled
                .then(|| endpoint.pool.take_raw(timeouts.idle))
                .flatten()
            {
                Some(s) => (s, true),
                None => match connect(endpoint.addr, timeouts.connect).await {
                    Ok(s) => (s, false),
                    Err(e) => break Err(Failed::Connect(e)),
                },
            };
            let now = Instant::now();
            deadline.set(now + timeouts.response_headers);
            patience.set(now + PATIENCE);
            up.clear();
            let waits = Waits {
                deadline,
                patience,
                client: &*client,
            };
            let (request, head) = (&upstream.request, &mut upstream.response);
            match exchange(&mut stream, request, &mut up, head, waits).await {
                Ok(head) => break Ok((stream, head)),
                // The app had closed the pooled connection: nothing reached it.
                Err(Failed::Unsent(_)) if reused => pooled = false,
                Err(Failed::Closed(_)) if reused && plan.idempotent => pooled = false,
                Err(e) => break Err(e),
            }
        };
        match result {
            Ok((stream, head)) => {
                let status = head.status;
                access_log(&host, method, path, status, Some(endpoint.addr), started);
                proxy.latency.observe(started.elapsed());
                let keep_open = respond(
                    client, stream, &mut up, head, plan, upstream, endpoint, shutdown,
                )
                .await;
                give_buffer(up);
                return keep_open;
            }
            Err(Failed::ClientGone) => {
                // nginx's "499": nobody to answer; the app's connection goes with it.
                access_log(&host, method, path, 499, Some(endpoint.addr), started);
                give_buffer(up);
                return false;
            }
            Err(e) => {
                metrics.upstream_errors.inc();
                let retry = match &e {
                    Failed::Connect(_) => {
                        proxy.table.eject(endpoint);
                        true
                    }
                    Failed::Closed(_) | Failed::Unsent(_) => plan.idempotent,
                    Failed::Timeout | Failed::Bad(_) | Failed::ClientGone => false,
                };
                let error = match &e {
                    Failed::Connect(e) | Failed::Unsent(e) | Failed::Closed(e) | Failed::Bad(e) => {
                        e.as_str()
                    }
                    Failed::Timeout => "no response in time",
                    Failed::ClientGone => "the client closed",
                };
                tracing::debug!(app.name = %route.app, upstream = %endpoint.addr, error, "upstream request failed");
                failure = Some(e);
                if attempt == 0 && retry {
                    continue;
                }
                break;
            }
        }
    }
    give_buffer(up);
    let (status, message) = match &failure {
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            "no healthy instance of this app right now",
        ),
        Some(Failed::Timeout) => (
            StatusCode::GATEWAY_TIMEOUT,
            "the app did not answer in time",
        ),
        Some(e) => {
            let error = match e {
                Failed::Connect(e) | Failed::Unsent(e) | Failed::Closed(e) | Failed::Bad(e) => {
                    e.as_str()
                }
                Failed::Timeout | Failed::ClientGone => "",
            };
            tracing::warn!(app.name = %route.app, error, "bad gateway");
            (
                StatusCode::BAD_GATEWAY,
                "the app's instance could not be reached",
            )
        }
    };
    access_log(&host, method, path, status.as_u16(), None, started);
    let close = plan.close || shutdown.is_cancelled();
    let page = page_text(status, message);
    let out = &mut upstream.response;
    out.clear();
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\ncontent-type: text/html; charset=utf-8\r\n");
    if status == StatusCode::SERVICE_UNAVAILABLE {
        out.extend_from_slice(b"retry-after: 1\r\n");
    }
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    write_date(out);
    out.extend_from_slice(format!("content-length: {}\r\n\r\n", page.len()).as_bytes());
    if !plan.head {
        out.extend_from_slice(page.as_bytes());
    }
    client.write_all(out).await.is_ok() && client.flush().await.is_ok() && !close
}

async fn connect(addr: SocketAddr, timeout: Duration) -> Result<TcpStream, String> {
    match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Ok(Ok(stream)) => {
            let _ = stream.set_nodelay(true);
            Ok(stream)
        }
        Ok(Err(e)) => Err(format!("connect: {e}")),
        Err(_) => Err(format!("connect: no answer within {timeout:?}")),
    }
}

/// A response head read from an app.
struct Head {
    status: u16,
    /// Its length in the read buffer.
    len: usize,
    framing: Framing,
    /// The app keeps the connection open after the response.
    reusable: bool,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Framing {
    None,
    Length(u64),
    Chunked,
    UntilClose,
}

/// Sends the request and reads the response head into `up` (and the client's version of it
/// into `out`), within the deadline and while the client stays. Interim (1xx) responses are
/// skipped.
async fn exchange(
    stream: &mut TcpStream,
    request: &[u8],
    up: &mut BytesMut,
    out: &mut Vec<u8>,
    waits: Waits<'_, impl Client>,
) -> Result<Head, Failed> {
    let Waits {
        deadline,
        patience,
        client,
    } = waits;
    // Once the client sent more (pipelined), its close cannot be told by a peek.
    let mut watch_client = true;
    if let Err(e) = stream.write_all(request).await {
        return Err(Failed::Unsent(e.to_string()));
    }
    loop {
        if !up.is_empty() {
            match parse_response(up, out)? {
                Some(head) if (100..200).contains(&head.status) => {
                    if head.status == 101 {
                        return Err(Failed::Bad("a protocol switch nobody asked for".into()));
                    }
                    up.advance(head.len);
                    continue;
                }
                Some(head) => return Ok(head),
                None if up.len() > MAX_RESPONSE_HEAD => {
                    return Err(Failed::Bad("response head too large".into()));
                }
                None => {}
            }
        }
        let was_empty = up.is_empty();
        up.reserve(READ_SIZE);
        let mut read = std::pin::pin!(stream.read_buf(up));
        let got = std::future::poll_fn(|cx| {
            if let Poll::Ready(r) = read.as_mut().poll(cx) {
                return Poll::Ready(Some(r));
            }
            if deadline.poll_expired(cx) {
                return Poll::Ready(None);
            }
            if watch_client && patience.poll_expired(cx) {
                match poll_client_gone(client, cx) {
                    Poll::Ready(true) => return Poll::Ready(Some(Err(ClientClosed.into()))),
                    Poll::Ready(false) => watch_client = false,
                    Poll::Pending => {}
                }
            }
            Poll::Pending
        })
        .await;
        match got {
            Some(Err(e)) if e.get_ref().is_some_and(|inner| inner.is::<ClientClosed>()) => {
                return Err(Failed::ClientGone);
            }
            None => return Err(Failed::Timeout),
            Some(Ok(n)) if n > 0 => {}
            Some(Ok(_)) if was_empty => {
                return Err(Failed::Closed("closed before a response".into()));
            }
            Some(Err(e)) if was_empty => return Err(Failed::Closed(e.to_string())),
            Some(r) => {
                return Err(Failed::Bad(format!(
                    "closed in a response head: {:?}",
                    r.err()
                )));
            }
        }
    }
}

/// The client's close, noticed while waiting for an app (an I/O error's inner error).
#[derive(Debug)]
struct ClientClosed;

impl From<ClientClosed> for std::io::Error {
    fn from(closed: ClientClosed) -> std::io::Error {
        std::io::Error::new(std::io::ErrorKind::ConnectionAborted, closed)
    }
}

impl std::fmt::Display for ClientClosed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the client closed")
    }
}

impl std::error::Error for ClientClosed {}

/// A complete response head at the start of `up`, or None for more bytes. A final (not 1xx)
/// head is also written into `out` for the client, but for its end (see `end_head`).
fn parse_response(up: &[u8], out: &mut Vec<u8>) -> Result<Option<Head>, Failed> {
    let mut headers = [const { MaybeUninit::<httparse::Header>::uninit() }; MAX_RESPONSE_HEADERS];
    let mut res = httparse::Response::new(&mut []);
    let len = match httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut res,
        up,
        &mut headers,
    ) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(Failed::Bad(format!("invalid response: {e}"))),
    };
    let (Some(version), Some(status)) = (res.version, res.code) else {
        return Err(Failed::Bad("invalid response".into()));
    };
    let mut reusable = version == 1;
    let mut length = None;
    let mut chunked = None;
    for h in res.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            let n = parse_length(h.value)
                .ok_or_else(|| Failed::Bad("invalid content-length".into()))?
                as u64;
            if length.replace(n).is_some_and(|m| m != n) {
                return Err(Failed::Bad("conflicting content-length".into()));
            }
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            // Chunked when chunked is the last coding.
            chunked = Some(
                h.value
                    .rsplit(|&b| b == b',')
                    .next()
                    .is_some_and(|c| c.trim_ascii().eq_ignore_ascii_case(b"chunked")),
            );
        } else if h.name.eq_ignore_ascii_case("connection") {
            for token in h.value.split(|&b| b == b',') {
                let token = token.trim_ascii();
                if token.eq_ignore_ascii_case(b"close") {
                    reusable = false;
                } else if token.eq_ignore_ascii_case(b"keep-alive") && version == 0 {
                    reusable = true;
                }
            }
        }
    }
    let framing = match (chunked, length) {
        (Some(true), _) => Framing::Chunked,
        (Some(false), _) => Framing::UntilClose,
        (None, Some(n)) => Framing::Length(n),
        (None, None) => Framing::UntilClose,
    };
    if chunked.is_some() && length.is_some() {
        // Framed by Transfer-Encoding (RFC 9112 §6.3); the length goes, and so does the connection.
        reusable = false;
    }
    if !(100..200).contains(&status) {
        out.clear();
        write_head_lines(out, &res, status, chunked.is_some());
    }
    Ok(Some(Head {
        status,
        len,
        framing,
        reusable,
    }))
}

/// Writes the response head and streams the body to the client; false when the client
/// connection must close. The upstream connection goes back to the pool after a complete
/// response the app keeps the connection open after.
#[allow(clippy::too_many_arguments)]
async fn respond(
    client: &mut impl Client,
    mut stream: TcpStream,
    up: &mut BytesMut,
    head: Head,
    plan: &Plan,
    upstream: &mut Upstream,
    endpoint: &super::routes::Endpoint,
    shutdown: &CancellationToken,
) -> bool {
    let no_body = plan.head || head.status == 204 || head.status == 304;
    let framing = if no_body { Framing::None } else { head.framing };
    let close = plan.close || shutdown.is_cancelled() || framing == Framing::UntilClose;
    // The head, written for the client by `parse_response`, gets its end.
    let out = &mut upstream.response;
    end_head(out, close);
    up.advance(head.len);
    let mut reusable = head.reusable;
    // What of `up` belongs to the body, and whether the body is complete.
    let mut chunks = ChunkScanner::default();
    let mut remaining = match framing {
        Framing::Length(n) => n,
        _ => 0,
    };
    let mut take = |up: &BytesMut, remaining: &mut u64| -> Result<(usize, bool), ()> {
        match framing {
            Framing::None => Ok((0, true)),
            Framing::Length(_) => {
                let n = (up.len() as u64).min(*remaining);
                *remaining -= n;
                Ok((n as usize, *remaining == 0))
            }
            Framing::Chunked => chunks.scan(up),
            Framing::UntilClose => Ok((up.len(), false)),
        }
    };
    let Ok((n, mut done)) = take(up, &mut remaining) else {
        return false;
    };
    if n < up.len() {
        // Bytes after the response: the connection cannot be trusted again.
        reusable = false;
    }
    // Flushed after each write: a TLS stream may hold written bytes back until then (a
    // no-op on TCP).
    if write_both(client, out, &up[..n]).await.is_err() || client.flush().await.is_err() {
        return false;
    }
    while !done {
        up.clear();
        up.reserve(READ_SIZE);
        match stream.read_buf(up).await {
            Ok(0) if framing == Framing::UntilClose => {
                done = true;
                reusable = false;
                continue;
            }
            // The app closed or failed mid-body: the client can only learn by a close.
            Ok(0) | Err(_) => return false,
            Ok(_) => {}
        }
        let Ok((n, end)) = take(up, &mut remaining) else {
            return false;
        };
        done = end;
        if n < up.len() {
            reusable = false;
        }
        if client.write_all(&up[..n]).await.is_err() || client.flush().await.is_err() {
            return false;
        }
    }
    if reusable {
        endpoint.pool.put_raw(stream);
    }
    !close
}

/// Writes `a`, then `b`, in one system call when the socket takes both.
async fn write_both(w: &mut impl Client, mut a: &[u8], mut b: &[u8]) -> std::io::Result<()> {
    while !a.is_empty() && !b.is_empty() {
        let n = w
            .write_vectored(&[std::io::IoSlice::new(a), std::io::IoSlice::new(b)])
            .await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        if n < a.len() {
            a = &a[n..];
        } else {
            b = &b[n - a.len()..];
            a = &[];
        }
    }
    w.write_all(a).await?;
    w.write_all(b).await
}

/// The response head for the client: the app's status and headers, hop-by-hop ones out
/// (framing kept: the body goes through as the app framed it), Date added when missing.
fn write_head_lines(
    out: &mut Vec<u8>,
    res: &httparse::Response<'_, '_>,
    status: u16,
    chunked_or_close: bool,
) {
    out.extend_from_slice(b"HTTP/1.1 ");
    let digits = [
        b'0' + (status / 100 % 10) as u8,
        b'0' + (status / 10 % 10) as u8,
        b'0' + (status % 10) as u8,
    ];
    out.extend_from_slice(&digits);
    out.push(b' ');
    let reason = match res.reason {
        Some(r) if !r.is_empty() => r,
        _ => StatusCode::from_u16(status)
            .ok()
            .and_then(|s| s.canonical_reason())
            .unwrap_or(""),
    };
    out.extend_from_slice(reason.as_bytes());
    out.extend_from_slice(b"\r\n");
    // The headers the app's Connection headers name go too (its first four such headers).
    let mut naming: [&[u8]; 4] = [b""; 4];
    let mut n_naming = 0;
    for h in res.headers.iter() {
        if n_naming < naming.len() && h.name.eq_ignore_ascii_case("connection") {
            naming[n_naming] = h.value;
            n_naming += 1;
        }
    }
    let naming = &naming[..n_naming];
    let mut date = false;
    for h in res.headers.iter() {
        if !naming.is_empty() && named(naming, h.name) {
            continue;
        }
        let is = |n: &str| h.name.eq_ignore_ascii_case(n);
        let skip = match h.name.len() {
            2 => is("te"),
            4 => {
                date |= is("date");
                false
            }
            7 => is("upgrade") || is("trailer"),
            10 => is("connection") || is("keep-alive"),
            14 => chunked_or_close && is("content-length"),
            16 => is("proxy-connection"),
            18 => is("proxy-authenticate"),
            _ => false,
        };
        if !skip {
            out.extend_from_slice(h.name.as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(h.value);
            out.extend_from_slice(b"\r\n");
        }
    }
    if !date {
        write_date(out);
    }
}

/// Ends a head `parse_response` wrote, telling the client when its connection closes.
fn end_head(out: &mut Vec<u8>, close: bool) {
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// A Date header line, made once a second per thread.
fn write_date(out: &mut Vec<u8>) {
    use std::cell::RefCell;
    thread_local! {
        static DATE: RefCell<(u64, String)> = const { RefCell::new((0, String::new())) };
    }
    let now = std::time::SystemTime::now();
    let secs = now
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    DATE.with(|d| {
        let mut d = d.borrow_mut();
        if d.0 != secs || d.1.is_empty() {
            *d = (secs, httpdate::fmt_http_date(now));
        }
        out.extend_from_slice(b"date: ");
        out.extend_from_slice(d.1.as_bytes());
        out.extend_from_slice(b"\r\n");
    });
}

/// Follows a chunked body through its chunks to its end (the bytes pass on as they are).
#[derive(Default)]
struct ChunkScanner {
    state: Chunk,
    size: u64,
    digits: u8,
}

#[derive(Default, Clone, Copy, PartialEq)]
enum Chunk {
    #[default]
    Size,
    Extension,
    SizeLf,
    Data,
    DataCr,
    DataLf,
    TrailerStart,
    Trailer,
    TrailerLf,
    EndLf,
    Done,
}

impl ChunkScanner {
    /// How many bytes of `bytes` belong to the body, and whether it ended there.
    fn scan(&mut self, bytes: &[u8]) -> Result<(usize, bool), ()> {
        let mut i = 0;
        while i < bytes.len() && self.state != Chunk::Done {
            let b = bytes[i];
            self.state = match self.state {
                Chunk::Size => match b {
                    b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F' => {
                        let d = (b as char).to_digit(16).ok_or(())? as u64;
                        self.digits += 1;
                        if self.digits > 15 {
                            return Err(());
                        }
                        self.size = self.size * 16 + d;
                        Chunk::Size
                    }
                    b';' | b' ' | b'\t' if self.digits > 0 => Chunk::Extension,
                    b'\r' if self.digits > 0 => Chunk::SizeLf,
                    _ => return Err(()),
                },
                Chunk::Extension => match b {
                    b'\r' => Chunk::SizeLf,
                    b'\n' => return Err(()),
                    _ => Chunk::Extension,
                },
                Chunk::SizeLf => match b {
                    b'\n' if self.size == 0 => Chunk::TrailerStart,
                    b'\n' => Chunk::Data,
                    _ => return Err(()),
                },
                Chunk::Data => {
                    let n = (self.size as usize).min(bytes.len() - i);
                    self.size -= n as u64;
                    i += n;
                    if self.size == 0 {
                        self.state = Chunk::DataCr;
                    }
                    continue;
                }
                Chunk::DataCr if b == b'\r' => Chunk::DataLf,
                Chunk::DataLf if b == b'\n' => {
                    self.digits = 0;
                    Chunk::Size
                }
                Chunk::TrailerStart if b == b'\r' => Chunk::EndLf,
                Chunk::TrailerStart | Chunk::Trailer if b == b'\n' => return Err(()),
                Chunk::TrailerStart | Chunk::Trailer if b == b'\r' => Chunk::TrailerLf,
                Chunk::TrailerStart | Chunk::Trailer => Chunk::Trailer,
                Chunk::TrailerLf if b == b'\n' => Chunk::TrailerStart,
                Chunk::EndLf if b == b'\n' => Chunk::Done,
                _ => return Err(()),
            };
            i += 1;
        }
        Ok((i, self.state == Chunk::Done))
    }
}

thread_local! {
    /// Read buffers for responses, reused by the worker's requests.
    static BUFFERS: std::cell::RefCell<Vec<BytesMut>> = const { std::cell::RefCell::new(Vec::new()) };
}

fn take_buffer() -> BytesMut {
    BUFFERS
        .with(|b| b.borrow_mut().pop())
        .unwrap_or_else(|| BytesMut::with_capacity(READ_SIZE))
}

fn give_buffer(mut buf: BytesMut) {
    buf.clear();
    // Reclaims the room before the read position (what `advance` moved past): no allocation.
    buf.reserve(READ_SIZE);
    if buf.capacity() >= READ_SIZE && buf.capacity() <= 4 * READ_SIZE {
        BUFFERS.with(|b| {
            let mut b = b.borrow_mut();
            if b.len() < 256 {
                b.push(buf);
            }
        });
    }
}

/// A deadline watched by one timer that is set again only when it fires early: moving the
/// deadline later, as every request does, costs nothing, where a timer per request would
/// add and remove a timer-wheel entry each time (and wake the runtime's driver).
struct Deadline {
    at: Instant,
    sleep: Pin<Box<Sleep>>,
}

impl Deadline {
    fn new(at: Instant) -> Deadline {
        Deadline {
            at,
            sleep: Box::pin(tokio::time::sleep_until(at)),
        }
    }

    fn set(&mut self, at: Instant) {
        self.at = at;
        if at < self.sleep.deadline() {
            self.sleep.as_mut().reset(at);
        }
    }

    /// Whether the deadline has passed (and otherwise a wake-up when it might have).
    fn poll_expired(&mut self, cx: &mut Context<'_>) -> bool {
        while self.sleep.as_mut().poll(cx).is_ready() {
            if Instant::now() >= self.at {
                return true;
            }
            let at = self.at;
            self.sleep.as_mut().reset(at);
        }
        false
    }

    /// `fut`'s output, or None when the deadline passes first.
    async fn within<F: Future>(&mut self, fut: F) -> Option<F::Output> {
        let mut fut = std::pin::pin!(fut);
        std::future::poll_fn(|cx| {
            if let Poll::Ready(v) = fut.as_mut().poll(cx) {
                return Poll::Ready(Some(v));
            }
            if self.poll_expired(cx) {
                return Poll::Ready(None);
            }
            Poll::Pending
        })
        .await
    }
}

/// A stream whose first bytes were read already: hyper reads them again from here.
pub struct Rewind<S> {
    pre: bytes::Bytes,
    inner: S,
}

impl<S> Rewind<S> {
    pub fn new(pre: BytesMut, inner: S) -> Rewind<S> {
        Rewind {
            pre: pre.freeze(),
            inner,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewind<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if !self.pre.is_empty() {
            let n = self.pre.len().min(buf.remaining());
            buf.put_slice(&self.pre[..n]);
            self.pre.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Rewind<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_buffers_are_reused_after_reads_moved_past_their_start() {
        let mut b = take_buffer();
        b.extend_from_slice(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok");
        b.advance(38);
        let pooled = || BUFFERS.with(|b| b.borrow().len());
        let before = pooled();
        give_buffer(b);
        assert_eq!(pooled(), before + 1, "kept for the next request");
        let again = take_buffer();
        assert!(again.is_empty() && again.capacity() >= READ_SIZE);
    }

    #[test]
    fn chunked_bodies_are_followed_to_their_end_across_reads() {
        let body = b"5;ext=1\r\nhello\r\n0\r\nx-trailer: 1\r\n\r\nNEXT";
        for split in 0..body.len() {
            let mut s = ChunkScanner::default();
            let (a, done_a) = s.scan(&body[..split]).unwrap();
            assert_eq!(a, split.min(body.len() - 4));
            if done_a {
                assert_eq!(a, body.len() - 4);
                continue;
            }
            let (b, done) = s.scan(&body[split..]).unwrap();
            assert!(done, "split at {split}");
            assert_eq!(a + b, body.len() - 4, "split at {split}");
        }
        assert!(ChunkScanner::default().scan(b"zz\r\n").is_err());
        assert!(ChunkScanner::default().scan(b"\r\n").is_err());
        assert!(ChunkScanner::default().scan(b"3\r\nabcX").is_err());
    }

    #[test]
    fn response_heads_say_how_their_bodies_end() {
        let framing = |head: &str| {
            parse_response(head.as_bytes(), &mut Vec::new())
                .ok()
                .flatten()
                .map(|h| (h.framing, h.reusable))
        };
        assert_eq!(
            framing("HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n"),
            Some((Framing::Length(5), true))
        );
        assert_eq!(
            framing("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"),
            Some((Framing::Chunked, true))
        );
        assert_eq!(
            framing("HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n"),
            Some((Framing::UntilClose, false))
        );
        assert_eq!(
            framing("HTTP/1.0 200 OK\r\ncontent-length: 1\r\n\r\n"),
            Some((Framing::Length(1), false))
        );
        assert_eq!(framing("HTTP/1.1 200 OK\r\ncontent-length: 5\r\n"), None);
        assert!(
            parse_response(
                b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n",
                &mut Vec::new()
            )
            .is_err()
        );
        assert!(
            parse_response(
                b"HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n",
                &mut Vec::new()
            )
            .is_err()
        );
    }

    #[test]
    fn the_response_head_loses_hop_by_hop_headers_and_gains_a_date() {
        let mut out = Vec::new();
        parse_response(
            b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\nContent-Length: 2\r\nX-App: 1\r\n\r\n",
            &mut out,
        )
        .ok()
        .flatten()
        .unwrap();
        end_head(&mut out, true);
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
        assert!(
            !text.contains("Keep-Alive") && !text.contains("Connection: keep-alive"),
            "{text}"
        );
        assert!(
            text.contains("Content-Length: 2\r\n") && text.contains("X-App: 1\r\n"),
            "{text}"
        );
        assert!(
            text.contains("date: ") && text.ends_with("connection: close\r\n\r\n"),
            "{text}"
        );
    }
}
