//! The weighted split as a client sees it: shares, runtime weight changes, sticky
//! clients and the override header.

mod common;

use common::*;
use http::StatusCode;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn green_share_is_within_3_points_of_the_weight() {
    for weight in [10u8, 50, 90] {
        let s = setup("share", weight, "").await;
        let green = count_green(&s.url("/svc/x"), 2000, 8).await;
        let share = green as f64 * 100.0 / 2000.0;
        assert!(
            (share - f64::from(weight)).abs() <= 3.0,
            "weight {weight}: observed green share {share:.1}%"
        );
        s.proxy.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_weight_changes_the_split_for_later_requests() {
    let s = setup("put", 10, "").await;
    let c = client();
    let r = put_weight(&s, "put", 100).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    let v = r.json();
    assert_eq!(
        (v["blue"].as_u64(), v["green"].as_u64()),
        (Some(0), Some(100))
    );
    assert_eq!(v["previous"]["green"], 10);
    assert_eq!(count_green(&s.url("/svc"), 200, 4).await, 200);

    let r = put_weight(&s, "put", 0).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(count_green(&s.url("/svc"), 200, 4).await, 0);
    let w = get(&c, &s.admin("/weights"), &[]).await.json();
    assert_eq!(w["routes"]["put"]["green"], 0);
    assert_eq!(w["routes"]["put"]["blue"], 100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_weight_change_drops_no_open_connection() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let s = setup("keepconn", 0, "").await;
    // One raw keep-alive connection, used before and after the change: a client
    // library could reconnect behind our back; this socket cannot.
    let mut conn = tokio::net::TcpStream::connect(s.proxy.proxy_addr)
        .await
        .unwrap();
    let ask = async |conn: &mut tokio::net::TcpStream| -> String {
        conn.write_all(b"GET /svc HTTP/1.1\r\nHost: t\r\n\r\n")
            .await
            .expect("the connection is still open");
        let mut got = Vec::new();
        let mut buf = [0u8; 8192];
        loop {
            let n = tokio::time::timeout(std::time::Duration::from_secs(5), conn.read(&mut buf))
                .await
                .expect("an answer within 5 s")
                .expect("the connection is still open");
            assert!(n > 0, "the proxy closed the connection");
            got.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&got).into_owned();
            if let Some(end) = text.find("\r\n\r\n") {
                let len: usize = text[..end]
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length: "))
                    .unwrap()
                    .parse()
                    .unwrap();
                if got.len() >= end + 4 + len {
                    return text;
                }
            }
        }
    };
    assert!(ask(&mut conn).await.contains("x-acge-backend: blue"));
    let r = put_weight(&s, "keepconn", 100).await;
    assert_eq!(r.status, StatusCode::OK);
    for _ in 0..20 {
        let answer = ask(&mut conn).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(answer.contains("x-acge-backend: green"), "{answer}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sticky_clients_keep_their_version_and_split_by_weight() {
    let s = setup("sticky", 30, "    sticky: {header: x-user-id}").await;
    let c = client();
    let mut green_users = 0;
    for user in 0..600 {
        let id = format!("user-{user}");
        let first = get(&c, &s.url("/svc"), &[("x-user-id", &id)]).await;
        for _ in 0..3 {
            let again = get(&c, &s.url("/svc"), &[("x-user-id", &id)]).await;
            assert_eq!(again.backend(), first.backend(), "{id} moved");
        }
        if first.backend() == "green" {
            green_users += 1;
        }
    }
    let share = green_users as f64 * 100.0 / 600.0;
    assert!(
        (share - 30.0).abs() <= 5.0,
        "sticky green share {share:.1}%"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sticky_cookie_clients_move_only_blue_to_green_as_weight_rises() {
    let s = setup("cookie", 0, "    sticky: {cookie: session}").await;
    let c = client();
    let users: Vec<String> = (0..200)
        .map(|u| format!("session=s{u}; theme=dark"))
        .collect();
    let mut was_green = vec![false; users.len()];
    for weight in [0, 5, 25, 50, 75, 100] {
        let r = put_weight(&s, "cookie", weight).await;
        assert_eq!(r.status, StatusCode::OK);
        for (i, cookie) in users.iter().enumerate() {
            let green = get(&c, &s.url("/svc"), &[("cookie", cookie)])
                .await
                .backend()
                == "green";
            assert!(
                green || !was_green[i],
                "user {i} moved green → blue at {weight}"
            );
            was_green[i] = green;
        }
    }
    assert!(was_green.iter().all(|g| *g), "at 100 every client is green");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn override_header_works_only_when_enabled() {
    let on = setup("override-on", 0, "    version_override: true").await;
    let off = setup("override-off", 0, "").await;
    let c = client();
    let r = get(&c, &on.url("/svc"), &[("x-acge-version", "green")]).await;
    assert_eq!(r.backend(), "green");
    let r = get(&c, &off.url("/svc"), &[("x-acge-version", "green")]).await;
    assert_eq!(r.backend(), "blue");

    let r = get(&c, &on.url("/svc"), &[("x-acge-version", "purple")]).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.json()["error"], "bad_version_override");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn longest_prefix_wins() {
    let any = "127.0.0.1:0".parse().unwrap();
    let a = acge_proxy::demo::spawn_backend("auth", acge_proxy::proxy::split::Version::Blue, any)
        .await
        .unwrap();
    let b = acge_proxy::demo::spawn_backend("ac", acge_proxy::proxy::split::Version::Blue, any)
        .await
        .unwrap();
    let yaml = format!(
        "listener: {{address: 127.0.0.1:0}}
admin: {{address: 127.0.0.1:0}}
clusters:
  a: {{endpoints: [\"{}\"]}}
  b: {{endpoints: [\"{}\"]}}
routes:
  - {{name: short, match: {{path_prefix: /api}}, blue: a, green: a}}
  - {{name: long, match: {{path_prefix: /api/v1/constitutional}}, blue: b, green: b}}
",
        a.addr, b.addr
    );
    let p = start(&yaml, acge_proxy::control::admin::TokenSource::None).await;
    let c = client();
    let svc = |r: &Reply| r.headers["x-acge-service"].to_str().unwrap().to_string();
    let r = get(
        &c,
        &format!("http://{}/api/v1/constitutional/x", p.proxy_addr),
        &[],
    )
    .await;
    assert_eq!(svc(&r), "ac");
    let r = get(&c, &format!("http://{}/api/v1/auth", p.proxy_addr), &[]).await;
    assert_eq!(svc(&r), "auth");
}
