//! The service over gRPC against the same work as raw SQL on the same
//! Postgres, with the same concurrency. Method and latest results: BENCHMARKS.md.
//!
//! ```sh
//! cargo bench --bench service                # full run (10k and 1M users)
//! cargo bench --bench service -- --quick     # smoke run: 10k users, short scenarios
//! ```
//!
//! Options: `--calls N` concurrent calls (64), `--connections M` HTTP/2
//! connections (4), `--seconds S` per run, `--pool P` database connections of
//! the server and of the raw side (the server's default, 2 x cores, at least 4),
//! `--keep` to keep the database, `--standby-self` to have writes answer with
//! their consistency token (an A/B of its cost), `--only get,create,update,safe,bulk,feed,lists,search,counts,platform` to
//! run some scenario groups (`feed` is `watch` and `outbox`: the change feed's
//! delivery latency and the cost of its triggers); `--watchers W` and
//! `--feed-rate R` for the delivery run (16 WatchUsers streams, 2000 changes/s). `BENCH_SERVER` is a server binary to run instead of
//! this build's (for A/B runs against another commit). `BENCH_DATABASE_URL` (default
//! `postgres://postgres@127.0.0.1:5432/postgres`) is the server to use; each run
//! creates and drops its own database there.

use std::{
    collections::BTreeMap,
    future::Future,
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use chrono::{DateTime, Utc};
use tokio::sync::{Semaphore, SemaphorePermit};
use tokio_postgres::{Client as PgClient, NoTls, Statement};
use tonic::{Request, metadata::AsciiMetadataValue, transport::Channel};
use users_service::pb::v1::{
    self as pb, batch_upsert_users_result::Outcome, users_service_client::UsersServiceClient,
};
use uuid::Uuid;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

const COLUMNS: &str = "tenant_id, id, reference, email, phone, first_name, last_name, locale, \
                       timezone, is_opted_in, active, custom_data, avatar_url, created_at, updated_at, \
                       delete_time, expire_time, updated_by";
const PAGE: i64 = 50;
/// The order by last name as people read it (the service's collation).
const BY_LAST_NAME: &str = "ORDER BY last_name COLLATE \"und-x-icu\", id LIMIT 50";
const BATCH: usize = 1000;
/// `total_count_limit` of the bounded-count scenario.
const COUNT_LIMIT: i32 = 10_000;
/// Users of the small tenant and of the large one.
const SMALL: i64 = 10_000;
const LARGE: i64 = 1_000_000;

/// The service over gRPC against raw SQL on the same Postgres.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "service")]
struct Options {
    /// Smoke run: 10k users only, short scenarios (1 s each); with
    /// `--only sweep`, under a minute.
    #[arg(long)]
    quick: bool,
    /// Concurrent calls.
    #[arg(long, default_value_t = 64)]
    calls: usize,
    /// HTTP/2 connections the calls share.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Seconds per run [default: 8, or 1 with --quick].
    #[arg(long)]
    seconds: Option<f64>,
    /// Database connections of the server and of the raw side [default: the
    /// server's default, 2 x cores, at least 4].
    #[arg(long)]
    pool: Option<usize>,
    /// Keep the database afterwards.
    #[arg(long)]
    keep: bool,
    /// Scenario groups to run (lists, search, get, create, update, safe,
    /// bulk, sweep, feed, counts, transfer; sweep is GetUser, CreateUser and
    /// UpdateUser at 1, 4, 16 and 64 calls at a time and ListUsers pages at
    /// 16 and 64 against raw statements on one connection per call;
    /// transfer is ExportUsers, export and import against their targets
    /// with 100 watchers open; feed is watch and outbox, its two halves; counts
    /// is the total from the counters and what their triggers cost the
    /// writes; platform is GetUser with tracing exported and over TLS,
    /// each against the plain server); all when not given.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// WatchUsers streams of the change feed's delivery run.
    #[arg(long, default_value_t = 16)]
    watchers: usize,
    /// Changes per second the writers of the delivery run make.
    #[arg(long, default_value_t = 2000.0)]
    feed_rate: f64,
    /// Give the server its own database as a standby
    /// (`--database-replica-url`): writes then answer with their
    /// consistency token, and reads stay on the primary (a server not in
    /// recovery is not read from). For an A/B of what the token costs.
    #[arg(long)]
    standby_self: bool,
    /// A B pairs per compared scenario [default: 3, or 2 with --quick]; more
    /// on a machine whose speed drifts.
    #[arg(long)]
    pairs: Option<usize>,
    /// Passed by `cargo bench` to harness-less benchmarks.
    #[arg(long, hide = true)]
    bench: bool,
}

impl Options {
    /// How long each run lasts.
    fn run(&self) -> Duration {
        Duration::from_secs_f64(self.seconds.unwrap_or(if self.quick { 1.0 } else { 8.0 }))
    }

    fn pool(&self) -> usize {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        self.pool.unwrap_or((cores * 2).max(4))
    }

    /// Whether the scenario group `name` is part of this run.
    fn runs(&self, name: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|o| o == name)
    }
}

// ---------------------------------------------------------------- samples

/// The calls of one run: latencies, errors by code, wall time.
#[derive(Debug, Default, Clone)]
struct Sample {
    latencies: Vec<Duration>,
    errors: BTreeMap<String, u64>,
    elapsed: Duration,
    /// Users per call (1000 for BatchUpsertUsers), for users/s.
    per_call: u64,
}

impl Sample {
    /// Successful calls per second.
    fn rate(&self) -> f64 {
        let failed: u64 = self.errors.values().sum();
        (self.latencies.len() as f64 - failed as f64) / self.elapsed.as_secs_f64().max(1e-9)
    }

    fn merge(&mut self, other: Sample) {
        self.latencies.extend(other.latencies);
        for (code, n) in other.errors {
            *self.errors.entry(code).or_default() += n;
        }
        self.latencies.sort_unstable();
        self.elapsed += other.elapsed;
        self.per_call = other.per_call;
    }

    /// The latency at quantile `q` (the latencies are kept sorted).
    fn quantile(&self, q: f64) -> Duration {
        let Some(last) = self.latencies.len().checked_sub(1) else {
            return Duration::ZERO;
        };
        self.latencies[((last as f64) * q).round() as usize]
    }

    fn errors(&self) -> String {
        if self.errors.is_empty() {
            return "-".to_owned();
        }
        let parts: Vec<_> = self
            .errors
            .iter()
            .map(|(c, n)| format!("{c}:{n}"))
            .collect();
        parts.join(" ")
    }
}

/// Runs `calls` workers that call `call(worker, n)` in a loop for `run`.
async fn drive<F, Fut>(calls: usize, run: Duration, call: F) -> Sample
where
    F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), String>> + Send,
{
    let call = Arc::new(call);
    let counter = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let deadline = started + run;
    let workers: Vec<_> = (0..calls)
        .map(|worker| {
            let (call, counter) = (Arc::clone(&call), Arc::clone(&counter));
            tokio::spawn(async move {
                let mut sample = Sample::default();
                while Instant::now() < deadline {
                    let n = counter.fetch_add(1, Ordering::Relaxed);
                    let start = Instant::now();
                    let result = call(worker, n).await;
                    sample.latencies.push(start.elapsed());
                    if let Err(code) = result {
                        *sample.errors.entry(code).or_default() += 1;
                    }
                }
                sample
            })
        })
        .collect();
    let mut total = Sample::default();
    for worker in workers {
        total.merge(worker.await.expect("worker panicked"));
    }
    total.elapsed = started.elapsed();
    total.per_call = 1;
    total
}

// ---------------------------------------------------------------- the two sides

/// gRPC clients over M HTTP/2 connections, with the admin key.
#[derive(Clone)]
struct Service {
    clients: Arc<Vec<UsersServiceClient<Channel>>>,
    auth: AsciiMetadataValue,
    /// The server's address, for clients of their own (the feed's watchers).
    endpoint: String,
}

impl Service {
    fn client(&self, worker: usize) -> UsersServiceClient<Channel> {
        self.clients[worker % self.clients.len()].clone()
    }

    fn request<T>(&self, message: T) -> Request<T> {
        let mut request = Request::new(message);
        request
            .metadata_mut()
            .insert("authorization", self.auth.clone());
        request
    }
}

fn code(status: tonic::Status) -> String {
    format!("{:?}", status.code())
}

fn sql_code(error: tokio_postgres::Error) -> String {
    error
        .code()
        .map_or_else(|| "connection".to_owned(), |c| c.code().to_owned())
}

/// A pool of connections with prepared statements, checked out one call at a time.
struct Raw {
    idle: Mutex<Vec<Arc<Conn>>>,
    permits: Semaphore,
}

struct Conn {
    client: PgClient,
    get: Statement,
    insert: Statement,
    update: Statement,
    first_page: Statement,
    after: Statement,
    by_last_name: Statement,
    by_last_name_after: Statement,
    offset: Statement,
    count: Statement,
    count_up_to: Statement,
}

struct Lease<'a> {
    raw: &'a Raw,
    conn: Option<Arc<Conn>>,
    _permit: SemaphorePermit<'a>,
}

impl std::ops::Deref for Lease<'_> {
    type Target = Conn;
    fn deref(&self) -> &Conn {
        self.conn.as_ref().expect("leased")
    }
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            self.raw.idle.lock().expect("pool lock").push(conn);
        }
    }
}

impl Raw {
    async fn open(config: &tokio_postgres::Config, size: usize) -> Result<Self, BoxError> {
        let mut idle = Vec::with_capacity(size);
        for _ in 0..size {
            let client = connect(config).await?;
            // The service leaves deleted users out: so does the raw side.
            let list =
                format!("SELECT {COLUMNS} FROM users WHERE tenant_id = $1 AND delete_time IS NULL");
            let order = "ORDER BY created_at, id LIMIT 50";
            idle.push(Arc::new(Conn {
                get: client
                    .prepare(&format!(
                        "SELECT {COLUMNS} FROM users WHERE id = $1 AND delete_time IS NULL"
                    ))
                    .await?,
                insert: client
                    .prepare(&format!(
                        "INSERT INTO users (tenant_id, id, reference, email, first_name, last_name, \
                         locale, created_at, updated_at) \
                         VALUES ($1, $2, $3, $4, $5, $6, 'en-US', now(), now()) RETURNING {COLUMNS}"
                    ))
                    .await?,
                update: client
                    .prepare(&format!(
                        "UPDATE users SET first_name = $2, updated_at = now() \
                         WHERE id = $1 AND delete_time IS NULL RETURNING {COLUMNS}"
                    ))
                    .await?,
                first_page: client.prepare(&format!("{list} {order}")).await?,
                after: client
                    .prepare(&format!("{list} AND (created_at, id) > ($2, $3) {order}"))
                    .await?,
                by_last_name: client.prepare(&format!("{list} {BY_LAST_NAME}")).await?,
                by_last_name_after: client
                    .prepare(&format!(
                        "{list} AND (last_name COLLATE \"und-x-icu\", id) > ($2, $3) {BY_LAST_NAME}"
                    ))
                    .await?,
                offset: client.prepare(&format!("{list} {order} OFFSET $2")).await?,
                count: client
                    .prepare(
                        "SELECT count(*) FROM users WHERE tenant_id = $1 AND delete_time IS NULL",
                    )
                    .await?,
                count_up_to: client
                    .prepare(
                        "SELECT count(*) FROM (SELECT 1 FROM users \
                         WHERE tenant_id = $1 AND delete_time IS NULL LIMIT $2) m",
                    )
                    .await?,
                client,
            }));
        }
        Ok(Self {
            idle: Mutex::new(idle),
            permits: Semaphore::new(size),
        })
    }

    async fn lease(&self) -> Lease<'_> {
        let permit = self.permits.acquire().await.expect("pool open");
        let conn = self.idle.lock().expect("pool lock").pop();
        Lease {
            raw: self,
            conn,
            _permit: permit,
        }
    }
}

async fn connect(config: &tokio_postgres::Config) -> Result<PgClient, BoxError> {
    let (client, connection) = config.connect(NoTls).await?;
    tokio::spawn(connection);
    Ok(client)
}

// ---------------------------------------------------------------- the server

struct Server {
    child: Child,
    data_dir: PathBuf,
    /// Where the server serves `/metrics`.
    metrics: std::net::SocketAddr,
    /// The bench database, as its backends name it in their process titles.
    database: String,
}

impl Server {
    /// The server of the run; `tag` names its data directory, `extra` are
    /// flags of its own (another variant of the server beside it).
    fn start(
        url: &str,
        options: &Options,
        port: u16,
        metrics: std::net::SocketAddr,
        tag: &str,
        extra: &[String],
    ) -> Result<Self, BoxError> {
        let data_dir =
            std::env::temp_dir().join(format!("users-bench-{}{tag}", std::process::id()));
        std::fs::create_dir_all(&data_dir)?;
        let log = std::fs::File::create(data_dir.join("server.log"))?;
        // BENCH_SERVER runs another build of the server (an A/B against an
        // earlier commit) with the same driver.
        let binary = std::env::var_os("BENCH_SERVER")
            .unwrap_or_else(|| env!("CARGO_BIN_EXE_users-service").into());
        let child = Command::new(binary)
            .args(["--rate-limit-per-second", "0", "--database-url", url])
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--data-dir")
            .arg(&data_dir)
            .arg("--db-pool-size")
            .arg(options.pool().to_string())
            .arg("--metrics-listen")
            .arg(metrics.to_string())
            .args(
                options
                    .standby_self
                    .then_some(["--database-replica-url", url])
                    .into_iter()
                    .flatten(),
            )
            .args(extra)
            .env_remove("DATABASE_URL")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()?;
        Ok(Self {
            child,
            data_dir,
            metrics,
            database: url::Url::parse(url)?
                .path()
                .trim_start_matches('/')
                .to_owned(),
        })
    }

    /// The server's `/metrics` text.
    async fn metrics_text(&self) -> Result<String, BoxError> {
        fetch_metrics(self.metrics).await
    }

    /// Per kind of shared statement: calls served and statements run, from
    /// the server's `users_service_db_batch_items` histogram.
    async fn batches(&self) -> Result<Vec<(String, f64, f64)>, BoxError> {
        let text = self.metrics_text().await?;
        let value = |name: &str, batch: &str| {
            text.lines()
                .find(|l| l.starts_with(name) && l.contains(&format!("batch=\"{batch}\"")))
                .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        };
        Ok(["get_user", "create_user"]
            .into_iter()
            .filter_map(|batch| {
                let items = value("users_service_db_batch_items_sum", batch)?;
                let statements = value("users_service_db_batch_items_count", batch)?;
                Some((batch.to_owned(), items, statements))
            })
            .collect())
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// VmHWM: the most resident memory the process ever had.
    fn peak_rss_kib(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).ok()?;
        let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
        line.split_whitespace().nth(1)?.parse().ok()
    }

    fn stop(mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.data_dir);
    }
}

/// The `/metrics` text served at `at`.
async fn fetch_metrics(at: std::net::SocketAddr) -> Result<String, BoxError> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(at).await?;
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: bench\r\n\r\n")
        .await?;
    let mut text = String::new();
    stream.read_to_string(&mut text).await?;
    Ok(text)
}

