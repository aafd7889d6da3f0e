//! Tenants: who may call the server, with which limits.
//!
//! `--tenants FILE` is TOML with one `[[tenant]]` table per tenant:
//!
//! ```toml
//! [[tenant]]
//! name = "acme"                      # letters, digits, '-', '_', '.'; names its key folder
//! token_sha256 = "9f86d0…"           # hex SHA-256 of the bearer token (never the token)
//! max_keys = 4                       # optional: stored keys at once
//! max_key_bytes = 200_000_000        # optional: bytes of stored keys
//! models = ["digits_mlp"]            # optional: allowed models (absent: all)
//! requests_per_second = 20.0         # optional: sustained rate of calls
//! burst = 40                         # optional: calls allowed at once (default: the rate, at least 1)
//! key_ttl_secs = 604800              # optional: keys unused this long are removed
//! client_cert_names = ["dns:client.acme.example", "uri:spiffe://acme/app", "cn:acme-app"]
//!                                    # optional, with --client-ca: verified client certificates
//!                                    # whose SAN (DNS or URI) or subject CN is one of these
//! ```
//!
//! A tenant needs `token_sha256`, `client_cert_names` or both. A call with a bearer token is
//! the token's tenant; without one, a verified client certificate naming a listed identity is
//! that tenant, and any other certificate is UNAUTHENTICATED.
//!
//! A client sends `authorization: Bearer <token>`. The server hashes the token and compares the
//! hash with every tenant's in constant time, so neither the comparison nor the table's order
//! tells an attacker how close a guess was. Without a tenants file the server is open: every
//! caller is the anonymous tenant, with no limits.

use std::collections::HashSet;
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use serde::Deserialize;
use sha2::{Digest, Sha256};
use tonic::codegen::http::HeaderValue;
use tonic::metadata::MetadataMap;
use tonic::transport::CertificateDer;

use crate::error::{Result, ServiceError};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TenantsFile {
    #[serde(default)]
    tenant: Vec<Entry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    name: String,
    token_sha256: Option<String>,
    #[serde(default)]
    client_cert_names: Vec<String>,
    max_keys: Option<u64>,
    max_key_bytes: Option<u64>,
    models: Option<Vec<String>>,
    requests_per_second: Option<f64>,
    burst: Option<f64>,
    key_ttl_secs: Option<u64>,
}

/// One tenant and its limits.
#[derive(Debug)]
pub struct Tenant {
    /// Empty for the anonymous tenant of an open server.
    pub name: String,
    token_hash: Option<[u8; 32]>,
    /// `dns:`, `uri:` or `cn:` identities of client certificates that are this tenant.
    cert_names: Vec<String>,
    pub max_keys: Option<u64>,
    pub max_key_bytes: Option<u64>,
    models: Option<Vec<String>>,
    rate: Option<Bucket>,
    /// Keys unused for longer are removed from the store.
    pub key_ttl: Option<std::time::Duration>,
}

/// A token bucket: `rate` calls per second, up to `burst` at once.
#[derive(Debug)]
struct Bucket {
    rate: f64,
    burst: f64,
    state: Mutex<(f64, Instant)>,
}

impl Bucket {
    fn take(&self) -> bool {
        let mut s = self.state.lock().expect("rate lock");
        let now = Instant::now();
        let tokens = (s.0 + now.duration_since(s.1).as_secs_f64() * self.rate).min(self.burst);
        if tokens >= 1.0 {
            *s = (tokens - 1.0, now);
            true
        } else {
            *s = (tokens, now);
            false
        }
    }
}

impl Tenant {
    fn anonymous() -> Self {
        Tenant {
            name: String::new(),
            token_hash: None,
            cert_names: Vec::new(),
            max_keys: None,
            max_key_bytes: None,
            models: None,
            rate: None,
            key_ttl: None,
        }
    }

    /// The tenant's name for logs ("-" for the anonymous tenant).
    pub fn label(&self) -> &str {
        if self.name.is_empty() {
            "-"
        } else {
            &self.name
        }
    }

    pub fn may_use(&self, model: &str) -> bool {
        self.models
            .as_ref()
            .is_none_or(|m| m.iter().any(|n| n == model))
    }

    /// PERMISSION_DENIED unless the tenant may use `model`.
    pub fn check_model(&self, model: &str) -> Result<()> {
        if self.may_use(model) {
            Ok(())
        } else {
            Err(ServiceError::PermissionDenied(format!(
                "tenant '{}' may not use model '{}'",
                self.name,
                model.chars().take(200).collect::<String>()
            )))
        }
    }

