//! Pipeline step 11: publish to RabbitMQ and wait for the publisher confirm.
//!
//! A supervisor task owns the connection: it connects with capped, jittered
//! exponential backoff, declares the topology, opens the confirm channels,
//! watches `connection.blocked` and reconnects when the connection dies or a
//! publish times out.
//!
//! With several addresses (the nodes of a cluster, [`Nodes`]) it starts at a
//! random one, so that replicas spread over the nodes, and after a lost link,
//! a failed connect, a confirm timeout, a link that has only nacked for a
//! confirm timeout, or (with more than one node) a blocked connection it
//! moves on to the next address in list order: a dead node is never waited
//! for while another answers.
//!
//! Why nacks count: after the node holding a quorum queue's leader dies, a
//! channel opened on another node before the new leader is elected can be
//! left refusing every publish to that queue (RabbitMQ 3.10 was seen nacking
//! for minutes on such a channel, while fresh channels on the same node were
//! acked). Each nack spools one event, so the relay would spool everything
//! while "connected". A link whose publishes were all nacked for a whole
//! confirm timeout, [`NACK_RUN`] of them at least, is replaced like one that
//! timed out. A few nacks (a poison event retried by the drainer, a full
//! queue with `reject-publish` now and then) are not enough. Requests never wait for a reconnect and no lock is held
//! across a publish: they take the current link (an `Arc` swap) and publish on
//! one of its channels, many in flight at once.
//!
//! Only `Confirmation::Ack(None)` is success: `Ack(Some(returned))` means the
//! mandatory message was unroutable, `Nack` means the broker did not take it,
//! and `NotRequested` would mean confirms were never enabled.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use futures_util::StreamExt;
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind,
};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::backoff::Backoff;
use crate::config::BrokerConfig;
use crate::event::{Envelope, UNCLASSIFIED_KEY, metric_label, unclassified_reason};
use crate::metrics::Metrics;
use crate::nodes::{ConnectFailure, Nodes};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// A link that lived this long was healthy: when it breaks, the next node is
/// tried at once and the backoff starts over. A shorter-lived one (a node
/// that accepts and then blocks or drops us) goes through the backoff, so a
/// sick cluster is not hammered with connects.
const STABLE_LINK: Duration = Duration::from_secs(30);
/// How long a clean close (`connection.close` / `close-ok`) may take at
/// shutdown before the socket is simply dropped.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);
/// Nacks in a row, with no ack between them, that can make a link broken
/// (once they have also lasted a confirm timeout). More than the drainer
/// makes retrying a poison event (`--poison-attempts`, 5 by default) on an
/// otherwise quiet link; far fewer than a refusing channel under load gives
/// in one confirm timeout.
const NACK_RUN: u32 = 16;

/// Why a publish was not confirmed; also the `reason` label of
/// `publish_failures_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PublishError {
    #[error("broker nacked the message")]
    Nack,
    #[error("message was unroutable and returned")]
    Returned,
    #[error("no confirm within the timeout")]
    Timeout,
    #[error("no broker connection")]
    Disconnected,
    #[error("broker blocks publishing (connection.blocked)")]
    Blocked,
}

impl PublishError {
    /// Every value, for the series created at start ([`Broker::add_source`]).
    pub const ALL: &[Self] = &[
        Self::Nack,
        Self::Returned,
        Self::Timeout,
        Self::Disconnected,
        Self::Blocked,
    ];

    /// The `reason` label of `publish_failures_total`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Nack => "nack",
            Self::Returned => "returned",
            Self::Timeout => "timeout",
            Self::Disconnected => "disconnected",
            Self::Blocked => "blocked",
        }
    }
}

/// One established connection and its confirm channels.
struct Link {
    generation: u64,
    /// Index into the configured nodes.
    node: usize,
    channels: Vec<Channel>,
    /// When the link came up.
    opened: Instant,
    /// Nacks since the last ack.
    nacks_in_a_row: AtomicU32,
    /// Milliseconds after `opened` of the first of those nacks.
    first_nack_ms: AtomicU64,
}

impl Link {
    fn new(generation: u64, node: usize, channels: Vec<Channel>) -> Self {
        Self {
            generation,
            node,
            channels,
            opened: Instant::now(),
            nacks_in_a_row: AtomicU32::new(0),
            first_nack_ms: AtomicU64::new(0),
        }
    }

