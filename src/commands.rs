//! The `keys` and `check` commands: they work on the same database as the
//! server (the embedded cluster or `DATABASE_URL`), also while it runs.

use chrono::{SubsecRound, Utc};
use diesel_async::AsyncPgConnection;
use tokio_postgres::NoTls;

use crate::auth::{jwt::JwtVerifier, keys};
use crate::config::{Config, KeysCommand};
use crate::embedded_pg::{self, Cluster, Sharing};
use crate::store::{
    api_keys,
    database::{Database, EMBEDDED_DATABASE},
};
use crate::telemetry::with_causes;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

pub async fn keys(config: &Config, command: KeysCommand) -> Result<(), BoxError> {
    let database = Database::open(
        config.database_url.as_deref(),
        &config.data_dir,
        Sharing::Attach,
        config.patience(),
        None,
    )
    .await?;
    let result = run(&database, command).await;
    database.close().await?;
    result
}

async fn run(database: &Database, command: KeysCommand) -> Result<(), BoxError> {
    let (client, connection) = database.config.connect(NoTls).await?;
    let mut conn = AsyncPgConnection::try_from_client_and_connection(client, connection).await?;
    let now = Utc::now().trunc_subsecs(6);
    match command {
        KeysCommand::Create {
            role,
            tenant,
            name,
            rate_limit,
            expire_in,
            client_name,
        } => {
            let client_name = client_name
                .as_deref()
                .map(crate::domain::ShortText::parse)
                .transpose()
                .map_err(|e| format!("--client-cn {e}"))?;
            let expire_time = expire_in
                .map(|after| chrono::Duration::from_std(after).map(|after| now + after))
                .transpose()
                .map_err(|_| "--expire-in is too long")?;
            let (row, token) = keys::create(
                &mut conn,
                keys::KeySpec {
                    role,
                    tenant,
                    name: &name,
                    rate_limit,
                    expire_time,
                    client_name: client_name.as_ref().map(|name| name.as_str()),
                },
                now,
            )
            .await?;
            eprintln!(
                "created {} key {}; the token is shown only this once",
                row.role, row.id
            );
            println!("{}", token.reveal());
        }
        KeysCommand::List => {
            println!(
                "{:<16}  {:<6}  {:<36}  {:<10}  {:<20}  {:<20}  NAME",
                "ID", "ROLE", "TENANT", "STATE", "CREATED", "LAST USED"
            );
            for key in api_keys::list(&mut conn).await? {
                let time = |t: Option<chrono::DateTime<Utc>>| {
                    t.map_or_else(
                        || "-".to_owned(),
                        |t| t.format("%Y-%m-%dT%H:%M:%SZ").to_string(),
                    )
                };
                println!(
                    "{:<16}  {:<6}  {:<36}  {:<10}  {:<20}  {:<20}  {}",
                    key.id,
                    key.role,
                    key.tenant_id
                        .map_or_else(|| "*".to_owned(), |t| t.to_string()),
                    if key.revoked_at.is_some() {
                        "revoked"
                    } else if key.expire_time.is_some_and(|t| t <= now) {
                        "expired"
                    } else {
                        "active"
                    },
                    time(Some(key.created_at)),
                    time(key.last_used_at),
                    key.name,
                );
            }
        }
        KeysCommand::Revoke { key_id } => match api_keys::revoke(&mut conn, &key_id, now).await? {
            Some(_) => println!("revoked {key_id}"),
            None => return Err(format!("no key has the id {key_id}").into()),
        },
    }
    Ok(())
}

/// Verifies the configuration and reaches the database without changing it.
pub async fn check(config: &Config) -> Result<(), BoxError> {
    if let Some(settings) = config.jwt() {
        JwtVerifier::new(&settings).map_err(|e| format!("end-user tokens: {e}"))?;
        println!(
            "ok: end-user tokens from {} ({:?})",
            settings.issuer, settings.algorithm
        );
    }
    if let Some(files) = config.tls() {
        let tls = crate::net::tls::Tls::load(files).map_err(|e| format!("TLS: {e}"))?;
        println!(
            "ok: TLS, the certificate expires at {} (seconds since the epoch){}",
            tls.not_after(),
            if config.tls_client_ca.is_some() {
                ", client certificates required"
            } else {
                ""
            }
        );
    }
    if crate::app::cors(&config.cors_allowed_origins)?.is_some() {
        println!(
            "ok: gRPC-Web from {}",
            config.cors_allowed_origins.join(", ")
        );
    }
    let mut cluster = None;
    let pg_config: tokio_postgres::Config = match &config.database_url {
        Some(url) => url
            .parse()
            .map_err(|e| format!("DATABASE_URL is not a valid connection string: {e}"))?,
        // A server running on this data directory is reached through its cluster.
        None => {
            let started = Cluster::start_or_attach(
                &config.data_dir,
                embedded_pg::Options::default(),
                Sharing::Attach,
            )
            .await
            .map_err(|e| format!("embedded PostgreSQL: {e}"))?;
            cluster.insert(started).config("postgres")
        }
    };
    let reached = reach(&pg_config, config.db_connect_timeout).await;
    if let Some(cluster) = cluster {
        cluster.close().await?;
    }
    let version = reached?;
    let target = pg_config.get_dbname().unwrap_or(EMBEDDED_DATABASE);
    println!("ok: database reachable (PostgreSQL {version}, database {target})");
    Ok(())
}

async fn reach(
    pg_config: &tokio_postgres::Config,
    timeout: std::time::Duration,
) -> Result<String, BoxError> {
    let connect = tokio::time::timeout(timeout, pg_config.connect(NoTls))
        .await
        .map_err(|_| format!("database not reachable within {timeout:?}"))?;
    let (client, connection) = match connect {
        Ok(pair) => pair,
        // The server creates a missing database at start.
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::INVALID_CATALOG_NAME) => {
            let mut maintenance = pg_config.clone();
            maintenance.dbname("postgres");
            println!("note: the database does not exist yet; the server creates it at start");
            maintenance
                .connect(NoTls)
                .await
                .map_err(|e| format!("database not reachable: {}", with_causes(&e)))?
        }
        Err(e) => return Err(format!("database not reachable: {}", with_causes(&e)).into()),
    };
    let driver = tokio::spawn(connection);
    let version: String = client.query_one("SHOW server_version", &[]).await?.get(0);
    drop(client);
    let _ = driver.await;
    Ok(version)
}
