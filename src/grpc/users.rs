//! `users.v1.UsersService`.

use tonic::{Request, Response, Status};
use uuid::Uuid;

use super::{AppState, convert, list};
use crate::error::Error;
use crate::pb::v1::{self as pb, users_service_server::UsersService};
use crate::store::users;

#[derive(Debug, Clone)]
pub struct UsersApi {
    state: AppState,
}

impl UsersApi {
    pub fn new(state: AppState) -> Self {
        Self { state }
    }

    async fn create(&self, request: pb::CreateUserRequest) -> Result<pb::User, Error> {
        let new = convert::new_user(
            request.user,
            self.state.default_tenant,
            Uuid::now_v7(),
            self.state.now(),
        )?;
        let mut conn = self.state.conn().await?;
        Ok(users::insert(&mut conn, &new).await?.into())
    }

    async fn get(&self, request: pb::GetUserRequest) -> Result<pb::User, Error> {
        let id = convert::parse_id("id", &request.id)?;
        let mut conn = self.state.conn().await?;
        let row = users::find(&mut conn, id).await?;
        row.map(Into::into).ok_or(Error::NotFound("user"))
    }

    async fn update(&self, request: pb::UpdateUserRequest) -> Result<pb::User, Error> {
        let id = convert::parse_id("id", &request.id);
        let changes = convert::user_changes(request.user, self.state.now());
        let (id, changes) = merge_violations(id, changes)?;
        let mut conn = self.state.conn().await?;
        let row = users::update(&mut conn, id, &changes).await?;
        row.map(Into::into).ok_or(Error::NotFound("user"))
    }

    async fn set_active(&self, id: &str, active: bool) -> Result<pb::User, Error> {
        let id = convert::parse_id("id", id)?;
        let mut conn = self.state.conn().await?;
        let row = users::set_active(&mut conn, id, active, self.state.now()).await?;
        row.map(Into::into).ok_or(Error::NotFound("user"))
    }

    async fn list(&self, request: pb::ListUsersRequest) -> Result<pb::ListUsersResponse, Error> {
        let list = list::user_list(&request)?;
        let mut conn = self.state.conn().await?;
        let page = users::list(&mut conn, &list.query)
            .await?
            .map_err(|_| Error::invalid("page_token", "does not match this request"))?;
        Ok(pb::ListUsersResponse {
            data: page.rows.into_iter().map(Into::into).collect(),
            total_count: page.total,
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
        let user = self.create(request.into_inner()).await?;
        Ok(Response::new(pb::CreateUserResponse { user: Some(user) }))
    }

    async fn get_user(
        &self,
        request: Request<pb::GetUserRequest>,
    ) -> Result<Response<pb::GetUserResponse>, Status> {
        let user = self.get(request.into_inner()).await?;
        Ok(Response::new(pb::GetUserResponse { user: Some(user) }))
    }

    async fn update_user(
        &self,
        request: Request<pb::UpdateUserRequest>,
    ) -> Result<Response<pb::UpdateUserResponse>, Status> {
        let user = self.update(request.into_inner()).await?;
        Ok(Response::new(pb::UpdateUserResponse { user: Some(user) }))
    }

    async fn deactivate_user(
        &self,
        request: Request<pb::DeactivateUserRequest>,
    ) -> Result<Response<pb::DeactivateUserResponse>, Status> {
        let user = self.set_active(&request.into_inner().id, false).await?;
        Ok(Response::new(pb::DeactivateUserResponse {
            user: Some(user),
        }))
    }

    async fn reactivate_user(
        &self,
        request: Request<pb::ReactivateUserRequest>,
    ) -> Result<Response<pb::ReactivateUserResponse>, Status> {
        let user = self.set_active(&request.into_inner().id, true).await?;
        Ok(Response::new(pb::ReactivateUserResponse {
            user: Some(user),
        }))
    }

    async fn list_users(
        &self,
        request: Request<pb::ListUsersRequest>,
    ) -> Result<Response<pb::ListUsersResponse>, Status> {
        Ok(Response::new(self.list(request.into_inner()).await?))
    }
}
