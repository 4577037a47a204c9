//! The `keys` commands: they work on the same database as the server (the
//! embedded cluster or `DATABASE_URL`), also while the server runs.

use chrono::{SubsecRound, Utc};
use diesel_async::AsyncPgConnection;
use tokio_postgres::NoTls;

use crate::auth::keys;
use crate::config::{Config, KeysCommand};
use crate::store::{
    api_keys,
    database::{Database, Sharing},
};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

pub async fn keys(config: &Config, command: KeysCommand) -> Result<(), BoxError> {
    let database = Database::open(
        config.database_url.as_deref(),
        &config.data_dir,
        Sharing::Attach,
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
        } => {
            let (row, token) =
                keys::create(&mut conn, role, tenant, &name, rate_limit, now).await?;
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
