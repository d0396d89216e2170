//! The drainer: republishes spooled events in arrival order once the broker
//! is back, removing each from the spool only after its confirm.
//!
//! An event the broker refuses (nack, or returned as unroutable) never holds
//! back the ones behind it: it waits on its own backoff while the drain goes
//! on, and after `--poison-attempts` refusals it is published to the
//! dead-letter exchange with the reason in a header, or, if even that
//! fails, moved to the spool's quarantine table. Nothing is dropped. A
//! failure of the broker itself (timeout, lost connection, blocked) stops
//! the round instead: every event would fail alike.
//!
//! An operator can ask for a round now (`POST /spool/drain` on the admin
//! listener, `ocrolus-relay spool replay` while the relay runs): the
//! drainer stops waiting out its backoff and tries refused events at once.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::spool::Spool;
use crate::backoff::Backoff;
use crate::broker::{Broker, PublishError};
use crate::config::PoisonConfig;
use crate::event::Envelope;
use crate::log_throttle::LogThrottle;
use crate::metrics::Metrics;

/// Events read per spool read.
const DRAIN_BATCH: usize = 256;
/// Longest wait between looks at an idle spool (refreshes the age gauge).
const IDLE_POLL: Duration = Duration::from_millis(500);
/// Wait before a refused event is tried again; doubles up to `RETRY_MAX`.
const RETRY_FIRST: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(30);
/// At most one line per interval for each repeated drain message.
const LOG_EVERY: Duration = Duration::from_secs(10);
/// The drainer's repeated messages, the keys of its [`LogThrottle`].
const LOG_PAUSED: usize = 0;
const LOG_REFUSED: usize = 1;
const LOG_DEAD: usize = 2;

/// Why the broker would not take a spooled event; the `reason` label of
/// `spool_dead_lettered_total` and the `x-relay-dead-letter-reason` header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    Nack,
    Returned,
    /// Body larger than `--broker-max-message-size`: RabbitMQ would close
    /// the channel rather than nack, so it is never sent.
    TooLarge,
}

impl Refusal {
    pub const ALL: &[Self] = &[Self::Nack, Self::Returned, Self::TooLarge];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Nack => "nack",
            Self::Returned => "returned",
            Self::TooLarge => "too_large",
        }
    }
}

/// The `reason` label of `spool_quarantined_total`.
pub const QUARANTINE_REASONS: &[&str] = &["unreadable", "refused"];

pub(super) struct Drainer {
    pub(super) spool: Arc<Spool>,
    pub(super) broker: Arc<Broker>,
    pub(super) metrics: Arc<Metrics>,
    pub(super) poison: PoisonConfig,
}

/// A refused event waiting for its next try.
struct Retry {
    attempts: u32,
    not_before: Instant,
}

/// What the drainer carries from round to round.
struct State {
    /// Confirmed events not yet removed (storage failing).
    unremoved: Vec<u64>,
    retries: HashMap<u64, Retry>,
    logs: LogThrottle,
}

impl State {
    /// An operator asked for a drain now (`POST /spool/drain`): refused
    /// events are due at once (their attempts still count towards
    /// `--poison-attempts`) and the backoff starts over.
    fn retry_now(&mut self, backoff: &mut Backoff) {
        let now = Instant::now();
        for retry in self.retries.values_mut() {
            retry.not_before = now;
        }
        backoff.reset();
        info!(
            waiting = self.retries.len(),
            "spool drain requested by an operator"
        );
    }
}

/// How a round ended, when it did not fail.
enum Round {
    /// Something left the spool.
    Progress,
    /// Nothing could move; the earliest time a refused event is due again.
    Stalled(Option<Instant>),
}