    fn acked(&self) {
        self.nacks_in_a_row.store(0, Ordering::Relaxed);
    }

    /// Counts a nack; true when the nacks since the last ack are at least
    /// [`NACK_RUN`] and the first of them is `limit` old.
    fn only_nacks_for(&self, limit: Duration) -> bool {
        let now = u64::try_from(self.opened.elapsed().as_millis()).unwrap_or(u64::MAX);
        let run = self.nacks_in_a_row.fetch_add(1, Ordering::Relaxed) + 1;
        if run == 1 {
            self.first_nack_ms.store(now, Ordering::Relaxed);
            return false;
        }
        let first = self.first_nack_ms.load(Ordering::Relaxed);
        run >= NACK_RUN && Duration::from_millis(now.saturating_sub(first)) >= limit
    }
}

pub struct Broker {
    config: BrokerConfig,
    link: ArcSwapOption<Link>,
    /// The last node that refused us (TLS or credentials), or an exchange
    /// that is missing or unusable, until a connect succeeds: `/readyz`
    /// reports it instead of quietly spooling.
    rejected: ArcSwapOption<String>,
    blocked: AtomicBool,
    next_channel: AtomicUsize,
    /// Generation a publisher found broken; the supervisor reconnects if it
    /// is still the current one.
    suspect: AtomicU64,
    wake: Notify,
    /// Wakes the spool drainer as soon as a new link is up.
    up: Notify,
    metrics: Arc<Metrics>,
}

impl Broker {
    pub fn new(config: BrokerConfig, metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(Self {
            config,
            link: ArcSwapOption::empty(),
            rejected: ArcSwapOption::empty(),
            blocked: AtomicBool::new(false),
            next_channel: AtomicUsize::new(0),
            suspect: AtomicU64::new(0),
            wake: Notify::new(),
            up: Notify::new(),
            metrics,
        })
    }

    /// Creates a configured source's publish failure series at 0 (one per
    /// reason), so that rates and alerts work before the first failure.
    pub fn add_source(&self, source: &str) {
        for failure in PublishError::ALL {
            self.metrics
                .publish_failures
                .with_label_values(&[failure.as_str(), source]);
        }
    }

    /// True while a confirm channel is open and the broker does not block us.
    pub fn is_up(&self) -> bool {
        self.link.load().is_some() && !self.blocked.load(Ordering::Relaxed)
    }

    /// `host:port` of the node the relay publishes to, if connected.
    pub fn connected_node(&self) -> Option<String> {
        let link = self.link.load();
        link.as_ref()
            .map(|l| self.config.nodes.label(l.node).to_owned())
    }

    /// Why the last connect was refused by a node (bad CA, missing or
    /// untrusted client certificate, wrong credentials), while no link is up.
    pub fn rejected(&self) -> Option<String> {
        if self.link.load().is_some() {
            return None;
        }
        self.rejected.load_full().map(|r| r.as_ref().clone())
    }

    /// Resolves when a link comes up after this call (the drainer waits on
    /// it so that recovery does not wait for a poll interval).
    pub async fn became_up(&self) {
        self.up.notified().await;
    }

    /// Publishes one event and waits for its confirm, bounded by the confirm
    /// timeout. Channels are used round robin.
    pub async fn publish(&self, envelope: &Envelope) -> Result<(), PublishError> {
        self.publish_on(envelope, None).await
    }

    /// Publishes on a fixed channel, so that a sequence keeps its order (the
    /// spool drainer).
    pub async fn publish_ordered(&self, envelope: &Envelope) -> Result<(), PublishError> {
        self.publish_on(envelope, Some(0)).await
    }

    /// The dead-letter exchange, if one is configured.
    pub fn dead_letter_exchange(&self) -> Option<&str> {
        self.config.dead_letter_exchange.as_deref()
    }

