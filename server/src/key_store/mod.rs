//! Evaluation keys: stored on disk under the data dir, expanded keys in a bounded LRU cache.
//!
//! Every key belongs to a tenant (the anonymous one on an open server). Layout:
//! `DATA_DIR/keys/<PARAMETER_SET>/<key id>.key` for the anonymous tenant and
//! `DATA_DIR/tenants/<name>/keys/<PARAMETER_SET>/<key id>.key` for a named one, where the key
//! id is the lowercase hex SHA-256 of the exact serialized (compressed) key bytes. Another
//! tenant's key is invisible: looking it up finds nothing.
//!
//! A key is written to a temporary file in the same directory, synced, then renamed into
//! place, so a crash never leaves a half-written key under its id. A loaded key is checked
//! again: its hash must match its id, and it goes through tfhe's safe deserialization with the
//! conformance check.
//!
//! Write before index: an upload first reserves its bytes with a *pending* entry, which no
//! lookup, delete, eviction or expiry sees; the entry becomes visible only once the file is
//! in place. A second upload of the same key waits for the first to settle. Files are only
//! removed under the index lock together with their entry, so a ready entry always has its
//! file and a file never outlives its entry. Every removal syncs the directory.
//!
//! `DATA_DIR/.lock` is held (an exclusive file lock) while the store is open: a second server
//! on the same directory refuses to start.
//!
//! Bounds: the cache holds a fixed number of expanded keys; the disk holds at most
//! `max_store_bytes` of keys. When the disk is full, eviction takes least recently used keys
//! of tenants over their `max_keys` share first, then the uploader's own, then those of
//! tenants without a `max_keys`; a tenant within its `max_keys` never loses a key to another
//! tenant's upload, and keys expanded in memory stay. Loads from disk run one at a time; the
//! load permit belongs to the blocking task, so a caller that gives up does not let a second
//! load start beside it.
//!
//! With an object store ([`KeyStore::with_remote`]), the store is the truth and the disk a
//! cache: an upload is validated once, then written with one PUT before it is visible; a key
//! missing from the disk is fetched from the store (and checked again); quotas count the
//! store's listing ([`remote::USAGE_TTL`] old at most); deletion and the TTL remove keys from
//! the store; the disk bound only evicts cached copies. A key cached here is checked against
//! the store at most every `revalidate` ([`DEFAULT_REVALIDATE`]), so a key deleted through another replica stops
//! working here within that time.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use tokio::runtime::Handle;
use tokio::sync::Semaphore;
use veil_format::compiled::ParamSet;
use veil_runtime::keys::{MAX_EVAL_KEY_BYTES, eval_key_from_bytes};
use veil_runtime::{BackendKind, EvalKey};

use crate::error::{Result, ServiceError};
use crate::metrics::Metrics;

mod remote;
pub use remote::{RemoteKey, RemoteStore};

/// With an object store, a key found in this replica's cache is confirmed in the store at most
/// this often unless the operator says otherwise (a key deleted through another replica is
/// served here at most this long).
pub const DEFAULT_REVALIDATE: Duration = Duration::from_secs(30);

/// How long an upload waits for another upload of the same key to finish writing it.
const PENDING_WAIT: Duration = Duration::from_secs(120);

/// A used key's file modification time is brought forward at most this often; after a
/// restart it is the key's last use (for `ListKeys` and the TTL).
const MTIME_REFRESH: Duration = Duration::from_secs(60);

pub use veil_format::digest::key_id;

/// Checks that `id` looks like a key id (64 lowercase hex characters), so it is safe to use
/// as a file name.
pub fn check_key_id(id: &str) -> Result<()> {
    if id.len() == 64 && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        Ok(())
    } else {
        Err(ServiceError::InvalidRequest(format!(
            "malformed key id '{}': expected 64 lowercase hex characters (the SHA-256 of the \
             serialized evaluation key)",
            id.chars().take(80).collect::<String>()
        )))
    }
}

/// What the store knows about a stored key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredKey {
    pub id: String,
    pub params: ParamSet,
    pub size: u64,
    /// True when this call wrote the key, false when it was already stored.
    pub newly_stored: bool,
}

/// A key as `ListKeys` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListedKey {
    pub id: String,
    pub params: ParamSet,
    pub size: u64,
    /// Last upload or use (after a restart, the file's modification time, which uses bring
    /// forward at most once a minute).
    pub last_used: SystemTime,
}

/// A tenant's limits on stored keys.
#[derive(Clone, Copy, Debug, Default)]
pub struct Quota {
    pub max_keys: Option<u64>,
    pub max_bytes: Option<u64>,
}

/// Where an upload is, for tests that interleave it with other calls.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// The upload reserved its bytes (pending entry); the file is not written yet.
    Reserved,
    /// The file is in place; the entry is still pending.
    Written,
    /// A second upload of a key found it pending and waits (called with the index locked:
    /// the hook must not block here).
    WaitingForPending,
}

/// One key of one tenant.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct KeyRef {
    owner: String,
    params: &'static str,
    id: String,
}

struct Entry {
    params: ParamSet,
    size: u64,
    last_used: u64,
    last_used_at: SystemTime,
    /// Reserved by an upload that has not finished writing: invisible to everything else.
    pending: bool,
    /// The last use recorded in the file's modification time.
    persisted_at: SystemTime,
    /// With an object store: when the store last confirmed it holds the key.
    confirmed: Option<std::time::Instant>,
}

/// Every stored key, with its size and last use.
#[derive(Default)]
struct Index {
    keys: HashMap<KeyRef, Entry>,
    tick: u64,
    total: u64,
}

impl Index {
    /// Keys and bytes of `owner`, pending reservations included.
    fn owner_usage(&self, owner: &str) -> (u64, u64) {
        self.keys
            .iter()
            .filter(|(k, _)| k.owner == owner)
            .fold((0, 0), |(n, b), (_, e)| (n + 1, b + e.size))
    }

    /// Keys and bytes `owner`'s uploads in progress have reserved.
    fn owner_pending(&self, owner: &str) -> (u64, u64) {
        self.keys
            .iter()
            .filter(|(k, e)| k.owner == owner && e.pending)
            .fold((0, 0), |(n, b), (_, e)| (n + 1, b + e.size))
    }

    fn ready(&self, k: &KeyRef) -> Option<&Entry> {
        self.keys.get(k).filter(|e| !e.pending)
    }

    /// Records a use; true when the file's modification time (the last use a restart sees)
    /// is more than [`MTIME_REFRESH`] behind and should be brought forward.
    fn touch(&mut self, k: &KeyRef) -> bool {
        self.tick += 1;
        let tick = self.tick;
        let now = SystemTime::now();
        match self.keys.get_mut(k) {
            Some(e) => {
                e.last_used = tick;
                e.last_used_at = now;
                let stale = now
                    .duration_since(e.persisted_at)
                    .is_ok_and(|d| d > MTIME_REFRESH);
                if stale {
                    e.persisted_at = now;
                }
                stale
            }
            None => false,
        }
    }

    fn remove(&mut self, k: &KeyRef) -> Option<Entry> {
        let e = self.keys.remove(k)?;
        self.total -= e.size;
        Some(e)
    }
}

type Hook = Arc<dyn Fn(Stage) + Send + Sync>;

/// The disk store plus the cache of expanded keys, in the form of the server's backend (the
/// CPU's Fourier-domain key in RAM, or the GPU's copy in device memory).
pub struct KeyStore {
    root: PathBuf,
    backend: BackendKind,
    cache: Mutex<Lru>,
    index: Mutex<Index>,
    /// Signalled whenever a pending entry settles (written or given up).
    settled: Condvar,
    max_store_bytes: Option<u64>,
    /// Each tenant's `max_keys`, for eviction (a tenant absent here has no share).
    shares: Mutex<HashMap<String, Option<u64>>>,
    /// One key expansion from disk at a time, so memory stays bounded (cache + one load).
    load_permits: Arc<Semaphore>,
    metrics: Arc<Metrics>,
    hook: Mutex<Option<Hook>>,
    /// The object store that holds the truth, when replicas share keys; the disk is then a
    /// cache. The handle runs its calls from blocking code.
    remote: Option<(Arc<RemoteStore>, Handle)>,
    /// How long a cached key is served without asking the object store whether it still holds it.
    revalidate: Duration,
    /// The parameter sets served (the ones whose keys are indexed).
    known: Vec<ParamSet>,
    /// Held while the store is open, so a second server cannot share the directory.
    _lock: std::fs::File,
}

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

