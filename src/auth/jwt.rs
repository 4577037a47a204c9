//! End-user tokens: JWTs of the company's identity provider, verified with a
//! configured key. The algorithm is pinned to the configured one (so `none`
//! and key confusion are refused), `exp`, `iss`, `aud` and `sub` are
//! required and checked, and so is `nbf` when present (with 30 s of leeway
//! for clock skew, as `exp`). `sub` is the user's id in its canonical form,
//! hyphenated lower-case (`0190c8f2-5b7e-7c1a-9d3e-2f4a6b8c0d1e`): one
//! spelling per user, so that a token cannot be told apart from another for
//! the same user by how its id is written.

use std::path::PathBuf;

use jsonwebtoken::{Algorithm, DecodingKey, Validation, decode};
use uuid::Uuid;

/// JWT algorithms the service accepts, one at a time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum JwtAlgorithm {
    /// RSA signature; `--jwt-key-file` is the PEM public key.
    Rs256,
    /// ECDSA P-256 signature; `--jwt-key-file` is the PEM public key.
    Es256,
    /// HMAC; `--jwt-secret` is the shared secret.
    Hs256,
}

/// How end-user tokens are verified.
#[derive(Debug, Clone)]
pub struct JwtSettings {
    pub algorithm: JwtAlgorithm,
    pub issuer: String,
    pub audience: String,
    pub key_file: Option<PathBuf>,
    pub secret: Option<String>,
}

#[derive(serde::Deserialize)]
struct Claims {
    sub: String,
}

pub struct JwtVerifier {
    key: DecodingKey,
    validation: Validation,
}

impl std::fmt::Debug for JwtVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtVerifier")
            .field("algorithms", &self.validation.algorithms)
            .finish_non_exhaustive()
    }
}

impl JwtVerifier {
    pub fn new(settings: &JwtSettings) -> Result<Self, String> {
        let read_key = || {
            let path = settings
                .key_file
                .as_ref()
                .ok_or("--jwt-key-file is required for RS256 and ES256")?;
            std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
        };
        let (algorithm, key) = match settings.algorithm {
            JwtAlgorithm::Rs256 => (
                Algorithm::RS256,
                DecodingKey::from_rsa_pem(&read_key()?)
                    .map_err(|e| format!("--jwt-key-file is not an RSA public key: {e}"))?,
            ),
            JwtAlgorithm::Es256 => (
                Algorithm::ES256,
                DecodingKey::from_ec_pem(&read_key()?)
                    .map_err(|e| format!("--jwt-key-file is not an EC public key: {e}"))?,
            ),
            JwtAlgorithm::Hs256 => {
                let secret = settings
                    .secret
                    .as_deref()
                    .filter(|s| s.len() >= 32)
                    .ok_or("--jwt-secret of at least 32 bytes is required for HS256")?;
                (
                    Algorithm::HS256,
                    DecodingKey::from_secret(secret.as_bytes()),
                )
            }
        };
        let mut validation = Validation::new(algorithm);
        validation.algorithms = vec![algorithm];
        validation.set_issuer(&[&settings.issuer]);
        validation.set_audience(&[&settings.audience]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        validation.validate_nbf = true;
        validation.leeway = 30;
        Ok(Self { key, validation })
    }

    /// The user id of a valid token, or `None`.
    pub fn verify(&self, token: &str) -> Option<Uuid> {
        let data = decode::<Claims>(token, &self.key, &self.validation).ok()?;
        let id = Uuid::try_parse(&data.claims.sub).ok()?;
        (id.hyphenated().to_string() == data.claims.sub).then_some(id)
    }
}
