//! Configuration, from flags or environment variables (flags win).
//!
//! | flag | environment | default |
//! |---|---|---|
//! | `--listen` | `LISTEN_ADDR` | `127.0.0.1:50051` |
//! | `--database-url` | `DATABASE_URL` | none: run an embedded Postgres |
//! | `--database-replica-url` | `DATABASE_REPLICA_URLS` | none: every read from the primary |
//! | `--max-replica-lag` | `MAX_REPLICA_LAG` | `1s` |
//! | `--data-dir` | `DATA_DIR` | `./.users-service` |
//! | `--db-pool-size` | `DB_POOL_SIZE` | 2 x CPU cores, at least 4 |
//! | `--db-connect-timeout` | `DB_CONNECT_TIMEOUT` | `3s` |
//! | `--db-acquire-timeout` | `DB_ACQUIRE_TIMEOUT` | `3s` |
//! | `--db-statement-timeout` | `DB_STATEMENT_TIMEOUT` | `10s` |
//! | `--db-startup-timeout` | `DB_STARTUP_TIMEOUT` | `60s` |
//! | `--health-interval` | `HEALTH_INTERVAL` | `1s` |
//! | `--shutdown-grace` | `SHUTDOWN_GRACE` | `10s` |
//! | `--delete-retention` | `DELETE_RETENTION` | `30days` |
//! | `--purge-interval` | `PURGE_INTERVAL` | `1m` |
//! | `--request-id-retention` | `REQUEST_ID_RETENTION` | `24h` |
//! | `--event-retention` | `EVENT_RETENTION` | `7days` |
//! | `--watch-heartbeat` | `WATCH_HEARTBEAT` | `10s` |
//! | `--max-watchers` | `MAX_WATCHERS` | `1000` |
//! | `--nats-url` | `NATS_URL` | none: no relay to NATS |
//! | `--nats-stream` | `NATS_STREAM` | `USERS_EVENTS` |
//! | `--nats-duplicate-window` | `NATS_DUPLICATE_WINDOW` | `2m` |
//! | `--rate-limit-per-second` | `RATE_LIMIT_PER_SECOND` | `200` (0: off) |
//! | `--rate-limit-burst` | `RATE_LIMIT_BURST` | the rate |
//! | `--max-in-flight` | `MAX_IN_FLIGHT` | `512` |
//! | `--max-request-bytes` | `MAX_REQUEST_BYTES` | 4 MiB |
//! | `--max-call-duration` | `MAX_CALL_DURATION` | `30s` |
//! | `--request-read-timeout` | `REQUEST_READ_TIMEOUT` | `10s` |
//! | `--stream-stall-timeout` | `STREAM_STALL_TIMEOUT` | `10s` |
//! | `--max-connections` | `MAX_CONNECTIONS` | `4096` |
//! | `--max-concurrent-streams` | `MAX_CONCURRENT_STREAMS` | `128` |
//! | `--connection-idle-timeout` | `CONNECTION_IDLE_TIMEOUT` | `5m` |
//! | `--keepalive-interval` | `KEEPALIVE_INTERVAL` | `60s` |
//! | `--keepalive-timeout` | `KEEPALIVE_TIMEOUT` | `20s` |
//! | `--key-cache-ttl` | `KEY_CACHE_TTL` | `5s` |
//! | `--auth-failures-per-second` | `AUTH_FAILURES_PER_SECOND` | `10` |
//! | `--disable-reflection` | `DISABLE_REFLECTION` | off |
//! | `--jwt-issuer` | `JWT_ISSUER` | none: no end-user tokens |
//! | `--jwt-audience` | `JWT_AUDIENCE` | `users-service` |
//! | `--jwt-algorithm` | `JWT_ALGORITHM` | `rs256` |
//! | `--jwt-key-file` | `JWT_KEY_FILE` | none |
//! | `--jwt-secret` | `JWT_SECRET` | none |
//! | `--jwt-jwks-url` | `JWT_JWKS_URL` | none |
//! | `--jwt-jwks-file` | `JWT_JWKS_FILE` | none |
//! | `--jwt-jwks-refresh` | `JWT_JWKS_REFRESH` | `5m` |
//! | `--jwt-roles-claim` | `JWT_ROLES_CLAIM` | none: end users act on themselves only |
//! | `--jwt-tenant-claim` | `JWT_TENANT_CLAIM` | none |
//! | `--metrics-listen` | `METRICS_LISTEN` | none: no metrics endpoint |
//! | `--metrics-tls` | `METRICS_TLS` | off: `/metrics` in plaintext |
//! | `--health-listen` | `HEALTH_LISTEN` | none: health only on `--listen` |
//! | `--tls-cert` | `TLS_CERT` | none: plaintext |
//! | `--tls-key` | `TLS_KEY` | none |
//! | `--tls-client-ca` | `TLS_CLIENT_CA` | none: no client certificate asked |
//! | `--cors-allowed-origin` | `CORS_ALLOWED_ORIGINS` | none: no browser origin |
//! | `--otlp-endpoint` | `OTEL_EXPORTER_OTLP_ENDPOINT` | none: no traces |
//! | `--log-format` | `LOG_FORMAT` | `text` |
//!
//! Log filtering follows `RUST_LOG` (default `info`).

