//! The integration tests: one binary, a real server over a real socket,
//! real Postgres.

mod auth;
mod batches;
mod bulk;
mod connections;
mod contract;
mod counts;
mod grpc_web;
mod hardening;
mod helpers;
mod idp_roles;
mod jwks;
mod keys_api;
mod keys_cli;
mod lifecycle;
mod limits;
mod list;
mod metrics;
mod queries;
// Shared with the fuzz and abuse binaries, which use all of it.
#[allow(dead_code)]
mod process;
mod relay;
mod resilience;
mod safe_writes;
mod schema;
mod shared_limits;
mod tenant_deletion;
mod tenants;
mod tls;
mod traces;
mod transfer;
mod users;
mod validation;
mod watch;
