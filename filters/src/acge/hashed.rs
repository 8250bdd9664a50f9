//! The `hashed` input: feature bucket ids computed from the cut rendering, so that the
//! module does only table look-ups and its MLP (docs/model-contract.md).
//!
//! Every feature is a 64-bit key, placed in a bucket by
//! `fmix64(key ^ seed · 0x9E3779B97F4A7C15) & (buckets − 1)` (wrapping arithmetic;
//! `fmix64` is MurmurHash3's finaliser, whose low bits are as mixed as its high ones;
//! `buckets` is a power of two, so no division is paid per feature), each feature kind
//! with its own seed:
//!
//! - `char_ngrams`, size n: the bytes b₀…bₙ₋₁ at each position, key
//!   `(Σ bᵢ · 257^(n−1−i)) << 3 | n` — exact, since 257⁷ < 2⁵⁷;
//! - `words`: maximal runs of ASCII letters, digits and bytes ≥ 0x80, key the word's
//!   FNV-1a-64;
//! - `word_pairs`: each word and the next, key `w₁ · 0x9E3779B97F4A7C15 + w₂` over
//!   their FNV-1a keys.
//!
//! ASCII letters are lower-cased first when the spec says so (the default). Ids come in
//! the order the spec lists the features; n-grams by size in the listed order, then by
//! position. `models/acge_input.py` computes the same ids (a parity test holds them to
//! the training script's fixtures).

use super::meta::{Feature, HashedSpec};

const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;
const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// MurmurHash3's 64-bit finaliser: every input bit reaches every output bit.
pub fn fmix64(mut k: u64) -> u64 {
    k ^= k >> 33;
    k = k.wrapping_mul(0xff51_afd7_ed55_8ccd);
    k ^= k >> 33;
    k = k.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    k ^ (k >> 33)
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(FNV_OFFSET, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(FNV_PRIME)
    })
}

fn is_word_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b >= 0x80
}

/// A `hashed` spec made ready to compute.
pub struct Hasher {
    /// buckets − 1.
    mask: u64,
    lowercase: bool,
    features: Vec<Feature>,
    needs_words: bool,
}

impl Hasher {
    pub fn new(spec: &HashedSpec) -> Self {
        Self {
            mask: spec.buckets - 1,
            lowercase: spec.lowercase,
            needs_words: spec
                .features
                .iter()
                .any(|f| matches!(f, Feature::Words { .. } | Feature::WordPairs { .. })),
            features: spec.features.clone(),
        }
    }

    fn bucket(&self, key: u64, mixed_seed: u64) -> i64 {
        // buckets ≤ 2^40 (checked when model.json is read), so the id fits an i64.
        (fmix64(key ^ mixed_seed) & self.mask) as i64
    }

    /// The bucket ids of one cut rendering.
    pub fn ids(&self, cut: &[u8]) -> Vec<i64> {
        let lowered;
        let x: &[u8] = if self.lowercase && cut.iter().any(u8::is_ascii_uppercase) {
            lowered = cut.to_ascii_lowercase();
            &lowered
        } else {
            cut
        };
        let words: Vec<u64> = if self.needs_words {
            x.split(|b| !is_word_byte(*b))
                .filter(|w| !w.is_empty())
                .map(fnv1a)
                .collect()
        } else {
            Vec::new()
        };
        let mut out = Vec::with_capacity(self.count(x.len(), words.len()));
        for feature in &self.features {
            match feature {
                Feature::CharNgrams { n, seed } => self.ngrams(x, n, *seed, &mut out),
                Feature::Words { seed } => {
                    let s = seed.wrapping_mul(GOLDEN);
                    out.extend(words.iter().map(|w| self.bucket(*w, s)));
                }
                Feature::WordPairs { seed } => {
                    let s = seed.wrapping_mul(GOLDEN);
                    out.extend(
                        words
                            .windows(2)
                            .map(|p| self.bucket(p[0].wrapping_mul(GOLDEN).wrapping_add(p[1]), s)),
                    );
                }
            }
        }
        out
    }

    /// The n-grams of each listed size in turn, by position. (One pass over the
    /// positions extending each (n−1)-gram by a byte was tried: 12 % slower, its
    /// indexed writes checked where `extend` over `windows` is not.)
    fn ngrams(&self, x: &[u8], sizes: &[u8], seed: u64, out: &mut Vec<i64>) {
        let s = seed.wrapping_mul(GOLDEN);
        for &n in sizes {
            let n = usize::from(n);
            out.extend(x.windows(n).map(|g| {
                let v = g
                    .iter()
                    .fold(0u64, |v, b| v.wrapping_mul(257).wrapping_add(u64::from(*b)));
                self.bucket(v << 3 | n as u64, s)
            }));
        }
    }

