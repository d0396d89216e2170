//! `spool stats|list|replay`: see the spool and push its events to the
//! broker, whether the relay runs or not.
//!
//! A running relay holds the spool file's lock, so these commands first ask
//! its admin listener (`--admin-listen`, or `admin_listen` of `--config`, as
//! for `healthcheck`): `GET /spool`,
//! `GET /spool/events`, and for `replay`, `POST /spool/drain`, which makes
//! the relay's own drainer deliver the spool now. Only when no relay answers
//! do they open the file, and they say on stderr which of the two they did.
//! Through the admin listener, event bodies are shown as size and SHA-256
//! only (see `admin/spool.rs`); from the file, in full.
//!
//! `--quarantine` lists or replays the quarantine table: records the relay
//! took out of the drain (unreadable, or refused by the broker and not
//! dead-lettered), which only an operator brings back. With a running
//! relay, `replay --quarantine` has it move the readable ones back into the
//! spool (`POST /spool/quarantine/requeue`), where its drainer delivers
//! them in arrival order, or refuses and dead-letters them again.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use clap::Subcommand;
use http::StatusCode;
use lapin::ConnectionProperties;
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::admin::spool::{Bodies, MAX_LIMIT, event_line, quarantine_line, stats_json};
use crate::broker::Broker;
use crate::cmd::admin_client;
use crate::config::{BrokerArgs, BrokerConfig};
use crate::config_file::ConfigFile;
use crate::event::Envelope;
use crate::metrics::Metrics;
use crate::nodes::Nodes;
use crate::outbox::spool::{SpoolError, SpoolFile};
use crate::units::parse_duration;

/// The spool directory when neither `--spool-dir` nor a running relay says.
const DEFAULT_DIR: &str = "spool";
/// How long to wait for the admin listener to answer one request.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(5);
/// How often `replay` looks at a running relay's spool while it drains.
const DRAIN_POLL: Duration = Duration::from_millis(250);

/// Every flag is accepted before or after the action
/// (`spool --spool-dir X stats` and `spool stats --spool-dir X`).
#[derive(Debug, clap::Args)]
#[command(mut_args = |arg: clap::Arg| arg.global(true))]
pub struct SpoolArgs {
    /// Spool directory [default: the one the relay at --admin-listen uses,
    /// else `spool_dir` of --config, else ./spool].
    #[arg(long, env = "RELAY_SPOOL_DIR")]
    pub spool_dir: Option<PathBuf>,
    /// The running relay's admin listener, as given to `serve` (0.0.0.0 / ::
    /// mean this host); asked first, the file is opened only if no relay
    /// answers [default: `admin_listen` of --config, else 127.0.0.1:9090].
    #[arg(long, env = "RELAY_ADMIN_LISTEN")]
    pub admin_listen: Option<SocketAddr>,
    /// The relay's config file, read for its `admin_listen` and `spool_dir`
    /// only (in the container image RELAY_CONFIG names it).
    #[arg(long, env = "RELAY_CONFIG")]
    pub config: Option<PathBuf>,
    /// Broker to replay to when no relay runs (a running relay uses its own).
    #[command(flatten)]
    pub broker: BrokerArgs,
    #[command(subcommand)]
    pub action: SpoolAction,
}

#[derive(Debug, Subcommand)]
pub enum SpoolAction {
    /// Count and size of spooled events, age of the oldest, quarantine.
    Stats,
    /// Print spooled events as JSON lines (oldest first).
    List {
        /// At most this many (a running relay lists at most 1000 per call).
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// List the quarantine table instead (reason, and the event when readable).
        #[arg(long)]
        quarantine: bool,
    },
    /// Deliver every spooled event now. With a running relay, its drainer
    /// does it (the file is not opened); otherwise publish from the file with
    /// confirms, removing each confirmed event.
    Replay {
        /// Replay the readable records of the quarantine table too
        /// (unreadable ones stay, listed by `list --quarantine`).
        #[arg(long)]
        quarantine: bool,
        /// With a running relay, give up waiting for the spool to empty after
        /// this long (the relay keeps draining).
        #[arg(long, default_value = "5m", value_parser = parse_duration)]
        timeout: Duration,
    },
}

/// Who answers: the running relay, or the file.
enum Owner {
    Relay {
        addr: SocketAddr,
        stats: Value,
    },
    File {
        dir: PathBuf,
        /// Why the file is read, as a sentence for the operator.
        why_not_relay: String,
    },
}

