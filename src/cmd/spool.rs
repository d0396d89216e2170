//! `spool stats|list|replay`: inspect the spool of a stopped relay, or push
//! its events to the broker by hand (the running relay drains it itself).
//! `--quarantine` does the same for the quarantine table: records the relay
//! took out of the drain (unreadable, or refused by the broker and not
//! dead-lettered), which only an operator brings back.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Subcommand;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::broker::Broker;
use crate::config::{BrokerArgs, BrokerConfig};
use crate::metrics::Metrics;
use crate::nodes::Nodes;
use crate::outbox::spool::SpoolFile;

#[derive(Debug, clap::Args)]
pub struct SpoolArgs {
    #[arg(long, env = "RELAY_SPOOL_DIR", default_value = "spool")]
    pub spool_dir: PathBuf,
    #[command(subcommand)]
    pub action: SpoolAction,
}

#[derive(Debug, Subcommand)]
pub enum SpoolAction {
    /// Count and size of spooled events, age of the oldest.
    Stats,
    /// Print spooled events as JSON lines (oldest first).
    List {
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// List the quarantine table instead (reason, raw bytes as base64).
        #[arg(long)]
        quarantine: bool,
    },
    /// Publish every spooled event (with confirms) and remove each confirmed one.
    Replay {
        #[command(flatten)]
        broker: BrokerArgs,
        /// Replay the readable records of the quarantine table instead
        /// (unreadable ones stay, listed by `list --quarantine`).
        #[arg(long)]
        quarantine: bool,
    },
}

pub async fn run(args: SpoolArgs) -> anyhow::Result<()> {
    let spool = SpoolFile::open(&args.spool_dir).with_context(|| {
        format!(
            "opening the spool in {} (is a relay still running on it?)",
            args.spool_dir.display()
        )
    })?;
    match args.action {
        SpoolAction::Stats => {
            let s = spool.stats()?;
            let age = s.oldest_ms.map(|ms| (crate::now_ms() - ms) / 1000);
            println!(
                "{}",
                json!({
                    "messages": s.messages, "bytes": s.bytes, "oldest_age_seconds": age,
                    "quarantined": s.quarantined, "quarantined_bytes": s.quarantined_bytes,
                })
            );
        }
        SpoolAction::List {
            limit,
            quarantine: true,
        } => {
            use base64::Engine;
            for q in spool.quarantined(limit)? {
                let event = q.envelope.as_ref().map(|e| {
                    json!({
                        "id": e.id, "routing_key": e.routing_key, "event": e.event_name,
                        "client_ip": e.client_ip, "received_at_ms": e.received_at_ms,
                        "body": String::from_utf8_lossy(&e.body),
                    })
                });
                println!(
                    "{}",
                    json!({
                        "seq": q.seq, "reason": q.reason, "quarantined_at_ms": q.quarantined_at_ms,
                        "readable": event.is_some(), "event": event,
                        "raw_base64": base64::engine::general_purpose::STANDARD.encode(&q.record),
                    })
                );
            }
        }
        SpoolAction::List { limit, .. } => {
            for (key, e) in spool.list(limit)? {
                println!(
                    "{}",
                    json!({
                        "seq": key, "id": e.id, "routing_key": e.routing_key, "event": e.event_name,
                        "client_ip": e.client_ip, "received_at_ms": e.received_at_ms,
                        "body": String::from_utf8_lossy(&e.body),
                    })
                );
            }
        }
        SpoolAction::Replay { broker, quarantine } => {
            let nodes = Nodes::from_args(&broker)?;
            let broker = Broker::new(
                BrokerConfig {
                    nodes,
                    exchange: broker.exchange,
                    source_exchanges: Vec::new(),
                    alternate_exchange: None,
                    dead_letter_exchange: None,
                    declare: false,
                    confirm_timeout: Duration::from_secs(5),
                    channels: 1,
                },
                Arc::new(Metrics::new()),
            );
            let stop = CancellationToken::new();
            let supervisor = tokio::spawn(broker.clone().supervise(stop.clone()));
            let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
            while !broker.is_up() {
                if tokio::time::Instant::now() > deadline {
                    match broker.rejected() {
                        Some(why) => bail!("broker refuses the connection: {why}"),
                        None => bail!("no broker node reachable"),
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let mut replayed = 0;
            let mut unreadable = 0;
            if quarantine {
                for q in spool.quarantined(usize::MAX)? {
                    let Some(envelope) = q.envelope else {
                        unreadable += 1;
                        continue;
                    };
                    broker.publish_ordered(&envelope).await.with_context(|| {
                        format!(
                            "publishing quarantined event {} ({})",
                            envelope.id, q.reason
                        )
                    })?;
                    spool.remove_quarantined(&[q.seq])?;
                    replayed += 1;
                }
            } else {
                loop {
                    let batch = spool.list(256)?;
                    if batch.is_empty() {
                        break;
                    }
                    for (key, envelope) in batch {
                        broker
                            .publish_ordered(&envelope)
                            .await
                            .with_context(|| format!("publishing spooled event {}", envelope.id))?;
                        spool.remove(&[key])?;
                        replayed += 1;
                    }
                }
            }
            stop.cancel();
            let _ = supervisor.await;
            println!(
                "{}",
                json!({ "replayed": replayed, "unreadable_left_in_quarantine": unreadable })
            );
        }
    }
    Ok(())
}
