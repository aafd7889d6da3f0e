//! The object-store backend of the key store: the source of truth when replicas share keys.
//!
//! Objects mirror the disk layout under the URL's prefix: `PREFIX/keys/<PARAMETER_SET>/<id>.key`
//! for the anonymous tenant and `PREFIX/tenants/<name>/keys/<PARAMETER_SET>/<id>.key` for a
//! named one. A key object is written once, with a single PUT of bytes the uploading replica
//! validated; since the id is the SHA-256 of those bytes, a second PUT of the same id writes
//! the same bytes and is harmless. Beside each key, an empty `<id>.used` marker object is
//! rewritten at most once a minute while the key is in use: its modification time is the
//! key's last use across all replicas, for `ListKeys` and the tenants' key TTL.
//!
//! The store's endpoint and credentials come from the standard AWS environment variables
//! (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`, `AWS_ENDPOINT_URL`,
//! `AWS_ALLOW_HTTP`, ...), read by the `object_store` crate.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use futures::StreamExt;
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::path::Path;
use object_store::{ClientConfigKey, ObjectStore, ObjectStoreExt, PutPayload, RetryConfig};
use veil_format::compiled::ParamSet;
use veil_runtime::keys::MAX_EVAL_KEY_BYTES;

use crate::error::{Result, ServiceError};

/// How long a tenant's usage (keys and bytes in the store) read from a listing is trusted for
/// quota checks. Uploads through this replica refresh it at once.
pub const USAGE_TTL: Duration = Duration::from_secs(5);

/// One request to the store may take this long (a 30 MB key over a slow link included).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// A key object as a listing shows it.
#[derive(Clone, Debug)]
pub struct RemoteKey {
    pub owner: String,
    pub params: ParamSet,
    pub id: String,
    pub size: u64,
    /// The later of the upload and the last use any replica recorded.
    pub last_used: SystemTime,
}

/// An S3-compatible bucket (and prefix) holding every tenant's keys.
pub struct RemoteStore {
    store: Arc<dyn ObjectStore>,
    url: String,
    prefix: Path,
    /// Per tenant: (read at, keys, bytes), from the last listing.
    usage: Mutex<HashMap<String, (Instant, u64, u64)>>,
}

impl RemoteStore {
    /// Opens `s3://bucket[/prefix]` with the AWS environment's endpoint and credentials, and
    /// checks that the bucket answers (a listing), so that a wrong URL or credential stops
    /// the server at start.
    pub async fn connect(url: &str) -> Result<Self> {
        let (bucket, prefix) = parse_url(url)?;
        // The store's HTTP client takes TLS from the process default: ring, as tonic's TLS.
        // (An error means a provider is installed already.)
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut builder = AmazonS3Builder::from_env();
        // Timeouts unless the environment sets them (AWS_TIMEOUT, AWS_CONNECT_TIMEOUT).
        for (key, value) in [
            (ClientConfigKey::Timeout, REQUEST_TIMEOUT),
            (ClientConfigKey::ConnectTimeout, Duration::from_secs(5)),
        ] {
            let key = AmazonS3ConfigKey::Client(key);
            if builder.get_config_value(&key).is_none() {
                builder = builder.with_config(key, format!("{}s", value.as_secs()));
            }
        }
        let store = builder
            .with_bucket_name(bucket)
            // Object-store errors reach clients as UNAVAILABLE, which they retry: keep the
            // server's own retries short.
            .with_retry(RetryConfig {
                max_retries: 3,
                retry_timeout: Duration::from_secs(20),
                ..RetryConfig::default()
            })
            .build()
            .map_err(|e| ServiceError::Config(format!("--key-store {url}: {e}")))?;
        let remote = Self::with_store(Arc::new(store), url, prefix);
        let probe = remote.store.list(Some(&remote.prefix)).next().await;
        if let Some(Err(e)) = probe {
            return Err(ServiceError::Config(format!(
                "--key-store {url}: the object store does not answer a listing: {e}"
            )));
        }
        Ok(remote)
    }

