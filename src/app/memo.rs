//! A bounded memory of values by key, where the layers above the sandbox
//! keep what is worth not computing twice (the pipeline keeps the gate's
//! decisions here). The sandbox knows neither the keys nor the values.

use std::any::Any;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

type Kept = HashMap<String, Arc<dyn Any + Send + Sync>>;

pub struct Memo {
    kept: Mutex<Kept>,
    capacity: usize,
}

impl Memo {
    pub fn new(capacity: usize) -> Memo {
        Memo {
            kept: Mutex::default(),
            capacity,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Kept> {
        self.kept.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The value kept under `key`, if it is a `T`.
    pub fn get<T: Any + Send + Sync>(&self, key: &str) -> Option<Arc<T>> {
        let value = self.lock().get(key).cloned()?;
        value.downcast::<T>().ok()
    }

    /// Drops every `T` that `keep` says no to (values of other types stay).
    pub fn retain<T: Any + Send + Sync>(&self, keep: impl Fn(&T) -> bool) {
        self.lock()
            .retain(|_, value| value.downcast_ref::<T>().is_none_or(&keep));
    }

    /// Keeps `value` under `key`. When full, everything is dropped and the
    /// memory refills with what is asked for now: cheaper than tracking
    /// use, and a miss costs only the computation it would have saved.
    pub fn put<T: Any + Send + Sync>(&self, key: String, value: Arc<T>) {
        let mut kept = self.lock();
        if kept.len() >= self.capacity {
            kept.clear();
        }
        kept.insert(key, value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_come_back_by_key_and_type_and_a_full_memory_starts_over() {
        let memo = Memo::new(2);
        memo.put("a".into(), Arc::new(1u32));
        memo.put("b".into(), Arc::new("two"));
        assert_eq!(memo.get::<u32>("a").as_deref(), Some(&1));
        assert_eq!(memo.get::<u64>("a"), None, "another type");
        assert_eq!(memo.get::<&str>("b").as_deref(), Some(&"two"));
        memo.put("c".into(), Arc::new(3u32));
        assert_eq!(memo.get::<u32>("a"), None, "dropped when full");
        assert_eq!(memo.get::<u32>("c").as_deref(), Some(&3));
        memo.put("d".into(), Arc::new(4u32));
        memo.retain::<u32>(|v| *v > 3);
        assert_eq!(memo.get::<u32>("c"), None, "said no to");
        assert_eq!(memo.get::<u32>("d").as_deref(), Some(&4));
    }

    #[test]
    fn retain_leaves_values_of_other_types() {
        let memo = Memo::new(4);
        memo.put("a".into(), Arc::new(1u32));
        memo.put("b".into(), Arc::new("b"));
        memo.retain::<u32>(|_| false);
        assert_eq!(memo.get::<u32>("a"), None);
        assert_eq!(memo.get::<&str>("b").as_deref(), Some(&"b"));
    }
}
