//! Test harness: a real server on 127.0.0.1:0 per test, each with a fresh
//! database cloned from a template that was migrated once per run.
//!
//! The Postgres server is `TEST_DATABASE_URL` when set (a URL such as
//! `postgres://postgres@127.0.0.1:5432/postgres`), otherwise an embedded
//! cluster started once for the whole run in a temporary directory.

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{
        OnceLock,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use tokio::{sync::oneshot, task::JoinHandle};
use tokio_postgres::NoTls;
use tonic::{
    metadata::{Ascii, MetadataValue},
    service::{Interceptor, interceptor::InterceptedService},
    transport::Channel,
};
use users_service::{
    app::Application,
    auth::{Role, jwt::JwtAlgorithm, keys},
    config::Config,
    embedded_pg::{self as embedded, EmbeddedPostgres},
    pb::v1::{
        tenants_service_client::TenantsServiceClient, users_service_client::UsersServiceClient,
    },
    store::db,
};

/// The Postgres server of this test run and its migrated template database.
pub struct TestServer {
    /// Connection settings for a database name.
    base: Base,
    template: String,
    _embedded: Option<EmbeddedPostgres>,
}

enum Base {
    Url(url::Url),
    Socket(PathBuf),
}

impl TestServer {
    /// A connection string for database `name`.
    pub fn url(&self, name: &str) -> String {
        match &self.base {
            Base::Url(url) => {
                let mut url = url.clone();
                url.set_path(&format!("/{name}"));
                url.to_string()
            }
            Base::Socket(dir) => format!("host={} user=postgres dbname={name}", dir.display()),
        }
    }

    pub fn config(&self, name: &str) -> tokio_postgres::Config {
        self.url(name)
            .parse()
            .expect("valid test connection string")
    }
}

static SERVER: OnceLock<TestServer> = OnceLock::new();
static DATABASES: AtomicUsize = AtomicUsize::new(0);

/// The shared server, started and templated on first use. It is set up on a
/// thread with its own runtime, because each test has a runtime of its own
/// that ends with the test.
pub fn server() -> &'static TestServer {
    SERVER.get_or_init(|| {
        std::thread::spawn(|| {
            tokio::runtime::Runtime::new()
                .expect("runtime")
                .block_on(start_server())
        })
        .join()
        .expect("test server setup")
    })
}

async fn start_server() -> TestServer {
    let (base, embedded) = match std::env::var("TEST_DATABASE_URL") {
        Ok(url) => (
            Base::Url(url.parse().expect("TEST_DATABASE_URL must be a URL")),
            None,
        ),
        Err(_) => {
            let pg = start_embedded(&scratch_dir("cluster"), true).await;
            (Base::Socket(pg.socket_dir().to_path_buf()), Some(pg))
        }
    };
    let server = TestServer {
        base,
        template: format!("users_service_template_{}", std::process::id()),
        _embedded: embedded,
    };
    let template = server.config(&server.template);
    db::create_database_if_missing(&template)
        .await
        .expect("create template");
    db::run_migrations(&template)
        .await
        .expect("migrate template");
    server
}

