//! The Merkle tree of RFC 6962 / RFC 9162 (Certificate Transparency) over audit records.
//!
//! Leaf hash `SHA-256(0x00 ‖ record)`, node hash `SHA-256(0x01 ‖ left ‖ right)`; a tree of
//! n leaves splits at the largest power of two below n. The writer keeps only a
//! [`Frontier`] (one hash per set bit of n); the verifier recomputes from all leaves and
//! builds and checks inclusion and consistency proofs.

use sha2::{Digest, Sha256};

pub type Hash = [u8; 32];

pub fn leaf_hash(record: &[u8]) -> Hash {
    let mut h = Sha256::new();
    h.update([0u8]);
    h.update(record);
    h.finalize().into()
}

pub fn node_hash(left: &Hash, right: &Hash) -> Hash {
    let mut h = Sha256::new();
    h.update([1u8]);
    h.update(left);
    h.update(right);
    h.finalize().into()
}

/// The root of the empty tree: the hash of the empty string.
pub fn empty_root() -> Hash {
    Sha256::digest([]).into()
}

/// The right edge of a growing tree: the roots of its perfect subtrees, largest first.
#[derive(Debug, Clone, Default)]
pub struct Frontier {
    size: u64,
    subtrees: Vec<(Hash, u64)>,
}

impl Frontier {
    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn push(&mut self, leaf: Hash) {
        self.size += 1;
        let mut node = (leaf, 1u64);
        while let Some(&(left, width)) = self.subtrees.last() {
            if width != node.1 {
                break;
            }
            self.subtrees.pop();
            node = (node_hash(&left, &node.0), width * 2);
        }
        self.subtrees.push(node);
    }

    pub fn root(&self) -> Hash {
        let mut iter = self.subtrees.iter().rev();
        let Some(&(mut acc, _)) = iter.next() else {
            return empty_root();
        };
        for (left, _) in iter {
            acc = node_hash(left, &acc);
        }
        acc
    }
}

fn split(n: usize) -> usize {
    // The largest power of two strictly below n (n ≥ 2).
    1 << (usize::BITS - (n - 1).leading_zeros() - 1)
}

/// MTH(D[n]) of RFC 6962 §2.1.
pub fn root(leaves: &[Hash]) -> Hash {
    match leaves.len() {
        0 => empty_root(),
        1 => leaves[0],
        n => {
            let k = split(n);
            node_hash(&root(&leaves[..k]), &root(&leaves[k..]))
        }
    }
}

/// PATH(m, D[n]) of RFC 6962 §2.1.1: the audit path of leaf `index`.
pub fn inclusion_proof(leaves: &[Hash], index: usize) -> Vec<Hash> {
    let n = leaves.len();
    if n <= 1 {
        return Vec::new();
    }
    let k = split(n);
    if index < k {
        let mut p = inclusion_proof(&leaves[..k], index);
        p.push(root(&leaves[k..]));
        p
    } else {
        let mut p = inclusion_proof(&leaves[k..], index - k);
        p.push(root(&leaves[..k]));
        p
    }
}

/// RFC 9162 §2.1.3.2: does `path` prove leaf `index` of a tree of `size` with `root`?
pub fn verify_inclusion(leaf: &Hash, index: u64, size: u64, path: &[Hash], root: &Hash) -> bool {
    if index >= size {
        return false;
    }
    let (mut fn_, mut sn) = (index, size - 1);
    let mut r = *leaf;
    for p in path {
        if sn == 0 {
            return false;
        }
        if fn_ & 1 == 1 || fn_ == sn {
            r = node_hash(p, &r);
            if fn_ & 1 == 0 {
                while fn_ & 1 == 0 && fn_ != 0 {
                    fn_ >>= 1;
                    sn >>= 1;
                }
            }
        } else {
            r = node_hash(&r, p);
        }
        fn_ >>= 1;
        sn >>= 1;
    }
    sn == 0 && &r == root
}

