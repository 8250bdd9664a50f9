//! The `jwt` filter: a request must carry `Authorization: Bearer <token>` signed by a
//! key of the JWKS file, from the configured issuer, for one of the audiences, and
//! with the claim `constitutional_hash` equal to the proxy's constitution (the auth
//! service's tokens carry it, with `constitutional_compliance_level` and
//! `constitutional_principles_validated`).
//!
//! Verification is the `jsonwebtoken` crate's (RustCrypto backend): RS256, ES256 and
//! EdDSA by default, HS256 only when listed (its key is an `oct` JWK). The key is
//! chosen by the token's `kid`; a JWKS of one key also verifies a token without one.
//! The file is read again every `reload_ms` (a rotated JWKS applies to the next
//! token; a file that does not parse is refused, logged once, and the keys in use
//! stay).
//!
//! A refusal is 401 with `WWW-Authenticate: Bearer error="invalid_token",
//! error_description="…"` and a JSON body naming one reason, counted in
//! `acge_jwt_total{route,result}`: `missing`, `malformed`, `expired`,
//! `not_yet_valid`, `bad_signature`, `unknown_kid`, `algorithm`, `wrong_issuer`,
//! `wrong_audience`, `wrong_constitutional_hash`, `low_compliance`. An accepted token
//! counts `valid`; its chosen claims go upstream as headers (`forward_claims`, the
//! client's own copies of those headers removed first), into the exchange for later
//! filters ([`JwtClaims`]: the policy filter's `input.jwt`) and into the audit record.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use http::header::{AUTHORIZATION, WWW_AUTHENTICATE};
use http::{HeaderName, HeaderValue, StatusCode};
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use metrics::{counter, Counter};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::metrics::JWT_TOTAL;
use crate::{json_error, Exchange, Filter, Verdict};

/// `filters.jwt`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtConfig {
    /// A JSON Web Key Set (RFC 7517) file.
    pub jwks_file: PathBuf,
    /// The `iss` a token must have; any when absent.
    #[serde(default)]
    pub issuer: Option<String>,
    /// A token's `aud` must name one of these; not checked when empty.
    #[serde(default)]
    pub audiences: Vec<String>,
    /// Clock skew allowed on `exp` and `nbf`, seconds.
    #[serde(default = "defaults::leeway_s")]
    pub leeway_s: u64,
    /// Signature algorithms accepted.
    #[serde(default = "defaults::algorithms")]
    pub algorithms: Vec<String>,
    /// The lowest `constitutional_compliance_level` accepted (a number); not checked
    /// when absent.
    #[serde(default)]
    pub min_compliance_level: Option<f64>,
    /// Claim → request header sent upstream.
    #[serde(default = "defaults::forward_claims")]
    pub forward_claims: BTreeMap<String, String>,
    /// How often the JWKS file is read again (0: never).
    #[serde(default = "defaults::reload_ms")]
    pub reload_ms: u64,
}

mod defaults {
    pub fn leeway_s() -> u64 {
        30
    }
    pub fn algorithms() -> Vec<String> {
        ["RS256", "ES256", "EdDSA"].map(String::from).to_vec()
    }
    pub fn forward_claims() -> std::collections::BTreeMap<String, String> {
        [
            ("sub", "x-jwt-sub"),
            ("constitutional_principles_validated", "x-jwt-principles"),
            ("constitutional_compliance_level", "x-jwt-compliance-level"),
        ]
        .into_iter()
        .map(|(c, h)| (c.to_string(), h.to_string()))
        .collect()
    }
    pub fn reload_ms() -> u64 {
        5_000
    }
}

impl JwtConfig {
    /// Problems with the values, each with its field under `filters.jwt.`.
    pub fn problems(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        if self.algorithms.is_empty() {
            out.push(("algorithms".into(), "list at least one".into()));
        }
        for (i, a) in self.algorithms.iter().enumerate() {
            match parse_algorithm(a) {
                Some(_) => {}
                None => out.push((
                    format!("algorithms[{i}]"),
                    format!("`{a}` is not one of RS256, ES256, EdDSA, HS256"),
                )),
            }
        }
        for (claim, header) in &self.forward_claims {
            if HeaderName::from_bytes(header.as_bytes()).is_err() {
                out.push((
                    format!("forward_claims.{claim}"),
                    format!("`{header}` is not a header name"),
                ));
            }
        }
        if let Some(level) = self.min_compliance_level.filter(|l| !l.is_finite()) {
            out.push((
                "min_compliance_level".into(),
                format!("{level} is not a number"),
            ));
        }
        out
    }
}

