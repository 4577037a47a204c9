//! Persistence: embedded Postgres, pool, schema and query functions.

pub mod api_keys;
pub mod coalesce;
pub mod database;
pub mod db;
pub mod error;
pub mod events;
pub mod filter;
pub mod models;
pub mod page;
pub mod prepared;
pub mod requests;
pub mod schema;
pub mod standby;
pub mod tenants;
pub mod traced;
pub mod users;

pub use error::StoreError;
