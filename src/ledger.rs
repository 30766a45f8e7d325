//! Hashing of usage-log entries as leaves of an RFC 6962 Merkle tree
//! (SHA-256, leaf prefix 0x00). Receipts carry the leaf hash, so a buyer can
//! later prove which entry recorded its answer.

use ring::digest::{Context, SHA256};

pub fn leaf_hash(entry: &[u8]) -> [u8; 32] {
    let mut ctx = Context::new(&SHA256);
    ctx.update(&[0x00]);
    ctx.update(entry);
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

pub fn leaf_hash_hex(entry: &[u8]) -> String {
    hex::encode(leaf_hash(entry))
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(ring::digest::digest(&SHA256, bytes).as_ref())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_leaf_matches_rfc6962_vector() {
        // RFC 6962 test vector: the hash of the empty leaf.
        assert_eq!(
            leaf_hash_hex(b""),
            "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d"
        );
    }

    #[test]
    fn different_entries_hash_differently() {
        assert_ne!(leaf_hash(b"a"), leaf_hash(b"b"));
        assert_ne!(leaf_hash(b""), sha256_raw(b""));
    }

    fn sha256_raw(b: &[u8]) -> [u8; 32] {
        let mut out = [0u8; 32];
        out.copy_from_slice(ring::digest::digest(&SHA256, b).as_ref());
        out
    }
}
