//! The trust boundary: what a request must be to enter, and what of it the proxy does
//! not take from a client.
//!
//! In order: a header block within `max_header_bytes` (431); exactly one `Host` (or an
//! HTTP/2 `:authority`) on HTTP/1.1 (400); no transfer coding the proxy does not
//! implement (501: one it would silently drop, such as `gzip, chunked`); a path that
//! normalises (400), which is then what is routed and forwarded; a request id of
//! visible ASCII (or a new one); and no `x-acge-*` header from the client unless the
//! listener trusts them, since the proxy sets those itself.

use http::header::{HeaderMap, HeaderName, HeaderValue, HOST, TRANSFER_ENCODING};
use http::request::Parts;
use http::uri::{PathAndQuery, Uri};

use acge_filters::{RequestHead, RequestId};

use super::error::ProxyError;
use super::path;
use super::split::OVERRIDE_HEADER;
use super::upstream::headers::{block_size, X_REQUEST_ID};
use crate::config::ListenerConfig;

/// The prefix of the headers the proxy and its filters set.
const OWN_PREFIX: &str = "x-acge-";

/// The listener's ingress rules.
pub struct Ingress {
    max_header_bytes: usize,
    normalize_path: bool,
    merge_slashes: bool,
    trust_acge_headers: bool,
}

impl Ingress {
    pub fn new(config: &ListenerConfig) -> Self {
        Self {
            max_header_bytes: config.max_header_bytes,
            normalize_path: config.normalize_path,
            merge_slashes: config.merge_slashes,
            trust_acge_headers: config.trust_acge_headers,
        }
    }

    /// The request as it enters (its head becomes the exchange's), or why not.
    pub fn admit(&self, parts: Parts) -> Result<RequestHead, ProxyError> {
        let Parts {
            method,
            uri,
            version,
            mut headers,
            ..
        } = parts;
        let size = block_size(&headers);
        if size > self.max_header_bytes {
            return Err(ProxyError::HeadersTooLarge {
                size,
                limit: self.max_header_bytes,
            });
        }
        host(&mut headers, &uri, version)?;
        if let Some(coding) = unsupported_coding(&headers) {
            return Err(ProxyError::UnsupportedTransferCoding(coding));
        }
        let uri = self.path(&uri)?;
        if !self.trust_acge_headers {
            strip_own(&mut headers);
        }
        Ok(RequestHead {
            method,
            uri,
            headers,
        })
    }

    /// The origin-form URI the request is routed and forwarded on.
    fn path(&self, uri: &Uri) -> Result<Uri, ProxyError> {
        let raw = uri.path();
        let normalized = if self.normalize_path {
            path::normalize(raw, self.merge_slashes).map_err(ProxyError::BadPath)?
        } else if raw.starts_with('/') {
            std::borrow::Cow::Borrowed(raw)
        } else {
            return Err(ProxyError::BadPath("it must start with `/`"));
        };
        if uri.authority().is_none() && matches!(normalized, std::borrow::Cow::Borrowed(_)) {
            return Ok(uri.clone());
        }
        let path_and_query = match uri.query() {
            Some(q) => format!("{normalized}?{q}"),
            None => normalized.into_owned(),
        };
        let path_and_query = PathAndQuery::try_from(path_and_query)
            .map_err(|_| ProxyError::BadPath("it does not make a URI once normalised"))?;
        Ok(Uri::from(path_and_query))
    }
}

/// HTTP/1.1 needs exactly one `Host`; HTTP/2 carries it in `:authority`, which becomes
/// the `Host` an HTTP/1.1 upstream needs.
fn host(headers: &mut HeaderMap, uri: &Uri, version: http::Version) -> Result<(), ProxyError> {
    let mut hosts = headers.get_all(HOST).iter();
    let (first, second) = (hosts.next(), hosts.next());
    if second.is_some() {
        return Err(ProxyError::BadHost(
            "the request has more than one Host header",
        ));
    }
    if first.is_none() {
        match uri.authority() {
            Some(authority) => {
                if let Ok(v) = HeaderValue::from_str(authority.as_str()) {
                    headers.insert(HOST, v);
                }
            }
            None if version == http::Version::HTTP_11 => {
                return Err(ProxyError::BadHost(
                    "an HTTP/1.1 request needs a Host header",
                ));
            }
            None => {}
        }
    }
    Ok(())
}

/// A transfer coding other than `chunked`, which is all the proxy decodes: forwarding
/// the rest of the coding list would silently drop the others.
fn unsupported_coding(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(TRANSFER_ENCODING)
        .iter()
        .flat_map(|v| v.to_str().unwrap_or("?").split(','))
        .map(str::trim)
        .find(|c| !c.eq_ignore_ascii_case("chunked"))
        .map(str::to_string)
}

