//! `relay-bench`: load generator for ocrolus-relay and its direct-publish
//! baseline. Not part of the relay; `bench/run.sh` drives it.
//!
//! * `relay`    — pre-signed, realistic deliveries over keep-alive HTTP/1.1
//!   connections (one per worker), closed loop (`--concurrency`) or open loop
//!   at a fixed rate (`--rate`); plaintext or TLS (`--url https://`).
//! * `baseline` — the same bodies published straight to RabbitMQ with lapin:
//!   confirms, mandatory, persistent, the relay's properties; each worker
//!   awaits its confirm before the next publish, like a relay request.
//! * `idle`     — opens K keep-alive connections (one delivery each), holds
//!   them and reports the relay's RSS.
//! * `setup` / `purge` / `teardown` — the bench exchange and its one queue.
//!
//! Latency is measured per request from the moment it is handed to the
//! connection until the whole answer is read, in microseconds (hdrhistogram).
//! Output: one human line on stderr and one JSON object on stdout (and
//! appended to `--json-out`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use bytes::Bytes;
use clap::{Args, Parser, Subcommand};
use hdrhistogram::Histogram;
use http::{HeaderValue, Request, Uri};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, ExchangeDeleteOptions,
    QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions, QueuePurgeOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties};
use ocrolus_relay::{sample_body, sign, tls_connector};
use rustls_pki_types::ServerName;
use serde_json::json;
use tokio::net::TcpStream;

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
    Relay(RelayArgs),
    /// The same bodies published directly to RabbitMQ with confirms.
    Baseline(BaselineArgs),
    /// Hold K idle keep-alive connections and report the relay's RSS.
    Idle(IdleArgs),
    /// Declare the bench exchange (topic, durable) and one queue bound with '#'.
    Setup(TopologyArgs),
    /// Purge the bench queue.
    Purge(TopologyArgs),
    /// Delete the bench queue and exchange.
    Teardown(TopologyArgs),
}

#[derive(Debug, Clone, Args)]
struct LoadArgs {
    /// Measured requests (pre-signed before the clock starts).
    #[arg(long, default_value_t = 20_000)]
    requests: usize,
    /// Unmeasured requests sent first (connections, JIT-free warm caches).
    #[arg(long, default_value_t = 500)]
    warmup: usize,
    /// Workers, each with its own keep-alive connection (or confirm loop).
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Open loop: start requests at this many per second instead of as fast
    /// as the workers go.
    #[arg(long)]
    rate: Option<f64>,
    /// Stop after this many seconds even if requests are left.
    #[arg(long, default_value_t = 60.0)]
    duration: f64,
    /// Approximate body size in bytes (a padding field fills it up).
    #[arg(long, default_value_t = 1024)]
    body_size: usize,
    /// Event of the generated bodies.
    #[arg(long, default_value = "document.verification_succeeded")]
    event: String,
    /// Free-form label copied into the JSON result.
    #[arg(long, default_value = "")]
    label: String,
    /// Append the JSON result as one line to this file.
    #[arg(long)]
    json_out: Option<PathBuf>,
    /// Relay process whose RSS (VmRSS, VmHWM) and CPU time are reported.
    #[arg(long)]
    relay_pid: Option<u32>,
    /// RabbitMQ process (beam.smp) whose CPU time is reported.
    #[arg(long)]
    broker_pid: Option<u32>,
}

