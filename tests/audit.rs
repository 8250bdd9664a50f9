//! The audit log as an auditor uses it, through the `acge-proxy audit` commands: a
//! crash under load loses no answered record, tampering of each kind is caught and
//! placed, and inclusion proofs round-trip.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use acge_filters::audit::segment::{entry, read_frames, segments, Entry, FRAME_HEADER};
use acge_filters::audit::{AuditConfig, AuditLog, AuditRecord, CommitMode};
use common::*;
use http::StatusCode;

const BIN: &str = env!("CARGO_BIN_EXE_acge-proxy");

fn audit_cmd(args: &[&str]) -> (bool, String) {
    let out = Command::new(BIN).arg("audit").args(args).output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn verify(dir: &Path) -> (bool, String) {
    audit_cmd(&["verify", dir.to_str().unwrap()])
}

/// `audit verify` fails, and its message holds every one of `needles`.
fn fails_naming(dir: &Path, needles: &[&str]) {
    let (ok, text) = verify(dir);
    assert!(!ok, "verify passed: {text}");
    for needle in needles {
        assert!(text.contains(needle), "{needle:?} not in: {text}");
    }
}

fn record(i: u64) -> AuditRecord {
    AuditRecord {
        seq: 0,
        request_id: format!("req-{i}"),
        time_ms: 1_700_000_000_000 + i,
        route: "auth".into(),
        version: Some("blue".into()),
        method: "POST".into(),
        path: "/api/v1/auth/acge/validate".into(),
        status: 200,
        hash_request: Some("match".into()),
        hash_response: Some("match".into()),
        compliance: None,
        principles: vec![],
        acge_stage: None,
        decision: "allowed".into(),
        latency_ms: 1.5,
        event: None,
        jwt: None,
    }
}

/// Sync commit, a checkpoint every 10 records, 4 KiB segments.
fn config(dir: &Path) -> AuditConfig {
    AuditConfig {
        dir: dir.to_path_buf(),
        commit: CommitMode::Sync,
        checkpoint_every: 10,
        checkpoint_interval_ms: 60_000,
        segment_bytes: 4096,
        queue: 64,
        key_file: None,
        origin: None,
    }
}

/// A log of `n` records, closed cleanly.
async fn write_log(dir: &Path, n: u64) {
    let (log, report) = AuditLog::open(&config(dir)).unwrap();
    assert_eq!(report.records, 0);
    for i in 0..n {
        log.append(record(i)).await.unwrap();
    }
    log.close().await;
}

/// (segment path, frame offset, payload length) for every record, in order.
fn frames(dir: &Path) -> Vec<(PathBuf, u64, usize)> {
    all_frames(dir)
        .into_iter()
        .filter(|(_, _, _, checkpoint)| !checkpoint)
        .map(|(path, offset, len, _)| (path, offset, len))
        .collect()
}

/// Every frame, records and checkpoints, in order: (segment, offset, length, is a
/// checkpoint).
fn all_frames(dir: &Path) -> Vec<(PathBuf, u64, usize, bool)> {
    let mut out = Vec::new();
    for (_, path) in segments(dir).unwrap() {
        let bytes = std::fs::read(&path).unwrap();
        for (offset, payload) in read_frames(&bytes).records {
            let checkpoint = matches!(entry(payload), Entry::Checkpoint(_));
            out.push((path.clone(), offset, payload.len(), checkpoint));
        }
    }
    out
}

fn copy_dir(from: &Path) -> tempfile::TempDir {
    let to = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.path().join(entry.file_name())).unwrap();
    }
    to
}