use std::{net::SocketAddr, num::NonZeroU32, path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::auth::{
    Role,
    authenticator::FailureBudget,
    jwks::Source,
    jwt::{JwtAlgorithm, JwtSettings},
};

use crate::net::ConnectionLimits;
use crate::store::{database::Patience, db::PoolSettings};
pub use crate::telemetry::LogFormat;

pub const DEFAULT_LISTEN: &str = "127.0.0.1:50051";
pub const DEFAULT_DATA_DIR: &str = "./.users-service";
/// Calls per second per caller unless configured.
pub const DEFAULT_RATE_LIMIT: u32 = 200;
/// Largest header block of a call (HTTP/2 SETTINGS_MAX_HEADER_LIST_SIZE).
pub const MAX_HEADER_LIST_BYTES: u32 = 16 * 1024;
/// Failed authentications per second per address unless configured.
pub const DEFAULT_AUTH_FAILURES: NonZeroU32 = NonZeroU32::new(10).expect("not zero");

/// users-service: the gRPC service that owns the users of every tenant.
#[derive(Debug, Clone, Parser)]
#[command(name = "users-service", version, about, long_about = None)]
pub struct Cli {
    #[command(flatten)]
    pub config: Config,
    /// What to do; serving is the default.
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Clone, Subcommand)]
pub enum Command {
    /// Serve gRPC (the default).
    Serve,
    /// Check the configuration and that the database can be reached; exits
    /// non-zero with the reason when not.
    Check,
    /// Manage the API keys of the services that call users-service.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Create or update users from a JSON Lines or CSV file (ROQ field names)
    /// through the BatchUpsertUsers call of a running server.
    Import(ImportArgs),
    /// Write users as JSON Lines (ROQ field names), streamed from a running server.
    Export(ExportArgs),
}

