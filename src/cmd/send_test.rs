//! `send-test`: build a realistic Ocrolus delivery for an event, sign it the
//! way Ocrolus does and send it, like the Dashboard's "Test webhook".

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, anyhow, bail};
use bytes::Bytes;
use http::{Request, Uri};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use serde_json::json;
use tokio::net::TcpStream;

use crate::auth::{
    REQUEST_ID_HEADER, SIGNATURE_HEADER, Secrets, TIMESTAMP_HEADER, is_comment, sign,
};
use crate::config::{DEFAULT_WEBHOOK_PATH, DEV_LISTEN, DEV_SECRET, serve_listen};
use crate::event::LEGACY_STATUS_MAP;

#[derive(Debug, clap::Args)]
pub struct SendTestArgs {
    /// Webhook URL of the relay (default: http://127.0.0.1:8080/webhooks/ocrolus,
    /// where `serve --dev` listens). Wins over --listen.
    #[arg(long, env = "RELAY_SEND_TEST_URL")]
    pub url: Option<String>,
    /// The relay's --listen (and the same RELAY_LISTEN), for a `serve --dev`
    /// or `--plaintext` relay on another port: sends to
    /// http://LISTEN/webhooks/ocrolus (0.0.0.0 and [::] mean this host).
    #[arg(long, env = "RELAY_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Event to simulate: an org-level name, an account-level name
    /// (DOC_VERIFIED, ...) or a legacy status (VERIFICATION_COMPLETE).
    #[arg(long, default_value = "document.verification_succeeded")]
    pub event: String,
    /// Sign with the first secret of this file (else RELAY_WEBHOOK_SECRETS).
    #[arg(long, env = "RELAY_SECRET_FILE")]
    pub secret_file: Option<PathBuf>,
    /// Sign with the development secret of `serve --dev`.
    #[arg(long)]
    pub dev: bool,
    /// Send this file as the body instead of a generated one.
    #[arg(long)]
    pub body: Option<PathBuf>,
    /// Send Basic credentials from the first `user:password` line of this file.
    #[arg(long, env = "RELAY_BASIC_AUTH_FILE")]
    pub basic_auth_file: Option<PathBuf>,
    /// Extra PEM CA certificate to trust for https:// URLs.
    #[arg(long)]
    pub ca_file: Option<PathBuf>,
    /// Use this Webhook-Request-Id instead of a fresh one (to try de-duplication).
    #[arg(long)]
    pub request_id: Option<String>,
}

pub async fn run(args: SendTestArgs, secrets_env: Option<String>) -> anyhow::Result<()> {
    let secret = pick_secret(&args, secrets_env)?;
    let body = match &args.body {
        Some(path) => {
            Bytes::from(std::fs::read(path).with_context(|| format!("reading {}", path.display()))?)
        }
        None => Bytes::from(sample_body(&args.event).to_string()),
    };
    let uri: Uri = target_url(&args).parse().context("--url")?;
    let timestamp = (crate::now_ms() / 1000).to_string();
    let id = args
        .request_id
        .clone()
        .unwrap_or_else(|| uuid::Uuid::now_v7().to_string());
    let mut request = Request::post(uri.clone())
        .header(http::header::CONTENT_TYPE, "application/json")
        .header(http::header::USER_AGENT, "ocrolus-relay-send-test")
        .header(REQUEST_ID_HEADER, &id)
        .header(TIMESTAMP_HEADER, &timestamp);
    if let Some(host) = uri.authority() {
        request = request.header(http::header::HOST, host.as_str());
    }
    if let Some(secret) = &secret {
        request = request.header(
            SIGNATURE_HEADER,
            hex::encode(sign(secret.as_bytes(), &timestamp, &id, &body)),
        );
    }
    if let Some(path) = &args.basic_auth_file {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let line = text
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty() && !is_comment(l))
            .ok_or_else(|| anyhow!("{}: no user:password line", path.display()))?;
        use base64::Engine;
        let encoded = base64::engine::general_purpose::STANDARD.encode(line);
        request = request.header(http::header::AUTHORIZATION, format!("Basic {encoded}"));
    }
    let request = request.body(Full::new(body.clone()))?;
    let (status, response) = send(&uri, request, args.ca_file.as_deref()).await?;
    println!("POST {uri}");
    println!("Webhook-Request-Id: {id}");
    println!("body: {}", String::from_utf8_lossy(&body));
    let answer = String::from_utf8_lossy(&response);
    if status != 200 {
        bail!("relay answered {status} {answer}{}", refusal_hint(status));
    }
    println!("-> {status} {answer}");
    Ok(())
}

