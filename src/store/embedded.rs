//! Embedded PostgreSQL: the private database the service runs when no
//! `DATABASE_URL` is given.
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
use tokio::sync::oneshot;
use tracing::{debug, info, warn};

/// The superuser role `initdb` creates, and the role connections use.
const SUPERUSER: &str = "postgres";
/// Only names the socket file (`.s.PGSQL.5432`); no TCP port is opened.
const PORT: u16 = 5432;
/// Socket directory, inside the data directory.
const RUN_DIR: &str = "run";
/// `sun_path` holds 108 bytes including the terminating NUL.
const MAX_SOCKET_PATH_LEN: usize = 107;

const READY_TIMEOUT: Duration = Duration::from_secs(30);
const READY_POLL: Duration = Duration::from_millis(100);
const CONNECT_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);
/// Grace period after the fast-shutdown signal, before escalating.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// Grace period after each escalation (SIGQUIT, then SIGKILL).
const ESCALATION_TIMEOUT: Duration = Duration::from_secs(5);
/// How long `Drop` may block waiting for the server to exit.
const DROP_WAIT: Duration = Duration::from_secs(2);
const SUPERVISOR_POLL: Duration = Duration::from_millis(100);
const LOG_TAIL_LINES: usize = 20;
/// Only the end of the log is read for error messages; it grows across restarts.
const LOG_TAIL_BYTES: u64 = 64 * 1024;

/// Settings passed to postgres with `-c name=value` on start (for example
/// fsync=off in tests).
#[derive(Debug, Clone, Default)]
pub struct Options {
    pub settings: Vec<(String, String)>,
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

/// A running private PostgreSQL server. Stop it with [`EmbeddedPostgres::stop`];
/// dropping it also shuts the server down, best effort.
pub struct EmbeddedPostgres {
    data_dir: PathBuf,
    socket_dir: PathBuf,
    /// `None` once the server has been stopped or was seen to exit.
    server: Option<Server>,
}

impl fmt::Debug for EmbeddedPostgres {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EmbeddedPostgres")
            .field("data_dir", &self.data_dir)
            .field("socket_dir", &self.socket_dir)
            .field("pid", &self.server.as_ref().map(|server| server.pid))
            .finish()
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
            Some(_) => check_not_in_use(&layout.pgdata)?,
            None => init_cluster(&binaries, &layout, run_as.as_ref(), &options).await?,
        }

