//! Turning events into reconciles: durable pull consumers feed a [`WorkQueue`], workers
//! call [`Reconciler::reconcile`], errors requeue with capped exponential backoff and
//! jitter, and a full resync runs at start, after the event feed reconnects, and on a
//! jittered period.
//!
//! A reconciler is only `reconcile(key) -> Action`, `keys_for(event)` and `list_keys()`.
//! It is never told why it runs, so it has to read the truth (Postgres) every time. A
//! reconciler may also take several ready keys at once (`batch_size`, `reconcile_batch`):
//! the manager does, to share one transaction between apps under load. A batch never
//! waits for keys to arrive, so a lone event is reconciled at once.

use std::collections::HashMap;
use std::fmt::Debug;
use std::future::Future;
use std::hash::Hash;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use futures_util::StreamExt;
use tokio_util::sync::CancellationToken;

use super::EventPayload;
use super::queue::WorkQueue;
use crate::metrics::Metrics;

/// What to do with a key after a successful reconcile.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Nothing until an event or the next resync.
    Done,
    /// Look again after this long (a timer with a purpose: a lease, a deadline, a drain).
    RequeueAfter(Duration),
}

pub trait Reconciler: Send + Sync + 'static {
    type Key: Clone + Eq + Hash + Debug + Send + Sync + 'static;

    /// The component name, for logs and metrics.
    fn name(&self) -> &'static str;

    /// The keys an event concerns (none for events it does not care about).
    fn keys_for(&self, event: &EventPayload) -> Vec<Self::Key>;

    /// Every key, for a full resync.
    fn list_keys(&self) -> impl Future<Output = anyhow::Result<Vec<Self::Key>>> + Send;

    /// Makes the world match the rows for `key`. Idempotent.
    fn reconcile(&self, key: &Self::Key) -> impl Future<Output = anyhow::Result<Action>> + Send;

    /// How many ready keys one worker takes at once (1: no batching).
    fn batch_size(&self) -> usize {
        1
    }

    /// Reconciles several keys together (a reconciler may share one transaction between
    /// them); one result per key, in the order of `keys`. By default, one after another.
    fn reconcile_batch(
        &self,
        keys: &[Self::Key],
    ) -> impl Future<Output = Vec<anyhow::Result<Action>>> + Send {
        async move {
            let mut results = Vec::with_capacity(keys.len());
            for key in keys {
                results.push(self.reconcile(key).await);
            }
            results
        }
    }
}

/// How a controller runs.
#[derive(Debug, Clone)]
pub struct ControllerOptions {
    /// Durable consumer name prefix (`manager`, `builder`, `agent-<node>`).
    pub durable: String,
    /// Ephemeral consumers instead (the edge: every edge sees every event, and reloads fully
    /// when its consumers are re-created).
    pub ephemeral: bool,
    /// Tables whose events it wants (`deployment`, `instance`, ...). One durable consumer
    /// per table: nats-server 2.9 takes one filter subject per consumer.
    pub tables: Vec<&'static str>,
    /// Reconciles running at once.
    pub concurrency: usize,
    /// Period of the full resync (jittered by up to 10%).
    pub resync: Duration,
    /// First retry delay after an error; doubles up to `max_backoff`.
    pub base_backoff: Duration,
    pub max_backoff: Duration,
}

impl ControllerOptions {
    pub fn new(durable: impl Into<String>, tables: Vec<&'static str>) -> Self {
        ControllerOptions {
            durable: durable.into(),
            ephemeral: false,
            tables,
            concurrency: 4,
            resync: Duration::from_secs(60),
            base_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(60),
        }
    }
}

/// The delay before retry number `attempt` (1-based): base * 2^(attempt-1), capped, then
/// scaled by a random factor in [0.5, 1.0] so failing keys do not retry in step.
pub fn backoff(attempt: u32, base: Duration, max: Duration) -> Duration {
    let exp = base.saturating_mul(1u32 << attempt.saturating_sub(1).min(20));
    exp.min(max).mul_f64(0.5 + random_fraction() / 2.0)
}

/// `d` plus or minus up to 10%, so periodic work of many processes does not run in step.
pub fn jitter(d: Duration) -> Duration {
    d.mul_f64(0.9 + random_fraction() / 5.0)
}

