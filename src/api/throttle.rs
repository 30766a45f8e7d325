//! Per-principal request rate (a token bucket) and concurrent queries, so
//! that one buyer cannot starve the others.

use super::error::ApiError;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

#[derive(Default)]
pub struct Throttle {
    buckets: Mutex<HashMap<String, (f64, Instant)>>,
    running: Arc<Mutex<HashMap<String, usize>>>,
}

/// A running query of one principal; frees its place on drop.
pub struct Running {
    running: Arc<Mutex<HashMap<String, usize>>>,
    principal: String,
}

impl Drop for Running {
    fn drop(&mut self) {
        let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = running.get_mut(&self.principal) {
            *n = n.saturating_sub(1);
        }
    }
}

impl Throttle {
    /// Takes one token from the principal's bucket of `burst` tokens refilled at `per_second`.
    pub fn admit(&self, principal: &str, per_second: f64, burst: f64) -> Result<(), ApiError> {
        let now = Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let (tokens, at) = buckets.entry(principal.to_string()).or_insert((burst, now));
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * per_second).min(burst);
        *at = now;
        if *tokens < 1.0 {
            return Err(ApiError::RateLimited(format!(
                "more than {per_second} requests per second"
            )));
        }
        *tokens -= 1.0;
        Ok(())
    }

    /// Counts a query of the principal as running, if it has fewer than `max` running.
    pub fn start(&self, principal: &str, max: usize) -> Result<Running, ApiError> {
        let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        let n = running.entry(principal.to_string()).or_insert(0);
        if *n >= max {
            return Err(ApiError::RateLimited(format!(
                "at most {max} queries may run at once per principal"
            )));
        }
        *n += 1;
        Ok(Running {
            running: self.running.clone(),
            principal: principal.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_refill_and_running_queries_are_counted() {
        let t = Throttle::default();
        assert!(t.admit("a", 0.001, 2.0).is_ok());
        assert!(t.admit("a", 0.001, 2.0).is_ok());
        assert!(t.admit("a", 0.001, 2.0).is_err());
        assert!(
            t.admit("b", 0.001, 2.0).is_ok(),
            "buckets are per principal"
        );
        let first = t.start("a", 1).unwrap();
        assert!(t.start("a", 1).is_err());
        drop(first);
        assert!(t.start("a", 1).is_ok());
    }
}
