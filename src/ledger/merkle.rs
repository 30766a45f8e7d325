//! RFC 6962 / RFC 9162 Merkle trees over SHA-256: leaf hashes
//! `SHA-256(0x00 ‖ entry)`, node hashes `SHA-256(0x01 ‖ left ‖ right)`, the
//! split point the largest power of two below the size. Roots, inclusion and
//! consistency proofs, and their verification. This module is the product
//! (what auditors trust), so it is written out here, not borrowed.

use ring::digest::{Context, SHA256};

pub type Hash = [u8; 32];

pub fn leaf_hash(entry: &[u8]) -> Hash {
    hash_parts(&[&[0x00], entry])
}

pub fn node_hash(left: &Hash, right: &Hash) -> Hash {
    hash_parts(&[&[0x01], left, right])
}

fn hash_parts(parts: &[&[u8]]) -> Hash {
    let mut ctx = Context::new(&SHA256);
    for p in parts {
        ctx.update(p);
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

/// The root of the empty tree: SHA-256 of the empty string.
pub fn empty_root() -> Hash {
    hash_parts(&[])
}

/// Largest power of two strictly below `n` (n ≥ 2).
fn split(n: u64) -> u64 {
    let mut k = 1;
    while k << 1 < n {
        k <<= 1;
    }
    k
}

/// Where the roots of perfect subtrees come from: computed from leaves in
/// memory, or read from the nodes stored as entries were appended. Every
/// root and proof below is built from O(log n) of them.
pub trait Subtrees {
    /// The root of the perfect subtree of `2^level` leaves that starts at
    /// leaf `index << level`; `None` if it is not (yet) there.
    fn perfect(&self, level: u32, index: u64) -> Option<Hash>;
}

impl Subtrees for [Hash] {
    fn perfect(&self, level: u32, index: u64) -> Option<Hash> {
        let lo = usize::try_from(index.checked_shl(level)?).ok()?;
        let hi = lo.checked_add(1usize.checked_shl(level)?)?;
        let leaves = self.get(lo..hi)?;
        Some(slice_root(leaves))
    }
}

fn slice_root(leaves: &[Hash]) -> Hash {
    match leaves.len() {
        0 => empty_root(),
        1 => leaves[0],
        n => {
            let k = split(n as u64) as usize;
            node_hash(&slice_root(&leaves[..k]), &slice_root(&leaves[k..]))
        }
    }
}

/// MTH(D[lo:hi]): a perfect, aligned range is one subtree; any other splits
/// at the largest power of two, whose left part is always perfect and aligned.
pub fn range_root(tree: &(impl Subtrees + ?Sized), lo: u64, hi: u64) -> Option<Hash> {
    let n = hi.checked_sub(lo)?;
    if n == 0 {
        return Some(empty_root());
    }
    if n.is_power_of_two() && lo.is_multiple_of(n) {
        let level = n.trailing_zeros();
        return tree.perfect(level, lo >> level);
    }
    let k = split(n);
    Some(node_hash(
        &range_root(tree, lo, lo + k)?,
        &range_root(tree, lo + k, hi)?,
    ))
}

/// The Merkle tree hash of a list of leaf hashes, by the RFC's definition.
pub fn root(leaves: &[Hash]) -> Hash {
    slice_root(leaves)
}

/// The audit path of leaf `index` in the tree of the first `leaves.len()` leaves.
pub fn inclusion_proof(leaves: &[Hash], index: usize) -> Option<Vec<Hash>> {
    inclusion_path(leaves, index as u64, leaves.len() as u64)
}

/// The audit path of leaf `index` in the tree of size `size`.
pub fn inclusion_path(tree: &(impl Subtrees + ?Sized), index: u64, size: u64) -> Option<Vec<Hash>> {
    if index >= size {
        return None;
    }
    let mut proof = Vec::new();
    path(tree, index, 0, size, &mut proof)?;
    Some(proof)
}

fn path(
    tree: &(impl Subtrees + ?Sized),
    m: u64,
    lo: u64,
    hi: u64,
    out: &mut Vec<Hash>,
) -> Option<()> {
    let n = hi - lo;
    if n <= 1 {
        return Some(());
    }
    let k = split(n);
    if m < k {
        path(tree, m, lo, lo + k, out)?;
        out.push(range_root(tree, lo + k, hi)?);
    } else {
        path(tree, m - k, lo + k, hi, out)?;
        out.push(range_root(tree, lo, lo + k)?);
    }
    Some(())
}

/// The proof that the tree of the first `m` leaves is a prefix of the tree of all `leaves`.
pub fn consistency_proof(leaves: &[Hash], m: usize) -> Option<Vec<Hash>> {
    consistency_path(leaves, m as u64, leaves.len() as u64)
}

/// The proof that the tree of size `m` is a prefix of the tree of size `n`.
pub fn consistency_path(tree: &(impl Subtrees + ?Sized), m: u64, n: u64) -> Option<Vec<Hash>> {
    if m > n {
        return None;
    }
    let mut proof = Vec::new();
    if m > 0 && m < n {
        subproof(tree, m, 0, n, true, &mut proof)?;
    }
    Some(proof)
}

fn subproof(
    tree: &(impl Subtrees + ?Sized),
    m: u64,
    lo: u64,
    hi: u64,
    complete: bool,
    out: &mut Vec<Hash>,
) -> Option<()> {
    let n = hi - lo;
    if m == n {
        if !complete {
            out.push(range_root(tree, lo, hi)?);
        }
        return Some(());
    }
    let k = split(n);
    if m <= k {
        subproof(tree, m, lo, lo + k, complete, out)?;
        out.push(range_root(tree, lo + k, hi)?);
    } else {
        subproof(tree, m - k, lo + k, hi, false, out)?;
        out.push(range_root(tree, lo, lo + k)?);
    }
    Some(())
}

/// Checks an audit path (RFC 9162, 2.1.3.2).
pub fn verify_inclusion(
    leaf: &Hash,
    index: u64,
    size: u64,
    proof: &[Hash],
    expected_root: &Hash,
) -> bool {
    if index >= size {
        return false;
    }
    let (mut fnode, mut snode) = (index, size - 1);
    let mut r = *leaf;
    for p in proof {
        if snode == 0 {
            return false;
        }
        if fnode & 1 == 1 || fnode == snode {
            r = node_hash(p, &r);
            if fnode & 1 == 0 {
                while fnode & 1 == 0 && fnode != 0 {
                    fnode >>= 1;
                    snode >>= 1;
                }
            }
        } else {
            r = node_hash(&r, p);
        }
        fnode >>= 1;
        snode >>= 1;
    }
    snode == 0 && &r == expected_root
}

/// Checks a consistency proof between two tree heads (RFC 9162, 2.1.4.2).
pub fn verify_consistency(
    first: u64,
    second: u64,
    first_root: &Hash,
    second_root: &Hash,
    proof: &[Hash],
) -> bool {
    if first > second {
        return false;
    }
    if first == second {
        return proof.is_empty() && first_root == second_root;
    }
    if first == 0 {
        return proof.is_empty();
    }
    let mut proof: Vec<Hash> = proof.to_vec();
    if first.is_power_of_two() {
        proof.insert(0, *first_root);
    }
    let (mut fnode, mut snode) = (first - 1, second - 1);
    while fnode & 1 == 1 {
        fnode >>= 1;
        snode >>= 1;
    }
    let Some((head, rest)) = proof.split_first() else {
        return false;
    };
    let (mut fr, mut sr) = (*head, *head);
    for c in rest {
        if snode == 0 {
            return false;
        }
        if fnode & 1 == 1 || fnode == snode {
            fr = node_hash(c, &fr);
            sr = node_hash(c, &sr);
            if fnode & 1 == 0 {
                while fnode & 1 == 0 && fnode != 0 {
                    fnode >>= 1;
                    snode >>= 1;
                }
            }
        } else {
            sr = node_hash(&sr, c);
        }
        fnode >>= 1;
        snode >>= 1;
    }
    snode == 0 && &fr == first_root && &sr == second_root
}

/// The roots of the perfect subtrees a tree of `len` leaves decomposes into,
/// largest first: enough to append a leaf and get the new root in O(log n).
#[derive(Debug, Clone, Default)]
pub struct Frontier {
    len: u64,
    /// (height, root) of each perfect subtree, left to right.
    peaks: Vec<(u32, Hash)>,
}

impl Frontier {
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn push(&mut self, leaf: Hash) {
        self.push_completing(leaf, |_, _, _| {});
    }

    /// Appends a leaf and calls `completed(level, index, root)` for every
    /// perfect subtree it completes, the leaf itself (level 0) first: what
    /// is stored so proofs need not be computed from leaves.
    pub fn push_completing(&mut self, leaf: Hash, mut completed: impl FnMut(u32, u64, &Hash)) {
        let position = self.len;
        completed(0, position, &leaf);
        let mut node = (0u32, leaf);
        while let Some(&(h, left)) = self.peaks.last() {
            if h != node.0 {
                break;
            }
            self.peaks.pop();
            node = (h + 1, node_hash(&left, &node.1));
            completed(node.0, position >> node.0, &node.1);
        }
        self.peaks.push(node);
        self.len += 1;
    }

    /// The frontier of the tree of size `len`, from the roots of the perfect
    /// subtrees it decomposes into: O(log n) reads.
    pub fn at(tree: &(impl Subtrees + ?Sized), len: u64) -> Option<Frontier> {
        let mut peaks = Vec::new();
        let mut start = 0u64;
        for level in (0..64u32).rev() {
            if len & (1u64 << level) != 0 {
                peaks.push((level, tree.perfect(level, start >> level)?));
                start += 1u64 << level;
            }
        }
        Some(Frontier { len, peaks })
    }

    pub fn root(&self) -> Hash {
        let mut iter = self.peaks.iter().rev();
        let Some(&(_, mut acc)) = iter.next() else {
            return empty_root();
        };
        for (_, left) in iter {
            acc = node_hash(left, &acc);
        }
        acc
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(h: &Hash) -> String {
        hex::encode(h)
    }

    /// The leaves of the RFC 6962 reference test vectors (certificate-transparency).
    fn vector_leaves() -> Vec<Hash> {
        let inputs: [&[u8]; 8] = [
            b"",
            &[0x00],
            &[0x10],
            &[0x20, 0x21],
            &[0x30, 0x31],
            &[0x40, 0x41, 0x42, 0x43],
            &[0x50, 0x51, 0x52, 0x53, 0x54, 0x55, 0x56, 0x57],
            &[
                0x60, 0x61, 0x62, 0x63, 0x64, 0x65, 0x66, 0x67, 0x68, 0x69, 0x6a, 0x6b, 0x6c, 0x6d,
                0x6e, 0x6f,
            ],
        ];
        inputs.iter().map(|i| leaf_hash(i)).collect()
    }

    #[test]
    fn roots_match_the_reference_vectors() {
        let expected = [
            "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
            "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
            "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
            "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
            "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
            "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
            "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
        ];
        let leaves = vector_leaves();
        for (n, want) in expected.iter().enumerate() {
            assert_eq!(hex(&root(&leaves[..n + 1])), *want, "size {}", n + 1);
        }
        assert_eq!(
            hex(&root(&[])),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn inclusion_proofs_match_the_reference_vectors() {
        let leaves = vector_leaves();
        let p = inclusion_proof(&leaves, 0).unwrap();
        assert_eq!(
            p.iter().map(hex).collect::<Vec<_>>(),
            vec![
                "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
                "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
            ]
        );
        let p = inclusion_proof(&leaves[..5], 4).unwrap();
        assert_eq!(
            p.iter().map(hex).collect::<Vec<_>>(),
            vec!["d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"]
        );
    }

    #[test]
    fn consistency_proofs_match_the_reference_vectors() {
        let leaves = vector_leaves();
        let p = consistency_proof(&leaves, 1).unwrap();
        assert_eq!(
            p.iter().map(hex).collect::<Vec<_>>(),
            vec![
                "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
                "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
            ]
        );
        let p = consistency_proof(&leaves, 6).unwrap();
        assert_eq!(
            p.iter().map(hex).collect::<Vec<_>>(),
            vec![
                "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
                "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
                "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
            ]
        );
    }

    /// A deterministic pseudo-random sequence for property tests.
    fn sizes() -> impl Iterator<Item = usize> {
        let mut rng = crate::util::Rng::new(42);
        (1..=64).chain((0..40).map(move |_| 65 + rng.below(700) as usize))
    }

    #[test]
    fn frontier_root_equals_the_definition_at_every_size() {
        let leaves: Vec<Hash> = (0..800u32).map(|i| leaf_hash(&i.to_be_bytes())).collect();
        let mut f = Frontier::default();
        assert_eq!(f.root(), empty_root());
        for (i, leaf) in leaves.iter().enumerate() {
            f.push(*leaf);
            assert_eq!(f.root(), root(&leaves[..=i]), "size {}", i + 1);
        }
    }

    #[test]
    fn every_proof_verifies_and_every_broken_one_fails() {
        let leaves: Vec<Hash> = (0..800u32).map(|i| leaf_hash(&i.to_le_bytes())).collect();
        let mut rng = crate::util::Rng::new(7);
        for n in sizes() {
            let tree = &leaves[..n];
            let r = root(tree);
            let i = rng.below(n as u64) as usize;
            let proof = inclusion_proof(tree, i).unwrap();
            assert!(
                verify_inclusion(&tree[i], i as u64, n as u64, &proof, &r),
                "inclusion {i} of {n}"
            );
            // Wrong leaf, wrong index, wrong size, tampered or truncated path, wrong root.
            assert!(!verify_inclusion(
                &leaf_hash(b"forged"),
                i as u64,
                n as u64,
                &proof,
                &r
            ));
            if n > 1 {
                let other = (i + 1) % n;
                assert!(!verify_inclusion(
                    &tree[i],
                    other as u64,
                    n as u64,
                    &proof,
                    &r
                ));
                let mut bad = proof.clone();
                bad[0][0] ^= 1;
                assert!(!verify_inclusion(&tree[i], i as u64, n as u64, &bad, &r));
                assert!(!verify_inclusion(
                    &tree[i],
                    i as u64,
                    n as u64,
                    &proof[..proof.len() - 1],
                    &r
                ));
            }
            let mut wrong_root = r;
            wrong_root[31] ^= 1;
            assert!(!verify_inclusion(
                &tree[i],
                i as u64,
                n as u64,
                &proof,
                &wrong_root
            ));

            let m = 1 + rng.below(n as u64) as usize;
            let c = consistency_proof(tree, m).unwrap();
            let rm = root(&tree[..m]);
            assert!(
                verify_consistency(m as u64, n as u64, &rm, &r, &c),
                "consistency {m} -> {n}"
            );
            if m < n {
                let mut bad = c.clone();
                bad[0][5] ^= 1;
                assert!(!verify_consistency(m as u64, n as u64, &rm, &r, &bad));
                let mut forked = rm;
                forked[0] ^= 1;
                assert!(!verify_consistency(m as u64, n as u64, &forked, &r, &c));
                assert!(!verify_consistency(
                    m as u64,
                    n as u64,
                    &rm,
                    &wrong_root,
                    &c
                ));
            }
        }
    }
}
