//! Shared test harness: a whole relay on ephemeral ports against the real
//! RabbitMQ, per-test exchange/queue names, a signing HTTP client and a TCP
//! proxy to cut or stall the broker link.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use bytes::Bytes;
use clap::Parser;
use http::{HeaderMap, Request};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use lapin::options::{
    BasicGetOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, ConnectionProperties};
use ocrolus_relay::{Cli, Command, Config, Relay};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

pub const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
pub const SECRET: &str = "integration-test-secret-0123456789";
pub const SECOND_SECRET: &str = "rotated-integration-secret-abcdef";

pub fn unique(prefix: &str) -> String {
    format!("{prefix}.{:016x}", rand::random::<u64>())
}

pub fn now_secs() -> i64 {
    ocrolus_relay::now_ms() / 1000
}

/// Options for a test relay; `extra` are raw `serve` flags.
pub struct RelayOptions {
    pub allow: Vec<String>,
    pub trusted_proxies: Vec<String>,
    pub secrets: Vec<String>,
    pub amqp_url: String,
    pub extra: Vec<String>,
    pub spool_dir: Option<PathBuf>,
}

impl Default for RelayOptions {
    fn default() -> Self {
        Self {
            allow: vec!["127.0.0.1/32".into()],
            trusted_proxies: vec![],
            secrets: vec![SECRET.into(), SECOND_SECRET.into()],
            amqp_url: AMQP_URL.into(),
            extra: vec![],
            spool_dir: None,
        }
    }
}

pub struct TestRelay {
    relay: Option<Relay>,
    pub url: String,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub exchange: String,
    pub alternate: String,
    pub dir: tempfile::TempDir,
    pub spool_dir: PathBuf,
}

