//! Idempotent retries (AIP-155): a mutating request that carries a
//! `request_id` has its effect once, however often it is sent.
//!
//! The first request's write and the record of its response
//! ([`crate::store::requests`]) commit in one transaction. A retry runs the
//! same way; its record clashes with the first one's, which rolls the
//! retry's write back, and the stored response is the answer. A retry sent
//! while the first still runs waits for it on that record's key (or on the
//! row the first one locked). A request that failed stores nothing, so its
//! retry runs again.

use prost::Message;
use sha2::{Digest, Sha256};
use uuid::Uuid;

use super::AppState;
use crate::error::Error;
use crate::pb::v1 as pb;
use crate::store::{models::Actor, requests};

/// A mutating request that may carry a request id.
pub trait Idempotent: Message {
    /// The method, as the record names it.
    const METHOD: &'static str;
    fn request_id(&self) -> &str;
    fn clear_request_id(&mut self);
}

/// What a response is about: purging those erases its record.
pub trait About: Message + Default {
    /// The resource a replay of an erased response is NOT_FOUND as.
    const RESOURCE: &'static str;
    fn tenant(&self) -> Option<Uuid>;
    fn users(&self) -> Vec<Uuid>;
}

macro_rules! idempotent {
    ($($request:ident => $method:literal,)*) => {$(
        impl Idempotent for pb::$request {
            const METHOD: &'static str = $method;
            fn request_id(&self) -> &str {
                &self.request_id
            }
            fn clear_request_id(&mut self) {
                self.request_id.clear();
            }
        }
    )*};
}

idempotent! {
    CreateUserRequest => "CreateUser",
    UpdateUserRequest => "UpdateUser",
    DeactivateUserRequest => "DeactivateUser",
    ReactivateUserRequest => "ReactivateUser",
    DeleteUserRequest => "DeleteUser",
    UndeleteUserRequest => "UndeleteUser",
    PurgeUserRequest => "PurgeUser",
    BatchUpsertUsersRequest => "BatchUpsertUsers",
    CreateTenantRequest => "CreateTenant",
    UpdateTenantRequest => "UpdateTenant",
    DeleteTenantRequest => "DeleteTenant",
    UndeleteTenantRequest => "UndeleteTenant",
    PurgeTenantRequest => "PurgeTenant",
}

fn parse(id: &str) -> Option<Uuid> {
    Uuid::try_parse(id).ok()
}

macro_rules! about_user {
    ($($response:ident,)*) => {$(
        impl About for pb::$response {
            const RESOURCE: &'static str = "user";
            fn tenant(&self) -> Option<Uuid> {
                self.user.as_ref().and_then(|user| parse(&user.tenant_id))
            }
            fn users(&self) -> Vec<Uuid> {
                self.user.iter().filter_map(|user| parse(&user.id)).collect()
            }
        }
    )*};
}

about_user! {
    CreateUserResponse,
    UpdateUserResponse,
    DeactivateUserResponse,
    ReactivateUserResponse,
    DeleteUserResponse,
    UndeleteUserResponse,
}

impl About for pb::PurgeUserResponse {
    const RESOURCE: &'static str = "user";
    fn tenant(&self) -> Option<Uuid> {
        None
    }
    fn users(&self) -> Vec<Uuid> {
        parse(&self.id).into_iter().collect()
    }
}

impl About for pb::BatchUpsertUsersResponse {
    const RESOURCE: &'static str = "user";
    fn tenant(&self) -> Option<Uuid> {
        None
    }
    fn users(&self) -> Vec<Uuid> {
        use pb::batch_upsert_users_result::Outcome;
        self.results
            .iter()
            .filter_map(|result| match &result.outcome {
                Some(Outcome::User(user)) => parse(&user.id),
                _ => None,
            })
            .collect()
    }
}

macro_rules! about_tenant {
    ($($response:ident,)*) => {$(
        impl About for pb::$response {
            const RESOURCE: &'static str = "tenant";
            fn tenant(&self) -> Option<Uuid> {
                self.tenant.as_ref().and_then(|tenant| parse(&tenant.id))
            }
            fn users(&self) -> Vec<Uuid> {
                Vec::new()
            }
        }
    )*};
}

about_tenant! {
    CreateTenantResponse,
    UpdateTenantResponse,
    DeleteTenantResponse,
    UndeleteTenantResponse,
}

impl About for pb::PurgeTenantResponse {
    const RESOURCE: &'static str = "tenant";
    fn tenant(&self) -> Option<Uuid> {
        parse(&self.id)
    }
    fn users(&self) -> Vec<Uuid> {
        Vec::new()
    }
}

/// A request's id, with what tells a retry of it from another request.
#[derive(Debug, Clone)]
pub struct RequestKey {
    caller: Actor,
    id: Uuid,
    method: &'static str,
    /// SHA-256 of the method and the request without its id.
    fingerprint: [u8; 32],
}

