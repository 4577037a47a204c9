//! Builds the server: database, migrations, services, health, reflection and
//! layers; binds the listener and reports the real address.

use std::{future::Future, net::SocketAddr, path::PathBuf, str::FromStr, time::Duration};

use tokio::net::TcpListener;
use tonic::transport::{Server, server::TcpIncoming};
use tonic_health::server::HealthReporter;

use crate::config::Config;
use crate::grpc::{AppState, tenants::TenantsApi, users::UsersApi};
use crate::layers::call_log::CallLogLayer;
use crate::pb::{
    self,
    v1::{tenants_service_server::TenantsServiceServer, users_service_server::UsersServiceServer},
};
use crate::store::{
    db,
    embedded::{self, EmbeddedPostgres},
    tenants,
};

/// Name of the database inside the embedded cluster.
pub const EMBEDDED_DATABASE: &str = "users_service";

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Why the service could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("DATABASE_URL is not a valid Postgres connection string: {0}")]
    DatabaseUrl(#[source] tokio_postgres::Error),
    #[error(transparent)]
    Embedded(#[from] embedded::EmbeddedError),
    #[error("cannot prepare the database: {0}")]
    Database(#[source] BoxError),
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
    embedded: Option<EmbeddedPostgres>,
    shutdown_grace: Duration,
}

impl Application {
    pub async fn build(config: &Config) -> Result<Self, StartError> {
        let (pg_config, embedded) = match &config.database_url {
            Some(url) => {
                let pg_config =
                    tokio_postgres::Config::from_str(url).map_err(StartError::DatabaseUrl)?;
                (pg_config, None)
            }
            None => {
                let data_dir = absolute(&config.data_dir);
                let embedded =
                    EmbeddedPostgres::start(&data_dir, embedded::Options::default()).await?;
                (embedded.config(EMBEDDED_DATABASE), Some(embedded))
            }
        };
        db::create_database_if_missing(&pg_config)
            .await
            .map_err(StartError::Database)?;
        db::run_migrations(&pg_config)
            .await
            .map_err(StartError::Database)?;
        let pool =
            db::build_pool(pg_config, &config.pool_settings()).map_err(StartError::Database)?;
        let default_tenant = {
            let mut conn = pool
                .get()
                .await
                .map_err(|e| StartError::Database(e.into()))?;
            tenants::default_id(&mut conn)
                .await
                .map_err(|e| StartError::Database(e.into()))?
        };

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
        Ok(Self {
            listener,
            local_addr,
            state: AppState::new(pool, default_tenant),
            embedded,
            shutdown_grace: config.shutdown_grace,
        })
    }

    /// The address the server is bound to (the real port when asked for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Serves until `shutdown` completes; then reports NOT_SERVING, lets
    /// in-flight calls finish within the grace period, and stops the
    /// embedded Postgres.
    pub async fn run_until(self, shutdown: impl Future<Output = ()>) -> Result<(), StartError> {
        let (health, health_service) = tonic_health::server::health_reporter();
        set_serving(&health, true).await;

        let reflection_v1 = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()
            .map_err(|e| StartError::Serve(e.into()))?;
        let reflection_v1alpha = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1alpha()
            .map_err(|e| StartError::Serve(e.into()))?;

        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let router = Server::builder()
            .layer(CallLogLayer)
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(UsersServiceServer::new(UsersApi::new(self.state.clone())))
            .add_service(TenantsServiceServer::new(TenantsApi::new(
                self.state.clone(),
            )));
        let incoming = TcpIncoming::from(self.listener).with_nodelay(Some(true));
        let mut server = tokio::spawn(router.serve_with_incoming_shutdown(incoming, async {
            let _ = stop_rx.await;
        }));
        tracing::info!(addr = %self.local_addr, "serving");

        let outcome = tokio::select! {
            result = &mut server => Some(result),
            () = shutdown => None,
        };
        let result = match outcome {
            Some(result) => result,
            None => {
                tracing::info!(grace = ?self.shutdown_grace, "shutting down");
                set_serving(&health, false).await;
                let _ = stop_tx.send(());
                match tokio::time::timeout(self.shutdown_grace, &mut server).await {
                    Ok(result) => result,
                    Err(_) => {
                        tracing::warn!("grace period over, cancelling the calls still running");
                        server.abort();
                        Ok(Ok(()))
                    }
                }
            }
        };
        self.state.pool.close();
        if let Some(embedded) = self.embedded {
            embedded.stop().await?;
        }
        match result {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(StartError::Serve(e.into())),
            Err(e) => Err(StartError::Serve(e.into())),
        }
    }
}

async fn set_serving(health: &HealthReporter, serving: bool) {
    let status = if serving {
        tonic_health::ServingStatus::Serving
    } else {
        tonic_health::ServingStatus::NotServing
    };
    for service in [
        "",
        <UsersServiceServer<UsersApi> as tonic::server::NamedService>::NAME,
        <TenantsServiceServer<TenantsApi> as tonic::server::NamedService>::NAME,
    ] {
        health.set_service_status(service, status).await;
    }
}

fn absolute(path: &std::path::Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}
