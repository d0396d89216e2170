//! `check-config`: load and validate everything `serve` would, print a
//! summary. Never prints a secret.

use crate::auth::{FileExposure, check_file_mode};
use crate::config::Config;
use crate::config_error::ConfigError;
use crate::outbox::spool::{SpoolError, SpoolFile};
use crate::tls::Tls;

pub fn run(config: &Config) -> Result<(), ConfigError> {
    let policy = config.sources.load_policy()?;
    let tls = config.sources.tls.as_ref().map(Tls::load).transpose()?;
    let spool = SpoolFile::open(&config.spool.dir)
        .and_then(|s| s.stats())
        .map_err(|e| match e {
            SpoolError::Corrupt(_) => ConfigError::new(format!(
                "{e}. `serve` would move it aside (spool.redb.corrupt-<time>) and start with a fresh spool; \
                 events in it would not be delivered"
            )),
            e => ConfigError::new(format!("spool {}: {e}", config.spool.dir.display())),
        })?;
    if let Some(file) = &config.file {
        println!("config file:       {}", file.display());
    }
    println!(
        "listen:            {} ({})",
        config.listen,
        if tls.is_some() { "TLS" } else { "plaintext" }
    );
    println!("admin listen:      {}", config.admin_listen);
    println!(
        "allowlist:         {} entries, {} trusted proxies{}",
        policy.net.allowed().len(),
        policy.net.trusted_proxies().len(),
        if config.sources.allowlist.is_none() {
            " (--dev: loopback only)"
        } else {
            ""
        }
    );
    println!(
        "proxy protocol:    {}",
        if config.proxy_protocol {
            "required"
        } else {
            "off"
        }
    );
    let (mut hmac, mut basic) = (0, 0);
    for (source, loaded) in config.sources.webhooks.iter().zip(&policy.sources) {
        println!(
            "source {:<12} {} ({} HMAC secrets, {} Basic credentials{})",
            source.name,
            source.path,
            loaded.auth.hmac_secrets(),
            loaded.auth.basic_credentials(),
            [
                source
                    .routing_key_prefix
                    .as_deref()
                    .map(|p| format!(", routing keys {p}.*")),
                source
                    .exchange
                    .as_deref()
                    .map(|e| format!(", exchange {e}")),
            ]
            .into_iter()
            .flatten()
            .collect::<String>()
        );
        hmac += loaded.auth.hmac_secrets();
        basic += loaded.auth.basic_credentials();
        let files = [
            ("secret file", &source.secret_file),
            ("basic auth file", &source.basic_auth_file),
        ];
        for (what, path) in files {
            if let Some(path) = path {
                let origin = format!("{what} {}", path.display());
                if check_file_mode(path, &origin)? == FileExposure::ReadableByOthers {
                    println!("WARNING: {origin} is readable by others; chmod 600 it");
                }
            }
        }
    }
    println!("HMAC secrets:      {hmac}");
    println!("Basic credentials: {basic}");
    println!(
        "credential files:  one entry per line; a line is a comment only if '#' is followed by a space"
    );
    if hmac == 0 && basic == 0 {
        println!("WARNING: authentication is OFF (--insecure-no-auth)");
    }
    if hmac > 0 {
        println!(
            "note: with HMAC on, deliveries Ocrolus sends before the secret is registered (rotate-secret API) carry no signature and get 401"
        );
    }
    println!(
        "broker nodes:      {} (starting at a random one, then in this order)",
        config.broker.nodes.labels().collect::<Vec<_>>().join(", ")
    );
    println!(
        "exchange:          {} (alternate: {})",
        config.broker.exchange,
        config
            .broker
            .alternate_exchange
            .as_deref()
            .unwrap_or("none")
    );
    println!(
        "dead letters:      {} after {} refusals (quarantine if that fails too)",
        config
            .broker
            .dead_letter_exchange
            .as_deref()
            .unwrap_or("none: quarantine"),
        config.poison.attempts
    );
    println!(
        "max body:          {} bytes (broker max message size {})",
        config.limits.max_body, config.poison.max_message_size
    );
    println!("confirm timeout:   {:?}", config.broker.confirm_timeout);
    println!(
        "spool:             {} ({} events, {} bytes waiting; max {} events / {} bytes)",
        config.spool.dir.display(),
        spool.messages,
        spool.bytes,
        config.spool.max_events,
        config.spool.max_bytes
    );
    if spool.quarantined > 0 {
        println!(
            "WARNING: {} records in the spool's quarantine ({} bytes): `ocrolus-relay spool list --quarantine`",
            spool.quarantined, spool.quarantined_bytes
        );
    }
    if let Some(tls) = tls {
        let days = (tls.not_after - crate::now_ms() / 1000) / 86_400;
        println!(
            "TLS certificate:   {} (expires in {days} days)",
            tls.subject
        );
        if days < 0 {
            return Err(ConfigError::new("the TLS certificate has expired"));
        }
    }
    println!("configuration OK");
    Ok(())
}