fn parse_algorithm(name: &str) -> Option<Algorithm> {
    match name {
        "RS256" => Some(Algorithm::RS256),
        "ES256" => Some(Algorithm::ES256),
        "EdDSA" => Some(Algorithm::EdDSA),
        "HS256" => Some(Algorithm::HS256),
        _ => None,
    }
}

/// Why a JWKS file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum JwksError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} is not a JWKS: {reason}")]
    Parse { path: String, reason: String },
}

/// The keys of one JWKS, by `kid`.
struct Keys {
    by_kid: HashMap<String, (DecodingKey, Option<Algorithm>)>,
    /// The only key, when there is one (for tokens without a `kid`).
    only: Option<(DecodingKey, Option<Algorithm>)>,
}

fn load_keys(path: &Path) -> Result<(Keys, [u8; 32]), JwksError> {
    let bytes = std::fs::read(path).map_err(|source| JwksError::Read {
        path: path.display().to_string(),
        source,
    })?;
    let digest = Sha256::digest(&bytes).into();
    let parse = |reason: String| JwksError::Parse {
        path: path.display().to_string(),
        reason,
    };
    let set: JwkSet = serde_json::from_slice(&bytes).map_err(|e| parse(e.to_string()))?;
    if set.keys.is_empty() {
        return Err(parse("it holds no key".into()));
    }
    let mut by_kid = HashMap::new();
    let mut all = Vec::new();
    for (i, jwk) in set.keys.iter().enumerate() {
        let key = DecodingKey::from_jwk(jwk).map_err(|e| parse(format!("keys[{i}]: {e}")))?;
        let alg = jwk
            .common
            .key_algorithm
            .and_then(|a| parse_algorithm(&format!("{a:?}")));
        if let Some(kid) = &jwk.common.key_id {
            by_kid.insert(kid.clone(), (key.clone(), alg));
        }
        all.push((key, alg));
    }
    let only = if all.len() == 1 { all.pop() } else { None };
    Ok((Keys { by_kid, only }, digest))
}

/// The claims of an accepted token, for later filters (the policy's `input.jwt`).
#[derive(Debug, Clone)]
pub struct JwtClaims(pub Arc<serde_json::Value>);

/// The forwarded claims of an accepted token, for the audit record.
#[derive(Debug, Clone)]
pub struct JwtAudit(pub serde_json::Value);

/// The filter's shared part: settings and keys, built once.
pub struct JwtFilter {
    path: PathBuf,
    keys: ArcSwap<Keys>,
    digest: Mutex<[u8; 32]>,
    /// The checks of each accepted algorithm, made once at load, not per token.
    validations: Vec<(Algorithm, Validation)>,
    min_level: Option<f64>,
    forward: Vec<(String, HeaderName)>,
    constitution: String,
}

/// The reasons a token is refused, in the order of `acge_jwt_total`'s `result`.
const RESULTS: [&str; 12] = [
    "valid",
    "missing",
    "malformed",
    "expired",
    "not_yet_valid",
    "bad_signature",
    "unknown_kid",
    "algorithm",
    "wrong_issuer",
    "wrong_audience",
    "wrong_constitutional_hash",
    "low_compliance",
];

struct Refusal {
    result: usize,
    detail: String,
}

fn refuse(result: &str, detail: impl Into<String>) -> Refusal {
    Refusal {
        result: RESULTS
            .iter()
            .position(|r| *r == result)
            .expect("a known result"),
        detail: detail.into(),
    }
}