    fn count(&self, len: usize, words: usize) -> usize {
        self.features
            .iter()
            .map(|f| match f {
                Feature::CharNgrams { n, .. } => n
                    .iter()
                    .map(|n| len.saturating_sub(usize::from(*n) - 1))
                    .sum(),
                Feature::Words { .. } => words,
                Feature::WordPairs { .. } => words.saturating_sub(1),
            })
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(features: Vec<Feature>) -> HashedSpec {
        HashedSpec {
            hash: "fmix64".into(),
            buckets: 1 << 20,
            lowercase: true,
            features,
        }
    }

    #[test]
    fn counts_follow_the_spec() {
        let h = Hasher::new(&spec(vec![
            Feature::CharNgrams {
                n: vec![3, 5],
                seed: 1,
            },
            Feature::Words { seed: 2 },
            Feature::WordPairs { seed: 3 },
        ]));
        // "ab cd!e": 7 bytes → 5 trigrams, 3 five-grams; words ab, cd, e; 2 pairs.
        assert_eq!(h.ids(b"ab cd!e").len(), 5 + 3 + 3 + 2);
        assert!(h.ids(b"").is_empty(), "nothing in, nothing out");
        assert_eq!(h.ids(b"ab").len(), 1, "one word, no pair, no trigram");
    }

    #[test]
    fn case_is_folded_and_seeds_tell_kinds_apart() {
        let h = Hasher::new(&spec(vec![Feature::Words { seed: 2 }]));
        assert_eq!(h.ids(b"Delete LOGS"), h.ids(b"delete logs"));
        let other = Hasher::new(&spec(vec![Feature::Words { seed: 3 }]));
        assert_ne!(h.ids(b"delete"), other.ids(b"delete"));
        let keep = Hasher::new(&HashedSpec {
            lowercase: false,
            ..spec(vec![Feature::Words { seed: 2 }])
        });
        assert_ne!(keep.ids(b"Delete"), keep.ids(b"delete"));
    }

    #[test]
    fn ids_are_the_documented_function() {
        let h = Hasher::new(&spec(vec![
            Feature::CharNgrams {
                n: vec![3],
                seed: 5,
            },
            Feature::WordPairs { seed: 9 },
        ]));
        let key = (u64::from(b'a') * 257 * 257 + u64::from(b'b') * 257 + u64::from(b'c')) << 3 | 3;
        let gram = (fmix64(key ^ 5u64.wrapping_mul(GOLDEN)) & ((1 << 20) - 1)) as i64;
        let (a, b) = (fnv1a(b"abc"), fnv1a(b"d"));
        let pair = (fmix64(a.wrapping_mul(GOLDEN).wrapping_add(b) ^ 9u64.wrapping_mul(GOLDEN))
            % (1 << 20)) as i64;
        let ids = h.ids(b"abc d");
        assert_eq!(ids[0], gram);
        assert_eq!(*ids.last().unwrap(), pair);
        // Known values of the two building blocks, so that a port can check itself.
        assert_eq!(fnv1a(b"a"), 0xaf63dc4c8601ec8c);
        assert_eq!(fmix64(1), 0xb456bcfc34c2cb2c);
    }

    #[test]
    fn ngram_sizes_come_in_the_listed_order_then_by_position() {
        let one = |n: u8| {
            Hasher::new(&spec(vec![Feature::CharNgrams {
                n: vec![n],
                seed: 4,
            }]))
            .ids(b"abcdefg")
        };
        let both = Hasher::new(&spec(vec![Feature::CharNgrams {
            n: vec![5, 3],
            seed: 4,
        }]))
        .ids(b"abcdefg");
        assert_eq!(both, [one(5), one(3)].concat());
        assert_eq!(one(7).len(), 1, "one 7-gram in 7 bytes");
        let seven = Hasher::new(&spec(vec![Feature::CharNgrams {
            n: vec![7],
            seed: 4,
        }]));
        assert!(seven.ids(b"abc").is_empty(), "none in fewer bytes");
    }

    #[test]
    fn every_id_is_a_bucket() {
        let h = Hasher::new(&HashedSpec {
            buckets: 128,
            ..spec(vec![
                Feature::CharNgrams {
                    n: vec![1, 7],
                    seed: 1,
                },
                Feature::Words { seed: 2 },
            ])
        });
        let ids = h.ids("naïve café, 42 — ok".as_bytes());
        assert!(ids.iter().all(|i| (0..128).contains(i)), "{ids:?}");
    }
}
