//! ocrolus-relay: a hardened edge relay that accepts Ocrolus webhooks and
//! republishes each verified event onto a RabbitMQ topic exchange, answering
//! 200 only once the event is safe (broker-confirmed or fsynced in the spool).
//!
//! The modules follow the request pipeline of DESIGN.md:
//! [`server`] (accept, steps 1 and 13) → [`client`] (client address, allowlist)
//! → [`limits`] (sizes, rate limits, body read) → [`auth`] (HMAC / Basic) →
//! [`event`] (routing key) → [`dedup`] → [`outbox`] ([`broker`] confirm, else
//! [`spool`]). Around it: [`config`], [`tls`], [`proxy_protocol`],
//! [`metrics`], [`admin`], [`app`] (wiring) and [`signals`].

pub mod admin;
pub mod app;
pub mod auth;
pub mod backoff;
pub mod broker;
pub mod cli;
pub mod client;
pub mod cmd;
pub mod config;
pub mod config_error;
pub mod dedup;
pub mod event;
pub mod limits;
pub mod metrics;
pub mod outbox;
pub mod pipeline;
pub mod proxy_protocol;
pub mod reject;
pub mod server;
pub mod signals;
pub mod state;
pub mod tls;

/// Wall-clock Unix milliseconds.
pub fn now_ms() -> i64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(now.as_millis()).unwrap_or(i64::MAX)
}