impl KeyStore {
    /// Opens (creating if needed) the key store under `data_dir`, keeping up to `capacity`
    /// expanded keys in memory and at most `max_store_bytes` of keys on disk. Takes the data
    /// dir's lock; indexes the keys of the parameter sets in `known`; removes leftover
    /// temporary files of interrupted writes and damaged keys moved aside by older versions.
    pub fn open(
        data_dir: &Path,
        capacity: usize,
        backend: BackendKind,
        max_store_bytes: Option<u64>,
        known: &[ParamSet],
        metrics: Arc<Metrics>,
    ) -> Result<Self> {
        let keys_dir = data_dir.join("keys");
        std::fs::create_dir_all(&keys_dir)
            .map_err(|e| ServiceError::io(format!("creating {}", keys_dir.display()), e))?;
        let lock = lock_data_dir(data_dir)?;
        let mut found = Vec::new();
        scan_owner(&keys_dir, "", known, &mut found);
        if let Ok(tenants) = std::fs::read_dir(data_dir.join("tenants")) {
            for t in tenants.flatten() {
                if let Some(name) = t.file_name().to_str() {
                    scan_owner(&t.path().join("keys"), name, known, &mut found);
                }
            }
        }
        // Oldest first, so the least recently written key is the first evicted.
        found.sort_by_key(|(_, e)| e.last_used_at);
        let mut index = Index::default();
        for (k, e) in found {
            index.tick += 1;
            index.total += e.size;
            index.keys.insert(
                k,
                Entry {
                    last_used: index.tick,
                    ..e
                },
            );
        }
        metrics.key_store_bytes.set(index.total as i64);
        metrics.key_store_keys.set(index.keys.len() as i64);
        Ok(KeyStore {
            root: data_dir.to_path_buf(),
            backend,
            cache: Mutex::new(Lru::new(capacity.max(1))),
            index: Mutex::new(index),
            settled: Condvar::new(),
            max_store_bytes,
            shares: Mutex::new(HashMap::new()),
            load_permits: Arc::new(Semaphore::new(1)),
            metrics,
            hook: Mutex::new(None),
            remote: None,
            revalidate: DEFAULT_REVALIDATE,
            known: known.to_vec(),
            _lock: lock,
        })
    }

    /// Makes `remote` the source of truth and the disk its cache. `rt` runs the store's calls
    /// made from blocking code; a cached key is confirmed in the store when it was last
    /// confirmed `revalidate` ago or more (zero: on every lookup).
    pub fn with_remote(
        mut self,
        remote: Arc<RemoteStore>,
        rt: Handle,
        revalidate: Duration,
    ) -> Self {
        self.remote = Some((remote, rt));
        self.revalidate = revalidate;
        self
    }

    /// The object store, when there is one.
    pub fn remote(&self) -> Option<&Arc<RemoteStore>> {
        self.remote.as_ref().map(|(r, _)| r)
    }

    /// Runs a call to the object store from blocking code.
    fn block_on<T>(&self, f: impl std::future::Future<Output = T>) -> T {
        let (_, rt) = self.remote.as_ref().expect("called with an object store");
        rt.block_on(f)
    }

    /// Calls `hook` at each [`Stage`] of an upload; for tests that interleave calls.
    #[doc(hidden)]
    pub fn set_hook(&self, hook: impl Fn(Stage) + Send + Sync + 'static) {
        *self.hook.lock().expect("hook lock") = Some(Arc::new(hook));
    }

    fn pause(&self, stage: Stage) {
        let hook = self.hook.lock().expect("hook lock").clone();
        if let Some(h) = hook {
            h(stage);
        }
    }

    /// Each tenant's `max_keys` (`None`: no limit), for eviction. A tenant not listed (one
    /// removed from the tenants file) has no share: its keys are evicted first.
    pub fn set_shares(&self, shares: impl IntoIterator<Item = (String, Option<u64>)>) {
        *self.shares.lock().expect("shares lock") = shares.into_iter().collect();
    }

    fn path(&self, k: &KeyRef) -> PathBuf {
        owner_dir(&self.root, &k.owner)
            .join(k.params)
            .join(format!("{}.key", k.id))
    }

    fn kref(owner: &str, params: ParamSet, id: &str) -> KeyRef {
        KeyRef {
            owner: owner.to_string(),
            params: params.name(),
            id: id.to_string(),
        }
    }

