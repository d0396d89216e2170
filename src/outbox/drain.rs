//! The drainer: republishes spooled events in arrival order once the broker
//! is back, removing each from the spool only after its confirm.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::spool::Spool;
use crate::backoff::Backoff;
use crate::broker::Broker;
use crate::metrics::Metrics;

/// Events read per drain round.
const DRAIN_BATCH: usize = 256;
/// Longest wait between looks at an idle spool (refreshes the age gauge).
const IDLE_POLL: Duration = Duration::from_millis(500);

pub(super) struct Drainer {
    pub(super) spool: Arc<Spool>,
    pub(super) broker: Arc<Broker>,
    pub(super) metrics: Arc<Metrics>,
}

impl Drainer {
    /// Republishes spooled events, oldest first, whenever the broker is up.
    /// Each event leaves the spool only after its confirm. Confirmed events
    /// that could not be removed (storage failing) are removed before
    /// anything else is published: republishing them round after round
    /// would flood subscribers with duplicates.
    pub(super) async fn run(self, shutdown: CancellationToken) {
        let mut backoff = Backoff::default();
        let mut unremoved: Vec<u64> = Vec::new();
        loop {
            self.spool.refresh_gauges();
            let idle = self.spool.stats().messages == 0 || !self.broker.is_up();
            if idle {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = self.spool.appended() => {}
                    _ = self.broker.became_up() => {}
                    _ = tokio::time::sleep(IDLE_POLL) => {}
                }
                continue;
            }
            let result = if unremoved.is_empty() {
                self.drain_batch(&shutdown, &mut unremoved).await
            } else {
                self.remove_confirmed(&mut unremoved).await
            };
            if shutdown.is_cancelled() {
                if !unremoved.is_empty() {
                    warn!(
                        events = unremoved.len(),
                        "confirmed events still in the spool; they will be published again"
                    );
                }
                return;
            }
            match result {
                Ok(()) => backoff.reset(),
                Err(reason) => {
                    warn!(%reason, "spool drain paused");
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(backoff.next_delay()) => {}
                    }
                }
            }
        }
    }

    /// Publishes up to one batch in order, stopping at the first failure.
    async fn drain_batch(
        &self,
        shutdown: &CancellationToken,
        unremoved: &mut Vec<u64>,
    ) -> Result<(), String> {
        let batch = self
            .spool
            .peek(DRAIN_BATCH)
            .await
            .map_err(|e| format!("spool read failed: {e}"))?;
        let mut failure = None;
        for (key, envelope) in &batch {
            if shutdown.is_cancelled() {
                break;
            }
            match self.broker.publish_ordered(envelope).await {
                Ok(()) => unremoved.push(*key),
                Err(e) => {
                    failure = Some(format!("publish failed: {e}"));
                    break;
                }
            }
        }
        if !unremoved.is_empty() {
            self.remove_confirmed(unremoved).await?;
        }
        failure.map_or(Ok(()), Err)
    }

    async fn remove_confirmed(&self, unremoved: &mut Vec<u64>) -> Result<(), String> {
        let drained = unremoved.len() as u64;
        match self.spool.remove(unremoved.clone()).await {
            Ok(()) => {
                unremoved.clear();
                self.metrics.spool_drained.inc_by(drained);
                info!(drained, left = self.spool.stats().messages, "spool drained");
                Ok(())
            }
            Err(e) => {
                error!(error = %e, events = drained, "confirmed events cannot be removed from the spool");
                Err(format!("spool remove failed: {e}"))
            }
        }
    }
}
