//! The acge filter's `remote` backend against a real Open Inference Protocol server:
//! Seldon's MLServer from PyPI (scripts/setup-mlserver.sh) on loopback, serving the
//! same TorchScript model through a small runtime class (tests/support/mlserver/).
//! Remote scores equal in-process ones, alone and batched; a killed server opens the
//! circuit and `/ready` follows; a restarted one closes it; a local fallback decides
//! meanwhile.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use acge_filters::acge::filter::{AcgeConfig, AcgeFilter};
use common::{client, get, make_test_model, sample, scrape, send};
use http::{HeaderMap, Method};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The MLServer executable, installed once per test process
/// (scripts/setup-mlserver.sh also locks against other processes).
fn mlserver() -> PathBuf {
    static PATH: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    PATH.get_or_init(install_mlserver).clone()
}

fn install_mlserver() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new(root.join("scripts/setup-mlserver.sh"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "scripts/setup-mlserver.sh: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .last()
            .expect("setup-mlserver.sh prints the mlserver executable")
            .trim(),
    )
}

/// An MLServer serving the model in `model` as `acge`, on loopback ports of its own.
struct Server {
    dir: tempfile::TempDir,
    grpc: u16,
    http: u16,
    child: Option<Child>,
}

impl Server {
    fn new(model: &Path) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        std::fs::copy(
            root.join("tests/support/mlserver/acge_runtime.py"),
            dir.path().join("acge_runtime.py"),
        )
        .unwrap();
        let (grpc, http) = (free_port(), free_port());
        std::fs::write(
            dir.path().join("settings.json"),
            serde_json::json!({
                "host": "127.0.0.1", "http_port": http, "grpc_port": grpc,
                "metrics_port": free_port(), "parallel_workers": 0, "debug": false,
            })
            .to_string(),
        )
        .unwrap();
        std::fs::write(
            dir.path().join("model-settings.json"),
            serde_json::json!({
                "name": "acge",
                "implementation": "acge_runtime.TorchScriptRuntime",
                "parameters": {"uri": model},
            })
            .to_string(),
        )
        .unwrap();
        Self {
            dir,
            grpc,
            http,
            child: None,
        }
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.grpc)
    }

    /// Starts it and waits until the model is ready (its HTTP health).
    async fn start(&mut self, mlserver: &Path) {
        let child = Command::new(mlserver)
            .arg("start")
            .arg(self.dir.path())
            .current_dir(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.child = Some(child);
        let url = format!("http://127.0.0.1:{}/v2/models/acge/ready", self.http);
        let c = client();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let req = c.get(url.parse().unwrap());
            if let Ok(Ok(res)) = tokio::time::timeout(Duration::from_secs(1), req).await {
                if res.status() == 200 {
                    return;
                }
            }
            assert!(Instant::now() < deadline, "MLServer never became ready");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

fn config(model: &Path, remote: Option<String>) -> AcgeConfig {
    let remote = remote.map_or(String::new(), |r| format!(", remote: {r}"));
    serde_yaml_ng::from_str(&format!(
        "{{model: \"{}\", mode: observe, max_delay_us: 20000{remote}}}",
        model.display()
    ))
    .unwrap()
}

fn bodies() -> Vec<String> {
    (0..40)
        .map(|i| {
            format!(
                r#"{{"user":"user-{i}","action":"read","records":{}}}"#,
                i * 7
            )
        })
        .collect()
}

/// Each body's score and principles, one after the other or all at once (queued
/// together, so that they are batched).
async fn scores(
    filter: &Arc<AcgeFilter>,
    bodies: &[String],
    together: bool,
) -> Vec<(f64, Vec<String>)> {
    let score = |filter: Arc<AcgeFilter>, body: String| async move {
        let c = filter
            .score_request(
                &Method::POST,
                "/svc",
                &HeaderMap::new(),
                Some(body.as_bytes()),
            )
            .await
            .expect("scored");
        (c.score, c.principles)
    };
    if !together {
        let mut out = Vec::new();
        for b in bodies {
            out.push(score(filter.clone(), b.clone()).await);
        }
        return out;
    }
    let tasks: Vec<_> = bodies
        .iter()
        .map(|b| tokio::spawn(score(filter.clone(), b.clone())))
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_scores_equal_in_process_scores_alone_and_in_batches() {
    let model = tempfile::tempdir().unwrap();
    make_test_model(model.path(), &[]);
    let mut server = Server::new(model.path());
    server.start(&mlserver()).await;
    let hash = acge_proxy::config::DEFAULT_CONSTITUTION_HASH;
    let local = Arc::new(AcgeFilter::load(&config(model.path(), None), hash).unwrap());
    let remote = Arc::new(
        AcgeFilter::load(
            &config(
                model.path(),
                Some(format!(
                    "{{endpoint: \"{}\", model: acge, timeout_ms: 5000}}",
                    server.endpoint()
                )),
            ),
            hash,
        )
        .unwrap(),
    );
    let bodies = bodies();
    let want = scores(&local, &bodies, false).await;
    for together in [false, true] {
        let got = scores(&remote, &bodies, together).await;
        for (i, ((w, wp), (g, gp))) in want.iter().zip(&got).enumerate() {
            assert!(
                (w - g).abs() <= 1e-5,
                "body {i} (batched: {together}): in process {w}, remote {g}"
            );
            assert_eq!(wp, gp, "body {i}: the same principles over the threshold");
        }
    }
    assert!(remote.waiting_for().is_none());
}

async fn wait_until(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !check().await {
        assert!(Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn ready(admin: SocketAddr) -> (u16, String) {
    let r = get(&client(), &format!("http://{admin}/ready"), &[]).await;
    (
        r.status.as_u16(),
        String::from_utf8_lossy(&r.body).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_server_opens_the_circuit_and_ready_follows_and_a_restarted_one_closes_it() {
    let model = tempfile::tempdir().unwrap();
    make_test_model(model.path(), &[]);
    let mlserver = mlserver();
    let mut server = Server::new(model.path());
    server.start(&mlserver).await;
    let (p, _up) = common::filtered_proxy(
        "remote",
        "acge",
        &format!(
            "filters:\n  acge: {{model: \"{}\", mode: observe, remote: {{endpoint: \"{}\", model: acge, timeout_ms: 500, breaker_failures: 3, breaker_cool_down_ms: 1000}}}}\n",
            model.path().display(),
            server.endpoint()
        ),
    )
    .await;
    let c = client();
    let url = format!("http://{}/svc", p.proxy_addr);
    let post = |body: String| {
        let (c, url) = (c.clone(), url.clone());
        async move {
            send(
                &c,
                Method::POST,
                &url,
                &[("content-type", "application/json")],
                body,
            )
            .await
        }
    };
    wait_until("ready with the server up", async || {
        ready(p.admin_addr).await.0 == 200
    })
    .await;
    let r = post(r#"{"user":"alice"}"#.into()).await;
    assert_eq!(r.status, 200);
    assert_ne!(
        r.json()["received_headers"]["x-acge-request-compliance"],
        "unavailable"
    );

    server.kill();
    // on_error: deny (the default) fails closed; after 3 failures the circuit opens.
    for i in 0..3 {
        let r = post(format!(r#"{{"n":{i}}}"#)).await;
        assert_eq!(r.status, 503, "{:?}", r.body);
    }
    let started = Instant::now();
    let r = post(r#"{"n":"open"}"#.into()).await;
    assert_eq!(r.status, 503);
    assert!(
        started.elapsed() < Duration::from_millis(200),
        "an open circuit refuses at once, it does not wait for the dead server: {:?}",
        started.elapsed()
    );
    let (code, body) = ready(p.admin_addr).await;
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("inference server"), "{body}");
    let m = scrape(&p).await;
    assert_eq!(sample(&m, "acge_remote_breaker_state"), Some(2.0), "{m}");
    assert!(sample(&m, "acge_remote_errors_total{kind=\"open\"}").is_some_and(|n| n >= 1.0));

    // Restarted on the same ports: the health probe closes the circuit.
    server.start(&mlserver).await;
    wait_until("ready again after the restart", async || {
        ready(p.admin_addr).await.0 == 200
    })
    .await;
    let r = post(r#"{"user":"bob"}"#.into()).await;
    assert_eq!(r.status, 200);
    assert_eq!(
        sample(&scrape(&p).await, "acge_remote_breaker_state"),
        Some(0.0)
    );
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_fallback_decides_while_the_server_is_gone_and_the_pod_stays_ready() {
    let model = tempfile::tempdir().unwrap();
    make_test_model(model.path(), &[]);
    let mut server = Server::new(model.path());
    server.start(&mlserver()).await;
    let (p, _up) = common::filtered_proxy(
        "fallback",
        "acge",
        &format!(
            "filters:\n  acge: {{model: \"{}\", mode: observe, remote: {{endpoint: \"{}\", model: acge, timeout_ms: 500, breaker_failures: 2, fallback: local}}}}\n",
            model.path().display(),
            server.endpoint()
        ),
    )
    .await;
    let c = client();
    let url = format!("http://{}/svc", p.proxy_addr);
    wait_until("ready", async || ready(p.admin_addr).await.0 == 200).await;
    let score = async |body: &str| {
        let r = send(
            &c,
            Method::POST,
            &url,
            &[("content-type", "application/json")],
            body.to_string(),
        )
        .await;
        assert_eq!(r.status, 200);
        r.json()["received_headers"]["x-acge-request-compliance"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let before = score(r#"{"user":"carol"}"#).await;
    server.kill();
    for i in 0..5 {
        let s = score(&format!(r#"{{"user":"carol","n":{i}}}"#)).await;
        assert!(s.parse::<f64>().is_ok(), "the local model scored it: {s}");
    }
    assert!(before.parse::<f64>().is_ok());
    let m = scrape(&p).await;
    assert!(
        sample(&m, "acge_remote_fallback_total").is_some_and(|n| n >= 5.0),
        "{m}"
    );
    assert_eq!(
        ready(p.admin_addr).await.0,
        200,
        "the fallback serves, so the pod stays in"
    );
    p.shutdown().await;
}

/// helm/examples/inference's Triton model configuration parses as Triton's own
/// `ModelConfig` (its protobuf, from the tritonclient wheel MLServer brings), with
/// dynamic batching, the TorchScript platform, and as many outputs per item as the
/// encoder has principles.
#[test]
fn the_triton_example_config_is_a_valid_model_config_for_the_encoder() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let python = mlserver().with_file_name("python");
    let config =
        root.join("helm/examples/inference/triton/model_repository/acge-encoder/config.pbtxt");
    let out = Command::new(python)
        .arg("-c")
        .arg(
            "import json, sys\n\
             from google.protobuf import text_format\n\
             from tritonclient.grpc import model_config_pb2\n\
             c = text_format.Parse(open(sys.argv[1]).read(), model_config_pb2.ModelConfig())\n\
             print(json.dumps({'platform': c.platform, 'max_batch_size': c.max_batch_size,\n\
               'delay': c.dynamic_batching.max_queue_delay_microseconds,\n\
               'inputs': [i.name for i in c.input], 'outputs': [[o.name, list(o.dims)] for o in c.output]}))",
        )
        .arg(&config)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let parsed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let meta: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("models/acge-encoder/model.json")).unwrap(),
    )
    .unwrap();
    let principles = meta["principles"].as_array().unwrap().len();
    assert_eq!(parsed["platform"], "pytorch_libtorch", "{parsed}");
    assert!(parsed["max_batch_size"].as_u64().unwrap() >= 64, "{parsed}");
    assert!(parsed["delay"].as_u64().unwrap() > 0, "{parsed}");
    assert_eq!(
        parsed["inputs"],
        serde_json::json!(["INPUT__0", "INPUT__1"])
    );
    assert_eq!(
        parsed["outputs"],
        serde_json::json!([["OUTPUT__0", [principles]]]),
        "one FP32 per principle of models/acge-encoder"
    );
}

/// A server that hangs (stopped, not gone) costs each request the call's deadline
/// until the circuit opens; from then on requests are answered at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_circuit_answers_at_once_instead_of_waiting_on_a_hung_server() {
    let model = tempfile::tempdir().unwrap();
    make_test_model(model.path(), &[]);
    let mut server = Server::new(model.path());
    server.start(&mlserver()).await;
    let (p, _up) = common::filtered_proxy(
        "hung",
        "acge",
        &format!(
            "filters:\n  acge: {{model: \"{}\", mode: observe, remote: {{endpoint: \"{}\", model: acge, timeout_ms: 400, breaker_failures: 2, breaker_cool_down_ms: 60000}}}}\n",
            model.path().display(),
            server.endpoint()
        ),
    )
    .await;
    let url = format!("http://{}/svc", p.proxy_addr);
    let n = std::sync::atomic::AtomicUsize::new(0);
    // Each body its own, so that the score cache never answers.
    let post = || {
        let url = url.clone();
        let body = format!(
            r#"{{"n":{}}}"#,
            n.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        async move {
            let started = Instant::now();
            let r = send(
                &client(),
                Method::POST,
                &url,
                &[("content-type", "application/json")],
                body,
            )
            .await;
            (r.status.as_u16(), started.elapsed())
        }
    };
    assert_eq!(post().await.0, 200);
    let pid = server.child.as_ref().unwrap().id().to_string();
    assert!(Command::new("kill")
        .args(["-STOP", &pid])
        .status()
        .unwrap()
        .success());
    for _ in 0..2 {
        let (status, took) = post().await;
        assert_eq!(status, 503);
        assert!(
            took >= Duration::from_millis(350),
            "a hung server costs the deadline: {took:?}"
        );
    }
    let (status, took) = post().await;
    assert_eq!(status, 503);
    assert!(
        took < Duration::from_millis(100),
        "the open circuit answers at once: {took:?}"
    );
    let _ = Command::new("kill").args(["-CONT", &pid]).status();
    p.shutdown().await;
}