/// PROOF(m, D[n]) of RFC 6962 §2.1.2: that the first `m` leaves are a prefix of all.
pub fn consistency_proof(leaves: &[Hash], m: usize) -> Vec<Hash> {
    fn subproof(m: usize, leaves: &[Hash], complete: bool) -> Vec<Hash> {
        let n = leaves.len();
        if m == n {
            return if complete {
                Vec::new()
            } else {
                vec![root(leaves)]
            };
        }
        let k = split(n);
        if m <= k {
            let mut p = subproof(m, &leaves[..k], complete);
            p.push(root(&leaves[k..]));
            p
        } else {
            let mut p = subproof(m - k, &leaves[k..], false);
            p.push(root(&leaves[..k]));
            p
        }
    }
    if m == 0 || m >= leaves.len() {
        return Vec::new();
    }
    subproof(m, leaves, true)
}

/// RFC 9162 §2.1.4.2: does `proof` show the tree (`size1`, `root1`) is a prefix of
/// (`size2`, `root2`)?
pub fn verify_consistency(
    size1: u64,
    size2: u64,
    root1: &Hash,
    root2: &Hash,
    proof: &[Hash],
) -> bool {
    if size1 > size2 {
        return false;
    }
    if size1 == size2 {
        return proof.is_empty() && root1 == root2;
    }
    if size1 == 0 {
        return proof.is_empty();
    }
    let mut path: Vec<Hash> = proof.to_vec();
    if size1.is_power_of_two() {
        path.insert(0, *root1);
    }
    let Some((first, rest)) = path.split_first() else {
        return false;
    };
    let (mut fn_, mut sn) = (size1 - 1, size2 - 1);
    while fn_ & 1 == 1 {
        fn_ >>= 1;
        sn >>= 1;
    }
    let (mut fr, mut sr) = (*first, *first);
    for c in rest {
        if sn == 0 {
            return false;
        }
        if fn_ & 1 == 1 || fn_ == sn {
            fr = node_hash(c, &fr);
            sr = node_hash(c, &sr);
            if fn_ & 1 == 0 {
                while fn_ & 1 == 0 && fn_ != 0 {
                    fn_ >>= 1;
                    sn >>= 1;
                }
            }
        } else {
            sr = node_hash(&sr, c);
        }
        fn_ >>= 1;
        sn >>= 1;
    }
    sn == 0 && &fr == root1 && &sr == root2
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn leaves(n: usize) -> Vec<Hash> {
        (0..n)
            .map(|i| leaf_hash(format!("record {i}").as_bytes()))
            .collect()
    }

    #[test]
    fn rfc6962_shapes() {
        let l = leaves(3);
        assert_eq!(root(&l), node_hash(&node_hash(&l[0], &l[1]), &l[2]));
        assert_eq!(root(&[]), empty_root());
        assert_eq!(
            hex::encode(empty_root()),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    proptest! {
        #[test]
        fn frontier_root_matches_the_recursive_root(n in 0usize..200) {
            let l = leaves(n);
            let mut f = Frontier::default();
            for leaf in &l {
                f.push(*leaf);
            }
            prop_assert_eq!(f.root(), root(&l));
            prop_assert_eq!(f.size(), n as u64);
        }

        #[test]
        fn inclusion_proofs_round_trip_and_reject_other_leaves(n in 1usize..130, i in 0usize..130) {
            let i = i % n;
            let l = leaves(n);
            let r = root(&l);
            let p = inclusion_proof(&l, i);
            prop_assert!(verify_inclusion(&l[i], i as u64, n as u64, &p, &r));
            let other = leaf_hash(b"changed");
            prop_assert!(!verify_inclusion(&other, i as u64, n as u64, &p, &r));
            if n > 1 {
                prop_assert!(!verify_inclusion(&l[i], ((i + 1) % n) as u64, n as u64, &p, &r));
            }
        }

        #[test]
        fn consistency_proofs_round_trip_and_reject_rewrites(n in 1usize..130, m in 1usize..130) {
            let m = m.min(n);
            let l = leaves(n);
            let p = consistency_proof(&l, m);
            prop_assert!(verify_consistency(m as u64, n as u64, &root(&l[..m]), &root(&l), &p));
            if m < n {
                let mut changed = l.clone();
                changed[0] = leaf_hash(b"rewritten");
                prop_assert!(!verify_consistency(m as u64, n as u64, &root(&changed[..m]), &root(&l), &p));
            }
        }
    }
}
