//! What the ACGE model reads: a canonical rendering of a request or a response, and
//! its encoding as model input.
//!
//! The rendering is the contract between this crate and the model's training script
//! (`models/`), which must render byte for byte the same (docs/model-contract.md):
//!
//! ```text
//! POST /api/v1/auth/acge/validate\n          request line: method, space, path (no query)
//! x-constitutional-hash: cdd01ef066bc6cf2\n  each selected header present, in the
//!                                            configured order, name lower-case
//! \n                                         an empty line
//! {"action":"sign_in_as","actor":"kai"}      the body: JSON re-serialised compactly with
//!                                            object keys sorted; a body that is not
//!                                            JSON, as its bytes
//! ```
//!
//! A response renders as `HTTP <status>\n`, its selected headers, an empty line and
//! its body, alike. The input is the rendering's bytes plus one (0 pads), cut to the
//! model's length L.

use http::{HeaderMap, HeaderName, Method};
use sha2::{Digest, Sha256};

/// What is scored: a request or a response, as the proxy has it.
#[derive(Clone, Copy)]
pub enum Input<'a> {
    Request {
        method: &'a Method,
        path: &'a str,
        headers: &'a HeaderMap,
        body: Option<&'a [u8]>,
    },
    Response {
        status: u16,
        headers: &'a HeaderMap,
        body: Option<&'a [u8]>,
    },
}

impl Input<'_> {
    /// The canonical rendering the model reads.
    pub fn render(&self, selected: &[HeaderName]) -> Vec<u8> {
        match *self {
            Input::Request {
                method,
                path,
                headers,
                body,
            } => render_request(method, path, headers, selected, body),
            Input::Response {
                status,
                headers,
                body,
            } => render_response(status, headers, selected, body),
        }
    }

    /// The score cache's key: the SHA-256 of what the rendering is made from (the raw
    /// body, not its canonical form), so a repeated input is found without parsing and
    /// re-serialising its body. Equal inputs render alike, so the key is as exact as one
    /// over the rendering; only inputs that differ in JSON spacing or key order, which
    /// render alike, get separate entries.
    pub fn cache_key(&self, selected: &[HeaderName]) -> [u8; 32] {
        let mut h = Sha256::new();
        let (headers, body) = match *self {
            Input::Request {
                method,
                path,
                headers,
                body,
            } => {
                h.update(b"request\n");
                h.update(method.as_str().as_bytes());
                h.update(b" ");
                h.update(path.as_bytes());
                (headers, body)
            }
            Input::Response {
                status,
                headers,
                body,
            } => {
                h.update(b"response\n");
                h.update(status.to_be_bytes());
                (headers, body)
            }
        };
        for name in selected {
            if let Some(value) = headers.get(name) {
                // Lengths first, so that no two inputs hash alike by where a field ends.
                h.update((name.as_str().len() as u64).to_be_bytes());
                h.update(name.as_str().as_bytes());
                h.update((value.len() as u64).to_be_bytes());
                h.update(value.as_bytes());
            } else {
                h.update(u64::MAX.to_be_bytes());
            }
        }
        match body {
            Some(body) => {
                h.update((body.len() as u64).to_be_bytes());
                h.update(body);
            }
            None => h.update(u64::MAX.to_be_bytes()),
        }
        h.finalize().into()
    }
}

/// Renders a request canonically.
pub fn render_request(
    method: &Method,
    path: &str,
    headers: &HeaderMap,
    selected: &[HeaderName],
    body: Option<&[u8]>,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(256 + body.map_or(0, <[u8]>::len));
    out.extend_from_slice(method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(path.as_bytes());
    out.push(b'\n');
    render_rest(&mut out, headers, selected, body);
    out
}

/// Renders a response canonically.
pub fn render_response(
    status: u16,
    headers: &HeaderMap,
    selected: &[HeaderName],
    body: Option<&[u8]>,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(256 + body.map_or(0, <[u8]>::len));
    out.extend_from_slice(format!("HTTP {status}\n").as_bytes());
    render_rest(&mut out, headers, selected, body);
    out
}

fn render_rest(
    out: &mut Vec<u8>,
    headers: &HeaderMap,
    selected: &[HeaderName],
    body: Option<&[u8]>,
) {
    for name in selected {
        if let Some(value) = headers.get(name) {
            out.extend_from_slice(name.as_str().as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(value.as_bytes());
            out.push(b'\n');
        }
    }
    out.push(b'\n');
    if let Some(body) = body {
        match serde_json::from_slice::<serde_json::Value>(body) {
            Ok(value) => write_sorted(out, &value),
            Err(_) => out.extend_from_slice(body),
        }
    }
}

/// Compact JSON with every object's keys in byte order, as Python's
/// `json.dumps(v, sort_keys=True, separators=(",", ":"), ensure_ascii=False)` writes it.
fn write_sorted(out: &mut Vec<u8>, value: &serde_json::Value) {
    use serde_json::Value;
    match value {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push(b'{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                out.extend_from_slice(Value::String(k.clone()).to_string().as_bytes());
                out.push(b':');
                write_sorted(out, &map[k]);
            }
            out.push(b'}');
        }
        Value::Array(items) => {
            out.push(b'[');
            for (i, v) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_sorted(out, v);
            }
            out.push(b']');
        }
        scalar => out.extend_from_slice(scalar.to_string().as_bytes()),
    }
}