    fn lock_index(&self) -> MutexGuard<'_, Index> {
        self.index.lock().expect("index lock")
    }

    /// Bytes of keys on disk (and reserved by uploads being written).
    pub fn total_bytes(&self) -> u64 {
        self.lock_index().total
    }

    /// Looks up `owner`'s key among `candidates` (the parameter sets the server serves). With
    /// an object store, a key this replica does not hold is looked up there, and one it holds
    /// is confirmed there at most every `revalidate` of [`KeyStore::with_remote`] (while the store does not answer, the
    /// cached copy is served).
    pub async fn find(
        &self,
        owner: &str,
        id: &str,
        candidates: &[ParamSet],
    ) -> Result<Option<StoredKey>> {
        check_key_id(id)?;
        let (found, stale) = {
            let index = self.lock_index();
            let found = Self::find_in(&index, owner, id, candidates);
            let stale = found.as_ref().is_some_and(|f| {
                index
                    .ready(&Self::kref(owner, f.params, id))
                    .is_some_and(|e| e.confirmed.is_none_or(|c| c.elapsed() >= self.revalidate))
            });
            (found, stale)
        };
        let Some(remote) = self.remote() else {
            return Ok(found);
        };
        match found {
            Some(f) if !stale => Ok(Some(f)),
            Some(f) => {
                let k = Self::kref(owner, f.params, id);
                match remote.head(owner, f.params, id).await {
                    Ok(Some(_)) => {
                        if let Some(e) = self.lock_index().keys.get_mut(&k) {
                            e.confirmed = Some(std::time::Instant::now());
                        }
                        Ok(Some(f))
                    }
                    Ok(None) => {
                        tracing::info!(key = %short(id), tenant = %owner, "key gone from the object store (deleted through another replica); dropped the cached copy");
                        self.forget(&k)?;
                        Ok(None)
                    }
                    Err(e) => {
                        tracing::warn!(key = %short(id), "serving the cached key without confirming it: {e}");
                        Ok(Some(f))
                    }
                }
            }
            None => {
                for &p in candidates {
                    if let Some(size) = remote.head(owner, p, id).await? {
                        return Ok(Some(StoredKey {
                            id: id.to_string(),
                            params: p,
                            size,
                            newly_stored: false,
                        }));
                    }
                }
                Ok(None)
            }
        }
    }

    /// Drops this replica's copies of a key (disk and memory), not the object store's.
    fn forget(&self, k: &KeyRef) -> Result<()> {
        {
            let mut index = self.lock_index();
            if index.ready(k).is_some() {
                self.remove_locked(&mut index, k)?;
                sync_dirs([self.path(k)]);
            }
        }
        self.uncache(k);
        Ok(())
    }

    fn find_in(index: &Index, owner: &str, id: &str, candidates: &[ParamSet]) -> Option<StoredKey> {
        candidates.iter().find_map(|&p| {
            index.ready(&Self::kref(owner, p, id)).map(|e| StoredKey {
                id: id.to_string(),
                params: e.params,
                size: e.size,
                newly_stored: false,
            })
        })
    }

    /// `owner`'s stored keys, most recently used first (with an object store: the keys in the
    /// store, last used as the markers and this replica's own uses say).
    pub async fn list(&self, owner: &str) -> Result<Vec<ListedKey>> {
        if let Some(remote) = self.remote() {
            let mut keys = remote.list(Some(owner), &self.known).await?;
            {
                let index = self.lock_index();
                for k in &mut keys {
                    if let Some(e) = index.ready(&Self::kref(owner, k.params, &k.id)) {
                        k.last_used = k.last_used.max(e.last_used_at);
                    }
                }
            }
            keys.sort_by_key(|k| std::cmp::Reverse(k.last_used));
            return Ok(keys
                .into_iter()
                .map(|k| ListedKey {
                    id: k.id,
                    params: k.params,
                    size: k.size,
                    last_used: k.last_used,
                })
                .collect());
        }
        let index = self.lock_index();
        let mut keys: Vec<(u64, ListedKey)> = index
            .keys
            .iter()
            .filter(|(k, e)| k.owner == owner && !e.pending)
            .map(|(k, e)| {
                (
                    e.last_used,
                    ListedKey {
                        id: k.id.clone(),
                        params: e.params,
                        size: e.size,
                        last_used: e.last_used_at,
                    },
                )
            })
            .collect();
        keys.sort_by_key(|(t, _)| std::cmp::Reverse(*t));
        Ok(keys.into_iter().map(|(_, k)| k).collect())
    }

    /// Waits, index locked, until none of `owner`'s keys `id` (for `candidates`) is pending.
    fn settle<'a>(
        &'a self,
        mut index: MutexGuard<'a, Index>,
        owner: &str,
        id: &str,
        candidates: &[ParamSet],
    ) -> Result<MutexGuard<'a, Index>> {
        let pending = |i: &Index| {
            candidates.iter().any(|&p| {
                i.keys
                    .get(&Self::kref(owner, p, id))
                    .is_some_and(|e| e.pending)
            })
        };
        if pending(&index) {
            self.pause(Stage::WaitingForPending);
            let (guard, waited) = self
                .settled
                .wait_timeout_while(index, PENDING_WAIT, |i| pending(i))
                .expect("index lock");
            if waited.timed_out() {
                return Err(ServiceError::Stalled(format!(
                    "another upload of key {} is still being written after {} s; retry later",
                    short(id),
                    PENDING_WAIT.as_secs()
                )));
            }
            index = guard;
        }
        Ok(index)
    }

    /// Validates and stores an uploaded key for `owner` (blocking: run it off the async
    /// runtime).
    ///
    /// `candidates` are the parameter sets the key may be for (the one the client declared, or
    /// every served one). A key the owner already stored is neither validated nor written
    /// again; one another upload is writing is waited for. A new key must fit the owner's
    /// quota and the store's bound (evicting as the module says); it is deserialized with the
    /// conformance check, expanded (which checks it once more), reserved, written atomically,
    /// then made visible. The expanded key is cached only if that evicts no other tenant's
    /// key from memory. With an object store, a key the store holds is not validated or
    /// written again, quotas count the store's keys, and the key is PUT to the store before
    /// it is cached on disk and made visible.
    pub fn store(
        &self,
        owner: &str,
        bytes: &[u8],
        candidates: &[ParamSet],
        quota: Quota,
    ) -> Result<StoredKey> {
        let size = bytes.len() as u64;
        if size > MAX_EVAL_KEY_BYTES {
            return Err(ServiceError::TooLarge(format!(
                "evaluation key of {size} bytes exceeds the limit of {MAX_EVAL_KEY_BYTES} bytes"
            )));
        }
        let id = key_id(bytes);
        {
            let mut index = self.settle(self.lock_index(), owner, &id, candidates)?;
            if let Some(found) = Self::find_in(&index, owner, &id, candidates) {
                index.touch(&Self::kref(owner, found.params, &id));
                return Ok(found);
            }
        }
        if let Some(remote) = self.remote() {
            // Another replica stored it, or this one did and its cached copy was evicted.
            for &p in candidates {
                if let Some(size) = self.block_on(remote.head(owner, p, &id))? {
                    return Ok(StoredKey {
                        id,
                        params: p,
                        size,
                        newly_stored: false,
                    });
                }
            }
        }
        // Fail fast before the expensive validation; checked again when reserving.
        let stored = self.check_room_fresh(owner, size, quota)?;
        let (params, key) = validate(bytes, candidates, self.backend)?;
        self.metrics.key_expansions.inc();
        let k = Self::kref(owner, params, &id);
        {
            let mut index = self.settle(self.lock_index(), owner, &id, &[params])?;
            if let Some(found) = Self::find_in(&index, owner, &id, &[params]) {
                // The same key arrived twice at once; the other upload stored it.
                index.touch(&k);
                return Ok(found);
            }
            self.check_room(&index, owner, size, quota, stored)?;
            self.make_room(&mut index, owner, size)?;
            index.tick += 1;
            let last_used = index.tick;
            index.total += size;
            index.keys.insert(
                k.clone(),
                Entry {
                    params,
                    size,
                    last_used,
                    last_used_at: SystemTime::now(),
                    pending: true,
                    persisted_at: SystemTime::now(),
                    confirmed: None,
                },
            );
            self.publish(&index);
        }
        self.pause(Stage::Reserved);
        // Ok(true): stored, with a copy on disk; Ok(false): in the object store only.
        let written = match self.remote() {
            None => write_atomically(&self.path(&k), bytes).map(|()| true),
            Some(remote) => self
                .block_on(remote.put(owner, params, &id, bytes))
                .map(|()| match write_atomically(&self.path(&k), bytes) {
                    Ok(()) => true,
                    Err(e) => {
                        // The store has the key; only this replica's disk copy is missing.
                        tracing::warn!(key = %short(&id), "caching an uploaded key on disk: {e}");
                        false
                    }
                }),
        };
        self.pause(Stage::Written);
        {
            let mut index = self.lock_index();
            match &written {
                Ok(true) => {
                    if let Some(e) = index.keys.get_mut(&k) {
                        e.pending = false;
                        e.confirmed = Some(std::time::Instant::now());
                    }
                    index.touch(&k);
                }
                Ok(false) | Err(_) => {
                    index.remove(&k);
                    self.publish(&index);
                }
            }
            self.settled.notify_all();
        }
        written?;
        let mut cache = self.cache.lock().expect("cache lock");
        cache.insert_if_room(k, Arc::new(key));
        self.metrics.key_cache_keys.set(cache.entries.len() as i64);
        Ok(StoredKey {
            id,
            params,
            size,
            newly_stored: true,
        })
    }

    /// [`Self::check_room`] before validation; with an object store, a refusal on a cached
    /// listing is checked again on a fresh one (a key deleted through another replica may
    /// have made room). The usage it checked.
    fn check_room_fresh(&self, owner: &str, size: u64, quota: Quota) -> Result<Option<(u64, u64)>> {
        let stored = self.stored_usage(owner)?;
        // (the index guard must be gone before the retry locks it again)
        let checked = self.check_room(&self.lock_index(), owner, size, quota, stored);
        match checked {
            Err(ServiceError::Exhausted(_)) if let Some(remote) = self.remote() => {
                remote.forget_usage(owner);
                let stored = self.stored_usage(owner)?;
                self.check_room(&self.lock_index(), owner, size, quota, stored)?;
                Ok(stored)
            }
            r => r.map(|()| stored),
        }
    }

    /// With an object store, the (keys, bytes) `owner` has there, for quotas.
    fn stored_usage(&self, owner: &str) -> Result<Option<(u64, u64)>> {
        match self.remote() {
            None => Ok(None),
            Some(remote) => self.block_on(remote.usage(owner, &self.known)).map(Some),
        }
    }

    /// RESOURCE_EXHAUSTED when `owner` may not store `size` more bytes now; INVALID_ARGUMENT
    /// (TooLarge) when it never could. `stored`: the owner's usage in the object store, if
    /// there is one (the disk then holds only copies, and uploads in progress are added).
    fn check_room(
        &self,
        index: &Index,
        owner: &str,
        size: u64,
        quota: Quota,
        stored: Option<(u64, u64)>,
    ) -> Result<()> {
        let (n, bytes) = match stored {
            None => index.owner_usage(owner),
            Some((n, b)) => {
                let (pn, pb) = index.owner_pending(owner);
                (n + pn, b + pb)
            }
        };
        if let Some(max) = quota.max_keys
            && n + 1 > max
        {
            return Err(ServiceError::Exhausted(format!(
                "key quota reached: {n} of {max} keys stored; delete one (DeleteKey) first"
            )));
        }
        // A key larger than the whole quota or store can never be stored: no retry helps.
        if let Some(max) = quota.max_bytes
            && size > max
        {
            return Err(ServiceError::TooLarge(format!(
                "this key has {size} bytes, more than the tenant's whole key quota of {max} bytes"
            )));
        }
        if let Some(max) = quota.max_bytes
            && bytes + size > max
        {
            return Err(ServiceError::Exhausted(format!(
                "key quota reached: {bytes} bytes stored, this key needs {size} more, the \
                 quota is {max} bytes; delete a key (DeleteKey) first"
            )));
        }
        if let Some(max) = self.max_store_bytes
            && size > max
        {
            return Err(ServiceError::TooLarge(format!(
                "the key store holds at most {max} bytes; this key has {size}"
            )));
        }
        Ok(())
    }

    /// Evicts keys from disk until `size` more bytes of `owner` fit, in the order
    /// [`eviction_order`] gives.
    fn make_room(&self, index: &mut Index, owner: &str, size: u64) -> Result<()> {
        let Some(max) = self.max_store_bytes else {
            return Ok(());
        };
        if index.total + size <= max {
            return Ok(());
        }
        let hot: Vec<KeyRef> = {
            let cache = self.cache.lock().expect("cache lock");
            cache.entries.iter().map(|(k, _)| k.clone()).collect()
        };
        let victims = if self.remote.is_some() {
            // Disk copies of keys the store holds: any may go, least recently used first.
            cache_eviction_order(index, &hot)
        } else {
            let shares = self.shares.lock().expect("shares lock").clone();
            eviction_order(index, owner, &shares, &hot)
        };
        let mut freed = 0;
        let mut chosen = Vec::new();
        for (k, s) in victims {
            if index.total - freed + size <= max {
                break;
            }
            freed += s;
            chosen.push(k);
        }
        if index.total - freed + size > max {
            return Err(ServiceError::Exhausted(format!(
                "the key store is full ({} of {max} bytes; the rest is in use or belongs to \
                 tenants within their key quota); retry later or delete one of your keys",
                index.total
            )));
        }
        for k in &chosen {
            self.remove_locked(index, k)?;
            self.metrics.key_evictions.inc();
            tracing::info!(key = %short(&k.id), tenant = %k.owner, "evicted key from disk (key store full)");
        }
        sync_dirs(chosen.iter().map(|k| self.path(k)));
        Ok(())
    }

    /// Removes a key's file and entry, index locked (so no upload of the same key can slip
    /// its file in between). The caller syncs the directory.
    fn remove_locked(&self, index: &mut Index, k: &KeyRef) -> Result<Option<u64>> {
        let path = self.path(k);
        if let Err(err) = std::fs::remove_file(&path)
            && err.kind() != std::io::ErrorKind::NotFound
        {
            return Err(ServiceError::io(
                format!("removing {}", path.display()),
                err,
            ));
        }
        let freed = index.remove(k).map(|e| e.size);
        self.publish(index);
        Ok(freed)
    }

    fn publish(&self, index: &Index) {
        self.metrics.key_store_bytes.set(index.total as i64);
        self.metrics.key_store_keys.set(index.keys.len() as i64);
    }

    fn uncache(&self, k: &KeyRef) {
        let mut cache = self.cache.lock().expect("cache lock");
        cache.remove(k);
        self.metrics.key_cache_keys.set(cache.entries.len() as i64);
    }

    /// Removes `owner`'s key `id` from disk and memory (and from the object store); its size,
    /// or `None` if the owner has no such key (one still being uploaded is not stored yet).
    pub fn delete(&self, owner: &str, id: &str, candidates: &[ParamSet]) -> Result<Option<u64>> {
        check_key_id(id)?;
        let mut freed = None;
        if let Some(remote) = self.remote() {
            for &p in candidates {
                if let Some(size) = self.block_on(remote.head(owner, p, id))? {
                    self.block_on(remote.delete(owner, p, id))?;
                    freed = Some(freed.unwrap_or(0) + size);
                }
            }
        }
        let remote_sizes = freed.is_some() || self.remote.is_some();
        let mut removed = Vec::new();
        {
            let mut index = self.lock_index();
            for &p in candidates {
                let k = Self::kref(owner, p, id);
                if index.ready(&k).is_none() {
                    continue;
                }
                if let Some(s) = self.remove_locked(&mut index, &k)?
                    && !remote_sizes
                {
                    freed = Some(freed.unwrap_or(0) + s);
                }
                removed.push(k);
            }
            sync_dirs(removed.iter().map(|k| self.path(k)));
        }
        for k in &removed {
            self.uncache(k);
        }
        Ok(freed)
    }

    /// Removes the keys not used since `now - ttl`, for each tenant `ttl_of` gives a TTL;
    /// the keys removed, as (tenant, id). The server calls it periodically with the clock's
    /// time; tests call it with a time of their choosing. With an object store, the store's
    /// keys are swept, by their last use on any replica (the markers).
    pub fn expire(
        &self,
        now: SystemTime,
        ttl_of: impl Fn(&str) -> Option<Duration>,
    ) -> Vec<(String, String)> {
        let mut removed = Vec::new();
        if let Some(remote) = self.remote() {
            let listed = match self.block_on(remote.list(None, &self.known)) {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!("key TTL sweep skipped: {e}");
                    return Vec::new();
                }
            };
            for key in listed {
                let Some(ttl) = ttl_of(&key.owner) else {
                    continue;
                };
                let k = Self::kref(&key.owner, key.params, &key.id);
                let local = self.lock_index().keys.get(&k).map(|e| e.last_used_at);
                let last = local.map_or(key.last_used, |l| l.max(key.last_used));
                if !now.duration_since(last).is_ok_and(|idle| idle > ttl) {
                    continue;
                }
                match self.block_on(remote.delete(&key.owner, key.params, &key.id)) {
                    Ok(()) => {
                        if let Err(e) = self.forget(&k) {
                            tracing::error!(key = %short(&k.id), "expiring key: {e}");
                        }
                        removed.push(k);
                    }
                    Err(e) => {
                        tracing::error!(key = %short(&k.id), tenant = %k.owner, "expiring key: {e}")
                    }
                }
            }
        } else {
            let mut index = self.lock_index();
            let stale: Vec<KeyRef> = index
                .keys
                .iter()
                .filter(|(k, e)| {
                    !e.pending
                        && ttl_of(&k.owner).is_some_and(|ttl| {
                            now.duration_since(e.last_used_at)
                                .is_ok_and(|idle| idle > ttl)
                        })
                })
                .map(|(k, _)| k.clone())
                .collect();
            for k in stale {
                match self.remove_locked(&mut index, &k) {
                    Ok(_) => removed.push(k),
                    Err(e) => {
                        tracing::error!(key = %short(&k.id), tenant = %k.owner, "expiring key: {e}")
                    }
                }
            }
            sync_dirs(removed.iter().map(|k| self.path(k)));
        }
        for k in &removed {
            self.uncache(k);
            self.metrics.key_expirations.inc();
            tracing::info!(key = %short(&k.id), tenant = %k.owner, "removed key unused for longer than its tenant's key TTL");
        }
        removed.into_iter().map(|k| (k.owner, k.id)).collect()
    }

    /// The expanded key `id` of `owner` for parameter set `params`: from the cache, or loaded
    /// from disk off the async runtime. The caller has checked that the key is stored.
    pub async fn get(
        self: &Arc<Self>,
        owner: &str,
        id: &str,
        params: ParamSet,
    ) -> Result<Arc<EvalKey>> {
        check_key_id(id)?;
        let k = Self::kref(owner, params, id);
        if let Some(key) = self.cached(&k) {
            self.metrics.key_cache_hits.inc();
            return Ok(key);
        }
        self.metrics.key_cache_misses.inc();
        let permit = Arc::clone(&self.load_permits)
            .acquire_owned()
            .await
            .map_err(|_| ServiceError::Internal("key load semaphore closed".into()))?;
        if let Some(key) = self.cached(&k) {
            return Ok(key);
        }
        if self.remote.is_none() && self.lock_index().ready(&k).is_none() {
            return Err(ServiceError::UnknownKey(id.to_string()));
        }
        let store = Arc::clone(self);
        // The blocking task owns the permit and caches what it loads, whether or not the
        // caller is still there.
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let key = Arc::new(store.load(&k, params)?);
            let mut cache = store.cache.lock().expect("cache lock");
            cache.insert(k, Arc::clone(&key));
            store.metrics.key_cache_keys.set(cache.entries.len() as i64);
            Ok(key)
        })
        .await
        .map_err(|e| ServiceError::Internal(format!("key loading task failed: {e}")))?
    }

    fn cached(&self, k: &KeyRef) -> Option<Arc<EvalKey>> {
        let key = self.cache.lock().expect("cache lock").get(k)?;
        self.touch(k);
        Some(key)
    }

    /// Records a use of `k`, in its file's modification time (and the object store's marker)
    /// too when that is stale.
    fn touch(&self, k: &KeyRef) {
        if self.lock_index().touch(k) {
            if let Some((remote, rt)) = &self.remote
                && let Some(&params) = self.known.iter().find(|p| p.name() == k.params)
            {
                let (remote, k) = (Arc::clone(remote), k.clone());
                rt.spawn(async move {
                    if let Err(e) = remote.mark_used(&k.owner, params, &k.id).await {
                        tracing::warn!(key = %short(&k.id), "{e}");
                    }
                });
            }
            let path = self.path(k);
            let r = std::fs::File::options()
                .write(true)
                .open(&path)
                .and_then(|f| f.set_modified(SystemTime::now()));
            if let Err(e) = r {
                tracing::debug!(path = %path.display(), "recording a key's last use: {e}");
            }
        }
    }

    /// Reads a stored key and checks it: the hash must match the id, and the bytes must pass
    /// the conformance check. From disk; with an object store, from the store when the disk
    /// has no (sound) copy. A damaged copy is removed and the key reported unknown.
    fn load(&self, k: &KeyRef, params: ParamSet) -> Result<EvalKey> {
        let path = self.path(k);
        if self.lock_index().ready(k).is_none() {
            return match self.remote {
                Some(_) => self.fetch(k, params),
                None => Err(ServiceError::UnknownKey(k.id.clone())),
            };
        }
        let bytes = match read_bounded(&path) {
            // Deleted or evicted since the request was checked (or removed by hand).
            Err(ServiceError::Io { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                let mut index = self.lock_index();
                // Files go with their entries under this lock: an entry still ready here
                // without its file lost it outside the server.
                if index.ready(k).is_some() && !path.exists() {
                    index.remove(k);
                    self.publish(&index);
                }
                drop(index);
                if self.remote.is_some() {
                    return self.fetch(k, params);
                }
                return Err(ServiceError::UnknownKey(k.id.clone()));
            }
            r => r?,
        };
        match self.check_stored(k, params, &bytes) {
            Ok(key) => {
                self.touch(k);
                tracing::info!(key = %short(&k.id), params = params.name(), "loaded key from disk");
                Ok(key)
            }
            Err(why) => {
                tracing::error!(key = %k.id, path = %path.display(), %why, "stored key is damaged; removed");
                {
                    let mut index = self.lock_index();
                    if index.ready(k).is_some() {
                        let _ = self.remove_locked(&mut index, k);
                        sync_dirs([path]);
                    }
                }
                self.metrics.key_damaged.inc();
                if self.remote.is_some() {
                    return self.fetch(k, params);
                }
                Err(ServiceError::UnknownKey(format!(
                    "{} (the stored copy was damaged and has been removed; upload the key again)",
                    k.id
                )))
            }
        }
    }

    /// Checks stored bytes (their hash is the id, they pass the conformance check) and
    /// expands them.
    fn check_stored(&self, k: &KeyRef, params: ParamSet, bytes: &[u8]) -> Result<EvalKey, String> {
        if key_id(bytes) != k.id {
            return Err("its content no longer matches its hash".to_string());
        }
        let key = eval_key_from_bytes(params, bytes)
            .and_then(|csk| EvalKey::from_compressed(self.backend, params, &csk))
            .map_err(|e| e.to_string())?;
        self.metrics.key_expansions.inc();
        Ok(key)
    }

    /// Reads a key from the object store, checks it, and caches the bytes on disk. A damaged
    /// object is deleted from the store and the key reported unknown.
    fn fetch(&self, k: &KeyRef, params: ParamSet) -> Result<EvalKey> {
        let remote = self.remote().expect("fetch needs an object store");
        let Some(bytes) = self.block_on(remote.get(&k.owner, params, &k.id))? else {
            return Err(ServiceError::UnknownKey(k.id.clone()));
        };
        self.metrics.key_fetches.inc();
        match self.check_stored(k, params, &bytes) {
            Ok(key) => {
                self.cache_on_disk(k, params, &bytes);
                self.touch(k);
                tracing::info!(key = %short(&k.id), params = params.name(), "fetched key from the object store");
                Ok(key)
            }
            Err(why) => {
                tracing::error!(key = %k.id, store = remote.url(), %why, "the object store's copy of a key is damaged; deleted");
                if let Err(e) = self.block_on(remote.delete(&k.owner, params, &k.id)) {
                    tracing::error!(key = %k.id, "deleting a damaged key: {e}");
                }
                self.metrics.key_damaged.inc();
                Err(ServiceError::UnknownKey(format!(
                    "{} (the stored copy was damaged and has been removed; upload the key again)",
                    k.id
                )))
            }
        }
    }

    /// Keeps a copy of a fetched key on disk when it fits (best effort: the store has it).
    fn cache_on_disk(&self, k: &KeyRef, params: ParamSet, bytes: &[u8]) {
        let size = bytes.len() as u64;
        {
            let mut index = self.lock_index();
            if index.keys.contains_key(k) {
                return;
            }
            if let Err(e) = self.make_room(&mut index, &k.owner, size) {
                tracing::debug!(key = %short(&k.id), "not caching a fetched key on disk: {e}");
                return;
            }
            index.tick += 1;
            let last_used = index.tick;
            index.total += size;
            index.keys.insert(
                k.clone(),
                Entry {
                    params,
                    size,
                    last_used,
                    last_used_at: SystemTime::now(),
                    pending: true,
                    persisted_at: SystemTime::now(),
                    confirmed: Some(std::time::Instant::now()),
                },
            );
            self.publish(&index);
        }
        let written = write_atomically(&self.path(k), bytes);
        let mut index = self.lock_index();
        match written {
            Ok(()) => {
                if let Some(e) = index.keys.get_mut(k) {
                    e.pending = false;
                }
            }
            Err(e) => {
                tracing::warn!(key = %short(&k.id), "caching a fetched key on disk: {e}");
                index.remove(k);
                self.publish(&index);
            }
        }
        self.settled.notify_all();
    }

    /// Number of expanded keys in memory.
    pub fn cached_keys(&self) -> usize {
        self.cache.lock().expect("cache lock").entries.len()
    }

    #[cfg(test)]
    fn clear_cache(&self) {
        self.cache.lock().expect("cache lock").entries.clear();
    }
}

