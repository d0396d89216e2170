//! A minimal HTTP/1 client for the relay's own admin listener, used by
//! `healthcheck` and `spool`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, anyhow};
use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::config_error::ConfigError;
use crate::config_file::ConfigFile;

/// `serve`'s own default `--admin-listen`.
const DEFAULT_ADMIN_LISTEN: SocketAddr =
    SocketAddr::V4(std::net::SocketAddrV4::new(Ipv4Addr::LOCALHOST, 9090));

/// The admin listener to ask: `--admin-listen` if given, else
/// `admin_listen` of the relay's config file (`--config`), else `serve`'s
/// default; an unspecified bind address is reached on this host.
pub fn address(flag: Option<SocketAddr>, config: Option<&Path>) -> Result<SocketAddr, ConfigError> {
    let listen = match (flag, config) {
        (Some(listen), _) => listen,
        (None, Some(path)) => match ConfigFile::load(path)?.value("admin_listen") {
            Some(text) => text.parse().map_err(|e| {
                ConfigError::new(format!(
                    "config file {}: `admin_listen` {text:?}: {e}",
                    path.display()
                ))
            })?,
            None => DEFAULT_ADMIN_LISTEN,
        },
        (None, None) => DEFAULT_ADMIN_LISTEN,
    };
    Ok(target(listen))
}

/// Where to reach an admin listener bound to `listen`: an unspecified
/// address (`0.0.0.0`, `::`, as in a container) means this host.
fn target(listen: SocketAddr) -> SocketAddr {
    let ip = match listen.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, listen.port())
}

/// The outcome of one request.
#[derive(Debug)]
pub struct Reply {
    /// `GET http://127.0.0.1:9090/livez`, for messages.
    pub request: String,
    pub status: StatusCode,
    pub body: Bytes,
}

impl Reply {
    /// The body of a 200, else an error naming the request and the answer.
    pub fn ok(self) -> anyhow::Result<Bytes> {
        if self.status != StatusCode::OK {
            anyhow::bail!(
                "{} answered {}: {}",
                self.request,
                self.status,
                String::from_utf8_lossy(&self.body)
            );
        }
        Ok(self.body)
    }
}

/// `GET http://{addr}{path}`, bounded by `timeout` from connect to body.
pub async fn get(addr: SocketAddr, path: &str, timeout: Duration) -> anyhow::Result<Reply> {
    request(Method::GET, addr, path, timeout).await
}

/// `POST http://{addr}{path}` with an empty body, bounded like [`get`].
pub async fn post(addr: SocketAddr, path: &str, timeout: Duration) -> anyhow::Result<Reply> {
    request(Method::POST, addr, path, timeout).await
}

async fn request(
    method: Method,
    addr: SocketAddr,
    path: &str,
    timeout: Duration,
) -> anyhow::Result<Reply> {
    tokio::time::timeout(timeout, exchange(method, addr, path))
        .await
        .map_err(|_| anyhow!("http://{addr}{path}: no answer within {timeout:?}"))?
}

async fn exchange(method: Method, addr: SocketAddr, path: &str) -> anyhow::Result<Reply> {
    let tcp = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to the admin listener {addr}"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
    tokio::spawn(conn);
    let request = Request::builder()
        .method(method.clone())
        .uri(path)
        .header(http::header::HOST, addr.to_string())
        .body(Empty::<Bytes>::new())?;
    let described = format!("{method} http://{addr}{path}");
    let response = sender
        .send_request(request)
        .await
        .with_context(|| described.clone())?;
    let status = response.status();
    let body = response.into_body().collect().await?.to_bytes();
    Ok(Reply {
        request: described,
        status,
        body,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unspecified_listen_addresses_mean_this_host() {
        let cases = [
            ("0.0.0.0:9090", "127.0.0.1:9090"),
            ("[::]:9090", "[::1]:9090"),
            ("10.1.2.3:9091", "10.1.2.3:9091"),
        ];
        for (listen, want) in cases {
            let listen: SocketAddr = listen.parse().expect("addr");
            assert_eq!(target(listen).to_string(), want);
        }
    }
}
