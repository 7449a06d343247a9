//! One request through the edge: find the route by host, pick an endpoint, forward with the
//! forwarding headers, stream the response back (never buffered), and pass upgrades
//! (WebSocket) through as raw byte streams.
//!
//! Retries go to another endpoint only when nothing of the request can have reached an app:
//! a connect failure, or a bodiless idempotent request whose connection closed before any
//! response byte.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Method, Request, Response, StatusCode, Version};
use hyper_util::rt::TokioIo;

use super::routes::{Endpoint, RouteTable, normalize_host};
use crate::metrics::{Counter, Histogram};

pub type Body = BoxBody<Bytes, hyper::Error>;

/// Timeouts of the upstream side.
#[derive(Debug, Clone)]
pub struct UpstreamTimeouts {
    pub connect: Duration,
    /// From sending the request to the response's headers.
    pub response_headers: Duration,
    /// Pooled keep-alive connections unused this long are closed.
    pub idle: Duration,
}

impl Default for UpstreamTimeouts {
    fn default() -> Self {
        UpstreamTimeouts {
            connect: Duration::from_secs(2),
            response_headers: Duration::from_secs(60),
            idle: Duration::from_secs(90),
        }
    }
}

/// The client end of a connection, with what its requests' forwarding headers say about
/// it, made once per connection rather than once per request.
pub struct Peer {
    /// The client's address as X-Forwarded-For gives it.
    ip: HeaderValue,
    /// The client's address as a Forwarded `for=` token (IPv6 quoted and bracketed).
    pub(super) forwarded_for: String,
}

impl Peer {
    pub fn new(addr: SocketAddr) -> Peer {
        let ip = addr.ip().to_canonical();
        let forwarded_for = if ip.is_ipv6() {
            format!("\"[{ip}]\"")
        } else {
            ip.to_string()
        };
        Peer {
            ip: HeaderValue::from_str(&ip.to_string()).expect("an address is a header value"),
            forwarded_for,
        }
    }

    /// The address as X-Forwarded-For lists it.
    pub(super) fn forwarded_ip(&self) -> &str {
        self.ip.to_str().unwrap_or_default()
    }
}

/// What every request needs.
#[derive(Clone)]
pub struct Proxy {
    pub table: Arc<RouteTable>,
    pub(super) timeouts: UpstreamTimeouts,
    pub(super) latency: Arc<Histogram>,
    /// Connections the fast path ([`super::h1`]) handed to hyper.
    pub(super) handed_to_hyper: Arc<Counter>,
}

impl Proxy {
    pub fn new(
        table: Arc<RouteTable>,
        timeouts: UpstreamTimeouts,
        latency: Arc<Histogram>,
        handed_to_hyper: Arc<Counter>,
    ) -> Proxy {
        Proxy {
            table,
            timeouts,
            latency,
            handed_to_hyper,
        }
    }

    /// Serves one request from `client` over `scheme` (`http` or `https`).
    pub async fn handle(
        self: Arc<Self>,
        mut req: Request<Incoming>,
        client: Arc<Peer>,
        scheme: &'static str,
    ) -> Result<Response<Body>, Infallible> {
        let started = Instant::now();
        // The host as the client sent it (a cheap clone of the header's bytes), for
        // X-Forwarded-Host and Forwarded; HTTP/2 carries it as :authority.
        let raw_host = match req.uri().authority() {
            Some(a) => HeaderValue::from_str(a.as_str()).ok(),
            None => req.headers().get(header::HOST).cloned(),
        }
        .unwrap_or_else(|| HeaderValue::from_static(""));
        let raw_host_str = raw_host.to_str().unwrap_or_default();
        let host = normalize_host(raw_host_str);
        let method = req.method().clone();
        let path = req
            .uri()
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| hyper::http::uri::PathAndQuery::from_static("/"));
        let log = |status: StatusCode, upstream: Option<SocketAddr>| {
            access_log(
                &host,
                method.as_str(),
                path.as_str(),
                status.as_u16(),
                upstream,
                started,
            )
        };
        let Some(route) = self.table.get(&host) else {
            let response = page(StatusCode::NOT_FOUND, "no app answers to this host");
            log(response.status(), None);
            return Ok(response);
        };
        let metrics = self.table.metrics_of(&route);
        metrics.requests.inc();

