//! Who is calling. The authentication layer turns the bearer token of every
//! `users.v1` call into a [`Principal`] (an API key or an end user); handlers
//! decide with it what the caller may do.

pub mod api_key;
pub mod authenticator;
pub mod jwks;
pub mod jwt;
pub mod keys;

use std::num::NonZeroU32;

use uuid::Uuid;

/// The role of an API key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Role {
    /// Everything in every tenant (super admin).
    Admin,
    /// Create, read, update, deactivate and reactivate the users of one tenant.
    Editor,
    /// Read the users of one tenant.
    Viewer,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Admin => "admin",
            Self::Editor => "editor",
            Self::Viewer => "viewer",
        }
    }

    pub fn parse(role: &str) -> Option<Self> {
        match role {
            "admin" => Some(Self::Admin),
            "editor" => Some(Self::Editor),
            "viewer" => Some(Self::Viewer),
            _ => None,
        }
    }
}

/// A verified caller, put into the request's extensions by the layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    /// An `admin` API key, or an end user whose token grants admin.
    Admin { holder: Holder },
    /// An `editor` or `viewer` of one tenant: an API key, or an end user
    /// whose token grants the role.
    Tenant {
        holder: Holder,
        tenant_id: Uuid,
        can_write: bool,
    },
    /// An end user, through a token of the identity provider; `sub` is the
    /// user's id in this service.
    User { user_id: Uuid },
}

/// Who holds a role: an API key, or an end user through a token of the
/// identity provider that grants it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Holder {
    Key(String),
    User(Uuid),
}

impl Principal {
    /// The key its calls are counted under by the rate limiter.
    pub fn rate_key(&self) -> String {
        match self {
            Self::Admin { holder } | Self::Tenant { holder, .. } => match holder {
                Holder::Key(key_id) => format!("key:{key_id}"),
                Holder::User(user_id) => format!("user:{user_id}"),
            },
            Self::User { user_id } => format!("user:{user_id}"),
        }
    }

    /// For logs: the key id or the user id, never a secret.
    pub fn id(&self) -> String {
        match self {
            Self::Admin { holder } | Self::Tenant { holder, .. } => match holder {
                Holder::Key(key_id) => key_id.clone(),
                Holder::User(user_id) => user_id.to_string(),
            },
            Self::User { user_id } => user_id.to_string(),
        }
    }
}

/// The outcome of authentication: the caller and its own call quota, if the
/// key has one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authenticated {
    pub principal: Principal,
    pub rate_limit_per_second: Option<NonZeroU32>,
}
