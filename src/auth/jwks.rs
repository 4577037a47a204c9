//! The identity provider's key set (JWKS), from a URL (http or https) or a
//! file, so that the service follows its key rotation without a restart.
//!
//! The set is fetched at start and then in the background, as often as the
//! answer's `Cache-Control: max-age` says but at least every
//! `--jwt-jwks-refresh`. A token whose `kid` is not in the set makes one
//! refresh at once, unless one ran within [`MIN_GAP`] (so random ids cannot
//! make it fetch in a loop). A fetch that fails keeps the last good set,
//! and says so in the log once until one succeeds again.

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::{Arc, RwLock},
    time::Duration,
};

use headers::{CacheControl, HeaderMapExt};
use jsonwebtoken::{
    Algorithm, DecodingKey,
    jwk::{AlgorithmParameters, EllipticCurve, JwkSet, KeyAlgorithm},
};
use tokio::time::Instant;

/// The shortest time between two fetches.
pub const MIN_GAP: Duration = Duration::from_secs(1);
/// The longest a fetch may take.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// The largest key set read.
const MAX_BYTES: usize = 1024 * 1024;
/// The longest `kid` looked up.
pub const MAX_KID_LEN: usize = 256;

/// Where the key set is.
#[derive(Debug, Clone)]
pub enum Source {
    Url(String),
    File(PathBuf),
}

/// The keys by `kid`, each with the one algorithm it verifies.
type Keys = HashMap<String, (DecodingKey, Algorithm)>;

pub struct Jwks {
    source: Source,
    client: reqwest::Client,
    /// The longest between two background fetches.
    every: Duration,
    keys: RwLock<Arc<Keys>>,
    /// When the last fetch ended, and whether it failed; one fetch at a time.
    last: tokio::sync::Mutex<Option<(Instant, bool)>>,
}

impl std::fmt::Debug for Jwks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Jwks")
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

impl Jwks {
    pub fn new(source: Source, every: Duration) -> Result<Self, String> {
        let client = reqwest::Client::builder()
            .timeout(FETCH_TIMEOUT)
            .build()
            .map_err(|e| format!("cannot make an HTTP client: {e}"))?;
        Ok(Self {
            source,
            client,
            every: every.max(MIN_GAP),
            keys: RwLock::default(),
            last: tokio::sync::Mutex::new(None),
        })
    }

    /// The key of `kid`, when the set has it.
    pub fn key(&self, kid: &str) -> Option<(DecodingKey, Algorithm)> {
        let keys = Arc::clone(&self.keys.read().unwrap_or_else(|e| e.into_inner()));
        keys.get(kid).cloned()
    }

    /// The key of `kid`; when the set does not have it, after one refresh
    /// (unless one ran within [`MIN_GAP`]).
    pub async fn key_or_refresh(&self, kid: &str) -> Option<(DecodingKey, Algorithm)> {
        if kid.len() > MAX_KID_LEN {
            return None;
        }
        if let Some(key) = self.key(kid) {
            return Some(key);
        }
        // A failure is logged, and the set read last stays.
        let _ = self.refresh(MIN_GAP).await;
        self.key(kid)
    }

    /// Fetches the set unless a fetch ended within `gap`; how long the
    /// answer may be kept (its max-age), when it said.
    pub async fn refresh(&self, gap: Duration) -> Result<Option<Duration>, String> {
        let mut last = self.last.lock().await;
        if let Some((at, _)) = *last {
            if at.elapsed() < gap {
                return Ok(None);
            }
        }
        let fetched = self.fetch().await;
        let failed_before = last.is_some_and(|(_, failed)| failed);
        *last = Some((Instant::now(), fetched.is_err()));
        match &fetched {
            Ok((keys, _)) if failed_before => {
                tracing::info!(
                    keys = keys.len(),
                    "the key set of end-user tokens is read again"
                );
            }
            Err(error) if !failed_before => {
                tracing::warn!(%error, "cannot read the key set of end-user tokens; the last one read stays in use");
            }
            _ => {}
        }
        let (keys, max_age) = fetched?;
        *self.keys.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(keys);
        Ok(max_age)
    }

    /// Refreshes the set for ever: as often as its max-age says (`max_age`:
    /// that of the read before), at least every `--jwt-jwks-refresh`, at
    /// most every [`MIN_GAP`].
    pub async fn follow(self: Arc<Self>, mut max_age: Option<Duration>) {
        loop {
            let wait = max_age.map_or(self.every, |age| age.min(self.every));
            tokio::time::sleep(wait.max(MIN_GAP)).await;
            max_age = self.refresh(Duration::ZERO).await.ok().flatten();
        }
    }

    async fn fetch(&self) -> Result<(Keys, Option<Duration>), String> {
        let (body, max_age) = match &self.source {
            Source::File(path) => (
                tokio::fs::read(path)
                    .await
                    .map_err(|e| format!("cannot read {}: {e}", path.display()))?,
                None,
            ),
            Source::Url(url) => {
                let mut response = self
                    .client
                    .get(url)
                    .send()
                    .await
                    .and_then(reqwest::Response::error_for_status)
                    .map_err(|e| format!("GET {url}: {e}"))?;
                let max_age = response
                    .headers()
                    .typed_get::<CacheControl>()
                    .and_then(|cache| cache.max_age());
                let mut body = Vec::new();
                while let Some(chunk) = response
                    .chunk()
                    .await
                    .map_err(|e| format!("GET {url}: {e}"))?
                {
                    body.extend_from_slice(&chunk);
                    if body.len() > MAX_BYTES {
                        return Err(format!("GET {url}: larger than {MAX_BYTES} bytes"));
                    }
                }
                (body, max_age)
            }
        };
        Ok((parse(&body)?, max_age))
    }
}

/// The usable keys of a JWKS document: RSA keys for RS256, P-256 keys for
/// ES256, each with a `kid`; others are left out (an HMAC secret has no
/// place in a published set).
fn parse(body: &[u8]) -> Result<Keys, String> {
    let set: JwkSet =
        serde_json::from_slice(body).map_err(|e| format!("not a JSON Web Key Set: {e}"))?;
    let mut keys = Keys::new();
    for jwk in &set.keys {
        let Some(kid) = jwk.common.key_id.clone() else {
            continue;
        };
        let algorithm = match (&jwk.algorithm, jwk.common.key_algorithm) {
            (AlgorithmParameters::RSA(_), None | Some(KeyAlgorithm::RS256)) => Algorithm::RS256,
            (AlgorithmParameters::EllipticCurve(ec), None | Some(KeyAlgorithm::ES256))
                if ec.curve == EllipticCurve::P256 =>
            {
                Algorithm::ES256
            }
            _ => continue,
        };
        if let Ok(key) = DecodingKey::from_jwk(jwk) {
            keys.insert(kid, (key, algorithm));
        }
    }
    if keys.is_empty() && !set.keys.is_empty() {
        return Err("no RS256 or ES256 key with a kid in the set".into());
    }
    Ok(keys)
}
