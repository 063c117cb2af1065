//! Generates the protobuf messages from `src/batch.proto` (the contract's one schema) with
//! protox, a pure-Rust protobuf compiler: no `protoc` is needed to build.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=src/batch.proto");
    let descriptors = protox::compile(["src/batch.proto"], ["src"])?;
    prost_build::Config::new()
        // Payloads are shared, not copied, from the decoded body.
        .bytes([".edgegw.v1.Record.payload"])
        .compile_fds(descriptors)?;
    Ok(())
}
