//! Telling an outage from a failed statement.
//!
//! A statement can fail because of what it asked (a unique key taken, a
//! value refused), which is that statement's own outcome, or because the
//! database went away or is not ready, which says nothing about the
//! statement and fails everything that runs at the same time. Batches use
//! the difference: a row that fails on its own gets its own error, an outage
//! fails the batch.

use diesel::result::{DatabaseErrorKind, Error};

/// Server messages that mean the database went away or is not ready; diesel
/// reports them with kind `Unknown`, so they are recognised by text.
const OUTAGE_MESSAGES: &[&str] = &[
    "terminating connection",
    "the database system is shutting down",
    "the database system is starting up",
    "the database system is in recovery mode",
    "canceling statement due to statement timeout",
    "connection closed",
];

/// Whether `error` means the database cannot be reached or cannot serve now.
pub fn is_outage(error: &Error) -> bool {
    match error {
        Error::DatabaseError(
            DatabaseErrorKind::UnableToSendCommand | DatabaseErrorKind::ClosedConnection,
            _,
        ) => true,
        Error::DatabaseError(_, info) => OUTAGE_MESSAGES.iter().any(|m| info.message().contains(m)),
        _ => false,
    }
}