        let command = postgres_command(&binaries, &layout, run_as.as_ref(), &options)?;
        let server = Server::spawn(command)
            .await
            .map_err(io_error("start", &binaries.postgres()))?;
        let mut postgres = Self {
            data_dir: layout.data_dir.clone(),
            socket_dir: layout.run_dir.clone(),
            server: Some(server),
        };
        // On failure `postgres` is dropped here, which shuts down a server that is still running.
        postgres.wait_until_ready(&layout.log_file).await?;
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
        let mut config = tokio_postgres::Config::new();
        config
            .host_path(&self.socket_dir)
            .port(PORT)
            .user(SUPERUSER)
            .dbname(dbname);
        config
    }

    /// A connection config for a cluster in `data_dir` that another process
    /// (a running server) started: for tools that work beside it.
    pub fn attach_config(data_dir: &Path, dbname: &str) -> tokio_postgres::Config {
        // The same place `start` chose: the data directory, or its fallback.
        let canonical = fs::canonicalize(data_dir).unwrap_or_else(|_| data_dir.to_owned());
        let home = match unprivileged_user() {
            Ok(Some(user)) if check_reachable(&canonical, &user).is_err() => {
                fallback_home(&canonical)
            }
            _ => canonical,
        };
        let mut config = tokio_postgres::Config::new();
        config
            .host_path(home.join(RUN_DIR))
            .port(PORT)
            .user(SUPERUSER)
            .dbname(dbname);
        config
    }

    /// Directory holding the Unix socket.
    pub fn socket_dir(&self) -> &Path {
        &self.socket_dir
    }

    /// Fast shutdown (SIGINT), waiting up to 30 s for postgres to exit before
    /// escalating to SIGQUIT and then SIGKILL.
    pub async fn stop(mut self) -> Result<(), EmbeddedError> {
        match self.server.take() {
            Some(server) => {
                server.shutdown().await?;
                info!(data_dir = %self.data_dir.display(), "embedded PostgreSQL stopped");
                Ok(())
            }
            None => Ok(()),
        }
    }

    async fn wait_until_ready(&mut self, log_file: &Path) -> Result<(), EmbeddedError> {
        let config = self.config("postgres");
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let last_error = match try_connect(&config).await {
                Ok(()) => return Ok(()),
                Err(error) => error,
            };
            if let Some(exit) = self.server.as_mut().and_then(Server::try_exit) {
                // The exit report is consumed; there is nothing left to stop.
                self.server = None;
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
}

impl Drop for EmbeddedPostgres {
    /// Best effort, since `Drop` can neither await nor report errors: ask for a
    /// fast shutdown and block briefly (this may run on a runtime thread) for the
    /// exit. If that takes longer, the supervisor thread still reaps postgres.
    fn drop(&mut self) {
        let Some(mut server) = self.server.take() else {
            return;
        };
        server.signal(Signal::SIGINT);
        let deadline = Instant::now() + DROP_WAIT;
        while server.try_exit().is_none() {
            if Instant::now() >= deadline {
                warn!(
                    pid = server.pid,
                    "embedded PostgreSQL still shutting down after drop"
                );
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
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

/// The unprivileged account postgres runs as when this process is root.
#[derive(Debug, Clone)]
struct RunAs {
    name: String,
    uid: Uid,
    gid: Gid,
}

/// `None` when not root: then postgres simply runs as the current user.
fn unprivileged_user() -> Result<Option<RunAs>, EmbeddedError> {
    if !nix::unistd::geteuid().is_root() {
        return Ok(None);
    }
    unprivileged_account()
        .map(Some)
        .ok_or(EmbeddedError::NoUnprivilegedUser)
}

/// The `postgres` system user, else `nobody`.
fn unprivileged_account() -> Option<RunAs> {
    // A lookup error is treated like a missing user: try the next one.
    ["postgres", "nobody"].into_iter().find_map(|name| {
        let user = User::from_name(name).ok().flatten()?;
        Some(RunAs {
            name: user.name,
            uid: user.uid,
            gid: user.gid,
        })
    })
}

/// Where everything lives inside the data directory, as absolute canonical
/// paths: postgres gets exactly these, so the reachability check below covers
/// every directory it will traverse.
#[derive(Debug)]
struct Layout {
    data_dir: PathBuf,
    pgdata: PathBuf,
    run_dir: PathBuf,
    log_file: PathBuf,
}

impl Layout {
    /// Creates the directories and the log file, and hands them to `run_as`.
    fn prepare(data_dir: &Path, run_as: Option<&RunAs>) -> Result<Self, EmbeddedError> {
        let created = create_dir(data_dir, 0o755)?;
        let data_dir = fs::canonicalize(data_dir).map_err(io_error("resolve", data_dir))?;
        if created {
            // DirBuilder's mode is filtered by the umask; the unprivileged user must traverse it.
            fs::set_permissions(&data_dir, Permissions::from_mode(0o755))
                .map_err(io_error("set permissions of", &data_dir))?;
        }
        let data_dir = match run_as {
            Some(user) => reachable_home(data_dir, user)?,
            None => data_dir,
        };
        let layout = Self {
            pgdata: data_dir.join("pgdata"),
            run_dir: data_dir.join(RUN_DIR),
            log_file: data_dir.join("postgres.log"),
            data_dir,
        };
        layout.check_socket_path()?;

        create_dir(&layout.run_dir, 0o700)?;
        OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o640)
            .open(&layout.log_file)
            .map_err(io_error("create", &layout.log_file))?;
        if let Some(user) = run_as {
            // pgdata is left alone: initdb creates it for `user`, and re-owning only
            // the top of an existing cluster would leave it half-owned (postgres
            // itself reports a cluster with the wrong owner clearly).
            chown(&layout.run_dir, user)?;
            chown(&layout.log_file, user)?;
        }
        Ok(layout)
    }

    fn check_socket_path(&self) -> Result<(), EmbeddedError> {
        let path = self.run_dir.join(format!(".s.PGSQL.{PORT}"));
        let len = path.as_os_str().len();
        if len >= MAX_SOCKET_PATH_LEN {
            return Err(EmbeddedError::SocketPathTooLong {
                path,
                len,
                max: MAX_SOCKET_PATH_LEN - 1,
            });
        }
        Ok(())
    }

    fn version_file(&self) -> PathBuf {
        self.pgdata.join("PG_VERSION")
    }

    /// The major version recorded in `PG_VERSION`, or `None` when there is no cluster yet.
    fn cluster_version(&self) -> Result<Option<String>, EmbeddedError> {
        let path = self.version_file();
        match fs::read_to_string(&path) {
            Ok(text) => Ok(Some(text.trim().to_owned())),
            // Only "not found" means no cluster; e.g. "permission denied" must not lead to initdb.
            Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(error) => Err(io_error("read", &path)(error)),
        }
    }
}

/// Creates `path` (and missing parents) with `mode`; returns whether it was created.
fn create_dir(path: &Path, mode: u32) -> Result<bool, EmbeddedError> {
    let existed = path.is_dir();
    DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(path)
        .map_err(io_error("create directory", path))?;
    Ok(!existed)
}

fn chown(path: &Path, user: &RunAs) -> Result<(), EmbeddedError> {
    std::os::unix::fs::chown(path, Some(user.uid.as_raw()), Some(user.gid.as_raw()))
        .map_err(io_error("change the owner of", path))
}

/// Where the cluster lives when the service runs as root and the data
/// directory is out of the unprivileged user's reach (a checkout under
/// `/root`, say): one directory per data directory under this one.
const FALLBACK_HOME: &str = "/var/lib/users-service";

/// `data_dir` if `user` can reach it; otherwise its directory under
/// [`FALLBACK_HOME`], so that `cargo run` works as root from anywhere.
fn reachable_home(data_dir: PathBuf, user: &RunAs) -> Result<PathBuf, EmbeddedError> {
    match check_reachable(&data_dir, user) {
        Ok(()) => Ok(data_dir),
        Err(EmbeddedError::NotReachable { path, .. }) => {
            let home = fallback_home(&data_dir);
            warn!(
                data_dir = %data_dir.display(),
                unreachable = %path.display(),
                cluster = %home.display(),
                "the PostgreSQL user cannot reach the data directory; keeping the cluster elsewhere"
            );
            create_dir(Path::new(FALLBACK_HOME), 0o755)?;
            if create_dir(&home, 0o755)? {
                fs::set_permissions(&home, Permissions::from_mode(0o755))
                    .map_err(io_error("set permissions of", &home))?;
            }
            check_reachable(&home, user)?;
            Ok(home)
        }
        Err(other) => Err(other),
    }
}

fn fallback_home(data_dir: &Path) -> PathBuf {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(data_dir.as_os_str().as_encoded_bytes());
    Path::new(FALLBACK_HOME).join(hex::encode(&digest[..8]))
}

/// Checks that `user` may search (execute bit) every directory from `/` down
/// to `dir`, which must be canonical so no symlink hides a directory.
fn check_reachable(dir: &Path, user: &RunAs) -> Result<(), EmbeddedError> {
    for ancestor in dir.ancestors() {
        let metadata = fs::metadata(ancestor).map_err(io_error("inspect", ancestor))?;
        if !may_search(metadata.mode(), metadata.uid(), metadata.gid(), user) {
            return Err(EmbeddedError::NotReachable {
                path: ancestor.to_owned(),
                user: user.name.clone(),
            });
        }
    }
    Ok(())
}

/// The kernel applies exactly one permission class: owner bits if the user
/// owns the file, else group bits if in its group, else the other bits. Only
/// the primary group counts: std's `Command::uid` drops supplementary groups
/// (`setgroups(0)`) when started by root. ACLs are not considered.
fn may_search(mode: u32, owner: u32, group: u32, user: &RunAs) -> bool {
    let bit = if owner == user.uid.as_raw() {
        0o100
    } else if group == user.gid.as_raw() {
        0o010
    } else {
        0o001
    };
    mode & bit != 0
}

/// A directory holding both `initdb` and `postgres`.
#[derive(Debug)]
struct Binaries {
    dir: PathBuf,
}

impl Binaries {
    /// Prefers the binaries matching an existing cluster's major version, then
    /// PATH, then the usual installation directories (highest version first).
    fn find(cluster_version: Option<&str>) -> Result<Self, EmbeddedError> {
        let preferred = cluster_version.into_iter().flat_map(|version| {
            [
                PathBuf::from(format!("/usr/lib/postgresql/{version}/bin")),
                PathBuf::from(format!("/usr/pgsql-{version}/bin")),
            ]
        });
        let on_path = std::env::var_os("PATH")
            .map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
            .unwrap_or_default()
            .into_iter()
            // A relative entry would resolve against the child's working directory.
            .filter(|dir| dir.is_absolute());
        let well_known = versioned_dirs(Path::new("/usr/lib/postgresql"), "")
            .into_iter()
            .chain([
                PathBuf::from("/usr/local/pgsql/bin"),
                PathBuf::from("/opt/homebrew/bin"),
            ])
            .chain(versioned_dirs(Path::new("/usr"), "pgsql-"));

        preferred
            .chain(on_path)
            .chain(well_known)
            .find(|dir| dir.join("initdb").is_file() && dir.join("postgres").is_file())
            .map(|dir| Self { dir })
            .ok_or(EmbeddedError::BinariesNotFound)
    }

    fn initdb(&self) -> PathBuf {
        self.dir.join("initdb")
    }

    fn postgres(&self) -> PathBuf {
        self.dir.join("postgres")
    }

    /// The major version the binaries report, in the format of `PG_VERSION`.
    async fn major_version(&self) -> Result<String, EmbeddedError> {
        let program = self.postgres();
        let output = tokio::process::Command::new(&program)
            .arg("--version")
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output()
            .await
            .map_err(io_error("run", &program))?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        // "postgres (PostgreSQL) 15.8 (Debian 15.8-1.pgdg120+1)"
        stdout
            .split_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .and_then(major_version)
            .ok_or_else(|| {
                let message = format!("unexpected `--version` output {:?}", stdout.trim());
                io_error("query the version of", &program)(io::Error::other(message))
            })
    }
}

/// Subdirectories `<prefix><version>/bin` of `parent`, highest version first.
fn versioned_dirs(parent: &Path, prefix: &str) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(parent) else {
        return Vec::new();
    };
    let mut dirs: Vec<(Vec<u32>, PathBuf)> = entries
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let name = entry.file_name().into_string().ok()?;
            let version = name.strip_prefix(prefix)?;
            let key = version
                .split('.')
                .map(str::parse)
                .collect::<Result<Vec<u32>, _>>()
                .ok()?;
            Some((key, entry.path().join("bin")))
        })
        .collect();
    dirs.sort_by(|a, b| b.0.cmp(&a.0));
    dirs.into_iter().map(|(_, dir)| dir).collect()
}

/// "15.8" → "15", "16beta1" → "16", "9.6.24" → "9.6" (before 10 the major version had two parts).
fn major_version(version: &str) -> Option<String> {
    let leading_number = |part: &str| -> Option<u32> {
        let digits: String = part.chars().take_while(char::is_ascii_digit).collect();
        digits.parse().ok()
    };
    let mut parts = version.split('.');
    let first = leading_number(parts.next()?)?;
    if first >= 10 {
        return Some(first.to_string());
    }
    let second = leading_number(parts.next()?)?;
    Some(format!("{first}.{second}"))
}

/// A command for a PostgreSQL program, run as `run_as` when given.
fn base_command(program: &Path, layout: &Layout, run_as: Option<&RunAs>) -> Command {
    let mut command = Command::new(program);
    // PostgreSQL programs resolve their own location through the working
    // directory, which must be accessible to the unprivileged user (root's
    // usually is not).
    command.current_dir(&layout.data_dir).stdin(Stdio::null());
    if let Some(user) = run_as {
        command.uid(user.uid.as_raw()).gid(user.gid.as_raw());
    }
    command
}

async fn init_cluster(
    binaries: &Binaries,
    layout: &Layout,
    run_as: Option<&RunAs>,
    options: &Options,
) -> Result<(), EmbeddedError> {
    info!(data_dir = %layout.data_dir.display(), "initializing a new PostgreSQL cluster");
    // initdb writes PG_VERSION early, so an interrupted initdb in place would
    // leave a broken cluster that looks complete. Build it aside, then rename.
    let staging = layout.data_dir.join("pgdata.initdb");
    // C.UTF-8 keeps C collation (fast, stable) but gives Unicode-aware lower()
    // and upper(); not every system ships it, hence the fallback.
    let mut result = run_initdb(
        binaries,
        layout,
        &staging,
        run_as,
        options,
        "--locale=C.UTF-8",
    )
    .await;
    let locale_missing = matches!(
        &result,
        Err(EmbeddedError::InitdbFailed { stderr, .. }) if stderr.contains("locale")
    );
    if locale_missing {
        warn!("locale C.UTF-8 unavailable, initializing the cluster with locale C");
        result = run_initdb(binaries, layout, &staging, run_as, options, "--no-locale").await;
    }
    result?;
    // Replaces an empty pgdata/ too; a non-empty one without PG_VERSION is refused.
    fs::rename(&staging, &layout.pgdata)
        .map_err(io_error("move the new cluster to", &layout.pgdata))
}

/// Creates `path` empty, removing what an earlier attempt left there.
fn fresh_dir(path: &Path, run_as: Option<&RunAs>) -> Result<(), EmbeddedError> {
    match fs::remove_dir_all(path) {
        Ok(()) => {}
        Err(error) if error.kind() == io::ErrorKind::NotFound => {}
        Err(error) => return Err(io_error("remove", path)(error)),
    }
    create_dir(path, 0o700)?;
    match run_as {
        Some(user) => chown(path, user),
        None => Ok(()),
    }
}

async fn run_initdb(
    binaries: &Binaries,
    layout: &Layout,
    pgdata: &Path,
    run_as: Option<&RunAs>,
    options: &Options,
    locale: &str,
) -> Result<(), EmbeddedError> {
    fresh_dir(pgdata, run_as)?;
    let program = binaries.initdb();
    let mut command = base_command(&program, layout, run_as);
    command.arg("-D").arg(pgdata).args([
        "-U",
        SUPERUSER,
        "--auth-local=trust",
        "--auth-host=reject",
        "-E",
        "UTF8",
        locale,
    ]);
    if options.fsync_disabled() {
        command.arg("--no-sync");
    }
    let output = tokio::process::Command::from(command)
        .kill_on_drop(true)
        .output()
        .await
        .map_err(io_error("run", &program))?;
    if output.status.success() {
        debug!(output = %String::from_utf8_lossy(&output.stdout), "initdb finished");
        Ok(())
    } else {
        Err(EmbeddedError::InitdbFailed {
            pgdata: pgdata.to_owned(),
            status: output.status,
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        })
    }
}

/// Fails when `postmaster.pid` names a live postgres process. A stale file
/// (after a crash) is left for postgres itself to replace.
fn check_not_in_use(pgdata: &Path) -> Result<(), EmbeddedError> {
    let path = pgdata.join("postmaster.pid");
    let text = match fs::read_to_string(&path) {
        Ok(text) => text,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(error) => return Err(io_error("read", &path)(error)),
    };
    let Some(pid) = text
        .lines()
        .next()
        .and_then(|line| line.trim().parse::<i32>().ok())
    else {
        return Ok(());
    };
    if pid > 0 && is_running_postgres(Pid::from_raw(pid)) {
        return Err(EmbeddedError::InUse {
            pgdata: pgdata.to_owned(),
            pid,
        });
    }
    debug!(pid, "ignoring stale postmaster.pid");
    Ok(())
}

fn is_running_postgres(pid: Pid) -> bool {
    if pid == nix::unistd::getpid() {
        return false;
    }
    // After a container restart the old pid is often reused by an unrelated
    // process, and a killed postmaster may linger as a zombie: where /proc
    // exists, require a live process named postgres.
    if let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) {
        return proc_stat_is_live_postgres(&stat);
    }
    // EPERM: the process exists but belongs to another user.
    matches!(kill(pid, None), Ok(()) | Err(Errno::EPERM))
}