/// With an object store, the disk copies that may be dropped for room: every key neither in
/// memory nor being uploaded, least recently used first.
fn cache_eviction_order(index: &Index, hot: &[KeyRef]) -> Vec<(KeyRef, u64)> {
    let mut v: Vec<(u64, KeyRef, u64)> = index
        .keys
        .iter()
        .filter(|(k, e)| !e.pending && !hot.contains(k))
        .map(|(k, e)| (e.last_used, k.clone(), e.size))
        .collect();
    v.sort_by_key(|(t, _, _)| *t);
    v.into_iter().map(|(_, k, s)| (k, s)).collect()
}

/// Disk eviction candidates for an upload by `owner`, first to go first: keys of tenants
/// over their `max_keys` share (or with no share: removed from the tenants file), then the
/// uploader's own, then those of tenants without a `max_keys`; least recently used first
/// within each. Keys of other tenants within their `max_keys`, keys in memory and pending
/// uploads are never candidates.
fn eviction_order(
    index: &Index,
    owner: &str,
    shares: &HashMap<String, Option<u64>>,
    hot: &[KeyRef],
) -> Vec<(KeyRef, u64)> {
    let mut counts: HashMap<&str, u64> = HashMap::new();
    for (k, _) in index.keys.iter() {
        *counts.entry(k.owner.as_str()).or_default() += 1;
    }
    let mut victims: Vec<(u8, u64, KeyRef, u64)> = index
        .keys
        .iter()
        .filter(|(k, e)| !e.pending && !hot.contains(k))
        .filter_map(|(k, e)| {
            let class = if k.owner == owner {
                1
            } else {
                match shares.get(&k.owner) {
                    // Removed from the tenants file: no share left.
                    None if !shares.is_empty() => 0,
                    None | Some(None) => 2,
                    Some(Some(max)) if counts[k.owner.as_str()] > *max => 0,
                    Some(Some(_)) => return None,
                }
            };
            Some((class, e.last_used, k.clone(), e.size))
        })
        .collect();
    victims.sort_by_key(|v| (v.0, v.1));
    victims.into_iter().map(|(_, _, k, s)| (k, s)).collect()
}