    /// Publishes a spooled event the broker kept refusing to the dead-letter
    /// exchange (on the drainer's channel), with why in
    /// `x-relay-dead-letter-reason`. Not counted as published: subscribers
    /// of the main exchange never see it.
    pub async fn publish_dead_letter(
        &self,
        envelope: &Envelope,
        reason: &str,
        attempts: u32,
    ) -> Result<(), PublishError> {
        let exchange = self
            .config
            .dead_letter_exchange
            .as_deref()
            .ok_or(PublishError::Returned)?;
        let mut props = properties(envelope);
        let mut headers = props.headers().clone().unwrap_or_default();
        for (name, value) in [
            (
                "x-relay-dead-letter-reason",
                AMQPValue::LongString(reason.into()),
            ),
            (
                "x-relay-dead-letter-attempts",
                AMQPValue::LongUInt(attempts),
            ),
            (
                "x-relay-original-exchange",
                AMQPValue::LongString(self.exchange_of(envelope).into()),
            ),
            (
                "x-relay-original-routing-key",
                AMQPValue::LongString(envelope.routing_key.as_str().into()),
            ),
        ] {
            headers.insert(name.into(), value);
        }
        props = props.with_headers(headers);
        self.try_publish(exchange, envelope, props, Some(0)).await
    }

    /// Where an event goes: its source's own exchange, else `--exchange`.
    fn exchange_of<'a>(&'a self, envelope: &'a Envelope) -> &'a str {
        envelope
            .exchange
            .as_deref()
            .unwrap_or(self.config.exchange.as_str())
    }

    async fn publish_on(
        &self,
        envelope: &Envelope,
        channel: Option<usize>,
    ) -> Result<(), PublishError> {
        let result = self
            .try_publish(
                self.exchange_of(envelope),
                envelope,
                properties(envelope),
                channel,
            )
            .await;
        let source = &*envelope.source;
        match result {
            Ok(()) => {
                self.metrics
                    .events_published
                    .with_label_values(&[metric_label(&envelope.routing_key), source])
                    .inc();
            }
            Err(e) => self
                .metrics
                .publish_failures
                .with_label_values(&[e.as_str(), source])
                .inc(),
        }
        result
    }

    async fn try_publish(
        &self,
        exchange: &str,
        envelope: &Envelope,
        properties: BasicProperties,
        channel: Option<usize>,
    ) -> Result<(), PublishError> {
        let link = self.link.load_full().ok_or(PublishError::Disconnected)?;
        if self.blocked.load(Ordering::Relaxed) {
            // A blocked broker holds publishes indefinitely: spool at once.
            return Err(PublishError::Blocked);
        }
        let index = channel.unwrap_or_else(|| self.next_channel.fetch_add(1, Ordering::Relaxed));
        let channel = &link.channels[index % link.channels.len()];
        let started = Instant::now();
        let confirmed = tokio::time::timeout(self.config.confirm_timeout, async {
            let confirm = channel
                .basic_publish(
                    exchange.into(),
                    envelope.routing_key.as_str().into(),
                    BasicPublishOptions {
                        mandatory: true,
                        ..BasicPublishOptions::default()
                    },
                    &envelope.body,
                    properties,
                )
                .await
                .map_err(|_| PublishError::Disconnected)?;
            match confirm.await {
                Ok(Confirmation::Ack(None)) => Ok(()),
                Ok(Confirmation::Ack(Some(_))) => Err(PublishError::Returned),
                Ok(Confirmation::Nack(_) | Confirmation::NotRequested) => Err(PublishError::Nack),
                Err(_) => Err(PublishError::Disconnected),
            }
        })
        .await
        .unwrap_or(Err(PublishError::Timeout));
        match confirmed {
            Ok(()) => {
                link.acked();
                self.metrics
                    .confirm_duration
                    .observe(started.elapsed().as_secs_f64());
            }
            Err(PublishError::Timeout | PublishError::Disconnected) => {
                self.report_broken(link.generation);
            }
            Err(PublishError::Nack) if link.only_nacks_for(self.config.confirm_timeout) => {
                self.report_broken(link.generation);
            }
            Err(_) => {}
        }
        confirmed
    }

    fn report_broken(&self, generation: u64) {
        // Only ever raised: a late report about an older link must not hide
        // a report about the current one.
        self.suspect.fetch_max(generation, Ordering::Relaxed);
        self.wake.notify_one();
    }