impl JwtFilter {
    /// Loads the JWKS; `constitution` is the hash tokens must carry.
    pub fn load(config: &JwtConfig, constitution: &str) -> Result<Arc<Self>, JwksError> {
        let _ = jsonwebtoken::crypto::rust_crypto::DEFAULT_PROVIDER.install_default();
        let (keys, digest) = load_keys(&config.jwks_file)?;
        let filter = Arc::new(Self {
            path: config.jwks_file.clone(),
            keys: ArcSwap::from_pointee(keys),
            digest: Mutex::new(digest),
            validations: config
                .algorithms
                .iter()
                .filter_map(|a| parse_algorithm(a))
                .map(|alg| (alg, validation(config, alg)))
                .collect(),
            min_level: config.min_compliance_level,
            forward: config
                .forward_claims
                .iter()
                .filter_map(|(c, h)| Some((c.clone(), HeaderName::from_bytes(h.as_bytes()).ok()?)))
                .collect(),
            constitution: constitution.to_string(),
        });
        if config.reload_ms > 0 {
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(reload_every(
                    Arc::downgrade(&filter),
                    Duration::from_millis(config.reload_ms),
                ));
            }
        }
        Ok(filter)
    }

    /// Reads the JWKS file again: true when it changed and its keys now verify.
    pub fn reload(&self) -> Result<bool, JwksError> {
        let mut last = self.digest.lock().unwrap_or_else(|e| e.into_inner());
        let bytes = std::fs::read(&self.path).unwrap_or_default();
        let digest: [u8; 32] = Sha256::digest(&bytes).into();
        if *last == digest {
            return Ok(false);
        }
        *last = digest;
        let (keys, _) = load_keys(&self.path)?;
        self.keys.store(Arc::new(keys));
        Ok(true)
    }

    /// The filter bound to `route`, with its metric handles.
    pub fn for_route(self: &Arc<Self>, route: &str) -> RouteJwtFilter {
        RouteJwtFilter {
            shared: self.clone(),
            counters: RESULTS
                .map(|r| counter!(JWT_TOTAL, "route" => route.to_string(), "result" => r)),
        }
    }

    fn verify(&self, authorization: Option<&HeaderValue>) -> Result<serde_json::Value, Refusal> {
        let Some(value) = authorization else {
            return Err(refuse("missing", "the request has no Authorization header"));
        };
        let token = value
            .to_str()
            .ok()
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| refuse("missing", "Authorization is not `Bearer <token>`"))?;
        let header = jsonwebtoken::decode_header(token)
            .map_err(|e| refuse("malformed", format!("the token is not a JWT: {e}")))?;
        let Some((_, validation)) = self.validations.iter().find(|(a, _)| *a == header.alg) else {
            return Err(refuse(
                "algorithm",
                format!("{:?} is not an accepted algorithm", header.alg),
            ));
        };
        let keys = self.keys.load();
        let (key, key_alg) = match &header.kid {
            Some(kid) => keys
                .by_kid
                .get(kid)
                .ok_or_else(|| refuse("unknown_kid", format!("no key `{kid}` in the JWKS")))?,
            None => keys.only.as_ref().ok_or_else(|| {
                refuse(
                    "unknown_kid",
                    "the token names no kid and the JWKS has several keys",
                )
            })?,
        };
        if key_alg.is_some_and(|a| a != header.alg) {
            return Err(refuse(
                "algorithm",
                format!("the key is for {key_alg:?}, the token is {:?}", header.alg),
            ));
        }
        let data =
            jsonwebtoken::decode::<serde_json::Value>(token, key, validation).map_err(|e| {
                use jsonwebtoken::errors::ErrorKind as K;
                let reason = match e.kind() {
                    K::ExpiredSignature => "expired",
                    K::ImmatureSignature => "not_yet_valid",
                    K::InvalidSignature => "bad_signature",
                    K::InvalidIssuer => "wrong_issuer",
                    K::InvalidAudience => "wrong_audience",
                    K::InvalidAlgorithm | K::InvalidAlgorithmName => "algorithm",
                    _ => "malformed",
                };
                refuse(reason, e.to_string())
            })?;
        let claims = data.claims;
        match claims.get("constitutional_hash").and_then(|h| h.as_str()) {
            Some(h) if h == self.constitution => {}
            Some(h) => {
                return Err(refuse(
                    "wrong_constitutional_hash",
                    format!(
                        "the token's constitutional_hash is {h}, not {}",
                        self.constitution
                    ),
                ))
            }
            None => {
                return Err(refuse(
                    "wrong_constitutional_hash",
                    format!(
                        "the token has no constitutional_hash (expected {})",
                        self.constitution
                    ),
                ))
            }
        }
        if let Some(min) = self.min_level {
            let level = claims
                .get("constitutional_compliance_level")
                .and_then(|l| l.as_f64());
            if level.is_none_or(|l| l < min) {
                return Err(refuse(
                    "low_compliance",
                    format!(
                        "constitutional_compliance_level {} is below {min}",
                        level.map_or("(none)".to_string(), |l| l.to_string())
                    ),
                ));
            }
        }
        Ok(claims)
    }
}

/// What a token signed with `alg` must satisfy: `exp` (and `nbf`) within the leeway,
/// the issuer and one of the audiences when configured.
fn validation(config: &JwtConfig, alg: Algorithm) -> Validation {
    let mut v = Validation::new(alg);
    v.leeway = config.leeway_s;
    v.validate_nbf = true;
    v.set_required_spec_claims(&["exp"]);
    match &config.issuer {
        Some(iss) => v.set_issuer(&[iss]),
        None => v.iss = None,
    }
    if config.audiences.is_empty() {
        v.validate_aud = false;
    } else {
        v.set_audience(&config.audiences);
    }
    v
}