#[derive(Debug, Args)]
struct RelayArgs {
    #[command(flatten)]
    load: LoadArgs,
    /// Webhook URL (http:// or https://).
    #[arg(long, default_value = "http://127.0.0.1:8443/webhooks/ocrolus")]
    url: String,
    /// HMAC secret file; the first secret signs.
    #[arg(long)]
    secret_file: PathBuf,
    /// Extra PEM CA certificate to trust for https:// URLs.
    #[arg(long)]
    ca_file: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct BaselineArgs {
    #[command(flatten)]
    load: LoadArgs,
    #[arg(long, default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    amqp_url: String,
    /// Exchange to publish to (declare it with `setup`).
    #[arg(long)]
    exchange: String,
    /// Confirm channels on the one connection, used round robin by worker
    /// (the relay's --publish-channels).
    #[arg(long, default_value_t = 4)]
    channels: usize,
}

#[derive(Debug, Args)]
struct IdleArgs {
    #[arg(long, default_value = "http://127.0.0.1:8443/webhooks/ocrolus")]
    url: String,
    #[arg(long)]
    secret_file: PathBuf,
    #[arg(long)]
    ca_file: Option<PathBuf>,
    /// Connections to open; each delivers one webhook, then idles.
    #[arg(long, default_value_t = 10_000)]
    connections: usize,
    /// Connections being opened at once.
    #[arg(long, default_value_t = 64)]
    open_concurrency: usize,
    /// Seconds to hold the idle connections.
    #[arg(long, default_value_t = 10.0)]
    hold: f64,
    #[arg(long)]
    relay_pid: Option<u32>,
    #[arg(long, default_value = "")]
    label: String,
    #[arg(long)]
    json_out: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct TopologyArgs {
    #[arg(long, default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    amqp_url: String,
    #[arg(long)]
    exchange: String,
    #[arg(long)]
    queue: String,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cli.threads.max(1))
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        match cli.mode {
            Mode::Relay(args) => relay(args).await,
            Mode::Baseline(args) => baseline(args).await,
            Mode::Idle(args) => idle(args).await,
            Mode::Setup(args) => setup(&args).await,
            Mode::Purge(args) => purge(&args).await,
            Mode::Teardown(args) => teardown(&args).await,
        }
    })
}

// ---------------------------------------------------------------- bodies

/// A realistic delivery body of about `size` bytes: `sample_body` plus a
/// padding string field.
fn padded_body(event: &str, size: usize) -> anyhow::Result<Bytes> {
    let mut value = sample_body(event);
    let base = serde_json::to_vec(&value)?.len() + r#","padding":"""#.len();
    value["padding"] = json!("x".repeat(size.saturating_sub(base)));
    Ok(Bytes::from(serde_json::to_vec(&value)?))
}

/// Distinct bodies to cycle through (each has its own uuids), at most
/// ~64 MiB of them.
fn body_pool(event: &str, size: usize, wanted: usize) -> anyhow::Result<Vec<Bytes>> {
    let count = (64 << 20) / size.max(1);
    (0..wanted.clamp(1, count.clamp(1, 256)))
        .map(|_| padded_body(event, size))
        .collect()
}

/// One signed delivery, ready to send.
#[derive(Clone)]
struct Signed {
    id: HeaderValue,
    timestamp: HeaderValue,
    signature: HeaderValue,
    body: Bytes,
}

fn read_secret(path: &Path) -> anyhow::Result<String> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    text.lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_owned)
        .ok_or_else(|| anyhow!("{}: no secret", path.display()))
}

fn presign(secret: &str, bodies: &[Bytes], count: usize) -> anyhow::Result<Vec<Signed>> {
    let timestamp = (ocrolus_relay::now_ms() / 1000).to_string();
    let ts = HeaderValue::from_str(&timestamp)?;
    (0..count)
        .map(|i| {
            let body = bodies[i % bodies.len()].clone();
            let id = uuid::Uuid::now_v7().to_string();
            let sig = hex::encode(sign(secret.as_bytes(), &timestamp, &id, &body));
            Ok(Signed {
                id: HeaderValue::from_str(&id)?,
                timestamp: ts.clone(),
                signature: HeaderValue::from_str(&sig)?,
                body,
            })
        })
        .collect()
}

// ---------------------------------------------------------------- HTTP