    /// The supervisor: keeps a healthy link until shutdown.
    pub async fn supervise(self: Arc<Self>, shutdown: CancellationToken) {
        let nodes: Nodes = self.config.nodes.clone();
        let mut backoff = Backoff::default();
        let mut generation = 0u64;
        let mut node = rand::random_range(0..nodes.len());
        while !shutdown.is_cancelled() {
            generation += 1;
            let label = nodes.label(node).to_owned();
            let connected = tokio::select! {
                _ = shutdown.cancelled() => break,
                r = tokio::time::timeout(CONNECT_TIMEOUT, self.connect(node, generation)) => {
                    r.unwrap_or_else(|_| Err(ConnectFailure::Unreachable("connect timed out".into())))
                }
            };
            let delay = match connected {
                Ok((connection, link)) => {
                    if generation > 1 {
                        self.metrics.broker_reconnects.inc();
                    }
                    info!(node = %label, exchange = %self.config.exchange, "broker connected");
                    let since = Instant::now();
                    self.rejected.store(None);
                    self.link.store(Some(Arc::new(link)));
                    self.metrics.broker_up.set(1);
                    self.metrics.broker_node.with_label_values(&[&label]).set(1);
                    self.up.notify_waiters();
                    let reason = self.watch(&connection, generation, &shutdown).await;
                    let link = self.link.swap(None);
                    self.blocked.store(false, Ordering::Relaxed);
                    self.metrics.broker_up.set(0);
                    self.metrics.broker_blocked.set(0);
                    self.metrics.broker_node.with_label_values(&[&label]).set(0);
                    if shutdown.is_cancelled() {
                        // Shutdown: close cleanly and wait for it, so the
                        // broker sees a clean close rather than a reset.
                        // Channels first: closing the connection under open
                        // channels makes lapin log a spurious error.
                        if let Some(link) = link {
                            for channel in &link.channels {
                                let _ = tokio::time::timeout(
                                    CLOSE_TIMEOUT,
                                    channel.close(200, "ocrolus-relay closing".into()),
                                )
                                .await;
                            }
                        }
                        close(connection).await;
                        break;
                    }
                    // A lost link: do not let a dead peer delay the reconnect.
                    tokio::spawn(close(connection));
                    warn!(node = %label, %reason, "broker connection lost; trying the next node");
                    if since.elapsed() >= STABLE_LINK {
                        backoff.reset();
                        Duration::ZERO
                    } else {
                        backoff.next_delay()
                    }
                }
                Err(e) => {
                    self.metrics
                        .broker_connect_failures
                        .with_label_values(&[e.reason().as_str()])
                        .inc();
                    if let ConnectFailure::Rejected(detail) = &e {
                        error!(node = %label, error = %e, "broker node refused the relay");
                        self.rejected
                            .store(Some(Arc::new(format!("{label}: {detail}"))));
                    } else if let ConnectFailure::Topology(detail) = &e {
                        error!(node = %label, error = %e, "an exchange the relay publishes to is not usable; events are spooled until it is");
                        self.rejected
                            .store(Some(Arc::new(format!("{label}: {detail}"))));
                    } else {
                        warn!(node = %label, error = %e, "broker connect failed; trying the next node");
                    }
                    backoff.next_delay()
                }
            };
            node = (node + 1) % nodes.len();
            if !delay.is_zero() {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
        info!("broker supervisor stopped");
    }

    /// Waits until the connection fails, a publisher reports it broken, or
    /// shutdown; tracks blocked/unblocked meanwhile.
    async fn watch(
        &self,
        connection: &Connection,
        generation: u64,
        shutdown: &CancellationToken,
    ) -> String {
        let mut events = connection.events_listener();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return "shutdown".into(),
                _ = self.wake.notified() => {
                    if self.suspect.load(Ordering::Relaxed) == generation {
                        return "publishes failed, timed out or were only nacked".into();
                    }
                }
                event = events.next() => match event {
                    None => return "connection closed".into(),
                    Some(lapin::Event::Error(e)) => return e.to_string(),
                    Some(lapin::Event::ConnectionBlocked(reason)) => {
                        if self.config.nodes.len() > 1 {
                            // Another node may not be blocked (a disk alarm
                            // is per node); a cluster-wide alarm blocks the
                            // next one too, and the backoff paces the tries.
                            return format!("broker blocked publishing: {reason}");
                        }
                        warn!(%reason, "broker blocked publishing");
                        self.blocked.store(true, Ordering::Relaxed);
                        self.metrics.broker_blocked.set(1);
                    }
                    Some(lapin::Event::ConnectionUnblocked) => {
                        info!("broker unblocked publishing");
                        self.blocked.store(false, Ordering::Relaxed);
                        self.metrics.broker_blocked.set(0);
                    }
                    Some(_) => {}
                },
            }
        }
    }

