//! Configuration, from flags or environment variables (flags win).
//!
//! | flag | environment | default |
//! |---|---|---|
//! | `--listen` | `LISTEN_ADDR` | `127.0.0.1:50051` |
//! | `--database-url` | `DATABASE_URL` | none: run an embedded Postgres |
//! | `--data-dir` | `DATA_DIR` | `./.users-service` |
//! | `--db-pool-size` | `DB_POOL_SIZE` | 2 x CPU cores, at least 4 |
//! | `--db-connect-timeout` | `DB_CONNECT_TIMEOUT` | `3s` |
//! | `--db-acquire-timeout` | `DB_ACQUIRE_TIMEOUT` | `3s` |
//! | `--db-statement-timeout` | `DB_STATEMENT_TIMEOUT` | `10s` |
//! | `--shutdown-grace` | `SHUTDOWN_GRACE` | `10s` |
//! | `--log-format` | `LOG_FORMAT` | `text` |
//!
//! Log filtering follows `RUST_LOG` (default `info`).

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Parser, ValueEnum};

use crate::store::db::PoolSettings;

pub const DEFAULT_LISTEN: &str = "127.0.0.1:50051";
pub const DEFAULT_DATA_DIR: &str = "./.users-service";

/// users-service: the gRPC service that owns the users of every tenant.
#[derive(Debug, Clone, Parser)]
#[command(name = "users-service", version, about, long_about = None)]
pub struct Config {
    /// Address the gRPC server listens on.
    #[arg(long, env = "LISTEN_ADDR", default_value = DEFAULT_LISTEN)]
    pub listen: SocketAddr,

    /// Postgres to use, as a URL (postgres://user@host:5432/db) or key=value
    /// string. The database is created when missing. Without it, the service
    /// runs its own Postgres from the installed binaries, in --data-dir.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,

    /// Directory of the embedded Postgres cluster (used without DATABASE_URL).
    #[arg(long, env = "DATA_DIR", default_value = DEFAULT_DATA_DIR)]
    pub data_dir: PathBuf,

    /// Most database connections open at once [default: 2 x CPU cores, at least 4].
    #[arg(long, env = "DB_POOL_SIZE")]
    pub db_pool_size: Option<usize>,

    /// Longest wait to open a database connection.
    #[arg(long, env = "DB_CONNECT_TIMEOUT", default_value = "3s", value_parser = humantime::parse_duration)]
    pub db_connect_timeout: Duration,

    /// Longest wait for a free connection; past it a call fails with UNAVAILABLE.
    #[arg(long, env = "DB_ACQUIRE_TIMEOUT", default_value = "3s", value_parser = humantime::parse_duration)]
    pub db_acquire_timeout: Duration,

    /// Longest a single SQL statement may run.
    #[arg(long, env = "DB_STATEMENT_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub db_statement_timeout: Duration,

    /// On SIGINT/SIGTERM, how long in-flight calls may take to finish.
    #[arg(long, env = "SHUTDOWN_GRACE", default_value = "10s", value_parser = humantime::parse_duration)]
    pub shutdown_grace: Duration,

    /// Log line format.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

impl Config {
    /// The defaults, as if no flag or variable was given.
    pub fn with_defaults() -> Self {
        Self {
            listen: DEFAULT_LISTEN.parse().expect("valid default address"),
            database_url: None,
            data_dir: PathBuf::from(DEFAULT_DATA_DIR),
            db_pool_size: None,
            db_connect_timeout: Duration::from_secs(3),
            db_acquire_timeout: Duration::from_secs(3),
            db_statement_timeout: Duration::from_secs(10),
            shutdown_grace: Duration::from_secs(10),
            log_format: LogFormat::Text,
        }
    }

    pub fn pool_settings(&self) -> PoolSettings {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        PoolSettings {
            max_size: self.db_pool_size.unwrap_or((cores * 2).max(4)),
            connect_timeout: self.db_connect_timeout,
            acquire_timeout: self.db_acquire_timeout,
            statement_timeout: self.db_statement_timeout,
        }
    }
}
