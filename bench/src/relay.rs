//! The relay side: signed deliveries over keep-alive HTTP/1.1 (plaintext or
//! TLS), the `relay` load run and the `idle` connection hold.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use bytes::Bytes;
use clap::Args;
use http::{HeaderValue, Request, Uri};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use ocrolus_relay::tls_connector;
use rustls_pki_types::ServerName;
use serde_json::json;
use tokio::net::{TcpSocket, TcpStream};

use crate::load::{LoadArgs, Outcome, Plan, Signed, Tally, body_pool, presign, read_secret};
use crate::procfs::{CpuWatch, RssWatch, proc_status};
use crate::report::{emit, report};

#[derive(Debug, Args)]
pub struct RelayArgs {
    #[command(flatten)]
    pub load: LoadArgs,
    /// Webhook URL (http:// or https://).
    #[arg(long, default_value = "http://127.0.0.1:8443/webhooks/ocrolus")]
    pub url: String,
    /// HMAC secret file; the first secret signs.
    #[arg(long)]
    pub secret_file: PathBuf,
    /// Extra PEM CA certificate to trust for https:// URLs.
    #[arg(long)]
    pub ca_file: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct IdleArgs {
    #[arg(long, default_value = "http://127.0.0.1:8443/webhooks/ocrolus")]
    pub url: String,
    #[arg(long)]
    pub secret_file: PathBuf,
    #[arg(long)]
    pub ca_file: Option<PathBuf>,
    /// Connections to open; each delivers one webhook, then idles.
    #[arg(long, default_value_t = 10_000)]
    pub connections: usize,
    /// Connections being opened at once.
    #[arg(long, default_value_t = 64)]
    pub open_concurrency: usize,
    /// Seconds to hold the idle connections.
    #[arg(long, default_value_t = 10.0)]
    pub hold: f64,
    /// Send no request: plaintext connections send nothing at all, TLS
    /// ones only the handshake.
    #[arg(long)]
    pub no_request: bool,
    #[arg(long)]
    pub relay_pid: Option<u32>,
    #[arg(long, default_value = "")]
    pub label: String,
    #[arg(long)]
    pub json_out: Option<PathBuf>,
}

#[derive(Clone)]
pub struct Target {
    uri: Uri,
    host: String,
    port: u16,
    host_header: HeaderValue,
    tls: Option<(tokio_rustls::TlsConnector, ServerName<'static>)>,
    /// Local address to connect from (the flood's genuine stream).
    bind: Option<IpAddr>,
}

impl Target {
    pub fn new(url: &str, ca_file: Option<&Path>) -> anyhow::Result<Self> {
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
        let host_header = HeaderValue::from_str(
            uri.authority()
                .map_or(host.as_str(), http::uri::Authority::as_str),
        )?;
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
            bind: None,
        })
    }

    /// Connections from this local address instead of the kernel's choice.
    pub fn bind_to(mut self, local: IpAddr) -> Self {
        self.bind = Some(local);
        self
    }

