//! Authorization: what each caller may do. Every handler asks here first,
//! before it parses or queries anything.
//!
//! | caller | may |
//! |---|---|
//! | admin key | everything in every tenant, tenants included |
//! | editor key of a tenant | create, read, update, deactivate, reactivate, delete, undelete, purge users of its tenant |
//! | viewer key of a tenant | read users of its tenant |
//! | end-user token | read its own user; update its own profile fields |

use tonic::Request;
use uuid::Uuid;

use crate::auth::{Holder, Principal};
use crate::error::Error;
use crate::pb::v1 as pb;
use crate::store::{
    filter::UuidOp,
    models::Actor,
    users::{Condition, UuidField},
};

/// Which users a caller may reach.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Every user of every tenant.
    All,
    /// The users of one tenant; the others do not exist for this caller.
    Tenant(Uuid),
    /// One user: the caller itself.
    Own(Uuid),
}

impl Scope {
    /// The tenant the caller is confined to, if any.
    pub fn tenant(self) -> Option<Uuid> {
        match self {
            Self::Tenant(tenant) => Some(tenant),
            Self::All | Self::Own(_) => None,
        }
    }

    /// The tenant a new user lands in when the request names `given` (empty:
    /// none). Tenant-bound callers write only into their own tenant; the
    /// others get `default` for an empty one, and the parse of `given` decides
    /// otherwise.
    pub fn tenant_for_new_user(self, given: &str, default: Uuid) -> Result<Uuid, Error> {
        match self.tenant() {
            Some(own) if given.is_empty() || Uuid::try_parse(given).ok() == Some(own) => Ok(own),
            Some(_) => Err(Error::PermissionDenied(
                "users can be written only in your own tenant",
            )),
            None => Ok(default),
        }
    }

    /// Confines a list of users to the scope, whatever its filter says.
    pub fn confine(self, conditions: &mut Vec<Condition>) {
        if let Some(tenant) = self.tenant() {
            conditions.push(Condition::Uuid(
                UuidField::TenantId,
                UuidOp::EqualTo(tenant),
            ));
        }
    }

    /// Refuses a user id outside an `Own` scope. Ids outside a `Tenant`
    /// scope are left to the query, which answers NOT_FOUND for them.
    pub fn check_user(self, id: Uuid) -> Result<(), Error> {
        match self {
            Self::Own(own) if own != id => Err(Error::PermissionDenied("only your own user")),
            _ => Ok(()),
        }
    }
}

/// The caller the authentication layer verified.
pub fn principal<T>(request: &Request<T>) -> Result<Principal, Error> {
    // The layer guards every users.v1 route; a call without a principal
    // means the server was wired wrongly, which must not grant anything.
    request
        .extensions()
        .get::<Principal>()
        .cloned()
        .ok_or(Error::Internal(
            "call reached a handler without a principal".into(),
        ))
}

/// Who a change is recorded as made by.
pub fn actor(principal: &Principal) -> Actor {
    match principal {
        Principal::Admin { holder } | Principal::Tenant { holder, .. } => match holder {
            Holder::Key(key_id) => Actor::key(key_id),
            Holder::User(user_id) => Actor::user(*user_id),
        },
        Principal::User { user_id } => Actor::user(*user_id),
    }
}

/// GetUser.
pub fn read_user(principal: &Principal) -> Scope {
    match principal {
        Principal::Admin { .. } => Scope::All,
        Principal::Tenant { tenant_id, .. } => Scope::Tenant(*tenant_id),
        Principal::User { user_id } => Scope::Own(*user_id),
    }
}

/// ListUsers.
pub fn list_users(principal: &Principal) -> Result<Scope, Error> {
    match principal {
        Principal::Admin { .. } => Ok(Scope::All),
        Principal::Tenant { tenant_id, .. } => Ok(Scope::Tenant(*tenant_id)),
        Principal::User { .. } => Err(Error::PermissionDenied("end users cannot list users")),
    }
}

/// WatchUsers: admins watch any tenant or all; tenant keys (viewers too)
/// their own tenant; end users nothing.
pub fn watch_users(principal: &Principal) -> Result<Scope, Error> {
    match principal {
        Principal::User { .. } => Err(Error::PermissionDenied("end users cannot watch users")),
        other => list_users(other),
    }
}

/// CreateUser, DeactivateUser, ReactivateUser, DeleteUser, UndeleteUser,
/// PurgeUser, BatchUpsertUsers: server-side operations.
pub fn manage_users(principal: &Principal) -> Result<Scope, Error> {
    match principal {
        Principal::Admin { .. } => Ok(Scope::All),
        Principal::Tenant {
            tenant_id,
            can_write: true,
            ..
        } => Ok(Scope::Tenant(*tenant_id)),
        Principal::Tenant { .. } => Err(Error::PermissionDenied("viewer keys are read-only")),
        Principal::User { .. } => Err(Error::PermissionDenied(
            "end users cannot create, deactivate, reactivate or delete users",
        )),
    }
}

/// UpdateUser: like [`manage_users`], plus end users on their own profile
/// fields.
pub fn update_user(principal: &Principal, update: Option<&pb::UserUpdate>) -> Result<Scope, Error> {
    match principal {
        Principal::User { user_id } => {
            let touches_restricted = update.is_some_and(|u| {
                u.email.is_some() || u.active.is_some() || u.custom_data.is_some()
            });
            if touches_restricted {
                return Err(Error::PermissionDenied(
                    "end users may change only first and last name, phone, locale, timezone, avatar URL and opt-in",
                ));
            }
            Ok(Scope::Own(*user_id))
        }
        _ => manage_users(principal),
    }
}

/// Every TenantsService call.
pub fn manage_tenants(principal: &Principal) -> Result<(), Error> {
    match principal {
        Principal::Admin { .. } => Ok(()),
        _ => Err(Error::PermissionDenied("only admin keys manage tenants")),
    }
}

/// Every KeysService call.
pub fn manage_keys(principal: &Principal) -> Result<(), Error> {
    match principal {
        Principal::Admin { .. } => Ok(()),
        _ => Err(Error::PermissionDenied("only admin keys manage keys")),
    }
}