/// A fresh directory under the system temp dir, removed at the next run.
pub fn scratch_dir(purpose: &str) -> PathBuf {
    // One root per user: another user's leftovers must not get in the way.
    let root = std::env::temp_dir().join(format!("users-service-tests-{}", nix::unistd::getuid()));
    std::fs::create_dir_all(&root).unwrap();
    let dir = root.join(format!(
        "{purpose}-{}-{}",
        std::process::id(),
        DATABASES.fetch_add(1, Ordering::Relaxed)
    ));
    remove_stale(&root);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Deletes the directories of earlier runs whose process has ended.
fn remove_stale(root: &std::path::Path) {
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        // `<purpose>-<pid>-<n>`; the purpose may itself contain dashes.
        let pid = name.rsplit('-').nth(1).and_then(|p| p.parse::<u32>().ok());
        if let Some(pid) = pid {
            if pid != std::process::id() && !PathBuf::from(format!("/proc/{pid}")).exists() {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
}

/// Starts an embedded cluster; `fast` trades durability for speed (tests only).
pub async fn start_embedded(dir: &std::path::Path, fast: bool) -> EmbeddedPostgres {
    let settings = if fast {
        vec![
            ("fsync".to_owned(), "off".to_owned()),
            ("synchronous_commit".to_owned(), "off".to_owned()),
            ("full_page_writes".to_owned(), "off".to_owned()),
        ]
    } else {
        Vec::new()
    };
    EmbeddedPostgres::start(
        dir,
        embedded::Options {
            settings,
            ..embedded::Options::default()
        },
    )
    .await
    .expect("embedded postgres starts")
}

/// Issuer and audience of the end-user tokens the tests sign.
pub const JWT_ISSUER: &str = "https://idp.test";
pub const JWT_AUDIENCE: &str = "users-service";

pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// Settings for a test server: port 0, its own data directory (which gets
/// the bootstrap admin key), end-user tokens verified with the RS256
/// fixture key, no rate limit, a small pool and short timeouts.
pub fn test_config(database_url: Option<String>) -> Config {
    let mut config = Config::with_defaults();
    config.listen = "127.0.0.1:0".parse().unwrap();
    config.database_url = database_url;
    config.data_dir = scratch_dir("app");
    config.rate_limit_per_second = 0;
    config.key_cache_ttl = Duration::from_millis(300);
    config.jwt_issuer = Some(JWT_ISSUER.to_owned());
    config.jwt_audience = JWT_AUDIENCE.to_owned();
    config.jwt_algorithm = JwtAlgorithm::Rs256;
    config.jwt_key_file = Some(fixture("jwt-rs256-public.pem"));
    config.db_pool_size = Some(4);
    config.db_connect_timeout = Duration::from_secs(2);
    config.db_acquire_timeout = Duration::from_secs(2);
    config.shutdown_grace = Duration::from_secs(2);
    config
}

/// Adds `authorization: Bearer <token>` to every call, when it has a token.
#[derive(Debug, Clone)]
pub struct Bearer(Option<MetadataValue<Ascii>>);

impl Bearer {
    pub fn new(token: Option<&str>) -> Self {
        Self(token.map(|t| format!("Bearer {t}").parse().expect("ASCII token")))
    }
}

impl Interceptor for Bearer {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

pub type Users = UsersServiceClient<InterceptedService<Channel, Bearer>>;
pub type Tenants = TenantsServiceClient<InterceptedService<Channel, Bearer>>;

/// A running server with clients (authenticated with the bootstrap admin
/// key), and a connection to its database to check what it holds.
pub struct TestApp {
    pub addr: SocketAddr,
    /// The server's clock.
    pub clock: TestClock,
    pub metrics_addr: Option<SocketAddr>,
    pub health_addr: Option<SocketAddr>,
    pub users: Users,
    pub tenants: Tenants,
    pub channel: Channel,
    pub admin_token: String,
    pub config: Config,
    pub db: tokio_postgres::Client,
    pub db_config: tokio_postgres::Config,
    pub database: String,
    stop: Option<oneshot::Sender<()>>,
    handle: Option<JoinHandle<()>>,
}

/// A fresh database cloned from the migrated template; its name.
/// Kills the postmaster of the embedded cluster in `data_dir` with
/// SIGKILL; its pid.
pub fn kill_postmaster(data_dir: &std::path::Path) -> i32 {
    let pid: i32 = std::fs::read_to_string(data_dir.join("pgdata/postmaster.pid"))
        .expect("postgres runs in the data directory")
        .lines()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("the postmaster is killed");
    pid
}

/// The ids of every user stored in the database of `config`.
pub async fn stored_user_ids(config: &tokio_postgres::Config) -> std::collections::HashSet<String> {
    let (client, connection) = config.connect(NoTls).await.expect("connects");
    tokio::spawn(connection);
    client
        .query("SELECT id::text FROM users", &[])
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect()
}

pub async fn fresh_database() -> String {
    let server = server();
    let name = format!(
        "users_service_test_{}_{}",
        std::process::id(),
        DATABASES.fetch_add(1, Ordering::Relaxed)
    );
    let (admin, connection) = server
        .config("postgres")
        .connect(NoTls)
        .await
        .expect("admin connection");
    tokio::spawn(connection);
    admin
        .batch_execute(&format!(
            "CREATE DATABASE {} TEMPLATE {}",
            db::quote_identifier(&name),
            db::quote_identifier(&server.template)
        ))
        .await
        .expect("clone template");
    name
}

/// Drops a test database, from a thread with its own runtime: callers may
/// be in `Drop`, which cannot await, while their runtime shuts down.
pub fn drop_database(name: &str) {
    let url = server().config("postgres");
    let name = name.to_owned();
    let _ = std::thread::spawn(move || {
        tokio::runtime::Runtime::new()
            .unwrap()
            .block_on(async move {
                if let Ok((client, connection)) = url.connect(NoTls).await {
                    tokio::spawn(connection);
                    let _ = client
                        .batch_execute(&format!(
                            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                            db::quote_identifier(&name)
                        ))
                        .await;
                }
            });
    })
    .join();
}

/// Starts a server on a fresh database cloned from the template.
pub async fn spawn_app() -> TestApp {
    let name = fresh_database().await;
    let mut app = spawn_with(test_config(Some(server().url(&name)))).await;
    app.database = name;
    app
}

/// The time as a test server sees it: it starts at the real time, moves
/// forward a microsecond at each reading (so that no two writes share a
/// time, as Postgres stores times to the microsecond), and jumps when the
/// test says so.
#[derive(Debug, Clone)]
pub struct TestClock(std::sync::Arc<std::sync::Mutex<chrono::DateTime<chrono::Utc>>>);

impl TestClock {
    pub fn new() -> Self {
        use chrono::SubsecRound;
        Self(std::sync::Arc::new(std::sync::Mutex::new(
            chrono::Utc::now().trunc_subsecs(6),
        )))
    }

    /// Moves the time forward by `by`.
    pub fn advance(&self, by: Duration) {
        *self.0.lock().unwrap() += chrono::TimeDelta::from_std(by).unwrap();
    }

    /// Moves the time back by `by`, as a replica whose clock runs behind.
    pub fn rewind(&self, by: Duration) {
        *self.0.lock().unwrap() -= chrono::TimeDelta::from_std(by).unwrap();
    }

    /// The service's clock, reading this one.
    pub fn reader(&self) -> users_service::clock::Clock {
        let time = std::sync::Arc::clone(&self.0);
        std::sync::Arc::new(move || {
            let mut time = time.lock().unwrap();
            *time += chrono::TimeDelta::microseconds(1);
            *time
        })
    }
}

/// Starts a server with `config`.
pub async fn spawn_with(config: Config) -> TestApp {
    spawn_connected(config, None).await
}

/// As [`spawn_with`], for a server with TLS: the clients connect with `tls`.
pub async fn spawn_tls(config: Config, tls: tonic::transport::ClientTlsConfig) -> TestApp {
    spawn_connected(config, Some(tls)).await
}

async fn spawn_connected(
    config: Config,
    tls: Option<tonic::transport::ClientTlsConfig>,
) -> TestApp {
    let clock = TestClock::new();
    let application = Application::build_with_clock(&config, clock.reader())
        .await
        .expect("application builds");
    let addr = application.local_addr();
    let metrics_addr = application.metrics_addr();
    let health_addr = application.health_addr();
    let (stop, stopped) = oneshot::channel::<()>();
    let handle = tokio::spawn(async move {
        application
            .run_until(async {
                let _ = stopped.await;
            })
            .await
            .expect("server runs");
    });
    let endpoint = match tls {
        None => Channel::from_shared(format!("http://{addr}")).unwrap(),
        Some(tls) => Channel::from_shared(format!("https://{addr}"))
            .unwrap()
            .tls_config(tls)
            .unwrap(),
    };
    let channel = endpoint.connect().await.expect("client connects");
    let db_config: tokio_postgres::Config = match &config.database_url {
        Some(url) => url.parse().unwrap(),
        None => {
            let socket = config.data_dir.join("run");
            format!(
                "host={} user=postgres dbname={}",
                socket.display(),
                users_service::app::EMBEDDED_DATABASE
            )
            .parse()
            .unwrap()
        }
    };
    let (db, connection) = db_config.connect(NoTls).await.expect("test db connection");
    tokio::spawn(connection);
    let admin_token = read_admin_key(&config.data_dir).await;
    let bearer = Bearer::new(Some(&admin_token));
    TestApp {
        addr,
        clock,
        metrics_addr,
        health_addr,
        users: UsersServiceClient::with_interceptor(channel.clone(), bearer.clone()),
        tenants: TenantsServiceClient::with_interceptor(channel.clone(), bearer),
        channel,
        admin_token,
        config,
        db,
        db_config,
        database: String::new(),
        stop: Some(stop),
        handle: Some(handle),
    }
}

/// The bootstrap admin token; a replica that started beside another may see
/// the file a moment after its own start.
async fn read_admin_key(data_dir: &std::path::Path) -> String {
    let path = data_dir.join(keys::ADMIN_KEY_FILE);
    for _ in 0..50 {
        if let Ok(token) = std::fs::read_to_string(&path) {
            return token.trim().to_owned();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("no admin key in {}", path.display());
}

impl TestApp {
    /// A UsersService client that sends `token` (or no credentials).
    pub fn users_as(&self, token: Option<&str>) -> Users {
        UsersServiceClient::with_interceptor(self.channel.clone(), Bearer::new(token))
    }

    /// A TenantsService client that sends `token` (or no credentials).
    pub fn tenants_as(&self, token: Option<&str>) -> Tenants {
        TenantsServiceClient::with_interceptor(self.channel.clone(), Bearer::new(token))
    }

    /// Creates an API key in the app's database; returns its token.
    pub async fn create_key(
        &self,
        role: Role,
        tenant: Option<uuid::Uuid>,
        rate_limit: Option<u32>,
    ) -> String {
        create_key(&self.db_config, role, tenant, rate_limit).await
    }

    /// Stops the server gracefully and waits for it.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(handle) = self.handle.take() {
            handle.await.expect("server task");
        }
    }

    /// The id of the default tenant, as the database holds it.
    pub async fn default_tenant(&self) -> String {
        let row = self
            .db
            .query_one("SELECT id::text FROM tenants WHERE is_default", &[])
            .await
            .unwrap();
        row.get(0)
    }

    /// Number of rows in `users`.
    pub async fn user_count(&self) -> i64 {
        self.db
            .query_one("SELECT count(*) FROM users", &[])
            .await
            .unwrap()
            .get(0)
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if !self.database.is_empty() {
            drop_database(&self.database);
        }
    }
}

/// The `google.rpc.BadRequest` field names of a status, sorted.
pub fn violated_fields(status: &tonic::Status) -> Vec<String> {
    use tonic_types::StatusExt;
    let details = status.get_error_details();
    let mut fields: Vec<String> = details
        .bad_request()
        .map(|b| b.field_violations.iter().map(|v| v.field.clone()).collect())
        .unwrap_or_default();
    fields.sort();
    fields
}

/// The `google.rpc.ErrorInfo` of a status: (reason, metadata).
pub fn error_info(
    status: &tonic::Status,
) -> Option<(String, std::collections::HashMap<String, String>)> {
    use tonic_types::StatusExt;
    status
        .get_error_details()
        .error_info()
        .map(|info| (info.reason.clone(), info.metadata.clone()))
}

/// A codec that sends and receives message bytes as they are, to call the
/// server with requests no generated client would encode.
#[derive(Debug, Clone, Copy, Default)]
pub struct RawCodec;

#[derive(Debug, Clone, Copy, Default)]
pub struct RawCoder;

impl tonic::codec::Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCoder;
    type Decoder = RawCoder;

    fn encoder(&mut self) -> RawCoder {
        RawCoder
    }

    fn decoder(&mut self) -> RawCoder {
        RawCoder
    }
}

impl tonic::codec::Encoder for RawCoder {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn encode(
        &mut self,
        item: Vec<u8>,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        use bytes::BufMut;
        dst.put_slice(&item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawCoder {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<Vec<u8>>, tonic::Status> {
        use bytes::Buf;
        let mut bytes = vec![0; src.remaining()];
        src.copy_to_slice(&mut bytes);
        Ok(Some(bytes))
    }
}

/// Calls the unary method at `path` (`/users.v1.UsersService/GetUser`) with
/// `message` as the encoded request; the encoded response or the status.
pub async fn raw_call(
    channel: &Channel,
    token: Option<&str>,
    path: &'static str,
    message: Vec<u8>,
) -> Result<Vec<u8>, tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let mut request = tonic::Request::new(message);
    if let Some(token) = token {
        request.metadata_mut().insert(
            "authorization",
            format!("Bearer {token}").parse().expect("ASCII token"),
        );
    }
    grpc.unary(
        request,
        http::uri::PathAndQuery::from_static(path),
        RawCodec,
    )
    .await
    .map(tonic::Response::into_inner)
}

/// A server program of the test's own (nats-server, redis-server) on a free
/// port of 127.0.0.1; killed when dropped.
pub struct ChildServer {
    pub port: u16,
    program: String,
    args: Vec<String>,
    process: Option<std::process::Child>,
}

impl ChildServer {
    /// Starts `program` with `args(port)` on a free port; waits until it
    /// accepts connections.
    pub fn start(program: &str, args: impl FnOnce(u16) -> Vec<String>) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut server = Self {
            port,
            program: program.to_owned(),
            args: args(port),
            process: None,
        };
        server.restart();
        server
    }

    pub fn stop(&mut self) {
        if let Some(mut process) = self.process.take() {
            let _ = process.kill();
            let _ = process.wait();
        }
    }

    /// (Re)starts the program on the same port with the same arguments;
    /// waits until it accepts connections.
    pub fn restart(&mut self) {
        self.stop();
        let process = std::process::Command::new(&self.program)
            .args(&self.args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("{} starts (install Debian's package): {e}", self.program));
        self.process = Some(process);
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("{} does not listen on {}", self.program, self.port);
    }
}

impl Drop for ChildServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A `redis-server` on a port of its own that keeps nothing on disk;
/// killed when dropped.
pub fn redis_server() -> ChildServer {
    ChildServer::start("redis-server", |port| {
        [
            "--bind",
            "127.0.0.1",
            "--port",
            &port.to_string(),
            "--save",
            "",
            "--appendonly",
            "no",
            "--enable-debug-command",
            "local",
        ]
        .map(String::from)
        .to_vec()
    })
}

/// The text of a `/metrics` endpoint.
pub async fn scrape(addr: std::net::SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: metrics\r\n\r\n")
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    assert!(
        response.starts_with("HTTP/1.0 200") || response.starts_with("HTTP/1.1 200"),
        "{response}"
    );
    response
}

/// Creates an API key in the database of `config`; its token.
pub async fn create_key(
    config: &tokio_postgres::Config,
    role: users_service::auth::Role,
    tenant: Option<uuid::Uuid>,
    rate_limit: Option<u32>,
) -> String {
    let (client, connection) = config.connect(NoTls).await.unwrap();
    let mut conn =
        diesel_async::AsyncPgConnection::try_from_client_and_connection(client, connection)
            .await
            .unwrap();
    let spec = users_service::auth::keys::KeySpec {
        role,
        tenant,
        name: "test",
        rate_limit: rate_limit.and_then(std::num::NonZeroU32::new),
        expire_time: None,
        client_name: None,
    };
    let (_, token) = users_service::auth::keys::create(&mut conn, spec, chrono::Utc::now())
        .await
        .unwrap();
    token.reveal()
}
