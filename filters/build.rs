//! Compiles `proto/grpc_predict_v2.proto` (the Open Inference Protocol's messages the
//! `remote` backend uses) with protox, in Rust, so no protoc is needed; and links
//! libtorch (`torch_link.rs`).
include!("torch_link.rs");

fn main() {
    println!("cargo:rerun-if-changed=proto/grpc_predict_v2.proto");
    let descriptors = protox::compile(["proto/grpc_predict_v2.proto"], ["proto"])
        .expect("proto/grpc_predict_v2.proto compiles");
    tonic_prost_build::configure()
        .build_server(false)
        .compile_fds(descriptors)
        .expect("the gRPC client is generated");
    link_torch();
}