    pub async fn connect(&self) -> anyhow::Result<SendRequest<Full<Bytes>>> {
        let tcp = match self.bind {
            None => TcpStream::connect((self.host.as_str(), self.port)).await,
            Some(local) => {
                let remote = tokio::net::lookup_host((self.host.as_str(), self.port))
                    .await?
                    .find(|a| a.is_ipv4() == local.is_ipv4())
                    .ok_or_else(|| anyhow!("{} has no address like {local}", self.host))?;
                let socket = if local.is_ipv4() {
                    TcpSocket::new_v4()?
                } else {
                    TcpSocket::new_v6()?
                };
                socket.bind(SocketAddr::new(local, 0))?;
                socket.connect(remote).await
            }
        }
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

    /// A connection with no HTTP on it: TCP, plus the handshake for TLS.
    pub async fn open_raw(&self) -> anyhow::Result<Box<dyn crate::silent::Held>> {
        let tcp = TcpStream::connect((self.host.as_str(), self.port)).await?;
        tcp.set_nodelay(true)?;
        Ok(match &self.tls {
            Some((connector, name)) => Box::new(connector.connect(name.clone(), tcp).await?),
            None => Box::new(tcp),
        })
    }

    pub fn request(&self, d: &Signed) -> anyhow::Result<Request<Full<Bytes>>> {
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

pub async fn handshake<I>(io: I) -> anyhow::Result<SendRequest<Full<Bytes>>>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (sender, conn) = hyper::client::conn::http1::handshake(io).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}
pub async fn send_one(
    sender: &mut Option<SendRequest<Full<Bytes>>>,
    target: &Target,
    d: &Signed,
    reconnects: &AtomicU64,
) -> Outcome {
    let attempt = async {
        if sender
            .as_ref()
            .is_none_or(hyper::client::conn::http1::SendRequest::is_closed)
        {
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

pub async fn run(args: RelayArgs) -> anyhow::Result<()> {
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

pub async fn idle(args: IdleArgs) -> anyhow::Result<()> {
    let secret = read_secret(&args.secret_file)?;
    let target = Arc::new(Target::new(&args.url, args.ca_file.as_deref())?);
    if args.no_request {
        return idle_no_request(args, target).await;
    }
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
    let outcomes: BTreeMap<String, u64> = outcomes.iter().map(|(k, v)| (k.label(), *v)).collect();
    let opened = Opened {
        count: held.len(),
        still_open,
        took: opened_in,
        tls: target.tls.is_some(),
        outcomes: json!(outcomes),
    };
    idle_report(&args, &opened, &before, &during, &rss)?;
    drop(held);
    Ok(())
}

/// `idle --no-request`: connections that never send a request.
async fn idle_no_request(args: IdleArgs, target: Arc<Target>) -> anyhow::Result<()> {
    let rss = RssWatch::start(args.relay_pid);
    let before = args.relay_pid.map(proc_status).unwrap_or_default();
    let started = Instant::now();
    let tls = target.tls.is_some();
    let (mut held, failed) =
        crate::silent::open(target, args.connections, args.open_concurrency).await;
    let opened_in = started.elapsed();
    eprintln!(
        "idle: {} silent connections open after {:.1}s ({failed} failed); holding {:.0}s",
        held.len(),
        opened_in.as_secs_f64(),
        args.hold
    );
    tokio::time::sleep(Duration::from_secs_f64(args.hold)).await;
    let during = args.relay_pid.map(proc_status).unwrap_or_default();
    let opened = Opened {
        count: held.len(),
        still_open: crate::silent::still_open(&mut held),
        took: opened_in,
        tls,
        outcomes: json!({ "no_request": held.len(), "connect_failed": failed }),
    };
    idle_report(&args, &opened, &before, &during, &rss)?;
    drop(held);
    Ok(())
}

/// What an idle run opened.
struct Opened {
    count: usize,
    still_open: usize,
    took: Duration,
    tls: bool,
    outcomes: serde_json::Value,
}

/// The idle result line: RSS before and while holding, and the difference
/// per open connection in KiB.
fn idle_report(
    args: &IdleArgs,
    opened: &Opened,
    before: &BTreeMap<String, u64>,
    during: &BTreeMap<String, u64>,
    rss: &RssWatch,
) -> anyhow::Result<()> {
    let rss = rss.finish();
    let before_kib = before.get("VmRSS").copied().unwrap_or(0);
    let during_kib = during.get("VmRSS").copied().unwrap_or(0);
    let per_connection_kib = if opened.still_open == 0 {
        0.0
    } else {
        (during_kib as f64 - before_kib as f64) / opened.still_open as f64
    };
    let result = json!({
        "mode": "idle",
        "label": args.label,
        "tls": opened.tls,
        "no_request": args.no_request,
        "connections": args.connections,
        "opened": opened.count,
        "still_open_after_hold": opened.still_open,
        "open_s": opened.took.as_secs_f64(),
        "hold_s": args.hold,
        "outcomes": opened.outcomes,
        "relay_rss_before_kib": before.get("VmRSS"),
        "relay_rss_holding_kib": during.get("VmRSS"),
        "kib_per_connection": (per_connection_kib * 100.0).round() / 100.0,
        "relay_rss": rss,
    });
    eprintln!(
        "idle     {} {} conns ({} still open after {:.0}s): relay RSS before {:.1} MiB, holding {:.1} MiB, peak {:.1} MiB, {:.2} KiB/conn outcomes={}",
        args.label,
        opened.count,
        opened.still_open,
        args.hold,
        before_kib as f64 / 1024.0,
        during_kib as f64 / 1024.0,
        result["relay_rss"]["vm_hwm_kib"].as_u64().unwrap_or(0) as f64 / 1024.0,
        per_connection_kib,
        opened.outcomes,
    );
    emit(&result, args.json_out.as_deref())
}
