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
use tonic::transport::Channel;
use users_service::{
    app::Application,
    config::Config,
    pb::v1::{
        tenants_service_client::TenantsServiceClient, users_service_client::UsersServiceClient,
    },
    store::{
        db,
        embedded::{self, EmbeddedPostgres},
    },
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
    let root = std::env::temp_dir().join("users-service-tests");
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
        let pid = name.split('-').nth(1).and_then(|p| p.parse::<u32>().ok());
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
    EmbeddedPostgres::start(dir, embedded::Options { settings })
        .await
        .expect("embedded postgres starts")
}

/// Settings for a test server: port 0, a small pool, short timeouts.
pub fn test_config(database_url: Option<String>) -> Config {
    let mut config = Config::with_defaults();
    config.listen = "127.0.0.1:0".parse().unwrap();
    config.database_url = database_url;
    config.db_pool_size = Some(4);
    config.db_connect_timeout = Duration::from_secs(2);
    config.db_acquire_timeout = Duration::from_secs(2);
    config.shutdown_grace = Duration::from_secs(2);
    config
}

/// A running server with clients, and a connection to its database to check
/// what it holds.
pub struct TestApp {
    pub addr: SocketAddr,
    pub users: UsersServiceClient<Channel>,
    pub tenants: TenantsServiceClient<Channel>,
    pub db: tokio_postgres::Client,
    pub database: String,
    stop: Option<oneshot::Sender<()>>,
    handle: Option<JoinHandle<()>>,
}

/// Starts a server on a fresh database cloned from the template.
pub async fn spawn_app() -> TestApp {
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
    let mut app = spawn_with(test_config(Some(server.url(&name)))).await;
    app.database = name;
    app
}

/// Starts a server with `config`.
pub async fn spawn_with(config: Config) -> TestApp {
    let application = Application::build(&config)
        .await
        .expect("application builds");
    let addr = application.local_addr();
    let (stop, stopped) = oneshot::channel::<()>();
    let handle = tokio::spawn(async move {
        application
            .run_until(async {
                let _ = stopped.await;
            })
            .await
            .expect("server runs");
    });
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .expect("client connects");
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
    TestApp {
        addr,
        users: UsersServiceClient::new(channel.clone()),
        tenants: TenantsServiceClient::new(channel),
        db,
        database: String::new(),
        stop: Some(stop),
        handle: Some(handle),
    }
}

impl TestApp {
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
        if self.database.is_empty() {
            return;
        }
        // Drop the test database from a thread with its own runtime: Drop
        // cannot await, and the test's runtime may be shutting down.
        let url = server().config("postgres");
        let name = self.database.clone();
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
