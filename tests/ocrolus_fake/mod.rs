//! An in-test fake of Ocrolus: the OAuth token endpoint and the org-level
//! webhook API with the documented request and response shapes. It records
//! every call, and on `test` (or [`FakeOcrolus::deliver`]) it sends a real
//! delivery, signed with the webhook's current secret, to the relay.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::TcpListener;

use crate::common;

pub const CLIENT_ID: &str = "fake-client-id";
pub const CLIENT_SECRET: &str = "fake-client-secret-DO-NOT-PRINT";
const API_PREFIX: &str = "/v1/account/settings";

/// One recorded call.
#[derive(Debug, Clone)]
pub struct Call {
    pub method: String,
    pub path: String,
    pub body: Value,
}

#[derive(Debug, Clone)]
pub struct FakeWebhook {
    pub uuid: String,
    pub url: String,
    pub description: Option<String>,
    pub events: Vec<String>,
    pub is_active: bool,
    pub secret: Option<String>,
}

/// How the fake answers `rotate-secret`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RotateMode {
    Accept,
    /// 400, nothing changed.
    Refuse,
    /// Takes the secret, then answers 503 (the caller cannot know).
    ApplyThen503,
}

struct State {
    calls: Vec<Call>,
    webhooks: Vec<FakeWebhook>,
    event_uuids: Vec<(String, String)>,
    tokens: Vec<String>,
    token_lifetime: u64,
    rotate_mode: RotateMode,
    /// Where deliveries really go (the registered URL names a public host).
    relay_url: String,
}

#[derive(Clone)]
pub struct FakeOcrolus {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
}