#[tokio::test]
async fn a_clean_log_verifies_and_spans_segments() {
    let dir = tempfile::tempdir().unwrap();
    write_log(dir.path(), 45).await;
    assert!(
        segments(dir.path()).unwrap().len() > 1,
        "4 KiB segments rotate"
    );
    let (ok, text) = verify(dir.path());
    assert!(ok, "{text}");
    assert!(text.starts_with("OK: 45 records"), "{text}");
    assert!(
        text.contains("last checkpoint: size 45"),
        "closing signs the tail: {text}"
    );
    assert!(
        text.contains("trusted as found in the log directory"),
        "without --key verify says whose key it trusted: {text}"
    );
    let checkpoints = all_frames(dir.path()).iter().filter(|f| f.3).count();
    assert!(
        checkpoints >= 5,
        "every 10 records and at each rotation: {checkpoints}"
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dir.path().join("audit.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(
        mode & 0o777,
        0o600,
        "the signing key is readable by its owner only"
    );
}

#[tokio::test]
async fn each_kind_of_tampering_fails_verify_and_is_placed() {
    let clean = tempfile::tempdir().unwrap();
    write_log(clean.path(), 30).await;
    let f = frames(clean.path());

    // One flipped byte inside record 12.
    let d = copy_dir(clean.path());
    let (path, offset, _) = &f[12];
    let path = d.path().join(path.file_name().unwrap());
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[*offset as usize + FRAME_HEADER + 5] ^= 0x20;
    std::fs::write(&path, &bytes).unwrap();
    fails_naming(d.path(), &["record 12 ", "checksum mismatch"]);

    // Record 12 deleted.
    let d = copy_dir(clean.path());
    let (path, offset, len) = &f[12];
    let path = d.path().join(path.file_name().unwrap());
    let mut bytes = std::fs::read(&path).unwrap();
    bytes.drain(*offset as usize..*offset as usize + FRAME_HEADER + len);
    std::fs::write(&path, &bytes).unwrap();
    fails_naming(d.path(), &["record 12 ", "says it is record 13"]);

    // Records 12 and 13 swapped (they share a segment).
    let d = copy_dir(clean.path());
    let ((p12, o12, l12), (p13, _, l13)) = (&f[12], &f[13]);
    assert_eq!(p12, p13, "test set-up: 12 and 13 in one segment");
    let path = d.path().join(p12.file_name().unwrap());
    let mut bytes = std::fs::read(&path).unwrap();
    let a = *o12 as usize;
    let first = bytes[a..a + FRAME_HEADER + l12].to_vec();
    let second =
        bytes[a + FRAME_HEADER + l12..a + FRAME_HEADER + l12 + FRAME_HEADER + l13].to_vec();
    let swapped = [second, first].concat();
    bytes[a..a + swapped.len()].copy_from_slice(&swapped);
    std::fs::write(&path, &bytes).unwrap();
    fails_naming(d.path(), &["record 12 ", "says it is record 13"]);

    // The last segment truncated in the middle of its last record.
    let d = copy_dir(clean.path());
    let (path, offset, _) = f.last().unwrap();
    let path = d.path().join(path.file_name().unwrap());
    let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    file.set_len(offset + 5).unwrap();
    fails_naming(d.path(), &["record 29 ", "torn or cut"]);

    // A checkpoint frame taken out of the middle of the stream, and the records after
    // it rewritten: the next checkpoint still signs them.
    let d = copy_dir(clean.path());
    let middle = all_frames(clean.path()).into_iter().find(|f| f.3).unwrap();
    let path = d.path().join(middle.0.file_name().unwrap());
    let mut bytes = std::fs::read(&path).unwrap();
    bytes.drain(middle.1 as usize..middle.1 as usize + FRAME_HEADER + middle.2);
    std::fs::write(&path, &bytes).unwrap();
    let (ok, text) = verify(d.path());
    assert!(ok, "a checkpoint removed alone takes nothing away: {text}");

    // A record rewritten with a valid checksum and sequence: only the tree catches it.
    let d = copy_dir(clean.path());
    let (path, offset, len) = &f[14];
    let path = d.path().join(path.file_name().unwrap());
    let mut bytes = std::fs::read(&path).unwrap();
    let start = *offset as usize + FRAME_HEADER;
    let text = String::from_utf8(bytes[start..start + len].to_vec()).unwrap();
    let forged = text.replace("\"status\":200", "\"status\":201");
    assert_eq!(forged.len(), *len);
    bytes[start..start + len].copy_from_slice(forged.as_bytes());
    let crc = crc32fast::hash(forged.as_bytes()).to_le_bytes();
    bytes[*offset as usize + 4..*offset as usize + 8].copy_from_slice(&crc);
    std::fs::write(&path, &bytes).unwrap();
    fails_naming(d.path(), &["do not hash to the signed root", "was changed"]);
}

#[tokio::test]
async fn inclusion_proofs_round_trip_and_a_changed_record_fails() {
    let dir = tempfile::tempdir().unwrap();
    write_log(dir.path(), 23).await;
    let d = dir.path().to_str().unwrap();
    for index in ["0", "9", "17", "22"] {
        let (ok, proof) = audit_cmd(&["prove", d, "--index", index]);
        assert!(ok, "{proof}");
        let file = dir.path().join(format!("proof-{index}.json"));
        std::fs::write(&file, &proof).unwrap();
        let (ok, text) = audit_cmd(&["check-proof", "--proof", file.to_str().unwrap(), "--dir", d]);
        assert!(ok, "{text}");
        assert!(
            text.starts_with(&format!("OK: record {index} is in the log")),
            "{text}"
        );
    }
    let proof = std::fs::read_to_string(dir.path().join("proof-9.json")).unwrap();
    let changed = proof.replace("req-9", "req-X");
    assert_ne!(proof, changed);
    let file = dir.path().join("changed.json");
    std::fs::write(&file, changed).unwrap();
    let (ok, text) = audit_cmd(&["check-proof", "--proof", file.to_str().unwrap(), "--dir", d]);
    assert!(!ok);
    assert!(text.contains("record 9 is not in the tree"), "{text}");

    let other_key = tempfile::tempdir().unwrap();
    write_log(other_key.path(), 1).await;
    let (ok, text) = audit_cmd(&[
        "check-proof",
        "--proof",
        dir.path().join("proof-9.json").to_str().unwrap(),
        "--dir",
        other_key.path().to_str().unwrap(),
    ]);
    assert!(
        !ok,
        "another log's key does not vouch for this checkpoint: {text}"
    );
    assert!(
        text.contains("no signature by") && text.contains("with the trusted key"),
        "{text}"
    );
}

#[tokio::test]
async fn restart_cuts_a_torn_final_record_and_keeps_every_other() {
    let dir = tempfile::tempdir().unwrap();
    write_log(dir.path(), 12).await;
    let f = frames(dir.path());
    let (path, offset, len) = f.last().unwrap();
    // A crash mid-write: half of a 13th record.
    let mut bytes = std::fs::read(path).unwrap();
    let tail = bytes[*offset as usize..*offset as usize + FRAME_HEADER + len].to_vec();
    bytes.extend_from_slice(&tail[..tail.len() / 2]);
    std::fs::write(path, &bytes).unwrap();
    assert!(!verify(dir.path()).0);

    let (log, report) = AuditLog::open(&config(dir.path())).unwrap();
    assert_eq!(report.records, 12);
    assert!(
        report
            .cut
            .as_deref()
            .unwrap_or("")
            .contains("torn final frame"),
        "{report:?}"
    );
    assert_eq!(
        log.append(record(12)).await.unwrap(),
        12,
        "the next record follows on"
    );
    log.close().await;
    let (ok, text) = verify(dir.path());
    assert!(ok, "{text}");
    assert!(text.starts_with("OK: 13 records"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_under_load_loses_no_answered_record_with_sync_commit() {
    let dir = tempfile::tempdir().unwrap();
    let up = acge_proxy::demo::spawn_backend(
        "crash",
        acge_proxy::proxy::split::Version::Blue,
        "127.0.0.1:0".parse().unwrap(),
    )
    .await
    .unwrap();
    let port = closed_port().await.port();
    let admin = closed_port().await.port();
    let audit_dir = dir.path().join("audit");
    let config = dir.path().join("acge.yaml");
    let yaml = format!(
        "listener: {{address: 127.0.0.1:{port}}}
admin: {{address: 127.0.0.1:{admin}}}
clusters:
  up: {{endpoints: [\"{}\"]}}
routes:
  - {{name: crash, match: {{path_prefix: /}}, blue: up, green: up, filters: [constitutional_hash, audit]}}
filters:
  constitutional_hash: {{mode: stamp}}
  audit: {{dir: {}, commit: sync, checkpoint_every: 50}}
",
        up.addr,
        audit_dir.display()
    );
    std::fs::write(&config, yaml).unwrap();
    let spawn = || {
        Command::new(BIN)
            .args([
                "run",
                "--config",
                config.to_str().unwrap(),
                "--workers",
                "2",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    };
    let mut child = spawn();
    let url = format!("http://127.0.0.1:{port}/svc");
    let c = client();
    let mut ready = false;
    for _ in 0..100 {
        if let Ok(Ok(res)) = tokio::time::timeout(
            Duration::from_millis(500),
            c.request(
                http::Request::get(&url)
                    .body(http_body_util::Full::new(bytes::Bytes::new()))
                    .unwrap(),
            ),
        )
        .await
        {
            ready = res.status() == StatusCode::OK;
            if ready {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ready, "the proxy came up");

    // Eight clients send requests with their own ids until the proxy dies.
    let answered = Arc::new(Mutex::new(Vec::<String>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for k in 0..8 {
        let (answered, stop, url) = (answered.clone(), stop.clone(), url.clone());
        clients.push(tokio::spawn(async move {
            let c = client();
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                let id = format!("c{k}-{i}");
                i += 1;
                let req = http::Request::get(&url)
                    .header("x-request-id", &id)
                    .body(http_body_util::Full::new(bytes::Bytes::new()))
                    .unwrap();
                // Answered means the whole answer arrived: the log phase runs when the
                // body ends, and its end is held back until the record is on disk.
                let whole = async {
                    let res = c.request(req).await.ok()?;
                    let ok = res.status() == StatusCode::OK;
                    let body = http_body_util::BodyExt::collect(res.into_body())
                        .await
                        .ok()?;
                    (ok && !body.to_bytes().is_empty()).then_some(())
                };
                match tokio::time::timeout(Duration::from_secs(2), whole).await {
                    Ok(Some(())) => answered.lock().unwrap().push(id),
                    _ => break,
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    child.kill().unwrap(); // SIGKILL: no drain, no final checkpoint
    child.wait().unwrap();
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        let _ = c.await;
    }
    let answered = answered.lock().unwrap().clone();
    assert!(answered.len() > 50, "load ran: {} answers", answered.len());

    // Restart (which cuts a torn tail, if the kill left one), stop cleanly, verify.
    let mut child = spawn();
    tokio::time::sleep(Duration::from_millis(800)).await;
    let pid = child.id().to_string();
    Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    child.wait().unwrap();
    let (ok, text) = verify(&audit_dir);
    assert!(ok, "{text}");

    let logged: std::collections::HashSet<String> = audit_records(&audit_dir)
        .into_iter()
        .map(|r| r.request_id)
        .collect();
    let lost: Vec<&String> = answered.iter().filter(|id| !logged.contains(*id)).collect();
    assert!(
        lost.is_empty(),
        "{} answered requests missing from the log, e.g. {:?}",
        lost.len(),
        &lost[..lost.len().min(5)]
    );
}

/// A proxy on `/svc` in front of a demo backend, auditing every exchange into `dir`
/// with a checkpoint every `every` records (and every `interval_ms`).
async fn audited_proxy(
    dir: &Path,
    every: u64,
    interval_ms: u64,
    listener: &str,
) -> (acge_proxy::Running, acge_proxy::demo::Backend) {
    let up = acge_proxy::demo::spawn_backend(
        "audited",
        acge_proxy::proxy::split::Version::Blue,
        "127.0.0.1:0".parse().unwrap(),
    )
    .await
    .unwrap();
    let yaml = config_with(
        "audited",
        up.addr,
        listener,
        "",
        &format!(
            "filters:\n  audit: {{dir: {}, commit: sync, checkpoint_every: {every}, checkpoint_interval_ms: {interval_ms}}}\n",
            dir.display()
        ),
    )
    .replace("green: up}", "green: up, filters: [audit]}");
    (
        start(&yaml, acge_proxy::control::admin::TokenSource::None).await,
        up,
    )
}

/// `n` requests through the proxy, each answered 200.
async fn requests(p: &acge_proxy::Running, n: usize) {
    let c = client();
    for i in 0..n {
        let r = get(
            &c,
            &format!("http://{}/svc", p.proxy_addr),
            &[("x-request-id", &format!("r-{i}"))],
        )
        .await;
        assert_eq!(r.status, StatusCode::OK);
    }
}

/// Rewrites every record frame of `dir` with `change`, the checksum recomputed, and
/// drops every checkpoint frame (and checkpoints.log) when `drop_checkpoints`.
fn rewrite(dir: &Path, change: impl Fn(&str) -> String, drop_checkpoints: bool) {
    for (_, path) in segments(dir).unwrap() {
        let bytes = std::fs::read(&path).unwrap();
        let mut out = Vec::new();
        for (_, payload) in read_frames(&bytes).records {
            match entry(payload) {
                Entry::Record(record) => {
                    let changed = change(std::str::from_utf8(record).unwrap());
                    acge_filters::audit::segment::frame(changed.as_bytes(), &mut out);
                }
                Entry::Checkpoint(note) if !drop_checkpoints => {
                    acge_filters::audit::segment::frame(note.as_bytes(), &mut out);
                }
                Entry::Checkpoint(_) => {}
            }
        }
        std::fs::write(&path, out).unwrap();
    }
    if drop_checkpoints {
        let _ = std::fs::remove_file(dir.join("checkpoints.log"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_probes_forgery_fails_verify() {
    let dir = tempfile::tempdir().unwrap();
    let (p, _up) = audited_proxy(dir.path(), 50, 1000, "").await;
    requests(&p, 120).await;
    p.shutdown().await;
    assert!(verify(dir.path()).0, "{}", verify(dir.path()).1);

    // Every record rewritten (200 → 403) with its checksum fixed, every checkpoint
    // deleted: what the probe did to checkpoints.log, done to the inline ones.
    let forged = copy_dir(dir.path());
    rewrite(
        forged.path(),
        |r| r.replace("\"status\":200", "\"status\":403"),
        true,
    );
    fails_naming(forged.path(), &["120 records and not one checkpoint"]);

    // Rewritten with the checkpoints left in place: their roots do not match.
    let forged = copy_dir(dir.path());
    rewrite(
        forged.path(),
        |r| r.replace("\"status\":200", "\"status\":403"),
        false,
    );
    fails_naming(forged.path(), &["do not hash to the signed root"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_re_signed_with_another_key_fails_against_the_pinned_key() {
    let dir = tempfile::tempdir().unwrap();
    let (p, _up) = audited_proxy(dir.path(), 10, 1000, "").await;
    requests(&p, 30).await;
    p.shutdown().await;
    let pinned = tempfile::tempdir().unwrap();
    let pinned_key = pinned.path().join("audit.pub");
    std::fs::copy(dir.path().join("audit.pub"), &pinned_key).unwrap();

    // The forger rewrites the records and signs a whole new log with a key of their
    // own, replacing the directory's public key.
    let records = audit_records(dir.path());
    let forger = tempfile::tempdir().unwrap();
    let (log, _) = AuditLog::open(&config(forger.path())).unwrap();
    for mut r in records {
        r.status = 403;
        log.append(r).await.unwrap();
    }
    log.close().await;
    for entry in std::fs::read_dir(dir.path()).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "log") {
            std::fs::remove_file(path).unwrap();
        }
    }
    for file in std::fs::read_dir(forger.path()).unwrap() {
        let file = file.unwrap();
        let name = file.file_name();
        if name != "audit.key" {
            std::fs::copy(file.path(), dir.path().join(&name)).unwrap();
        }
    }
    let (ok, text) = verify(dir.path());
    assert!(ok, "the forgery holds together on its own key: {text}");
    assert!(
        text.contains("trusted as found in the log directory"),
        "{text}"
    );
    let (ok, text) = audit_cmd(&[
        "verify",
        dir.path().to_str().unwrap(),
        "--key",
        pinned_key.to_str().unwrap(),
    ]);
    assert!(
        !ok,
        "re-signed with another key, it fails the pinned key: {text}"
    );
    assert!(text.contains("with the trusted key"), "{text}");
    let hex = std::fs::read_to_string(&pinned_key).unwrap();
    let (ok, _) = audit_cmd(&[
        "verify",
        dir.path().to_str().unwrap(),
        "--key-hex",
        hex.trim(),
    ]);
    assert!(!ok);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_cut_back_below_a_published_checkpoint_fails() {
    let dir = tempfile::tempdir().unwrap();
    let (p, _up) = audited_proxy(dir.path(), 10, 1000, "").await;
    requests(&p, 40).await;
    // A collector keeps the published tree head.
    let published = get(
        &client(),
        &format!("http://{}/audit/checkpoint", p.admin_addr),
        &[],
    )
    .await;
    assert_eq!(published.status, StatusCode::OK);
    assert_eq!(
        published.headers["content-type"],
        "text/plain; charset=utf-8"
    );
    let saved = dir
        .path()
        .join("..")
        .join(format!("published-{}.note", std::process::id()));
    std::fs::write(&saved, &published.body).unwrap();
    let size: u64 = String::from_utf8_lossy(&published.body)
        .lines()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        size >= 30,
        "the published head covers what was answered: {size}"
    );
    requests(&p, 5).await;
    p.shutdown().await;
    let trusted = |d: &Path| {
        audit_cmd(&[
            "verify",
            d.to_str().unwrap(),
            "--trusted",
            saved.to_str().unwrap(),
        ])
    };
    let (ok, text) = trusted(dir.path());
    assert!(ok, "{text}");
    assert!(
        text.contains("consistent with 1 trusted checkpoints"),
        "{text}"
    );

    // Cut back to the checkpoint before the published one, with everything after it:
    // a log that holds together on its own.
    let cut = copy_dir(dir.path());
    let signs = |f: &(PathBuf, u64, usize, bool)| -> u64 {
        let bytes = std::fs::read(cut.path().join(f.0.file_name().unwrap())).unwrap();
        let note = &bytes[f.1 as usize + FRAME_HEADER..f.1 as usize + FRAME_HEADER + f.2];
        std::str::from_utf8(note)
            .unwrap()
            .lines()
            .nth(1)
            .unwrap()
            .parse()
            .unwrap()
    };
    let at_30 = all_frames(cut.path())
        .into_iter()
        .filter(|f| f.3 && signs(f) < size)
        .max_by_key(signs)
        .expect("a checkpoint before the published one");
    let segment = cut.path().join(at_30.0.file_name().unwrap());
    std::fs::OpenOptions::new()
        .write(true)
        .open(&segment)
        .unwrap()
        .set_len(at_30.1 + (FRAME_HEADER + at_30.2) as u64)
        .unwrap();
    for (n, path) in segments(cut.path()).unwrap() {
        if path > segment {
            let _ = n;
            std::fs::remove_file(path).unwrap();
        }
    }
    let (ok, text) = verify(cut.path());
    assert!(ok, "alone, a cut-back log is a shorter log: {text}");
    let (ok, text) = trusted(cut.path());
    assert!(!ok, "against the published checkpoint it fails: {text}");
    assert!(text.contains("it was cut back"), "{text}");
    let _ = std::fs::remove_file(&saved);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_unsigned_tail_stays_within_its_bound_under_load() {
    let dir = tempfile::tempdir().unwrap();
    let (p, _up) = audited_proxy(dir.path(), 20, 60_000, "").await;
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for _ in 0..8 {
        let (stop, url) = (stop.clone(), format!("http://{}/svc", p.proxy_addr));
        clients.push(tokio::spawn(async move {
            let c = client();
            while !stop.load(Ordering::Relaxed) {
                get(&c, &url, &[]).await;
            }
        }));
    }
    let mut samples = Vec::new();
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let frames = all_frames(dir.path());
        let tail = frames.iter().rev().take_while(|f| !f.3).count();
        samples.push((frames.iter().filter(|f| !f.3).count(), tail));
    }
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        let _ = c.await;
    }
    let (records, _) = *samples.last().unwrap();
    assert!(records > 100, "load ran: {records} records");
    for (records, tail) in &samples {
        assert!(
            *tail <= 20,
            "{tail} unsigned records after {records}: more than the bound"
        );
    }
    p.shutdown().await;
    let (ok, text) = verify(dir.path());
    assert!(ok, "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_published_checkpoint_is_a_c2sp_signed_note() {
    use signed_note::{new_ed25519_verifier_key, Note, StandardVerifier, VerifierList};
    let dir = tempfile::tempdir().unwrap();
    let (p, _up) = audited_proxy(dir.path(), 5, 1000, "").await;
    requests(&p, 12).await;
    let body = get(
        &client(),
        &format!("http://{}/audit/checkpoint", p.admin_addr),
        &[],
    )
    .await
    .body;
    let text = String::from_utf8(body.to_vec()).unwrap();
    // c2sp.org/tlog-checkpoint: origin, size, base64 root, extensions; a blank line;
    // signature lines.
    let lines: Vec<&str> = text.lines().collect();
    let origin = lines[0];
    assert!(!origin.contains(' ') && !origin.contains('+'), "{origin}");
    let size: u64 = lines[1].parse().unwrap();
    assert!(size >= 10, "{text}");
    use base64::Engine as _;
    let root = base64::engine::general_purpose::STANDARD
        .decode(lines[2])
        .unwrap();
    assert_eq!(root.len(), 32);
    // Verified by another implementation (Cloudflare's port of Go's sumdb/note), with
    // the key from audit.pub, not by the writer's code.
    let hex = std::fs::read_to_string(dir.path().join("audit.pub")).unwrap();
    let key = ed25519_dalek::VerifyingKey::from_bytes(
        &hex::decode(hex.trim()).unwrap().try_into().unwrap(),
    )
    .unwrap();
    let vkey = new_ed25519_verifier_key(origin, &key);
    assert_eq!(
        std::fs::read_to_string(dir.path().join("audit.vkey"))
            .unwrap()
            .trim(),
        vkey,
        "audit.vkey is the verifier key witnesses take"
    );
    let verifier = StandardVerifier::new(&vkey).unwrap();
    let note = Note::from_bytes(text.as_bytes()).unwrap();
    let (verified, _) = note
        .verify(&VerifierList::new(vec![Box::new(verifier)]))
        .expect("the note verifies");
    assert_eq!(verified.len(), 1);
    // The root is the tree of the records the log holds.
    let leaves: Vec<_> = all_frames(dir.path())
        .into_iter()
        .filter(|f| !f.3)
        .take(size as usize)
        .map(|(path, offset, len, _)| {
            let bytes = std::fs::read(path).unwrap();
            let at = offset as usize + FRAME_HEADER;
            acge_filters::audit::merkle::leaf_hash(&bytes[at..at + len])
        })
        .collect();
    assert_eq!(acge_filters::audit::merkle::root(&leaves).to_vec(), root);
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exchange_the_drain_cuts_short_is_still_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let (silent, _task) = silent_server().await;
    let yaml = config_with(
        "drained",
        silent,
        ", drain_timeout_ms: 300",
        ", timeout_ms: 30000",
        &format!(
            "filters:\n  audit: {{dir: {}, commit: sync}}\n",
            dir.path().display()
        ),
    )
    .replace("green: up}", "green: up, filters: [audit]}");
    let p = start(&yaml, acge_proxy::control::admin::TokenSource::None).await;
    let addr = p.proxy_addr;
    let waiting = tokio::spawn(async move {
        raw(
            addr,
            b"GET /svc HTTP/1.1\r\nHost: t\r\nx-request-id: in-flight-1\r\n\r\n",
        )
        .await
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    p.shutdown().await;
    waiting.abort();
    let records = audit_records(dir.path());
    let record = records
        .iter()
        .find(|r| r.request_id == "in-flight-1")
        .expect("the exchange cut short by the drain has its record");
    assert_eq!((record.status, record.decision.as_str()), (499, "aborted"));
    let (ok, text) = verify(dir.path());
    assert!(ok, "{text}");
    assert!(
        !text.contains("not signed yet"),
        "shutdown signed it: {text}"
    );
}

#[tokio::test]
async fn a_log_from_before_inline_checkpoints_is_read_and_continued() {
    use acge_filters::audit::merkle::{leaf_hash, root};
    use acge_filters::audit::segment::{frame, Checkpoint};
    use ed25519_dalek::Signer;
    // A log as the previous version wrote it: record frames in a segment, signed
    // checkpoints as JSON lines in checkpoints.log.
    let dir = tempfile::tempdir().unwrap();
    let key = ed25519_dalek::SigningKey::from_bytes(&[9u8; 32]);
    std::fs::write(
        dir.path().join("audit.key"),
        format!("{}\n", hex::encode([9u8; 32])),
    )
    .unwrap();
    let mut segment = Vec::new();
    let mut leaves = Vec::new();
    let mut lines = String::new();
    for i in 0..15u64 {
        let mut r = record(i);
        r.seq = i;
        let payload = serde_json::to_vec(&r).unwrap();
        leaves.push(leaf_hash(&payload));
        frame(&payload, &mut segment);
        if i == 9 {
            let root_hex = hex::encode(root(&leaves));
            let signature = key.sign(&Checkpoint::message(10, &root_hex, 1_700_000_000_000));
            let cp = Checkpoint {
                tree_size: 10,
                root: root_hex,
                time_ms: 1_700_000_000_000,
                signature: hex::encode(signature.to_bytes()),
                note: None,
            };
            lines.push_str(&serde_json::to_string(&cp).unwrap());
            lines.push('\n');
        }
    }
    std::fs::write(dir.path().join("segment-00000001.log"), &segment).unwrap();
    std::fs::write(dir.path().join("checkpoints.log"), &lines).unwrap();
    std::fs::write(
        dir.path().join("audit.pub"),
        format!("{}\n", hex::encode(key.verifying_key().as_bytes())),
    )
    .unwrap();
    let (ok, text) = verify(dir.path());
    assert!(ok, "{text}");
    assert!(text.contains("1 of them from checkpoints.log"), "{text}");
    assert!(
        text.contains("5 records after it are not signed yet"),
        "{text}"
    );
    assert!(
        text.contains("a legacy checkpoint states no bound"),
        "{text}"
    );

    // The writer continues it: the unsigned five are signed at once, inline.
    let (log, report) = AuditLog::open(&config(dir.path())).unwrap();
    assert_eq!(report.records, 15);
    log.append(record(15)).await.unwrap();
    log.close().await;
    let (ok, text) = verify(dir.path());
    assert!(ok, "{text}");
    assert!(text.starts_with("OK: 16 records"), "{text}");
    assert!(text.contains("last checkpoint: size 16"), "{text}");

    // Without checkpoints.log, the old records are unsigned: refused.
    let bare = tempfile::tempdir().unwrap();
    std::fs::write(bare.path().join("segment-00000001.log"), &segment).unwrap();
    std::fs::copy(dir.path().join("audit.pub"), bare.path().join("audit.pub")).unwrap();
    fails_naming(bare.path(), &["15 records and not one checkpoint"]);
}
