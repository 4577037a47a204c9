//! WatchUsers: the change feed, and the one reader per process (the
//! [`Hub`]) that follows `user_events` for every watcher.
//!
//! The hub reads each new page of events once, right after a local write
//! commits, converts it once, and hands it to every live watcher through a
//! bounded broadcast. Other replicas learn of new events by a `NOTIFY
//! user_events`, which the hub sends after it read a local commit's events,
//! at most once per [`NOTIFY_GAP`] (the hub, not the writers: their
//! commits would otherwise all queue for the lock NOTIFY takes at commit).
//! Every hub `LISTEN`s on a connection of its own, and looks at least every
//! [`POLL`] for changes nobody told it of (an operator's SQL, a
//! notification lost while reconnecting).
//!
//! A watcher that falls behind (a slow client, or one that resumes from an
//! old token) reads from the table instead, at its own pace, until it
//! reaches the hub's position, and then joins it again: memory stays
//! bounded, and nobody waits for anybody.

use std::{
    pin::Pin,
    sync::{Arc, Mutex},
    time::Duration,
};

use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::{broadcast, mpsc, watch};
use tokio::time::Instant;
use tokio_stream::{Stream, wrappers::ReceiverStream};
use tonic::Status;
use uuid::Uuid;

use super::{AppState, authz::Scope, convert};
use crate::error::Error;
use crate::pb::v1 as pb;
use crate::store::{
    db::{self, DbPool},
    events::{self, BadToken, Committed, Filter, Position},
};

/// The stream WatchUsers answers with.
pub type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::WatchUsersResponse, Status>> + Send>>;

/// The longest the hub waits before looking for events it was not told of.
pub const POLL: Duration = Duration::from_millis(100);
/// The shortest time between two reads of the hub: commits that arrive
/// together are read together.
const MIN_GAP: Duration = Duration::from_millis(5);
/// The shortest time between two notifications to other replicas: a busy
/// replica tells them once per this, however many commits it read.
const NOTIFY_GAP: Duration = Duration::from_millis(10);
/// Events per page the hub reads, and per response of a watcher.
const PAGE: i64 = 500;
/// Pages the broadcast holds for watchers that are a little behind; one
/// further behind reads from the table.
const BROADCAST_PAGES: usize = 16;
/// Longest wait for the hub's next page before a watcher that is ahead of
/// it looks again.
const AHEAD_WAIT: Duration = Duration::from_secs(1);

/// A page of the feed as the hub read it: the events between two
/// positions, converted once for every watcher.
#[derive(Debug)]
pub struct Page {
    pub start: Position,
    pub end: Position,
    pub events: Vec<(Uuid, pb::UserEvent)>,
}

/// The process's reader of `user_events`.
#[derive(Debug)]
pub struct Hub {
    /// The broadcast and the position after its last page, changed
    /// together, so that a watcher that subscribes knows where the next
    /// page starts.
    tail: Mutex<(broadcast::Sender<Arc<Page>>, Option<Position>)>,
    /// Turns true when the service stops: watchers end.
    closed: watch::Sender<bool>,
    /// Watchers connected now (a metric).
    watchers: Gauge,
    /// Watch streams open, per caller and in all.
    open: Mutex<std::collections::HashMap<String, usize>>,
    max_watchers: usize,
    /// Watchers reading from the table at once take at most these pool
    /// connections, so that calls still get theirs.
    table_reads: Arc<tokio::sync::Semaphore>,
}

/// Watch streams one caller may have open at once.
pub const MAX_WATCHERS_PER_CALLER: usize = 100;

/// A watch stream's place among those open; given back when dropped.
pub struct Slot {
    hub: Arc<Hub>,
    caller: String,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self
            .hub
            .open
            .lock()
            .expect("the hub's lock is never poisoned");
        if let Some(count) = open.get_mut(&self.caller) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.caller);
            }
        }
        self.hub.watchers.dec();
    }
}

