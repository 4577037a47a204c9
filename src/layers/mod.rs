//! Tower layers wrapped around every gRPC call.

pub mod auth;
pub mod call_log;
pub mod deadline;
pub mod in_flight;
pub mod read_request;
