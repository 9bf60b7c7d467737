//! The responses `store: true` keeps, for `GET`/`DELETE /v1/responses/{id}`, its input items, and
//! `previous_response_id`: bounded in count and bytes (`--responses-max`,
//! `--responses-max-bytes`; the least recently used go first), in memory (lost on restart), and
//! per key — a response is found only by the key that made it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use serde_json::Value;

/// One kept response.
#[derive(Debug)]
pub struct Stored {
    /// The key that made it (`None` on a server without keys).
    pub owner: Option<String>,
    /// The response object, as `GET` returns it.
    pub response: Value,
    /// The request's input items, with their ids (`GET …/input_items`).
    pub input_items: Vec<Value>,
    /// The whole conversation so far as chat messages, this response's output included (what a
    /// follow-up with `previous_response_id` continues; `instructions` are not carried over).
    pub conversation: Vec<Value>,
}

impl Stored {
    fn bytes(&self) -> usize {
        let size = |v: &Value| serde_json::to_vec(v).map_or(0, |b| b.len());
        size(&self.response)
            + self.input_items.iter().map(size).sum::<usize>()
            + self.conversation.iter().map(size).sum::<usize>()
    }
}

/// The store.
pub struct ResponseStore {
    max_count: usize,
    max_bytes: usize,
    // A std Mutex: held only to look up, insert or evict, never across an await.
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    /// id → (last use, bytes, the response).
    map: HashMap<String, (u64, usize, Arc<Stored>)>,
    clock: u64,
    bytes: usize,
}

impl ResponseStore {
    pub fn new(max_count: usize, max_bytes: usize) -> Self {
        Self {
            max_count,
            max_bytes,
            inner: Mutex::new(Inner::default()),
        }
    }

    /// Keeps `stored` under `id`, evicting the least recently used as needed. One larger than
    /// the whole store is not kept (logged).
    pub fn put(&self, id: String, stored: Stored) {
        let bytes = stored.bytes();
        if bytes > self.max_bytes || self.max_count == 0 {
            tracing::warn!(
                id,
                bytes,
                max = self.max_bytes,
                "a response is larger than the whole store (--responses-max-bytes): not kept"
            );
            return;
        }
        let mut inner = self.inner.lock().expect("responses");
        inner.clock += 1;
        let now = inner.clock;
        if let Some((_, old, _)) = inner.map.remove(&id) {
            inner.bytes -= old;
        }
        while inner.map.len() >= self.max_count || inner.bytes + bytes > self.max_bytes {
            let Some(oldest) = inner
                .map
                .iter()
                .min_by_key(|(_, (used, _, _))| *used)
                .map(|(k, _)| k.clone())
            else {
                break;
            };
            if let Some((_, freed, _)) = inner.map.remove(&oldest) {
                inner.bytes -= freed;
            }
        }
        inner.bytes += bytes;
        inner.map.insert(id, (now, bytes, Arc::new(stored)));
    }

    /// The response `id` if `owner` made it.
    pub fn get(&self, id: &str, owner: Option<&str>) -> Option<Arc<Stored>> {
        let mut inner = self.inner.lock().expect("responses");
        inner.clock += 1;
        let now = inner.clock;
        let (used, _, stored) = inner.map.get_mut(id)?;
        if stored.owner.as_deref() != owner {
            return None;
        }
        *used = now;
        Some(Arc::clone(stored))
    }

    /// Deletes the response `id` if `owner` made it.
    pub fn delete(&self, id: &str, owner: Option<&str>) -> bool {
        let mut inner = self.inner.lock().expect("responses");
        let owned = inner
            .map
            .get(id)
            .is_some_and(|(_, _, s)| s.owner.as_deref() == owner);
        if owned {
            if let Some((_, freed, _)) = inner.map.remove(id) {
                inner.bytes -= freed;
            }
        }
        owned
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn stored(owner: &str, text: &str) -> Stored {
        Stored {
            owner: Some(owner.into()),
            response: json!({"text": text}),
            input_items: Vec::new(),
            conversation: Vec::new(),
        }
    }

    #[test]
    fn one_key_never_reads_another_keys_response() {
        let store = ResponseStore::new(8, 1 << 20);
        store.put("resp_1".into(), stored("alice", "hi"));
        assert!(store.get("resp_1", Some("alice")).is_some());
        assert!(store.get("resp_1", Some("bob")).is_none());
        assert!(store.get("resp_1", None).is_none());
        assert!(!store.delete("resp_1", Some("bob")));
        assert!(store.delete("resp_1", Some("alice")));
        assert!(store.get("resp_1", Some("alice")).is_none());
    }

    #[test]
    fn the_least_recently_used_go_first_by_count_and_by_bytes() {
        let store = ResponseStore::new(2, 1 << 20);
        store.put("a".into(), stored("k", "a"));
        store.put("b".into(), stored("k", "b"));
        store.get("a", Some("k"));
        store.put("c".into(), stored("k", "c"));
        assert!(
            store.get("b", Some("k")).is_none(),
            "b was the least recently used"
        );
        assert!(store.get("a", Some("k")).is_some() && store.get("c", Some("k")).is_some());

        let one = stored("k", &"x".repeat(100)).bytes();
        let store = ResponseStore::new(100, one * 2 + one / 2);
        for id in ["a", "b", "c"] {
            store.put(id.into(), stored("k", &"x".repeat(100)));
        }
        assert!(store.get("a", Some("k")).is_none());
        assert!(store.get("b", Some("k")).is_some() && store.get("c", Some("k")).is_some());
        // Larger than the whole store: not kept, nothing evicted for it.
        store.put("huge".into(), stored("k", &"x".repeat(10_000)));
        assert!(store.get("huge", Some("k")).is_none());
        assert!(store.get("c", Some("k")).is_some());
    }
}