/// The `serve` flags a test relay would use (also for spawning the binary).
pub fn serve_args(
    opts: &RelayOptions,
    dir: &std::path::Path,
    exchange: &str,
    alternate: &str,
    spool_dir: &std::path::Path,
) -> Vec<String> {
    let allowlist = dir.join("allowlist.yaml");
    let mut yaml = String::from("allow:\n");
    for a in &opts.allow {
        yaml.push_str(&format!("  - {a}\n"));
    }
    yaml.push_str("trusted_proxies:\n");
    for p in &opts.trusted_proxies {
        yaml.push_str(&format!("  - {p}\n"));
    }
    if opts.trusted_proxies.is_empty() {
        yaml = yaml.replace("trusted_proxies:\n", "trusted_proxies: []\n");
    }
    std::fs::write(&allowlist, yaml).expect("write allowlist");
    let mut args: Vec<String> = [
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
        "--allowlist",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.push(allowlist.display().to_string());
    if !serves_tls(opts) {
        args.push("--plaintext".into());
    }
    args.extend(["--amqp-url".into(), opts.amqp_url.clone()]);
    args.extend(["--exchange".into(), exchange.into()]);
    if !opts.extra.iter().any(|a| a == "--alternate-exchange") {
        args.extend(["--alternate-exchange".into(), alternate.into()]);
    }
    args.extend(["--spool-dir".into(), spool_dir.display().to_string()]);
    if !opts.secrets.is_empty() {
        let secret_file = dir.join("secrets");
        std::fs::write(&secret_file, opts.secrets.join("\n")).expect("write secrets");
        args.extend(["--secret-file".into(), secret_file.display().to_string()]);
    }
    args.extend(opts.extra.iter().cloned());
    args
}

impl TestRelay {
    pub async fn start(opts: RelayOptions) -> Self {
        Self::start_with_names(opts, unique("test.events"), String::new()).await
    }

    /// `alternate` empty means: a fresh unique alternate exchange.
    pub async fn start_with_names(opts: RelayOptions, exchange: String, alternate: String) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let alternate =
            if alternate.is_empty() && !opts.extra.iter().any(|a| a == "--alternate-exchange") {
                format!("{exchange}.unrouted")
            } else {
                alternate
            };
        let spool_dir = opts
            .spool_dir
            .clone()
            .unwrap_or_else(|| dir.path().join("spool"));
        let mut argv = vec!["ocrolus-relay".to_string(), "serve".to_string()];
        argv.extend(serve_args(
            &opts,
            dir.path(),
            &exchange,
            &alternate,
            &spool_dir,
        ));
        let cli =
            Cli::try_parse_from(&argv).unwrap_or_else(|e| panic!("bad test flags {argv:?}: {e}"));
        let Command::Serve(args) = cli.command else {
            panic!("not serve")
        };
        let config = Config::from_args(&args, None).expect("valid test config");
        let relay = Relay::start(config).await.expect("relay starts");
        let addr = relay.public_addr;
        let admin = relay.admin_addr;
        let relay = Self {
            url: format!(
                "{scheme}://{addr}/webhooks/ocrolus",
                scheme = if serves_tls(&opts) { "https" } else { "http" }
            ),
            addr,
            admin,
            exchange,
            alternate,
            relay: Some(relay),
            dir,
            spool_dir,
        };
        relay.wait_broker_up(Duration::from_secs(10)).await;
        relay
    }

    pub fn relay(&self) -> &Relay {
        self.relay.as_ref().expect("running")
    }

    pub async fn wait_broker_up(&self, within: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        while tokio::time::Instant::now() < deadline {
            if self.relay().state().outbox.broker.is_up() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    }

    pub async fn shutdown(mut self) {
        if let Some(relay) = self.relay.take() {
            relay.shutdown().await;
        }
    }

    /// Scrapes /metrics.
    pub async fn metrics(&self) -> String {
        let (status, _, body) = get(&format!("http://{}/metrics", self.admin)).await;
        assert_eq!(status, 200);
        String::from_utf8(body.to_vec()).expect("utf8 metrics")
    }

    /// Reads one sample (`name{labels}` exactly as exposed) or 0.
    pub async fn metric(&self, series: &str) -> f64 {
        metric_value(&self.metrics().await, series)
    }

    /// A broker connection and a fresh queue bound to this relay's exchange
    /// with `#`: sees every event the relay publishes.
    pub async fn watch_all(&self) -> (TestBroker, String) {
        let broker = TestBroker::connect().await;
        let queue = broker.bind_queue(&self.exchange, "#").await;
        (broker, queue)
    }

    /// Deletes `queues` and the test's exchanges, then stops the relay.
    pub async fn finish(self, broker: &TestBroker, queues: &[&str]) {
        for queue in queues {
            broker.delete_queue(queue).await;
        }
        self.cleanup(broker).await;
        self.shutdown().await;
    }

    /// Deletes the test's exchanges (and the alternate queue).
    pub async fn cleanup(&self, broker: &TestBroker) {
        broker.delete_exchange(&self.exchange).await;
        if !self.alternate.is_empty() {
            broker.delete_exchange(&self.alternate).await;
            broker.delete_queue(&self.alternate).await;
        }
    }
}

pub fn metric_value(text: &str, series: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            (name == series).then(|| value.parse().ok())?
        })
        .unwrap_or(0.0)
}

/// A consumer-side view of the broker for assertions.
pub struct TestBroker {
    pub connection: Connection,
    pub channel: Channel,
}

impl TestBroker {
    pub async fn connect() -> Self {
        let connection = Connection::connect(AMQP_URL, ConnectionProperties::default())
            .await
            .expect("RabbitMQ on 127.0.0.1:5672");
        let channel = connection.create_channel().await.expect("channel");
        Self {
            connection,
            channel,
        }
    }

