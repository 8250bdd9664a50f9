//! Per-request cost of the filter chain: an empty chain against one running the
//! constitutional hash filter, through request, response and log phases.
//!
//! `cargo bench --bench chain`

use std::sync::Arc;
use std::time::{Duration, Instant};

use acge_filters::hash::{HashConfig, HashFilter, HashMode};
use acge_filters::{Answer, Chain, End, Ending, Exchange, Filter, RequestHead, Source, Version};
use criterion::{criterion_group, criterion_main, Criterion};
use http::{HeaderMap, Method, StatusCode, Uri};

const HASH: &str = "cdd01ef066bc6cf2";

fn headers() -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in [
        ("host", "auth.acgs.svc"),
        ("user-agent", "governance-client/2.1"),
        ("accept", "application/json"),
        ("content-type", "application/json"),
        ("x-user-id", "user-4711"),
        ("x-request-id", "8f7791b1-f084-4fec-ad61-face80955679"),
        ("x-constitutional-hash", HASH),
    ] {
        h.insert(k, v.parse().unwrap());
    }
    h
}

/// One exchange through every phase, as the proxy drives it.
async fn exchange(chain: &Chain, route: &Arc<str>, id: &acge_filters::RequestId) {
    let mut ex = Exchange::new(
        route.clone(),
        id.clone(),
        Instant::now(),
        RequestHead {
            method: Method::POST,
            uri: Uri::from_static("/api/v1/auth/acge/validate"),
            headers: headers(),
        },
    );
    let _ = chain.on_request(&mut ex).await;
    ex.version = Some(Version::Green);
    ex.response = Some(Answer {
        status: StatusCode::OK,
        headers: headers(),
        body: None,
        source: Source::Upstream(Version::Green),
    });
    chain.on_response(&mut ex).await;
    ex.end = Some(End {
        status: StatusCode::OK,
        ending: Ending::Complete,
        latency: Duration::from_micros(400),
    });
    let _ = chain.on_log(&ex).await;
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let route: Arc<str> = "auth".into();
    let id = acge_filters::RequestId::from("8f7791b1-f084-4fec-ad61-face80955679");
    let mut group = c.benchmark_group("chain");
    let empty = Chain::new(vec![]);
    group.bench_function("empty", |b| {
        b.to_async(&rt).iter(|| exchange(&empty, &route, &id))
    });
    for mode in [HashMode::Enforce, HashMode::Stamp] {
        let shared = Arc::new(HashFilter::new(HASH, &HashConfig { mode }).unwrap());
        let hash: Arc<dyn Filter> = Arc::new(shared.for_route("auth"));
        let chain = Chain::new(vec![hash]);
        group.bench_function(
            format!("constitutional_hash_{mode:?}").to_lowercase(),
            |b| b.to_async(&rt).iter(|| exchange(&chain, &route, &id)),
        );
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
