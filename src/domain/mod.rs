//! Validated domain types, built once at the gRPC edge.
//!
//! Each type can only be constructed through a parser that enforces the
//! service's documented contract, so code past the edge never re-checks.
//! Parse errors are short sentences meant for clients: they become the
//! `description` of a `google.rpc.BadRequest` field violation.

mod avatar_url;
mod custom_data;
mod email;
mod locale;
mod phone;
mod text;
mod time_zone;

pub use avatar_url::AvatarUrl;
pub use custom_data::CustomData;
pub use email::Email;
pub use locale::Locale;
pub use phone::Phone;
pub use text::ShortText;
pub use time_zone::TimeZone;

/// One invalid request field, as reported in `google.rpc.BadRequest`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldViolation {
    pub field: String,
    pub description: String,
}

/// Collects every violated field of a request, so a client learns about all
/// of its mistakes in one round trip instead of one per call.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Violations(Vec<FieldViolation>);

impl Violations {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records the error of `result` under `field`; returns the value on success.
    pub fn check<T>(&mut self, field: &str, result: Result<T, String>) -> Option<T> {
        result
            .map_err(|description| self.push(field, description))
            .ok()
    }

    pub fn push(&mut self, field: impl Into<String>, description: impl Into<String>) {
        self.0.push(FieldViolation {
            field: field.into(),
            description: description.into(),
        });
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn into_vec(self) -> Vec<FieldViolation> {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_collects_every_violation_and_passes_values_through() {
        let mut violations = Violations::new();
        let ok = violations.check("display_name", ShortText::parse("Ada"));
        let bad_email = violations.check("email", Email::parse("nope"));
        let bad_phone = violations.check("phone", Phone::parse("123"));

        assert_eq!(ok.map(ShortText::into_inner), Some("Ada".to_owned()));
        assert!(bad_email.is_none() && bad_phone.is_none());
        assert!(!violations.is_empty());
        let fields: Vec<_> = violations.into_vec().into_iter().map(|v| v.field).collect();
        assert_eq!(fields, ["email", "phone"]);
    }

    #[test]
    fn push_records_a_violation() {
        let mut violations = Violations::new();
        assert!(violations.is_empty());
        violations.push("user_id", "must be a UUID");
        assert_eq!(
            violations.into_vec(),
            [FieldViolation {
                field: "user_id".into(),
                description: "must be a UUID".into(),
            }]
        );
    }
}