#[derive(Clone)]
struct Target {
    uri: Uri,
    host: String,
    port: u16,
    host_header: HeaderValue,
    tls: Option<(tokio_rustls::TlsConnector, ServerName<'static>)>,
}

impl Target {
    fn new(url: &str, ca_file: Option<&Path>) -> anyhow::Result<Self> {
        let uri: Uri = url.parse().context("--url")?;
        let host = uri
            .host()
            .ok_or_else(|| anyhow!("--url has no host"))?
            .trim_matches(['[', ']'])
            .to_owned();
        let https = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => bail!("--url must be http:// or https://"),
        };
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let host_header =
            HeaderValue::from_str(uri.authority().map(|a| a.as_str()).unwrap_or(host.as_str()))?;
        let tls = if https {
            let name = ServerName::try_from(host.clone())?;
            Some((tls_connector(ca_file)?, name))
        } else {
            None
        };
        Ok(Self {
            uri,
            host,
            port,
            host_header,
            tls,
        })
    }

    async fn connect(&self) -> anyhow::Result<SendRequest<Full<Bytes>>> {
        let tcp = TcpStream::connect((self.host.as_str(), self.port))
            .await
            .with_context(|| format!("connecting to {}:{}", self.host, self.port))?;
        tcp.set_nodelay(true)?;
        match &self.tls {
            Some((connector, name)) => {
                let tls = connector
                    .connect(name.clone(), tcp)
                    .await
                    .context("TLS handshake")?;
                handshake(TokioIo::new(tls)).await
            }
            None => handshake(TokioIo::new(tcp)).await,
        }
    }

    fn request(&self, d: &Signed) -> anyhow::Result<Request<Full<Bytes>>> {
        let mut req = Request::post(self.uri.clone()).body(Full::new(d.body.clone()))?;
        let h = req.headers_mut();
        h.insert(http::header::HOST, self.host_header.clone());
        h.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        h.insert(
            http::header::USER_AGENT,
            HeaderValue::from_static("relay-bench"),
        );
        h.insert("webhook-request-id", d.id.clone());
        h.insert("webhook-timestamp", d.timestamp.clone());
        h.insert("webhook-signature", d.signature.clone());
        Ok(req)
    }
}

async fn handshake<I>(io: I) -> anyhow::Result<SendRequest<Full<Bytes>>>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (sender, conn) = hyper::client::conn::http1::handshake(io).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

/// What one delivery came back as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Outcome {
    Status(u16),
    /// 200 whose body says "spooled" (not confirmed by the broker).
    Spooled,
    Error,
}

impl Outcome {
    fn label(self) -> String {
        match self {
            Self::Status(s) => s.to_string(),
            Self::Spooled => "200_spooled".into(),
            Self::Error => "error".into(),
        }
    }
}

async fn send_one(
    sender: &mut Option<SendRequest<Full<Bytes>>>,
    target: &Target,
    d: &Signed,
    reconnects: &AtomicU64,
) -> Outcome {
    let attempt = async {
        if sender.as_ref().is_none_or(|s| s.is_closed()) {
            if sender.is_some() {
                reconnects.fetch_add(1, Ordering::Relaxed);
            }
            *sender = Some(target.connect().await?);
        }
        let s = sender.as_mut().ok_or_else(|| anyhow!("no connection"))?;
        s.ready().await?;
        let response = s.send_request(target.request(d)?).await?;
        let status = response.status().as_u16();
        let body = response.into_body().collect().await?.to_bytes();
        anyhow::Ok(
            if status == 200 && body.windows(7).any(|w| w == b"spooled") {
                Outcome::Spooled
            } else {
                Outcome::Status(status)
            },
        )
    };
    match attempt.await {
        Ok(outcome) => outcome,
        Err(_) => {
            *sender = None;
            Outcome::Error
        }
    }
}

// ---------------------------------------------------------------- runs

/// Per-worker tallies, merged at the end.
struct Tally {
    hist: Histogram<u64>,
    outcomes: BTreeMap<Outcome, u64>,
    max_lag: Duration,
}