/// Takes `DATA_DIR/.lock`, or says which server holds it.
fn lock_data_dir(data_dir: &Path) -> Result<std::fs::File> {
    let path = data_dir.join(".lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| ServiceError::io(format!("opening the lock file {}", path.display()), e))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(ServiceError::Config(format!(
            "the data dir {} is in use by another veil-server (its lock file {} is held); stop \
             that server or give another --data-dir",
            data_dir.display(),
            path.display()
        ))),
        Err(std::fs::TryLockError::Error(e)) => {
            Err(ServiceError::io(format!("locking {}", path.display()), e))
        }
    }
}

/// Syncs the directories of removed files, so the removals survive a crash.
fn sync_dirs(paths: impl IntoIterator<Item = PathBuf>) {
    let mut dirs: Vec<PathBuf> = paths
        .into_iter()
        .filter_map(|p| p.parent().map(Path::to_path_buf))
        .collect();
    dirs.sort();
    dirs.dedup();
    for d in dirs {
        if let Err(e) = std::fs::File::open(&d).and_then(|f| f.sync_all()) {
            tracing::warn!(dir = %d.display(), "syncing the directory after a removal: {e}");
        }
    }
}

fn owner_dir(root: &Path, owner: &str) -> PathBuf {
    if owner.is_empty() {
        root.join("keys")
    } else {
        root.join("tenants").join(owner).join("keys")
    }
}

