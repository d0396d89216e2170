//! `ocrolus …`: the Ocrolus side of the set-up from the relay's own CLI.
//! `webhooks list|show|add|update|delete|events|test` wrap the org-level
//! webhook API; `rotate-secret` (in [`super::rotate_secret`]) changes a
//! webhook's HMAC secret on both sides without a moment of disagreement.
//! Human-readable output by default, one JSON document with `--json`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use futures_util::StreamExt;
use serde_json::{Value, json};

use crate::auth::{BasicCredentials, Secrets};
use crate::config::{BrokerArgs, DEFAULT_SOURCE};
use crate::event::KNOWN_EVENTS;
use crate::ocrolus::api::{Webhook, WebhookBody, WebhookSettings, redact_userinfo};
use crate::ocrolus::client::{ClientSecret, DEFAULT_API_URL, DEFAULT_AUDIENCE, DEFAULT_TOKEN_URL};
use crate::ocrolus::{Client, ClientConfig};

#[derive(Debug, clap::Args)]
pub struct OcrolusArgs {
    #[command(flatten)]
    pub api: ApiArgs,
    #[command(subcommand)]
    pub command: OcrolusCommand,
}

/// How to reach the Ocrolus API.
#[derive(Debug, Clone, clap::Args)]
pub struct ApiArgs {
    /// OAuth2 client id (Ocrolus Dashboard → API credentials).
    #[arg(long, env = "OCROLUS_CLIENT_ID", global = true)]
    pub client_id: Option<String>,
    /// OAuth2 client secret; prefer the environment variable to the flag.
    #[arg(
        long,
        env = "OCROLUS_CLIENT_SECRET",
        global = true,
        hide_env_values = true
    )]
    pub client_secret: Option<String>,
    /// OAuth2 token endpoint.
    #[arg(long, env = "OCROLUS_TOKEN_URL", global = true, default_value = DEFAULT_TOKEN_URL)]
    pub token_url: String,
    /// Base URL of the org-level webhook API.
    #[arg(long, env = "OCROLUS_API_URL", global = true, default_value = DEFAULT_API_URL)]
    pub api_url: String,
    /// OAuth2 audience.
    #[arg(long, env = "OCROLUS_AUDIENCE", global = true, default_value = DEFAULT_AUDIENCE)]
    pub audience: String,
    /// Seconds one API call may take.
    #[arg(long, env = "OCROLUS_TIMEOUT", global = true, default_value = "30", value_parser = crate::units::parse_duration)]
    pub api_timeout: Duration,
    /// Print one JSON document instead of text.
    #[arg(long, global = true)]
    pub json: bool,
}

impl ApiArgs {
    pub fn client(&self) -> anyhow::Result<Client> {
        Ok(Client::new(ClientConfig {
            api_url: self.api_url.clone(),
            token_url: self.token_url.clone(),
            audience: self.audience.clone(),
            client_id: self.client_id.clone().unwrap_or_default(),
            client_secret: ClientSecret::new(self.client_secret.clone().unwrap_or_default()),
            timeout: self.api_timeout,
        })?)
    }
}

/// Which relay source a command is about, and where that relay is.
#[derive(Debug, Clone, clap::Args)]
pub struct SourceArgs {
    /// The relay's config file: the source's path and files, and the admin
    /// address, come from it.
    #[arg(long, env = "RELAY_CONFIG")]
    pub config: Option<PathBuf>,
    /// Source name (the single-source settings describe the source `default`).
    #[arg(long, default_value = DEFAULT_SOURCE)]
    pub source: String,
    /// Without --config: the source's HMAC secret file (as given to `serve`).
    #[arg(long, env = "RELAY_SECRET_FILE")]
    pub secret_file: Option<PathBuf>,
    /// Without --config: the source's Basic credentials file.
    #[arg(long, env = "RELAY_BASIC_AUTH_FILE")]
    pub basic_auth_file: Option<PathBuf>,
    /// Without --config: the source's webhook path.
    #[arg(long, env = "RELAY_WEBHOOK_PATH", default_value = "/webhooks/ocrolus")]
    pub webhook_path: String,
    /// The running relay's admin listener [default: the config's
    /// admin_listen, else http://127.0.0.1:9090].
    #[arg(long, env = "RELAY_ADMIN_URL")]
    pub admin_url: Option<String>,
}