pub async fn run(args: SpoolArgs) -> anyhow::Result<()> {
    let addr = admin_client::address(args.admin_listen, args.config.as_deref())?;
    // The config file's spool is where to read when no relay answers; a
    // relay that answers is trusted for its own unless --spool-dir names one.
    let file_dir = match (&args.spool_dir, &args.config) {
        (Some(dir), _) => dir.clone(),
        (None, Some(path)) => ConfigFile::load(path)?
            .value("spool_dir")
            .map_or_else(|| PathBuf::from(DEFAULT_DIR), PathBuf::from),
        (None, None) => PathBuf::from(DEFAULT_DIR),
    };
    match find_owner(addr, args.spool_dir.as_deref(), file_dir).await {
        Owner::Relay { addr, stats } => {
            eprintln!(
                "spool: asking the running relay at http://{addr} (spool {}); the file is not opened",
                stats["dir"].as_str().unwrap_or("?")
            );
            via_relay(addr, stats, args.action).await
        }
        Owner::File { dir, why_not_relay } => {
            let path = dir.join(crate::outbox::spool::FILE_NAME);
            if !path.exists() {
                bail!(
                    "{why_not_relay}, and there is no spool file at {}: pass the relay's admin \
                     address with --admin-listen (RELAY_ADMIN_LISTEN) or its spool with \
                     --spool-dir (RELAY_SPOOL_DIR)",
                    path.display()
                );
            }
            let spool = match SpoolFile::open(&dir) {
                Err(SpoolError::Locked(file)) => bail!(
                    "the spool file {file} is locked by a running relay, but {why_not_relay}: pass \
                     that relay's admin address with --admin-listen HOST:PORT (or \
                     RELAY_ADMIN_LISTEN), as given to `serve --admin-listen`; or stop the relay \
                     and run this again"
                ),
                opened => {
                    opened.with_context(|| format!("opening the spool in {}", dir.display()))?
                }
            };
            eprintln!(
                "spool: {why_not_relay}; reading the file {} directly",
                path.display()
            );
            via_file(&dir, &spool, args.action, &args.broker).await
        }
    }
}

/// Asks the admin listener at `addr` for its spool; falls back to the file
/// in `file_dir` when no relay answers, or when the one that does serves
/// another spool than `wanted`.
async fn find_owner(addr: SocketAddr, wanted: Option<&Path>, file_dir: PathBuf) -> Owner {
    let file = |why_not_relay: String| Owner::File {
        dir: file_dir,
        why_not_relay,
    };
    let stats = match admin_get(addr, "/spool").await {
        Ok(stats) => stats,
        Err(e) => return file(format!("no relay answered at {addr} ({e:#})")),
    };
    let served = stats["dir"].as_str().map(PathBuf::from);
    if let (Some(wanted), Some(served)) = (wanted, &served) {
        let wanted = std::fs::canonicalize(wanted).unwrap_or_else(|_| wanted.to_path_buf());
        if &wanted != served {
            return file(format!(
                "the relay at {addr} serves the spool {}, not {}",
                served.display(),
                wanted.display()
            ));
        }
    }
    Owner::Relay { addr, stats }
}

/// A JSON answer of the admin listener, or why there is none.
async fn admin_get(addr: SocketAddr, path: &str) -> anyhow::Result<Value> {
    let reply = admin_client::get(addr, path, ADMIN_TIMEOUT).await?;
    if reply.status == StatusCode::NOT_FOUND {
        bail!("GET {path} answered 404: a relay too old for this command, or not a relay");
    }
    let request = reply.request.clone();
    serde_json::from_slice(&reply.ok()?).with_context(|| request)
}

async fn via_relay(addr: SocketAddr, stats: Value, action: SpoolAction) -> anyhow::Result<()> {
    match action {
        SpoolAction::Stats => println!("{stats}"),
        SpoolAction::List { limit, quarantine } => {
            if limit > MAX_LIMIT {
                eprintln!("spool: a running relay lists at most {MAX_LIMIT} events per call");
            }
            let path = format!(
                "/spool/events?limit={}{}",
                limit.clamp(1, MAX_LIMIT),
                if quarantine { "&quarantine=1" } else { "" }
            );
            let body = admin_client::get(addr, &path, ADMIN_TIMEOUT).await?.ok()?;
            print!("{}", String::from_utf8_lossy(&body));
        }
        SpoolAction::Replay {
            quarantine,
            timeout,
        } => drain_now(addr, &stats, quarantine, timeout).await?,
    }
    Ok(())
}