impl FakeOcrolus {
    pub async fn start(relay_url: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind fake");
        let addr = listener.local_addr().expect("addr");
        let event_uuids = ocrolus_relay::KNOWN_EVENTS
            .iter()
            .map(|name| (name.to_string(), uuid::Uuid::new_v4().to_string()))
            .collect();
        let fake = Self {
            addr,
            state: Arc::new(Mutex::new(State {
                calls: Vec::new(),
                webhooks: Vec::new(),
                event_uuids,
                tokens: Vec::new(),
                token_lifetime: 86_400,
                rotate_mode: RotateMode::Accept,
                relay_url: relay_url.to_owned(),
            })),
        };
        let served = fake.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let fake = served.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| {
                        let fake = fake.clone();
                        async move { Ok::<_, Infallible>(fake.handle(req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        fake
    }

    pub fn api_url(&self) -> String {
        format!("http://{}{API_PREFIX}", self.addr)
    }

    pub fn token_url(&self) -> String {
        format!("http://{}/oauth/token", self.addr)
    }

    /// The environment a management command needs to reach this fake.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("OCROLUS_CLIENT_ID".into(), CLIENT_ID.into()),
            ("OCROLUS_CLIENT_SECRET".into(), CLIENT_SECRET.into()),
            ("OCROLUS_API_URL".into(), self.api_url()),
            ("OCROLUS_TOKEN_URL".into(), self.token_url()),
        ]
    }

    pub fn add_webhook(&self, url: &str, events: &[&str], secret: Option<&str>) -> String {
        let uuid = uuid::Uuid::new_v4().to_string();
        self.state().webhooks.push(FakeWebhook {
            uuid: uuid.clone(),
            url: url.to_owned(),
            description: None,
            events: events
                .iter()
                .map(std::string::ToString::to_string)
                .collect(),
            is_active: true,
            secret: secret.map(str::to_owned),
        });
        uuid
    }

    pub fn webhook(&self, uuid: &str) -> Option<FakeWebhook> {
        self.state()
            .webhooks
            .iter()
            .find(|w| w.uuid == uuid)
            .cloned()
    }

    pub fn calls(&self) -> Vec<Call> {
        self.state().calls.clone()
    }

    pub fn tokens_issued(&self) -> usize {
        self.state().tokens.len()
    }

    pub fn set_token_lifetime(&self, secs: u64) {
        self.state().token_lifetime = secs;
    }

    pub fn set_rotate_mode(&self, mode: RotateMode) {
        self.state().rotate_mode = mode;
    }

    /// Forgets every issued token (as if they had been revoked).
    pub fn revoke_tokens(&self) {
        self.state().tokens.clear();
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("fake state")
    }

    /// Sends one delivery of `event` signed with the webhook's current
    /// secret, the way Ocrolus does; returns the relay's status and the body.
    pub async fn deliver(&self, uuid: &str, event: &str) -> (u16, Value) {
        let (secret, target) = {
            let state = self.state();
            let hook = state
                .webhooks
                .iter()
                .find(|w| w.uuid == uuid)
                .expect("known webhook");
            let path = hook
                .url
                .parse::<http::Uri>()
                .map(|u| u.path().to_owned())
                .unwrap_or_default();
            (hook.secret.clone(), format!("{}{path}", state.relay_url))
        };
        let body = json!({
            "event_name": event,
            "severity": "MODERATE",
            "uploaded_docs": [{ "uuid": uuid::Uuid::new_v4().to_string(), "status": "COMPLETED" }],
            "notification_reason": "Test notification",
            "notification_type": "STATUS",
            "book_uuid": uuid::Uuid::new_v4().to_string(),
        });
        let raw = body.to_string();
        let id = common::new_id();
        let mut headers = vec![("content-type".to_string(), "application/json".to_string())];
        match &secret {
            Some(secret) => {
                headers = common::signed_headers(secret, &id, common::now_secs(), raw.as_bytes());
            }
            None => headers.push(("webhook-request-id".into(), id)),
        }
        let (status, _, _) =
            common::request("POST", &target, &headers, Bytes::from(raw.clone())).await;
        (status, body)
    }

    async fn handle(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let method = req.method().clone();
        let path = req.uri().path().to_owned();
        let auth = req
            .headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let raw = req
            .into_body()
            .collect()
            .await
            .map(http_body_util::Collected::to_bytes)
            .unwrap_or_default();
        let body: Value = serde_json::from_slice(&raw).unwrap_or(Value::Null);
        self.state().calls.push(Call {
            method: method.to_string(),
            path: path.clone(),
            body: body.clone(),
        });
        if path == "/oauth/token" && method == Method::POST {
            return self.token(&body);
        }
        let Some(route) = path.strip_prefix(API_PREFIX) else {
            return answer(StatusCode::NOT_FOUND, json!({ "error": "not found" }));
        };
        let authorized = auth
            .as_deref()
            .and_then(|a| a.strip_prefix("Bearer "))
            .is_some_and(|t| self.state().tokens.iter().any(|k| k == t));
        if !authorized {
            return answer(
                StatusCode::UNAUTHORIZED,
                json!({ "status": 401, "message": "Unauthorized" }),
            );
        }
        let segments: Vec<&str> = route.trim_start_matches('/').split('/').collect();
        match (method.as_str(), segments.as_slice()) {
            ("GET", ["webhooks"]) => {
                let hooks: Vec<Value> = self.state().webhooks.iter().map(webhook_json).collect();
                ok(json!({ "webhooks": hooks }))
            }
            ("POST", ["webhook"]) => self.create(&body),
            ("GET", ["webhook", uuid]) => match self.webhook(uuid) {
                Some(hook) => ok(webhook_json(&hook)),
                None => not_found(uuid),
            },
            ("POST", ["webhook", uuid, "update"]) => self.update(uuid, &body),
            ("DELETE", ["webhook", uuid, "delete"]) => {
                let mut state = self.state();
                let before = state.webhooks.len();
                state.webhooks.retain(|w| w.uuid != *uuid);
                if state.webhooks.len() == before {
                    not_found(uuid)
                } else {
                    ok(Value::Null)
                }
            }
            ("GET", ["webhook", uuid, "events"]) => match self.webhook(uuid) {
                Some(hook) => {
                    let state = self.state();
                    let events: Vec<Value> = hook
                        .events
                        .iter()
                        .map(|name| {
                            let uuid = state
                                .event_uuids
                                .iter()
                                .find(|(n, _)| n == name)
                                .map(|(_, u)| u.clone());
                            json!({ "uuid": uuid, "name": name, "type": "STATUS", "severity": "MODERATE", "is_active": true })
                        })
                        .collect();
                    ok(json!({ "events": events }))
                }
                None => not_found(uuid),
            },
            ("POST", ["webhook", uuid, "test"]) => self.test(uuid, &body).await,
            ("POST", ["webhook", uuid, "rotate-secret"]) => self.rotate(uuid, &body),
            _ => answer(StatusCode::NOT_FOUND, json!({ "error": "no such route" })),
        }
    }

    fn token(&self, body: &Value) -> Response<Full<Bytes>> {
        let good = body["grant_type"] == "client_credentials"
            && body["client_id"] == CLIENT_ID
            && body["client_secret"] == CLIENT_SECRET
            && body["audience"] == "https://api.ocrolus.com/";
        if !good {
            return answer(
                StatusCode::UNAUTHORIZED,
                json!({ "error": "access_denied", "error_description": "Unauthorized" }),
            );
        }
        let token = format!("token-{}", uuid::Uuid::new_v4());
        let mut state = self.state();
        state.tokens.push(token.clone());
        answer(
            StatusCode::OK,
            json!({ "access_token": token, "token_type": "Bearer", "expires_in": state.token_lifetime }),
        )
    }

    fn create(&self, body: &Value) -> Response<Full<Bytes>> {
        let Some(url) = body["webhook"]["url"].as_str() else {
            return bad_request("url: invalid or missing URL scheme");
        };
        let events: Vec<String> = body["event_names"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|e| e.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        if events.is_empty() {
            return bad_request("event_names: at least one event is required");
        }
        let mut state = self.state();
        if state.webhooks.len() >= 5 {
            return bad_request("You can create up to five webhooks for your organization");
        }
        if state.webhooks.iter().any(|w| w.url == url) {
            return bad_request(&format!("Webhook with url {url} already exists"));
        }
        let uuid = uuid::Uuid::new_v4().to_string();
        state.webhooks.push(FakeWebhook {
            uuid: uuid.clone(),
            url: url.to_owned(),
            description: body["webhook"]["description"].as_str().map(str::to_owned),
            events,
            is_active: true,
            secret: None,
        });
        ok(json!({ "uuid": uuid }))
    }

    fn update(&self, uuid: &str, body: &Value) -> Response<Full<Bytes>> {
        let mut state = self.state();
        let Some(hook) = state.webhooks.iter_mut().find(|w| w.uuid == uuid) else {
            return not_found(uuid);
        };
        if let Some(url) = body["webhook"]["url"].as_str() {
            hook.url = url.to_owned();
        }
        if let Some(d) = body["webhook"]["description"].as_str() {
            hook.description = Some(d.to_owned());
        }
        if let Some(active) = body["webhook"]["is_active"].as_bool() {
            hook.is_active = active;
        }
        if let Some(events) = body["event_names"].as_array() {
            hook.events = events
                .iter()
                .filter_map(|e| e.as_str().map(str::to_owned))
                .collect();
        }
        ok(Value::Null)
    }

    fn rotate(&self, uuid: &str, body: &Value) -> Response<Full<Bytes>> {
        let Some(secret) = body["secret_key"].as_str() else {
            return bad_request("secret_key is required");
        };
        if !(16..=128).contains(&secret.chars().count()) {
            return bad_request("secret_key must be between 16 and 128 characters");
        }
        let mut state = self.state();
        let mode = state.rotate_mode;
        let Some(hook) = state.webhooks.iter_mut().find(|w| w.uuid == uuid) else {
            return answer(
                StatusCode::NOT_FOUND,
                json!({ "error": "Webhook not found" }),
            );
        };
        match mode {
            RotateMode::Refuse => bad_request("secret rejected"),
            RotateMode::ApplyThen503 => {
                hook.secret = Some(secret.to_owned());
                answer(
                    StatusCode::SERVICE_UNAVAILABLE,
                    json!({ "message": "Service Unavailable" }),
                )
            }
            RotateMode::Accept => {
                hook.secret = Some(secret.to_owned());
                answer(
                    StatusCode::OK,
                    json!({ "status": "success", "message": "Webhook secret rotated successfully" }),
                )
            }
        }
    }

    async fn test(&self, uuid: &str, body: &Value) -> Response<Full<Bytes>> {
        let Some(hook) = self.webhook(uuid) else {
            return not_found(uuid);
        };
        if !hook.is_active {
            return bad_request("Only the webhook which is in an Active status can be tested");
        }
        let event = {
            let state = self.state();
            state
                .event_uuids
                .iter()
                .find(|(_, u)| Some(u.as_str()) == body["event_uuid"].as_str())
                .map(|(n, _)| n.clone())
        };
        let Some(event) = event.filter(|e| hook.events.contains(e)) else {
            return bad_request("event_uuid is not configured for this webhook");
        };
        let (status, sent) = self.deliver(uuid, &event).await;
        if status == 200 {
            answer(StatusCode::OK, sent)
        } else {
            bad_request(&format!("Webhook test failed: endpoint answered {status}"))
        }
    }
}

fn webhook_json(hook: &FakeWebhook) -> Value {
    json!({
        "uuid": hook.uuid,
        "url": hook.url,
        "description": hook.description,
        "is_active": hook.is_active,
        "created_on": "2026-11-30T04:00:00.000Z",
        "last_modified_date": "2026-11-30T04:00:00.000Z",
    })
}

fn ok(response: Value) -> Response<Full<Bytes>> {
    answer(
        StatusCode::OK,
        json!({ "status": "200", "message": "OK", "response": response }),
    )
}

fn not_found(uuid: &str) -> Response<Full<Bytes>> {
    let msg = format!("Webhook with uuid {uuid} not found");
    answer(
        StatusCode::BAD_REQUEST,
        json!({ "status": "400", "code": "1000", "response": null, "message": msg, "meta": { "msg": msg } }),
    )
}

fn bad_request(msg: &str) -> Response<Full<Bytes>> {
    answer(
        StatusCode::BAD_REQUEST,
        json!({ "status": "400", "code": "1000", "response": null, "message": msg, "meta": { "msg": msg } }),
    )
}

fn answer(status: StatusCode, body: Value) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    response
}
