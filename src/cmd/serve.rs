//! `serve`: start the relay and run until SIGTERM/SIGINT.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::Path;

use crate::app::Relay;
use crate::config::{Config, DEFAULT_WEBHOOK_PATH, DEV_LISTEN, DEV_SECRET};
use crate::signals::{Signals, run_until_signalled};

pub async fn run(config: Config) -> anyhow::Result<()> {
    let banner = config.sources.dev.then(|| DevBanner::new(&config));
    let signals = Signals::install()?;
    crate::allocator::check();
    let relay = Relay::start(config).await?;
    if let Some(banner) = banner {
        eprintln!("{}", banner.render(relay.public_addr, relay.admin_addr));
    }
    run_until_signalled(relay, signals).await
}

/// What `serve --dev` prints once it listens: the addresses it really bound
/// and commands that work as printed against them, so that they follow
/// `--listen`, `--admin-listen`, `--webhook-path` and the configured secrets.
struct DevBanner {
    webhook_path: String,
    secret_note: String,
    /// `send-test` flags that sign the way this relay verifies.
    auth_flags: String,
}

impl DevBanner {
    fn new(config: &Config) -> Self {
        let sources = &config.sources.webhooks[0];
        let mut auth_flags = String::new();
        let dev_secret = sources.secret_file.is_none()
            && sources.secrets_env.is_none()
            && sources.basic_auth_file.is_none();
        if dev_secret {
            auth_flags.push_str(" --dev");
        }
        // RELAY_WEBHOOK_SECRETS needs no flag: send-test reads it too.
        if let Some(path) = &sources.secret_file {
            let _ = write!(auth_flags, " --secret-file {}", shell_word(path));
        }
        if let Some(path) = &sources.basic_auth_file {
            let _ = write!(auth_flags, " --basic-auth-file {}", shell_word(path));
        }
        let secret_note = if dev_secret {
            format!("HMAC secret (development only): {DEV_SECRET}")
        } else {
            "HMAC secrets from your configuration".to_owned()
        };
        Self {
            webhook_path: sources.path.clone(),
            secret_note,
            auth_flags,
        }
    }

    fn render(&self, public: SocketAddr, admin: SocketAddr) -> String {
        let url = format!("http://{public}{}", self.webhook_path);
        let target = if self.webhook_path != DEFAULT_WEBHOOK_PATH {
            format!(" --url {url}")
        } else if public != DEV_LISTEN {
            format!(" --listen {public}")
        } else {
            String::new()
        };
        format!(
            "ocrolus-relay --dev: {url} (loopback clients only), admin http://{admin}\n\
             {note}\n\
             try: cargo run -- send-test{auth}{target} --event book.verified\n\
             \x20    curl -s {admin}/metrics | grep ocrolus_relay_requests_total",
            note = self.secret_note,
            auth = self.auth_flags,
        )
    }
}

/// A path as one shell word: as is when that is safe, else single-quoted.
fn shell_word(path: &Path) -> String {
    let text = path.display().to_string();
    let safe = !text.is_empty()
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/._-+,:=@".contains(&b));
    if safe {
        text
    } else {
        format!("'{}'", text.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::cli::{Cli, Command};

    fn banner(flags: &[&str], public: &str, admin: &str) -> String {
        let cli = Cli::parse_from(["ocrolus-relay", "serve", "--dev"].iter().chain(flags));
        let Command::Serve(args) = cli.command else {
            unreachable!("parsed serve")
        };
        let config = Config::from_args(&args, None).expect("config");
        DevBanner::new(&config).render(
            public.parse().expect("public"),
            admin.parse().expect("admin"),
        )
    }

    #[test]
    fn dev_defaults_print_the_readme_commands() {
        let text = banner(&[], "127.0.0.1:8080", "127.0.0.1:9090");
        assert!(
            text.contains("http://127.0.0.1:8080/webhooks/ocrolus"),
            "{text}"
        );
        assert!(text.contains(DEV_SECRET), "{text}");
        assert!(
            text.contains("try: cargo run -- send-test --dev --event book.verified\n"),
            "{text}"
        );
        assert!(
            text.contains("curl -s 127.0.0.1:9090/metrics | grep ocrolus_relay_requests_total"),
            "{text}"
        );
    }

    #[test]
    fn moved_ports_are_in_the_printed_commands() {
        let text = banner(
            &[
                "--listen",
                "127.0.0.1:18080",
                "--admin-listen",
                "127.0.0.1:19090",
            ],
            "127.0.0.1:18080",
            "127.0.0.1:19090",
        );
        assert!(
            text.contains("send-test --dev --listen 127.0.0.1:18080 --event book.verified"),
            "{text}"
        );
        assert!(text.contains("curl -s 127.0.0.1:19090/metrics"), "{text}");
    }

    #[test]
    fn a_moved_path_or_configured_secret_is_in_the_printed_command() {
        let text = banner(
            &["--webhook-path", "/hooks", "--secret-file", "my secrets"],
            "127.0.0.1:8080",
            "127.0.0.1:9090",
        );
        assert!(
            text.contains(
                "send-test --secret-file 'my secrets' --url http://127.0.0.1:8080/hooks --event"
            ),
            "{text}"
        );
        assert!(!text.contains(DEV_SECRET), "{text}");
    }
}