/// `replay` with a running relay: `POST /spool/drain` (and for
/// `--quarantine`, `POST /spool/quarantine/requeue` until nothing readable
/// is left there), then wait until the relay's spool is empty.
async fn drain_now(
    addr: SocketAddr,
    before: &Value,
    quarantine: bool,
    timeout: Duration,
) -> anyhow::Result<()> {
    let count = |v: &Value, field: &str| v[field].as_u64().unwrap_or_default();
    let reply = admin_client::post(addr, "/spool/drain", ADMIN_TIMEOUT).await?;
    let answer: Value = serde_json::from_slice(&reply.body).unwrap_or_default();
    if reply.status == StatusCode::SERVICE_UNAVAILABLE {
        bail!(
            "the relay at {addr} cannot drain now: {}; its {} spooled events stay safe and are \
             delivered once it reconnects (watch `ocrolus-relay spool stats`)",
            answer["reason"].as_str().unwrap_or("no broker connection"),
            count(&answer["spool"], "messages")
        );
    }
    if !reply.status.is_success() {
        bail!(
            "POST http://{addr}/spool/drain answered {}: {}",
            reply.status,
            String::from_utf8_lossy(&reply.body)
        );
    }
    let mut requeued = 0;
    if quarantine {
        let path = format!("/spool/quarantine/requeue?limit={MAX_LIMIT}");
        loop {
            let reply = admin_client::post(addr, &path, ADMIN_TIMEOUT).await?;
            let answer: Value = serde_json::from_slice(&reply.body).unwrap_or_default();
            if reply.status != StatusCode::OK {
                bail!(
                    "POST http://{addr}{path} answered {}: {answer}; {requeued} quarantined \
                     events were moved back into the spool before",
                    reply.status
                );
            }
            let moved = count(&answer, "requeued");
            requeued += moved;
            // Fewer than asked: nothing readable is left. Not "until 0":
            // events refused again may return to quarantine meanwhile.
            if moved < MAX_LIMIT as u64 {
                break;
            }
        }
        eprintln!("spool: {requeued} quarantined events moved back into the spool");
    }
    eprintln!(
        "spool: the relay drains {} spooled events now",
        count(&answer["spool"], "messages") + requeued
    );
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let now = admin_get(addr, "/spool").await?;
        let drained = count(&now, "drained_total").saturating_sub(count(before, "drained_total"));
        let left = count(&now, "messages");
        if left == 0 {
            let quarantined = count(&now, "quarantined");
            let mut summary = json!({ "replayed_by": "relay", "drained": drained, "left": 0,
                                      "quarantined": quarantined });
            if quarantine {
                summary["requeued"] = requeued.into();
            }
            println!("{summary}");
            if quarantined > 0 {
                eprintln!(
                    "spool: {quarantined} records are in quarantine (unreadable, or refused \
                     again): `ocrolus-relay spool list --quarantine` says why"
                );
            }
            return Ok(());
        }
        if now["broker_up"] == false {
            bail!(
                "the relay at {addr} lost its broker connection after draining {drained} events; \
                 {left} stay spooled and are delivered once it reconnects"
            );
        }
        if tokio::time::Instant::now() >= deadline {
            bail!(
                "{left} events still spooled after {timeout:?} ({drained} drained meanwhile); the \
                 relay keeps draining. Events the broker refuses wait out a backoff: see \
                 `ocrolus-relay spool list` and the relay's log"
            );
        }
        tokio::time::sleep(DRAIN_POLL).await;
    }
}

async fn via_file(
    dir: &Path,
    spool: &SpoolFile,
    action: SpoolAction,
    broker: &BrokerArgs,
) -> anyhow::Result<()> {
    match action {
        SpoolAction::Stats => println!("{}", stats_json(dir, &spool.stats()?)),
        SpoolAction::List {
            limit,
            quarantine: true,
        } => {
            for q in spool.quarantined(limit)? {
                println!("{}", quarantine_line(&q, Bodies::Shown));
            }
        }
        SpoolAction::List { limit, .. } => {
            for (seq, e) in spool.list(limit)? {
                println!("{}", event_line(seq, &e, Bodies::Shown));
            }
        }
        SpoolAction::Replay { quarantine, .. } => replay_file(spool, quarantine, broker).await?,
    }
    Ok(())
}

