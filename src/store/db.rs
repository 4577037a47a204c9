//! The connection pool, database creation and migrations.

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use deadpool::Runtime;
use diesel::ConnectionError;
use diesel_async::{
    AsyncPgConnection,
    async_connection_wrapper::AsyncConnectionWrapper,
    pooled_connection::{
        AsyncDieselConnectionManager, ManagerConfig, RecyclingMethod,
        deadpool::{Object, Pool},
    },
};
use diesel_migrations::{EmbeddedMigrations, MigrationHarness, embed_migrations};
use futures_util::FutureExt;
use tokio::sync::Notify;
use tokio_postgres::{NoTls, error::SqlState};

/// The SQL migrations of `migrations/`, compiled into the binary.
pub const MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations");

/// The pool every request borrows its connection from.
pub type DbPool = Pool<AsyncPgConnection>;
/// A connection borrowed from [`DbPool`].
pub type DbConn = Object<AsyncPgConnection>;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// How the pool opens and hands out connections.
#[derive(Debug, Clone)]
pub struct PoolSettings {
    /// Most connections open at once.
    pub max_size: usize,
    /// Longest wait to open one connection.
    pub connect_timeout: Duration,
    /// Longest wait for a free connection before a call fails with UNAVAILABLE.
    pub acquire_timeout: Duration,
    /// Server-side limit on one statement.
    pub statement_timeout: Duration,
}

/// Builds the pool. Connections are opened lazily, so this succeeds while the
/// database is down; calls then fail fast with UNAVAILABLE and the pool
/// reconnects by itself once the database is back. Each connection that
/// cannot be opened tells `connect_failed` (the health probe, which then
/// looks at once instead of at its next interval).
pub fn build_pool(
    mut config: tokio_postgres::Config,
    settings: &PoolSettings,
    connect_failed: Option<Arc<Notify>>,
) -> Result<DbPool, BoxError> {
    config
        .application_name("users-service")
        .connect_timeout(settings.connect_timeout)
        .options(format!(
            "-c statement_timeout={}",
            settings.statement_timeout.as_millis()
        ));
    let config = Arc::new(config);

    let mut manager_config = ManagerConfig::<AsyncPgConnection>::default();
    // A broken connection is detected when it is used; a ping on every
    // checkout would cost a round trip per call.
    manager_config.recycling_method = RecyclingMethod::Fast;
    manager_config.custom_setup = Box::new(move |_url| {
        let config = Arc::clone(&config);
        let connect_failed = connect_failed.clone();
        async move {
            let (client, connection) = config.connect(NoTls).await.map_err(|e| {
                if let Some(notify) = &connect_failed {
                    notify.notify_one();
                }
                ConnectionError::BadConnection(e.to_string())
            })?;
            let mut connection =
                AsyncPgConnection::try_from_client_and_connection(client, connection).await?;
            english_messages(&mut connection).await;
            diesel_async::AsyncConnection::set_instrumentation(
                &mut connection,
                super::traced::StatementSpans::default(),
            );
            Ok(connection)
        }
        .boxed()
    });
    let manager = AsyncDieselConnectionManager::new_with_config("", manager_config);
    let pool = Pool::builder(manager)
        .max_size(settings.max_size)
        .wait_timeout(Some(settings.acquire_timeout))
        .create_timeout(Some(settings.connect_timeout))
        .recycle_timeout(Some(settings.connect_timeout))
        .runtime(Runtime::Tokio1)
        .build()?;
    Ok(pool)
}

/// Asks for error messages in English on this connection: a few outages are
/// recognised only by their text (`store::error`), which must not depend on
/// the server's `lc_messages`. Setting it takes a superuser (or, from
/// PostgreSQL 15, `GRANT SET ON PARAMETER lc_messages`); without that right
/// the server's own setting stays, which is said once in the log.
async fn english_messages(connection: &mut AsyncPgConnection) {
    use diesel_async::SimpleAsyncConnection;
    static REFUSED: std::sync::Once = std::sync::Once::new();
    if let Err(error) = connection.batch_execute("SET lc_messages TO 'C'").await {
        REFUSED.call_once(|| {
            tracing::warn!(
                %error,
                "cannot set lc_messages on database connections; unless the server's messages are in English, \
                 a server shutting down or restarting is reported as INTERNAL instead of UNAVAILABLE \
                 (grant the service's role SET on lc_messages to fix this)"
            );
        });
    }
}