/// How `import` and `export` reach a running server.
#[derive(Debug, Clone, Args)]
pub struct ServerArgs {
    /// URL of the server [default: http:// and --listen].
    #[arg(long, env = "USERS_SERVICE_URL")]
    pub server: Option<String>,
    /// API token [default: the contents of <data-dir>/admin.key].
    #[arg(long, env = "USERS_SERVICE_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

#[derive(Debug, Clone, Args)]
pub struct ImportArgs {
    /// The file: `.jsonl`/`.ndjson` (one JSON object a line) or `.csv` (a header row).
    pub file: PathBuf,
    /// The file format, when its extension does not say.
    #[arg(long, value_enum)]
    pub format: Option<FileFormat>,
    /// Where to write the rejected rows [default: FILE.rejects.jsonl].
    #[arg(long)]
    pub rejects: Option<PathBuf>,
    #[command(flatten)]
    pub server: ServerArgs,
}

#[derive(Debug, Clone, Args)]
pub struct ExportArgs {
    /// Write to this file instead of stdout.
    #[arg(long, short)]
    pub output: Option<PathBuf>,
    /// Export only the users of this tenant.
    #[arg(long)]
    pub tenant: Option<uuid::Uuid>,
    #[command(flatten)]
    pub server: ServerArgs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum FileFormat {
    /// JSON Lines: one JSON object a line.
    Jsonl,
    /// Comma-separated values with a header row; customData as a JSON string.
    Csv,
}

#[derive(Debug, Clone, Subcommand)]
pub enum KeysCommand {
    /// Create a key and print its token (shown only this once) on stdout.
    Create {
        /// What the key may do.
        #[arg(long, value_enum)]
        role: Role,
        /// Tenant of an editor or viewer key (required for them, refused for admin).
        #[arg(long)]
        tenant: Option<uuid::Uuid>,
        /// A name that says who uses the key.
        #[arg(long, default_value = "")]
        name: String,
        /// Calls per second for this key, instead of --rate-limit-per-second.
        #[arg(long)]
        rate_limit: Option<std::num::NonZeroU32>,
        /// The key stops working this long from now (e.g. 90days); never
        /// when not given.
        #[arg(long, value_parser = humantime::parse_duration)]
        expire_in: Option<Duration>,
        /// The key works only from a client certificate (mutual TLS) with
        /// this name: its subject common name, else its first URI or DNS
        /// subject alternative name.
        #[arg(long = "client-cn", value_name = "NAME")]
        client_name: Option<String>,
    },
    /// List the keys (never their secrets).
    List,
    /// Revoke a key: it stops working within --key-cache-ttl on every replica.
    Revoke {
        /// The key id (the part after `usk_` in the token).
        key_id: String,
    },
}

/// Server and database settings, shared by every command.
#[derive(Debug, Clone, Args)]
pub struct Config {
    /// Address the gRPC server listens on.
    #[arg(long, global = true, env = "LISTEN_ADDR", default_value = DEFAULT_LISTEN)]
    pub listen: SocketAddr,

    /// Postgres to use, as a URL (postgres://user@host:5432/db) or key=value
    /// string. The database is created when missing. Without it, the service
    /// runs its own Postgres from the installed binaries, in --data-dir.
    #[arg(long, global = true, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,

    /// A streaming-replication standby of the database that GetUser,
    /// ListUsers and ExportUsers may read from while its replay lag is under
    /// --max-replica-lag (repeatable; in the environment, comma-separated).
    #[arg(
        long = "database-replica-url",
        global = true,
        env = "DATABASE_REPLICA_URLS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub database_replica_urls: Vec<String>,

    /// Reads go to a standby only while it is at most this far behind the
    /// primary; otherwise to the primary.
    #[arg(long, global = true, env = "MAX_REPLICA_LAG", default_value = "1s", value_parser = humantime::parse_duration)]
    pub max_replica_lag: Duration,

    /// Directory of the embedded Postgres cluster (used without DATABASE_URL).
    #[arg(long, global = true, env = "DATA_DIR", default_value = DEFAULT_DATA_DIR)]
    pub data_dir: PathBuf,

    /// Most database connections open at once [default: 2 x CPU cores, at least 4].
    #[arg(long, global = true, env = "DB_POOL_SIZE")]
    pub db_pool_size: Option<usize>,

    /// Longest wait to open a database connection.
    #[arg(long, global = true, env = "DB_CONNECT_TIMEOUT", default_value = "3s", value_parser = humantime::parse_duration)]
    pub db_connect_timeout: Duration,

    /// Longest wait for a free connection; past it a call fails with UNAVAILABLE.
    #[arg(long, global = true, env = "DB_ACQUIRE_TIMEOUT", default_value = "3s", value_parser = humantime::parse_duration)]
    pub db_acquire_timeout: Duration,

    /// Longest a single SQL statement may run.
    #[arg(long, global = true, env = "DB_STATEMENT_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub db_statement_timeout: Duration,

    /// At start, how long to wait for a database that does not answer yet,
    /// trying again with back-off; then the service exits with the cause.
    #[arg(long, global = true, env = "DB_STARTUP_TIMEOUT", default_value = "60s", value_parser = humantime::parse_duration)]
    pub db_startup_timeout: Duration,

    /// How often readiness probes the database (`SELECT 1`).
    #[arg(long, global = true, env = "HEALTH_INTERVAL", default_value = "1s", value_parser = humantime::parse_duration)]
    pub health_interval: Duration,

