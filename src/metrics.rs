//! Prometheus metrics, served on their own port (`--metrics-listen`), with
//! the go-grpc-prometheus names so existing dashboards work.

use std::{sync::Arc, time::Duration};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

use crate::code::code_name;
use crate::methods::Method;

/// How the database pool's connections are used right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolGauges {
    pub in_use: usize,
    pub idle: usize,
    /// Callers waiting for a connection.
    pub waiting: usize,
}

/// Buckets of `grpc_server_handling_seconds` (Prometheus' defaults, as
/// go-grpc-prometheus uses).
const HANDLING_BUCKETS: [f64; 11] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabels {
    grpc_type: &'static str,
    grpc_service: &'static str,
    grpc_method: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HandledLabels {
    grpc_type: &'static str,
    grpc_service: &'static str,
    grpc_method: &'static str,
    grpc_code: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BatchLabels {
    batch: &'static str,
}

/// Buckets of `users_service_db_batch_items`: powers of two up to the
/// largest batch.
const BATCH_BUCKETS: [f64; 8] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0];

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StandbyLabels {
    standby: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReadLabels {
    from: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ChannelLabels {
    channel: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: &'static str,
}

/// Why a call was turned away before reaching a handler.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    /// Over its caller's quota.
    RateLimit,
    /// Over the global in-flight limit.
    LoadShed,
    /// From an address with too many failed authentications lately.
    AuthFailures,
}

/// The service's metrics, one registry per server.
pub struct Metrics {
    registry: Registry,
    started: Family<MethodLabels, Counter>,
    handled: Family<HandledLabels, Counter>,
    handling: Family<MethodLabels, Histogram, fn() -> Histogram>,
    rejections: Family<ReasonLabels, Counter>,
    pool: Family<StateLabels, Gauge>,
    batches: Family<BatchLabels, Histogram, fn() -> Histogram>,
    connections: Gauge,
    refused_connections: Counter,
    database_ready: Gauge,
    database_outages: Counter,
    rate_limits_shared: Gauge,
    events: Counter,
    watchers: Gauge,
    relay_lag_events: Gauge,
    relay_lag_seconds: Gauge<f64, std::sync::atomic::AtomicU64>,
    replica_lag: Family<StandbyLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    replica_usable: Family<StandbyLabels, Gauge>,
    reads: Family<ReadLabels, Counter>,
    notifications: Family<ChannelLabels, Counter>,
    tls_handshake_failures: Counter,
    tls_reloads: Family<ResultLabels, Counter>,
    tls_not_after: Gauge,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let started = Family::<MethodLabels, Counter>::default();
        let handled = Family::<HandledLabels, Counter>::default();
        let handling: Family<MethodLabels, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(|| Histogram::new(HANDLING_BUCKETS));
        let rejections = Family::<ReasonLabels, Counter>::default();
        let pool = Family::<StateLabels, Gauge>::default();
        let batches: Family<BatchLabels, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(|| Histogram::new(BATCH_BUCKETS));
        let connections = Gauge::default();
        let refused_connections = Counter::default();
        let database_ready = Gauge::default();
        let database_outages = Counter::default();
        let rate_limits_shared = Gauge::default();
        let events = Counter::default();
        let watchers = Gauge::default();
        let relay_lag_events = Gauge::default();
        let relay_lag_seconds = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        let replica_lag =
            Family::<StandbyLabels, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
        let replica_usable = Family::<StandbyLabels, Gauge>::default();
        let reads = Family::<ReadLabels, Counter>::default();
        let notifications = Family::<ChannelLabels, Counter>::default();
        let tls_handshake_failures = Counter::default();
        let tls_reloads = Family::<ResultLabels, Counter>::default();
        let tls_not_after = Gauge::default();
        let build = Family::<BuildLabels, Gauge>::default();
        build
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION"),
            })
            .set(1);
        registry.register(
            "grpc_server_started",
            "Total number of RPCs started on the server",
            started.clone(),
        );
        registry.register(
            "grpc_server_handled",
            "Total number of RPCs completed on the server, regardless of success or failure",
            handled.clone(),
        );
        registry.register(
            "grpc_server_handling_seconds",
            "Histogram of response latency (seconds) of gRPC that had been application-level handled by the server",
            handling.clone(),
        );
        registry.register(
            "users_service_rejected_calls",
            "Calls turned away before a handler: over a caller's rate limit, or shed over the in-flight limit",
            rejections.clone(),
        );
        registry.register(
            "users_service_db_pool_connections",
            "Database pool connections by state: in_use, idle, and callers waiting for one",
            pool.clone(),
        );
        registry.register(
            "users_service_db_batch_items",
            "Calls served by one statement, by kind of batch: concurrent calls that wait for the database together are folded into one",
            batches.clone(),
        );
        registry.register(
            "users_service_connections",
            "Client connections open now",
            connections.clone(),
        );
        registry.register(
            "users_service_refused_connections",
            "Client connections closed as soon as they were accepted, because --max-connections were open",
            refused_connections.clone(),
        );
        registry.register(
            "users_service_database_ready",
            "1 while the database answers (readiness SERVING), 0 while it does not",
            database_ready.clone(),
        );
        registry.register(
            "users_service_rate_limits_shared",
            "With --redis-url: 1 while the rate limits are counted in Redis for every replica, 0 while this replica limits alone",
            rate_limits_shared.clone(),
        );
        registry.register(
            "users_service_database_outages",
            "Times the database stopped answering (readiness turned NOT_SERVING)",
            database_outages.clone(),
        );
        registry.register(
            "users_service_events",
            "Change events committed, as the change feed read them (its rate: events written per second)",
            events.clone(),
        );
        registry.register(
            "users_service_watchers",
            "WatchUsers streams open now",
            watchers.clone(),
        );
        registry.register(
            "users_service_relay_lag_events",
            "About how many change events committed that NATS JetStream has not acknowledged (on the replica that relays or tries to; 0 on the others)",
            relay_lag_events.clone(),
        );
        registry.register(
            "users_service_relay_lag_seconds",
            "Age of the oldest change event not yet acknowledged by NATS JetStream; 0 when caught up",
            relay_lag_seconds.clone(),
        );
        registry.register(
            "users_service_replica_lag_seconds",
            "With --database-replica-url: how far each standby's replay is behind the primary, as last measured",
            replica_lag.clone(),
        );
        registry.register(
            "users_service_replica_usable",
            "With --database-replica-url: 1 while a standby is read from (reachable, replaying, within --max-replica-lag), else 0",
            replica_usable.clone(),
        );
        registry.register(
            "users_service_reads",
            "GetUser, ListUsers and ExportUsers calls by the server they read from (primary or standby)",
            reads.clone(),
        );
        registry.register(
            "users_service_notifications",
            "Database notifications received, by channel (user_events: the change feed; api_keys: key revocations and changes)",
            notifications.clone(),
        );
        registry.register(
            "users_service_tls_handshake_failures",
            "With --tls-cert: connections closed because their TLS handshake failed or took over 10 s (no or a wrong client certificate, a client that does not trust ours)",
            tls_handshake_failures.clone(),
        );
        registry.register(
            "users_service_tls_reloads",
            "With --tls-cert: times the TLS files changed and were put in use (ok) or could not be used (failed; the last good ones stay)",
            tls_reloads.clone(),
        );
        registry.register(
            "users_service_tls_certificate_expiry_timestamp_seconds",
            "With --tls-cert: when the certificate in use expires, in seconds since the epoch",
            tls_not_after.clone(),
        );
        registry.register(
            "users_service_build_info",
            "Always 1; the labels describe the running build",
            build,
        );
        Self {
            registry,
            started,
            handled,
            handling,
            rejections,
            pool,
            batches,
            connections,
            refused_connections,
            database_ready,
            database_outages,
            rate_limits_shared,
            events,
            watchers,
            relay_lag_events,
            relay_lag_seconds,
            replica_lag,
            replica_usable,
            reads,
            notifications,
            tls_handshake_failures,
            tls_reloads,
            tls_not_after,
        }
    }

    pub fn tls_handshake_failed(&self) {
        self.tls_handshake_failures.inc();
    }

    /// A reload of the TLS files, and the expiry of the certificate in use.
    pub fn tls_reloaded(&self, ok: bool, not_after: i64) {
        self.tls_reloads
            .get_or_create(&ResultLabels {
                result: if ok { "ok" } else { "failed" },
            })
            .inc();
        self.tls_not_after.set(not_after);
    }

    /// The expiry of the certificate loaded at start.
    pub fn tls_loaded(&self, not_after: i64) {
        self.tls_not_after.set(not_after);
    }

    /// A standby's replay lag, when it could be measured, and whether
    /// reads go to it.
    pub fn replica(&self, standby: &str, lag: Option<Duration>, usable: bool) {
        let labels = StandbyLabels {
            standby: standby.to_owned(),
        };
        if let Some(lag) = lag {
            self.replica_lag
                .get_or_create(&labels)
                .set(lag.as_secs_f64());
        }
        self.replica_usable
            .get_or_create(&labels)
            .set(i64::from(usable));
    }

    /// A read went to a standby (`true`) or to the primary.
    pub fn read_from(&self, standby: bool) {
        let from = if standby { "standby" } else { "primary" };
        self.reads.get_or_create(&ReadLabels { from }).inc();
    }

    /// A notification arrived on `channel`.
    pub fn notified(&self, channel: &'static str) {
        self.notifications
            .get_or_create(&ChannelLabels { channel })
            .inc();
    }

    /// The change feed read this many new events.
    pub fn events_read(&self, events: u64) {
        self.events.inc_by(events);
    }

    /// The gauge of open WatchUsers streams, for the feed to move.
    pub fn watchers(&self) -> Gauge {
        self.watchers.clone()
    }

    /// Where the relay to NATS stands: events not yet acknowledged, and the
    /// age of the oldest of them.
    pub fn relay_lag(&self, events: i64, seconds: f64) {
        self.relay_lag_events.set(events);
        self.relay_lag_seconds.set(seconds);
    }

    /// Readiness changed: the database answers (`true`) or stopped (`false`).
    /// Whether the rate limits are shared through Redis now.
    pub fn rate_limits_shared(&self, shared: bool) {
        self.rate_limits_shared.set(i64::from(shared));
    }

    pub fn database_ready(&self, ready: bool) {
        self.database_ready.set(i64::from(ready));
        if !ready {
            self.database_outages.inc();
        }
    }

    /// Counts a connection as open until the guard is dropped.
    pub fn connection_opened(&self) -> ConnectionGuard {
        self.connections.inc();
        ConnectionGuard(self.connections.clone())
    }

    pub fn connection_refused(&self) {
        self.refused_connections.inc();
    }

    /// The histogram of batch sizes of one kind of batch.
    pub fn batch_items(&self, batch: &'static str) -> Histogram {
        self.batches.get_or_create(&BatchLabels { batch }).clone()
    }

    /// Counts a call as started; the labels it returns go to [`Self::call_handled`].
    pub fn call_started(&self, method: &'static Method) -> CallLabels {
        let labels = MethodLabels {
            grpc_type: method.kind.as_str(),
            grpc_service: &method.service,
            grpc_method: &method.name,
        };
        self.started.get_or_create(&labels).inc();
        CallLabels(labels)
    }

    pub fn call_handled(
        &self,
        CallLabels(labels): CallLabels,
        code: tonic::Code,
        elapsed: Duration,
    ) {
        self.handling
            .get_or_create(&labels)
            .observe(elapsed.as_secs_f64());
        self.handled
            .get_or_create(&HandledLabels {
                grpc_type: labels.grpc_type,
                grpc_service: labels.grpc_service,
                grpc_method: labels.grpc_method,
                grpc_code: code_name(code),
            })
            .inc();
    }

    pub fn rejected(&self, why: Rejection) {
        let reason = match why {
            Rejection::RateLimit => "rate_limit",
            Rejection::LoadShed => "load_shed",
            Rejection::AuthFailures => "auth_failures",
        };
        self.rejections
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    /// The text exposition, with the pool gauges as `pool` reads them now.
    pub fn render(&self, pool: PoolGauges) -> String {
        for (state, value) in [
            ("in_use", pool.in_use),
            ("idle", pool.idle),
            ("waiting", pool.waiting),
        ] {
            self.pool
                .get_or_create(&StateLabels { state })
                .set(i64::try_from(value).unwrap_or(i64::MAX));
        }
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)
            .expect("writing to a String cannot fail");
        text
    }
}

/// An open connection, counted in `users_service_connections` until dropped.
#[derive(Debug)]
pub struct ConnectionGuard(Gauge);

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// The labels of one call's method, worked out once when it starts.
#[derive(Debug)]
pub struct CallLabels(MethodLabels);

/// Serves `GET /metrics` on `listener` until `shutdown` completes; `pool`
/// reads the database pool's gauges at each scrape.
pub async fn serve<L>(
    listener: L,
    metrics: Arc<Metrics>,
    pool: impl Fn() -> PoolGauges + Clone + Send + Sync + 'static,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()>
where
    L: axum::serve::Listener,
    L::Addr: std::fmt::Debug,
{
    use axum::{Router, http::header, routing::get};
    let app = Router::new().route(
        "/metrics",
        get(move || {
            let text = metrics.render(pool());
            async move {
                (
                    [(
                        header::CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    text,
                )
            }
        }),
    );
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}
