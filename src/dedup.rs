//! Pipeline step 10: Ocrolus retries, so the same `Webhook-Request-Id` can
//! arrive twice. An id is remembered only once its event is safe (confirmed
//! or spooled): a failed delivery never blocks a later good one, and a
//! concurrent twin waits for the first one's outcome instead of racing it.
//! Memory is bounded by `capacity`; the oldest ids are forgotten first.
//! Each id is stored once (`Arc<str>`, shared by the map and the expiry
//! queue): at the default capacity this is most of the relay's steady-state
//! memory (BENCHMARKS.md).
//!
//! Hand-written rather than an LRU or cache crate (`lru`, `moka`,
//! `quick_cache`): what it keeps is a window in the order ids became safe,
//! not a least-recently-used set (a duplicate must not extend its id's
//! life), and a pending claim, with the watch its twins wait on, must never
//! be evicted by capacity or time. A cache crate would hold the done ids
//! only and still need a second map for the claims and the unsigned-id
//! counts, so a `HashMap` and a `VecDeque` are the smaller whole.
//!
//! An id that no signature covers (Basic only) is remembered together with
//! a digest of its body: the same id with another body is not a duplicate
//! but a conflict, delivered as its own message, so that whoever can send
//! ids cannot claim one in advance and suppress the real delivery.

use std::borrow::Cow;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::config::{DEFAULT_SOURCE, DedupConfig};

/// The key of a delivery id, which is unique per source only. The
/// `default` source keeps the bare id (no allocation in the single-source
/// case); a source name never contains the separator.
pub fn key<'a>(source: &str, id: &'a str) -> Cow<'a, str> {
    if source == DEFAULT_SOURCE {
        Cow::Borrowed(id)
    } else {
        Cow::Owned(format!("{source}\u{1f}{id}"))
    }
}

enum Entry {
    /// Being delivered; the sender reports whether it became safe.
    Pending(watch::Sender<Option<bool>>),
    /// Safe; remembered until this instant.
    Done(Instant),
}

#[derive(Default)]
struct Inner {
    /// By key: the id, or `{id} {body digest}` for an unsigned id.
    entries: HashMap<Arc<str>, Entry>,
    /// Done keys in the order they became safe, with their expiry.
    order: VecDeque<(Instant, Arc<str>)>,
    /// Entries per unsigned id, pending or done, whatever their digest.
    unsigned_ids: HashMap<Box<str>, usize>,
}

