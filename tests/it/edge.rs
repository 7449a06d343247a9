//! The edge with real backends on loopback (small hyper servers in the test), real rows in
//! Postgres and real events through the listener and NATS.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use sqlx::PgPool;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::fixtures::{TestDb, TestNats, eventually, link_instance, start_listener};

type BoxBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

/// A backend answering as `name`: `/` gives the name, `/headers` the request headers,
/// `/echo` the request body, `/chunked` a chunked body, `/big` 1 MiB, `/empty` a 204, `/slow` its name
/// after a second, `/slower` after three, `/sse` two events with a pause, an upgrade request an echo of raw bytes.
struct Backend {
    addr: SocketAddr,
    stop: CancellationToken,
    /// Requests served.
    served: Arc<AtomicUsize>,
    /// Their paths.
    paths: Arc<std::sync::Mutex<Vec<String>>>,
}

impl Backend {
    async fn start(name: &'static str) -> Backend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let served = Arc::new(AtomicUsize::new(0));
        let paths: Arc<std::sync::Mutex<Vec<String>>> = Default::default();
        let (s, count, seen) = (stop.clone(), served.clone(), paths.clone());
        tokio::spawn(async move {
            let graceful = hyper_util::server::graceful::GracefulShutdown::new();
            loop {
                let (stream, _) = tokio::select! {
                    _ = s.cancelled() => break,
                    a = listener.accept() => a.unwrap(),
                };
                let (count, seen) = (count.clone(), seen.clone());
                let service =
                    hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                        count.fetch_add(1, Ordering::Relaxed);
                        seen.lock().unwrap().push(req.uri().path().to_string());
                        respond(name, req)
                    });
                let conn = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection_with_upgrades(TokioIo::new(stream), service)
                    .into_owned();
                let conn = graceful.watch(conn);
                tokio::spawn(conn);
            }
            // Like an app on SIGTERM: finish what is in flight, take nothing new.
            let _ = tokio::time::timeout(Duration::from_secs(5), graceful.shutdown()).await;
        });
        Backend {
            addr,
            stop,
            served,
            paths,
        }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// `/slower` requests answered, by every backend of the tests (a request whose connection
/// closed first is dropped by hyper before it answers).
static SLOWER_ANSWERED: AtomicUsize = AtomicUsize::new(0);

async fn respond(
    name: &'static str,
    mut req: Request<hyper::body::Incoming>,
) -> Result<Response<BoxBody>, Infallible> {
    let full = |s: String| Full::new(Bytes::from(s)).boxed();
    if req.headers().contains_key(hyper::header::UPGRADE) {
        let upgrade = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            if let Ok(up) = upgrade.await {
                let mut io = TokioIo::new(up);
                let mut buf = [0u8; 1024];
                while let Ok(n) = io.read(&mut buf).await {
                    if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            }
        });
        return Ok(Response::builder()
            .status(101)
            .header("upgrade", "websocket")
            .header("connection", "upgrade")
            .body(full(String::new()))
            .unwrap());
    }
    Ok(match req.uri().path() {
        "/echo" => {
            let body = req.into_body().collect().await.unwrap().to_bytes();
            Response::new(Full::new(body).boxed())
        }
        "/chunked" => {
            // No length: hyper sends it chunked, one chunk per frame.
            let frames =
                ["one,", "two,", "three"].map(|s| Ok::<_, Infallible>(Frame::data(Bytes::from(s))));
            Response::new(StreamBody::new(futures_util::stream::iter(frames)).boxed())
        }
        "/slow" => {
            tokio::time::sleep(Duration::from_millis(1000)).await;
            Response::new(full("slow".to_string()))
        }
        "/slower" => {
            tokio::time::sleep(Duration::from_millis(3000)).await;
            SLOWER_ANSWERED.fetch_add(1, Ordering::Relaxed);
            Response::new(full("slower".to_string()))
        }
        "/big" => Response::new(Full::new(Bytes::from(vec![b'x'; 1 << 20])).boxed()),
        "/empty" => Response::builder()
            .status(204)
            .body(full(String::new()))
            .unwrap(),
        "/headers" => {
            let mut text = String::new();
            for (k, v) in req.headers() {
                text.push_str(&format!("{k}: {}\n", v.to_str().unwrap_or("?")));
            }
            Response::new(full(text))
        }
        "/sse" => {
            let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(4);
            tokio::spawn(async move {
                let _ = tx
                    .send(Ok(Frame::data(Bytes::from("data: first\n\n"))))
                    .await;
                // The second event only after the first got through (the test asks /sse-next).
                tokio::time::sleep(Duration::from_millis(1500)).await;
                let _ = tx
                    .send(Ok(Frame::data(Bytes::from("data: second\n\n"))))
                    .await;
            });
            let stream = tokio_stream_from(rx);
            Response::builder()
                .header("content-type", "text/event-stream")
                .body(StreamBody::new(stream).boxed())
                .unwrap()
        }
        _ => Response::new(full(name.to_string())),
    })
}

