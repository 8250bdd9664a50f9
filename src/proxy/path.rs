//! Path normalisation, so that routing (and the filters a route runs) cannot be slipped
//! past by spelling a path another way: `/public/../secure/x` and `/%73ecure/x` are
//! `/secure/x`.
//!
//! As Envoy's `normalize_path` and `merge_slashes`: percent-encoded unreserved
//! characters are decoded and the hex digits of the other escapes upper-cased (RFC 3986
//! §6.2.2.1–2), dot segments are removed (§5.2.4, after decoding, so `%2e%2e` counts),
//! and runs of `/` optionally become one. Reserved escapes such as `%2F` stay encoded:
//! decoding them would change which segments the path has. The normalised path is what
//! is forwarded. The query is left as it is.

use std::borrow::Cow;

/// The normalised form of `path` (no query), or why it is not a path.
pub fn normalize(path: &str, merge_slashes: bool) -> Result<Cow<'_, str>, &'static str> {
    if !path.starts_with('/') {
        return Err("it must start with `/`");
    }
    let plain =
        !(path.contains('%') || path.contains("/.") || merge_slashes && path.contains("//"));
    if plain {
        return Ok(Cow::Borrowed(path));
    }
    let decoded = decode_unreserved(path)?;
    let merged = if merge_slashes {
        merge(&decoded)
    } else {
        decoded
    };
    Ok(Cow::Owned(remove_dot_segments(&merged)))
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

fn decode_unreserved(path: &str) -> Result<String, &'static str> {
    let bytes = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] != b'%' {
            // Safe: `i` only stops on ASCII bytes or moves past whole escapes, and the
            // path is a &str, so the byte run up to the next `%` is whole characters.
            let next = bytes[i..]
                .iter()
                .position(|b| *b == b'%')
                .map_or(bytes.len(), |p| i + p);
            out.push_str(&path[i..next]);
            i = next;
            continue;
        }
        let (Some(hi), Some(lo)) = (
            bytes.get(i + 1).copied().and_then(hex),
            bytes.get(i + 2).copied().and_then(hex),
        ) else {
            return Err("a `%` is not followed by two hex digits");
        };
        let b = hi * 16 + lo;
        if is_unreserved(b) {
            out.push(char::from(b));
        } else {
            out.push('%');
            out.push(char::from(bytes[i + 1].to_ascii_uppercase()));
            out.push(char::from(bytes[i + 2].to_ascii_uppercase()));
        }
        i += 3;
    }
    Ok(out)
}

fn merge(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    let mut previous_slash = false;
    for c in path.chars() {
        if c == '/' && previous_slash {
            continue;
        }
        previous_slash = c == '/';
        out.push(c);
    }
    out
}

/// RFC 3986 §5.2.4, over an absolute path.
fn remove_dot_segments(path: &str) -> String {
    let mut output: Vec<&str> = Vec::new();
    let segments: Vec<&str> = path[1..].split('/').collect();
    let last = segments.len() - 1;
    let mut trailing_slash = false;
    for (i, segment) in segments.into_iter().enumerate() {
        match segment {
            "." => trailing_slash = i == last,
            ".." => {
                output.pop();
                trailing_slash = i == last;
            }
            s => {
                output.push(s);
                trailing_slash = false;
            }
        }
    }
    let mut out = String::with_capacity(path.len());
    for s in &output {
        out.push('/');
        out.push_str(s);
    }
    if trailing_slash || out.is_empty() {
        out.push('/');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(p: &str) -> String {
        normalize(p, true).unwrap().into_owned()
    }

    #[test]
    fn dot_segments_and_unreserved_escapes_cannot_hide_a_prefix() {
        assert_eq!(n("/public/../secure/x"), "/secure/x");
        assert_eq!(n("/%73ecure/x"), "/secure/x");
        assert_eq!(n("/public/%2e%2e/secure/x"), "/secure/x");
        assert_eq!(n("/public/%2E%2E/secure"), "/secure");
        assert_eq!(n("/./secure/./x"), "/secure/x");
        assert_eq!(n("/../../secure"), "/secure");
        assert_eq!(n("/a/b/.."), "/a/");
        assert_eq!(n("/a/b/."), "/a/b/");
        assert_eq!(n("/a/.."), "/");
        assert_eq!(n("/"), "/");
    }

    #[test]
    fn slashes_merge_and_reserved_escapes_stay_encoded() {
        assert_eq!(n("//secure///x"), "/secure/x");
        assert_eq!(
            normalize("//secure//x", false).unwrap(),
            "//secure//x",
            "merge_slashes off"
        );
        assert_eq!(n("/a%2fb"), "/a%2Fb", "an encoded slash is not a separator");
        assert_eq!(n("/caf%c3%a9"), "/caf%C3%A9");
        assert_eq!(n("/x/%7euser"), "/x/~user");
    }

    #[test]
    fn plain_paths_are_borrowed_and_bad_escapes_refused() {
        assert!(matches!(
            normalize("/api/v1/auth/x", true),
            Ok(Cow::Borrowed(_))
        ));
        assert!(normalize("/a%zz", true).is_err());
        assert!(normalize("/a%4", true).is_err());
        assert!(normalize("*", true).is_err());
        assert_eq!(n("/a.b/c..d/.e"), "/a.b/c..d/.e", "dots inside names stay");
    }
}