    async fn connect(
        &self,
        node: usize,
        generation: u64,
    ) -> Result<(Connection, Link), ConnectFailure> {
        let properties =
            ConnectionProperties::default().with_connection_name("ocrolus-relay".into());
        let connection = self.config.nodes.connect(node, properties).await?;
        let channels = match self.open_channels(&connection).await {
            Ok(channels) => channels,
            Err(e) => {
                tokio::spawn(close(connection));
                return Err(ConnectFailure::Setup(e.to_string()));
            }
        };
        if let Err(e) = self.topology(&connection).await {
            tokio::spawn(close(connection));
            return Err(ConnectFailure::Topology(e));
        }
        Ok((connection, Link::new(generation, node, channels)))
    }

    async fn open_channels(&self, connection: &Connection) -> lapin::Result<Vec<Channel>> {
        let mut channels = Vec::with_capacity(self.config.channels);
        for _ in 0..self.config.channels {
            let channel = connection.create_channel().await?;
            channel
                .confirm_select(ConfirmSelectOptions::default())
                .await?;
            channels.push(channel);
        }
        Ok(channels)
    }

    /// Declares the exchanges (`--exchange`, each source's own, the
    /// alternate and dead-letter ones) or, with `--no-declare`, checks that
    /// the ones events are published to exist: a publish to a missing
    /// exchange would close the channel and spool every event with no word
    /// of why. On its own channel, which a refusal closes.
    async fn topology(&self, connection: &Connection) -> Result<(), String> {
        let channel = connection
            .create_channel()
            .await
            .map_err(|e| format!("opening a channel: {e}"))?;
        let main = std::iter::once((self.config.exchange.as_str(), "--exchange".to_owned()));
        let sources = self.config.source_exchanges.iter().map(|e| {
            (
                e.name.as_str(),
                format!("the exchange of source {}", e.sources.join(", ")),
            )
        });
        let alternate = self.config.alternate_exchange.as_deref();
        let dead_letter = self.config.dead_letter_exchange.as_deref();
        if self.config.declare {
            declare_fanouts(&channel, alternate, dead_letter)
                .await
                .map_err(|e| format!("declaring the alternate or dead-letter exchange: {e}"))?;
        }
        for (exchange, role) in main.chain(sources) {
            let declared = if self.config.declare {
                declare_topic(&channel, exchange, alternate).await
            } else {
                check_topic(&channel, exchange).await
            };
            declared.map_err(|e| {
                let hint = if self.config.declare {
                    "it may exist with another type or arguments, or the user may not configure it"
                } else {
                    "declare it on the broker, or let the relay declare it (no --no-declare)"
                };
                format!("exchange {exchange} ({role}): {e}; {hint}")
            })?;
        }
        let _ = channel.close(200, "declared".into()).await;
        if self.config.declare {
            for queue in [dead_letter, alternate].into_iter().flatten() {
                // On a cluster these classic queues live on one node each;
                // while that node is down, re-declaring one fails (404, "home
                // node is down"). Publishing needs only the exchanges, so a
                // failure here must not keep the relay off a healthy node.
                // Its own channel: the error closes the channel.
                let Ok(channel) = connection.create_channel().await else {
                    continue;
                };
                match declare_fanout_queue(&channel, queue).await {
                    Ok(()) => {
                        let _ = channel.close(200, "declared".into()).await;
                    }
                    Err(e) => {
                        warn!(queue, error = %e, "could not declare this queue on this node; publishing goes on");
                    }
                }
            }
        }
        Ok(())
    }
}

/// Declares the durable topic exchange and, unless switched off, its
/// alternate exchange and the dead-letter exchange, each a fanout with a
/// durable queue of the same name.
pub async fn declare_topology(
    channel: &Channel,
    exchange: &str,
    alternate_exchange: Option<&str>,
    dead_letter_exchange: Option<&str>,
) -> lapin::Result<()> {
    declare_exchanges(channel, exchange, alternate_exchange, dead_letter_exchange).await?;
    for queue in [dead_letter_exchange, alternate_exchange]
        .into_iter()
        .flatten()
    {
        declare_fanout_queue(channel, queue).await?;
    }
    Ok(())
}

