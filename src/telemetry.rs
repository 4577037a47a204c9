//! Logging through `tracing`: text for people, JSON for machines.
//!
//! Lines are formatted on the thread that logs and written to stderr by a
//! thread of their own, in batches: a call never waits for a `write(2)`,
//! and many lines cost one. The queue between them blocks rather than drops
//! when stderr cannot keep up, so no line is lost.

use std::io::{BufWriter, IsTerminal};

use tracing_appender::non_blocking::{NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::{EnvFilter, fmt, prelude::*};

use crate::config::LogFormat;

/// Installs the global subscriber; `RUST_LOG` filters (default `info`).
/// Lines still queued are written when the returned guard is dropped: hold
/// it until the process ends.
#[must_use = "dropping the guard stops the log writer"]
pub fn init(format: LogFormat) -> WorkerGuard {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let ansi = std::io::stderr().is_terminal();
    let (writer, guard) = NonBlockingBuilder::default()
        .lossy(false)
        .thread_name("log-writer")
        .finish(BufWriter::new(std::io::stderr()));
    let registry = tracing_subscriber::registry().with(filter);
    match format {
        LogFormat::Text => registry
            .with(fmt::layer().with_ansi(ansi).with_writer(writer))
            .init(),
        LogFormat::Json => registry
            .with(fmt::layer().json().flatten_event(true).with_writer(writer))
            .init(),
    }
    guard
}
