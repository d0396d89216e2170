//! `healthcheck`: ask the running relay's admin listener whether it is live
//! (or ready) and exit 0 or 1, for a container HEALTHCHECK in an image that
//! has no shell or curl.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::bail;
use http::StatusCode;

use crate::cmd::admin_client;
use crate::config_error::ConfigError;
use crate::config_file::ConfigFile;
use crate::units::parse_duration;

/// `serve`'s own default `--admin-listen`.
const DEFAULT_ADMIN_LISTEN: SocketAddr = SocketAddr::V4(std::net::SocketAddrV4::new(
    std::net::Ipv4Addr::LOCALHOST,
    9090,
));

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
    let listen = match (args.admin_listen, &args.config) {
        (Some(listen), _) => listen,
        (None, Some(path)) => admin_listen_in(path)?,
        (None, None) => DEFAULT_ADMIN_LISTEN,
    };
    let addr = admin_client::target(listen);
    let reply = admin_client::get(addr, path, args.timeout).await?;
    let body = String::from_utf8_lossy(&reply.body);
    if reply.status != StatusCode::OK {
        bail!("GET http://{addr}{path} answered {}: {body}", reply.status);
    }
    println!(
        "ok: GET http://{addr}{path} answered {}: {body}",
        reply.status
    );
    Ok(())
}

/// `admin_listen` of the relay's config file, or `serve`'s default.
fn admin_listen_in(path: &Path) -> Result<SocketAddr, ConfigError> {
    match ConfigFile::load(path)?.value("admin_listen") {
        Some(text) => text.parse().map_err(|e| {
            ConfigError::new(format!(
                "config file {}: `admin_listen` {text:?}: {e}",
                path.display()
            ))
        }),
        None => Ok(DEFAULT_ADMIN_LISTEN),
    }
}
