//! `users.v1.UsersService`.

use tonic::{Request, Response, Status};
use uuid::Uuid;

use diesel_async::AsyncPgConnection;

use super::idempotent::{self, RequestKey};
use super::{AppState, authz, bulk, convert, list, watch};
use crate::auth::Principal;
use crate::error::Error;
use crate::layers::deadline::{CallDeadline, parse_grpc_timeout};

/// How long a stream may run when no deadline layer set one (the server
/// always does; this bounds a handler called some other way).
const DEFAULT_STREAM_LIFE: std::time::Duration = std::time::Duration::from_secs(30);
use crate::pb::v1::{self as pb, users_service_server::UsersService};
use crate::store::db;
use crate::store::events::Position;
use crate::store::models::{Actor, Etag};
use crate::store::standby::{CONSISTENCY_HEADER, Lsn};
use crate::store::users::{self, Write, Written};

#[derive(Debug, Clone)]
pub struct UsersApi {
    state: AppState,
}

impl UsersApi {
    pub fn new(state: AppState) -> Self {
        Self { state }
    }

    async fn create(
        &self,
        principal: &Principal,
        mut request: pb::CreateUserRequest,
    ) -> Result<pb::CreateUserResponse, Error> {
        let scope = authz::manage_users(principal)?;
        let actor = authz::actor(principal);
        let key = RequestKey::of(&actor, &mut request)?;
        let given = request.user.as_ref().map_or("", |u| u.tenant_id.as_str());
        let tenant = scope.tenant_for_new_user(given, self.state.default_tenant)?;
        let now = self.state.now();
        let new = convert::new_user(request.user, tenant, Uuid::now_v7(), now, &actor)?;
        let Some(key) = key else {
            let row = self
                .state
                .inserts
                .submit((new, None))
                .await
                .map_err(Error::from)?;
            return Ok(pb::CreateUserResponse {
                user: Some(row.into()),
            });
        };
        // The response is known before the insert (the service makes every
        // value of a new user), so the user and the record of its request
        // go in one statement, in a batch like any CreateUser.
        let response = pb::CreateUserResponse {
            user: Some(new.as_row().into()),
        };
        loop {
            let record = key.record(&response, self.state.now());
            let failure = match self.state.inserts.submit((new.clone(), Some(record))).await {
                Ok(_) => return Ok(response),
                Err(failure) => Error::from(failure),
            };
            match idempotent::settle(&self.state, &key, failure).await {
                idempotent::Settled::Done(answer) => return answer,
                idempotent::Settled::Again => continue,
            }
        }
    }

    async fn get(
        &self,
        principal: &Principal,
        after: Option<Lsn>,
        request: pb::GetUserRequest,
    ) -> Result<pb::User, Error> {
        let scope = authz::read_user(principal);
        let id = convert::parse_id("id", &request.id)?;
        scope.check_user(id)?;
        let (tenant, show_deleted) = (scope.tenant(), request.show_deleted);
        let row = self
            .state
            .read(after, |pool, finds| async move {
                if show_deleted {
                    Ok(db::run(&pool, async |conn| users::find(conn, id, tenant).await).await??)
                } else {
                    finds.submit((id, tenant)).await.map_err(Error::from)
                }
            })
            .await?;
        row.map(Into::into).ok_or(Error::NotFound("user"))
    }

    async fn update(
        &self,
        principal: &Principal,
        mut request: pb::UpdateUserRequest,
    ) -> Result<pb::UpdateUserResponse, Error> {
        let scope = authz::update_user(principal, request.user.as_ref())?;
        let actor = authz::actor(principal);
        let key = RequestKey::of(&actor, &mut request)?;
        let id = convert::parse_id("id", &request.id);
        let etag = convert::etag(&request.etag);
        let changes = convert::user_changes(request.user, self.state.now(), actor);
        let (id, (etag, changes)) = merge_violations(id, merge_violations(etag, changes))?;
        scope.check_user(id)?;
        let write = Write::Update {
            id,
            tenant: scope.tenant(),
            changes,
            etag,
        };
        idempotent::once!(&self.state, key.as_ref(), |conn| async {
            let user = user_of(apply(conn, &write).await?)?;
            Ok::<_, Error>(pb::UpdateUserResponse { user: Some(user) })
        })
    }