/// Parses `/proc/<pid>/stat`: "<pid> (<comm>) <state> ...".
fn proc_stat_is_live_postgres(stat: &str) -> bool {
    let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
        return false;
    };
    let comm = &stat[open + 1..close];
    let state = stat[close + 1..].trim_start().chars().next();
    comm == "postgres" && !matches!(state, Some('Z' | 'X'))
}

fn postgres_command(
    binaries: &Binaries,
    layout: &Layout,
    run_as: Option<&RunAs>,
    options: &Options,
) -> Result<Command, EmbeddedError> {
    // Opened by us, so postgres needs no permission on the file itself.
    let log = OpenOptions::new()
        .append(true)
        .open(&layout.log_file)
        .map_err(io_error("open", &layout.log_file))?;
    let log_for_stderr = log
        .try_clone()
        .map_err(io_error("open", &layout.log_file))?;

    let mut socket_dirs = OsString::from("unix_socket_directories=");
    socket_dirs.push(&layout.run_dir);
    let mut command = base_command(&binaries.postgres(), layout, run_as);
    command
        .arg("-D")
        .arg(&layout.pgdata)
        .args(["-c", "listen_addresses="])
        .arg("-c")
        .arg(socket_dirs)
        .args(["-c", "unix_socket_permissions=0700"])
        .arg("-c")
        .arg(format!("port={PORT}"));
    // Last, so callers can override the defaults above.
    for (name, value) in &options.settings {
        command.arg("-c").arg(format!("{name}={value}"));
    }
    command
        .stdout(log)
        .stderr(log_for_stderr)
        // Its own process group keeps a terminal's Ctrl-C away from postgres:
        // the service decides when the database goes away (after draining).
        .process_group(0);
    shut_down_with_parent(&mut command);
    Ok(command)
}