/// The exchanges: cluster-wide metadata, declarable through any node.
async fn declare_exchanges(
    channel: &Channel,
    exchange: &str,
    alternate_exchange: Option<&str>,
    dead_letter_exchange: Option<&str>,
) -> lapin::Result<()> {
    declare_fanouts(channel, alternate_exchange, dead_letter_exchange).await?;
    declare_topic(channel, exchange, alternate_exchange).await
}

const DURABLE: ExchangeDeclareOptions = ExchangeDeclareOptions {
    passive: false,
    durable: true,
    auto_delete: false,
    internal: false,
    nowait: false,
};

/// The dead-letter and alternate exchanges (fanouts).
async fn declare_fanouts(
    channel: &Channel,
    alternate_exchange: Option<&str>,
    dead_letter_exchange: Option<&str>,
) -> lapin::Result<()> {
    for fanout in [dead_letter_exchange, alternate_exchange]
        .into_iter()
        .flatten()
    {
        channel
            .exchange_declare(
                fanout.into(),
                ExchangeKind::Fanout,
                DURABLE,
                FieldTable::default(),
            )
            .await?;
    }
    Ok(())
}

/// A durable topic exchange events are published to, with the alternate
/// exchange (if any) taking what no binding routes.
async fn declare_topic(
    channel: &Channel,
    exchange: &str,
    alternate_exchange: Option<&str>,
) -> lapin::Result<()> {
    let mut arguments = FieldTable::default();
    if let Some(alternate) = alternate_exchange {
        arguments.insert(
            "alternate-exchange".into(),
            AMQPValue::LongString(alternate.into()),
        );
    }
    channel
        .exchange_declare(exchange.into(), ExchangeKind::Topic, DURABLE, arguments)
        .await
}

