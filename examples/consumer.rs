//! Example consumer for events published by ocrolus-relay (the Rust twin of
//! examples/consumer.py).
//!
//! ```text
//! cargo run --example consumer -- --binding 'document.#' --binding book.verified
//! ```
//!
//! What a correct consumer does, and this one shows:
//!
//! * declares its own durable queue (quorum by default) with a dead-letter
//!   exchange and a delivery limit, plus a dead-letter queue
//!   `<queue>.dead-letter`, and binds the `--binding` patterns on the relay's
//!   topic exchange (the relay declares that exchange; this consumer never
//!   does);
//! * bounds unacknowledged messages with `basic.qos` (prefetch);
//! * acknowledges a message only after its work is done (here: the JSON line
//!   is written and flushed); a crash before that means redelivery, not loss;
//! * de-duplicates on the AMQP `message_id` (the Ocrolus `Webhook-Request-Id`):
//!   delivery is at least once, so the same event can arrive twice. The set
//!   here is in memory and bounded; a real service records processed ids
//!   where it records the work (a unique key in its database, say);
//! * rejects a body that is not a JSON object without requeue, so the broker
//!   dead-letters it instead of redelivering it forever;
//! * a failed handler requeues the message; after `x-delivery-limit` attempts
//!   the quorum queue dead-letters it;
//! * connects to the first node of `--amqp-url` that answers (one URL per
//!   node of a RabbitMQ cluster, the same list the relay takes in
//!   `RELAY_AMQP_URL`), and reconnects with capped exponential backoff and
//!   jitter, starting each time at the node after the last one tried;
//! * speaks TLS to `amqps://` nodes, with the relay's flag names:
//!   `--amqp-ca-file` for a private CA, `--amqp-client-cert` and
//!   `--amqp-client-key` for mutual TLS.
//!
//! Each event is printed on stdout as one JSON line
//! `{"routing_key": ..., "message_id": ..., "event": <x-ocrolus-event>, "body": <JSON body>}`;
//! diagnostics go to stderr. Exit status: 0 after `--max-messages`, 130 on
//! Ctrl-C / SIGTERM, 2 when the broker refuses the topology (retrying cannot help).

use std::collections::{HashSet, VecDeque};
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
    ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::tcp::{OwnedIdentity, OwnedTLSConfig};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{Connection, ConnectionProperties, ErrorKind, ExchangeKind};
use serde_json::{Value, json};

#[derive(Debug, Parser)]
#[command(about = "Example consumer for ocrolus-relay events (prints JSON lines)")]
struct Args {
    /// Broker URL; repeat it (or separate with commas) for the nodes of a
    /// cluster, tried in order. Default: `$RELAY_AMQP_URL`, else `$AMQP_URL`,
    /// else amqp://guest:guest@127.0.0.1:5672/%2f.
    #[arg(long, env = "RELAY_AMQP_URL", value_delimiter = ',')]
    amqp_url: Vec<String>,
    /// amqps://: PEM CA certificate(s) that sign the broker's certificate,
    /// trusted on top of the system's.
    #[arg(long, env = "RELAY_AMQP_CA_FILE")]
    amqp_ca_file: Option<PathBuf>,
    /// amqps://: PEM client certificate chain for mutual TLS.
    #[arg(long, env = "RELAY_AMQP_CLIENT_CERT", requires = "amqp_client_key")]
    amqp_client_cert: Option<PathBuf>,
    /// PEM private key of `--amqp-client-cert`.
    #[arg(long, env = "RELAY_AMQP_CLIENT_KEY", requires = "amqp_client_cert")]
    amqp_client_key: Option<PathBuf>,
    /// The relay's topic exchange.
    #[arg(long, default_value = "ocrolus.events")]
    exchange: String,
    /// Durable queue to declare and consume.
    #[arg(long, default_value = "ocrolus-example-consumer-rs")]
    queue: String,
    /// Binding pattern, repeatable (topic words: `*` = one word, `#` = any).
    #[arg(long = "binding", default_value = "document.#")]
    bindings: Vec<String>,
    /// Exchange that receives this queue's dead letters.
    #[arg(long, default_value = "ocrolus.dlx")]
    dead_letter_exchange: String,
    #[arg(long, value_enum, default_value = "quorum")]
    queue_type: QueueType,
    /// Quorum queues: dead-letter after this many redeliveries.
    #[arg(long, default_value_t = 5)]
    delivery_limit: i32,
    /// basic.qos prefetch count.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u16).range(1..))]
    prefetch: u16,
    /// How many processed message ids to remember.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    dedup_size: u64,
    /// Exit after N events have been processed (0 = run forever).
    #[arg(long, default_value_t = 0)]
    max_messages: u64,
    /// Longest wait between reconnection attempts, seconds.
    #[arg(long, default_value_t = 30.0)]
    max_backoff: f64,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum QueueType {
    Quorum,
    Classic,
}

/// Why a session with the broker ended.
enum End {
    /// `--max-messages` reached.
    Done,
    /// The connection or channel went away: reconnect.
    Lost(String),
    /// The broker refused the topology (access refused, precondition failed).
    Fatal(String),
}

impl From<lapin::Error> for End {
    fn from(e: lapin::Error) -> Self {
        match e.kind() {
            ErrorKind::ProtocolError(amqp) if matches!(amqp.get_id(), 403 | 406) => {
                Self::Fatal(e.to_string())
            }
            _ => Self::Lost(e.to_string()),
        }
    }
}

/// Bounded set of processed message ids; the oldest is forgotten first.
struct SeenIds {
    capacity: usize,
    order: VecDeque<String>,
    ids: HashSet<String>,
}

impl SeenIds {
    fn new(capacity: usize) -> Self {
        Self {
            capacity,
            order: VecDeque::new(),
            ids: HashSet::new(),
        }
    }

