//! `tail`: bind a temporary, exclusive queue to the exchange and print each
//! event as one JSON line, exactly as consumers receive it.

use anyhow::Context;
use futures_util::StreamExt;
use lapin::ConnectionProperties;
use lapin::options::{BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use serde_json::{Map, Value, json};

use crate::config::BrokerArgs;
use crate::nodes::Nodes;

#[derive(Debug, clap::Args)]
pub struct TailArgs {
    #[command(flatten)]
    pub broker: BrokerArgs,
    /// Binding pattern (repeatable), e.g. 'document.#'.
    #[arg(long = "binding", default_value = "#")]
    pub bindings: Vec<String>,
    /// Exit after this many events.
    #[arg(long)]
    pub max: Option<u64>,
}

pub async fn run(args: TailArgs) -> anyhow::Result<()> {
    let Watch {
        connection,
        node,
        mut consumer,
    } = watch(&args.broker, &args.bindings, "ocrolus-relay-tail").await?;
    eprintln!(
        "tailing exchange {} with {:?} on node {node}",
        args.broker.exchange, args.bindings
    );
    let mut seen = 0;
    while let Some(delivery) = consumer.next().await {
        let delivery = delivery?;
        println!("{}", render(&delivery));
        seen += 1;
        if args.max.is_some_and(|max| seen >= max) {
            break;
        }
    }
    let _ = connection.close(200, "tail done".into()).await;
    Ok(())
}

/// The broker's own words, without lapin's repetition of them, and what to
/// do about the usual cause.
/// A temporary queue bound to `--exchange` with `bindings` and consumed
/// without acks: what `tail` prints, and what `ocrolus webhooks test`
/// watches for Ocrolus' test event. The queue goes with the connection.
pub struct Watch {
    pub connection: lapin::Connection,
    /// The broker node (`host:port`) that answered.
    pub node: String,
    pub consumer: lapin::Consumer,
}

pub async fn watch(broker: &BrokerArgs, bindings: &[String], tag: &str) -> anyhow::Result<Watch> {
    let nodes = Nodes::from_args(broker)?;
    let (connection, node) = nodes
        .connect_first(ConnectionProperties::default())
        .await
        .context("connecting to the broker")?;
    let channel = connection.create_channel().await?;
    let queue = channel
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    for binding in bindings {
        channel
            .queue_bind(
                queue.name().clone(),
                broker.exchange.as_str().into(),
                binding.as_str().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| bind_failed(&e, &broker.exchange))?;
    }
    let consumer = channel
        .basic_consume(
            queue.name().clone(),
            tag.into(),
            BasicConsumeOptions {
                no_ack: true,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    Ok(Watch {
        node: node.to_owned(),
        connection,
        consumer,
    })
}

fn bind_failed(e: &lapin::Error, exchange: &str) -> anyhow::Error {
    match e.kind() {
        lapin::ErrorKind::ProtocolError(amqp) if amqp.get_id() == 404 => anyhow::anyhow!(
            "binding to exchange {exchange}: {}; the relay declares it when it starts \
             (unless --no-declare), or pass --exchange with the relay's exchange",
            amqp.get_message()
        ),
        lapin::ErrorKind::ProtocolError(amqp) => {
            anyhow::anyhow!("binding to exchange {exchange}: {}", amqp.get_message())
        }
        _ => anyhow::anyhow!("binding to exchange {exchange}: {e}"),
    }
}

/// One delivery as a JSON line: routing key, properties, headers, body.
pub fn render(delivery: &lapin::message::Delivery) -> Value {
    let p = &delivery.properties;
    let text = |v: &Option<lapin::types::ShortString>| v.as_ref().map(|s| s.as_str().to_owned());
    let headers: Map<String, Value> = p
        .headers()
        .as_ref()
        .map(|h| {
            h.inner()
                .iter()
                .map(|(k, v)| (k.as_str().to_owned(), amqp_value(v)))
                .collect()
        })
        .unwrap_or_default();
    let body = match serde_json::from_slice::<Value>(&delivery.data) {
        Ok(json) => json,
        Err(_) => Value::String(String::from_utf8_lossy(&delivery.data).into_owned()),
    };
    json!({
        "routing_key": delivery.routing_key.as_str(),
        "exchange": delivery.exchange.as_str(),
        "message_id": text(p.message_id()),
        "type": text(p.kind()),
        "timestamp": p.timestamp(),
        "delivery_mode": p.delivery_mode(),
        "headers": headers,
        "body": body,
    })
}

fn amqp_value(v: &AMQPValue) -> Value {
    match v {
        AMQPValue::LongString(s) => {
            Value::String(String::from_utf8_lossy(s.as_bytes()).into_owned())
        }
        AMQPValue::ShortString(s) => Value::String(s.as_str().to_owned()),
        AMQPValue::Boolean(b) => Value::Bool(*b),
        AMQPValue::LongLongInt(i) => json!(i),
        AMQPValue::LongInt(i) => json!(i),
        AMQPValue::Timestamp(t) => json!(t),
        other => Value::String(format!("{other:?}")),
    }
}