    /// On SIGINT/SIGTERM, how long in-flight calls may take to finish.
    #[arg(long, global = true, env = "SHUTDOWN_GRACE", default_value = "10s", value_parser = humantime::parse_duration)]
    pub shutdown_grace: Duration,

    /// How long a deleted user or tenant can be undeleted; then the service
    /// purges it (erases it for good).
    #[arg(long, global = true, env = "DELETE_RETENTION", default_value = "30days", value_parser = humantime::parse_duration)]
    pub delete_retention: Duration,

    /// How often the service purges what has passed its `expire_time` and
    /// forgets expired request ids, in small batches.
    #[arg(long, global = true, env = "PURGE_INTERVAL", default_value = "1m", value_parser = humantime::parse_duration)]
    pub purge_interval: Duration,

    /// How long a request id is remembered: a retry within it has no second
    /// effect.
    #[arg(long, global = true, env = "REQUEST_ID_RETENTION", default_value = "24h", value_parser = humantime::parse_duration)]
    pub request_id_retention: Duration,

    /// How long change events are kept: a WatchUsers resume token stays
    /// good this long.
    #[arg(long, global = true, env = "EVENT_RETENTION", default_value = "7days", value_parser = humantime::parse_duration)]
    pub event_retention: Duration,

    /// A WatchUsers stream sends a response (without events when nothing
    /// happened) at least this often.
    #[arg(long, global = true, env = "WATCH_HEARTBEAT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub watch_heartbeat: Duration,

    /// WatchUsers streams open at once on this replica (each caller at most
    /// 100 of them); more are refused with RESOURCE_EXHAUSTED.
    #[arg(long, global = true, env = "MAX_WATCHERS", default_value_t = 1000)]
    pub max_watchers: usize,

    /// NATS server to relay every change event to (JetStream, subject
    /// `users.v1.events.<tenant>.<user>.<type>`); no relay when unset.
    #[arg(long, global = true, env = "NATS_URL")]
    pub nats_url: Option<String>,

    /// The JetStream stream the relay publishes to; created when missing.
    #[arg(
        long,
        global = true,
        env = "NATS_STREAM",
        default_value = "USERS_EVENTS"
    )]
    pub nats_stream: String,

    /// The duplicate window of the stream, when the relay creates it.
    #[arg(long, global = true, env = "NATS_DUPLICATE_WINDOW", default_value = "2m", value_parser = humantime::parse_duration)]
    pub nats_duplicate_window: Duration,

    /// Calls per second allowed to each caller (API key, end user, or address
    /// of unauthenticated calls); 0 switches per-caller limiting off.
    #[arg(long, global = true, env = "RATE_LIMIT_PER_SECOND", default_value_t = DEFAULT_RATE_LIMIT)]
    pub rate_limit_per_second: u32,

    /// Calls a caller may make at once above its rate [default: the rate].
    #[arg(long, global = true, env = "RATE_LIMIT_BURST")]
    pub rate_limit_burst: Option<u32>,

    /// Redis that keeps the per-caller rate limits of every replica (one
    /// count per caller across replicas); none: each replica limits alone.
    #[arg(long, global = true, env = "REDIS_URL")]
    pub redis_url: Option<String>,

    /// Longest wait for Redis' answer to a rate-limit check; a later one is
    /// decided by the replica alone, and three in a row count as Redis down
    /// (the replica limits alone until Redis answers in time again).
    #[arg(long, global = true, env = "REDIS_TIMEOUT", default_value = "5ms", value_parser = humantime::parse_duration)]
    pub redis_timeout: Duration,

    /// Replicas that share the rate limits: while Redis is down, each limits
    /// a caller alone at the rate over this.
    #[arg(long, global = true, env = "REPLICAS_HINT", default_value_t = NonZeroU32::MIN)]
    pub replicas_hint: NonZeroU32,

    /// Calls in progress at once, over all callers; more are shed with UNAVAILABLE.
    #[arg(long, global = true, env = "MAX_IN_FLIGHT", default_value_t = 512)]
    pub max_in_flight: usize,

    /// Largest request message accepted, in bytes.
    #[arg(long, global = true, env = "MAX_REQUEST_BYTES", default_value_t = 4 * 1024 * 1024)]
    pub max_request_bytes: usize,

