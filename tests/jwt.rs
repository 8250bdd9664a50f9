//! The `jwt` filter with real signed tokens (keys the test makes: ES256 and EdDSA by
//! rcgen, RS256 by openssl): every refusal reason with its 401 and challenge, the
//! claims upstream and in the audit log, a rotated JWKS.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use acge_proxy::control::admin::TokenSource;
use base64::Engine as _;
use common::{audit_records, client, get, recording_upstream, sample, scrape, start};
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::json;

const HASH: &str = "cdd01ef066bc6cf2";

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// A signing key and its public JWK.
struct Key {
    kid: String,
    alg: Algorithm,
    encoding: EncodingKey,
    jwk: serde_json::Value,
}

fn ec_key(kid: &str) -> Key {
    let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let raw = pair.public_key_raw();
    assert_eq!(raw.len(), 65, "an uncompressed P-256 point");
    Key {
        kid: kid.into(),
        alg: Algorithm::ES256,
        encoding: EncodingKey::from_ec_pem(pair.serialize_pem().as_bytes()).unwrap(),
        jwk: json!({"kty": "EC", "crv": "P-256", "kid": kid, "alg": "ES256", "use": "sig",
                    "x": b64(&raw[1..33]), "y": b64(&raw[33..])}),
    }
}

fn ed_key(kid: &str) -> Key {
    let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
    Key {
        kid: kid.into(),
        alg: Algorithm::EdDSA,
        encoding: EncodingKey::from_ed_pem(pair.serialize_pem().as_bytes()).unwrap(),
        jwk: json!({"kty": "OKP", "crv": "Ed25519", "kid": kid, "alg": "EdDSA",
                    "x": b64(pair.public_key_raw())}),
    }
}

