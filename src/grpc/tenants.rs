//! `users.v1.TenantsService`.

use tonic::{Request, Response, Status};
use uuid::Uuid;

use super::{AppState, convert, list, users::merge_violations};
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
        let mut conn = self.state.conn().await?;
        Ok(tenants::insert(&mut conn, &new).await?.into())
    }

    async fn get(&self, request: pb::GetTenantRequest) -> Result<pb::Tenant, Error> {
        let id = convert::parse_id("id", &request.id)?;
        let mut conn = self.state.conn().await?;
        let row = tenants::find(&mut conn, id).await?;
        row.map(Into::into).ok_or(Error::NotFound("tenant"))
    }

    async fn update(&self, request: pb::UpdateTenantRequest) -> Result<pb::Tenant, Error> {
        let id = convert::parse_id("id", &request.id);
        let changes = convert::tenant_changes(request.tenant, self.state.now());
        let (id, changes) = merge_violations(id, changes)?;
        let mut conn = self.state.conn().await?;
        let row = tenants::update(&mut conn, id, &changes).await?;
        row.map(Into::into).ok_or(Error::NotFound("tenant"))
    }

    async fn list(
        &self,
        request: pb::ListTenantsRequest,
    ) -> Result<pb::ListTenantsResponse, Error> {
        let list = list::tenant_list(&request)?;
        let mut conn = self.state.conn().await?;
        let page = tenants::list(&mut conn, &list.query)
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
        let tenant = self.create(request.into_inner()).await?;
        Ok(Response::new(pb::CreateTenantResponse {
            tenant: Some(tenant),
        }))
    }

    async fn get_tenant(
        &self,
        request: Request<pb::GetTenantRequest>,
    ) -> Result<Response<pb::GetTenantResponse>, Status> {
        let tenant = self.get(request.into_inner()).await?;
        Ok(Response::new(pb::GetTenantResponse {
            tenant: Some(tenant),
        }))
    }

    async fn update_tenant(
        &self,
        request: Request<pb::UpdateTenantRequest>,
    ) -> Result<Response<pb::UpdateTenantResponse>, Status> {
        let tenant = self.update(request.into_inner()).await?;
        Ok(Response::new(pb::UpdateTenantResponse {
            tenant: Some(tenant),
        }))
    }

    async fn list_tenants(
        &self,
        request: Request<pb::ListTenantsRequest>,
    ) -> Result<Response<pb::ListTenantsResponse>, Status> {
        Ok(Response::new(self.list(request.into_inner()).await?))
    }
}
