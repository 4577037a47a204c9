//! Avatar image URLs.

use std::fmt;

use url::Url;

/// Long enough for signed CDN links, short enough to bound row size.
const MAX_CHARS: usize = 2048;

/// An absolute `http` or `https` URL with a host, at most 2048 characters,
/// stored as the `url` crate serializes it (e.g. `HTTPS://Example.com`
/// becomes `https://example.com/`).
///
/// Other schemes are rejected because clients render this URL: `javascript:`
/// or `data:` would be an injection vector, `ftp:` or `file:` would not load.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct AvatarUrl(String);

impl AvatarUrl {
    pub fn parse(input: &str) -> Result<Self, String> {
        let too_long = || format!("must be at most {MAX_CHARS} characters");
        // Checked before parsing to bound the work, and after, because
        // serialization can grow the text (percent-encoding, a trailing `/`).
        if input.chars().count() > MAX_CHARS {
            return Err(too_long());
        }
        let url = Url::parse(input)
            .ok()
            .filter(|url| matches!(url.scheme(), "http" | "https") && url.has_host())
            .ok_or_else(|| "must be an absolute http or https URL".to_owned())?;
        let url = String::from(url);
        if url.chars().count() > MAX_CHARS {
            return Err(too_long());
        }
        Ok(Self(url))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn into_inner(self) -> String {
        self.0
    }
}

impl fmt::Display for AvatarUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A URL of exactly `len` characters that the url crate leaves unchanged.
    fn url_of_len(len: usize) -> String {
        let prefix = "https://example.com/";
        format!("{prefix}{}", "a".repeat(len - prefix.len()))
    }

    #[test]
    fn accepts_http_and_https() {
        for input in [
            "https://example.com/a.png",
            "http://cdn.example.com:8080/u/1?size=64#x",
            "https://192.0.2.1/a.png",
        ] {
            assert_eq!(AvatarUrl::parse(input).unwrap().as_str(), input);
        }
    }

    #[test]
    fn stores_the_serialized_form() {
        let url = AvatarUrl::parse("HTTPS://Example.COM").unwrap();
        assert_eq!(url.as_str(), "https://example.com/");
        // WHATWG parsing skips extra slashes after a special scheme.
        assert_eq!(
            AvatarUrl::parse("http:///a.png").unwrap().as_str(),
            "http://a.png/"
        );
        assert_eq!(
            AvatarUrl::parse("https://example.com/a b.png")
                .unwrap()
                .into_inner(),
            "https://example.com/a%20b.png"
        );
    }

    #[test]
    fn rejects_other_schemes_and_relative_urls() {
        for input in [
            "",
            "ftp://x",
            "javascript:alert(1)",
            "JavaScript:alert(1)",
            "data:image/png;base64,AAAA",
            "file:///etc/passwd",
            "mailto:a@example.com",
            "/avatars/1.png",
            "example.com/a.png",
            "https://",
            "http://",
        ] {
            assert!(
                AvatarUrl::parse(input).is_err(),
                "{input:?} should be rejected"
            );
        }
    }

    #[test]
    fn length_boundary_is_2048_characters() {
        assert_eq!(
            AvatarUrl::parse(&url_of_len(2048)).unwrap().as_str().len(),
            2048
        );
        assert_eq!(
            AvatarUrl::parse(&url_of_len(2049)).unwrap_err(),
            "must be at most 2048 characters"
        );
    }

    #[test]
    fn rejects_input_that_grows_past_the_limit_when_serialized() {
        // Each space becomes `%20`: 2046 characters in, 2050 out.
        let input = format!("{}  x", url_of_len(2043));
        assert_eq!(input.chars().count(), 2046);
        assert_eq!(
            AvatarUrl::parse(&input).unwrap_err(),
            "must be at most 2048 characters"
        );
    }
}
