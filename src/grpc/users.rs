//! `users.v1.UsersService`.

use tonic::{Request, Response, Status};
use uuid::Uuid;

use super::{AppState, authz, bulk, convert, list};
use crate::auth::Principal;
use crate::error::Error;
use crate::layers::deadline::CallDeadline;

/// How long a stream may run when no deadline layer set one (the server
/// always does; this bounds a handler called some other way).
const DEFAULT_STREAM_LIFE: std::time::Duration = std::time::Duration::from_secs(30);
use crate::pb::v1::{self as pb, users_service_server::UsersService};
use crate::store::users::{self, Write};

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
        request: pb::CreateUserRequest,
    ) -> Result<pb::User, Error> {
        let scope = authz::manage_users(principal)?;
        let given = request.user.as_ref().map_or("", |u| u.tenant_id.as_str());
        let tenant = scope.tenant_for_new_user(given, self.state.default_tenant)?;
        let new = convert::new_user(request.user, tenant, Uuid::now_v7(), self.state.now())?;
        Ok(self
            .state
            .inserts
            .submit(new)
            .await
            .map_err(Error::from)?
            .into())
    }

    async fn get(
        &self,
        principal: &Principal,
        request: pb::GetUserRequest,
    ) -> Result<pb::User, Error> {
        let scope = authz::read_user(principal);
        let id = convert::parse_id("id", &request.id)?;
        scope.check_user(id)?;
        let row = self
            .state
            .finds
            .submit((id, scope.tenant()))
            .await
            .map_err(Error::from)?;
        row.map(Into::into).ok_or(Error::NotFound("user"))
    }

    async fn update(
        &self,
        principal: &Principal,
        request: pb::UpdateUserRequest,
    ) -> Result<pb::User, Error> {
        let scope = authz::update_user(principal, request.user.as_ref())?;
        let id = convert::parse_id("id", &request.id);
        let changes = convert::user_changes(request.user, self.state.now());
        let (id, changes) = merge_violations(id, changes)?;
        scope.check_user(id)?;
        self.write(Write::Update {
            id,
            tenant: scope.tenant(),
            changes,
        })
        .await
    }

    async fn set_active(
        &self,
        principal: &Principal,
        id: &str,
        active: bool,
    ) -> Result<pb::User, Error> {
        let scope = authz::manage_users(principal)?;
        let id = convert::parse_id("id", id)?;
        self.write(Write::SetActive {
            id,
            tenant: scope.tenant(),
            active,
            at: self.state.now(),
        })
        .await
    }

    /// One write of one user, through the write path; the user after it.
    async fn write(&self, write: Write) -> Result<pb::User, Error> {
        let written = self
            .state
            .db(async |conn| users::apply_one(conn, &write).await)
            .await?
            .map_err(Error::from)?;
        written
            .into_row()
            .map(Into::into)
            .ok_or(Error::NotFound("user"))
    }

    async fn list(
        &self,
        principal: &Principal,
        request: pb::ListUsersRequest,
    ) -> Result<pb::ListUsersResponse, Error> {
        let scope = authz::list_users(principal)?;
        let mut list = list::user_list(&request)?;
        scope.confine(&mut list.query.conditions);
        let page = self
            .state
            .db(async |conn| users::list(conn, &list.query).await)
            .await?
            .map_err(|_| Error::invalid("page_token", "does not match this request"))?;
        let limit = list.query.count_limit.unwrap_or(i64::MAX);
        Ok(pb::ListUsersResponse {
            data: page.rows.into_iter().map(Into::into).collect(),
            total_count: page.total.map(|total| total.min(limit)),
            total_count_capped: page.total.is_some_and(|total| total > limit),
            next_page_token: page
                .next
                .map(|cursor| list::encode_token(&list.fingerprint, cursor))
                .unwrap_or_default(),
        })
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
        let user = self.create(&principal, request.into_inner()).await?;
        Ok(Response::new(pb::CreateUserResponse { user: Some(user) }))
    }

    async fn get_user(
        &self,
        request: Request<pb::GetUserRequest>,
    ) -> Result<Response<pb::GetUserResponse>, Status> {
        let principal = authz::principal(&request)?;
        let user = self.get(&principal, request.into_inner()).await?;
        Ok(Response::new(pb::GetUserResponse { user: Some(user) }))
    }

    async fn update_user(
        &self,
        request: Request<pb::UpdateUserRequest>,
    ) -> Result<Response<pb::UpdateUserResponse>, Status> {
        let principal = authz::principal(&request)?;
        let user = self.update(&principal, request.into_inner()).await?;
        Ok(Response::new(pb::UpdateUserResponse { user: Some(user) }))
    }

    async fn deactivate_user(
        &self,
        request: Request<pb::DeactivateUserRequest>,
    ) -> Result<Response<pb::DeactivateUserResponse>, Status> {
        let principal = authz::principal(&request)?;
        let user = self
            .set_active(&principal, &request.into_inner().id, false)
            .await?;
        Ok(Response::new(pb::DeactivateUserResponse {
            user: Some(user),
        }))
    }

    async fn reactivate_user(
        &self,
        request: Request<pb::ReactivateUserRequest>,
    ) -> Result<Response<pb::ReactivateUserResponse>, Status> {
        let principal = authz::principal(&request)?;
        let user = self
            .set_active(&principal, &request.into_inner().id, true)
            .await?;
        Ok(Response::new(pb::ReactivateUserResponse {
            user: Some(user),
        }))
    }

    async fn list_users(
        &self,
        request: Request<pb::ListUsersRequest>,
    ) -> Result<Response<pb::ListUsersResponse>, Status> {
        let principal = authz::principal(&request)?;
        Ok(Response::new(
            self.list(&principal, request.into_inner()).await?,
        ))
    }

    async fn batch_upsert_users(
        &self,
        request: Request<pb::BatchUpsertUsersRequest>,
    ) -> Result<Response<pb::BatchUpsertUsersResponse>, Status> {
        let principal = authz::principal(&request)?;
        let response = bulk::batch_upsert(&self.state, &principal, request.into_inner()).await?;
        Ok(Response::new(response))
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
        let stream = bulk::export(&self.state, &principal, deadline, request.into_inner()).await?;
        Ok(Response::new(stream))
    }
}
