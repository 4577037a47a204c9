//! Email addresses, as the HTML living standard's "valid email address".

use std::fmt;
use std::sync::LazyLock;

use regex::Regex;

/// The longest address SMTP can carry (RFC 5321 path limit minus the brackets).
const MAX_CHARS: usize = 254;

// The HTML living standard's own regex: deliberately stricter than RFC 5322
// (no quoted local parts, no IP literals), matching what browsers accept.
static EMAIL: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(
        r"^[a-zA-Z0-9.!#$%&'*+/=?^_`{|}~-]+@[a-zA-Z0-9](?:[a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?)*$",
    )
    .expect("the email regex is valid")
});

/// An email address: HTML "valid email address" syntax, at most 254
/// characters, stored exactly as given (case preserved).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Email(String);

impl Email {
    /// Parses an address. The empty string is an error: callers map an
    /// empty field to "no email" before getting here.
    pub fn parse(input: &str) -> Result<Self, String> {
        // The length check comes first so oversized input never reaches the regex.
        if input.chars().count() > MAX_CHARS {
            return Err(format!("must be at most {MAX_CHARS} characters"));
        }
        if !EMAIL.is_match(input) {
            return Err("must be an email address such as name@example.com".to_owned());
        }
        Ok(Self(input.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn into_inner(self) -> String {
        self.0
    }
}

impl fmt::Display for Email {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An address of exactly `len` characters.
    fn address_of_len(len: usize) -> String {
        let domain = "@example.com";
        format!("{}{domain}", "a".repeat(len - domain.len()))
    }

    #[test]
    fn accepts_valid_addresses_and_preserves_case() {
        for input in [
            "a@b",
            "Ada.Lovelace@Example.COM",
            "user+tag@sub.example.co.uk",
            "o'brien!#$%&*/=?^_`{|}~-@x-y.example",
        ] {
            assert_eq!(Email::parse(input).unwrap().as_str(), input);
        }
    }

    #[test]
    fn rejects_invalid_addresses() {
        for input in [
            "",
            "plain",
            "@example.com",
            "user@",
            "user@@example.com",
            "user@-example.com",
            "user@example-.com",
            "user@example..com",
            "user@.example.com",
            "us er@example.com",
            "\"quoted\"@example.com",
            "user@[127.0.0.1]",
            "ünï@example.com",
            " user@example.com",
        ] {
            assert!(Email::parse(input).is_err(), "{input:?} should be rejected");
        }
    }

    #[test]
    fn rejects_a_domain_label_longer_than_63() {
        assert!(Email::parse(&format!("u@{}.com", "a".repeat(63))).is_ok());
        assert!(Email::parse(&format!("u@{}.com", "a".repeat(64))).is_err());
    }

    #[test]
    fn length_boundary_is_254_characters() {
        assert!(Email::parse(&address_of_len(254)).is_ok());
        assert_eq!(
            Email::parse(&address_of_len(255)).unwrap_err(),
            "must be at most 254 characters"
        );
    }

    #[test]
    fn displays_and_unwraps_as_given() {
        let email = Email::parse("Ada@Example.com").unwrap();
        assert_eq!(email.to_string(), "Ada@Example.com");
        assert_eq!(email.into_inner(), "Ada@Example.com");
    }
}