/// Model input: each byte plus one (0 is padding), at most `max_len` of them.
pub fn encode(rendering: &[u8], max_len: usize) -> Vec<i64> {
    rendering
        .iter()
        .take(max_len)
        .map(|b| i64::from(*b) + 1)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_rendering_is_canonical() {
        let mut h = HeaderMap::new();
        h.insert("x-constitutional-hash", "cdd01ef066bc6cf2".parse().unwrap());
        h.insert("user-agent", "ignored".parse().unwrap());
        let selected = [
            HeaderName::from_static("x-constitutional-hash"),
            HeaderName::from_static("x-user-role"),
        ];
        let a = render_request(
            &Method::POST,
            "/api/v1/auth/acge/validate",
            &h,
            &selected,
            Some(r#"{"b": [1, {"z": true, "a": null}], "a": "é\"x"}"#.as_bytes()),
        );
        let b = render_request(
            &Method::POST,
            "/api/v1/auth/acge/validate",
            &h,
            &selected,
            Some(r#"{"a":"é\"x","b":[1,{"a":null,"z":true}]}"#.as_bytes()),
        );
        assert_eq!(a, b, "key order and spacing do not matter");
        assert_eq!(
            String::from_utf8(a).unwrap(),
            "POST /api/v1/auth/acge/validate\nx-constitutional-hash: cdd01ef066bc6cf2\n\n{\"a\":\"é\\\"x\",\"b\":[1,{\"a\":null,\"z\":true}]}"
        );
    }

    #[test]
    fn non_json_bodies_and_responses_render_as_bytes() {
        let h = HeaderMap::new();
        let r = render_response(403, &h, &[], Some(b"not json"));
        assert_eq!(r, b"HTTP 403\n\nnot json");
        assert_eq!(
            render_request(&Method::GET, "/x", &h, &[], None),
            b"GET /x\n\n"
        );
    }

    #[test]
    fn cache_keys_tell_inputs_apart_that_render_differently() {
        let selected = [HeaderName::from_static("x-user-role")];
        let mut admin = HeaderMap::new();
        admin.insert("x-user-role", "admin".parse().unwrap());
        let mut intern = HeaderMap::new();
        intern.insert("x-user-role", "intern".parse().unwrap());
        let req = |headers, body: &'static [u8]| Input::Request {
            method: &Method::POST,
            path: "/x",
            headers,
            body: Some(body),
        };
        let a = req(&admin, br#"{"a":1}"#).cache_key(&selected);
        assert_eq!(a, req(&admin, br#"{"a":1}"#).cache_key(&selected));
        assert_ne!(
            a,
            req(&intern, br#"{"a":1}"#).cache_key(&selected),
            "the role"
        );
        assert_ne!(
            a,
            req(&admin, br#"{"a":2}"#).cache_key(&selected),
            "the body"
        );
        let none = HeaderMap::new();
        let response = Input::Response {
            status: 200,
            headers: &none,
            body: Some(br#"{"a":1}"#),
        };
        assert_ne!(
            a,
            response.cache_key(&selected),
            "a response is not a request"
        );
        assert_ne!(
            req(&none, b"").cache_key(&selected),
            Input::Request {
                method: &Method::POST,
                path: "/x",
                headers: &none,
                body: None
            }
            .cache_key(&selected),
            "no body is not an empty body"
        );
    }

    #[test]
    fn encoding_shifts_bytes_and_cuts_to_length() {
        assert_eq!(encode(&[0, 1, 255], 8), vec![1, 2, 256]);
        assert_eq!(encode(b"abcdef", 3), vec![98, 99, 100]);
    }
}
