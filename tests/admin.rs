//! The admin API as an operator uses it: auth on mutations, errors as JSON, a real
//! Prometheus scrape, the config dump.

mod common;

use acge_proxy::control::admin::TokenSource;
use common::*;
use http::{Method, StatusCode};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_without_or_with_a_wrong_token_is_401() {
    let s = setup("auth401", 5, "").await;
    let c = client();
    let url = s.admin("/routes/auth401/weights");
    let r = send(&c, Method::PUT, &url, &[], r#"{"green": 50}"#).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(r.json()["error"], "unauthorized");
    assert!(r.headers.contains_key("www-authenticate"));
    for wrong in [
        "Bearer nope",
        "Bearer test-admin-tokenX",
        "Basic dGVzdA==",
        "Bearer ",
    ] {
        let r = send(
            &c,
            Method::PUT,
            &url,
            &[("authorization", wrong)],
            r#"{"green": 50}"#,
        )
        .await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{wrong}");
    }
    let w = get(&c, &s.admin("/weights"), &[]).await.json();
    assert_eq!(
        w["routes"]["auth401"]["green"], 5,
        "a refused PUT changes nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_with_no_token_configured_is_403() {
    let s = setup_with("auth403", 5, "", TokenSource::None).await;
    let c = client();
    let r = send(
        &c,
        Method::PUT,
        &s.admin("/routes/auth403/weights"),
        &[("authorization", "Bearer anything")],
        r#"{"green": 50}"#,
    )
    .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert_eq!(r.json()["error"], "mutations_disabled");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_file_is_read_on_each_mutation() {
    let dir = std::env::temp_dir().join(format!("acge-token-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("token");
    std::fs::write(&file, "first\n").unwrap();
    let s = setup_with("tokfile", 5, "", TokenSource::File(file.clone())).await;
    let c = client();
    let url = s.admin("/routes/tokfile/weights");
    let put = |token: &'static str| {
        let c = c.clone();
        let url = url.clone();
        async move {
            send(
                &c,
                Method::PUT,
                &url,
                &[("authorization", &format!("Bearer {token}"))],
                r#"{"green": 7}"#,
            )
            .await
            .status
        }
    };
    assert_eq!(put("first").await, StatusCode::OK);
    std::fs::write(&file, "second").unwrap();
    assert_eq!(put("first").await, StatusCode::UNAUTHORIZED);
    assert_eq!(put("second").await, StatusCode::OK);
    std::fs::remove_file(&file).unwrap();
    assert_eq!(put("second").await, StatusCode::FORBIDDEN);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_weight_requests_get_json_reasons() {
    let s = setup("badput", 5, "").await;
    let c = client();
    let auth = [("authorization", "Bearer test-admin-token")];
    for (body, status) in [
        (r#"{"green": 140}"#, StatusCode::BAD_REQUEST),
        (r#"{"green": "x"}"#, StatusCode::BAD_REQUEST),
        ("not json", StatusCode::BAD_REQUEST),
        (r#"{"blue": 5}"#, StatusCode::BAD_REQUEST),
    ] {
        let r = send(
            &c,
            Method::PUT,
            &s.admin("/routes/badput/weights"),
            &auth,
            body,
        )
        .await;
        assert_eq!(r.status, status, "{body}");
        assert_eq!(r.json()["error"], "bad_weight");
        assert!(!r.json()["detail"].as_str().unwrap().is_empty());
    }
    let r = send(
        &c,
        Method::PUT,
        &s.admin("/routes/nope/weights"),
        &auth,
        r#"{"green": 5}"#,
    )
    .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(r.json()["error"], "unknown_route");
    let r = get(&c, &s.admin("/routes/badput/weights"), &[]).await;
    assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(r.headers["allow"], "PUT");
    let r = get(&c, &s.admin("/nothing-here"), &[]).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(r.json()["error"], "not_found");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_ready_and_config_dump() {
    let s = setup("dump", 20, "    sticky: {header: x-user-id}").await;
    let c = client();
    assert_eq!(get(&c, &s.admin("/live"), &[]).await.status, StatusCode::OK);
    let ready = get(&c, &s.admin("/ready"), &[]).await;
    assert_eq!(ready.status, StatusCode::OK);
    assert_eq!(ready.json()["status"], "ready");

    assert_eq!(put_weight(&s, "dump", 35).await.status, StatusCode::OK);
    let dump = get(&c, &s.admin("/config_dump"), &[]).await;
    assert_eq!(dump.status, StatusCode::OK);
    let v = dump.json();
    assert_eq!(v["routes"][0]["name"], "dump");
    assert_eq!(
        v["routes"][0]["green_weight"], 35,
        "the dump shows the running weight"
    );
    assert_eq!(v["routes"][0]["sticky"]["header"], "x-user-id");
    assert_eq!(v["admin"]["token_source"], "fixed");
    assert!(
        !String::from_utf8_lossy(&dump.body).contains(TOKEN),
        "the token never appears in the dump"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrape_counts_requests_by_route_version_and_class() {
    let s = setup("scrape", 50, "").await;
    let c = client();
    for _ in 0..40 {
        assert_eq!(get(&c, &s.url("/svc/a"), &[]).await.status, StatusCode::OK);
    }
    let r = get(&c, &s.admin("/metrics"), &[]).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    let text = String::from_utf8(r.body.to_vec()).unwrap();
    let blue = sample(
        &text,
        r#"acge_requests_total{route="scrape",version="blue",code_class="2xx"}"#,
    )
    .unwrap();
    let green = sample(
        &text,
        r#"acge_requests_total{route="scrape",version="green",code_class="2xx"}"#,
    )
    .unwrap();
    assert_eq!(blue + green, 40.0);
    assert!(
        (green - 20.0).abs() <= 1.0,
        "half of 40 went green: {green}"
    );
    assert_eq!(
        sample(&text, r#"acge_green_weight{route="scrape"}"#),
        Some(50.0)
    );
    assert_eq!(
        sample(
            &text,
            r#"acge_request_duration_seconds_bucket{route="scrape",version="blue",le="10"}"#
        ),
        Some(blue)
    );
    assert!(text.contains(
        r#"acge_request_duration_seconds_bucket{route="scrape",version="blue",le="0.0005"}"#
    ));

    assert_eq!(put_weight(&s, "scrape", 75).await.status, StatusCode::OK);
    let text = String::from_utf8(get(&c, &s.admin("/metrics"), &[]).await.body.to_vec()).unwrap();
    assert_eq!(
        sample(&text, r#"acge_green_weight{route="scrape"}"#),
        Some(75.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_errors_are_counted_by_kind() {
    let down = closed_port().await;
    let yaml = format!(
        "listener: {{address: 127.0.0.1:0}}
admin: {{address: 127.0.0.1:0}}
clusters:
  b: {{endpoints: [\"{down}\"]}}
routes:
  - {{name: errcount, match: {{path_prefix: /}}, blue: b, green: b}}
"
    );
    let p = start(&yaml, TokenSource::None).await;
    let c = client();
    for _ in 0..3 {
        let r = get(&c, &format!("http://{}/x", p.proxy_addr), &[]).await;
        assert_eq!(r.status, StatusCode::BAD_GATEWAY);
    }
    let text = String::from_utf8(
        get(&c, &format!("http://{}/metrics", p.admin_addr), &[])
            .await
            .body
            .to_vec(),
    )
    .unwrap();
    assert_eq!(
        sample(
            &text,
            r#"acge_upstream_errors_total{route="errcount",version="blue",kind="connect"}"#
        ),
        Some(3.0)
    );
    assert_eq!(
        sample(
            &text,
            r#"acge_requests_total{route="errcount",version="blue",code_class="5xx"}"#
        ),
        Some(3.0)
    );
}