/// The one row a statement returned, read after the statement's whole
/// reply: `.get_results(conn).await.and_then(db::single)` in place of
/// diesel-async's `get_result`.
///
/// `get_result` answers with the first row as soon as it arrives and drops
/// the rest of the reply, and with it the commit's outcome: a statement
/// outside a transaction block commits at the protocol's Sync, after
/// Postgres has sent its rows and CommandComplete. A backend terminated in
/// between (a fast shutdown), or a commit that fails (a deferred
/// constraint), would leave a row acknowledged that was never stored.
/// `get_results` reads the reply to ReadyForQuery, so an error at commit is
/// seen. (`clippy.toml` forbids `get_result`.)
pub fn single<T>(rows: Vec<T>) -> diesel::QueryResult<T> {
    rows.into_iter()
        .next()
        .ok_or(diesel::result::Error::NotFound)
}

/// Creates the database named in `config` when it does not exist yet, by
/// connecting to the `postgres` maintenance database of the same server.
pub async fn create_database_if_missing(config: &tokio_postgres::Config) -> Result<(), BoxError> {
    let Some(name) = config.get_dbname().map(str::to_owned) else {
        return Ok(());
    };
    let mut admin = config.clone();
    admin.dbname("postgres");
    let (client, connection) = admin.connect(NoTls).await?;
    let driver = tokio::spawn(connection);
    let exists = client
        .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&name])
        .await?
        .is_some();
    if !exists {
        // Identifiers cannot be bound as parameters; quote it as Postgres does.
        let statement = format!("CREATE DATABASE {}", quote_identifier(&name));
        match client.batch_execute(&statement).await {
            Ok(()) => tracing::info!(database = %name, "created database"),
            // Another replica created it at the same moment: Postgres reports
            // either "database exists" or the catalog's unique violation.
            Err(e)
                if e.code() == Some(&SqlState::DUPLICATE_DATABASE)
                    || e.code() == Some(&SqlState::UNIQUE_VIOLATION) => {}
            Err(e) => return Err(e.into()),
        }
    }
    drop(client);
    let _ = driver.await;
    Ok(())
}

/// Quotes an SQL identifier: wraps it in double quotes, doubling any inside.
pub fn quote_identifier(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Key of the advisory lock that serializes migrations between replicas
/// starting at the same time.
const MIGRATION_LOCK: i64 = 0x7573_6572_735f_7631; // "users_v1"

/// How often a replica waiting for another one's migrations checks the lock.
const MIGRATION_LOCK_POLL: std::time::Duration = std::time::Duration::from_millis(100);

/// Applies the pending migrations of [`MIGRATIONS`] on a fresh connection.
pub async fn run_migrations(config: &tokio_postgres::Config) -> Result<(), BoxError> {
    // Another replica may be migrating right now: wait for it, on a session of
    // our own, so that this one then finds nothing left to do. The wait polls
    // rather than blocks in `pg_advisory_lock`: a blocked statement holds a
    // snapshot, and CREATE INDEX CONCURRENTLY in the other replica's
    // migration waits for every older snapshot to go, which would then
    // never happen.
    let (lock, lock_connection) = config.connect(NoTls).await?;
    let lock_driver = tokio::spawn(lock_connection);
    while !lock
        .query_one("SELECT pg_try_advisory_lock($1)", &[&MIGRATION_LOCK])
        .await?
        .get::<_, bool>(0)
    {
        tokio::time::sleep(MIGRATION_LOCK_POLL).await;
    }

    let (client, connection) = config.connect(NoTls).await?;
    let connection = AsyncPgConnection::try_from_client_and_connection(client, connection).await?;
    // diesel's migration harness is synchronous: run it on a blocking thread,
    // where the wrapper drives the async connection with the runtime's handle.
    let result = tokio::task::spawn_blocking(move || -> Result<(), BoxError> {
        let mut wrapper = AsyncConnectionWrapper::<AsyncPgConnection>::from(connection);
        let applied = wrapper.run_pending_migrations(MIGRATIONS)?;
        for version in applied {
            tracing::info!(%version, "applied migration");
        }
        Ok(())
    })
    .await?;

    // Closing the session releases the lock.
    drop(lock);
    let _ = lock_driver.await;
    result
}

/// Runs `work` on a pooled connection. If the caller stops waiting (the call
/// was cancelled or ran past its deadline) while a statement is running, the
/// statement is cancelled on the server and the connection is closed rather
/// than returned to the pool: otherwise the statement would go on, and might
/// still commit, after the client was told the call failed.
pub async fn run<T, E>(
    pool: &DbPool,
    work: impl AsyncFnOnce(&mut AsyncPgConnection) -> Result<T, E>,
) -> Result<Result<T, E>, diesel_async::pooled_connection::deadpool::PoolError> {
    use tracing::Instrument;
    // A child of the call's span in its trace; what the statements hold
    // never goes into it.
    let span = tracing::info_span!(
        target: crate::telemetry::TRACE_TARGET,
        "postgresql",
        otel.name = "postgresql",
        otel.kind = "client",
        db.system.name = "postgresql",
    );
    async {
        let mut connection = checkout(pool).await?;
        let result = work(&mut connection).await;
        connection.release();
        Ok(result)
    }
    .instrument(span)
    .await
}

/// Borrows a connection that cancels its running statement if dropped
/// before [`Checkout::release`]: work abandoned midway leaves nothing
/// running in Postgres.
pub async fn checkout(
    pool: &DbPool,
) -> Result<Checkout, diesel_async::pooled_connection::deadpool::PoolError> {
    Ok(Checkout(Some(pool.get().await?)))
}

/// A pooled connection that is cancelled and closed unless released.
pub struct Checkout(Option<DbConn>);

impl Checkout {
    /// The work is done: the connection goes back to the pool.
    pub fn release(mut self) {
        drop(self.0.take());
    }
}

impl std::ops::Deref for Checkout {
    type Target = AsyncPgConnection;

    fn deref(&self) -> &AsyncPgConnection {
        self.0.as_ref().expect("a checkout holds its connection")
    }
}

impl std::ops::DerefMut for Checkout {
    fn deref_mut(&mut self) -> &mut AsyncPgConnection {
        self.0.as_mut().expect("a checkout holds its connection")
    }
}

impl Drop for Checkout {
    fn drop(&mut self) {
        let Some(connection) = self.0.take() else {
            return;
        };
        let token = connection.cancel_token();
        // Detached from the pool, the connection closes when dropped here.
        drop(Object::take(connection));
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            CANCELS.sent.fetch_add(1, Ordering::AcqRel);
            runtime.spawn(async move {
                if let Err(error) = token.cancel_query(NoTls).await {
                    tracing::warn!(%error, "could not cancel an abandoned statement");
                }
                if CANCELS.sent.fetch_sub(1, Ordering::AcqRel) == 1 {
                    CANCELS.done.notify_waiters();
                }
            });
        }
    }
}