/// What to check when the relay refuses the test delivery. The relay's own
/// log line for the request names the exact reason.
fn refusal_hint(status: u16) -> &'static str {
    match status {
        401 => {
            ": the relay did not accept the signature or credentials; sign with a secret the \
             relay has (--secret-file, RELAY_WEBHOOK_SECRETS, --basic-auth-file, or --dev against \
             `serve --dev`). The relay's log line for this request gives the reason"
        }
        403 => ": this machine's address is not on the relay's allowlist",
        404 | 405 => ": the URL's path is not a webhook path of the relay (--webhook-path)",
        429 | 503 => ": the relay is busy or cannot make events safe; see its /readyz and logs",
        _ => "",
    }
}

/// Where to send: `--url`, else the relay's `--listen` (mapped the way
/// `serve` maps it, so `--dev` with the default listener means
/// [`DEV_LISTEN`]), else [`DEV_LISTEN`].
fn target_url(args: &SendTestArgs) -> String {
    if let Some(url) = &args.url {
        return url.clone();
    }
    let mut addr = args
        .listen
        .map_or(DEV_LISTEN, |listen| serve_listen(listen, args.dev));
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr.ip() {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
        });
    }
    format!("http://{addr}{DEFAULT_WEBHOOK_PATH}")
}

fn pick_secret(args: &SendTestArgs, secrets_env: Option<String>) -> anyhow::Result<Option<String>> {
    if args.dev {
        return Ok(Some(DEV_SECRET.to_owned()));
    }
    let text = match (&args.secret_file, secrets_env) {
        (Some(path), _) => {
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?
        }
        (None, Some(list)) => list.replace(',', "\n"),
        (None, None) if args.basic_auth_file.is_some() => return Ok(None),
        (None, None) => bail!(
            "no secret: pass --secret-file, set RELAY_WEBHOOK_SECRETS, or --dev against `serve --dev`"
        ),
    };
    // Validate like the relay does, then sign with the first (newest) secret.
    Secrets::parse(&text, "secret", '\n').map_err(|e| anyhow!("{e}"))?;
    text.lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !is_comment(l))
        .map(|s| Some(s.to_owned()))
        .ok_or_else(|| anyhow!("the secret file holds no secret"))
}

/// A body shaped like Ocrolus' published examples for this event.
pub fn sample_body(event: &str) -> serde_json::Value {
    let book_uuid = uuid::Uuid::new_v4().to_string();
    let doc_uuid = uuid::Uuid::new_v4().to_string();
    if LEGACY_STATUS_MAP.iter().any(|(status, _)| *status == event) {
        // Ocrolus' own account-level test payload.
        return json!({ "status": event, "uploaded_doc_pk": 0, "book_pk": 0 });
    }
    if event.bytes().all(|b| b.is_ascii_uppercase() || b == b'_') {
        let status = if event == "BOOK_VERIFIED" {
            "BOOK_COMPLETE"
        } else {
            "VERIFICATION_COMPLETE"
        };
        return json!({ "event_name": event, "status": status, "book_pk": 98871, "uploaded_doc_pk": 1234567 });
    }
    let mut body = json!({
        "event_name": event,
        "severity": "LOW",
        "notification_type": "STATUS",
        "notification_reason": format!("Test notification for {event}"),
        "book_pk": 98871,
        "book_uuid": book_uuid,
    });
    if event.starts_with("document.")
        || event.starts_with("image_group.")
        || event.starts_with("mixed_document.")
    {
        body["doc_uuid"] = json!(doc_uuid);
        body["uploaded_doc_uuid"] = json!(doc_uuid);
        body["uploaded_doc_pk"] = json!(1_234_567);
        body["status"] = json!(
            if event.ends_with("failed") || event.ends_with("rejected") {
                "REJECTED"
            } else {
                "VERIFICATION_COMPLETE"
            }
        );
    } else if event.starts_with("book.") {
        body["status"] = json!("BOOK_COMPLETE");
        body["uploaded_docs"] = json!([{ "uuid": doc_uuid, "status": "VERIFICATION_COMPLETE" }]);
    }
    body
}

