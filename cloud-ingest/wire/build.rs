//! Generates the protobuf messages from `src/batch.proto` (body version 1) and
//! `src/batch_v2.proto` (version 2, columnar), the contract's schemas, with protox, a pure-Rust
//! protobuf compiler: no `protoc` is needed to build.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=src/batch.proto");
    println!("cargo:rerun-if-changed=src/batch_v2.proto");
    let descriptors = protox::compile(["src/batch.proto", "src/batch_v2.proto"], ["src"])?;
    prost_build::Config::new()
        // Payloads are shared, not copied, from the decoded body.
        .bytes([".edgegw.v1.Record.payload", ".edgegw.v2.Batch.payloads"])
        .compile_fds(descriptors)?;
    Ok(())
}
