//! API key tokens: `usk_<id>_<secret>`, with a 64-bit public id and a
//! 256-bit random secret, both hex. Only the SHA-256 of the secret is stored.

use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

const PREFIX: &str = "usk_";
const ID_BYTES: usize = 8;
const SECRET_BYTES: usize = 32;

/// A parsed (or freshly generated) API key token.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKeyToken {
    id: String,
    secret: String,
}

/// Never print the secret.
impl std::fmt::Debug for ApiKeyToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiKeyToken")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl ApiKeyToken {
    pub fn generate() -> Self {
        let mut rng = rand::rng();
        let mut id = [0u8; ID_BYTES];
        let mut secret = [0u8; SECRET_BYTES];
        rng.fill_bytes(&mut id);
        rng.fill_bytes(&mut secret);
        Self {
            id: hex::encode(id),
            secret: hex::encode(secret),
        }
    }

    /// Parses `usk_<16 hex>_<64 hex>`; anything else is not a key.
    pub fn parse(token: &str) -> Option<Self> {
        let rest = token.strip_prefix(PREFIX)?;
        let (id, secret) = rest.split_once('_')?;
        let is_hex = |s: &str, bytes: usize| {
            s.len() == bytes * 2 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        };
        (is_hex(id, ID_BYTES) && is_hex(secret, SECRET_BYTES)).then(|| Self {
            id: id.to_owned(),
            secret: secret.to_owned(),
        })
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// The whole token, to show once to whoever created the key.
    pub fn reveal(&self) -> String {
        format!("{PREFIX}{}_{}", self.id, self.secret)
    }

    /// What the database keeps instead of the secret.
    pub fn secret_sha256(&self) -> Vec<u8> {
        Sha256::digest(self.secret.as_bytes()).to_vec()
    }

    /// Compares with a stored hash in constant time.
    pub fn matches(&self, stored_sha256: &[u8]) -> bool {
        self.secret_sha256().ct_eq(stored_sha256).into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_tokens_parse_back_and_match_their_hash() {
        let token = ApiKeyToken::generate();
        let parsed = ApiKeyToken::parse(&token.reveal()).unwrap();
        assert_eq!(parsed, token);
        assert!(parsed.matches(&token.secret_sha256()));
        assert!(!ApiKeyToken::generate().matches(&token.secret_sha256()));
    }

    #[test]
    fn malformed_tokens_are_not_keys() {
        let good = ApiKeyToken::generate().reveal();
        for bad in [
            "",
            "usk_",
            &good[..good.len() - 1],
            &good.replace("usk_", "abc_"),
            &good.to_uppercase(),
            &format!("{good}0"),
        ] {
            assert!(ApiKeyToken::parse(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn debug_output_hides_the_secret() {
        let token = ApiKeyToken::generate();
        assert!(!format!("{token:?}").contains(&token.secret));
    }
}
