//! Per-request cost of the governance filters: the `policy` filter evaluating the demo's
//! pgc policy (config/policies) on a compile request, and the `jwt` filter verifying
//! an EdDSA token with its key already loaded; each against an empty chain, through
//! the request phase as the proxy drives it. Criterion's medians, then a pass of
//! 20,000 timed calls each for the p50, p95 and p99 the aims are stated in.
//!
//! `cargo bench --bench governance` (scripts/cargo-torch, as every bench)

use std::sync::Arc;
use std::time::{Duration, Instant};

use acge_filters::jwt::{Issuer, JwtConfig, JwtFilter};
use acge_filters::policy::{PolicyConfig, PolicyFilter};
use acge_filters::{Chain, Exchange, Filter, RequestHead};
use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion};
use http::{HeaderMap, Method, Uri};

const HASH: &str = "cdd01ef066bc6cf2";

fn headers(bearer: Option<&str>) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in [
        ("host", "pgc.acgs.svc"),
        ("user-agent", "governance-client/2.1"),
        ("content-type", "application/json"),
        ("x-user-id", "user-4711"),
        ("x-user-roles", "reader,policy-compiler"),
        ("x-constitutional-hash", HASH),
    ] {
        h.insert(k, v.parse().unwrap());
    }
    if let Some(b) = bearer {
        h.insert("authorization", format!("Bearer {b}").parse().unwrap());
    }
    h
}

fn body() -> Bytes {
    let rules: Vec<_> = (0..20)
        .map(|i| serde_json::json!({"id": format!("rule-{i}"), "effect": "allow", "resource": format!("records/{i}")}))
        .collect();
    Bytes::from(
        serde_json::json!({"constitutional_hash": HASH, "rules": rules, "target": "policy-v7"})
            .to_string(),
    )
}

async fn request(
    chain: &Chain,
    route: &Arc<str>,
    id: &acge_filters::RequestId,
    bearer: Option<&str>,
    body: &Bytes,
) {
    let mut ex = Exchange::new(
        route.clone(),
        id.clone(),
        Instant::now(),
        RequestHead {
            method: Method::POST,
            uri: Uri::from_static("/api/v1/policy/acge/compile"),
            headers: headers(bearer),
        },
    );
    ex.request_body = Some(body.clone());
    let refused = chain.on_request(&mut ex).await;
    assert!(
        refused.is_none(),
        "the benchmark's request passes the chain"
    );
}

fn percentiles(name: &str, mut f: impl FnMut()) {
    for _ in 0..2_000 {
        f();
    }
    let mut times: Vec<Duration> = (0..20_000)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed()
        })
        .collect();
    times.sort();
    let at = |q: f64| times[((times.len() as f64 * q) as usize).min(times.len() - 1)];
    println!(
        "{name:<28} p50 {:>7.1} µs   p95 {:>7.1} µs   p99 {:>7.1} µs",
        at(0.50).as_secs_f64() * 1e6,
        at(0.95).as_secs_f64() * 1e6,
        at(0.99).as_secs_f64() * 1e6
    );
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _guard = rt.enter();
    let route: Arc<str> = "pgc".into();
    let id = acge_filters::RequestId::from("8f7791b1-f084-4fec-ad61-face80955679");
    let body = body();

    let policies = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/policies");
    let policy = PolicyFilter::load(&PolicyConfig {
        dir: policies,
        query: "data.acge.allow".into(),
        reasons: "data.acge.reasons".into(),
        on_error: Default::default(),
    })
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let issuer = Issuer::generate("bench", "https://auth.acgs.bench");
    std::fs::write(dir.path().join("jwks.json"), issuer.jwks().to_string()).unwrap();
    let jwt = JwtFilter::load(
        &serde_yaml_ng::from_str::<JwtConfig>(&format!(
            "{{jwks_file: \"{}\", issuer: \"https://auth.acgs.bench\", audiences: [acgs], reload_ms: 0}}",
            dir.path().join("jwks.json").display()
        ))
        .unwrap(),
        HASH,
    )
    .unwrap();
    let token = issuer.token(
        "svc-pgc",
        "acgs",
        HASH,
        &["privacy", "rule_of_law"],
        Duration::from_secs(3600),
    );

    let empty = Chain::new(vec![]);
    let with_policy = Chain::new(vec![Arc::new(policy.for_route("pgc")) as Arc<dyn Filter>]);
    let with_jwt = Chain::new(vec![Arc::new(jwt.for_route("pgc")) as Arc<dyn Filter>]);
    let both = Chain::new(vec![
        Arc::new(jwt.for_route("pgc")) as Arc<dyn Filter>,
        Arc::new(policy.for_route("pgc")) as Arc<dyn Filter>,
    ]);

    let mut group = c.benchmark_group("governance");
    group.bench_function("empty", |b| {
        b.to_async(&rt)
            .iter(|| request(&empty, &route, &id, None, &body))
    });
    group.bench_function("policy", |b| {
        b.to_async(&rt)
            .iter(|| request(&with_policy, &route, &id, None, &body))
    });
    group.bench_function("jwt", |b| {
        b.to_async(&rt)
            .iter(|| request(&with_jwt, &route, &id, Some(&token), &body))
    });
    group.bench_function("jwt_policy", |b| {
        b.to_async(&rt)
            .iter(|| request(&both, &route, &id, Some(&token), &body))
    });
    group.finish();

    println!("\nper request, 20,000 calls after 2,000 to warm up:");
    percentiles("empty chain", || {
        rt.block_on(request(&empty, &route, &id, None, &body))
    });
    percentiles("policy (pgc.rego)", || {
        rt.block_on(request(&with_policy, &route, &id, None, &body))
    });
    percentiles("jwt (EdDSA, key cached)", || {
        rt.block_on(request(&with_jwt, &route, &id, Some(&token), &body))
    });
    percentiles("jwt + policy", || {
        rt.block_on(request(&both, &route, &id, Some(&token), &body))
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
