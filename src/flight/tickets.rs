//! What a Flight SQL client holds between calls: tickets (one statement to
//! run, once, by the principal it was issued to, before it expires) and
//! prepared statements (a statement kept for its principal until closed or
//! idle too long). Both live in memory; a restart ends them, and clients
//! prepare again.

use ring::rand::{SecureRandom, SystemRandom};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long a ticket may wait for its `DoGet`.
pub const TICKET_TTL: Duration = Duration::from_secs(300);
/// How long a prepared statement lives without use.
pub const PREPARED_TTL: Duration = Duration::from_secs(3600);
/// Most tickets and prepared statements held at once, per principal.
const PER_PRINCIPAL: usize = 256;

struct Held<T> {
    principal: String,
    statement: T,
    expires: Instant,
}

/// Handles to statements, bound to principals.
pub struct Handles<T> {
    held: Mutex<HashMap<String, Held<T>>>,
    ttl: Duration,
    rng: SystemRandom,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Refused {
    /// Unknown, used, expired, or another principal's: the same answer for
    /// all, so a handle's existence is not revealed to others.
    Unknown,
    TooMany,
}

impl<T> Handles<T> {
    pub fn new(ttl: Duration) -> Handles<T> {
        Handles {
            held: Mutex::default(),
            ttl,
            rng: SystemRandom::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Held<T>>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Keeps `statement` for `principal`; the handle names it.
    pub fn issue(&self, principal: &str, statement: T) -> Result<String, Refused> {
        let mut bytes = [0u8; 24];
        self.rng.fill(&mut bytes).map_err(|_| Refused::TooMany)?;
        let handle = hex::encode(bytes);
        let now = Instant::now();
        let mut held = self.lock();
        held.retain(|_, h| h.expires > now);
        if held.values().filter(|h| h.principal == principal).count() >= PER_PRINCIPAL {
            return Err(Refused::TooMany);
        }
        held.insert(
            handle.clone(),
            Held {
                principal: principal.to_string(),
                statement,
                expires: now + self.ttl,
            },
        );
        Ok(handle)
    }

    /// The statement behind `handle`, removed: a ticket is used once.
    pub fn take(&self, principal: &str, handle: &str) -> Result<T, Refused> {
        let mut held = self.lock();
        // What expired goes now, not at the next issue: a ticket's decision
        // holds quota, budget and perhaps a running execution.
        let now = Instant::now();
        held.retain(|_, h| h.expires > now);
        match held.get(handle) {
            Some(h) if h.principal == principal => {}
            _ => return Err(Refused::Unknown),
        }
        held.remove(handle)
            .map(|h| h.statement)
            .ok_or(Refused::Unknown)
    }

    /// The statement behind `handle`, kept (and its life renewed).
    pub fn get(&self, principal: &str, handle: &str) -> Result<T, Refused>
    where
        T: Clone,
    {
        let mut held = self.lock();
        let now = Instant::now();
        match held.get_mut(handle) {
            Some(h) if h.principal == principal && h.expires > now => {
                h.expires = now + self.ttl;
                Ok(h.statement.clone())
            }
            _ => Err(Refused::Unknown),
        }
    }

    pub fn close(&self, principal: &str, handle: &str) -> Result<(), Refused> {
        self.take(principal, handle).map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::Request;

    fn request() -> Request {
        Request {
            sql: "SELECT 1".into(),
            grant: None,
            purpose: None,
            dry_run: false,
            run_ahead: false,
            dp: Default::default(),
        }
    }

    #[test]
    fn a_ticket_is_used_once_by_its_principal_only() {
        let tickets: Handles<Request> = Handles::new(TICKET_TTL);
        let t = tickets.issue("buyer:a", request()).unwrap();
        assert_eq!(tickets.take("buyer:b", &t).unwrap_err(), Refused::Unknown);
        assert_eq!(tickets.take("buyer:a", &t).unwrap().sql, "SELECT 1");
        assert_eq!(tickets.take("buyer:a", &t).unwrap_err(), Refused::Unknown);
    }

    #[test]
    fn handles_expire_and_are_capped_per_principal() {
        let expired: Handles<Request> = Handles::new(Duration::ZERO);
        let t = expired.issue("buyer:a", request()).unwrap();
        assert_eq!(expired.take("buyer:a", &t).unwrap_err(), Refused::Unknown);
        let prepared: Handles<Request> = Handles::new(PREPARED_TTL);
        for _ in 0..PER_PRINCIPAL {
            prepared.issue("buyer:a", request()).unwrap();
        }
        assert_eq!(
            prepared.issue("buyer:a", request()).unwrap_err(),
            Refused::TooMany
        );
        let other = prepared.issue("buyer:b", request()).unwrap();
        assert!(prepared.get("buyer:b", &other).is_ok());
        assert!(prepared.get("buyer:b", &other).is_ok(), "get keeps it");
        prepared.close("buyer:b", &other).unwrap();
        assert!(prepared.get("buyer:b", &other).is_err());
    }
}
