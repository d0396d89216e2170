//! Command-line flags (each with a `RELAY_*` environment twin) and their
//! validation into one [`Config`]. Everything is parsed and checked once, at
//! start or on reload; nothing downstream sees a raw string it must re-check.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use clap::builder::BoolishValueParser;
use clap::{Args, ValueEnum};

use crate::auth::{AuthPolicy, BasicCredentials, Secrets};
use crate::client::NetPolicy;
use crate::config_error::ConfigError;
use crate::event::{Destination, EventTable};
use crate::nodes::Nodes;
use crate::units::{parse_duration, parse_size, parse_size_usize};

/// `--spool-max-messages` when neither it nor its former name is given.
const DEFAULT_SPOOL_MAX_MESSAGES: u64 = 1_000_000;

/// Development HMAC secret printed by `serve --dev` and used by
/// `send-test --dev`. Only ever accepted on a loopback-only listener.
pub const DEV_SECRET: &str = "ocrolus-relay-development-secret";

/// The name of the one source the single-source flags describe.
pub const DEFAULT_SOURCE: &str = "default";

/// Where `--dev` listens unless `--listen` says otherwise: loopback only,
/// plaintext.
pub const DEV_LISTEN: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 8080));

/// The default `--webhook-path`, where `send-test` sends unless given `--url`.
pub const DEFAULT_WEBHOOK_PATH: &str = "/webhooks/ocrolus";

