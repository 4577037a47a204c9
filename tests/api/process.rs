//! The service as a process of its own, for what only a process shows: its
//! log lines, its memory and CPU time, how it takes signals and limits.

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use tonic::transport::Channel;

use crate::helpers::{Bearer, Users, drop_database, fresh_database, scratch_dir, server};
use users_service::pb::v1::users_service_client::UsersServiceClient;

/// A running `users-service` binary.
pub struct ServiceProcess {
    child: Child,
    pub addr: SocketAddr,
    pub admin_token: String,
    /// Its name on the tests' server; empty for [`Database::Url`] and
    /// [`Database::Embedded`].
    pub database: String,
    pub data_dir: PathBuf,
    log: Arc<Mutex<Vec<serde_json::Value>>>,
    /// Whether the database was made for this process, and goes with it.
    owns_database: bool,
}

/// The database a [`ServiceProcess`] uses.
#[derive(Debug, Default, Clone)]
pub enum Database {
    /// A fresh database on the tests' server, dropped with the process.
    #[default]
    Fresh,
    /// The caller's database on the tests' server, kept.
    Named(String),
    /// Any server, by URL.
    Url(String),
    /// None given: the service runs its own in its data directory.
    Embedded,
}

/// How to start it.
#[derive(Debug, Default, Clone)]
pub struct Start {
    /// Flags after the defaults (which they override).
    pub args: Vec<String>,
    /// Most open files (RLIMIT_NOFILE), when set.
    pub max_open_files: Option<u32>,
    /// The address to listen on; a free port when unset.
    pub listen: Option<SocketAddr>,
    /// Which database it uses.
    pub database: Database,
    /// The data directory; a fresh one when unset.
    pub data_dir: Option<PathBuf>,
}

impl ServiceProcess {
    pub async fn start(start: Start) -> Self {
        let owns_database = matches!(start.database, Database::Fresh);
        let (database, url) = match start.database {
            Database::Fresh => {
                let name = fresh_database().await;
                let url = server().url(&name);
                (name, Some(url))
            }
            Database::Named(name) => {
                let url = server().url(&name);
                (name, Some(url))
            }
            Database::Url(url) => (String::new(), Some(url)),
            Database::Embedded => (String::new(), None),
        };
        let data_dir = start.data_dir.unwrap_or_else(|| scratch_dir("process"));
        let listen = start
            .listen
            .unwrap_or_else(|| "127.0.0.1:0".parse().unwrap());
        let binary = env!("CARGO_BIN_EXE_users-service");
        let mut command = match start.max_open_files {
            Some(n) => {
                let mut command = Command::new("prlimit");
                command
                    .arg(format!("--nofile={n}:{n}"))
                    .arg("--")
                    .arg(binary);
                command
            }
            None => Command::new(binary),
        };
        command
            .args(["--listen", &listen.to_string(), "--log-format", "json"])
            // Defaults through the environment, so that flags can override them.
            .env("RATE_LIMIT_PER_SECOND", "0")
            .env("DB_POOL_SIZE", "4")
            .args(url.iter().flat_map(|url| ["--database-url", url]))
            .arg("--data-dir")
            .arg(&data_dir)
            .args(&start.args)
            .env_remove("DATABASE_URL")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = command.spawn().expect("the service binary starts");
        let log = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().unwrap();
        let lines = Arc::clone(&log);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let value = serde_json::from_str(&line)
                    .unwrap_or_else(|_| serde_json::json!({ "message": line, "raw": true }));
                lines.lock().unwrap().push(value);
            }
        });
        let mut process = Self {
            child,
            addr: "0.0.0.0:0".parse().unwrap(),
            admin_token: String::new(),
            database,
            data_dir,
            log,
            owns_database,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        let serving = loop {
            let found = process
                .wait_for_log(Duration::from_millis(100), |line| {
                    line["message"] == "serving"
                })
                .await;
            let exited = process.child.try_wait().ok().flatten().is_some();
            if found.is_some() || exited || Instant::now() > deadline {
                break found;
            }
        };
        let serving = serving
            .unwrap_or_else(|| panic!("the service did not start: {:?}", process.log_lines()));
        process.addr = serving["addr"].as_str().unwrap().parse().unwrap();
        process.admin_token = std::fs::read_to_string(process.data_dir.join("admin.key"))
            .expect("the bootstrap key")
            .trim()
            .to_owned();
        process
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Every log line so far, as JSON.
    pub fn log_lines(&self) -> Vec<serde_json::Value> {
        self.log.lock().unwrap().clone()
    }

    /// The first log line that `matches`, waiting up to `timeout` for it.
    pub async fn wait_for_log(
        &self,
        timeout: Duration,
        matches: impl Fn(&serde_json::Value) -> bool,
    ) -> Option<serde_json::Value> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(line) = self.log.lock().unwrap().iter().find(|l| matches(l)) {
                return Some(line.clone());
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.addr))
            .unwrap()
            .connect()
            .await
            .expect("connects to the service")
    }

    /// Creates `user` through the service; the stored user.
    pub async fn create_user(
        &self,
        user: users_service::pb::v1::User,
    ) -> users_service::pb::v1::User {
        self.users()
            .await
            .create_user(users_service::pb::v1::CreateUserRequest {
                user: Some(user),
                ..Default::default()
            })
            .await
            .expect("the user is created")
            .into_inner()
            .user
            .unwrap()
    }

    /// Sends SIGTERM and waits up to `within` for the exit; its status and
    /// how long it took.
    pub async fn terminate(&mut self, within: Duration) -> (std::process::ExitStatus, Duration) {
        let signalled = Instant::now();
        self.signal(nix::sys::signal::Signal::SIGTERM);
        let exit = self.wait_exit(within).await.expect("the service exits");
        (exit, signalled.elapsed())
    }

    pub async fn users(&self) -> Users {
        UsersServiceClient::with_interceptor(
            self.channel().await,
            Bearer::new(Some(&self.admin_token)),
        )
    }

    /// Creates an API key in the service's database (one on the tests'
    /// server: [`Database::Fresh`] or [`Database::Named`]); its token.
    pub async fn create_key(
        &self,
        role: users_service::auth::Role,
        tenant: Option<uuid::Uuid>,
        rate_limit: Option<u32>,
    ) -> String {
        assert!(
            !self.database.is_empty(),
            "the database is not on the tests' server"
        );
        crate::helpers::create_key(&server().config(&self.database), role, tenant, rate_limit).await
    }

    /// Resident memory, in bytes.
    pub fn rss(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.server_pid()))
            .expect("the process is alive");
        let kib: u64 = status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .expect("VmRSS");
        kib * 1024
    }

    /// CPU time used so far (user and system).
    pub fn cpu_time(&self) -> Duration {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.server_pid()))
            .expect("the process is alive");
        let after_name = &stat[stat.rfind(')').unwrap() + 2..];
        let fields: Vec<&str> = after_name.split_whitespace().collect();
        // utime and stime are fields 14 and 15 of stat, in clock ticks.
        let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
        let per_second = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
            .ok()
            .flatten()
            .unwrap_or(100) as u64;
        Duration::from_millis(ticks * 1000 / per_second)
    }

    /// The service's own pid: prlimit execs it in place, so it is the child's.
    fn server_pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `signal` to the service.
    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid() as i32), signal)
            .expect("signal sent");
    }

    /// Waits up to `timeout` for the service to exit; its exit status.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for ServiceProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if self.owns_database {
            drop_database(&self.database);
        }
    }
}
