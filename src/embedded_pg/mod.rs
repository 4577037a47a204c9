//! Embedded PostgreSQL: the private database the service runs when no
//! `DATABASE_URL` is given.
//!
//! `cluster` sets the cluster up (binaries, initdb, the command line),
//! `privileges` decides which user runs it and where its files may live,
//! `process` runs and stops the postmaster; this module ties them into
//! [`EmbeddedPostgres`] and [`Cluster::start_or_attach`].
//!
//! This module owns the whole life of that server: finding the PostgreSQL
//! binaries installed on the machine (nothing is downloaded), creating the
//! cluster with `initdb`, running `postgres` as a direct child that listens
//! only on a Unix socket, and shutting it down again. Everything lives in one
//! data directory, so data survives restarts:
//!
//! ```text
//! <data_dir>/            0755, so the unprivileged user can traverse it
//!     pgdata/            the cluster (0700, owned by the user running postgres)
//!     pgdata.initdb/     a cluster being created, moved to pgdata/ when complete
//!     run/               the Unix socket directory (0700, same owner)
//!     postgres.log       postgres' stdout and stderr, appended
//! ```
//!
//! PostgreSQL refuses to run as root, so when this process is root the server
//! runs as the `postgres` system user (or `nobody` when there is none);
//! otherwise it runs as the current user.

mod cluster;
mod privileges;
mod process;

use std::ffi::OsString;
use std::fmt;
use std::fs::{self, DirBuilder, File, OpenOptions, Permissions};
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{Signal, kill};
use nix::unistd::{Gid, Pid, Uid, User};
use std::sync::Arc;

use tokio::sync::{Notify, oneshot};
use tracing::{debug, error, info, warn};

use cluster::{Binaries, Layout, init_cluster, postgres_command, wait_until_free};
use privileges::{check_reachable, fallback_home, unprivileged_user};
use process::{Server, describe_exit};

/// The superuser role `initdb` creates, and the role connections use.
const SUPERUSER: &str = "postgres";
/// Only names the socket file (`.s.PGSQL.5432`); no TCP port is opened.
const PORT: u16 = 5432;
/// Socket directory, inside the data directory.
const RUN_DIR: &str = "run";
/// `sun_path` holds 108 bytes including the terminating NUL.
const MAX_SOCKET_PATH_LEN: usize = 107;

const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest wait at start for the postgres of a previous run to finish stopping.
const PREVIOUS_STOP_WAIT: Duration = Duration::from_secs(30);
const READY_POLL: Duration = Duration::from_millis(100);
const CONNECT_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);
const LOG_TAIL_LINES: usize = 20;
/// Only the end of the log is read for error messages; it grows across restarts.
const LOG_TAIL_BYTES: u64 = 64 * 1024;

/// How to run the cluster.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Settings passed to postgres with `-c name=value` on start (for
    /// example fsync=off in tests).
    pub settings: Vec<(String, String)>,
    /// Told each time postgres dies and each time it is back.
    pub on_change: Option<Arc<Notify>>,
}

impl Options {
    /// Whether the caller switched fsync off, in which case initdb need not sync either.
    fn fsync_disabled(&self) -> bool {
        self.settings.iter().any(|(name, value)| {
            name.eq_ignore_ascii_case("fsync")
                && ["off", "false", "no", "0"]
                    .iter()
                    .any(|off| value.eq_ignore_ascii_case(off))
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EmbeddedError {
    #[error(
        "PostgreSQL server binaries (initdb and postgres) were not found on PATH nor in /usr/lib/postgresql/<version>/bin, \
         /usr/local/pgsql/bin, /opt/homebrew/bin or /usr/pgsql-<version>/bin; install them \
         (Debian/Ubuntu: `apt-get install postgresql`) or set DATABASE_URL to use an external database"
    )]
    BinariesNotFound,

    #[error(
        "this process runs as root, which PostgreSQL refuses, and neither a `postgres` nor a `nobody` user exists \
         to run it as; create a `postgres` system user, run the service as an unprivileged user, or set DATABASE_URL"
    )]
    NoUnprivilegedUser,