/// A relay source as the management commands need it.
#[derive(Debug, Clone)]
pub struct SourceRef {
    pub name: String,
    pub path: String,
    pub secret_file: Option<PathBuf>,
    pub basic_auth_file: Option<PathBuf>,
    pub admin_url: String,
}

impl SourceArgs {
    /// With `--config`, reads the file exactly as `serve` would (flags and
    /// environment included) and picks the named source.
    pub fn resolve(&self) -> anyhow::Result<SourceRef> {
        let Some(path) = &self.config else {
            if self.source != DEFAULT_SOURCE {
                bail!(
                    "source {:?}: without --config the only source is {DEFAULT_SOURCE:?}",
                    self.source
                );
            }
            return Ok(SourceRef {
                name: self.source.clone(),
                path: self.webhook_path.clone(),
                secret_file: self.secret_file.clone(),
                basic_auth_file: self.basic_auth_file.clone(),
                admin_url: self
                    .admin_url
                    .clone()
                    .unwrap_or_else(|| "http://127.0.0.1:9090".to_owned()),
            });
        };
        let argv = [
            std::ffi::OsString::from("ocrolus-relay"),
            "check-config".into(),
            "--config".into(),
            path.into(),
        ];
        let cli = crate::cli::parse_from(argv, None).map_err(|e| anyhow!("{e}"))?;
        let crate::cli::Command::CheckConfig(args) = cli.command else {
            bail!("cannot read {}", path.display());
        };
        let config =
            crate::config::Config::from_args(&args, std::env::var("RELAY_WEBHOOK_SECRETS").ok())?;
        let source = config
            .sources
            .webhooks
            .iter()
            .find(|s| s.name == self.source)
            .ok_or_else(|| {
                let names: Vec<&str> = config
                    .sources
                    .webhooks
                    .iter()
                    .map(|s| s.name.as_str())
                    .collect();
                anyhow!(
                    "{} has no source {:?} (sources: {})",
                    path.display(),
                    self.source,
                    names.join(", ")
                )
            })?;
        let admin = config.admin_listen;
        let admin_host = if admin.ip().is_unspecified() {
            format!("127.0.0.1:{}", admin.port())
        } else {
            admin.to_string()
        };
        Ok(SourceRef {
            name: source.name.clone(),
            path: source.path.clone(),
            secret_file: source.secret_file.clone(),
            basic_auth_file: source.basic_auth_file.clone(),
            admin_url: self
                .admin_url
                .clone()
                .unwrap_or_else(|| format!("http://{admin_host}")),
        })
    }
}

#[derive(Debug, clap::Subcommand)]
pub enum OcrolusCommand {
    /// Org-level webhooks (at most five per organisation).
    #[command(subcommand)]
    Webhooks(WebhooksCommand),
    /// Rotate a source's HMAC secret on the relay and at Ocrolus, without downtime.
    RotateSecret(super::rotate_secret::RotateArgs),
}

#[derive(Debug, clap::Subcommand)]
pub enum WebhooksCommand {
    /// List the organisation's webhooks.
    List,
    /// Show one webhook.
    Show { uuid: String },
    /// Register a webhook pointing at a relay source.
    Add(AddArgs),
    /// Change a webhook's URL, description, events or active flag.
    Update(UpdateArgs),
    /// Delete a webhook.
    Delete {
        uuid: String,
        /// Really delete it.
        #[arg(long)]
        yes: bool,
    },
    /// List the events a webhook is subscribed to.
    Events { uuid: String },
    /// Ask Ocrolus to send a test event and watch the relay publish it.
    Test(TestArgs),
}

