//! Why a store call failed, in storage terms.
//!
//! A statement can fail because of what it asked (a unique key taken, a
//! value refused), which is that statement's own outcome, or because the
//! database went away or is not ready, which says nothing about the
//! statement and fails everything that runs at the same time. Batches use
//! the difference: a row that fails on its own gets its own error, an outage
//! fails the batch. `crate::error` maps these to gRPC statuses.

use std::sync::Arc;

use diesel::result::{DatabaseErrorKind, Error as DieselError};
use diesel_async::pooled_connection::deadpool::PoolError;

/// A failed store call. Clonable: one failed batch answers many callers.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The database cannot be reached or cannot serve now: no connection in
    /// time, a connection lost, a server shutting down or starting, a
    /// statement over its time limit.
    #[error("database unavailable: {0}")]
    Unavailable(Arc<str>),
    /// A unique index refused the row; its name when Postgres gave one.
    #[error("unique index {0:?} refused the row")]
    Unique(Option<Arc<str>>),
    /// A foreign key refused the row; its name when Postgres gave one.
    #[error("foreign key {0:?} refused the row")]
    ForeignKey(Option<Arc<str>>),
    /// A check (constraint or trigger) refused the row; its name when
    /// Postgres gave one.
    #[error("check {0:?} refused the row")]
    Check(Option<Arc<str>>),
    /// Anything else Postgres or the driver refused.
    #[error("{0}")]
    Other(Arc<str>),
}

impl StoreError {
    /// Whether this fails everything running now, not only one statement.
    pub fn is_outage(&self) -> bool {
        matches!(self, Self::Unavailable(_))
    }
}

/// Server messages that mean the database went away or is not ready, by
/// SQLSTATE class 57 (operator intervention) and 08 (connection exception),
/// or has no room left to write (53100).
/// diesel-async keeps the SQLSTATE of only a few errors and reports these
/// with kind `Unknown`, so they are recognised by their message, which is
/// English for every connection of this service: the embedded cluster runs
/// with `lc_messages=C`, and the pool sets it on each connection where the
/// server allows (see `db::build_pool`).
pub(crate) const OUTAGE_MESSAGES: &[&str] = &[
    // 57P01 admin_shutdown, 57P02 crash_shutdown: "terminating connection
    // due to administrator command" / "... because of crash of another
    // server process".
    "terminating connection",
    // 57P03 cannot_connect_now.
    "the database system is shutting down",
    "the database system is starting up",
    "the database system is in recovery mode",
    "the database system is not yet accepting connections",
    // 57014 query_canceled, from the pool's statement_timeout.
    "canceling statement due to statement timeout",
    // A standby's replay needed what a read held (hot standby).
    "canceling statement due to conflict with recovery",
    // A server that was the primary is a standby now.
    "cannot execute INSERT in a read-only transaction",
    "cannot execute UPDATE in a read-only transaction",
    "cannot execute DELETE in a read-only transaction",
    // The driver's own words for a connection that closed under a statement.
    "connection closed",
    // 53100 disk_full, and any file Postgres cannot write for want of room
    // ("could not extend file ...: No space left on device"): the server's
    // state, not the request's, and it passes once room is made.
    "No space left on device",
];

/// Whether `error` means the database cannot be reached or cannot serve now.
pub fn is_outage(error: &DieselError) -> bool {
    match error {
        DieselError::DatabaseError(
            DatabaseErrorKind::UnableToSendCommand | DatabaseErrorKind::ClosedConnection,
            _,
        ) => true,
        DieselError::DatabaseError(_, info) => {
            OUTAGE_MESSAGES.iter().any(|m| info.message().contains(m))
        }
        _ => false,
    }
}

impl From<DieselError> for StoreError {
    fn from(error: DieselError) -> Self {
        let named = |info: &dyn diesel::result::DatabaseErrorInformation| {
            info.constraint_name().map(Arc::from)
        };
        match &error {
            _ if is_outage(&error) => Self::Unavailable(error.to_string().into()),
            DieselError::DatabaseError(DatabaseErrorKind::UniqueViolation, info) => {
                Self::Unique(named(info.as_ref()))
            }
            DieselError::DatabaseError(DatabaseErrorKind::ForeignKeyViolation, info) => {
                Self::ForeignKey(named(info.as_ref()))
            }
            DieselError::DatabaseError(DatabaseErrorKind::CheckViolation, info) => {
                Self::Check(named(info.as_ref()))
            }
            _ => Self::Other(error.to_string().into()),
        }
    }
}

impl From<PoolError> for StoreError {
    fn from(error: PoolError) -> Self {
        use deadpool::managed::PoolError as Kind;
        match error {
            // No connection free in time, or none could be opened: the
            // database is overloaded or unreachable.
            Kind::Timeout(_) | Kind::Backend(_) | Kind::Closed => {
                Self::Unavailable(error.to_string().into())
            }
            Kind::NoRuntimeSpecified | Kind::PostCreateHook(_) => {
                Self::Other(error.to_string().into())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A database error as diesel reports it, with `message`.
    fn database(kind: DatabaseErrorKind, message: &str) -> DieselError {
        DieselError::DatabaseError(kind, Box::new(message.to_owned()))
    }

    #[test]
    fn connection_errors_are_outages_by_kind() {
        for kind in [
            DatabaseErrorKind::UnableToSendCommand,
            DatabaseErrorKind::ClosedConnection,
        ] {
            assert!(StoreError::from(database(kind, "anything")).is_outage());
        }
    }

    #[test]
    fn every_outage_message_is_an_outage_and_nothing_else_is() {
        let cases = [
            "terminating connection due to administrator command",
            "terminating connection because of crash of another server process",
            "the database system is shutting down",
            "the database system is starting up",
            "the database system is in recovery mode",
            "the database system is not yet accepting connections",
            "canceling statement due to statement timeout",
            "connection closed",
            "could not extend file \"base/16384/16390\": No space left on device",
        ];
        for message in cases {
            let error = StoreError::from(database(DatabaseErrorKind::Unknown, message));
            assert!(error.is_outage(), "{message}");
        }
        for message in [
            "invalid input syntax for type uuid",
            "canceling statement due to user request",
            "deadlock detected",
        ] {
            let error = StoreError::from(database(DatabaseErrorKind::Unknown, message));
            assert!(
                matches!(error, StoreError::Other(_)),
                "{message}: {error:?}"
            );
        }
    }

    #[test]
    fn unique_and_foreign_key_violations_keep_their_kind() {
        assert!(matches!(
            StoreError::from(database(DatabaseErrorKind::UniqueViolation, "dup")),
            StoreError::Unique(_)
        ));
        assert!(matches!(
            StoreError::from(database(DatabaseErrorKind::ForeignKeyViolation, "fk")),
            StoreError::ForeignKey(_)
        ));
        assert_eq!(
            StoreError::from(DieselError::NotFound),
            StoreError::Other("Record not found".into())
        );
    }
}
