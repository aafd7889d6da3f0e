//! Merges Infer requests for the same model and key into one evaluation, and bounds how
//! many evaluations run and how many requests wait.
//!
//! Bootstrapping is far cheaper per ciphertext in large batches (a GPU needs thousands at
//! once to fill; the CPU backend batches its blind rotations too). A request that finds no
//! open batch for its (model, tenant, key) opens one and a timer; requests for the same
//! triple that arrive within the window join it, until it holds `max_samples` (or the samples
//! whose working memory fits `max_bytes`). Then one task takes the batch, waits for an
//! inference permit, loads the key, evaluates in the blocking pool and hands each request
//! exactly its own outputs. Batches for different keys run concurrently, up to the permit
//! count (on the GPU each on its own stream).
//!
//! Limits that hold under cancellation:
//! - the task owns the permit and the blocking evaluation owns it after that, so a client
//!   that cancels or times out never frees a permit while its evaluation still runs;
//! - at most `max_queue` requests wait; one more is refused at once (RESOURCE_EXHAUSTED);
//!   a tenant's own cap (queued and running, `max_requests` in the tenants file) likewise;
//! - permits go round-robin between tenants ([`crate::scheduler`]);
//! - a request whose client has gone, whose deadline has passed or that has waited longer
//!   than `max_queue_wait` is answered at once (DEADLINE_EXCEEDED, UNAVAILABLE) and never
//!   evaluated, and a batch whose every request has gone stops waiting at once;
//! - a waiting request holds only its wire bytes: samples are decoded and the ~120 MB key is
//!   looked up only once the permit is held.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;
use tracing::Instrument;
use veil_runtime::{EncryptedInput, EncryptedOutput};

use crate::error::{Result, ServiceError};
use crate::key_store::{KeyStore, short};
use crate::metrics::Metrics;
use crate::models::ServedModel;
use crate::scheduler::{EvalGate, Permit, Scheduler};
use crate::tenants::TenantSlot;

/// How long a batch stays open for more requests, and how large it may grow.
#[derive(Clone, Debug)]
pub struct BatchPolicy {
    /// Zero runs every request on its own, at once.
    pub window: Duration,
    /// Most samples in one merged evaluation.
    pub max_samples: usize,
    /// Most host memory one merged evaluation may use, from the model's per-sample working
    /// set (the per-request sample limit is derived from it too, so no request exceeds it).
    pub max_bytes: u64,
}

impl Default for BatchPolicy {
    fn default() -> Self {
        BatchPolicy {
            window: Duration::from_millis(2),
            max_samples: 1024,
            max_bytes: 4 << 30,
        }
    }
}

/// How the queue in front of the evaluations behaves.
#[derive(Clone, Debug)]
pub struct QueuePolicy {
    /// Evaluations running at once.
    pub concurrent: usize,
    /// Requests waiting at once (all tenants).
    pub max_queue: usize,
    /// A request that waited this long for an evaluation is answered UNAVAILABLE instead of
    /// running late; `None`: it waits as long as its deadline allows.
    pub max_queue_wait: Option<Duration>,
    /// Threads of each evaluation's pool (the machine's cores unless set).
    pub threads_per_evaluation: usize,
    /// Test hook: evaluations wait at this gate, running, until the test opens it.
    pub gate: Option<Arc<EvalGate>>,
}

/// One request's share of a batch's result.
pub struct Reply {
    pub outputs: Vec<EncryptedOutput>,
    /// Wall time of the whole merged evaluation.
    pub eval: Duration,
    /// Samples in the merged evaluation (this request's and others').
    pub batch_samples: usize,
}

/// One Infer request, as it waits: its wire bytes, its deadline and its reply channel.
pub struct Job {
    pub model: Arc<ServedModel>,
    /// The key's owner (the tenant's name; empty on an open server) and id.
    pub owner: String,
    pub key_id: String,
    /// One entry per sample: its seeded ciphertexts, as received (already checked to decode).
    pub samples: Vec<Vec<u8>>,
    pub deadline: Option<Instant>,
    /// The tenant's count of queued and running requests, held until the evaluation ends.
    pub tenant_slot: Option<TenantSlot>,
    /// For the batch's log lines.
    pub request_id: String,
}

