//! Locales, as BCP 47 language tags.

use std::fmt;

/// The locale the service assumes when a user has not chosen one.
const DEFAULT: &str = "en-US";
/// Longest input: bounds the parser's work; real tags are far shorter.
const MAX_INPUT_CHARS: usize = 64;

/// A BCP 47 language tag (`language[-script][-region][-variant...]`) in
/// canonical form: each subtag in its canonical case and variants sorted,
/// so `en-Us` becomes `en-US`.
///
/// Underscore-separated POSIX forms such as `en_US` are not BCP 47 and are
/// rejected rather than guessed at.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Locale(String);

impl Locale {
    pub fn parse(input: &str) -> Result<Self, String> {
        if input.len() > MAX_INPUT_CHARS {
            return Err(format!("must be at most {MAX_INPUT_CHARS} characters"));
        }
        canonicalize(input)
            .map(Self)
            .ok_or_else(|| "must be a BCP 47 language tag such as en-US".to_owned())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn into_inner(self) -> String {
        self.0
    }
}

/// The service's default locale, `en-US`.
impl Default for Locale {
    fn default() -> Self {
        Self(DEFAULT.to_owned())
    }
}

impl fmt::Display for Locale {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The canonical form of a BCP 47 tag, or `None` if malformed.
fn canonicalize(input: &str) -> Option<String> {
    // ICU4X accepts `_` as a separator for compatibility; BCP 47 does not.
    if input.contains('_') {
        return None;
    }
    icu_locale_core::Locale::try_from_str(input)
        .ok()
        .map(|locale| locale.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlong_input_is_refused_before_parsing() {
        let long = format!("en-US-x-{}", "abcdefgh-".repeat(7));
        assert!(long.len() > 64);
        assert_eq!(
            Locale::parse(&long).unwrap_err(),
            "must be at most 64 characters"
        );
    }

    fn canonical(input: &str) -> String {
        Locale::parse(input).unwrap().into_inner()
    }

    #[test]
    fn accepts_and_canonicalizes_tags() {
        assert_eq!(canonical("en-US"), "en-US");
        assert_eq!(canonical("en-Us"), "en-US");
        assert_eq!(canonical("EN-us"), "en-US");
        assert_eq!(canonical("fr"), "fr");
        assert_eq!(canonical("und"), "und");
        assert_eq!(canonical("zh-hant-tw"), "zh-Hant-TW");
        assert_eq!(canonical("sr-LATN"), "sr-Latn");
        assert_eq!(canonical("es-419"), "es-419");
        assert_eq!(canonical("ca-ES-VALENCIA"), "ca-ES-valencia");
        assert_eq!(canonical("sl-rozaj-biske-1994"), "sl-1994-biske-rozaj");
    }

    #[test]
    fn rejects_non_bcp47_input() {
        for input in [
            "",
            "EN_us",
            "en_US",
            "english",
            "e",
            "en-",
            "-US",
            "en--US",
            "en US",
            "en-US!",
            "en-US-x",
            "12-US",
            "en-Latn-Latn",
            "en-US-US",
            "de-1996-1996",
        ] {
            assert!(
                Locale::parse(input).is_err(),
                "{input:?} should be rejected"
            );
        }
    }

    #[test]
    fn default_is_en_us() {
        assert_eq!(Locale::default().as_str(), "en-US");
        assert_eq!(Locale::default(), Locale::parse("en-US").unwrap());
    }

    #[test]
    fn displays_canonical_form() {
        assert_eq!(Locale::parse("pt-br").unwrap().to_string(), "pt-BR");
    }
}
