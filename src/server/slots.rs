//! Connection slots: the pool every connection needs one of
//! (`--max-connections`), a reserve only allowlisted peers may use once the
//! pool is taken (`--reserved-connections`), and the cap per client address
//! (`--max-connections-per-ip`, IPv6 per /64). So no one client, and no
//! flood through a trusted proxy, can take every slot.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::client::ClientIp;
use crate::config::Limits;
use crate::limits::client_key;

pub(super) struct Slots {
    pool: Arc<Semaphore>,
    reserve: Arc<Semaphore>,
    per_client_max: usize,
    /// Open connections per client key; only keys with one or more.
    per_client: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

/// A place in the pool or the reserve, held for the connection's life.
pub(super) struct PoolSlot(#[allow(dead_code)] OwnedSemaphorePermit);

/// One of a client's connections, counted while it lives.
pub(super) struct ClientSlot {
    per_client: Arc<Mutex<HashMap<IpAddr, usize>>>,
    key: IpAddr,
}

impl Slots {
    pub(super) fn new(limits: &Limits) -> Self {
        Self {
            pool: Arc::new(Semaphore::new(limits.max_connections)),
            reserve: Arc::new(Semaphore::new(limits.reserved_connections)),
            per_client_max: limits.max_connections_per_ip,
            per_client: Arc::default(),
        }
    }

    /// A pool slot, or for an allowlisted peer a reserved one when the pool
    /// is taken; `None` when there is none.
    pub(super) fn pool(&self, allowlisted: bool) -> Option<PoolSlot> {
        let permit = self.pool.clone().try_acquire_owned().ok().or_else(|| {
            allowlisted
                .then(|| self.reserve.clone().try_acquire_owned().ok())
                .flatten()
        })?;
        Some(PoolSlot(permit))
    }

    /// One more connection for `client`, unless it has its maximum open.
    pub(super) fn client(&self, client: ClientIp) -> Option<ClientSlot> {
        let key = client_key(client);
        let mut open = lock(&self.per_client);
        let count = open.entry(key).or_insert(0);
        if *count >= self.per_client_max {
            return None;
        }
        *count += 1;
        Some(ClientSlot {
            per_client: self.per_client.clone(),
            key,
        })
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let mut open = lock(&self.per_client);
        if let Some(count) = open.get_mut(&self.key) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                open.remove(&self.key);
            }
        }
    }
}

/// A poisoned lock means a panic between two integer updates: the counts
/// are still usable.
fn lock(map: &Mutex<HashMap<IpAddr, usize>>) -> MutexGuard<'_, HashMap<IpAddr, usize>> {
    map.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn limits(pool: usize, reserve: usize, per_client: usize) -> Limits {
        Limits {
            max_body: 1024,
            header_timeout: Duration::from_secs(1),
            body_timeout: Duration::from_secs(1),
            request_timeout: Duration::from_secs(2),
            max_connections: pool,
            max_connections_per_ip: per_client,
            reserved_connections: reserve,
            max_in_flight: 10,
            rate_per_ip: 10,
            rate_global: 10,
            rate_burst: 1,
        }
    }

    fn ip(s: &str) -> ClientIp {
        ClientIp::new(s.parse().expect("ip"))
    }

    #[test]
    fn the_reserve_is_for_allowlisted_peers_once_the_pool_is_taken() {
        let slots = Slots::new(&limits(1, 1, 10));
        let held = slots.pool(false).expect("pool");
        assert!(slots.pool(false).is_none());
        let reserved = slots.pool(true).expect("reserve");
        assert!(slots.pool(true).is_none());
        drop(held);
        assert!(slots.pool(false).is_some());
        drop(reserved);
    }

    #[test]
    fn per_client_cap_counts_each_address_and_ipv6_per_64() {
        let slots = Slots::new(&limits(10, 0, 2));
        let a = [slots.client(ip("192.0.2.1")), slots.client(ip("192.0.2.1"))];
        assert!(a.iter().all(Option::is_some));
        assert!(slots.client(ip("192.0.2.1")).is_none());
        assert!(slots.client(ip("192.0.2.2")).is_some());
        let v6 = [
            slots.client(ip("2001:db8::1")),
            slots.client(ip("2001:db8::2")),
        ];
        assert!(v6.iter().all(Option::is_some));
        assert!(slots.client(ip("2001:db8::3")).is_none());
        drop(a);
        assert!(slots.client(ip("192.0.2.1")).is_some());
        // Closed clients leave no entry behind.
        drop(v6);
        assert!(!lock(&slots.per_client).contains_key(&"2001:db8::".parse().expect("ip")));
    }
}
