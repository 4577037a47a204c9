//! Persistence: embedded Postgres, pool, schema and query functions.

pub mod api_keys;
pub mod coalesce;
pub mod database;
pub mod db;
pub mod failure;
pub mod filter;
pub mod models;
pub mod schema;
pub mod tenants;
pub mod users;
