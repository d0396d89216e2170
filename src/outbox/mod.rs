//! Steps 11-12 together: the promise behind a 200. An event is safe once the
//! broker confirmed it or the spool fsynced it; anything else is an error the
//! caller answers with 503 so that Ocrolus retries. The drainer brings
//! spooled events to the broker later, and [`Outbox::flush`] gives it the
//! rest of the shutdown deadline. See docs/architecture.md, "The outbox".

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use crate::broker::Broker;
use crate::config::PoisonConfig;
use crate::event::Envelope;
use crate::metrics::Metrics;

mod drain;
pub mod spool;

pub use drain::{QUARANTINE_REASONS, Refusal};

use spool::{Spool, SpoolError};

/// How often [`Outbox::flush`] looks whether the spool is empty yet.
const FLUSH_POLL: Duration = Duration::from_millis(50);

/// Where a safe event is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Safe {
    Published,
    Spooled,
}

pub struct Outbox {
    pub broker: Arc<Broker>,
    pub spool: Arc<Spool>,
    metrics: Arc<Metrics>,
    poison: PoisonConfig,
}

impl Outbox {
    pub fn new(
        broker: Arc<Broker>,
        spool: Arc<Spool>,
        metrics: Arc<Metrics>,
        poison: PoisonConfig,
    ) -> Self {
        for refusal in Refusal::ALL {
            metrics
                .spool_dead_lettered
                .with_label_values(&[refusal.as_str()]);
        }
        for reason in QUARANTINE_REASONS {
            metrics.spool_quarantined.with_label_values(&[reason]);
        }
        Self {
            broker,
            spool,
            metrics,
            poison,
        }
    }

    pub async fn deliver(&self, envelope: &Envelope) -> Result<Safe, SpoolError> {
        match self.broker.publish(envelope).await {
            Ok(()) => Ok(Safe::Published),
            Err(reason) => {
                debug!(id = %envelope.id, %reason, "publish not confirmed; spooling");
                self.spool.append(envelope).await.map(|()| Safe::Spooled)
            }
        }
    }

    /// Readiness: a confirmed publish can work, or the spool has room.
    pub fn can_accept(&self) -> bool {
        self.broker.is_up() || self.spool.has_room()
    }

    /// The drainer task, until `shutdown`.
    pub fn drain(&self, shutdown: CancellationToken) -> impl Future<Output = ()> + Send + 'static {
        let drainer = drain::Drainer {
            spool: self.spool.clone(),
            broker: self.broker.clone(),
            metrics: self.metrics.clone(),
            poison: self.poison.clone(),
        };
        drainer.run(shutdown)
    }

    /// Lets the drainer empty the spool while the broker is up, until
    /// `deadline`: a spool on an ephemeral volume would otherwise keep
    /// accepted events away from subscribers until some later start.
    pub async fn flush(&self, deadline: tokio::time::Instant) {
        let before = self.spool.stats().messages;
        if before == 0 {
            return;
        }
        info!(spooled = before, "flushing the spool before stopping");
        while self.spool.stats().messages > 0
            && self.broker.is_up()
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(FLUSH_POLL).await;
        }
    }
}
