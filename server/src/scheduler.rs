//! Who runs next: evaluation permits handed out round-robin between tenants, each permit with
//! its own thread pool.
//!
//! A FIFO semaphore lets a tenant with many queued batches make a tenant with one wait behind
//! all of them. Here a freed permit goes to the next tenant in turn that has a batch waiting
//! (oldest first within a tenant). Each permit carries a rayon pool of its own, so two running
//! evaluations share the cores through the OS scheduler: a one-sample evaluation does not wait
//! in a global rayon queue behind every bootstrap of a 256-sample one.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::oneshot;

pub struct Scheduler {
    state: Mutex<State>,
    pools: Vec<rayon::ThreadPool>,
}

#[derive(Default)]
struct State {
    /// Pools (by index) of the permits nobody holds.
    free: Vec<usize>,
    /// Tenants with batches waiting, in turn order.
    ring: VecDeque<String>,
    waiting: HashMap<String, VecDeque<oneshot::Sender<Permit>>>,
}

/// The right to run one evaluation, on its own thread pool. Dropping it hands it on.
pub struct Permit {
    scheduler: Option<Arc<Scheduler>>,
    pool: usize,
}

impl Permit {
    /// Runs `f` with rayon's parallel iterators on this permit's pool.
    pub fn install<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        match &self.scheduler {
            Some(s) => s.pools[self.pool].install(f),
            None => f(),
        }
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if let Some(s) = self.scheduler.take() {
            s.hand_on(self.pool);
        }
    }
}

impl Scheduler {
    /// `permits` evaluations at once, each on a pool of `threads` threads.
    pub fn new(permits: usize, threads: usize) -> Arc<Self> {
        let permits = permits.max(1);
        let pools = (0..permits)
            .map(|i| {
                rayon::ThreadPoolBuilder::new()
                    .num_threads(threads.max(1))
                    .thread_name(move |t| format!("veil-eval-{i}-{t}"))
                    .build()
                    .expect("evaluation thread pool")
            })
            .collect();
        Arc::new(Scheduler {
            state: Mutex::new(State {
                free: (0..permits).rev().collect(),
                ..State::default()
            }),
            pools,
        })
    }

    /// A permit at once if one is free, else a place in `tenant`'s line. Dropping the
    /// receiver gives the place up.
    pub fn acquire(self: &Arc<Self>, tenant: &str) -> Result<Permit, oneshot::Receiver<Permit>> {
        let mut s = self.state.lock().expect("scheduler lock");
        if let Some(pool) = s.free.pop() {
            return Ok(Permit {
                scheduler: Some(Arc::clone(self)),
                pool,
            });
        }
        // Places given up (their batches expired or left) go now, so the lines stay bounded
        // by the live waiters however long the permits are held.
        let State { ring, waiting, .. } = &mut *s;
        waiting.retain(|_, line| {
            line.retain(|tx| !tx.is_closed());
            !line.is_empty()
        });
        ring.retain(|t| waiting.contains_key(t));
        let (tx, rx) = oneshot::channel();
        let line = s.waiting.entry(tenant.to_string()).or_default();
        line.push_back(tx);
        if line.len() == 1 {
            s.ring.push_back(tenant.to_string());
        }
        Err(rx)
    }

    /// Gives the permit of `pool` to the next live waiter in turn, or frees it.
    fn hand_on(self: &Arc<Self>, pool: usize) {
        let mut permit = Permit {
            scheduler: Some(Arc::clone(self)),
            pool,
        };
        loop {
            let next = {
                let mut s = self.state.lock().expect("scheduler lock");
                match s.next_waiter() {
                    Some(tx) => tx,
                    None => {
                        s.free.push(pool);
                        permit.scheduler = None;
                        return;
                    }
                }
            };
            match next.send(permit) {
                Ok(()) => return,
                // The waiter left between the check and the send: the next one.
                Err(p) => permit = p,
            }
        }
    }

    /// Permits nobody holds now.
    pub fn free(&self) -> usize {
        self.state.lock().expect("scheduler lock").free.len()
    }
}

impl State {
    fn next_waiter(&mut self) -> Option<oneshot::Sender<Permit>> {
        while let Some(tenant) = self.ring.pop_front() {
            let Some(line) = self.waiting.get_mut(&tenant) else {
                continue;
            };
            let mut found = None;
            while let Some(tx) = line.pop_front() {
                if !tx.is_closed() {
                    found = Some(tx);
                    break;
                }
            }
            if line.is_empty() {
                self.waiting.remove(&tenant);
            } else {
                self.ring.push_back(tenant);
            }
            if found.is_some() {
                return found;
            }
        }
        None
    }
}

/// A test hook: evaluations that hold a permit wait here, running (counted in flight), until
/// the test lets them pass. Tests use it instead of assuming an evaluation is slow.
#[derive(Default)]
pub struct EvalGate {
    passes: Mutex<u64>,
    cond: std::sync::Condvar,
}

impl std::fmt::Debug for EvalGate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EvalGate").finish_non_exhaustive()
    }
}

impl EvalGate {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Lets `n` more evaluations through.
    pub fn open(&self, n: u64) {
        *self.passes.lock().expect("gate lock") += n;
        self.cond.notify_all();
    }

    /// Blocks until a pass is available (at most `limit`, so a forgotten gate cannot hang a
    /// server forever); false when the limit was reached.
    pub fn pass(&self, limit: Duration) -> bool {
        let guard = self.passes.lock().expect("gate lock");
        let (mut g, timeout) = self
            .cond
            .wait_timeout_while(guard, limit, |p| *p == 0)
            .expect("gate lock");
        if timeout.timed_out() && *g == 0 {
            return false;
        }
        *g -= 1;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The permit `rx` receives; fails (rather than hangs) if it never comes.
    async fn granted(rx: oneshot::Receiver<Permit>, what: &str) -> Permit {
        tokio::time::timeout(Duration::from_secs(10), rx)
            .await
            .unwrap_or_else(|_| panic!("{what}: no permit within 10 s"))
            .expect("the scheduler is alive")
    }

    #[tokio::test]
    async fn a_freed_permit_goes_round_robin_between_tenants() {
        let s = Scheduler::new(1, 1);
        let held = s.acquire("a").ok().expect("one free permit");
        // Tenant a queues three batches, then b one.
        let mut a: Vec<_> = (0..3).map(|_| s.acquire("a").err().unwrap()).collect();
        let mut b = s.acquire("b").err().unwrap();
        drop(held);
        let first = granted(a.remove(0), "a's oldest goes first").await;
        assert!(b.try_recv().is_err(), "b still waits");
        drop(first);
        // b is next, ahead of a's two older batches.
        assert!(a[0].try_recv().is_err(), "a's second batch went before b");
        let second = granted(b, "b's turn").await;
        drop(second);
        let third = granted(a.remove(0), "then a again").await;
        // A waiter that left is skipped.
        drop(a.remove(0));
        drop(third);
        assert_eq!(s.free(), 1, "the permit is free again, nobody waits");
    }

    #[test]
    fn the_gate_gives_passes_and_times_out() {
        let g = EvalGate::new();
        assert!(!g.pass(Duration::from_millis(1)));
        g.open(1);
        assert!(g.pass(Duration::from_millis(1)));
        assert!(!g.pass(Duration::from_millis(1)));
    }
}