fn tokio_stream_from<T: Send + 'static>(
    mut rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures_util::Stream<Item = T> + Send {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

/// Postgres, NATS, the listener and an edge on a free port.
struct World {
    db: TestDb,
    _nats: TestNats,
    edge: SocketAddr,
    /// The HTTPS listener, when started with a certificate folder.
    edge_tls: Option<SocketAddr>,
    /// The edge's metrics.
    metrics: Arc<berth::metrics::Metrics>,
    stop: CancellationToken,
    _listener: CancellationToken,
    node: i64,
}

impl World {
    async fn new() -> World {
        Self::with_options(Default::default()).await
    }

    /// A world with one app, `web.localhost`, served by a backend answering as `name`.
    async fn routed(name: &'static str) -> (World, Backend) {
        let world = World::new().await;
        let backend = Backend::start(name).await;
        let app = world.app("web", &["web.localhost"]).await;
        world.instance(app, backend.addr, "running").await;
        world.wait_routed("web.localhost").await;
        (world, backend)
    }

    async fn with_options(options: berth::edge::EdgeOptions) -> World {
        Self::start(options, None).await
    }

    async fn start(options: berth::edge::EdgeOptions, tls_dir: Option<&std::path::Path>) -> World {
        let db = TestDb::new().await;
        let nats = TestNats::start().await;
        let js = async_nats::jetstream::new(nats.client().await);
        berth::events::ensure_stream(&js).await.unwrap();
        let (listener, _) = start_listener(&db, nats.client().await);
        let node: i64 = sqlx::query_scalar("insert into nodes (name, address, last_heartbeat_at) values ('n1', '127.0.0.1', now()) returning id")
            .fetch_one(&db.pool)
            .await
            .unwrap();
        let bound = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let edge = bound.local_addr().unwrap();
        let stop = CancellationToken::new();
        let tls = match tls_dir {
            Some(dir) => Some((
                TcpListener::bind("127.0.0.1:0").await.unwrap(),
                dir.to_path_buf(),
            )),
            None => None,
        };
        let edge_tls = tls.as_ref().map(|(l, _)| l.local_addr().unwrap());
        let metrics = berth::metrics::Metrics::new();
        let deps = berth::edge::EdgeDeps {
            pool: db.pool.clone(),
            listener: bound,
            tls,
            metrics: metrics.clone(),
            options,
        };
        tokio::spawn(berth::edge::run(deps, js, stop.clone()));
        World {
            db,
            _nats: nats,
            edge,
            edge_tls,
            metrics,
            stop,
            _listener: listener,
            node,
        }
    }

    /// An app with `domains` and an active current deployment; returns (app, deployment).
    async fn app(&self, name: &str, domains: &[&str]) -> (i64, i64) {
        app_rows(&self.db.pool, name, domains).await
    }

    /// A running instance of the deployment at `addr`.
    async fn instance(&self, (app, deployment): (i64, i64), addr: SocketAddr, state: &str) -> i64 {
        let id: i64 = sqlx::query_scalar(
            "insert into instances (app_id, deployment_id, node_id, host, port, state) values ($1, $2, $3, $4, $5, $6) returning id",
        )
        .bind(app)
        .bind(deployment)
        .bind(self.node)
        .bind(addr.ip().to_string())
        .bind(addr.port() as i32)
        .bind(state)
        .fetch_one(&self.db.pool)
        .await
        .unwrap();
        link_instance(&self.db.pool, deployment, id).await;
        id
    }

    /// Waits until `host` answers 200 through the edge.
    async fn wait_routed(&self, host: &str) {
        eventually(
            &format!("{host} is routed"),
            Duration::from_secs(10),
            || async { self.get(host, "/").await.is_some_and(|r| r.0 == 200) },
        )
        .await;
    }

    async fn get(&self, host: &str, path: &str) -> Option<(u16, String, hyper::HeaderMap)> {
        get(self.edge, host, path).await
    }
}

impl Drop for World {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn app_rows(pool: &PgPool, name: &str, domains: &[&str]) -> (i64, i64) {
    let spec = serde_json::json!({"apiVersion": "berth/v1", "kind": "App", "name": name, "image": "x", "replicas": 1});
    let app: i64 = sqlx::query_scalar("insert into apps (name, spec, spec_hash, source) values ($1, $2, 'h', 'test') returning id")
        .bind(name)
        .bind(&spec)
        .fetch_one(pool)
        .await
        .unwrap();
    let dep: i64 = sqlx::query_scalar("insert into deployments (app_id, generation, spec, spec_hash, status) values ($1, 1, $2, 'h', 'active') returning id")
        .bind(app)
        .bind(&spec)
        .fetch_one(pool)
        .await
        .unwrap();
    sqlx::query("update apps set current_deployment_id = $2 where id = $1")
        .bind(app)
        .bind(dep)
        .execute(pool)
        .await
        .unwrap();
    for d in domains {
        sqlx::query("insert into domains (app_id, hostname) values ($1, $2)")
            .bind(app)
            .bind(d)
            .execute(pool)
            .await
            .unwrap();
    }
    (app, dep)
}

/// A keep-alive HTTP/1.1 client connection to the edge, and its connection task.
async fn http1_client<B>(
    edge: SocketAddr,
) -> (
    hyper::client::conn::http1::SendRequest<B>,
    tokio::task::JoinHandle<hyper::Result<()>>,
)
where
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let stream = TcpStream::connect(edge).await.unwrap();
    let (sender, conn) = hyper::client::conn::http1::handshake::<_, B>(TokioIo::new(stream))
        .await
        .unwrap();
    (sender, tokio::spawn(conn))
}

/// A GET of `path` at `host` on an open HTTP/1.1 connection.
async fn get_on(
    sender: &mut hyper::client::conn::http1::SendRequest<http_body_util::Empty<Bytes>>,
    host: &str,
    path: &str,
) -> Response<hyper::body::Incoming> {
    let req = Request::get(path)
        .header("host", host)
        .body(http_body_util::Empty::new())
        .unwrap();
    sender.send_request(req).await.unwrap()
}

/// One HTTP/1.1 request on a fresh connection.
async fn get(edge: SocketAddr, host: &str, path: &str) -> Option<(u16, String, hyper::HeaderMap)> {
    let stream = TcpStream::connect(edge).await.ok()?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake::<_, http_body_util::Empty<Bytes>>(TokioIo::new(
            stream,
        ))
        .await
        .ok()?;
    tokio::spawn(conn);
    let req = Request::get(path)
        .header("host", host)
        .header("connection", "keep-alive, x-hop")
        .header("x-hop", "secret")
        .body(http_body_util::Empty::new())
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(5), sender.send_request(req))
        .await
        .ok()?
        .ok()?;
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.ok()?.to_bytes();
    Some((status, String::from_utf8_lossy(&body).into_owned(), headers))
}

