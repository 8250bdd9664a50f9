//! Restart without a gap, as an operator does it: a second `acge-proxy run
//! --takeover SOCKET` takes the listening sockets over from the first while clients
//! keep sending, on kept-alive connections and on new ones; the first drains and
//! exits. No request fails, and the audit log the two share stays one chain that
//! verifies and holds every answered request.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{client, fixed_upstream};

fn free_port() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

fn spawn_proxy(config: &Path, socket: &Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_acge-proxy"))
        .args(["run", "--config"])
        .arg(config)
        .arg("--takeover")
        .arg(socket)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap()
}

async fn wait_ready(admin: SocketAddr) {
    let c = client();
    let url = format!("http://{admin}/ready");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let req = c.get(url.parse().unwrap());
        if let Ok(Ok(res)) = tokio::time::timeout(Duration::from_secs(1), req).await {
            if res.status() == 200 {
                return;
            }
        }
        assert!(Instant::now() < deadline, "the proxy never became ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits for `child` to exit, up to `limit`; its exit status.
fn wait_exit(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_takeover_under_load_drops_no_request_and_keeps_one_audit_chain() {
    let upstream = fixed_upstream(&[], "ok").await;
    let dir = tempfile::tempdir().unwrap();
    let (proxy, admin) = (free_port(), free_port());
    let config = dir.path().join("config.yaml");
    let audit = dir.path().join("audit");
    std::fs::write(
        &config,
        format!(
            "listener: {{address: \"{proxy}\"}}
admin: {{address: \"{admin}\"}}
clusters:
  up: {{endpoints: [\"{upstream}\"]}}
routes:
  - {{name: svc, match: {{path_prefix: /svc}}, blue: up, green: up, filters: [audit]}}
filters:
  audit: {{dir: \"{}\", commit: sync}}
",
            audit.display()
        ),
    )
    .unwrap();
    let socket = dir.path().join("takeover.sock");
    let mut first = spawn_proxy(&config, &socket);
    wait_ready(admin).await;

    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicUsize::new(0));
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let url = format!("http://{proxy}/svc");
    let mut load = Vec::new();
    // Kept-alive clients, and one that opens a new connection for every request.
    for keep_alive in [true, true, true, false] {
        let (stop, ok, failures, url) = (stop.clone(), ok.clone(), failures.clone(), url.clone());
        load.push(tokio::spawn(async move {
            let mut c = client();
            while !stop.load(Ordering::Relaxed) {
                if !keep_alive {
                    c = client();
                }
                let req = c.get(url.parse().unwrap());
                match tokio::time::timeout(Duration::from_secs(10), req).await {
                    Ok(Ok(res)) if res.status() == 200 => {
                        use http_body_util::BodyExt;
                        match res.into_body().collect().await.map(|b| b.to_bytes()) {
                            Ok(b) if &b[..] == b"ok" => {
                                ok.fetch_add(1, Ordering::Relaxed);
                            }
                            other => failures.lock().unwrap().push(format!("body: {other:?}")),
                        }
                    }
                    other => failures.lock().unwrap().push(format!("{other:?}")),
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = ok.load(Ordering::Relaxed);
    assert!(before > 0, "the first proxy serves the load");

    let mut second = spawn_proxy(&config, &socket);
    let exited = tokio::task::spawn_blocking(move || {
        let status = wait_exit(&mut first, Duration::from_secs(60));
        (first, status)
    })
    .await
    .unwrap();
    let status = exited.1.expect("the first proxy exits after the takeover");
    assert!(
        status.success(),
        "the first proxy drained and exited cleanly: {status}"
    );
    let at_handover = ok.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    for l in load {
        l.await.unwrap();
    }
    let served = ok.load(Ordering::Relaxed);
    assert!(
        served > at_handover,
        "the second proxy serves after the first is gone"
    );
    assert_eq!(
        *failures.lock().unwrap(),
        Vec::<String>::new(),
        "no request failed across the takeover ({served} answered)"
    );

    // The second one offers the sockets in turn, and stops cleanly on SIGTERM.
    assert!(socket.exists());
    let _ = Command::new("kill")
        .args(["-TERM", &second.id().to_string()])
        .status();
    let status = wait_exit(&mut second, Duration::from_secs(30)).expect("the second proxy exits");
    assert!(status.success());

    // One log, written by one process after the other: it verifies, and holds a
    // record for every answered request.
    let out = Command::new(env!("CARGO_BIN_EXE_acge-proxy"))
        .args(["audit", "verify"])
        .arg(&audit)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let records = common::audit_records(&audit)
        .into_iter()
        .filter(|r| r.route == "svc")
        .count();
    assert_eq!(records, served, "every answered request is in the log");
}
