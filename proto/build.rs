//! Compiles `veil/v1/veil.proto` with protox (a pure-Rust protobuf compiler), so a fresh
//! machine needs no system `protoc`, and writes the descriptor set for server reflection.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=veil/v1/veil.proto");
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    let fds = protox::compile(["veil/v1/veil.proto"], ["."])?;
    std::fs::write(
        out.join("veil_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)?;
    Ok(())
}
