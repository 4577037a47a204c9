//! Builds the server: database, migrations, bootstrap key, services, health,
//! reflection and layers; binds the listener and reports the real address.

use std::{future::Future, net::SocketAddr, num::NonZeroU32, sync::Arc, time::Duration};

use tokio::net::TcpListener;
use tonic::service::Routes;
use tonic_health::ServingStatus;
use tonic_web::GrpcWebLayer;
use tower::ServiceBuilder;

use crate::auth::{authenticator::Authenticator, jwt::JwtVerifier, keys};
use crate::clock::{self, Clock};
use crate::config::Config;
use crate::grpc::{AppState, keys::KeysApi, tenants::TenantsApi, users::UsersApi};
use crate::health;
use crate::layers::{
    auth::AuthLayer, call_log::CallLogLayer, deadline::DeadlineLayer,
    in_flight::InFlightLimitLayer, read_request::ReadRequestLayer,
};
use crate::metrics::{self, Metrics};
use crate::net::{self, tls::Tls};
use crate::pb::{
    self,
    v1::{
        keys_service_server::KeysServiceServer, tenants_service_server::TenantsServiceServer,
        users_service_server::UsersServiceServer,
    },
};
use crate::quota::{CallerQuotas, Quotas};
use crate::shared_quota::{SharedQuotas, SharedSettings};
use crate::store::{
    coalesce::{Batch, Coalescer},
    database::{Database, OpenError, Sharing},
    db,
    standby::{self, Standby, Standbys},
    tenants,
    users::FindUsers,
};

pub use crate::store::database::EMBEDDED_DATABASE;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The shortest heartbeat of a watch stream: shorter would be a busy loop.
const MIN_WATCH_HEARTBEAT: Duration = Duration::from_millis(100);
/// How long the answers to abandoned calls get to go out at shutdown.
const FLUSH_ANSWERS: Duration = Duration::from_millis(500);
/// Longest wait at shutdown for Postgres to confirm the cancels of
/// abandoned statements.
const WAIT_FOR_CANCELS: Duration = Duration::from_secs(5);

/// Why the service could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Open(#[from] OpenError),
    #[error("cannot prepare the database: {0}")]
    Database(#[source] BoxError),
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("server error: {0}")]
    Serve(#[source] BoxError),
}

/// A server that is ready: database migrated, listener bound.
#[derive(Debug)]
pub struct Application {
    listener: TcpListener,
    local_addr: SocketAddr,
    state: AppState,
    database: Database,
    authenticator: Arc<Authenticator>,
    limits: Option<Arc<CallerQuotas>>,
    metrics: Arc<Metrics>,
    metrics_listener: Option<TcpListener>,
    /// The plaintext port of health alone (`--health-listen`).
    health_listener: Option<TcpListener>,
    /// The gRPC port's TLS, following its files.
    tls: Option<Arc<Tls>>,
    /// CORS for the browser origins allowed, when there are any.
    cors: Option<tower_http::cors::CorsLayer>,
    /// Asks the health probe to look at the database now.
    health_wake: Arc<tokio::sync::Notify>,
    /// The key set of end-user tokens, to follow, and the max-age of its
    /// first read.
    jwks: Option<(Arc<crate::auth::jwks::Jwks>, Option<Duration>)>,
    config: Config,
}

impl Application {
    pub async fn build(config: &Config) -> Result<Self, StartError> {
        Self::build_with_clock(config, clock::system()).await
    }