    /// A store over any `object_store` backend (tests use it with an in-memory one).
    pub fn with_store(store: Arc<dyn ObjectStore>, url: &str, prefix: &str) -> Self {
        RemoteStore {
            store,
            url: url.to_string(),
            prefix: Path::from(prefix),
            usage: Mutex::new(HashMap::new()),
        }
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    fn owner_prefix(&self, owner: &str) -> Path {
        let base = if owner.is_empty() {
            self.prefix.clone()
        } else {
            self.prefix.clone().join("tenants").join(owner)
        };
        base.join("keys")
    }

    fn key_path(&self, owner: &str, params: ParamSet, id: &str) -> Path {
        self.owner_prefix(owner)
            .join(params.name())
            .join(format!("{id}.key"))
    }

    fn used_path(&self, owner: &str, params: ParamSet, id: &str) -> Path {
        self.owner_prefix(owner)
            .join(params.name())
            .join(format!("{id}.used"))
    }

    /// The stored size of `owner`'s key, or `None` when the store has no such key.
    pub async fn head(&self, owner: &str, params: ParamSet, id: &str) -> Result<Option<u64>> {
        match self.store.head(&self.key_path(owner, params, id)).await {
            Ok(meta) => Ok(Some(meta.size)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(unavailable("looking up a key", e)),
        }
    }

    /// The key's bytes, or `None` when the store has no such key. Reads at most
    /// [`MAX_EVAL_KEY_BYTES`]: a larger object is refused before its body is read.
    pub async fn get(&self, owner: &str, params: ParamSet, id: &str) -> Result<Option<Vec<u8>>> {
        let got = match self.store.get(&self.key_path(owner, params, id)).await {
            Ok(g) => g,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(unavailable("reading a key", e)),
        };
        if got.meta.size > MAX_EVAL_KEY_BYTES {
            return Err(ServiceError::Internal(format!(
                "the object store's copy of key {id} has {} bytes, more than a key may have",
                got.meta.size
            )));
        }
        let mut bytes = Vec::with_capacity(got.meta.size as usize);
        let mut body = got.into_stream();
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| unavailable("reading a key", e))?;
            if bytes.len() + chunk.len() > MAX_EVAL_KEY_BYTES as usize {
                return Err(ServiceError::Internal(format!(
                    "the object store sent more bytes for key {id} than a key may have"
                )));
            }
            bytes.extend_from_slice(&chunk);
        }
        Ok(Some(bytes))
    }

    /// Writes a validated key: one PUT.
    pub async fn put(&self, owner: &str, params: ParamSet, id: &str, bytes: &[u8]) -> Result<()> {
        let payload = PutPayload::from(bytes.to_vec());
        self.store
            .put(&self.key_path(owner, params, id), payload)
            .await
            .map_err(|e| unavailable("storing a key", e))?;
        self.forget_usage(owner);
        Ok(())
    }

    /// Records a use of the key (the marker's modification time).
    pub async fn mark_used(&self, owner: &str, params: ParamSet, id: &str) -> Result<()> {
        self.store
            .put(&self.used_path(owner, params, id), PutPayload::new())
            .await
            .map(|_| ())
            .map_err(|e| unavailable("recording a key's use", e))
    }