async fn reload_every(filter: std::sync::Weak<JwtFilter>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        let Some(filter) = filter.upgrade() else {
            return;
        };
        match filter.reload() {
            Ok(true) => tracing::info!(jwks = %filter.path.display(), "JWKS reloaded"),
            Ok(false) => {}
            Err(e) => tracing::warn!(error = %e, "JWKS not reloaded; the keys in use stay"),
        }
    }
}

/// The filter bound to one route.
pub struct RouteJwtFilter {
    shared: Arc<JwtFilter>,
    counters: [Counter; RESULTS.len()],
}

/// A claim as a header value: strings as they are, arrays joined by commas, others
/// as JSON.
fn claim_text(value: &serde_json::Value) -> String {
    match value {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Array(items) => {
            items.iter().map(claim_text).collect::<Vec<_>>().join(",")
        }
        other => other.to_string(),
    }
}

#[async_trait]
impl Filter for RouteJwtFilter {
    fn name(&self) -> &'static str {
        "jwt"
    }

    async fn on_request(&self, ex: &mut Exchange) -> Verdict {
        let f = &self.shared;
        for (_, header) in &f.forward {
            ex.request.headers.remove(header);
        }
        match f.verify(ex.request.headers.get(AUTHORIZATION)) {
            Ok(claims) => {
                self.counters[0].increment(1);
                let mut audit = serde_json::Map::new();
                for (claim, header) in &f.forward {
                    if let Some(value) = claims.get(claim) {
                        if let Ok(v) = HeaderValue::from_str(&claim_text(value)) {
                            ex.request.headers.insert(header.clone(), v);
                        }
                        audit.insert(claim.clone(), value.clone());
                    }
                }
                ex.attributes
                    .insert(JwtAudit(serde_json::Value::Object(audit)));
                ex.attributes.insert(JwtClaims(Arc::new(claims)));
                Verdict::Continue
            }
            Err(refusal) => {
                self.counters[refusal.result].increment(1);
                let reason = RESULTS[refusal.result];
                let mut res = json_error(StatusCode::UNAUTHORIZED, reason, &refusal.detail);
                let challenge = if reason == "missing" {
                    "Bearer realm=\"acge\"".to_string()
                } else {
                    let description = refusal.detail.replace(['"', '\\'], "'");
                    format!("Bearer realm=\"acge\", error=\"invalid_token\", error_description=\"{reason}: {description}\"")
                };
                if let Ok(v) = HeaderValue::from_str(&challenge) {
                    res.headers_mut().insert(WWW_AUTHENTICATE, v);
                }
                Verdict::Respond(res)
            }
        }
    }
}

/// A token issuer of its own, for the demo and the benchmarks: an Ed25519 key made at
/// start, its JWKS, and tokens with the claims the auth service issues.
pub struct Issuer {
    kid: String,
    issuer: String,
    key: jsonwebtoken::EncodingKey,
    public: [u8; 32],
}

impl Issuer {
    /// A fresh key (from the OS's randomness), named `kid`, issuing as `issuer`.
    pub fn generate(kid: &str, issuer: &str) -> Self {
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed).expect("the OS gives randomness");
        let signing = ed25519_dalek::SigningKey::from_bytes(&seed);
        // PKCS#8 v1 of an Ed25519 seed (RFC 8410): a fixed prefix, then the seed.
        let mut der = vec![
            0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22,
            0x04, 0x20,
        ];
        der.extend_from_slice(&seed);
        Self {
            kid: kid.to_string(),
            issuer: issuer.to_string(),
            key: jsonwebtoken::EncodingKey::from_ed_der(&der),
            public: signing.verifying_key().to_bytes(),
        }
    }

    /// The JWKS that verifies this issuer's tokens.
    pub fn jwks(&self) -> serde_json::Value {
        use base64::Engine as _;
        serde_json::json!({"keys": [{
            "kty": "OKP", "crv": "Ed25519", "alg": "EdDSA", "use": "sig", "kid": self.kid,
            "x": base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(self.public),
        }]})
    }

    /// A token for `sub`, valid `ttl`, carrying `hash` as its constitution, a
    /// compliance level of 0.97 and `principles` as validated.
    pub fn token(
        &self,
        sub: &str,
        audience: &str,
        hash: &str,
        principles: &[&str],
        ttl: Duration,
    ) -> String {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let claims = serde_json::json!({
            "sub": sub, "iss": self.issuer, "aud": audience,
            "iat": now, "nbf": now, "exp": now + ttl.as_secs(),
            "constitutional_hash": hash,
            "constitutional_compliance_level": 0.97,
            "constitutional_principles_validated": principles,
        });
        let mut header = jsonwebtoken::Header::new(Algorithm::EdDSA);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, &claims, &self.key).expect("an Ed25519 key signs")
    }
}
