//! Where an owner's data may live (its domain root) and what the data is
//! (a digest of its bytes). An owner registers only data inside its own
//! root: checked after every symlink and `..` is resolved, for the
//! location and for every file under it.

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum LocationError {
    /// Nothing at the location (the owner's mistake, not an attack).
    #[error("no data at the source location")]
    Missing,
    #[error("{0}")]
    Outside(String),
    #[error("{0}")]
    Unsupported(String),
}

/// The domain root of organisation `org`: configured, or `<data_dir>/owners/<org>`.
pub fn owner_root(
    roots: &BTreeMap<String, String>,
    data_dir: &Path,
    org: &str,
) -> Result<PathBuf, LocationError> {
    if let Some(root) = roots.get(org) {
        if root.contains("://") {
            return Err(LocationError::Unsupported(format!(
                "the domain root of '{org}' is an object-store prefix; only folders are supported so far"
            )));
        }
        return Ok(PathBuf::from(root));
    }
    let safe = !org.is_empty()
        && org != "."
        && org != ".."
        && org
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
    if !safe {
        return Err(LocationError::Outside(format!(
            "organisation '{org}' has no domain root"
        )));
    }
    Ok(data_dir.join("owners").join(org))
}

/// `location` resolved (symlinks, `..`), when it and everything under it
/// lies inside `root`. A location spelled with `..` is refused before
/// resolving: an owner names its data, it does not climb to it.
pub fn inside_root(root: &Path, location: &Path) -> Result<PathBuf, LocationError> {
    let outside =
        || LocationError::Outside("the source location is outside the owner's domain root".into());
    if location.components().any(|c| c == Component::ParentDir) {
        return Err(outside());
    }
    let root = root.canonicalize().map_err(|_| {
        LocationError::Outside("the owner's domain root does not exist on this server".into())
    })?;
    let resolved = location
        .canonicalize()
        .map_err(|_| LocationError::Missing)?;
    if !resolved.starts_with(&root) {
        return Err(outside());
    }
    for file in files_under(&resolved) {
        // A symlink inside the folder may point anywhere.
        let target = file.canonicalize().map_err(|_| LocationError::Missing)?;
        if !target.starts_with(&root) {
            return Err(outside());
        }
    }
    Ok(resolved)
}

/// Every file under `path` (itself, if it is a file), sorted.
fn files_under(path: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut stack = vec![path.to_path_buf()];
    while let Some(p) = stack.pop() {
        if p.is_dir() {
            if let Ok(entries) = std::fs::read_dir(&p) {
                stack.extend(entries.filter_map(|e| e.ok().map(|e| e.path())));
            }
        } else {
            files.push(p);
        }
    }
    files.sort();
    files
}

/// SHA-256 over every file's path (relative to `path`) and contents: what
/// the ledger records as the version of the data.
pub fn data_sha256(path: &Path) -> std::io::Result<String> {
    let mut listing = String::new();
    for file in files_under(path) {
        let name = file.strip_prefix(path).unwrap_or(&file);
        let digest = crate::util::file_sha256_hex(&file)?;
        listing.push_str(&format!("{}\0{digest}\n", name.display()));
    }
    Ok(crate::util::sha256_hex(listing.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_outside_the_root_is_refused_however_it_is_reached() {
        let base = tempfile::tempdir().unwrap();
        let root = base.path().join("owners/hospital");
        let elsewhere = base.path().join("owners/bank");
        std::fs::create_dir_all(root.join("visits")).unwrap();
        std::fs::create_dir_all(&elsewhere).unwrap();
        std::fs::write(root.join("visits/a.parquet"), b"a").unwrap();
        std::fs::write(elsewhere.join("b.parquet"), b"b").unwrap();
        assert!(inside_root(&root, &root.join("visits")).is_ok());
        assert!(inside_root(&root, &root.join("visits/a.parquet")).is_ok());
        for escape in [
            root.join("../bank/b.parquet"),
            root.join("visits/../../bank/b.parquet"),
            elsewhere.join("b.parquet"),
        ] {
            let e = inside_root(&root, &escape).unwrap_err();
            assert!(matches!(e, LocationError::Outside(_)), "{escape:?}");
        }
        // A symlink to the location, and a symlink inside a folder.
        std::os::unix::fs::symlink(elsewhere.join("b.parquet"), root.join("link.parquet")).unwrap();
        assert!(matches!(
            inside_root(&root, &root.join("link.parquet")),
            Err(LocationError::Outside(_))
        ));
        std::os::unix::fs::symlink(elsewhere.join("b.parquet"), root.join("visits/c.parquet"))
            .unwrap();
        assert!(matches!(
            inside_root(&root, &root.join("visits")),
            Err(LocationError::Outside(_))
        ));
        assert!(matches!(
            inside_root(&root, &root.join("nothing.parquet")),
            Err(LocationError::Missing)
        ));
    }

    #[test]
    fn roots_are_configured_or_under_the_data_dir_for_safe_names() {
        let roots = BTreeMap::from([("bank".to_string(), "/srv/bank".to_string())]);
        let data = Path::new("/var/fg");
        assert_eq!(
            owner_root(&roots, data, "bank").unwrap(),
            PathBuf::from("/srv/bank")
        );
        assert_eq!(
            owner_root(&roots, data, "hospital").unwrap(),
            PathBuf::from("/var/fg/owners/hospital")
        );
        assert!(owner_root(&roots, data, "..").is_err());
        assert!(owner_root(&roots, data, "a/b").is_err());
        let s3 = BTreeMap::from([("bank".to_string(), "s3://bucket/bank".to_string())]);
        assert!(matches!(
            owner_root(&s3, data, "bank"),
            Err(LocationError::Unsupported(_))
        ));
    }

    #[test]
    fn the_data_digest_changes_with_any_byte_or_name() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a"), b"1").unwrap();
        let first = data_sha256(dir.path()).unwrap();
        std::fs::write(dir.path().join("a"), b"2").unwrap();
        let second = data_sha256(dir.path()).unwrap();
        std::fs::rename(dir.path().join("a"), dir.path().join("b")).unwrap();
        let third = data_sha256(dir.path()).unwrap();
        assert!(first != second && second != third && first != third);
    }
}
