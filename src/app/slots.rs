//! Query slots shared fairly between principals. A slot that frees goes to
//! the waiting principal with the fewest queries running per unit of its
//! weight — one with none running first — and among equals to the one
//! served least recently (one never served first), then to the earliest of
//! its queries. A principal of weight 3 thus runs three queries to another's
//! one while both keep the slots busy. So one buyer's
//! flood of heavy queries fills the slots only while nobody else waits: the
//! next slot that frees goes to the other buyer's query. And no principal
//! holds every slot: one is always left for somebody else, so another
//! buyer's small query starts at once beside a flood of heavy ones.
//!
//! Each slot is a lane, numbered below the total: a query runs on its
//! lane's own threads (`app::Sandbox::lane`), so no two running queries
//! ever share a lane.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

pub struct Slots {
    state: Mutex<State>,
    /// Most slots one principal holds: all but one (of two or more).
    per_principal: usize,
}

struct State {
    /// The lanes of the slots not taken.
    free: Vec<usize>,
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
    /// At least 1.
    weight: u32,
    hand: tokio::sync::oneshot::Sender<Slot>,
}

/// A slot held: released (to the next waiter by the rule above) when dropped.
pub struct Slot {
    slots: Arc<Slots>,
    principal: String,
    lane: usize,
}

impl Slot {
    /// Which of the slots this is: no other slot held has the same lane.
    pub fn lane(&self) -> usize {
        self.lane
    }
}

