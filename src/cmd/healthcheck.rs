//! `healthcheck`: ask the running relay's admin listener whether it is live
//! (or ready) and exit 0 or 1, for a container HEALTHCHECK in an image that
//! has no shell or curl.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use http::StatusCode;

use crate::cmd::admin_client;
use crate::units::parse_duration;

#[derive(Debug, clap::Args)]
pub struct HealthcheckArgs {
    /// The relay's admin listener, as given to `serve` (0.0.0.0 / :: mean this host)
    /// [default: `admin_listen` of --config, else 127.0.0.1:9090].
    #[arg(long, env = "RELAY_ADMIN_LISTEN")]
    pub admin_listen: Option<SocketAddr>,
    /// The relay's config file, read for its `admin_listen` only (in the
    /// container image RELAY_CONFIG names it).
    #[arg(long, env = "RELAY_CONFIG")]
    pub config: Option<PathBuf>,
    /// Ask /readyz (can it make an event safe now?) instead of /livez.
    #[arg(long)]
    pub ready: bool,
    /// Give up after this long (e.g. 3s, 500ms).
    #[arg(long, default_value = "3s", value_parser = parse_duration)]
    pub timeout: Duration,
}

pub async fn run(args: HealthcheckArgs) -> anyhow::Result<()> {
    let path = if args.ready { "/readyz" } else { "/livez" };
    let addr = admin_client::address(args.admin_listen, args.config.as_deref())?;
    let reply = admin_client::get(addr, path, args.timeout).await?;
    let request = reply.request.clone();
    let body = reply.ok()?;
    println!(
        "ok: {request} answered {}: {}",
        StatusCode::OK,
        String::from_utf8_lossy(&body)
    );
    Ok(())
}