/// `replay` without a relay: publish from the file, with confirms.
async fn replay_file(spool: &SpoolFile, quarantine: bool, args: &BrokerArgs) -> anyhow::Result<()> {
    let nodes = Nodes::from_args(args)?;
    // The publisher refuses to come up without --exchange: say why at once.
    check_exchange(&nodes, &args.exchange)
        .await
        .map_err(|e| left_in_spool(&e, 0))?;
    let broker = Broker::new(
        BrokerConfig {
            nodes: nodes.clone(),
            exchange: args.exchange.clone(),
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
    let result = publish_all(spool, quarantine, &broker, &nodes, &args.exchange).await;
    stop.cancel();
    let _ = supervisor.await;
    let (replayed, unreadable) = result?;
    println!(
        "{}",
        json!({ "replayed": replayed, "unreadable_left_in_quarantine": unreadable })
    );
    Ok(())
}

/// Publishes the spool (or the quarantine) in order; each event leaves the
/// file after its confirm. Returns how many were replayed and how many
/// quarantined records were unreadable.
async fn publish_all(
    spool: &SpoolFile,
    quarantine: bool,
    broker: &Broker,
    nodes: &Nodes,
    exchange: &str,
) -> anyhow::Result<(u64, u64)> {
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
    let mut publisher = Publisher {
        broker,
        nodes,
        default_exchange: exchange,
        checked: HashSet::from([exchange.to_owned()]),
    };
    let mut replayed = 0;
    let mut unreadable = 0;
    if quarantine {
        for q in spool.quarantined(usize::MAX)? {
            let Some(envelope) = q.envelope else {
                unreadable += 1;
                continue;
            };
            publisher.publish(&envelope, replayed).await?;
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
                publisher.publish(&envelope, replayed).await?;
                spool.remove(&[key])?;
                replayed += 1;
            }
        }
    }
    Ok((replayed, unreadable))
}

/// Publishes with confirms, making sure first that each exchange an event
/// is bound for exists: publishing to a missing exchange makes the broker
/// close the channel, which the publisher sees only as "no broker
/// connection".
struct Publisher<'a> {
    broker: &'a Broker,
    nodes: &'a Nodes,
    default_exchange: &'a str,
    checked: HashSet<String>,
}

impl Publisher<'_> {
    async fn publish(&mut self, envelope: &Envelope, replayed: u64) -> anyhow::Result<()> {
        let exchange = envelope
            .exchange
            .as_deref()
            .unwrap_or(self.default_exchange);
        if !self.checked.contains(exchange) {
            check_exchange(self.nodes, exchange)
                .await
                .map_err(|e| left_in_spool(&e, replayed))?;
            self.checked.insert(exchange.to_owned());
        }
        if let Err(e) = self.broker.publish_ordered(envelope).await {
            // The broker's reason, if it has one (the exchange deleted
            // meanwhile, say), instead of "no broker connection".
            check_exchange(self.nodes, exchange)
                .await
                .map_err(|e| left_in_spool(&e, replayed))?;
            bail!(
                "publishing event {} failed ({e}); {replayed} events replayed, the rest stay in \
                 the spool",
                envelope.id
            );
        }
        Ok(())
    }
}

fn left_in_spool(e: &anyhow::Error, replayed: u64) -> anyhow::Error {
    anyhow!("{e:#}; {replayed} events replayed, the rest stay in the spool")
}

/// Asks the broker whether `exchange` exists (a passive declare on a
/// connection of its own). Publishing to a missing exchange makes the
/// broker close the channel, which the publisher only sees as a lost
/// connection; this says why, and what to do.
async fn check_exchange(nodes: &Nodes, exchange: &str) -> anyhow::Result<()> {
    let properties =
        ConnectionProperties::default().with_connection_name("ocrolus-relay spool replay".into());
    let (connection, node) = nodes.connect_first(properties).await?;
    let declared = async {
        let channel = connection.create_channel().await?;
        crate::broker::check_topic(&channel, exchange).await
    }
    .await;
    let _ = connection.close(200, "checked".into()).await;
    match declared {
        Ok(()) => Ok(()),
        Err(e) => match e.kind() {
            lapin::ErrorKind::ProtocolError(amqp)
                if amqp.kind() == &AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND) =>
            {
                Err(anyhow!(
                    "the broker at {node} has no exchange '{exchange}' ({}): pass the relay's \
                     exchange with --exchange (or RELAY_EXCHANGE), or start the relay once so \
                     that it declares it",
                    amqp.get_message()
                ))
            }
            _ => Err(anyhow!(
                "the broker at {node} refused to check the exchange '{exchange}': {e}"
            )),
        },
    }
}