#[tokio::test]
async fn requests_are_routed_by_host_with_404_503_and_forwarding_headers() {
    let world = World::new().await;
    let a = Backend::start("backend a").await;
    let app_a = world.app("a", &["a.localhost"]).await;
    world.instance(app_a, a.addr, "running").await;
    world.app("empty", &["empty.localhost"]).await;
    let b = Backend::start("backend b").await;
    let app_b = world.app("b", &["b.localhost"]).await;
    world.instance(app_b, b.addr, "starting").await;

    world.wait_routed("a.localhost").await;
    let (status, body, _) = world.get("A.Localhost.:8080", "/").await.unwrap();
    assert_eq!(
        (status, body.as_str()),
        (200, "backend a"),
        "case, port and trailing dot do not matter"
    );

    let (status, body, _) = world.get("nobody.localhost", "/").await.unwrap();
    assert_eq!(status, 404);
    assert!(body.contains("no app answers to this host"), "{body}");

    // Each app's routes arrive by its own events: wait until both hosts are known.
    eventually("empty and b are known", Duration::from_secs(10), || async {
        world
            .get("empty.localhost", "/")
            .await
            .is_some_and(|r| r.0 != 404)
            && world
                .get("b.localhost", "/")
                .await
                .is_some_and(|r| r.0 != 404)
    })
    .await;
    let (status, _, headers) = world.get("empty.localhost", "/").await.unwrap();
    assert_eq!(status, 503);
    assert_eq!(headers["retry-after"], "1");
    let (status, _, _) = world.get("b.localhost", "/").await.unwrap();
    assert_eq!(status, 503, "a starting instance gets no traffic");

    let (_, seen, _) = world.get("a.localhost", "/headers").await.unwrap();
    assert!(seen.contains("x-forwarded-for: 127.0.0.1\n"), "{seen}");
    assert!(seen.contains("x-forwarded-proto: http\n"), "{seen}");
    assert!(seen.contains("x-forwarded-host: a.localhost\n"), "{seen}");
    assert!(
        seen.contains("forwarded: for=127.0.0.1;host=\"a.localhost\";proto=http\n"),
        "{seen}"
    );
    assert!(seen.contains("x-request-id: "), "{seen}");
    assert!(seen.contains("host: a.localhost\n"), "{seen}");
    assert!(
        !seen.contains("x-hop"),
        "headers named by Connection are hop-by-hop: {seen}"
    );
    assert!(a.served.load(Ordering::Relaxed) >= 2);
}

#[tokio::test]
async fn an_instance_becoming_running_is_routed_within_milliseconds_and_a_stopped_one_is_not() {
    let world = World::new().await;
    let one = Backend::start("one").await;
    let two = Backend::start("two").await;
    let app = world.app("web", &["web.localhost"]).await;
    let first = world.instance(app, one.addr, "running").await;
    world.wait_routed("web.localhost").await;

    let second = world.instance(app, two.addr, "starting").await;
    let committed = Instant::now();
    sqlx::query("update instances set state = 'running' where id = $1")
        .bind(second)
        .execute(&world.db.pool)
        .await
        .unwrap();
    eventually(
        "the new instance gets requests",
        Duration::from_secs(5),
        || async {
            two.served.load(Ordering::Relaxed) > 0 || {
                let _ = world.get("web.localhost", "/").await;
                false
            }
        },
    )
    .await;
    println!(
        "instance running -> first request routed to it: {:?}",
        committed.elapsed()
    );

    sqlx::query("update instances set desired_state = 'stopped' where id = $1")
        .bind(first)
        .execute(&world.db.pool)
        .await
        .unwrap();
    // Once the table has caught up, every request goes to `two`.
    eventually("only two is routed", Duration::from_secs(5), || async {
        let before = one.served.load(Ordering::Relaxed);
        for _ in 0..10 {
            assert_eq!(world.get("web.localhost", "/").await.unwrap().0, 200);
        }
        one.served.load(Ordering::Relaxed) == before
    })
    .await;
}

