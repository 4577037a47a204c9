//! The integration tests: one binary, a real server over a real socket,
//! real Postgres.

mod auth;
mod batches;
mod bulk;
mod hardening;
mod helpers;
mod keys_cli;
mod lifecycle;
mod limits;
mod list;
mod metrics;
mod tenants;
mod transfer;
mod users;
mod validation;
