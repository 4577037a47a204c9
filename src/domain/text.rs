//! Short free text: names, references and similar single-line fields.

use std::fmt;

/// Fits a `VARCHAR(255)`-sized column and any UI label.
const MAX_CHARS: usize = 255;

/// Text of at most 255 characters (Unicode scalar values, not bytes) with no
/// control characters and no invisible formatting that changes how the text
/// reads. Empty text is allowed: whether a field is required is the caller's
/// decision.
///
/// Control characters (newlines, tabs, NUL, escape sequences) are rejected
/// because these values end up in logs, headers and single-line UI. So are
/// the characters that make text show other than it is stored: the bidi
/// embeddings, overrides and isolates (U+202A-U+202E, U+2066-U+2069, which
/// let `moc.elpmaxe` read as `example.com`), the zero-width space U+200B,
/// the byte-order mark U+FEFF, and the line and paragraph separators
/// U+2028 and U+2029. The zero-width non-joiner and joiner (U+200C, U+200D)
/// stay: Persian and Indic names need them.
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
        if input.chars().any(misleads) {
            return Err(
                "must not contain invisible or direction-changing characters (U+200B, U+FEFF, U+2028, U+2029, U+202A-U+202E, U+2066-U+2069)"
                    .to_owned(),
            );
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

/// Characters that change how text reads without being seen.
fn misleads(c: char) -> bool {
    matches!(
        c,
        '\u{200B}' | '\u{FEFF}' | '\u{2028}' | '\u{2029}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}'
    )
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
    fn rejects_invisible_and_direction_changing_characters() {
        for c in [
            '\u{202A}', '\u{202B}', '\u{202C}', '\u{202D}', '\u{202E}', '\u{2066}', '\u{2067}',
            '\u{2068}', '\u{2069}', '\u{200B}', '\u{FEFF}', '\u{2028}', '\u{2029}',
        ] {
            let input = format!("Ada{c}Lovelace");
            assert!(
                ShortText::parse(&input)
                    .unwrap_err()
                    .starts_with("must not contain invisible"),
                "{c:?}"
            );
        }
    }

    #[test]
    fn keeps_the_joiners_that_persian_and_indic_names_need() {
        // "Mehrdad" with a ZWNJ, and Devanagari "kṣa" with a ZWJ.
        for input in [
            "\u{0645}\u{06CC}\u{200C}\u{062F}",
            "\u{0915}\u{094D}\u{200D}\u{0937}",
        ] {
            assert_eq!(ShortText::parse(input).unwrap().as_str(), input);
        }
    }

    #[test]
    fn default_is_empty() {
        assert!(ShortText::default().is_empty());
        assert_eq!(ShortText::parse("x").unwrap().to_string(), "x");
    }
}
