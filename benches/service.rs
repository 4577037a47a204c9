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
//! `--keep` to keep the database, `--only get,create,update,safe,bulk,lists` to run
//! some scenario groups. `BENCH_SERVER` is a server binary to run instead of
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
const BATCH: usize = 1000;
/// `total_count_limit` of the bounded-count scenario.
const COUNT_LIMIT: i32 = 10_000;

/// The service over gRPC against raw SQL on the same Postgres.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "service")]
struct Options {
    /// Smoke run: 10k users only, short scenarios (1.5 s each).
    #[arg(long)]
    quick: bool,
    /// Concurrent calls.
    #[arg(long, default_value_t = 64)]
    calls: usize,
    /// HTTP/2 connections the calls share.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Seconds per run [default: 8, or 1.5 with --quick].
    #[arg(long)]
    seconds: Option<f64>,
    /// Database connections of the server and of the raw side [default: the
    /// server's default, 2 x cores, at least 4].
    #[arg(long)]
    pool: Option<usize>,
    /// Keep the database afterwards.
    #[arg(long)]
    keep: bool,
    /// Scenario groups to run (lists, get, create, update, bulk); all when
    /// not given.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Passed by `cargo bench` to harness-less benchmarks.
    #[arg(long, hide = true)]
    bench: bool,
}

impl Options {
    /// How long each run lasts.
    fn run(&self) -> Duration {
        Duration::from_secs_f64(self.seconds.unwrap_or(if self.quick { 1.5 } else { 8.0 }))
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
}

impl Server {
    fn start(
        url: &str,
        options: &Options,
        port: u16,
        metrics: std::net::SocketAddr,
    ) -> Result<Self, BoxError> {
        let data_dir = std::env::temp_dir().join(format!("users-bench-{}", std::process::id()));
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
            .env_remove("DATABASE_URL")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()?;
        Ok(Self {
            child,
            data_dir,
            metrics,
        })
    }

    /// Per kind of shared statement: calls served and statements run, from
    /// the server's `users_service_db_batch_items` histogram.
    async fn batches(&self) -> Result<Vec<(String, f64, f64)>, BoxError> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(self.metrics).await?;
        stream
            .write_all(b"GET /metrics HTTP/1.0\r\nHost: bench\r\n\r\n")
            .await?;
        let mut text = String::new();
        stream.read_to_string(&mut text).await?;
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

async fn wait_ready(
    server: &mut Server,
    port: u16,
    options: &Options,
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
            let mut clients = Vec::new();
            for _ in 0..options.connections {
                let channel = Channel::from_shared(format!("http://127.0.0.1:{port}"))
                    .ok()?
                    .connect()
                    .await
                    .ok()?;
                clients.push(UsersServiceClient::new(channel));
            }
            let auth = format!("Bearer {}", token.trim()).parse().ok()?;
            Some(Service {
                clients: Arc::new(clients),
                auth,
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
async fn load_tenant(db: &PgClient, name: &str, count: i64) -> Result<Uuid, BoxError> {
    let tenant = Uuid::now_v7();
    db.execute(
        "INSERT INTO tenants (id, name, reference) VALUES ($1, $2, $2)",
        &[&tenant, &name],
    )
    .await?;
    db.batch_execute("SET synchronous_commit = off").await?;
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
    db.batch_execute("SET synchronous_commit = on").await?;
    db.batch_execute("VACUUM ANALYZE users").await?;
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
    let mut server = Server::start(url.as_str(), &options, port, free()?)?;
    let result = match wait_ready(&mut server, port, &options).await {
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
    let small = load_tenant(&db, "bench10k", 10_000).await?;
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
        pairs: if options.quick { 2 } else { 3 },
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
    if options.runs("get") {
        rows.push(get_user(&bench).await);
    }
    for (scenario, group) in [("CreateUser", "create"), ("UpdateUser", "update")] {
        if options.runs(group) {
            rows.push(write_users(&bench, scenario).await);
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
    // Lists at 1M; the rows of the write scenarios go first.
    if !options.quick && options.runs("lists") {
        bench
            .db
            .execute("DELETE FROM users WHERE tenant_id = $1", &[&bench.writes])
            .await?;
        eprintln!("loading 1M users");
        let started = Instant::now();
        let large = load_tenant(&bench.db, "bench1m", 1_000_000).await?;
        notes.push(format!(
            "loaded 1M users in {:.1} s",
            started.elapsed().as_secs_f64()
        ));
        list_scenarios(
            &mut rows, options, service, &bench.raw, &bench.db, large, "1M", 1000, true,
        )
        .await?;
    }
    report(&rows, notes, server, calls, bulk_speedup).await
}

/// GetUser of a random user against the raw lookup, A B A B: a single pair
/// varies by +-15%.
async fn get_user(bench: &Bench<'_>) -> Row {
    eprintln!("GetUser");
    let (service, raw, calls, run) = (bench.service, &bench.raw, bench.calls, bench.run);
    let mut runs = Pairs::default();
    for _ in 0..bench.pairs {
        let s = {
            let (service, pick) = (service.clone(), Arc::clone(&bench.pick));
            drive(calls, run, move |w, n| {
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
        };
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

/// CreateUser or UpdateUser against the raw statement, A B A B, median of
/// the pair ratios.
async fn write_users(bench: &Bench<'_>, scenario: &str) -> Row {
    eprintln!("{scenario}");
    let (service, raw, calls, run) = (bench.service, &bench.raw, bench.calls, bench.run);
    let writes = bench.writes;
    let run_id = std::process::id();
    let mut runs = Pairs::default();
    for pair in 0..bench.pairs {
        let prefix = format!("{run_id}-{pair}");
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
    let mut targets: Vec<(String, Option<bool>, String)> = Vec::new();
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
                .find(|r| r.scenario.contains(size) && r.scenario.contains(page))
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
    println!("\n| target | measured | result |\n|---|---:|---|");
    for (target, pass, measured) in targets {
        let result = match pass {
            Some(true) => "PASS",
            Some(false) => "FAIL",
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
