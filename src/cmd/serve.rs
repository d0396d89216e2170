//! `serve`: start the relay and run until SIGTERM/SIGINT.

use crate::app::Relay;
use crate::config::{Config, DEV_SECRET};

pub async fn run(config: Config) -> anyhow::Result<()> {
    if config.sources.dev {
        let secret_note =
            if config.sources.secret_file.is_none() && config.sources.secrets_env.is_none() {
                format!("HMAC secret (development only): {DEV_SECRET}")
            } else {
                "HMAC secrets from your configuration".to_owned()
            };
        eprintln!(
            "ocrolus-relay --dev: http://{}{} (loopback clients only)\n{secret_note}\ntry: cargo run -- send-test --dev --event book.verified",
            config.listen, config.webhook_path
        );
    }
    let relay = Relay::start(config).await?;
    crate::signals::run_until_signalled(relay).await
}
