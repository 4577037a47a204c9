//! What the health service says, split the way orchestrators use it.
//!
//! - The overall entry `""` is liveness: SERVING while the process runs
//!   and is not shutting down. A database outage does not touch it, so an
//!   orchestrator does not restart every replica because Postgres is down.
//! - `users.v1.UsersService` and `users.v1.TenantsService` are readiness:
//!   SERVING while the database answers, NOT_SERVING while it does not. A
//!   probe of its own (one connection, `SELECT 1` every `--health-interval`,
//!   each step bounded by `--db-connect-timeout`) decides; the embedded
//!   cluster's supervisor asks for a probe at once when Postgres dies, and
//!   the pool does when it cannot open a connection.
//! - On shutdown every entry turns NOT_SERVING and stays so.
//!
//! Each change of readiness is logged once, with the cause and, on the way
//! back, how long the database was gone.

use std::{sync::Arc, time::Duration};

use tokio::{
    sync::{Notify, watch},
    time::Instant,
};
use tokio_postgres::NoTls;
use tonic_health::{ServingStatus, server::HealthReporter};

/// The health entries that follow the database.
pub const READINESS: [&str; 3] = [
    "users.v1.UsersService",
    "users.v1.TenantsService",
    "users.v1.KeysService",
];

/// The shortest time between two probes that a wake asks for.
const MIN_PROBE_GAP: Duration = Duration::from_millis(50);

/// Sets every entry, liveness included.
pub async fn set_all(health: &HealthReporter, status: ServingStatus) {
    health.set_service_status("", status).await;
    for service in READINESS {
        health.set_service_status(service, status).await;
    }
}

/// How the database probe runs.
#[derive(Debug, Clone)]
pub struct Probe {
    pub config: tokio_postgres::Config,
    pub every: Duration,
    /// Longest wait for a connection or an answer.
    pub timeout: Duration,
}

/// Keeps readiness in step with the database until `stop` turns true.
/// `wake` asks for a probe now; `changed` hears each change (true: ready).
pub async fn follow_database(
    health: HealthReporter,
    probe: Probe,
    wake: Arc<Notify>,
    changed: impl Fn(bool) + Send,
    mut stop: watch::Receiver<bool>,
) {
    let mut client: Option<tokio_postgres::Client> = None;
    // Since when the database has not answered, and why.
    let mut down: Option<Instant> = None;
    loop {
        let outcome = check(&mut client, &probe).await;
        match (outcome, down) {
            (Ok(()), Some(since)) => {
                tracing::info!(
                    down_for = ?since.elapsed(),
                    "the database answers again; ready (SERVING)"
                );
                down = None;
                set_readiness(&health, ServingStatus::Serving).await;
                changed(true);
            }
            (Err(cause), None) => {
                tracing::error!(error = %cause, "the database does not answer; not ready (NOT_SERVING)");
                down = Some(Instant::now());
                set_readiness(&health, ServingStatus::NotServing).await;
                changed(false);
            }
            _ => {}
        }
        // A wake comes with every connection the pool fails to open, which
        // during an outage can be every call: at most one probe per
        // MIN_PROBE_GAP, whatever their number.
        let earliest = Instant::now() + MIN_PROBE_GAP;
        tokio::select! {
            () = tokio::time::sleep(probe.every) => {}
            () = async {
                wake.notified().await;
                tokio::time::sleep_until(earliest).await;
            } => {}
            _ = stop.wait_for(|stopped| *stopped) => return,
        }
    }
}

async fn set_readiness(health: &HealthReporter, status: ServingStatus) {
    for service in READINESS {
        health.set_service_status(service, status).await;
    }
}

/// One probe: a round trip on the probe's connection, opened when needed.
async fn check(client: &mut Option<tokio_postgres::Client>, probe: &Probe) -> Result<(), String> {
    if client
        .as_ref()
        .is_none_or(tokio_postgres::Client::is_closed)
    {
        let connect = tokio::time::timeout(probe.timeout, probe.config.connect(NoTls)).await;
        match connect {
            Ok(Ok((new, connection))) => {
                tokio::spawn(connection);
                *client = Some(new);
            }
            Ok(Err(error)) => return Err(crate::telemetry::with_causes(&error)),
            Err(_) => return Err(format!("no connection within {:?}", probe.timeout)),
        }
    }
    let ping = client
        .as_ref()
        .expect("connected above")
        .simple_query("SELECT 1");
    match tokio::time::timeout(probe.timeout, ping).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(error)) => {
            *client = None;
            Err(crate::telemetry::with_causes(&error))
        }
        Err(_) => {
            *client = None;
            Err(format!("no answer within {:?}", probe.timeout))
        }
    }
}