    /// DeactivateUser, ReactivateUser, DeleteUser, UndeleteUser and
    /// PurgeUser: a change of state of the user `id`, by an editor or an
    /// admin; the user after it.
    async fn change_state<R: idempotent::Idempotent>(
        &self,
        principal: &Principal,
        request: &mut R,
        id: &str,
        etag: &str,
        change: impl FnOnce(Uuid, Option<Uuid>, Option<Etag>, Actor) -> Write,
    ) -> Result<(Option<RequestKey>, Write), Error> {
        let scope = authz::manage_users(principal)?;
        let actor = authz::actor(principal);
        let key = RequestKey::of(&actor, request)?;
        let (id, etag) = merge_violations(convert::parse_id("id", id), convert::etag(etag))?;
        Ok((key, change(id, scope.tenant(), etag, actor)))
    }

    async fn set_active<R, Response>(
        &self,
        principal: &Principal,
        request: &mut R,
        (id, etag): (&str, &str),
        active: bool,
        respond: fn(pb::User) -> Response,
    ) -> Result<Response, Error>
    where
        R: idempotent::Idempotent,
        Response: idempotent::About + Send,
    {
        let at = self.state.now();
        let (key, write) = self
            .change_state(principal, request, id, etag, |id, tenant, etag, by| {
                Write::SetActive {
                    id,
                    tenant,
                    active,
                    at,
                    by,
                    etag,
                }
            })
            .await?;
        idempotent::once!(&self.state, key.as_ref(), |conn| async {
            Ok::<_, Error>(respond(user_of(apply(conn, &write).await?)?))
        })
    }

    async fn delete(
        &self,
        principal: &Principal,
        mut request: pb::DeleteUserRequest,
    ) -> Result<pb::DeleteUserResponse, Error> {
        let (id, etag) = (request.id.clone(), request.etag.clone());
        let at = self.state.now();
        let until = at + self.state.retention.deleted;
        let (key, write) = self
            .change_state(
                principal,
                &mut request,
                &id,
                &etag,
                |id, tenant, etag, by| Write::Delete {
                    id,
                    tenant,
                    at,
                    until,
                    by,
                    etag,
                },
            )
            .await?;
        let Write::Delete { id, tenant, .. } = write else {
            unreachable!("a delete is a delete")
        };
        let allow_missing = request.allow_missing;
        idempotent::once!(&self.state, key.as_ref(), |conn| async {
            let written = apply(conn, &write).await?;
            let user = match written {
                // AIP-135: with allow_missing, a deleted user is answered
                // as it is, an unknown one with no user.
                Written::Missing if allow_missing => {
                    users::find(conn, id, tenant).await?.map(Into::into)
                }
                written => Some(user_of(written)?),
            };
            Ok::<_, Error>(pb::DeleteUserResponse { user })
        })
    }

    async fn undelete(
        &self,
        principal: &Principal,
        mut request: pb::UndeleteUserRequest,
    ) -> Result<pb::UndeleteUserResponse, Error> {
        let (id, etag) = (request.id.clone(), request.etag.clone());
        let at = self.state.now();
        let (key, write) = self
            .change_state(
                principal,
                &mut request,
                &id,
                &etag,
                |id, tenant, etag, by| Write::Undelete {
                    id,
                    tenant,
                    at,
                    by,
                    etag,
                },
            )
            .await?;
        idempotent::once!(&self.state, key.as_ref(), |conn| async {
            let user = user_of(apply(conn, &write).await?)?;
            Ok::<_, Error>(pb::UndeleteUserResponse { user: Some(user) })
        })
    }

    async fn purge(
        &self,
        principal: &Principal,
        mut request: pb::PurgeUserRequest,
    ) -> Result<pb::PurgeUserResponse, Error> {
        let id = request.id.clone();
        let (key, write) = self
            .change_state(principal, &mut request, &id, "", |id, tenant, _, _| {
                Write::Purge { id, tenant }
            })
            .await?;
        idempotent::once!(&self.state, key.as_ref(), |conn| async {
            match apply(conn, &write).await? {
                Written::Purged(id) => Ok(pb::PurgeUserResponse { id: id.to_string() }),
                written => user_of(written)
                    .and(Err(Error::Internal("a purge answered with a user".into()))),
            }
        })
    }