    /// A fresh queue bound to `exchange` with `binding`. The exchange must
    /// exist (the relay declares it when it connects).
    pub async fn bind_queue(&self, exchange: &str, binding: &str) -> String {
        let queue = unique("test.queue");
        self.channel
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions {
                    durable: false,
                    auto_delete: false,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("queue_declare");
        self.channel
            .queue_bind(
                queue.as_str().into(),
                exchange.into(),
                binding.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("queue_bind");
        queue
    }

    /// Every message currently in `queue` (waits up to `within` for `expect` of them).
    pub async fn drain(
        &self,
        queue: &str,
        expect: usize,
        within: Duration,
    ) -> Vec<lapin::message::BasicGetMessage> {
        let deadline = tokio::time::Instant::now() + within;
        let mut out = Vec::new();
        loop {
            match self
                .channel
                .basic_get(queue.into(), BasicGetOptions { no_ack: true })
                .await
                .expect("basic_get")
            {
                Some(message) => out.push(message),
                None => {
                    if out.len() >= expect || tokio::time::Instant::now() >= deadline {
                        return out;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    }

    pub async fn delete_queue(&self, queue: &str) {
        let _ = self
            .channel
            .queue_delete(queue.into(), QueueDeleteOptions::default())
            .await;
    }

    pub async fn delete_exchange(&self, exchange: &str) {
        let _ = self
            .channel
            .exchange_delete(exchange.into(), ExchangeDeleteOptions::default())
            .await;
    }
}

/// Headers of a correctly signed delivery.
pub fn signed_headers(
    secret: &str,
    id: &str,
    timestamp: i64,
    body: &[u8],
) -> Vec<(String, String)> {
    let ts = timestamp.to_string();
    let sig = hex::encode(ocrolus_relay::sign(secret.as_bytes(), &ts, id, body));
    vec![
        ("content-type".into(), "application/json".into()),
        ("webhook-request-id".into(), id.into()),
        ("webhook-timestamp".into(), ts),
        ("webhook-signature".into(), sig),
    ]
}

pub fn new_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

/// Response status, headers and body.
pub type Answer = (u16, HeaderMap, Bytes);

/// One request on a fresh HTTP/1.1 connection.
pub async fn request(method: &str, url: &str, headers: &[(String, String)], body: Bytes) -> Answer {
    let uri: http::Uri = url.parse().expect("url");
    let authority = uri.authority().expect("authority").clone();
    let stream = TcpStream::connect(authority.as_str())
        .await
        .expect("connect");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    let mut builder = Request::builder()
        .method(method)
        .uri(uri.path())
        .header("host", authority.as_str());
    for (k, v) in headers {
        builder = builder.header(k.as_str(), v.as_str());
    }
    let response = sender
        .send_request(builder.body(Full::new(body)).expect("request"))
        .await
        .expect("response");
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    (status, headers, body)
}

/// A signed POST of `body` to the relay.
pub async fn post_signed(relay: &TestRelay, id: &str, body: &[u8]) -> Answer {
    let headers = signed_headers(SECRET, id, now_secs(), body);
    request("POST", &relay.url, &headers, Bytes::copy_from_slice(body)).await
}

pub async fn get(url: &str) -> Answer {
    request("GET", url, &[], Bytes::new()).await
}

/// A TCP proxy to RabbitMQ that a test can cut (close every connection,
/// refuse new ones) or stall (stop forwarding, keep sockets open).
pub struct FaultProxy {
    pub addr: SocketAddr,
    /// 0 = forward, 1 = cut, 2 = stall.
    mode: Arc<AtomicU8>,
    generation: Arc<tokio::sync::watch::Sender<u64>>,
}

const FORWARD: u8 = 0;
const CUT: u8 = 1;
const STALL: u8 = 2;

impl FaultProxy {
    pub async fn start(upstream: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("addr");
        let mode = Arc::new(AtomicU8::new(FORWARD));
        let (generation, _) = tokio::sync::watch::channel(0u64);
        let generation = Arc::new(generation);
        let upstream = upstream.to_owned();
        let (m, g) = (mode.clone(), generation.clone());
        tokio::spawn(async move {
            loop {
                let Ok((mut client, _)) = listener.accept().await else {
                    return;
                };
                if m.load(Ordering::SeqCst) != FORWARD {
                    let _ = client.shutdown().await;
                    continue;
                }
                let Ok(server) = TcpStream::connect(&upstream).await else {
                    continue;
                };
                let (m, mut cut) = (m.clone(), g.subscribe());
                tokio::spawn(async move {
                    let (mut cr, mut cw) = client.into_split();
                    let (mut sr, mut sw) = server.into_split();
                    let up = pump(&mut cr, &mut sw, &m);
                    let down = pump(&mut sr, &mut cw, &m);
                    tokio::select! {
                        _ = up => {}
                        _ = down => {}
                        _ = cut.changed() => {}
                    }
                });
            }
        });
        Self {
            addr,
            mode,
            generation,
        }
    }

    pub fn url(&self) -> String {
        format!("amqp://guest:guest@{}/%2f", self.addr)
    }

    /// Closes every proxied connection and refuses new ones.
    pub fn cut(&self) {
        self.mode.store(CUT, Ordering::SeqCst);
        self.generation.send_modify(|g| *g += 1);
    }

    /// Stops forwarding bytes without closing anything.
    pub fn stall(&self) {
        self.mode.store(STALL, Ordering::SeqCst);
    }

    /// Forwards again. After a stall, the stalled connections are closed so
    /// the relay reconnects cleanly.
    pub fn restore(&self) {
        if self.mode.swap(FORWARD, Ordering::SeqCst) == STALL {
            self.generation.send_modify(|g| *g += 1);
        }
    }
}

async fn pump(
    from: &mut tokio::net::tcp::OwnedReadHalf,
    to: &mut tokio::net::tcp::OwnedWriteHalf,
    mode: &AtomicU8,
) {
    use tokio::io::AsyncReadExt;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        while mode.load(Ordering::SeqCst) == STALL {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if mode.load(Ordering::SeqCst) == CUT || to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// A relay given `--tls-cert` in `extra` serves TLS instead of `--plaintext`.
pub fn serves_tls(opts: &RelayOptions) -> bool {
    opts.extra.iter().any(|a| a == "--tls-cert")
}

/// A child process whose stdout and stderr lines arrive on channels (for
/// driving the binary and the example consumers). Killed when dropped.
pub struct ChildLines {
    pub child: tokio::process::Child,
    pub stdout: tokio::sync::mpsc::UnboundedReceiver<String>,
    pub stderr: tokio::sync::mpsc::UnboundedReceiver<String>,
    /// Every stderr line read so far by [`ChildLines::stderr_until`].
    pub stderr_seen: Vec<String>,
}

/// Spawns `cmd` with piped stdout/stderr and line readers on both.
pub fn spawn_lines(cmd: &mut tokio::process::Command) -> ChildLines {
    use tokio::io::AsyncBufReadExt;
    let mut child = cmd
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    fn pump_lines<R: tokio::io::AsyncRead + Unpin + Send + 'static>(
        from: R,
    ) -> tokio::sync::mpsc::UnboundedReceiver<String> {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut lines = tokio::io::BufReader::new(from).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        rx
    }
    let stdout = pump_lines(child.stdout.take().expect("piped stdout"));
    let stderr = pump_lines(child.stderr.take().expect("piped stderr"));
    ChildLines {
        child,
        stdout,
        stderr,
        stderr_seen: Vec::new(),
    }
}

impl ChildLines {
    /// The next stdout line, or None on EOF or after `within`.
    pub async fn next_stdout(&mut self, within: Duration) -> Option<String> {
        tokio::time::timeout(within, self.stdout.recv())
            .await
            .ok()
            .flatten()
    }

    /// Reads stderr until a line contains `needle`; false on EOF or timeout.
    pub async fn stderr_until(&mut self, needle: &str, within: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            match tokio::time::timeout_at(deadline, self.stderr.recv()).await {
                Ok(Some(line)) => {
                    let hit = line.contains(needle);
                    self.stderr_seen.push(line);
                    if hit {
                        return true;
                    }
                }
                Ok(None) | Err(_) => return false,
            }
        }
    }

    /// Waits for the exit (killing the child after `within`), then returns
    /// its status and the stdout and stderr lines not read yet.
    pub async fn finish(
        mut self,
        within: Duration,
    ) -> (Option<std::process::ExitStatus>, Vec<String>, Vec<String>) {
        let status = match tokio::time::timeout(within, self.child.wait()).await {
            Ok(status) => status.ok(),
            Err(_) => {
                let _ = self.child.kill().await;
                None
            }
        };
        let mut out = Vec::new();
        while let Ok(Some(line)) =
            tokio::time::timeout(Duration::from_secs(2), self.stdout.recv()).await
        {
            out.push(line);
        }
        let mut err = std::mem::take(&mut self.stderr_seen);
        while let Ok(Some(line)) =
            tokio::time::timeout(Duration::from_secs(2), self.stderr.recv()).await
        {
            err.push(line);
        }
        (status, out, err)
    }
}

/// Waits until `queue` exists and has at least one consumer (passive
/// declare on a fresh channel each try: a miss closes the channel).
pub async fn wait_for_consumer(connection: &Connection, queue: &str, within: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    while tokio::time::Instant::now() < deadline {
        if let Ok(channel) = connection.create_channel().await {
            let declared = channel
                .queue_declare(
                    queue.into(),
                    QueueDeclareOptions {
                        passive: true,
                        ..Default::default()
                    },
                    FieldTable::default(),
                )
                .await;
            if let Ok(q) = declared {
                let _ = channel.close(200, "ok".into()).await;
                if q.consumer_count() >= 1 {
                    return true;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}
