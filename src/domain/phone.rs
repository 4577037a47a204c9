//! Phone numbers, normalized to E.164.

use std::fmt::{self, Write as _};

use phonenumber::Mode;

/// E.164 caps a number at 15 digits, country code included.
const MAX_DIGITS: usize = 15;

/// Longest input, separators included: bounds the parser's work.
const MAX_INPUT_CHARS: usize = 64;

const EXPECTED: &str = "must be an E.164 phone number such as +15550001234";

/// A phone number in E.164 form (`+15550001234`).
///
/// Input must be in international form (leading `+`); separators such as
/// spaces, dashes and parentheses are accepted and dropped. The number only
/// has to be well formed, not assigned: fictional numbers such as
/// +1 555 000 1234 are accepted.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Phone(String);

impl Phone {
    pub fn parse(input: &str) -> Result<Self, String> {
        if input.len() > MAX_INPUT_CHARS && input.chars().count() > MAX_INPUT_CHARS {
            return Err(format!("must be at most {MAX_INPUT_CHARS} characters"));
        }
        // Without a default region the crate would still guess at some
        // national forms; the contract wants the international form only.
        if !input.trim_start().starts_with('+') {
            return Err(EXPECTED.to_owned());
        }
        // Counted on the input too: for some regions the crate strips what
        // it takes for a carrier code, which would shorten an overlong
        // number into an accepted one.
        let too_many_digits = || format!("must have at most {MAX_DIGITS} digits");
        if input.chars().filter(char::is_ascii_digit).count() > MAX_DIGITS {
            return Err(too_many_digits());
        }
        let number = phonenumber::parse(None, input).map_err(|_| EXPECTED.to_owned())?;
        // E.164 has no room for an extension; storing the number without it
        // would silently change what the client sent.
        if number.extension().is_some() {
            return Err("must not have an extension".to_owned());
        }
        // Formatting fails for country codes missing from the metadata;
        // writing into a String surfaces that instead of panicking.
        let mut e164 = String::new();
        write!(e164, "{}", number.format().mode(Mode::E164)).map_err(|_| EXPECTED.to_owned())?;
        // Letters (vanity numbers) become digits, so the output is checked too.
        if e164.len() - 1 > MAX_DIGITS {
            return Err(too_many_digits());
        }
        Ok(Self(e164))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn into_inner(self) -> String {
        self.0
    }
}

impl fmt::Display for Phone {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlong_input_is_refused_before_parsing() {
        let padded = format!("+1 555 000 1234{}", " ".repeat(50));
        assert_eq!(
            Phone::parse(&padded).unwrap_err(),
            "must be at most 64 characters"
        );
        assert!(Phone::parse(&format!("+1 555 000 1234{}", " ".repeat(40))).is_ok());
    }

    fn normalized(input: &str) -> String {
        Phone::parse(input).unwrap().into_inner()
    }

    #[test]
    fn accepts_fictional_numbers_from_the_contract() {
        assert_eq!(normalized("+15550001234"), "+15550001234");
    }

    #[test]
    fn normalizes_formatting_to_e164() {
        assert_eq!(normalized("+1 (555) 000-1234"), "+15550001234");
        assert_eq!(normalized("+44 20 7946 0958"), "+442079460958");
        assert_eq!(normalized(" +33 1 23 45 67 89"), "+33123456789");
        // Italian numbers keep their leading zero.
        assert_eq!(normalized("+39 06 1234 5678"), "+390612345678");
    }

    #[test]
    fn rejects_numbers_without_a_plus() {
        for input in [
            "15550001234",
            "(555) 000-1234",
            "0015550001234",
            "tel:+15550001234",
        ] {
            assert_eq!(Phone::parse(input).unwrap_err(), EXPECTED, "{input:?}");
        }
    }

    #[test]
    fn rejects_what_the_crate_rejects() {
        for input in [
            "",
            "+",
            "+1",
            "+12",
            "+999 1234 5678",
            "+1 555 000 12!4",
            "+hello",
        ] {
            assert!(Phone::parse(input).is_err(), "{input:?} should be rejected");
        }
    }

    #[test]
    fn accepts_vanity_numbers_as_the_crate_does() {
        assert_eq!(normalized("+1-800-FLOWERS"), "+18003569377");
    }

    #[test]
    fn digit_boundary_is_15() {
        assert_eq!(normalized("+441234567890123"), "+441234567890123");
        let too_long = "must have at most 15 digits";
        assert_eq!(Phone::parse("+4412345678901234").unwrap_err(), too_long);
        // The crate alone would strip a Chinese carrier code and accept this.
        assert_eq!(Phone::parse("+8612345678901234").unwrap_err(), too_long);
    }

    #[test]
    fn rejects_extensions() {
        assert!(Phone::parse("+1 555 000 1234 ext. 5").is_err());
    }

    #[test]
    fn displays_e164() {
        assert_eq!(
            Phone::parse("+1 555 000 1234").unwrap().to_string(),
            "+15550001234"
        );
    }
}