    /// As [`Application::build`], with the time read from `clock` instead of
    /// the system's (tests use one they move by hand).
    pub async fn build_with_clock(config: &Config, clock: Clock) -> Result<Self, StartError> {
        let tls = config
            .tls()
            .map(|files| Tls::load(files).map(Arc::new))
            .transpose()
            .map_err(|e| StartError::Config(format!("TLS: {e}")))?;
        let cors = cors(&config.cors_allowed_origins)?;
        let jwt = config
            .jwt()
            .map(|settings| JwtVerifier::new(&settings))
            .transpose()
            .map_err(StartError::Config)?;
        // The identity provider's key set, read once before serving: a file
        // that cannot be read is a mistake to say now; a URL that does not
        // answer is tried again in the background (tokens are refused
        // meanwhile).
        let jwks = match jwt.as_ref().and_then(JwtVerifier::jwks) {
            Some(jwks) => match jwks.refresh(Duration::ZERO).await {
                Ok(max_age) => Some((Arc::clone(jwks), max_age)),
                Err(error) if config.jwt_jwks_file.is_some() => {
                    return Err(StartError::Config(format!("--jwt-jwks-file: {error}")));
                }
                Err(_) => Some((Arc::clone(jwks), None)),
            },
            None => None,
        };

        // The embedded cluster's supervisor wakes the health probe when
        // postgres dies and when it is back; the pool wakes it when a
        // connection cannot be opened.
        let health_wake = Arc::new(tokio::sync::Notify::new());
        let database = Database::open(
            config.database_url.as_deref(),
            &config.data_dir,
            Sharing::Exclusive,
            config.patience(),
            Some(Arc::clone(&health_wake)),
        )
        .await?;
        let pool = db::build_pool(
            database.config.clone(),
            &config.pool_settings(),
            Some(Arc::clone(&health_wake)),
        )
        .map_err(StartError::Database)?;
        let metrics = Arc::new(Metrics::new());
        let limits = NonZeroU32::new(config.rate_limit_per_second)
            .map(|per_second| {
                let burst = config
                    .rate_limit_burst
                    .and_then(NonZeroU32::new)
                    .unwrap_or(per_second);
                let Some(url) = config.redis_url.clone() else {
                    return Ok(Arc::new(CallerQuotas::Local(Quotas::new(
                        per_second, burst,
                    ))));
                };
                let settings = SharedSettings {
                    url,
                    timeout: config.redis_timeout,
                    replicas: config.replicas_hint,
                };
                let metrics = Arc::clone(&metrics);
                SharedQuotas::new(per_second, burst, settings, move |shared| {
                    metrics.rate_limits_shared(shared)
                })
                .map(|quotas| Arc::new(CallerQuotas::Shared(Box::new(quotas))))
                .map_err(|error| StartError::Config(format!("--redis-url: {error}")))
            })
            .transpose()?;
        let state = {
            let mut conn = pool
                .get()
                .await
                .map_err(|e| StartError::Database(e.into()))?;
            let default_tenant = tenants::default_id(&mut conn)
                .await
                .map_err(|e| StartError::Database(e.into()))?;
            let mut state =
                AppState::new(pool, default_tenant, &metrics, clock, config.max_watchers);
            state.stream_stall_timeout = config.stream_stall_timeout;
            state.retention = retention(config)?;
            if config.watch_heartbeat < MIN_WATCH_HEARTBEAT {
                return Err(StartError::Config(
                    "--watch-heartbeat must be at least 100ms".into(),
                ));
            }
            state.watch_heartbeat = config.watch_heartbeat;
            state.standbys = Arc::new(standbys(config, &metrics)?);
            if let Some(path) = keys::bootstrap(&mut conn, &config.data_dir, state.now())
                .await
                .map_err(StartError::Database)?
            {
                tracing::warn!(
                    path = %path.display(),
                    "no API keys existed: created an admin key, its token is in this file"
                );
            }
            state
        };
        let authenticator = Arc::new(Authenticator::new(
            state.pool.clone(),
            jwt,
            config.key_cache_ttl,
            config.auth_failure_budget(),
            Arc::clone(&state.clock),
        ));

        let listener =
            TcpListener::bind(config.listen)
                .await
                .map_err(|source| StartError::Listen {
                    addr: config.listen,
                    source,
                })?;
        let local_addr = listener.local_addr().map_err(|source| StartError::Listen {
            addr: config.listen,
            source,
        })?;
        let metrics_listener = bind(config.metrics_listen).await?;
        let health_listener = bind(config.health_listen).await?;
        Ok(Self {
            listener,
            local_addr,
            state,
            database,
            authenticator,
            limits,
            metrics,
            metrics_listener,
            health_listener,
            tls,
            cors,
            health_wake,
            jwks,
            config: config.clone(),
        })
    }

