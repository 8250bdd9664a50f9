//! What the ACGE model reads: a canonical rendering of a request or a response, and
//! how it is cut to the model's length.
//!
//! The rendering is the contract between this crate and the model's training side
//! (`models/acge_input.py`), which renders byte for byte the same
//! (docs/model-contract.md):
//!
//! ```text
//! POST /api/v1/auth/acge/validate\n          request line: method, space, path (no query)
//! x-constitutional-hash: cdd01ef066bc6cf2\n  each selected header present, in the
//! x-user-role: auditor\n                     configured order, name lower-case
//! \n                                         an empty line
//! {"action":"sign_in_as","actor":"kai"}      the body: JSON written compactly with
//!                                            object keys sorted; a body that is not
//!                                            JSON, as its bytes
//! ```
//!
//! A response renders as `HTTP <status>\n`, its selected headers, an empty line and
//! its body, alike. The body is parsed once, borrowing from the request's bytes; the
//! score cache's key ([`Input::cache_key`]) is taken over the raw parts, so a cache hit
//! parses nothing.

use std::borrow::Cow;

use http::{HeaderMap, HeaderName, Method};
use sha2::{Digest, Sha256};

use super::meta::Cut;

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
    out.extend_from_slice(b"HTTP ");
    out.extend_from_slice(status.to_string().as_bytes());
    out.push(b'\n');
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
        match serde_json::from_slice::<json::Node<'_>>(body) {
            Ok(node) => node.write(out),
            Err(_) => out.extend_from_slice(body),
        }
    }
}

/// A rendering cut to `max_len` bytes, as the model's input section says
/// ([`Cut`]); the rendering itself when it is not longer.
pub fn cut(rendering: &[u8], max_len: usize, how: Cut) -> Cow<'_, [u8]> {
    if rendering.len() <= max_len {
        return Cow::Borrowed(rendering);
    }
    match how {
        Cut::Head => Cow::Borrowed(&rendering[..max_len]),
        Cut::HeadTail => {
            let is_start = |i: usize| i == rendering.len() || (rendering[i] & 0xC0) != 0x80;
            let mut head = max_len * 3 / 4;
            while head > 0 && !is_start(head) {
                head -= 1;
            }
            let mut tail = rendering.len() - (max_len - max_len * 3 / 4);
            while !is_start(tail) {
                tail += 1;
            }
            let mut out = Vec::with_capacity(head + rendering.len() - tail);
            out.extend_from_slice(&rendering[..head]);
            out.extend_from_slice(&rendering[tail..]);
            Cow::Owned(out)
        }
    }
}

/// Model input of the `bytes` kind: each byte plus one (0 is padding).
pub fn encode_bytes(cut: &[u8]) -> Vec<i64> {
    cut.iter().map(|b| i64::from(*b) + 1).collect()
}

/// The canonical JSON form, written from one borrowing parse: strings without escapes
/// are not copied, and no map is built only to be sorted.
mod json {
    use std::borrow::Cow;
    use std::fmt;

