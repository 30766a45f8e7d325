//! Console sign-in sessions, kept on the server: the browser holds only a
//! random session id in an HttpOnly cookie. A session remembers the hash of
//! the API key it was opened with, so every request is authorised exactly
//! like one that sent the key (a rotated or removed key ends its sessions),
//! and a CSRF token that every state change must echo in a header.

use crate::config::ConsoleSettings;
use ring::rand::{SecureRandom, SystemRandom};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The cookie that carries the session id.
pub const COOKIE: &str = "fg_session";
/// The header a state change sends its session's CSRF token in.
pub const CSRF_HEADER: &str = "X-CSRF-Token";
/// Sessions one API key may hold at once; signing in again beyond it ends the oldest.
const PER_KEY: usize = 16;

#[derive(Clone, Debug)]
pub struct Session {
    pub key_hash: String,
    pub csrf: String,
    opened: Instant,
    last_seen: Instant,
}

pub struct Sessions {
    /// By SHA-256 of the session id: the ids themselves are never kept.
    open: Mutex<HashMap<String, Session>>,
    idle: Duration,
    lifetime: Duration,
    max: usize,
    rng: SystemRandom,
}

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("too many console sessions are open; try again later")]
    Full,
    #[error("no randomness for a session id")]
    Random,
}

fn token(rng: &SystemRandom) -> Result<String, SessionError> {
    let mut bytes = [0u8; 32];
    rng.fill(&mut bytes).map_err(|_| SessionError::Random)?;
    Ok(hex::encode(bytes))
}

impl Sessions {
    pub fn new(settings: &ConsoleSettings) -> Sessions {
        Sessions {
            open: Mutex::default(),
            idle: Duration::from_secs(settings.session_idle_s),
            lifetime: Duration::from_secs(settings.session_max_s),
            max: settings.max_sessions,
            rng: SystemRandom::new(),
        }
    }

    pub fn max_age(&self) -> Duration {
        self.lifetime
    }

    fn live(&self, s: &Session, now: Instant) -> bool {
        now.duration_since(s.last_seen) < self.idle && now.duration_since(s.opened) < self.lifetime
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Session>> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Opens a session for the key with hash `key_hash`: (session id, CSRF token).
    pub fn open(&self, key_hash: String) -> Result<(String, Session), SessionError> {
        let id = token(&self.rng)?;
        let now = Instant::now();
        let session = Session {
            key_hash,
            csrf: token(&self.rng)?,
            opened: now,
            last_seen: now,
        };
        let mut open = self.lock();
        open.retain(|_, s| self.live(s, now));
        let mut of_key: Vec<(String, Instant)> = open
            .iter()
            .filter(|(_, s)| s.key_hash == session.key_hash)
            .map(|(k, s)| (k.clone(), s.opened))
            .collect();
        if of_key.len() >= PER_KEY {
            of_key.sort_by_key(|(_, opened)| *opened);
            for (k, _) in &of_key[..=of_key.len() - PER_KEY] {
                open.remove(k);
            }
        }
        if open.len() >= self.max {
            return Err(SessionError::Full);
        }
        open.insert(crate::util::sha256_hex(id.as_bytes()), session.clone());
        Ok((id, session))
    }

    /// The live session with id `id`, marked as seen now.
    pub fn find(&self, id: &str) -> Option<Session> {
        let key = crate::util::sha256_hex(id.as_bytes());
        let now = Instant::now();
        let mut open = self.lock();
        let live = open.get(&key).is_some_and(|s| self.live(s, now));
        if !live {
            open.remove(&key);
            return None;
        }
        let session = open.get_mut(&key)?;
        session.last_seen = now;
        Some(session.clone())
    }

    pub fn close(&self, id: &str) {
        self.lock().remove(&crate::util::sha256_hex(id.as_bytes()));
    }
}

impl Session {
    /// Whether `sent` is this session's CSRF token (compared as digests, so
    /// the comparison's time says nothing about the token).
    pub fn csrf_matches(&self, sent: &str) -> bool {
        crate::util::sha256_hex(sent.as_bytes()) == crate::util::sha256_hex(self.csrf.as_bytes())
    }
}

/// The session id in a `Cookie` header, if any.
pub fn id_in(cookie_header: &str) -> Option<&str> {
    cookie_header
        .split(';')
        .filter_map(|c| c.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value.trim_matches('"'))
        .filter(|v| v.len() == 64 && v.bytes().all(|b| b.is_ascii_hexdigit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(idle_s: u64, max_s: u64, max: usize) -> ConsoleSettings {
        ConsoleSettings {
            session_idle_s: idle_s,
            session_max_s: max_s,
            max_sessions: max,
        }
    }

    #[test]
    fn a_session_is_found_by_its_id_only_until_closed() {
        let sessions = Sessions::new(&settings(60, 60, 10));
        let (id, s) = sessions.open("k".into()).unwrap();
        assert_eq!(sessions.find(&id).unwrap().key_hash, "k");
        assert!(s.csrf_matches(&s.csrf) && !s.csrf_matches(&id));
        assert!(
            sessions
                .find(&token(&SystemRandom::new()).unwrap())
                .is_none()
        );
        sessions.close(&id);
        assert!(sessions.find(&id).is_none());
    }

    #[test]
    fn sessions_expire_and_are_capped() {
        let expired = Sessions::new(&settings(0, 60, 10));
        let (id, _) = expired.open("k".into()).unwrap();
        assert!(
            expired.find(&id).is_none(),
            "an idle timeout of 0 ends it at once"
        );
        let small = Sessions::new(&settings(60, 60, 2));
        small.open("a".into()).unwrap();
        small.open("b".into()).unwrap();
        assert!(matches!(small.open("c".into()), Err(SessionError::Full)));
        // One key signing in again and again ends its own oldest sessions only.
        let per_key = Sessions::new(&settings(60, 60, 100));
        let (first, _) = per_key.open("k".into()).unwrap();
        for _ in 0..PER_KEY {
            per_key.open("k".into()).unwrap();
        }
        assert!(per_key.find(&first).is_none());
        assert_eq!(per_key.lock().len(), PER_KEY);
    }

    #[test]
    fn the_cookie_header_is_parsed_strictly() {
        let id = "a".repeat(64);
        assert_eq!(id_in(&format!("x=1; {COOKIE}={id}")), Some(id.as_str()));
        assert_eq!(id_in(&format!("{COOKIE}=short")), None);
        assert_eq!(id_in("other=1"), None);
    }
}
