//! Evaluation keys: stored on disk under the data dir, expanded keys in a bounded LRU cache.
//!
//! Layout: `DATA_DIR/keys/<PARAMETER_SET>/<key id>.key`, where the key id is the lowercase
//! hex SHA-256 of the exact serialized (compressed) key bytes. A key is written to a temporary
//! file in the same directory, synced, then renamed into place, so a crash never leaves a
//! half-written key under its id. A loaded key is checked again: its hash must match its id,
//! and it goes through tfhe's safe deserialization with the conformance check.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use sha2::{Digest, Sha256};
use veil_models::compiled::ParamSet;
use veil_models::fhe::keys::{MAX_EVAL_KEY_BYTES, eval_key_from_bytes};
use veil_models::fhe::{BackendKind, EvalKey};

use crate::error::{Result, ServiceError};

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

/// The disk store plus the cache of expanded keys, in the form of the server's backend (the
/// CPU's Fourier-domain key in RAM, or the GPU's copy in device memory).
pub struct KeyStore {
    dir: PathBuf,
    backend: BackendKind,
    cache: Mutex<Lru>,
    /// Serializes loads from disk, so that a burst of requests for an uncached key expands it
    /// once and memory stays bounded (cache + one key being loaded).
    loading: tokio::sync::Mutex<()>,
}

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

impl KeyStore {
    /// Opens (creating if needed) the key store under `data_dir`, keeping up to `capacity`
    /// expanded keys in memory. Leftover temporary files of an interrupted write are removed.
    pub fn open(data_dir: &Path, capacity: usize, backend: BackendKind) -> Result<Self> {
        let dir = data_dir.join("keys");
        std::fs::create_dir_all(&dir)
            .map_err(|e| ServiceError::io(format!("creating {}", dir.display()), e))?;
        if let Ok(sets) = std::fs::read_dir(&dir) {
            for set in sets.flatten() {
                if let Ok(files) = std::fs::read_dir(set.path()) {
                    for f in files.flatten() {
                        if f.file_name().to_string_lossy().starts_with(".tmp-") {
                            let _ = std::fs::remove_file(f.path());
                        }
                    }
                }
            }
        }
        Ok(KeyStore {
            dir,
            backend,
            cache: Mutex::new(Lru::new(capacity.max(1))),
            loading: tokio::sync::Mutex::new(()),
        })
    }

    fn path(&self, params: ParamSet, id: &str) -> PathBuf {
        self.dir.join(params.name()).join(format!("{id}.key"))
    }

    /// Looks a key up among `candidates` (the parameter sets the server serves).
    pub fn find(&self, id: &str, candidates: &[ParamSet]) -> Result<Option<StoredKey>> {
        check_key_id(id)?;
        for &params in candidates {
            if let Ok(meta) = std::fs::metadata(self.path(params, id)) {
                return Ok(Some(StoredKey {
                    id: id.to_string(),
                    params,
                    size: meta.len(),
                    newly_stored: false,
                }));
            }
        }
        Ok(None)
    }

    /// Validates and stores an uploaded key (blocking: run it off the async runtime).
    ///
    /// `candidates` are the parameter sets the key may be for (the one the client declared, or
    /// every served one). A key that is already stored is neither validated nor written again.
    /// A new key is deserialized with the conformance check, expanded (which checks it once
    /// more and warms the cache for the first inference), then written atomically.
    pub fn store(&self, bytes: &[u8], candidates: &[ParamSet]) -> Result<StoredKey> {
        if bytes.len() as u64 > MAX_EVAL_KEY_BYTES {
            return Err(ServiceError::TooLarge(format!(
                "evaluation key of {} bytes exceeds the limit of {MAX_EVAL_KEY_BYTES} bytes",
                bytes.len()
            )));
        }
        let id = key_id(bytes);
        if let Some(found) = self.find(&id, candidates)? {
            return Ok(found);
        }
        let (params, key) = validate(bytes, candidates, self.backend)?;
        let path = self.path(params, &id);
        write_atomically(&path, bytes)?;
        self.cache
            .lock()
            .expect("cache lock")
            .insert(id.clone(), params, Arc::new(key));
        Ok(StoredKey {
            id,
            params,
            size: bytes.len() as u64,
            newly_stored: true,
        })
    }