struct Waiter {
    samples: Vec<Vec<u8>>,
    deadline: Option<Instant>,
    enqueued: Instant,
    tx: oneshot::Sender<Result<Reply>>,
    /// The request's place in the global queue, given back when it starts or leaves.
    queued: Option<QueueSlot>,
    _tenant: Option<TenantSlot>,
    request_id: String,
}

impl Waiter {
    /// When the request must be answered if it has not started.
    fn expiry(&self, max_wait: Option<Duration>) -> Option<Instant> {
        let waited = max_wait.and_then(|w| self.enqueued.checked_add(w));
        match (self.deadline, waited) {
            (Some(d), Some(w)) => Some(d.min(w)),
            (d, w) => d.or(w),
        }
    }

    /// Answers the request if it can no longer start in time; true if it should stay.
    fn still_waiting(&mut self, now: Instant, max_wait: Option<Duration>) -> bool {
        if self.tx.is_closed() {
            return false;
        }
        let error = if self.deadline.is_some_and(|d| d <= now) {
            ServiceError::DeadlineExceeded(
                "the request's deadline passed while it waited for an evaluation slot; it was \
                 not evaluated"
                    .into(),
            )
        } else if let Some(w) = max_wait.filter(|w| now.duration_since(self.enqueued) >= *w) {
            ServiceError::Unavailable(format!(
                "the request waited {:.1} s for an evaluation slot, the server's limit \
                 (--max-queue-wait) is {:.1} s; it was not evaluated, retry later",
                now.duration_since(self.enqueued).as_secs_f64(),
                w.as_secs_f64()
            ))
        } else {
            return true;
        };
        let (tx, _) = oneshot::channel();
        let _ = std::mem::replace(&mut self.tx, tx).send(Err(error));
        false
    }
}

struct Open {
    id: u64,
    model: Arc<ServedModel>,
    owner: String,
    key_id: String,
    samples: usize,
    waiters: Vec<Waiter>,
}

type Slot = (String, String, String);

pub struct Batcher {
    policy: BatchPolicy,
    queue: QueuePolicy,
    scheduler: Arc<Scheduler>,
    keys: Arc<KeyStore>,
    metrics: Arc<Metrics>,
    /// Requests admitted and not yet running (in an open batch or waiting for a permit).
    queued: Arc<AtomicUsize>,
    open: Mutex<HashMap<Slot, Open>>,
    next_id: AtomicU64,
}

/// One request's place in the queue: counted in the gauge from admission until it starts
/// or leaves, whichever way it ends (inc and dec, so the gauge is never stale).
struct QueueSlot {
    queued: Arc<AtomicUsize>,
    metrics: Arc<Metrics>,
}

impl Drop for QueueSlot {
    fn drop(&mut self) {
        self.queued.fetch_sub(1, Ordering::SeqCst);
        self.metrics.queue_depth.dec();
    }
}

impl Batcher {
    pub fn new(
        policy: BatchPolicy,
        queue: QueuePolicy,
        keys: Arc<KeyStore>,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        Arc::new(Batcher {
            policy,
            scheduler: Scheduler::new(queue.concurrent, queue.threads_per_evaluation),
            queue,
            keys,
            metrics,
            queued: Arc::new(AtomicUsize::new(0)),
            open: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
        })
    }

    /// Most samples a merged evaluation of `model` may hold.
    pub fn batch_limit(&self, model: &ServedModel) -> usize {
        let per_sample = model.fhe.working_bytes_per_sample().max(1);
        self.policy
            .max_samples
            .min((self.policy.max_bytes / per_sample).max(1) as usize)
    }