#[tokio::test]
async fn a_rolling_replacement_under_continuous_load_fails_no_request() {
    let world = World::new().await;
    let old: Vec<Backend> = vec![Backend::start("old").await, Backend::start("old").await];
    let app = world.app("web", &["web.localhost"]).await;
    let mut old_ids = Vec::new();
    for b in &old {
        old_ids.push(world.instance(app, b.addr, "running").await);
    }
    world.wait_routed("web.localhost").await;

    let stop_load = CancellationToken::new();
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let mut clients = Vec::new();
    for _ in 0..4 {
        let (edge, stop_load, ok, failed) =
            (world.edge, stop_load.clone(), ok.clone(), failed.clone());
        clients.push(tokio::spawn(async move {
            // Keep-alive connections to the edge, like a browser or a load balancer.
            let (mut sender, _conn) = http1_client::<http_body_util::Empty<Bytes>>(edge).await;
            while !stop_load.is_cancelled() {
                let req = Request::get("/")
                    .header("host", "web.localhost")
                    .body(http_body_util::Empty::new())
                    .unwrap();
                match sender.send_request(req).await {
                    Ok(r) if r.status() == 200 => {
                        let _ = r.into_body().collect().await;
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    other => {
                        eprintln!("failed: {:?}", other.map(|r| r.status()));
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }

    // The manager's and agents' steps of a rolling update, one instance at a time:
    // a new one runs, an old one is stopped (desired), and after the agent's
    // deregistration delay its process goes away.
    let new = [Backend::start("new").await, Backend::start("new").await];
    let dep2: i64 = sqlx::query_scalar("insert into deployments (app_id, generation, spec, spec_hash, status) select app_id, 2, spec, 'h2', 'active' from deployments where id = $1 returning id")
        .bind(app.1)
        .fetch_one(&world.db.pool)
        .await
        .unwrap();
    let mut old = old;
    for (i, backend) in new.iter().enumerate() {
        let id = world
            .instance((app.0, dep2), backend.addr, "starting")
            .await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        sqlx::query("update instances set state = 'running' where id = $1")
            .bind(id)
            .execute(&world.db.pool)
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        sqlx::query("update instances set desired_state = 'stopped' where id = $1")
            .bind(old_ids[i])
            .execute(&world.db.pool)
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(1000)).await; // the agent's deregistration delay
        drop(old.remove(0)); // SIGTERM: in-flight requests finish, the listener closes
    }
    sqlx::query("update apps set current_deployment_id = $2 where id = $1")
        .bind(app.0)
        .bind(dep2)
        .execute(&world.db.pool)
        .await
        .unwrap();
    sqlx::query("update deployments set status = 'superseded' where id = $1")
        .bind(app.1)
        .execute(&world.db.pool)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop_load.cancel();
    for c in clients {
        c.await.unwrap();
    }
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    println!("rolling replacement under load: {ok} requests, {failed} failed");
    assert!(ok > 100, "the load ran ({ok} requests)");
    assert_eq!(failed, 0);
    assert!(new.iter().all(|b| b.served.load(Ordering::Relaxed) > 0));
}

#[tokio::test]
async fn websockets_sse_and_http2_go_through() {
    let (world, _backend) = World::routed("streams").await;

    // An upgrade: the 101 comes back and bytes flow both ways.
    let mut ws = TcpStream::connect(world.edge).await.unwrap();
    ws.write_all(b"GET /chat HTTP/1.1\r\nHost: web.localhost\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n").await.unwrap();
    let mut buf = vec![0u8; 1024];
    let n = ws.read(&mut buf).await.unwrap();
    let head = String::from_utf8_lossy(&buf[..n]).to_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: websocket"), "{head}");
    for msg in [&b"ping over the edge"[..], b"and again"] {
        ws.write_all(msg).await.unwrap();
        let mut got = vec![0u8; msg.len()];
        tokio::time::timeout(Duration::from_secs(5), ws.read_exact(&mut got))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got, msg);
    }

    // SSE: the first event arrives while the backend still holds the second.
    let (mut sender, _conn) = http1_client::<http_body_util::Empty<Bytes>>(world.edge).await;
    let req = Request::get("/sse")
        .header("host", "web.localhost")
        .body(http_body_util::Empty::new())
        .unwrap();
    let started = Instant::now();
    let mut body = sender.send_request(req).await.unwrap().into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(&first[..], b"data: first\n\n");
    assert!(
        started.elapsed() < Duration::from_millis(1000),
        "not buffered: {:?}",
        started.elapsed()
    );
    let second = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(&second[..], b"data: second\n\n");

    // HTTP/2 with prior knowledge (h2c).
    let stream = TcpStream::connect(world.edge).await.unwrap();
    let (mut h2, conn) =
        hyper::client::conn::http2::handshake::<_, _, http_body_util::Empty<Bytes>>(
            TokioExecutor::new(),
            TokioIo::new(stream),
        )
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = Request::get("http://web.localhost/")
        .body(http_body_util::Empty::new())
        .unwrap();
    let resp = h2.send_request(req).await.unwrap();
    assert_eq!(resp.version(), hyper::Version::HTTP_2);
    assert_eq!(resp.status(), 200);
    assert_eq!(
        &resp.into_body().collect().await.unwrap().to_bytes()[..],
        b"streams"
    );
}

/// Sends raw bytes and returns what came back until the edge closed or 2 s passed.
async fn raw(edge: SocketAddr, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(edge).await.unwrap();
    let _ = s.write_all(bytes).await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn malformed_and_hostile_requests_are_rejected_without_disturbing_others() {
    let world = World::with_options(berth::edge::EdgeOptions {
        header_read_timeout: Duration::from_secs(1),
        max_header_bytes: 16 * 1024,
        max_headers: 50,
        ..Default::default()
    })
    .await;
    let backend = Backend::start("fine").await;
    let app = world.app("web", &["web.localhost"]).await;
    world.instance(app, backend.addr, "running").await;
    world.wait_routed("web.localhost").await;

    // A slow client holding a half-sent request open.
    let mut slow = TcpStream::connect(world.edge).await.unwrap();
    slow.write_all(b"GET / HTTP/1.1\r\nHost: web.localhost\r\nX-Slow: ")
        .await
        .unwrap();
    let served_before = backend.served.load(Ordering::Relaxed);

    // Conflicting Content-Length and Transfer-Encoding: framed by Transfer-Encoding alone and
    // the connection closed after the response (RFC 9112 §6.1), so the request hidden
    // behind it is never read; a Transfer-Encoding other than chunked is a 400.
    let smuggle = raw(world.edge, b"POST /form HTTP/1.1\r\nHost: web.localhost\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /admin HTTP/1.1\r\nHost: web.localhost\r\n\r\n").await;
    assert_eq!(
        smuggle.matches("HTTP/1.1 ").count(),
        1,
        "one response only: {smuggle}"
    );
    assert!(smuggle.contains("connection: close"), "{smuggle}");
    let bad_te = raw(
        world.edge,
        b"POST / HTTP/1.1\r\nHost: web.localhost\r\nTransfer-Encoding: gzip\r\n\r\n",
    )
    .await;
    assert!(bad_te.starts_with("HTTP/1.1 400"), "{bad_te}");
    let double_cl = raw(world.edge, b"POST / HTTP/1.1\r\nHost: web.localhost\r\nContent-Length: 4\r\nContent-Length: 40\r\n\r\nabcd").await;
    assert!(double_cl.starts_with("HTTP/1.1 400"), "{double_cl}");
    let huge = raw(
        world.edge,
        format!(
            "GET / HTTP/1.1\r\nHost: web.localhost\r\nX-Big: {}\r\n\r\n",
            "a".repeat(64 * 1024)
        )
        .as_bytes(),
    )
    .await;
    assert!(
        huge.starts_with("HTTP/1.1 431") || huge.is_empty(),
        "oversized headers: {huge}"
    );
    let many: String = (0..200).map(|i| format!("X-H{i}: v\r\n")).collect();
    let many = raw(
        world.edge,
        format!("GET / HTTP/1.1\r\nHost: web.localhost\r\n{many}\r\n").as_bytes(),
    )
    .await;
    assert!(
        many.starts_with("HTTP/1.1 431") || many.is_empty(),
        "too many headers: {many}"
    );
    let junk = raw(world.edge, b"\x16\x03\x01garbage that is not http\r\n\r\n").await;
    assert!(
        junk.is_empty() || junk.starts_with("HTTP/1.1 400"),
        "{junk}"
    );
    let paths = backend.paths.lock().unwrap().clone();
    assert!(
        !paths.contains(&"/admin".to_string()),
        "the smuggled request never reached the app: {paths:?}"
    );
    assert_eq!(
        backend.served.load(Ordering::Relaxed),
        served_before + 1,
        "only the outer POST reached the app: {paths:?}"
    );

    // Others are served meanwhile, and the slow client is cut off after the header timeout.
    assert_eq!(world.get("web.localhost", "/").await.unwrap().0, 200);
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), slow.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "the slow client was closed");
}

/// Runs openssl (from Debian) with `args` in `dir`.
fn openssl(dir: &std::path::Path, args: &[&str]) {
    let out = std::process::Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA (`<ca>.crt`/`<ca>.key`) in `dir`.
fn make_ca(dir: &std::path::Path, ca: &str) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &format!("{ca}.key"),
            "-out",
            &format!("{ca}.crt"),
            "-days",
            "2",
            "-subj",
            &format!("/CN={ca}"),
        ],
    );
}

/// A certificate for `san` signed by `ca`, written as `<out>/<file>.crt` + `.key`.
fn make_cert(ca_dir: &std::path::Path, ca: &str, out: &std::path::Path, file: &str, san: &str) {
    let ext = ca_dir.join(format!("{file}.ext"));
    std::fs::write(
        &ext,
        format!("subjectAltName=DNS:{san}\nbasicConstraints=critical,CA:FALSE\n"),
    )
    .unwrap();
    let key = out.join(format!("{file}.key.tmp"));
    let csr = ca_dir.join(format!("{file}.csr"));
    let crt = out.join(format!("{file}.crt.tmp"));
    openssl(
        ca_dir,
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            key.to_str().unwrap(),
            "-out",
            csr.to_str().unwrap(),
            "-subj",
            &format!("/CN={san}"),
        ],
    );
    openssl(
        ca_dir,
        &[
            "x509",
            "-req",
            "-in",
            csr.to_str().unwrap(),
            "-CA",
            &format!("{ca}.crt"),
            "-CAkey",
            &format!("{ca}.key"),
            "-CAcreateserial",
            "-out",
            crt.to_str().unwrap(),
            "-days",
            "2",
            "-extfile",
            ext.to_str().unwrap(),
        ],
    );
    // Renamed into place, as a certificate manager would.
    std::fs::rename(&key, out.join(format!("{file}.key"))).unwrap();
    std::fs::rename(&crt, out.join(format!("{file}.crt"))).unwrap();
}

/// A TLS connection to the edge for `name`, trusting only `ca`; None when the handshake fails.
async fn tls_connect(
    edge: SocketAddr,
    ca_dir: &std::path::Path,
    ca: &str,
    name: &str,
) -> Option<tokio_rustls::client::TlsStream<TcpStream>> {
    tls_connect_alpn(edge, ca_dir, ca, name, &[b"h2", b"http/1.1"]).await
}

/// `tls_connect` offering these protocols by ALPN.
async fn tls_connect_alpn(
    edge: SocketAddr,
    ca_dir: &std::path::Path,
    ca: &str,
    name: &str,
    alpn: &[&[u8]],
) -> Option<tokio_rustls::client::TlsStream<TcpStream>> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    let ca_cert =
        rustls::pki_types::CertificateDer::from_pem_file(ca_dir.join(format!("{ca}.crt"))).unwrap();
    roots.add(ca_cert).unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = TcpStream::connect(edge).await.ok()?;
    let server_name = rustls::pki_types::ServerName::try_from(name.to_string()).unwrap();
    connector.connect(server_name, tcp).await.ok()
}

