//! The edge: an HTTP(S) reverse proxy routing by Host to the healthy instances of an app
//! (DESIGN §1 step 5, §9).
//!
//! Routes live in memory ([`routes::RouteTable`]): loaded whole from Postgres at start and
//! whenever the event feed is re-created (ephemeral consumers: every edge sees every event),
//! then rebuilt per app on `app.*`, `deployment.*`, `instance.*`, `domain.*` and
//! `deployment_instance.*` events. Requests ([`proxy`]) only ever read the table.
//!
//! Invariants: the edge never queries Postgres on the request path; an instance leaving the
//! table gets no new request, while requests already sent to it run on (it is stopped only
//! after its drain time); on SIGTERM the edge stops accepting and lets open requests finish
//! within the drain deadline.

pub mod h1;
pub mod proxy;
pub mod routes;
pub mod tls;
pub mod upstream;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::events::EventPayload;
use crate::events::controller::{Action, ControllerOptions, Reconciler};
use crate::metrics::Metrics;
use proxy::Proxy;
use routes::RouteTable;

/// What the edge needs.
pub struct EdgeDeps {
    pub pool: PgPool,
    /// The bound HTTP listener (tests bind port 0).
    pub listener: TcpListener,
    /// The bound HTTPS listener and the certificate folder, when TLS is configured.
    pub tls: Option<(TcpListener, PathBuf)>,
    pub metrics: Arc<Metrics>,
    pub options: EdgeOptions,
}

#[derive(Debug, Clone)]
pub struct EdgeOptions {
    pub upstream: proxy::UpstreamTimeouts,
    /// How long open requests may run on after SIGTERM.
    pub shutdown_drain: Duration,
    /// A client must send its request headers within this.
    pub header_read_timeout: Duration,
    /// Limits against hostile clients (hyper rejects what exceeds them).
    pub max_header_bytes: usize,
    pub max_headers: usize,
    /// Threads serving connections, each with its own event loop and upstream
    /// connections (like nginx's workers): one per CPU by default.
    pub workers: usize,
}

impl Default for EdgeOptions {
    fn default() -> Self {
        EdgeOptions {
            upstream: Default::default(),
            shutdown_drain: Duration::from_secs(30),
            header_read_timeout: Duration::from_secs(10),
            max_header_bytes: 64 * 1024,
            max_headers: 100,
            workers: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
        }
    }
}

/// Which routes to rebuild.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum RouteKey {
    All,
    App(i64),
}

/// Keeps the route table current from events (the edge's reconciler).
pub struct RouteUpdater {
    pool: PgPool,
    table: Arc<RouteTable>,
}

impl Reconciler for RouteUpdater {
    type Key = RouteKey;

    fn name(&self) -> &'static str {
        "edge"
    }

    fn keys_for(&self, event: &EventPayload) -> Vec<RouteKey> {
        event.app_id.map(RouteKey::App).into_iter().collect()
    }

    async fn list_keys(&self) -> anyhow::Result<Vec<RouteKey>> {
        Ok(vec![RouteKey::All])
    }

    async fn reconcile(&self, key: &RouteKey) -> anyhow::Result<Action> {
        match key {
            RouteKey::All => {
                let n = self.table.load_all(&self.pool).await?;
                tracing::debug!(hosts = n, "routes loaded");
            }
            RouteKey::App(id) => self.table.load_app(&self.pool, *id).await?,
        }
        Ok(Action::Done)
    }
}

