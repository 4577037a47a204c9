//! A span per SQL statement in the trace of the call that runs it, named by
//! the statement's kind (`SELECT users`), never by its text or parameters.
//! The statements of a batch (one span for every call it serves, see
//! [`super::coalesce`]) have no span each: the batch's span says their kind.

use std::collections::VecDeque;

use diesel::connection::{Instrumentation, InstrumentationEvent};

use super::coalesce::InBatch;
use crate::telemetry::TRACE_TARGET;

/// Opens a span when a statement starts and ends it when the statement
/// does; statements sent together (a pipeline) end in the order they went.
#[derive(Debug, Default)]
pub struct StatementSpans {
    open: VecDeque<tracing::Span>,
}

impl Instrumentation for StatementSpans {
    fn on_connection_event(&mut self, event: InstrumentationEvent<'_>) {
        match event {
            InstrumentationEvent::StartQuery { query, .. } => {
                // Without an exporter nothing listens: no text is made.
                if !tracing::enabled!(target: TRACE_TARGET, tracing::Level::INFO) || in_batch() {
                    return;
                }
                let text = head(query);
                let (operation, collection) = kind(&text);
                let name = match collection {
                    Some(collection) => format!("{operation} {collection}"),
                    None => operation.to_owned(),
                };
                self.open.push_back(tracing::info_span!(
                    target: TRACE_TARGET,
                    "statement",
                    otel.name = name,
                    otel.kind = "client",
                    db.system.name = "postgresql",
                    db.operation.name = operation,
                    db.collection.name = collection,
                ));
            }
            InstrumentationEvent::FinishQuery { error, .. } => {
                if self.open.is_empty() || in_batch() {
                    return;
                }
                if let Some(span) = self.open.pop_front() {
                    if error.is_some() {
                        span.record("otel.status_code", "error");
                    }
                }
            }
            _ => {}
        }
    }
}

/// Whether the statement runs for a batch (in its trace context).
fn in_batch() -> bool {
    opentelemetry::Context::map_current(|context| context.get::<InBatch>().is_some())
}

/// The start of the statement's SQL: diesel writes the SQL, then its
/// parameters; the writing is cut short before them (neither formatted nor
/// kept), or at [`HEAD`] bytes.
fn head(query: &dyn diesel::connection::DebugQuery) -> String {
    struct Head(String);
    impl std::fmt::Write for Head {
        fn write_str(&mut self, part: &str) -> std::fmt::Result {
            if self.0.len() >= HEAD || self.0.contains(" -- binds") {
                return Err(std::fmt::Error);
            }
            self.0.push_str(part);
            Ok(())
        }
    }
    let mut head = Head(String::with_capacity(HEAD));
    let _ = std::fmt::write(&mut head, format_args!("{query}"));
    head.0
}

/// Enough of a statement to name it.
const HEAD: usize = 512;

/// The statement's operation (its first keyword) and the table it reads or
/// writes first, from its SQL (the text before diesel's `-- binds` note,
/// which is never looked at).
fn kind(text: &str) -> (&'static str, Option<&str>) {
    let sql = text
        .split(" -- binds")
        .next()
        .unwrap_or_default()
        .trim_start();
    let first = sql.split_whitespace().next().unwrap_or_default();
    let operation = [
        "SELECT", "INSERT", "UPDATE", "DELETE", "WITH", "LISTEN", "SET",
    ]
    .into_iter()
    .find(|op| first.eq_ignore_ascii_case(op))
    .unwrap_or("OTHER");
    let after = match operation {
        "INSERT" => " INTO ",
        "UPDATE" => "UPDATE ",
        _ => " FROM ",
    };
    let collection = sql
        .find(after)
        .map(|at| &sql[at + after.len()..])
        .and_then(|rest| rest.split_whitespace().next())
        .map(|table| table.trim_matches('"'))
        .filter(|table| {
            !table.is_empty()
                && table
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.')
        });
    (operation, collection)
}

#[cfg(test)]
mod tests {
    use super::kind;

    #[test]
    fn a_statement_is_named_by_its_operation_and_first_table_never_its_values() {
        assert_eq!(
            kind(
                r#"SELECT "users"."id" FROM "users" WHERE "users"."email" = $1 -- binds: ["ada@x.example"]"#
            ),
            ("SELECT", Some("users"))
        );
        assert_eq!(
            kind(r#"INSERT INTO "users" ("id") VALUES ($1) -- binds: [1]"#),
            ("INSERT", Some("users"))
        );
        assert_eq!(
            kind(r#"UPDATE "api_keys" SET "last_used_at" = $1 -- binds: []"#),
            ("UPDATE", Some("api_keys"))
        );
        assert_eq!(kind("select 1"), ("SELECT", None));
        assert_eq!(kind("VACUUM"), ("OTHER", None));
    }
}
