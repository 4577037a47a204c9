//! Tower layers wrapped around every gRPC call.

pub mod call_log;
