//! Administrative state changes — principals, keys, certificates, grants —
//! each made in the same transaction as the ledger entry that records it:
//! a crash leaves both or neither. The CLI, the test harness and (later)
//! the HTTP front door all come through here.

use crate::auth;
use crate::catalog::Manifest;
use crate::ledger::event::LedgerEvent;
use crate::ledger::{LedgerError, Writer};
use crate::policy::Policies;
use crate::store::{self, Grant, NewGrant, Principal, Role};
use rusqlite::Connection;
use std::path::Path;

/// The writer admin changes go through, on a data directory whose store
/// and ledger tables exist.
pub fn open(data_dir: &Path) -> Result<Writer, LedgerError> {
    store::Store::open(data_dir)?;
    Writer::open(data_dir)
}

/// Adds a principal with a fresh API key; returns the key (shown once).
pub fn add_principal(writer: &mut Writer, principal: &Principal) -> Result<String, LedgerError> {
    let key = auth::generate_key();
    let hash = auth::key_hash(&key);
    writer.commit(|tx| principal_added(tx, principal, &hash))?;
    Ok(key)
}

/// The state change of [`add_principal`], for any writer of the ledger.
pub fn principal_added(
    tx: &Connection,
    principal: &Principal,
    key_hash: &str,
) -> Result<(Vec<LedgerEvent>, ()), LedgerError> {
    store::add_principal(tx, principal, key_hash)?;
    let event = LedgerEvent::PrincipalAdded {
        principal: principal.clone(),
    };
    Ok((vec![event], ()))
}

/// Gives a principal a second key, for rotation; returns it (shown once).
pub fn add_key(writer: &mut Writer, principal: &str) -> Result<String, LedgerError> {
    let key = auth::generate_key();
    let hash = auth::key_hash(&key);
    writer.commit(|tx| key_added(tx, principal, &hash))?;
    Ok(key)
}

pub fn key_added(
    tx: &Connection,
    principal: &str,
    key_hash: &str,
) -> Result<(Vec<LedgerEvent>, ()), LedgerError> {
    store::add_key(tx, principal, key_hash)?;
    let event = LedgerEvent::KeyAdded {
        principal: principal.to_string(),
        key_hash_prefix: key_hash[..12].to_string(),
    };
    Ok((vec![event], ()))
}

/// Revokes a key (given as the key itself); returns whose it was.
pub fn revoke_key(writer: &mut Writer, key: &str) -> Result<String, LedgerError> {
    let hash = auth::key_hash(key);
    let (_, principal) = writer.commit(|tx| key_revoked(tx, &hash))?;
    Ok(principal)
}

/// Revokes the key with this hash; returns whose it was.
pub fn key_revoked(
    tx: &Connection,
    key_hash: &str,
) -> Result<(Vec<LedgerEvent>, String), LedgerError> {
    let principal = store::revoke_key(tx, key_hash)?;
    let event = LedgerEvent::KeyRevoked {
        principal: principal.clone(),
        key_hash_prefix: key_hash[..12].to_string(),
    };
    Ok((vec![event], principal))
}

/// Measures `dataset`'s bound on rows per privacy unit from the data with
/// differential privacy: the DP `quantile` of `rows_per_unit` (one count per
/// person) among 1..=`max`, at `epsilon`, charged to the dataset's lifetime
/// budget (`lifetime`) in the transaction that records it — refused when
/// the budget cannot pay. Returns the bound, for the owner's manifest.
pub fn measure_rows_per_unit(
    writer: &mut Writer,
    dataset: &str,
    rows_per_unit: &[u64],
    lifetime: f64,
    (quantile, epsilon, max): (f64, f64, u64),
) -> Result<u64, LedgerError> {
    let budget = format!("dataset:{dataset}");
    let (_, bound) = writer.commit(|tx| {
        let spent = crate::ledger::tables::epsilon_spent(tx, &budget)?;
        if spent + epsilon > lifetime {
            return Err(store::StoreError::Conflict(format!(
                "the lifetime budget of {budget} has {} epsilon left; measuring needs {epsilon}",
                (lifetime - spent).max(0.0)
            ))
            .into());
        }
        let bound = crate::release::quantile::dp_quantile(rows_per_unit, quantile, epsilon, max);
        let event = LedgerEvent::BoundMeasured {
            dataset: dataset.to_string(),
            measure: "rows_per_unit".into(),
            quantile,
            epsilon,
            bound,
        };
        Ok((vec![event], bound))
    })?;
    Ok(bound)
}

