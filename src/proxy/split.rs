//! Weighted blue/green choice: which version serves a request on its route.
//!
//! A client with a sticky key hashes to a fixed point in [0, 1); it goes green while
//! that point is below the green weight. Raising the weight therefore only moves
//! clients from blue to green, never back, until a rollback lowers it.
//!
//! Requests without a sticky key take the next point of a Weyl sequence (multiples of
//! the golden ratio, modulo 1). Those points spread evenly, so any run of N requests
//! sees the configured share to within a few requests, with no random-number generator
//! on the request path. This module owns the weights; it does not route (`route.rs`)
//! or forward anything (`upstream/`), and it reads no filter's results.

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;

use http::header::{HeaderMap, HeaderName, COOKIE};

pub use acge_filters::Version;

/// The header a client may use to pick a version, where the route allows it.
pub const OVERRIDE_HEADER: &str = "x-acge-version";

/// Why a version was chosen, for the audit log and debugging.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    Weight,
    Sticky,
    Override,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Choice {
    pub version: Version,
    pub reason: Reason,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SplitError {
    #[error("{OVERRIDE_HEADER} must be `blue` or `green`, not `{0}`")]
    BadOverride(String),
}

/// Where a sticky client's key is read from.
#[derive(Debug, Clone)]
pub enum StickyKey {
    Header(HeaderName),
    Cookie(String),
}

/// The weight of one route and the rule that applies it.
///
/// The weight is shared: a config reload builds a new splitter for the route (its
/// sticky key and override may have changed) around the weight the running one has, so
/// that a weight set at runtime, by an operator or the migration controller, survives.
#[derive(Debug)]
pub struct Splitter {
    green_weight: Arc<AtomicU8>,
    sequence: AtomicU64,
    sticky: Option<StickyKey>,
    allow_override: bool,
}

impl Splitter {
    pub fn new(green_weight: u8, sticky: Option<StickyKey>, allow_override: bool) -> Self {
        Self::sharing(
            Arc::new(AtomicU8::new(green_weight.min(100))),
            sticky,
            allow_override,
        )
    }

    /// A splitter for a reloaded route: its own rule, `previous`'s weight (the same
    /// atomic, so a change through either applies to both).
    pub fn carrying(previous: &Splitter, sticky: Option<StickyKey>, allow_override: bool) -> Self {
        Self::sharing(previous.green_weight.clone(), sticky, allow_override)
    }

    fn sharing(
        green_weight: Arc<AtomicU8>,
        sticky: Option<StickyKey>,
        allow_override: bool,
    ) -> Self {
        Self {
            green_weight,
            sequence: AtomicU64::new(0),
            sticky,
            allow_override,
        }
    }

    pub fn green_weight(&self) -> u8 {
        self.green_weight.load(Ordering::Relaxed)
    }

    /// Applies to the next request; nothing in flight is disturbed.
    pub fn set_green_weight(&self, weight: u8) {
        self.green_weight.store(weight.min(100), Ordering::Relaxed);
    }

    pub fn choose(&self, headers: &HeaderMap) -> Result<Choice, SplitError> {
        if self.allow_override {
            if let Some(value) = headers.get(OVERRIDE_HEADER) {
                let version = match value.as_bytes() {
                    v if v.eq_ignore_ascii_case(b"blue") => Version::Blue,
                    v if v.eq_ignore_ascii_case(b"green") => Version::Green,
                    v => return Err(SplitError::BadOverride(String::from_utf8_lossy(v).into())),
                };
                return Ok(Choice {
                    version,
                    reason: Reason::Override,
                });
            }
        }
        let weight = self.green_weight();
        if let Some(key) = self.sticky.as_ref().and_then(|k| sticky_value(k, headers)) {
            return Ok(Choice {
                version: pick(sticky_point(key), weight),
                reason: Reason::Sticky,
            });
        }
        let n = self.sequence.fetch_add(1, Ordering::Relaxed);
        Ok(Choice {
            version: pick(weyl_point(n), weight),
            reason: Reason::Weight,
        })
    }
}

/// Green while the point (a fraction of 2^64) is below `weight` percent.
fn pick(point: u64, weight: u8) -> Version {
    if (u128::from(point) * 100) < (u128::from(weight) << 64) {
        Version::Green
    } else {
        Version::Blue
    }
}

/// A stable point for a sticky key: the same on every proxy and after every restart.
pub fn sticky_point(key: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(key)
}

/// The n-th point of the Weyl sequence n·φ mod 1, as a fraction of 2^64.
fn weyl_point(n: u64) -> u64 {
    n.wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

fn sticky_value<'a>(key: &StickyKey, headers: &'a HeaderMap) -> Option<&'a [u8]> {
    match key {
        StickyKey::Header(name) => headers
            .get(name)
            .map(|v| v.as_bytes())
            .filter(|v| !v.is_empty()),
        StickyKey::Cookie(name) => headers
            .get_all(COOKIE)
            .iter()
            .flat_map(|v| v.as_bytes().split(|b| *b == b';'))
            .find_map(|pair| {
                let pair = pair.trim_ascii();
                let (k, v) = pair.split_at(pair.iter().position(|b| *b == b'=')?);
                (k == name.as_bytes() && v.len() > 1).then(|| &v[1..])
            }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn green_share(s: &Splitter, n: usize) -> f64 {
        let h = HeaderMap::new();
        let green = (0..n)
            .filter(|_| s.choose(&h).unwrap().version == Version::Green)
            .count();
        green as f64 / n as f64
    }

    #[test]
    fn weyl_split_matches_weight_closely_even_over_short_runs() {
        for w in [0u8, 1, 5, 10, 33, 50, 90, 100] {
            let s = Splitter::new(w, None, false);
            let share = green_share(&s, 200);
            assert!(
                (share * 100.0 - f64::from(w)).abs() <= 1.0,
                "weight {w}: share {share}"
            );
        }
    }

    #[test]
    fn sticky_header_decides_and_cookie_is_parsed() {
        let s = Splitter::new(50, Some(StickyKey::Cookie("sid".into())), false);
        let mut h = HeaderMap::new();
        h.insert(COOKIE, "a=1; sid=user-7; b=2".parse().unwrap());
        let first = s.choose(&h).unwrap();
        assert_eq!(first.reason, Reason::Sticky);
        for _ in 0..20 {
            assert_eq!(s.choose(&h).unwrap(), first);
        }
        assert_eq!(
            sticky_value(&StickyKey::Cookie("sid".into()), &h),
            Some(&b"user-7"[..])
        );
        assert_eq!(sticky_value(&StickyKey::Cookie("si".into()), &h), None);
    }

    #[test]
    fn override_only_when_enabled_and_validated() {
        let mut h = HeaderMap::new();
        h.insert(OVERRIDE_HEADER, "GREEN".parse().unwrap());
        let on = Splitter::new(0, None, true);
        assert_eq!(on.choose(&h).unwrap().version, Version::Green);
        let off = Splitter::new(0, None, false);
        assert_eq!(off.choose(&h).unwrap().version, Version::Blue);
        h.insert(OVERRIDE_HEADER, "purple".parse().unwrap());
        assert_eq!(
            on.choose(&h).unwrap_err(),
            SplitError::BadOverride("purple".into())
        );
    }

    #[test]
    fn weight_edges_are_absolute() {
        for key in ["", "a", "zzzz", "user-123"] {
            assert_eq!(pick(sticky_point(key.as_bytes()), 0), Version::Blue);
            assert_eq!(pick(sticky_point(key.as_bytes()), 100), Version::Green);
        }
        assert_eq!(pick(u64::MAX, 100), Version::Green);
        assert_eq!(pick(0, 1), Version::Green);
        assert_eq!(pick(0, 0), Version::Blue);
    }

    #[test]
    fn a_carried_splitter_shares_the_weight_and_has_its_own_rule() {
        let old = Splitter::new(30, None, false);
        let new = Splitter::carrying(&old, None, true);
        assert_eq!(new.green_weight(), 30);
        new.set_green_weight(55);
        assert_eq!(old.green_weight(), 55);
        old.set_green_weight(70);
        assert_eq!(new.green_weight(), 70);
        let mut h = HeaderMap::new();
        h.insert(OVERRIDE_HEADER, "green".parse().unwrap());
        assert_eq!(new.choose(&h).unwrap().reason, Reason::Override);
        assert_ne!(old.choose(&h).unwrap().reason, Reason::Override);
    }

    proptest! {
        /// A sticky client never moves from green back to blue while the weight only grows.
        #[test]
        fn sticky_client_never_moves_green_to_blue_as_weight_rises(
            key in proptest::collection::vec(any::<u8>(), 0..64),
            mut weights in proptest::collection::vec(0u8..=100, 1..20),
        ) {
            weights.sort_unstable();
            let point = sticky_point(&key);
            let mut was_green = false;
            for w in weights {
                let green = pick(point, w) == Version::Green;
                prop_assert!(green || !was_green, "moved back to blue at weight {}", w);
                was_green = green;
            }
        }

        /// Sticky points spread evenly: the green share of many keys tracks the weight.
        /// (20,000 keys: the bound of 3 points is ten standard deviations, so the test
        /// fails on a skewed hash, not on chance.)
        #[test]
        fn sticky_points_are_uniform(w in 0u8..=100, salt in any::<u64>()) {
            let n = 20_000;
            let green = (0..n)
                .filter(|i| pick(sticky_point(format!("{salt}-{i}").as_bytes()), w) == Version::Green)
                .count();
            let share = green as f64 * 100.0 / n as f64;
            prop_assert!((share - f64::from(w)).abs() < 3.0, "weight {} share {}", w, share);
        }
    }
}
