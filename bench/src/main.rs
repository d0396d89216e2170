//! `relay-bench`: load generator for ocrolus-relay and its direct-publish
//! baseline. Not part of the relay; `bench/run.sh` drives it and
//! BENCHMARKS.md explains the method and the figures.
//!
//! * `relay`    — pre-signed, realistic deliveries over keep-alive HTTP/1.1
//!   connections (one per worker), closed loop (`--concurrency`) or open loop
//!   at a fixed rate (`--rate`); plaintext or TLS (`--url https://`).
//! * `baseline` — the same bodies published straight to RabbitMQ with lapin:
//!   confirms, mandatory, persistent, the relay's own properties; each worker
//!   awaits its confirm before the next publish, like a relay request.
//! * `flood`    — forged-signature requests from many connections, with
//!   genuine deliveries at a fixed rate from a second source address; the
//!   relay's CPU per rejected request and the genuine p99.
//! * `idle`     — opens K keep-alive connections (one delivery each), holds
//!   them and reports the relay's RSS and KiB per connection; with
//!   `--no-request` ([`silent`]) the connections send no request at all.
//! * `setup` / `purge` / `teardown` — the bench exchange and its one queue.
//!
//! Latency is measured per request from the moment it is handed to the
//! connection until the whole answer is read, in microseconds (hdrhistogram).
//! Output: one human line on stderr and one JSON object on stdout (and
//! appended to `--json-out`).
//!
//! Modules: [`load`] (bodies, signing, schedule, tallies), [`relay`] (the
//! relay and idle modes), [`flood`] (the flood mode), [`amqp`] (baseline and topology), [`procfs`] (RSS
//! and CPU time of the processes under test), [`report`] (the result lines).

mod amqp;
mod flood;
mod load;
mod procfs;
mod relay;
mod report;
mod silent;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "relay-bench", about = "Load generator for ocrolus-relay")]
struct Cli {
    /// Tokio worker threads of the load generator (it shares the CPUs with
    /// the relay and RabbitMQ, so keep it small).
    #[arg(long, global = true, default_value_t = 1)]
    threads: usize,
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Debug, Subcommand)]
enum Mode {
    /// Signed webhooks over HTTP(S) to the relay.
    Relay(relay::RelayArgs),
    /// The same bodies published directly to RabbitMQ with confirms.
    Baseline(amqp::BaselineArgs),
    /// Forged-signature flood from many connections, with genuine
    /// deliveries at a fixed rate from another address.
    Flood(flood::FloodArgs),
    /// Hold K idle keep-alive connections and report the relay's RSS.
    Idle(relay::IdleArgs),
    /// Declare the bench exchange (topic, durable) and one queue bound with '#'.
    Setup(amqp::TopologyArgs),
    /// Purge the bench queue.
    Purge(amqp::TopologyArgs),
    /// Delete the bench queue and exchange.
    Teardown(amqp::TopologyArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cli.threads.max(1))
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        match cli.mode {
            Mode::Relay(args) => relay::run(args).await,
            Mode::Baseline(args) => amqp::baseline(args).await,
            Mode::Flood(args) => flood::flood(args).await,
            Mode::Idle(args) => relay::idle(args).await,
            Mode::Setup(args) => amqp::setup(&args).await,
            Mode::Purge(args) => amqp::purge(&args).await,
            Mode::Teardown(args) => amqp::teardown(&args).await,
        }
    })
}
