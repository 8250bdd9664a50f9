//! Config hot reload as an operator meets it: `POST /reload`, `SIGHUP` and a
//! ConfigMap-style `..data` swap in the file's directory; a refused file; what survives
//! (a weight set at runtime, an unchanged cluster's connections); the swap is atomic
//! under load and a request in flight finishes on the table it started on.

mod common;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use acge_proxy::config::Config;
use acge_proxy::control::admin::TokenSource;
use acge_proxy::{Running, StartOptions};
use bytes::Bytes;
use common::{client, get, sample, scrape, send, TOKEN};
use http::Method;
use tokio::net::TcpListener;

/// An upstream that answers 200 with `body` after `delay`, and the client ports of
/// the connections its requests came on (one per upstream connection).
async fn upstream(body: &'static str, delay: Duration) -> (SocketAddr, Arc<Mutex<HashSet<u16>>>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let ports = Arc::new(Mutex::new(HashSet::new()));
    let seen = ports.clone();
    tokio::spawn(acge_proxy::proxy::server::serve(
        l,
        acge_proxy::proxy::server::ServerOptions::default(),
        move |_req, peer: SocketAddr, _in_flight| {
            seen.lock().unwrap().insert(peer.port());
            async move {
                tokio::time::sleep(delay).await;
                acge_proxy::proxy::full(Bytes::from_static(body.as_bytes()))
            }
        },
        std::future::pending(),
    ));
    (addr, ports)
}

