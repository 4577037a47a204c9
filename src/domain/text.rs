//! Short free text: names, references and similar single-line fields.

use std::fmt;

/// Fits a `VARCHAR(255)`-sized column and any UI label.
const MAX_CHARS: usize = 255;

/// Text of at most 255 characters (Unicode scalar values, not bytes) with no
/// control characters. Empty text is allowed: whether a field is required is
/// the caller's decision.
///
/// Control characters (newlines, tabs, NUL, escape sequences) are rejected
/// because these values end up in logs, headers and single-line UI.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct ShortText(String);

impl ShortText {
    pub fn parse(input: &str) -> Result<Self, String> {
        if input.chars().count() > MAX_CHARS {
            return Err(format!("must be at most {MAX_CHARS} characters"));
        }
        if input.chars().any(char::is_control) {
            return Err("must not contain control characters".to_owned());
        }
        Ok(Self(input.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn into_inner(self) -> String {
        self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Display for ShortText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_ordinary_text_as_given() {
        for input in [
            "",
            "Ada Lovelace",
            "  spaced  ",
            "Zoë Ñúñez",
            "李小龍",
            "👩‍💻 dev",
        ] {
            assert_eq!(ShortText::parse(input).unwrap().as_str(), input);
        }
    }

    #[test]
    fn length_boundary_is_255_characters_not_bytes() {
        let at_limit = "é".repeat(255);
        assert!(at_limit.len() > 255);
        assert_eq!(ShortText::parse(&at_limit).unwrap().into_inner(), at_limit);
        assert_eq!(
            ShortText::parse(&"a".repeat(256)).unwrap_err(),
            "must be at most 255 characters"
        );
    }

    #[test]
    fn rejects_control_characters() {
        for input in [
            "line\nbreak",
            "tab\there",
            "nul\0",
            "esc\u{1b}[31m",
            "del\u{7f}",
            "c1\u{85}",
        ] {
            assert_eq!(
                ShortText::parse(input).unwrap_err(),
                "must not contain control characters",
                "{input:?}"
            );
        }
    }

    #[test]
    fn default_is_empty() {
        assert!(ShortText::default().is_empty());
        assert_eq!(ShortText::parse("x").unwrap().to_string(), "x");
    }
}
