//! Opening the service's database: the server named by `DATABASE_URL`, or
//! the embedded cluster in the data directory. Either way the database is
//! created when missing and migrated.

use std::{path::Path, str::FromStr};

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
    ) -> Result<Self, OpenError> {
        let (config, cluster) = match database_url {
            Some(url) => (
                tokio_postgres::Config::from_str(url).map_err(OpenError::DatabaseUrl)?,
                None,
            ),
            None => {
                let cluster =
                    Cluster::start_or_attach(data_dir, embedded_pg::Options::default(), sharing)
                        .await?;
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