    use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};

    pub enum Node<'a> {
        Null,
        Bool(bool),
        U64(u64),
        I64(i64),
        F64(f64),
        Str(Cow<'a, str>),
        Array(Vec<Node<'a>>),
        Object(Vec<(Cow<'a, str>, Node<'a>)>),
    }

    impl Node<'_> {
        /// Compact JSON with every object's keys in byte order (a repeated key keeps its
        /// last value), as Python's `json.dumps(json.loads(b), sort_keys=True,
        /// separators=(",", ":"), ensure_ascii=False)` writes it.
        pub fn write(&self, out: &mut Vec<u8>) {
            match self {
                Node::Null => out.extend_from_slice(b"null"),
                Node::Bool(true) => out.extend_from_slice(b"true"),
                Node::Bool(false) => out.extend_from_slice(b"false"),
                Node::U64(n) => string(out, n),
                Node::I64(n) => string(out, n),
                Node::F64(n) => string(out, n),
                Node::Str(s) => string(out, s.as_ref()),
                Node::Array(items) => {
                    out.push(b'[');
                    for (i, v) in items.iter().enumerate() {
                        if i > 0 {
                            out.push(b',');
                        }
                        v.write(out);
                    }
                    out.push(b']');
                }
                Node::Object(entries) => {
                    let mut order: Vec<usize> = (0..entries.len()).collect();
                    // Stable: among equal keys the last one read comes last, and wins.
                    order.sort_by(|a, b| entries[*a].0.cmp(&entries[*b].0));
                    out.push(b'{');
                    let mut first = true;
                    for (n, &i) in order.iter().enumerate() {
                        let (key, value) = &entries[i];
                        if order.get(n + 1).is_some_and(|&j| entries[j].0 == *key) {
                            continue;
                        }
                        if !first {
                            out.push(b',');
                        }
                        first = false;
                        string(out, key.as_ref());
                        out.push(b':');
                        value.write(out);
                    }
                    out.push(b'}');
                }
            }
        }
    }

    /// serde_json's own spelling of a scalar (its escapes, its number format).
    fn string<T: serde::Serialize + ?Sized>(out: &mut Vec<u8>, v: &T) {
        serde_json::to_writer(&mut *out, v).expect("writing a scalar to a Vec cannot fail");
    }

    /// A string that borrows from the input when it holds no escape.
    struct Text<'a>(Cow<'a, str>);

    impl<'de> Deserialize<'de> for Text<'de> {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> Visitor<'de> for V {
                type Value = Text<'de>;
                fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                    f.write_str("a string")
                }
                fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Text<'de>, E> {
                    Ok(Text(Cow::Borrowed(v)))
                }
                fn visit_str<E>(self, v: &str) -> Result<Text<'de>, E> {
                    Ok(Text(Cow::Owned(v.to_owned())))
                }
                fn visit_string<E>(self, v: String) -> Result<Text<'de>, E> {
                    Ok(Text(Cow::Owned(v)))
                }
            }
            d.deserialize_str(V)
        }
    }

    impl<'de> Deserialize<'de> for Node<'de> {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> Visitor<'de> for V {
                type Value = Node<'de>;
                fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                    f.write_str("JSON")
                }
                fn visit_unit<E>(self) -> Result<Node<'de>, E> {
                    Ok(Node::Null)
                }
                fn visit_bool<E>(self, v: bool) -> Result<Node<'de>, E> {
                    Ok(Node::Bool(v))
                }
                fn visit_u64<E>(self, v: u64) -> Result<Node<'de>, E> {
                    Ok(Node::U64(v))
                }
                fn visit_i64<E>(self, v: i64) -> Result<Node<'de>, E> {
                    Ok(Node::I64(v))
                }
                fn visit_f64<E>(self, v: f64) -> Result<Node<'de>, E> {
                    Ok(Node::F64(v))
                }
                fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Node<'de>, E> {
                    Ok(Node::Str(Cow::Borrowed(v)))
                }
                fn visit_str<E>(self, v: &str) -> Result<Node<'de>, E> {
                    Ok(Node::Str(Cow::Owned(v.to_owned())))
                }
                fn visit_string<E>(self, v: String) -> Result<Node<'de>, E> {
                    Ok(Node::Str(Cow::Owned(v)))
                }
                fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Node<'de>, A::Error> {
                    let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(64));
                    while let Some(v) = seq.next_element()? {
                        items.push(v);
                    }
                    Ok(Node::Array(items))
                }
                fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Node<'de>, A::Error> {
                    let mut entries = Vec::with_capacity(map.size_hint().unwrap_or(0).min(64));
                    while let Some((Text(k), v)) = map.next_entry::<Text<'de>, Node<'de>>()? {
                        entries.push((k, v));
                    }
                    Ok(Node::Object(entries))
                }
            }
            d.deserialize_any(V)
        }
    }
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
    fn bytes_encoding_shifts_bytes() {
        assert_eq!(encode_bytes(&[0, 1, 255]), vec![1, 2, 256]);
    }

    #[test]
    fn the_head_cut_keeps_the_first_bytes() {
        assert_eq!(&*cut(b"abcdef", 3, Cut::Head), b"abc");
        assert_eq!(&*cut(b"abc", 3, Cut::Head), b"abc");
    }

    #[test]
    fn the_head_tail_cut_keeps_both_ends_at_character_boundaries() {
        let text = "0123456789abcdefghijklmnopqrstuvwxyz";
        // 16 bytes: the first 12 and the last 4.
        assert_eq!(
            &*cut(text.as_bytes(), 16, Cut::HeadTail),
            b"0123456789abwxyz"
        );
        // é is two bytes: a cut never splits one; the head ends before the é it would
        // split, the tail starts after.
        let text = "aaaaaézzzzzzzzéx";
        let out = cut(text.as_bytes(), 8, Cut::HeadTail);
        assert_eq!(std::str::from_utf8(&out), Ok("aaaaax"));
    }

    #[test]
    fn repeated_keys_keep_the_last_value_and_escapes_match_python() {
        let h = HeaderMap::new();
        let r = render_request(
            &Method::POST,
            "/x",
            &h,
            &[],
            Some(br#"{"b":1,"a":"tab\tq\"\u00e9\u0001","b":2,"c":[1.5,-3,1e2,true,null]}"#),
        );
        assert_eq!(
            String::from_utf8(r).unwrap(),
            "POST /x\n\n{\"a\":\"tab\\tq\\\"é\\u0001\",\"b\":2,\"c\":[1.5,-3,100.0,true,null]}"
        );
    }
}
