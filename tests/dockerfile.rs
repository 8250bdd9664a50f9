//! The Dockerfile cannot be built here (no container engine), so what it relies on is
//! checked against the repository instead: the scripts its RUN steps call exist and are
//! the ones CI runs, the libtorch paths it copies are where scripts/setup-libtorch.sh
//! puts them (same torch version, same layout under the cache), and the user it runs
//! as is the one the chart's securityContext asks for.

use std::path::Path;

fn read(p: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(p)).unwrap()
}

#[test]
fn the_dockerfile_uses_the_repositorys_scripts_and_paths() {
    let docker = read("Dockerfile");
    let runs: Vec<&str> = docker.lines().filter(|l| l.starts_with("RUN ")).collect();
    let scripts: Vec<&str> = runs
        .iter()
        .flat_map(|l| l.split_whitespace())
        .filter(|w| w.starts_with("scripts/"))
        .collect();
    assert_eq!(
        scripts,
        ["scripts/setup-libtorch.sh", "scripts/cargo-torch"],
        "the build stage runs what `make build` runs"
    );
    for s in &scripts {
        let meta = std::fs::metadata(Path::new(env!("CARGO_MANIFEST_DIR")).join(s)).unwrap();
        assert!(
            std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o111 != 0,
            "{s} is executable"
        );
    }
    assert!(
        read("Makefile").contains("$(CARGO) build --release"),
        "make build is cargo-torch build --release"
    );

    // The torch version and the cache layout the COPY steps name.
    let setup = read("scripts/setup-libtorch.sh");
    let version = setup
        .lines()
        .find_map(|l| l.strip_prefix("TORCH_VERSION=${TORCH_VERSION:-"))
        .and_then(|v| v.strip_suffix('}'))
        .expect("setup-libtorch.sh pins TORCH_VERSION");
    assert!(
        setup.contains("CACHE=${ACGE_CACHE_DIR:-"),
        "the cache directory can be moved"
    );
    assert!(setup.contains("VENV=$CACHE/torch-$TORCH_VERSION"));
    let lib = format!("/opt/acge/cache/torch-{version}/lib/python3.11/site-packages/torch/lib");
    assert!(docker.contains(&lib), "the Dockerfile copies {lib}");
    assert!(docker.contains("ENV ACGE_CACHE_DIR=/opt/acge/cache"));
    assert!(
        docker.contains("FROM debian:bookworm AS build"),
        "bookworm's python is 3.11"
    );

    // The user: the chart runs the container as 65532:65532.
    let chart = read("helm/acge-sidecar/templates/_helpers.tpl");
    assert!(chart.contains("runAsUser: 65532") && chart.contains("runAsGroup: 65532"));
    assert!(docker.contains("USER 65532:65532"));
    assert!(docker.contains("COPY --from=build /src/models /opt/acge/models"));
}