/// A number in [0, 1), good enough to spread timers (not for anything secret).
fn random_fraction() -> f64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .subsec_nanos();
    (nanos % 1000) as f64 / 1000.0
}

/// Runs the workers of `reconciler` over `queue` until shutdown. Also usable without NATS
/// (tests, or a component fed only by resyncs).
pub async fn run_workers<R: Reconciler>(
    reconciler: Arc<R>,
    queue: WorkQueue<R::Key>,
    options: &ControllerOptions,
    metrics: &Metrics,
    shutdown: CancellationToken,
) {
    let labels = [("component", reconciler.name())];
    let duration = metrics.histogram(
        "berth_reconcile_duration_seconds",
        "Time one reconcile took (a key reconciled in a batch: the batch's time).",
        &labels,
    );
    let errors = metrics.counter(
        "berth_reconcile_errors_total",
        "Reconciles that failed (and were requeued with backoff).",
        &labels,
    );
    let depth = metrics.gauge(
        "berth_queue_depth",
        "Keys waiting in a component's work queue.",
        &labels,
    );
    let attempts: Arc<Mutex<HashMap<R::Key, u32>>> = Default::default();
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..options.concurrency.max(1) {
        let (reconciler, queue, attempts, shutdown) = (
            reconciler.clone(),
            queue.clone(),
            attempts.clone(),
            shutdown.clone(),
        );
        let (duration, errors, depth) = (duration.clone(), errors.clone(), depth.clone());
        let (base, max) = (options.base_backoff, options.max_backoff);
        workers.spawn(async move {
            loop {
                let keys = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    keys = queue.next_batch(reconciler.batch_size()) => keys,
                };
                depth.set(queue.depth() as i64);
                let span = match keys.as_slice() {
                    [key] => tracing::info_span!("reconcile", component = reconciler.name(), key = ?key),
                    _ => tracing::info_span!("reconcile", component = reconciler.name(), keys = keys.len()),
                };
                let started = std::time::Instant::now();
                let results =
                    tracing::Instrument::instrument(reconciler.reconcile_batch(&keys), span).await;
                let took = started.elapsed();
                let mut results = results.into_iter();
                for key in &keys {
                    // A key without a result must not be left running (it would never run
                    // again): it counts as failed and is retried.
                    let result = results.next().unwrap_or_else(|| {
                        Err(anyhow::anyhow!("the reconciler returned no result for this key"))
                    });
                    // A key reconciled in a batch waited for the whole batch.
                    duration.observe(took);
                    match result {
                        Ok(action) => {
                            attempts.lock().expect("attempts lock").remove(key);
                            if let Action::RequeueAfter(d) = action {
                                queue.add_after(key.clone(), d);
                            }
                        }
                        Err(e) => {
                            errors.inc();
                            let attempt = {
                                let mut a = attempts.lock().expect("attempts lock");
                                let n = a.entry(key.clone()).or_insert(0);
                                *n += 1;
                                *n
                            };
                            let delay = backoff(attempt, base, max);
                            tracing::warn!(component = reconciler.name(), key = ?key, attempt, retry_in = ?delay, error = format!("{e:#}"), "reconcile failed");
                            queue.add_after(key.clone(), delay);
                        }
                    }
                    queue.done(key);
                }
            }
        });
    }
    while workers.join_next().await.is_some() {}
}

/// Queues every key of the reconciler.
pub async fn resync<R: Reconciler>(
    reconciler: &R,
    queue: &WorkQueue<R::Key>,
) -> anyhow::Result<usize> {
    let keys = reconciler.list_keys().await?;
    let n = keys.len();
    for k in keys {
        queue.add(k);
    }
    Ok(n)
}