/// Runs the edge until shutdown: routes from Postgres and events, HTTP and HTTPS servers.
pub async fn run(
    deps: EdgeDeps,
    js: async_nats::jetstream::Context,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let table = Arc::new(RouteTable::new(deps.metrics.clone()));
    // Serve only once the routes are known: an empty table would answer 404 to everyone.
    let hosts = table.load_all(&deps.pool).await?;
    tracing::info!(hosts, "edge routes loaded");
    let latency = deps.metrics.histogram(
        "berth_edge_request_duration_seconds",
        "Time from a request's arrival to its response headers.",
        &[],
    );
    let proxy = Arc::new(Proxy::new(
        table.clone(),
        deps.options.upstream.clone(),
        latency,
        deps.metrics.counter(
            "berth_edge_hyper_connections_total",
            "Client connections the HTTP/1.1 fast path handed to hyper at a request it does not take \
             (HTTP/1.0, upgrades, Expect, chunked or large request bodies, malformed heads, unknown hosts...).",
            &[],
        ),
    ));
    let updater = Arc::new(RouteUpdater {
        pool: deps.pool.clone(),
        table,
    });
    let controller_options = ControllerOptions {
        ephemeral: true,
        concurrency: 2,
        resync: Duration::from_secs(60),
        ..ControllerOptions::new(
            "edge",
            vec![
                "app",
                "deployment",
                "instance",
                "domain",
                "deployment_instance",
            ],
        )
    };
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(crate::events::controller::run_controller(
        updater,
        js,
        controller_options,
        deps.metrics.clone(),
        shutdown.clone(),
    ));
    tasks.spawn(serve_workers(
        deps.listener,
        None,
        proxy.clone(),
        deps.options.clone(),
        shutdown.clone(),
    ));
    if let Some((listener, dir)) = deps.tls {
        let acceptor = tls::acceptor(&dir, shutdown.clone())?;
        tasks.spawn(serve_workers(
            listener,
            Some(acceptor),
            proxy,
            deps.options.clone(),
            shutdown.clone(),
        ));
    }
    let mut result = Ok(());
    while let Some(done) = tasks.join_next().await {
        if let Ok(Err(e)) = done {
            shutdown.cancel();
            result = Err(e);
        }
    }
    result
}

/// Serves `listener` on `options.workers` threads, each a single-threaded event loop with
/// its own SO_REUSEPORT socket (or, when the address was bound without it, the shared one):
/// a connection, its requests and their upstream connections stay on one thread, with no
/// hand-offs between threads (nginx's model).
pub async fn serve_workers(
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    proxy: Arc<Proxy>,
    options: EdgeOptions,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let addr = listener.local_addr()?;
    let scheme = if tls.is_some() { "https" } else { "http" };
    tracing::info!(%addr, scheme, workers = options.workers.max(1), "edge listening");
    let listener = listener.into_std()?;
    let mut done = Vec::new();
    for n in 0..options.workers.max(1) {
        // A socket of its own per worker when the address allows it (see `bind`): shared
        // accepts let one busy thread take most connections. Otherwise the shared socket.
        let listener = match n {
            0 => listener.try_clone()?,
            _ => match reuseport_listener(addr).and_then(|l| l.into_std()) {
                Ok(own) => own,
                Err(_) => listener.try_clone()?,
            },
        };
        // A Proxy of its own per worker: every request clones the worker's Arc, and one
        // shared between threads would bounce its count between cores on every request.
        let (tls, proxy, options, shutdown) = (
            tls.clone(),
            Arc::new(proxy.as_ref().clone()),
            options.clone(),
            shutdown.clone(),
        );
        let (tx, rx) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name(format!("edge-{n}"))
            .spawn(move || {
                let result = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(anyhow::Error::from)
                    .and_then(|runtime| {
                        runtime.block_on(async move {
                            upstream::set_worker(n);
                            let listener = TcpListener::from_std(listener)?;
                            serve(listener, tls, proxy, options, shutdown).await
                        })
                    });
                let _ = tx.send(result);
            })?;
        done.push(rx);
    }
    let mut result = Ok(());
    for rx in done {
        match rx.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => result = Err(e),
            Err(_) => result = Err(anyhow::anyhow!("an edge worker thread died")),
        }
    }
    result
}