    /// Spends one call of the tenant's rate; RESOURCE_EXHAUSTED when none is left.
    pub fn check_rate(&self) -> Result<()> {
        match &self.rate {
            Some(b) if !b.take() => Err(ServiceError::Exhausted(format!(
                "tenant '{}' is over its rate of {} requests per second; retry later",
                self.name, b.rate
            ))),
            _ => Ok(()),
        }
    }
}

/// Every tenant, or none (an open server).
#[derive(Debug)]
pub struct Tenants {
    list: Vec<Arc<Tenant>>,
    anonymous: Option<Arc<Tenant>>,
}

impl Tenants {
    /// An open server: no token needed, every caller is the anonymous tenant.
    pub fn open() -> Self {
        Tenants {
            list: Vec::new(),
            anonymous: Some(Arc::new(Tenant::anonymous())),
        }
    }

    pub fn is_open(&self) -> bool {
        self.anonymous.is_some()
    }

    pub fn names(&self) -> Vec<&str> {
        self.list.iter().map(|t| t.name.as_str()).collect()
    }

    /// Each tenant's allowed model names, to check against the served ones.
    pub fn model_lists(&self) -> impl Iterator<Item = (&str, &[String])> {
        self.list
            .iter()
            .filter_map(|t| t.models.as_deref().map(|m| (t.name.as_str(), m)))
    }

    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ServiceError::Config(format!(
                "cannot read the tenants file {}: {e}",
                path.display()
            ))
        })?;
        Self::parse(&text)
            .map_err(|e| ServiceError::Config(format!("tenants file {}: {e}", path.display())))
    }

    /// Parses and checks a tenants file: valid names and hashes, no duplicates.
    pub fn parse(text: &str) -> Result<Self, String> {
        let file: TenantsFile = toml::from_str(text).map_err(|e| e.to_string())?;
        if file.tenant.is_empty() {
            return Err("no [[tenant]] table; list at least one tenant".into());
        }
        let mut names = HashSet::new();
        let mut hashes = HashSet::new();
        let mut cert_names = HashSet::new();
        let mut list = Vec::new();
        for e in file.tenant {
            if !valid_name(&e.name) {
                return Err(format!(
                    "tenant name {:?}: use 1 to 64 letters, digits, '-', '_' or '.', not \
                     starting with '.'",
                    e.name
                ));
            }
            if !names.insert(e.name.clone()) {
                return Err(format!("tenant '{}' is listed twice", e.name));
            }
            for n in &e.client_cert_names {
                let ok = ["dns:", "uri:", "cn:"]
                    .iter()
                    .any(|p| n.strip_prefix(p).is_some_and(|v| !v.is_empty()));
                if !ok {
                    return Err(format!(
                        "tenant '{}': client_cert_names entry {n:?} must be dns:NAME, uri:NAME \
                         or cn:NAME",
                        e.name
                    ));
                }
                if !cert_names.insert(n.clone()) {
                    return Err(format!(
                        "tenant '{}': client certificate name {n:?} is listed twice",
                        e.name
                    ));
                }
            }
            let hash = match &e.token_sha256 {
                None if e.client_cert_names.is_empty() => {
                    return Err(format!(
                        "tenant '{}' has neither token_sha256 nor client_cert_names",
                        e.name
                    ));
                }
                None => None,
                Some(h) => Some(parse_hash(h).ok_or_else(|| {
                    format!(
                        "tenant '{}': token_sha256 must be 64 hex characters (the SHA-256 of \
                         the token, e.g. `printf %s \"$TOKEN\" | sha256sum`)",
                        e.name
                    )
                })?),
            };
            if e.key_ttl_secs == Some(0) {
                return Err(format!(
                    "tenant '{}': key_ttl_secs must be positive (leave it out for no TTL)",
                    e.name
                ));
            }
            if let Some(hash) = hash
                && !hashes.insert(hash)
            {
                return Err(format!(
                    "tenant '{}' has the same token as another tenant",
                    e.name
                ));
            }
            let rate = match e.requests_per_second {
                None => None,
                Some(r) if r.is_finite() && r > 0.0 => {
                    let burst = e.burst.unwrap_or(r).max(1.0);
                    Some(Bucket {
                        rate: r,
                        burst,
                        state: Mutex::new((burst, Instant::now())),
                    })
                }
                Some(r) => {
                    return Err(format!(
                        "tenant '{}': requests_per_second must be positive, not {r}",
                        e.name
                    ));
                }
            };
            list.push(Arc::new(Tenant {
                name: e.name,
                token_hash: hash,
                cert_names: e.client_cert_names,
                max_keys: e.max_keys,
                max_key_bytes: e.max_key_bytes,
                models: e.models,
                rate,
                key_ttl: e.key_ttl_secs.map(std::time::Duration::from_secs),
            }));
        }
        Ok(Tenants {
            list,
            anonymous: None,
        })
    }

    /// Each tenant's `max_keys`, for the key store's eviction order.
    pub fn shares(&self) -> Vec<(String, Option<u64>)> {
        self.list
            .iter()
            .chain(self.anonymous.iter())
            .map(|t| (t.name.clone(), t.max_keys))
            .collect()
    }

    /// The key TTL of the tenant named `name`, if it has one.
    pub fn key_ttl(&self, name: &str) -> Option<std::time::Duration> {
        self.list
            .iter()
            .chain(self.anonymous.iter())
            .find(|t| t.name == name)
            .and_then(|t| t.key_ttl)
    }

    /// The caller's tenant, from its `authorization: Bearer <token>` metadata.
    pub fn authenticate(&self, metadata: &MetadataMap) -> Result<Arc<Tenant>> {
        self.authenticate_call(metadata.as_ref().get("authorization"), None)
    }

    /// The caller's tenant, from the `authorization` header of a call (read before its body)
    /// and the client certificate chain its connection presented, if any.
    pub fn authenticate_call(
        &self,
        authorization: Option<&HeaderValue>,
        peer_certs: Option<&[CertificateDer<'static>]>,
    ) -> Result<Arc<Tenant>> {
        if let Some(a) = &self.anonymous {
            return Ok(Arc::clone(a));
        }
        if authorization.is_none()
            && let Some(leaf) = peer_certs.and_then(|c| c.first())
        {
            return self.by_certificate(leaf);
        }
        let header = authorization
            .ok_or_else(|| {
                ServiceError::Unauthenticated(
                    "this server needs a bearer token (authorization: Bearer <token>)".into(),
                )
            })?
            .to_str()
            .map_err(|_| ServiceError::Unauthenticated("unreadable authorization header".into()))?;
        self.by_token(header)
    }

    fn by_token(&self, header: &str) -> Result<Arc<Tenant>> {
        let token = header
            .strip_prefix("Bearer ")
            .or_else(|| header.strip_prefix("bearer "))
            .ok_or_else(|| {
                ServiceError::Unauthenticated(
                    "the authorization header must be 'Bearer <token>'".into(),
                )
            })?
            .trim();
        let hash: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        // Look at every tenant, whatever matches, so the time does not depend on which one.
        let mut found = None;
        for t in &self.list {
            if t.token_hash.is_some_and(|h| ct_eq(&h, &hash)) {
                found = Some(t);
            }
        }
        found
            .cloned()
            .ok_or_else(|| ServiceError::Unauthenticated("unknown token".into()))
    }
}

