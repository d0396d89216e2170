//! Pipeline step 10: Ocrolus retries, so the same `Webhook-Request-Id` can
//! arrive twice. An id is remembered only once its event is safe (confirmed
//! or spooled): a failed delivery never blocks a later good one, and a
//! concurrent twin waits for the first one's outcome instead of racing it.
//! Memory is bounded by `capacity`; the oldest ids are forgotten first.
//! Each id is stored once (`Arc<str>`, shared by the map and the expiry
//! queue): at the default capacity this is most of the relay's steady-state
//! memory (BENCHMARKS.md).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::config::DedupConfig;

enum Entry {
    /// Being delivered; the sender reports whether it became safe.
    Pending(watch::Sender<Option<bool>>),
    /// Safe; remembered until this instant.
    Done(Instant),
}

#[derive(Default)]
struct Inner {
    entries: HashMap<Arc<str>, Entry>,
    /// Done ids in the order they became safe, with their expiry.
    order: VecDeque<(Instant, Arc<str>)>,
}

pub struct Dedup {
    inner: Mutex<Inner>,
    window: Duration,
    capacity: usize,
}

/// The result of claiming a delivery id.
pub enum Claim {
    /// First of its kind: deliver it, then [`ClaimGuard::commit`].
    Fresh(ClaimGuard),
    /// Already delivered safely within the window.
    Duplicate,
}

impl Dedup {
    pub fn new(config: &DedupConfig) -> Arc<Self> {
        Arc::new(Self {
            inner: Mutex::new(Inner::default()),
            window: config.window,
            capacity: config.capacity.max(1),
        })
    }

    fn enabled(&self) -> bool {
        !self.window.is_zero()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub async fn claim(self: &Arc<Self>, id: &str) -> Claim {
        if !self.enabled() {
            return Claim::Fresh(ClaimGuard {
                dedup: None,
                id: Arc::from(""),
            });
        }
        loop {
            let mut outcome = {
                let mut inner = self.lock();
                inner.expire(Instant::now(), self.capacity);
                match inner.entries.get(id) {
                    Some(Entry::Done(_)) => return Claim::Duplicate,
                    Some(Entry::Pending(tx)) => tx.subscribe(),
                    None => {
                        let (tx, _) = watch::channel(None);
                        let id: Arc<str> = Arc::from(id);
                        inner.entries.insert(id.clone(), Entry::Pending(tx));
                        return Claim::Fresh(ClaimGuard {
                            dedup: Some(self.clone()),
                            id,
                        });
                    }
                }
            };
            // Whatever the first attempt's outcome, look again: Done now means
            // duplicate, a vanished entry means it failed and we may try.
            let _ = outcome.wait_for(Option::is_some).await;
        }
    }

    /// Marks an id safe without a delivery (ids found in the spool at start).
    pub fn remember(&self, id: &str) {
        if self.enabled() {
            self.lock()
                .mark_done(&Arc::from(id), Instant::now() + self.window, self.capacity);
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().entries.len()
    }
}

impl Inner {
    fn expire(&mut self, now: Instant, capacity: usize) {
        while let Some((expires, id)) = self.order.front() {
            let over = self.entries.len() > capacity;
            if *expires > now && !over {
                break;
            }
            if let Some(Entry::Done(at)) = self.entries.get(&**id) {
                if at == expires {
                    self.entries.remove(&**id);
                }
            }
            self.order.pop_front();
        }
    }

    fn mark_done(&mut self, id: &Arc<str>, expires: Instant, capacity: usize) {
        if let Some(Entry::Pending(tx)) = self.entries.insert(id.clone(), Entry::Done(expires)) {
            tx.send_replace(Some(true));
        }
        self.order.push_back((expires, id.clone()));
        self.expire(Instant::now(), capacity);
    }
}

/// A claimed id. Dropped without [`commit`](Self::commit), the claim is
/// released and a waiting twin may deliver instead.
pub struct ClaimGuard {
    dedup: Option<Arc<Dedup>>,
    id: Arc<str>,
}

impl ClaimGuard {
    /// The event is safe: remember the id for the window.
    pub fn commit(mut self) {
        if let Some(dedup) = self.dedup.take() {
            let expires = Instant::now() + dedup.window;
            dedup.lock().mark_done(&self.id, expires, dedup.capacity);
        }
    }
}

impl Drop for ClaimGuard {
    fn drop(&mut self) {
        if let Some(dedup) = self.dedup.take() {
            let mut inner = dedup.lock();
            if let Some(Entry::Pending(tx)) = inner.entries.remove(&*self.id) {
                tx.send_replace(Some(false));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dedup(window_ms: u64, capacity: usize) -> Arc<Dedup> {
        Dedup::new(&DedupConfig {
            window: Duration::from_millis(window_ms),
            capacity,
        })
    }

    #[tokio::test]
    async fn committed_id_is_a_duplicate() {
        let d = dedup(60_000, 10);
        let Claim::Fresh(g) = d.claim("a").await else {
            panic!("first claim")
        };
        g.commit();
        assert!(matches!(d.claim("a").await, Claim::Duplicate));
        assert!(matches!(d.claim("b").await, Claim::Fresh(_)));
    }

    #[tokio::test]
    async fn failed_delivery_does_not_block_a_retry() {
        let d = dedup(60_000, 10);
        let Claim::Fresh(g) = d.claim("a").await else {
            panic!("first claim")
        };
        drop(g);
        assert!(matches!(d.claim("a").await, Claim::Fresh(_)));
    }

    #[tokio::test]
    async fn concurrent_twin_waits_for_the_outcome() {
        let d = dedup(60_000, 10);
        let Claim::Fresh(g) = d.claim("a").await else {
            panic!("first claim")
        };
        let d2 = d.clone();
        let twin = tokio::spawn(async move { matches!(d2.claim("a").await, Claim::Duplicate) });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(
            !twin.is_finished(),
            "twin must wait while the first is pending"
        );
        g.commit();
        assert!(twin.await.expect("join"), "twin sees a duplicate");
    }

    #[tokio::test]
    async fn concurrent_twin_takes_over_after_failure() {
        let d = dedup(60_000, 10);
        let Claim::Fresh(g) = d.claim("a").await else {
            panic!("first claim")
        };
        let d2 = d.clone();
        let twin = tokio::spawn(async move {
            match d2.claim("a").await {
                Claim::Fresh(g) => {
                    g.commit();
                    true
                }
                Claim::Duplicate => false,
            }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(g);
        assert!(
            twin.await.expect("join"),
            "twin delivers after the first failed"
        );
    }

    #[tokio::test]
    async fn window_expires() {
        let d = dedup(30, 10);
        d.remember("a");
        assert!(matches!(d.claim("a").await, Claim::Duplicate));
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(matches!(d.claim("a").await, Claim::Fresh(_)));
    }

    #[tokio::test]
    async fn capacity_bounds_memory() {
        let d = dedup(60_000, 100);
        for i in 0..1000 {
            d.remember(&format!("id-{i}"));
        }
        assert!(d.len() <= 100, "{} entries kept", d.len());
        assert!(matches!(d.claim("id-999").await, Claim::Duplicate));
    }

    #[tokio::test]
    async fn zero_window_disables() {
        let d = dedup(0, 10);
        let Claim::Fresh(g) = d.claim("a").await else {
            panic!("claim")
        };
        g.commit();
        assert!(matches!(d.claim("a").await, Claim::Fresh(_)));
    }
}
