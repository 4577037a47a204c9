//! BatchUpsertUsers and ExportUsers: moving many users at once.

use std::{collections::HashSet, pin::Pin, sync::Arc};

use futures_util::{Stream, StreamExt};
use prost::Message;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;
use uuid::Uuid;

use super::idempotent::{self, RequestKey};
use super::{AppState, authz::Scope, convert, list};
use crate::auth::Principal;
use crate::error::Error;
use crate::pb::v1::{self as pb, batch_upsert_users_result::Outcome};
use crate::store::{
    db,
    models::{Actor, NewUser},
    users::{self, Commit, Write, Written},
};

/// Most users in one BatchUpsertUsers call.
pub const MAX_BATCH: usize = 1000;
/// Users per ExportUsers message.
pub const EXPORT_CHUNK: i64 = 500;

pub type ExportStream = Pin<Box<dyn Stream<Item = Result<pb::ExportUsersResponse, Status>> + Send>>;

/// Parses every item; the ones that cannot be stored get their error now.
struct Batch {
    /// The outcome of each item, in request order; `None` until stored.
    outcomes: Vec<Option<Result<(pb::User, bool), Error>>>,
    /// The items to store, with their position in the request.
    rows: Vec<(usize, NewUser)>,
}

fn parse_batch(state: &AppState, scope: Scope, by: &Actor, users: Vec<pb::User>) -> Batch {
    let now = state.now();
    let mut batch = Batch {
        outcomes: Vec::with_capacity(users.len()),
        rows: Vec::with_capacity(users.len()),
    };
    let mut seen = HashSet::new();
    for (i, user) in users.into_iter().enumerate() {
        let tenant = match scope.tenant_for_new_user(&user.tenant_id, state.default_tenant) {
            Ok(tenant) => tenant,
            Err(error) => {
                batch.outcomes.push(Some(Err(error)));
                continue;
            }
        };
        let parsed =
            convert::new_user(Some(user), tenant, Uuid::now_v7(), now, by).and_then(|new| {
                if new.reference.is_empty() {
                    Err(Error::invalid(
                        "user.reference",
                        "is required: batch items are matched on it",
                    ))
                } else if !seen.insert((new.tenant_id, new.reference.as_str().to_owned())) {
                    Err(Error::invalid(
                        "user.reference",
                        "appears more than once in this batch",
                    ))
                } else {
                    Ok(new)
                }
            });
        match parsed {
            Ok(new) => {
                batch.rows.push((i, new));
                batch.outcomes.push(None);
            }
            Err(error) => batch.outcomes.push(Some(Err(error))),
        }
    }
    batch
}

pub async fn batch_upsert(
    state: &AppState,
    principal: &Principal,
    mut request: pb::BatchUpsertUsersRequest,
) -> Result<pb::BatchUpsertUsersResponse, Error> {
    let scope = super::authz::manage_users(principal)?;
    if request.users.len() > MAX_BATCH {
        return Err(Error::invalid(
            "users",
            format!("at most {MAX_BATCH} users per call"),
        ));
    }
    let by = super::authz::actor(principal);
    let key = RequestKey::of(&by, &mut request)?;
    let Batch { outcomes, rows } = parse_batch(state, scope, &by, request.users);

    let writes: Vec<Write> = rows
        .iter()
        .map(|(_, row)| Write::Upsert(row.clone()))
        .collect();
    idempotent::once!(state, key.as_ref(), |conn| async {
        let stored = users::apply(conn, &writes, Commit::Together).await?;
        let parsed = outcomes
            .iter()
            .map(|outcome| {
                outcome
                    .as_ref()
                    .map(|result| result.as_ref().cloned().map_err(Error::duplicate))
            })
            .collect();
        Ok::<_, Error>(respond(parsed, &rows, stored))
    })
}

/// The response: each item's outcome, from its parse or from its write.
fn respond(
    mut outcomes: Vec<Option<Result<(pb::User, bool), Error>>>,
    rows: &[(usize, NewUser)],
    stored: users::Outcomes,
) -> pb::BatchUpsertUsersResponse {
    for ((i, _), result) in rows.iter().zip(stored) {
        outcomes[*i] = Some(
            result
                .map_err(Error::from)
                .and_then(|written| match written {
                    Written::Created(row) => Ok((row.into(), true)),
                    Written::Updated(row) | Written::Unchanged(row) => Ok((row.into(), false)),
                    Written::Reserved => Err(Error::Reserved),
                    other => Err(Error::Internal(
                        format!("an upsert answered {other:?}").into(),
                    )),
                }),
        );
    }
    pb::BatchUpsertUsersResponse {
        results: outcomes
            .into_iter()
            .map(|outcome| match outcome {
                Some(Ok((user, created))) => pb::BatchUpsertUsersResult {
                    outcome: Some(Outcome::User(user)),
                    created,
                },
                Some(Err(error)) => pb::BatchUpsertUsersResult {
                    outcome: Some(Outcome::Error(rpc_status(error))),
                    created: false,
                },
                None => pb::BatchUpsertUsersResult::default(),
            })
            .collect(),
    }
}

