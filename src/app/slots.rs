//! Query slots shared fairly between principals. A slot that frees goes to
//! the waiting principal with the fewest queries running — one with none
//! running first — and among equals to the one served least recently (one
//! never served first), then to the earliest of its queries. So one buyer's
//! flood of heavy queries fills the slots only while nobody else waits: the
//! next slot that frees goes to the other buyer's query.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

pub struct Slots {
    state: Mutex<State>,
}

struct State {
    free: usize,
    running: HashMap<String, usize>,
    waiting: VecDeque<Waiter>,
    /// When each principal was last given a slot (a count of grants).
    served: HashMap<String, u64>,
    grants: u64,
}

impl State {
    fn grant(&mut self, principal: &str) {
        *self.running.entry(principal.to_string()).or_default() += 1;
        self.grants += 1;
        self.served.insert(principal.to_string(), self.grants);
    }
}

struct Waiter {
    principal: String,
    hand: tokio::sync::oneshot::Sender<Slot>,
}

/// A slot held: released (to the next waiter by the rule above) when dropped.
pub struct Slot {
    slots: Arc<Slots>,
    principal: String,
}

impl Slots {
    pub fn new(total: usize) -> Arc<Slots> {
        Arc::new(Slots {
            state: Mutex::new(State {
                free: total,
                running: HashMap::new(),
                waiting: VecDeque::new(),
                served: HashMap::new(),
                grants: 0,
            }),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Slots not taken (what background work yields to).
    pub fn available(&self) -> usize {
        self.lock().free
    }

    /// A slot for `principal`: at once if one is free and nobody waits,
    /// else when the rule gives it one. Dropping the future gives up its
    /// place (a slot handed to it meanwhile goes on to the next).
    pub async fn acquire(self: &Arc<Self>, principal: &str) -> Slot {
        let taken = {
            let mut state = self.lock();
            if state.free > 0 && state.waiting.is_empty() {
                state.free -= 1;
                state.grant(principal);
                None
            } else {
                let (hand, slot) = tokio::sync::oneshot::channel();
                state.waiting.push_back(Waiter {
                    principal: principal.to_string(),
                    hand,
                });
                Some(slot)
            }
        };
        match taken {
            None => Slot {
                slots: self.clone(),
                principal: principal.to_string(),
            },
            // The sender lives in the queue until a slot is handed over.
            Some(slot) => match slot.await {
                Ok(slot) => slot,
                Err(_) => {
                    unreachable!("a waiter is removed from the queue only to be handed a slot")
                }
            },
        }
    }

    /// Gives a freed slot to the next waiter by the rule, or back to the pool.
    fn release(self: &Arc<Self>, principal: &str) {
        let mut state = self.lock();
        if let Some(n) = state.running.get_mut(principal) {
            *n -= 1;
            if *n == 0 {
                state.running.remove(principal);
            }
        }
        loop {
            // Fewest running, then least recently served; the queue order
            // breaks ties (min_by_key keeps the first of equals).
            let next = state
                .waiting
                .iter()
                .enumerate()
                .min_by_key(|(_, w)| {
                    (
                        state.running.get(&w.principal).copied().unwrap_or(0),
                        state.served.get(&w.principal).copied().unwrap_or(0),
                    )
                })
                .map(|(i, _)| i);
            let Some(waiter) = next.and_then(|i| state.waiting.remove(i)) else {
                state.free += 1;
                return;
            };
            state.grant(&waiter.principal);
            let slot = Slot {
                slots: self.clone(),
                principal: waiter.principal.clone(),
            };
            match waiter.hand.send(slot) {
                Ok(()) => return,
                // It gave up waiting: undo and try the next. (The slot comes
                // back here; its drop must not release again.)
                Err(mut unclaimed) => {
                    unclaimed.principal.clear();
                    let n = state.running.entry(waiter.principal).or_default();
                    *n -= 1;
                    state.running.retain(|_, n| *n > 0);
                }
            }
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        // An unclaimed slot (emptied above) was never counted as released.
        if !self.principal.is_empty() {
            let principal = std::mem::take(&mut self.principal);
            self.slots.release(&principal);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Starts a waiter for `principal` that records the order slots come in.
    fn wait(
        slots: &Arc<Slots>,
        principal: &'static str,
        order: &Arc<Mutex<Vec<&'static str>>>,
    ) -> tokio::task::JoinHandle<Slot> {
        let (slots, order) = (slots.clone(), order.clone());
        tokio::spawn(async move {
            let slot = slots.acquire(principal).await;
            order.lock().unwrap().push(principal);
            slot
        })
    }

    async fn settle() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    #[tokio::test]
    async fn a_principal_with_nothing_running_goes_before_a_flood() {
        let slots = Slots::new(2);
        let order = Arc::new(Mutex::new(Vec::new()));
        let a1 = slots.acquire("a").await;
        let a2 = slots.acquire("a").await;
        assert_eq!(slots.available(), 0);
        // a floods the queue first, then b asks once.
        let queued: Vec<_> = (0..3).map(|_| wait(&slots, "a", &order)).collect();
        settle().await;
        let b = wait(&slots, "b", &order);
        settle().await;
        drop(a1);
        settle().await;
        assert_eq!(*order.lock().unwrap(), ["b"], "b had nothing running");
        drop(a2);
        settle().await;
        assert_eq!(*order.lock().unwrap(), ["b", "a"]);
        drop(b.await.unwrap());
        for q in queued {
            drop(q.await.unwrap());
        }
        assert_eq!(slots.available(), 2, "every slot comes back");
    }

    #[tokio::test]
    async fn among_principals_with_nothing_running_the_least_recently_served_goes_first() {
        let slots = Slots::new(1);
        let order = Arc::new(Mutex::new(Vec::new()));
        let held = slots.acquire("a").await;
        let a = wait(&slots, "a", &order);
        settle().await;
        let b = wait(&slots, "b", &order);
        settle().await;
        drop(held);
        drop(b.await.unwrap());
        drop(a.await.unwrap());
        assert_eq!(
            *order.lock().unwrap(),
            ["b", "a"],
            "a queued first but was just served"
        );
    }

    #[tokio::test]
    async fn a_waiter_that_gives_up_does_not_keep_a_slot() {
        let slots = Slots::new(1);
        let held = slots.acquire("a").await;
        let gave_up = tokio::time::timeout(Duration::from_millis(10), slots.acquire("b")).await;
        assert!(gave_up.is_err());
        let order = Arc::new(Mutex::new(Vec::new()));
        let c = wait(&slots, "c", &order);
        settle().await;
        drop(held);
        drop(c.await.unwrap());
        assert_eq!(*order.lock().unwrap(), ["c"]);
        assert_eq!(slots.available(), 1);
    }
}