/// The tenants in force, replaced whole when the tenants file is reloaded (SIGHUP): a call
/// authenticates against the table current when it arrives.
#[derive(Clone, Debug)]
pub struct SharedTenants(Arc<RwLock<Arc<Tenants>>>);

impl SharedTenants {
    pub fn new(t: Arc<Tenants>) -> Self {
        SharedTenants(Arc::new(RwLock::new(t)))
    }

    pub fn current(&self) -> Arc<Tenants> {
        Arc::clone(&self.0.read().expect("tenants lock"))
    }

    pub fn replace(&self, t: Arc<Tenants>) {
        *self.0.write().expect("tenants lock") = t;
    }
}

impl Tenants {
    /// The tenant of a client certificate (already verified against `--client-ca` by the
    /// TLS handshake): the one listing its subject CN or one of its DNS / URI SANs.
    fn by_certificate(&self, leaf: &CertificateDer<'static>) -> Result<Arc<Tenant>> {
        let names = certificate_names(leaf)
            .ok_or_else(|| ServiceError::Unauthenticated("unreadable client certificate".into()))?;
        let mut found: Option<&Arc<Tenant>> = None;
        for t in &self.list {
            if t.cert_names.iter().any(|n| names.contains(n)) {
                if found.is_some() {
                    return Err(ServiceError::Unauthenticated(
                        "the client certificate names more than one tenant; send a bearer \
                         token"
                            .into(),
                    ));
                }
                found = Some(t);
            }
        }
        found.cloned().ok_or_else(|| {
            let shown: Vec<&str> = names.iter().take(8).map(String::as_str).collect();
            ServiceError::Unauthenticated(format!(
                "no tenant for this client certificate ({}); send a bearer token or list one \
                 of its names in the tenants file's client_cert_names",
                shown.join(", ").chars().take(400).collect::<String>()
            ))
        })
    }
}