/// Cancel requests on their way to Postgres, for statements whose callers
/// went away: a process that is about to exit waits for them, so that
/// nothing it started goes on running after it is gone.
struct Cancels {
    sent: AtomicUsize,
    done: Notify,
}

static CANCELS: Cancels = Cancels {
    sent: AtomicUsize::new(0),
    done: Notify::const_new(),
};

/// Waits, at most `timeout`, until every cancel sent so far has been
/// answered by Postgres; whether they all were.
pub async fn cancels_answered(timeout: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let done = CANCELS.done.notified();
        if CANCELS.sent.load(Ordering::Acquire) == 0 {
            return true;
        }
        if tokio::time::timeout_at(deadline, done).await.is_err() {
            return CANCELS.sent.load(Ordering::Acquire) == 0;
        }
    }
}

/// LISTENs on `channel` on a connection of its own, for ever: calls `told`
/// with each notification's payload, and `listening` each time it starts
/// to listen (notifications sent while it was away are lost, so what
/// depends on them must look again). Reconnects a second after a failure,
/// and logs once when it stops listening and once when it listens again.
pub async fn listen(
    config: tokio_postgres::Config,
    channel: &'static str,
    listening: impl Fn() + Send,
    told: impl Fn(&str) + Send + Sync + 'static,
) {
    use futures_util::StreamExt;
    let told = std::sync::Arc::new(told);
    let mut away = false;
    loop {
        if let Ok((client, mut connection)) = config.connect(NoTls).await {
            let told = std::sync::Arc::clone(&told);
            let driver = tokio::spawn(async move {
                let mut messages =
                    futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
                while let Some(Ok(message)) = messages.next().await {
                    if let tokio_postgres::AsyncMessage::Notification(note) = message {
                        told(note.payload());
                    }
                }
            });
            if client
                .batch_execute(&format!("LISTEN {channel}"))
                .await
                .is_ok()
            {
                if away {
                    tracing::info!(channel, "listening to the database again");
                    away = false;
                }
                listening();
                let _ = driver.await;
            } else {
                driver.abort();
            }
        }
        if !away {
            tracing::warn!(
                channel,
                "cannot listen to the database; trying again every second"
            );
            away = true;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}
