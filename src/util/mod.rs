//! Small helpers every layer may use: ids, timestamps, hashing, a seeded
//! generator for synthetic data. Depends on nothing else in the crate.

mod rng;

pub use rng::Rng;

/// One partition per core: the engine plans queries for this many, and a
/// dataset's copy clustered by person is cut into as many.
pub fn query_partitions() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get())
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref())
}

/// The SHA-256 of a file, read in chunks (archive segments run to gigabytes).
pub fn file_sha256_hex(path: &std::path::Path) -> std::io::Result<String> {
    use std::io::Read;
    let mut file = std::fs::File::open(path)?;
    let mut context = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buffer)?;
        if n == 0 {
            return Ok(hex::encode(context.finish().as_ref()));
        }
        context.update(&buffer[..n]);
    }
}

/// Writes a new secret file readable by its owner only (0600), durably;
/// refuses to overwrite one.
pub fn write_secret(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

pub fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// The UTC day of an RFC 3339 timestamp (`2026-11-30`), what daily quotas count by.
pub fn day_of(timestamp: &str) -> &str {
    timestamp.get(..10).unwrap_or(timestamp)
}

/// Today, UTC, as `YYYY-MM-DD`.
pub fn today() -> String {
    chrono::Utc::now().date_naive().to_string()
}

/// A short random id with a readable prefix, e.g. `g_3fa9c2d1e0b4a7c5`.
pub fn new_id(prefix: &str) -> String {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 8];
    // SystemRandom only fails if the OS has no entropy source; ids would then collide.
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .expect("OS random source available");
    format!("{prefix}_{}", hex::encode(bytes))
}

pub mod sql;

/// A crash injected where a test asks for it: when `FROSTGLASS_FAILPOINT`
/// names this point, the process aborts here (no destructor, no rollback
/// code runs, as in a power cut). Tests use it to show that a state change
/// and its ledger entry commit together or not at all.
pub fn failpoint(name: &str) {
    if std::env::var_os("FROSTGLASS_FAILPOINT").is_some_and(|v| v == name) {
        std::process::abort();
    }
}
