//! Merges Infer requests for the same model and key into one evaluation.
//!
//! Bootstrapping is far cheaper per ciphertext in large batches (a GPU needs thousands at
//! once to fill; the CPU backend batches its blind rotations too). A request that finds no
//! open batch for its (model, key) opens one and a timer; requests for the same pair that
//! arrive within the window join it, until it holds `max_samples` (or the samples whose
//! working memory fits `max_bytes`). Then one task takes the
//! batch, waits for an inference permit, evaluates it in the blocking pool and hands each
//! request exactly its own outputs. Batches for different keys run concurrently, up to the
//! permit count (on the GPU each on its own stream).
//!
//! The task owns the permit and the work: a client that cancels or times out does not free
//! a permit while its evaluation still runs. A batch whose every client has gone before it
//! starts is dropped unevaluated.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{Semaphore, oneshot};
use veil_models::fhe::{EncryptedInput, EncryptedOutput, EvalKey};

use crate::error::{Result, ServiceError};
use crate::key_store::short;
use crate::models::ServedModel;

/// How long a batch stays open for more requests, and how large it may grow.
#[derive(Clone, Debug)]
pub struct BatchPolicy {
    /// Zero runs every request on its own, at once.
    pub window: Duration,
    /// Most samples in one merged evaluation.
    pub max_samples: usize,
    /// Most host memory one merged evaluation may use, from the model's per-sample working
    /// set (a lone request is never split: the per-request sample limit bounds it).
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

type Waiter = (usize, oneshot::Sender<Result<Reply>>);

struct Open {
    id: u64,
    model: Arc<ServedModel>,
    key: Arc<EvalKey>,
    key_id: String,
    inputs: Vec<EncryptedInput>,
    /// Each request's sample count and reply channel, in order.
    waiters: Vec<Waiter>,
}

pub struct Batcher {
    policy: BatchPolicy,
    permits: Arc<Semaphore>,
    open: Mutex<HashMap<(String, String), Open>>,
    next_id: AtomicU64,
}

impl Batcher {
    pub fn new(policy: BatchPolicy, permits: Arc<Semaphore>) -> Arc<Self> {
        Arc::new(Batcher {
            policy,
            permits,
            open: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
        })
    }

    /// Evaluates `inputs` with `key`, merged with other requests for the same model and key
    /// that arrive within the window.
    pub async fn submit(
        self: &Arc<Self>,
        model: Arc<ServedModel>,
        key_id: &str,
        key: Arc<EvalKey>,
        inputs: Vec<EncryptedInput>,
    ) -> Result<Reply> {
        let (tx, rx) = oneshot::channel();
        let n = inputs.len();
        let per_sample = model.fhe.working_bytes_per_sample().max(1);
        let limit = self
            .policy
            .max_samples
            .min((self.policy.max_bytes / per_sample).max(1) as usize);
        let slot = (model.name.clone(), key_id.to_string());
        let mut ready = None;
        let mut opened = None;
        {
            let mut open = self.open.lock().expect("batcher lock");
            let fits = open.get(&slot).is_some_and(|b| b.inputs.len() + n <= limit);
            if !fits {
                // Too full to join (or none open): the open one runs now, this one starts anew.
                if let Some(full) = open.remove(&slot) {
                    ready = Some(full);
                }
                let id = self.next_id.fetch_add(1, Ordering::Relaxed);
                open.insert(
                    slot.clone(),
                    Open {
                        id,
                        model,
                        key,
                        key_id: key_id.to_string(),
                        inputs: Vec::new(),
                        waiters: Vec::new(),
                    },
                );
                opened = Some(id);
            }
            let batch = open.get_mut(&slot).expect("just ensured");
            batch.inputs.extend(inputs);
            batch.waiters.push((n, tx));
            if self.policy.window.is_zero() || batch.inputs.len() >= limit {
                let full = open.remove(&slot).expect("present");
                if let Some(r) = ready.replace(full) {
                    // Two batches became ready at once: run the older one separately.
                    self.spawn_run(r);
                }
                opened = None;
            }
        }
        if let Some(r) = ready {
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
        let permits = Arc::clone(&self.permits);
        tokio::spawn(async move {
            let Ok(permit) = permits.acquire_owned().await else {
                return;
            };
            if batch.waiters.iter().all(|(_, tx)| tx.is_closed()) {
                tracing::info!(model = %batch.model.name, key = %short(&batch.key_id),
                    "every request of a batch was cancelled; not evaluating it");
                return;
            }
            let Open {
                model,
                key,
                key_id,
                inputs,
                waiters,
                ..
            } = batch;
            let samples = inputs.len();
            let requests = waiters.len();
            let fhe = Arc::clone(&model.fhe);
            let t = Instant::now();
            let result = tokio::task::spawn_blocking(move || {
                // The permit lives as long as the evaluation itself.
                let _permit = permit;
                let backend = key.backend();
                fhe.evaluate(backend.as_ref(), &inputs)
            })
            .await;
            let eval = t.elapsed();
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
                    for (n, tx) in waiters {
                        let mine: Vec<EncryptedOutput> = outputs.by_ref().take(n).collect();
                        let _ = tx.send(Ok(Reply {
                            outputs: mine,
                            eval,
                            batch_samples: samples,
                        }));
                    }
                }
                Ok(Err(e)) => {
                    let msg = e.to_string();
                    for (_, tx) in waiters {
                        let _ = tx.send(Err(ServiceError::Internal(msg.clone())));
                    }
                }
                Err(e) => {
                    for (_, tx) in waiters {
                        let _ = tx.send(Err(ServiceError::Internal(format!(
                            "inference task failed: {e}"
                        ))));
                    }
                }
            }
        });
    }
}