    async fn list(
        &self,
        principal: &Principal,
        after: Option<Lsn>,
        request: pb::ListUsersRequest,
    ) -> Result<pb::ListUsersResponse, Error> {
        let scope = authz::list_users(principal)?;
        let mut list = list::user_list(&request)?;
        scope.confine(&mut list.query.conditions);
        let query = &list.query;
        let page = self
            .state
            .read(after, |pool, _| async move {
                Ok(db::run(&pool, async |conn| users::list(conn, query).await).await??)
            })
            .await?
            .map_err(|_| Error::invalid("page_token", "does not match this request"))?;
        let (page, snapshot) = page;
        let limit = list.query.count_limit.unwrap_or(i64::MAX);
        Ok(pb::ListUsersResponse {
            data: page.rows.into_iter().map(Into::into).collect(),
            total_count: page.total.map(|total| total.min(limit)),
            total_count_capped: page.total.is_some_and(|total| total > limit),
            next_page_token: page
                .next
                .map(|cursor| list::encode_token(&list.fingerprint, cursor))
                .unwrap_or_default(),
            watch_token: Position::At(snapshot).encode(),
        })
    }
}

impl UsersApi {
    /// A write's response, with the consistency token of its commit in
    /// its metadata when reads may go to standbys (it costs a query, shared
    /// by the writes of the moment; without standbys no read needs it).
    /// The write is done whatever happens here: when the primary's
    /// position cannot be read, it answers without one.
    async fn written<T>(&self, response: T) -> Result<Response<T>, Status> {
        let mut response = Response::new(response);
        if self.state.standbys.is_empty() {
            return Ok(response);
        }
        match self.state.written().await {
            Ok(lsn) => {
                if let Ok(token) = lsn.to_string().parse() {
                    response.metadata_mut().insert(CONSISTENCY_HEADER, token);
                }
            }
            Err(error) => {
                tracing::debug!(%error, "a write answers without its consistency token");
            }
        }
        Ok(response)
    }
}

/// The consistency token a read sent: it must see the writes up to there.
fn consistency<T>(request: &Request<T>) -> Result<Option<Lsn>, Error> {
    let Some(token) = request.metadata().get(CONSISTENCY_HEADER) else {
        return Ok(None);
    };
    token
        .to_str()
        .ok()
        .and_then(Lsn::parse)
        .map(Some)
        .ok_or_else(|| {
            Error::invalid(
                CONSISTENCY_HEADER,
                "is not a consistency token: send back the x-users-consistency of a write's response",
            )
        })
}

/// One write of one user through the write path, inside the caller's
/// transaction when there is one.
async fn apply(conn: &mut AsyncPgConnection, write: &Write) -> Result<Written, Error> {
    Ok(users::apply_one(conn, write).await??)
}

/// The user after a write that stored or kept it, or the write's refusal.
fn user_of(written: Written) -> Result<pb::User, Error> {
    match written {
        Written::Created(row) | Written::Updated(row) | Written::Unchanged(row) => Ok(row.into()),
        Written::Stale(row) => Err(Error::Stale {
            etag: row.etag().to_string(),
        }),
        Written::Live(_) => Err(Error::FailedPrecondition {
            reason: "USER_NOT_DELETED",
            message: "only a deleted user can be purged: delete it first",
        }),
        Written::Reserved => Err(Error::Reserved),
        Written::Purged(_) | Written::Missing => Err(Error::NotFound("user")),
    }
}

/// Both results, or every violation of both.
pub(super) fn merge_violations<A, B>(
    a: Result<A, Error>,
    b: Result<B, Error>,
) -> Result<(A, B), Error> {
    match (a, b) {
        (Ok(a), Ok(b)) => Ok((a, b)),
        (Err(Error::InvalidArgument(mut first)), Err(Error::InvalidArgument(second))) => {
            first.extend(second);
            Err(Error::InvalidArgument(first))
        }
        (Err(e), _) | (_, Err(e)) => Err(e),
    }
}

#[tonic::async_trait]
impl UsersService for UsersApi {
    async fn create_user(
        &self,
        request: Request<pb::CreateUserRequest>,
    ) -> Result<Response<pb::CreateUserResponse>, Status> {
        let principal = authz::principal(&request)?;
        let response = self.create(&principal, request.into_inner()).await?;
        self.written(response).await
    }

    async fn get_user(
        &self,
        request: Request<pb::GetUserRequest>,
    ) -> Result<Response<pb::GetUserResponse>, Status> {
        let principal = authz::principal(&request)?;
        let after = consistency(&request)?;
        let user = self.get(&principal, after, request.into_inner()).await?;
        Ok(Response::new(pb::GetUserResponse { user: Some(user) }))
    }

    async fn update_user(
        &self,
        request: Request<pb::UpdateUserRequest>,
    ) -> Result<Response<pb::UpdateUserResponse>, Status> {
        let principal = authz::principal(&request)?;
        let response = self.update(&principal, request.into_inner()).await?;
        self.written(response).await
    }

