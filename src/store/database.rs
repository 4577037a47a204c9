//! Opening the service's database: the server named by `DATABASE_URL`, or
//! the embedded cluster in the data directory. Either way the database is
//! created when missing and migrated.

use std::{path::Path, str::FromStr, time::Duration};

use tokio_postgres::NoTls;

use super::db;
use crate::embedded_pg::{self, Cluster, EmbeddedError};

pub use crate::embedded_pg::Sharing;

/// Name of the database inside the embedded cluster.
pub const EMBEDDED_DATABASE: &str = "users_service";

type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("DATABASE_URL is not a valid Postgres connection string: {0}")]
    DatabaseUrl(#[source] tokio_postgres::Error),
    #[error(transparent)]
    Embedded(#[from] EmbeddedError),
    #[error("cannot prepare the database: {0}")]
    Database(#[source] BoxError),
    #[error("the database at {server} could not be reached within {waited:?}: {cause}")]
    Unreachable {
        server: String,
        waited: Duration,
        cause: String,
    },
}

/// How long to wait for a database that is not there yet.
#[derive(Debug, Clone, Copy)]
pub struct Patience {
    /// Longest wait for one connection attempt, answer included.
    pub connect_timeout: Duration,
    /// Longest wait for the database, over every attempt.
    pub startup_timeout: Duration,
}

/// An open, migrated database and, when embedded, its cluster.
#[derive(Debug)]
pub struct Database {
    pub config: tokio_postgres::Config,
    cluster: Option<Cluster>,
}

impl Database {
    pub async fn open(
        database_url: Option<&str>,
        data_dir: &Path,
        sharing: Sharing,
        patience: Patience,
        on_change: Option<std::sync::Arc<tokio::sync::Notify>>,
    ) -> Result<Self, OpenError> {
        let (config, cluster) = match database_url {
            Some(url) => {
                let config =
                    tokio_postgres::Config::from_str(url).map_err(OpenError::DatabaseUrl)?;
                wait_for(&config, patience).await?;
                (config, None)
            }
            None => {
                let options = embedded_pg::Options {
                    on_change,
                    ..embedded_pg::Options::default()
                };
                let cluster = Cluster::start_or_attach(data_dir, options, sharing).await?;
                (cluster.config(EMBEDDED_DATABASE), Some(cluster))
            }
        };
        db::create_database_if_missing(&config)
            .await
            .map_err(OpenError::Database)?;
        db::run_migrations(&config)
            .await
            .map_err(OpenError::Database)?;
        Ok(Self { config, cluster })
    }

    /// Stops the embedded cluster, if this process started it.
    pub async fn close(self) -> Result<(), EmbeddedError> {
        match self.cluster {
            Some(cluster) => cluster.close().await,
            None => Ok(()),
        }
    }
}

/// Waits until the server of `config` answers, trying again with back-off
/// for at most `patience.startup_timeout`, and logging each failed attempt
/// with its cause. Each attempt is bounded, connection and answer included:
/// a peer that accepts connections and never speaks cannot hang the start.
async fn wait_for(config: &tokio_postgres::Config, patience: Patience) -> Result<(), OpenError> {
    let server = describe(config);
    let started = tokio::time::Instant::now();
    let mut pause = Duration::from_millis(250);
    for attempt in 1.. {
        let cause =
            match tokio::time::timeout(patience.connect_timeout, config.connect(NoTls)).await {
                Ok(Ok((client, connection))) => {
                    drop(client);
                    let _ = connection.await;
                    if attempt > 1 {
                        tracing::info!(%server, attempt, "the database answers");
                    }
                    return Ok(());
                }
                // The server answers; the database is created below.
                Ok(Err(e))
                    if e.code() == Some(&tokio_postgres::error::SqlState::INVALID_CATALOG_NAME) =>
                {
                    return Ok(());
                }
                Ok(Err(e)) => crate::telemetry::with_causes(&e),
                Err(_) => format!("no answer within {:?}", patience.connect_timeout),
            };
        let waited = started.elapsed();
        if waited + pause >= patience.startup_timeout {
            return Err(OpenError::Unreachable {
                server,
                waited,
                cause,
            });
        }
        tracing::warn!(%server, attempt, error = %cause, retry_in = ?pause, "cannot reach the database yet");
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(5));
    }
    unreachable!("the loop returns")
}

/// `host:port` (or the socket directory) and database of a config, for logs.
fn describe(config: &tokio_postgres::Config) -> String {
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .zip(config.get_ports().iter().chain(std::iter::repeat(&5432)))
        .map(|(host, port)| match host {
            tokio_postgres::config::Host::Tcp(name) => format!("{name}:{port}"),
            tokio_postgres::config::Host::Unix(path) => format!("{}:{port}", path.display()),
        })
        .collect();
    format!(
        "{} (database {})",
        hosts.join(","),
        config.get_dbname().unwrap_or("(default)")
    )
}
