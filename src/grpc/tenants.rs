//! `users.v1.TenantsService`.

use tonic::{Request, Response, Status};
use uuid::Uuid;

use super::{AppState, authz, convert, list, users::merge_violations};
use crate::error::Error;
use crate::pb::v1::{self as pb, tenants_service_server::TenantsService};
use crate::store::tenants;

#[derive(Debug, Clone)]
pub struct TenantsApi {
    state: AppState,
}

impl TenantsApi {
    pub fn new(state: AppState) -> Self {
        Self { state }
    }

    async fn create(&self, request: pb::CreateTenantRequest) -> Result<pb::Tenant, Error> {
        let new = convert::new_tenant(request.tenant, Uuid::now_v7(), self.state.now())?;
        Ok(self
            .state
            .db(async |conn| tenants::insert(conn, &new).await)
            .await?
            .into())
    }

    async fn get(&self, request: pb::GetTenantRequest) -> Result<pb::Tenant, Error> {
        let id = convert::parse_id("id", &request.id)?;
        let row = self
            .state
            .db(async |conn| tenants::find(conn, id).await)
            .await?;
        row.map(Into::into).ok_or(Error::NotFound("tenant"))
    }

    async fn update(&self, request: pb::UpdateTenantRequest) -> Result<pb::Tenant, Error> {
        let id = convert::parse_id("id", &request.id);
        let changes = convert::tenant_changes(request.tenant, self.state.now());
        let (id, changes) = merge_violations(id, changes)?;
        let row = self
            .state
            .db(async |conn| tenants::update(conn, id, &changes).await)
            .await?;
        row.map(Into::into).ok_or(Error::NotFound("tenant"))
    }

    async fn list(
        &self,
        request: pb::ListTenantsRequest,
    ) -> Result<pb::ListTenantsResponse, Error> {
        let list = list::tenant_list(&request)?;
        let page = self
            .state
            .db(async |conn| tenants::list(conn, &list.query).await)
            .await?
            .map_err(|_| Error::invalid("page_token", "does not match this request"))?;
        Ok(pb::ListTenantsResponse {
            data: page.rows.into_iter().map(Into::into).collect(),
            total_count: page.total,
            next_page_token: page
                .next
                .map(|cursor| list::encode_token(&list.fingerprint, cursor))
                .unwrap_or_default(),
        })
    }
}

#[tonic::async_trait]
impl TenantsService for TenantsApi {
    async fn create_tenant(
        &self,
        request: Request<pb::CreateTenantRequest>,
    ) -> Result<Response<pb::CreateTenantResponse>, Status> {
        let tenant = {
            authz::manage_tenants(&authz::principal(&request)?)?;
            self.create(request.into_inner()).await?
        };
        Ok(Response::new(pb::CreateTenantResponse {
            tenant: Some(tenant),
        }))
    }

    async fn get_tenant(
        &self,
        request: Request<pb::GetTenantRequest>,
    ) -> Result<Response<pb::GetTenantResponse>, Status> {
        let tenant = {
            authz::manage_tenants(&authz::principal(&request)?)?;
            self.get(request.into_inner()).await?
        };
        Ok(Response::new(pb::GetTenantResponse {
            tenant: Some(tenant),
        }))
    }

    async fn update_tenant(
        &self,
        request: Request<pb::UpdateTenantRequest>,
    ) -> Result<Response<pb::UpdateTenantResponse>, Status> {
        let tenant = {
            authz::manage_tenants(&authz::principal(&request)?)?;
            self.update(request.into_inner()).await?
        };
        Ok(Response::new(pb::UpdateTenantResponse {
            tenant: Some(tenant),
        }))
    }

    async fn list_tenants(
        &self,
        request: Request<pb::ListTenantsRequest>,
    ) -> Result<Response<pb::ListTenantsResponse>, Status> {
        Ok(Response::new({
            authz::manage_tenants(&authz::principal(&request)?)?;
            self.list(request.into_inner()).await?
        }))
    }
}
