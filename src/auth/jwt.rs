//! End-user tokens: JWTs of the company's identity provider, verified with a
//! configured key. The algorithm is pinned to the configured one (so `none`
//! and key confusion are refused), `exp`, `iss`, `aud` and `sub` are
//! required and checked, and so is `nbf` when present (with 30 s of leeway
//! for clock skew, as `exp`). `sub` is the user's id in its canonical form,
//! hyphenated lower-case (`0190c8f2-5b7e-7c1a-9d3e-2f4a6b8c0d1e`): one
//! spelling per user, so that a token cannot be told apart from another for
//! the same user by how its id is written.

use std::path::PathBuf;

use std::sync::Arc;

use jsonwebtoken::{Algorithm, DecodingKey, Validation, decode, decode_header};
use uuid::Uuid;

use super::Role;
use super::jwks::{Jwks, Source};

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
    /// The claim that grants a role; none: no token grants one.
    pub roles_claim: Option<String>,
    /// The claim that names the tenant of an editor or viewer role.
    pub tenant_claim: Option<String>,
    /// The identity provider's key set, and the longest between two
    /// fetches of it; instead of the key file or secret.
    pub jwks: Option<(Source, std::time::Duration)>,
}

/// What verifies signatures.
enum Keys {
    /// One key, of the configured algorithm.
    One(DecodingKey),
    /// The key named by the token's `kid`, of that key's algorithm.
    Set(Arc<Jwks>),
}

/// What a valid token says of its bearer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// `sub`: the user's id in this service.
    pub user_id: Uuid,
    /// The role its claims grant, if any.
    pub grant: Option<Grant>,
}

/// A role granted by the identity provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grant {
    Admin,
    Tenant { tenant_id: Uuid, can_write: bool },
}

type Claims = serde_json::Map<String, serde_json::Value>;

pub struct JwtVerifier {
    keys: Keys,
    validation: Validation,
    roles_claim: Option<String>,
    tenant_claim: Option<String>,
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
        let mut validation = Validation::new(Algorithm::RS256);
        validation.set_issuer(&[&settings.issuer]);
        validation.set_audience(&[&settings.audience]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        validation.validate_nbf = true;
        validation.leeway = 30;
        let (keys, algorithm) = match &settings.jwks {
            Some((source, every)) => (
                Keys::Set(Arc::new(Jwks::new(source.clone(), *every)?)),
                // Each key's own, when a token is verified.
                Algorithm::RS256,
            ),
            None => {
                let (algorithm, key) = Self::one_key(settings)?;
                (Keys::One(key), algorithm)
            }
        };
        validation.algorithms = vec![algorithm];
        Ok(Self {
            keys,
            validation,
            roles_claim: settings.roles_claim.clone(),
            tenant_claim: settings.tenant_claim.clone(),
        })
    }

    /// The key set, when tokens are verified with one.
    pub fn jwks(&self) -> Option<&Arc<Jwks>> {
        match &self.keys {
            Keys::Set(jwks) => Some(jwks),
            Keys::One(_) => None,
        }
    }

    /// The key of `--jwt-key-file` or `--jwt-secret`, and its algorithm.
    fn one_key(settings: &JwtSettings) -> Result<(Algorithm, DecodingKey), String> {
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
        Ok((algorithm, key))
    }

    /// What a valid token says, or `None`.
    pub async fn verify(&self, token: &str) -> Option<Verified> {
        let claims = match &self.keys {
            Keys::One(key) => decode::<Claims>(token, key, &self.validation),
            Keys::Set(jwks) => {
                let kid = decode_header(token).ok()?.kid?;
                let (key, algorithm) = jwks.key_or_refresh(&kid).await?;
                let mut validation = self.validation.clone();
                validation.algorithms = vec![algorithm];
                decode::<Claims>(token, &key, &validation)
            }
        }
        .ok()?
        .claims;
        let sub = claims.get("sub")?.as_str()?;
        let user_id = Uuid::try_parse(sub).ok()?;
        if user_id.hyphenated().to_string() != sub {
            return None;
        }
        Some(Verified {
            user_id,
            grant: self.grant(&claims),
        })
    }

    /// The highest role the roles claim names (a string, or an array of
    /// them; other values grant nothing), with the tenant claim's tenant
    /// for an editor or viewer (without a valid one, nothing).
    fn grant(&self, claims: &Claims) -> Option<Grant> {
        let roles = match claims.get(self.roles_claim.as_deref()?)? {
            serde_json::Value::String(role) => vec![role.as_str()],
            serde_json::Value::Array(roles) => {
                roles.iter().filter_map(serde_json::Value::as_str).collect()
            }
            _ => return None,
        };
        let rank = |role: &Role| match role {
            Role::Admin => 2,
            Role::Editor => 1,
            Role::Viewer => 0,
        };
        let role = roles.into_iter().filter_map(Role::parse).max_by_key(rank)?;
        if role == Role::Admin {
            return Some(Grant::Admin);
        }
        let tenant = claims.get(self.tenant_claim.as_deref()?)?.as_str()?;
        let tenant_id = Uuid::try_parse(tenant).ok()?;
        Some(Grant::Tenant {
            tenant_id,
            can_write: role == Role::Editor,
        })
    }
}
