//! Logging through `tracing`: text for people, JSON for machines.
//!
//! Lines are formatted on the thread that logs and written to stderr by a
//! thread of their own, in batches: a call never waits for a `write(2)`,
//! and many lines cost one. The queue between them blocks rather than drops
//! when stderr cannot keep up, so no line is lost.

use std::io::{BufWriter, IsTerminal};

use tracing_appender::non_blocking::{NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::{EnvFilter, fmt, prelude::*};

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

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

/// An error and the chain of its causes, on one line (for command-line
/// messages, where there is no log to hold the rest).
pub fn with_causes(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// A log line that repeats, written at most once a period: the first time
/// at once, later ones as one line with how many happened since. During an
/// outage every failing call would otherwise log its cause.
#[derive(Debug)]
pub struct Summarized {
    period: std::time::Duration,
    state: std::sync::Mutex<SummaryState>,
}

#[derive(Debug)]
struct SummaryState {
    last: Option<std::time::Instant>,
    /// Occurrences since the last line written.
    since: u64,
}

impl Summarized {
    pub const fn new(period: std::time::Duration) -> Self {
        Self {
            period,
            state: std::sync::Mutex::new(SummaryState {
                last: None,
                since: 0,
            }),
        }
    }

    /// Counts one occurrence; `Some(n)` when a line is due, `n` being the
    /// occurrences it stands for (this one included).
    pub fn due(&self) -> Option<u64> {
        let mut state = self.state.lock().expect("summary lock");
        state.since += 1;
        let now = std::time::Instant::now();
        if state.last.is_some_and(|last| now - last < self.period) {
            return None;
        }
        state.last = Some(now);
        Some(std::mem::take(&mut state.since))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_repeated_line_is_written_once_a_period_with_its_count() {
        let summary = Summarized::new(std::time::Duration::from_millis(200));
        assert_eq!(summary.due(), Some(1));
        for _ in 0..99 {
            assert_eq!(summary.due(), None);
        }
        std::thread::sleep(std::time::Duration::from_millis(220));
        assert_eq!(summary.due(), Some(100));
        assert_eq!(summary.due(), None);
    }
}