    /// Longest a call may run, whatever deadline the client sets.
    #[arg(long, global = true, env = "MAX_CALL_DURATION", default_value = "30s", value_parser = humantime::parse_duration)]
    pub max_call_duration: Duration,

    /// Longest wait for a call's request message once its headers are in;
    /// past it the call is answered DEADLINE_EXCEEDED.
    #[arg(long, global = true, env = "REQUEST_READ_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub request_read_timeout: Duration,

    /// A streamed response (ExportUsers) whose client reads nothing for this
    /// long is ended with DEADLINE_EXCEEDED, releasing what it holds.
    #[arg(long, global = true, env = "STREAM_STALL_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub stream_stall_timeout: Duration,

    /// Client connections open at once; one more is closed as soon as it is
    /// accepted.
    #[arg(long, global = true, env = "MAX_CONNECTIONS", default_value_t = 4096)]
    pub max_connections: usize,

    /// Calls open at once on one connection (HTTP/2 MAX_CONCURRENT_STREAMS).
    #[arg(
        long,
        global = true,
        env = "MAX_CONCURRENT_STREAMS",
        default_value_t = 128
    )]
    pub max_concurrent_streams: u32,

    /// A connection with no call for this long is closed (GOAWAY); clients
    /// reconnect when they next call.
    #[arg(long, global = true, env = "CONNECTION_IDLE_TIMEOUT", default_value = "5m", value_parser = humantime::parse_duration)]
    pub connection_idle_timeout: Duration,

    /// How often the server pings each connection's peer (HTTP/2 PING).
    #[arg(long, global = true, env = "KEEPALIVE_INTERVAL", default_value = "60s", value_parser = humantime::parse_duration)]
    pub keepalive_interval: Duration,

    /// A connection whose peer does not answer a ping within this is closed.
    #[arg(long, global = true, env = "KEEPALIVE_TIMEOUT", default_value = "20s", value_parser = humantime::parse_duration)]
    pub keepalive_timeout: Duration,

    /// How long a verified API key is trusted before it is looked up again;
    /// a revoked key stops working within this time.
    #[arg(long, global = true, env = "KEY_CACHE_TTL", default_value = "5s", value_parser = humantime::parse_duration)]
    pub key_cache_ttl: Duration,

    /// Failed authentications per second allowed to each address (IPv6: each
    /// /64), with bursts of three seconds' worth. Past it, a key id this
    /// replica has never seen is refused without a database lookup.
    #[arg(long, global = true, env = "AUTH_FAILURES_PER_SECOND", default_value_t = DEFAULT_AUTH_FAILURES)]
    pub auth_failures_per_second: NonZeroU32,

    /// Do not serve gRPC reflection.
    #[arg(long, global = true, env = "DISABLE_REFLECTION")]
    pub disable_reflection: bool,

    /// Issuer (`iss`) of end-user JWTs; setting it enables end-user tokens.
    #[arg(long, global = true, env = "JWT_ISSUER")]
    pub jwt_issuer: Option<String>,

    /// Audience (`aud`) end-user JWTs must carry.
    #[arg(
        long,
        global = true,
        env = "JWT_AUDIENCE",
        default_value = "users-service"
    )]
    pub jwt_audience: String,

    /// The one algorithm end-user JWTs may be signed with.
    #[arg(long, global = true, env = "JWT_ALGORITHM", value_enum, default_value_t = JwtAlgorithm::Rs256)]
    pub jwt_algorithm: JwtAlgorithm,

    /// PEM public key of the identity provider (RS256, ES256).
    #[arg(long, global = true, env = "JWT_KEY_FILE")]
    pub jwt_key_file: Option<PathBuf>,

    /// Shared secret (HS256), at least 32 bytes.
    #[arg(long, global = true, env = "JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,

    /// URL (http or https) of the identity provider's key set (JWKS): tokens
    /// are verified with the key their `kid` names, RS256 or ES256, and the
    /// set is followed as it rotates. Instead of --jwt-key-file.
    #[arg(long, global = true, env = "JWT_JWKS_URL", conflicts_with_all = ["jwt_key_file", "jwt_jwks_file"])]
    pub jwt_jwks_url: Option<String>,

    /// A file holding the identity provider's key set (JWKS), read again as
    /// the URL would be. Instead of --jwt-key-file.
    #[arg(
        long,
        global = true,
        env = "JWT_JWKS_FILE",
        conflicts_with = "jwt_key_file"
    )]
    pub jwt_jwks_file: Option<PathBuf>,

    /// The longest between two reads of the key set (its Cache-Control
    /// max-age makes it sooner).
    #[arg(long, global = true, env = "JWT_JWKS_REFRESH", default_value = "5m", value_parser = humantime::parse_duration)]
    pub jwt_jwks_refresh: Duration,

    /// The claim of an end-user token that grants it a role: `admin`,
    /// `editor` or `viewer`, as a string or in an array (the highest
    /// counts). Without it, end-user tokens read and change only their own
    /// user.
    #[arg(long, global = true, env = "JWT_ROLES_CLAIM")]
    pub jwt_roles_claim: Option<String>,

    /// The claim of an end-user token that names the tenant (its id) of an
    /// `editor` or `viewer` role; a token without it keeps only its own user.
    #[arg(
        long,
        global = true,
        env = "JWT_TENANT_CLAIM",
        requires = "jwt_roles_claim"
    )]
    pub jwt_tenant_claim: Option<String>,

    /// Address of the Prometheus `/metrics` endpoint (off when not set),
    /// for example 127.0.0.1:9090.
    #[arg(long, global = true, env = "METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,

    /// Serve `/metrics` with the TLS of --tls-cert (and, with
    /// --tls-client-ca, only to clients with a certificate), not plaintext.
    #[arg(long, global = true, env = "METRICS_TLS", requires = "tls_cert")]
    pub metrics_tls: bool,

    /// A plaintext port that answers only grpc.health.v1.Health, for probes
    /// that cannot present a client certificate (e.g. 0.0.0.0:50052).
    #[arg(long, global = true, env = "HEALTH_LISTEN")]
    pub health_listen: Option<SocketAddr>,

    /// PEM certificate chain: the gRPC port serves TLS. Read again when the
    /// file changes or on SIGHUP; open connections keep theirs.
    #[arg(long, global = true, env = "TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key of --tls-cert.
    #[arg(long, global = true, env = "TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// PEM certificates of the CA that signs client certificates: every
    /// client must present one (mutual TLS).
    #[arg(long, global = true, env = "TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,

    /// An origin (scheme://host[:port]) whose web pages may call the service
    /// through gRPC-Web (repeatable; in the environment, comma-separated).
    /// Without one, browsers' cross-origin calls are refused.
    #[arg(
        long = "cors-allowed-origin",
        global = true,
        env = "CORS_ALLOWED_ORIGINS",
        value_delimiter = ','
    )]
    pub cors_allowed_origins: Vec<String>,

    /// OTLP/gRPC collector that receives the traces (e.g.
    /// http://otel-collector:4317); none: no traces. The other OTEL_*
    /// variables are honoured as the OpenTelemetry SDKs do.
    #[arg(long, global = true, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,

    /// Log line format.
    #[arg(long, global = true, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

