//! Compiles `proto/` into Rust (tonic + prost) and into an encoded descriptor
//! set for server reflection. protox parses the protos in-process, so building
//! needs no `protoc` on the machine.

use std::{env, fs, path::PathBuf};

use prost::Message;

/// The contract, plus the error-detail messages that statuses carry, so that
/// reflection clients can decode `google.rpc.BadRequest` and friends.
const PROTOS: &[&str] = &[
    "users/v1/users.proto",
    "users/v1/tenants.proto",
    "users/v1/keys.proto",
    "google/rpc/error_details.proto",
    "google/rpc/status.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);

    let descriptors = protox::compile(PROTOS, ["proto"])?;
    fs::write(
        out_dir.join("users_v1_descriptor.bin"),
        descriptors.encode_to_vec(),
    )?;

    // google.rpc types come from tonic-types; generate Rust for our package only.
    let mut ours = descriptors;
    ours.file.retain(|file| file.package() != "google.rpc");
    tonic_prost_build::configure()
        .extern_path(".google.rpc", "::tonic_types::pb")
        .codec_path("crate::codec::Codec")
        .build_client(true)
        .build_server(true)
        .compile_fds(ours)?;
    Ok(())
}