    async fn deactivate_user(
        &self,
        request: Request<pb::DeactivateUserRequest>,
    ) -> Result<Response<pb::DeactivateUserResponse>, Status> {
        let principal = authz::principal(&request)?;
        let mut request = request.into_inner();
        let (id, etag) = (request.id.clone(), request.etag.clone());
        let response = self
            .set_active(&principal, &mut request, (&id, &etag), false, |user| {
                pb::DeactivateUserResponse { user: Some(user) }
            })
            .await?;
        self.written(response).await
    }

    async fn reactivate_user(
        &self,
        request: Request<pb::ReactivateUserRequest>,
    ) -> Result<Response<pb::ReactivateUserResponse>, Status> {
        let principal = authz::principal(&request)?;
        let mut request = request.into_inner();
        let (id, etag) = (request.id.clone(), request.etag.clone());
        let response = self
            .set_active(&principal, &mut request, (&id, &etag), true, |user| {
                pb::ReactivateUserResponse { user: Some(user) }
            })
            .await?;
        self.written(response).await
    }

    async fn delete_user(
        &self,
        request: Request<pb::DeleteUserRequest>,
    ) -> Result<Response<pb::DeleteUserResponse>, Status> {
        let principal = authz::principal(&request)?;
        let response = self.delete(&principal, request.into_inner()).await?;
        self.written(response).await
    }

    async fn undelete_user(
        &self,
        request: Request<pb::UndeleteUserRequest>,
    ) -> Result<Response<pb::UndeleteUserResponse>, Status> {
        let principal = authz::principal(&request)?;
        let response = self.undelete(&principal, request.into_inner()).await?;
        self.written(response).await
    }

    async fn purge_user(
        &self,
        request: Request<pb::PurgeUserRequest>,
    ) -> Result<Response<pb::PurgeUserResponse>, Status> {
        let principal = authz::principal(&request)?;
        let response = self.purge(&principal, request.into_inner()).await?;
        self.written(response).await
    }

    async fn list_users(
        &self,
        request: Request<pb::ListUsersRequest>,
    ) -> Result<Response<pb::ListUsersResponse>, Status> {
        let principal = authz::principal(&request)?;
        let after = consistency(&request)?;
        Ok(Response::new(
            self.list(&principal, after, request.into_inner()).await?,
        ))
    }

    async fn batch_upsert_users(
        &self,
        request: Request<pb::BatchUpsertUsersRequest>,
    ) -> Result<Response<pb::BatchUpsertUsersResponse>, Status> {
        let principal = authz::principal(&request)?;
        let response = bulk::batch_upsert(&self.state, &principal, request.into_inner()).await?;
        self.written(response).await
    }

    type WatchUsersStream = watch::WatchStream;

    async fn watch_users(
        &self,
        request: Request<pb::WatchUsersRequest>,
    ) -> Result<Response<Self::WatchUsersStream>, Status> {
        let principal = authz::principal(&request)?;
        // A watch runs as long as its client wants: only the client's own
        // deadline ends it, not the server's cap on calls.
        let deadline = request
            .metadata()
            .get("grpc-timeout")
            .and_then(|value| parse_grpc_timeout(value.as_bytes()))
            .map(|timeout| tokio::time::Instant::now() + timeout);
        let scope = authz::watch_users(&principal)?;
        let parsed = watch::parse(scope, request.get_ref())?;
        let settings = watch::WatchSettings {
            heartbeat: self.state.watch_heartbeat,
            stall_timeout: self.state.stream_stall_timeout,
            deadline,
        };
        let caller = authz::actor(&principal);
        let stream = watch::watch(&self.state, caller.as_str(), parsed, settings).await?;
        Ok(Response::new(stream))
    }

    type ExportUsersStream = bulk::ExportStream;

    async fn export_users(
        &self,
        request: Request<pb::ExportUsersRequest>,
    ) -> Result<Response<Self::ExportUsersStream>, Status> {
        let principal = authz::principal(&request)?;
        let deadline = request.extensions().get::<CallDeadline>().map_or_else(
            || tokio::time::Instant::now() + DEFAULT_STREAM_LIFE,
            |d| d.0,
        );
        let after = consistency(&request)?;
        let stream = bulk::export(
            &self.state,
            &principal,
            deadline,
            after,
            request.into_inner(),
        )
        .await?;
        Ok(Response::new(stream))
    }
}
