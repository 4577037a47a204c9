//! A Postgres primary and a synchronous streaming-replication standby of
//! the test's own, made from the installed binaries (initdb, pg_basebackup)
//! in a scratch directory, each on a free TCP port of 127.0.0.1.

use std::{
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use tokio_postgres::NoTls;

/// The standby's name in the primary's `synchronous_standby_names`.
const STANDBY_NAME: &str = "standby";

/// One server of the pair.
pub struct Node {
    pub port: u16,
    dir: PathBuf,
    process: Option<Child>,
}

impl Node {
    /// A connection string to `database` on this server.
    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    pub fn config(&self, database: &str) -> tokio_postgres::Config {
        self.url(database).parse().unwrap()
    }

    /// Kills the postmaster with SIGKILL, as a crash of its machine would.
    pub fn kill(&mut self) {
        if let Some(mut process) = self.process.take() {
            let _ = process.kill();
            let _ = process.wait();
        }
    }

    fn start(&mut self, bin: &Path, settings: &[(&str, String)]) {
        let mut command = Command::new(bin.join("postgres"));
        command.arg("-D").arg(self.dir.join("data"));
        for (name, value) in settings {
            command.arg("-c").arg(format!("{name}={value}"));
        }
        let log = std::fs::File::create(self.dir.join("postgres.log")).unwrap();
        as_owner(&mut command);
        command
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        self.process = Some(command.spawn().expect("postgres starts"));
    }

    async fn wait_until_up(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.config("postgres").connect(NoTls).await.is_err() {
            assert!(
                Instant::now() < deadline,
                "postgres on {} did not start: {}",
                self.port,
                std::fs::read_to_string(self.dir.join("postgres.log")).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Runs one statement, on a connection of its own.
    pub async fn execute(&self, database: &str, sql: &str) -> Vec<tokio_postgres::Row> {
        let (client, connection) = self.config(database).connect(NoTls).await.unwrap();
        tokio::spawn(connection);
        client.query(sql, &[]).await.unwrap()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The primary, and a standby it waits for at each commit.
pub struct Pair {
    pub primary: Node,
    pub standby: Node,
}

impl Pair {
    pub async fn start(dir: &Path) -> Self {
        let bin = binaries();
        let mut primary = node(dir, "primary");
        let mut standby = node(dir, "standby");
        run(Command::new(bin.join("initdb"))
            .args(["-U", "postgres", "-A", "trust", "--no-sync", "-E", "UTF8"])
            .arg("-D")
            .arg(primary.dir.join("data")));
        let common = |node: &Node| {
            vec![
                ("listen_addresses", "127.0.0.1".to_owned()),
                ("port", node.port.to_string()),
                (
                    "unix_socket_directories",
                    node.dir.to_string_lossy().into_owned(),
                ),
                // The OS keeps what a killed postgres wrote: a SIGKILL
                // loses nothing, and the test needs no disk flushes.
                ("fsync", "off".to_owned()),
                ("wal_level", "replica".to_owned()),
                ("max_wal_senders", "4".to_owned()),
                ("hot_standby", "on".to_owned()),
            ]
        };
        let mut settings = common(&primary);
        settings.push(("synchronous_standby_names", STANDBY_NAME.to_owned()));
        primary.start(&bin, &settings);
        primary.wait_until_up().await;

        run(Command::new(bin.join("pg_basebackup"))
            .args([
                "-h",
                "127.0.0.1",
                "-U",
                "postgres",
                "-X",
                "stream",
                "-c",
                "fast",
            ])
            .args(["-p", &primary.port.to_string()])
            .arg("-D")
            .arg(standby.dir.join("data")));
        let data = standby.dir.join("data");
        std::fs::write(data.join("standby.signal"), "").unwrap();
        let conninfo = format!(
            "primary_conninfo = 'host=127.0.0.1 port={} user=postgres application_name={STANDBY_NAME}'\n",
            primary.port
        );
        append(&data.join("postgresql.auto.conf"), &conninfo);
        let mut settings = common(&standby);
        // Once promoted, it has no standby to wait for.
        settings.push(("synchronous_standby_names", String::new()));
        standby.start(&bin, &settings);
        standby.wait_until_up().await;

        // Commits wait for the standby from here on.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let rows = primary
                .execute(
                    "postgres",
                    "SELECT sync_state FROM pg_stat_replication WHERE application_name = 'standby'",
                )
                .await;
            if rows
                .first()
                .is_some_and(|row| row.get::<_, &str>(0) == "sync")
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the standby did not become synchronous"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Self { primary, standby }
    }

    /// What libpq-style clients are given: both servers, the writable one
    /// wanted.
    pub fn url(&self, database: &str) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{},127.0.0.1:{}/{database}?target_session_attrs=read-write",
            self.primary.port, self.standby.port
        )
    }

    /// Promotes the standby to primary; returns once it accepts writes.
    pub async fn promote(&self) {
        let rows = self
            .standby
            .execute("postgres", "SELECT pg_promote(true, 60)")
            .await;
        assert!(rows[0].get::<_, bool>(0), "the standby was promoted");
    }
}

/// The directory of the installed PostgreSQL binaries (the newest).
fn binaries() -> PathBuf {
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL is installed (.ci/run installs Debian's package)")
        .flatten()
        .map(|entry| entry.path().join("bin"))
        .filter(|bin| bin.join("initdb").exists())
        .collect();
    found.sort_by_key(|bin| {
        bin.parent()
            .and_then(|p| p.file_name())
            .and_then(|v| v.to_str())
            .and_then(|v| v.parse::<u32>().ok())
    });
    found.pop().expect("initdb under /usr/lib/postgresql")
}

/// A directory for one server, owned by whoever runs postgres.
fn node(dir: &Path, name: &str) -> Node {
    let dir = dir.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    if let Some(user) = owner() {
        nix::unistd::chown(&dir, Some(user.uid), Some(user.gid)).unwrap();
    }
    Node {
        port: free_port(),
        dir,
        process: None,
    }
}

/// PostgreSQL refuses to run as root: as root, the `postgres` user runs it.
fn owner() -> Option<nix::unistd::User> {
    if !nix::unistd::geteuid().is_root() {
        return None;
    }
    Some(
        nix::unistd::User::from_name("postgres")
            .unwrap()
            .expect("a postgres system user (Debian's package makes it)"),
    )
}

fn as_owner(command: &mut Command) {
    if let Some(user) = owner() {
        command.uid(user.uid.as_raw()).gid(user.gid.as_raw());
    }
}

fn run(command: &mut Command) {
    as_owner(command);
    let output = command.output().expect("the PostgreSQL binary runs");
    assert!(
        output.status.success(),
        "{command:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

fn append(path: &Path, text: &str) {
    use std::io::Write;
    std::fs::OpenOptions::new()
        .append(true)
        .open(path)
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
