//! Time zones, as IANA zone names.

use std::fmt;

use chrono_tz::Tz;

/// Longest input; the longest IANA name has 32 characters.
const MAX_INPUT_CHARS: usize = 64;

/// An IANA time zone name in the database's own spelling
/// (`asia/bangkok` becomes `Asia/Bangkok`). Input is matched
/// case-insensitively.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TimeZone(Tz);

impl TimeZone {
    pub fn parse(input: &str) -> Result<Self, String> {
        if input.len() > MAX_INPUT_CHARS {
            return Err(format!("must be at most {MAX_INPUT_CHARS} characters"));
        }
        Tz::from_str_insensitive(input)
            .ok()
            .map(Self)
            .ok_or_else(|| "must be an IANA time zone name such as Europe/Paris".to_owned())
    }

    pub fn as_str(&self) -> &'static str {
        self.0.name()
    }

    pub fn into_inner(self) -> String {
        self.0.name().to_owned()
    }

    /// The zone itself, for date arithmetic.
    pub fn tz(&self) -> Tz {
        self.0
    }
}

impl fmt::Display for TimeZone {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlong_input_is_refused_before_lookup() {
        assert_eq!(
            TimeZone::parse(&"a".repeat(65)).unwrap_err(),
            "must be at most 64 characters"
        );
        assert_eq!(canonical("America/Argentina/ComodRivadavia").len(), 32);
    }

    fn canonical(input: &str) -> &'static str {
        TimeZone::parse(input).unwrap().as_str()
    }

    #[test]
    fn accepts_canonical_names() {
        assert_eq!(canonical("Asia/Bangkok"), "Asia/Bangkok");
        assert_eq!(canonical("UTC"), "UTC");
        assert_eq!(
            canonical("America/Argentina/Buenos_Aires"),
            "America/Argentina/Buenos_Aires"
        );
    }

    #[test]
    fn matches_case_insensitively_and_stores_canonical_spelling() {
        assert_eq!(canonical("asia/bangkok"), "Asia/Bangkok");
        assert_eq!(canonical("EUROPE/PARIS"), "Europe/Paris");
        assert_eq!(canonical("utc"), "UTC");
    }

    #[test]
    fn rejects_unknown_names() {
        for input in [
            "",
            "Mars/Olympus",
            "Asia/Bangkok ",
            "+07:00",
            "Bangkok",
            "asia/bang kok",
        ] {
            assert!(
                TimeZone::parse(input).is_err(),
                "{input:?} should be rejected"
            );
        }
    }

    #[test]
    fn exposes_the_zone() {
        let zone = TimeZone::parse("asia/bangkok").unwrap();
        assert_eq!(zone.tz(), chrono_tz::Asia::Bangkok);
        assert_eq!(zone.to_string(), "Asia/Bangkok");
        assert_eq!(zone.into_inner(), "Asia/Bangkok");
    }
}
