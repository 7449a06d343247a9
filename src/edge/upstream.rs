//! Connections to an endpoint: pools of idle keep-alive HTTP/1.1 connections per endpoint
//! and worker, taken for one request and given back when its response has been read to the
//! end — hyper `client::conn` ones for hyper's path ([`send`]), plain TCP streams for the
//! fast path ([`super::h1`], `take_raw`/`put_raw`/`sweep_raw`).
//!
//! Why not hyper-util's pooled client: it keys its pool by URI on every request and spawns
//! a task per response to watch the connection; here the pool hangs off the endpoint the
//! request already chose, and a connection goes back to it from the response body's end.

use std::pin::Pin;
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::body::{Body as HttpBody, Frame, Incoming, SizeHint};
use hyper::client::conn::http1;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;

use super::proxy::Body;
use super::routes::Endpoint;

/// Idle connections kept per endpoint.
const MAX_IDLE: usize = 512;

thread_local! {
    /// Which edge worker thread this is: each has its own idle connections, so a request
    /// and its upstream connection are driven by the same thread.
    static WORKER: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Marks the current thread as edge worker `n`.
pub fn set_worker(n: usize) {
    WORKER.with(|w| w.set(n));
}

/// Slots per pool: one per possible worker (the workers are as many as the CPUs).
fn slots() -> usize {
    static SLOTS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *SLOTS.get_or_init(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    })
}

type Idle = Vec<(http1::SendRequest<Body>, Instant)>;

/// One worker's part of an endpoint, alone on its cache lines: neighbouring slots would
/// otherwise share one, and every request of one worker would evict it from the other's core.
#[repr(align(128))]
struct Slot {
    idle: Mutex<Idle>,
    /// Idle connections of the HTTP/1 fast path ([`super::h1`]), which speaks HTTP/1.1 on
    /// them itself.
    raw: Mutex<Vec<(tokio::net::TcpStream, Instant)>>,
    /// This worker's requests in flight to the endpoint. Each worker balances by its own
    /// counts (as nginx's workers do without a shared zone): no count is shared between cores.
    outstanding: AtomicUsize,
}

/// The idle connections of one endpoint and the requests in flight to it, per worker thread.
pub struct Pool {
    slots: Box<[Slot]>,
}

impl Default for Pool {
    fn default() -> Self {
        Pool {
            slots: (0..slots())
                .map(|_| Slot {
                    idle: Mutex::new(Vec::new()),
                    raw: Mutex::new(Vec::new()),
                    outstanding: AtomicUsize::new(0),
                })
                .collect(),
        }
    }
}

impl Pool {
    fn mine(&self) -> &Mutex<Idle> {
        &self.slots[self.my_slot()].idle
    }

    /// The slot of the calling worker thread.
    pub fn my_slot(&self) -> usize {
        WORKER.with(|w| w.get()) % self.slots.len()
    }

    /// An idle fast-path connection of this worker's, unused for less than `max_idle` and
    /// with nothing to read (an idle HTTP/1.1 connection that turns readable was closed by
    /// the app, or sent what it should not have). Nothing here makes a system call.
    pub fn take_raw(&self, max_idle: Duration) -> Option<tokio::net::TcpStream> {
        let mut raw = self.slots[self.my_slot()].raw.lock().expect("pool lock");
        while let Some((stream, since)) = raw.pop() {
            if since.elapsed() > max_idle {
                continue;
            }
            // The runtime's readiness flag, set by an event since `put_raw` cleared it.
            if stream
                .try_io(tokio::io::Interest::READABLE, || Ok(()))
                .is_ok()
            {
                continue;
            }
            return Some(stream);
        }
        None
    }

    /// Closes this worker's idle fast-path connections that expired or that the app closed
    /// (hyper's pooled connections close themselves: each has a task watching it).
    pub fn sweep_raw(&self, max_idle: Duration) {
        let mut raw = self.slots[self.my_slot()].raw.lock().expect("pool lock");
        raw.retain(|(stream, since)| {
            since.elapsed() <= max_idle
                && stream
                    .try_io(tokio::io::Interest::READABLE, || Ok(()))
                    .is_err()
        });
    }

    /// Gives a fast-path connection back after a complete exchange, its response read to
    /// the end.
    pub fn put_raw(&self, stream: tokio::net::TcpStream) {
        // What made it readable so far was the response, read now: forget that readiness
        // (no system call), so that `take_raw` sees only what comes after (a close).
        let _ = stream.try_io(tokio::io::Interest::READABLE, || {
            Err::<(), _>(std::io::ErrorKind::WouldBlock.into())
        });
        let mut raw = self.slots[self.my_slot()].raw.lock().expect("pool lock");
        if raw.len() < MAX_IDLE {
            raw.push((stream, Instant::now()));
        }
    }

    /// Requests in flight from worker slot `slot`.
    pub fn outstanding(&self, slot: usize) -> &AtomicUsize {
        &self.slots[slot].outstanding
    }
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n: usize = self
            .slots
            .iter()
            .map(|s| {
                s.idle.lock().map(|i| i.len()).unwrap_or(0)
                    + s.raw.lock().map(|i| i.len()).unwrap_or(0)
            })
            .sum();
        write!(f, "Pool {{ idle: {n} }}")
    }
}