/// Binds a principal to a client certificate's public key.
pub fn bind_cert(
    writer: &mut Writer,
    principal: &str,
    spki_sha256: &str,
) -> Result<(), LedgerError> {
    writer.commit(|tx| {
        store::bind_cert(tx, principal, spki_sha256)?;
        let event = LedgerEvent::CertificateBound {
            principal: principal.to_string(),
            spki_sha256: spki_sha256.to_string(),
        };
        Ok((vec![event], ()))
    })?;
    Ok(())
}

/// Why a grant may not be made, before anything is written.
pub fn check_grant(
    grant: &NewGrant,
    policies: &Policies,
    manifests: &[Manifest],
) -> Result<(), String> {
    policies
        .check_purpose(&grant.purpose)
        .map_err(|r| r.message)?;
    for d in &grant.datasets {
        let m = manifests
            .iter()
            .find(|m| &m.id == d)
            .ok_or_else(|| format!("no dataset '{d}' in the catalog"))?;
        if !policies.levels.rule(m.level).external_buyers {
            return Err(format!(
                "dataset '{d}' is {} data; no external buyer may be granted it",
                m.level.as_str()
            ));
        }
    }
    Ok(())
}

/// Makes a grant; returns it as stored.
pub fn add_grant(writer: &mut Writer, grant: &NewGrant) -> Result<Grant, LedgerError> {
    let (_, made) = writer.commit(|tx| {
        let made = store::add_grant(tx, grant)?;
        Ok((
            vec![LedgerEvent::GrantMade {
                grant: made.clone(),
            }],
            made,
        ))
    })?;
    Ok(made)
}

pub fn revoke_grant(writer: &mut Writer, id: &str) -> Result<(), LedgerError> {
    writer.commit(|tx| {
        store::revoke_grant(tx, id)?;
        Ok((
            vec![LedgerEvent::GrantRevoked {
                grant: id.to_string(),
            }],
            (),
        ))
    })?;
    Ok(())
}

/// Demo principals and their keys, made on a first start with no principals.
pub struct DemoKeys {
    pub keys: Vec<(String, Role, String)>,
}

/// Creates one owner per dataset owner, a buyer with a grant on every
/// dataset external buyers may use, and an auditor; returns their keys.
pub fn bootstrap_demo(
    writer: &mut Writer,
    manifests: &[Manifest],
    policies: &Policies,
) -> Result<DemoKeys, LedgerError> {
    let mut keys = Vec::new();
    let mut owners: Vec<&str> = manifests.iter().map(|m| m.owner.as_str()).collect();
    owners.sort();
    owners.dedup();
    let mut people: Vec<(String, Role, &str)> = owners
        .iter()
        .map(|o| (format!("owner:{o}"), Role::Owner, *o))
        .collect();
    people.push(("buyer:demo".into(), Role::Buyer, "demo"));
    people.push(("auditor:demo".into(), Role::Auditor, "regulator"));
    for (id, role, org) in people {
        let principal = Principal {
            id: id.clone(),
            role,
            org: Some(org.to_string()),
            region: "CN".into(),
        };
        keys.push((id, role, add_principal(writer, &principal)?));
    }
    let mut datasets: Vec<String> = manifests
        .iter()
        .filter(|m| policies.levels.rule(m.level).external_buyers)
        .map(|m| m.id.clone())
        .collect();
    datasets.sort();
    add_grant(
        writer,
        &NewGrant {
            buyer: "buyer:demo".into(),
            datasets,
            purpose: "public_health_research".into(),
            queries_per_day: Some(10_000),
            epsilon: Some(10.0),
            ..NewGrant::default()
        },
    )?;
    Ok(DemoKeys { keys })
}

/// Writes the demo keys to a file only the owner can read.
pub fn write_keys_file(path: &Path, keys: &DemoKeys) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    writeln!(
        file,
        "# Frostglass DEMO API keys. Shown once; only their hashes are stored."
    )?;
    for (id, role, key) in &keys.keys {
        writeln!(file, "{id}\t{}\t{key}", role.as_str())?;
    }
    file.sync_all()
}
