//! Compiles Veil's ONNX subset schema with a pure-Rust protobuf compiler, so a fresh machine
//! needs no system `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/onnx_subset.proto");
    let fds = protox::compile(["onnx_subset.proto"], ["proto"])?;
    prost_build::Config::new().compile_fds(fds)?;
    Ok(())
}