/// The public address `serve` binds for this `--listen`: `--dev` moves the
/// default listener to [`DEV_LISTEN`], an explicit `--listen` is kept.
/// `send-test --dev --listen` applies the same rule to find the relay.
pub fn serve_listen(listen: SocketAddr, dev: bool) -> SocketAddr {
    if dev && listen == default_listen() {
        DEV_LISTEN
    } else {
        listen
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Flags shared by `serve` and `check-config`.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// YAML file with any of these settings (flag names with `_` for `-`);
    /// flags and environment override it. See relay.example.yaml.
    #[arg(long, env = "RELAY_CONFIG")]
    pub config: Option<PathBuf>,
    /// Public webhook listener.
    #[arg(long, env = "RELAY_LISTEN", default_value = "0.0.0.0:8443")]
    pub listen: SocketAddr,
    /// Admin listener: /metrics, /livez, /readyz.
    #[arg(long, env = "RELAY_ADMIN_LISTEN", default_value = "127.0.0.1:9090")]
    pub admin_listen: SocketAddr,
    /// PEM certificate chain (leaf first).
    #[arg(long, env = "RELAY_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    #[arg(long, env = "RELAY_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// Serve HTTP without TLS (only behind a TLS-terminating proxy).
    #[arg(long, env = "RELAY_PLAINTEXT", value_parser = BoolishValueParser::new())]
    pub plaintext: bool,
    /// Network policy: allowed client CIDRs and trusted proxies.
    #[arg(long, env = "RELAY_ALLOWLIST", default_value = "allowlist.yaml")]
    pub allowlist: PathBuf,
    /// Expect a PROXY protocol (v1 or v2) header on every connection.
    #[arg(long, env = "RELAY_PROXY_PROTOCOL", value_parser = BoolishValueParser::new())]
    pub proxy_protocol: bool,
    #[command(flatten)]
    pub broker: BrokerArgs,
    /// Alternate exchange (and queue) for events nobody is bound to; '' = none.
    #[arg(
        long,
        env = "RELAY_ALTERNATE_EXCHANGE",
        default_value = "ocrolus.events.unrouted"
    )]
    pub alternate_exchange: String,
    /// Dead-letter exchange (and queue) for spooled events the broker keeps
    /// refusing; '' = none (they go to the spool's quarantine table).
    #[arg(
        long,
        env = "RELAY_DEAD_LETTER_EXCHANGE",
        default_value = "ocrolus.events.dead"
    )]
    pub dead_letter_exchange: String,
    /// Refusals (nack, unroutable) of one spooled event before it is
    /// dead-lettered; it is retried after 1, 2, 4... s (at most 30 s) while
    /// the events behind it go on.
    #[arg(long, env = "RELAY_POISON_ATTEMPTS", default_value_t = 5)]
    pub poison_attempts: u32,
    /// Largest message the broker accepts (RabbitMQ `max_message_size`:
    /// 16 MiB by default since 4.0, 128 MiB in 3.8-3.13). AMQP does not
    /// announce it, so it is configured here; --max-body must not exceed it.
    #[arg(long, env = "RELAY_BROKER_MAX_MESSAGE_SIZE", default_value_t = 16 << 20)]
    pub broker_max_message_size: usize,
    /// Do not declare the exchanges at start (they are managed elsewhere).
    #[arg(long, env = "RELAY_NO_DECLARE", value_parser = BoolishValueParser::new())]
    pub no_declare: bool,
    /// Seconds to wait for a publisher confirm before spooling.
    #[arg(long, env = "RELAY_CONFIRM_TIMEOUT", default_value = "2", value_parser = parse_duration)]
    pub confirm_timeout: Duration,
    /// Confirm-mode channels used for publishing, round robin.
    #[arg(long, env = "RELAY_PUBLISH_CHANNELS", default_value_t = 4)]
    pub publish_channels: usize,
    /// Path of the webhook endpoint.
    #[arg(long, env = "RELAY_WEBHOOK_PATH", default_value = DEFAULT_WEBHOOK_PATH)]
    pub webhook_path: String,
    /// HMAC secrets, one per line (several during rotation); RELAY_WEBHOOK_SECRETS=a,b also works.
    /// A line is a comment only if '#' is followed by a space (or stands alone): '#abc…' is a
    /// secret. A file with no secret, or writable by group/others, is refused; readable by
    /// others, a warning.
    #[arg(long, env = "RELAY_SECRET_FILE")]
    pub secret_file: Option<PathBuf>,
    /// HTTP Basic credentials, `user:password` per line; comments and file mode as for
    /// --secret-file.
    #[arg(long, env = "RELAY_BASIC_AUTH_FILE")]
    pub basic_auth_file: Option<PathBuf>,
    /// Accept deliveries without any authentication. Development only.
    #[arg(long, env = "RELAY_INSECURE_NO_AUTH", value_parser = BoolishValueParser::new())]
    pub insecure_no_auth: bool,
    /// Accepted clock difference for Webhook-Timestamp, in seconds.
    #[arg(long, env = "RELAY_TIMESTAMP_TOLERANCE", default_value = "300", value_parser = parse_duration)]
    pub timestamp_tolerance: Duration,
    /// Extra event aliases `NAME=routing.key` (repeatable, or comma-separated in the env).
    #[arg(long = "event-alias", env = "RELAY_EVENT_ALIAS", value_delimiter = ',')]
    pub event_aliases: Vec<String>,
    /// RELAY_EVENT_ALIASES, the former name of RELAY_EVENT_ALIAS.
    #[arg(
        long = "legacy-event-aliases",
        env = "RELAY_EVENT_ALIASES",
        value_delimiter = ',',
        hide = true
    )]
    pub legacy_event_aliases: Vec<String>,
    /// Embedded spool directory (durable outbox).
    #[arg(long, env = "RELAY_SPOOL_DIR", default_value = "spool")]
    pub spool_dir: PathBuf,
    /// Spool bound in bytes of stored events (e.g. 1GiB, 512MiB, or bytes).
    #[arg(long, env = "RELAY_SPOOL_MAX_BYTES", default_value = "1GiB", value_parser = parse_size)]
    pub spool_max_bytes: u64,
    /// Spool bound in number of events, like the spool_max_messages metric
    /// [default: 1000000].
    #[arg(long, alias = "spool-max-events", env = "RELAY_SPOOL_MAX_MESSAGES")]
    pub spool_max_messages: Option<u64>,
    /// RELAY_SPOOL_MAX_EVENTS, the former name of RELAY_SPOOL_MAX_MESSAGES.
    #[arg(
        long = "legacy-spool-max-events",
        env = "RELAY_SPOOL_MAX_EVENTS",
        hide = true
    )]
    pub legacy_spool_max_events: Option<u64>,
    /// Largest accepted request body (e.g. 1MiB, 256KiB, or bytes).
    #[arg(long, env = "RELAY_MAX_BODY", default_value = "1MiB", value_parser = parse_size_usize)]
    pub max_body: usize,
    /// Seconds allowed to send the request headers (also closes idle HTTP/1 keep-alive connections).
    #[arg(long, env = "RELAY_HEADER_TIMEOUT", default_value = "10", value_parser = parse_duration)]
    pub header_timeout: Duration,
    /// Seconds allowed to send the request body.
    #[arg(long, env = "RELAY_BODY_TIMEOUT", default_value = "10", value_parser = parse_duration)]
    pub body_timeout: Duration,
    /// Seconds one request may take from headers to answer, whatever it waits for.
    #[arg(long, env = "RELAY_REQUEST_TIMEOUT", default_value = "15", value_parser = parse_duration)]
    pub request_timeout: Duration,
    /// Maximum open client connections; more are closed at once.
    #[arg(long, env = "RELAY_MAX_CONNECTIONS", default_value_t = 10_000)]
    pub max_connections: usize,
    /// Maximum open connections from one client address (IPv6: per /64);
    /// trusted proxies without PROXY protocol are exempt.
    #[arg(long, env = "RELAY_MAX_CONNECTIONS_PER_IP", default_value_t = 100)]
    pub max_connections_per_ip: usize,
    /// Connections kept for allowlisted peers on top of --max-connections.
    #[arg(long, env = "RELAY_RESERVED_CONNECTIONS", default_value_t = 64)]
    pub reserved_connections: usize,
    /// Maximum requests being processed at once; more get 503.
    #[arg(long, env = "RELAY_MAX_IN_FLIGHT", default_value_t = 1024)]
    pub max_in_flight: usize,
    /// Requests per second allowed from one client address (IPv6: per /64).
    #[arg(long, env = "RELAY_RATE_LIMIT_PER_IP", default_value_t = 200)]
    pub rate_limit_per_ip: u32,
    /// Requests per second allowed in total.
    #[arg(long, env = "RELAY_RATE_LIMIT_GLOBAL", default_value_t = 2000)]
    pub rate_limit_global: u32,
    /// Burst size, as a multiple of one second's rate.
    #[arg(long, env = "RELAY_RATE_LIMIT_BURST", default_value_t = 2)]
    pub rate_limit_burst: u32,
    /// Seconds a delivery id is remembered for de-duplication (0 = off).
    #[arg(long, env = "RELAY_DEDUP_WINDOW", default_value = "3600", value_parser = parse_duration)]
    pub dedup_window: Duration,
    /// Most delivery ids remembered for de-duplication.
    #[arg(long, env = "RELAY_DEDUP_CAPACITY", default_value_t = 200_000)]
    pub dedup_capacity: usize,
    /// Seconds to keep serving after SIGTERM while readiness is already 503.
    #[arg(long, env = "RELAY_SHUTDOWN_GRACE", default_value = "0", value_parser = parse_duration)]
    pub shutdown_grace: Duration,
    /// Seconds requests in flight get to finish after the listener closed.
    #[arg(long, env = "RELAY_SHUTDOWN_DEADLINE", default_value = "25", value_parser = parse_duration)]
    pub shutdown_deadline: Duration,
    /// Log format.
    #[arg(long, env = "RELAY_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// Quick start: plaintext on 127.0.0.1:8080 (unless --listen names
    /// another loopback address), loopback clients only, a printed
    /// development secret.
    #[arg(long, env = "RELAY_DEV", value_parser = BoolishValueParser::new())]
    pub dev: bool,
}

