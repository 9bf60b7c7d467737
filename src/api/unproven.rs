//! Clients that have not said anything yet: connections before their first request, and LM Studio
//! SDK sockets before their passkey. Each kind has a small cap of its own, and a new one over the
//! cap closes the oldest of its kind. A real client speaks at once (its request head, its
//! passkey), so it is never the oldest for long; a flood of clients that stay silent only pushes
//! out its own. So silent clients cannot hold more than the cap, and cannot keep a keyed client
//! out. On a keyed server a connection whose requests never showed a key is closed after its first
//! answer, so it cannot sit idle outside the cap either.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

/// The clients of one kind that have not proven themselves, oldest first.
pub struct Unproven {
    cap: usize,
    next: AtomicU64,
    /// A std Mutex: held to push or remove one entry, never across an await.
    queue: Mutex<VecDeque<(u64, oneshot::Sender<()>)>>,
}

impl Unproven {
    pub fn new(cap: usize) -> Arc<Self> {
        Arc::new(Self {
            cap: cap.max(1),
            next: AtomicU64::new(0),
            queue: Mutex::default(),
        })
    }

    /// Registers a new client, closing the oldest beyond the cap. The receiver gets `Ok(())`
    /// when this client must close to make room (an `Err` only means it left the queue).
    pub fn enter(self: &Arc<Self>) -> (Ticket, oneshot::Receiver<()>) {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (evict, evicted) = oneshot::channel();
        let mut queue = self.queue.lock().expect("unproven clients");
        while queue.len() >= self.cap {
            if let Some((_, oldest)) = queue.pop_front() {
                // Ignored error: that client has just ended on its own.
                let _ = oldest.send(());
            }
        }
        queue.push_back((id, evict));
        (
            Ticket {
                id,
                queue: Arc::clone(self),
            },
            evicted,
        )
    }

    /// Clients waiting now.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.queue.lock().expect("unproven clients").len()
    }
}

/// A client's place among the unproven; dropping it (proven, or gone) leaves.
pub struct Ticket {
    id: u64,
    queue: Arc<Unproven>,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut queue = self.queue.queue.lock().expect("unproven clients");
        queue.retain(|(id, _)| *id != self.id);
    }
}

/// A connection's ticket and whether it showed a key, reachable from its requests (an
/// extension).
#[derive(Clone)]
pub struct Proof(Arc<ProofState>);

struct ProofState {
    /// A std Mutex: taken once per request to drop the ticket.
    ticket: Mutex<Option<Ticket>>,
    proven: std::sync::atomic::AtomicBool,
}

impl Proof {
    pub fn new(ticket: Ticket) -> Self {
        Self(Arc::new(ProofState {
            ticket: Mutex::new(Some(ticket)),
            proven: std::sync::atomic::AtomicBool::new(false),
        }))
    }

    /// A request arrived on the connection: it is no longer silent.
    pub fn begin(&self) {
        self.0.ticket.lock().expect("connection proof").take();
    }

    /// A request on the connection showed a valid key.
    pub fn prove(&self) {
        self.begin();
        self.0.proven.store(true, Ordering::Release);
    }

    pub fn proven(&self) -> bool {
        self.0.proven.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_oldest_unproven_client_makes_room_and_proven_ones_leave() {
        let unproven = Unproven::new(2);
        let (first, mut first_evicted) = unproven.enter();
        let (second, mut second_evicted) = unproven.enter();
        let proof = Proof::new(second);
        proof.begin();
        assert!(!proof.proven());
        assert_eq!(unproven.len(), 1);
        // The second left the queue: its receiver ends without an eviction.
        assert!(matches!(
            second_evicted.try_recv(),
            Err(oneshot::error::TryRecvError::Closed)
        ));
        let (_third, _) = unproven.enter();
        let (_fourth, _) = unproven.enter();
        assert_eq!(first_evicted.try_recv(), Ok(()));
        assert_eq!(unproven.len(), 2);
        drop(first);
        assert_eq!(unproven.len(), 2);
    }
}