/// Whether the topic exchange `exchange` exists, without creating it (a
/// passive declare). The broker answers NOT_FOUND and closes the channel
/// when it does not, so callers use a channel they can lose.
pub async fn check_topic(channel: &Channel, exchange: &str) -> lapin::Result<()> {
    channel
        .exchange_declare(
            exchange.into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                passive: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
}

/// The durable queue behind a fanout exchange of the same name (no
/// arguments, as in `deploy/rabbitmq/definitions.json`), bound to it.
async fn declare_fanout_queue(channel: &Channel, name: &str) -> lapin::Result<()> {
    channel
        .queue_declare(
            name.into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    channel
        .queue_bind(
            name.into(),
            name.into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
}

/// The AMQP properties and headers every message carries (docs/subscribers.md,
/// "The message").
pub fn properties(envelope: &Envelope) -> BasicProperties {
    let mut headers = FieldTable::default();
    let mut put = |name: &str, value: &str| {
        headers.insert(name.into(), AMQPValue::LongString(LongString::from(value)));
    };
    if !envelope.event_name.is_empty() {
        put("x-ocrolus-event", &envelope.event_name);
    }
    if envelope.routing_key == UNCLASSIFIED_KEY
        && let Some(reason) = unclassified_reason(&envelope.body)
    {
        put("x-relay-unclassified", reason.as_str());
    }
    if let Some(id) = envelope.dedup_conflict_of() {
        put("x-relay-dedup-conflict", id);
    }
    if let Some(ts) = &envelope.ocrolus_timestamp {
        put("x-ocrolus-timestamp", ts);
    }
    put("x-ocrolus-source", &envelope.source);
    put("x-relay-client-ip", &envelope.client_ip);
    // The formatted time becomes the header's bytes as it is, not a copy.
    headers.insert(
        "x-relay-received-at".into(),
        AMQPValue::LongString(rfc3339_millis(envelope.received_at_ms).into()),
    );
    BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type("application/json".into())
        .with_message_id(envelope.id.as_str().into())
        .with_timestamp(u64::try_from(envelope.received_at_ms / 1000).unwrap_or(0))
        .with_app_id("ocrolus-relay".into())
        .with_type(envelope.routing_key.as_str().into())
        .with_headers(headers)
}

/// `2026-11-26T12:00:00.123Z` from Unix milliseconds. Written digit by
/// digit for four-digit years (every message carries one), through
/// `format!` otherwise.
pub fn rfc3339_millis(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let millis = ms.rem_euclid(1000);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    let (Ok(year @ 0..=9999), Ok(rem), Ok(millis)) =
        (u32::try_from(y), u32::try_from(rem), u32::try_from(millis))
    else {
        return format!(
            "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{millis:03}Z",
            rem / 3600,
            (rem % 3600) / 60,
            rem % 60
        );
    };
    let mut out = String::with_capacity(24);
    for (n, width, then) in [
        (year, 4, '-'),
        (m, 2, '-'),
        (d, 2, 'T'),
        (rem / 3600, 2, ':'),
        ((rem % 3600) / 60, 2, ':'),
        (rem % 60, 2, '.'),
        (millis, 3, 'Z'),
    ] {
        for place in (0..width).rev() {
            out.push(char::from_digit(n / 10u32.pow(place) % 10, 10).unwrap_or('0'));
        }
        out.push(then);
    }
    out
}

/// Howard Hinnant's days-to-civil algorithm.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// Closes a connection, bounded by [`CLOSE_TIMEOUT`]; errors are moot.
async fn close(connection: Connection) {
    let _ = tokio::time::timeout(
        CLOSE_TIMEOUT,
        connection.close(200, "ocrolus-relay closing".into()),
    )
    .await;
}

#[cfg(test)]
mod tests {
    use lapin::types::ShortString;

    use super::*;

    #[test]
    fn rfc3339_formatting() {
        assert_eq!(rfc3339_millis(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            rfc3339_millis(1_767_225_600_123),
            "2026-01-01T00:00:00.123Z"
        );
        assert_eq!(rfc3339_millis(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(rfc3339_millis(-1), "1969-12-31T23:59:59.999Z");
        assert_eq!(
            rfc3339_millis(253_402_300_799_999),
            "9999-12-31T23:59:59.999Z"
        );
        assert_eq!(
            rfc3339_millis(253_402_300_800_000),
            "10000-01-01T00:00:00.000Z"
        );
        // Digit by digit, it writes what format! writes, over the whole
        // four-digit range and either side of it.
        let by_format = |ms: i64| {
            let secs = ms.div_euclid(1000);
            let (y, m, d) = civil_from_days(secs.div_euclid(86_400));
            let rem = secs.rem_euclid(86_400);
            format!(
                "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
                rem / 3600,
                (rem % 3600) / 60,
                rem % 60,
                ms.rem_euclid(1000)
            )
        };
        let (first, last) = (-62_300_000_000_000_i64, 253_500_000_000_000_i64);
        for ms in (first..last).step_by(7_777_777_777) {
            assert_eq!(rfc3339_millis(ms), by_format(ms), "{ms}");
            assert_eq!(rfc3339_millis(ms + 86_399_999), by_format(ms + 86_399_999));
        }
    }

    #[test]
    fn properties_follow_the_design() {
        let env = Envelope {
            id: "req-1".into(),
            routing_key: "book.verified".into(),
            event_name: "BOOK_VERIFIED".into(),
            ocrolus_timestamp: Some("1767225600".into()),
            client_ip: "18.205.30.63".into(),
            received_at_ms: 1_767_225_600_500,
            body: bytes::Bytes::from_static(b"{}"),
            source: "sandbox".into(),
            exchange: None,
        };
        let p = properties(&env);
        assert_eq!(p.delivery_mode(), &Some(2));
        assert_eq!(
            p.message_id().as_ref().map(ShortString::as_str),
            Some("req-1")
        );
        assert_eq!(
            p.kind().as_ref().map(ShortString::as_str),
            Some("book.verified")
        );
        assert_eq!(p.timestamp(), &Some(1_767_225_600));
        let headers = p.headers().as_ref().expect("headers");
        assert!(headers.inner().contains_key("x-ocrolus-event"));
        assert!(headers.inner().contains_key("x-relay-received-at"));
        assert_eq!(
            headers.inner().get("x-ocrolus-source"),
            Some(&AMQPValue::LongString("sandbox".into()))
        );
    }
}