    #[error(
        "the cluster in {pgdata} was created by PostgreSQL {cluster}, but the binaries in {bin_dir} are PostgreSQL {binaries}; \
         install PostgreSQL {cluster} (Debian/Ubuntu: `apt-get install postgresql-{cluster}`), upgrade the cluster with pg_upgrade, \
         or use a new --data-dir"
    )]
    VersionMismatch {
        pgdata: PathBuf,
        cluster: String,
        binaries: String,
        bin_dir: PathBuf,
    },

    #[error("initdb failed to create a cluster in {pgdata} ({status}):\n{stderr}")]
    InitdbFailed {
        pgdata: PathBuf,
        status: ExitStatus,
        stderr: String,
    },

    #[error(
        "data directory {pgdata} is in use by another running postgres (pid {pid}); \
         stop that server or choose another --data-dir"
    )]
    InUse { pgdata: PathBuf, pid: i32 },

    #[error(
        "{path} cannot be traversed by user `{user}`, which runs PostgreSQL because this process is root; \
         choose a --data-dir that user can reach, such as /var/lib/users-service or /tmp/users-service, \
         or grant it access (chmod o+x {path})"
    )]
    NotReachable { path: PathBuf, user: String },

    #[error(
        "the PostgreSQL socket path {path} is {len} bytes, more than the {max} bytes Unix sockets allow; \
         choose a shorter --data-dir"
    )]
    SocketPathTooLong {
        path: PathBuf,
        len: usize,
        max: usize,
    },

    #[error("PostgreSQL failed to start: {reason}; last lines of {log}:\n{tail}")]
    StartupFailed {
        reason: String,
        log: PathBuf,
        tail: String,
    },

    #[error("PostgreSQL (pid {pid}) did not exit even after SIGKILL")]
    StopFailed { pid: i32 },

    #[error("could not {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Builds a `map_err` adapter that attaches what was being done, and to which path.
fn io_error(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> EmbeddedError {
    move |source| EmbeddedError::Io {
        action,
        path: path.to_owned(),
        source,
    }
}

/// A running private PostgreSQL server, supervised: when postgres dies it
/// is started again (crash recovery included), with back-off, until
/// [`EmbeddedPostgres::stop`]. Dropping it asks for a shutdown too.
pub struct EmbeddedPostgres {
    data_dir: PathBuf,
    socket_dir: PathBuf,
    /// Asks the supervisor to stop postgres; `None` once asked.
    stop: Option<oneshot::Sender<()>>,
    /// The supervisor; it ends once postgres has stopped.
    supervisor: Option<tokio::task::JoinHandle<Result<(), EmbeddedError>>>,
}

impl fmt::Debug for EmbeddedPostgres {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EmbeddedPostgres")
            .field("data_dir", &self.data_dir)
            .field("socket_dir", &self.socket_dir)
            .finish_non_exhaustive()
    }
}

/// Everything needed to start postgres again.
struct Launch {
    binaries: Binaries,
    layout: Layout,
    run_as: Option<privileges::RunAs>,
    options: Options,
}

impl Launch {
    /// Spawns postgres and waits until it accepts connections.
    async fn start(&self) -> Result<Server, EmbeddedError> {
        let command = postgres_command(
            &self.binaries,
            &self.layout,
            self.run_as.as_ref(),
            &self.options,
        )?;
        let mut server = Server::spawn(command)
            .await
            .map_err(io_error("start", &self.binaries.postgres()))?;
        let config = socket_config(&self.layout.run_dir, "postgres");
        match wait_until_ready(&mut server, &config, &self.layout.log_file).await {
            Ok(()) => Ok(server),
            Err(error) => {
                // Not ready in time: do not leave it running half started.
                let _ = server.shutdown().await;
                Err(error)
            }
        }
    }

    fn changed(&self) {
        if let Some(notify) = &self.options.on_change {
            notify.notify_waiters();
            notify.notify_one();
        }
    }
}

