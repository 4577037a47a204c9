//! The relay of the change feed to NATS JetStream (`--nats-url`), for
//! consumers that do not speak gRPC streams.
//!
//! Every event goes, in feed order, to subject
//! `users.v1.events.<tenant_id>.<user_id>.<type>` as an encoded
//! `users.v1.UserEvent` whose `Nats-Msg-Id` header is its `event_id`.
//!
//! - **One relay at a time.** A replica relays while it holds a Postgres
//!   advisory lock on a connection of its own; when it dies, the lock goes
//!   with its connection and another replica's relay takes over.
//! - **Nothing lost, nothing twice, in order.** The relay's position is
//!   stored in Postgres (`user_events_relays`) only after JetStream
//!   acknowledged every event before it. Each page it reads is fixed by two
//!   snapshots, so after a failure the same page is read again, identically;
//!   the events JetStream already holds (its last message's id says which)
//!   are skipped, and `Nats-Msg-Id` makes any other repeat harmless. Every
//!   event but the first of a run names the one before it
//!   (`Nats-Expected-Last-Msg-Id`), so an event that follows a lost one is
//!   refused instead of stored out of order.
//! - **Erasure.** Before it relays a PURGED event, the relay purges every
//!   message of that user from the stream.

use std::{sync::Arc, time::Duration};

use async_nats::{
    HeaderMap,
    jetstream::{self, stream},
};
use prost::Message;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::grpc::convert;
use crate::metrics::Metrics;
use crate::pb::v1 as pb;
use crate::store::{
    db::{self, DbPool},
    events::{self, Committed, Event, Filter, Position},
};

/// What the relay needs to know.
#[derive(Debug, Clone)]
pub struct RelaySettings {
    /// The NATS server(s), as `async_nats::connect` takes them.
    pub url: String,
    /// The JetStream stream, created when missing.
    pub stream: String,
    /// The stream's duplicate window (JetStream drops a repeated
    /// `Nats-Msg-Id` within it).
    pub duplicate_window: Duration,
}

/// The subjects of the stream.
pub const SUBJECTS: &str = "users.v1.events.>";
/// Events per page, published together and then acknowledged together.
const PAGE: i64 = 256;
/// The longest wait before looking for events the relay was not told of.
const POLL: Duration = Duration::from_millis(100);
/// Wait before trying again after a failure.
const BACK_OFF: Duration = Duration::from_secs(1);
/// An idle relay stores its position this often, so that a restart does
/// not begin far back.
const STORE_IDLE: Duration = Duration::from_secs(10);
/// Advisory lock key of the relay: one relay per database.
const RELAY_LOCK: i64 = 0x7573_6572_7265_6c61; // "userrela"