impl Drainer {
    /// Republishes spooled events, oldest first, whenever the broker is up.
    /// Each event leaves the spool only after its confirm. Confirmed events
    /// that could not be removed (storage failing) are removed before
    /// anything else is published: republishing them round after round
    /// would flood subscribers with duplicates. A round that moves nothing
    /// waits (for a refused event to come due, a new event, the broker)
    /// instead of starting over at once.
    pub(super) async fn run(self, shutdown: CancellationToken) {
        let mut backoff = Backoff::default();
        let mut state = State {
            unremoved: Vec::new(),
            retries: HashMap::new(),
            logs: LogThrottle::new(3, 1, LOG_EVERY),
        };
        loop {
            self.spool.refresh_gauges();
            let idle = self.spool.stats().messages == 0 || !self.broker.is_up();
            let wait = if idle {
                IDLE_POLL
            } else {
                let result = if state.unremoved.is_empty() {
                    self.round(&shutdown, &mut state).await
                } else {
                    self.remove_confirmed(&mut state.unremoved)
                        .await
                        .map(|()| Round::Progress)
                };
                if shutdown.is_cancelled() {
                    if !state.unremoved.is_empty() {
                        warn!(
                            events = state.unremoved.len(),
                            "confirmed events still in the spool; they will be published again"
                        );
                    }
                    return;
                }
                match result {
                    Ok(Round::Progress) => {
                        backoff.reset();
                        continue;
                    }
                    Ok(Round::Stalled(due)) => due.map_or_else(
                        || backoff.next_delay(),
                        |due| due.saturating_duration_since(Instant::now()),
                    ),
                    Err(reason) => {
                        if let Some(held_back) = state.logs.admit(LOG_PAUSED) {
                            warn!(%reason, held_back, "spool drain paused");
                        }
                        tokio::select! {
                            _ = shutdown.cancelled() => return,
                            () = self.spool.drain_requested() => state.retry_now(&mut backoff),
                            _ = tokio::time::sleep(backoff.next_delay()) => {}
                        }
                        continue;
                    }
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = self.spool.appended() => {}
                _ = self.broker.became_up() => {}
                () = self.spool.drain_requested() => state.retry_now(&mut backoff),
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// One pass over the spool in order: publishes every event that is not
    /// waiting out a refusal, stopping only when the broker itself fails.
    async fn round(
        &self,
        shutdown: &CancellationToken,
        state: &mut State,
    ) -> Result<Round, String> {
        let quarantined_before = self.spool.stats().quarantined;
        let mut progress = false;
        let mut due: Option<Instant> = None;
        let mut cursor = None;
        'spool: loop {
            let batch = self
                .spool
                .peek_after(cursor, DRAIN_BATCH)
                .await
                .map_err(|e| format!("spool read failed: {e}"))?;
            let Some(&(last, _)) = batch.last() else {
                break;
            };
            cursor = Some(last);
            for (key, envelope) in &batch {
                if shutdown.is_cancelled() {
                    break 'spool;
                }
                if let Some(retry) = state.retries.get(key)
                    && retry.not_before > Instant::now()
                {
                    due = Some(due.map_or(retry.not_before, |d| d.min(retry.not_before)));
                    continue;
                }
                if envelope.body.len() > self.poison.max_message_size {
                    self.dead_letter(*key, envelope, Refusal::TooLarge, 0, state)
                        .await?;
                    progress = true;
                    continue;
                }
                let refusal = match self.broker.publish_ordered(envelope).await {
                    Ok(()) => {
                        state.retries.remove(key);
                        state.unremoved.push(*key);
                        continue;
                    }
                    Err(PublishError::Nack) => Refusal::Nack,
                    Err(PublishError::Returned) => Refusal::Returned,
                    Err(e) => {
                        if !state.unremoved.is_empty() {
                            self.remove_confirmed(&mut state.unremoved).await?;
                        }
                        return Err(format!("publish failed: {e}"));
                    }
                };
                if self.refused(*key, envelope, refusal, state).await? {
                    progress = true;
                } else if let Some(retry) = state.retries.get(key) {
                    due = Some(due.map_or(retry.not_before, |d| d.min(retry.not_before)));
                }
            }
            if !state.unremoved.is_empty() {
                self.remove_confirmed(&mut state.unremoved).await?;
                progress = true;
            }
        }
        if !state.unremoved.is_empty() {
            self.remove_confirmed(&mut state.unremoved).await?;
            progress = true;
        }
        progress |= self.spool.stats().quarantined > quarantined_before;
        Ok(if progress {
            Round::Progress
        } else {
            Round::Stalled(due)
        })
    }

    /// Counts a refusal of one event. Returns true when the event left the
    /// spool (dead-lettered or quarantined), false while it waits to be
    /// tried again.
    async fn refused(
        &self,
        key: u64,
        envelope: &Envelope,
        refusal: Refusal,
        state: &mut State,
    ) -> Result<bool, String> {
        let retry = state.retries.entry(key).or_insert(Retry {
            attempts: 0,
            not_before: Instant::now(),
        });
        retry.attempts += 1;
        let attempts = retry.attempts;
        if attempts >= self.poison.attempts {
            state.retries.remove(&key);
            self.dead_letter(key, envelope, refusal, attempts, state)
                .await?;
            return Ok(true);
        }
        let wait = RETRY_FIRST
            .saturating_mul(1u32 << (attempts - 1).min(16))
            .min(RETRY_MAX);
        retry.not_before = Instant::now() + wait;
        if let Some(held_back) = state.logs.admit(LOG_REFUSED) {
            warn!(
                id = %envelope.id,
                routing_key = %envelope.routing_key,
                reason = refusal.as_str(),
                attempts,
                max_attempts = self.poison.attempts,
                retry_in = ?wait,
                held_back,
                "broker refused a spooled event; the events behind it go on"
            );
        }
        Ok(false)
    }

    /// Takes a refused event out of the drain: to the dead-letter exchange
    /// if there is one and it confirms, else to quarantine. On a storage
    /// failure the event stays spooled and is tried again.
    async fn dead_letter(
        &self,
        key: u64,
        envelope: &Envelope,
        refusal: Refusal,
        attempts: u32,
        state: &mut State,
    ) -> Result<(), String> {
        let published = match (refusal, self.broker.dead_letter_exchange()) {
            (Refusal::TooLarge, _) => Err("larger than --broker-max-message-size".to_owned()),
            (_, None) => Err("no dead-letter exchange configured".to_owned()),
            (_, Some(_)) => self
                .broker
                .publish_dead_letter(envelope, refusal.as_str(), attempts)
                .await
                .map_err(|e| format!("dead-letter publish failed: {e}")),
        };
        match published {
            Ok(()) => {
                self.spool
                    .remove(vec![key])
                    .await
                    .map_err(|e| format!("spool remove failed: {e}"))?;
                self.metrics
                    .spool_dead_lettered
                    .with_label_values(&[refusal.as_str()])
                    .inc();
                if let Some(held_back) = state.logs.admit(LOG_DEAD) {
                    warn!(
                        id = %envelope.id,
                        routing_key = %envelope.routing_key,
                        reason = refusal.as_str(),
                        attempts,
                        held_back,
                        "spooled event moved to the dead-letter exchange"
                    );
                }
            }
            Err(why) => {
                let reason = format!("{} after {attempts} attempts; {why}", refusal.as_str());
                self.spool
                    .quarantine(vec![(key, reason.clone())])
                    .await
                    .map_err(|e| format!("spool quarantine failed: {e}"))?;
                self.metrics
                    .spool_quarantined
                    .with_label_values(&["refused"])
                    .inc();
                if let Some(held_back) = state.logs.admit(LOG_DEAD) {
                    error!(
                        id = %envelope.id,
                        routing_key = %envelope.routing_key,
                        %reason,
                        held_back,
                        "spooled event moved to quarantine (`ocrolus-relay spool list --quarantine`)"
                    );
                }
            }
        }
        Ok(())
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