/// First pause before starting postgres again after it died.
const FIRST_RESTART_PAUSE: Duration = Duration::from_millis(100);
/// Longest pause between restart attempts.
const MAX_RESTART_PAUSE: Duration = Duration::from_secs(5);

/// Keeps postgres running until asked to stop: each time it dies, logs why
/// (its exit status and the last words of its log) and starts it again,
/// pausing longer after each failed attempt.
async fn supervise(
    mut server: Server,
    launch: Launch,
    mut stop: oneshot::Receiver<()>,
) -> Result<(), EmbeddedError> {
    loop {
        let exit = tokio::select! {
            _ = &mut stop => return server.shutdown().await,
            exit = server.exited() => exit,
        };
        let died = Instant::now();
        error!(
            pid = server.pid,
            exit = %describe_exit(&exit),
            log = %last_words(&launch.layout.log_file),
            "embedded PostgreSQL died; starting it again"
        );
        launch.changed();
        let mut pause = FIRST_RESTART_PAUSE;
        server = loop {
            tokio::select! {
                _ = &mut stop => return Ok(()),
                () = tokio::time::sleep(pause) => {}
            }
            match launch.start().await {
                Ok(server) => {
                    info!(pid = server.pid, down_for = ?died.elapsed(), "embedded PostgreSQL is back");
                    launch.changed();
                    break server;
                }
                Err(error) => {
                    pause = (pause * 2).min(MAX_RESTART_PAUSE);
                    warn!(%error, retry_in = ?pause, "embedded PostgreSQL did not start again");
                }
            }
        };
    }
}

/// The lines of the end of postgres' log that say what went wrong (FATAL,
/// PANIC, or a process that died), or the last line.
fn last_words(log_file: &Path) -> String {
    let tail = log_tail(log_file).unwrap_or_default();
    let telling: Vec<&str> = tail
        .lines()
        .filter(|line| {
            [
                "PANIC",
                "FATAL",
                "terminated by signal",
                "was terminated",
                "No space",
            ]
            .iter()
            .any(|word| line.contains(word))
        })
        .collect();
    match (telling.last(), tail.lines().last()) {
        (Some(_), _) => telling[telling.len().saturating_sub(3)..].join(" | "),
        (None, Some(last)) => last.to_owned(),
        (None, None) => "(the log says nothing)".to_owned(),
    }
}

impl EmbeddedPostgres {
    /// Finds the binaries, runs initdb when `data_dir/pgdata` has no cluster
    /// yet, starts postgres, and waits until it accepts connections (up to
    /// 30 s, failing early if postgres exits).
    pub async fn start(data_dir: &Path, options: Options) -> Result<Self, EmbeddedError> {
        let run_as = unprivileged_user()?;
        let layout = Layout::prepare(data_dir, run_as.as_ref())?;
        let cluster_version = layout.cluster_version()?;
        let binaries = Binaries::find(cluster_version.as_deref())?;
        let binaries_version = binaries.major_version().await?;

        match cluster_version {
            Some(cluster) if cluster != binaries_version => {
                return Err(EmbeddedError::VersionMismatch {
                    pgdata: layout.pgdata,
                    cluster,
                    binaries: binaries_version,
                    bin_dir: binaries.dir,
                });
            }
            Some(_) => wait_until_free(&layout.pgdata, PREVIOUS_STOP_WAIT).await?,
            None => init_cluster(&binaries, &layout, run_as.as_ref(), &options).await?,
        }

        let launch = Launch {
            binaries,
            layout,
            run_as,
            options,
        };
        let server = launch.start().await?;
        let (stop, stopped) = oneshot::channel();
        let postgres = Self {
            data_dir: launch.layout.data_dir.clone(),
            socket_dir: launch.layout.run_dir.clone(),
            stop: Some(stop),
            supervisor: Some(tokio::spawn(supervise(server, launch, stopped))),
        };
        info!(
            data_dir = %postgres.data_dir.display(),
            socket_dir = %postgres.socket_dir.display(),
            version = %binaries_version,
            "embedded PostgreSQL is ready"
        );
        Ok(postgres)
    }

