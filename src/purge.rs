//! The purge job: erases the users and tenants whose `expire_time` has
//! passed, forgets the request ids older than their retention, and prunes
//! the change events older than theirs.
//!
//! It works in small batches, each its own short transaction, so that it
//! never holds many locks or a long snapshot, and skips rows another
//! transaction holds (they are taken at the next round). A failed round
//! (the database away) is logged once per state change and tried again at
//! the next interval; nothing is lost, the work is only late.

use std::time::Duration;

use crate::grpc::AppState;
use crate::store::{events, requests, tenants, users};

/// Rows erased or forgotten by one statement.
const BATCH: i64 = 500;

/// Runs a round every `every` until `stop` turns true.
pub async fn run(state: AppState, every: Duration, mut stop: tokio::sync::watch::Receiver<bool>) {
    let mut failing = false;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.wait_for(|stop| *stop) => return,
        }
        match round(&state).await {
            Ok(done) => {
                if failing {
                    tracing::info!("purge job works again");
                    failing = false;
                }
                if done.users + done.tenants + done.request_ids + done.events > 0 {
                    tracing::info!(
                        users = done.users,
                        tenants = done.tenants,
                        request_ids = done.request_ids,
                        events = done.events,
                        "purged what had expired"
                    );
                }
            }
            Err(error) => {
                if !failing {
                    tracing::warn!(%error, "purge job failed; trying again at the next interval");
                    failing = true;
                }
            }
        }
    }
}

/// What one round erased.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Purged {
    pub users: usize,
    pub tenants: usize,
    pub request_ids: usize,
    pub events: usize,
}

/// Erases everything expired now, a batch at a time.
pub async fn round(state: &AppState) -> Result<Purged, crate::error::Error> {
    let mut done = Purged::default();
    loop {
        let now = state.now();
        let users = state
            .write(async |conn| users::purge_expired(conn, now, BATCH).await)
            .await?;
        done.users += users;
        if users < BATCH as usize {
            break;
        }
    }
    let now = state.now();
    let expired = state
        .db(async |conn| tenants::expired(conn, now, BATCH).await)
        .await?;
    for tenant in expired {
        if let tenants::TenantWritten::Purged(_) = state
            .write(async |conn| tenants::purge(conn, tenant).await)
            .await?
        {
            done.tenants += 1;
        }
    }
    loop {
        let before = state.now() - state.retention.request_ids;
        let forgotten = state
            .db(async |conn| requests::forget_expired(conn, before, BATCH).await)
            .await?;
        done.request_ids += forgotten;
        if forgotten < BATCH as usize {
            break;
        }
    }
    loop {
        let before = state.now() - state.retention.events;
        let pruned = state
            .db(async |conn| events::prune(conn, before, BATCH).await)
            .await?;
        done.events += pruned;
        if pruned < BATCH as usize {
            break;
        }
    }
    Ok(done)
}
