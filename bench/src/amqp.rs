//! The baseline: the same bodies published straight to RabbitMQ with the
//! relay's own message properties, and the bench exchange and queue, declared
//! with the relay's own topology code.

use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, anyhow};
use clap::Args;
use lapin::options::{
    ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
    QueuePurgeOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Confirmation};
use ocrolus_relay::{Envelope, declare_topology};
use relay_bench::{confirm_channels, connect, publish_as_the_relay};
use serde_json::json;

use crate::load::{LoadArgs, Outcome, Plan, Signed, Tally, body_pool, presign};
use crate::procfs::CpuWatch;
use crate::report::report;

#[derive(Debug, Args)]
pub struct BaselineArgs {
    #[command(flatten)]
    pub load: LoadArgs,
    #[arg(long, default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    pub amqp_url: String,
    /// Exchange to publish to (declare it with `setup`).
    #[arg(long)]
    pub exchange: String,
    /// Confirm channels on the one connection, used round robin by worker
    /// (the relay's --publish-channels).
    #[arg(long, default_value_t = 4)]
    pub channels: usize,
}

#[derive(Debug, Args)]
pub struct TopologyArgs {
    #[arg(long, default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    pub amqp_url: String,
    #[arg(long)]
    pub exchange: String,
    #[arg(long)]
    pub queue: String,
    /// `setup`: make the queue a quorum queue (replicated to a majority of
    /// a cluster's nodes before the confirm), as a production cluster has.
    #[arg(long)]
    pub quorum: bool,
}

/// Publishes one delivery as the relay would: the relay's own envelope and
/// message properties, built per message, mandatory, awaiting the confirm.
async fn publish_one(channel: &Channel, exchange: &str, routing_key: &str, d: &Signed) -> Outcome {
    let envelope = Envelope {
        id: d.id.to_str().unwrap_or("-").to_owned(),
        routing_key: routing_key.to_owned(),
        event_name: routing_key.to_owned(),
        ocrolus_timestamp: d.timestamp.to_str().ok().map(str::to_owned),
        client_ip: "127.0.0.1".to_owned(),
        received_at_ms: ocrolus_relay::now_ms(),
        body: d.body.clone(),
        source: "default".into(),
        exchange: None,
    };
    match publish_as_the_relay(channel, exchange, &envelope).await {
        Ok(Confirmation::Ack(None)) => Outcome::Status(200),
        Ok(Confirmation::Ack(Some(_))) => Outcome::Status(312),
        Ok(_) => Outcome::Status(503),
        Err(_) => Outcome::Error,
    }
}

pub async fn baseline(args: BaselineArgs) -> anyhow::Result<()> {
    let load = args.load;
    let bodies = body_pool(&load.event, load.body_size, load.requests + load.warmup)?;
    // Same shape as the relay's input; the signature is simply not needed.
    let secret = "baseline-does-not-verify-signatures";
    let warm = Arc::new(presign(secret, &bodies, load.warmup)?);
    let measured = Arc::new(presign(secret, &bodies, load.requests)?);
    let (connection, channels) = confirm_channels(&args.amqp_url, args.channels).await?;
    let exchange: Arc<str> = args.exchange.as_str().into();
    let routing_key: Arc<str> = load.event.as_str().into();

    let warm_plan = Arc::new(Plan::new(load.warmup, None, 60.0));
    // The measured plan (and its clock) starts once every worker warmed up.
    let (go_tx, _) = tokio::sync::broadcast::channel::<Arc<Plan>>(1);
    let ready = Arc::new(tokio::sync::Barrier::new(load.concurrency + 1));
    let mut tasks = Vec::new();
    for w in 0..load.concurrency {
        let channel = channels[w % channels.len()].clone();
        let (warm_plan, warm, measured) = (warm_plan.clone(), warm.clone(), measured.clone());
        let (exchange, routing_key, ready) = (exchange.clone(), routing_key.clone(), ready.clone());
        let mut go = go_tx.subscribe();
        tasks.push(tokio::spawn(async move {
            while let Some((i, _)) = warm_plan.take().await {
                publish_one(&channel, &exchange, &routing_key, &warm[i]).await;
            }
            ready.wait().await;
            let plan = go.recv().await?;
            let mut tally = Tally::new()?;
            while let Some((i, lag)) = plan.take().await {
                let t0 = Instant::now();
                let outcome = publish_one(&channel, &exchange, &routing_key, &measured[i]).await;
                tally
                    .hist
                    .saturating_record(t0.elapsed().as_micros().max(1) as u64);
                *tally.outcomes.entry(outcome).or_default() += 1;
                tally.max_lag = tally.max_lag.max(lag);
            }
            anyhow::Ok((tally, Instant::now()))
        }));
    }
    ready.wait().await;
    let cpu = CpuWatch::start(None, load.broker_pid);
    let plan = Arc::new(Plan::new(load.requests, load.rate, load.duration));
    go_tx
        .send(plan.clone())
        .map_err(|_| anyhow!("workers gone"))?;
    let mut tally = Tally::new()?;
    let mut last = plan.start;
    for t in tasks {
        let (worker, done) = t.await??;
        tally.merge(worker)?;
        last = last.max(done);
    }
    let _ = connection.close(200, "bench done".into()).await;
    let extra = json!({ "exchange": args.exchange, "channels": args.channels });
    report(
        "baseline",
        &load,
        extra,
        &tally,
        last - plan.start,
        serde_json::Value::Null,
        &cpu,
    )
}

/// Declares the bench exchange exactly as the relay declares its own (the
/// relay's code, no alternate or dead-letter exchange: bench/run.sh starts
/// the relay with `--alternate-exchange '' --dead-letter-exchange ''`), so
/// the relay's declare at start matches it,
/// plus one durable queue bound with '#'.
pub async fn setup(args: &TopologyArgs) -> anyhow::Result<()> {
    let connection = connect(&args.amqp_url).await?;
    let channel = connection.create_channel().await?;
    declare_topology(&channel, &args.exchange, None, None)
        .await
        .context("declaring the bench exchange")?;
    let mut arguments = FieldTable::default();
    if args.quorum {
        arguments.insert(
            "x-queue-type".into(),
            AMQPValue::LongString("quorum".into()),
        );
    }
    channel
        .queue_declare(
            args.queue.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            arguments,
        )
        .await?;
    channel
        .queue_bind(
            args.queue.as_str().into(),
            args.exchange.as_str().into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let _ = connection.close(200, "setup done".into()).await;
    Ok(())
}

pub async fn purge(args: &TopologyArgs) -> anyhow::Result<()> {
    let connection = connect(&args.amqp_url).await?;
    let channel = connection.create_channel().await?;
    let purged = channel
        .queue_purge(args.queue.as_str().into(), QueuePurgeOptions::default())
        .await?;
    eprintln!("purged {purged} messages from {}", args.queue);
    let _ = connection.close(200, "purge done".into()).await;
    Ok(())
}

pub async fn teardown(args: &TopologyArgs) -> anyhow::Result<()> {
    let connection = connect(&args.amqp_url).await?;
    let channel = connection.create_channel().await?;
    channel
        .queue_delete(args.queue.as_str().into(), QueueDeleteOptions::default())
        .await?;
    channel
        .exchange_delete(
            args.exchange.as_str().into(),
            ExchangeDeleteOptions::default(),
        )
        .await?;
    let _ = connection.close(200, "teardown done".into()).await;
    Ok(())
}