        let upgrade =
            req.headers().contains_key(header::UPGRADE) && req.version() == Version::HTTP_11;
        let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
        let bodiless = is_bodiless(req.headers());
        let retriable = bodiless && is_idempotent(&method);
        let (mut parts, body) = req.into_parts();
        forwarding_headers(&mut parts.headers, &client, scheme, &raw_host, upgrade);
        let mut body = Some(body.boxed());
        let mut tried: Option<i64> = None;
        let mut last_error = String::new();
        for attempt in 0..2 {
            let Some(endpoint) = self.table.pick(&route, tried) else {
                break;
            };
            tried = Some(endpoint.instance_id);
            let outgoing_body = match body.take() {
                Some(b) => b,
                None => empty(),
            };
            let mut request = Request::new(outgoing_body);
            *request.method_mut() = method.clone();
            *request.uri_mut() = hyper::Uri::from(path.clone());
            *request.version_mut() = Version::HTTP_11;
            // Kept for a second attempt when one can come (every retry is of a bodiless request).
            *request.headers_mut() = if attempt == 0 && bodiless {
                parts.headers.clone()
            } else {
                std::mem::take(&mut parts.headers)
            };
            // The guard holds the picked endpoint (the request's only reference count on it).
            let guard = InFlight::new(endpoint);
            let endpoint = &guard.0;
            let sent = tokio::time::timeout(
                self.timeouts.response_headers,
                super::upstream::send(endpoint, request, self.timeouts.connect, self.timeouts.idle),
            )
            .await;
            match sent {
                Ok(Ok(mut response)) => {
                    let status = response.status();
                    log(status, Some(endpoint.addr));
                    self.latency.observe(started.elapsed());
                    if status == StatusCode::SWITCHING_PROTOCOLS
                        && let Some(client_upgrade) = client_upgrade
                    {
                        response.body_mut().keep_connection_out();
                        let upstream_upgrade = hyper::upgrade::on(&mut response);
                        tokio::spawn(async move {
                            let _guard = guard;
                            if let (Ok(down), Ok(up)) =
                                (client_upgrade.await, upstream_upgrade.await)
                            {
                                let _ = tokio::io::copy_bidirectional(
                                    &mut TokioIo::new(down),
                                    &mut TokioIo::new(up),
                                )
                                .await;
                            }
                        });
                        let (mut rparts, _) = response.into_parts();
                        strip_hop_by_hop(&mut rparts.headers, true);
                        return Ok(Response::from_parts(rparts, empty()));
                    }
                    let (mut rparts, rbody) = response.into_parts();
                    strip_hop_by_hop(&mut rparts.headers, false);
                    // The endpoint counts as busy until the body is streamed out (the
                    // guard goes with the body).
                    let rbody = rbody
                        .map_frame(move |frame| {
                            let _busy = &guard;
                            frame
                        })
                        .boxed();
                    return Ok(Response::from_parts(rparts, rbody));
                }
                Ok(Err(e)) => {
                    metrics.upstream_errors.inc();
                    let connect = matches!(e, super::upstream::SendError::Connect(_));
                    if connect {
                        self.table.eject(endpoint);
                    }
                    last_error = format!("{e}");
                    tracing::debug!(app.name = %route.app, upstream = %endpoint.addr, error = %e, "upstream request failed");
                    drop(guard);
                    // Nothing reached the app (connect), or nothing can be lost by asking again.
                    if attempt == 0 && (retriable || (connect && bodiless)) {
                        continue;
                    }
                    break;
                }
                Err(_) => {
                    metrics.upstream_errors.inc();
                    last_error = "the app did not answer in time".into();
                    let response = page(StatusCode::GATEWAY_TIMEOUT, &last_error);
                    log(response.status(), Some(endpoint.addr));
                    return Ok(response);
                }
            }
        }
        let response = if tried.is_none() {
            let mut r = page(
                StatusCode::SERVICE_UNAVAILABLE,
                "no healthy instance of this app right now",
            );
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            r
        } else {
            tracing::warn!(app.name = %route.app, error = %last_error, "bad gateway");
            page(
                StatusCode::BAD_GATEWAY,
                "the app's instance could not be reached",
            )
        };
        log(response.status(), None);
        Ok(response)
    }
}

