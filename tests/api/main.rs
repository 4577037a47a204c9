//! The integration tests: one binary, a real server over a real socket,
//! real Postgres.

mod auth;
mod batches;
mod bulk;
mod connections;
mod hardening;
mod helpers;
mod keys_cli;
mod lifecycle;
mod limits;
mod list;
mod metrics;
mod process;
mod tenants;
mod transfer;
mod users;
mod validation;
