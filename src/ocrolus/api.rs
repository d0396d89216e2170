//! Request and response bodies of the org-level webhook API
//! (`https://api.ocrolus.com/v1/account/settings`) and of the token endpoint
//! (`https://auth.ocrolus.com/oauth/token`), as the published OpenAPI
//! documents describe them. Every response field is optional: Ocrolus'
//! examples leave fields out, and a missing field must not fail a command.

use std::fmt;

use serde::{Deserialize, Serialize};

/// `POST /oauth/token` (client credentials, RFC 6749 §4.4).
#[derive(Serialize)]
pub struct TokenRequest<'a> {
    pub grant_type: &'static str,
    pub audience: &'a str,
    pub client_id: &'a str,
    pub client_secret: &'a str,
}

impl fmt::Debug for TokenRequest<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenRequest")
            .field("audience", &self.audience)
            .field("client_id", &self.client_id)
            .field("client_secret", &"***")
            .finish()
    }
}

/// RFC 6749 §5.1 success.
#[derive(Deserialize)]
pub struct TokenResponse {
    pub access_token: String,
    pub token_type: Option<String>,
    /// Seconds; Ocrolus documents 86 400.
    pub expires_in: Option<u64>,
}

impl fmt::Debug for TokenResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenResponse")
            .field("access_token", &"***")
            .field("token_type", &self.token_type)
            .field("expires_in", &self.expires_in)
            .finish()
    }
}

/// Every API answer: `SuccessStructure` (`status`, `message`) around a
/// `response`; only the `response` matters once the HTTP status said 2xx.
#[derive(Debug, Deserialize)]
pub struct Envelope<T> {
    pub response: Option<T>,
}

/// Error bodies: `ErrorStructure` (`message`, `meta.msg`), the bare
/// `{"error": ...}` of rotate-secret's 404, and RFC 6749 §5.2 from the
/// token endpoint.
#[derive(Debug, Default, Deserialize)]
pub struct ErrorBody {
    pub message: Option<String>,
    pub meta: Option<ErrorMeta>,
    pub error: Option<String>,
    pub error_description: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
pub struct ErrorMeta {
    pub msg: Option<String>,
}

impl ErrorBody {
    /// The most specific message the body carries.
    pub fn text(&self) -> Option<String> {
        let meta = self.meta.as_ref().and_then(|m| m.msg.clone());
        match (&self.error, &self.error_description) {
            (Some(error), Some(description)) => Some(format!("{error}: {description}")),
            _ => meta
                .or_else(|| self.message.clone())
                .or_else(|| self.error.clone())
                .or_else(|| self.error_description.clone()),
        }
    }
}

/// Schema `Webhook`. `url` may carry Basic credentials: print it through
/// [`redact_userinfo`].
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Webhook {
    pub uuid: Option<String>,
    pub url: Option<String>,
    pub description: Option<String>,
    pub is_active: Option<bool>,
    pub created_on: Option<String>,
    pub last_modified_date: Option<String>,
}

/// `GET /webhooks` → `response`.
#[derive(Debug, Default, Deserialize)]
pub struct WebhookList {
    #[serde(default)]
    pub webhooks: Vec<Webhook>,
}

/// Schema `Event` (`GET /webhook/{uuid}/events` → `response.events`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Event {
    pub uuid: Option<String>,
    pub name: Option<String>,
    pub description: Option<String>,
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub severity: Option<String>,
    pub is_active: Option<bool>,
    pub reason: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
pub struct EventList {
    #[serde(default)]
    pub events: Vec<Event>,
}

/// `POST /webhook` → `response`.
#[derive(Debug, Deserialize)]
pub struct Created {
    pub uuid: String,
}

/// `POST /webhook` (`webhook_body`) and `POST /webhook/{uuid}/update`
/// (`webhook_uuid_update_body`): the update replaces all subscriptions
/// when `event_names` is given.
#[derive(Serialize)]
pub struct WebhookBody {
    pub webhook: WebhookSettings,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub event_names: Option<Vec<String>>,
}

#[derive(Serialize)]
pub struct WebhookSettings {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub is_active: Option<bool>,
}

impl fmt::Debug for WebhookSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WebhookSettings")
            .field("url", &self.url.as_deref().map(redact_userinfo))
            .field("description", &self.description)
            .field("is_active", &self.is_active)
            .finish()
    }
}

/// `POST /webhook/{uuid}/test`.
#[derive(Debug, Serialize)]
pub struct TestRequest<'a> {
    pub event_uuid: &'a str,
}

/// `POST /webhook/{uuid}/rotate-secret`.
#[derive(Serialize)]
pub struct RotateSecretRequest<'a> {
    pub secret_key: &'a str,
}

impl fmt::Debug for RotateSecretRequest<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RotateSecretRequest { secret_key: *** }")
    }
}

/// Replaces the password of a URL's userinfo (`https://user:pass@host/`)
/// with `***`: a registered webhook URL carries the Basic credentials.
pub fn redact_userinfo(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{scheme}://{user}:***@{host}{tail}")
        }
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_documented_examples() {
        let list: Envelope<WebhookList> = serde_json::from_str(
            r#"{"status":"200","message":"OK","response":{"webhooks":[{"description":"Trigger when a document failed in verification.","url":"https://www.ocrolus.com/","uuid":"9be5c090-7dd6-465b-950e-885b95e1863a","is_active":true,"created_on":"2022-10-03T09:41:38.000Z","last_modified_date":"2022-10-03T09:41:38.000Z"}]}}"#,
        )
        .unwrap();
        let hooks = list.response.unwrap().webhooks;
        assert_eq!(
            hooks[0].uuid.as_deref(),
            Some("9be5c090-7dd6-465b-950e-885b95e1863a")
        );
        let events: Envelope<EventList> = serde_json::from_str(
            r#"{"status":200,"response":{"events":[{"uuid":"9be5c090-7dd6-465b-950e-885b95e1863a","name":"book.verified","type":"STATUS","severity":"HIGH","is_active":true}]}}"#,
        )
        .unwrap();
        assert_eq!(
            events.response.unwrap().events[0].kind.as_deref(),
            Some("STATUS")
        );
        let error: ErrorBody = serde_json::from_str(
            r#"{"status":"400","code":"1000","response":null,"message":"Webhook with uuid x not found","meta":{"msg":"Webhook with uuid x not found"}}"#,
        )
        .unwrap();
        assert_eq!(
            error.text().as_deref(),
            Some("Webhook with uuid x not found")
        );
        let oauth: ErrorBody =
            serde_json::from_str(r#"{"error":"access_denied","error_description":"Unauthorized"}"#)
                .unwrap();
        assert_eq!(oauth.text().as_deref(), Some("access_denied: Unauthorized"));
    }

    #[test]
    fn secrets_stay_out_of_debug_and_urls() {
        let request = TokenRequest {
            grant_type: "client_credentials",
            audience: "https://api.ocrolus.com/",
            client_id: "id",
            client_secret: "very-secret-value",
        };
        assert!(!format!("{request:?}").contains("very-secret-value"));
        let rotate = RotateSecretRequest {
            secret_key: "very-secret-value",
        };
        assert!(!format!("{rotate:?}").contains("very-secret-value"));
        assert_eq!(
            redact_userinfo("https://relay:pa55@hooks.example.com/webhooks/ocrolus"),
            "https://relay:***@hooks.example.com/webhooks/ocrolus"
        );
        assert_eq!(
            redact_userinfo("https://hooks.example.com/a@b"),
            "https://hooks.example.com/a@b"
        );
    }
}