impl Hub {
    /// `max_watchers`: watch streams open at once, of all callers;
    /// `table_reads`: pool connections watchers behind may read with.
    pub fn new(watchers: Gauge, max_watchers: usize, table_reads: usize) -> Self {
        Self {
            tail: Mutex::new((broadcast::Sender::new(BROADCAST_PAGES), None)),
            closed: watch::Sender::new(false),
            watchers,
            open: Mutex::new(std::collections::HashMap::new()),
            max_watchers,
            table_reads: Arc::new(tokio::sync::Semaphore::new(table_reads.max(1))),
        }
    }

    /// A place for one more watch stream of `caller`, if there is one: a
    /// caller cannot take them all, nor all callers the process's memory.
    pub fn admit(self: &Arc<Self>, caller: &str) -> Result<Slot, Error> {
        let mut open = self.open.lock().expect("the hub's lock is never poisoned");
        if self.watchers.get() >= self.max_watchers as i64 {
            return Err(Error::TooBusy(
                "too many watch streams are open on this replica (--max-watchers); retry later or elsewhere",
            ));
        }
        let mine = open.entry(caller.to_owned()).or_default();
        if *mine >= MAX_WATCHERS_PER_CALLER {
            return Err(Error::TooBusy(
                "this caller has 100 watch streams open already: close one first",
            ));
        }
        *mine += 1;
        self.watchers.inc();
        Ok(Slot {
            hub: Arc::clone(self),
            caller: caller.to_owned(),
        })
    }

    fn publish(&self, page: Page) {
        let mut tail = self.tail.lock().expect("the hub's lock is never poisoned");
        tail.1 = Some(page.end.clone());
        // No receiver is no error: nobody watches.
        let _ = tail.0.send(Arc::new(page));
    }

    /// Whether a watcher is subscribed.
    fn watched(&self) -> bool {
        let tail = self.tail.lock().expect("the hub's lock is never poisoned");
        tail.0.receiver_count() > 0
    }

    /// Moves the hub's position to `end` without a page when nobody is
    /// subscribed (`true`): then nobody needs the page's events. A watcher
    /// that subscribes later starts from `end`.
    fn skip_unwatched(&self, end: &Position) -> bool {
        let mut tail = self.tail.lock().expect("the hub's lock is never poisoned");
        let unwatched = tail.0.receiver_count() == 0;
        if unwatched {
            tail.1 = Some(end.clone());
        }
        unwatched
    }

    fn subscribe(&self) -> (broadcast::Receiver<Arc<Page>>, Option<Position>) {
        let tail = self.tail.lock().expect("the hub's lock is never poisoned");
        (tail.0.subscribe(), tail.1.clone())
    }

    /// Follows `user_events` until `stop` turns true, then ends every
    /// watcher. `written` counts the events it read (a metric); `listen`
    /// is where to LISTEN for other replicas' commits.
    pub async fn follow(
        self: Arc<Self>,
        pool: DbPool,
        listen: tokio_postgres::Config,
        committed: Committed,
        written: impl Fn(u64) + Send + Sync,
        notified: impl Fn() + Send + Sync + 'static,
        mut stop: watch::Receiver<bool>,
    ) {
        let mut commits = committed.subscribe();
        let elsewhere = Committed::default();
        let mut others = elsewhere.subscribe();
        let me = Uuid::new_v4().to_string();
        let listener = tokio::spawn(listen_for_others(listen, me.clone(), elsewhere, notified));
        let mut at: Option<Position> = None;
        let mut failing = false;
        let mut local = false;
        // Events read after a local commit that the others were not told of.
        let mut owed = false;
        let mut told = Instant::now() - NOTIFY_GAP;
        loop {
            let started = Instant::now();
            let mut read = self.read_all(&pool, &mut at, &written).await;
            owed |= local && matches!(read, Ok(events) if events > 0);
            if owed && read.is_ok() && told.elapsed() >= NOTIFY_GAP {
                read = tell_others(&pool, &me).await.map(|()| 0);
                told = Instant::now();
                owed = read.is_err();
            }
            match read {
                Ok(_) if failing => {
                    tracing::info!("change feed reads again");
                    failing = false;
                }
                Ok(_) => {}
                Err(error) => {
                    if !failing {
                        tracing::warn!(%error, "change feed cannot read; trying again");
                        failing = true;
                    }
                }
            }
            local = tokio::select! {
                _ = commits.changed() => true,
                _ = others.changed() => false,
                () = tokio::time::sleep(POLL) => false,
                () = tokio::time::sleep_until(told + NOTIFY_GAP), if owed => false,
                _ = stop.wait_for(|stop| *stop) => break,
            };
            tokio::time::sleep_until(started + MIN_GAP).await;
        }
        listener.abort();
        self.closed.send_replace(true);
    }