#[tokio::test]
async fn tls_picks_the_certificate_by_sni_speaks_h2_and_reloads_replaced_files() {
    let ca_dir = tempfile::tempdir().unwrap();
    let certs = tempfile::tempdir().unwrap();
    make_ca(ca_dir.path(), "ca1");
    make_cert(ca_dir.path(), "ca1", certs.path(), "a.test", "a.test");
    make_cert(ca_dir.path(), "ca1", certs.path(), "_.b.test", "*.b.test");
    let world = World::start(Default::default(), Some(certs.path())).await;
    let tls = world.edge_tls.unwrap();
    let backend = Backend::start("secure").await;
    let app = world.app("web", &["a.test", "x.b.test"]).await;
    world.instance(app, backend.addr, "running").await;
    world.wait_routed("a.test").await;

    // The exact name, verified by the client against the name it asked for.
    let stream = tls_connect(tls, ca_dir.path(), "ca1", "a.test")
        .await
        .expect("a.test handshake");
    assert_eq!(
        stream.get_ref().1.alpn_protocol(),
        Some(&b"h2"[..]),
        "h2 by ALPN"
    );
    let (mut h2, conn) =
        hyper::client::conn::http2::handshake::<_, _, http_body_util::Empty<Bytes>>(
            TokioExecutor::new(),
            TokioIo::new(stream),
        )
        .await
        .unwrap();
    tokio::spawn(conn);
    let resp = h2
        .send_request(
            Request::get("https://a.test/headers")
                .body(http_body_util::Empty::new())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let seen =
        String::from_utf8_lossy(&resp.into_body().collect().await.unwrap().to_bytes()).into_owned();
    assert!(seen.contains("x-forwarded-proto: https\n"), "{seen}");
    // HTTP/1.1 over TLS takes the fast path, with the same https forwarding headers.
    let before = handed_to_hyper(&world);
    let stream = tls_connect_alpn(tls, ca_dir.path(), "ca1", "a.test", &[b"http/1.1"])
        .await
        .expect("a.test handshake for HTTP/1.1");
    let (mut h1, conn) = hyper::client::conn::http1::handshake::<_, http_body_util::Empty<Bytes>>(
        TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    for _ in 0..2 {
        let resp = get_on(&mut h1, "a.test", "/headers").await;
        assert_eq!(resp.status(), 200);
        let seen = String::from_utf8_lossy(&resp.into_body().collect().await.unwrap().to_bytes())
            .into_owned();
        assert!(
            seen.contains("x-forwarded-proto: https\n") && seen.contains(";proto=https\n"),
            "{seen}"
        );
    }
    // A large body through TLS: every byte is flushed out.
    let resp = get_on(&mut h1, "a.test", "/big").await;
    let body = tokio::time::timeout(Duration::from_secs(10), resp.into_body().collect())
        .await
        .expect("the whole body in time")
        .unwrap()
        .to_bytes();
    assert_eq!(body.len(), 1 << 20);
    assert_eq!(
        handed_to_hyper(&world),
        before,
        "HTTP/1.1 over TLS, fast path"
    );
    // The wildcard one label up; no certificate for other names.
    assert!(
        tls_connect(tls, ca_dir.path(), "ca1", "x.b.test")
            .await
            .is_some(),
        "wildcard"
    );
    assert!(
        tls_connect(tls, ca_dir.path(), "ca1", "c.test")
            .await
            .is_none(),
        "no certificate for c.test"
    );

    // Replaced on disk (a new CA's certificate): picked up without a restart.
    make_ca(ca_dir.path(), "ca2");
    make_cert(ca_dir.path(), "ca2", certs.path(), "a.test", "a.test");
    eventually(
        "the new certificate is served",
        Duration::from_secs(15),
        || async {
            tls_connect(tls, ca_dir.path(), "ca2", "a.test")
                .await
                .is_some()
        },
    )
    .await;
}

#[tokio::test]
async fn an_endpoint_refusing_connections_is_retried_elsewhere_and_skipped() {
    let world = World::new().await;
    let alive = Backend::start("alive").await;
    // A port nothing listens on: connections are refused, so nothing can reach an app.
    let dead: SocketAddr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let app = world.app("web", &["web.localhost"]).await;
    world.instance(app, alive.addr, "running").await;
    world.instance(app, dead, "running").await;
    world.wait_routed("web.localhost").await;
    for i in 0..20 {
        let (status, body, _) = world.get("web.localhost", "/").await.unwrap();
        assert_eq!((status, body.as_str()), (200, "alive"), "request {i}");
    }
    // A bodiless POST is retried too (nothing was sent), with its headers intact: sent until
    // one of them met the dead endpoint (once its ejection ran out) and was retried.
    let upstream_errors = || {
        world
            .metrics
            .render()
            .lines()
            .find_map(|l| l.strip_prefix("berth_edge_upstream_errors_total{app=\"web\"} "))
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let before = upstream_errors();
    let (sender, _conn) = http1_client::<http_body_util::Empty<Bytes>>(world.edge).await;
    let sender = tokio::sync::Mutex::new(sender);
    eventually(
        "a POST retried after a refused connection",
        Duration::from_secs(20),
        || async {
            let req = Request::post("/headers")
                .header("host", "web.localhost")
                .header("x-marker", "kept")
                .body(http_body_util::Empty::new())
                .unwrap();
            let resp = sender.lock().await.send_request(req).await.unwrap();
            assert_eq!(resp.status(), 200);
            let seen =
                String::from_utf8_lossy(&resp.into_body().collect().await.unwrap().to_bytes())
                    .into_owned();
            assert!(seen.contains("x-marker: kept\n"), "{seen}");
            upstream_errors() > before
        },
    )
    .await;
}

/// Connections the edge's fast path handed to hyper so far.
fn handed_to_hyper(world: &World) -> u64 {
    world
        .metrics
        .counter("berth_edge_hyper_connections_total", "", &[])
        .get()
}

#[tokio::test]
async fn plain_http1_requests_take_the_fast_path_and_keep_the_proxy_semantics() {
    let (world, backend) = World::routed("fast").await;
    let before = handed_to_hyper(&world);
    let served_before = backend.served.load(Ordering::Relaxed);

    // One keep-alive connection, as a client library uses it.
    let (mut sender, _conn) = http1_client::<Full<Bytes>>(world.edge).await;
    let mut send = async |method: &str, path: &str, body: &'static str| {
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "Web.LocalHost:80")
            .header("connection", "keep-alive, x-hop")
            .header("x-hop", "secret")
            .header("x-forwarded-for", "203.0.113.9")
            .body(Full::new(Bytes::from(body)))
            .unwrap();
        let resp = tokio::time::timeout(Duration::from_secs(5), sender.send_request(req))
            .await
            .unwrap()
            .unwrap();
        let (parts, body) = resp.into_parts();
        let body = body.collect().await.unwrap().to_bytes();
        (parts, String::from_utf8_lossy(&body).into_owned())
    };
    let (parts, headers) = send("GET", "/headers?x=1", "").await;
    assert_eq!(parts.status, 200);
    assert!(parts.headers.contains_key("date"), "{:?}", parts.headers);
    for expected in [
        "host: Web.LocalHost:80",
        "x-forwarded-for: 203.0.113.9, 127.0.0.1",
        "x-forwarded-proto: http",
        "x-forwarded-host: Web.LocalHost:80",
        "forwarded: for=127.0.0.1;host=\"Web.LocalHost:80\";proto=http",
    ] {
        assert!(headers.contains(expected), "{expected} in {headers}");
    }
    assert!(headers.contains("x-request-id: "), "{headers}");
    assert!(
        !headers.contains("x-hop") && !headers.contains("connection"),
        "{headers}"
    );
    let (parts, body) = send("POST", "/echo", "ping over the fast path").await;
    assert_eq!(
        (parts.status.as_u16(), body.as_str()),
        (200, "ping over the fast path")
    );
    let (parts, body) = send("HEAD", "/", "").await;
    assert_eq!((parts.status.as_u16(), body.as_str()), (200, ""));
    assert_eq!(parts.headers["content-length"], "4");
    let (parts, body) = send("GET", "/chunked", "").await;
    assert_eq!(
        (parts.status.as_u16(), body.as_str()),
        (200, "one,two,three")
    );
    let (parts, body) = send("GET", "/empty", "").await;
    assert_eq!((parts.status.as_u16(), body.as_str()), (204, ""));
    let (parts, body) = send("GET", "/", "").await;
    assert_eq!((parts.status.as_u16(), body.as_str()), (200, "fast"));
    // A 60 KiB body (it comes in several reads) and a 1 MiB response (it goes out in several
    // writes).
    let (parts, body) = send("POST", "/echo", "b".repeat(60 * 1024).leak()).await;
    assert_eq!((parts.status.as_u16(), body.len()), (200, 60 * 1024));
    assert!(body.bytes().all(|b| b == b'b'));
    let (parts, body) = send("GET", "/big", "").await;
    assert_eq!((parts.status.as_u16(), body.len()), (200, 1 << 20));
    assert!(body.bytes().all(|b| b == b'x'));
    assert_eq!(backend.served.load(Ordering::Relaxed), served_before + 8);
    let paths = backend.paths.lock().unwrap().clone();
    assert!(
        paths.ends_with(
            &[
                "/headers", "/echo", "/", "/chunked", "/empty", "/", "/echo", "/big"
            ]
            .map(String::from)
        ),
        "{paths:?}"
    );

    // Two pipelined requests in one write; the second asks to close.
    let both = raw(world.edge, b"GET / HTTP/1.1\r\nHost: web.localhost\r\n\r\nGET /echo HTTP/1.1\r\nHost: web.localhost\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello").await;
    assert_eq!(both.matches("HTTP/1.1 200 OK\r\n").count(), 2, "{both}");
    assert!(both.contains("\r\n\r\nfastHTTP/1.1 200 OK\r\n"), "{both}");
    assert!(
        both.ends_with("\r\n\r\nhello") && both.contains("connection: close\r\n"),
        "{both}"
    );
    // A head sent a byte at a time.
    let mut slow = TcpStream::connect(world.edge).await.unwrap();
    slow.set_nodelay(true).unwrap();
    for b in b"GET / HTTP/1.1\r\nHost: web.localhost\r\nConnection: close\r\n\r\n" {
        slow.write_all(&[*b]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), slow.read_to_end(&mut out))
        .await
        .unwrap()
        .unwrap();
    let out = String::from_utf8_lossy(&out);
    assert!(
        out.starts_with("HTTP/1.1 200") && out.ends_with("fast"),
        "{out}"
    );
    assert_eq!(
        handed_to_hyper(&world),
        before,
        "all of it on the fast path"
    );

    // What the fast path does not take, hyper serves as before.
    let old = raw(world.edge, b"GET / HTTP/1.0\r\nHost: web.localhost\r\n\r\n").await;
    assert!(
        old.starts_with("HTTP/1.0 200") || old.starts_with("HTTP/1.1 200"),
        "{old}"
    );
    assert!(old.ends_with("fast"), "{old}");
    let unknown = raw(
        world.edge,
        b"GET / HTTP/1.1\r\nHost: nobody.localhost\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(unknown.starts_with("HTTP/1.1 404"), "{unknown}");
    let large = "c".repeat(100 * 1024);
    let upload = raw(
        world.edge,
        format!(
            "POST /echo HTTP/1.1\r\nHost: web.localhost\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{large}",
            large.len()
        )
        .as_bytes(),
    )
    .await;
    assert!(
        upload.starts_with("HTTP/1.1 200"),
        "{}",
        &upload[..upload.len().min(200)]
    );
    assert!(upload.ends_with(&format!("\r\n\r\n{large}")));
    assert_eq!(handed_to_hyper(&world), before + 3);
}

/// An app that closes each keep-alive connection 50 ms after its response (as an app with a
/// short keep-alive timeout does), counting the connections it accepted and closed.
async fn closing_backend() -> (SocketAddr, Arc<AtomicUsize>, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (accepted, closed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (count, closes) = (accepted.clone(), closed.clone());
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::Relaxed);
            let closes = closes.clone();
            tokio::spawn(async move {
                let _closed = CountOnDrop(closes);
                // Declared after the guard, so closed before it counts.
                let mut s = s;
                let mut buf = vec![0u8; 4096];
                let mut got = Vec::new();
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                    .await;
                tokio::time::sleep(Duration::from_millis(50)).await;
            });
        }
    });
    (addr, accepted, closed)
}