    fn contains(&self, id: &str) -> bool {
        self.ids.contains(id)
    }

    fn insert(&mut self, id: String) {
        if self.ids.insert(id.clone()) {
            self.order.push_back(id);
        }
        while self.order.len() > self.capacity {
            if let Some(old) = self.order.pop_front() {
                self.ids.remove(&old);
            }
        }
    }
}

struct Consumer {
    args: Args,
    /// CA and client certificate for `amqps://` nodes.
    tls: OwnedTLSConfig,
    seen: SeenIds,
    processed: u64,
    /// Connection attempts so far; picks the node of the next one.
    sessions: usize,
}

fn log(msg: impl std::fmt::Display) {
    eprintln!("consumer: {msg}");
}

#[tokio::main]
async fn main() -> ExitCode {
    let mut args = Args::parse();
    if args.amqp_url.is_empty() {
        let urls = std::env::var("AMQP_URL")
            .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
        args.amqp_url = urls.split(',').map(str::to_owned).collect();
    }
    args.amqp_url = args
        .amqp_url
        .iter()
        .map(|u| u.trim().to_owned())
        .filter(|u| !u.is_empty())
        .collect();
    if args.amqp_url.is_empty() {
        log("--amqp-url: no address given");
        return ExitCode::from(2);
    }
    let tls = match tls_config(&args) {
        Ok(tls) => tls,
        Err(e) => {
            log(e);
            return ExitCode::from(2);
        }
    };
    let capacity = usize::try_from(args.dedup_size).unwrap_or(usize::MAX);
    let mut consumer = Consumer {
        args,
        tls,
        seen: SeenIds::new(capacity),
        processed: 0,
        sessions: 0,
    };
    tokio::select! {
        code = consumer.run() => code,
        _ = shutdown_signal() => {
            // Dropping the connection returns unacknowledged messages to the
            // queue at once.
            log("interrupted");
            ExitCode::from(130)
        }
    }
}

/// The TLS files, read once at start: a missing file is a mistake to report,
/// not a connection failure to retry.
fn tls_config(args: &Args) -> Result<OwnedTLSConfig, String> {
    let read = |flag: &str, path: &PathBuf| {
        std::fs::read(path).map_err(|e| format!("{flag} {}: {e}", path.display()))
    };
    let cert_chain = match &args.amqp_ca_file {
        Some(path) => Some(
            String::from_utf8(read("--amqp-ca-file", path)?)
                .map_err(|_| format!("--amqp-ca-file {}: not PEM text", path.display()))?,
        ),
        None => None,
    };
    let identity = match (&args.amqp_client_cert, &args.amqp_client_key) {
        (Some(cert), Some(key)) => Some(OwnedIdentity::PKCS8 {
            pem: read("--amqp-client-cert", cert)?,
            key: read("--amqp-client-key", key)?,
        }),
        _ => None,
    };
    Ok(OwnedTLSConfig {
        identity,
        cert_chain,
    })
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

impl Consumer {
    /// The reconnect loop: one session per connection, capped exponential
    /// backoff with jitter between them.
    async fn run(&mut self) -> ExitCode {
        let mut backoff: f64 = 0.0;
        loop {
            match self.session(&mut backoff).await {
                End::Done => return ExitCode::SUCCESS,
                End::Fatal(why) => {
                    log(format!("broker refused: {why}"));
                    return ExitCode::from(2);
                }
                End::Lost(why) => log(format!("connection lost: {why}")),
            }
            backoff = (backoff * 2.0).clamp(0.5, self.args.max_backoff.max(0.5));
            let delay = backoff * rand::random_range(0.5..=1.0);
            log(format!("reconnecting in {delay:.1}s"));
            tokio::time::sleep(Duration::from_secs_f64(delay)).await;
        }
    }

    async fn session(&mut self, backoff: &mut f64) -> End {
        let properties = ConnectionProperties::default().with_connection_name(
            format!(
                "ocrolus-relay-example-consumer-rs pid={}",
                std::process::id()
            )
            .into(),
        );
        // A cluster: every node in turn until one answers, starting after
        // the node of the last session, so that a node that died under us is
        // tried last.
        let nodes = self.args.amqp_url.len();
        let mut last_error = None;
        let mut connected = None;
        for attempt in 0..nodes {
            let url = &self.args.amqp_url[(self.sessions + attempt) % nodes];
            match self.connect(url, properties.clone()).await {
                Ok(connection) => {
                    self.sessions += attempt + 1;
                    connected = Some(connection);
                    break;
                }
                Err(e) => {
                    log(format!("{}: {e}", redact(url)));
                    last_error = Some(e);
                }
            }
        }
        let Some(connection) = connected else {
            self.sessions += 1;
            return last_error.map_or_else(|| End::Lost("no node".into()), End::from);
        };
        let end = self
            .consume(&connection, backoff)
            .await
            .unwrap_or_else(End::from);
        if matches!(end, End::Done) {
            let _ = connection.close(200, "done".into()).await;
        }
        end
    }

    async fn connect(
        &self,
        url: &str,
        properties: ConnectionProperties,
    ) -> lapin::Result<Connection> {
        let runtime = lapin::runtime::default_runtime()?;
        Connection::connect_with_config(url, properties, self.tls.clone(), runtime).await
    }

    async fn consume(&mut self, connection: &Connection, backoff: &mut f64) -> lapin::Result<End> {
        let channel = connection.create_channel().await?;
        self.declare(&channel).await?;
        let mut deliveries = channel
            .basic_consume(
                self.args.queue.as_str().into(),
                ShortString::from(String::new()),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        log(format!(
            "consuming {} (bindings {} on {})",
            self.args.queue,
            self.args.bindings.join(", "),
            self.args.exchange
        ));
        *backoff = 0.0;
        while let Some(delivery) = deliveries.next().await {
            if self.on_message(delivery?).await? {
                return Ok(End::Done);
            }
        }
        Ok(End::Lost("the broker cancelled the consumer".into()))
    }

    /// The consumer's own topology; the relay's exchange must already exist.
    async fn declare(&self, channel: &lapin::Channel) -> lapin::Result<()> {
        let a = &self.args;
        let dead_letters = format!("{}.dead-letter", a.queue);
        channel
            .exchange_declare(
                a.dead_letter_exchange.as_str().into(),
                ExchangeKind::Topic,
                ExchangeDeclareOptions {
                    durable: true,
                    ..ExchangeDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await?;
        channel
            .queue_declare(
                dead_letters.as_str().into(),
                QueueDeclareOptions::durable(),
                FieldTable::default(),
            )
            .await?;
        // Dead letters carry this queue's name as routing key (the original
        // key stays in the x-death header).
        channel
            .queue_bind(
                dead_letters.as_str().into(),
                a.dead_letter_exchange.as_str().into(),
                a.queue.as_str().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;

        let mut arguments = FieldTable::default();
        let text = |s: &str| AMQPValue::LongString(s.into());
        arguments.insert(
            "x-dead-letter-exchange".into(),
            text(&a.dead_letter_exchange),
        );
        arguments.insert("x-dead-letter-routing-key".into(), text(&a.queue));
        if matches!(a.queue_type, QueueType::Quorum) {
            arguments.insert("x-queue-type".into(), text("quorum"));
            arguments.insert(
                "x-delivery-limit".into(),
                AMQPValue::LongInt(a.delivery_limit),
            );
            // Dead-letter at least once (needs overflow reject-publish).
            arguments.insert("x-dead-letter-strategy".into(), text("at-least-once"));
            arguments.insert("x-overflow".into(), text("reject-publish"));
        }
        channel
            .queue_declare(
                a.queue.as_str().into(),
                QueueDeclareOptions::durable(),
                arguments,
            )
            .await?;
        for pattern in &a.bindings {
            channel
                .queue_bind(
                    a.queue.as_str().into(),
                    a.exchange.as_str().into(),
                    pattern.as_str().into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await?;
        }
        channel
            .basic_qos(a.prefetch, BasicQosOptions::default())
            .await
    }

    /// Handles one delivery; `Ok(true)` once `--max-messages` is reached.
    async fn on_message(&mut self, delivery: Delivery) -> lapin::Result<bool> {
        let properties = &delivery.properties;
        let message_id = properties
            .message_id()
            .as_ref()
            .map(std::string::ToString::to_string);
        let routing_key = delivery.routing_key.to_string();

        let Ok(body @ Value::Object(_)) = serde_json::from_slice::<Value>(&delivery.data) else {
            log(format!(
                "poison message {} ({routing_key}): body is not a JSON object; dead-lettering it",
                message_id.as_deref().unwrap_or("-")
            ));
            delivery
                .nack(BasicNackOptions {
                    requeue: false,
                    ..BasicNackOptions::default()
                })
                .await?;
            return Ok(false);
        };

        if let Some(id) = message_id.as_deref()
            && self.seen.contains(id)
        {
            log(format!(
                "duplicate {id} ({routing_key}), acknowledged without processing"
            ));
            delivery.ack(BasicAckOptions::default()).await?;
            return Ok(false);
        }

        let event = properties
            .headers()
            .as_ref()
            .and_then(|h| h.inner().get("x-ocrolus-event"))
            .and_then(|v| match v {
                AMQPValue::LongString(s) => {
                    Some(String::from_utf8_lossy(s.as_bytes()).into_owned())
                }
                AMQPValue::ShortString(s) => Some(s.to_string()),
                _ => None,
            });
        if let Err(e) = handle(&routing_key, message_id.as_deref(), event.as_deref(), body) {
            log(format!(
                "handler failed for {}: {e}; requeueing",
                message_id.as_deref().unwrap_or("-")
            ));
            delivery
                .nack(BasicNackOptions {
                    requeue: true,
                    ..BasicNackOptions::default()
                })
                .await?;
            return Ok(false);
        }

        // The work is done: now, and only now, acknowledge.
        delivery.ack(BasicAckOptions::default()).await?;
        if let Some(id) = message_id {
            self.seen.insert(id);
        }
        self.processed += 1;
        Ok(self.args.max_messages > 0 && self.processed >= self.args.max_messages)
    }
}

/// The work. Replace with your own; an error has the message retried.
fn handle(
    routing_key: &str,
    message_id: Option<&str>,
    event: Option<&str>,
    body: Value,
) -> std::io::Result<()> {
    let line = json!({
        "routing_key": routing_key,
        "message_id": message_id,
        "event": event,
        "body": body,
    });
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}")?;
    out.flush()
}

/// A URL for the log, without its password.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}://…@{}", &url[..scheme], &url[at + 1..])
        }
        _ => url.to_owned(),
    }
}