    /// Reads and publishes every page after `at` (from now when unset); how
    /// many events.
    async fn read_all(
        &self,
        pool: &DbPool,
        at: &mut Option<Position>,
        written: &(impl Fn(u64) + Sync),
    ) -> Result<usize, Error> {
        let mut read = 0;
        loop {
            let start = match at {
                Some(position) => position.clone(),
                None => {
                    let now = db::run(pool, events::now).await??;
                    let start = Position::At(now);
                    *at = Some(start.clone());
                    start
                }
            };
            // Nobody watches: only where the events are, to move on.
            let filter = Filter {
                heads_only: !self.watched(),
                ..Filter::default()
            };
            let page = db::run(pool, async |conn| {
                events::read(conn, &start, &filter, PAGE).await
            })
            .await??;
            let full = page.events.len() as i64 >= PAGE;
            if filter.heads_only && !self.skip_unwatched(&page.end) {
                // A watcher came meanwhile: read the page whole.
                continue;
            }
            read += page.events.len();
            written(page.events.len() as u64);
            *at = Some(page.end.clone());
            if !filter.heads_only {
                self.publish(Page {
                    start,
                    end: page.end,
                    events: page
                        .events
                        .into_iter()
                        .map(|event| (event.tenant_id, convert::user_event(event)))
                        .collect(),
                });
            }
            if !full {
                return Ok(read);
            }
        }
    }
}

/// The channel hubs tell each other of new events on.
pub const CHANNEL: &str = "user_events";

/// Tells the other replicas' hubs that events committed here.
async fn tell_others(pool: &DbPool, me: &str) -> Result<(), Error> {
    use diesel_async::RunQueryDsl;
    db::run(pool, async |conn| {
        diesel::sql_query("SELECT pg_notify($1, $2)")
            .bind::<diesel::sql_types::Text, _>(CHANNEL)
            .bind::<diesel::sql_types::Text, _>(me)
            .execute(conn)
            .await
    })
    .await??;
    Ok(())
}

/// LISTENs for other hubs' notifications on a connection of its own, and
/// pokes `elsewhere` on each, and whenever it starts listening again;
/// `notified` counts each notification.
async fn listen_for_others(
    config: tokio_postgres::Config,
    me: String,
    elsewhere: Committed,
    notified: impl Fn() + Send + Sync + 'static,
) {
    let poke = elsewhere.clone();
    db::listen(
        config,
        CHANNEL,
        // Whatever was missed while away.
        move || elsewhere.poke(),
        move |sender| {
            notified();
            if sender != me {
                poke.poke();
            }
        },
    )
    .await;
}

/// What a watcher asked for, checked.
#[derive(Debug, Clone)]
pub struct WatchRequest {
    pub filter: Filter,
    /// Where to start; `None`: now.
    pub start: Option<Position>,
}