    /// The address the server is bound to (the real port when asked for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The address of the `/metrics` endpoint, when it is on.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_listener
            .as_ref()
            .and_then(|listener| listener.local_addr().ok())
    }

    /// The address of the plaintext health port, when it is on.
    pub fn health_addr(&self) -> Option<SocketAddr> {
        self.health_listener
            .as_ref()
            .and_then(|listener| listener.local_addr().ok())
    }

    /// Serves until `shutdown` completes; then reports NOT_SERVING, closes
    /// the listener, sends GOAWAY on every connection, lets in-flight calls
    /// finish within the grace period, and stops the embedded Postgres.
    pub async fn run_until(self, shutdown: impl Future<Output = ()>) -> Result<(), StartError> {
        let (health, health_service) = tonic_health::server::health_reporter();
        health::set_all(&health, ServingStatus::Serving).await;
        self.metrics.database_ready(true);
        // Readiness follows the database from here on.
        let (stop_probe, probe_stopped) = tokio::sync::watch::channel(false);
        let metrics = Arc::clone(&self.metrics);
        let prober = tokio::spawn(health::follow_database(
            health.clone(),
            health::Probe {
                config: self.database.config.clone(),
                every: self.config.health_interval,
                timeout: self.config.db_connect_timeout,
            },
            Arc::clone(&self.health_wake),
            move |ready| metrics.database_ready(ready),
            probe_stopped,
        ));

        let purger = tokio::spawn(crate::purge::run(
            self.state.clone(),
            self.config.purge_interval,
            stop_probe.subscribe(),
        ));

        // The feed's reader and the relay have a connection each of their
        // own: they never wait for the pool, nor make a call wait.
        let own_connection = || {
            let mut settings = self.config.pool_settings();
            settings.max_size = 1;
            db::build_pool(self.database.config.clone(), &settings, None)
                .map_err(StartError::Database)
        };
        let metrics = Arc::clone(&self.metrics);
        let feed = tokio::spawn(Arc::clone(&self.state.hub).follow(
            own_connection()?,
            self.database.config.clone(),
            self.state.committed.clone(),
            move |events| metrics.events_read(events),
            {
                let metrics = Arc::clone(&self.metrics);
                move || metrics.notified(crate::grpc::watch::CHANNEL)
            },
            stop_probe.subscribe(),
        ));

        // A key revoked or changed through any replica is forgotten here
        // at once.
        let metrics = Arc::clone(&self.metrics);
        let key_changes = tokio::spawn(
            Arc::clone(&self.authenticator)
                .follow_key_changes(self.database.config.clone(), move || {
                    metrics.notified(crate::auth::authenticator::KEY_CHANGES)
                }),
        );

        let jwks = self
            .jwks
            .clone()
            .map(|(jwks, max_age)| tokio::spawn(jwks.follow(max_age)));

        // Which standbys reads may go to, measured all along.
        let metrics = Arc::clone(&self.metrics);
        let standbys_monitor = (!self.state.standbys.is_empty()).then(|| {
            tokio::spawn(Arc::clone(&self.state.standbys).monitor(
                self.database.config.clone(),
                self.config.max_replica_lag,
                self.config.db_connect_timeout,
                move |name, lag, usable| metrics.replica(name, lag, usable),
            ))
        });

        let relay = self.config.nats_url.clone().map(|url| {
            Ok::<_, StartError>(tokio::spawn(crate::relay::run(
                own_connection()?,
                self.database.config.clone(),
                crate::relay::RelaySettings {
                    url,
                    stream: self.config.nats_stream.clone(),
                    duplicate_window: self.config.nats_duplicate_window,
                },
                self.state.committed.clone(),
                Arc::clone(&self.metrics),
                stop_probe.subscribe(),
            )))
        });
        let relay = relay.transpose()?;

        let max_request = self.config.max_request_bytes;
        let users = UsersServiceServer::new(UsersApi::new(self.state.clone()))
            .max_decoding_message_size(max_request);
        let tenants = TenantsServiceServer::new(TenantsApi::new(self.state.clone()))
            .max_decoding_message_size(max_request);
        let keys = KeysServiceServer::new(KeysApi::new(self.state.clone()))
            .max_decoding_message_size(max_request);
        let mut routes = Routes::new(health_service.clone())
            .add_service(users)
            .add_service(tenants)
            .add_service(keys);
        let failed = |e: tonic_reflection::server::Error| StartError::Serve(e.into());
        if !self.config.disable_reflection {
            routes = routes
                .add_service(reflection().build_v1().map_err(failed)?)
                .add_service(reflection().build_v1alpha().map_err(failed)?);
        }
        // Outermost first: every call is logged and bounded in time; callers
        // are known before their request is read, and a call takes an
        // in-flight slot only once its request is in.
        // Turns true when the grace period is over: calls still running are
        // answered UNAVAILABLE then.
        let abandon = Arc::clone(&self.state.abandon);
        let abandoned = abandon.subscribe();
        let service = ServiceBuilder::new()
            // Browsers: their preflight requests are answered here, and
            // gRPC-Web calls become gRPC calls for every layer below.
            .option_layer(self.cors)
            .layer(GrpcWebLayer::new())
            .layer(CallLogLayer::new(Arc::clone(&self.metrics)))
            .layer(DeadlineLayer::new(self.config.max_call_duration, abandoned))
            .layer(AuthLayer::new(
                self.authenticator,
                self.limits,
                Arc::clone(&self.metrics),
            ))
            .layer(ReadRequestLayer::new(
                self.config.request_read_timeout,
                max_request,
            ))
            .layer(InFlightLimitLayer::new(
                self.config.max_in_flight,
                Arc::clone(&self.metrics),
            ))
            .service(routes.prepare());

        let (draining, draining_rx) = tokio::sync::watch::channel(false);
        let mut server = Box::pin(net::serve(
            self.listener,
            service,
            self.config.connection_limits(),
            Arc::clone(&self.metrics),
            self.tls.clone(),
            draining_rx.clone(),
        ));
        tracing::info!(addr = %self.local_addr, tls = self.tls.is_some(), "serving");
        let tls_follower =
            self.tls.clone().map(|tls| {
                self.metrics.tls_loaded(tls.not_after());
                let metrics = Arc::clone(&self.metrics);
                let followed = Arc::clone(&tls);
                tokio::spawn(tls.follow(move |outcome| {
                    metrics.tls_reloaded(outcome.is_ok(), followed.not_after())
                }))
            });
        // Health alone, in plaintext, for probes without a client
        // certificate; it drains with the main port.
        let health_server = self.health_listener.map(|listener| {
            if let Ok(addr) = listener.local_addr() {
                tracing::info!(%addr, "serving health in plaintext");
            }
            let mut routes = Routes::new(health_service);
            if !self.config.disable_reflection {
                routes = routes
                    .add_service(health_reflection().build_v1().map_err(failed)?)
                    .add_service(health_reflection().build_v1alpha().map_err(failed)?);
            }
            Ok::<_, StartError>(tokio::spawn(net::serve(
                listener,
                routes.prepare(),
                self.config.connection_limits(),
                Arc::clone(&self.metrics),
                None,
                draining_rx,
            )))
        });
        let health_server = health_server.transpose()?;

        let (metrics_stop, metrics_stopped) = tokio::sync::oneshot::channel::<()>();
        let metrics_server = self.metrics_listener.map(|listener| {
            if let Ok(addr) = listener.local_addr() {
                tracing::info!(%addr, "serving metrics on /metrics");
            }
            let pool = self.state.pool.clone();
            let gauges = move || {
                let status = pool.status();
                metrics::PoolGauges {
                    in_use: status.size.saturating_sub(status.available),
                    idle: status.available,
                    waiting: status.waiting,
                }
            };
            let stopped = async {
                let _ = metrics_stopped.await;
            };
            let metrics = Arc::clone(&self.metrics);
            match self.tls.clone().filter(|_| self.config.metrics_tls) {
                Some(tls) => tokio::spawn(metrics::serve(
                    net::tls::TlsListener { tcp: listener, tls },
                    metrics,
                    gauges,
                    stopped,
                )),
                None => tokio::spawn(metrics::serve(listener, metrics, gauges, stopped)),
            }
        });

        tokio::select! {
            () = &mut server => {}
            () = shutdown => {
                let grace = self.config.shutdown_grace;
                tracing::info!(?grace, "shutting down");
                let _ = stop_probe.send(true);
                let _ = prober.await;
                let _ = purger.await;
                // Watch streams end now, UNAVAILABLE: they would hold the
                // grace period up for nothing.
                let _ = feed.await;
                if let Some(relay) = relay {
                    let _ = relay.await;
                }
                health::set_all(&health, ServingStatus::NotServing).await;
                let _ = draining.send(true);
                if tokio::time::timeout(grace, &mut server).await.is_err() {
                    tracing::warn!("grace period over, cancelling the calls still running");
                    // Each call still running answers UNAVAILABLE; the answers
                    // get a moment to go out before the connections close.
                    let _ = abandon.send(true);
                    let _ = tokio::time::timeout(FLUSH_ANSWERS, &mut server).await;
                }
            }
        }
        // Ends every connection and call still open; their statements are
        // cancelled in Postgres, and the process waits for the cancels so
        // that nothing it started runs on after it has gone.
        drop(server);
        if let Some(health_server) = health_server {
            let _ = tokio::time::timeout(FLUSH_ANSWERS, health_server).await;
        }
        if let Some(tls_follower) = tls_follower {
            tls_follower.abort();
        }
        key_changes.abort();
        if let Some(jwks) = jwks {
            jwks.abort();
        }
        if let Some(monitor) = standbys_monitor {
            monitor.abort();
        }
        if !db::cancels_answered(WAIT_FOR_CANCELS).await {
            tracing::warn!("some statements could not be cancelled in time");
        }
        let _ = metrics_stop.send(());
        if let Some(metrics_server) = metrics_server {
            let _ = metrics_server.await;
        }
        self.state.pool.close();
        for standby in self.state.standbys.iter() {
            standby.pool.close();
        }
        self.database
            .close()
            .await
            .map_err(|e| StartError::Serve(e.into()))
    }
}