#[derive(Debug, Clone, clap::Args)]
#[group(id = "event_choice", required = true, multiple = false, args = ["events", "all_events"])]
pub struct AddArgs {
    #[command(flatten)]
    pub source: SourceArgs,
    /// Public URL of the relay for this source (https://…); its path must be the source's.
    #[arg(long)]
    pub url: String,
    /// Event names (comma-separated or repeated).
    #[arg(long, value_delimiter = ',')]
    pub events: Vec<String>,
    /// Every organisation-level event the relay knows.
    #[arg(long)]
    pub all_events: bool,
    /// Description shown in the Dashboard (3–255 characters).
    #[arg(long)]
    pub description: Option<String>,
    /// Do not upload the source's newest secret to the new webhook.
    #[arg(long)]
    pub no_secret: bool,
}

#[derive(Debug, Clone, clap::Args)]
pub struct UpdateArgs {
    pub uuid: String,
    #[arg(long)]
    pub url: Option<String>,
    /// Replace all subscriptions with these events.
    #[arg(long, value_delimiter = ',', conflicts_with = "all_events")]
    pub events: Vec<String>,
    #[arg(long)]
    pub all_events: bool,
    #[arg(long)]
    pub description: Option<String>,
    /// Activate (true) or deactivate (false) the webhook.
    #[arg(long)]
    pub active: Option<bool>,
}

#[derive(Debug, Clone, clap::Args)]
pub struct TestArgs {
    pub uuid: String,
    /// Event name (or event uuid) to test, e.g. book.verified.
    #[arg(long)]
    pub event: String,
    #[command(flatten)]
    pub broker: BrokerArgs,
    /// Seconds to wait for the relay to publish the test event.
    #[arg(long, default_value = "30", value_parser = crate::units::parse_duration)]
    pub wait: Duration,
}

pub async fn run(args: OcrolusArgs) -> anyhow::Result<()> {
    let api = &args.api;
    match args.command {
        OcrolusCommand::RotateSecret(rotate) => super::rotate_secret::run(api, rotate).await,
        OcrolusCommand::Webhooks(command) => {
            let client = api.client()?;
            let out = Output { json: api.json };
            match command {
                WebhooksCommand::List => list(&client, out).await,
                WebhooksCommand::Show { uuid } => show(&client, &uuid, out).await,
                WebhooksCommand::Add(add_args) => add(&client, add_args, out).await,
                WebhooksCommand::Update(update_args) => update(&client, update_args, out).await,
                WebhooksCommand::Delete { uuid, yes } => {
                    if !yes {
                        bail!("deleting webhook {uuid} stops its deliveries: pass --yes");
                    }
                    client.delete_webhook(&uuid).await?;
                    out.done(
                        json!({ "deleted": uuid }),
                        &format!("deleted webhook {uuid}"),
                    );
                    Ok(())
                }
                WebhooksCommand::Events { uuid } => events(&client, &uuid, out).await,
                WebhooksCommand::Test(test_args) => test(&client, test_args, out).await,
            }
        }
    }
}

#[derive(Clone, Copy)]
struct Output {
    json: bool,
}

impl Output {
    fn done(self, value: Value, text: &str) {
        if self.json {
            println!("{value}");
        } else {
            println!("{text}");
        }
    }
}

/// A webhook as printed: the URL without its Basic password.
fn shown(hook: &Webhook) -> Value {
    let mut hook = hook.clone();
    hook.url = hook.url.as_deref().map(redact_userinfo);
    serde_json::to_value(hook).unwrap_or(Value::Null)
}

fn describe(hook: &Webhook) -> String {
    format!(
        "{}  {}  {}  {}",
        hook.uuid.as_deref().unwrap_or("-"),
        match hook.is_active {
            Some(true) => "active  ",
            Some(false) => "inactive",
            None => "?       ",
        },
        hook.url.as_deref().map(redact_userinfo).unwrap_or_default(),
        hook.description.as_deref().unwrap_or("")
    )
}

async fn list(client: &Client, out: Output) -> anyhow::Result<()> {
    let hooks = client.list_webhooks().await?;
    let text = if hooks.is_empty() {
        "no webhooks".to_owned()
    } else {
        hooks.iter().map(describe).collect::<Vec<_>>().join("\n")
    };
    out.done(
        json!({ "webhooks": hooks.iter().map(shown).collect::<Vec<_>>() }),
        &text,
    );
    Ok(())
}