/// Accepts connections until shutdown, then drains them within the deadline.
pub async fn serve(
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    proxy: Arc<Proxy>,
    options: EdgeOptions,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(options.header_read_timeout)
        .max_buf_size(options.max_header_bytes)
        .max_headers(options.max_headers)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(256)
        .max_header_list_size(options.max_header_bytes as u32);
    let builder = Arc::new(builder);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let limits = h1::Limits {
        header_read_timeout: options.header_read_timeout,
        max_header_bytes: options.max_header_bytes,
        max_headers: options.max_headers,
    };
    // This worker's own token: the fast path's connections wait on it, and a token shared by
    // every worker would put one lock between all of them.
    let stop = shutdown.child_token();
    {
        // The fast path's idle upstream connections have no task watching them: every 15 s
        // this worker closes those the apps closed or that sat unused too long.
        let (proxy, stop) = (proxy.clone(), stop.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(15));
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tick.tick() => {}
                }
                for endpoint in proxy.table.endpoints() {
                    endpoint.pool.sweep_raw(proxy.timeouts.idle);
                }
            }
        });
    }
    let scheme = if tls.is_some() { "https" } else { "http" };
    let worker = Arc::new(Worker {
        proxy,
        builder,
        limits,
        stop,
        scheme,
    });
    loop {
        let (stream, client) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: back off briefly, keep serving.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let peer = Arc::new(proxy::Peer::new(client));
        let (worker, watcher) = (worker.clone(), graceful.watcher());
        match &tls {
            None => {
                tokio::spawn(serve_connection(
                    worker, stream, true, client, peer, watcher,
                ));
            }
            Some(acceptor) => {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(Ok(tls_stream)) =
                        tokio::time::timeout(Duration::from_secs(10), acceptor.accept(stream))
                            .await
                    else {
                        tracing::debug!(client.addr = %client, "TLS handshake failed");
                        return;
                    };
                    // HTTP/2 (chosen by ALPN) goes to hyper; HTTP/1.1 takes the fast path.
                    let h2 = tls_stream.get_ref().1.alpn_protocol() == Some(b"h2");
                    serve_connection(worker, tls_stream, !h2, client, peer, watcher).await;
                });
            }
        }
    }
    drop(listener);
    if tokio::time::timeout(options.shutdown_drain, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("edge connections still open after the drain deadline; closing them");
    }
    Ok(())
}

/// What a worker's connections share.
struct Worker {
    proxy: Arc<Proxy>,
    builder: Arc<auto::Builder<TokioExecutor>>,
    limits: h1::Limits,
    /// The worker's shutdown token.
    stop: CancellationToken,
    scheme: &'static str,
}

/// One client connection: the fast path first (when `fast`), then hyper from the first
/// request the fast path does not take. The watcher holds the drain open meanwhile.
async fn serve_connection<S>(
    worker: Arc<Worker>,
    stream: S,
    fast: bool,
    client: SocketAddr,
    peer: Arc<proxy::Peer>,
    watcher: hyper_util::server::graceful::Watcher,
) where
    S: h1::Client + Send + 'static,
{
    let Worker {
        proxy,
        builder,
        limits,
        stop,
        scheme,
    } = worker.as_ref();
    let (read, stream) = if fast {
        match h1::serve(stream, scheme, proxy, &peer, limits, stop).await {
            h1::Outcome::Closed => return,
            h1::Outcome::HandOff(read, stream) => {
                proxy.handed_to_hyper.inc();
                (read, stream)
            }
        }
    } else {
        (bytes::BytesMut::new(), stream)
    };
    let (proxy, scheme) = (proxy.clone(), *scheme);
    let service = service_fn(move |req| proxy.clone().handle(req, peer.clone(), scheme));
    let conn = builder
        .serve_connection_with_upgrades(TokioIo::new(h1::Rewind::new(read, stream)), service)
        .into_owned();
    if let Err(e) = watcher.watch(conn).await {
        tracing::debug!(client.addr = %client, error = %e, "connection ended with an error");
    }
}

/// Binds the edge's listeners (before anything starts, so a taken port fails `berth up` early).
/// The socket has SO_REUSEPORT, so each worker can bind a socket of its own to the address
/// and the kernel spreads new connections evenly over them.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    use anyhow::Context;
    reuseport_listener(addr).with_context(|| format!("binding the edge to {addr}"))
}

fn reuseport_listener(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(true)?;
    socket.bind(addr)?;
    socket.listen(4096)
}