impl Slots {
    pub fn new(total: usize) -> Arc<Slots> {
        Arc::new(Slots {
            per_principal: total.saturating_sub(1).max(1),
            state: Mutex::new(State {
                free: (0..total).rev().collect(),
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
        self.lock().free.len()
    }

    /// A slot for `principal` of `weight`, when the rule gives it one (at
    /// once if one is free and nobody comes before it). Dropping the future
    /// gives up its place (a slot handed to it meanwhile goes on to the next).
    pub async fn acquire(self: &Arc<Self>, principal: &str, weight: u32) -> Slot {
        let (hand, slot) = tokio::sync::oneshot::channel();
        {
            let mut state = self.lock();
            state.waiting.push_back(Waiter {
                principal: principal.to_string(),
                weight: weight.max(1),
                hand,
            });
            self.dispatch(&mut state);
        }
        match slot.await {
            Ok(slot) => slot,
            Err(_) => unreachable!("a waiter leaves the queue only to be handed a slot"),
        }
    }

    /// A slot for `principal` only if none is taken and nobody waits:
    /// work that may be done ahead uses idle capacity only, never queues,
    /// and never slows anybody's query down.
    pub fn acquire_if_idle(self: &Arc<Self>, principal: &str) -> Option<Slot> {
        let mut state = self.lock();
        if !state.running.is_empty() || !state.waiting.is_empty() {
            return None;
        }
        let lane = state.free.pop()?;
        state.grant(principal);
        Some(Slot {
            slots: self.clone(),
            principal: principal.to_string(),
            lane,
        })
    }

    fn release(self: &Arc<Self>, principal: &str, lane: usize) {
        let mut state = self.lock();
        if let Some(n) = state.running.get_mut(principal) {
            *n -= 1;
            if *n == 0 {
                state.running.remove(principal);
            }
        }
        state.free.push(lane);
        self.dispatch(&mut state);
    }

    /// Hands free slots to waiters by the rule while both last.
    fn dispatch(self: &Arc<Self>, state: &mut State) {
        while !state.free.is_empty() {
            // Below its share; fewest running per unit of weight, then least
            // recently served; the queue order breaks ties (min_by keeps the
            // first of equals).
            let running = |p: &str| state.running.get(p).copied().unwrap_or(0);
            let served = |p: &str| state.served.get(p).copied().unwrap_or(0);
            // a's running / a's weight against b's, without division.
            let load = |a: &Waiter, b: &Waiter| {
                (running(&a.principal) as u64 * b.weight as u64)
                    .cmp(&(running(&b.principal) as u64 * a.weight as u64))
            };
            let next = state
                .waiting
                .iter()
                .enumerate()
                .filter(|(_, w)| running(&w.principal) < self.per_principal)
                .min_by(|(_, a), (_, b)| {
                    load(a, b).then(served(&a.principal).cmp(&served(&b.principal)))
                })
                .map(|(i, _)| i);
            let Some(waiter) = next.and_then(|i| state.waiting.remove(i)) else {
                return;
            };
            let Some(lane) = state.free.pop() else {
                return;
            };
            state.grant(&waiter.principal);
            let slot = Slot {
                slots: self.clone(),
                principal: waiter.principal.clone(),
                lane,
            };
            if let Err(mut unclaimed) = waiter.hand.send(slot) {
                // It gave up waiting: undo. (The slot comes back here; its
                // drop must not release again.)
                unclaimed.principal.clear();
                if let Some(n) = state.running.get_mut(&waiter.principal) {
                    *n -= 1;
                }
                state.running.retain(|_, n| *n > 0);
                state.free.push(lane);
            }
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        // An unclaimed slot (emptied above) was never counted as released.
        if !self.principal.is_empty() {
            let principal = std::mem::take(&mut self.principal);
            self.slots.release(&principal, self.lane);
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
        wait_weighted(slots, principal, 1, order)
    }

    fn wait_weighted(
        slots: &Arc<Slots>,
        principal: &'static str,
        weight: u32,
        order: &Arc<Mutex<Vec<&'static str>>>,
    ) -> tokio::task::JoinHandle<Slot> {
        let (slots, order) = (slots.clone(), order.clone());
        tokio::spawn(async move {
            let slot = slots.acquire(principal, weight).await;
            order.lock().unwrap().push(principal);
            slot
        })
    }

    async fn settle() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    #[tokio::test]
    async fn a_principal_with_nothing_running_goes_before_a_flood() {
        let slots = Slots::new(4);
        let order = Arc::new(Mutex::new(Vec::new()));
        let a1 = slots.acquire("a", 1).await;
        let a2 = slots.acquire("a", 1).await;
        let c1 = slots.acquire("c", 1).await;
        let c2 = slots.acquire("c", 1).await;
        assert_eq!(slots.available(), 0);
        // a floods the queue first, then b asks once.
        let queued: Vec<_> = (0..3).map(|_| wait(&slots, "a", &order)).collect();
        settle().await;
        let b = wait(&slots, "b", &order);
        settle().await;
        drop(c1);
        settle().await;
        assert_eq!(*order.lock().unwrap(), ["b"], "b had nothing running");
        drop(c2);
        settle().await;
        assert_eq!(*order.lock().unwrap(), ["b", "a"]);
        drop((a1, a2, b.await.unwrap()));
        for q in queued {
            drop(q.await.unwrap());
        }
        assert_eq!(slots.available(), 4, "every slot comes back");
    }

    #[tokio::test]
    async fn among_principals_with_nothing_running_the_least_recently_served_goes_first() {
        let slots = Slots::new(1);
        let order = Arc::new(Mutex::new(Vec::new()));
        let held = slots.acquire("a", 1).await;
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
    async fn one_slot_is_always_left_for_somebody_else() {
        let slots = Slots::new(3);
        let order = Arc::new(Mutex::new(Vec::new()));
        let a1 = slots.acquire("a", 1).await;
        let a2 = slots.acquire("a", 1).await;
        let a3 = wait(&slots, "a", &order);
        settle().await;
        assert_eq!(
            *order.lock().unwrap(),
            Vec::<&str>::new(),
            "a has its share"
        );
        assert_eq!(slots.available(), 1);
        let b = wait(&slots, "b", &order);
        settle().await;
        assert_eq!(
            *order.lock().unwrap(),
            ["b"],
            "b starts at once beside a's two"
        );
        drop((a1, a2, b.await.unwrap()));
        drop(a3.await.unwrap());
        assert_eq!(slots.available(), 3);
    }

    /// a (weight 3) and b (weight 1) each hold a slot with more queued:
    /// the next two slots go to a (1/3, then 2/3 running per weight, against
    /// b's 1/1); with equal weights the second would have gone to b.
    async fn order_of_two_floods(weight_a: u32) -> Vec<&'static str> {
        let slots = Slots::new(4);
        let order = Arc::new(Mutex::new(Vec::new()));
        let a1 = slots.acquire("a", weight_a).await;
        let b1 = slots.acquire("b", 1).await;
        let filler = (slots.acquire("x", 1).await, slots.acquire("y", 1).await);
        let queued_a: Vec<_> = (0..3)
            .map(|_| wait_weighted(&slots, "a", weight_a, &order))
            .collect();
        settle().await;
        let queued_b: Vec<_> = (0..3).map(|_| wait(&slots, "b", &order)).collect();
        settle().await;
        drop(filler.0);
        settle().await;
        drop(filler.1);
        settle().await;
        let seen = order.lock().unwrap().clone();
        drop((a1, b1));
        for q in queued_a.into_iter().chain(queued_b) {
            drop(q.await.unwrap());
        }
        assert_eq!(slots.available(), 4);
        seen
    }

    #[tokio::test]
    async fn a_heavier_organisation_gets_more_of_the_slots_while_both_wait() {
        assert_eq!(order_of_two_floods(3).await, ["a", "a"]);
        assert_eq!(order_of_two_floods(1).await, ["a", "b"]);
    }

    #[tokio::test]
    async fn a_waiter_that_gives_up_does_not_keep_a_slot() {
        let slots = Slots::new(1);
        let held = slots.acquire("a", 1).await;
        let lane = held.lane();
        let gave_up = tokio::time::timeout(Duration::from_millis(10), slots.acquire("b", 1)).await;
        assert!(gave_up.is_err());
        let order = Arc::new(Mutex::new(Vec::new()));
        let c = wait(&slots, "c", &order);
        settle().await;
        drop(held);
        let c = c.await.unwrap();
        assert_eq!(c.lane(), lane, "the lane given up comes back with the slot");
        drop(c);
        assert_eq!(*order.lock().unwrap(), ["c"]);
        assert_eq!(slots.available(), 1);
    }

    #[tokio::test]
    async fn work_ahead_takes_a_slot_only_when_all_are_idle() {
        let slots = Slots::new(2);
        let a1 = slots.acquire_if_idle("a").expect("idle");
        assert!(slots.acquire_if_idle("b").is_none(), "a slot is taken");
        drop(a1);
        let b1 = slots.acquire("b", 1).await;
        let order = Arc::new(Mutex::new(Vec::new()));
        let b2 = wait(&slots, "b", &order);
        let c = wait(&slots, "c", &order);
        settle().await;
        assert_eq!(*order.lock().unwrap(), ["c"], "b is at its share and waits");
        drop(c.await.unwrap());
        assert!(slots.acquire_if_idle("a").is_none(), "somebody waits");
        drop(b1);
        drop(b2.await.unwrap());
        assert!(slots.acquire_if_idle("a").is_some(), "idle again");
        assert_eq!(slots.available(), 2);
    }

    #[tokio::test]
    async fn slots_held_at_once_never_share_a_lane() {
        let slots = Slots::new(3);
        let a = slots.acquire_if_idle("a").expect("idle");
        let b = slots.acquire("b", 1).await;
        let c = slots.acquire("c", 1).await;
        let mut lanes = vec![a.lane(), b.lane(), c.lane()];
        lanes.sort();
        assert_eq!(lanes, [0, 1, 2]);
        // A waiter handed a freed slot gets that slot's lane.
        let freed = b.lane();
        let order = Arc::new(Mutex::new(Vec::new()));
        let e = wait(&slots, "e", &order);
        settle().await;
        drop(b);
        let e = e.await.unwrap();
        assert_eq!(e.lane(), freed);
        assert_ne!(e.lane(), a.lane());
        assert_ne!(e.lane(), c.lane());
        drop((a, c, e));
        assert_eq!(slots.available(), 3);
    }
}