async fn show(client: &Client, uuid: &str, out: Output) -> anyhow::Result<()> {
    let hook = client.get_webhook(uuid).await?;
    let text = format!(
        "{}\ncreated: {}\nmodified: {}",
        describe(&hook),
        hook.created_on.as_deref().unwrap_or("-"),
        hook.last_modified_date.as_deref().unwrap_or("-")
    );
    out.done(json!({ "webhook": shown(&hook) }), &text);
    Ok(())
}

fn event_names(events: Vec<String>, all: bool) -> Option<Vec<String>> {
    if all {
        Some(KNOWN_EVENTS.iter().map(|e| (*e).to_owned()).collect())
    } else if events.is_empty() {
        None
    } else {
        Some(events)
    }
}

async fn add(client: &Client, args: AddArgs, out: Output) -> anyhow::Result<()> {
    let source = args.source.resolve()?;
    let url = registered_url(&args.url, &source)?;
    let events = event_names(args.events, args.all_events)
        .ok_or_else(|| anyhow!("choose --events or --all-events"))?;
    let secret = match (&source.secret_file, args.no_secret) {
        (Some(path), false) => Some(newest_secret(path)?),
        _ => None,
    };
    let body = WebhookBody {
        webhook: WebhookSettings {
            url: Some(url),
            description: args.description,
            is_active: None,
        },
        event_names: Some(events.clone()),
    };
    let uuid = client.add_webhook(&body).await?;
    let mut text = format!(
        "created webhook {uuid} for source {} ({} events)",
        source.name,
        events.len()
    );
    if let Some(secret) = secret {
        client.rotate_secret(&uuid, &secret).await.with_context(|| {
            format!("webhook {uuid} was created, but setting its secret failed; retry with `ocrolus rotate-secret --webhook {uuid}`")
        })?;
        text.push_str(&format!(
            "\nuploaded the source's newest secret (fingerprint {})",
            crate::auth::fingerprint(secret.as_bytes())
        ));
    }
    text.push_str(&format!(
        "\nnext: ocrolus-relay ocrolus webhooks test {uuid} --event {}",
        events[0]
    ));
    out.done(
        json!({ "uuid": uuid, "source": source.name, "event_names": events }),
        &text,
    );
    Ok(())
}

/// The URL Ocrolus will call: the source's path, with the source's first
/// Basic credentials as userinfo when it has a credentials file.
fn registered_url(url: &str, source: &SourceRef) -> anyhow::Result<String> {
    let uri: http::Uri = url.parse().with_context(|| format!("--url {url:?}"))?;
    if uri.scheme_str() != Some("https") {
        bail!("--url must be https:// (Ocrolus delivers to public HTTPS endpoints)");
    }
    if uri.path() != source.path {
        bail!(
            "--url path {} is not the path of source {} ({})",
            uri.path(),
            source.name,
            source.path
        );
    }
    let authority = uri
        .authority()
        .ok_or_else(|| anyhow!("--url has no host"))?;
    if authority.as_str().contains('@') {
        bail!("--url must not carry credentials; they come from the source's basic_auth_file");
    }
    let Some(path) = &source.basic_auth_file else {
        return Ok(url.to_owned());
    };
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    BasicCredentials::parse(&text).map_err(|e| anyhow!("{}: {e}", path.display()))?;
    let line = text
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !crate::auth::is_comment(l))
        .ok_or_else(|| anyhow!("{}: no credentials", path.display()))?;
    Ok(url.replacen("://", &format!("://{line}@"), 1))
}

/// The first (newest) secret of a secret file, validated like the relay does.
pub fn newest_secret(path: &std::path::Path) -> anyhow::Result<String> {
    let secrets = Secrets::load(path)?;
    if secrets.is_empty() {
        bail!("{} holds no secret", path.display());
    }
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    text.lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !crate::auth::is_comment(l))
        .map(str::to_owned)
        .ok_or_else(|| anyhow!("{} holds no secret", path.display()))
}