/// Parses a WatchUsers request for a caller confined to `scope`.
pub fn parse(scope: Scope, request: &pb::WatchUsersRequest) -> Result<WatchRequest, Error> {
    let tenant = match (scope.tenant(), request.tenant_id.as_str()) {
        (own, "") => own,
        (own, given) => {
            let given = convert::parse_id("tenant_id", given)?;
            if own.is_some_and(|own| own != given) {
                return Err(Error::PermissionDenied(
                    "a tenant key watches its own tenant only",
                ));
            }
            Some(given)
        }
    };
    if request.types.len() > 7 {
        return Err(Error::invalid("types", "at most 7, each type once"));
    }
    let mut kinds = Vec::with_capacity(request.types.len());
    for &kind in &request.types {
        match pb::UserEventType::try_from(kind) {
            Ok(pb::UserEventType::Unspecified) | Err(_) => {
                return Err(Error::invalid(
                    "types",
                    format!("{kind} is not an event type"),
                ));
            }
            Ok(_) if kinds.contains(&(kind as i16)) => {
                return Err(Error::invalid("types", "each type at most once"));
            }
            Ok(_) => kinds.push(kind as i16),
        }
    }
    let start = match request.resume_token.as_str() {
        "" => None,
        token => Some(Position::decode(token).map_err(|_| {
            Error::invalid(
                "resume_token",
                "is not a token of this service: send back a resume_token or watch_token as received",
            )
        })?),
    };
    Ok(WatchRequest {
        filter: Filter {
            tenant,
            kinds,
            heads_only: false,
        },
        start,
    })
}

/// How a watch stream runs.
#[derive(Debug, Clone, Copy)]
pub struct WatchSettings {
    /// A response without events at least this often.
    pub heartbeat: Duration,
    /// A client that takes nothing for this long is gone: its stream ends.
    pub stall_timeout: Duration,
    /// The client's deadline, if it set one.
    pub deadline: Option<Instant>,
}

/// Starts a watch for `caller`: checks its start position now (so that a
/// bad or expired token is the call's status), then streams.
pub async fn watch(
    state: &AppState,
    caller: &str,
    request: WatchRequest,
    settings: WatchSettings,
) -> Result<WatchStream, Error> {
    let slot = state.hub.admit(caller)?;
    let now = state.db(async |conn| events::now(conn).await).await?;
    let start = match request.start {
        None => Position::At(now),
        Some(start) => {
            let horizon = state.db(async |conn| events::horizon(conn).await).await?;
            start.check(&now, horizon).map_err(|bad| match bad {
                BadToken::Malformed => {
                    Error::invalid("resume_token", "is not a position of this service's feed")
                }
                BadToken::Expired => Error::OutOfRange(
                    "resume_token is older than the change feed keeps (--event-retention): \
                     list the users again and watch from the list's watch_token",
                ),
            })?;
            start
        }
    };
    let (tx, rx) = mpsc::channel(2);
    let watcher = Watcher {
        hub: Arc::clone(&state.hub),
        pool: state.pool.clone(),
        filter: request.filter,
        settings,
        tx,
        last_sent: Instant::now(),
        _slot: slot,
    };
    tokio::spawn(watcher.run(start));
    Ok(Box::pin(ReceiverStream::new(rx)))
}

/// One WatchUsers stream.
struct Watcher {
    hub: Arc<Hub>,
    pool: DbPool,
    filter: Filter,
    settings: WatchSettings,
    tx: mpsc::Sender<Result<pb::WatchUsersResponse, Status>>,
    last_sent: Instant,
    _slot: Slot,
}

/// Why a watch stream ended.
enum Ended {
    /// The client went away or stopped reading.
    Gone,
    /// Answered with this status.
    Status(Status),
}

impl Watcher {
    async fn run(mut self, start: Position) {
        let mut closed = self.hub.closed.subscribe();
        let deadline = self.settings.deadline;
        let outcome = tokio::select! {
            ended = self.stream(start) => ended,
            _ = closed.wait_for(|closed| *closed) => Ended::Status(Status::unavailable(
                "the server is shutting down: resume on another replica with the last resume_token",
            )),
            () = until(deadline) => Ended::Status(Status::deadline_exceeded("deadline exceeded")),
        };
        if let Ended::Status(status) = outcome {
            // Behind the responses still queued; a client that takes none
            // of them is gone anyway.
            let _ =
                tokio::time::timeout(self.settings.stall_timeout, self.tx.send(Err(status))).await;
        }
    }

