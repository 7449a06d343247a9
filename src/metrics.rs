//! Process metrics in the Prometheus text format: counters, gauges and histograms with a
//! fixed label set, registered once and updated with atomics (no lock on the hot path).
//!
//! The components register what they measure in [`Metrics`]; the API renders it at
//! `GET /metrics`.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A monotonically increasing count.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn inc_by(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    pub fn inc(&self) {
        self.inc_by(1);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A value that goes up and down.
#[derive(Default)]
pub struct Gauge(AtomicI64);

impl Gauge {
    pub fn set(&self, v: i64) {
        self.0.store(v, Ordering::Relaxed);
    }
    pub fn get(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Bucket bounds in seconds, from 0.5 ms to 60 s.
const BOUNDS: [f64; 14] = [
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 15.0, 60.0,
];

/// A latency histogram in seconds. Each observation counts in its own bucket only (one
/// atomic add, not one per bound: the edge observes every request); rendering sums them
/// into Prometheus's cumulative buckets. The counts are kept in a few shards, each on its
/// own cache lines, and a thread always adds to the same one: the edge's worker threads
/// observe every request, and one shared set of counts would bounce between their cores.
#[derive(Default)]
pub struct Histogram {
    shards: [Shard; SHARDS],
}

/// Shards per histogram (threads beyond this share them).
const SHARDS: usize = 4;

#[derive(Default)]
#[repr(align(128))]
struct Shard {
    buckets: [AtomicU64; BOUNDS.len()],
    count: AtomicU64,
    /// Sum in microseconds, to stay an integer.
    sum_micros: AtomicU64,
}

/// The shard of the calling thread: threads take shards in turn as they first observe.
fn my_shard() -> usize {
    use std::sync::atomic::AtomicUsize;
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static SHARD: usize = NEXT.fetch_add(1, Ordering::Relaxed) % SHARDS;
    }
    SHARD.with(|s| *s)
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let shard = &self.shards[my_shard()];
        let secs = d.as_secs_f64();
        if let Some(i) = BOUNDS.iter().position(|bound| secs <= *bound) {
            shard.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        shard.count.fetch_add(1, Ordering::Relaxed);
        shard
            .sum_micros
            .fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }
    pub fn count(&self) -> u64 {
        self.shards
            .iter()
            .map(|s| s.count.load(Ordering::Relaxed))
            .sum()
    }
    fn bucket(&self, i: usize) -> u64 {
        self.shards
            .iter()
            .map(|s| s.buckets[i].load(Ordering::Relaxed))
            .sum()
    }
    fn sum_micros(&self) -> u64 {
        self.shards
            .iter()
            .map(|s| s.sum_micros.load(Ordering::Relaxed))
            .sum()
    }
}

enum Metric {
    Counter(Arc<Counter>),
    Gauge(Arc<Gauge>),
    Histogram(Arc<Histogram>),
}

struct Entry {
    name: &'static str,
    help: &'static str,
    /// Rendered label pairs without braces, e.g. `component="manager"`.
    labels: String,
    metric: Metric,
}

/// The registry of one process.
#[derive(Default)]
pub struct Metrics {
    entries: Mutex<Vec<Entry>>,
}

fn render_labels(labels: &[(&str, &str)]) -> String {
    labels
        .iter()
        .map(|(k, v)| format!("{k}=\"{}\"", v.replace('\\', "\\\\").replace('"', "\\\"")))
        .collect::<Vec<_>>()
        .join(",")
}

impl Metrics {
    pub fn new() -> Arc<Metrics> {
        Arc::new(Metrics::default())
    }

    fn register<T>(
        &self,
        name: &'static str,
        help: &'static str,
        labels: &[(&str, &str)],
        make: impl FnOnce() -> (Arc<T>, Metric),
        find: impl Fn(&Metric) -> Option<Arc<T>>,
    ) -> Arc<T> {
        let labels = render_labels(labels);
        let mut entries = self.entries.lock().expect("metrics lock");
        if let Some(existing) = entries
            .iter()
            .find(|e| e.name == name && e.labels == labels)
            .and_then(|e| find(&e.metric))
        {
            return existing;
        }
        let (handle, metric) = make();
        entries.push(Entry {
            name,
            help,
            labels,
            metric,
        });
        handle
    }

