//! Results of recent inferences, keyed by the SHA-256 of the model input, so that a
//! repeated request costs a hash and a lookup instead of a model run.
//!
//! Bounded (quick_cache's S3-FIFO eviction keeps frequently repeated inputs), with a
//! time to live, and cleared whenever the model is reloaded: a cached score always
//! belongs to the model that is loaded.

use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

pub type Key = [u8; 32];

pub fn key(input: &[u8]) -> Key {
    Sha256::digest(input).into()
}

pub struct ScoreCache<V> {
    entries: quick_cache::sync::Cache<Key, (V, Instant)>,
    ttl: Duration,
}

impl<V: Clone> ScoreCache<V> {
    pub fn new(capacity: usize, ttl: Duration) -> Self {
        Self {
            entries: quick_cache::sync::Cache::new(capacity.max(1)),
            ttl,
        }
    }

    /// The cached score, unless it is older than the TTL.
    pub fn get(&self, key: &Key) -> Option<V> {
        let (row, at) = self.entries.get(key)?;
        if at.elapsed() > self.ttl {
            self.entries.remove(key);
            return None;
        }
        Some(row)
    }

    pub fn insert(&self, key: Key, row: V) {
        self.entries.insert(key, (row, Instant::now()));
    }

    pub fn clear(&self) {
        self.entries.clear();
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn hits_expire_and_clear() {
        let c = ScoreCache::<Arc<[f32]>>::new(100, Duration::from_millis(50));
        let k = key(b"POST /x\n\n{}");
        assert!(c.get(&k).is_none());
        c.insert(k, Arc::from(vec![0.1f32, 0.9]));
        assert_eq!(c.get(&k).as_deref(), Some(&[0.1f32, 0.9][..]));
        std::thread::sleep(Duration::from_millis(60));
        assert!(c.get(&k).is_none(), "expired");
        c.insert(k, Arc::from(vec![0.5f32]));
        c.clear();
        assert!(c.is_empty());
    }

    #[test]
    fn stays_bounded() {
        let c = ScoreCache::<Arc<[f32]>>::new(50, Duration::from_secs(60));
        for i in 0..1000u32 {
            c.insert(key(&i.to_le_bytes()), Arc::from(vec![0.0f32]));
        }
        assert!(c.len() <= 60, "{}", c.len());
    }
}