    /// A connection config for the given database: host = the socket
    /// directory, user = "postgres", dbname.
    pub fn config(&self, dbname: &str) -> tokio_postgres::Config {
        socket_config(&self.socket_dir, dbname)
    }

    /// The socket directory of the cluster in `data_dir`: the one `start`
    /// chose, in the data directory or its fallback.
    fn socket_dir_of(data_dir: &Path) -> PathBuf {
        let canonical = fs::canonicalize(data_dir).unwrap_or_else(|_| data_dir.to_owned());
        let home = match unprivileged_user() {
            Ok(Some(user)) if check_reachable(&canonical, &user).is_err() => {
                fallback_home(&canonical)
            }
            _ => canonical,
        };
        home.join(RUN_DIR)
    }

    /// Directory holding the Unix socket.
    pub fn socket_dir(&self) -> &Path {
        &self.socket_dir
    }

    /// Fast shutdown (SIGINT), waiting up to 30 s for postgres to exit before
    /// escalating to SIGQUIT and then SIGKILL.
    pub async fn stop(mut self) -> Result<(), EmbeddedError> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(supervisor) = self.supervisor.take() {
            supervisor
                .await
                .map_err(|e| io_error("stop", &self.data_dir)(io::Error::other(e)))??;
            info!(data_dir = %self.data_dir.display(), "embedded PostgreSQL stopped");
        }
        Ok(())
    }
}

impl Drop for EmbeddedPostgres {
    /// Best effort, since `Drop` can neither await nor report errors: asks
    /// the supervisor for a fast shutdown, which it carries out as long as
    /// the runtime runs (and the parent-death signal covers the rest).
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Waits until postgres accepts connections (up to 30 s), failing early if
/// it exits.
async fn wait_until_ready(
    server: &mut Server,
    config: &tokio_postgres::Config,
    log_file: &Path,
) -> Result<(), EmbeddedError> {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        let last_error = match try_connect(config).await {
            Ok(()) => return Ok(()),
            Err(error) => error,
        };
        if let Some(exit) = server.try_exit() {
            return Err(startup_failed(
                format!("postgres exited ({})", describe_exit(&exit)),
                log_file,
            ));
        }
        if Instant::now() >= deadline {
            let reason = format!(
                "not accepting connections after {} s (last error: {last_error})",
                READY_TIMEOUT.as_secs()
            );
            return Err(startup_failed(reason, log_file));
        }
        tokio::time::sleep(READY_POLL).await;
    }
}

/// Whether to share an embedded cluster that another process already runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sharing {
    /// The server owns its cluster: one running already is an error.
    Exclusive,
    /// Tools (`keys`, `check`) work beside a running server, or start the
    /// cluster themselves for the time they need it.
    Attach,
}

/// The embedded cluster of a data directory, as this process reaches it.
#[derive(Debug)]
pub enum Cluster {
    /// Started by this process, which stops it in [`Cluster::close`].
    Started(EmbeddedPostgres),
    /// Run by another process (a server on the same data directory),
    /// reached through its socket directory.
    Attached { socket_dir: PathBuf },
}

impl Cluster {
    /// Starts the cluster of `data_dir`, or, with [`Sharing::Attach`], uses
    /// the one another process runs there.
    pub async fn start_or_attach(
        data_dir: &Path,
        options: Options,
        sharing: Sharing,
    ) -> Result<Self, EmbeddedError> {
        let data_dir = std::path::absolute(data_dir).unwrap_or_else(|_| data_dir.into());
        match EmbeddedPostgres::start(&data_dir, options).await {
            Ok(pg) => Ok(Self::Started(pg)),
            Err(EmbeddedError::InUse { .. }) if sharing == Sharing::Attach => Ok(Self::Attached {
                socket_dir: EmbeddedPostgres::socket_dir_of(&data_dir),
            }),
            Err(e) => Err(e),
        }
    }

