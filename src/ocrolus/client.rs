//! The HTTPS client of the Ocrolus API: OAuth2 client credentials with a
//! cached token (refreshed before it expires, and once more if the API says
//! 401), one error type for everything that can go wrong, and error messages
//! that carry Ocrolus' status and message but never a secret or a token.

use std::fmt;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode, Uri, header};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::net::TcpStream;
use tokio::sync::Mutex;
use tokio::time::Instant;
use tracing::debug;

use super::api::{
    Created, Envelope, ErrorBody, Event, EventList, RotateSecretRequest, TestRequest, TokenRequest,
    TokenResponse, Webhook, WebhookBody, WebhookList,
};

pub const DEFAULT_API_URL: &str = "https://api.ocrolus.com/v1/account/settings";
pub const DEFAULT_TOKEN_URL: &str = "https://auth.ocrolus.com/oauth/token";
pub const DEFAULT_AUDIENCE: &str = "https://api.ocrolus.com/";

/// Lifetime assumed when the token answer names none.
const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(3600);
/// Longest error text kept from a body that is not the documented JSON.
const MAX_ERROR_TEXT: usize = 200;

/// The OAuth client secret; `Debug` never shows it.
#[derive(Clone)]
pub struct ClientSecret(String);

impl ClientSecret {
    pub fn new(secret: String) -> Self {
        Self(secret)
    }
}

impl fmt::Debug for ClientSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ClientSecret(***)")
    }
}

/// Where and as whom to call the API.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    pub api_url: String,
    pub token_url: String,
    pub audience: String,
    pub client_id: String,
    pub client_secret: ClientSecret,
    /// Bound for one HTTP exchange, connect to last byte.
    pub timeout: Duration,
}

/// Anything that went wrong talking to Ocrolus.
#[derive(Debug, thiserror::Error)]
pub enum OcrolusError {
    #[error("{0}")]
    Config(String),
    #[error("{url}: {message}")]
    Transport { url: String, message: String },
    #[error("the token endpoint answered {status}: {message}")]
    Token { status: u16, message: String },
    #[error("the Ocrolus API answered {status}: {message}")]
    Api { status: u16, message: String },
    #[error("unexpected answer from {url}: {message}")]
    Decode { url: String, message: String },
}

impl OcrolusError {
    /// True when Ocrolus answered and refused (4xx): the call changed
    /// nothing. Timeouts, transport errors and 5xx leave it open whether it
    /// took effect.
    pub fn is_refusal(&self) -> bool {
        match self {
            Self::Api { status, .. } | Self::Token { status, .. } => (400..500).contains(status),
            Self::Config(_) => true,
            Self::Transport { .. } | Self::Decode { .. } => false,
        }
    }
}

struct CachedToken {
    value: String,
    refresh_at: Instant,
}

/// A client of the org-level webhook API.
pub struct Client {
    config: ClientConfig,
    api: Uri,
    token_uri: Uri,
    token: Mutex<Option<CachedToken>>,
    tls: tokio_rustls::TlsConnector,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("config", &self.config)
            .field("token", &"***")
            .finish()
    }
}

impl Client {
    /// Refuses plaintext URLs except to loopback: the client secret and the
    /// token must not cross a network unencrypted.
    pub fn new(config: ClientConfig) -> Result<Self, OcrolusError> {
        if config.client_id.is_empty() || config.client_secret.0.is_empty() {
            return Err(OcrolusError::Config(
                "set OCROLUS_CLIENT_ID and OCROLUS_CLIENT_SECRET (or --client-id / --client-secret)"
                    .into(),
            ));
        }
        let api = checked_uri("--api-url", &config.api_url)?;
        let token_uri = checked_uri("--token-url", &config.token_url)?;
        let tls = crate::cmd::send_test::tls_connector(None)
            .map_err(|e| OcrolusError::Config(format!("TLS client: {e}")))?;
        Ok(Self {
            config,
            api,
            token_uri,
            token: Mutex::new(None),
            tls,
        })
    }

    pub async fn list_webhooks(&self) -> Result<Vec<Webhook>, OcrolusError> {
        let list: Option<WebhookList> = self.call(Method::GET, "/webhooks", None::<&()>).await?;
        Ok(list.unwrap_or_default().webhooks)
    }

    pub async fn get_webhook(&self, uuid: &str) -> Result<Webhook, OcrolusError> {
        let path = format!("/webhook/{}", checked_uuid(uuid)?);
        let hook: Option<Webhook> = self.call(Method::GET, &path, None::<&()>).await?;
        Ok(hook.unwrap_or_default())
    }

    pub async fn add_webhook(&self, body: &WebhookBody) -> Result<String, OcrolusError> {
        let created: Option<Created> = self.call(Method::POST, "/webhook", Some(body)).await?;
        created.map(|c| c.uuid).ok_or_else(|| OcrolusError::Decode {
            url: self.url("/webhook"),
            message: "no response.uuid".into(),
        })
    }

