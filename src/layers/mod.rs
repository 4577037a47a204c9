//! Tower layers wrapped around every gRPC call.

pub mod auth;
pub mod call_log;
pub mod in_flight;
