//! `users.v1.TenantsService`: admins only.

use tonic::{Request, Response, Status};
use uuid::Uuid;

use super::idempotent::{self, RequestKey};
use super::{AppState, authz, convert, list, users::merge_violations};
use crate::auth::Principal;
use crate::error::Error;
use crate::pb::v1::{self as pb, tenants_service_server::TenantsService};
use crate::store::tenants::{self, TenantWritten};

#[derive(Debug, Clone)]
pub struct TenantsApi {
    state: AppState,
}

impl TenantsApi {
    pub fn new(state: AppState) -> Self {
        Self { state }
    }

    /// The caller, checked to be an admin, and the key of a request that
    /// carries a request id.
    fn admin<R: idempotent::Idempotent>(
        principal: &Principal,
        request: &mut R,
    ) -> Result<Option<RequestKey>, Error> {
        authz::manage_tenants(principal)?;
        RequestKey::of(&authz::actor(principal), request)
    }

    async fn create(
        &self,
        principal: &Principal,
        mut request: pb::CreateTenantRequest,
    ) -> Result<pb::CreateTenantResponse, Error> {
        let key = Self::admin(principal, &mut request)?;
        let new = convert::new_tenant(request.tenant, Uuid::now_v7(), self.state.now())?;
        idempotent::once!(&self.state, key.as_ref(), |conn| async {
            let tenant = tenants::insert(conn, &new).await?;
            Ok::<_, Error>(pb::CreateTenantResponse {
                tenant: Some(tenant.into()),
            })
        })
    }

    async fn get(&self, request: pb::GetTenantRequest) -> Result<pb::Tenant, Error> {
        let id = convert::parse_id("id", &request.id)?;
        let row = self
            .state
            .db(async |conn| tenants::find(conn, id).await)
            .await?;
        row.filter(|tenant| request.show_deleted || tenant.delete_time.is_none())
            .map(Into::into)
            .ok_or(Error::NotFound("tenant"))
    }

    async fn update(
        &self,
        principal: &Principal,
        mut request: pb::UpdateTenantRequest,
    ) -> Result<pb::UpdateTenantResponse, Error> {
        let key = Self::admin(principal, &mut request)?;
        let id = convert::parse_id("id", &request.id);
        let changes = convert::tenant_changes(request.tenant, self.state.now());
        let (id, changes) = merge_violations(id, changes)?;
        idempotent::once!(&self.state, key.as_ref(), |conn| async {
            let tenant = tenants::update(conn, id, &changes)
                .await?
                .ok_or(Error::NotFound("tenant"))?;
            Ok::<_, Error>(pb::UpdateTenantResponse {
                tenant: Some(tenant.into()),
            })
        })
    }

    async fn delete(
        &self,
        principal: &Principal,
        mut request: pb::DeleteTenantRequest,
    ) -> Result<pb::DeleteTenantResponse, Error> {
        let key = Self::admin(principal, &mut request)?;
        let id = convert::parse_id("id", &request.id)?;
        let by = authz::actor(principal);
        let at = self.state.now();
        let until = at + self.state.retention.deleted;
        idempotent::once!(&self.state, key.as_ref(), |conn| async {
            let tenant = tenant_of(tenants::delete(conn, id, at, until, &by).await?)?;
            Ok::<_, Error>(pb::DeleteTenantResponse {
                tenant: Some(tenant),
            })
        })
    }

    async fn undelete(
        &self,
        principal: &Principal,
        mut request: pb::UndeleteTenantRequest,
    ) -> Result<pb::UndeleteTenantResponse, Error> {
        let key = Self::admin(principal, &mut request)?;
        let id = convert::parse_id("id", &request.id)?;
        let by = authz::actor(principal);
        let at = self.state.now();
        idempotent::once!(&self.state, key.as_ref(), |conn| async {
            let tenant = tenant_of(tenants::undelete(conn, id, at, &by).await?)?;
            Ok::<_, Error>(pb::UndeleteTenantResponse {
                tenant: Some(tenant),
            })
        })
    }

    async fn purge(
        &self,
        principal: &Principal,
        mut request: pb::PurgeTenantRequest,
    ) -> Result<pb::PurgeTenantResponse, Error> {
        let key = Self::admin(principal, &mut request)?;
        let id = convert::parse_id("id", &request.id)?;
        idempotent::once!(&self.state, key.as_ref(), |conn| async {
            match tenants::purge(conn, id).await? {
                TenantWritten::Purged(id) => Ok(pb::PurgeTenantResponse { id: id.to_string() }),
                written => tenant_of(written).and(Err(Error::Internal(
                    "a purge answered with a tenant".into(),
                ))),
            }
        })
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

/// The tenant after a change of its state, or the change's refusal.
fn tenant_of(written: TenantWritten) -> Result<pb::Tenant, Error> {
    match written {
        TenantWritten::Changed(row) => Ok(row.into()),
        TenantWritten::Default => Err(Error::FailedPrecondition {
            reason: "DEFAULT_TENANT",
            message: "the default tenant cannot be deleted",
        }),
        TenantWritten::Live => Err(Error::FailedPrecondition {
            reason: "TENANT_NOT_DELETED",
            message: "only a deleted tenant can be purged: delete it first",
        }),
        TenantWritten::Purged(_) | TenantWritten::Missing => Err(Error::NotFound("tenant")),
    }
}

#[tonic::async_trait]
impl TenantsService for TenantsApi {
    async fn create_tenant(
        &self,
        request: Request<pb::CreateTenantRequest>,
    ) -> Result<Response<pb::CreateTenantResponse>, Status> {
        let principal = authz::principal(&request)?;
        Ok(Response::new(
            self.create(&principal, request.into_inner()).await?,
        ))
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
        let principal = authz::principal(&request)?;
        Ok(Response::new(
            self.update(&principal, request.into_inner()).await?,
        ))
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

    async fn delete_tenant(
        &self,
        request: Request<pb::DeleteTenantRequest>,
    ) -> Result<Response<pb::DeleteTenantResponse>, Status> {
        let principal = authz::principal(&request)?;
        Ok(Response::new(
            self.delete(&principal, request.into_inner()).await?,
        ))
    }

    async fn undelete_tenant(
        &self,
        request: Request<pb::UndeleteTenantRequest>,
    ) -> Result<Response<pb::UndeleteTenantResponse>, Status> {
        let principal = authz::principal(&request)?;
        Ok(Response::new(
            self.undelete(&principal, request.into_inner()).await?,
        ))
    }

    async fn purge_tenant(
        &self,
        request: Request<pb::PurgeTenantRequest>,
    ) -> Result<Response<pb::PurgeTenantResponse>, Status> {
        let principal = authz::principal(&request)?;
        Ok(Response::new(
            self.purge(&principal, request.into_inner()).await?,
        ))
    }
}
