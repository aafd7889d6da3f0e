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
//! bootstraps_per_second = 5000.0     # optional: sustained Infer work (samples x bootstraps per sample)
//! bootstrap_burst = 100000           # optional: work allowed at once (default: 60 s of the rate)
//! max_requests = 4                   # optional: Infer requests queued or running at once
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
use std::sync::atomic::{AtomicUsize, Ordering};
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
    bootstraps_per_second: Option<f64>,
    bootstrap_burst: Option<f64>,
    max_requests: Option<usize>,
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
    /// Infer work: one token per bootstrap (a zero-bootstrap model costs one per sample).
    work: Option<Bucket>,
    /// Most Infer requests queued or running at once.
    pub max_requests: Option<usize>,
    requests: Arc<AtomicUsize>,
}

/// One Infer request counted against its tenant's `max_requests` until it is dropped (its
/// evaluation ended, or it left the queue).
#[derive(Debug)]
pub struct TenantSlot(Arc<AtomicUsize>);

impl Drop for TenantSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A token bucket: `rate` calls per second, up to `burst` at once.
#[derive(Debug)]
struct Bucket {
    rate: f64,
    burst: f64,
    state: Mutex<(f64, Instant)>,
}

impl Bucket {
    fn new(rate: f64, burst: f64) -> Self {
        Bucket {
            rate,
            burst,
            state: Mutex::new((burst, Instant::now())),
        }
    }

    /// Starts from the tokens `old` has left (at most this bucket's burst).
    fn inherit(&self, old: &Bucket) {
        let (tokens, at) = *old.state.lock().expect("rate lock");
        *self.state.lock().expect("rate lock") = (tokens.min(self.burst), at);
    }

    fn take(&self, cost: f64) -> bool {
        let mut s = self.state.lock().expect("rate lock");
        let now = Instant::now();
        let tokens = (s.0 + now.duration_since(s.1).as_secs_f64() * self.rate).min(self.burst);
        if tokens >= cost {
            *s = (tokens - cost, now);
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
            work: None,
            max_requests: None,
            requests: Arc::new(AtomicUsize::new(0)),
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
            Some(b) if !b.take(1.0) => Err(ServiceError::Exhausted(format!(
                "tenant '{}' is over its rate of {} requests per second; retry later",
                self.name, b.rate
            ))),
            _ => Ok(()),
        }
    }
}

impl Tenant {
    /// Spends `bootstraps` of the tenant's work rate (an Infer's samples x bootstraps per
    /// sample): a 256-sample request costs 256 one-sample ones. RESOURCE_EXHAUSTED when too
    /// little is left; INVALID_ARGUMENT when the request costs more than the burst, which no
    /// wait would fix.
    pub fn check_work(&self, bootstraps: u64) -> Result<()> {
        let Some(b) = &self.work else { return Ok(()) };
        let cost = bootstraps.max(1) as f64;
        if cost > b.burst {
            return Err(ServiceError::InvalidRequest(format!(
                "the request costs {bootstraps} bootstraps, more than tenant '{}' may spend at once ({}); send fewer samples per request",
                self.name, b.burst
            )));
        }
        if b.take(cost) {
            Ok(())
        } else {
            Err(ServiceError::Exhausted(format!(
                "tenant '{}' is over its rate of {} bootstraps per second (this request costs {bootstraps}); retry later",
                self.name, b.rate
            )))
        }
    }