/// `cn:`, `dns:` and `uri:` identities of a DER certificate; `None` if it does not parse.
fn certificate_names(der: &[u8]) -> Option<Vec<String>> {
    use x509_parser::extensions::GeneralName;
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let mut names: Vec<String> = cert
        .subject()
        .iter_common_name()
        .filter_map(|cn| cn.as_str().ok())
        .map(|cn| format!("cn:{cn}"))
        .collect();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            match n {
                GeneralName::DNSName(d) => names.push(format!("dns:{d}")),
                GeneralName::URI(u) => names.push(format!("uri:{u}")),
                _ => {}
            }
        }
    }
    Some(names)
}

fn ct_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let diff = a.iter().zip(b).fold(0u8, |d, (x, y)| d | (x ^ y));
    std::hint::black_box(diff) == 0
}

/// Names become folder names: keep them to a safe alphabet.
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

fn parse_hash(hex: &str) -> Option<[u8; 32]> {
    let hex = hex.trim();
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// Hex SHA-256 of a token, as `token_sha256` expects it.
pub fn token_sha256(token: &str) -> String {
    Sha256::digest(token.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(auth: Option<&str>) -> MetadataMap {
        let mut m = MetadataMap::new();
        if let Some(a) = auth {
            m.insert("authorization", a.parse().unwrap());
        }
        m
    }

    #[test]
    fn tokens_pick_their_tenant() {
        let text = format!(
            "[[tenant]]\nname = \"a\"\ntoken_sha256 = \"{}\"\nmodels = [\"m\"]\n\
             [[tenant]]\nname = \"b\"\ntoken_sha256 = \"{}\"\nmax_keys = 1\n",
            token_sha256("alpha"),
            token_sha256("beta").to_uppercase()
        );
        let t = Tenants::parse(&text).unwrap();
        assert_eq!(
            t.authenticate(&meta(Some("Bearer alpha"))).unwrap().name,
            "a"
        );
        assert_eq!(
            t.authenticate(&meta(Some("Bearer beta"))).unwrap().name,
            "b"
        );
        for bad in [
            None,
            Some("Bearer gamma"),
            Some("alpha"),
            Some("Basic alpha"),
        ] {
            let e = t.authenticate(&meta(bad)).unwrap_err();
            assert!(
                matches!(e, ServiceError::Unauthenticated(_)),
                "{bad:?}: {e}"
            );
        }
        let a = t.authenticate(&meta(Some("Bearer alpha"))).unwrap();
        assert!(a.check_model("m").is_ok());
        assert!(matches!(
            a.check_model("other"),
            Err(ServiceError::PermissionDenied(_))
        ));
    }

    #[test]
    fn bad_files_are_refused_with_a_reason() {
        let h = token_sha256("x");
        for (text, why) in [
            ("", "no [[tenant]]"),
            (
                "[[tenant]]\nname = \"a\"\ntoken_sha256 = \"abc\"\n",
                "64 hex",
            ),
            (
                &format!("[[tenant]]\nname = \"../a\"\ntoken_sha256 = \"{h}\"\n"),
                "tenant name",
            ),
            (
                &format!(
                    "[[tenant]]\nname = \"a\"\ntoken_sha256 = \"{h}\"\n\
                     [[tenant]]\nname = \"b\"\ntoken_sha256 = \"{h}\"\n"
                ),
                "same token",
            ),
            (
                &format!("[[tenant]]\nname = \"a\"\ntoken_sha256 = \"{h}\"\nmax_kyes = 1\n"),
                "unknown field",
            ),
            (
                &format!("[[tenant]]\nname = \"a\"\ntoken_sha256 = \"{h}\"\nkey_ttl_secs = 0\n"),
                "key_ttl_secs must be positive",
            ),
            ("[[tenant]]\nname = \"a\"\n", "neither token_sha256"),
            (
                "[[tenant]]\nname = \"a\"\nclient_cert_names = [\"client.test\"]\n",
                "dns:NAME",
            ),
            (
                "[[tenant]]\nname = \"a\"\nclient_cert_names = [\"cn:x\"]\n\
                 [[tenant]]\nname = \"b\"\nclient_cert_names = [\"cn:x\"]\n",
                "listed twice",
            ),
        ] {
            let e = Tenants::parse(text).unwrap_err();
            assert!(e.contains(why), "{text:?}: {e}");
        }
    }

    #[test]
    fn the_rate_is_a_token_bucket() {
        let text = format!(
            "[[tenant]]\nname = \"a\"\ntoken_sha256 = \"{}\"\nrequests_per_second = 0.001\nburst = 2\n",
            token_sha256("t")
        );
        let t = Tenants::parse(&text).unwrap();
        let a = t.authenticate(&meta(Some("Bearer t"))).unwrap();
        assert!(a.check_rate().is_ok());
        assert!(a.check_rate().is_ok());
        assert!(matches!(a.check_rate(), Err(ServiceError::Exhausted(_))));
    }
}
