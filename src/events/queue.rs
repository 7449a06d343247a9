//! The work queue behind every reconciler (the kube-runtime pattern).
//!
//! - A key queued twice is queued once (dedup).
//! - A key is never handed out while it is being reconciled; added meanwhile, it is marked
//!   dirty and queued again when the running reconcile finishes (per-key exclusivity,
//!   nothing lost).
//! - Delayed adds (requeue after an error or a requested delay) keep the earliest time.
//!
//! The queue knows nothing of why a key is queued: reconcilers must be idempotent.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::hash::Hash;
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;
use tokio::time::{Duration, Instant};

struct State<K> {
    /// Keys ready to run, in order.
    ready: VecDeque<K>,
    /// The members of `ready`, for dedup.
    ready_set: HashSet<K>,
    /// Keys being reconciled now.
    running: HashSet<K>,
    /// Running keys added again meanwhile: they run once more when they finish.
    dirty: HashSet<K>,
    /// Keys waiting for a time, earliest first; `due` holds each key's time.
    delayed: BTreeMap<(Instant, u64), K>,
    due: HashMap<K, (Instant, u64)>,
    /// Tie-breaker for equal instants.
    seq: u64,
}

/// A deduplicating, per-key exclusive queue. Cheap to clone.
pub struct WorkQueue<K> {
    state: Arc<Mutex<State<K>>>,
    wake: Arc<Notify>,
}

impl<K> Clone for WorkQueue<K> {
    fn clone(&self) -> Self {
        WorkQueue {
            state: self.state.clone(),
            wake: self.wake.clone(),
        }
    }
}

impl<K: Clone + Eq + Hash> Default for WorkQueue<K> {
    fn default() -> Self {
        Self::new()
    }
}

impl<K: Clone + Eq + Hash> WorkQueue<K> {
    pub fn new() -> Self {
        WorkQueue {
            state: Arc::new(Mutex::new(State {
                ready: VecDeque::new(),
                ready_set: HashSet::new(),
                running: HashSet::new(),
                dirty: HashSet::new(),
                delayed: BTreeMap::new(),
                due: HashMap::new(),
                seq: 0,
            })),
            wake: Arc::new(Notify::new()),
        }
    }

    /// Queues `key` now (a no-op if it is already queued).
    pub fn add(&self, key: K) {
        let mut s = self.state.lock().expect("queue lock");
        if let Some(at) = s.due.remove(&key) {
            s.delayed.remove(&at);
        }
        if s.running.contains(&key) {
            s.dirty.insert(key);
        } else if s.ready_set.insert(key.clone()) {
            s.ready.push_back(key);
            drop(s);
            self.wake.notify_one();
        }
    }

    /// Queues `key` after `delay`, unless it is queued sooner anyway.
    pub fn add_after(&self, key: K, delay: Duration) {
        let at = Instant::now() + delay;
        let mut s = self.state.lock().expect("queue lock");
        if s.ready_set.contains(&key) {
            return;
        }
        if let Some(existing) = s.due.get(&key) {
            if existing.0 <= at {
                return;
            }
            let old = *existing;
            s.delayed.remove(&old);
        }
        s.seq += 1;
        let slot = (at, s.seq);
        s.delayed.insert(slot, key.clone());
        s.due.insert(key, slot);
        drop(s);
        // A waiter may need to shorten its sleep.
        self.wake.notify_waiters();
        self.wake.notify_one();
    }

    /// Moves delayed keys that are due to `ready`; returns when the next one is due.
    fn promote(s: &mut State<K>) -> Option<Instant> {
        let now = Instant::now();
        while let Some((&slot, _)) = s.delayed.first_key_value() {
            if slot.0 > now {
                return Some(slot.0);
            }
            let key = s.delayed.remove(&slot).expect("present");
            s.due.remove(&key);
            if s.running.contains(&key) {
                s.dirty.insert(key);
            } else if s.ready_set.insert(key.clone()) {
                s.ready.push_back(key);
            }
        }
        None
    }

    /// Waits for a key that is not running, marks it running and returns it.
    pub async fn next(&self) -> K {
        let mut batch = self.next_batch(1).await;
        batch.pop().expect("next_batch returns at least one key")
    }

    /// Waits for at least one key that is not running, then takes up to `max` of the keys
    /// ready now (never waiting for more), marks them running and returns them in order.
    pub async fn next_batch(&self, max: usize) -> Vec<K> {
        loop {
            let notified = self.wake.notified();
            let next_due = {
                let mut s = self.state.lock().expect("queue lock");
                let next_due = Self::promote(&mut s);
                if !s.ready.is_empty() {
                    let n = s.ready.len().min(max.max(1));
                    let batch: Vec<K> = s.ready.drain(..n).collect();
                    for key in &batch {
                        s.ready_set.remove(key);
                        s.running.insert(key.clone());
                    }
                    let more = !s.ready.is_empty();
                    drop(s);
                    if more {
                        self.wake.notify_one();
                    }
                    return batch;
                }
                next_due
            };
            match next_due {
                Some(at) => {
                    tokio::select! {
                        _ = notified => {}
                        _ = tokio::time::sleep_until(at) => {}
                    }
                }
                None => notified.await,
            }
        }
    }

    /// Marks `key` finished; a key added while it ran is queued again.
    pub fn done(&self, key: &K) {
        let mut s = self.state.lock().expect("queue lock");
        s.running.remove(key);
        if s.dirty.remove(key) && s.ready_set.insert(key.clone()) {
            s.ready.push_back(key.clone());
            drop(s);
            self.wake.notify_one();
        }
    }

    /// Keys waiting now (ready or delayed), for the queue depth metric.
    pub fn depth(&self) -> usize {
        let s = self.state.lock().expect("queue lock");
        s.ready.len() + s.delayed.len() + s.dirty.len()
    }

    /// Whether `key` is being reconciled now.
    pub fn is_running(&self, key: &K) -> bool {
        self.state.lock().expect("queue lock").running.contains(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_batch_takes_what_is_ready_and_never_a_running_key() {
        let q = WorkQueue::new();
        for k in 1..=6 {
            q.add(k);
        }
        assert_eq!(q.next_batch(4).await, vec![1, 2, 3, 4]);
        // Added again while running: kept for later, not handed out twice.
        q.add(2);
        assert_eq!(q.next_batch(4).await, vec![5, 6]);
        q.done(&2);
        assert_eq!(q.next_batch(4).await, vec![2]);
        // A batch never waits to fill up.
        q.add(7);
        assert_eq!(q.next_batch(64).await, vec![7]);
    }
}