/// Adds one to its counter when dropped: a connection task holding it counts its close.
struct CountOnDrop(Arc<AtomicUsize>);

impl Drop for CountOnDrop {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

#[tokio::test]
async fn a_pooled_connection_the_app_closed_is_never_used_for_a_request() {
    let world = World::new().await;
    let (addr, accepted, closed) = closing_backend().await;
    let app = world.app("web", &["web.localhost"]).await;
    world.instance(app, addr, "running").await;
    world.wait_routed("web.localhost").await;
    let before = accepted.load(Ordering::Relaxed);
    for round in 0..5 {
        eventually(
            "the app closed its connections",
            Duration::from_secs(5),
            || async { closed.load(Ordering::Relaxed) == accepted.load(Ordering::Relaxed) },
        )
        .await;
        // Not idempotent: a request on a connection the app had closed would be a 502.
        let out = raw(
            world.edge,
            b"POST /form HTTP/1.1\r\nHost: web.localhost\r\nContent-Length: 3\r\nConnection: close\r\n\r\nabc",
        )
        .await;
        assert!(out.starts_with("HTTP/1.1 200"), "round {round}: {out}");
        assert!(out.ends_with("\r\n\r\nok"), "round {round}: {out}");
    }
    assert_eq!(
        accepted.load(Ordering::Relaxed),
        before + 5,
        "a new connection each time"
    );
}

#[tokio::test]
async fn on_shutdown_requests_in_flight_finish_and_idle_connections_close() {
    let (world, backend) = World::routed("fast").await;

    // A keep-alive connection, idle after one request.
    let (mut idle, idle_conn) = http1_client::<http_body_util::Empty<Bytes>>(world.edge).await;
    assert_eq!(get_on(&mut idle, "web.localhost", "/").await.status(), 200);

    // A request in flight when the edge is told to stop.
    let edge = world.edge;
    let served = backend.served.load(Ordering::Relaxed);
    let slow = tokio::spawn(async move { get(edge, "web.localhost", "/slow").await });
    eventually(
        "the request reached the app",
        Duration::from_secs(5),
        || async { backend.served.load(Ordering::Relaxed) > served },
    )
    .await;
    world.stop.cancel();

    tokio::time::timeout(Duration::from_secs(2), idle_conn)
        .await
        .expect("the idle connection is closed at once")
        .unwrap()
        .unwrap();
    let (status, body, headers) = slow.await.unwrap().expect("the request in flight finished");
    assert_eq!((status, body.as_str()), (200, "slow"));
    assert_eq!(headers["connection"], "close", "{headers:?}");
    eventually(
        "new connections are refused",
        Duration::from_secs(5),
        || async { TcpStream::connect(edge).await.is_err() },
    )
    .await;
}

#[tokio::test]
async fn a_client_that_leaves_while_the_app_is_slow_takes_its_request_with_it() {
    let (world, backend) = World::routed("fast").await;
    let before = handed_to_hyper(&world);
    let answered = SLOWER_ANSWERED.load(Ordering::Relaxed);
    let served = backend.served.load(Ordering::Relaxed);
    let mut client = TcpStream::connect(world.edge).await.unwrap();
    client
        .write_all(b"GET /slower HTTP/1.1\r\nHost: web.localhost\r\n\r\n")
        .await
        .unwrap();
    eventually(
        "the request reached the app",
        Duration::from_secs(5),
        || async { backend.served.load(Ordering::Relaxed) > served },
    )
    .await;
    drop(client);
    // The edge notices within its patience (1 s) and closes the app's connection, so the
    // app (hyper) drops the request before its 3 s are up.
    tokio::time::sleep(Duration::from_millis(3500)).await;
    assert_eq!(
        SLOWER_ANSWERED.load(Ordering::Relaxed),
        answered,
        "the app never answered a request nobody waits for"
    );
    assert_eq!(handed_to_hyper(&world), before, "on the fast path");
    // The edge serves on.
    assert_eq!(world.get("web.localhost", "/").await.unwrap().0, 200);
}
