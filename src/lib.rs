//! ocrolus-relay: a hardened edge relay that accepts Ocrolus webhooks and
//! republishes each verified event onto a RabbitMQ topic exchange, answering
//! 200 only once the event is safe (broker-confirmed or fsynced in the spool).
//!
//! The modules follow the request pipeline (docs/architecture.md):
//! `server` (step 1: accept, PROXY, TLS, HTTP) → `pipeline` (steps 2-13
//! in order) through `client` (client address, allowlist) → `limits`
//! (sizes, rate limits, body read) → `auth` (HMAC / Basic) → `event`
//! (routing key) → `dedup` → `outbox` (`broker` confirm, else the
//! spool); `reject` answers every failure. Around it: `config`,
//! `tls`, `proxy_protocol`, `metrics`, `admin`, `state`, `app`
//! (wiring), `signals` and `allocator`. `ocrolus` is the client of Ocrolus' webhook API
//! behind `ocrolus-relay ocrolus …`.
//!
//! Every module is private to the crate; the `pub use` lines below are the
//! whole surface, for the binary, the integration tests, the benchmark and
//! the fuzz targets.

mod admin;
mod allocator;
mod app;
mod auth;
mod backoff;
mod broker;
mod cli;
mod client;
mod cmd;
mod config;
mod config_error;
mod config_file;
mod dedup;
mod event;
mod limits;
mod log_format;
mod log_throttle;
mod log_writer;
mod metrics;
mod nodes;
mod ocrolus;
mod outbox;
mod pipeline;
mod proxy_protocol;
mod reject;
mod server;
mod signals;
mod state;
mod tls;
mod units;

// The binary and whole relays in tests.
pub use app::Relay;
pub use cli::{Cli, Command, ParseError, parse_from, run};
pub use config::{BrokerConfig, Config};
pub use state::AppState;

// What a delivery and a message look like, for tests, the benchmark and fuzzing.
pub use auth::{AuthPolicy, BasicCredentials, Secrets, fingerprint, sign};
pub use broker::{declare_topology, properties};
pub use client::{NetPolicy, NetReject};
pub use cmd::send_test::{sample_body, tls_connector};
pub use event::{
    AccountLevel, Envelope, EventTable, KNOWN_EVENTS, LEGACY_STATUS_MAP, account_level_map,
};
pub use ocrolus::{
    Client as OcrolusClient, ClientConfig as OcrolusClientConfig,
    ClientSecret as OcrolusClientSecret,
};
pub use outbox::spool::SpoolFile;
pub use proxy_protocol::parse as parse_proxy_header;

/// `--version`: the crate version and the git commit it was built from.
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("RELAY_GIT_COMMIT"),
    ")"
);

/// Wall-clock Unix milliseconds.
pub fn now_ms() -> i64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(now.as_millis()).unwrap_or(i64::MAX)
}
