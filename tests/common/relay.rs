//! A whole relay in the test process, on ephemeral ports, against the real
//! RabbitMQ, with its own exchange, alternate exchange and spool directory.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;
use ocrolus_relay::{Cli, Command, Config, Relay};
use rustls_pki_types::CertificateDer;

use super::{AMQP_URL, SECOND_SECRET, SECRET, TestBroker, get, unique};

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
    /// The dead-letter exchange and its queue (same name).
    pub dead_letter: String,
    pub dir: tempfile::TempDir,
    pub spool_dir: PathBuf,
}

/// The `serve` flags a test relay would use (also for spawning the binary).
pub fn serve_args(
    opts: &RelayOptions,
    dir: &Path,
    exchange: &str,
    alternate: &str,
    spool_dir: &Path,
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
    .map(std::string::ToString::to_string)
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
    if !opts.extra.iter().any(|a| a == "--dead-letter-exchange") {
        args.extend(["--dead-letter-exchange".into(), format!("{exchange}.dead")]);
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
            dead_letter: format!("{exchange}.dead"),
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

    /// Deletes the test's exchanges (and the alternate and dead-letter
    /// queues).
    pub async fn cleanup(&self, broker: &TestBroker) {
        broker.delete_exchange(&self.exchange).await;
        broker.delete_exchange(&self.dead_letter).await;
        broker.delete_queue(&self.dead_letter).await;
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

/// A relay given `--tls-cert` in `extra` serves TLS instead of `--plaintext`.
pub fn serves_tls(opts: &RelayOptions) -> bool {
    opts.extra.iter().any(|a| a == "--tls-cert")
}

/// Writes a fresh self-signed certificate for `localhost` to `cert.pem` and
/// `key.pem` in `dir` (replacing earlier ones) and returns it.
pub fn write_cert(dir: &Path) -> CertificateDer<'static> {
    let certified =
        rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("rcgen");
    std::fs::write(dir.join("key.pem"), certified.signing_key.serialize_pem()).expect("write key");
    std::fs::write(dir.join("cert.pem"), certified.cert.pem()).expect("write cert");
    certified.cert.der().clone()
}

pub fn tls_relay_options(dir: &Path, extra: &[&str]) -> RelayOptions {
    let mut extra: Vec<String> = extra.iter().map(std::string::ToString::to_string).collect();
    extra.extend([
        "--tls-cert".into(),
        dir.join("cert.pem").display().to_string(),
        "--tls-key".into(),
        dir.join("key.pem").display().to_string(),
    ]);
    RelayOptions {
        extra,
        ..RelayOptions::default()
    }
}
