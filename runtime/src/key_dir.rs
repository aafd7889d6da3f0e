//! A key pair on disk, as `veil keygen` writes it: `client.key` (secret, never leaves its
//! owner's machine), `eval.key` (the compressed evaluation key, uploaded to a server or given
//! with an encrypted model) and `keys.json` (parameter set, key id, sizes). Read by the client
//! library and the CLI, and by the server for an encrypted model's owner key.

use std::io::Read;
use std::path::Path;
use std::sync::Arc;

use veil_format::compiled::ParamSet;

use crate::ClientKey;
use crate::error::{Result, RuntimeError};
use crate::keys::{MAX_CLIENT_KEY_BYTES, MAX_EVAL_KEY_BYTES, eval_key_to_bytes};

/// The parameter sets this build knows, by [`ParamSet::name`].
pub const PARAM_SETS: [ParamSet; 1] = ParamSet::ALL;

/// The parameter set called `name` (e.g. `PARAM_MESSAGE_2_CARRY_2_KS_PBS_TUNIFORM_2M128`).
pub fn param_set_by_name(name: &str) -> Option<ParamSet> {
    PARAM_SETS.iter().copied().find(|p| p.name() == name)
}

pub use veil_format::digest::key_id;

const KEYS_FORMAT: &str = "veil-keys-v1";

/// A client's key pair: the secret key and the serialized evaluation key.
pub struct KeyPair {
    pub params: ParamSet,
    /// Shared so that encryption can run on another thread without copying it.
    pub client: Arc<ClientKey>,
    /// The compressed evaluation key, serialized with tfhe's safe serialization.
    pub eval_key: Vec<u8>,
    /// [`key_id`] of `eval_key`.
    pub key_id: String,
}

impl KeyPair {
    /// Generates a fresh key pair (about two seconds for MESSAGE_2_CARRY_2).
    pub fn generate(params: ParamSet) -> Self {
        let client = Arc::new(ClientKey::generate(params));
        let eval_key = eval_key_to_bytes(&client.compressed_server_key());
        let key_id = key_id(&eval_key);
        KeyPair {
            params,
            client,
            eval_key,
            key_id,
        }
    }

    /// Writes `client.key`, `eval.key` and `keys.json` into `dir` (created if needed).
    /// Existing keys are kept unless `overwrite`.
    pub fn save(&self, dir: &Path, overwrite: bool) -> Result<()> {
        if !overwrite && dir.join("keys.json").exists() {
            return Err(RuntimeError::Keys(format!(
                "{} already holds keys; choose another directory or overwrite them explicitly",
                dir.display()
            )));
        }
        std::fs::create_dir_all(dir)
            .map_err(|e| RuntimeError::io(format!("creating {}", dir.display()), e))?;
        let client_bytes = self.client.to_bytes();
        let meta = serde_json::json!({
            "format": KEYS_FORMAT,
            "parameter_set": self.params.name(),
            "key_id": self.key_id,
            "client_key_sha256": veil_format::digest::sha256_hex(&client_bytes),
            "eval_key_bytes": self.eval_key.len(),
            "client_key_bytes": client_bytes.len(),
        });
        let text = serde_json::to_string_pretty(&meta).expect("JSON");
        // Each file is written whole under a temporary name, then renamed over the old one;
        // keys.json goes last and names both keys' hashes, so a replacement cut short
        // anywhere leaves a directory that `load` refuses, never a mismatched pair.
        let files: [(&str, &[u8], bool); 3] = [
            ("client.key", &client_bytes, true),
            ("eval.key", &self.eval_key, false),
            ("keys.json", text.as_bytes(), false),
        ];
        for (name, bytes, secret) in files {
            let tmp = dir.join(format!(".{name}.tmp"));
            // A stale one would keep its permissions: the secret's mode is set on creation.
            let _ = std::fs::remove_file(&tmp);
            write_file(&tmp, bytes, secret)?;
        }
        for (name, _, _) in files {
            let (tmp, path) = (dir.join(format!(".{name}.tmp")), dir.join(name));
            std::fs::rename(&tmp, &path)
                .map_err(|e| RuntimeError::io(format!("replacing {}", path.display()), e))?;
        }
        sync_dir(dir)
    }

