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
//! - a request whose client has gone or whose deadline has passed when the permit comes is
//!   dropped unevaluated, and a batch whose every request has gone stops waiting at once;
//! - a waiting request holds only its wire bytes: samples are decoded and the ~120 MB key is
//!   looked up only once the permit is held.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{Semaphore, oneshot};
use veil_runtime::{EncryptedInput, EncryptedOutput};

use crate::error::{Result, ServiceError};
use crate::key_store::{KeyStore, short};
use crate::metrics::Metrics;
use crate::models::ServedModel;

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
}

struct Waiter {
    samples: Vec<Vec<u8>>,
    deadline: Option<Instant>,
    tx: oneshot::Sender<Result<Reply>>,
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
    permits: Arc<Semaphore>,
    keys: Arc<KeyStore>,
    metrics: Arc<Metrics>,
    max_queue: usize,
    /// Requests admitted and not yet running (in an open batch or waiting for a permit).
    queued: AtomicUsize,
    open: Mutex<HashMap<Slot, Open>>,
    next_id: AtomicU64,
}

/// Gives queue slots back when a batch starts or is dropped, whichever way it ends.
struct QueueSlots {
    batcher: Arc<Batcher>,
    n: usize,
}

impl Drop for QueueSlots {
    fn drop(&mut self) {
        let left = self.batcher.queued.fetch_sub(self.n, Ordering::SeqCst) - self.n;
        self.batcher.metrics.queue_depth.set(left as i64);
    }
}

impl Batcher {
    pub fn new(
        policy: BatchPolicy,
        concurrent: usize,
        max_queue: usize,
        keys: Arc<KeyStore>,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        Arc::new(Batcher {
            policy,
            permits: Arc::new(Semaphore::new(concurrent.max(1))),
            keys,
            metrics,
            max_queue,
            queued: AtomicUsize::new(0),
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
        let admitted = self
            .queued
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |q| {
                (q < self.max_queue).then_some(q + 1)
            });
        match admitted {
            Ok(q) => self.metrics.queue_depth.set(q as i64 + 1),
            Err(_) => {
                return Err(ServiceError::Exhausted(format!(
                    "the server is busy: {} requests are already waiting for an evaluation; \
                     retry later",
                    self.max_queue
                )));
            }
        }
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
            tx,
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

    fn spawn_run(self: &Arc<Self>, batch: Open) {
        let this = Arc::clone(self);
        tokio::spawn(async move {
            let Open {
                model,
                owner,
                key_id,
                mut waiters,
                ..
            } = batch;
            let slots = QueueSlots {
                batcher: Arc::clone(&this),
                n: waiters.len(),
            };
            let permit = tokio::select! {
                p = Arc::clone(&this.permits).acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => return,
                },
                _ = all_gone(&mut waiters) => {
                    tracing::info!(model = %model.name, key = %short(&key_id),
                        "every request of a waiting batch went away; not evaluating it");
                    return;
                }
            };
            drop(slots);
            // Drop the requests that went away or ran out of time while waiting.
            let now = Instant::now();
            waiters.retain_mut(|w| {
                if w.tx.is_closed() {
                    return false;
                }
                if w.deadline.is_some_and(|d| d <= now) {
                    let (tx, _) = oneshot::channel();
                    let _ =
                        std::mem::replace(&mut w.tx, tx).send(Err(ServiceError::DeadlineExceeded(
                            "the request's deadline passed while it waited for an evaluation \
                             slot; it was not evaluated"
                                .into(),
                        )));
                    return false;
                }
                true
            });
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
            let t = Instant::now();
            let result = tokio::task::spawn_blocking(move || {
                // The permit lives as long as the evaluation itself.
                let _permit = permit;
                let _running = metrics.inference_running();
                let inputs = wire
                    .iter()
                    .map(|b| EncryptedInput::from_bytes(b, n_features, lwe_size))
                    .collect::<veil_runtime::Result<Vec<_>>>()?;
                drop(wire);
                let backend = key.backend();
                fhe.evaluate(backend.as_ref(), &inputs)
            })
            .await;
            let eval = t.elapsed();
            this.metrics.evaluation_seconds.observe(eval.as_secs_f64());
            if matches!(result, Ok(Ok(_))) {
                this.metrics
                    .bootstraps
                    .inc_by(samples as u64 * model.info.pbs_per_sample);
                this.metrics.evaluated_samples.inc_by(samples as u64);
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
        });
    }
}

/// Completes when every waiter's client has gone (its reply channel closed).
async fn all_gone(waiters: &mut [Waiter]) {
    for w in waiters.iter_mut() {
        w.tx.closed().await;
    }
}
