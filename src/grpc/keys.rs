//! `users.v1.KeysService`: admins only.

use std::num::NonZeroU32;

use chrono::{DateTime, Utc};
use tonic::{Request, Response, Status};

use super::{AppState, authz, convert};
use crate::auth::{
    Role,
    keys::{self, CreateError, KeySpec},
};
use crate::domain::{ShortText, Violations};
use crate::error::Error;
use crate::pb::v1::{self as pb, keys_service_server::KeysService};
use crate::store::api_keys::{self, ApiKeyRow};

/// Keys per page when the request does not say.
const DEFAULT_PAGE_SIZE: i64 = 100;
/// The most keys per page.
const MAX_PAGE_SIZE: i32 = 1_000;
/// The highest rate limit a key may be given.
const MAX_RATE_LIMIT: i32 = 1_000_000;
/// The furthest expiry a key may be given.
const MAX_LIFETIME: chrono::Duration = chrono::Duration::days(3653);
/// A key id: 16 lowercase hex characters (longer input is not one).
const KEY_ID_LEN: usize = 16;

#[derive(Debug, Clone)]
pub struct KeysApi {
    state: AppState,
}

impl KeysApi {
    pub fn new(state: AppState) -> Self {
        Self { state }
    }

    async fn create(&self, request: pb::CreateKeyRequest) -> Result<pb::CreateKeyResponse, Error> {
        let now = self.state.now();
        let mut v = Violations::new();
        let name = v.check("name", ShortText::parse(&request.name));
        let role = v.check("role", role(request.role));
        // `Some(None)`: no tenant, as an admin key has.
        let tenant = match (role, request.tenant_id.as_str()) {
            (None, _) => None,
            (Some(Role::Admin), "") => Some(None),
            (Some(Role::Admin), _) => v.check(
                "tenant_id",
                Err("must be empty: an admin key acts for every tenant".into()),
            ),
            (Some(_), given) => v.check("tenant_id", convert::uuid(given)).map(Some),
        };
        let rate_limit = match request.rate_limit_per_second {
            None => Some(None),
            Some(rate) => v
                .check(
                    "rate_limit_per_second",
                    u32::try_from(rate)
                        .ok()
                        .filter(|rate| *rate <= MAX_RATE_LIMIT as u32)
                        .and_then(NonZeroU32::new)
                        .ok_or_else(|| format!("must be from 1 to {MAX_RATE_LIMIT}")),
                )
                .map(Some),
        };
        let expire_time = match &request.expire_time {
            None => Some(None),
            Some(time) => v.check("expire_time", expiry(time, now)).map(Some),
        };
        let client_name = match request.client_name.as_str() {
            "" => Some(None),
            given => v.check("client_name", ShortText::parse(given)).map(Some),
        };
        let (
            Some(name),
            Some(role),
            Some(tenant),
            Some(rate_limit),
            Some(expire_time),
            Some(client_name),
        ) = (name, role, tenant, rate_limit, expire_time, client_name)
        else {
            return Err(Error::InvalidArgument(v.into_vec()));
        };
        let spec = KeySpec {
            role,
            tenant,
            name: name.as_str(),
            rate_limit,
            expire_time,
            client_name: client_name.as_ref().map(ShortText::as_str),
        };
        let created = self
            .state
            .db(async |conn| {
                // A deleted tenant's keys do not work: none is made for it.
                if let Some(tenant) = spec.tenant {
                    if api_keys::tenant_deleted(conn, tenant).await? {
                        return Ok(Err(CreateError::UnknownTenant));
                    }
                }
                match keys::create(conn, spec, now).await {
                    Ok(created) => Ok(Ok(created)),
                    Err(CreateError::Database(e)) => Err(e),
                    Err(refused) => Ok(Err(refused)),
                }
            })
            .await?;
        let (row, token) = created.map_err(|refused| match refused {
            CreateError::UnknownTenant => {
                Error::invalid("tenant_id", "no tenant has this id, or it is deleted")
            }
            other => Error::invalid("tenant_id", other.to_string()),
        })?;
        Ok(pb::CreateKeyResponse {
            key: Some(row.into()),
            token: token.reveal(),
        })
    }

