//! The integration tests: one binary, a real server over a real socket,
//! real Postgres.

mod helpers;
mod lifecycle;
mod list;
mod tenants;
mod users;
mod validation;
