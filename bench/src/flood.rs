//! The `flood` mode: forged-signature deliveries from many connections as
//! fast as they go, while genuine signed deliveries arrive at a fixed rate
//! from another source address. It reports the relay's CPU per rejected
//! request and the genuine deliveries' latency.
//!
//! The flood side speaks raw HTTP/1.1 over plain TCP (one request written
//! from a prepared buffer, the answer read back by `Content-Length`), so
//! that the generator spends as little of the shared CPUs as it can. An
//! answer with `Connection: close` (a refusal that closes) is followed by a
//! new connection; 401 and 429 keep it.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use clap::Args;
use http::Uri;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::load::{Outcome, Plan, Tally, body_pool, padded_body, presign, read_secret};
use crate::procfs::{CpuWatch, RssWatch};
use crate::relay::{Target, send_one};
use crate::report::emit;

#[derive(Debug, Args)]
pub struct FloodArgs {
    /// Webhook URL (http:// only: the flood speaks plain HTTP/1.1).
    #[arg(long, default_value = "http://127.0.0.1:8443/webhooks/ocrolus")]
    pub url: String,
    /// HMAC secret file for the genuine deliveries (the flood is forged).
    #[arg(long)]
    pub secret_file: PathBuf,
    /// Flood connections at once.
    #[arg(long, default_value_t = 64)]
    pub connections: usize,
    /// Seconds the flood and the genuine stream last.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Body size of every request, forged and genuine.
    #[arg(long, default_value_t = 1024)]
    pub body_size: usize,
    /// Genuine deliveries per second.
    #[arg(long, default_value_t = 20.0)]
    pub genuine_rate: f64,
    /// Source address of the genuine deliveries (the flood comes from the
    /// address the kernel picks for the URL's host).
    #[arg(long, default_value = "127.0.0.2")]
    pub genuine_from: IpAddr,
    #[arg(long)]
    pub relay_pid: Option<u32>,
    #[arg(long)]
    pub broker_pid: Option<u32>,
    #[arg(long, default_value = "")]
    pub label: String,
    #[arg(long)]
    pub json_out: Option<PathBuf>,
}

/// One forged request, ready to write: a well-formed delivery whose
/// signature is 64 hex zeros.
fn forged_request(uri: &Uri, body: &[u8]) -> anyhow::Result<Vec<u8>> {
    let host = uri
        .authority()
        .ok_or_else(|| anyhow!("--url has no host"))?;
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let timestamp = ocrolus_relay::now_ms() / 1000;
    let id = uuid::Uuid::now_v7();
    let mut request = format!(
        "POST {path} HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\n\
         user-agent: relay-bench-flood\r\nwebhook-request-id: {id}\r\n\
         webhook-timestamp: {timestamp}\r\nwebhook-signature: {sig}\r\n\
         content-length: {len}\r\n\r\n",
        sig = "0".repeat(64),
        len = body.len(),
    )
    .into_bytes();
    request.extend_from_slice(body);
    Ok(request)
}

/// Status of one answer and whether the relay closes after it; reads the
/// head and the `Content-Length` body, leaving `buf` empty.
async fn read_answer(stream: &mut TcpStream, buf: &mut Vec<u8>) -> anyhow::Result<(u16, bool)> {
    buf.clear();
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let mut chunk = [0u8; 1024];
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            bail!("connection closed before the answer");
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = std::str::from_utf8(&buf[..head_end])?.to_ascii_lowercase();
    let status: u16 = head
        .get(9..12)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("bad status line"))?;
    let close = head.contains("\r\nconnection: close\r\n");
    let len: usize = head
        .split("\r\n")
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    while buf.len() < head_end + len {
        let mut chunk = [0u8; 1024];
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    buf.clear();
    Ok((status, close))
}

/// What one flood worker saw.
#[derive(Default)]
struct FloodTally {
    statuses: BTreeMap<u16, u64>,
    errors: u64,
    connects: u64,
}

async fn flood_worker(addr: (String, u16), request: Arc<Vec<u8>>, deadline: Instant) -> FloodTally {
    let mut tally = FloodTally::default();
    let mut stream: Option<TcpStream> = None;
    let mut buf = Vec::with_capacity(1024);
    while Instant::now() < deadline {
        let attempt = async {
            if stream.is_none() {
                let tcp = TcpStream::connect((addr.0.as_str(), addr.1)).await?;
                tcp.set_nodelay(true)?;
                stream = Some(tcp);
                tally.connects += 1;
            }
            let s = stream.as_mut().ok_or_else(|| anyhow!("no connection"))?;
            s.write_all(&request).await?;
            read_answer(s, &mut buf).await
        };
        match attempt.await {
            Ok((status, close)) => {
                *tally.statuses.entry(status).or_default() += 1;
                if close {
                    stream = None;
                }
            }
            Err(_) => {
                tally.errors += 1;
                stream = None;
            }
        }
    }
    tally
}