    /// The expanded key `id` for a model of parameter set `params`: from the cache, or loaded
    /// from disk off the async runtime. `served` lists every parameter set the server serves,
    /// to tell a key of another parameter set from an unknown one.
    pub async fn get(
        self: &Arc<Self>,
        id: &str,
        params: ParamSet,
        served: &[ParamSet],
    ) -> Result<Arc<EvalKey>> {
        check_key_id(id)?;
        if let Some(k) = self.cached(id, params) {
            return Ok(k);
        }
        let _guard = self.loading.lock().await;
        if let Some(k) = self.cached(id, params) {
            return Ok(k);
        }
        let path = self.path(params, id);
        if !path.exists() {
            if let Some(other) = self.find(id, served)? {
                return Err(ServiceError::WrongParameterSet(format!(
                    "key {id} is for {}, the model uses {}; generate a key for {}",
                    other.params.name(),
                    params.name(),
                    params.name()
                )));
            }
            return Err(ServiceError::UnknownKey(id.to_string()));
        }
        let store = Arc::clone(self);
        let id_owned = id.to_string();
        let key = tokio::task::spawn_blocking(move || store.load(&id_owned, params))
            .await
            .map_err(|e| ServiceError::Internal(format!("key loading task failed: {e}")))??;
        let key = Arc::new(key);
        self.cache
            .lock()
            .expect("cache lock")
            .insert(id.to_string(), params, Arc::clone(&key));
        Ok(key)
    }

    fn cached(&self, id: &str, params: ParamSet) -> Option<Arc<EvalKey>> {
        self.cache.lock().expect("cache lock").get(id, params)
    }

    /// Reads a stored key and checks it: the hash must match the id, and the bytes must pass
    /// the conformance check. A damaged file is moved aside and the key reported unknown.
    fn load(&self, id: &str, params: ParamSet) -> Result<EvalKey> {
        let path = self.path(params, id);
        let bytes = read_bounded(&path)?;
        let checked = if key_id(&bytes) != id {
            Err("its content no longer matches its hash".to_string())
        } else {
            eval_key_from_bytes(params, &bytes)
                .and_then(|csk| EvalKey::from_compressed(self.backend, params, &csk))
                .map_err(|e| e.to_string())
        };
        match checked {
            Ok(key) => {
                tracing::info!(key = %short(id), params = params.name(), "loaded key from disk");
                Ok(key)
            }
            Err(why) => {
                let aside = path.with_extension("damaged");
                tracing::error!(key = %id, path = %path.display(), %why, "stored key is damaged; moved aside");
                let _ = std::fs::rename(&path, &aside);
                Err(ServiceError::UnknownKey(format!(
                    "{id} (the stored copy was damaged and has been removed; upload the key again)"
                )))
            }
        }
    }

    /// Number of expanded keys in memory.
    pub fn cached_keys(&self) -> usize {
        self.cache.lock().expect("cache lock").entries.len()
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
    entries: Vec<(String, ParamSet, Arc<EvalKey>)>,
}

impl Lru {
    fn new(capacity: usize) -> Self {
        Lru {
            capacity,
            entries: Vec::new(),
        }
    }

    fn get(&mut self, id: &str, params: ParamSet) -> Option<Arc<EvalKey>> {
        let i = self
            .entries
            .iter()
            .position(|(k, p, _)| k == id && *p == params)?;
        let e = self.entries.remove(i);
        let key = Arc::clone(&e.2);
        self.entries.push(e);
        Some(key)
    }

    fn insert(&mut self, id: String, params: ParamSet, key: Arc<EvalKey>) {
        self.entries.retain(|(k, p, _)| !(k == &id && *p == params));
        self.entries.push((id, params, key));
        while self.entries.len() > self.capacity {
            let (evicted, _, _) = self.entries.remove(0);
            tracing::debug!(key = %short(&evicted), "evicted key from the cache");
        }
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
        let store = KeyStore::open(&dir, 2, BackendKind::Cpu).unwrap();
        let p = ParamSet::Message2Carry2KsPbsTuniform2m128;
        let err = store.store(b"not a key at all", &[p]).unwrap_err();
        assert!(matches!(err, ServiceError::Model(_)), "{err}");
        assert!(
            store
                .find(&key_id(b"not a key at all"), &[p])
                .unwrap()
                .is_none()
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