/// Removes the `x-acge-*` headers a client sent, except the version override (the
/// route decides whether it is honoured; see [`strip_override`]).
fn strip_own(headers: &mut HeaderMap) {
    let own: Vec<HeaderName> = headers
        .keys()
        .filter(|name| name.as_str().starts_with(OWN_PREFIX) && name.as_str() != OVERRIDE_HEADER)
        .cloned()
        .collect();
    for name in own {
        headers.remove(name);
    }
}

/// On a route that does not honour `x-acge-version`, the client's one is not passed on.
pub fn strip_override(headers: &mut HeaderMap) {
    headers.remove(OVERRIDE_HEADER);
}

/// The client's request id when it is 1–200 visible ASCII characters, else a new one
/// (a UUID): an id that could not be logged as it was sent is no id.
pub fn request_id(headers: &HeaderMap) -> RequestId {
    headers
        .get(X_REQUEST_ID)
        .and_then(|id| RequestId::new(id.clone()))
        .unwrap_or_else(new_request_id)
}

fn new_request_id() -> RequestId {
    let mut buf = uuid::Uuid::encode_buffer();
    let id = uuid::Uuid::new_v4().hyphenated().encode_lower(&mut buf);
    RequestId::new(HeaderValue::from_str(id).expect("a hyphenated UUID is a valid header value"))
        .expect("a hyphenated UUID is visible ASCII")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ingress() -> Ingress {
        let config: ListenerConfig = serde_yaml_ng::from_str("{address: 127.0.0.1:0}").unwrap();
        Ingress::new(&config)
    }

    fn parts(raw: &[(&str, &str)], uri: &str, version: http::Version) -> Parts {
        let mut req = http::Request::builder().uri(uri).version(version);
        for (k, v) in raw {
            req = req.header(*k, *v);
        }
        req.body(()).unwrap().into_parts().0
    }

    #[test]
    fn one_host_is_needed_on_http11_and_two_are_refused() {
        let i = ingress();
        let v11 = http::Version::HTTP_11;
        assert!(i.admit(parts(&[("host", "a")], "/x", v11)).is_ok());
        let two = i.admit(parts(&[("host", "a"), ("host", "b")], "/x", v11));
        assert!(matches!(two, Err(ProxyError::BadHost(_))), "{two:?}");
        let none = i.admit(parts(&[], "/x", v11));
        assert!(matches!(none, Err(ProxyError::BadHost(_))), "{none:?}");
        assert!(i.admit(parts(&[], "/x", http::Version::HTTP_10)).is_ok());
        let h2 = i
            .admit(parts(&[], "http://svc.example/x", http::Version::HTTP_2))
            .unwrap();
        assert_eq!(h2.headers[HOST], "svc.example");
        assert_eq!(h2.uri, "/x");
    }

    #[test]
    fn codings_other_than_chunked_are_refused() {
        let i = ingress();
        let v11 = http::Version::HTTP_11;
        let gz = i.admit(parts(
            &[("host", "a"), ("transfer-encoding", "gzip, chunked")],
            "/x",
            v11,
        ));
        assert!(
            matches!(&gz, Err(ProxyError::UnsupportedTransferCoding(c)) if c == "gzip"),
            "{gz:?}"
        );
        assert!(i
            .admit(parts(
                &[("host", "a"), ("transfer-encoding", "chunked")],
                "/x",
                v11
            ))
            .is_ok());
    }

    #[test]
    fn client_acge_headers_are_stripped_but_the_override_is_left_to_the_route() {
        let i = ingress();
        let head = i
            .admit(parts(
                &[
                    ("host", "a"),
                    ("x-acge-hash-check", "match"),
                    ("x-acge-request-compliance", "1.0"),
                    ("x-acge-shadow", "true"),
                    ("x-acge-version", "green"),
                    ("x-other", "kept"),
                ],
                "/x",
                http::Version::HTTP_11,
            ))
            .unwrap();
        let mut names: Vec<&str> = head.headers.keys().map(|k| k.as_str()).collect();
        names.sort_unstable();
        assert_eq!(names, vec!["host", "x-acge-version", "x-other"]);
    }

    #[test]
    fn paths_are_normalised_and_the_query_kept() {
        let i = ingress();
        let head = i
            .admit(parts(
                &[("host", "a")],
                "/public/../%73ecure//x?a=%2e%2e",
                http::Version::HTTP_11,
            ))
            .unwrap();
        assert_eq!(head.uri, "/secure/x?a=%2e%2e");
    }

    #[test]
    fn request_ids_must_be_visible_ascii() {
        let mut h = HeaderMap::new();
        h.insert(X_REQUEST_ID, HeaderValue::from_static("abc-123"));
        assert_eq!(request_id(&h).as_str(), "abc-123");
        h.insert(
            X_REQUEST_ID,
            HeaderValue::from_bytes("ключ".as_bytes()).unwrap(),
        );
        let id = request_id(&h);
        assert_eq!(id.len(), 36, "a new UUID replaces it: {id:?}");
        h.insert(X_REQUEST_ID, HeaderValue::from_static("has space"));
        assert_ne!(request_id(&h).as_str(), "has space");
    }
}