impl Tally {
    fn new() -> anyhow::Result<Self> {
        Ok(Self {
            hist: Histogram::new_with_bounds(1, 60_000_000, 3)?,
            outcomes: BTreeMap::new(),
            max_lag: Duration::ZERO,
        })
    }

    fn merge(&mut self, other: Tally) -> anyhow::Result<()> {
        self.hist.add(&other.hist)?;
        for (k, v) in other.outcomes {
            *self.outcomes.entry(k).or_default() += v;
        }
        self.max_lag = self.max_lag.max(other.max_lag);
        Ok(())
    }
}

/// Hands out request indexes to the workers and, in open loop, says when
/// each one is due.
struct Plan {
    next: AtomicUsize,
    total: usize,
    start: Instant,
    deadline: Instant,
    interval: Option<Duration>,
    stopped: AtomicBool,
}

impl Plan {
    fn new(total: usize, rate: Option<f64>, duration: f64) -> Self {
        let start = Instant::now();
        Self {
            next: AtomicUsize::new(0),
            total,
            start,
            deadline: start + Duration::from_secs_f64(duration.max(0.1)),
            interval: rate
                .filter(|r| *r > 0.0)
                .map(|r| Duration::from_secs_f64(1.0 / r)),
            stopped: AtomicBool::new(false),
        }
    }

    /// The next index and its lag behind schedule, or None when done.
    async fn take(&self) -> Option<(usize, Duration)> {
        let i = self.next.fetch_add(1, Ordering::Relaxed);
        if i >= self.total || self.stopped.load(Ordering::Relaxed) {
            return None;
        }
        let mut lag = Duration::ZERO;
        if let Some(interval) = self.interval {
            let due = self.start + interval.saturating_mul(u32::try_from(i).unwrap_or(u32::MAX));
            let now = Instant::now();
            if due > now {
                tokio::time::sleep_until(due.into()).await;
            } else {
                lag = now - due;
            }
        }
        if Instant::now() >= self.deadline {
            self.stopped.store(true, Ordering::Relaxed);
            return None;
        }
        Some((i, lag))
    }
}

/// Samples the relay's VmRSS every 50 ms until dropped; after resetting
/// its VmHWM (`clear_refs` 5) so that the peak belongs to this run.
struct RssWatch {
    pid: Option<u32>,
    max_rss_kib: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl RssWatch {
    fn start(pid: Option<u32>) -> Self {
        let max_rss_kib = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        if let Some(pid) = pid {
            let _ = std::fs::write(format!("/proc/{pid}/clear_refs"), "5");
            let (max, stop) = (max_rss_kib.clone(), stop.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    if let Some(rss) = proc_status(pid).get("VmRSS") {
                        max.fetch_max(*rss, Ordering::Relaxed);
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            });
        }
        Self {
            pid,
            max_rss_kib,
            stop,
        }
    }

    fn finish(&self) -> serde_json::Value {
        self.stop.store(true, Ordering::Relaxed);
        let Some(pid) = self.pid else {
            return serde_json::Value::Null;
        };
        let status = proc_status(pid);
        json!({
            "pid": pid,
            "vm_rss_kib": status.get("VmRSS"),
            "vm_hwm_kib": status.get("VmHWM"),
            "max_sampled_rss_kib": self.max_rss_kib.load(Ordering::Relaxed),
        })
    }
}

/// `Vm*` lines of /proc/<pid>/status in KiB.
fn proc_status(pid: u32) -> BTreeMap<String, u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    text.lines()
        .filter_map(|line| {
            let (key, rest) = line.split_once(':')?;
            let kib = rest.trim().strip_suffix(" kB")?.trim().parse().ok()?;
            Some((key.to_owned(), kib))
        })
        .collect()
}