/// Why a request to an endpoint failed.
#[derive(Debug)]
pub enum SendError {
    /// No connection could be made: nothing reached the app.
    Connect(String),
    /// The request went out (at least partly) and no response came.
    Failed(String),
}

impl std::fmt::Display for SendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SendError::Connect(e) => write!(f, "connect: {e}"),
            SendError::Failed(e) => write!(f, "{e}"),
        }
    }
}

/// Sends `req` to `endpoint` on an idle connection, or a new one.
pub async fn send(
    endpoint: &Arc<Endpoint>,
    mut req: Request<Body>,
    connect_timeout: Duration,
    idle_timeout: Duration,
) -> Result<Response<PooledBody>, SendError> {
    loop {
        let idle = endpoint.pool.mine().lock().expect("pool lock").pop();
        let Some((mut sender, since)) = idle else {
            break;
        };
        if since.elapsed() > idle_timeout || sender.is_closed() {
            continue;
        }
        if sender.ready().await.is_err() {
            continue;
        }
        match sender.try_send_request(req).await {
            Ok(response) => return Ok(pooled(response, sender, endpoint)),
            Err(mut e) => match e.take_message() {
                // The connection closed before the request was written: another one.
                Some(unsent) => req = unsent,
                None => return Err(SendError::Failed(e.into_error().to_string())),
            },
        }
    }
    let stream = match tokio::time::timeout(
        connect_timeout,
        tokio::net::TcpStream::connect(endpoint.addr),
    )
    .await
    {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err(SendError::Connect(e.to_string())),
        Err(_) => {
            return Err(SendError::Connect(format!(
                "no answer within {connect_timeout:?}"
            )));
        }
    };
    let _ = stream.set_nodelay(true);
    let (mut sender, conn) = http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| SendError::Connect(e.to_string()))?;
    tokio::spawn(async move {
        // Upgrades (WebSocket) take the connection over; otherwise it ends when closed.
        let _ = conn.with_upgrades().await;
    });
    match sender.try_send_request(req).await {
        Ok(response) => Ok(pooled(response, sender, endpoint)),
        Err(mut e) => Err(match e.take_message() {
            Some(_) => SendError::Connect(e.into_error().to_string()),
            None => SendError::Failed(e.into_error().to_string()),
        }),
    }
}

fn pooled(
    response: Response<Incoming>,
    sender: http1::SendRequest<Body>,
    endpoint: &Arc<Endpoint>,
) -> Response<PooledBody> {
    response.map(|inner| PooledBody {
        inner,
        back: Some((sender, Arc::downgrade(endpoint))),
    })
}

/// A response body that gives its connection back to the endpoint's pool once read to
/// the end (a body dropped before its end takes the connection with it).
pub struct PooledBody {
    inner: Incoming,
    back: Option<(http1::SendRequest<Body>, Weak<Endpoint>)>,
}

impl PooledBody {
    fn give_back(&mut self) {
        if let Some((sender, endpoint)) = self.back.take()
            && let Some(endpoint) = endpoint.upgrade()
        {
            let mut idle = endpoint.pool.mine().lock().expect("pool lock");
            if idle.len() < MAX_IDLE {
                idle.push((sender, Instant::now()));
            }
        }
    }

    /// A 101 response's connection belongs to the upgrade, never to the pool.
    pub fn keep_connection_out(&mut self) {
        self.back = None;
    }
}

impl HttpBody for PooledBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => self.give_back(),
            Poll::Ready(Some(Err(_))) => self.back = None,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for PooledBody {
    fn drop(&mut self) {
        // An empty body (HEAD, 204, 304) may never be polled.
        if self.inner.is_end_stream() {
            self.give_back();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    fn idle_raw(pool: &Pool) -> usize {
        pool.slots[pool.my_slot()].raw.lock().unwrap().len()
    }

    #[tokio::test]
    async fn a_fast_path_connection_the_app_closed_is_swept_and_never_taken() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let pool = Pool::default();
        let mut apps = Vec::new();
        for _ in 0..2 {
            let client = tokio::net::TcpStream::connect(addr).await.unwrap();
            apps.push(listener.accept().await.unwrap().0);
            pool.put_raw(client);
        }
        // Both open: both kept, and one is handed out.
        pool.sweep_raw(Duration::from_secs(90));
        assert_eq!(idle_raw(&pool), 2);
        let taken = pool
            .take_raw(Duration::from_secs(90))
            .expect("an open connection");
        pool.put_raw(taken);

        // The app closes one; once the event is in, the sweep closes it and keeps the other.
        let mut closed = apps.remove(0);
        closed.shutdown().await.unwrap();
        drop(closed);
        tokio::time::sleep(Duration::from_millis(100)).await;
        pool.sweep_raw(Duration::from_secs(90));
        assert_eq!(idle_raw(&pool), 1);

        // The other one closes too: take_raw passes it over.
        drop(apps.remove(0));
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(pool.take_raw(Duration::from_secs(90)).is_none());

        // Unused too long: swept.
        let client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let _app = listener.accept().await.unwrap().0;
        pool.put_raw(client);
        pool.sweep_raw(Duration::ZERO);
        assert_eq!(idle_raw(&pool), 0);
    }
}