/// Where events go; shared by `serve`, `tail` and `spool replay`.
#[derive(Debug, Clone, Args)]
pub struct BrokerArgs {
    /// RabbitMQ URL (amqp:// or amqps://). Repeat it, or separate URLs with
    /// commas, for the nodes of a cluster: the relay starts at a random one
    /// and moves on in list order when a node fails.
    #[arg(
        long,
        env = "RELAY_AMQP_URL",
        value_delimiter = ',',
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f",
        hide_default_value = true
    )]
    pub amqp_url: Vec<String>,
    /// PEM CA certificate(s) that sign the broker's certificate (amqps://),
    /// trusted on top of the system's.
    #[arg(long, env = "RELAY_AMQP_CA_FILE")]
    pub amqp_ca_file: Option<PathBuf>,
    /// PEM client certificate chain for mutual TLS with the broker.
    #[arg(long, env = "RELAY_AMQP_CLIENT_CERT")]
    pub amqp_client_cert: Option<PathBuf>,
    /// PEM private key of --amqp-client-cert.
    #[arg(long, env = "RELAY_AMQP_CLIENT_KEY")]
    pub amqp_client_key: Option<PathBuf>,
    /// Topic exchange the events are published to.
    #[arg(long, env = "RELAY_EXCHANGE", default_value = "ocrolus.events")]
    pub exchange: String,
}