/// The id part of a key (ids never contain a space).
fn unsigned_id(key: &str) -> Option<&str> {
    key.split_once(' ').map(|(id, _)| id)
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
    /// An unsigned id already known with another body: deliver it as its
    /// own message, marked, then [`ClaimGuard::commit`].
    Conflict(ClaimGuard),
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

    /// Claims `id`; `body_digest` is given when no signature covers the id
    /// (then a different body is a [`Claim::Conflict`], not a duplicate).
    pub async fn claim(self: &Arc<Self>, id: &str, body_digest: Option<&[u8; 32]>) -> Claim {
        if !self.enabled() {
            return Claim::Fresh(ClaimGuard {
                dedup: None,
                id: Arc::from(""),
            });
        }
        let key: Arc<str> = match body_digest {
            Some(digest) => Arc::from(format!("{id} {}", hex::encode(digest))),
            None => Arc::from(id),
        };
        loop {
            let mut outcome = {
                let mut inner = self.lock();
                inner.expire(Instant::now(), self.capacity);
                match inner.entries.get(&*key) {
                    Some(Entry::Done(_)) => return Claim::Duplicate,
                    Some(Entry::Pending(tx)) => tx.subscribe(),
                    None => {
                        let (tx, _) = watch::channel(None);
                        inner.entries.insert(key.clone(), Entry::Pending(tx));
                        let guard = ClaimGuard {
                            dedup: Some(self.clone()),
                            id: key,
                        };
                        return match unsigned_id(&guard.id) {
                            Some(id) => {
                                let known = inner.unsigned_ids.entry(id.into()).or_insert(0);
                                *known += 1;
                                if *known > 1 {
                                    Claim::Conflict(guard)
                                } else {
                                    Claim::Fresh(guard)
                                }
                            }
                            None => Claim::Fresh(guard),
                        };
                    }
                }
            };
            // Whatever the first attempt's outcome, look again: Done now means
            // duplicate, a vanished entry means it failed and we may try.
            let _ = outcome.wait_for(Option::is_some).await;
        }
    }

    /// Marks an id safe without a delivery (ids found in the spool at start).
    /// Ids with a space are the relay's own conflict ids, never claimed.
    pub fn remember(&self, id: &str) {
        if self.enabled() && !id.contains(' ') {
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
            let (expires, id) = (*expires, id.clone());
            if let Some(Entry::Done(at)) = self.entries.get(&*id)
                && *at == expires
            {
                self.entries.remove(&*id);
                self.forget_unsigned(&id);
            }
            self.order.pop_front();
        }
    }

    /// One entry of an unsigned id is gone.
    fn forget_unsigned(&mut self, key: &str) {
        if let Some(id) = unsigned_id(key)
            && let Some(known) = self.unsigned_ids.get_mut(id)
        {
            *known -= 1;
            if *known == 0 {
                self.unsigned_ids.remove(id);
            }
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
                inner.forget_unsigned(&self.id);
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
        let Claim::Fresh(g) = d.claim("a", None).await else {
            panic!("first claim")
        };
        g.commit();
        assert!(matches!(d.claim("a", None).await, Claim::Duplicate));
        assert!(matches!(d.claim("b", None).await, Claim::Fresh(_)));
    }

    #[tokio::test]
    async fn failed_delivery_does_not_block_a_retry() {
        let d = dedup(60_000, 10);
        let Claim::Fresh(g) = d.claim("a", None).await else {
            panic!("first claim")
        };
        drop(g);
        assert!(matches!(d.claim("a", None).await, Claim::Fresh(_)));
    }

    #[tokio::test]
    async fn concurrent_twin_waits_for_the_outcome() {
        let d = dedup(60_000, 10);
        let Claim::Fresh(g) = d.claim("a", None).await else {
            panic!("first claim")
        };
        let d2 = d.clone();
        let twin =
            tokio::spawn(async move { matches!(d2.claim("a", None).await, Claim::Duplicate) });
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
        let Claim::Fresh(g) = d.claim("a", None).await else {
            panic!("first claim")
        };
        let d2 = d.clone();
        let twin = tokio::spawn(async move {
            match d2.claim("a", None).await {
                Claim::Fresh(g) => {
                    g.commit();
                    true
                }
                Claim::Conflict(_) | Claim::Duplicate => false,
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
        assert!(matches!(d.claim("a", None).await, Claim::Duplicate));
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(matches!(d.claim("a", None).await, Claim::Fresh(_)));
    }

    #[tokio::test]
    async fn capacity_bounds_memory() {
        let d = dedup(60_000, 100);
        for i in 0..1000 {
            d.remember(&format!("id-{i}"));
        }
        assert!(d.len() <= 100, "{} entries kept", d.len());
        assert!(matches!(d.claim("id-999", None).await, Claim::Duplicate));
    }

    #[tokio::test]
    async fn unsigned_id_with_another_body_is_a_conflict() {
        let d = dedup(60_000, 10);
        let (a, b) = ([1u8; 32], [2u8; 32]);
        let Claim::Fresh(g) = d.claim("id", Some(&a)).await else {
            panic!("first claim")
        };
        g.commit();
        assert!(matches!(d.claim("id", Some(&a)).await, Claim::Duplicate));
        let Claim::Conflict(g) = d.claim("id", Some(&b)).await else {
            panic!("another body")
        };
        g.commit();
        assert!(matches!(d.claim("id", Some(&b)).await, Claim::Duplicate));
        // A signed id is trusted alone.
        assert!(matches!(d.claim("id", None).await, Claim::Fresh(_)));
    }

    #[tokio::test]
    async fn failed_conflict_is_forgotten() {
        let d = dedup(60_000, 10);
        let Claim::Fresh(g) = d.claim("id", Some(&[1; 32])).await else {
            panic!("first claim")
        };
        drop(g);
        let Claim::Fresh(g) = d.claim("id", Some(&[2; 32])).await else {
            panic!("the failed body left nothing behind")
        };
        assert_eq!(d.lock().unsigned_ids.get("id"), Some(&1));
        drop(g);
        assert!(d.lock().unsigned_ids.is_empty());
    }

    #[tokio::test]
    async fn zero_window_disables() {
        let d = dedup(0, 10);
        let Claim::Fresh(g) = d.claim("a", None).await else {
            panic!("claim")
        };
        g.commit();
        assert!(matches!(d.claim("a", None).await, Claim::Fresh(_)));
    }
}