async fn update(client: &Client, args: UpdateArgs, out: Output) -> anyhow::Result<()> {
    if let Some(url) = &args.url
        && !url.starts_with("https://")
    {
        bail!("--url must be https://");
    }
    let body = WebhookBody {
        webhook: WebhookSettings {
            url: args.url,
            description: args.description,
            is_active: args.active,
        },
        event_names: event_names(args.events, args.all_events),
    };
    client.update_webhook(&args.uuid, &body).await?;
    out.done(
        json!({ "updated": args.uuid }),
        &format!("updated webhook {}", args.uuid),
    );
    Ok(())
}

async fn events(client: &Client, uuid: &str, out: Output) -> anyhow::Result<()> {
    let events = client.list_events(uuid).await?;
    let text = events
        .iter()
        .map(|e| {
            format!(
                "{}  {:<40} {:<6} {:<8} {}",
                e.uuid.as_deref().unwrap_or("-"),
                e.name.as_deref().unwrap_or("-"),
                e.kind.as_deref().unwrap_or("-"),
                e.severity.as_deref().unwrap_or("-"),
                if e.is_active == Some(false) {
                    "inactive"
                } else {
                    "active"
                }
            )
        })
        .collect::<Vec<_>>()
        .join("\n");
    out.done(json!({ "events": events }), &text);
    Ok(())
}

/// Binds a private queue to the relay's exchange first, then asks Ocrolus
/// for the test delivery, then waits for the message that carries it.
async fn test(client: &Client, args: TestArgs, out: Output) -> anyhow::Result<()> {
    let events = client.list_events(&args.uuid).await?;
    let event = events
        .iter()
        .find(|e| e.name.as_deref() == Some(&args.event) || e.uuid.as_deref() == Some(&args.event))
        .ok_or_else(|| {
            let names: Vec<&str> = events.iter().filter_map(|e| e.name.as_deref()).collect();
            anyhow!(
                "webhook {} is not subscribed to {:?}; its events: {}",
                args.uuid,
                args.event,
                names.join(", ")
            )
        })?;
    let event_uuid = event
        .uuid
        .clone()
        .ok_or_else(|| anyhow!("Ocrolus listed event {:?} without a uuid", args.event))?;
    let event_name = event.name.clone().unwrap_or_else(|| args.event.clone());

    let super::tail::Watch {
        connection,
        mut consumer,
        ..
    } = super::tail::watch(
        &args.broker,
        &["#".to_owned()],
        "ocrolus-relay-webhook-test",
    )
    .await?;

    let sent = client.test_webhook(&args.uuid, &event_uuid).await?;
    let book_uuid = sent
        .get("book_uuid")
        .and_then(Value::as_str)
        .map(str::to_owned);
    let found = tokio::time::timeout(args.wait, async {
        while let Some(delivery) = consumer.next().await {
            let Ok(delivery) = delivery else { continue };
            let Ok(body) = serde_json::from_slice::<Value>(&delivery.data) else {
                continue;
            };
            let same_event = body.get("event_name").and_then(Value::as_str) == Some(&event_name);
            let same_book = book_uuid
                .as_deref()
                .is_none_or(|b| body.get("book_uuid").and_then(Value::as_str) == Some(b));
            if same_event && same_book {
                return Some(super::tail::render(&delivery));
            }
        }
        None
    })
    .await
    .ok()
    .flatten();
    let _ = connection.close(200, "webhook test done".into()).await;
    match found {
        Some(message) => {
            let text = format!(
                "Ocrolus sent a test {event_name} to webhook {}\nthe relay published it to exchange {} with routing key {} (message id {})",
                args.uuid,
                args.broker.exchange,
                message["routing_key"].as_str().unwrap_or("?"),
                message["message_id"].as_str().unwrap_or("?"),
            );
            out.done(
                json!({ "webhook": args.uuid, "event": event_name, "sent": sent, "published": message }),
                &text,
            );
            Ok(())
        }
        None => {
            if out.json {
                println!(
                    "{}",
                    json!({ "webhook": args.uuid, "event": event_name, "sent": sent, "published": null })
                );
            }
            bail!(
                "Ocrolus accepted the test request, but no {event_name} reached exchange {} within {:?}: check the relay's log and metrics (401 = secret mismatch, 403 = allowlist)",
                args.broker.exchange,
                args.wait
            )
        }
    }
}