async fn wait_ready(
    server: &mut Server,
    port: u16,
    options: &Options,
    tls: Option<&tonic::transport::ClientTlsConfig>,
) -> Result<Service, BoxError> {
    let deadline = Instant::now() + Duration::from_secs(120);
    let key = server.data_dir.join("admin.key");
    loop {
        if let Some(status) = server.child.try_wait()? {
            return Err(format!(
                "the server exited ({status}); see {}",
                server.data_dir.join("server.log").display()
            )
            .into());
        }
        if Instant::now() > deadline {
            return Err("the server did not start within 120 s".into());
        }
        let ready = async {
            let token = std::fs::read_to_string(&key).ok()?;
            let scheme = if tls.is_some() { "https" } else { "http" };
            let endpoint = format!("{scheme}://127.0.0.1:{port}");
            let mut clients = Vec::new();
            for _ in 0..options.connections {
                let mut channel = Channel::from_shared(endpoint.clone()).ok()?;
                if let Some(tls) = tls {
                    channel = channel.tls_config(tls.clone()).ok()?;
                }
                let channel = channel.connect().await.ok()?;
                clients.push(UsersServiceClient::new(channel));
            }
            let auth = format!("Bearer {}", token.trim()).parse().ok()?;
            Some(Service {
                clients: Arc::new(clients),
                auth,
                endpoint,
            })
        };
        if let Some(service) = ready.await {
            return Ok(service);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

// ---------------------------------------------------------------- data

/// Loads `count` users into a new tenant with one SQL statement; returns the
/// tenant id. The rows obey the service's rules: unique references and
/// emails, E.164 phones, canonical locale and time zone, an object as custom
/// data, distinct creation times.
///
/// Loads without change events: the feed's triggers would write an event
/// per user (the 1M insert took 35 s with them instead of 18 s), and the
/// server's feed reader would then read and convert them all while the list
/// scenarios run. `session_replication_role = replica` (the bench connects
/// as superuser) skips every trigger, the tenant's foreign key check
/// included, for this connection only; the tenant's user counts, which
/// triggers keep, are counted afterwards ([`recount`]).
async fn load_tenant(db: &PgClient, name: &str, count: i64) -> Result<Uuid, BoxError> {
    let tenant = Uuid::now_v7();
    db.execute(
        "INSERT INTO tenants (id, name, reference) VALUES ($1, $2, $2)",
        &[&tenant, &name],
    )
    .await?;
    db.batch_execute("SET synchronous_commit = off; SET session_replication_role = replica")
        .await?;
    db.execute(
        "INSERT INTO users (tenant_id, id, reference, email, phone, first_name, last_name, \
           locale, timezone, is_opted_in, active, custom_data, avatar_url, created_at, updated_at) \
         SELECT $1, uuid_v7, $2 || '-' || g, $2 || '.user' || g || '@bench.example', \
           '+1555' || lpad((g % 10000000)::text, 7, '0'), 'First' || g, 'Last' || g, \
           'en-US', 'Europe/Berlin', g % 2 = 0, true, '{}', '', \
           timestamptz '2026-01-01 00:00:00+00' + g * interval '1 millisecond', \
           timestamptz '2026-01-01 00:00:00+00' + g * interval '1 millisecond' \
         FROM generate_series(1, $3::bigint) AS g, \
           LATERAL (SELECT md5($2 || g) AS hash) AS h, \
           LATERAL (SELECT (lpad(to_hex(1767225600000 + g), 12, '0') || '7' || substr(hash, 1, 3) \
             || '8' || substr(hash, 4, 15))::uuid AS uuid_v7) AS v",
        &[&tenant, &name, &count],
    )
    .await?;
    // Steady state: statistics and the visibility map, as autovacuum leaves them.
    db.batch_execute("SET synchronous_commit = on; RESET session_replication_role")
        .await?;
    recount(db, tenant).await?;
    db.batch_execute("VACUUM ANALYZE users").await?;
    // The load's dirty pages written out now rather than during the runs.
    db.batch_execute("CHECKPOINT").await?;
    Ok(tenant)
}

fn tenant_filter(tenant: Uuid) -> Option<pb::UserFilter> {
    Some(pb::UserFilter {
        tenant_id: Some(pb::StringFilter {
            equal_to: Some(tenant.to_string()),
            ..Default::default()
        }),
        ..Default::default()
    })
}

fn list_request(tenant: Uuid, page_token: &str, offset: i32, count: bool) -> pb::ListUsersRequest {
    pb::ListUsersRequest {
        limit: Some(PAGE as i32),
        offset,
        filter: tenant_filter(tenant),
        page_token: page_token.to_owned(),
        skip_total_count: !count,
        ..Default::default()
    }
}

/// Page `page` (1-based, at least 2) of a tenant by token: the token (the
/// next-page token of page `page - 1`, fetched by offset), and the cursor
/// (created_at, id) the raw side continues after.
async fn page_token(
    service: &Service,
    db: &PgClient,
    tenant: Uuid,
    page: i64,
) -> Result<(String, DateTime<Utc>, Uuid), BoxError> {
    let offset = i32::try_from((page - 2) * PAGE)?;
    let response = service
        .client(0)
        .list_users(service.request(list_request(tenant, "", offset, false)))
        .await?;
    let token = response.into_inner().next_page_token;
    let row = db
        .query_one(
            "SELECT created_at, id FROM users WHERE tenant_id = $1 \
             ORDER BY created_at, id OFFSET $2 LIMIT 1",
            &[&tenant, &((page - 1) * PAGE - 1)],
        )
        .await?;
    Ok((token, row.get(0), row.get(1)))
}

// ---------------------------------------------------------------- report

struct Row {
    scenario: String,
    service: Sample,
    raw: Option<Sample>,
    /// Median of the per-pair ratios (A B A B runs), when alternated.
    ratio: Option<f64>,
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

fn print_table(rows: &[Row]) {
    if rows.is_empty() {
        return;
    }
    println!("\n| scenario | side | calls/s | users/s | p50 | p99 | max | errors | service/raw |");
    println!("|---|---|---:|---:|---:|---:|---:|---|---:|");
    for row in rows {
        let ratio = row.ratio.or_else(|| {
            let raw = row.raw.as_ref()?;
            Some(row.service.rate() / raw.rate())
        });
        for (side, sample) in [("service", Some(&row.service)), ("raw", row.raw.as_ref())] {
            let Some(s) = sample else { continue };
            println!(
                "| {} | {side} | {:.0} | {:.0} | {} | {} | {} | {} | {} |",
                row.scenario,
                s.rate(),
                s.rate() * s.per_call as f64,
                ms(s.quantile(0.5)),
                ms(s.quantile(0.99)),
                ms(s.quantile(1.0)),
                s.errors(),
                match (side, ratio) {
                    ("service", Some(r)) => format!("{r:.2}x"),
                    _ => String::new(),
                },
            );
        }
    }
}

/// Alternating service (A) and raw (B) runs of one scenario.
#[derive(Debug, Default)]
struct Pairs {
    service: Sample,
    raw: Sample,
    ratios: Vec<f64>,
}

impl Pairs {
    fn add(&mut self, service: Sample, raw: Sample) {
        self.ratios.push(service.rate() / raw.rate());
        self.service.merge(service);
        self.raw.merge(raw);
    }

    /// Both sides' runs together, and the median of the pair ratios.
    fn row(self, scenario: String) -> Row {
        Row {
            scenario,
            service: self.service,
            raw: Some(self.raw),
            ratio: Some(median(self.ratios)),
        }
    }
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

// ---------------------------------------------------------------- main

fn main() -> Result<(), BoxError> {
    let options = <Options as clap::Parser>::parse();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(bench(options))
}

async fn bench(options: Options) -> Result<(), BoxError> {
    let base_url = std::env::var("BENCH_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned());
    let mut url = url::Url::parse(&base_url)?;
    let database = format!("users_bench_{}", std::process::id());
    url.set_path(&database);
    let maintenance = connect(&base_url.parse()?).await?;
    maintenance
        .batch_execute(&format!("DROP DATABASE IF EXISTS {database}"))
        .await?;

    let free = || std::net::TcpListener::bind("127.0.0.1:0")?.local_addr();
    let port = free()?.port();
    let mut server = Server::start(url.as_str(), &options, port, free()?, "", &[])?;
    let result = match wait_ready(&mut server, port, &options, None).await {
        Ok(service) => run(&options, &service, url.as_str(), &server).await,
        Err(e) => Err(e),
    };
    server.stop();
    if !options.keep {
        maintenance
            .batch_execute(&format!("DROP DATABASE IF EXISTS {database} WITH (FORCE)"))
            .await?;
    }
    result
}

/// What every scenario shares: the two sides, the data, the pace.
struct Bench<'a> {
    options: &'a Options,
    service: &'a Service,
    raw: Arc<Raw>,
    db: PgClient,
    /// The tenant of 10,000 users that reads and updates pick from.
    small: Uuid,
    /// The tenant that creates go to.
    writes: Uuid,
    /// Spreads the n-th call over the small tenant's users.
    pick: Arc<dyn Fn(u64) -> Uuid + Send + Sync>,
    calls: usize,
    run: Duration,
    /// A B pairs per compared scenario.
    pairs: usize,
}

async fn run(
    options: &Options,
    service: &Service,
    url: &str,
    server: &Server,
) -> Result<(), BoxError> {
    let pg: tokio_postgres::Config = url.parse()?;
    let db = connect(&pg).await?;
    let raw = Arc::new(Raw::open(&pg, options.pool()).await?);
    let (calls, run) = (options.calls, options.run());
    eprintln!(
        "users-service benchmark: {calls} concurrent calls over {} HTTP/2 connections, pool {}, {:.1} s per run",
        options.connections,
        options.pool(),
        run.as_secs_f64()
    );
    let mut rows = Vec::new();
    let mut notes = Vec::new();

    let started = Instant::now();
    let small = load_tenant(&db, "bench10k", SMALL).await?;
    notes.push(format!(
        "loaded 10k users in {:.1} s",
        started.elapsed().as_secs_f64()
    ));
    let writes = load_tenant(&db, "benchwrites", 0).await?;
    let ids: Vec<Uuid> = db
        .query("SELECT id FROM users WHERE tenant_id = $1", &[&small])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let bench = Bench {
        options,
        service,
        raw,
        db,
        small,
        writes,
        pick: Arc::new(move |n: u64| {
            ids[(n.wrapping_mul(2_654_435_761) % ids.len() as u64) as usize]
        }),
        calls,
        run,
        pairs: options
            .pairs
            .unwrap_or(if options.quick { 2 } else { 3 })
            .max(1),
    };

    // Lists at 10k: the first page, and the last full page (200) by token.
    if options.runs("lists") {
        list_scenarios(
            &mut rows,
            options,
            service,
            &bench.raw,
            &bench.db,
            bench.small,
            "10k",
            200,
            false,
        )
        .await?;
    }
    if options.runs("search") {
        query_scenarios(
            &mut rows,
            options,
            service,
            &pg,
            bench.small,
            SMALL,
            "10k",
            150,
        )
        .await?;
    }
    if options.runs("get") {
        rows.push(get_user(&bench, bench.calls, &bench.raw).await);
    }
    for (scenario, group) in [("CreateUser", "create"), ("UpdateUser", "update")] {
        if options.runs(group) {
            rows.push(write_users(&bench, scenario, bench.calls, &bench.raw).await);
        }
    }
    if options.runs("safe") {
        rows.extend(safe_writes(&bench).await);
    }
    let bulk_speedup = if options.runs("bulk") {
        let (single, bulk, speedup) = bulk(&bench).await;
        rows.extend([single, bulk]);
        Some(speedup)
    } else {
        None
    };
    let mut sections = Vec::new();
    if options.runs("sweep") {
        sections.push(sweep(&bench, &pg).await?);
    }
    if ["feed", "watch", "outbox"].iter().any(|g| options.runs(g)) {
        sections.push(feed(&bench, server).await?);
    }
    // Users in bulk at 10k in a quick run; at 1M below otherwise.
    if options.quick && options.runs("transfer") {
        sections.push(transfer(&bench, &pg, bench.small, SMALL, "10k").await?);
    }
    if options.runs("counts") {
        counts(&bench, url, &mut rows, &mut notes).await?;
    }
    if options.runs("platform") {
        sections.push(platform(&bench, url, server).await?);
    }
    // Lists at 1M; the rows of the write scenarios go first, without
    // events either (a purge event per user, and their earlier events
    // erased), as in `load_tenant`.
    if !options.quick
        && ["lists", "search", "sweep", "transfer"]
            .iter()
            .any(|g| options.runs(g))
    {
        bench
            .db
            .batch_execute("SET session_replication_role = replica")
            .await?;
        bench
            .db
            .execute("DELETE FROM users WHERE tenant_id = $1", &[&bench.writes])
            .await?;
        bench
            .db
            .batch_execute("RESET session_replication_role")
            .await?;
        eprintln!("loading 1M users");
        let started = Instant::now();
        let large = load_tenant(&bench.db, "bench1m", LARGE).await?;
        notes.push(format!(
            "loaded 1M users in {:.1} s",
            started.elapsed().as_secs_f64()
        ));
        if options.runs("lists") {
            list_scenarios(
                &mut rows, options, service, &bench.raw, &bench.db, large, "1M", 1000, true,
            )
            .await?;
        }
        if options.runs("search") {
            query_scenarios(&mut rows, options, service, &pg, large, LARGE, "1M", 1500).await?;
        }
        if options.runs("sweep") {
            let raw = Arc::new(Raw::open(&pg, LIST_LEVELS[LIST_LEVELS.len() - 1]).await?);
            let mut section = Section::default();
            section
                .lines
                .push("The list sweep at 1M users (as above):".into());
            section.lines.push(String::new());
            section.lines.extend(SWEEP_HEADER.map(String::from));
            list_sweep(&bench, &raw, large, "1M", 1000, &mut section).await?;
            sections.push(section);
        }
        if options.runs("transfer") {
            sections.push(transfer(&bench, &pg, large, LARGE, "1M").await?);
        }
    }
    report(&rows, notes, server, calls, bulk_speedup, sections).await
}

/// GetUser on the server as run (A) against the same build beside it (B):
/// once exporting a span per call and per statement over OTLP to a
/// collector of the bench's own, once over TLS; A B A B at 1, 16 and 64
/// calls at a time, on the same database.
async fn platform(bench: &Bench<'_>, url: &str, main: &Server) -> Result<Section, BoxError> {
    let options = bench.options;
    let (collector, spans) = span_counter().await?;
    let dir = std::env::temp_dir().join(format!("users-bench-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let client_tls = test_certificates(&dir)?;
    let free = || std::net::TcpListener::bind("127.0.0.1:0")?.local_addr();
    let file = |name: &str| dir.join(name).display().to_string();
    let variants = [
        (
            "tracing on",
            "-traced",
            vec!["--otlp-endpoint".to_owned(), format!("http://{collector}")],
            None,
        ),
        (
            "TLS",
            "-tls",
            vec![
                "--tls-cert".to_owned(),
                file("server.crt"),
                "--tls-key".to_owned(),
                file("server.key"),
            ],
            Some(client_tls),
        ),
    ];
    let mut section = Section::default();
    section.lines.push(format!(
        "GetUser with tracing on and over TLS: A is the server as run (plaintext, no \
         --otlp-endpoint), B the same build beside it on the same database; {} pairs \
         of {:.1} s runs, B/A the median of the pairs' ratios:",
        bench.pairs,
        bench.run.as_secs_f64()
    ));
    section.lines.push(String::new());
    section.lines.push(
        "| B | calls at a time | A calls/s | B calls/s | B/A | A p50 | B p50 | A p99 | B p99 | A server CPU µs/call | B server CPU µs/call | B/A CPU |"
            .into(),
    );
    section
        .lines
        .push("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|".into());
    for (label, tag, extra, tls) in variants {
        let port = free()?.port();
        let mut server = Server::start(url, options, port, free()?, tag, &extra)?;
        // The database has its keys already: the variant makes none.
        std::fs::copy(
            main.data_dir.join("admin.key"),
            server.data_dir.join("admin.key"),
        )?;
        let variant = match wait_ready(&mut server, port, options, tls.as_ref()).await {
            Ok(variant) => variant,
            Err(e) => {
                server.stop();
                return Err(e);
            }
        };
        for calls in [1, 16, 64] {
            eprintln!("GetUser, {label}, {calls} calls at a time");
            let (mut a, mut b, mut ratios) = (Sample::default(), Sample::default(), Vec::new());
            // The servers' own CPU time, for what each call costs them
            // apart from the client's and the collector's share of the
            // cores.
            let (mut a_ticks, mut b_ticks) = (0, 0);
            for _ in 0..bench.pairs {
                let before = process_ticks(main.pid());
                let sa = get_users(bench.service, bench, calls).await;
                a_ticks += process_ticks(main.pid()) - before;
                let before = process_ticks(server.pid());
                let sb = get_users(&variant, bench, calls).await;
                b_ticks += process_ticks(server.pid()) - before;
                ratios.push(sb.rate() / sa.rate());
                a.merge(sa);
                b.merge(sb);
            }
            let per_call = |ticks: u64, sample: &Sample| {
                ticks as f64 / TICKS_PER_SECOND * 1e6 / sample.latencies.len().max(1) as f64
            };
            let (a_cpu, b_cpu) = (per_call(a_ticks, &a), per_call(b_ticks, &b));
            section.lines.push(format!(
                "| {label} | {calls} | {:.0} | {:.0} | {:.2} | {} | {} | {} | {} | {a_cpu:.0} | {b_cpu:.0} | {:.2} |",
                a.rate(),
                b.rate(),
                median(ratios),
                ms(a.quantile(0.5)),
                ms(b.quantile(0.5)),
                ms(a.quantile(0.99)),
                ms(b.quantile(0.99)),
                b_cpu / a_cpu,
            ));
            for (side, sample) in [("A", &a), ("B", &b)] {
                if !sample.errors.is_empty() {
                    section
                        .lines
                        .push(format!("  ({label} {side} errors: {})", sample.errors()));
                }
            }
        }
        server.stop();
    }
    section.lines.push(String::new());
    section.lines.push(format!(
        "Spans the collector received from the traced server: {}.",
        spans.load(Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    Ok(section)
}

/// The CPU time a process has used, in ticks of [`TICKS_PER_SECOND`].
fn process_ticks(pid: u32) -> u64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0;
    };
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or("", |(_, rest)| rest)
        .split_whitespace()
        .collect();
    let field = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // After the name: utime is the 12th field, stime the 13th.
    field(11) + field(12)
}

/// GetUser calls of random users through `service` for one run.
async fn get_users(service: &Service, bench: &Bench<'_>, calls: usize) -> Sample {
    let (service, pick) = (service.clone(), Arc::clone(&bench.pick));
    drive(calls, bench.run, move |w, n| {
        let (service, id) = (service.clone(), pick(n));
        async move {
            let request = service.request(pb::GetUserRequest {
                id: id.to_string(),
                ..Default::default()
            });
            service
                .client(w)
                .get_user(request)
                .await
                .map(drop)
                .map_err(code)
        }
    })
    .await
}

/// An OTLP collector that counts the spans it receives; its address. It
/// stands in for a collector that would run apart from the service, yet
/// shares the machine's cores with the server and the client here: it finds
/// the spans in a request without decoding what each one holds.
async fn span_counter() -> Result<(std::net::SocketAddr, Arc<AtomicU64>), BoxError> {
    /// ExportTraceServiceRequest, down to its spans, each left encoded.
    #[derive(Clone, PartialEq, prost::Message)]
    struct Export {
        #[prost(message, repeated, tag = "1")]
        resource_spans: Vec<ResourceSpans>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    struct ResourceSpans {
        #[prost(message, repeated, tag = "2")]
        scope_spans: Vec<ScopeSpans>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    struct ScopeSpans {
        #[prost(bytes = "bytes", repeated, tag = "2")]
        spans: Vec<bytes::Bytes>,
    }
    #[derive(Clone)]
    struct Counter(Arc<AtomicU64>);
    impl tonic::server::NamedService for Counter {
        const NAME: &'static str = "opentelemetry.proto.collector.trace.v1.TraceService";
    }
    impl tonic::server::UnaryService<Export> for Counter {
        // An empty ExportTraceServiceResponse.
        type Response = ();
        type Future = std::future::Ready<Result<tonic::Response<()>, tonic::Status>>;
        fn call(&mut self, request: Request<Export>) -> Self::Future {
            let spans: usize = request
                .get_ref()
                .resource_spans
                .iter()
                .flat_map(|r| &r.scope_spans)
                .map(|s| s.spans.len())
                .sum();
            self.0.fetch_add(spans as u64, Ordering::Relaxed);
            std::future::ready(Ok(tonic::Response::new(())))
        }
    }
    impl tower::Service<http::Request<tonic::body::Body>> for Counter {
        type Response = http::Response<tonic::body::Body>;
        type Error = std::convert::Infallible;
        type Future = std::pin::Pin<
            Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>,
        >;
        fn poll_ready(
            &mut self,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Result<(), Self::Error>> {
            std::task::Poll::Ready(Ok(()))
        }
        fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
            let counter = self.clone();
            Box::pin(async move {
                let mut grpc =
                    tonic::server::Grpc::new(tonic_prost::ProstCodec::<(), Export>::default());
                Ok(grpc.unary(counter, request).await)
            })
        }
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let spans = Arc::new(AtomicU64::new(0));
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(Counter(Arc::clone(&spans)))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    Ok((addr, spans))
}

/// A CA and a certificate for localhost in `dir` (server.crt, server.key);
/// the client's TLS settings that trust the CA.
fn test_certificates(dir: &std::path::Path) -> Result<tonic::transport::ClientTlsConfig, BoxError> {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(DnType::CommonName, "bench CA");
    let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate()?)?;
    let key = KeyPair::generate()?;
    let cert = CertificateParams::new(vec!["localhost".to_owned()])?.signed_by(&key, &ca)?;
    std::fs::write(dir.join("server.crt"), cert.pem())?;
    std::fs::write(dir.join("server.key"), key.serialize_pem())?;
    Ok(tonic::transport::ClientTlsConfig::new()
        .domain_name("localhost")
        .ca_certificate(tonic::transport::Certificate::from_pem(ca.pem())))
}

/// GetUser of a random user against the raw lookup, A B A B: a single pair
/// varies by +-15%.
async fn get_user(bench: &Bench<'_>, calls: usize, raw: &Arc<Raw>) -> Row {
    eprintln!("GetUser, {calls} calls at a time");
    let run = bench.run;
    let mut runs = Pairs::default();
    for _ in 0..bench.pairs {
        let s = get_users(bench.service, bench, calls).await;
        let r = {
            let (raw, pick) = (Arc::clone(raw), Arc::clone(&bench.pick));
            drive(calls, run, move |_, n| {
                let (raw, id) = (Arc::clone(&raw), pick(n));
                async move {
                    let c = raw.lease().await;
                    c.client
                        .query_one(&c.get, &[&id])
                        .await
                        .map(drop)
                        .map_err(sql_code)
                }
            })
            .await
        };
        runs.add(s, r);
    }
    runs.row(format!("GetUser by id (A B x{})", bench.pairs))
}

/// A prefix of references and emails that no other run of this process
/// uses.
fn unique_prefix() -> String {
    static RUNS: AtomicU64 = AtomicU64::new(0);
    format!(
        "{}-{}",
        std::process::id(),
        RUNS.fetch_add(1, Ordering::Relaxed)
    )
}

/// CreateUser or UpdateUser against the raw statement, A B A B, median of
/// the pair ratios.
async fn write_users(bench: &Bench<'_>, scenario: &str, calls: usize, raw: &Arc<Raw>) -> Row {
    eprintln!("{scenario}, {calls} calls at a time");
    let (service, run) = (bench.service, bench.run);
    let writes = bench.writes;
    let mut runs = Pairs::default();
    for _ in 0..bench.pairs {
        let prefix = unique_prefix();
        let s = if scenario == "CreateUser" {
            create_users(service, calls, run, format!("s{prefix}"), writes).await
        } else {
            let (service, pick) = (service.clone(), Arc::clone(&bench.pick));
            drive(calls, run, move |w, n| {
                let (service, id) = (service.clone(), pick(n));
                async move {
                    let request = service.request(pb::UpdateUserRequest {
                        id: id.to_string(),
                        user: Some(pb::UserUpdate {
                            first_name: Some(format!("Name{n}")),
                            ..Default::default()
                        }),
                        ..Default::default()
                    });
                    service
                        .client(w)
                        .update_user(request)
                        .await
                        .map(drop)
                        .map_err(code)
                }
            })
            .await
        };
        let r = if scenario == "CreateUser" {
            let (raw, prefix) = (Arc::clone(raw), format!("r{prefix}"));
            drive(calls, run, move |_, n| {
                let raw = Arc::clone(&raw);
                let (reference, email) = (
                    format!("{prefix}-{n}"),
                    format!("{prefix}-{n}@bench.example"),
                );
                async move {
                    let c = raw.lease().await;
                    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 6] = [
                        &writes,
                        &Uuid::now_v7(),
                        &reference,
                        &email,
                        &"Ada",
                        &"Lovelace",
                    ];
                    c.client
                        .query_one(&c.insert, &params)
                        .await
                        .map(drop)
                        .map_err(sql_code)
                }
            })
            .await
        } else {
            let (raw, pick) = (Arc::clone(raw), Arc::clone(&bench.pick));
            drive(calls, run, move |_, n| {
                let (raw, id) = (Arc::clone(&raw), pick(n));
                async move {
                    let c = raw.lease().await;
                    let name = format!("Name{n}");
                    c.client
                        .query_one(&c.update, &[&id, &name])
                        .await
                        .map(drop)
                        .map_err(sql_code)
                }
            })
            .await
        };
        runs.add(s, r);
    }
    runs.row(format!("{scenario} (A B x{})", bench.pairs))
}

/// What a request id and an etag cost, A B A B: CreateUser with a request
/// id (A) against without (B), and UpdateUser with an etag, and with an
/// etag and a request id (A), against without either (B). Each update worker changes a user of its own,
/// carrying the etag of its last answer, so no etag is ever stale.
async fn safe_writes(bench: &Bench<'_>) -> Vec<Row> {
    eprintln!("request ids and etags");
    let (service, calls, run, writes) = (bench.service, bench.calls, bench.run, bench.writes);
    let run_id = std::process::id();
    let mut creates = Pairs::default();
    for pair in 0..bench.pairs {
        let with = create_users_with(
            service,
            calls,
            run,
            format!("i{run_id}-{pair}"),
            writes,
            true,
        )
        .await;
        let without = create_users_with(
            service,
            calls,
            run,
            format!("n{run_id}-{pair}"),
            writes,
            false,
        )
        .await;
        creates.add(with, without);
    }
    let mut etags = Vec::with_capacity(calls);
    for w in 0..calls {
        let id = (bench.pick)(w as u64).to_string();
        let request = service.request(pb::GetUserRequest {
            id: id.clone(),
            ..Default::default()
        });
        let user = service
            .client(w)
            .get_user(request)
            .await
            .expect("a bench user")
            .into_inner()
            .user
            .expect("a user");
        etags.push(std::sync::Mutex::new((id, user.etag)));
    }
    let etags = Arc::new(etags);
    // Per pair: etag and request id, etag only, neither.
    let (mut both, mut etag_only) = (Pairs::default(), Pairs::default());
    for _ in 0..bench.pairs {
        let mut samples = Vec::new();
        for (etag, request_id) in [(true, true), (true, false), (false, false)] {
            let (service, etags) = (service.clone(), Arc::clone(&etags));
            samples.push(
                drive(calls, run, move |w, n| {
                    let (service, etags) = (service.clone(), Arc::clone(&etags));
                    let (id, current) = etags[w].lock().unwrap().clone();
                    async move {
                        let request = service.request(pb::UpdateUserRequest {
                            id,
                            user: Some(pb::UserUpdate {
                                first_name: Some(format!("Name{n}")),
                                ..Default::default()
                            }),
                            etag: if etag { current } else { String::new() },
                            request_id: if request_id {
                                Uuid::new_v4().to_string()
                            } else {
                                String::new()
                            },
                        });
                        let user = service
                            .client(w)
                            .update_user(request)
                            .await
                            .map_err(code)?
                            .into_inner()
                            .user
                            .unwrap_or_default();
                        etags[w].lock().unwrap().1 = user.etag;
                        Ok(())
                    }
                })
                .await,
            );
        }
        let [with_both, with_etag, without]: [Sample; 3] = samples.try_into().expect("three runs");
        etag_only.add(with_etag, without.clone());
        both.add(with_both, without);
    }
    vec![
        creates.row(format!(
            "requestId: CreateUser with (A) vs without (B) (A B x{})",
            bench.pairs
        )),
        etag_only.row(format!(
            "etag: UpdateUser with (A) vs without (B) (A B x{})",
            bench.pairs
        )),
        both.row(format!(
            "etag + requestId: UpdateUser with (A) vs without (B) (A B x{})",
            bench.pairs
        )),
    ]
}

/// BatchUpsertUsers of 1000 new users per call, against CreateUser calls at
/// the same concurrency, A B A B: the rows of both and the median speedup
/// (users per second), with the concurrency.
async fn bulk(bench: &Bench<'_>) -> (Row, Row, (usize, f64)) {
    let (service, writes, run) = (bench.service, bench.writes, bench.run);
    let bulk_calls = bench.calls.min(bench.options.pool() * 2);
    let run_id = std::process::id();
    eprintln!("BatchUpsertUsers and CreateUser, {bulk_calls} calls");
    let (mut singles, mut bulks, mut ratios) = (Sample::default(), Sample::default(), Vec::new());
    for pair in 0..bench.pairs {
        let single = create_users(
            service,
            bulk_calls,
            run,
            format!("c{run_id}-{pair}"),
            writes,
        )
        .await;
        let bulk = bulk_upserts(
            service,
            bulk_calls,
            run,
            format!("b{run_id}-{pair}"),
            writes,
        )
        .await;
        ratios.push(bulk.rate() * BATCH as f64 / single.rate());
        singles.merge(single);
        bulks.merge(bulk);
    }
    let pairs = bench.pairs;
    (
        Row {
            scenario: format!("CreateUser, {bulk_calls} calls (A B x{pairs} with bulk)"),
            service: singles,
            raw: None,
            ratio: None,
        },
        Row {
            scenario: format!("BatchUpsertUsers x1000, {bulk_calls} calls (A B x{pairs})"),
            service: bulks,
            raw: None,
            ratio: None,
        },
        (bulk_calls, median(ratios)),
    )
}

/// Prints the table, the notes and the targets.
async fn report(
    rows: &[Row],
    mut notes: Vec<String>,
    server: &Server,
    calls: usize,
    bulk_speedup: Option<(usize, f64)>,
    sections: Vec<Section>,
) -> Result<(), BoxError> {
    let peak = server.peak_rss_kib();
    for (batch, items, statements) in server.batches().await? {
        notes.push(format!(
            "{batch}: {items:.0} calls served by {statements:.0} statements, {:.1} per statement",
            items / statements.max(1.0)
        ));
    }
    print_table(rows);
    println!();
    for note in &notes {
        println!("- {note}");
    }
    let peak_mib = peak.map(|kib| kib as f64 / 1024.0);
    println!(
        "- server peak RSS (VmHWM): {}",
        peak_mib.map_or("unknown".to_owned(), |m| format!("{m:.1} MiB"))
    );

    // Targets.
    let rate = |name: &str| rows.iter().find(|r| r.scenario.starts_with(name));
    let mut targets: Vec<Target> = Vec::new();
    let ratio_of = |row: Option<&Row>| {
        row.and_then(|r| {
            r.ratio
                .or_else(|| Some(r.service.rate() / r.raw.as_ref()?.rate()))
        })
    };
    let get = ratio_of(rate("GetUser"));
    targets.push((
        "GetUser >= 0.6x raw".into(),
        get.map(|r| r >= 0.6),
        fmt_opt(get, "x"),
    ));
    let create = ratio_of(rate("CreateUser"));
    targets.push((
        "CreateUser >= 0.8x raw".into(),
        create.map(|r| r >= 0.8),
        fmt_opt(create, "x"),
    ));
    for page in ["first page", "page by token"] {
        let p50 = |size: &str| {
            rows.iter()
                .find(|r| {
                    r.scenario.ends_with(size)
                        && r.scenario.starts_with(&format!("ListUsers {page}"))
                })
                .map(|r| r.service.quantile(0.5).as_secs_f64())
        };
        let (small, large) = (p50("10k"), p50("1M"));
        let ratio = small.zip(large).map(|(s, l)| l / s);
        targets.push((
            format!("ListUsers {page}: p50 at 1M <= 1.5x p50 at 10k"),
            ratio.map(|r| r <= 1.5),
            fmt_opt(ratio, "x"),
        ));
    }
    let search = |size: &str| {
        rows.iter()
            .find(|r| {
                r.scenario.ends_with(size)
                    && r.scenario
                        .starts_with("ListUsers search, first page, skipTotalCount")
            })
            .map(|r| r.service.quantile(0.5).as_secs_f64())
    };
    let (small, large) = (search("10k"), search("1M"));
    targets.push((
        "ListUsers search, first page: p50 at 1M <= 20 ms".into(),
        large.map(|l| l <= 0.020),
        fmt_opt(large.map(|l| l * 1e3), " ms"),
    ));
    let ratio = small.zip(large).map(|(s, l)| l / s);
    targets.push((
        "ListUsers search, first page: p50 at 1M <= 2x p50 at 10k".into(),
        ratio.map(|r| r <= 2.0),
        fmt_opt(ratio, "x"),
    ));
    let bulk_rate = rate("BatchUpsertUsers").map(|r| r.service.rate() * BATCH as f64);
    targets.push((
        "bulk >= 20,000 users/s".into(),
        bulk_rate.map(|r| r >= 20_000.0),
        fmt_opt(bulk_rate, " users/s"),
    ));
    let bulk_calls = bulk_speedup.map_or(0, |(calls, _)| calls);
    targets.push((
        format!("bulk >= 5x single CreateUser, both {bulk_calls} calls (median of A/B pairs)"),
        bulk_speedup.map(|(_, r)| r >= 5.0),
        fmt_opt(bulk_speedup.map(|(_, r)| r), "x"),
    ));
    // For the record: against CreateUser at the full concurrency, where the
    // service itself folds concurrent creates into shared statements.
    let single = rate("CreateUser (").map(|r| r.service.rate());
    if let Some((bulk, single)) = bulk_rate.zip(single) {
        println!(
            "- bulk / CreateUser at {calls} calls: {bulk:.0} / {single:.0} users/s = {:.2}x",
            bulk / single
        );
    }
    targets.push((
        "peak RSS <= 64 MiB".into(),
        peak_mib.map(|m| m <= 64.0),
        fmt_opt(peak_mib, " MiB"),
    ));
    for section in sections {
        println!();
        for line in &section.lines {
            println!("{line}");
        }
        targets.extend(section.targets);
    }
    println!("\n| target | measured | result |\n|---|---:|---|");
    for (target, pass, measured) in targets {
        let result = match pass {
            Some(true) => "PASS",
            Some(false) => "MISS",
            None => "not measured",
        };
        println!("| {target} | {measured} | {result} |");
    }
    Ok(())
}

/// CreateUser of new users in `tenant`, `calls` at once for `run`.
async fn create_users(
    service: &Service,
    calls: usize,
    run: Duration,
    prefix: String,
    tenant: Uuid,
) -> Sample {
    create_users_with(service, calls, run, prefix, tenant, false).await
}

/// [`create_users`], each call with a new request id when `request_ids`.
async fn create_users_with(
    service: &Service,
    calls: usize,
    run: Duration,
    prefix: String,
    tenant: Uuid,
    request_ids: bool,
) -> Sample {
    let service = service.clone();
    drive(calls, run, move |w, n| {
        let service = service.clone();
        let user = pb::User {
            reference: format!("{prefix}-{n}"),
            email: format!("{prefix}-{n}@bench.example"),
            first_name: "Ada".into(),
            last_name: "Lovelace".into(),
            tenant_id: tenant.to_string(),
            ..Default::default()
        };
        async move {
            let request = service.request(pb::CreateUserRequest {
                user: Some(user),
                request_id: if request_ids {
                    Uuid::new_v4().to_string()
                } else {
                    String::new()
                },
            });
            service
                .client(w)
                .create_user(request)
                .await
                .map(drop)
                .map_err(code)
        }
    })
    .await
}

/// BatchUpsertUsers of [`BATCH`] new users in `tenant` per call, `calls` at
/// once for `run`. A call with any item refused counts as an error.
async fn bulk_upserts(
    service: &Service,
    calls: usize,
    run: Duration,
    prefix: String,
    tenant: Uuid,
) -> Sample {
    let service = service.clone();
    let mut sample = drive(calls, run, move |w, n| {
        let service = service.clone();
        let users: Vec<_> = (0..BATCH)
            .map(|i| pb::User {
                reference: format!("{prefix}-{n}-{i}"),
                email: format!("{prefix}-{n}-{i}@bench.example"),
                first_name: "Ada".into(),
                tenant_id: tenant.to_string(),
                ..Default::default()
            })
            .collect();
        async move {
            let request = service.request(pb::BatchUpsertUsersRequest {
                users,
                ..Default::default()
            });
            let results = service
                .client(w)
                .batch_upsert_users(request)
                .await
                .map_err(code)?
                .into_inner()
                .results;
            let refused = results
                .iter()
                .filter(|r| !matches!(r.outcome, Some(Outcome::User(_))))
                .count();
            if results.len() != BATCH || refused > 0 {
                return Err(format!("{refused}_items_refused"));
            }
            Ok(())
        }
    })
    .await;
    sample.per_call = BATCH as u64;
    sample
}

fn fmt_opt(value: Option<f64>, unit: &str) -> String {
    value.map_or_else(|| "-".to_owned(), |v| format!("{v:.2}{unit}"))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Case {
    First,
    Token,
    Count,
    CountUpTo,
    Offset,
}

/// ListUsers of one tenant, 50 rows by createdAt: the first page, page
/// `deep` by token and, with `costs`, the first page with totalCount and
/// page `deep` by OFFSET.
#[allow(clippy::too_many_arguments)]
async fn list_scenarios(
    rows: &mut Vec<Row>,
    options: &Options,
    service: &Service,
    raw: &Arc<Raw>,
    db: &PgClient,
    tenant: Uuid,
    size: &str,
    deep: i64,
    costs: bool,
) -> Result<(), BoxError> {
    let (calls, run) = (options.calls, options.run());
    let (token, after_time, after_id) = page_token(service, db, tenant, deep).await?;
    // Both sides must read the same page.
    let page = service
        .client(0)
        .list_users(service.request(list_request(tenant, &token, 0, false)))
        .await?
        .into_inner()
        .data;
    let first: Uuid = db
        .query_one(
            "SELECT id FROM users WHERE tenant_id = $1 AND (created_at, id) > ($2, $3) \
             ORDER BY created_at, id LIMIT 1",
            &[&tenant, &after_time, &after_id],
        )
        .await?
        .get(0);
    if page.first().map(|u| u.id.as_str()) != Some(first.to_string().as_str()) {
        return Err(format!("page {deep} differs between the service and raw SQL").into());
    }
    let offset = (deep - 1) * PAGE;
    let mut cases = vec![(Case::First, ""), (Case::Token, token.as_str())];
    if costs {
        cases.extend([(Case::Count, ""), (Case::CountUpTo, ""), (Case::Offset, "")]);
    }
    for (case, token) in cases {
        let (name, count) = match case {
            Case::First => ("first page", false),
            Case::Token => ("page by token", false),
            Case::Count => ("first page + totalCount", true),
            Case::CountUpTo => ("first page + totalCount up to 10,000", true),
            Case::Offset => ("page by OFFSET", false),
        };
        let offset = if case == Case::Offset { offset } else { 0 };
        eprintln!("ListUsers {name} at {size}");
        let request = pb::ListUsersRequest {
            total_count_limit: (case == Case::CountUpTo).then_some(COUNT_LIMIT),
            ..list_request(tenant, token, offset as i32, count)
        };
        let s = {
            let service = service.clone();
            drive(calls, run, move |w, _| {
                let (service, request) = (service.clone(), request.clone());
                async move {
                    let response = service
                        .client(w)
                        .list_users(service.request(request))
                        .await
                        .map_err(code)?;
                    let page = response.into_inner();
                    if page.data.len() != PAGE as usize {
                        return Err("short_page".into());
                    }
                    if case == Case::CountUpTo && !page.total_count_capped {
                        return Err("count_not_capped".into());
                    }
                    Ok(())
                }
            })
            .await
        };
        let r = {
            let raw = Arc::clone(raw);
            drive(calls, run, move |_, _| {
                let raw = Arc::clone(&raw);
                async move {
                    let c = raw.lease().await;
                    let rows = match case {
                        Case::Count => {
                            c.client
                                .query_one(&c.count, &[&tenant])
                                .await
                                .map_err(sql_code)?;
                            c.client.query(&c.first_page, &[&tenant]).await
                        }
                        Case::CountUpTo => {
                            let limit = i64::from(COUNT_LIMIT) + 1;
                            c.client
                                .query_one(&c.count_up_to, &[&tenant, &limit])
                                .await
                                .map_err(sql_code)?;
                            c.client.query(&c.first_page, &[&tenant]).await
                        }
                        Case::First => c.client.query(&c.first_page, &[&tenant]).await,
                        Case::Token => {
                            c.client
                                .query(&c.after, &[&tenant, &after_time, &after_id])
                                .await
                        }
                        Case::Offset => c.client.query(&c.offset, &[&tenant, &offset]).await,
                    };
                    match rows.map_err(sql_code)?.len() {
                        50 => Ok(()),
                        _ => Err("short_page".into()),
                    }
                }
            })
            .await
        };
        let page = if matches!(case, Case::First | Case::Count | Case::CountUpTo) {
            1
        } else {
            deep
        };
        rows.push(Row {
            scenario: format!("ListUsers {name} (page {page}) at {size}"),
            service: s,
            raw: Some(r),
            ratio: None,
        });
    }
    Ok(())
}

/// `search` and the order people read, one call at a time (an admin
/// browsing): the first page of 50 for a term, and a page by token deep in
/// a list ordered by last name.
///
/// The terms identify one user, as a person would search for someone: the
/// number in the names of the bench's users (`First<n>`, `Last<n>`,
/// `<tenant>.user<n>@...`), taken from the top nine tenths of the tenant so
/// that it is no part of another user's number (4 digits at 10k, 6 at 1M).
/// The last scenario searches whole last names (`Last4242`, which is in
/// 111 last names at 1M): every user of the bench has the trigrams of
/// `Last`, and a trigram index reads the whole list of users of every
/// trigram of the term, so it shows what a term mostly made of trigrams
/// that every user has costs.
#[allow(clippy::too_many_arguments)]
async fn query_scenarios(
    rows: &mut Vec<Row>,
    options: &Options,
    service: &Service,
    pg: &tokio_postgres::Config,
    tenant: Uuid,
    users: i64,
    size: &str,
    deep: i32,
) -> Result<(), BoxError> {
    // The number of a user in the top nine tenths, spread by a prime step.
    let term = move |n: u64| (users / 10 + (n as i64 * 7919) % (users - users / 10)).to_string();
    const WHOLE_NAMES: [&str; 8] = [
        "Last4242", "last1234", "LAST9876", "Last5555", "last3141", "Last2718", "last1618",
        "Last8080",
    ];
    let run = options.run();
    let by_last_name = vec![pb::UserOrder {
        field: pb::UserOrderField::LastName.into(),
        direction: pb::SortDirection::Asc.into(),
    }];
    let ordered = move |page_token: String, offset: i32| pb::ListUsersRequest {
        limit: Some(PAGE as i32),
        offset,
        filter: tenant_filter(tenant),
        order: by_last_name.clone(),
        page_token,
        skip_total_count: true,
        ..Default::default()
    };
    let token = service
        .client(0)
        .list_users(service.request(ordered(String::new(), (deep - 1) * PAGE as i32)))
        .await?
        .into_inner()
        .next_page_token;
    // The raw side of a search: the statement the service sends, prepared
    // on a connection of its own, and planned for each term (a generic plan
    // cannot tell a rare term from a common one).
    let raw = Arc::new(connect(pg).await?);
    raw.batch_execute("SET plan_cache_mode = force_custom_plan")
        .await?;
    let raw_search = raw
        .prepare(&format!(
            "SELECT {COLUMNS} FROM users WHERE tenant_id = $1 AND delete_time IS NULL \
             AND (email || E'\\n' || first_name || E'\\n' || last_name) ILIKE $2 \
             AND (email ILIKE $2 OR first_name ILIKE $2 OR last_name ILIKE $2) \
             ORDER BY created_at, id LIMIT {}",
            PAGE + 1
        ))
        .await?;
    type Request = Box<dyn Fn(u64) -> pb::ListUsersRequest + Send + Sync>;
    type Term = Arc<dyn Fn(u64) -> String + Send + Sync>;
    let whole_name = |n: u64| WHOLE_NAMES[n as usize % WHOLE_NAMES.len()].to_owned();
    let cases: [(String, Request, Option<Term>); 4] = [
        (
            format!("ListUsers search, first page, skipTotalCount, 1 call at a time, at {size}"),
            Box::new(move |n| pb::ListUsersRequest {
                limit: Some(PAGE as i32),
                filter: tenant_filter(tenant),
                search: term(n),
                skip_total_count: true,
                ..Default::default()
            }),
            Some(Arc::new(term)),
        ),
        (
            format!("ListUsers search, first page + totalCount, 1 call at a time, at {size}"),
            Box::new(move |n| pb::ListUsersRequest {
                limit: Some(PAGE as i32),
                filter: tenant_filter(tenant),
                search: term(n),
                ..Default::default()
            }),
            None,
        ),
        (
            format!(
                "ListUsers by lastName, page {} by token, 1 call at a time, at {size}",
                deep + 1
            ),
            Box::new(move |_| ordered(token.clone(), 0)),
            None,
        ),
        (
            format!(
                "ListUsers search for a whole last name, first page, skipTotalCount, 1 call at a time, at {size}"
            ),
            Box::new(move |n| pb::ListUsersRequest {
                limit: Some(PAGE as i32),
                filter: tenant_filter(tenant),
                search: whole_name(n),
                skip_total_count: true,
                ..Default::default()
            }),
            Some(Arc::new(whole_name)),
        ),
    ];
    for (scenario, request, raw_term) in cases {
        eprintln!("{scenario}");
        let request = Arc::new(request);
        let service = service.clone();
        let sample = drive(1, run, move |w, n| {
            let (service, request) = (service.clone(), Arc::clone(&request));
            async move {
                service
                    .client(w)
                    .list_users(service.request(request(n)))
                    .await
                    .map_err(code)?;
                Ok(())
            }
        })
        .await;
        let raw_sample = match raw_term {
            Some(raw_term) => {
                let (raw, raw_search) = (Arc::clone(&raw), raw_search.clone());
                Some(
                    drive(1, run, move |_, n| {
                        let (raw, raw_search) = (Arc::clone(&raw), raw_search.clone());
                        // The n-th call's term, as the service's.
                        let pattern = format!("%{}%", raw_term(n));
                        async move {
                            raw.query(&raw_search, &[&tenant, &pattern])
                                .await
                                .map_err(sql_code)?;
                            Ok(())
                        }
                    })
                    .await,
                )
            }
            None => None,
        };
        rows.push(Row {
            scenario,
            service: sample,
            raw: raw_sample,
            ratio: None,
        });
    }
    Ok(())
}

// ---------------------------------------------------------------- the sweep

/// Concurrencies of the sweep: many services each making a few calls at a
/// time, up to the full load of the main table.
const LEVELS: [usize; 4] = [1, 4, 16, 64];

/// GetUser, CreateUser and UpdateUser against their raw statements at each
/// of [`LEVELS`], A B A B, with the raw side on one connection per caller
/// (the best a direct client does with as many connections as calls), and
/// a health check's p50 at one call at a time: what a trivial gRPC call
/// costs, which the single-caller targets allow on top of the raw lookup.
async fn sweep(bench: &Bench<'_>, pg: &tokio_postgres::Config) -> Result<Section, BoxError> {
    let raw = Arc::new(Raw::open(pg, LEVELS[LEVELS.len() - 1]).await?);
    let health = health_check(bench, 1).await?;
    let health_p50 = health.quantile(0.5).as_secs_f64();
    let mut section = Section::default();
    section.lines.push(format!(
        "Sweep ({} s runs, A B x{}; raw: one connection per call at a time, prepared statements). \
         A gRPC health check, 1 call at a time: p50 {}.",
        bench.run.as_secs_f64(),
        bench.pairs,
        ms(health.quantile(0.5))
    ));
    section.lines.push(String::new());
    section.lines.extend(SWEEP_HEADER.map(String::from));
    for calls in LEVELS {
        // The ceiling of any gRPC call at this concurrency on this machine.
        let ceiling = if calls == 1 {
            health.clone()
        } else {
            health_check(bench, calls).await?
        };
        section.lines.push(format!(
            "| health check | {calls} | {} | | {:.0} | | |",
            ms(ceiling.quantile(0.5)),
            ceiling.rate()
        ));
        for scenario in ["GetUser", "CreateUser", "UpdateUser"] {
            // UpdateUser has targets at 16 and 64 only.
            if scenario == "UpdateUser" && calls < 16 {
                continue;
            }
            let row = if scenario == "GetUser" {
                get_user(bench, calls, &raw).await
            } else {
                write_users(bench, scenario, calls, &raw).await
            };
            let raw_sample = row.raw.as_ref().expect("a raw side");
            let ratio = row.ratio.expect("pairs");
            let (p50, raw_p50) = (
                row.service.quantile(0.5).as_secs_f64(),
                raw_sample.quantile(0.5).as_secs_f64(),
            );
            section.lines.push(format!(
                "| {scenario} | {calls} | {} | {} | {:.0} | {:.0} | {ratio:.2}x |",
                ms(row.service.quantile(0.5)),
                ms(raw_sample.quantile(0.5)),
                row.service.rate(),
                raw_sample.rate(),
            ));
            if calls == 1 {
                let bound = 1.1 * (raw_p50 + health_p50);
                section.targets.push((
                    format!(
                        "{scenario} p50 at 1 call at a time <= 1.1 x (raw p50 + health check p50)"
                    ),
                    Some(p50 <= bound),
                    format!("{:.3} ms vs {:.3} ms", p50 * 1e3, bound * 1e3),
                ));
                continue;
            }
            let floor = match (scenario, calls) {
                ("UpdateUser", _) => 0.8,
                (_, 64) => 1.0,
                _ => 0.8,
            };
            section.targets.push((
                format!("{scenario} >= {floor:.1}x raw at {calls} calls at a time"),
                Some(ratio >= floor),
                format!("{ratio:.2}x"),
            ));
        }
    }
    list_sweep(bench, &raw, bench.small, "10k", 200, &mut section).await?;
    Ok(section)
}

/// Streams the bench's watchers hold open during the export.
const IDLE_WATCHERS: usize = 100;

/// Users in bulk, at `size` (`tenant` holds `users`): ExportUsers to a
/// client that reads as fast as it can, and `users-service export` to a
/// file, each with [`IDLE_WATCHERS`] WatchUsers streams open; then
/// `users-service import` of `users` new users against the physical limit,
/// the same rows by multi-row INSERTs (1,000 rows each, as many at a time
/// as the import sends) straight into the same table.
async fn transfer(
    bench: &Bench<'_>,
    pg: &tokio_postgres::Config,
    tenant: Uuid,
    users: i64,
    size: &str,
) -> Result<Section, BoxError> {
    let service = bench.service;
    let mut section = Section::default();
    let binary = std::env::var_os("BENCH_SERVER")
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_users-service").into());
    let token = service
        .auth
        .to_str()?
        .trim_start_matches("Bearer ")
        .to_owned();
    let cli = |command: &str| {
        let mut cli = Command::new(&binary);
        cli.arg(command)
            .args(["--server", &service.endpoint, "--token", &token])
            .env_remove("DATABASE_URL")
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        cli
    };
    let dir = std::env::temp_dir().join(format!("users-bench-transfer-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;

    eprintln!("{IDLE_WATCHERS} watchers, ExportUsers at {size}");
    let mut watchers = Vec::new();
    for _ in 0..IDLE_WATCHERS {
        watchers.push(open_watch(service).await?);
    }
    let started = Instant::now();
    let mut stream = service
        .client(0)
        .export_users(service.request(pb::ExportUsersRequest {
            filter: tenant_filter(tenant),
            ..Default::default()
        }))
        .await?
        .into_inner();
    let mut exported = 0;
    while let Some(chunk) = stream.message().await? {
        exported += chunk.users.len() as i64;
    }
    let export_rate = exported as f64 / started.elapsed().as_secs_f64();
    if exported != users {
        return Err(format!("ExportUsers sent {exported} of {users} users").into());
    }

    eprintln!("users-service export at {size}");
    let file = dir.join("export.jsonl");
    let started = Instant::now();
    let status = cli("export")
        .args(["--tenant", &tenant.to_string(), "--output"])
        .arg(&file)
        .status()?;
    let cli_rate = users as f64 / started.elapsed().as_secs_f64();
    let lines =
        std::io::BufRead::lines(std::io::BufReader::new(std::fs::File::open(&file)?)).count();
    if !status.success() || lines as i64 != users {
        return Err(format!("export: {status}, {lines} of {users} lines").into());
    }
    drop(watchers);

    eprintln!("users-service import of {users} users, and the raw INSERTs");
    let import_tenant = load_tenant(&bench.db, "benchimport", 0).await?;
    let file = dir.join("import.jsonl");
    {
        use std::io::Write;
        let mut out = std::io::BufWriter::new(std::fs::File::create(&file)?);
        for n in 0..users {
            writeln!(
                out,
                r#"{{"tenantId":"{import_tenant}","reference":"imp-{n}","email":"imp{n}@bench.example","firstName":"First{n}","lastName":"Last{n}","locale":"en-US","customData":{{"n":{n}}}}}"#
            )?;
        }
    }
    let started = Instant::now();
    let status = cli("import").arg(&file).status()?;
    let import_rate = users as f64 / started.elapsed().as_secs_f64();
    let imported: i64 = bench
        .db
        .query_one(
            "SELECT count(*) FROM users WHERE tenant_id = $1",
            &[&import_tenant],
        )
        .await?
        .get(0);
    if !status.success() || imported != users {
        return Err(format!("import: {status}, {imported} of {users} users").into());
    }
    let raw_tenant = load_tenant(&bench.db, "benchrawimport", 0).await?;
    let raw_rate = raw_import(pg, raw_tenant, users).await?;
    let _ = std::fs::remove_dir_all(&dir);

    section.lines.push(format!(
        "Users in bulk at {size}: ExportUsers {export_rate:.0} users/s and `users-service export` \
         to a file {cli_rate:.0} users/s, each with {IDLE_WATCHERS} WatchUsers streams open; \
         `users-service import` of {users} users {import_rate:.0} users/s, the same rows by \
         multi-row INSERTs {raw_rate:.0} users/s ({:.2}x).",
        import_rate / raw_rate
    ));
    if users >= LARGE {
        section.targets.extend([
            (
                format!("ExportUsers at {size} >= 200,000 users/s"),
                Some(export_rate >= 200_000.0),
                format!("{export_rate:.0} users/s"),
            ),
            (
                format!("users-service export to a file at {size} >= 100,000 users/s"),
                Some(cli_rate >= 100_000.0),
                format!("{cli_rate:.0} users/s"),
            ),
        ]);
    }
    section.targets.push((
        format!("import of {users} users >= 0.9x the same rows by multi-row INSERTs"),
        Some(import_rate >= 0.9 * raw_rate),
        format!("{:.2}x", import_rate / raw_rate),
    ));
    Ok(section)
}

/// `users` new users of `tenant`, as the import's rows, by INSERTs of 1,000
/// rows each (`unnest` of one array per column, a prepared statement), as
/// many at a time as the import sends: users/s.
async fn raw_import(
    pg: &tokio_postgres::Config,
    tenant: Uuid,
    users: i64,
) -> Result<f64, BoxError> {
    const AT_A_TIME: usize = 4;
    const ROWS: i64 = 1000;
    let mut clients = Vec::new();
    for _ in 0..AT_A_TIME {
        let client = connect(pg).await?;
        let insert = client
            .prepare(
                "INSERT INTO users (tenant_id, id, reference, email, first_name, last_name, \
                 locale, custom_data, created_at, updated_at) \
                 SELECT $1, id, reference, email, first_name, last_name, 'en-US', custom_data, \
                 now(), now() FROM unnest($2::uuid[], $3::text[], $4::text[], $5::text[], \
                 $6::text[], $7::jsonb[]) AS r(id, reference, email, first_name, last_name, custom_data)",
            )
            .await?;
        clients.push((client, insert));
    }
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (client, insert) in clients {
        let next = Arc::clone(&next);
        tasks.push(tokio::spawn(async move {
            loop {
                let first = next.fetch_add(ROWS as u64, Ordering::Relaxed) as i64;
                if first >= users {
                    return Ok::<_, tokio_postgres::Error>(());
                }
                let rows = first..(first + ROWS).min(users);
                let ids: Vec<Uuid> = rows.clone().map(|_| Uuid::now_v7()).collect();
                let references: Vec<String> = rows.clone().map(|n| format!("raw-{n}")).collect();
                let emails: Vec<String> = rows
                    .clone()
                    .map(|n| format!("raw{n}@bench.example"))
                    .collect();
                let first_names: Vec<String> = rows.clone().map(|n| format!("First{n}")).collect();
                let last_names: Vec<String> = rows.clone().map(|n| format!("Last{n}")).collect();
                let data: Vec<serde_json::Value> =
                    rows.map(|n| serde_json::json!({ "n": n })).collect();
                client
                    .execute(
                        &insert,
                        &[
                            &tenant,
                            &ids,
                            &references,
                            &emails,
                            &first_names,
                            &last_names,
                            &data,
                        ],
                    )
                    .await?;
            }
        }));
    }
    for task in tasks {
        task.await??;
    }
    Ok(users as f64 / started.elapsed().as_secs_f64())
}

/// The head of a sweep's table.
const SWEEP_HEADER: [&str; 2] = [
    "| call | calls at a time | service p50 | raw p50 | service calls/s | raw calls/s | service/raw (median of pairs) |",
    "|---|---:|---:|---:|---:|---:|---:|",
];

/// The calls at a time of the list sweep.
const LIST_LEVELS: [usize; 2] = [16, 64];

/// ListUsers pages of 50 against the raw statement on one connection per
/// call at a time (`raw`): the first page and page `deep` by token, in the
/// default order and by last name, at 16 and 64 calls at a time (64 only,
/// one pair, in a quick run); the service at least 0.6x raw.
async fn list_sweep(
    bench: &Bench<'_>,
    raw: &Arc<Raw>,
    tenant: Uuid,
    size: &str,
    deep: i64,
    section: &mut Section,
) -> Result<(), BoxError> {
    let service = bench.service;
    for by_last_name in [false, true] {
        let order_name = if by_last_name {
            "by lastName"
        } else {
            "default order"
        };
        let order = if by_last_name {
            vec![pb::UserOrder {
                field: pb::UserOrderField::LastName.into(),
                direction: pb::SortDirection::Asc.into(),
            }]
        } else {
            Vec::new()
        };
        let request = move |page_token: &str, offset: i64| pb::ListUsersRequest {
            order: order.clone(),
            ..list_request(tenant, page_token, offset as i32, false)
        };
        let token = service
            .client(0)
            .list_users(service.request(request("", (deep - 2) * PAGE)))
            .await?
            .into_inner()
            .next_page_token;
        // The raw side continues after the last row of page `deep - 1`.
        let key = if by_last_name {
            "users.last_name COLLATE \"und-x-icu\", users.id"
        } else {
            "users.created_at, users.id"
        };
        let last = bench
            .db
            .query_one(
            &format!(
                "SELECT {key}, (SELECT id FROM users WHERE tenant_id = $1 AND delete_time IS NULL                  ORDER BY {key} OFFSET $2 LIMIT 1) FROM users WHERE tenant_id = $1                  AND delete_time IS NULL ORDER BY {key} OFFSET $3 LIMIT 1"
            ),
            &[&tenant, &((deep - 1) * PAGE), &((deep - 1) * PAGE - 1)],
        )
        .await?;
        let next: Uuid = last.get(2);
        // Both sides must read the same page.
        let page = service
            .client(0)
            .list_users(service.request(request(&token, 0)))
            .await?
            .into_inner()
            .data;
        if page.first().map(|u| u.id.as_str()) != Some(next.to_string().as_str()) {
            return Err(format!("page {deep} {order_name} differs from raw SQL").into());
        }
        let after: (Option<DateTime<Utc>>, Option<String>, Uuid) = if by_last_name {
            (None, Some(last.get(0)), last.get(1))
        } else {
            (Some(last.get(0)), None, last.get(1))
        };
        // A quick run: 64 calls at a time, one pair, to stay under a minute.
        let (levels, pairs) = if bench.options.quick {
            (&LIST_LEVELS[LIST_LEVELS.len() - 1..], 1)
        } else {
            (&LIST_LEVELS[..], bench.pairs)
        };
        for &calls in levels {
            for deep_page in [false, true] {
                let case = if deep_page {
                    format!("page {deep} by token")
                } else {
                    "first page".to_owned()
                };
                eprintln!("ListUsers {case} {order_name} at {size}, {calls} calls at a time");
                let message = request(if deep_page { &token } else { "" }, 0);
                let mut runs = Pairs::default();
                for _ in 0..pairs {
                    let s = {
                        let (service, message) = (service.clone(), message.clone());
                        drive(calls, bench.run, move |w, _| {
                            let (service, message) = (service.clone(), message.clone());
                            async move {
                                let page = service
                                    .client(w)
                                    .list_users(service.request(message))
                                    .await
                                    .map_err(code)?
                                    .into_inner();
                                match page.data.len() {
                                    50 => Ok(()),
                                    _ => Err("short_page".into()),
                                }
                            }
                        })
                        .await
                    };
                    let r = {
                        let (raw, after) = (Arc::clone(raw), after.clone());
                        drive(calls, bench.run, move |_, _| {
                            let (raw, after) = (Arc::clone(&raw), after.clone());
                            async move {
                                let c = raw.lease().await;
                                let rows = match (by_last_name, deep_page) {
                                    (false, false) => {
                                        c.client.query(&c.first_page, &[&tenant]).await
                                    }
                                    (false, true) => {
                                        c.client
                                            .query(&c.after, &[&tenant, &after.0, &after.2])
                                            .await
                                    }
                                    (true, false) => {
                                        c.client.query(&c.by_last_name, &[&tenant]).await
                                    }
                                    (true, true) => {
                                        c.client
                                            .query(
                                                &c.by_last_name_after,
                                                &[&tenant, &after.1, &after.2],
                                            )
                                            .await
                                    }
                                };
                                match rows.map_err(sql_code)?.len() {
                                    50 => Ok(()),
                                    _ => Err("short_page".into()),
                                }
                            }
                        })
                        .await
                    };
                    runs.add(s, r);
                }
                let ratio = median(runs.ratios.clone());
                section.lines.push(format!(
                    "| ListUsers {case}, {order_name}, at {size} | {calls} | {} | {} | {:.0} | {:.0} | {ratio:.2}x |",
                    ms(runs.service.quantile(0.5)),
                    ms(runs.raw.quantile(0.5)),
                    runs.service.rate(),
                    runs.raw.rate(),
                ));
                section.targets.push((
                    format!(
                        "ListUsers {case}, {order_name}, at {size} >= 0.6x raw at {calls} calls at a time"
                    ),
                    Some(ratio >= 0.6),
                    format!("{ratio:.2}x"),
                ));
            }
        }
    }
    Ok(())
}

/// gRPC health checks of the users service, `calls` at a time, for a run,
/// over as many HTTP/2 connections as the users clients.
async fn health_check(bench: &Bench<'_>, calls: usize) -> Result<Sample, BoxError> {
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    eprintln!("health check, {calls} calls at a time");
    let mut clients = Vec::new();
    for _ in 0..bench.service.clients.len() {
        let channel = Channel::from_shared(bench.service.endpoint.clone())?
            .connect()
            .await?;
        clients.push(HealthClient::new(channel));
    }
    let sample = drive(calls, bench.run, move |w, _| {
        let mut client = clients[w % clients.len()].clone();
        async move {
            client
                .check(HealthCheckRequest {
                    service: "users.v1.UsersService".into(),
                })
                .await
                .map(drop)
                .map_err(code)
        }
    })
    .await;
    Ok(sample)
}

// ---------------------------------------------------------------- change feed

/// A row of the report's list of targets: what, passed (`None`: not
/// measured), the measured value.
type Target = (String, Option<bool>, String);

/// What a group measured beside the main table (the feed, the sweep): its
/// tables and notes, printed with the report, and its targets.
#[derive(Default)]
struct Section {
    lines: Vec<String>,
    targets: Vec<Target>,
}

/// The change feed: delivery latency of WatchUsers under a steady stream
/// of changes, then what the outbox triggers cost the writes (A/B).
async fn feed(bench: &Bench<'_>, server: &Server) -> Result<Section, BoxError> {
    let mut feed = Section::default();
    let options = bench.options;
    if options.runs("feed") || options.runs("watch") {
        delivery(bench, server, &mut feed).await?;
    }
    if options.runs("feed") || options.runs("outbox") {
        outbox_cost(bench, server, &mut feed).await?;
    }
    Ok(feed)
}

/// A watch of every change from now, on a connection of its own (as a
/// separate consumer's would be), confirmed: its first response, which
/// has no events, has arrived.
async fn open_watch(
    service: &Service,
) -> Result<tonic::Streaming<pb::WatchUsersResponse>, BoxError> {
    let channel = Channel::from_shared(service.endpoint.clone())?
        .connect()
        .await?;
    let mut stream = UsersServiceClient::new(channel)
        .watch_users(service.request(pb::WatchUsersRequest::default()))
        .await?
        .into_inner();
    let first = stream.message().await?.ok_or("a watch ended at once")?;
    if !first.events.is_empty() {
        return Err("the first response of a watch has events".into());
    }
    Ok(stream)
}

/// One event as a watcher received it; times in microseconds since the
/// epoch, by the machine's clock (the server's `commit_time` too).
#[derive(Debug, Clone, Copy)]
struct Delivery {
    event_id: i64,
    user: Uuid,
    /// The event's `commit_time`: the user's `updated_at`, taken by the
    /// server just before the change's statement.
    commit: i64,
    /// When the response that held it arrived.
    received: i64,
}

/// A change a writer saw succeed: the user, its `updated_at` (the
/// event's `commit_time`), and when the call returned.
type Change = (Uuid, i64, i64);

fn epoch_micros(at: std::time::SystemTime) -> i64 {
    at.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
}

fn timestamp_micros(at: Option<&prost_types::Timestamp>) -> i64 {
    at.map_or(0, |t| t.seconds * 1_000_000 + i64::from(t.nanos) / 1_000)
}

/// Reads a watch stream until `stop`, counting its events into `count`.
async fn collect(
    mut stream: tonic::Streaming<pb::WatchUsersResponse>,
    count: Arc<AtomicU64>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> Result<Vec<Delivery>, String> {
    let mut deliveries = Vec::new();
    loop {
        let message = tokio::select! {
            message = stream.message() => message.map_err(code)?,
            _ = stop.wait_for(|stop| *stop) => return Ok(deliveries),
        };
        let received = epoch_micros(std::time::SystemTime::now());
        let Some(response) = message else {
            return Err("the watch ended".into());
        };
        count.fetch_add(response.events.len() as u64, Ordering::Relaxed);
        for event in response.events {
            let user = event.user.as_ref().map_or("", |u| u.id.as_str());
            deliveries.push(Delivery {
                event_id: event
                    .event_id
                    .parse()
                    .map_err(|_| "event_id_not_a_number")?,
                user: Uuid::parse_str(user).map_err(|_| "event_without_user")?,
                commit: timestamp_micros(event.commit_time.as_ref()),
                received,
            });
        }
    }
}

/// Calls `call(worker, k)` for k = 0, 1, 2, ... at `rate` calls per second
/// for `run`, from `workers` tasks: call k is due k / rate after the start
/// and begins then, or as soon as a worker is free after that. Returns the
/// calls, what the successful ones returned, and how far behind its due
/// time the latest call began.
async fn paced<F, Fut, T>(
    workers: usize,
    rate: f64,
    run: Duration,
    call: F,
) -> (Sample, Vec<T>, Duration)
where
    F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<T, String>> + Send,
    T: Send + 'static,
{
    let call = Arc::new(call);
    let next = Arc::new(AtomicU64::new(0));
    let calls = (rate * run.as_secs_f64()) as u64;
    let started = Instant::now();
    let tasks: Vec<_> = (0..workers)
        .map(|worker| {
            let (call, next) = (Arc::clone(&call), Arc::clone(&next));
            tokio::spawn(async move {
                let (mut sample, mut outputs, mut behind) =
                    (Sample::default(), Vec::new(), Duration::ZERO);
                loop {
                    let k = next.fetch_add(1, Ordering::Relaxed);
                    if k >= calls {
                        return (sample, outputs, behind);
                    }
                    let due = started + Duration::from_secs_f64(k as f64 / rate);
                    tokio::time::sleep_until(due.into()).await;
                    let start = Instant::now();
                    behind = behind.max(start.saturating_duration_since(due));
                    let result = call(worker, k).await;
                    sample.latencies.push(start.elapsed());
                    match result {
                        Ok(output) => outputs.push(output),
                        Err(code) => *sample.errors.entry(code).or_default() += 1,
                    }
                }
            })
        })
        .collect();
    let (mut total, mut outputs, mut behind) = (Sample::default(), Vec::new(), Duration::ZERO);
    for task in tasks {
        let (sample, more, late) = task.await.expect("writer panicked");
        total.merge(sample);
        outputs.extend(more);
        behind = behind.max(late);
    }
    total.elapsed = started.elapsed();
    total.per_call = 1;
    (total, outputs, behind)
}

/// The value at quantile `q` of sorted values.
fn quantile_of(sorted: &[f64], q: f64) -> f64 {
    let Some(last) = sorted.len().checked_sub(1) else {
        return f64::NAN;
    };
    sorted[((last as f64) * q).round() as usize]
}

/// Delivery latency: `--watchers` WatchUsers streams of every tenant (the
/// admin key) while writers make `--feed-rate` changes per second for the
/// run's duration, half CreateUser and half UpdateUser (of `firstName`, a
/// random user of the 10k tenant), paced. Per event and watcher: the time
/// it arrived minus its `commit_time`, and minus the time the writer's call
/// returned; and whether each watcher got every event once. Before the
/// run: at least 10,000 events, analyzed, and one change every watcher has
/// received.
async fn delivery(bench: &Bench<'_>, server: &Server, out: &mut Section) -> Result<(), BoxError> {
    let (service, options) = (bench.service, bench.options);
    let (watchers, rate) = (options.watchers, options.feed_rate);
    eprintln!("WatchUsers: {watchers} watchers, {rate} changes/s");
    seed_events(bench).await?;
    // The run starts with the server's feed reader at the end of the
    // table: events of the earlier scenarios it has not read yet (a bulk
    // load writes hundreds of thousands) would be read in the run.
    let caught_up = Instant::now();
    let backlog = hub_backlog(server, &bench.db).await?;
    let mut left = backlog;
    while left > 0 && caught_up.elapsed() < HUB_CATCH_UP {
        tokio::time::sleep(Duration::from_millis(200)).await;
        left = hub_backlog(server, &bench.db).await?;
    }
    let caught_up = caught_up.elapsed();
    // Each watcher on a connection of its own, as separate consumers would
    // be; every watch is confirmed (its first response, without events)
    // before the first change.
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let (mut tasks, mut counts) = (Vec::new(), Vec::new());
    for _ in 0..watchers {
        let stream = open_watch(service).await?;
        let count = Arc::new(AtomicU64::new(0));
        counts.push(Arc::clone(&count));
        tasks.push(tokio::spawn(collect(stream, count, stopped.clone())));
    }
    // The watches are established before the measured changes: one change,
    // and every watcher has it. A watch opened while changes already flow
    // first catches up from the table, on a quarter of the server's pool,
    // which the writers keep busy: a start, not the steady delivery this
    // run measures.
    let warm = Instant::now();
    let request = service.request(pb::CreateUserRequest {
        user: Some(pb::User {
            reference: format!("f{}-warm-up", std::process::id()),
            email: format!("f{}-warm-up@bench.example", std::process::id()),
            first_name: "Ada".into(),
            tenant_id: bench.writes.to_string(),
            ..Default::default()
        }),
        ..Default::default()
    });
    service.client(0).create_user(request).await?;
    while counts.iter().any(|c| c.load(Ordering::Relaxed) == 0) {
        if warm.elapsed() > Duration::from_secs(10) {
            return Err("a watcher had no event 10 s after a change".into());
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let established = warm.elapsed();
    let base: Vec<u64> = counts.iter().map(|c| c.load(Ordering::Relaxed)).collect();
    let before: i64 = bench
        .db
        .query_one("SELECT coalesce(max(seq), 0) FROM user_events", &[])
        .await?
        .get(0);

    // Callers waiting for one of the server's database connections (the
    // writes, and watchers reading from the table; the feed's reader has a
    // connection of its own): sampled every 20 ms while the writers run.
    let (stop_sampling, mut sampling) = tokio::sync::watch::channel(false);
    let waiting = {
        let at = server.metrics;
        tokio::spawn(async move {
            let mut samples = Vec::new();
            loop {
                if let Ok(text) = fetch_metrics(at).await {
                    let line = text.lines().find(|l| {
                        l.starts_with("users_service_db_pool_connections")
                            && l.contains("state=\"waiting\"")
                    });
                    if let Some(n) = line.and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok()) {
                        samples.push(n);
                    }
                }
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_millis(20)) => {}
                    _ = sampling.wait_for(|stop| *stop) => return samples,
                }
            }
        })
    };
    let scans = event_scans(&bench.db).await?;
    let cpu = Cpu::now(server);
    let (writes, changes, behind): (Sample, Vec<Change>, Duration) = {
        let (service, pick, tenant) = (service.clone(), Arc::clone(&bench.pick), bench.writes);
        let prefix = format!("f{}", std::process::id());
        paced(bench.calls, rate, bench.run, move |w, k| {
            let (service, id, prefix) = (service.clone(), pick(k), prefix.clone());
            async move {
                let user = if k % 2 == 0 {
                    let user = pb::User {
                        reference: format!("{prefix}-{k}"),
                        email: format!("{prefix}-{k}@bench.example"),
                        first_name: "Ada".into(),
                        last_name: "Lovelace".into(),
                        tenant_id: tenant.to_string(),
                        ..Default::default()
                    };
                    let request = service.request(pb::CreateUserRequest {
                        user: Some(user),
                        ..Default::default()
                    });
                    let response = service.client(w).create_user(request).await;
                    response.map_err(code)?.into_inner().user
                } else {
                    // A name no user has had: every update is a change.
                    let request = service.request(pb::UpdateUserRequest {
                        id: id.to_string(),
                        user: Some(pb::UserUpdate {
                            first_name: Some(format!("{prefix}-{k}")),
                            ..Default::default()
                        }),
                        ..Default::default()
                    });
                    let response = service.client(w).update_user(request).await;
                    response.map_err(code)?.into_inner().user
                };
                let returned = epoch_micros(std::time::SystemTime::now());
                let user = user.ok_or("no_user")?;
                let id = Uuid::parse_str(&user.id).map_err(|_| "bad_id")?;
                Ok((id, timestamp_micros(user.updated_at.as_ref()), returned))
            }
        })
        .await
    };
    let used = Cpu::now(server).since(cpu);
    stop_sampling.send_replace(true);
    let mut waiting = waiting.await?;
    waiting.sort_by(f64::total_cmp);

    // Every event written since `before` (the writers' only), once each
    // watcher has as many or 10 s have passed; then half a second more
    // for any event sent twice.
    let expected: std::collections::HashSet<i64> = bench
        .db
        .query("SELECT seq FROM user_events WHERE seq > $1", &[&before])
        .await?
        .iter()
        .map(|row| row.get(0))
        .collect();
    let waited = Instant::now();
    while waited.elapsed() < Duration::from_secs(10)
        && counts
            .iter()
            .zip(&base)
            .any(|(count, base)| count.load(Ordering::Relaxed) - base < expected.len() as u64)
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let drained = waited.elapsed();
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.send_replace(true);
    let mut received = Vec::with_capacity(watchers);
    for task in tasks {
        received.push(task.await?.map_err(|e| format!("a watcher failed: {e}"))?);
    }
    // Backends report their table statistics at most once a second.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let scans: Vec<String> = event_scans(&bench.db)
        .await?
        .into_iter()
        .map(|(index, count, rows)| {
            let (count0, rows0) = scans
                .iter()
                .find(|(i, ..)| *i == index)
                .map_or((0, 0), |s| (s.1, s.2));
            format!("{index} {} scans, {} rows", count - count0, rows - rows0)
        })
        .collect();

    let returned: std::collections::HashMap<(Uuid, i64), i64> = changes
        .iter()
        .map(|&(user, at, returned)| ((user, at), returned))
        .collect();
    let (mut since_commit, mut since_return) = (Vec::new(), Vec::new());
    let (mut missing, mut duplicates, mut unexpected, mut unmatched) = (0, 0, 0, 0);
    // p99 since commit per second of the run, by commit time.
    let first_commit = received
        .iter()
        .flatten()
        .filter(|d| d.event_id > before)
        .map(|d| d.commit)
        .min()
        .unwrap_or(0);
    let mut seconds: BTreeMap<i64, Vec<f64>> = BTreeMap::new();
    for deliveries in &received {
        let mut seen = std::collections::HashSet::with_capacity(deliveries.len());
        for d in deliveries {
            if !seen.insert(d.event_id) {
                duplicates += 1;
                continue;
            }
            // The warm-up's change.
            if d.event_id <= before {
                continue;
            }
            if !expected.contains(&d.event_id) {
                unexpected += 1;
                continue;
            }
            let latency = (d.received - d.commit) as f64 / 1e3;
            since_commit.push(latency);
            seconds
                .entry((d.commit - first_commit) / 1_000_000)
                .or_default()
                .push(latency);
            if let Some(&at) = returned.get(&(d.user, d.commit)) {
                since_return.push((d.received - at) as f64 / 1e3);
            }
        }
        missing += expected.iter().filter(|seq| !seen.contains(seq)).count();
        // Every change a writer saw succeed is one of the events it got.
        let got: std::collections::HashSet<(Uuid, i64)> =
            deliveries.iter().map(|d| (d.user, d.commit)).collect();
        unmatched += returned.keys().filter(|key| !got.contains(key)).count();
    }
    since_commit.sort_by(f64::total_cmp);
    since_return.sort_by(f64::total_cmp);
    // The writes' own share: from commit_time to the writer's answer.
    let mut write_part: Vec<f64> = changes
        .iter()
        .map(|&(_, at, returned)| (returned - at) as f64 / 1e3)
        .collect();
    write_part.sort_by(f64::total_cmp);
    let per_second: Vec<String> = seconds
        .into_values()
        .map(|mut latencies| {
            latencies.sort_by(f64::total_cmp);
            format!("{:.1}", quantile_of(&latencies, 0.99))
        })
        .collect();

    let wall = writes.elapsed.as_secs_f64();
    out.lines.extend([
        format!(
            "Change feed delivery: {watchers} WatchUsers streams (admin key, every tenant, one HTTP/2 \
             connection each), writers at {rate} changes/s for {wall:.1} s ({} workers, half CreateUser, \
             half UpdateUser)",
            bench.calls
        ),
        String::new(),
        "| measure | value |".into(),
        "|---|---|".into(),
        format!(
            "| writes | {} calls, {:.0}/s, p50 {}, p99 {}, max {}, errors {} |",
            writes.latencies.len(),
            writes.latencies.len() as f64 / wall,
            ms(writes.quantile(0.5)),
            ms(writes.quantile(0.99)),
            ms(writes.quantile(1.0)),
            writes.errors()
        ),
        format!(
            "| events the feed reader had not read when the run began; read in | {backlog}; {:.1} s{} |",
            caught_up.as_secs_f64(),
            if left > 0 {
                format!(" ({left} still unread, the run began anyway)")
            } else {
                String::new()
            }
        ),
        format!(
            "| warm-up: one change, until every watcher had it | {} |",
            ms(established)
        ),
        format!(
            "| latest write behind its schedule | {} |",
            ms(behind)
        ),
        format!(
            "| events written | {} ({} changes confirmed to writers) |",
            expected.len(),
            changes.len()
        ),
        format!(
            "| deliveries (events x watchers) | {} of {} |",
            since_commit.len(),
            expected.len() * watchers
        ),
        format!(
            "| missing, duplicates, not written by the writers, confirmed changes without their event | \
             {missing}, {duplicates}, {unexpected}, {unmatched} |"
        ),
        format!(
            "| last event delivered | {:.2} s after the last write returned |",
            drained.as_secs_f64()
        ),
        format!(
            "| receipt - commit_time: p50, p99, p99.9, max (min) | {:.2}, {:.2}, {:.2}, {:.2} ms ({:.2} ms) |",
            quantile_of(&since_commit, 0.5),
            quantile_of(&since_commit, 0.99),
            quantile_of(&since_commit, 0.999),
            quantile_of(&since_commit, 1.0),
            quantile_of(&since_commit, 0.0),
        ),
        format!(
            "| receipt - writer's call returned: p50, p99, max (min; share before the return) | \
             {:.2}, {:.2}, {:.2} ms ({:.2} ms; {:.1}%) |",
            quantile_of(&since_return, 0.5),
            quantile_of(&since_return, 0.99),
            quantile_of(&since_return, 1.0),
            quantile_of(&since_return, 0.0),
            100.0 * since_return.iter().filter(|&&l| l < 0.0).count() as f64
                / since_return.len().max(1) as f64,
        ),
        format!(
            "| writer's call returned - commit_time: p50, p99, max | {:.2}, {:.2}, {:.2} ms |",
            quantile_of(&write_part, 0.5),
            quantile_of(&write_part, 0.99),
            quantile_of(&write_part, 1.0),
        ),
        format!(
            "| receipt - commit_time: p99 per second of the run | {} ms |",
            per_second.join(", ")
        ),
        format!(
            "| callers waiting for a database connection (samples every 20 ms): mean, p50, p90, max | \
             {:.1}, {}, {}, {} |",
            waiting.iter().sum::<f64>() / waiting.len().max(1) as f64,
            quantile_of(&waiting, 0.5),
            quantile_of(&waiting, 0.9),
            quantile_of(&waiting, 1.0),
        ),
        format!(
            "| user_events index scans during the run, and rows they read | {} |",
            scans.join("; ")
        ),
        format!(
            "| CPU during the writes (of {} cores) | {} |",
            cores(),
            used.share(writes.elapsed)
        ),
        String::new(),
    ]);
    let p99 = quantile_of(&since_commit, 0.99);
    out.targets.push((
        format!("feed: p99 receipt - commit_time <= 50 ms ({watchers} watchers, {rate} changes/s)"),
        (!since_commit.is_empty()).then_some(p99 <= 50.0),
        format!("{p99:.2} ms"),
    ));
    out.targets.push((
        "feed: every watcher got every event exactly once".into(),
        Some(!expected.is_empty() && missing + duplicates + unexpected + unmatched == 0),
        format!(
            "{watchers} x {} events: {missing} missing, {duplicates} duplicates",
            expected.len()
        ),
    ));
    Ok(())
}

/// Statistics of `user_events`, as autovacuum keeps them. Without any (a
/// table never analyzed, as in a fresh bench database), Postgres reads the
/// feed's newest events by walking the whole table in `seq` order, a cost
/// that grows with every event (BENCHMARKS.md, "Change feed").
async fn analyze_events(db: &PgClient) -> Result<(), BoxError> {
    db.batch_execute("ANALYZE user_events").await?;
    Ok(())
}

/// Events of the feed kept in service are many and have statistics: the
/// delivery run starts from at least 10,000 (written by BatchUpsertUsers
/// when the earlier scenarios wrote fewer), analyzed.
async fn seed_events(bench: &Bench<'_>) -> Result<(), BoxError> {
    let events: i64 = bench
        .db
        .query_one("SELECT count(*) FROM user_events", &[])
        .await?
        .get(0);
    let prefix = format!("seed{}", std::process::id());
    let missing = u64::try_from(10_000 - events).unwrap_or(0);
    for n in 0..missing.div_ceil(BATCH as u64) {
        let users = (0..BATCH)
            .map(|i| pb::User {
                reference: format!("{prefix}-{n}-{i}"),
                email: format!("{prefix}-{n}-{i}@bench.example"),
                first_name: "Ada".into(),
                tenant_id: bench.writes.to_string(),
                ..Default::default()
            })
            .collect();
        let request = bench.service.request(pb::BatchUpsertUsersRequest {
            users,
            ..Default::default()
        });
        bench.service.client(0).batch_upsert_users(request).await?;
    }
    analyze_events(&bench.db).await
}

/// Longest wait for the server's feed reader to read what the earlier
/// scenarios wrote before the delivery run.
const HUB_CATCH_UP: Duration = Duration::from_secs(300);

/// Events in `user_events` the server's feed reader has not read: the table
/// (every event of a bench database is written while this server runs: the
/// loads write none) less `users_service_events_total`.
async fn hub_backlog(server: &Server, db: &PgClient) -> Result<i64, BoxError> {
    let text = server.metrics_text().await?;
    let read = text
        .lines()
        .find(|l| l.starts_with("users_service_events_total"))
        .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .ok_or("no users_service_events_total in /metrics")?;
    let written: i64 = db
        .query_one("SELECT count(*) FROM user_events", &[])
        .await?
        .get(0);
    Ok(written - read as i64)
}

/// Per index of `user_events`: scans and index entries read so far
/// (`pg_stat_user_indexes`).
async fn event_scans(db: &PgClient) -> Result<Vec<(String, i64, i64)>, BoxError> {
    Ok(db
        .query(
            "SELECT indexrelname::text, idx_scan, idx_tup_read FROM pg_stat_user_indexes \
             WHERE relname = 'user_events' ORDER BY indexrelname",
            &[],
        )
        .await?
        .iter()
        .map(|row| (row.get(0), row.get(1), row.get(2)))
        .collect())
}

/// Entries of `user_events_pkey` read so far: the feed's reads walk it
/// when Postgres expects many new events (BENCHMARKS.md, "Change feed").
async fn pkey_entries(db: &PgClient) -> Result<i64, BoxError> {
    Ok(event_scans(db)
        .await?
        .into_iter()
        .find(|(index, ..)| index == "user_events_pkey")
        .map_or(0, |(_, _, rows)| rows))
}

/// Turns the feed's three triggers on `users` on or off.
async fn feed_triggers(db: &PgClient, on: bool) -> Result<(), BoxError> {
    let verb = if on { "ENABLE" } else { "DISABLE" };
    db.batch_execute(&format!(
        "ALTER TABLE users {verb} TRIGGER user_events_insert, {verb} TRIGGER user_events_update, \
         {verb} TRIGGER user_events_delete"
    ))
    .await?;
    Ok(())
}

/// What the outbox costs the writes: CreateUser at 1 and 16 calls and at
/// `--calls`, and BatchUpsertUsers of 1000 users at min(calls, 2 x pool),
/// with the feed's triggers on (A) and off (B), A B A B (at least three
/// pairs, five in a full run), median of the per-pair ratios;
/// `user_events` analyzed before each pair, and each run begins once the
/// server's feed reader has read every event before it. The reader looks
/// at the table in both: after every batch of writes, and every 100 ms.
async fn outbox_cost(
    bench: &Bench<'_>,
    server: &Server,
    out: &mut Section,
) -> Result<(), BoxError> {
    let (service, run, writes, db) = (bench.service, bench.run, bench.writes, &bench.db);
    // More pairs than the other A/B scenarios: the cost is about as large as
    // the spread of one pair.
    let pairs = if bench.options.quick { 3 } else { 5 };
    let run_id = std::process::id();
    let mut levels = vec![1, 16, bench.calls];
    levels.sort_unstable();
    levels.dedup();
    let bulk_calls = bench.calls.min(bench.options.pool() * 2);
    seed_events(bench).await?;
    out.lines.extend([
        format!(
            "What the outbox costs: triggers on (A) vs off (B), A B x{pairs}, {:.1} s per run",
            run.as_secs_f64()
        ),
        String::new(),
        "| scenario | calls | A users/s per pair | B users/s per pair | A / B, median | A p50 | B p50 | \
         CPU per user, A / B: server, Postgres, bench | other processes, A / B | \
         user_events_pkey entries read per user, A / B | feed reader behind after A, at most |"
            .into(),
        "|---|---:|---|---|---:|---:|---:|---|---|---|---|".into(),
    ]);
    let cases = levels
        .iter()
        .map(|&calls| (false, calls))
        .chain([(true, bulk_calls)]);
    for (bulk, calls) in cases {
        let name = if bulk {
            "BatchUpsertUsers x1000"
        } else {
            "CreateUser"
        };
        eprintln!("{name}, {calls} calls: feed triggers on and off");
        let (mut on, mut off) = (Sample::default(), Sample::default());
        let (mut on_rates, mut off_rates, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
        let (mut on_cpu, mut off_cpu) = (Cpu::default(), Cpu::default());
        let (mut on_walked, mut off_walked) = (0, 0);
        // The most events the feed's reader had still to read when an A
        // run ended, and how long it took.
        let mut lag = (0, Duration::ZERO);
        for pair in 0..pairs {
            analyze_events(db).await?;
            let mut sides = Vec::new();
            for side in ["a", "b"] {
                if side == "b" {
                    feed_triggers(db, false).await?;
                }
                let prefix = format!("o{side}{run_id}-{calls}-{pair}");
                let walked = pkey_entries(db).await?;
                let cpu = Cpu::now(server);
                let sample = if bulk {
                    bulk_upserts(service, calls, run, prefix, writes).await
                } else {
                    create_users(service, calls, run, prefix, writes).await
                };
                let cpu = Cpu::now(server).since(cpu);
                // The next run starts with the feed's reader at the end of
                // the table, so that it does not pay for this one's events.
                let behind = hub_backlog(server, db).await?;
                let waited = Instant::now();
                while hub_backlog(server, db).await? > 0 && waited.elapsed() < HUB_CATCH_UP {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                if side == "a" {
                    lag = lag.max((behind, waited.elapsed()));
                }
                // Backends report their table statistics at most once a second.
                tokio::time::sleep(Duration::from_millis(1100)).await;
                let walked = pkey_entries(db).await? - walked;
                sides.push((sample, cpu, walked));
                if side == "b" {
                    feed_triggers(db, true).await?;
                }
            }
            let [(a, a_cpu, a_walked), (b, b_cpu, b_walked)]: [(Sample, Cpu, i64); 2] =
                sides.try_into().map_err(|_| "two sides")?;
            on_walked += a_walked;
            off_walked += b_walked;
            let users = |s: &Sample| s.rate() * s.per_call as f64;
            ratios.push(users(&a) / users(&b));
            on_rates.push(format!("{:.0}", users(&a)));
            off_rates.push(format!("{:.0}", users(&b)));
            on_cpu.add(a_cpu);
            off_cpu.add(b_cpu);
            on.merge(a);
            off.merge(b);
        }
        let ratio = median(ratios);
        let users = |s: &Sample| (s.latencies.len() as u64 * s.per_call) as f64;
        let (a, b) = (on_cpu.per_call(users(&on)), off_cpu.per_call(users(&off)));
        let others = |cpu: Cpu, s: &Sample| {
            100.0 * cpu.others() as f64 / TICKS_PER_SECOND / s.elapsed.as_secs_f64()
        };
        out.lines.push(format!(
            "| {name} | {calls} | {} | {} | {ratio:.3}x | {} | {} | {:.1} / {:.1}, {:.1} / {:.1}, {:.1} / {:.1} µs | \
             {:.0}% / {:.0}% of one core | {:.1} / {:.1} | {} events, read in {:.1} s |",
            on_rates.join(", "),
            off_rates.join(", "),
            ms(on.quantile(0.5)),
            ms(off.quantile(0.5)),
            a.0,
            b.0,
            a.1,
            b.1,
            a.2,
            b.2,
            others(on_cpu, &on),
            others(off_cpu, &off),
            on_walked as f64 / users(&on).max(1.0),
            off_walked as f64 / users(&off).max(1.0),
            lag.0,
            lag.1.as_secs_f64(),
        ));
        if !on.errors.is_empty() || !off.errors.is_empty() {
            out.lines.push(format!(
                "| errors | | {} | {} | | | | | | | |",
                on.errors(),
                off.errors()
            ));
        }
        if bulk {
            let rate = on.rate() * BATCH as f64;
            out.targets.push((
                format!("feed: BatchUpsertUsers with the feed >= 20,000 users/s ({calls} calls)"),
                Some(rate >= 20_000.0),
                format!("{rate:.0} users/s ({ratio:.3}x without)"),
            ));
        } else {
            out.targets.push((
                format!(
                    "feed: CreateUser with the feed >= 0.85x without, {calls} calls (median of A/B pairs)"
                ),
                Some(ratio >= 0.85),
                format!("{ratio:.3}x"),
            ));
        }
    }
    out.lines.push(String::new());
    Ok(())
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get())
}

/// CPU time used so far, in clock ticks (USER_HZ, 100 a second on Linux):
/// the server's, this process's (the bench's clients), and that of the
/// Postgres backends connected to the bench database (by their process
/// titles; not the WAL writer's or the checkpointer's, and not a backend
/// that exited in between); and the whole machine's, so that the work of
/// other processes shows.
#[derive(Debug, Default, Clone, Copy)]
struct Cpu {
    server: u64,
    client: u64,
    postgres: u64,
    machine: u64,
}

/// USER_HZ: the unit of /proc's CPU times.
const TICKS_PER_SECOND: f64 = 100.0;

impl Cpu {
    fn now(server: &Server) -> Self {
        let ticks = |pid: &str| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            let (head, rest) = stat.rsplit_once(')')?;
            let name = head.split_once('(')?.1.to_owned();
            // After the name: state, ..., utime (the 12th), stime (the 13th).
            let fields: Vec<&str> = rest.split_whitespace().collect();
            let used =
                fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
            Some((name, used))
        };
        let backend = format!(" {} ", server.database);
        let postgres = std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|entry| {
                let pid = entry.file_name().into_string().ok()?;
                let (name, used) = ticks(&pid)?;
                let title = std::fs::read_to_string(format!("/proc/{pid}/cmdline")).ok()?;
                (name == "postgres" && title.contains(&backend)).then_some(used)
            })
            .sum();
        // /proc/stat's first line: cpu user nice system idle iowait irq
        // softirq steal ...; busy is all but idle and iowait.
        let machine = std::fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|stat| {
                let fields: Vec<u64> = stat
                    .lines()
                    .next()?
                    .split_whitespace()
                    .skip(1)
                    .take(8)
                    .map(|f| f.parse().ok())
                    .collect::<Option<_>>()?;
                Some(fields.iter().sum::<u64>() - fields.get(3)? - fields.get(4)?)
            })
            .unwrap_or(0);
        Self {
            server: ticks(&server.child.id().to_string()).map_or(0, |t| t.1),
            client: ticks("self").map_or(0, |t| t.1),
            postgres,
            machine,
        }
    }

    /// What other processes used: the machine's less the bench's, the
    /// server's and its backends'.
    fn others(self) -> u64 {
        self.machine
            .saturating_sub(self.server + self.client + self.postgres)
    }

    fn since(self, earlier: Cpu) -> Cpu {
        Cpu {
            server: self.server.saturating_sub(earlier.server),
            client: self.client.saturating_sub(earlier.client),
            postgres: self.postgres.saturating_sub(earlier.postgres),
            machine: self.machine.saturating_sub(earlier.machine),
        }
    }

    fn add(&mut self, more: Cpu) {
        self.server += more.server;
        self.client += more.client;
        self.postgres += more.postgres;
        self.machine += more.machine;
    }

    /// Microseconds per item: server, Postgres, bench.
    fn per_call(self, items: f64) -> (f64, f64, f64) {
        let us = |ticks: u64| ticks as f64 / TICKS_PER_SECOND * 1e6 / items.max(1.0);
        (us(self.server), us(self.postgres), us(self.client))
    }

    /// Each side's share of one core over `wall`.
    fn share(self, wall: Duration) -> String {
        let pct = |ticks: u64| 100.0 * ticks as f64 / TICKS_PER_SECOND / wall.as_secs_f64();
        format!(
            "server {:.0}%, Postgres {:.0}%, bench {:.0}%, other processes {:.0}% of one core",
            pct(self.server),
            pct(self.postgres),
            pct(self.client),
            pct(self.others())
        )
    }
}

// ---------------------------------------------------------------- counts

/// Sets the user counts of `tenant` (`user_counts`, which the service's
/// triggers keep) to what its users are, after writes made without those
/// triggers; a server without the counters (`BENCH_SERVER` of an earlier
/// commit) has nothing to set.
async fn recount(db: &PgClient, tenant: Uuid) -> Result<(), BoxError> {
    let counted: bool = db
        .query_one("SELECT to_regclass('user_counts') IS NOT NULL", &[])
        .await?
        .get(0);
    if !counted {
        return Ok(());
    }
    // The lock keeps writers out between the count and the new rows.
    db.batch_execute("BEGIN; LOCK TABLE users IN SHARE ROW EXCLUSIVE MODE")
        .await?;
    let recounted = async {
        db.execute("DELETE FROM user_counts WHERE tenant_id = $1", &[&tenant])
            .await?;
        db.execute(
            "INSERT INTO user_counts (tenant_id, shard, users, active) \
             SELECT $1, 0, count(*), count(*) FILTER (WHERE active) FROM users \
             WHERE tenant_id = $1 AND delete_time IS NULL",
            &[&tenant],
        )
        .await
    }
    .await;
    db.batch_execute(if recounted.is_ok() {
        "COMMIT"
    } else {
        "ROLLBACK"
    })
    .await?;
    recounted?;
    Ok(())
}

/// The `counts` group: ListUsers' totalCount from the counters at 10k and
/// (but with `--quick`) 1M users, and what the counters' triggers cost
/// CreateUser and BatchUpsertUsers. The 1M users are a tenant of their own,
/// loaded here.
async fn counts(
    bench: &Bench<'_>,
    url: &str,
    rows: &mut Vec<Row>,
    notes: &mut Vec<String>,
) -> Result<(), BoxError> {
    count_latency(bench, url, bench.small, "10k", rows, notes).await?;
    if !bench.options.quick {
        eprintln!("loading 1M users (counts)");
        let started = Instant::now();
        let large = load_tenant(&bench.db, "benchcounts1m", 1_000_000).await?;
        notes.push(format!(
            "loaded 1M users (counts) in {:.1} s",
            started.elapsed().as_secs_f64()
        ));
        count_latency(bench, url, large, "1M", rows, notes).await?;
    }
    count_trigger_cost(bench, notes).await
}

/// ListUsers of one tenant with a page of one user, one call at a time
/// (an admin paging through a tenant): without the total, with the
/// unfiltered total and with the total of its active users, in 5 rounds
/// that take turns (the machine's noise comes in bursts: a checkpoint, a
/// neighbour), against the raw sum of the tenant's counters on a
/// connection of its own. The total's own cost is the median over rounds
/// of the call's p50 with it less the call's p50 without it, in the same
/// round.
async fn count_latency(
    bench: &Bench<'_>,
    url: &str,
    tenant: Uuid,
    size: &str,
    rows: &mut Vec<Row>,
    notes: &mut Vec<String>,
) -> Result<(), BoxError> {
    const ROUNDS: u32 = 5;
    let raw = Arc::new(connect(&url.parse()?).await?);
    let kinds: [(&str, Option<Option<bool>>); 3] = [
        ("skipTotalCount", None),
        ("totalCount, unfiltered", Some(None)),
        ("totalCount, active only", Some(Some(true))),
    ];
    let mut samples: Vec<Sample> = vec![Sample::default(); kinds.len()];
    let mut raws: Vec<Sample> = vec![Sample::default(); kinds.len()];
    let mut own: Vec<Vec<f64>> = vec![Vec::new(); kinds.len()];
    let run = bench.run / ROUNDS;
    for round in 0..ROUNDS {
        eprintln!(
            "ListUsers page of 1 with and without totalCount at {size}, round {}",
            round + 1
        );
        let mut p50s = Vec::new();
        for (k, (_, total)) in kinds.iter().enumerate() {
            let active = total.flatten();
            let expected: i64 = bench
                .db
                .query_one(
                    "SELECT count(*) FROM users WHERE tenant_id = $1 AND delete_time IS NULL \
                     AND ($2::bool IS NULL OR active = $2)",
                    &[&tenant, &active],
                )
                .await?
                .get(0);
            let request = pb::ListUsersRequest {
                limit: Some(1),
                filter: Some(pb::UserFilter {
                    active: active.map(|active| pb::BoolFilter {
                        equal_to: Some(active),
                        ..Default::default()
                    }),
                    ..tenant_filter(tenant).unwrap_or_default()
                }),
                skip_total_count: total.is_none(),
                ..Default::default()
            };
            let counted = total.is_some();
            let service = bench.service.clone();
            let s = drive(1, run, move |w, _| {
                let (service, request) = (service.clone(), request.clone());
                async move {
                    let page = service
                        .client(w)
                        .list_users(service.request(request))
                        .await
                        .map_err(code)?
                        .into_inner();
                    if counted && page.total_count != Some(expected) {
                        return Err("wrong_total".into());
                    }
                    Ok(())
                }
            })
            .await;
            p50s.push(s.quantile(0.5).as_secs_f64());
            samples[k].merge(s);
            if total.is_some() {
                let column = if active.is_some() { "active" } else { "users" };
                let sum = raw
                    .prepare(&format!(
                        "SELECT COALESCE(sum({column}), 0)::bigint FROM user_counts \
                         WHERE tenant_id = $1"
                    ))
                    .await?;
                let raw = Arc::clone(&raw);
                let r = drive(1, run, move |_, _| {
                    let (raw, sum) = (Arc::clone(&raw), sum.clone());
                    async move {
                        let total: i64 = raw
                            .query_one(&sum, &[&tenant])
                            .await
                            .map_err(sql_code)?
                            .get(0);
                        if total != expected {
                            return Err("wrong_total".into());
                        }
                        Ok(())
                    }
                })
                .await;
                raws[k].merge(r);
            }
        }
        for k in 1..kinds.len() {
            own[k].push(p50s[k] - p50s[0]);
        }
    }
    let without = samples[0].quantile(0.5);
    for (k, ((name, total), (sample, raw))) in
        kinds.iter().zip(samples.into_iter().zip(raws)).enumerate()
    {
        if total.is_some() {
            let cost = median(own[k].clone());
            notes.push(format!(
                "target: {name} at {size}, the total's own cost p50 <= 1 ms: {:.2} ms \
                 (median of rounds {}; calls p50 {} with, {} without; counter sum on a raw \
                 connection {}) {}",
                cost * 1e3,
                own[k]
                    .iter()
                    .map(|c| format!("{:.2}", c * 1e3))
                    .collect::<Vec<_>>()
                    .join(", "),
                ms(sample.quantile(0.5)),
                ms(without),
                ms(raw.quantile(0.5)),
                if cost <= 0.001 { "PASS" } else { "MISS" }
            ));
        }
        rows.push(Row {
            scenario: format!("ListUsers {name}, page of 1, 1 call at a time, at {size}"),
            service: sample,
            raw: total.is_some().then_some(raw),
            ratio: None,
        });
    }
    Ok(())
}

/// Turns the counters' three triggers on `users` on or off.
async fn count_triggers(db: &PgClient, on: bool) -> Result<(), BoxError> {
    let verb = if on { "ENABLE" } else { "DISABLE" };
    db.batch_execute(&format!(
        "ALTER TABLE users {verb} TRIGGER user_counts_insert, {verb} TRIGGER user_counts_update, \
         {verb} TRIGGER user_counts_delete"
    ))
    .await?;
    Ok(())
}

/// What the counters cost the writes: CreateUser at `--calls` and
/// BatchUpsertUsers of 1000 new users at min(calls, 2 x pool), with the
/// counters' triggers on (A) and off (B), A B A B (three pairs, five in a
/// full run), median of the per-pair ratios. The writes go to a tenant of
/// their own, recounted afterwards.
async fn count_trigger_cost(bench: &Bench<'_>, notes: &mut Vec<String>) -> Result<(), BoxError> {
    let (service, run, db) = (bench.service, bench.run, &bench.db);
    let pairs = if bench.options.quick { 3 } else { 5 };
    let tenant = load_tenant(db, "benchcountwrites", 0).await?;
    let run_id = std::process::id();
    let bulk_calls = bench.calls.min(bench.options.pool() * 2);
    for (bulk, calls) in [(false, bench.calls), (true, bulk_calls)] {
        let name = if bulk {
            "BatchUpsertUsers x1000"
        } else {
            "CreateUser"
        };
        eprintln!("{name}, {calls} calls: count triggers on and off");
        let (mut on, mut off, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
        let mut errors = Vec::new();
        for pair in 0..pairs {
            let mut sides = Vec::new();
            for side in ["a", "b"] {
                if side == "b" {
                    count_triggers(db, false).await?;
                }
                let prefix = format!("k{side}{run_id}-{calls}-{pair}");
                let sample = if bulk {
                    bulk_upserts(service, calls, run, prefix, tenant).await
                } else {
                    create_users(service, calls, run, prefix, tenant).await
                };
                if side == "b" {
                    count_triggers(db, true).await?;
                }
                if !sample.errors.is_empty() {
                    errors.push(format!("{side}: {}", sample.errors()));
                }
                sides.push(sample.rate() * sample.per_call as f64);
            }
            ratios.push(sides[0] / sides[1]);
            on.push(format!("{:.0}", sides[0]));
            off.push(format!("{:.0}", sides[1]));
        }
        let ratio = median(ratios);
        notes.push(format!(
            "count triggers on (A) vs off (B), {name}, {calls} calls, A B x{pairs}: \
             A {} users/s, B {} users/s; A / B median {ratio:.3}x (target >= 0.95: {}){}",
            on.join(", "),
            off.join(", "),
            if ratio >= 0.95 { "PASS" } else { "MISS" },
            if errors.is_empty() {
                String::new()
            } else {
                format!("; errors {}", errors.join(", "))
            }
        ));
    }
    recount(db, tenant).await
}