impl Config {
    /// The defaults, as if no flag or variable was given.
    pub fn with_defaults() -> Self {
        Self {
            listen: DEFAULT_LISTEN.parse().expect("valid default address"),
            database_url: None,
            database_replica_urls: Vec::new(),
            max_replica_lag: Duration::from_secs(1),
            data_dir: PathBuf::from(DEFAULT_DATA_DIR),
            db_pool_size: None,
            db_connect_timeout: Duration::from_secs(3),
            db_acquire_timeout: Duration::from_secs(3),
            db_statement_timeout: Duration::from_secs(10),
            db_startup_timeout: Duration::from_secs(60),
            health_interval: Duration::from_secs(1),
            shutdown_grace: Duration::from_secs(10),
            delete_retention: Duration::from_secs(30 * 24 * 3600),
            purge_interval: Duration::from_secs(60),
            request_id_retention: Duration::from_secs(24 * 3600),
            event_retention: Duration::from_secs(7 * 24 * 3600),
            watch_heartbeat: Duration::from_secs(10),
            max_watchers: 1000,
            nats_url: None,
            nats_stream: "USERS_EVENTS".to_owned(),
            nats_duplicate_window: Duration::from_secs(120),
            log_format: LogFormat::Text,
            metrics_listen: None,
            metrics_tls: false,
            health_listen: None,
            tls_cert: None,
            tls_key: None,
            tls_client_ca: None,
            cors_allowed_origins: Vec::new(),
            otlp_endpoint: None,
            rate_limit_per_second: DEFAULT_RATE_LIMIT,
            rate_limit_burst: None,
            redis_url: None,
            redis_timeout: Duration::from_millis(5),
            replicas_hint: NonZeroU32::MIN,
            max_in_flight: 512,
            max_request_bytes: 4 * 1024 * 1024,
            max_call_duration: Duration::from_secs(30),
            request_read_timeout: Duration::from_secs(10),
            stream_stall_timeout: Duration::from_secs(10),
            max_connections: 4096,
            max_concurrent_streams: 128,
            connection_idle_timeout: Duration::from_secs(300),
            keepalive_interval: Duration::from_secs(60),
            keepalive_timeout: Duration::from_secs(20),
            key_cache_ttl: Duration::from_secs(5),
            auth_failures_per_second: DEFAULT_AUTH_FAILURES,
            disable_reflection: false,
            jwt_issuer: None,
            jwt_audience: "users-service".to_owned(),
            jwt_algorithm: JwtAlgorithm::Rs256,
            jwt_key_file: None,
            jwt_secret: None,
            jwt_jwks_url: None,
            jwt_jwks_file: None,
            jwt_jwks_refresh: Duration::from_secs(300),
            jwt_roles_claim: None,
            jwt_tenant_claim: None,
        }
    }