/// Makes the kernel send SIGINT (fast shutdown) to postgres when the thread
/// that spawned it exits, which includes this whole process dying.
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
fn shut_down_with_parent(command: &mut Command) {
    let parent = nix::unistd::getpid();
    // SAFETY: the closure runs in the forked child before exec, where only
    // async-signal-safe calls are allowed: it makes two plain syscalls
    // (prctl, getppid) and neither allocates nor takes locks. std runs it
    // after setuid/setgid, which would otherwise clear the death signal.
    unsafe {
        command.pre_exec(move || {
            nix::sys::prctl::set_pdeathsig(Signal::SIGINT)?;
            // If the parent died before prctl, the signal will never come.
            if nix::unistd::getppid() != parent {
                return Err(Errno::ESRCH.into());
            }
            Ok(())
        });
    }
}

#[cfg(not(target_os = "linux"))]
fn shut_down_with_parent(_command: &mut Command) {}

type ExitReport = io::Result<ExitStatus>;

fn describe_exit(exit: &ExitReport) -> String {
    match exit {
        Ok(status) => status.to_string(),
        Err(error) => format!("exit status unknown: {error}"),
    }
}

/// The running postmaster, owned by a dedicated supervisor thread.
///
/// The thread spawns postgres (the parent-death signal is tied to the
/// spawning thread, so it must live as long as the child), relays signals to
/// it, and reports its exit. Only that thread reaps the child, so a signal can
/// never reach a recycled pid.
struct Server {
    pid: i32,
    signals: mpsc::Sender<Signal>,
    exit: oneshot::Receiver<ExitReport>,
}