fn rsa_key(kid: &str, dir: &Path) -> Key {
    let pem = dir.join(format!("{kid}.pem"));
    let ok = std::process::Command::new("openssl")
        .args(["genrsa", "-out"])
        .arg(&pem)
        .arg("2048")
        .output()
        .unwrap();
    assert!(ok.status.success(), "openssl genrsa");
    let modulus = std::process::Command::new("openssl")
        .args(["rsa", "-noout", "-modulus", "-in"])
        .arg(&pem)
        .output()
        .unwrap();
    let text = String::from_utf8(modulus.stdout).unwrap();
    let n = hex::decode(text.trim().trim_start_matches("Modulus=")).unwrap();
    Key {
        kid: kid.into(),
        alg: Algorithm::RS256,
        encoding: EncodingKey::from_rsa_pem(&std::fs::read(&pem).unwrap()).unwrap(),
        jwk: json!({"kty": "RSA", "kid": kid, "alg": "RS256", "n": b64(&n), "e": "AQAB"}),
    }
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// Good claims, as the auth service issues them.
fn claims() -> serde_json::Value {
    json!({
        "sub": "alice", "iss": "https://auth.acgs.svc", "aud": "acgs",
        "exp": now() + 600, "nbf": now() - 10,
        "constitutional_hash": HASH,
        "constitutional_compliance_level": 0.97,
        "constitutional_principles_validated": ["privacy", "rule_of_law"],
    })
}

fn sign(key: &Key, claims: &serde_json::Value) -> String {
    let mut header = Header::new(key.alg);
    header.kid = Some(key.kid.clone());
    encode(&header, claims, &key.encoding).unwrap()
}

fn write_jwks(path: &Path, keys: &[&Key]) {
    let tmp = path.with_extension("tmp");
    std::fs::write(
        &tmp,
        json!({"keys": keys.iter().map(|k| k.jwk.clone()).collect::<Vec<_>>()}).to_string(),
    )
    .unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// A proxy whose route `route` runs [jwt, audit]; each test has its own route, so
/// that its counters are its own.
async fn proxy(
    route: &str,
    dir: &Path,
    extra: &str,
) -> (
    acge_proxy::Running,
    tokio::sync::mpsc::UnboundedReceiver<common::Seen>,
) {
    let sections = format!(
        "  jwt: {{jwks_file: \"{0}/jwks.json\", issuer: \"https://auth.acgs.svc\", audiences: [acgs], leeway_s: 5, min_compliance_level: 0.9, reload_ms: 100{extra}}}
  audit: {{dir: \"{0}/audit\", commit: sync}}
",
        dir.display()
    );
    common::recording_proxy(route, "/svc", "jwt, audit", &sections).await
}

async fn call(p: &acge_proxy::Running, token: Option<&str>) -> common::Reply {
    let url = format!("http://{}/svc/validate", p.proxy_addr);
    let auth = token.map(|t| format!("Bearer {t}"));
    let mut headers = vec![("x-jwt-sub", "mallory")];
    if let Some(a) = &auth {
        headers.push(("authorization", a.as_str()));
    }
    get(&client(), &url, &headers).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_refusal_has_its_own_reason_status_and_challenge() {
    let dir = tempfile::tempdir().unwrap();
    let (es, other) = (ec_key("es-1"), ec_key("es-unknown"));
    write_jwks(&dir.path().join("jwks.json"), &[&es]);
    let (p, _seen) = proxy("refusals", dir.path(), "").await;
    let with = |f: &dyn Fn(&mut serde_json::Value)| {
        let mut c = claims();
        f(&mut c);
        sign(&es, &c)
    };
    let hs = {
        let mut h = Header::new(Algorithm::HS256);
        h.kid = Some("es-1".into());
        encode(&h, &claims(), &EncodingKey::from_secret(b"guess").unwrap()).unwrap()
    };
    let forged = {
        // A good token's header and claims, another key's signature.
        let good = sign(&es, &claims());
        let by_other = {
            let mut h = Header::new(Algorithm::ES256);
            h.kid = Some("es-1".into());
            encode(&h, &claims(), &other.encoding).unwrap()
        };
        let (head, _) = good.rsplit_once('.').unwrap();
        let (_, signature) = by_other.rsplit_once('.').unwrap();
        format!("{head}.{signature}")
    };
    let cases: Vec<(&str, Option<String>)> = vec![
        ("missing", None),
        ("malformed", Some("not.a.jwt".into())),
        ("expired", Some(with(&|c| c["exp"] = json!(now() - 60)))),
        (
            "not_yet_valid",
            Some(with(&|c| c["nbf"] = json!(now() + 600))),
        ),
        ("bad_signature", Some(forged)),
        ("unknown_kid", Some(sign(&other, &claims()))),
        ("algorithm", Some(hs)),
        (
            "wrong_issuer",
            Some(with(&|c| c["iss"] = json!("https://evil.example"))),
        ),
        (
            "wrong_audience",
            Some(with(&|c| c["aud"] = json!("elsewhere"))),
        ),
        (
            "wrong_constitutional_hash",
            Some(with(&|c| {
                c["constitutional_hash"] = json!("0000000000000000")
            })),
        ),
        (
            "low_compliance",
            Some(with(&|c| c["constitutional_compliance_level"] = json!(0.5))),
        ),
    ];
    for (reason, token) in &cases {
        let r = call(&p, token.as_deref()).await;
        assert_eq!(r.status, 401, "{reason}: {:?}", r.body);
        assert_eq!(r.json()["error"], *reason, "{reason}: {:?}", r.body);
        let challenge = r.headers["www-authenticate"].to_str().unwrap();
        if *reason == "missing" {
            assert_eq!(challenge, "Bearer realm=\"acge\"");
        } else {
            assert!(
                challenge.starts_with(
                    "Bearer realm=\"acge\", error=\"invalid_token\", error_description=\""
                ) && challenge.contains(reason),
                "{reason}: {challenge}"
            );
        }
    }
    let m = scrape(&p).await;
    for (reason, _) in &cases {
        let series = format!("acge_jwt_total{{route=\"refusals\",result=\"{reason}\"}}");
        assert_eq!(sample(&m, &series), Some(1.0), "{series}\n{m}");
    }
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valid_tokens_of_each_algorithm_forward_their_claims_upstream_and_into_the_audit_log() {
    let dir = tempfile::tempdir().unwrap();
    let keys = [ec_key("es"), ed_key("ed"), rsa_key("rs", dir.path())];
    write_jwks(
        &dir.path().join("jwks.json"),
        &keys.iter().collect::<Vec<_>>(),
    );
    let (p, mut seen) = proxy("valid", dir.path(), "").await;
    for key in &keys {
        let r = call(&p, Some(&sign(key, &claims()))).await;
        assert_eq!(r.status, 200, "{:?}: {:?}", key.alg, r.body);
        let upstream = seen.recv().await.unwrap();
        assert_eq!(
            upstream.headers["x-jwt-sub"], "alice",
            "the client's own x-jwt-sub is replaced"
        );
        assert_eq!(upstream.headers.get_all("x-jwt-sub").iter().count(), 1);
        assert_eq!(upstream.headers["x-jwt-principles"], "privacy,rule_of_law");
        assert_eq!(upstream.headers["x-jwt-compliance-level"], "0.97");
    }
    // A claim the token lacks: the client's own header of that name does not get
    // through either.
    let mut without = claims();
    without
        .as_object_mut()
        .unwrap()
        .remove("constitutional_principles_validated");
    let auth = format!("Bearer {}", sign(&keys[0], &without));
    let r = get(
        &client(),
        &format!("http://{}/svc/validate", p.proxy_addr),
        &[
            ("authorization", auth.as_str()),
            ("x-jwt-principles", "forged"),
        ],
    )
    .await;
    assert_eq!(r.status, 200);
    let upstream = seen.recv().await.unwrap();
    assert!(
        upstream.headers.get("x-jwt-principles").is_none(),
        "a client's x-jwt-principles is removed: {:?}",
        upstream.headers
    );
    let m = scrape(&p).await;
    assert_eq!(
        sample(&m, "acge_jwt_total{route=\"valid\",result=\"valid\"}"),
        Some(4.0)
    );
    p.shutdown().await;
    let records = audit_records(&dir.path().join("audit"));
    assert_eq!(records.len(), 4);
    for r in &records[..3] {
        let jwt = r
            .jwt
            .as_ref()
            .expect("the record carries the token's claims");
        assert_eq!(jwt["sub"], "alice");
        assert_eq!(
            jwt["constitutional_principles_validated"],
            json!(["privacy", "rule_of_law"])
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_jwks_verifies_the_new_key_and_forgets_the_old_one() {
    let dir = tempfile::tempdir().unwrap();
    let (old, new) = (ec_key("old"), ed_key("new"));
    let jwks = dir.path().join("jwks.json");
    write_jwks(&jwks, &[&old]);
    let (p, _seen) = proxy("rotation", dir.path(), "").await;
    assert_eq!(call(&p, Some(&sign(&old, &claims()))).await.status, 200);
    assert_eq!(
        call(&p, Some(&sign(&new, &claims()))).await.json()["error"],
        "unknown_kid"
    );
    write_jwks(&jwks, &[&new]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while call(&p, Some(&sign(&new, &claims()))).await.status != 200 {
        assert!(Instant::now() < deadline, "the new key never verified");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        call(&p, Some(&sign(&old, &claims()))).await.json()["error"],
        "unknown_kid"
    );
    // A broken JWKS is refused; the keys in use stay.
    std::fs::write(&jwks, "{not json").unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(call(&p, Some(&sign(&new, &claims()))).await.status, 200);
    p.shutdown().await;
}

#[test]
fn jwt_settings_mistakes_name_their_field() {
    let yaml = "listener: {address: 127.0.0.1:0}
clusters:
  up: {endpoints: [\"127.0.0.1:1\"]}
routes:
  - {name: r, match: {path_prefix: /}, blue: up, green: up, filters: [jwt]}
filters:
  jwt: {jwks_file: j.json, algorithms: [RS256, none], forward_claims: {sub: \"bad header\"}}
";
    let e = acge_proxy::config::Config::from_yaml(yaml, "t.yaml")
        .unwrap_err()
        .errors;
    let paths: Vec<&str> = e.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "filters.jwt.algorithms[1]",
            "filters.jwt.forward_claims.sub"
        ],
        "{e:?}"
    );
}

/// [jwt, policy]: the pgc policy reads the verified token's claims (`input.jwt`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_policy_after_jwt_sees_the_tokens_claims() {
    let dir = tempfile::tempdir().unwrap();
    let key = ed_key("ed");
    write_jwks(&dir.path().join("jwks.json"), &[&key]);
    let (up, _seen) = recording_upstream().await;
    let policies = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/policies");
    let p = start(
        &format!(
            "listener: {{address: 127.0.0.1:0}}
admin: {{address: 127.0.0.1:0}}
clusters:
  up: {{endpoints: [\"{up}\"]}}
routes:
  - {{name: pgc-jwt, match: {{path_prefix: /svc}}, blue: up, green: up, filters: [jwt, policy]}}
filters:
  jwt: {{jwks_file: \"{}/jwks.json\", issuer: \"https://auth.acgs.svc\", audiences: [acgs]}}
  policy: {{dir: \"{}\"}}
",
            dir.path().display(),
            policies.display()
        ),
        TokenSource::None,
    )
    .await;
    let body = json!({"constitutional_hash": HASH, "rules": [{"id": "r1"}]}).to_string();
    let post = |token: String| {
        let (url, body) = (format!("http://{}/svc", p.proxy_addr), body.clone());
        async move {
            let auth = format!("Bearer {token}");
            common::send(
                &client(),
                http::Method::POST,
                &url,
                &[
                    ("authorization", &auth),
                    ("content-type", "application/json"),
                    ("x-user-roles", "policy-compiler"),
                ],
                body,
            )
            .await
        }
    };
    assert_eq!(post(sign(&key, &claims())).await.status, 200);
    let mut without = claims();
    without["constitutional_principles_validated"] = json!(["privacy"]);
    let r = post(sign(&key, &without)).await;
    assert_eq!(r.status, 403);
    assert_eq!(
        r.json()["reasons"],
        json!(["the caller's token does not validate the rule-of-law principle"])
    );
    p.shutdown().await;
}

/// HS256 is refused by default (above) and accepted only when `algorithms` lists it,
/// with the JWKS's `oct` key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hs256_is_accepted_only_when_configured() {
    let dir = tempfile::tempdir().unwrap();
    let secret = b"a shared secret of thirty-two bytes!";
    let oct = Key {
        kid: "hs".into(),
        alg: Algorithm::HS256,
        encoding: EncodingKey::from_secret(secret).unwrap(),
        jwk: json!({"kty": "oct", "kid": "hs", "alg": "HS256", "k": b64(secret)}),
    };
    write_jwks(&dir.path().join("jwks.json"), &[&oct]);
    let (p, _seen) = proxy("hs-off", dir.path(), "").await;
    let token = sign(&oct, &claims());
    assert_eq!(call(&p, Some(&token)).await.json()["error"], "algorithm");
    p.shutdown().await;
    let (p, _seen) = proxy("hs-on", dir.path(), ", algorithms: [HS256]").await;
    assert_eq!(call(&p, Some(&token)).await.status, 200);
    p.shutdown().await;
}