/// Files the relay reads at start and again on SIGHUP.
#[derive(Debug, Clone)]
pub struct Sources {
    pub allowlist: Option<PathBuf>,
    /// The webhook sources: one `default` from the single-source flags, or
    /// the config file's `sources:`. Paths and names are distinct.
    pub webhooks: Vec<WebhookSource>,
    pub tls: Option<TlsPaths>,
    pub insecure_no_auth: bool,
    pub dev: bool,
    pub timestamp_tolerance: Duration,
}

#[derive(Debug, Clone)]
pub struct TlsPaths {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// One Ocrolus webhook the relay serves: its own path and credentials.
#[derive(Debug, Clone)]
pub struct WebhookSource {
    pub name: String,
    pub path: String,
    pub secret_file: Option<PathBuf>,
    /// `RELAY_WEBHOOK_SECRETS`; only the `default` source reads it.
    pub secrets_env: Option<String>,
    pub basic_auth_file: Option<PathBuf>,
    /// Put before every routing key (`sandbox` → `sandbox.book.verified`).
    pub routing_key_prefix: Option<String>,
    /// Its own topic exchange instead of `--exchange`.
    pub exchange: Option<String>,
}

/// One source's reloadable part: the credentials its deliveries must carry.
#[derive(Debug)]
pub struct SourcePolicy {
    pub name: String,
    pub path: String,
    pub auth: AuthPolicy,
    pub routing_key_prefix: Option<String>,
    /// Its name and exchange, as every one of its envelopes carries them.
    pub destination: Destination,
}

/// The part of the configuration that SIGHUP swaps atomically.
#[derive(Debug)]
pub struct Policy {
    pub net: NetPolicy,
    pub sources: Vec<SourcePolicy>,
}

impl Policy {
    /// Step 4: the source whose path this is. A delivery is only ever
    /// checked against its own source's credentials.
    pub fn source(&self, path: &str) -> Option<&SourcePolicy> {
        self.sources.iter().find(|s| s.path == path)
    }
}

impl Sources {
    /// Reads and validates the reloadable files.
    pub fn load_policy(&self) -> Result<Policy, ConfigError> {
        let net = match (&self.allowlist, self.dev) {
            (Some(path), _) => NetPolicy::load(path)?,
            (None, true) => NetPolicy::loopback_only(),
            (None, false) => return Err(ConfigError::new("no allowlist given")),
        };
        let sources = self
            .webhooks
            .iter()
            .map(|source| {
                self.load_source(source).map_err(|e| {
                    if self.webhooks.len() == 1 {
                        e
                    } else {
                        ConfigError::new(format!("source {}: {e}", source.name))
                    }
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Policy { net, sources })
    }

    fn load_source(&self, source: &WebhookSource) -> Result<SourcePolicy, ConfigError> {
        let mut secrets = match &source.secret_file {
            Some(path) => Secrets::load(path)?,
            None => Secrets::default(),
        };
        if let Some(list) = &source.secrets_env {
            let nothing_else = secrets.is_empty()
                && source.basic_auth_file.is_none()
                && !self.dev
                && !self.insecure_no_auth;
            if list.trim().is_empty() && nothing_else {
                return Err(ConfigError::new(
                    "RELAY_WEBHOOK_SECRETS is set but empty; put the webhook secret in it, or unset it and pass --secret-file",
                ));
            }
            let from_env = Secrets::parse(list, "RELAY_WEBHOOK_SECRETS", ',')?;
            if from_env.is_empty() && !list.trim().is_empty() {
                return Err(ConfigError::new("RELAY_WEBHOOK_SECRETS holds no secret"));
            }
            secrets.extend(from_env);
        }
        if self.dev && secrets.is_empty() && source.basic_auth_file.is_none() {
            secrets.extend(Secrets::parse(DEV_SECRET, "the development secret", ',')?);
        }
        let basic = match &source.basic_auth_file {
            Some(path) => BasicCredentials::load(path)?,
            None => BasicCredentials::default(),
        };
        let auth = AuthPolicy::new(
            secrets,
            basic,
            self.timestamp_tolerance,
            self.insecure_no_auth,
        )?;
        Ok(SourcePolicy {
            name: source.name.clone(),
            path: source.path.clone(),
            auth,
            routing_key_prefix: source.routing_key_prefix.clone(),
            destination: Destination {
                source: Arc::from(source.name.as_str()),
                exchange: source.exchange.as_deref().map(Arc::from),
            },
        })
    }
}

#[derive(Debug, Clone)]
pub struct BrokerConfig {
    pub nodes: Nodes,
    pub exchange: String,
    /// The sources' own exchanges other than `exchange`, each once, with
    /// the sources that publish to it (for the error when it is missing).
    pub source_exchanges: Vec<SourceExchange>,
    pub alternate_exchange: Option<String>,
    pub dead_letter_exchange: Option<String>,
    pub declare: bool,
    pub confirm_timeout: Duration,
    pub channels: usize,
}

#[derive(Debug, Clone)]
pub struct SpoolConfig {
    pub dir: PathBuf,
    pub max_bytes: u64,
    pub max_events: u64,
}

/// When a spooled event counts as poison (see the drainer).
#[derive(Debug, Clone)]
pub struct PoisonConfig {
    /// Refusals before the event is dead-lettered.
    pub attempts: u32,
    /// Bodies above this are never sent (the broker would close the channel).
    pub max_message_size: usize,
}

#[derive(Debug, Clone)]
pub struct Limits {
    pub max_body: usize,
    pub header_timeout: Duration,
    pub body_timeout: Duration,
    pub request_timeout: Duration,
    pub max_connections: usize,
    pub max_connections_per_ip: usize,
    pub reserved_connections: usize,
    pub max_in_flight: usize,
    pub rate_per_ip: u32,
    pub rate_global: u32,
    pub rate_burst: u32,
}

#[derive(Debug, Clone)]
pub struct DedupConfig {
    pub window: Duration,
    pub capacity: usize,
}

#[derive(Debug, Clone)]
pub struct ShutdownConfig {
    pub grace: Duration,
    pub deadline: Duration,
}

/// The validated configuration of `serve`.
#[derive(Debug, Clone)]
pub struct Config {
    /// The `--config` file the settings came from, if any.
    pub file: Option<PathBuf>,
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    pub proxy_protocol: bool,
    pub sources: Sources,
    pub broker: BrokerConfig,
    pub spool: SpoolConfig,
    pub poison: PoisonConfig,
    pub limits: Limits,
    pub dedup: DedupConfig,
    pub shutdown: ShutdownConfig,
    pub events: EventTable,
    pub log_format: LogFormat,
}

impl Config {
    /// Validates the flags. `secrets_env` is `RELAY_WEBHOOK_SECRETS`, passed in
    /// so tests never mutate the process environment.
    pub fn from_args(args: &ServeArgs, secrets_env: Option<String>) -> Result<Self, ConfigError> {
        let listen = serve_listen(args.listen, args.dev);
        let tls = match (&args.tls_cert, &args.tls_key) {
            (Some(cert), Some(key)) => Some(TlsPaths {
                cert: cert.clone(),
                key: key.clone(),
            }),
            (None, None) => None,
            _ => {
                return Err(ConfigError::new(
                    "--tls-cert and --tls-key must be given together",
                ));
            }
        };
        if args.dev {
            if tls.is_some() {
                return Err(ConfigError::new("--dev serves plaintext; drop --tls-*"));
            }
            if !listen.ip().is_loopback() {
                return Err(ConfigError::new(format!(
                    "--dev listens on loopback only, not {listen}"
                )));
            }
        } else if tls.is_none() && !args.plaintext {
            return Err(ConfigError::new(
                "TLS needs --tls-cert and --tls-key; pass --plaintext to serve HTTP behind a TLS-terminating proxy (or --dev for a local trial)",
            ));
        }
        if args.insecure_no_auth && !args.dev && !listen.ip().is_loopback() {
            return Err(ConfigError::new(
                "--insecure-no-auth is only allowed with --dev or a loopback --listen",
            ));
        }
        let webhooks = webhook_sources(args, secrets_env)?;
        check_exchange_name("--exchange", &args.broker.exchange)?;
        let alternate_exchange = match args.alternate_exchange.as_str() {
            "" => None,
            name => {
                check_exchange_name("--alternate-exchange", name)?;
                if name == args.broker.exchange {
                    return Err(ConfigError::new(
                        "--alternate-exchange must differ from --exchange",
                    ));
                }
                Some(name.to_owned())
            }
        };
        let dead_letter_exchange = match args.dead_letter_exchange.as_str() {
            "" => None,
            name => {
                check_exchange_name("--dead-letter-exchange", name)?;
                if name == args.broker.exchange || Some(name) == alternate_exchange.as_deref() {
                    return Err(ConfigError::new(
                        "--dead-letter-exchange must differ from --exchange and --alternate-exchange",
                    ));
                }
                Some(name.to_owned())
            }
        };
        for source in &webhooks {
            let Some(exchange) = source.exchange.as_deref() else {
                continue;
            };
            if Some(exchange) == alternate_exchange.as_deref()
                || Some(exchange) == dead_letter_exchange.as_deref()
            {
                return Err(ConfigError::new(format!(
                    "source {}: exchange {exchange} is the alternate or dead-letter exchange; give the source a topic exchange of its own (or none, for --exchange)",
                    source.name
                )));
            }
        }
        let source_exchanges = source_exchanges(&webhooks, &args.broker.exchange);
        if args.poison_attempts == 0 {
            return Err(ConfigError::new("--poison-attempts must be positive"));
        }
        if args.max_body > args.broker_max_message_size {
            return Err(ConfigError::new(format!(
                "--max-body {} is larger than --broker-max-message-size {}: the broker would refuse such an event after the relay answered 200. \
                 Lower --max-body, or raise --broker-max-message-size to the broker's max_message_size (`rabbitmqctl eval 'application:get_env(rabbit, max_message_size).'`)",
                args.max_body, args.broker_max_message_size
            )));
        }
        let nodes = Nodes::from_args(&args.broker)?;
        if args.publish_channels == 0 || args.publish_channels > 64 {
            return Err(ConfigError::new("--publish-channels must be 1..=64"));
        }
        if args.max_body == 0
            || args.max_connections == 0
            || args.max_connections_per_ip == 0
            || args.max_in_flight == 0
        {
            return Err(ConfigError::new(
                "--max-body, --max-connections, --max-connections-per-ip and --max-in-flight must be positive",
            ));
        }
        if args.rate_limit_per_ip == 0 || args.rate_limit_global == 0 || args.rate_limit_burst == 0
        {
            return Err(ConfigError::new("rate limits must be positive"));
        }
        if args.confirm_timeout.is_zero() {
            return Err(ConfigError::new("--confirm-timeout must be positive"));
        }
        if args.request_timeout <= args.confirm_timeout {
            return Err(ConfigError::new(
                "--request-timeout must be longer than --confirm-timeout (a request waits for the confirm, then the spool)",
            ));
        }
        let allowlist = if args.dev && !args.allowlist.exists() {
            None
        } else if args.dev && args.allowlist == Path::new("allowlist.yaml") {
            // The shipped allowlist names Ocrolus' addresses, which never reach
            // a loopback listener: the quick start accepts loopback clients.
            None
        } else {
            Some(args.allowlist.clone())
        };
        let config = Config {
            file: args.config.clone(),
            listen,
            admin_listen: args.admin_listen,
            proxy_protocol: args.proxy_protocol,
            sources: Sources {
                allowlist,
                webhooks,
                tls,
                insecure_no_auth: args.insecure_no_auth,
                dev: args.dev,
                timestamp_tolerance: args.timestamp_tolerance,
            },
            broker: BrokerConfig {
                nodes,
                exchange: args.broker.exchange.clone(),
                source_exchanges,
                alternate_exchange,
                dead_letter_exchange,
                declare: !args.no_declare,
                confirm_timeout: args.confirm_timeout,
                channels: args.publish_channels,
            },
            spool: SpoolConfig {
                dir: args.spool_dir.clone(),
                max_bytes: args.spool_max_bytes,
                max_events: args
                    .spool_max_messages
                    .or(args.legacy_spool_max_events)
                    .unwrap_or(DEFAULT_SPOOL_MAX_MESSAGES),
            },
            poison: PoisonConfig {
                attempts: args.poison_attempts,
                max_message_size: args.broker_max_message_size,
            },
            limits: Limits {
                max_body: args.max_body,
                header_timeout: args.header_timeout,
                body_timeout: args.body_timeout,
                request_timeout: args.request_timeout,
                max_connections: args.max_connections,
                max_connections_per_ip: args.max_connections_per_ip,
                reserved_connections: args.reserved_connections,
                max_in_flight: args.max_in_flight,
                rate_per_ip: args.rate_limit_per_ip,
                rate_global: args.rate_limit_global,
                rate_burst: args.rate_limit_burst,
            },
            dedup: DedupConfig {
                window: args.dedup_window,
                capacity: args.dedup_capacity,
            },
            shutdown: ShutdownConfig {
                grace: args.shutdown_grace,
                deadline: args.shutdown_deadline,
            },
            events: EventTable::with_aliases(
                &[&args.event_aliases[..], &args.legacy_event_aliases[..]].concat(),
            )?,
            log_format: args.log_format,
        };
        Ok(config)
    }
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 8443))
}

/// The sources: the config file's `sources:` list, or one `default` made
/// of the single-source flags. Names are short and plain (they become a
/// metric label and a header value); paths are distinct.
fn webhook_sources(
    args: &ServeArgs,
    secrets_env: Option<String>,
) -> Result<Vec<WebhookSource>, ConfigError> {
    let listed = match &args.config {
        Some(path) => crate::config_file::ConfigFile::load(path)?.sources,
        None => None,
    };
    let Some(entries) = listed else {
        if !args.webhook_path.starts_with('/') {
            return Err(ConfigError::new(format!(
                "--webhook-path must start with '/': {:?}",
                args.webhook_path
            )));
        }
        return Ok(vec![WebhookSource {
            name: DEFAULT_SOURCE.to_owned(),
            path: args.webhook_path.clone(),
            secret_file: args.secret_file.clone(),
            secrets_env,
            basic_auth_file: args.basic_auth_file.clone(),
            routing_key_prefix: None,
            exchange: None,
        }]);
    };
    if args.secret_file.is_some()
        || args.basic_auth_file.is_some()
        || secrets_env.is_some()
        || args.webhook_path != DEFAULT_WEBHOOK_PATH
    {
        return Err(ConfigError::new(
            "with `sources:` in the config file, give each source its own path, secret_file and basic_auth_file (not --webhook-path, --secret-file, --basic-auth-file or RELAY_WEBHOOK_SECRETS)",
        ));
    }
    if entries.is_empty() {
        return Err(ConfigError::new("`sources:` is empty"));
    }
    let mut sources: Vec<WebhookSource> = Vec::new();
    for entry in entries {
        let line = entry.name.referenced.line();
        let name = entry.name.value;
        let plain = (1..=32).contains(&name.len())
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
        if !plain {
            return Err(ConfigError::new(format!(
                "line {line}: source name {name:?}: use 1-32 of a-z, 0-9, '-', '_'"
            )));
        }
        let path_line = entry.path.referenced.line();
        let path = entry.path.value;
        if !path.starts_with('/') {
            return Err(ConfigError::new(format!(
                "line {path_line}: source {name}: path must start with '/': {path:?}"
            )));
        }
        if let Some(other) = sources.iter().find(|s| s.name == name) {
            return Err(ConfigError::new(format!(
                "line {line}: source name {:?} is used twice",
                other.name
            )));
        }
        if let Some(other) = sources.iter().find(|s| s.path == path) {
            return Err(ConfigError::new(format!(
                "line {path_line}: source {name}: path {path} is already the path of source {}",
                other.name
            )));
        }
        if entry.secret_file.is_none() && entry.basic_auth_file.is_none() && !args.insecure_no_auth
        {
            return Err(ConfigError::new(format!(
                "line {line}: source {name} has neither secret_file nor basic_auth_file"
            )));
        }
        let routing_key_prefix = match entry.routing_key_prefix {
            Some(prefix) => {
                let value = prefix.value.trim_end_matches('.').to_owned();
                if !crate::event::is_well_formed(&value) {
                    return Err(ConfigError::new(format!(
                        "line {}: source {name}: routing_key_prefix {:?} is not a routing-key word",
                        prefix.referenced.line(),
                        prefix.value
                    )));
                }
                Some(value)
            }
            None => None,
        };
        let exchange = match entry.exchange {
            Some(exchange) => {
                check_exchange_name(
                    &format!(
                        "line {}: source {name}: exchange",
                        exchange.referenced.line()
                    ),
                    &exchange.value,
                )?;
                Some(exchange.value)
            }
            None => None,
        };
        sources.push(WebhookSource {
            name,
            path,
            secret_file: entry.secret_file,
            secrets_env: None,
            basic_auth_file: entry.basic_auth_file,
            routing_key_prefix,
            exchange,
        });
    }
    Ok(sources)
}

/// A topic exchange of one or more sources, declared (or, with
/// `--no-declare`, checked) next to `--exchange`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceExchange {
    pub name: String,
    pub sources: Vec<String>,
}

/// The distinct source exchanges other than `main`, in the order of the
/// sources; sources may share one.
fn source_exchanges(webhooks: &[WebhookSource], main: &str) -> Vec<SourceExchange> {
    let mut out: Vec<SourceExchange> = Vec::new();
    for source in webhooks {
        let Some(name) = source.exchange.as_deref().filter(|e| *e != main) else {
            continue;
        };
        match out.iter_mut().find(|e| e.name == name) {
            Some(shared) => shared.sources.push(source.name.clone()),
            None => out.push(SourceExchange {
                name: name.to_owned(),
                sources: vec![source.name.clone()],
            }),
        }
    }
    out
}

fn check_exchange_name(flag: &str, name: &str) -> Result<(), ConfigError> {
    let ok = !name.is_empty()
        && name.len() <= 255
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'));
    if ok {
        Ok(())
    } else {
        Err(ConfigError::new(format!(
            "{flag}: {name:?} is not a valid exchange name"
        )))
    }
}

/// Strips the password from an AMQP URL for logs and summaries.
pub fn redact_url(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => match rest.split_once('@') {
            Some((userinfo, host)) => {
                let user = userinfo.split(':').next().unwrap_or("");
                format!("{scheme}://{user}:***@{host}")
            }
            None => url.to_owned(),
        },
        None => url.to_owned(),
    }
}