/// The metrics are one registry per process: these tests read its global series
/// (`acge_config_generation`, the reload counters), so they run one at a time.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn yaml(blue: SocketAddr, green: SocketAddr, extra_routes: &str, admin: &str) -> String {
    format!(
        "listener: {{address: 127.0.0.1:0}}
admin: {{address: {admin}, reload: {{debounce_ms: 100}}}}
clusters:
  blue: {{endpoints: [\"{blue}\"]}}
  green: {{endpoints: [\"{green}\"]}}
routes:
  - name: svc
    match: {{path_prefix: /svc}}
    blue: blue
    green: green
    green_weight: 0
{extra_routes}"
    )
}

/// A blue and a green upstream, and a directory for the config file.
struct Files {
    blue: SocketAddr,
    green: SocketAddr,
    dir: tempfile::TempDir,
    path: PathBuf,
}

async fn files() -> Files {
    let (blue, _) = upstream("blue", Duration::ZERO).await;
    let (green, _) = upstream("green", Duration::ZERO).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.yaml");
    Files {
        blue,
        green,
        dir,
        path,
    }
}

async fn start_file(path: &Path) -> Running {
    let config = Config::load(path).unwrap_or_else(|e| panic!("{e}"));
    acge_proxy::start(config, StartOptions::new(TokenSource::Fixed(TOKEN.into())))
        .await
        .unwrap()
}

fn admin(p: &Running, path: &str) -> String {
    format!("http://{}{path}", p.admin_addr)
}

fn url(p: &Running, path: &str) -> String {
    format!("http://{}{path}", p.proxy_addr)
}

async fn post_reload(p: &Running) -> common::Reply {
    send(
        &client(),
        Method::POST,
        &admin(p, "/reload"),
        &[("authorization", &format!("Bearer {TOKEN}"))],
        Bytes::new(),
    )
    .await
}

/// `acge_config_reloads_total{result, trigger}` now (0 before the first).
async fn reloads(p: &Running, result: &str, trigger: &str) -> f64 {
    let series = format!("acge_config_reloads_total{{result=\"{result}\",trigger=\"{trigger}\"}}");
    sample(&scrape(p).await, &series).unwrap_or(0.0)
}

async fn generation(p: &Running) -> u64 {
    let dump = get(&client(), &admin(p, "/config_dump"), &[]).await.json();
    dump["generation"]["number"].as_u64().unwrap()
}

fn sha256_of(path: &Path) -> String {
    acge_proxy::config::sha256_hex(&std::fs::read(path).unwrap())
}

/// Writes `text` to `path` as an editor would: a new file renamed over the old one.
fn replace(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_reload_adds_a_route_keeps_a_runtime_weight_and_reports_generation_and_sha() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let (blue, _) = upstream("blue", Duration::ZERO).await;
    let (green, _) = upstream("green", Duration::ZERO).await;
    let (other, _) = upstream("other", Duration::ZERO).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.yaml");
    std::fs::write(&path, yaml(blue, green, "", "127.0.0.1:0")).unwrap();
    let p = start_file(&path).await;
    let c = client();
    assert_eq!(generation(&p).await, 1);
    assert_eq!(get(&c, &url(&p, "/new"), &[]).await.status, 404);
    // An operator moves the weight at runtime; the file still says 0.
    let put = send(
        &c,
        Method::PUT,
        &admin(&p, "/routes/svc/weights"),
        &[("authorization", &format!("Bearer {TOKEN}"))],
        r#"{"green": 100}"#,
    )
    .await;
    assert_eq!(put.status, 200);

    let added = "  - {name: new, match: {path_prefix: /new}, blue: other, green: other}\n";
    let text = yaml(blue, green, added, "127.0.0.1:0").replace(
        "clusters:\n",
        &format!("clusters:\n  other: {{endpoints: [\"{other}\"]}}\n"),
    );
    replace(&path, &text);
    let loaded_before = reloads(&p, "loaded", "admin").await;
    let r = post_reload(&p).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let body = r.json();
    assert_eq!(body["result"], "loaded");
    assert_eq!(body["generation"], 2);
    assert_eq!(body["sha256"], sha256_of(&path));
    assert_eq!(body["routes"]["added"], serde_json::json!(["new"]));
    assert_eq!(body["clusters"]["added"], serde_json::json!(["other"]));

    let new = get(&c, &url(&p, "/new"), &[]).await;
    assert_eq!((new.status.as_u16(), &new.body[..]), (200, &b"other"[..]));
    // The runtime weight survived the reload: every request still goes green.
    for _ in 0..10 {
        assert_eq!(&get(&c, &url(&p, "/svc"), &[]).await.body[..], b"green");
    }
    let weights = get(&c, &admin(&p, "/weights"), &[]).await.json();
    assert_eq!(weights["routes"]["svc"]["green"], 100);
    assert_eq!(weights["routes"]["new"]["green"], 0);

    let dump = get(&c, &admin(&p, "/config_dump"), &[]).await.json();
    assert_eq!(dump["generation"]["number"], 2);
    assert_eq!(dump["generation"]["sha256"], sha256_of(&path));
    assert_eq!(dump["routes"][1]["name"], "new");
    let m = scrape(&p).await;
    assert_eq!(sample(&m, "acge_config_generation"), Some(2.0), "{m}");
    assert_eq!(reloads(&p, "loaded", "admin").await, loaded_before + 1.0);

    // The same file again is no change, and costs no generation.
    let again = post_reload(&p).await.json();
    assert_eq!(
        (again["result"].as_str(), again["generation"].as_u64()),
        (Some("unchanged"), Some(2))
    );

    // An edited weight in the file is the operator's: it applies.
    replace(
        &path,
        &text.replace(
            "green_weight: 0",
            "green_weight: 0\n    sticky: {header: x-user}",
        ),
    );
    assert_eq!(post_reload(&p).await.json()["result"], "loaded");
    assert_eq!(
        get(&c, &admin(&p, "/weights"), &[]).await.json()["routes"]["svc"]["green"],
        100,
        "an unedited weight stays the runtime one"
    );
    replace(&path, &text.replace("green_weight: 0", "green_weight: 25"));
    assert_eq!(post_reload(&p).await.json()["result"], "loaded");
    assert_eq!(
        get(&c, &admin(&p, "/weights"), &[]).await.json()["routes"]["svc"]["green"],
        25
    );
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_config_keeps_the_running_one_and_names_every_field_and_line() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let Files {
        blue,
        green,
        dir: _dir,
        path,
    } = files().await;
    let good = yaml(blue, green, "", "127.0.0.1:0");
    std::fs::write(&path, &good).unwrap();
    let p = start_file(&path).await;
    let c = client();

    // Two mistakes: both are reported, with their lines.
    let bad = good
        .replace("green_weight: 0", "green_weight: 140")
        .replace("green: green\n", "green: grene\n");
    replace(&path, &bad);
    let refused_before = reloads(&p, "refused", "admin").await;
    let r = post_reload(&p).await;
    assert_eq!(r.status, 422);
    let body = r.json();
    assert_eq!(body["error"], "config_refused");
    assert_eq!(body["generation"], 1);
    let errors: Vec<(String, u64)> = body["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["path"].as_str().unwrap().to_string(),
                e["line"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        errors,
        [
            ("routes[0].green".to_string(), 10),
            ("routes[0].green_weight".to_string(), 11)
        ],
        "{body}"
    );
    assert!(body["errors"][1]["message"]
        .as_str()
        .unwrap()
        .contains("140 is not a percentage"));
    // The running config serves on, unchanged.
    assert_eq!(&get(&c, &url(&p, "/svc"), &[]).await.body[..], b"blue");
    assert_eq!(generation(&p).await, 1);

    // A file that does not parse at all is refused the same way.
    replace(&path, "listener: [\n");
    let r = post_reload(&p).await;
    assert_eq!(r.status, 422);
    assert!(r.json()["errors"][0]["line"].is_u64(), "{:?}", r.body);

    // A section bound at start cannot change without a restart, and says so.
    replace(
        &path,
        &good.replace(
            "listener: {address: 127.0.0.1:0}",
            "listener: {address: 127.0.0.1:0, max_connections: 7}",
        ),
    );
    let r = post_reload(&p).await;
    assert_eq!(r.status, 422);
    let e = &r.json()["errors"][0];
    assert_eq!(
        (e["path"].as_str(), e["line"].as_u64()),
        (Some("listener"), Some(1))
    );
    assert!(e["message"].as_str().unwrap().contains("restart"), "{e}");

    // A model that cannot be loaded refuses the whole file, with the field.
    replace(
        &path,
        &(good.replace(
            "    green_weight: 0\n",
            "    green_weight: 0\n    filters: [acge]\n",
        ) + "filters:\n  acge: {model: /nonexistent/model}\n"),
    );
    let r = post_reload(&p).await;
    assert_eq!(r.status, 422, "{:?}", r.body);
    assert_eq!(r.json()["errors"][0]["path"], "filters.acge");
    assert_eq!(&get(&c, &url(&p, "/svc"), &[]).await.body[..], b"blue");

    assert_eq!(reloads(&p, "refused", "admin").await, refused_before + 4.0);
    let m = scrape(&p).await;
    assert_eq!(sample(&m, "acge_config_generation"), Some(1.0));
    assert_eq!(sample(&m, "acge_config_last_reload_successful"), Some(0.0));
    // Fixed, it loads, and the gauge the alert reads says so.
    replace(&path, &good.replace("green_weight: 0", "green_weight: 1"));
    assert_eq!(post_reload(&p).await.json()["result"], "loaded");
    let m = scrape(&p).await;
    assert_eq!(sample(&m, "acge_config_last_reload_successful"), Some(1.0));

    // Without the token, no reload.
    let r = send(&c, Method::POST, &admin(&p, "/reload"), &[], Bytes::new()).await;
    assert_eq!(r.status, 401);
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unchanged_cluster_keeps_its_connections_and_a_changed_one_moves() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let (blue, blue_conns) = upstream("blue", Duration::ZERO).await;
    let (green, _) = upstream("green", Duration::ZERO).await;
    let (blue2, _) = upstream("blue2", Duration::ZERO).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.yaml");
    let text = yaml(blue, green, "", "127.0.0.1:0");
    std::fs::write(&path, &text).unwrap();
    let p = start_file(&path).await;
    let c = client();
    for _ in 0..5 {
        assert_eq!(&get(&c, &url(&p, "/svc"), &[]).await.body[..], b"blue");
    }
    let before = blue_conns.lock().unwrap().clone();
    assert_eq!(
        before.len(),
        1,
        "sequential requests share one pooled connection"
    );
    // A change elsewhere (a sticky key): the blue cluster is the same cluster.
    replace(
        &path,
        &text.replace(
            "green_weight: 0",
            "green_weight: 0\n    sticky: {header: x-user}",
        ),
    );
    assert_eq!(post_reload(&p).await.json()["result"], "loaded");
    for _ in 0..5 {
        assert_eq!(&get(&c, &url(&p, "/svc"), &[]).await.body[..], b"blue");
    }
    assert_eq!(
        *blue_conns.lock().unwrap(),
        before,
        "requests after the reload reuse the pooled connection"
    );
    // A changed endpoint list moves the traffic.
    replace(&path, &text.replace(&blue.to_string(), &blue2.to_string()));
    let r = post_reload(&p).await.json();
    assert_eq!(r["clusters"]["changed"], serde_json::json!(["blue"]), "{r}");
    assert_eq!(&get(&c, &url(&p, "/svc"), &[]).await.body[..], b"blue2");
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_swap_is_atomic_under_load_and_a_request_in_flight_finishes_on_its_table() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let (a, _) = upstream("A", Duration::ZERO).await;
    let (b, _) = upstream("B", Duration::ZERO).await;
    let (slow, _) = upstream("slow", Duration::from_millis(800)).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.yaml");
    let slow_route = "  - {name: slow, match: {path_prefix: /slow}, blue: slowc, green: slowc}\n";
    let with_slow = |blue: SocketAddr| {
        yaml(blue, blue, slow_route, "127.0.0.1:0").replace(
            "clusters:\n",
            &format!("clusters:\n  slowc: {{endpoints: [\"{slow}\"]}}\n"),
        )
    };
    std::fs::write(&path, with_slow(a)).unwrap();
    let p = Arc::new(start_file(&path).await);

    // A slow request starts on generation 1; the reload removes its route and cluster.
    let in_flight = tokio::spawn({
        let u = url(&p, "/slow");
        async move { get(&client(), &u, &[]).await }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;

    // Clients hammer /svc while its cluster flips between A and B, 20 reloads.
    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(AtomicUsize::new(0));
    let served = Arc::new(AtomicUsize::new(0));
    let mut load = Vec::new();
    for _ in 0..4 {
        let (u, stop, failures, served) = (
            url(&p, "/svc"),
            stop.clone(),
            failures.clone(),
            served.clone(),
        );
        load.push(tokio::spawn(async move {
            let c = client();
            while !stop.load(Ordering::Relaxed) {
                let r = get(&c, &u, &[]).await;
                if r.status == 200 && (&r.body[..] == b"A" || &r.body[..] == b"B") {
                    served.fetch_add(1, Ordering::Relaxed);
                } else {
                    failures.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    let without_slow = |blue: SocketAddr| yaml(blue, blue, "", "127.0.0.1:0");
    for i in 0..20 {
        let target = if i % 2 == 0 { b } else { a };
        replace(&path, &without_slow(target));
        let r = post_reload(&p).await;
        assert_eq!(r.json()["result"], "loaded", "reload {i}");
        // Right after the swap, every new request takes the new cluster.
        let want: &[u8] = if i % 2 == 0 { b"B" } else { b"A" };
        assert_eq!(
            &get(&client(), &url(&p, "/svc"), &[]).await.body[..],
            want,
            "reload {i}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for l in load {
        l.await.unwrap();
    }
    assert_eq!(
        failures.load(Ordering::Relaxed),
        0,
        "no request failed or saw a mix"
    );
    assert!(served.load(Ordering::Relaxed) > 100, "the load ran");
    let slow_reply = in_flight.await.unwrap();
    assert_eq!(
        (slow_reply.status.as_u16(), &slow_reply.body[..]),
        (200, &b"slow"[..]),
        "the request in flight finished on the route the reload removed"
    );
    assert_eq!(get(&client(), &url(&p, "/slow"), &[]).await.status, 404);
    assert_eq!(generation(&p).await, 21);
    Arc::into_inner(p).unwrap().shutdown().await;
}

/// A ConfigMap volume as the kubelet writes it: `config.yaml -> ..data/config.yaml`,
/// `..data -> ..<timestamp>`; an update writes a new timestamped directory, points
/// `..data_tmp` at it and renames that over `..data`.
struct ConfigMapDir {
    root: PathBuf,
    n: usize,
}

impl ConfigMapDir {
    fn new(root: &Path, text: &str) -> Self {
        let mut d = Self {
            root: root.to_path_buf(),
            n: 0,
        };
        d.update(text);
        std::os::unix::fs::symlink("..data/config.yaml", root.join("config.yaml")).unwrap();
        d
    }

    fn update(&mut self, text: &str) {
        self.n += 1;
        let stamp = format!("..2026_12_01_00_00_{:02}.{}", self.n, 1000 + self.n);
        let fresh = self.root.join(&stamp);
        std::fs::create_dir(&fresh).unwrap();
        std::fs::write(fresh.join("config.yaml"), text).unwrap();
        let tmp = self.root.join("..data_tmp");
        std::os::unix::fs::symlink(&stamp, &tmp).unwrap();
        let old = std::fs::read_link(self.root.join("..data")).ok();
        std::fs::rename(&tmp, self.root.join("..data")).unwrap();
        if let Some(old) = old {
            std::fs::remove_dir_all(self.root.join(old)).unwrap();
        }
    }

    fn path(&self) -> PathBuf {
        self.root.join("config.yaml")
    }
}

async fn wait_for_generation(p: &Running, want: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let g = generation(p).await;
        if g >= want || Instant::now() > deadline {
            return g;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configmap_data_swap_is_seen_once_by_the_directory_watch() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let Files {
        blue, green, dir, ..
    } = files().await;
    let text = yaml(blue, green, "", "127.0.0.1:0");
    let mut cm = ConfigMapDir::new(dir.path(), &text);
    let p = start_file(&cm.path()).await;
    let c = client();
    assert_eq!(&get(&c, &url(&p, "/svc"), &[]).await.body[..], b"blue");

    let (loaded_before, refused_before) = (
        reloads(&p, "loaded", "watch").await,
        reloads(&p, "refused", "watch").await,
    );
    cm.update(&text.replace("green_weight: 0", "green_weight: 100"));
    assert_eq!(wait_for_generation(&p, 2).await, 2, "the swap was seen");
    assert_eq!(&get(&c, &url(&p, "/svc"), &[]).await.body[..], b"green");
    // One swap of several steps is one reload, not one per step.
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(reloads(&p, "loaded", "watch").await, loaded_before + 1.0);
    // A broken update is refused and the last good config keeps serving.
    cm.update("routes: 7\n");
    let deadline = Instant::now() + Duration::from_secs(10);
    while reloads(&p, "refused", "watch").await == refused_before {
        assert!(
            Instant::now() < deadline,
            "the broken update was never read"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(&get(&c, &url(&p, "/svc"), &[]).await.body[..], b"green");
    assert_eq!(generation(&p).await, 2);
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_config_of_a_running_proxy() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let Files {
        blue,
        green,
        dir: _dir,
        path,
    } = files().await;
    let admin_addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    // No watch: only the signal can reload it.
    let text = yaml(blue, green, "", &admin_addr.to_string())
        .replace("reload: {debounce_ms: 100}", "reload: {watch: false}");
    std::fs::write(&path, &text).unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_acge-proxy"))
        .args(["run", "--config"])
        .arg(&path)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let c = client();
    let dump_url = format!("http://{admin_addr}/config_dump");
    let generation_of = |dump: serde_json::Value| dump["generation"]["number"].as_u64();
    let deadline = Instant::now() + Duration::from_secs(20);
    let first = loop {
        let req = c.get(dump_url.parse().unwrap());
        if let Ok(Ok(res)) = tokio::time::timeout(Duration::from_secs(1), req).await {
            use http_body_util::BodyExt;
            let body = res.into_body().collect().await.unwrap().to_bytes();
            break serde_json::from_slice::<serde_json::Value>(&body).unwrap();
        }
        assert!(Instant::now() < deadline, "the proxy never came up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(generation_of(first), Some(1));
    replace(&path, &text.replace("green_weight: 0", "green_weight: 100"));
    let status = std::process::Command::new("kill")
        .args(["-HUP", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let dump = get(&c, &dump_url, &[]).await.json();
        if generation_of(dump.clone()) == Some(2) {
            assert_eq!(dump["routes"][0]["green_weight"], 100);
            break;
        }
        assert!(Instant::now() < deadline, "SIGHUP did not reload: {dump}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let m = get(&c, &format!("http://{admin_addr}/metrics"), &[]).await;
    let m = String::from_utf8_lossy(&m.body).into_owned();
    assert_eq!(
        sample(
            &m,
            "acge_config_reloads_total{result=\"loaded\",trigger=\"signal\"}"
        ),
        Some(1.0),
        "{m}"
    );
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let exit = child.wait().unwrap();
    assert!(exit.success(), "the proxy exits cleanly on SIGTERM");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_keeps_the_migration_progress_and_walks_an_added_route_from_the_first_step() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let Files {
        blue,
        green,
        dir: _dir,
        path,
    } = files().await;
    let migration = "migration: {interval_s: 3600, min_requests: 1}\n";
    let text = yaml(blue, green, "", "127.0.0.1:0") + migration;
    std::fs::write(&path, &text).unwrap();
    let p = start_file(&path).await;
    let c = client();
    let auth = format!("Bearer {TOKEN}");
    for _ in 0..2 {
        let r = send(
            &c,
            Method::POST,
            &admin(&p, "/migration/svc/promote"),
            &[("authorization", &auth)],
            Bytes::new(),
        )
        .await;
        assert_eq!(r.status, 200, "{:?}", r.body);
    }
    let before = get(&c, &admin(&p, "/migration"), &[]).await.json();
    assert_eq!(before["routes"]["svc"]["step"], 2);
    assert_eq!(before["routes"]["svc"]["weight"], 10);

    // Add a route, and edit svc's weight in the file: the controller's weight stands.
    let added = "  - {name: more, match: {path_prefix: /more}, blue: blue, green: green}\n";
    let edited = yaml(blue, green, added, "127.0.0.1:0")
        .replace("green_weight: 0", "green_weight: 50")
        + migration;
    replace(&path, &edited);
    assert_eq!(post_reload(&p).await.json()["result"], "loaded");
    let after = get(&c, &admin(&p, "/migration"), &[]).await.json();
    assert_eq!(after["routes"]["svc"]["step"], 2, "{after}");
    assert_eq!(after["routes"]["svc"]["weight"], 10, "{after}");
    assert_eq!(after["routes"]["more"]["step"], 0, "{after}");
    assert_eq!(after["routes"]["more"]["shadow"], true, "{after}");
    let weights = get(&c, &admin(&p, "/weights"), &[]).await.json();
    assert_eq!(weights["routes"]["svc"]["green"], 10);
    // The controller acts on the new table's routes: a promote moves the weight the
    // data plane reads.
    let r = send(
        &c,
        Method::POST,
        &admin(&p, "/migration/more/promote"),
        &[("authorization", &auth)],
        Bytes::new(),
    )
    .await;
    assert_eq!(r.status, 200);
    let weights = get(&c, &admin(&p, "/weights"), &[]).await.json();
    assert_eq!(weights["routes"]["more"]["green"], 5);

    // Removing the route lets the controller go of it.
    replace(&path, &text);
    assert_eq!(post_reload(&p).await.json()["result"], "loaded");
    let gone = get(&c, &admin(&p, "/migration"), &[]).await.json();
    assert!(gone["routes"].get("more").is_none(), "{gone}");
    assert_eq!(gone["routes"]["svc"]["weight"], 10);
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unchanged_acge_section_keeps_its_engine_and_score_cache_and_a_changed_one_reloads_it() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let model = tempfile::tempdir().unwrap();
    common::make_test_model(model.path(), &[]);
    let (up, _) = upstream("up", Duration::ZERO).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.yaml");
    let text = |weight: u8, delay_us: u32| {
        format!(
            "listener: {{address: 127.0.0.1:0}}
admin: {{address: 127.0.0.1:0}}
clusters:
  up: {{endpoints: [\"{up}\"]}}
routes:
  - {{name: scored, match: {{path_prefix: /svc}}, blue: up, green: up, green_weight: {weight}, filters: [acge]}}
filters:
  acge: {{model: \"{}\", mode: observe, on: [request], max_delay_us: {delay_us}}}
",
            model.path().display()
        )
    };
    std::fs::write(&path, text(0, 500)).unwrap();
    let p = start_file(&path).await;
    let c = client();
    let score = |body: &'static str| {
        let (c, u) = (c.clone(), url(&p, "/svc"));
        async move {
            let r = send(
                &c,
                Method::POST,
                &u,
                &[("content-type", "application/json")],
                body,
            )
            .await;
            assert_eq!(r.status, 200);
        }
    };
    let hits = |m: &str| sample(m, "acge_inference_cache_total{result=\"hit\"}").unwrap_or(0.0);
    score(r#"{"reload":"cached"}"#).await;
    let before = hits(&scrape(&p).await);

    // A change to the route only: the engine, its threads and its cache stay.
    replace(&path, &text(10, 500));
    let r = post_reload(&p).await.json();
    assert_eq!(r["filters_rebuilt"], serde_json::json!([]), "{r}");
    score(r#"{"reload":"cached"}"#).await;
    assert_eq!(
        hits(&scrape(&p).await),
        before + 1.0,
        "the score cache survived the reload"
    );

    // A change to filters.acge loads the model anew (its cache starts empty).
    replace(&path, &text(10, 900));
    let r = post_reload(&p).await.json();
    assert_eq!(r["filters_rebuilt"], serde_json::json!(["acge"]), "{r}");
    score(r#"{"reload":"cached"}"#).await;
    assert_eq!(
        hits(&scrape(&p).await),
        before + 1.0,
        "a new engine, a new cache"
    );
    p.shutdown().await;
}