    /// Evaluates the job, merged with other requests for the same model and key that arrive
    /// within the window. RESOURCE_EXHAUSTED at once when the queue is full.
    pub async fn submit(self: &Arc<Self>, job: Job) -> Result<Reply> {
        // Admission: take a queue slot or refuse.
        let max_queue = self.queue.max_queue;
        if self
            .queued
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |q| {
                (q < max_queue).then_some(q + 1)
            })
            .is_err()
        {
            return Err(ServiceError::Exhausted(format!(
                "the server is busy: {max_queue} requests are already waiting for an \
                 evaluation; retry later"
            )));
        }
        self.metrics.queue_depth.inc();
        let queued = QueueSlot {
            queued: Arc::clone(&self.queued),
            metrics: Arc::clone(&self.metrics),
        };
        let (tx, rx) = oneshot::channel();
        let n = job.samples.len();
        let limit = self.batch_limit(&job.model);
        let slot: Slot = (
            job.model.name.clone(),
            job.owner.clone(),
            job.key_id.clone(),
        );
        let waiter = Waiter {
            samples: job.samples,
            deadline: job.deadline,
            enqueued: Instant::now(),
            tx,
            queued: Some(queued),
            _tenant: job.tenant_slot,
            request_id: job.request_id,
        };
        let mut ready = Vec::new();
        let mut opened = None;
        {
            let mut open = self.open.lock().expect("batcher lock");
            let fits = open.get(&slot).is_some_and(|b| b.samples + n <= limit);
            if !fits {
                // Too full to join (or none open): the open one runs now, this one starts anew.
                if let Some(full) = open.remove(&slot) {
                    ready.push(full);
                }
                let id = self.next_id.fetch_add(1, Ordering::Relaxed);
                open.insert(
                    slot.clone(),
                    Open {
                        id,
                        model: job.model,
                        owner: job.owner,
                        key_id: job.key_id,
                        samples: 0,
                        waiters: Vec::new(),
                    },
                );
                opened = Some(id);
            }
            let batch = open.get_mut(&slot).expect("just ensured");
            batch.samples += n;
            batch.waiters.push(waiter);
            if self.policy.window.is_zero() || batch.samples >= limit {
                ready.push(open.remove(&slot).expect("present"));
                opened = None;
            }
        }
        for r in ready {
            self.spawn_run(r);
        }
        if let Some(id) = opened {
            let this = Arc::clone(self);
            let window = self.policy.window;
            tokio::spawn(async move {
                tokio::time::sleep(window).await;
                let batch = {
                    let mut open = this.open.lock().expect("batcher lock");
                    match open.get(&slot) {
                        Some(b) if b.id == id => open.remove(&slot),
                        _ => None,
                    }
                };
                if let Some(b) = batch {
                    this.spawn_run(b);
                }
            });
        }
        rx.await
            .map_err(|_| ServiceError::Internal("the batch evaluation was dropped".into()))?
    }

    /// Waits for a permit in the owner's line, answering requests that run out of time or
    /// leave meanwhile; `None` when none is left.
    async fn wait_for_permit(&self, owner: &str, waiters: &mut Vec<Waiter>) -> Option<Permit> {
        let mut line = match self.scheduler.acquire(owner) {
            Ok(p) => return Some(p),
            Err(rx) => rx,
        };
        let max_wait = self.queue.max_queue_wait;
        loop {
            let expiry = waiters.iter().filter_map(|w| w.expiry(max_wait)).min();
            enum Woke {
                Permit(Option<Permit>),
                Gone,
                Expired,
            }
            let woke = tokio::select! {
                p = &mut line => Woke::Permit(p.ok()),
                _ = all_gone(waiters) => Woke::Gone,
                _ = sleep_until(expiry) => Woke::Expired,
            };
            match woke {
                Woke::Permit(p) => return p,
                Woke::Gone => return None,
                Woke::Expired => {
                    let now = Instant::now();
                    waiters.retain_mut(|w| w.still_waiting(now, max_wait));
                    if waiters.is_empty() {
                        return None;
                    }
                }
            }
        }
    }

    fn spawn_run(self: &Arc<Self>, batch: Open) {
        let this = Arc::clone(self);
        // The batch's log lines name every request id it serves.
        let ids: Vec<&str> = batch
            .waiters
            .iter()
            .map(|w| w.request_id.as_str())
            .collect();
        let span = tracing::info_span!("batch", request_ids = %ids.join(","));
        let run = async move {
            let Open {
                model,
                owner,
                key_id,
                mut waiters,
                ..
            } = batch;
            let Some(permit) = this.wait_for_permit(&owner, &mut waiters).await else {
                tracing::info!(model = %model.name, key = %short(&key_id),
                    "every request of a waiting batch went away or ran out of time; not \
                     evaluating it");
                return;
            };
            // Drop the requests that went away or ran out of time; the rest leave the queue.
            let now = Instant::now();
            let max_wait = this.queue.max_queue_wait;
            waiters.retain_mut(|w| w.still_waiting(now, max_wait));
            for w in &mut waiters {
                this.metrics
                    .queue_wait_seconds
                    .observe(now.duration_since(w.enqueued).as_secs_f64());
                w.queued = None;
            }
            if waiters.is_empty() {
                return;
            }
            let key = match this.keys.get(&owner, &key_id, model.params).await {
                Ok(k) => k,
                Err(e) => {
                    let e = Arc::new(e);
                    for w in waiters {
                        let _ = w.tx.send(Err(ServiceError::Shared(Arc::clone(&e))));
                    }
                    return;
                }
            };
            let counts: Vec<usize> = waiters.iter().map(|w| w.samples.len()).collect();
            let wire: Vec<Vec<u8>> = waiters
                .iter_mut()
                .flat_map(|w| std::mem::take(&mut w.samples))
                .collect();
            let samples = wire.len();
            let requests = waiters.len();
            let fhe = Arc::clone(&model.fhe);
            let (n_features, lwe_size) = (model.n_features, model.lwe_size);
            let metrics = Arc::clone(&this.metrics);
            let gate = this.queue.gate.clone();
            this.metrics.merged_samples.observe(samples as f64);
            let t = Instant::now();
            let span = tracing::Span::current();
            let result = tokio::task::spawn_blocking(move || {
                let _span = span.enter();
                // The permit lives as long as the evaluation itself.
                let _running = metrics.inference_running();
                if let Some(g) = gate {
                    g.pass(Duration::from_secs(120));
                }
                permit.install(|| {
                    let inputs = wire
                        .iter()
                        .map(|b| EncryptedInput::from_bytes(b, n_features, lwe_size))
                        .collect::<veil_runtime::Result<Vec<_>>>()?;
                    drop(wire);
                    let backend = key.backend();
                    fhe.evaluate(backend.as_ref(), &inputs)
                })
            })
            .await;
            let eval = t.elapsed();
            this.metrics.evaluation_seconds.observe(eval.as_secs_f64());
            let pbs = model.info.pbs_per_sample;
            if matches!(result, Ok(Ok(_))) {
                this.metrics.bootstraps.inc_by(samples as u64 * pbs);
                this.metrics.evaluated_samples.inc_by(samples as u64);
                for &n in &counts {
                    this.metrics.work(&owner, &model.name, n as u64, pbs);
                }
            }
            tracing::info!(
                model = %model.name,
                key = %short(&key_id),
                samples,
                requests,
                eval_ms = eval.as_millis() as u64,
                "infer batch"
            );
            match result {
                Ok(Ok(outputs)) => {
                    let mut outputs = outputs.into_iter();
                    for (w, n) in waiters.into_iter().zip(counts) {
                        let mine: Vec<EncryptedOutput> = outputs.by_ref().take(n).collect();
                        let _ = w.tx.send(Ok(Reply {
                            outputs: mine,
                            eval,
                            batch_samples: samples,
                        }));
                    }
                }
                Ok(Err(e)) => {
                    let e = Arc::new(ServiceError::Internal(e.to_string()));
                    for w in waiters {
                        let _ = w.tx.send(Err(ServiceError::Shared(Arc::clone(&e))));
                    }
                }
                Err(e) => {
                    let e = Arc::new(ServiceError::Internal(format!(
                        "inference task failed: {e}"
                    )));
                    for w in waiters {
                        let _ = w.tx.send(Err(ServiceError::Shared(Arc::clone(&e))));
                    }
                }
            }
        };
        tokio::spawn(run.instrument(span));
    }
}

/// Completes when every waiter's client has gone (its reply channel closed).
async fn all_gone(waiters: &mut [Waiter]) {
    for w in waiters.iter_mut() {
        w.tx.closed().await;
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}
