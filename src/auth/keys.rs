//! Creating, listing and revoking API keys, and the bootstrap admin key.

use std::{io::Write, num::NonZeroU32, os::unix::fs::OpenOptionsExt, path::Path};

use chrono::{DateTime, Utc};
use diesel::result::{DatabaseErrorKind, Error as DieselError};
use diesel_async::AsyncPgConnection;
use uuid::Uuid;

use super::{Role, api_key::ApiKeyToken};
use crate::store::api_keys::{self, ApiKeyRow, NewApiKey};

/// File in the data directory that receives the bootstrap admin token.
pub const ADMIN_KEY_FILE: &str = "admin.key";

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What a new key is.
#[derive(Debug, Clone, Copy)]
pub struct KeySpec<'a> {
    pub role: Role,
    /// The tenant of an editor or viewer key; none for an admin key.
    pub tenant: Option<Uuid>,
    /// Who uses it.
    pub name: &'a str,
    /// Its own calls per second, instead of the server's default.
    pub rate_limit: Option<NonZeroU32>,
    /// When it stops working.
    pub expire_time: Option<DateTime<Utc>>,
    /// The name of the client certificate it must come with.
    pub client_name: Option<&'a str>,
}

/// Why a key could not be created.
#[derive(Debug, thiserror::Error)]
pub enum CreateError {
    #[error("admin keys act for every tenant: drop --tenant")]
    AdminWithTenant,
    #[error("{0} keys need --tenant")]
    NoTenant(&'static str),
    #[error("no tenant has this id")]
    UnknownTenant,
    #[error(transparent)]
    Database(#[from] DieselError),
}

/// Creates a key; returns its row and the token, which exists nowhere else.
pub async fn create(
    conn: &mut AsyncPgConnection,
    spec: KeySpec<'_>,
    now: DateTime<Utc>,
) -> Result<(ApiKeyRow, ApiKeyToken), CreateError> {
    match (spec.role, spec.tenant) {
        (Role::Admin, Some(_)) => return Err(CreateError::AdminWithTenant),
        (Role::Editor | Role::Viewer, None) => {
            return Err(CreateError::NoTenant(spec.role.as_str()));
        }
        _ => {}
    }
    let token = ApiKeyToken::generate();
    let row = api_keys::insert(conn, &new_key(&token, spec, false, now))
        .await
        .map_err(|e| match e {
            DieselError::DatabaseError(DatabaseErrorKind::ForeignKeyViolation, _) => {
                CreateError::UnknownTenant
            }
            other => other.into(),
        })?;
    Ok((row, token))
}

fn new_key(
    token: &ApiKeyToken,
    spec: KeySpec<'_>,
    is_bootstrap: bool,
    now: DateTime<Utc>,
) -> NewApiKey {
    NewApiKey {
        id: token.id().to_owned(),
        name: spec.name.to_owned(),
        role: spec.role.as_str().to_owned(),
        tenant_id: spec.tenant,
        secret_sha256: token.secret_sha256(),
        rate_limit_per_second: spec.rate_limit.and_then(|n| i32::try_from(n.get()).ok()),
        is_bootstrap,
        created_at: now,
        expire_time: spec.expire_time,
        client_name: spec.client_name.map(str::to_owned),
    }
}

/// On a database without any key, creates an admin key and writes its token
/// to `<data_dir>/admin.key` (mode 0600), so a new deployment is secure and
/// usable at once. Returns the file's path when it did.
pub async fn bootstrap(
    conn: &mut AsyncPgConnection,
    data_dir: &Path,
    now: DateTime<Utc>,
) -> Result<Option<std::path::PathBuf>, BoxError> {
    if api_keys::count(conn).await? > 0 {
        return Ok(None);
    }
    let token = ApiKeyToken::generate();
    let spec = KeySpec {
        role: Role::Admin,
        tenant: None,
        name: "bootstrap",
        rate_limit: None,
        expire_time: None,
        client_name: None,
    };
    let key = new_key(&token, spec, true, now);
    match api_keys::insert(conn, &key).await {
        Ok(_) => {}
        // Another replica bootstrapped at the same moment.
        Err(DieselError::DatabaseError(DatabaseErrorKind::UniqueViolation, _)) => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    std::fs::create_dir_all(data_dir)?;
    let path = data_dir.join(ADMIN_KEY_FILE);
    let partial = data_dir.join(format!("{ADMIN_KEY_FILE}.partial"));
    // A leftover from an interrupted write may have looser permissions.
    let _ = std::fs::remove_file(&partial);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&partial)?;
    writeln!(file, "{}", token.reveal())?;
    file.sync_all()?;
    std::fs::rename(&partial, &path)?;
    Ok(Some(path))
}
