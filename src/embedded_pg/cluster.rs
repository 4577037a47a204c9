//! Setting a cluster up: its layout in the data directory, the PostgreSQL
//! binaries, initdb, and the postgres command line.

use super::privileges::{RunAs, reachable_home};
use super::process::shut_down_with_parent;
use super::*;

/// Where everything lives inside the data directory, as absolute canonical
/// paths: postgres gets exactly these, so the reachability check below covers
/// every directory it will traverse.
#[derive(Debug)]
pub(super) struct Layout {
    pub(super) data_dir: PathBuf,
    pub(super) pgdata: PathBuf,
    pub(super) run_dir: PathBuf,
    pub(super) log_file: PathBuf,
}

impl Layout {
    /// Creates the directories and the log file, and hands them to `run_as`.
    pub(super) fn prepare(data_dir: &Path, run_as: Option<&RunAs>) -> Result<Self, EmbeddedError> {
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

    pub(super) fn check_socket_path(&self) -> Result<(), EmbeddedError> {
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

    pub(super) fn version_file(&self) -> PathBuf {
        self.pgdata.join("PG_VERSION")
    }

    /// The major version recorded in `PG_VERSION`, or `None` when there is no cluster yet.
    pub(super) fn cluster_version(&self) -> Result<Option<String>, EmbeddedError> {
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
pub(super) fn create_dir(path: &Path, mode: u32) -> Result<bool, EmbeddedError> {
    let existed = path.is_dir();
    DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(path)
        .map_err(io_error("create directory", path))?;
    Ok(!existed)
}

pub(super) fn chown(path: &Path, user: &RunAs) -> Result<(), EmbeddedError> {
    std::os::unix::fs::chown(path, Some(user.uid.as_raw()), Some(user.gid.as_raw()))
        .map_err(io_error("change the owner of", path))
}

/// A directory holding both `initdb` and `postgres`.
#[derive(Debug)]
pub(super) struct Binaries {
    pub(super) dir: PathBuf,
}

impl Binaries {
    /// Prefers the binaries matching an existing cluster's major version, then
    /// PATH, then the usual installation directories (highest version first).
    pub(super) fn find(cluster_version: Option<&str>) -> Result<Self, EmbeddedError> {
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

    pub(super) fn initdb(&self) -> PathBuf {
        self.dir.join("initdb")
    }

    pub(super) fn postgres(&self) -> PathBuf {
        self.dir.join("postgres")
    }

    /// The major version the binaries report, in the format of `PG_VERSION`.
    pub(super) async fn major_version(&self) -> Result<String, EmbeddedError> {
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
pub(super) fn versioned_dirs(parent: &Path, prefix: &str) -> Vec<PathBuf> {
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
pub(super) fn major_version(version: &str) -> Option<String> {
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
pub(super) fn base_command(program: &Path, layout: &Layout, run_as: Option<&RunAs>) -> Command {
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

pub(super) async fn init_cluster(
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
pub(super) fn fresh_dir(path: &Path, run_as: Option<&RunAs>) -> Result<(), EmbeddedError> {
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

pub(super) async fn run_initdb(
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
pub(super) fn check_not_in_use(pgdata: &Path) -> Result<(), EmbeddedError> {
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

/// Waits, up to `limit`, while `postmaster.pid` names a postgres that is
/// shutting down (its status line says `stopping`): the postmaster of a
/// service that was killed gets its parent-death signal and takes a moment
/// to exit. A postgres that runs and is not stopping is in use.
pub(super) async fn wait_until_free(pgdata: &Path, limit: Duration) -> Result<(), EmbeddedError> {
    let deadline = Instant::now() + limit;
    loop {
        match check_not_in_use(pgdata) {
            Err(EmbeddedError::InUse { pid, .. })
                if Instant::now() < deadline
                    && postmaster_status(pgdata).as_deref() == Some("stopping") =>
            {
                debug!(pid, "waiting for the previous postgres to finish stopping");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            outcome => return outcome,
        }
    }
}

/// The status line of `postmaster.pid` (`starting`, `ready`, `stopping`).
fn postmaster_status(pgdata: &Path) -> Option<String> {
    let text = fs::read_to_string(pgdata.join("postmaster.pid")).ok()?;
    text.lines().nth(7).map(|line| line.trim().to_owned())
}

pub(super) fn is_running_postgres(pid: Pid) -> bool {
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
pub(super) fn proc_stat_is_live_postgres(stat: &str) -> bool {
    let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
        return false;
    };
    let comm = &stat[open + 1..close];
    let state = stat[close + 1..].trim_start().chars().next();
    comm == "postgres" && !matches!(state, Some('Z' | 'X'))
}

pub(super) fn postgres_command(
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
        // Messages in English whatever the machine's locale: the service
        // recognises a few outages only by their text (store::error).
        .args(["-c", "lc_messages=C"])
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

#[cfg(test)]
mod tests {
    use super::*;

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