/// Binds `addr` when it is set.
async fn bind(addr: Option<SocketAddr>) -> Result<Option<TcpListener>, StartError> {
    match addr {
        Some(addr) => TcpListener::bind(addr)
            .await
            .map(Some)
            .map_err(|source| StartError::Listen { addr, source }),
        None => Ok(None),
    }
}

/// Request headers a browser may send: gRPC-Web's own, the credentials,
/// and the service's metadata.
const CORS_REQUEST_HEADERS: [&str; 9] = [
    "authorization",
    "content-type",
    "x-grpc-web",
    "x-user-agent",
    "grpc-timeout",
    crate::layers::call_log::REQUEST_ID_HEADER,
    standby::CONSISTENCY_HEADER,
    "traceparent",
    "tracestate",
];
/// Response headers a page may read: the call's status and the metadata
/// the service answers with.
const CORS_RESPONSE_HEADERS: [&str; 5] = [
    "grpc-status",
    "grpc-message",
    "grpc-status-details-bin",
    crate::layers::call_log::REQUEST_ID_HEADER,
    standby::CONSISTENCY_HEADER,
];
/// How long a browser may keep a preflight's answer.
const CORS_MAX_AGE: Duration = Duration::from_secs(3600);

/// CORS for the origins of `--cors-allowed-origin`: none, none allowed (the
/// layer is left out); `*`, any.
pub(crate) fn cors(origins: &[String]) -> Result<Option<tower_http::cors::CorsLayer>, StartError> {
    use http::{HeaderName, HeaderValue, Method};
    use tower_http::cors::{AllowOrigin, CorsLayer};
    if origins.is_empty() {
        return Ok(None);
    }
    let allowed = if origins.iter().any(|origin| origin == "*") {
        AllowOrigin::any()
    } else {
        let list = origins
            .iter()
            .map(|origin| {
                let invalid = || {
                    StartError::Config(format!(
                        "--cors-allowed-origin {origin:?} is not an origin (scheme://host[:port])"
                    ))
                };
                let url = url::Url::parse(origin).map_err(|_| invalid())?;
                let serialized = url.origin().ascii_serialization();
                // An origin has no path, query or user: what a browser sends
                // in its Origin header, exactly.
                if !matches!(url.scheme(), "http" | "https")
                    || serialized != origin.trim_end_matches('/')
                {
                    return Err(invalid());
                }
                HeaderValue::from_str(&serialized).map_err(|_| invalid())
            })
            .collect::<Result<Vec<_>, _>>()?;
        AllowOrigin::list(list)
    };
    Ok(Some(
        CorsLayer::new()
            .allow_origin(allowed)
            .allow_methods([Method::POST])
            .allow_headers(CORS_REQUEST_HEADERS.map(HeaderName::from_static))
            .expose_headers(CORS_RESPONSE_HEADERS.map(HeaderName::from_static))
            .max_age(CORS_MAX_AGE),
    ))
}