impl Server {
    async fn spawn(command: Command) -> io::Result<Self> {
        let (spawned_tx, spawned_rx) = oneshot::channel();
        let (signals, signals_rx) = mpsc::channel();
        let (exit_tx, exit) = oneshot::channel();
        std::thread::Builder::new()
            .name("embedded-postgres".to_owned())
            .spawn(move || supervise(command, spawned_tx, signals_rx, exit_tx))?;
        let pid = spawned_rx.await.map_err(|_| {
            io::Error::other("the supervisor thread ended before spawning postgres")
        })??;
        Ok(Self { pid, signals, exit })
    }

    /// Asks the supervisor to signal postgres; a no-op once postgres has exited.
    fn signal(&self, signal: Signal) {
        let _ = self.signals.send(signal);
    }

    /// The exit report if postgres has exited. After `Some`, the server is done
    /// and must not be waited on again.
    fn try_exit(&mut self) -> Option<ExitReport> {
        match self.exit.try_recv() {
            Ok(report) => Some(report),
            Err(oneshot::error::TryRecvError::Empty) => None,
            Err(oneshot::error::TryRecvError::Closed) => Some(Err(supervisor_vanished())),
        }
    }

    /// SIGINT (fast shutdown), then SIGQUIT (immediate shutdown), then SIGKILL,
    /// each followed by a bounded wait.
    async fn shutdown(mut self) -> Result<(), EmbeddedError> {
        let steps = [
            (Signal::SIGINT, STOP_TIMEOUT),
            (Signal::SIGQUIT, ESCALATION_TIMEOUT),
            (Signal::SIGKILL, ESCALATION_TIMEOUT),
        ];
        for (signal, grace) in steps {
            self.signal(signal);
            match tokio::time::timeout(grace, &mut self.exit).await {
                Ok(report) => {
                    let report = report.unwrap_or_else(|_| Err(supervisor_vanished()));
                    debug!(pid = self.pid, exit = %describe_exit(&report), "postgres exited");
                    return Ok(());
                }
                Err(_) => warn!(
                    pid = self.pid,
                    %signal,
                    "postgres did not exit within {} s, escalating",
                    grace.as_secs()
                ),
            }
        }
        Err(EmbeddedError::StopFailed { pid: self.pid })
    }
}