    /// Streams from `position` until the client goes or the feed fails.
    async fn stream(&mut self, mut position: Position) -> Ended {
        // The first response confirms the watch and its position.
        if let Err(ended) = self.send(Vec::new(), &position).await {
            return ended;
        }
        loop {
            // Behind the hub: catch up from the table, then join it.
            let (mut pages, hub_at) = self.hub.subscribe();
            match self.catch_up(&mut position, hub_at.as_ref()).await {
                Ok(true) => {}
                Ok(false) => {
                    // Ahead of the hub (a token of a newer snapshot): wait
                    // for its next page and look again.
                    let wait = self.heartbeat_due().min(Instant::now() + AHEAD_WAIT);
                    tokio::select! {
                        _ = pages.recv() => {}
                        () = tokio::time::sleep_until(wait) => {}
                    }
                    if let Err(ended) = self.beat(&position).await {
                        return ended;
                    }
                    continue;
                }
                Err(ended) => return ended,
            }
            // Live: take the hub's pages as they come.
            loop {
                let heartbeat = self.heartbeat_due();
                tokio::select! {
                    page = pages.recv() => match page {
                        Ok(page) if page.start == position => {
                            let events: Vec<pb::UserEvent> = page
                                .events
                                .iter()
                                .filter(|(tenant, event)| self.filter.matches(*tenant, event.r#type as i16))
                                .map(|(_, event)| event.clone())
                                .collect();
                            position = page.end.clone();
                            if !events.is_empty() {
                                if let Err(ended) = self.send(events, &position).await {
                                    return ended;
                                }
                            }
                        }
                        // Missed pages: read them from the table.
                        Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => break,
                        Err(broadcast::error::RecvError::Closed) => return Ended::Gone,
                    },
                    () = tokio::time::sleep_until(heartbeat) => {
                        if let Err(ended) = self.send(Vec::new(), &position).await {
                            return ended;
                        }
                    }
                    () = self.tx.closed() => return Ended::Gone,
                }
            }
        }
    }

    /// Reads pages from the table until `position` is the hub's (`true`),
    /// or is found ahead of it (`false`).
    async fn catch_up(
        &mut self,
        position: &mut Position,
        hub_at: Option<&Position>,
    ) -> Result<bool, Ended> {
        loop {
            if Some(&*position) == hub_at {
                return Ok(true);
            }
            let next = match (&*position, hub_at) {
                (Position::Within { .. }, _) => position.clone(),
                // The events between here and the hub.
                (Position::At(here), Some(Position::At(hub))) if hub.includes(here) => {
                    Position::Within {
                        from: here.clone(),
                        to: hub.clone(),
                        after: i64::MIN,
                    }
                }
                _ => return Ok(false),
            };
            let filter = self.filter.clone();
            let permit = Arc::clone(&self.hub.table_reads)
                .acquire_owned()
                .await
                .map_err(|_| Ended::Gone)?;
            let page = db::run(&self.pool, async |conn| {
                events::read(conn, &next, &filter, PAGE).await
            })
            .await
            .map_err(|e| Ended::Status(Error::Unavailable(e.into()).into()))?
            .map_err(|e| Ended::Status(Error::from(e).into()))?;
            drop(permit);
            *position = page.end;
            let events: Vec<pb::UserEvent> =
                page.events.into_iter().map(convert::user_event).collect();
            if !events.is_empty() {
                self.send(events, position).await?;
            } else {
                self.beat(position).await?;
            }
        }
    }

    fn heartbeat_due(&self) -> Instant {
        self.last_sent + self.settings.heartbeat
    }

    /// A response without events, when one is due.
    async fn beat(&mut self, position: &Position) -> Result<(), Ended> {
        if Instant::now() >= self.heartbeat_due() {
            self.send(Vec::new(), position).await?;
        }
        Ok(())
    }

    async fn send(&mut self, events: Vec<pb::UserEvent>, position: &Position) -> Result<(), Ended> {
        let response = pb::WatchUsersResponse {
            events,
            resume_token: position.encode(),
        };
        match tokio::time::timeout(self.settings.stall_timeout, self.tx.send(Ok(response))).await {
            Ok(Ok(())) => {
                self.last_sent = Instant::now();
                Ok(())
            }
            Ok(Err(_)) | Err(_) => Err(Ended::Gone),
        }
    }
}

/// Completes at `deadline`, or never.
async fn until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}
