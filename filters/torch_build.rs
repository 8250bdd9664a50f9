//! The proxy's build script: links libtorch (`torch_link.rs`).
include!("torch_link.rs");

fn main() {
    link_torch();
}
