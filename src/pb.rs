//! Code generated from `proto/` by `build.rs`; nothing here is written by hand.

/// The `users.v1` package: messages, the service traits and the clients.
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod v1 {
    tonic::include_proto!("users.v1");
}

/// Encoded descriptors of `users.v1`, its imports and `google.rpc` error
/// details, served by reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/users_v1_descriptor.bin"));
