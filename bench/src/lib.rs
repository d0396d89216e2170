//! What `relay-bench` (src/main.rs) and `relay-floor` (src/bin) share:
//! connecting, opening confirm channels and publishing one message exactly as the
//! relay does.

use anyhow::Context;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{Channel, Confirmation, Connection, ConnectionProperties};
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

/// A connection to RabbitMQ at `url`.
pub async fn connect(url: &str) -> anyhow::Result<Connection> {
    Connection::connect(url, ConnectionProperties::default())
        .await
        .context("connecting to RabbitMQ")
}

/// One connection with `count` confirm-mode channels (at least one), as
/// the relay opens them for `--publish-channels`.
pub async fn confirm_channels(
    url: &str,
    count: usize,
) -> anyhow::Result<(Connection, Vec<Channel>)> {
    let connection = connect(url).await?;
    let mut channels = Vec::new();
    for _ in 0..count.max(1) {
        let channel = connection.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        channels.push(channel);
    }
    Ok((connection, channels))
}