/// An item's error as `google.rpc.Status`, with the same code, message and
/// details a single call would have answered.
fn rpc_status(error: Error) -> tonic_types::pb::Status {
    let status = Status::from(error);
    tonic_types::pb::Status::decode(status.details()).unwrap_or_else(|_| tonic_types::pb::Status {
        code: status.code() as i32,
        message: status.message().to_owned(),
        details: Vec::new(),
    })
}

/// Streams the users matching the request from one snapshot, in chunks.
///
/// The stream ends by `deadline` whatever the client does, and sooner when
/// the client reads nothing for `stall_timeout`: either way its export slot
/// and its transaction are released, and the client sees DEADLINE_EXCEEDED
/// after the chunks it did read, never a clean end.
pub async fn export(
    state: &AppState,
    principal: &Principal,
    deadline: tokio::time::Instant,
    after: Option<crate::store::standby::Lsn>,
    request: pb::ExportUsersRequest,
) -> Result<ExportStream, Error> {
    let scope = super::authz::list_users(principal)?;
    let mut conditions = list::export_conditions(&request)?;
    scope.confine(&mut conditions);
    let Ok(permit) = Arc::clone(&state.exports).try_acquire_owned() else {
        return Err(Error::TooBusy("too many exports are running; retry later"));
    };
    // A small buffer: the reader's pace sets the pace, and memory stays flat
    // however many users there are.
    let (tx, rx) = mpsc::channel(2);
    let (end_tx, end_rx) = oneshot::channel();
    // From a standby fresh enough, as the other reads; the whole stream
    // from where it started.
    let standby = state.standbys.pick(after).await;
    state.metrics.read_from(standby.is_some());
    let pool = standby.map_or_else(|| state.pool.clone(), |standby| standby.pool.clone());
    let stall_timeout = state.stream_stall_timeout;
    let mut abandon = state.abandon.subscribe();
    tokio::spawn(async move {
        let _permit = permit;
        let send = async |chunk| match tokio::time::timeout(stall_timeout, tx.send(chunk)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(Ended::Gone),
            Err(_) => Err(Ended::Stalled),
        };
        let work = db::run(&pool, async |conn| {
            // One snapshot for the whole export.
            conn.build_transaction()
                .repeatable_read()
                .read_only()
                .run(async |conn| {
                    let mut after = None;
                    loop {
                        let rows =
                            users::export_chunk(conn, &conditions, after, EXPORT_CHUNK).await?;
                        let last_chunk = (rows.len() as i64) < EXPORT_CHUNK;
                        after = rows.last().map(|row| row.id);
                        if !rows.is_empty() {
                            let chunk = pb::ExportUsersResponse {
                                users: rows.into_iter().map(Into::into).collect(),
                            };
                            if let Err(ended) = send(chunk).await {
                                return Ok::<_, diesel::result::Error>(Err(ended));
                            }
                        }
                        if last_chunk {
                            return Ok(Ok(()));
                        }
                    }
                })
                .await
        });
        // Dropping the work at the deadline, or when the server gives up on
        // its calls, cancels its statement and closes its connection, which
        // ends the transaction.
        let given_up = async {
            let _ = abandon.wait_for(|abandoned| *abandoned).await.map(|_| ());
        };
        let outcome = tokio::select! {
            outcome = tokio::time::timeout_at(deadline, work) => outcome,
            () = given_up => {
                let _ = end_tx.send(Status::unavailable(
                    "the server is shutting down; export again from another replica",
                ));
                return;
            }
        };
        let end = match outcome {
            Ok(Ok(Ok(Ok(())))) | Ok(Ok(Ok(Err(Ended::Gone)))) => return,
            Ok(Ok(Ok(Err(Ended::Stalled)))) => Status::deadline_exceeded(format!(
                "the client read nothing for {} s",
                stall_timeout.as_secs_f64()
            )),
            Ok(Ok(Err(e))) => Error::from(e).into(),
            Ok(Err(e)) => Error::from(e).into(),
            Err(_) => Status::deadline_exceeded("the export ran past the call's deadline"),
        };
        let _ = end_tx.send(end);
    });
    let end = futures_util::stream::once(end_rx).filter_map(|end| async move { end.ok().map(Err) });
    Ok(Box::pin(ReceiverStream::new(rx).map(Ok).chain(end)))
}

/// Why an export stopped sending before its last chunk.
enum Ended {
    /// The client went away.
    Gone,
    /// The client read nothing for the stall timeout.
    Stalled,
}
