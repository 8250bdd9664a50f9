//! `acge-proxy demo` as a new user meets it: all seven services answer through the
//! proxy on its fixed loopback ports, every route starts its migration in shadow, and
//! the audit log of the run verifies.

mod common;

use acge_proxy::demo::SERVICES;
use common::*;
use http::{Method, StatusCode};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_serves_the_seven_services_and_its_audit_log_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let demo = acge_proxy::demo::start("demo-token".into(), dir.path())
        .await
        .expect("the demo ports (15000, 15001, 18000-18006, 18100-18106) are free");
    let banner = acge_proxy::demo::banner(&demo);
    assert!(
        banner.contains("curl -si http://127.0.0.1:15001/api/v1/auth/acge/validate"),
        "{banner}"
    );
    assert!(
        banner.contains("Authorization: Bearer demo-token"),
        "{banner}"
    );
    let c = client();
    let mut backends = std::collections::HashSet::new();
    let bearer = format!("Bearer {}", demo.bearer);
    assert!(
        banner.contains(&bearer),
        "the banner's curl line carries the demo's token"
    );
    for service in SERVICES {
        for i in 0..10 {
            let url = format!("http://127.0.0.1:15001{}", service.acge_endpoint);
            // auth checks a token (jwt); pgc runs its Rego policy (policy).
            let (headers, body): (Vec<(&str, &str)>, String) = match service.name {
                "auth" => (
                    vec![("authorization", bearer.as_str())],
                    format!(r#"{{"q":{i}}}"#),
                ),
                "pgc" => (
                    vec![
                        ("x-user-roles", "policy-compiler"),
                        ("content-type", "application/json"),
                    ],
                    format!(r#"{{"q":{i},"constitutional_hash":"cdd01ef066bc6cf2","rules":[]}}"#),
                ),
                _ => (vec![], format!(r#"{{"q":{i}}}"#)),
            };
            let r = send(&c, Method::POST, &url, &headers, body).await;
            assert_eq!(r.status, StatusCode::OK, "{}", service.name);
            assert_eq!(r.headers["x-acge-service"], service.name);
            assert_eq!(r.headers["x-acge-hash-check"], "match");
            let score: f64 = r.headers["x-acge-response-compliance"]
                .to_str()
                .unwrap()
                .parse()
                .unwrap();
            assert!((0.0..=1.0).contains(&score), "the response was scored");
            assert_eq!(
                r.json()["received_headers"]["x-constitutional-hash"],
                "cdd01ef066bc6cf2",
                "stamped"
            );
            backends.insert(r.backend().to_string());
        }
    }
    // Without a token, auth refuses; without the role, pgc's policy refuses and says why.
    let r = send(
        &c,
        Method::POST,
        "http://127.0.0.1:15001/api/v1/auth/acge/validate",
        &[],
        "{}",
    )
    .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(r.json()["error"], "missing");
    let r = send(
        &c,
        Method::POST,
        "http://127.0.0.1:15001/api/v1/policy/acge/compile",
        &[("content-type", "application/json")],
        r#"{"constitutional_hash":"cdd01ef066bc6cf2","rules":[]}"#,
    )
    .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert_eq!(
        r.json()["reasons"][0],
        "the caller lacks the policy-compiler role"
    );
    assert_eq!(
        backends,
        std::collections::HashSet::from(["blue".to_string()]),
        "the demo's migration starts in shadow: green answers no client"
    );
    let status = get(&c, "http://127.0.0.1:15000/migration", &[])
        .await
        .json();
    for service in SERVICES {
        let route = &status["routes"][service.name];
        assert_eq!(
            (route["state"].as_str(), route["shadow"].as_bool()),
            (Some("running"), Some(true)),
            "{route:#}"
        );
    }
    demo.proxy.shutdown().await;
    let summary =
        acge_filters::audit::verify::verify(&dir.path().join("audit"), &Default::default())
            .unwrap();
    let records = audit_records(&dir.path().join("audit"));
    let shadow = records.iter().filter(|r| r.decision == "shadow").count();
    // 70 answered, the 2 refusals above, and green's shadow answers.
    assert_eq!(summary.records, 72 + shadow as u64);
    assert!(
        records
            .iter()
            .filter(|r| r.decision == "shadow")
            .all(|r| r.version.as_deref() == Some("green")),
        "green's shadow answers are recorded as such"
    );
    let scored = records.iter().filter(|r| r.compliance.is_some()).count();
    assert_eq!(
        scored,
        records.len() - 1,
        "every audit record carries the ACGE score but the one the jwt filter refused before scoring"
    );
    let signed = records
        .iter()
        .filter(|r| r.route == "auth" && r.jwt.is_some())
        .count();
    assert!(
        signed >= 10,
        "auth's records carry the token's claims ({signed})"
    );
    assert_eq!(summary.unsigned_tail, 0);
}
