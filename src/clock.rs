//! Where the service reads the time from: the system clock in production,
//! one the tests move by hand.

use std::sync::Arc;

use chrono::{DateTime, Utc};

/// The current time, as the service sees it.
pub type Clock = Arc<dyn Fn() -> DateTime<Utc> + Send + Sync>;

/// The system clock.
pub fn system() -> Clock {
    Arc::new(Utc::now)
}