    /// The counter `name{labels}`, created on first use.
    pub fn counter(
        &self,
        name: &'static str,
        help: &'static str,
        labels: &[(&str, &str)],
    ) -> Arc<Counter> {
        self.register(
            name,
            help,
            labels,
            || {
                let c = Arc::new(Counter::default());
                (c.clone(), Metric::Counter(c))
            },
            |m| match m {
                Metric::Counter(c) => Some(c.clone()),
                _ => None,
            },
        )
    }

    pub fn gauge(
        &self,
        name: &'static str,
        help: &'static str,
        labels: &[(&str, &str)],
    ) -> Arc<Gauge> {
        self.register(
            name,
            help,
            labels,
            || {
                let g = Arc::new(Gauge::default());
                (g.clone(), Metric::Gauge(g))
            },
            |m| match m {
                Metric::Gauge(g) => Some(g.clone()),
                _ => None,
            },
        )
    }

    pub fn histogram(
        &self,
        name: &'static str,
        help: &'static str,
        labels: &[(&str, &str)],
    ) -> Arc<Histogram> {
        self.register(
            name,
            help,
            labels,
            || {
                let h = Arc::new(Histogram::default());
                (h.clone(), Metric::Histogram(h))
            },
            |m| match m {
                Metric::Histogram(h) => Some(h.clone()),
                _ => None,
            },
        )
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let entries = self.entries.lock().expect("metrics lock");
        let mut out = String::new();
        let mut described: Vec<&str> = Vec::new();
        for e in entries.iter() {
            if !described.contains(&e.name) {
                let kind = match e.metric {
                    Metric::Counter(_) => "counter",
                    Metric::Gauge(_) => "gauge",
                    Metric::Histogram(_) => "histogram",
                };
                let _ = writeln!(
                    out,
                    "# HELP {} {}\n# TYPE {} {kind}",
                    e.name, e.help, e.name
                );
                described.push(e.name);
            }
            let braces = |extra: &str| -> String {
                match (e.labels.is_empty(), extra.is_empty()) {
                    (true, true) => String::new(),
                    (true, false) => format!("{{{extra}}}"),
                    (false, true) => format!("{{{}}}", e.labels),
                    (false, false) => format!("{{{},{extra}}}", e.labels),
                }
            };
            match &e.metric {
                Metric::Counter(c) => {
                    let _ = writeln!(out, "{}{} {}", e.name, braces(""), c.get());
                }
                Metric::Gauge(g) => {
                    let _ = writeln!(out, "{}{} {}", e.name, braces(""), g.get());
                }
                Metric::Histogram(h) => {
                    let mut cumulative = 0;
                    for (i, bound) in BOUNDS.iter().enumerate() {
                        cumulative += h.bucket(i);
                        let _ = writeln!(
                            out,
                            "{}_bucket{} {}",
                            e.name,
                            braces(&format!("le=\"{bound}\"")),
                            cumulative
                        );
                    }
                    let _ = writeln!(
                        out,
                        "{}_bucket{} {}",
                        e.name,
                        braces("le=\"+Inf\""),
                        h.count()
                    );
                    let _ = writeln!(
                        out,
                        "{}_sum{} {}",
                        e.name,
                        braces(""),
                        h.sum_micros() as f64 / 1e6
                    );
                    let _ = writeln!(out, "{}_count{} {}", e.name, braces(""), h.count());
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let m = Metrics::new();
        m.counter("berth_events_published_total", "Events published.", &[])
            .inc_by(3);
        m.gauge(
            "berth_queue_depth",
            "Keys waiting.",
            &[("component", "manager")],
        )
        .set(2);
        let h = m.histogram(
            "berth_reconcile_duration_seconds",
            "Reconcile time.",
            &[("component", "manager")],
        );
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_millis(40));
        // The same name and labels give the same metric.
        m.counter("berth_events_published_total", "Events published.", &[])
            .inc();
        let text = m.render();
        assert!(text.contains("berth_events_published_total 4\n"), "{text}");
        assert!(
            text.contains("berth_queue_depth{component=\"manager\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains(
                "berth_reconcile_duration_seconds_bucket{component=\"manager\",le=\"0.005\"} 1\n"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "berth_reconcile_duration_seconds_bucket{component=\"manager\",le=\"0.002\"} 0\n"
            ),
            "{text}"
        );
        // Buckets are cumulative.
        assert!(
            text.contains(
                "berth_reconcile_duration_seconds_bucket{component=\"manager\",le=\"0.05\"} 2\n"
            ),
            "{text}"
        );
        assert!(
            text.contains("berth_reconcile_duration_seconds_count{component=\"manager\"} 2\n"),
            "{text}"
        );
    }
}