/// Collects `dir/<PARAMETER_SET>/<id>.key` for the known parameter sets; removes temporary
/// files of interrupted writes and damaged keys moved aside by older versions.
fn scan_owner(dir: &Path, owner: &str, known: &[ParamSet], out: &mut Vec<(KeyRef, Entry)>) {
    for &params in known {
        let Ok(files) = std::fs::read_dir(dir.join(params.name())) else {
            continue;
        };
        for f in files.flatten() {
            let name = f.file_name().to_string_lossy().into_owned();
            if name.starts_with(".tmp-") || name.ends_with(".damaged") {
                let _ = std::fs::remove_file(f.path());
                continue;
            }
            let Some(id) = name.strip_suffix(".key") else {
                continue;
            };
            let Ok(meta) = f.metadata() else { continue };
            if check_key_id(id).is_err() || !meta.is_file() {
                continue;
            }
            out.push((
                KeyRef {
                    owner: owner.to_string(),
                    params: params.name(),
                    id: id.to_string(),
                },
                Entry {
                    params,
                    size: meta.len(),
                    last_used: 0,
                    last_used_at: meta.modified().unwrap_or(std::time::UNIX_EPOCH),
                    pending: false,
                    persisted_at: meta.modified().unwrap_or(std::time::UNIX_EPOCH),
                    confirmed: None,
                },
            ));
        }
    }
}

/// Deserializes with the conformance check against each candidate parameter set, then
/// expands. A key that conforms to none is told apart: well-formed but for other parameters
/// (FAILED_PRECONDITION) or not an evaluation key at all (INVALID_ARGUMENT).
fn validate(
    bytes: &[u8],
    candidates: &[ParamSet],
    backend: BackendKind,
) -> Result<(ParamSet, EvalKey)> {
    let mut last = None;
    for &params in candidates {
        match eval_key_from_bytes(params, bytes) {
            Ok(csk) => return Ok((params, EvalKey::from_compressed(backend, params, &csk)?)),
            Err(e) => last = Some(e),
        }
    }
    let names: Vec<&str> = candidates.iter().map(|p| p.name()).collect();
    let wellformed = tfhe::safe_serialization::safe_deserialize::<tfhe::CompressedServerKey>(
        bytes,
        MAX_EVAL_KEY_BYTES,
    )
    .is_ok();
    if wellformed {
        return Err(ServiceError::WrongParameterSet(format!(
            "the evaluation key is well-formed but not for {}; generate a key for that \
             parameter set",
            names.join(" or ")
        )));
    }
    Err(match last {
        Some(e) => e.into(),
        None => ServiceError::Internal("no parameter set to validate the key against".into()),
    })
}

fn read_bounded(path: &Path) -> Result<Vec<u8>> {
    use std::io::Read;
    let f = std::fs::File::open(path)
        .map_err(|e| ServiceError::io(format!("opening {}", path.display()), e))?;
    let mut bytes = Vec::new();
    f.take(MAX_EVAL_KEY_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| ServiceError::io(format!("reading {}", path.display()), e))?;
    Ok(bytes)
}

/// Writes `bytes` to `path` via a synced temporary file in the same directory and a rename.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let dir = path.parent().expect("key paths have a parent");
    std::fs::create_dir_all(dir)
        .map_err(|e| ServiceError::io(format!("creating {}", dir.display()), e))?;
    let tmp = dir.join(format!(
        ".tmp-{}-{}",
        std::process::id(),
        TMP_COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        // Make the rename itself durable.
        std::fs::File::open(dir)?.sync_all()
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        ServiceError::io(format!("writing {}", path.display()), e)
    })
}

/// The first 12 characters of a key id, for logs.
pub fn short(id: &str) -> &str {
    &id[..id.len().min(12)]
}

/// A small least-recently-used cache; capacity is a handful of ~120 MB keys, so a vector
/// (most recent last) is all it needs.
struct Lru {
    capacity: usize,
    entries: Vec<(KeyRef, Arc<EvalKey>)>,
}

impl Lru {
    fn new(capacity: usize) -> Self {
        Lru {
            capacity,
            entries: Vec::new(),
        }
    }

    fn get(&mut self, k: &KeyRef) -> Option<Arc<EvalKey>> {
        let i = self.entries.iter().position(|(e, _)| e == k)?;
        let e = self.entries.remove(i);
        let key = Arc::clone(&e.1);
        self.entries.push(e);
        Some(key)
    }

    fn remove(&mut self, k: &KeyRef) {
        self.entries.retain(|(e, _)| e != k);
    }

    /// Inserts, evicting if full: the least recently used key of an owner holding more than
    /// its fair share of the cache (capacity over the owners in it), else the least recently
    /// used key.
    fn insert(&mut self, k: KeyRef, key: Arc<EvalKey>) {
        self.remove(&k);
        self.entries.push((k, key));
        while self.entries.len() > self.capacity {
            let i = self.victim();
            let (evicted, _) = self.entries.remove(i);
            tracing::debug!(key = %short(&evicted.id), tenant = %evicted.owner, "evicted key from the cache");
        }
    }

    fn victim(&self) -> usize {
        let mut counts: HashMap<&str, usize> = HashMap::new();
        for (e, _) in &self.entries {
            *counts.entry(e.owner.as_str()).or_default() += 1;
        }
        let share = self.capacity.div_ceil(counts.len().max(1));
        // The newest entry (last) is the one being inserted: never its own victim.
        let older = &self.entries[..self.entries.len() - 1];
        older
            .iter()
            .position(|(e, _)| counts[e.owner.as_str()] > share)
            .unwrap_or(0)
    }