/// User + system CPU time of a process (or this one) in clock ticks.
fn cpu_ticks(pid: Option<u32>) -> Option<u64> {
    let path = match pid {
        Some(pid) => format!("/proc/{pid}/stat"),
        None => "/proc/self/stat".to_owned(),
    };
    let text = std::fs::read_to_string(path).ok()?;
    // Fields after the parenthesised command name; utime and stime are the
    // 14th and 15th fields of the whole line.
    let rest = &text[text.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

/// CPU time used by the load generator, the relay and the broker during the
/// measured phase, per request.
struct CpuWatch {
    pids: Vec<(&'static str, Option<u32>, Option<u64>)>,
}

impl CpuWatch {
    fn start(relay: Option<u32>, broker: Option<u32>) -> Self {
        let mut pids = vec![("bench", None, cpu_ticks(None))];
        if relay.is_some() {
            pids.push(("relay", relay, cpu_ticks(relay)));
        }
        if broker.is_some() {
            pids.push(("broker", broker, cpu_ticks(broker)));
        }
        Self { pids }
    }

    /// Microseconds of CPU per request (clock ticks of 10 ms).
    fn finish(&self, requests: u64) -> serde_json::Value {
        let mut out = serde_json::Map::new();
        for (name, pid, before) in &self.pids {
            if let (Some(before), Some(after)) = (before, cpu_ticks(*pid)) {
                let us = (after.saturating_sub(*before) * 10_000) as f64 / requests.max(1) as f64;
                out.insert((*name).to_owned(), json!(us.round()));
            }
        }
        serde_json::Value::Object(out)
    }
}

fn report(
    mode: &str,
    load: &LoadArgs,
    extra: serde_json::Value,
    tally: &Tally,
    elapsed: Duration,
    rss: serde_json::Value,
    cpu: &CpuWatch,
) -> anyhow::Result<()> {
    let h = &tally.hist;
    let ok: u64 = tally
        .outcomes
        .iter()
        .filter(|(k, _)| **k == Outcome::Status(200))
        .map(|(_, v)| *v)
        .sum();
    let total: u64 = tally.outcomes.values().sum();
    let secs = elapsed.as_secs_f64().max(1e-9);
    let q = |p: f64| h.value_at_quantile(p);
    let cpu = cpu.finish(total);
    let outcomes: BTreeMap<String, u64> = tally
        .outcomes
        .iter()
        .map(|(k, v)| (k.label(), *v))
        .collect();
    let result = json!({
        "mode": mode,
        "label": load.label,
        "concurrency": load.concurrency,
        "rate": load.rate,
        "body_size": load.body_size,
        "requests": total,
        "ok": ok,
        "outcomes": outcomes,
        "elapsed_s": secs,
        "throughput_rps": ok as f64 / secs,
        "latency_us": {
            "p50": q(0.50), "p90": q(0.90), "p99": q(0.99), "p999": q(0.999),
            "max": h.max(), "mean": h.mean(),
        },
        "max_schedule_lag_us": tally.max_lag.as_micros() as u64,
        "relay_rss": rss,
        "cpu_us_per_request": cpu,
        "extra": extra,
    });
    let rss_txt = match result["relay_rss"]["vm_hwm_kib"].as_u64() {
        Some(hwm) => format!(
            " relay RSS peak {:.1} MiB (sampled {:.1})",
            hwm as f64 / 1024.0,
            result["relay_rss"]["max_sampled_rss_kib"]
                .as_u64()
                .unwrap_or(0) as f64
                / 1024.0
        ),
        None => String::new(),
    };
    eprintln!(
        "{mode:<8} {label} c={c} body={b}B{rate}: {tp:.0} req/s ok={ok}/{total} p50={p50}us p90={p90}us p99={p99}us p99.9={p999}us max={max}us{rss_txt} cpu_us/req={cpu} outcomes={outcomes:?}",
        label = load.label,
        c = load.concurrency,
        b = load.body_size,
        rate = load
            .rate
            .map(|r| format!(" rate={r:.0}/s"))
            .unwrap_or_default(),
        tp = ok as f64 / secs,
        p50 = q(0.50),
        p90 = q(0.90),
        p99 = q(0.99),
        p999 = q(0.999),
        max = h.max(),
        cpu = result["cpu_us_per_request"],
    );
    emit(&result, load.json_out.as_deref())
}

fn emit(result: &serde_json::Value, json_out: Option<&Path>) -> anyhow::Result<()> {
    let line = serde_json::to_string(result)?;
    println!("{line}");
    if let Some(path) = json_out {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        writeln!(f, "{line}")?;
    }
    Ok(())
}

async fn relay(args: RelayArgs) -> anyhow::Result<()> {
    let load = args.load;
    let secret = read_secret(&args.secret_file)?;
    let target = Arc::new(Target::new(&args.url, args.ca_file.as_deref())?);
    let bodies = body_pool(&load.event, load.body_size, load.requests + load.warmup)?;
    let warm = Arc::new(presign(&secret, &bodies, load.warmup)?);
    let measured = Arc::new(presign(&secret, &bodies, load.requests)?);
    let reconnects = Arc::new(AtomicU64::new(0));

    // Connect every worker and warm up (unmeasured, closed loop).
    let mut senders = Vec::with_capacity(load.concurrency);
    for _ in 0..load.concurrency {
        senders.push(Some(target.connect().await?));
    }
    let warm_plan = Arc::new(Plan::new(load.warmup, None, 60.0));
    let mut tasks = Vec::new();
    for mut sender in senders {
        let (plan, target, warm, reconnects) = (
            warm_plan.clone(),
            target.clone(),
            warm.clone(),
            reconnects.clone(),
        );
        tasks.push(tokio::spawn(async move {
            while let Some((i, _)) = plan.take().await {
                send_one(&mut sender, &target, &warm[i], &reconnects).await;
            }
            sender
        }));
    }
    let mut senders = Vec::with_capacity(load.concurrency);
    for t in tasks {
        senders.push(t.await?);
    }

    let rss = RssWatch::start(load.relay_pid);
    let cpu = CpuWatch::start(load.relay_pid, load.broker_pid);
    let plan = Arc::new(Plan::new(load.requests, load.rate, load.duration));
    let mut tasks = Vec::new();
    for mut sender in senders {
        let (plan, target, measured, reconnects) = (
            plan.clone(),
            target.clone(),
            measured.clone(),
            reconnects.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut tally = Tally::new()?;
            while let Some((i, lag)) = plan.take().await {
                let t0 = Instant::now();
                let outcome = send_one(&mut sender, &target, &measured[i], &reconnects).await;
                tally
                    .hist
                    .saturating_record(t0.elapsed().as_micros().max(1) as u64);
                *tally.outcomes.entry(outcome).or_default() += 1;
                tally.max_lag = tally.max_lag.max(lag);
            }
            anyhow::Ok((tally, Instant::now()))
        }));
    }
    let mut tally = Tally::new()?;
    let mut last = plan.start;
    for t in tasks {
        let (worker, done) = t.await??;
        tally.merge(worker)?;
        last = last.max(done);
    }
    let rss = rss.finish();
    let extra = json!({
        "url": args.url,
        "tls": target.tls.is_some(),
        "reconnects": reconnects.load(Ordering::Relaxed),
    });
    report("relay", &load, extra, &tally, last - plan.start, rss, &cpu)
}

// ---------------------------------------------------------------- AMQP

async fn amqp_connect(url: &str) -> anyhow::Result<Connection> {
    Connection::connect(url, ConnectionProperties::default())
        .await
        .context("connecting to RabbitMQ")
}

/// The relay's message properties (docs/subscribers.md, "The message"), built
/// per message like the relay does.
fn properties(id: &str, routing_key: &str, timestamp: &str) -> BasicProperties {
    let now_ms = ocrolus_relay::now_ms();
    let mut headers = FieldTable::default();
    let mut put = |name: &str, value: &str| {
        headers.insert(name.into(), AMQPValue::LongString(LongString::from(value)));
    };
    put("x-ocrolus-event", routing_key);
    put("x-ocrolus-timestamp", timestamp);
    put("x-relay-client-ip", "127.0.0.1");
    put(
        "x-relay-received-at",
        &ocrolus_relay::rfc3339_millis(now_ms),
    );
    BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type("application/json".into())
        .with_message_id(id.into())
        .with_timestamp(u64::try_from(now_ms / 1000).unwrap_or(0))
        .with_app_id("ocrolus-relay".into())
        .with_type(routing_key.into())
        .with_headers(headers)
}

async fn publish_one(channel: &Channel, exchange: &str, routing_key: &str, d: &Signed) -> Outcome {
    let id = d.id.to_str().unwrap_or("-");
    let ts = d.timestamp.to_str().unwrap_or("0");
    let confirm = channel
        .basic_publish(
            exchange.into(),
            routing_key.into(),
            BasicPublishOptions {
                mandatory: true,
                ..BasicPublishOptions::default()
            },
            &d.body,
            properties(id, routing_key, ts),
        )
        .await;
    match confirm {
        Ok(confirm) => match confirm.await {
            Ok(Confirmation::Ack(None)) => Outcome::Status(200),
            Ok(Confirmation::Ack(Some(_))) => Outcome::Status(312),
            Ok(_) => Outcome::Status(503),
            Err(_) => Outcome::Error,
        },
        Err(_) => Outcome::Error,
    }
}

async fn baseline(args: BaselineArgs) -> anyhow::Result<()> {
    let load = args.load;
    let bodies = body_pool(&load.event, load.body_size, load.requests + load.warmup)?;
    // Same shape as the relay's input; the signature is simply not needed.
    let secret = "baseline-does-not-verify-signatures";
    let warm = Arc::new(presign(secret, &bodies, load.warmup)?);
    let measured = Arc::new(presign(secret, &bodies, load.requests)?);
    let connection = amqp_connect(&args.amqp_url).await?;
    let mut channels = Vec::new();
    for _ in 0..args.channels.max(1) {
        let channel = connection.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        channels.push(channel);
    }
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

async fn setup(args: &TopologyArgs) -> anyhow::Result<()> {
    let connection = amqp_connect(&args.amqp_url).await?;
    let channel = connection.create_channel().await?;
    channel
        .exchange_declare(
            args.exchange.as_str().into(),
            lapin::ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    channel
        .queue_declare(
            args.queue.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
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

async fn purge(args: &TopologyArgs) -> anyhow::Result<()> {
    let connection = amqp_connect(&args.amqp_url).await?;
    let channel = connection.create_channel().await?;
    let purged = channel
        .queue_purge(args.queue.as_str().into(), QueuePurgeOptions::default())
        .await?;
    eprintln!("purged {purged} messages from {}", args.queue);
    let _ = connection.close(200, "purge done".into()).await;
    Ok(())
}

async fn teardown(args: &TopologyArgs) -> anyhow::Result<()> {
    let connection = amqp_connect(&args.amqp_url).await?;
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

// ---------------------------------------------------------------- idle

async fn idle(args: IdleArgs) -> anyhow::Result<()> {
    let secret = read_secret(&args.secret_file)?;
    let target = Arc::new(Target::new(&args.url, args.ca_file.as_deref())?);
    let bodies = body_pool("document.verification_succeeded", 1024, 64)?;
    let deliveries = Arc::new(presign(&secret, &bodies, args.connections)?);
    let rss = RssWatch::start(args.relay_pid);
    let before = args.relay_pid.map(proc_status).unwrap_or_default();
    let started = Instant::now();
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..args.open_concurrency.max(1) {
        let (target, deliveries, next) = (target.clone(), deliveries.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut held = Vec::new();
            let mut outcomes: BTreeMap<Outcome, u64> = BTreeMap::new();
            let reconnects = AtomicU64::new(0);
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(d) = deliveries.get(i) else { break };
                let mut sender = None;
                let outcome = send_one(&mut sender, &target, d, &reconnects).await;
                *outcomes.entry(outcome).or_default() += 1;
                held.extend(sender);
            }
            (held, outcomes)
        }));
    }
    let mut held = Vec::new();
    let mut outcomes: BTreeMap<Outcome, u64> = BTreeMap::new();
    for t in tasks {
        let (h, o) = t.await?;
        held.extend(h);
        for (k, v) in o {
            *outcomes.entry(k).or_default() += v;
        }
    }
    let opened_in = started.elapsed();
    eprintln!(
        "idle: {} connections open after {:.1}s; holding {:.0}s",
        held.len(),
        opened_in.as_secs_f64(),
        args.hold
    );
    tokio::time::sleep(Duration::from_secs_f64(args.hold)).await;
    let still_open = held.iter().filter(|s| !s.is_closed()).count();
    let during = args.relay_pid.map(proc_status).unwrap_or_default();
    let rss = rss.finish();
    let outcomes: BTreeMap<String, u64> = outcomes.iter().map(|(k, v)| (k.label(), *v)).collect();
    let result = json!({
        "mode": "idle",
        "label": args.label,
        "connections": args.connections,
        "opened": held.len(),
        "still_open_after_hold": still_open,
        "open_s": opened_in.as_secs_f64(),
        "hold_s": args.hold,
        "outcomes": outcomes,
        "relay_rss_before_kib": before.get("VmRSS"),
        "relay_rss_holding_kib": during.get("VmRSS"),
        "relay_rss": rss,
    });
    eprintln!(
        "idle     {} {} conns ({} still open after {:.0}s): relay RSS before {:.1} MiB, holding {:.1} MiB, peak {:.1} MiB outcomes={:?}",
        args.label,
        held.len(),
        still_open,
        args.hold,
        before.get("VmRSS").copied().unwrap_or(0) as f64 / 1024.0,
        during.get("VmRSS").copied().unwrap_or(0) as f64 / 1024.0,
        result["relay_rss"]["vm_hwm_kib"].as_u64().unwrap_or(0) as f64 / 1024.0,
        outcomes,
    );
    emit(&result, args.json_out.as_deref())?;
    drop(held);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn padded_bodies_have_the_asked_size_and_stay_valid_json() {
        for size in [1024, 65_536, 1 << 20] {
            let body = padded_body("document.verification_succeeded", size).expect("body");
            assert!(body.len().abs_diff(size) <= 2, "{size}: {}", body.len());
            let value: serde_json::Value = serde_json::from_slice(&body).expect("json");
            assert_eq!(value["event_name"], "document.verification_succeeded");
        }
    }

    #[test]
    fn presigned_deliveries_verify_and_have_unique_ids() {
        let bodies = body_pool("book.verified", 1024, 4).expect("bodies");
        let signed = presign("0123456789abcdef0123", &bodies, 8).expect("presign");
        let ids: std::collections::HashSet<_> = signed.iter().map(|d| d.id.clone()).collect();
        assert_eq!(ids.len(), 8);
        let d = &signed[0];
        let expected = hex::encode(sign(
            b"0123456789abcdef0123",
            d.timestamp.to_str().expect("ts"),
            d.id.to_str().expect("id"),
            &d.body,
        ));
        assert_eq!(d.signature.to_str().expect("sig"), expected);
    }

    #[test]
    fn reads_its_own_cpu_time_and_memory() {
        assert!(cpu_ticks(None).is_some());
        assert!(proc_status(std::process::id()).contains_key("VmRSS"));
    }
}