/// Runs a controller: consumers, periodic resync and workers, until shutdown.
pub async fn run_controller<R: Reconciler>(
    reconciler: Arc<R>,
    js: jetstream::Context,
    options: ControllerOptions,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let queue = WorkQueue::new();
    let resync_now = Arc::new(tokio::sync::Notify::new());
    let mut tasks = tokio::task::JoinSet::new();
    for table in options.tables.clone() {
        tasks.spawn(feed(
            reconciler.clone(),
            js.clone(),
            options.clone(),
            table,
            queue.clone(),
            resync_now.clone(),
            shutdown.clone(),
        ));
    }
    {
        let (reconciler, queue, resync_now, shutdown, period) = (
            reconciler.clone(),
            queue.clone(),
            resync_now.clone(),
            shutdown.clone(),
            options.resync,
        );
        tasks.spawn(async move {
            loop {
                match resync(&*reconciler, &queue).await {
                    Ok(n) => tracing::debug!(component = reconciler.name(), keys = n, "resync"),
                    Err(e) => tracing::warn!(
                        component = reconciler.name(),
                        error = format!("{e:#}"),
                        "resync failed"
                    ),
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(jitter(period)) => {}
                    _ = resync_now.notified() => {}
                }
            }
        });
    }
    run_workers(reconciler, queue, &options, &metrics, shutdown.clone()).await;
    tasks.shutdown().await;
    Ok(())
}