    /// Counts one Infer request against `max_requests` until the slot drops;
    /// RESOURCE_EXHAUSTED when the tenant already has that many queued or running.
    pub fn admit(&self) -> Result<TenantSlot> {
        let max = self.max_requests.unwrap_or(usize::MAX);
        self.requests
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < max).then_some(n + 1)
            })
            .map_err(|n| {
                ServiceError::Exhausted(format!(
                    "tenant '{}' already has {n} requests queued or running, its limit (max_requests); retry when one finishes",
                    self.name
                ))
            })?;
        Ok(TenantSlot(Arc::clone(&self.requests)))
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
                    Some(Bucket::new(r, e.burst.unwrap_or(r).max(1.0)))
                }
                Some(r) => {
                    return Err(format!(
                        "tenant '{}': requests_per_second must be positive, not {r}",
                        e.name
                    ));
                }
            };
            let work = match e.bootstraps_per_second {
                None => None,
                Some(r) if r.is_finite() && r > 0.0 => Some(Bucket::new(
                    r,
                    e.bootstrap_burst.unwrap_or(60.0 * r).max(1.0),
                )),
                Some(r) => {
                    return Err(format!(
                        "tenant '{}': bootstraps_per_second must be positive, not {r}",
                        e.name
                    ));
                }
            };
            if e.max_requests == Some(0) {
                return Err(format!(
                    "tenant '{}': max_requests must be at least 1",
                    e.name
                ));
            }
            list.push(Arc::new(Tenant {
                name: e.name,
                token_hash: hash,
                cert_names: e.client_cert_names,
                max_keys: e.max_keys,
                max_key_bytes: e.max_key_bytes,
                models: e.models,
                rate,
                key_ttl: e.key_ttl_secs.map(std::time::Duration::from_secs),
                work,
                max_requests: e.max_requests,
                requests: Arc::new(AtomicUsize::new(0)),
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
    /// Whether any tenant's keys expire (so a TTL sweep has anything to do).
    pub fn any_key_ttl(&self) -> bool {
        self.list
            .iter()
            .chain(self.anonymous.iter())
            .any(|t| t.key_ttl.is_some())
    }

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

    /// Puts a reloaded tenants file in place. A tenant that keeps its name keeps its
    /// in-flight request count and the tokens left in its buckets, so a reload neither
    /// frees `max_requests` slots still held nor refills a spent rate.
    pub fn replace(&self, mut t: Tenants) {
        let mut current = self.0.write().expect("tenants lock");
        for new in &mut t.list {
            if let (Some(old), Some(new)) = (
                current.list.iter().find(|o| o.name == new.name),
                Arc::get_mut(new),
            ) {
                new.requests = Arc::clone(&old.requests);
                for (n, o) in [(&new.rate, &old.rate), (&new.work, &old.work)] {
                    if let (Some(n), Some(o)) = (n, o) {
                        n.inherit(o);
                    }
                }
            }
        }
        *current = Arc::new(t);
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

    #[test]
    fn work_is_counted_in_bootstraps_and_requests_are_capped() {
        let text = format!(
            "[[tenant]]\nname = \"a\"\ntoken_sha256 = \"{}\"\nbootstraps_per_second = 0.001\n\
             bootstrap_burst = 512\nmax_requests = 2\n",
            token_sha256("t")
        );
        let t = Tenants::parse(&text).unwrap();
        let a = t.authenticate(&meta(Some("Bearer t"))).unwrap();
        // 256 samples x 1 bootstrap cost 256 one-sample requests: the burst of 512 takes two.
        assert!(a.check_work(256).is_ok());
        assert!(a.check_work(255).is_ok());
        assert!(a.check_work(1).is_ok());
        assert!(matches!(a.check_work(1), Err(ServiceError::Exhausted(_))));
        assert!(matches!(
            a.check_work(513),
            Err(ServiceError::InvalidRequest(_))
        ));
        let one = a.admit().unwrap();
        let _two = a.admit().unwrap();
        assert!(matches!(a.admit(), Err(ServiceError::Exhausted(_))));
        drop(one);
        assert!(a.admit().is_ok(), "a slot comes back when its request ends");
    }

    #[test]
    fn a_reload_keeps_held_slots_and_spent_work() {
        let file = |max_requests: usize| {
            format!(
                "[[tenant]]\nname = \"a\"\ntoken_sha256 = \"{}\"\nbootstraps_per_second = 0.001\n\
                 bootstrap_burst = 10\nmax_requests = {max_requests}\n\
                 [[tenant]]\nname = \"b\"\ntoken_sha256 = \"{}\"\nmax_requests = 1\n",
                token_sha256("t"),
                token_sha256("u")
            )
        };
        let shared = SharedTenants::new(Arc::new(Tenants::parse(&file(1)).unwrap()));
        let a = shared
            .current()
            .authenticate(&meta(Some("Bearer t")))
            .unwrap();
        let held = a.admit().unwrap();
        assert!(a.check_work(10).is_ok());

        shared.replace(Tenants::parse(&file(1)).unwrap());
        let a = shared
            .current()
            .authenticate(&meta(Some("Bearer t")))
            .unwrap();
        assert!(
            matches!(a.admit(), Err(ServiceError::Exhausted(_))),
            "the slot held before the reload still counts"
        );
        assert!(
            matches!(a.check_work(1), Err(ServiceError::Exhausted(_))),
            "a reload does not refill a spent bucket"
        );
        drop(held);
        assert!(
            a.admit().is_ok(),
            "the old slot's release frees the new table's count"
        );

        // A raised limit applies at once; another tenant is untouched.
        shared.replace(Tenants::parse(&file(3)).unwrap());
        let a = shared
            .current()
            .authenticate(&meta(Some("Bearer t")))
            .unwrap();
        let _x = a.admit().unwrap();
        let _y = a.admit().unwrap();
        let b = shared
            .current()
            .authenticate(&meta(Some("Bearer u")))
            .unwrap();
        assert!(b.admit().is_ok());
    }
}
