//! Header hygiene at the upstream edge, both ways, for every request that leaves the
//! proxy (a client's, a mirrored copy, a replay) and every answer that comes back.
//!
//! Inside this module so that no caller can forget it (as linkerd2-proxy strips
//! connection headers inside its HTTP/1 client).

use std::net::IpAddr;

use http::header::{
    HeaderMap, HeaderName, HeaderValue, CONNECTION, TE, TRANSFER_ENCODING, UPGRADE,
};

pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");

/// Headers that describe one connection, never the message (RFC 9110 §7.6.1).
const HOP_BY_HOP: [HeaderName; 6] = [
    CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    TE,
    TRANSFER_ENCODING,
    UPGRADE,
];

/// What the proxy adds to a request it forwards.
#[derive(Debug, Clone)]
pub struct Forwarded {
    /// The client's address, appended to `x-forwarded-for`.
    pub client: IpAddr,
    /// `http` or `https`, as the client reached the proxy.
    pub proto: HeaderValue,
    pub request_id: HeaderValue,
}

/// The headers to send upstream: the request's as the filters left them, without
/// hop-by-hop headers, with the forwarding headers set. Copied into a map sized for
/// them at once (a clone and then three inserts would grow and rehash it).
pub fn outgoing(headers: &HeaderMap, fwd: &Forwarded) -> HeaderMap {
    let named = connection_named(headers);
    let mut out = HeaderMap::with_capacity(headers.keys_len() + 3);
    for (name, value) in headers {
        let own = name == X_FORWARDED_PROTO || name == X_REQUEST_ID || name == X_FORWARDED_FOR;
        if own || HOP_BY_HOP.contains(name) || named.contains(name) {
            continue;
        }
        out.append(name.clone(), value.clone());
    }
    out.insert(X_FORWARDED_FOR, forwarded_for(headers, fwd.client));
    out.insert(X_FORWARDED_PROTO, fwd.proto.clone());
    out.insert(X_REQUEST_ID, fwd.request_id.clone());
    out
}

/// The headers the `Connection` header names (none, almost always).
fn connection_named(headers: &HeaderMap) -> Vec<HeaderName> {
    if !headers.contains_key(CONNECTION) {
        return Vec::new();
    }
    headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|token| HeaderName::from_bytes(token.trim().as_bytes()).ok())
        .collect()
}

/// Removes the hop-by-hop headers and those the `Connection` header names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    for name in connection_named(headers) {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
}

/// `x-forwarded-for` with the client's address appended, earlier hops folded into one
/// comma-separated value.
fn forwarded_for(headers: &HeaderMap, client: IpAddr) -> HeaderValue {
    if !headers.contains_key(&X_FORWARDED_FOR) {
        return client_value(client);
    }
    let mut value = String::new();
    for earlier in headers.get_all(&X_FORWARDED_FOR) {
        if let Ok(s) = earlier.to_str() {
            value.push_str(s);
            value.push_str(", ");
        }
    }
    value.push_str(&client.to_canonical().to_string());
    HeaderValue::from_str(&value).unwrap_or_else(|_| client_value(client))
}

/// The address as a header value. A sidecar's clients come from a few addresses, so
/// each worker thread keeps the last one it made: the common request costs no
/// formatting and no allocation here.
fn client_value(client: IpAddr) -> HeaderValue {
    thread_local! {
        static LAST: std::cell::RefCell<Option<(IpAddr, HeaderValue)>> =
            const { std::cell::RefCell::new(None) };
    }
    LAST.with(|last| {
        let mut last = last.borrow_mut();
        match &*last {
            Some((ip, value)) if *ip == client => value.clone(),
            _ => {
                let value = HeaderValue::from_str(&client.to_canonical().to_string())
                    .expect("an IP address is a valid header value");
                *last = Some((client, value.clone()));
                value
            }
        }
    })
}

/// The size of a header block as HTTP/1.1 would send it (`name: value\r\n`).
pub fn block_size(headers: &HeaderMap) -> usize {
    headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 4)
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_and_connection_named_headers_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(CONNECTION, "close, x-secret-hop".parse().unwrap());
        h.insert("x-secret-hop", "1".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert(TE, "trailers".parse().unwrap());
        h.insert(UPGRADE, "websocket".parse().unwrap());
        h.insert("proxy-connection", "keep-alive".parse().unwrap());
        h.insert(TRANSFER_ENCODING, "chunked".parse().unwrap());
        h.insert("x-keep", "yes".parse().unwrap());
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
        assert_eq!(h["x-keep"], "yes");
    }

    #[test]
    fn outgoing_headers_drop_hops_and_keep_repeated_values() {
        let mut h = HeaderMap::new();
        h.insert(CONNECTION, "x-secret-hop".parse().unwrap());
        h.insert("x-secret-hop", "1".parse().unwrap());
        h.insert(TE, "trailers".parse().unwrap());
        h.append("accept", "a/b".parse().unwrap());
        h.append("accept", "c/d".parse().unwrap());
        h.insert(X_REQUEST_ID, "from-the-client".parse().unwrap());
        let fwd = Forwarded {
            client: "10.1.2.3".parse().unwrap(),
            proto: HeaderValue::from_static("https"),
            request_id: HeaderValue::from_static("the-proxy's"),
        };
        let out = outgoing(&h, &fwd);
        let accept: Vec<_> = out.get_all("accept").iter().collect();
        assert_eq!(accept, ["a/b", "c/d"]);
        for hop in ["connection", "x-secret-hop", "te"] {
            assert!(!out.contains_key(hop), "{hop}");
        }
        assert_eq!(out.get_all(X_REQUEST_ID).iter().count(), 1);
        assert_eq!(out[X_REQUEST_ID], "the-proxy's");
        assert_eq!(out[X_FORWARDED_FOR], "10.1.2.3");
        assert_eq!(out[X_FORWARDED_PROTO], "https");
    }

    #[test]
    fn forwarded_for_folds_earlier_hops() {
        let mut h = HeaderMap::new();
        h.append(X_FORWARDED_FOR, "10.0.0.1".parse().unwrap());
        h.append(X_FORWARDED_FOR, "10.0.0.2, 10.0.0.3".parse().unwrap());
        let fwd = Forwarded {
            client: "127.0.0.9".parse().unwrap(),
            proto: HeaderValue::from_static("http"),
            request_id: HeaderValue::from_static("id-1"),
        };
        let out = outgoing(&h, &fwd);
        assert_eq!(out.get_all(X_FORWARDED_FOR).iter().count(), 1);
        assert_eq!(
            out[X_FORWARDED_FOR],
            "10.0.0.1, 10.0.0.2, 10.0.0.3, 127.0.0.9"
        );
        assert_eq!(out[X_REQUEST_ID], "id-1");
        assert_eq!(out[X_FORWARDED_PROTO], "http");
    }
}