    /// End-user token settings, when an issuer is configured.
    pub fn jwt(&self) -> Option<JwtSettings> {
        Some(JwtSettings {
            algorithm: self.jwt_algorithm,
            issuer: self.jwt_issuer.clone()?,
            audience: self.jwt_audience.clone(),
            key_file: self.jwt_key_file.clone(),
            secret: self.jwt_secret.clone(),
            roles_claim: self.jwt_roles_claim.clone(),
            tenant_claim: self.jwt_tenant_claim.clone(),
            jwks: self
                .jwt_jwks_url
                .clone()
                .map(Source::Url)
                .or_else(|| self.jwt_jwks_file.clone().map(Source::File))
                .map(|source| (source, self.jwt_jwks_refresh)),
        })
    }

    /// The files of the gRPC port's TLS, when it serves TLS.
    pub fn tls(&self) -> Option<crate::net::tls::TlsFiles> {
        Some(crate::net::tls::TlsFiles {
            cert: self.tls_cert.clone()?,
            key: self.tls_key.clone()?,
            client_ca: self.tls_client_ca.clone(),
        })
    }

    /// How long to wait for the database at start.
    pub fn patience(&self) -> Patience {
        Patience {
            connect_timeout: self.db_connect_timeout,
            startup_timeout: self.db_startup_timeout,
        }
    }

    /// Limits on client connections.
    pub fn connection_limits(&self) -> ConnectionLimits {
        ConnectionLimits {
            max_connections: self.max_connections.max(1),
            max_concurrent_streams: self.max_concurrent_streams.max(1),
            max_header_list_bytes: MAX_HEADER_LIST_BYTES,
            idle_timeout: self.connection_idle_timeout,
            keepalive_interval: self.keepalive_interval,
            keepalive_timeout: self.keepalive_timeout,
            // gRPC-Web's text encoding is base64: a third larger.
            max_http1_body_bytes: self.max_request_bytes.saturating_mul(4) / 3 + 1024,
            http1_body_timeout: self.request_read_timeout,
        }
    }

    /// How many failed authentications an address may have.
    pub fn auth_failure_budget(&self) -> FailureBudget {
        FailureBudget {
            per_second: self.auth_failures_per_second,
            burst: self
                .auth_failures_per_second
                .saturating_mul(NonZeroU32::new(3).expect("not zero")),
        }
    }

    pub fn pool_settings(&self) -> PoolSettings {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        PoolSettings {
            max_size: self.db_pool_size.unwrap_or((cores * 2).max(4)),
            connect_timeout: self.db_connect_timeout,
            acquire_timeout: self.db_acquire_timeout,
            statement_timeout: self.db_statement_timeout,
        }
    }
}