    /// Deletes the key and its marker (deleting what is absent succeeds).
    pub async fn delete(&self, owner: &str, params: ParamSet, id: &str) -> Result<()> {
        for path in [
            self.key_path(owner, params, id),
            self.used_path(owner, params, id),
        ] {
            match self.store.delete(&path).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(unavailable("deleting a key", e)),
            }
        }
        self.forget_usage(owner);
        Ok(())
    }

    /// Every key of `owner` (`Some`) or of every tenant (`None`) among the parameter sets
    /// `known`, with its last use.
    pub async fn list(&self, owner: Option<&str>, known: &[ParamSet]) -> Result<Vec<RemoteKey>> {
        let prefix = match owner {
            Some(o) => self.owner_prefix(o),
            None => self.prefix.clone(),
        };
        let mut keys: HashMap<(String, &'static str, String), RemoteKey> = HashMap::new();
        let mut used: HashMap<(String, &'static str, String), SystemTime> = HashMap::new();
        let mut listing = self.store.list(Some(&prefix));
        while let Some(meta) = listing.next().await {
            let meta = meta.map_err(|e| unavailable("listing keys", e))?;
            let Some((owner, params, id, is_key)) = self.parse_location(&meta.location, known)
            else {
                continue;
            };
            let at = SystemTime::from(meta.last_modified);
            let k = (owner.clone(), params.name(), id.clone());
            if is_key {
                keys.insert(
                    k,
                    RemoteKey {
                        owner,
                        params,
                        id,
                        size: meta.size,
                        last_used: at,
                    },
                );
            } else {
                used.insert(k, at);
            }
        }
        Ok(keys
            .into_iter()
            .map(|(k, mut key)| {
                if let Some(&u) = used.get(&k) {
                    key.last_used = key.last_used.max(u);
                }
                key
            })
            .collect())
    }

    /// (keys, bytes) `owner` has in the store, from a listing at most [`USAGE_TTL`] old.
    pub async fn usage(&self, owner: &str, known: &[ParamSet]) -> Result<(u64, u64)> {
        if let Some(&(at, n, b)) = self.usage.lock().expect("usage lock").get(owner)
            && at.elapsed() < USAGE_TTL
        {
            return Ok((n, b));
        }
        let keys = self.list(Some(owner), known).await?;
        let (n, b) = (keys.len() as u64, keys.iter().map(|k| k.size).sum::<u64>());
        self.usage
            .lock()
            .expect("usage lock")
            .insert(owner.to_string(), (Instant::now(), n, b));
        Ok((n, b))
    }

    /// Drops the cached usage of `owner`, so the next quota check lists the store.
    pub fn forget_usage(&self, owner: &str) {
        self.usage.lock().expect("usage lock").remove(owner);
    }

    /// (owner, parameter set, id, is the key rather than its marker) of an object under the
    /// prefix; `None` for anything else.
    fn parse_location(
        &self,
        location: &Path,
        known: &[ParamSet],
    ) -> Option<(String, ParamSet, String, bool)> {
        let parts: Vec<String> = location
            .prefix_match(&self.prefix)?
            .map(|p| p.as_ref().to_string())
            .collect();
        let parts: Vec<&str> = parts.iter().map(String::as_str).collect();
        let (owner, rest) = match parts.as_slice() {
            ["keys", rest @ ..] => (String::new(), rest),
            ["tenants", name, "keys", rest @ ..] => (name.to_string(), rest),
            _ => return None,
        };
        let [params, file] = rest else {
            return None;
        };
        let params = *known.iter().find(|p| p.name() == *params)?;
        let (id, is_key) = match (file.strip_suffix(".key"), file.strip_suffix(".used")) {
            (Some(id), _) => (id, true),
            (None, Some(id)) => (id, false),
            _ => return None,
        };
        super::check_key_id(id).ok()?;
        Some((owner, params, id.to_string(), is_key))
    }
}

fn unavailable(what: &str, e: object_store::Error) -> ServiceError {
    ServiceError::Unavailable(format!("key store: {what}: {e}"))
}

/// `s3://bucket[/prefix]` → (bucket, prefix).
fn parse_url(url: &str) -> Result<(&str, &str)> {
    let rest = url
        .strip_prefix("s3://")
        .or_else(|| url.strip_prefix("s3a://"))
        .ok_or_else(|| {
            ServiceError::Config(format!(
                "--key-store {url}: expected s3://BUCKET[/PREFIX] (an S3-compatible store; \
                 the endpoint and credentials come from the AWS_* environment variables)"
            ))
        })?;
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    if bucket.is_empty() {
        return Err(ServiceError::Config(format!(
            "--key-store {url}: no bucket name"
        )));
    }
    Ok((bucket, prefix.trim_matches('/')))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_give_bucket_and_prefix() {
        assert_eq!(parse_url("s3://b").unwrap(), ("b", ""));
        assert_eq!(parse_url("s3://b/x/y/").unwrap(), ("b", "x/y"));
        assert!(parse_url("gs://b").is_err());
        assert!(parse_url("s3:///x").is_err());
    }

    #[test]
    fn locations_parse_to_keys_and_markers() {
        let r = RemoteStore::with_store(
            Arc::new(object_store::memory::InMemory::new()),
            "s3://b/p",
            "p",
        );
        let known = [ParamSet::ALL[0]];
        let p = known[0];
        let id = "a".repeat(64);
        let parsed = r.parse_location(&r.key_path("", p, &id), &known).unwrap();
        assert_eq!(parsed, (String::new(), p, id.clone(), true));
        let parsed = r
            .parse_location(&r.used_path("t1", p, &id), &known)
            .unwrap();
        assert_eq!(parsed, ("t1".to_string(), p, id.clone(), false));
        assert!(
            r.parse_location(&Path::from("p/keys/X/y.key"), &known)
                .is_none()
        );
        assert!(
            r.parse_location(&Path::from("q/keys/a.key"), &known)
                .is_none()
        );
    }
}
