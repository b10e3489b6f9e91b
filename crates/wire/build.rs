//! Compiles `proto/metalbond.proto` (the schema, shared with the Go
//! implementation) into Rust with prost-build.
//!
//! protox parses the schema in pure Rust, so no system `protoc` is needed on a
//! fresh machine. `bytes` fields are generated as `bytes::Bytes` so decoding a
//! frame slices the received buffer instead of copying each address.
//!
//! Reads nothing but the schema: no git, no environment of the embedder's
//! build (the binary's `build.rs` records the commit).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/metalbond.proto");
    let fds = protox::compile(["proto/metalbond.proto"], ["proto"])?;
    prost_build::Config::new().bytes(["."]).compile_fds(fds)?;
    Ok(())
}