    /// Inserts if there is room or the owner's own least recently used key can make room;
    /// never evicts another owner's key.
    fn insert_if_room(&mut self, k: KeyRef, key: Arc<EvalKey>) {
        self.remove(&k);
        if self.entries.len() >= self.capacity {
            match self.entries.iter().position(|(e, _)| e.owner == k.owner) {
                Some(i) => {
                    self.entries.remove(i);
                }
                None => return,
            }
        }
        self.entries.push((k, key));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_ids() {
        let id = key_id(b"abc");
        assert_eq!(
            id,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert!(check_key_id(&id).is_ok());
        assert!(check_key_id("../../etc/passwd").is_err());
        assert!(check_key_id(&id.to_uppercase()).is_err());
        assert!(check_key_id(&id[..63]).is_err());
    }

    #[test]
    fn garbage_is_rejected_and_nothing_is_written() {
        let dir = std::env::temp_dir().join(format!("veil-keystore-{}", std::process::id()));
        let p = ParamSet::Message2Carry2KsPbsTuniform2m128;
        let store = KeyStore::open(&dir, 2, BackendKind::Cpu, None, &[p], Metrics::new()).unwrap();
        let err = store
            .store("", b"not a key at all", &[p], Quota::default())
            .unwrap_err();
        assert!(matches!(err, ServiceError::Runtime(_)), "{err}");
        assert!(
            rt().block_on(store.find("", &key_id(b"not a key at all"), &[p]))
                .unwrap()
                .is_none()
        );
        assert_eq!(store.total_bytes(), 0);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn quotas_are_checked_before_validation() {
        let dir = std::env::temp_dir().join(format!("veil-keystore-q-{}", std::process::id()));
        let p = ParamSet::Message2Carry2KsPbsTuniform2m128;
        let store =
            KeyStore::open(&dir, 2, BackendKind::Cpu, Some(10), &[p], Metrics::new()).unwrap();
        let zero = Quota {
            max_keys: Some(0),
            max_bytes: None,
        };
        let err = store.store("t", b"x", &[p], zero).unwrap_err();
        assert!(err.to_string().contains("key quota"), "{err}");
        assert!(matches!(err, ServiceError::Exhausted(_)), "{err}");
        // Larger than the tenant's whole byte quota or the whole store: never storable.
        let small = Quota {
            max_keys: None,
            max_bytes: Some(4),
        };
        let err = store.store("t", b"12345", &[p], small).unwrap_err();
        assert!(matches!(err, ServiceError::TooLarge(_)), "{err}");
        let err = store
            .store("t", &[0u8; 11], &[p], Quota::default())
            .unwrap_err();
        assert!(err.to_string().contains("at most 10 bytes"), "{err}");
        assert!(matches!(err, ServiceError::TooLarge(_)), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    // Races and fairness, with real 128-bit keys. Uploads are paused at a `Stage` by a hook
    // that waits on a channel; every wait has a timeout.

    use std::sync::OnceLock;
    use std::sync::mpsc;

    const P: ParamSet = ParamSet::Message2Carry2KsPbsTuniform2m128;
    const WAIT: Duration = Duration::from_secs(300);

    /// Two distinct serialized evaluation keys, generated once per test binary.
    fn real_keys() -> &'static [Vec<u8>; 2] {
        static KEYS: OnceLock<[Vec<u8>; 2]> = OnceLock::new();
        KEYS.get_or_init(|| {
            [1u128, 2].map(|seed| {
                let ck = veil_runtime::ClientKey::generate_with_seed(P, seed);
                veil_runtime::keys::eval_key_to_bytes(&ck.compressed_server_key())
            })
        })
    }

    struct Dir(PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn dir(label: &str) -> Dir {
        let d = std::env::temp_dir().join(format!("veil-ks-{label}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        Dir(d)
    }

    fn open(d: &Dir, max: Option<u64>) -> Arc<KeyStore> {
        Arc::new(KeyStore::open(&d.0, 2, BackendKind::Cpu, max, &[P], Metrics::new()).unwrap())
    }

    /// `*.key` files under the store, as (tenant dir or "", id).
    fn files_on_disk(d: &Dir) -> Vec<String> {
        fn walk(p: &Path, out: &mut Vec<String>) {
            for f in std::fs::read_dir(p).into_iter().flatten().flatten() {
                let path = f.path();
                if path.is_dir() {
                    walk(&path, out);
                } else {
                    out.push(path.display().to_string());
                }
            }
        }
        let mut out = Vec::new();
        walk(&d.0.join("keys"), &mut out);
        walk(&d.0.join("tenants"), &mut out);
        out.sort();
        out
    }

    #[derive(Debug, PartialEq)]
    enum Event {
        At(Stage),
        Returned(bool),
    }

    /// Reports every stage on `events`; blocks the first upload reaching `pause_at` until
    /// `go` receives.
    fn pause_at(
        store: &KeyStore,
        pause_at: Stage,
        events: mpsc::Sender<Event>,
    ) -> mpsc::Sender<()> {
        let (go_tx, go_rx) = mpsc::channel::<()>();
        let go_rx = Mutex::new(Some(go_rx));
        let events = Mutex::new(events);
        store.set_hook(move |stage| {
            let _ = events.lock().unwrap().send(Event::At(stage));
            if stage == pause_at
                && let Some(rx) = go_rx.lock().unwrap().take()
            {
                rx.recv_timeout(WAIT).expect("the test releases the upload");
            }
        });
        go_tx
    }

    fn upload(
        store: &Arc<KeyStore>,
        owner: &str,
        bytes: &[u8],
    ) -> std::thread::JoinHandle<Result<StoredKey>> {
        let (store, owner, bytes) = (Arc::clone(store), owner.to_string(), bytes.to_vec());
        std::thread::spawn(move || store.store(&owner, &bytes, &[P], Quota::default()))
    }

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn a_second_upload_of_a_key_being_written_waits_for_it() {
        let key = &real_keys()[0];
        let d = dir("dup");
        let store = open(&d, None);
        let (tx, rx) = mpsc::channel();
        let go = pause_at(&store, Stage::Written, tx.clone());
        let first = upload(&store, "t", key);
        assert_eq!(rx.recv_timeout(WAIT).unwrap(), Event::At(Stage::Reserved));
        assert_eq!(rx.recv_timeout(WAIT).unwrap(), Event::At(Stage::Written));
        let second = {
            let (store, key, tx) = (Arc::clone(&store), key.clone(), tx.clone());
            std::thread::spawn(move || {
                let r = store.store("t", &key, &[P], Quota::default());
                let _ = tx.send(Event::Returned(r.is_ok()));
                r
            })
        };
        // The second upload must wait for the first, not report the key stored before its
        // file is visible.
        assert_eq!(
            rx.recv_timeout(WAIT).unwrap(),
            Event::At(Stage::WaitingForPending)
        );
        go.send(()).unwrap();
        let a = first.join().unwrap().unwrap();
        let b = second.join().unwrap().unwrap();
        assert!(a.newly_stored && !b.newly_stored, "{a:?} {b:?}");
        assert_eq!(files_on_disk(&d).len(), 1);
        store.clear_cache();
        rt().block_on(store.get("t", &a.id, P))
            .expect("the key loads from disk");
    }

    #[test]
    fn an_infer_racing_an_upload_never_unindexes_it() {
        let key = &real_keys()[0];
        let d = dir("infer");
        let store = open(&d, None);
        let (tx, rx) = mpsc::channel();
        let go = pause_at(&store, Stage::Reserved, tx);
        let id = key_id(key);
        let first = upload(&store, "t", key);
        assert_eq!(rx.recv_timeout(WAIT).unwrap(), Event::At(Stage::Reserved));
        // Reserved, not written: not stored yet for everyone else.
        assert!(rt().block_on(store.find("t", &id, &[P])).unwrap().is_none());
        let early = rt().block_on(store.get("t", &id, P)).err();
        assert!(
            matches!(early, Some(ServiceError::UnknownKey(_))),
            "{early:?}"
        );
        assert!(rt().block_on(store.list("t")).unwrap().is_empty());
        go.send(()).unwrap();
        assert!(first.join().unwrap().unwrap().newly_stored);
        assert!(rt().block_on(store.find("t", &id, &[P])).unwrap().is_some());
        store.clear_cache();
        rt().block_on(store.get("t", &id, P))
            .expect("the key loads from disk");
    }

    #[test]
    fn a_delete_racing_an_upload_leaves_no_orphan_file() {
        let key = &real_keys()[0];
        let d = dir("delete");
        let store = open(&d, None);
        let (tx, rx) = mpsc::channel();
        let go = pause_at(&store, Stage::Written, tx);
        let id = key_id(key);
        let first = upload(&store, "t", key);
        assert_eq!(rx.recv_timeout(WAIT).unwrap(), Event::At(Stage::Reserved));
        assert_eq!(rx.recv_timeout(WAIT).unwrap(), Event::At(Stage::Written));
        // The file is there but the key is not stored yet: nothing to delete.
        assert_eq!(store.delete("t", &id, &[P]).unwrap(), None);
        go.send(()).unwrap();
        let stored = first.join().unwrap().unwrap();
        // Every file on disk is indexed, and the index matches the disk.
        assert_eq!(files_on_disk(&d).len(), 1);
        assert!(rt().block_on(store.find("t", &id, &[P])).unwrap().is_some());
        assert_eq!(store.total_bytes(), stored.size);
        assert_eq!(store.delete("t", &id, &[P]).unwrap(), Some(stored.size));
        assert!(files_on_disk(&d).is_empty(), "{:?}", files_on_disk(&d));
        assert_eq!(store.total_bytes(), 0);
    }

    #[test]
    fn a_second_store_on_the_same_dir_is_refused() {
        let d = dir("lock");
        let first = open(&d, None);
        let err = KeyStore::open(&d.0, 2, BackendKind::Cpu, None, &[P], Metrics::new())
            .err()
            .expect("the second open is refused");
        assert!(matches!(err, ServiceError::Config(_)), "{err}");
        assert!(
            err.to_string().contains("in use by another veil-server"),
            "{err}"
        );
        drop(first);
        open(&d, None);
    }

    #[test]
    fn damaged_keys_are_removed_not_kept() {
        let key = &real_keys()[0];
        let d = dir("damaged");
        let store = open(&d, None);
        let stored = store.store("t", key, &[P], Quota::default()).unwrap();
        let files = files_on_disk(&d);
        assert_eq!(files.len(), 1);
        std::fs::write(&files[0], b"garbage").unwrap();
        store.clear_cache();
        let err = rt().block_on(store.get("t", &stored.id, P)).err().unwrap();
        assert!(err.to_string().contains("damaged"), "{err}");
        assert!(files_on_disk(&d).is_empty(), "{:?}", files_on_disk(&d));
        assert_eq!(store.total_bytes(), 0);
        // Files an older version moved aside are removed at start.
        drop(store);
        let aside = Path::new(&files[0]).with_extension("damaged");
        std::fs::write(&aside, b"old").unwrap();
        open(&d, None);
        assert!(files_on_disk(&d).is_empty(), "{:?}", files_on_disk(&d));
    }

    #[test]
    fn eviction_takes_from_the_uploader_and_tenants_over_their_share_first() {
        let [k1, k2] = real_keys();
        assert_eq!(k1.len(), k2.len());
        let size = k1.len() as u64;
        let d = dir("evict");
        let store = open(&d, Some(2 * size));
        store.set_shares([("a".to_string(), Some(1)), ("b".to_string(), Some(2))]);
        let ids = |owner: &str| -> Vec<String> {
            let mut v: Vec<String> = rt()
                .block_on(store.list(owner))
                .unwrap()
                .into_iter()
                .map(|k| k.id)
                .collect();
            v.sort();
            v
        };
        // a's key is the least recently used, but a is within its max_keys.
        store.store("a", k1, &[P], Quota::default()).unwrap();
        store.clear_cache();
        store.store("b", k1, &[P], Quota::default()).unwrap();
        store.clear_cache();
        store.store("b", k2, &[P], Quota::default()).unwrap();
        store.clear_cache();
        assert_eq!(ids("a"), vec![key_id(k1)]);
        assert_eq!(ids("b"), vec![key_id(k2)]);
        // A share lowered below what a holds (as a reload may do): a's key goes first, even
        // though b's own is older.
        store.set_shares([("a".to_string(), Some(0)), ("b".to_string(), Some(2))]);
        store.store("b", k1, &[P], Quota::default()).unwrap();
        store.clear_cache();
        assert!(ids("a").is_empty());
        let mut both = vec![key_id(k1), key_id(k2)];
        both.sort();
        assert_eq!(ids("b"), both);
        // Nobody evictable: the store is full for c, and b keeps its keys.
        store.set_shares([("b".to_string(), Some(2)), ("c".to_string(), Some(1))]);
        let err = store.store("c", k1, &[P], Quota::default()).unwrap_err();
        assert!(err.to_string().contains("key store is full"), "{err}");
        assert_eq!(ids("b"), both);
        assert_eq!(files_on_disk(&d).len(), 2);
    }

    /// Two replicas' stores (own data dirs) over one in-memory object store, confirming
    /// cached keys on every lookup; the runtime runs the object store's calls.
    fn replicas(
        label: &str,
    ) -> (
        Dir,
        Dir,
        Arc<KeyStore>,
        Arc<KeyStore>,
        tokio::runtime::Runtime,
    ) {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let shared: Arc<dyn object_store::ObjectStore> =
            Arc::new(object_store::memory::InMemory::new());
        let (da, db) = (dir(&format!("{label}-a")), dir(&format!("{label}-b")));
        let replica = |d: &Dir| {
            let remote = Arc::new(RemoteStore::with_store(
                Arc::clone(&shared),
                "memory://",
                "veil",
            ));
            let store = KeyStore::open(&d.0, 2, BackendKind::Cpu, None, &[P], Metrics::new())
                .unwrap()
                .with_remote(remote, rt.handle().clone(), Duration::ZERO);
            Arc::new(store)
        };
        let (a, b) = (replica(&da), replica(&db));
        (da, db, a, b, rt)
    }

    #[test]
    fn replicas_share_keys_through_the_object_store() {
        let [k1, k2] = real_keys();
        let (_da, db, a, b, rt) = replicas("shared");
        let one_key = Quota {
            max_keys: Some(1),
            max_bytes: None,
        };
        let stored = a.store("t", k1, &[P], one_key).unwrap();
        assert!(stored.newly_stored);
        // B has no copy: found in the store, fetched and expanded once, cached on disk.
        assert!(files_on_disk(&db).is_empty());
        let found = rt.block_on(b.find("t", &stored.id, &[P])).unwrap();
        assert_eq!(found.map(|k| k.size), Some(k1.len() as u64));
        rt.block_on(b.get("t", &stored.id, P)).unwrap();
        assert_eq!(b.metrics.key_fetches.get(), 1);
        assert_eq!(b.metrics.key_expansions.get(), 1);
        assert_eq!(files_on_disk(&db).len(), 1);
        // Another tenant sees nothing.
        assert!(
            rt.block_on(b.find("u", &stored.id, &[P]))
                .unwrap()
                .is_none()
        );
        // The same key uploaded to B: nothing validated or written again.
        let again = b.store("t", k1, &[P], one_key).unwrap();
        assert!(!again.newly_stored);
        assert_eq!(b.metrics.key_expansions.get(), 1);
        // The quota counts the store's keys, whichever replica stored them.
        let err = b.store("t", k2, &[P], one_key).unwrap_err();
        assert!(matches!(err, ServiceError::Exhausted(_)), "{err}");
        let listed = rt.block_on(b.list("t")).unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].id, stored.id);
        // Deleted through A: B (revalidating on every lookup) drops its copy.
        assert_eq!(
            a.delete("t", &stored.id, &[P]).unwrap(),
            Some(k1.len() as u64)
        );
        assert!(
            rt.block_on(b.find("t", &stored.id, &[P]))
                .unwrap()
                .is_none()
        );
        assert!(files_on_disk(&db).is_empty());
        assert!(a.delete("t", &stored.id, &[P]).unwrap().is_none());
        // The quota has room again.
        assert!(b.store("t", k2, &[P], one_key).unwrap().newly_stored);
    }

    #[test]
    fn the_ttl_sweeps_the_object_store() {
        let key = &real_keys()[0];
        let (_da, _db, a, b, rt) = replicas("ttl-remote");
        let id = a.store("t", key, &[P], Quota::default()).unwrap().id;
        let used = rt.block_on(b.list("t")).unwrap()[0].last_used;
        let ttl = Duration::from_secs(3600);
        let ttl_of = |owner: &str| (owner == "t").then_some(ttl);
        assert!(b.expire(used + ttl / 2, ttl_of).is_empty());
        // B never used the key; it expires it from the store, and A's copy goes with it.
        assert_eq!(
            b.expire(used + 2 * ttl, ttl_of),
            vec![("t".to_string(), id.clone())]
        );
        assert!(rt.block_on(a.find("t", &id, &[P])).unwrap().is_none());
        assert!(rt.block_on(a.list("t")).unwrap().is_empty());
    }

    #[test]
    fn keys_unused_past_their_tenants_ttl_expire() {
        let key = &real_keys()[0];
        let d = dir("ttl");
        let store = open(&d, None);
        let id = store.store("t", key, &[P], Quota::default()).unwrap().id;
        store.store("u", key, &[P], Quota::default()).unwrap();
        let used = rt().block_on(store.list("t")).unwrap()[0].last_used;
        let ttl = Duration::from_secs(3600);
        let ttl_of = |owner: &str| (owner == "t").then_some(ttl);
        assert!(store.expire(used + ttl / 2, ttl_of).is_empty());
        assert_eq!(
            store.expire(used + 2 * ttl, ttl_of),
            vec![("t".to_string(), id.clone())]
        );
        assert!(rt().block_on(store.find("t", &id, &[P])).unwrap().is_none());
        assert!(rt().block_on(store.find("u", &id, &[P])).unwrap().is_some());
        assert_eq!(files_on_disk(&d).len(), 1);
    }

    #[test]
    fn the_cache_evicts_from_the_owner_over_its_share_first() {
        let csk = eval_key_from_bytes(P, &real_keys()[0]).unwrap();
        let key = Arc::new(EvalKey::from_compressed(BackendKind::Cpu, P, &csk).unwrap());
        let k = |owner: &str, n: u8| KeyStore::kref(owner, P, &format!("{n:064x}"));
        let mut lru = Lru::new(3);
        for r in [k("b", 1), k("a", 2), k("a", 3)] {
            lru.insert(r, Arc::clone(&key));
        }
        // b's key is the least recently used, but a holds two of three slots.
        lru.insert(k("c", 4), Arc::clone(&key));
        let held: Vec<KeyRef> = lru.entries.iter().map(|(r, _)| r.clone()).collect();
        assert_eq!(held, vec![k("b", 1), k("a", 3), k("c", 4)]);
        // Nobody over its share: plain least recently used.
        lru.insert(k("d", 5), Arc::clone(&key));
        let held: Vec<KeyRef> = lru.entries.iter().map(|(r, _)| r.clone()).collect();
        assert_eq!(held, vec![k("a", 3), k("c", 4), k("d", 5)]);
    }

    #[test]
    fn last_use_survives_a_restart() {
        let key = &real_keys()[0];
        let d = dir("mtime");
        let store = open(&d, None);
        let id = store.store("t", key, &[P], Quota::default()).unwrap().id;
        drop(store);
        // Written two hours ago, as far as a restarted server can tell.
        let file = &files_on_disk(&d)[0];
        let two_hours_ago = SystemTime::now() - Duration::from_secs(7200);
        std::fs::File::options()
            .write(true)
            .open(file)
            .and_then(|f| f.set_modified(two_hours_ago))
            .unwrap();
        let ttl_of = |_: &str| Some(Duration::from_secs(3600));
        let store = open(&d, None);
        assert_eq!(
            rt().block_on(store.list("t")).unwrap()[0].last_used,
            two_hours_ago
        );
        rt().block_on(store.get("t", &id, P))
            .expect("the key loads");
        drop(store);
        // Used just now: a restart sees that use, and the TTL keeps the key.
        let store = open(&d, None);
        assert!(store.expire(SystemTime::now(), ttl_of).is_empty());
        assert!(rt().block_on(store.find("t", &id, &[P])).unwrap().is_some());
    }
}
