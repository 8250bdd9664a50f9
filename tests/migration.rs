//! The migration controller, as an operator and the clients see it: a healthy green
//! walks every step, each of the four triggers rolls back, thin traffic holds, a
//! restart resumes, operator actions, sticky clients, shadow mode, and no failed request
//! through a whole migration and a rollback.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use acge_proxy::control::admin::TokenSource;
use acge_proxy::demo::{spawn_backend_with, Backend, Fault, Faults};
use acge_proxy::proxy::split::Version;
use acge_proxy::Running;
use common::{client, get, sample, send, start, TOKEN};
use http::{Method, StatusCode};

struct Mig {
    /// The route's name, unique per test: metrics are process-wide.
    name: &'static str,
    proxy: Running,
    faults: Arc<Faults>,
    _blue: Backend,
    _green: Backend,
}

impl Mig {
    fn url(&self) -> String {
        format!("http://{}/svc/x", self.proxy.proxy_addr)
    }
    fn admin(&self, path: &str) -> String {
        format!("http://{}{path}", self.proxy.admin_addr)
    }
    async fn status(&self) -> serde_json::Value {
        get(&client(), &self.admin("/migration"), &[]).await.json()["routes"][self.name].clone()
    }
    async fn act(&self, action: &str) -> common::Reply {
        send(
            &client(),
            Method::POST,
            &self.admin(&format!("/migration/{}/{action}", self.name)),
            &[("authorization", &format!("Bearer {TOKEN}"))],
            "",
        )
        .await
    }
    async fn wait_for(
        &self,
        what: &str,
        f: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let s = self.status().await;
            if f(&s) {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; last status {s:#}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Blue and green demo backends sharing `faults`, and a proxy with one route `svc`
/// (sticky on x-user-id) running `filters`, with `migration` YAML (indented 2).
async fn setup(name: &'static str, filters: &str, sections: &str, migration: &str) -> Mig {
    let faults = Arc::new(Faults::default());
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let blue = spawn_backend_with("auth", Version::Blue, any, faults.clone())
        .await
        .unwrap();
    let green = spawn_backend_with("auth", Version::Green, any, faults.clone())
        .await
        .unwrap();
    let yaml = format!(
        "listener: {{address: 127.0.0.1:0}}
admin: {{address: 127.0.0.1:0}}
clusters:
  blue: {{endpoints: [\"{}\"]}}
  green: {{endpoints: [\"{}\"]}}
routes:
  - name: {name}
    match: {{path_prefix: /svc}}
    blue: blue
    green: green
    sticky: {{header: x-user-id}}
    filters: [{filters}]
{sections}
migration:
{migration}",
        blue.addr, green.addr
    );
    let proxy = start(&yaml, TokenSource::Fixed(TOKEN.into())).await;
    Mig {
        name,
        proxy,
        faults,
        _blue: blue,
        _green: green,
    }
}

/// Clients sending requests until stopped; counts answers that were not 200.
struct Load {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(url: String, clients: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let tasks = (0..clients)
            .map(|i| {
                let (url, stop, sent, failed) =
                    (url.clone(), stop.clone(), sent.clone(), failed.clone());
                tokio::spawn(async move {
                    let c = client();
                    let mut n = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        let user = format!("user-{}", (n * 7 + i as u64) % 200);
                        let r = send(
                            &c,
                            Method::POST,
                            &url,
                            &[("x-user-id", &user), ("content-type", "application/json")],
                            r#"{"action":"read","target":"own profile"}"#,
                        )
                        .await;
                        sent.fetch_add(1, Ordering::Relaxed);
                        if r.status != StatusCode::OK {
                            failed.fetch_add(1, Ordering::Relaxed);
                        }
                        n += 1;
                    }
                })
            })
            .collect();
        Self {
            stop,
            sent,
            failed,
            tasks,
        }
    }

    async fn stop(self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await.unwrap();
        }
        (
            self.sent.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
        )
    }
}

const QUICK: &str = "  steps: [0, 5, 10, 25, 50, 75, 100]
  interval_s: 0.3
  min_requests: 10
  rollback_window_s: 1
  rollback_min_requests: 10";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_healthy_green_walks_every_step_with_no_failed_request() {
    let m = setup(
        "walk",
        "constitutional_hash",
        "filters: {constitutional_hash: {mode: audit}}",
        QUICK,
    )
    .await;
    let s = m.status().await;
    assert_eq!(
        (
            s["step"].as_u64(),
            s["weight"].as_u64(),
            s["shadow"].as_bool()
        ),
        (Some(0), Some(0), Some(true))
    );
    let load = Load::start(m.url(), 8);
    let done = m
        .wait_for("the last step", |s| s["state"] == "complete")
        .await;
    let (sent, failed) = load.stop().await;
    assert_eq!(done["weight"], 100);
    assert_eq!(done["step"], 6);
    assert!(sent > 100, "the load ran ({sent} requests)");
    assert_eq!(failed, 0, "no request failed during the whole migration");
    let metrics = get(&client(), &m.admin("/metrics"), &[]).await;
    let text = String::from_utf8_lossy(&metrics.body);
    assert_eq!(
        sample(
            &text,
            &format!("acge_migration_step{{route=\"{}\"}}", m.name)
        ),
        Some(6.0)
    );
    assert_eq!(
        sample(&text, &format!("acge_green_weight{{route=\"{}\"}}", m.name)),
        Some(100.0)
    );
}

/// One rollback trigger: green misbehaves at step 1 (50 %) under load; the route must
/// go to 0 % green, rolled back for `reason`, with the figures in the audit log.
async fn rolls_back(
    fault: Fault,
    reason: &'static str,
    filters: &str,
    sections: &str,
    thresholds: &str,
) {
    let audit = tempfile::tempdir().unwrap();
    let sections = format!(
        "{sections}\n  audit: {{dir: {}, commit: async}}",
        audit.path().display()
    );
    let filters = if filters.is_empty() {
        "audit".to_string()
    } else {
        format!("{filters}, audit")
    };
    let migration = format!(
        "  steps: [50, 100]\n  interval_s: 60\n  min_requests: 10\n  rollback_window_s: 2\n  rollback_min_requests: 10\n  rollback: {thresholds}"
    );
    let m = setup(
        reason,
        &filters,
        &format!("filters:\n{sections}"),
        &migration,
    )
    .await;
    assert_eq!(m.status().await["weight"], 50);
    let load = Load::start(m.url(), 8);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let healthy = m.status().await;
    assert_eq!(healthy["state"], "running", "healthy so far: {healthy:#}");
    let set = Instant::now();
    m.faults.set("auth", Version::Green, fault);
    let s = m
        .wait_for("a rollback", |s| s["state"] == "rolled_back")
        .await;
    let took = set.elapsed();
    let _ = load.stop().await;
    println!("{reason}: rolled back {took:?} after the fault was set");
    assert_eq!(s["weight"], 0);
    assert_eq!(s["last_rollback"]["reason"], reason, "{s:#}");
    assert_eq!(s["last_rollback"]["weight"], 50);
    // Green gets nothing now.
    for _ in 0..20 {
        assert_eq!(get(&client(), &m.url(), &[]).await.backend(), "blue");
    }
    let metrics = get(&client(), &m.admin("/metrics"), &[]).await;
    let text = String::from_utf8_lossy(&metrics.body);
    let series = format!(
        "acge_migration_rollbacks_total{{route=\"{}\",reason=\"{reason}\"}}",
        m.name
    );
    assert_eq!(sample(&text, &series), Some(1.0), "{series}");
    m.proxy.shutdown().await;
    let records = common::audit_records(audit.path());
    let event = records
        .iter()
        .find(|r| r.decision == "rollback")
        .and_then(|r| r.event.clone())
        .expect("the rollback is in the audit log");
    assert_eq!(event["detail"]["reason"], reason, "{event:#}");
    assert!(
        event["detail"]["figures"]["green"]["requests"]
            .as_u64()
            .unwrap()
            >= 10
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_roll_back() {
    let fault = Fault {
        error_rate: 0.5,
        ..Fault::default()
    };
    rolls_back(fault, "error_rate", "", "", "{error_rate_above: 0.01}").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_answers_roll_back() {
    let fault = Fault {
        latency_ms: 300,
        ..Fault::default()
    };
    rolls_back(fault, "p95_ms", "", "", "{p95_above_ms: 150}").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_hashes_roll_back() {
    let fault = Fault {
        wrong_hash_rate: 0.5,
        ..Fault::default()
    };
    rolls_back(
        fault,
        "hash_consistency",
        "constitutional_hash",
        "  constitutional_hash: {mode: audit}",
        "{}",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn noncompliant_answers_roll_back() {
    // The default model scores green's responses; the fault makes them disclose
    // personal data in bulk.
    let model = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/acge-default");
    let fault = Fault {
        noncompliant_rate: 1.0,
        ..Fault::default()
    };
    let section = format!(
        "  acge: {{model: {}, mode: observe, on: [response], timeout_ms: 5000}}",
        model.display()
    );
    rolls_back(fault, "compliance", "acge", &section, "{}").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thin_traffic_holds_the_step() {
    let m = setup(
        "thin",
        "",
        "",
        "  steps: [50, 100]\n  interval_s: 0.2\n  min_requests: 1000",
    )
    .await;
    for _ in 0..20 {
        assert_eq!(get(&client(), &m.url(), &[]).await.status, StatusCode::OK);
    }
    let s = m
        .wait_for("a holding note", |s| !s["holding"].is_null())
        .await;
    assert_eq!(
        (s["state"].as_str(), s["weight"].as_u64()),
        (Some("running"), Some(50))
    );
    assert!(
        s["holding"].as_str().unwrap().contains("thin traffic"),
        "{s:#}"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(m.status().await["weight"], 50, "still holding");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_pause_resume_promote_and_roll_back() {
    let m = setup(
        "operator",
        "",
        "",
        "  steps: [0, 50, 100]\n  interval_s: 60",
    )
    .await;
    // Actions need the token.
    let anonymous = send(
        &client(),
        Method::POST,
        &m.admin(&format!("/migration/{}/pause", m.name)),
        &[],
        "",
    )
    .await;
    assert_eq!(anonymous.status, StatusCode::UNAUTHORIZED);
    assert_eq!(m.act("promote").await.json()["weight"], 50);
    let paused = m.act("pause").await;
    assert_eq!(paused.json()["state"], "paused");
    assert_eq!(
        m.act("pause").await.status,
        StatusCode::CONFLICT,
        "already paused"
    );
    assert_eq!(m.act("resume").await.json()["state"], "running");
    let unknown = m.act("jump").await;
    assert_eq!(
        (unknown.status, unknown.json()["error"].as_str()),
        (StatusCode::NOT_FOUND, Some("unknown_action"))
    );
    let other = send(
        &client(),
        Method::POST,
        &m.admin("/migration/nope/pause"),
        &[("authorization", &format!("Bearer {TOKEN}"))],
        "",
    )
    .await;
    assert_eq!(other.status, StatusCode::NOT_FOUND);
    // A manual weight pauses the controller, and the reply says so.
    let put = send(
        &client(),
        Method::PUT,
        &m.admin(&format!("/routes/{}/weights", m.name)),
        &[("authorization", &format!("Bearer {TOKEN}"))],
        r#"{"green": 30}"#,
    )
    .await;
    assert_eq!(put.status, StatusCode::OK);
    assert!(
        put.json()["migration"].as_str().unwrap().contains("paused"),
        "{:?}",
        put.json()
    );
    let s = m.status().await;
    assert_eq!(
        (s["state"].as_str(), s["weight"].as_u64()),
        (Some("paused"), Some(30))
    );
    let rolled = m.act("rollback").await.json();
    assert_eq!(
        (rolled["state"].as_str(), rolled["weight"].as_u64()),
        (Some("rolled_back"), Some(0))
    );
    assert_eq!(rolled["last_rollback"]["reason"], "operator");
    // Resuming a rolled-back route starts over at the first step (shadow).
    let resumed = m.act("resume").await.json();
    assert_eq!(
        (
            resumed["step"].as_u64(),
            resumed["weight"].as_u64(),
            resumed["shadow"].as_bool()
        ),
        (Some(0), Some(0), Some(true))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_proxy_resumes_where_it_was() {
    let dir = tempfile::tempdir().unwrap();
    let migration = format!(
        "  steps: [0, 50, 100]\n  interval_s: 60\n  state_file: {}",
        dir.path().join("state.json").display()
    );
    let m = setup("restart", "", "", &migration).await;
    m.act("promote").await;
    assert_eq!(m.status().await["weight"], 50);
    m.proxy.shutdown().await;
    let m = setup("restart", "", "", &migration).await;
    let s = m.status().await;
    assert_eq!(
        (
            s["step"].as_u64(),
            s["weight"].as_u64(),
            s["state"].as_str()
        ),
        (Some(1), Some(50), Some("running"))
    );
    m.act("rollback").await;
    m.proxy.shutdown().await;
    let m = setup("restart", "", "", &migration).await;
    let s = m.status().await;
    assert_eq!(
        (s["weight"].as_u64(), s["state"].as_str()),
        (Some(0), Some("rolled_back")),
        "a rollback stays until an operator resumes"
    );
    assert_eq!(get(&client(), &m.url(), &[]).await.backend(), "blue");
    // A damaged state file is refused with its path, not silently replaced.
    m.proxy.shutdown().await;
    std::fs::write(dir.path().join("state.json"), b"{not json").unwrap();
    let yaml_err = acge_proxy::start(
        acge_proxy::config::Config::from_yaml(
            &format!("listener: {{address: 127.0.0.1:0}}\nadmin: {{address: 127.0.0.1:0}}\nclusters:\n  c: {{endpoints: [\"127.0.0.1:9\"]}}\nroutes:\n  - {{name: svc, match: {{path_prefix: /svc}}, blue: c, green: c}}\nmigration:\n{migration}"),
            "t.yaml",
        )
        .unwrap(),
        acge_proxy::StartOptions::new(TokenSource::Fixed(TOKEN.into())),
    )
    .await
    .err()
    .expect("a damaged state file stops the start");
    assert!(yaml_err.to_string().contains("state.json"), "{yaml_err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sticky_clients_move_only_blue_to_green_until_a_rollback() {
    let m = setup(
        "sticky",
        "",
        "",
        "  steps: [0, 5, 10, 25, 50, 75, 100]\n  interval_s: 60",
    )
    .await;
    let c = client();
    let users: Vec<String> = (0..200).map(|i| format!("user-{i}")).collect();
    let mut on_green = vec![false; users.len()];
    for step in 1..=6 {
        m.act("promote").await;
        for (i, u) in users.iter().enumerate() {
            let green = get(&c, &m.url(), &[("x-user-id", u)]).await.backend() == "green";
            assert!(
                green || !on_green[i],
                "{u} moved green → blue at step {step}"
            );
            on_green[i] = green;
        }
    }
    assert!(on_green.iter().all(|g| *g), "everyone is green at 100 %");
    m.act("rollback").await;
    for u in &users {
        assert_eq!(
            get(&c, &m.url(), &[("x-user-id", u)]).await.backend(),
            "blue"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shadow_mirrors_to_green_and_only_blue_answers_the_client() {
    let m = setup(
        "shadow",
        "",
        "",
        "  steps: [0, 100]\n  interval_s: 60\n  rollback_window_s: 5\n  rollback_min_requests: 10\n  shadow: {ignore_fields: [backend, received_headers]}",
    )
    .await;
    let c = client();
    for _ in 0..40 {
        let r = send(
            &c,
            Method::POST,
            &m.url(),
            &[("content-type", "application/json")],
            r#"{"a":1}"#,
        )
        .await;
        assert_eq!((r.status, r.backend()), (StatusCode::OK, "blue"));
    }
    let s = m
        .wait_for("green's shadow answers", |s| {
            s["green"]["requests"].as_u64() >= Some(40)
        })
        .await;
    assert_eq!(s["weight"], 0);
    let metrics = get(&c, &m.admin("/metrics"), &[]).await;
    let text = String::from_utf8_lossy(&metrics.body).into_owned();
    assert!(
        sample(
            &text,
            &format!(
                "acge_shadow_requests_total{{route=\"{}\",result=\"mirrored\"}}",
                m.name
            )
        ) >= Some(40.0)
    );
    assert_eq!(
        sample(
            &text,
            &format!(
                "acge_shadow_mismatch_total{{route=\"{}\",kind=\"status\"}}",
                m.name
            )
        ),
        Some(0.0)
    );
    assert_eq!(
        sample(
            &text,
            &format!(
                "acge_shadow_mismatch_total{{route=\"{}\",kind=\"body\"}}",
                m.name
            )
        ),
        Some(0.0)
    );
    // A failing green is seen in shadow (mismatches, then a rollback) while every
    // client still gets blue's 200.
    m.faults.set(
        "auth",
        Version::Green,
        Fault {
            error_rate: 1.0,
            ..Fault::default()
        },
    );
    for _ in 0..40 {
        let r = send(
            &c,
            Method::POST,
            &m.url(),
            &[("content-type", "application/json")],
            r#"{"a":1}"#,
        )
        .await;
        assert_eq!((r.status, r.backend()), (StatusCode::OK, "blue"));
    }
    let s = m
        .wait_for("a rollback from shadow", |s| s["state"] == "rolled_back")
        .await;
    assert_eq!(
        (s["last_rollback"]["reason"].as_str(), s["shadow"].as_bool()),
        (Some("error_rate"), Some(false))
    );
    let metrics = get(&c, &m.admin("/metrics"), &[]).await;
    let text = String::from_utf8_lossy(&metrics.body).into_owned();
    // The first failure already breaches 1 %, so few are mirrored before the rollback.
    assert!(
        sample(
            &text,
            &format!(
                "acge_shadow_mismatch_total{{route=\"{}\",kind=\"status\"}}",
                m.name
            )
        ) >= Some(1.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollback_under_load_fails_no_request() {
    let m = setup("underload", "", "", "  steps: [50, 100]\n  interval_s: 60").await;
    let load = Load::start(m.url(), 8);
    tokio::time::sleep(Duration::from_millis(500)).await;
    m.act("rollback").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (sent, failed) = load.stop().await;
    assert!(sent > 50);
    assert_eq!(
        failed, 0,
        "{failed} of {sent} requests failed across the rollback"
    );
}