    async fn list(&self, request: pb::ListKeysRequest) -> Result<pb::ListKeysResponse, Error> {
        let limit = match request.page_size {
            0 => DEFAULT_PAGE_SIZE,
            size @ 1..=MAX_PAGE_SIZE => i64::from(size),
            _ => {
                return Err(Error::invalid(
                    "page_size",
                    format!("must be from 1 to {MAX_PAGE_SIZE}, or 0 for 100"),
                ));
            }
        };
        let after = request.page_token;
        if !after.is_empty() && !is_key_id(&after) {
            return Err(Error::invalid(
                "page_token",
                "is not a next_page_token of ListKeys",
            ));
        }
        let now = self.state.now();
        let (rows, more) = self
            .state
            .db(async |conn| api_keys::page(conn, &after, limit, request.show_revoked, now).await)
            .await?;
        let next_page_token = match (more, rows.last()) {
            (true, Some(last)) => last.id.clone(),
            _ => String::new(),
        };
        Ok(pb::ListKeysResponse {
            keys: rows.into_iter().map(Into::into).collect(),
            next_page_token,
        })
    }

    async fn revoke(&self, request: pb::RevokeKeyRequest) -> Result<pb::RevokeKeyResponse, Error> {
        if !is_key_id(&request.id) {
            return Err(Error::invalid(
                "id",
                "must be a key id: the 16 hex characters after usk_ in its token",
            ));
        }
        let now = self.state.now();
        let row = self
            .state
            .db(async |conn| api_keys::revoke(conn, &request.id, now).await)
            .await?
            .ok_or(Error::NotFound("key"))?;
        Ok(pb::RevokeKeyResponse {
            key: Some(row.into()),
        })
    }
}

fn role(role: i32) -> Result<Role, String> {
    match pb::KeyRole::try_from(role) {
        Ok(pb::KeyRole::Admin) => Ok(Role::Admin),
        Ok(pb::KeyRole::Editor) => Ok(Role::Editor),
        Ok(pb::KeyRole::Viewer) => Ok(Role::Viewer),
        _ => Err("must be KEY_ROLE_ADMIN, KEY_ROLE_EDITOR or KEY_ROLE_VIEWER".into()),
    }
}

fn expiry(time: &prost_types::Timestamp, now: DateTime<Utc>) -> Result<DateTime<Utc>, String> {
    let time = convert::from_timestamp(time)?;
    if time <= now {
        return Err("must be in the future".into());
    }
    if time > now + MAX_LIFETIME {
        return Err("must be at most 10 years ahead".into());
    }
    Ok(time)
}

fn is_key_id(input: &str) -> bool {
    input.len() == KEY_ID_LEN && input.bytes().all(|b| b.is_ascii_hexdigit())
}

impl From<ApiKeyRow> for pb::ApiKey {
    fn from(row: ApiKeyRow) -> Self {
        let role = match Role::parse(&row.role) {
            Some(Role::Admin) => pb::KeyRole::Admin,
            Some(Role::Editor) => pb::KeyRole::Editor,
            Some(Role::Viewer) => pb::KeyRole::Viewer,
            None => pb::KeyRole::Unspecified,
        };
        Self {
            id: row.id,
            name: row.name,
            role: role.into(),
            tenant_id: row.tenant_id.map(|t| t.to_string()).unwrap_or_default(),
            rate_limit_per_second: row.rate_limit_per_second,
            create_time: Some(convert::timestamp(row.created_at)),
            last_use_time: row.last_used_at.map(convert::timestamp),
            revoke_time: row.revoked_at.map(convert::timestamp),
            expire_time: row.expire_time.map(convert::timestamp),
            client_name: row.client_name.unwrap_or_default(),
        }
    }
}

#[tonic::async_trait]
impl KeysService for KeysApi {
    async fn create_key(
        &self,
        request: Request<pb::CreateKeyRequest>,
    ) -> Result<Response<pb::CreateKeyResponse>, Status> {
        authz::manage_keys(&authz::principal(&request)?)?;
        Ok(Response::new(self.create(request.into_inner()).await?))
    }

    async fn list_keys(
        &self,
        request: Request<pb::ListKeysRequest>,
    ) -> Result<Response<pb::ListKeysResponse>, Status> {
        authz::manage_keys(&authz::principal(&request)?)?;
        Ok(Response::new(self.list(request.into_inner()).await?))
    }

    async fn revoke_key(
        &self,
        request: Request<pb::RevokeKeyRequest>,
    ) -> Result<Response<pb::RevokeKeyResponse>, Status> {
        authz::manage_keys(&authz::principal(&request)?)?;
        Ok(Response::new(self.revoke(request.into_inner()).await?))
    }
}
