//! The one error type of the service and its mapping to `tonic::Status`.
//!
//! Handlers and store calls fail with [`Error`]; it becomes a status in one
//! place ([`From<Error> for Status`]). Infrastructure errors are classified
//! here by kind; their causes are logged, never sent to the caller.

use std::collections::HashMap;

use diesel::result::Error as DieselError;
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use std::time::Duration;

use crate::domain::FieldViolation;
use crate::store::StoreError;
use crate::telemetry::Summarized;

/// `google.rpc.ErrorInfo.domain` of every error this service reports.
pub const ERROR_DOMAIN: &str = "users-service";

type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// INVALID_ARGUMENT, with one `google.rpc.BadRequest` violation per bad
    /// field (all of them, not only the first) and `ErrorInfo`
    /// (reason `INVALID_ARGUMENT`).
    #[error("invalid request")]
    InvalidArgument(Vec<FieldViolation>),
    /// NOT_FOUND: no `resource` ("user", "tenant") has the requested id.
    #[error("{0} not found")]
    NotFound(&'static str),
    /// ALREADY_EXISTS: a unique field clashes; `ErrorInfo` (reason
    /// `ALREADY_EXISTS`) names the resource and the field.
    #[error("a {resource} with this {field} already exists")]
    AlreadyExists {
        resource: &'static str,
        field: &'static str,
    },
    /// ALREADY_EXISTS with reason `USER_DELETED`: a deleted user holds the
    /// reference until it is undeleted or purged.
    #[error("a deleted user holds this reference")]
    Reserved,
    /// ABORTED with reason `ETAG_MISMATCH`: the write named an etag that is
    /// no longer the user's; `etag` (in the ErrorInfo metadata) is the
    /// current one. Read again, then write again.
    #[error("the user changed since its etag was read")]
    Stale { etag: String },
    /// FAILED_PRECONDITION: the resource is not in the state this call
    /// needs; `reason` is the ErrorInfo reason.
    #[error("{message}")]
    FailedPrecondition {
        reason: &'static str,
        message: &'static str,
    },
    /// INVALID_ARGUMENT with reason `REQUEST_ID_REUSED`: the request id
    /// was used by this caller for another request.
    #[error("request_id was used for another request")]
    RequestIdReused,
    /// PERMISSION_DENIED: the caller is known but may not do this.
    #[error("permission denied: {0}")]
    PermissionDenied(&'static str),
    /// OUT_OF_RANGE with reason `TOKEN_EXPIRED`: a position the service no
    /// longer keeps (a change feed token older than its retention).
    #[error("{0}")]
    OutOfRange(&'static str),
    /// RESOURCE_EXHAUSTED: a bounded resource (such as concurrent exports)
    /// is all in use. Retry later.
    #[error("{0}")]
    TooBusy(&'static str),
    /// UNAVAILABLE: the database cannot be reached or has no free connection
    /// in time. Safe to retry.
    #[error("database unavailable")]
    Unavailable(#[source] BoxError),
    /// INTERNAL: anything else. Logged with its cause; the caller sees a
    /// generic message.
    #[error("internal error")]
    Internal(#[source] BoxError),
}

impl Error {
    /// An INVALID_ARGUMENT about one field.
    pub fn invalid(field: impl Into<String>, description: impl Into<String>) -> Self {
        Self::InvalidArgument(vec![FieldViolation {
            field: field.into(),
            description: description.into(),
        }])
    }

    /// The same error for another caller of a shared batch. A cause is
    /// carried over as its text: it is only ever logged.
    pub fn duplicate(&self) -> Self {
        match self {
            Self::InvalidArgument(violations) => Self::InvalidArgument(violations.clone()),
            Self::NotFound(resource) => Self::NotFound(resource),
            Self::AlreadyExists { resource, field } => Self::AlreadyExists { resource, field },
            Self::Reserved => Self::Reserved,
            Self::Stale { etag } => Self::Stale { etag: etag.clone() },
            Self::FailedPrecondition { reason, message } => {
                Self::FailedPrecondition { reason, message }
            }
            Self::RequestIdReused => Self::RequestIdReused,
            Self::PermissionDenied(what) => Self::PermissionDenied(what),
            Self::TooBusy(what) => Self::TooBusy(what),
            Self::OutOfRange(what) => Self::OutOfRange(what),
            Self::Unavailable(cause) => Self::Unavailable(cause.to_string().into()),
            Self::Internal(cause) => Self::Internal(cause.to_string().into()),
        }
    }
}

/// Unique indexes whose violation is the caller's clash, by index name.
const UNIQUE_FIELDS: &[(&str, &str, &str)] = &[
    ("users_tenant_email_key", "user", "email"),
    ("users_tenant_reference_key", "user", "reference"),
    ("tenants_reference_key", "tenant", "reference"),
];

impl From<StoreError> for Error {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::Unavailable(cause) => Self::Unavailable(cause.to_string().into()),
            StoreError::Unique(Some(index)) => {
                match UNIQUE_FIELDS.iter().find(|(name, ..)| **name == *index) {
                    Some((_, resource, field)) => Self::AlreadyExists { resource, field },
                    None => Self::Internal(format!("unique index {index} refused a row").into()),
                }
            }
            StoreError::ForeignKey(Some(constraint)) if &*constraint == "users_tenant_id_fkey" => {
                Self::invalid("user.tenant_id", "no tenant has this id")
            }
            StoreError::Check(Some(constraint)) if &*constraint == "users_tenant_live" => {
                Self::FailedPrecondition {
                    reason: "TENANT_DELETED",
                    message: "the tenant is deleted: no user can be written in it",
                }
            }
            other => Self::Internal(other.into()),
        }
    }
}

impl From<DieselError> for Error {
    fn from(error: DieselError) -> Self {
        StoreError::from(error).into()
    }
}

impl From<diesel_async::pooled_connection::deadpool::PoolError> for Error {
    fn from(error: diesel_async::pooled_connection::deadpool::PoolError) -> Self {
        StoreError::from(error).into()
    }
}

/// Most field violations one answer carries: they travel in the response
/// headers, which clients cap (often at 16 KiB), so a request with hundreds
/// of bad values gets the first ones and a count of the rest.
pub const MAX_REPORTED_VIOLATIONS: usize = 20;
/// Violations spelled out in the status message too.
const VIOLATIONS_IN_MESSAGE: usize = 3;

/// The violations to report: the first ones, then one that counts the rest.
fn reported(mut violations: Vec<FieldViolation>) -> Vec<FieldViolation> {
    if violations.len() > MAX_REPORTED_VIOLATIONS {
        let more = violations.len() - (MAX_REPORTED_VIOLATIONS - 1);
        violations.truncate(MAX_REPORTED_VIOLATIONS - 1);
        violations.push(FieldViolation {
            field: "request".to_owned(),
            description: format!("and {more} more violations"),
        });
    }
    violations
}

impl From<Error> for Status {
    fn from(error: Error) -> Self {
        match error {
            Error::InvalidArgument(violations) => {
                let violations = reported(violations);
                let mut message = violations
                    .iter()
                    .take(VIOLATIONS_IN_MESSAGE)
                    .map(|v| format!("{}: {}", v.field, v.description))
                    .collect::<Vec<_>>()
                    .join("; ");
                if violations.len() > VIOLATIONS_IN_MESSAGE {
                    message.push_str(&format!(
                        "; and {} more in the details",
                        violations.len() - VIOLATIONS_IN_MESSAGE
                    ));
                }
                let fields = violations
                    .iter()
                    .map(|v| v.field.as_str())
                    .collect::<Vec<_>>()
                    .join(",");
                let mut details = ErrorDetails::new();
                for violation in &violations {
                    details.add_bad_request_violation(&violation.field, &violation.description);
                }
                details.set_error_info(
                    "INVALID_ARGUMENT",
                    ERROR_DOMAIN,
                    HashMap::from([("fields".to_owned(), fields)]),
                );
                Status::with_error_details(
                    Code::InvalidArgument,
                    format!("invalid request: {message}"),
                    details,
                )
            }
            Error::NotFound(resource) => {
                let mut details = ErrorDetails::new();
                details.set_error_info(
                    "NOT_FOUND",
                    ERROR_DOMAIN,
                    HashMap::from([("resource".to_owned(), resource.to_owned())]),
                );
                Status::with_error_details(Code::NotFound, format!("{resource} not found"), details)
            }
            Error::AlreadyExists { resource, field } => {
                let mut details = ErrorDetails::new();
                details.set_error_info(
                    "ALREADY_EXISTS",
                    ERROR_DOMAIN,
                    HashMap::from([
                        ("resource".to_owned(), resource.to_owned()),
                        ("field".to_owned(), field.to_owned()),
                    ]),
                );
                Status::with_error_details(
                    Code::AlreadyExists,
                    format!("a {resource} with this {field} already exists"),
                    details,
                )
            }
            Error::Reserved => {
                let mut details = ErrorDetails::new();
                details.set_error_info(
                    "USER_DELETED",
                    ERROR_DOMAIN,
                    HashMap::from([
                        ("resource".to_owned(), "user".to_owned()),
                        ("field".to_owned(), "reference".to_owned()),
                    ]),
                );
                Status::with_error_details(
                    Code::AlreadyExists,
                    "a deleted user holds this reference: undelete or purge it first",
                    details,
                )
            }
            Error::Stale { etag } => {
                let mut details = ErrorDetails::new();
                details.set_error_info(
                    "ETAG_MISMATCH",
                    ERROR_DOMAIN,
                    HashMap::from([("etag".to_owned(), etag)]),
                );
                Status::with_error_details(
                    Code::Aborted,
                    "the user changed since its etag was read: read it again and retry",
                    details,
                )
            }
            Error::FailedPrecondition { reason, message } => {
                let mut details = ErrorDetails::new();
                details.set_error_info(reason, ERROR_DOMAIN, HashMap::new());
                Status::with_error_details(Code::FailedPrecondition, message, details)
            }
            Error::RequestIdReused => {
                let mut details = ErrorDetails::new();
                details.add_bad_request_violation(
                    "request_id",
                    "was used for another request: send a new id with each new request",
                );
                details.set_error_info(
                    "REQUEST_ID_REUSED",
                    ERROR_DOMAIN,
                    HashMap::from([("fields".to_owned(), "request_id".to_owned())]),
                );
                Status::with_error_details(
                    Code::InvalidArgument,
                    "invalid request: request_id was used for another request",
                    details,
                )
            }
            Error::PermissionDenied(what) => {
                let mut details = ErrorDetails::new();
                details.set_error_info("PERMISSION_DENIED", ERROR_DOMAIN, HashMap::new());
                Status::with_error_details(
                    Code::PermissionDenied,
                    format!("permission denied: {what}"),
                    details,
                )
            }
            Error::TooBusy(what) => Status::resource_exhausted(what),
            Error::OutOfRange(what) => {
                let mut details = ErrorDetails::new();
                details.set_error_info("TOKEN_EXPIRED", ERROR_DOMAIN, HashMap::new());
                Status::with_error_details(Code::OutOfRange, what, details)
            }
            Error::Unavailable(cause) => {
                static SUMMARY: Summarized = Summarized::new(Duration::from_secs(1));
                if let Some(calls) = SUMMARY.due() {
                    tracing::warn!(error = %cause, calls, "database unavailable");
                }
                Status::unavailable("database unavailable, retry later")
            }
            Error::Internal(cause) => {
                static SUMMARY: Summarized = Summarized::new(Duration::from_secs(1));
                if let Some(calls) = SUMMARY.due() {
                    tracing::error!(error = %cause, calls, "internal error");
                }
                Status::internal("internal error")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hundreds_of_violations_fit_in_a_response_header() {
        let violations: Vec<FieldViolation> = (0..500)
            .map(|i| FieldViolation {
                field: format!("filter.id.value_in[{i}]"),
                description: "must be a UUID such as 0190c8f2-5b7e-7c1a-9d3e-2f4a6b8c0d1e".into(),
            })
            .collect();
        let status = Status::from(Error::InvalidArgument(violations));
        assert!(status.message().len() < 400, "{}", status.message());
        assert!(status.message().ends_with("and 17 more in the details"));
        // Base64 in the header makes the details a third larger.
        assert!(
            status.details().len() * 4 / 3 < 8 * 1024,
            "{}",
            status.details().len()
        );
        let details = status.get_error_details();
        let reported = &details.bad_request().unwrap().field_violations;
        assert_eq!(reported.len(), MAX_REPORTED_VIOLATIONS);
        assert_eq!(reported[19].description, "and 481 more violations");
    }
}