/// The standbys of `--database-replica-url`, each with its own pool.
fn standbys(config: &Config, metrics: &Metrics) -> Result<Standbys, StartError> {
    let list = config
        .database_replica_urls
        .iter()
        .map(|url| {
            let parsed = std::str::FromStr::from_str(url).map_err(|e| {
                StartError::Config(format!(
                    "--database-replica-url is not a valid Postgres connection string: {e}"
                ))
            })?;
            let name = standby::describe(&parsed);
            let pool = db::build_pool(parsed.clone(), &config.pool_settings(), None)
                .map_err(StartError::Database)?;
            let finds = Coalescer::new(
                FindUsers,
                pool.clone(),
                metrics.batch_items(FindUsers::NAME),
            );
            Ok(Standby::new(name, parsed, pool, finds))
        })
        .collect::<Result<_, StartError>>()?;
    Ok(Standbys::new(list))
}

/// The retention periods of the configuration.
fn retention(config: &Config) -> Result<crate::grpc::Retention, StartError> {
    let period = |flag: &str, value: std::time::Duration| {
        chrono::Duration::from_std(value)
            .map_err(|_| StartError::Config(format!("{flag} is too long")))
    };
    Ok(crate::grpc::Retention {
        deleted: period("--delete-retention", config.delete_retention)?,
        request_ids: period("--request-id-retention", config.request_id_retention)?,
        events: period("--event-retention", config.event_retention)?,
    })
}

/// Reflection over health's descriptors alone, for the health port.
fn health_reflection() -> tonic_reflection::server::Builder<'static> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
}

/// Reflection over the service's descriptors and health's, in both
/// versions of the protocol (grpcurl 1.8 speaks v1alpha).
fn reflection() -> tonic_reflection::server::Builder<'static> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
}