    pub async fn update_webhook(&self, uuid: &str, body: &WebhookBody) -> Result<(), OcrolusError> {
        let path = format!("/webhook/{}/update", checked_uuid(uuid)?);
        self.call::<_, serde_json::Value>(Method::POST, &path, Some(body))
            .await
            .map(drop)
    }

    pub async fn delete_webhook(&self, uuid: &str) -> Result<(), OcrolusError> {
        let path = format!("/webhook/{}/delete", checked_uuid(uuid)?);
        self.call::<_, serde_json::Value>(Method::DELETE, &path, None::<&()>)
            .await
            .map(drop)
    }

    pub async fn list_events(&self, uuid: &str) -> Result<Vec<Event>, OcrolusError> {
        let path = format!("/webhook/{}/events", checked_uuid(uuid)?);
        let list: Option<EventList> = self.call(Method::GET, &path, None::<&()>).await?;
        Ok(list.unwrap_or_default().events)
    }

    /// Asks Ocrolus to deliver a test event; returns the payload it reports.
    pub async fn test_webhook(
        &self,
        uuid: &str,
        event_uuid: &str,
    ) -> Result<serde_json::Value, OcrolusError> {
        let path = format!("/webhook/{}/test", checked_uuid(uuid)?);
        let body = TestRequest {
            event_uuid: checked_uuid(event_uuid)?,
        };
        let bytes = self.send_api(Method::POST, &path, Some(&body)).await?;
        serde_json::from_slice(&bytes).map_err(|e| OcrolusError::Decode {
            url: self.url(&path),
            message: e.to_string(),
        })
    }

    /// Sets the webhook's HMAC secret (`configure-webhook-secret-org-level`).
    pub async fn rotate_secret(&self, uuid: &str, secret: &str) -> Result<(), OcrolusError> {
        let path = format!("/webhook/{}/rotate-secret", checked_uuid(uuid)?);
        let body = RotateSecretRequest { secret_key: secret };
        self.send_api(Method::POST, &path, Some(&body))
            .await
            .map(drop)
    }

    /// A call whose answer is the documented envelope around `T`.
    async fn call<B: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<Option<T>, OcrolusError> {
        let bytes = self.send_api(method, path, body).await?;
        let envelope: Envelope<T> =
            serde_json::from_slice(&bytes).map_err(|e| OcrolusError::Decode {
                url: self.url(path),
                message: e.to_string(),
            })?;
        Ok(envelope.response)
    }

    /// Sends with the cached token; on 401 fetches a new token and tries once
    /// more (a token revoked or expired early).
    async fn send_api<B: Serialize>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<Bytes, OcrolusError> {
        let payload = match body {
            Some(body) => Bytes::from(serde_json::to_vec(body).map_err(|e| {
                OcrolusError::Config(format!("cannot encode the request body: {e}"))
            })?),
            None => Bytes::new(),
        };
        let uri = self.api_uri(path)?;
        let mut refreshed = false;
        loop {
            let token = self.token(refreshed).await?;
            let (status, answer) = self
                .exchange(method.clone(), &uri, Some(&token), payload.clone())
                .await?;
            debug!(%method, path, status = status.as_u16(), "Ocrolus API call");
            if status == StatusCode::UNAUTHORIZED && !refreshed {
                refreshed = true;
                continue;
            }
            if status.is_success() {
                return Ok(answer);
            }
            return Err(OcrolusError::Api {
                status: status.as_u16(),
                message: self.error_text(&answer, Some(&token)),
            });
        }
    }

    /// The cached token, or a new one when it is due (or `force`d).
    async fn token(&self, force: bool) -> Result<String, OcrolusError> {
        let mut cached = self.token.lock().await;
        if let Some(token) = cached.as_ref()
            && !force
            && Instant::now() < token.refresh_at
        {
            return Ok(token.value.clone());
        }
        let request = TokenRequest {
            grant_type: "client_credentials",
            audience: &self.config.audience,
            client_id: &self.config.client_id,
            client_secret: &self.config.client_secret.0,
        };
        let payload = serde_json::to_vec(&request)
            .map_err(|e| OcrolusError::Config(format!("token request: {e}")))?;
        let (status, answer) = self
            .exchange(Method::POST, &self.token_uri, None, Bytes::from(payload))
            .await?;
        if !status.is_success() {
            return Err(OcrolusError::Token {
                status: status.as_u16(),
                message: self.error_text(&answer, None),
            });
        }
        let token: TokenResponse =
            serde_json::from_slice(&answer).map_err(|_| OcrolusError::Decode {
                url: self.config.token_url.clone(),
                message: "not an OAuth token response".into(),
            })?;
        let lifetime = token
            .expires_in
            .map_or(DEFAULT_TOKEN_LIFETIME, Duration::from_secs);
        // Refresh a little early so a token never expires mid-command.
        let margin = (lifetime / 10).min(Duration::from_secs(300));
        let value = token.access_token;
        *cached = Some(CachedToken {
            value: value.clone(),
            refresh_at: Instant::now() + lifetime - margin,
        });
        debug!(?lifetime, "fetched an Ocrolus access token");
        Ok(value)
    }

