//! What `relay-bench` (src/main.rs) and `relay-floor` (src/bin) share:
//! publishing one message exactly as the relay publishes it.

use lapin::options::BasicPublishOptions;
use lapin::{Channel, Confirmation};
use ocrolus_relay::{Envelope, properties};

/// Publishes `envelope` to `exchange` under its routing key with the
/// relay's own message properties, mandatory, and waits for the confirm.
pub async fn publish_as_the_relay(
    channel: &Channel,
    exchange: &str,
    envelope: &Envelope,
) -> lapin::Result<Confirmation> {
    channel
        .basic_publish(
            exchange.into(),
            envelope.routing_key.as_str().into(),
            BasicPublishOptions {
                mandatory: true,
                ..BasicPublishOptions::default()
            },
            &envelope.body,
            properties(envelope),
        )
        .await?
        .await
}