impl RequestKey {
    /// The key of `request` from `caller`; `None` without a request id.
    /// Takes the id out of `request`, whose fingerprint is the rest.
    pub fn of<R: Idempotent>(caller: &Actor, request: &mut R) -> Result<Option<Self>, Error> {
        if request.request_id().is_empty() {
            return Ok(None);
        }
        let id = Uuid::try_parse(request.request_id()).map_err(|_| {
            Error::invalid(
                "request_id",
                "must be a UUID such as 0190c8f2-5b7e-7c1a-9d3e-2f4a6b8c0d1e",
            )
        })?;
        request.clear_request_id();
        let fingerprint = Sha256::new()
            .chain_update(R::METHOD.as_bytes())
            .chain_update([0])
            .chain_update(request.encode_to_vec())
            .finalize()
            .into();
        Ok(Some(Self {
            caller: caller.clone(),
            id,
            method: R::METHOD,
            fingerprint,
        }))
    }
}

impl RequestKey {
    /// The record of `response` as the outcome of this request.
    pub fn record<R: About>(
        &self,
        response: &R,
        now: chrono::DateTime<chrono::Utc>,
    ) -> requests::NewRecord {
        requests::NewRecord {
            caller: self.caller.as_str().to_owned(),
            request_id: self.id,
            method: self.method.to_owned(),
            fingerprint: Some(self.fingerprint.to_vec()),
            response: Some(response.encode_to_vec()),
            tenant_id: response.tenant(),
            user_ids: response.users(),
            created_at: now,
        }
    }
}

/// Stores `response` as the outcome of `key`, in the transaction of the
/// write that produced it.
pub async fn record<R: About>(
    conn: &mut diesel_async::AsyncPgConnection,
    key: &RequestKey,
    response: &R,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<(), Error> {
    requests::insert(conn, &key.record(response, now))
        .await
        .map_err(Error::from)
}

/// What to do after a request with a key failed.
pub enum Settled<R> {
    /// The answer: the first request's response, or an error.
    Done(Result<R, Error>),
    /// An expired record was in the way and is gone: run the request again.
    Again,
}

/// After `failure` of a request with `key`: a first request with this key
/// that committed decides the answer; without one, the failure is it.
pub async fn settle<R: About>(state: &AppState, key: &RequestKey, failure: Error) -> Settled<R> {
    if matches!(failure, Error::Unavailable(_)) {
        return Settled::Done(Err(failure));
    }
    let found = state
        .db(async |conn| requests::find(conn, key.caller.as_str(), key.id).await)
        .await;
    let record = match found {
        Err(error) => return Settled::Done(Err(error)),
        Ok(None) => return Settled::Done(Err(failure)),
        Ok(Some(record)) => record,
    };
    let cutoff = state.now() - state.retention.request_ids;
    if record.created_at < cutoff {
        let forgotten = state
            .db(async |conn| requests::forget(conn, key.caller.as_str(), key.id, cutoff).await)
            .await;
        return match forgotten {
            Ok(()) => Settled::Again,
            Err(error) => Settled::Done(Err(error)),
        };
    }
    Settled::Done(replay(key, record))
}

/// The stored response of the first request with `key`.
fn replay<R: About>(key: &RequestKey, record: requests::Record) -> Result<R, Error> {
    let (Some(fingerprint), Some(response)) = (record.fingerprint, record.response) else {
        // Erased with the user or tenant it was about.
        return Err(Error::NotFound(R::RESOURCE));
    };
    if record.method != key.method || fingerprint != key.fingerprint {
        return Err(Error::RequestIdReused);
    }
    R::decode(response.as_slice()).map_err(|error| {
        Error::Internal(format!("a stored response does not decode: {error}").into())
    })
}

/// Runs a write once per request key: `$work` (a future on `$conn` that
/// gives the response) alone without a key; with one, in a transaction
/// with the record of its response, and a failure settled by the record of
/// an earlier request with the same key ([`settle`]).
macro_rules! once {
    ($state:expr, $key:expr, |$conn:ident| $work:expr) => {{
        let state: &$crate::grpc::AppState = $state;
        let key: Option<&$crate::grpc::idempotent::RequestKey> = $key;
        loop {
            let Some(key) = key else {
                break state.write(async |$conn| $work.await).await;
            };
            let result = state
                .write(async |conn| {
                    diesel_async::AsyncConnection::transaction(conn, async |$conn| {
                        let response = $work.await?;
                        $crate::grpc::idempotent::record($conn, key, &response, state.now())
                            .await?;
                        Ok::<_, $crate::error::Error>(response)
                    })
                    .await
                })
                .await;
            match result {
                Ok(response) => break Ok(response),
                Err(failure) => match $crate::grpc::idempotent::settle(state, key, failure).await {
                    $crate::grpc::idempotent::Settled::Done(answer) => break answer,
                    $crate::grpc::idempotent::Settled::Again => continue,
                },
            }
        }
    }};
}

pub(crate) use once;
