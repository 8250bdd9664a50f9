// Shared by the two build scripts (`build.rs` of this crate, `torch_build.rs` of the
// proxy's): with the `torch` feature, make binaries (tests included) find libtorch by
// rpath, and link libtorch itself even though no symbol is used from it directly, so
// that its CUDA half is loaded where a GPU is present. No LD_LIBRARY_PATH is needed at
// run time.
fn link_torch() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    if std::env::var_os("CARGO_FEATURE_TORCH").is_none() {
        return;
    }
    if let Ok(dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-L{dir}");
        println!("cargo:rustc-link-arg=-ltorch");
    }
}
