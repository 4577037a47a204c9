//! users-service: the gRPC service that owns the users of every tenant.

pub mod app; // builds and runs the server
pub mod auth; // who is calling: API keys, end-user tokens
pub mod clock; // the time, as the service sees it
pub mod code; // the names of gRPC status codes
pub mod codec; // the protobuf codec of the generated code
pub mod commands; // the `keys` command line
pub mod config; // flags and environment variables
pub mod domain; // validated types, built once at the edge
pub mod embedded_pg; // the private PostgreSQL run when no DATABASE_URL is given
pub mod error; // the one error type and its gRPC status
pub mod grpc; // handlers, authorization, conversions
pub mod health; // liveness and readiness, following the database
pub mod layers; // tower layers: auth, rate limits, load shedding, call log
pub mod methods; // the gRPC methods served, from their descriptors
pub mod metrics; // Prometheus metrics
pub mod net; // TCP and HTTP/2: connections and their limits
pub mod pb; // generated protobuf code
pub mod purge; // erases what has passed its expire_time
pub mod quota; // per-caller call quotas (GCRA)
pub mod relay; // the change feed, relayed to NATS JetStream
pub mod shared_quota; // per-caller quotas shared by replicas through Redis
pub mod store; // Postgres: schema, queries, pool, embedded cluster
pub mod telemetry; // logging
pub mod transfer; // the `import` and `export` commands: users in bulk over gRPC
