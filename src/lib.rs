//! users-service: the gRPC service that owns the users of every tenant.

pub mod app;
pub mod config;
pub mod domain;
pub mod error;
pub mod grpc;
pub mod layers;
pub mod pb;
pub mod store;
pub mod telemetry;
