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
//! Bounds: the cache holds a fixed number of expanded keys; the disk holds at most
//! `max_store_bytes` of keys, least recently used first out (keys expanded in memory are
//! never evicted from disk). Loads from disk run one at a time; the load permit belongs to the
//! blocking task, so a caller that gives up does not let a second load start beside it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;
use veil_format::compiled::ParamSet;
use veil_runtime::keys::{MAX_EVAL_KEY_BYTES, eval_key_from_bytes};
use veil_runtime::{BackendKind, EvalKey};

use crate::error::{Result, ServiceError};
use crate::metrics::Metrics;

/// Lowercase hex SHA-256 of the key bytes: the key id.
pub fn key_id(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

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

/// A tenant's limits on stored keys.
#[derive(Clone, Copy, Debug, Default)]
pub struct Quota {
    pub max_keys: Option<u64>,
    pub max_bytes: Option<u64>,
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
}

/// Every stored key, with its size and last use.
#[derive(Default)]
struct Index {
    keys: HashMap<KeyRef, Entry>,
    tick: u64,
    total: u64,
}

impl Index {
    fn owner_usage(&self, owner: &str) -> (u64, u64) {
        self.keys
            .iter()
            .filter(|(k, _)| k.owner == owner)
            .fold((0, 0), |(n, b), (_, e)| (n + 1, b + e.size))
    }

    fn touch(&mut self, k: &KeyRef) {
        self.tick += 1;
        let tick = self.tick;
        if let Some(e) = self.keys.get_mut(k) {
            e.last_used = tick;
        }
    }
}

/// The disk store plus the cache of expanded keys, in the form of the server's backend (the
/// CPU's Fourier-domain key in RAM, or the GPU's copy in device memory).
pub struct KeyStore {
    root: PathBuf,
    backend: BackendKind,
    cache: Mutex<Lru>,
    index: Mutex<Index>,
    max_store_bytes: Option<u64>,
    /// One key expansion from disk at a time, so memory stays bounded (cache + one load).
    load_permits: Arc<Semaphore>,
    metrics: Arc<Metrics>,
}

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

impl KeyStore {
    /// Opens (creating if needed) the key store under `data_dir`, keeping up to `capacity`
    /// expanded keys in memory and at most `max_store_bytes` of keys on disk. Indexes the keys
    /// of the parameter sets in `known`; removes leftover temporary files of interrupted
    /// writes.
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
        found.sort_by_key(|(_, _, mtime)| *mtime);
        let mut index = Index::default();
        for (k, e, _) in found {
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
            max_store_bytes,
            load_permits: Arc::new(Semaphore::new(1)),
            metrics,
        })
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

    /// Bytes of keys on disk.
    pub fn total_bytes(&self) -> u64 {
        self.index.lock().expect("index lock").total
    }

    /// Looks up `owner`'s key among `candidates` (the parameter sets the server serves).
    pub fn find(
        &self,
        owner: &str,
        id: &str,
        candidates: &[ParamSet],
    ) -> Result<Option<StoredKey>> {
        check_key_id(id)?;
        let index = self.index.lock().expect("index lock");
        Ok(candidates.iter().find_map(|&p| {
            index
                .keys
                .get(&Self::kref(owner, p, id))
                .map(|e| StoredKey {
                    id: id.to_string(),
                    params: e.params,
                    size: e.size,
                    newly_stored: false,
                })
        }))
    }

    /// Validates and stores an uploaded key for `owner` (blocking: run it off the async
    /// runtime).
    ///
    /// `candidates` are the parameter sets the key may be for (the one the client declared, or
    /// every served one). A key the owner already stored is neither validated nor written
    /// again. A new key must fit the owner's quota and the store's bound (evicting least
    /// recently used keys that are not in memory); it is deserialized with the conformance
    /// check, expanded (which checks it once more), then written atomically. The expanded key
    /// is cached only if that evicts no other tenant's key from memory.
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
        if let Some(found) = self.find(owner, &id, candidates)? {
            return Ok(found);
        }
        // Fail fast before the expensive validation; checked again when committing.
        self.check_room(&self.index.lock().expect("index lock"), owner, size, quota)?;
        let (params, key) = validate(bytes, candidates, self.backend)?;
        let k = Self::kref(owner, params, &id);
        {
            let mut index = self.index.lock().expect("index lock");
            if let Some(e) = index.keys.get(&k) {
                // The same key arrived twice at once; the other upload stored it.
                return Ok(StoredKey {
                    id,
                    params,
                    size: e.size,
                    newly_stored: false,
                });
            }
            self.check_room(&index, owner, size, quota)?;
            self.make_room(&mut index, size)?;
            index.tick += 1;
            let last_used = index.tick;
            index.total += size;
            index.keys.insert(
                k.clone(),
                Entry {
                    params,
                    size,
                    last_used,
                },
            );
            self.publish(&index);
        }
        if let Err(e) = write_atomically(&self.path(&k), bytes) {
            self.forget(&k);
            return Err(e);
        }
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

    /// RESOURCE_EXHAUSTED when `owner` may not store `size` more bytes.
    fn check_room(&self, index: &Index, owner: &str, size: u64, quota: Quota) -> Result<()> {
        let (n, bytes) = index.owner_usage(owner);
        if let Some(max) = quota.max_keys
            && n + 1 > max
        {
            return Err(ServiceError::Exhausted(format!(
                "key quota reached: {n} of {max} keys stored; delete one (DeleteKey) first"
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
            return Err(ServiceError::Exhausted(format!(
                "the key store holds at most {max} bytes; this key has {size}"
            )));
        }
        Ok(())
    }

    /// Evicts least recently used keys from disk until `size` more bytes fit. Keys expanded in
    /// memory are in use and stay.
    fn make_room(&self, index: &mut Index, size: u64) -> Result<()> {
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
        let mut victims: Vec<(u64, KeyRef, u64)> = index
            .keys
            .iter()
            .filter(|(k, _)| !hot.contains(k))
            .map(|(k, e)| (e.last_used, k.clone(), e.size))
            .collect();
        victims.sort_by_key(|v| v.0);
        let mut freed = 0;
        let mut chosen = Vec::new();
        for (_, k, s) in victims {
            if index.total - freed + size <= max {
                break;
            }
            freed += s;
            chosen.push(k);
        }
        if index.total - freed + size > max {
            return Err(ServiceError::Exhausted(format!(
                "the key store is full ({} of {max} bytes, the rest in use); retry later",
                index.total
            )));
        }
        for k in chosen {
            let _ = std::fs::remove_file(self.path(&k));
            if let Some(e) = index.keys.remove(&k) {
                index.total -= e.size;
            }
            self.metrics.key_evictions.inc();
            tracing::info!(key = %short(&k.id), tenant = %k.owner, "evicted key from disk (key store full)");
        }
        Ok(())
    }

    fn publish(&self, index: &Index) {
        self.metrics.key_store_bytes.set(index.total as i64);
        self.metrics.key_store_keys.set(index.keys.len() as i64);
    }

    fn forget(&self, k: &KeyRef) {
        let mut index = self.index.lock().expect("index lock");
        if let Some(e) = index.keys.remove(k) {
            index.total -= e.size;
        }
        self.publish(&index);
    }

    /// Removes `owner`'s key `id` from disk and memory; its size, or `None` if the owner has
    /// no such key.
    pub fn delete(&self, owner: &str, id: &str, candidates: &[ParamSet]) -> Result<Option<u64>> {
        check_key_id(id)?;
        let mut freed = None;
        for &p in candidates {
            let k = Self::kref(owner, p, id);
            let removed = {
                let mut index = self.index.lock().expect("index lock");
                let e = index.keys.remove(&k);
                if let Some(e) = &e {
                    index.total -= e.size;
                }
                self.publish(&index);
                e
            };
            if let Some(e) = removed {
                let path = self.path(&k);
                if let Err(err) = std::fs::remove_file(&path)
                    && err.kind() != std::io::ErrorKind::NotFound
                {
                    return Err(ServiceError::io(
                        format!("removing {}", path.display()),
                        err,
                    ));
                }
                freed = Some(freed.unwrap_or(0) + e.size);
            }
            let mut cache = self.cache.lock().expect("cache lock");
            cache.remove(&k);
            self.metrics.key_cache_keys.set(cache.entries.len() as i64);
        }
        Ok(freed)
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
        if !self.index.lock().expect("index lock").keys.contains_key(&k) {
            return Err(ServiceError::UnknownKey(id.to_string()));
        }
        let store = Arc::clone(self);
        // The blocking task owns the permit and caches what it loads, whether or not the
        // caller is still there.
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let key = Arc::new(store.load(&k)?);
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
        self.index.lock().expect("index lock").touch(k);
        Some(key)
    }

    /// Reads a stored key and checks it: the hash must match the id, and the bytes must pass
    /// the conformance check. A damaged file is moved aside and the key reported unknown.
    fn load(&self, k: &KeyRef) -> Result<EvalKey> {
        let path = self.path(k);
        let params = self
            .index
            .lock()
            .expect("index lock")
            .keys
            .get(k)
            .map(|e| e.params)
            .ok_or_else(|| ServiceError::UnknownKey(k.id.clone()))?;
        let bytes = match read_bounded(&path) {
            // Deleted or evicted since the request was checked.
            Err(ServiceError::Io { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                self.forget(k);
                return Err(ServiceError::UnknownKey(k.id.clone()));
            }
            r => r?,
        };
        let checked = if key_id(&bytes) != k.id {
            Err("its content no longer matches its hash".to_string())
        } else {
            eval_key_from_bytes(params, &bytes)
                .and_then(|csk| EvalKey::from_compressed(self.backend, params, &csk))
                .map_err(|e| e.to_string())
        };
        match checked {
            Ok(key) => {
                self.index.lock().expect("index lock").touch(k);
                tracing::info!(key = %short(&k.id), params = params.name(), "loaded key from disk");
                Ok(key)
            }
            Err(why) => {
                let aside = path.with_extension("damaged");
                tracing::error!(key = %k.id, path = %path.display(), %why, "stored key is damaged; moved aside");
                let _ = std::fs::rename(&path, &aside);
                self.forget(k);
                Err(ServiceError::UnknownKey(format!(
                    "{} (the stored copy was damaged and has been removed; upload the key again)",
                    k.id
                )))
            }
        }
    }

    /// Number of expanded keys in memory.
    pub fn cached_keys(&self) -> usize {
        self.cache.lock().expect("cache lock").entries.len()
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
/// files of interrupted writes.
fn scan_owner(
    dir: &Path,
    owner: &str,
    known: &[ParamSet],
    out: &mut Vec<(KeyRef, Entry, std::time::SystemTime)>,
) {
    for &params in known {
        let Ok(files) = std::fs::read_dir(dir.join(params.name())) else {
            continue;
        };
        for f in files.flatten() {
            let name = f.file_name().to_string_lossy().into_owned();
            if name.starts_with(".tmp-") {
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
                },
                meta.modified().unwrap_or(std::time::UNIX_EPOCH),
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

    /// Inserts, evicting the least recently used key if full.
    fn insert(&mut self, k: KeyRef, key: Arc<EvalKey>) {
        self.remove(&k);
        self.entries.push((k, key));
        while self.entries.len() > self.capacity {
            let (evicted, _) = self.entries.remove(0);
            tracing::debug!(key = %short(&evicted.id), "evicted key from the cache");
        }
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
            store
                .find("", &key_id(b"not a key at all"), &[p])
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
        let err = store
            .store("t", &[0u8; 11], &[p], Quota::default())
            .unwrap_err();
        assert!(err.to_string().contains("at most 10 bytes"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