/// One durable consumer: events of `table` become keys. When the feed breaks (NATS down,
/// consumer lost), it is re-created and a resync is asked for, since events may have been
/// missed meanwhile.
async fn feed<R: Reconciler>(
    reconciler: Arc<R>,
    js: jetstream::Context,
    options: ControllerOptions,
    table: &'static str,
    queue: WorkQueue<R::Key>,
    resync_now: Arc<tokio::sync::Notify>,
    shutdown: CancellationToken,
) {
    let name = format!("{}-{}", options.durable, table.replace('_', "-"));
    let ephemeral = options.ephemeral;
    let mut attempt = 0;
    loop {
        let session = async {
            let stream = js.get_stream(super::STREAM).await?;
            let config = consumer::pull::Config {
                durable_name: (!ephemeral).then(|| name.clone()),
                filter_subject: format!("{table}.*"),
                ack_policy: consumer::AckPolicy::Explicit,
                // Events older than the consumer are of no use: a resync reads the rows.
                deliver_policy: consumer::DeliverPolicy::New,
                max_ack_pending: 10_000,
                // An ephemeral consumer whose process died goes away by itself.
                inactive_threshold: if ephemeral {
                    Duration::from_secs(30)
                } else {
                    Duration::ZERO
                },
                ..Default::default()
            };
            let consumer = if ephemeral {
                stream.create_consumer(config).await?
            } else {
                stream.get_or_create_consumer(&name, config).await?
            };
            let mut messages = consumer.messages().await?;
            if attempt > 0 {
                resync_now.notify_one();
            }
            while let Some(msg) = messages.next().await {
                let msg = msg?;
                match serde_json::from_slice::<EventPayload>(&msg.payload) {
                    Ok(event) => {
                        for key in reconciler.keys_for(&event) {
                            queue.add(key);
                        }
                    }
                    Err(e) => {
                        tracing::warn!(subject = %msg.subject, error = %e, "ignoring an event that does not parse")
                    }
                }
                // Acked once queued: the queue is memory, but a crash is covered by the
                // resync at start (level-triggered), so nothing is lost.
                if let Err(e) = msg.ack().await {
                    tracing::debug!(error = %e, "ack failed; the event will be redelivered");
                }
            }
            Ok::<_, anyhow::Error>(())
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            res = session => {
                attempt += 1;
                if let Err(e) = res {
                    tracing::warn!(consumer = %name, error = format!("{e:#}"), "event feed broke; reconnecting");
                }
            }
        }
        let delay = backoff(
            attempt.min(10),
            Duration::from_millis(200),
            Duration::from_secs(5),
        );
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    //! The queue and workers with an in-memory reconciler: the reconciler is the code under
    //! test's client, not a stand-in for a service.
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[derive(Default)]
    struct Recorder {
        /// Reconciles per key.
        runs: Mutex<HashMap<u32, usize>>,
        /// Reconciles in flight now, per key and overall, and the maxima seen.
        in_flight: Mutex<HashMap<u32, usize>>,
        max_per_key: AtomicUsize,
        total_in_flight: AtomicUsize,
        max_total: AtomicUsize,
        /// Failures to return before succeeding, per key.
        failures: Mutex<HashMap<u32, u32>>,
        /// When each run started (tokio time), per key.
        started: Mutex<HashMap<u32, Vec<tokio::time::Instant>>>,
        work: Duration,
        keys: Vec<u32>,
    }

    impl Reconciler for Recorder {
        type Key = u32;
        fn name(&self) -> &'static str {
            "test"
        }
        fn keys_for(&self, event: &EventPayload) -> Vec<u32> {
            vec![event.id as u32]
        }
        async fn list_keys(&self) -> anyhow::Result<Vec<u32>> {
            Ok(self.keys.clone())
        }
        async fn reconcile(&self, key: &u32) -> anyhow::Result<Action> {
            let k = *key;
            self.started
                .lock()
                .unwrap()
                .entry(k)
                .or_default()
                .push(tokio::time::Instant::now());
            let per_key = {
                let mut f = self.in_flight.lock().unwrap();
                let n = f.entry(k).or_insert(0);
                *n += 1;
                *n
            };
            self.max_per_key.fetch_max(per_key, Ordering::SeqCst);
            let total = self.total_in_flight.fetch_add(1, Ordering::SeqCst) + 1;
            self.max_total.fetch_max(total, Ordering::SeqCst);
            tokio::time::sleep(self.work).await;
            self.total_in_flight.fetch_sub(1, Ordering::SeqCst);
            *self.in_flight.lock().unwrap().get_mut(&k).unwrap() -= 1;
            *self.runs.lock().unwrap().entry(k).or_insert(0) += 1;
            let fail = {
                let mut f = self.failures.lock().unwrap();
                match f.get_mut(&k) {
                    Some(n) if *n > 0 => {
                        *n -= 1;
                        true
                    }
                    _ => false,
                }
            };
            if fail {
                Err(anyhow::anyhow!("planned failure"))
            } else {
                Ok(Action::Done)
            }
        }
    }

    fn options(concurrency: usize) -> ControllerOptions {
        ControllerOptions {
            concurrency,
            ..ControllerOptions::new("test", vec![])
        }
    }

    /// Workers running `r` over `queue`, until `stop`.
    struct Running {
        shutdown: CancellationToken,
        workers: tokio::task::JoinHandle<()>,
        metrics: Arc<Metrics>,
    }

    fn start<R: Reconciler<Key = u32>>(
        r: &Arc<R>,
        queue: &WorkQueue<u32>,
        opts: ControllerOptions,
    ) -> Running {
        let (shutdown, metrics) = (CancellationToken::new(), Metrics::new());
        let workers = tokio::spawn({
            let (r, q, s, m) = (r.clone(), queue.clone(), shutdown.clone(), metrics.clone());
            async move { run_workers(r, q, &opts, &m, s).await }
        });
        Running {
            shutdown,
            workers,
            metrics,
        }
    }

    impl Running {
        async fn stop(self) {
            self.shutdown.cancel();
            self.workers.await.unwrap();
        }
    }

    async fn settle(r: &Recorder, queue: &WorkQueue<u32>) {
        for _ in 0..10_000 {
            if queue.depth() == 0 && r.total_in_flight.load(Ordering::SeqCst) == 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!("the queue never settled");
    }

    #[tokio::test(start_paused = true)]
    async fn duplicates_run_once() {
        let r = Arc::new(Recorder {
            work: Duration::from_millis(10),
            ..Default::default()
        });
        let queue = WorkQueue::new();
        for _ in 0..5 {
            queue.add(7);
        }
        queue.add(8);
        let running = start(&r, &queue, options(4));
        tokio::time::sleep(Duration::from_millis(50)).await;
        settle(&r, &queue).await;
        assert_eq!(r.runs.lock().unwrap().get(&7), Some(&1));
        assert_eq!(r.runs.lock().unwrap().get(&8), Some(&1));
        running.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn one_key_never_runs_twice_at_once_and_adds_while_running_are_kept() {
        let r = Arc::new(Recorder {
            work: Duration::from_millis(100),
            ..Default::default()
        });
        let queue = WorkQueue::new();
        let running = start(&r, &queue, options(4));
        queue.add(1);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(queue.is_running(&1));
        // Added three times while it runs: it runs exactly once more, afterwards.
        for _ in 0..3 {
            queue.add(1);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(Duration::from_millis(400)).await;
        settle(&r, &queue).await;
        assert_eq!(r.max_per_key.load(Ordering::SeqCst), 1);
        assert_eq!(r.runs.lock().unwrap().get(&1), Some(&2));
        running.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn concurrency_is_bounded() {
        let r = Arc::new(Recorder {
            work: Duration::from_millis(50),
            ..Default::default()
        });
        let queue = WorkQueue::new();
        for k in 0..20 {
            queue.add(k);
        }
        let running = start(&r, &queue, options(3));
        tokio::time::sleep(Duration::from_millis(10)).await;
        settle(&r, &queue).await;
        assert_eq!(r.max_total.load(Ordering::SeqCst), 3);
        assert_eq!(r.runs.lock().unwrap().values().sum::<usize>(), 20);
        running.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn errors_retry_with_growing_capped_backoff() {
        let r = Arc::new(Recorder {
            work: Duration::from_millis(1),
            ..Default::default()
        });
        r.failures.lock().unwrap().insert(5, 6);
        let queue = WorkQueue::new();
        let opts = ControllerOptions {
            base_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(800),
            ..options(2)
        };
        let running = start(&r, &queue, opts);
        queue.add(5);
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert_eq!(
            r.runs.lock().unwrap().get(&5),
            Some(&7),
            "six failures, then success"
        );
        let starts = r.started.lock().unwrap().get(&5).unwrap().clone();
        let gaps: Vec<Duration> = starts.windows(2).map(|w| w[1] - w[0]).collect();
        // Retry n waits base * 2^(n-1) capped at 800 ms, times a jitter in [0.5, 1.0].
        for (i, gap) in gaps.iter().enumerate() {
            let full = Duration::from_millis(100 * (1 << i)).min(Duration::from_millis(800));
            assert!(
                *gap >= full / 2 && *gap <= full + Duration::from_millis(5),
                "retry {i}: {gap:?} vs {full:?}"
            );
        }
        assert!(gaps[5] <= Duration::from_millis(805), "capped");
        assert!(
            running
                .metrics
                .render()
                .contains("berth_reconcile_errors_total{component=\"test\"} 6")
        );
        running.stop().await;
    }

    /// Takes keys in batches and answers for the first key of each only.
    struct Forgetful {
        runs: Mutex<HashMap<u32, usize>>,
    }

    impl Reconciler for Forgetful {
        type Key = u32;
        fn name(&self) -> &'static str {
            "test"
        }
        fn keys_for(&self, _: &EventPayload) -> Vec<u32> {
            vec![]
        }
        async fn list_keys(&self) -> anyhow::Result<Vec<u32>> {
            Ok(vec![])
        }
        async fn reconcile(&self, key: &u32) -> anyhow::Result<Action> {
            *self.runs.lock().unwrap().entry(*key).or_insert(0) += 1;
            Ok(Action::Done)
        }
        fn batch_size(&self) -> usize {
            8
        }
        async fn reconcile_batch(&self, keys: &[u32]) -> Vec<anyhow::Result<Action>> {
            vec![self.reconcile(&keys[0]).await]
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_key_without_a_result_is_retried_not_left_running() {
        let r = Arc::new(Forgetful {
            runs: Mutex::new(HashMap::new()),
        });
        let queue = WorkQueue::new();
        for k in 1..=3 {
            queue.add(k);
        }
        let running = start(&r, &queue, options(1));
        tokio::time::sleep(Duration::from_secs(5)).await;
        let runs = r.runs.lock().unwrap().clone();
        assert_eq!(runs.len(), 3, "every key ran in the end: {runs:?}");
        assert!((1..=3).all(|k| !queue.is_running(&k)));
        running.stop().await;
    }

    #[test]
    fn backoff_bounds() {
        for attempt in 1..40 {
            let d = backoff(attempt, Duration::from_millis(100), Duration::from_secs(60));
            assert!(
                d <= Duration::from_secs(60) && d >= Duration::from_millis(50),
                "{attempt}: {d:?}"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn resync_queues_every_key() {
        let r = Arc::new(Recorder {
            work: Duration::from_millis(1),
            keys: (0..100).collect(),
            ..Default::default()
        });
        let queue = WorkQueue::new();
        assert_eq!(resync(&*r, &queue).await.unwrap(), 100);
        assert_eq!(queue.depth(), 100);
    }
}