    /// A connection config for database `dbname` of the cluster.
    pub fn config(&self, dbname: &str) -> tokio_postgres::Config {
        let socket_dir = match self {
            Self::Started(pg) => pg.socket_dir(),
            Self::Attached { socket_dir } => socket_dir,
        };
        socket_config(socket_dir, dbname)
    }

    /// Stops the cluster if this process started it.
    pub async fn close(self) -> Result<(), EmbeddedError> {
        match self {
            Self::Started(pg) => pg.stop().await,
            Self::Attached { .. } => Ok(()),
        }
    }
}

/// A connection to `dbname` through the socket in `socket_dir`, as the
/// superuser `initdb` created.
fn socket_config(socket_dir: &Path, dbname: &str) -> tokio_postgres::Config {
    let mut config = tokio_postgres::Config::new();
    config
        .host_path(socket_dir)
        .port(PORT)
        .user(SUPERUSER)
        .dbname(dbname);
    config
}

/// Connects once, then closes the connection cleanly.
async fn try_connect(config: &tokio_postgres::Config) -> Result<(), String> {
    let attempt = async {
        let (client, connection) = config.connect(tokio_postgres::NoTls).await?;
        // Dropping the client makes the connection send Terminate and finish.
        drop(client);
        connection.await
    };
    match tokio::time::timeout(CONNECT_ATTEMPT_TIMEOUT, attempt).await {
        Ok(result) => result.map_err(|error| error.to_string()),
        Err(_) => Err("connection attempt timed out".to_owned()),
    }
}

fn startup_failed(reason: String, log_file: &Path) -> EmbeddedError {
    EmbeddedError::StartupFailed {
        reason,
        log: log_file.to_owned(),
        tail: log_tail(log_file)
            .unwrap_or_else(|error| format!("(could not read the log: {error})")),
    }
}

/// The last lines of the log, read from its end only.
fn log_tail(path: &Path) -> io::Result<String> {
    let mut file = File::open(path)?;
    let len = file.metadata()?.len();
    file.seek(SeekFrom::Start(len.saturating_sub(LOG_TAIL_BYTES)))?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)?;
    let text = String::from_utf8_lossy(&bytes);
    let lines: Vec<&str> = text.lines().collect();
    Ok(lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const _: () = {
        const fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<EmbeddedPostgres>();
    };

    fn fast_options() -> Options {
        Options {
            settings: vec![("fsync".to_owned(), "off".to_owned())],
            ..Options::default()
        }
    }

    async fn connect(postgres: &EmbeddedPostgres) -> tokio_postgres::Client {
        let (client, connection) = postgres
            .config("postgres")
            .connect(tokio_postgres::NoTls)
            .await
            .expect("connect");
        tokio::spawn(connection);
        client
    }

    #[tokio::test]
    async fn data_survives_a_restart() {
        let dir =
            std::env::temp_dir().join(format!("users-service-embedded-{}", std::process::id()));
        DirBuilder::new()
            .mode(0o755)
            .create(&dir)
            .expect("create test dir");

        let postgres = EmbeddedPostgres::start(&dir, fast_options())
            .await
            .expect("first start");
        let client = connect(&postgres).await;
        let one: i32 = client.query_one("SELECT 1", &[]).await.unwrap().get(0);
        assert_eq!(one, 1);
        client
            .batch_execute(
                "CREATE TABLE survivor (name text); INSERT INTO survivor VALUES ('kept')",
            )
            .await
            .unwrap();

        let second = EmbeddedPostgres::start(&dir, fast_options()).await;
        assert!(
            matches!(second, Err(EmbeddedError::InUse { .. })),
            "second start on a running cluster: {second:?}"
        );

        drop(client);
        postgres.stop().await.expect("first stop");

        let postgres = EmbeddedPostgres::start(&dir, fast_options())
            .await
            .expect("restart");
        let client = connect(&postgres).await;
        let name: String = client
            .query_one("SELECT name FROM survivor", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(name, "kept");
        drop(client);
        postgres.stop().await.expect("second stop");

        fs::remove_dir_all(&dir).unwrap();
    }
}