fn supervisor_vanished() -> io::Error {
    io::Error::other("the supervisor thread ended without reporting")
}

/// Body of the supervisor thread.
fn supervise(
    mut command: Command,
    spawned: oneshot::Sender<io::Result<i32>>,
    signals: mpsc::Receiver<Signal>,
    exited: oneshot::Sender<ExitReport>,
) {
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(error) => {
            let _ = spawned.send(Err(error));
            return;
        }
    };
    let pid = Pid::from_raw(child.id() as i32);
    if spawned.send(Ok(pid.as_raw())).is_err() {
        // start() was cancelled: nobody will ever stop this server.
        let _ = kill(pid, Signal::SIGINT);
    }
    // Polls so that signals and reaping happen on this one thread (see `Server`).
    let report = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Ok(status),
            Ok(None) => {}
            Err(error) => break Err(error),
        }
        match signals.recv_timeout(SUPERVISOR_POLL) {
            Ok(signal) => {
                let _ = kill(pid, signal);
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            // The handle is gone (it asked for a shutdown first): just reap.
            Err(mpsc::RecvTimeoutError::Disconnected) => break child.wait(),
        }
    };
    let _ = exited.send(report);
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

    #[test]
    fn an_unreachable_data_dir_gets_its_cluster_under_the_fallback_home() {
        let Some(user) = unprivileged_account() else {
            return;
        };
        let closed =
            std::env::temp_dir().join(format!("users-service-fallback-{}", std::process::id()));
        let data = closed.join("data");
        DirBuilder::new().mode(0o700).create(&closed).unwrap();
        DirBuilder::new().mode(0o755).create(&data).unwrap();
        if fs::metadata(&closed).unwrap().uid() == user.uid.as_raw() {
            fs::remove_dir_all(&closed).unwrap();
            return;
        }
        let home = reachable_home(data.clone(), &user);
        let reachable_data = reachable_home(std::env::temp_dir(), &user);
        fs::remove_dir_all(&closed).unwrap();
        let home = home.expect("a fallback home");
        let _ = fs::remove_dir(&home);
        assert_eq!(home, fallback_home(&data));
        assert!(home.starts_with(FALLBACK_HOME));
        assert_eq!(
            reachable_data.unwrap(),
            std::env::temp_dir(),
            "a reachable dir is kept"
        );
    }

    #[test]
    fn a_closed_ancestor_is_not_reachable() {
        let Some(user) = unprivileged_account() else {
            return;
        };
        // <tmp>/closed (0700, not the user's) / data (0755): closed blocks the way to data.
        let closed =
            std::env::temp_dir().join(format!("users-service-closed-{}", std::process::id()));
        let data = closed.join("data");
        DirBuilder::new().mode(0o700).create(&closed).unwrap();
        DirBuilder::new().mode(0o755).create(&data).unwrap();
        fs::set_permissions(&data, Permissions::from_mode(0o755)).unwrap();
        let owned_by_user = fs::metadata(&closed).unwrap().uid() == user.uid.as_raw();

        let result = check_reachable(&data, &user);
        let open = check_reachable(&std::env::temp_dir(), &user);
        fs::remove_dir_all(&closed).unwrap();
        assert!(open.is_ok(), "{open:?}");
        if !owned_by_user {
            assert!(
                matches!(&result, Err(EmbeddedError::NotReachable { path, .. }) if *path == closed),
                "{result:?}"
            );
        }
    }

    #[test]
    fn proc_stat_parsing() {
        assert!(proc_stat_is_live_postgres("42 (postgres) S 1 42 42 0"));
        assert!(!proc_stat_is_live_postgres("42 (postgres) Z 1 42 42 0"));
        assert!(!proc_stat_is_live_postgres("42 (sleep) S 1 42 42 0"));
    }

    #[test]
    fn version_parsing() {
        assert_eq!(major_version("15.8").as_deref(), Some("15"));
        assert_eq!(major_version("16beta1").as_deref(), Some("16"));
        assert_eq!(major_version("9.6.24").as_deref(), Some("9.6"));
        assert_eq!(major_version("devel"), None);
    }
}