pub async fn flood(args: FloodArgs) -> anyhow::Result<()> {
    let uri: Uri = args.url.parse().context("--url")?;
    if uri.scheme_str() != Some("http") {
        bail!("flood: --url must be http://");
    }
    let host = uri
        .host()
        .ok_or_else(|| anyhow!("--url has no host"))?
        .trim_matches(['[', ']'])
        .to_owned();
    let port = uri.port_u16().unwrap_or(80);
    let body = padded_body("document.verification_succeeded", args.body_size)?;
    let request = Arc::new(forged_request(&uri, &body)?);

    let secret = read_secret(&args.secret_file)?;
    let genuine_target = Arc::new(Target::new(&args.url, None)?.bind_to(args.genuine_from));
    let genuine_count = (args.genuine_rate * args.duration).ceil() as usize;
    let bodies = body_pool("document.verification_succeeded", args.body_size, 64)?;
    let genuine = Arc::new(presign(&secret, &bodies, genuine_count.max(1))?);

    let rss = RssWatch::start(args.relay_pid);
    let cpu = CpuWatch::start(args.relay_pid, args.broker_pid);
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(args.duration.max(0.1));

    // Genuine deliveries: open loop at --genuine-rate over 4 keep-alive
    // connections from the other address.
    let plan = Arc::new(Plan::new(
        genuine_count,
        Some(args.genuine_rate),
        args.duration + 1.0,
    ));
    let reconnects = Arc::new(AtomicU64::new(0));
    let mut genuine_tasks = Vec::new();
    for _ in 0..4 {
        let (plan, target, genuine, reconnects) = (
            plan.clone(),
            genuine_target.clone(),
            genuine.clone(),
            reconnects.clone(),
        );
        genuine_tasks.push(tokio::spawn(async move {
            let mut tally = Tally::new()?;
            let mut sender = None;
            while let Some((i, lag)) = plan.take().await {
                let t0 = Instant::now();
                let outcome = send_one(&mut sender, &target, &genuine[i], &reconnects).await;
                tally
                    .hist
                    .saturating_record(u64::try_from(t0.elapsed().as_micros().max(1))?);
                *tally.outcomes.entry(outcome).or_default() += 1;
                tally.max_lag = tally.max_lag.max(lag);
            }
            anyhow::Ok(tally)
        }));
    }

    let mut flood_tasks = Vec::new();
    for _ in 0..args.connections.max(1) {
        flood_tasks.push(tokio::spawn(flood_worker(
            (host.clone(), port),
            request.clone(),
            deadline,
        )));
    }
    let mut flood = FloodTally::default();
    for t in flood_tasks {
        let worker = t.await?;
        for (k, v) in worker.statuses {
            *flood.statuses.entry(k).or_default() += v;
        }
        flood.errors += worker.errors;
        flood.connects += worker.connects;
    }
    let flood_elapsed = started.elapsed().as_secs_f64();
    let rejected: u64 = flood.statuses.values().sum();
    let cpu = cpu.finish(rejected);
    let rss = rss.finish();

    let mut tally = Tally::new()?;
    for t in genuine_tasks {
        tally.merge(t.await??)?;
    }
    let h = &tally.hist;
    let genuine_ok = tally
        .outcomes
        .get(&Outcome::Status(200))
        .copied()
        .unwrap_or(0);
    let genuine_outcomes: BTreeMap<String, u64> = tally
        .outcomes
        .iter()
        .map(|(k, v)| (k.label(), *v))
        .collect();
    let statuses: BTreeMap<String, u64> = flood
        .statuses
        .iter()
        .map(|(k, v)| (k.to_string(), *v))
        .collect();
    let result = json!({
        "mode": "flood",
        "label": args.label,
        "concurrency": args.connections,
        "body_size": args.body_size,
        "requests": rejected,
        "elapsed_s": flood_elapsed,
        "throughput_rps": rejected as f64 / flood_elapsed.max(1e-9),
        "outcomes": statuses,
        "errors": flood.errors,
        "connects": flood.connects,
        "cpu_us_per_request": cpu,
        "relay_rss": rss,
        "genuine": {
            "rate": args.genuine_rate,
            "from": args.genuine_from.to_string(),
            "sent": tally.hist.len(),
            "ok": genuine_ok,
            "outcomes": genuine_outcomes,
            "latency_us": {
                "p50": h.value_at_quantile(0.5), "p99": h.value_at_quantile(0.99),
                "max": h.max(),
            },
            "max_schedule_lag_us": u64::try_from(tally.max_lag.as_micros())?,
        },
    });
    eprintln!(
        "flood    {} c={} body={}B: {:.0} rejected req/s ({} in {:.1}s, {} connections opened, {} errors) statuses={:?} relay cpu_us/rejected={} | genuine {}/{} ok at {}/s p50={}us p99={}us max={}us",
        args.label,
        args.connections,
        args.body_size,
        result["throughput_rps"].as_f64().unwrap_or(0.0),
        rejected,
        flood_elapsed,
        flood.connects,
        flood.errors,
        flood.statuses,
        result["cpu_us_per_request"],
        genuine_ok,
        tally.hist.len(),
        args.genuine_rate,
        h.value_at_quantile(0.5),
        h.value_at_quantile(0.99),
        h.max(),
    );
    emit(&result, args.json_out.as_deref())
}
