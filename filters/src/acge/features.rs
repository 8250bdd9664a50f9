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
    fn encoding_shifts_bytes_and_cuts_to_length() {
        assert_eq!(encode(&[0, 1, 255], 8), vec![1, 2, 256]);
        assert_eq!(encode(b"abcdef", 3), vec![98, 99, 100]);
    }
}