async fn send(
    uri: &Uri,
    request: Request<Full<Bytes>>,
    ca_file: Option<&std::path::Path>,
) -> anyhow::Result<(u16, Bytes)> {
    let host = uri
        .host()
        .ok_or_else(|| anyhow!("--url has no host"))?
        .to_owned();
    let https = match uri.scheme_str() {
        Some("https") => true,
        Some("http") => false,
        _ => bail!("--url must be http:// or https://"),
    };
    let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
    let tcp = TcpStream::connect((host.trim_matches(['[', ']']), port))
        .await
        .with_context(|| format!("connecting to {host}:{port}"))?;
    if https {
        let connector = tls_connector(ca_file)?;
        let name = ServerName::try_from(host.trim_matches(['[', ']']).to_owned())?;
        let tls = connector
            .connect(name, tcp)
            .await
            .context("TLS handshake")?;
        exchange(TokioIo::new(tls), request).await
    } else {
        exchange(TokioIo::new(tcp), request).await
    }
}

async fn exchange<I>(io: I, request: Request<Full<Bytes>>) -> anyhow::Result<(u16, Bytes)>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await?;
    tokio::spawn(conn);
    let response = sender.send_request(request).await.map_err(|e| {
        if closed_without_answer(&e) {
            anyhow!(
                "the relay closed the connection without answering: it does so to peers not on \
                 its allowlist, before reading a byte (the relay logs reason=\"peer_not_allowed\")"
            )
        } else {
            anyhow!(e).context("sending the request")
        }
    })?;
    let status = response.status().as_u16();
    let body = response.into_body().collect().await?.to_bytes();
    Ok((status, body))
}

/// Whether the relay closed the connection before answering. Depending on
/// timing the client sees that as an end of stream, or, when its request
/// reached a socket the relay had already closed, as a reset or a broken
/// pipe.
fn closed_without_answer(e: &hyper::Error) -> bool {
    use std::io::ErrorKind;
    let reset = std::iter::successors(Some(e as &dyn std::error::Error), |cause| cause.source())
        .filter_map(|cause| cause.downcast_ref::<std::io::Error>())
        .any(|io| {
            matches!(
                io.kind(),
                ErrorKind::ConnectionReset | ErrorKind::BrokenPipe | ErrorKind::ConnectionAborted
            )
        });
    e.is_canceled() || e.is_incomplete_message() || reset
}

/// A TLS client trusting the system roots plus `ca_file` (the load
/// generator uses it too).
pub fn tls_connector(
    ca_file: Option<&std::path::Path>,
) -> anyhow::Result<tokio_rustls::TlsConnector> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(cert);
    }
    if let Some(path) = ca_file {
        for cert in CertificateDer::pem_file_iter(path)? {
            roots.add(cert?)?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::cli::{Cli, Command};

    fn url_for(flags: &[&str]) -> String {
        let cli = Cli::parse_from(["ocrolus-relay", "send-test"].iter().chain(flags));
        let Command::SendTest(args) = cli.command else {
            unreachable!("parsed send-test")
        };
        target_url(&args)
    }

    #[test]
    fn defaults_to_where_serve_dev_listens() {
        assert_eq!(
            url_for(&["--dev"]),
            "http://127.0.0.1:8080/webhooks/ocrolus"
        );
        assert_eq!(url_for(&[]), "http://127.0.0.1:8080/webhooks/ocrolus");
    }

    #[test]
    fn follows_the_relays_listen_like_serve_does() {
        assert_eq!(
            url_for(&["--dev", "--listen", "127.0.0.1:18080"]),
            "http://127.0.0.1:18080/webhooks/ocrolus"
        );
        // serve --dev moves the default listener to 127.0.0.1:8080.
        assert_eq!(
            url_for(&["--dev", "--listen", "0.0.0.0:8443"]),
            "http://127.0.0.1:8080/webhooks/ocrolus"
        );
        assert_eq!(
            url_for(&["--listen", "0.0.0.0:9443"]),
            "http://127.0.0.1:9443/webhooks/ocrolus"
        );
        assert_eq!(
            url_for(&["--listen", "[::]:9443"]),
            "http://[::1]:9443/webhooks/ocrolus"
        );
    }

    #[test]
    fn url_wins_over_listen() {
        assert_eq!(
            url_for(&[
                "--listen",
                "127.0.0.1:18080",
                "--url",
                "https://relay.example/hook"
            ]),
            "https://relay.example/hook"
        );
    }
}
