//! API keys: high-entropy, prefixed so secret scanners recognise them, shown
//! once and stored only as SHA-256 hashes.

use ring::rand::{SecureRandom, SystemRandom};

pub const KEY_PREFIX: &str = "fgk_";

pub fn generate_key() -> String {
    let mut bytes = [0u8; 32];
    // Without an entropy source no safe key can be made; this runs at the CLI or at start.
    SystemRandom::new()
        .fill(&mut bytes)
        .expect("OS random source available");
    format!("{KEY_PREFIX}{}", hex::encode(bytes))
}

/// The stored form of a key. Lookups go by this hash, so comparing it leaks
/// nothing useful about the key itself.
pub fn key_hash(key: &str) -> String {
    crate::ledger::sha256_hex(key.as_bytes())
}

/// The bearer token of an `Authorization` header value, if well formed.
pub fn bearer(header: &str) -> Option<&str> {
    let (scheme, token) = header.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty() && token.len() <= 256)
        .then_some(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_unique_prefixed_and_hashed() {
        let (a, b) = (generate_key(), generate_key());
        assert_ne!(a, b);
        assert!(a.starts_with(KEY_PREFIX) && a.len() == KEY_PREFIX.len() + 64);
        assert_eq!(key_hash(&a).len(), 64);
        assert_ne!(key_hash(&a), key_hash(&b));
        assert!(!key_hash(&a).contains(&a[KEY_PREFIX.len()..]));
    }

    #[test]
    fn bearer_parsing() {
        assert_eq!(bearer("Bearer abc"), Some("abc"));
        assert_eq!(bearer("bearer  abc "), Some("abc"));
        assert_eq!(bearer("Basic abc"), None);
        assert_eq!(bearer("Bearer "), None);
        assert_eq!(bearer("Bearerabc"), None);
    }
}
