//! Opening the service's database: the server named by `DATABASE_URL`, or
//! the embedded cluster in the data directory. Either way the database is
//! created when missing and migrated.

use std::{path::Path, str::FromStr};

use super::{
    db,
    embedded::{self, EmbeddedError, EmbeddedPostgres},
};

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
}

/// An open, migrated database and, when embedded, the cluster we run.
#[derive(Debug)]
pub struct Database {
    pub config: tokio_postgres::Config,
    embedded: Option<EmbeddedPostgres>,
}

/// Whether to share an embedded cluster that another process already runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sharing {
    /// The server owns its cluster: one running already is an error.
    Exclusive,
    /// Tools (`keys`) work beside a running server, or start the cluster
    /// themselves for the time they need it.
    Attach,
}

impl Database {
    pub async fn open(
        database_url: Option<&str>,
        data_dir: &Path,
        sharing: Sharing,
    ) -> Result<Self, OpenError> {
        let (config, embedded) = match database_url {
            Some(url) => (
                tokio_postgres::Config::from_str(url).map_err(OpenError::DatabaseUrl)?,
                None,
            ),
            None => {
                let data_dir = std::path::absolute(data_dir).unwrap_or_else(|_| data_dir.into());
                match EmbeddedPostgres::start(&data_dir, embedded::Options::default()).await {
                    Ok(pg) => (pg.config(EMBEDDED_DATABASE), Some(pg)),
                    Err(EmbeddedError::InUse { .. }) if sharing == Sharing::Attach => (
                        EmbeddedPostgres::attach_config(&data_dir, EMBEDDED_DATABASE),
                        None,
                    ),
                    Err(e) => return Err(e.into()),
                }
            }
        };
        db::create_database_if_missing(&config)
            .await
            .map_err(OpenError::Database)?;
        db::run_migrations(&config)
            .await
            .map_err(OpenError::Database)?;
        Ok(Self { config, embedded })
    }

    /// Stops the embedded cluster, if this process started it.
    pub async fn close(self) -> Result<(), EmbeddedError> {
        match self.embedded {
            Some(pg) => pg.stop().await,
            None => Ok(()),
        }
    }
}