    /// Reads a key directory written by [`KeyPair::save`] and checks that `eval.key` is the
    /// one `keys.json` records.
    pub fn load(dir: &Path) -> Result<Self> {
        let meta_path = dir.join("keys.json");
        let text = std::fs::read_to_string(&meta_path).map_err(|e| {
            RuntimeError::Keys(format!(
                "cannot read {} ({e}); create keys with `veil keygen -o {}`",
                meta_path.display(),
                dir.display()
            ))
        })?;
        let meta: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| RuntimeError::Keys(format!("{}: {e}", meta_path.display())))?;
        let field = |k: &str| {
            meta[k].as_str().map(str::to_string).ok_or_else(|| {
                RuntimeError::Keys(format!("{}: missing \"{k}\"", meta_path.display()))
            })
        };
        if field("format")? != KEYS_FORMAT {
            return Err(RuntimeError::Keys(format!(
                "{}: not a {KEYS_FORMAT} key directory",
                meta_path.display()
            )));
        }
        let name = field("parameter_set")?;
        let params = param_set_by_name(&name).ok_or_else(|| {
            RuntimeError::Keys(format!(
                "{}: unknown parameter set {name}",
                meta_path.display()
            ))
        })?;
        let recorded_id = field("key_id")?;
        let eval_key = read_bounded(&dir.join("eval.key"), MAX_EVAL_KEY_BYTES)?;
        let key_id = key_id(&eval_key);
        if key_id != recorded_id {
            return Err(RuntimeError::Keys(format!(
                "{}: eval.key does not match the key id in keys.json",
                dir.display()
            )));
        }
        let client_bytes = read_bounded(&dir.join("client.key"), MAX_CLIENT_KEY_BYTES)?;
        // Directories written before this field existed carry only the evaluation key's id.
        if let Some(recorded) = meta["client_key_sha256"].as_str()
            && veil_format::digest::sha256_hex(&client_bytes) != recorded
        {
            return Err(RuntimeError::Keys(format!(
                "{}: client.key is not the one keys.json records (a key replacement was \
                 interrupted?); generate new keys with `veil keygen --force -o {}`",
                dir.display(),
                dir.display()
            )));
        }
        let client = Arc::new(ClientKey::from_bytes(params, &client_bytes)?);
        Ok(KeyPair {
            params,
            client,
            eval_key,
            key_id,
        })
    }
}

fn read_bounded(path: &Path, limit: u64) -> Result<Vec<u8>> {
    let f = std::fs::File::open(path)
        .map_err(|e| RuntimeError::io(format!("opening {}", path.display()), e))?;
    let mut bytes = Vec::new();
    f.take(limit + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| RuntimeError::io(format!("reading {}", path.display()), e))?;
    if bytes.len() as u64 > limit {
        return Err(RuntimeError::Keys(format!(
            "{} is larger than {limit} bytes",
            path.display()
        )));
    }
    Ok(bytes)
}

/// Makes the renames in `dir` durable.
fn sync_dir(dir: &Path) -> Result<()> {
    #[cfg(unix)]
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| RuntimeError::io(format!("syncing {}", dir.display()), e))?;
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

fn write_file(path: &Path, bytes: &[u8], secret: bool) -> Result<()> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if secret {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    #[cfg(not(unix))]
    let _ = secret;
    let mut f = opts
        .open(path)
        .map_err(|e| RuntimeError::io(format!("creating {}", path.display()), e))?;
    f.write_all(bytes)
        .and_then(|_| f.sync_all())
        .map_err(|e| RuntimeError::io(format!("writing {}", path.display()), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A replacement cut short (one new key file beside the old ones) is refused on load,
    /// whichever file was replaced; a finished one loads.
    #[test]
    fn a_mismatched_key_pair_is_refused_on_load() {
        let dir = std::env::temp_dir().join(format!("veil-keys-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let params = PARAM_SETS[0];
        let old = KeyPair::generate(params);
        old.save(&dir, false).unwrap();
        assert_eq!(KeyPair::load(&dir).unwrap().key_id, old.key_id);
        assert!(old.save(&dir, false).is_err(), "kept unless overwriting");

        let new = KeyPair::generate(params);
        let staged = dir.join("staged");
        new.save(&staged, false).unwrap();
        for file in ["client.key", "eval.key"] {
            let bytes = std::fs::read(dir.join(file)).unwrap();
            std::fs::copy(staged.join(file), dir.join(file)).unwrap();
            let e = KeyPair::load(&dir).err().expect(file).to_string();
            assert!(e.contains(&format!("{file} ")), "{file}: {e}");
            std::fs::write(dir.join(file), bytes).unwrap();
        }
        new.save(&dir, true).unwrap();
        let loaded = KeyPair::load(&dir).unwrap();
        assert_eq!(loaded.key_id, new.key_id);
        assert!(!dir.join(".client.key.tmp").exists());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.join("client.key"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o077, 0, "client.key is private");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
