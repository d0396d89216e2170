//! Steps 11-12 together: the promise behind a 200. An event is safe once the
//! broker confirmed it or the spool fsynced it; anything else is an error the
//! caller answers with 503 so that Ocrolus retries.

use std::sync::Arc;

use tracing::debug;

use crate::broker::Broker;
use crate::event::Envelope;
use crate::spool::{Spool, SpoolError};

/// Where a safe event is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Safe {
    Published,
    Spooled,
}

pub struct Outbox {
    pub broker: Arc<Broker>,
    pub spool: Arc<Spool>,
}

impl Outbox {
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
}