/// Keeps an endpoint's outstanding count (the creating worker's) while a request and its
/// response body are in flight.
pub(super) struct InFlight(pub(super) Arc<Endpoint>, usize);

impl InFlight {
    pub(super) fn new(endpoint: Arc<Endpoint>) -> InFlight {
        let slot = endpoint.pool.my_slot();
        endpoint
            .pool
            .outstanding(slot)
            .fetch_add(1, Ordering::Relaxed);
        InFlight(endpoint, slot)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0
            .pool
            .outstanding(self.1)
            .fetch_sub(1, Ordering::Relaxed);
    }
}

pub(super) fn access_log(
    host: &str,
    method: &str,
    path: &str,
    status: u16,
    upstream: Option<SocketAddr>,
    started: Instant,
) {
    tracing::info!(
        target: "berth::access",
        host,
        method,
        path,
        status,
        upstream = upstream.map(|u| u.to_string()).unwrap_or_default(),
        duration_ms = started.elapsed().as_secs_f64() * 1e3,
    );
}

fn empty() -> Body {
    Empty::<Bytes>::new()
        .map_err(|never| match never {})
        .boxed()
}

/// The text of a small page of the edge's own.
pub(super) fn page_text(status: StatusCode, message: &str) -> String {
    format!(
        "<!doctype html><title>{code}</title><h1>{code}</h1><p>{message}</p><hr><p>berth edge</p>\n",
        code = status
    )
}

/// A small page of the edge's own.
pub fn page(status: StatusCode, message: &str) -> Response<Body> {
    let text = page_text(status, message);
    let mut response = Response::new(
        Full::new(Bytes::from(text))
            .map_err(|never| match never {})
            .boxed(),
    );
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    response
}

fn is_bodiless(headers: &HeaderMap) -> bool {
    !headers.contains_key(header::TRANSFER_ENCODING)
        && headers
            .get(header::CONTENT_LENGTH)
            .is_none_or(|v| v.as_bytes() == b"0")
}

fn is_idempotent(method: &Method) -> bool {
    is_idempotent_name(method.as_str())
}

/// Whether a method may be sent again without changing the outcome (RFC 9110 §9.2.2).
pub(super) fn is_idempotent_name(method: &str) -> bool {
    matches!(
        method,
        "GET" | "HEAD" | "OPTIONS" | "PUT" | "DELETE" | "TRACE"
    )
}

/// Headers that describe one connection, never forwarded (RFC 9110 §7.6.1).
static HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Removes hop-by-hop headers, and those the Connection header names. An upgrade keeps its
/// `Connection: upgrade` and `Upgrade`.
fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    // Most messages have none: one pass over the names instead of eight removals. A header
    // named by Connection can only be there with a Connection header.
    if !headers.keys().any(|k| HOP_BY_HOP.contains(k)) {
        return;
    }
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    let kept_upgrade = headers.get(header::UPGRADE).cloned();
    for name in named {
        headers.remove(name);
    }
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
    if upgrade && let Some(u) = kept_upgrade {
        headers.insert(header::UPGRADE, u);
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
}

/// A header value made from a string without copying it again.
fn owned_value(s: String) -> Option<HeaderValue> {
    HeaderValue::from_maybe_shared(Bytes::from(s)).ok()
}