/// The subject of an event.
pub fn subject(event: &pb::UserEvent) -> String {
    let kind = pb::UserEventType::try_from(event.r#type)
        .unwrap_or(pb::UserEventType::Unspecified)
        .as_str_name()
        .trim_start_matches("USER_EVENT_TYPE_")
        .to_ascii_lowercase();
    let user = event.user.as_ref();
    format!(
        "users.v1.events.{}.{}.{kind}",
        user.map_or("", |u| u.tenant_id.as_str()),
        user.map_or("", |u| u.id.as_str()),
    )
}

/// Relays until `stop` turns true. Failures (NATS or Postgres away) are
/// logged once per state change and tried again; the position in Postgres
/// makes each attempt continue where the last acknowledged event was.
pub async fn run(
    pool: DbPool,
    db_config: tokio_postgres::Config,
    settings: RelaySettings,
    committed: Committed,
    metrics: Arc<Metrics>,
    mut stop: watch::Receiver<bool>,
) {
    let mut failing: Option<String> = None;
    loop {
        let attempt = relay(&pool, &db_config, &settings, &committed, &metrics);
        let outcome = tokio::select! {
            outcome = attempt => outcome,
            _ = stop.wait_for(|stop| *stop) => return,
        };
        let error = match outcome {
            Ok(()) => continue,
            Err(error) => error,
        };
        if failing.as_deref() != Some(error.as_str()) {
            tracing::warn!(%error, "relay to NATS stopped; trying again");
            failing = Some(error);
        }
        // The lag grows while the relay cannot relay.
        if let Ok(Ok(Some(stored))) = db::run(&pool, async |conn| {
            events::relay_position(conn, &settings.stream).await
        })
        .await
            && let Ok(position) = Position::decode(&stored)
        {
            show_lag(&pool, &position, &metrics).await;
        }
        tokio::select! {
            () = tokio::time::sleep(BACK_OFF) => {}
            _ = stop.wait_for(|stop| *stop) => return,
        }
    }
}

type Failure = String;

/// One spell of relaying: takes the lock (or waits for it), connects, and
/// relays until something fails.
async fn relay(
    pool: &DbPool,
    db_config: &tokio_postgres::Config,
    settings: &RelaySettings,
    committed: &Committed,
    metrics: &Metrics,
) -> Result<(), Failure> {
    let (lock, connection) = db_config
        .connect(tokio_postgres::NoTls)
        .await
        .map_err(|e| format!("cannot connect to Postgres for the relay's lock: {e}"))?;
    let lock_driver = tokio::spawn(connection);
    loop {
        let held: bool = lock
            .query_one("SELECT pg_try_advisory_lock($1)", &[&RELAY_LOCK])
            .await
            .map_err(|e| format!("cannot take the relay's lock: {e}"))?
            .get(0);
        if held {
            break;
        }
        // Another replica relays (and shows the lag); look again later.
        metrics.relay_lag(0, 0.0);
        tokio::time::sleep(BACK_OFF).await;
    }
    let nats = async_nats::ConnectOptions::new()
        .connection_timeout(Duration::from_secs(5))
        .request_timeout(Some(Duration::from_secs(5)))
        .connect(settings.url.as_str())
        .await
        .map_err(|e| format!("cannot connect to NATS at {}: {e}", settings.url))?;
    let context = jetstream::new(nats);
    let mut stream = context
        .get_or_create_stream(stream::Config {
            name: settings.stream.clone(),
            subjects: vec![SUBJECTS.to_owned()],
            duplicate_window: settings.duplicate_window,
            storage: stream::StorageType::File,
            ..Default::default()
        })
        .await
        .map_err(|e| format!("cannot open the JetStream stream {}: {e}", settings.stream))?;
    tracing::info!(stream = %settings.stream, "relaying the change feed to NATS JetStream");

    let mut commits = committed.subscribe();
    let mut position = match db::run(pool, async |conn| {
        events::relay_position(conn, &settings.stream).await
    })
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e| e.to_string())?
    {
        Some(stored) => Position::decode(&stored)
            .map_err(|_| format!("the stored position of {} is unreadable", settings.stream))?,
        // First start: from now.
        None => Position::At(now(pool).await?),
    };
    let horizon = db::run(pool, events::horizon)
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    if position.check(&now(pool).await?, horizon) == Err(events::BadToken::Expired) {
        // Away longer than --event-retention: what was pruned meanwhile is
        // gone; relay everything still kept.
        tracing::error!(
            stream = %settings.stream,
            "the relay is further behind than --event-retention: events pruned meanwhile never reached NATS"
        );
    }
    // The first page of a spell skips what JetStream already holds.
    let mut resumed = true;
    let mut stored_at = Instant::now() - STORE_IDLE;
    loop {
        if lock_driver.is_finished() || lock.is_closed() {
            return Err("lost the relay's lock connection".into());
        }
        // Fix the page's end first, so that reading it again after a
        // failure gives the same events in the same order.
        if let Position::At(from) = &position {
            let to = now(pool).await?;
            position = Position::Within {
                from: from.clone(),
                to,
                after: i64::MIN,
            };
        }
        let page = db::run(pool, async |conn| {
            events::read(conn, &position, &Filter::default(), PAGE).await
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
        let full = page.events.len() as i64 >= PAGE;
        let published = !page.events.is_empty();
        if published {
            let skip = if resumed {
                last_stored_id(&mut stream).await
            } else {
                None
            };
            publish(&context, &stream, page.events, skip).await?;
        }
        resumed = false;
        position = page.end;
        if published || stored_at.elapsed() >= STORE_IDLE {
            let token = position.encode();
            db::run(pool, async |conn| {
                events::set_relay_position(conn, &settings.stream, &token).await
            })
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
            stored_at = Instant::now();
        }
        if full {
            show_lag(pool, &position, metrics).await;
            continue;
        }
        metrics.relay_lag(0, 0.0);
        tokio::select! {
            _ = commits.changed() => {}
            () = tokio::time::sleep(POLL) => {}
        }
    }
}

/// Sets the lag metrics to the events committed after `position`.
async fn show_lag(pool: &DbPool, position: &Position, metrics: &Metrics) {
    if let Ok(Ok((behind, oldest))) =
        db::run(pool, async |conn| events::backlog(conn, position).await).await
    {
        let waited = oldest.map_or(0.0, |time| {
            (chrono::Utc::now() - time).num_milliseconds().max(0) as f64 / 1e3
        });
        metrics.relay_lag(behind, waited);
    }
}

async fn now(pool: &DbPool) -> Result<events::Snapshot, Failure> {
    db::run(pool, events::now)
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())
}

/// The `Nats-Msg-Id` of the stream's last message, if it has one.
async fn last_stored_id(stream: &mut stream::Stream) -> Option<i64> {
    let last = stream.info().await.ok()?.state.last_sequence;
    if last == 0 {
        return None;
    }
    let message = stream.get_raw_message(last).await.ok()?;
    message
        .headers
        .get(async_nats::header::NATS_MESSAGE_ID)?
        .as_str()
        .parse()
        .ok()
}

/// Publishes `events` in order and waits for JetStream to acknowledge all
/// of them; those up to the event `skip` (already stored) are left out.
async fn publish(
    context: &jetstream::Context,
    stream: &stream::Stream,
    events: Vec<Event>,
    skip: Option<i64>,
) -> Result<(), Failure> {
    let start = skip
        .and_then(|skip| events.iter().position(|event| event.seq == skip))
        .map_or(0, |stored| stored + 1);
    let mut acks = Vec::new();
    let mut previous: Option<String> = None;
    for event in events.into_iter().skip(start) {
        let purged = event.kind == pb::UserEventType::Purged as i16;
        let event = convert::user_event(event);
        let subject = subject(&event);
        if purged {
            // Everything before must be stored before the purge runs.
            settle(&mut acks).await?;
            let prefix = subject.trim_end_matches("purged");
            stream
                .purge()
                .filter(format!("{prefix}*"))
                .await
                .map_err(|e| format!("cannot purge a user's messages: {e}"))?;
            previous = None;
        }
        let mut headers = HeaderMap::new();
        headers.insert(async_nats::header::NATS_MESSAGE_ID, event.event_id.as_str());
        if let Some(previous) = &previous {
            headers.insert(
                async_nats::header::NATS_EXPECTED_LAST_MESSAGE_ID,
                previous.as_str(),
            );
        }
        previous = Some(event.event_id.clone());
        let ack = context
            .publish_with_headers(subject, headers, event.encode_to_vec().into())
            .await
            .map_err(|e| format!("cannot publish to NATS: {e}"))?;
        acks.push(ack);
    }
    settle(&mut acks).await
}

/// Waits for every acknowledgement; the first refusal fails all.
async fn settle(acks: &mut Vec<jetstream::context::PublishAckFuture>) -> Result<(), Failure> {
    for ack in acks.drain(..) {
        ack.await
            .map_err(|e| format!("NATS did not acknowledge an event: {e}"))?;
    }
    Ok(())
}
