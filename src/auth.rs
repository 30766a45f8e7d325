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
    crate::util::sha256_hex(key.as_bytes())
}

/// SHA-256 (hex) of a certificate's SubjectPublicKeyInfo: what a principal is
/// bound to, so that reissuing a certificate for the same key keeps the binding.
pub fn spki_sha256(cert_der: &[u8]) -> Option<String> {
    let der = rustls::pki_types::CertificateDer::from(cert_der);
    let cert = webpki::EndEntityCert::try_from(&der).ok()?;
    Some(crate::util::sha256_hex(
        cert.subject_public_key_info().as_ref(),
    ))
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
}