/// Hop-by-hop headers out; X-Forwarded-*, Forwarded and X-Request-Id in.
fn forwarding_headers(
    headers: &mut HeaderMap,
    client: &Peer,
    scheme: &'static str,
    host: &HeaderValue,
    upgrade: bool,
) {
    strip_hop_by_hop(headers, upgrade);
    let xff = match headers.get(&X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
        Some(prior) => owned_value(format!("{prior}, {}", client.forwarded_ip())),
        None => Some(client.ip.clone()),
    };
    let host_str = host.to_str().unwrap_or_default();
    let entry_len = client.forwarded_for.len() + host_str.len() + 24;
    let prior = headers.get(header::FORWARDED).and_then(|v| v.to_str().ok());
    let mut forwarded = String::with_capacity(entry_len + prior.map_or(0, |p| p.len() + 2));
    if let Some(prior) = prior {
        forwarded.push_str(prior);
        forwarded.push_str(", ");
    }
    forwarded.push_str("for=");
    forwarded.push_str(&client.forwarded_for);
    forwarded.push_str(";host=\"");
    forwarded.push_str(host_str);
    forwarded.push_str("\";proto=");
    forwarded.push_str(scheme);
    if let Some(v) = xff {
        headers.insert(X_FORWARDED_FOR.clone(), v);
    }
    headers.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static(scheme));
    headers.insert(X_FORWARDED_HOST.clone(), host.clone());
    if let Some(v) = owned_value(forwarded) {
        headers.insert(header::FORWARDED, v);
    }
    if !headers.contains_key(&X_REQUEST_ID) {
        headers.insert(X_REQUEST_ID.clone(), request_id());
    }
    if !headers.contains_key(header::HOST) {
        // An HTTP/2 request carries its host as :authority; HTTP/1.1 upstreams need Host.
        headers.insert(header::HOST, host.clone());
    }
}

/// 128 random bits in hex: a per-thread xorshift generator seeded from the kernel's (ids
/// must be unique, not secret; a read of /dev/urandom per request would cost a syscall).
fn request_id() -> HeaderValue {
    HeaderValue::from_bytes(&request_id_hex()).expect("hex digits are a header value")
}

/// A request id's 32 hex digits (see [`request_id`]).
pub(super) fn request_id_hex() -> [u8; 32] {
    use std::cell::Cell;
    thread_local! {
        static STATE: Cell<(u64, u64)> = Cell::new(seed());
    }
    fn seed() -> (u64, u64) {
        use std::io::Read;
        let mut bytes = [0u8; 16];
        if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
            let _ = f.read_exact(&mut bytes);
        }
        let a = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) | 1;
        let b = u64::from_le_bytes(bytes[8..].try_into().expect("8 bytes")) | 1;
        (a, b)
    }
    STATE.with(|s| {
        let (mut x, y) = s.get();
        // xorshift128+
        x ^= x << 23;
        let next = x ^ y ^ (x >> 17) ^ (y >> 26);
        s.set((y, next));
        let (hi, lo) = (next.wrapping_add(y), y.rotate_left(32) ^ next);
        let mut hex = [0u8; 32];
        for (i, nibble) in (0..16)
            .map(|i| (hi >> (60 - 4 * i)) & 0xf)
            .chain((0..16).map(|i| (lo >> (60 - 4 * i)) & 0xf))
            .enumerate()
        {
            hex[i] = b"0123456789abcdef"[nibble as usize];
        }
        hex
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_go_and_forwarding_headers_come() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret-hop"),
        );
        h.insert("x-secret-hop", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("te", HeaderValue::from_static("trailers"));
        h.insert("x-forwarded-for", HeaderValue::from_static("203.0.113.9"));
        h.insert("x-kept", HeaderValue::from_static("yes"));
        forwarding_headers(
            &mut h,
            &Peer::new("127.0.0.1:5555".parse().unwrap()),
            "http",
            &HeaderValue::from_static("hello.localhost:8080"),
            false,
        );
        assert!(h.get("connection").is_none() && h.get("x-secret-hop").is_none());
        assert!(h.get("keep-alive").is_none() && h.get("te").is_none());
        assert_eq!(h["x-forwarded-for"], "203.0.113.9, 127.0.0.1");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-host"], "hello.localhost:8080");
        assert_eq!(
            h["forwarded"],
            "for=127.0.0.1;host=\"hello.localhost:8080\";proto=http"
        );
        assert_eq!(h["x-request-id"].len(), 32);
        assert_eq!(h["x-kept"], "yes");
    }

    #[test]
    fn an_upgrade_keeps_its_upgrade_headers() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        forwarding_headers(
            &mut h,
            &Peer::new("[::1]:5555".parse().unwrap()),
            "https",
            &HeaderValue::from_static("ws.example"),
            true,
        );
        assert_eq!(h["upgrade"], "websocket");
        assert_eq!(h["connection"], "upgrade");
        assert_eq!(
            h["forwarded"],
            "for=\"[::1]\";host=\"ws.example\";proto=https"
        );
    }
}