    /// Ocrolus' own message for a failed call, with any credential removed.
    fn error_text(&self, body: &[u8], token: Option<&str>) -> String {
        let text = match serde_json::from_slice::<ErrorBody>(body) {
            Ok(parsed) => parsed.text(),
            Err(_) => None,
        }
        .unwrap_or_else(|| {
            let raw = String::from_utf8_lossy(body);
            let raw: String = raw
                .chars()
                .filter(|c| !c.is_control())
                .take(MAX_ERROR_TEXT)
                .collect();
            if raw.trim().is_empty() {
                "(no message)".to_owned()
            } else {
                raw
            }
        });
        let mut text = text.replace(&self.config.client_secret.0, "***");
        if let Some(token) = token.filter(|t| !t.is_empty()) {
            text = text.replace(token, "***");
        }
        text
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.config.api_url.trim_end_matches('/'))
    }

    fn api_uri(&self, path: &str) -> Result<Uri, OcrolusError> {
        let base = self.api.path().trim_end_matches('/');
        let mut parts = self.api.clone().into_parts();
        parts.path_and_query = Some(
            format!("{base}{path}")
                .parse()
                .map_err(|_| OcrolusError::Config(format!("bad API path {path:?}")))?,
        );
        Uri::from_parts(parts).map_err(|e| OcrolusError::Config(format!("API URL: {e}")))
    }

    /// One HTTP/1.1 exchange on a fresh connection, bounded by the timeout.
    async fn exchange(
        &self,
        method: Method,
        uri: &Uri,
        bearer: Option<&str>,
        body: Bytes,
    ) -> Result<(StatusCode, Bytes), OcrolusError> {
        let url = format!(
            "{}://{}{}",
            uri.scheme_str().unwrap_or("https"),
            uri.authority().map_or("", http::uri::Authority::as_str),
            uri.path()
        );
        let transport = |message: String| OcrolusError::Transport {
            url: url.clone(),
            message,
        };
        let mut request = Request::builder()
            .method(method)
            .uri(
                uri.path_and_query()
                    .map_or("/", http::uri::PathAndQuery::as_str),
            )
            .header(
                header::HOST,
                uri.authority().map_or("", http::uri::Authority::as_str),
            )
            .header(header::ACCEPT, "application/json")
            .header(
                header::USER_AGENT,
                concat!("ocrolus-relay/", env!("CARGO_PKG_VERSION")),
            );
        if !body.is_empty() {
            request = request.header(header::CONTENT_TYPE, "application/json");
        }
        if let Some(token) = bearer {
            request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let request = request
            .body(Full::new(body))
            .map_err(|e| transport(format!("cannot build the request: {e}")))?;
        let host = uri.host().unwrap_or("").trim_matches(['[', ']']).to_owned();
        let https = uri.scheme_str() == Some("https");
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let attempt = async {
            let tcp = TcpStream::connect((host.as_str(), port))
                .await
                .map_err(|e| transport(format!("cannot connect: {e}")))?;
            if https {
                let name = ServerName::try_from(host.clone())
                    .map_err(|e| transport(format!("bad host name: {e}")))?;
                let tls = self
                    .tls
                    .connect(name, tcp)
                    .await
                    .map_err(|e| transport(format!("TLS handshake: {e}")))?;
                round_trip(TokioIo::new(tls), request).await
            } else {
                round_trip(TokioIo::new(tcp), request).await
            }
            .map_err(|e| transport(e.to_string()))
        };
        match tokio::time::timeout(self.config.timeout, attempt).await {
            Ok(result) => result,
            Err(_) => Err(transport(format!(
                "no answer within {:?}",
                self.config.timeout
            ))),
        }
    }
}

async fn round_trip<I>(io: I, request: Request<Full<Bytes>>) -> hyper::Result<(StatusCode, Bytes)>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await?;
    tokio::spawn(conn);
    let response = sender.send_request(request).await?;
    let status = response.status();
    let body = response.into_body().collect().await?.to_bytes();
    Ok((status, body))
}

fn checked_uri(flag: &str, url: &str) -> Result<Uri, OcrolusError> {
    let uri: Uri = url
        .parse()
        .map_err(|_| OcrolusError::Config(format!("{flag}: {url:?} is not a URL")))?;
    let loopback = matches!(uri.host(), Some("localhost"))
        || uri
            .host()
            .map(|h| h.trim_matches(['[', ']']))
            .and_then(|h| h.parse::<std::net::IpAddr>().ok())
            .is_some_and(|ip| ip.is_loopback());
    match uri.scheme_str() {
        Some("https") => Ok(uri),
        Some("http") if loopback => Ok(uri),
        _ => Err(OcrolusError::Config(format!(
            "{flag}: must be https:// (http:// only to loopback)"
        ))),
    }
}

/// Webhook and event ids go into URL paths: only UUIDs pass.
fn checked_uuid(id: &str) -> Result<&str, OcrolusError> {
    uuid::Uuid::parse_str(id)
        .map(|_| id)
        .map_err(|_| OcrolusError::Config(format!("{id:?} is not a UUID")))
}
