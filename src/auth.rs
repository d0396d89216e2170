//! Pipeline step 8: is this delivery really from Ocrolus?
//!
//! Ocrolus signs `{Webhook-Timestamp}.{Webhook-Request-Id}.{raw body}` with
//! HMAC-SHA256 and sends the lower-case hex digest in `Webhook-Signature`.
//! Verification runs over the bytes exactly as received, tries every
//! configured secret (rotation) without stopping early, compares in constant
//! time and rejects timestamps outside the window (replay). Basic auth, when
//! configured, compares SHA-256 digests of `user:password` in constant time,
//! so neither content nor length of a credential leaks through timing.

use std::fmt;
use std::path::Path;
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use hmac::{Hmac, Mac};
use http::HeaderMap;
use sha2::{Digest, Sha256};
use subtle::{Choice, ConstantTimeEq};

use crate::config_error::ConfigError;

pub const SIGNATURE_HEADER: &str = "webhook-signature";
pub const TIMESTAMP_HEADER: &str = "webhook-timestamp";
pub const REQUEST_ID_HEADER: &str = "webhook-request-id";

/// Ocrolus' documented secret length.
const SECRET_LEN: std::ops::RangeInclusive<usize> = 16..=128;

/// One HMAC secret; `Debug` never shows it.
#[derive(Clone)]
struct Secret(Vec<u8>);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// The HMAC secrets accepted at once (several during rotation).
#[derive(Debug, Clone, Default)]
pub struct Secrets(Vec<Secret>);

impl Secrets {
    /// Reads a secret file (mode checked, see [`check_file_mode`]); a file
    /// that yields no secret is an error, never a silent "HMAC off".
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let origin = format!("secret file {}", path.display());
        let text = read_protected(path, &origin)?;
        if text.trim().is_empty() {
            return Err(ConfigError::new(format!(
                "{origin} is empty; write the webhook secret into it (one per line), or remove --secret-file"
            )));
        }
        let secrets = Self::parse(&text, &origin, '\n')?;
        if secrets.is_empty() {
            return Err(ConfigError::new(format!(
                "{origin} holds no secret (a line is a comment only if '#' is followed by a space); remove --secret-file or add a secret"
            )));
        }
        Ok(secrets)
    }

    /// Parses secrets separated by `sep`; blank entries and comments (see
    /// [`is_comment`]) are skipped. Errors name the entry's position, never
    /// its content.
    pub fn parse(text: &str, origin: &str, sep: char) -> Result<Self, ConfigError> {
        let mut secrets = Vec::new();
        for (index, entry) in text.split(sep).enumerate() {
            let entry = entry.trim();
            if entry.is_empty() || is_comment(entry) {
                continue;
            }
            let len = entry.chars().count();
            if !SECRET_LEN.contains(&len) {
                return Err(ConfigError::new(format!(
                    "{origin}: entry {} is {len} characters; Ocrolus secrets are 16-128 characters",
                    index + 1
                )));
            }
            if entry.contains(char::is_whitespace) {
                return Err(ConfigError::new(format!(
                    "{origin}: entry {} contains whitespace; secrets are one word (a comment is '#' followed by a space)",
                    index + 1
                )));
            }
            secrets.push(Secret(entry.as_bytes().to_vec()));
        }
        Ok(Self(secrets))
    }

    pub fn extend(&mut self, other: Secrets) {
        self.0.extend(other.0);
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// [`fingerprint`] of each secret, in file order.
    pub fn fingerprints(&self) -> Vec<String> {
        self.0.iter().map(|s| fingerprint(&s.0)).collect()
    }
}

/// A short, one-way tag of a secret: lets `rotate-secret` and operators see
/// which secrets a running relay holds without the admin port ever showing
/// one. 48 bits of a domain-separated SHA-256: enough to tell secrets apart,
/// useless for recovering a 16+ character random secret.
pub fn fingerprint(secret: &[u8]) -> String {
    let mut hasher = Sha256::new();
    hasher.update(b"ocrolus-relay secret fingerprint\0");
    hasher.update(secret);
    hex::encode(&hasher.finalize()[..6])
}

/// The comment rule of secret and Basic files: `#` alone, or `#` followed
/// by whitespace. Secrets hold no whitespace (refused), so a comment can
/// never be a secret; `#` followed by anything else starts a secret (random
/// secrets often do) and is never dropped.
pub fn is_comment(line: &str) -> bool {
    line.trim()
        .strip_prefix('#')
        .is_some_and(|rest| rest.is_empty() || rest.starts_with(char::is_whitespace))
}

/// What the mode of a credential file allows others to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileExposure {
    /// Only the owner (and perhaps its group) can read it.
    Private,
    /// Users other than the owner and its group can read it: accepted with a
    /// warning (container secret mounts often look like this).
    ReadableByOthers,
}

/// Refuses a credential file that group or others can write (anyone who
/// can write it can add a key of their own) and reports whether others can
/// read it.
pub fn check_file_mode(path: &Path, origin: &str) -> Result<FileExposure, ConfigError> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path)
        .map_err(|e| ConfigError::new(format!("{origin}: {e}")))?
        .permissions()
        .mode();
    if mode & 0o022 != 0 {
        return Err(ConfigError::new(format!(
            "{origin} is writable by group or others (mode {:o}); chmod 600 it",
            mode & 0o777
        )));
    }
    Ok(if mode & 0o004 != 0 {
        FileExposure::ReadableByOthers
    } else {
        FileExposure::Private
    })
}

/// Reads a credential file after [`check_file_mode`], warning when others
/// can read it.
fn read_protected(path: &Path, origin: &str) -> Result<String, ConfigError> {
    if check_file_mode(path, origin)? == FileExposure::ReadableByOthers {
        tracing::warn!("{origin} is readable by others; chmod 600 it");
    }
    std::fs::read_to_string(path).map_err(|e| ConfigError::new(format!("{origin}: {e}")))
}

/// Accepted Basic credentials, kept only as SHA-256 of `user:password`.
#[derive(Clone, Default)]
pub struct BasicCredentials(Vec<[u8; 32]>);

impl fmt::Debug for BasicCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BasicCredentials({} entries)", self.0.len())
    }
}

impl BasicCredentials {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = read_protected(path, &format!("basic auth file {}", path.display()))?;
        Self::parse(&text)
            .map_err(|e| ConfigError::new(format!("basic auth file {}: {e}", path.display())))
    }

    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let mut digests = Vec::new();
        for (index, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || is_comment(line) {
                continue;
            }
            match line.split_once(':') {
                Some((user, pass)) if !user.is_empty() && !pass.is_empty() => {
                    digests.push(Sha256::digest(line.as_bytes()).into());
                }
                _ => {
                    return Err(ConfigError::new(format!(
                        "line {}: expected `user:password` with both parts non-empty",
                        index + 1
                    )));
                }
            }
        }
        if digests.is_empty() {
            return Err(ConfigError::new(
                "holds no credentials; write one `user:password` per line, or remove --basic-auth-file",
            ));
        }
        Ok(Self(digests))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }
}

/// Which checks every delivery must pass: each configured method is required.
#[derive(Debug, Clone)]
pub struct AuthPolicy {
    secrets: Secrets,
    basic: BasicCredentials,
    tolerance: Duration,
}

impl AuthPolicy {
    /// Fails closed: with neither secrets nor credentials, only an explicit
    /// `insecure_no_auth` lets the relay start.
    pub fn new(
        secrets: Secrets,
        basic: BasicCredentials,
        tolerance: Duration,
        insecure_no_auth: bool,
    ) -> Result<Self, ConfigError> {
        if secrets.is_empty() && basic.is_empty() && !insecure_no_auth {
            return Err(ConfigError::new(
                "no HMAC secret (--secret-file or RELAY_WEBHOOK_SECRETS) and no --basic-auth-file: refusing to accept unauthenticated webhooks (--insecure-no-auth exists for development)",
            ));
        }
        Ok(Self {
            secrets,
            basic,
            tolerance,
        })
    }

    pub fn hmac_secrets(&self) -> usize {
        self.secrets.len()
    }

    pub fn basic_credentials(&self) -> usize {
        self.basic.len()
    }

    pub fn secret_fingerprints(&self) -> Vec<String> {
        self.secrets.fingerprints()
    }

    /// Step 8. `now` is Unix seconds.
    pub fn verify(
        &self,
        headers: &HeaderMap,
        body: Bytes,
        now: i64,
    ) -> Result<Verified<Delivery>, AuthError> {
        if !self.basic.is_empty() {
            self.check_basic(headers)?;
        }
        let id = header_str(headers, REQUEST_ID_HEADER)?;
        let timestamp = header_str(headers, TIMESTAMP_HEADER)?;
        if !self.secrets.is_empty() {
            let id = id.ok_or(AuthError::MissingRequestId)?;
            let timestamp = timestamp.ok_or(AuthError::MissingTimestamp)?;
            self.check_signature(headers, timestamp, id, &body, now)?;
        }
        let id = match id {
            Some(id) => DeliveryId::parse(id).ok_or(AuthError::MalformedRequestId)?,
            None => DeliveryId::generate(),
        };
        Ok(Verified(Delivery {
            id,
            id_signed: !self.secrets.is_empty(),
            timestamp: timestamp.map(str::to_owned),
            body,
        }))
    }

    fn check_signature(
        &self,
        headers: &HeaderMap,
        timestamp: &str,
        id: &str,
        body: &[u8],
        now: i64,
    ) -> Result<(), AuthError> {
        let sent_at: i64 = timestamp
            .parse()
            .map_err(|_| AuthError::MalformedTimestamp)?;
        if now.abs_diff(sent_at) > self.tolerance.as_secs() {
            return Err(AuthError::StaleTimestamp);
        }
        let signature =
            header_str(headers, SIGNATURE_HEADER)?.ok_or(AuthError::MissingSignature)?;
        let mut expected = [0u8; 32];
        hex::decode_to_slice(signature.trim(), &mut expected)
            .map_err(|_| AuthError::MalformedSignature)?;
        let mut matched = Choice::from(0);
        for secret in &self.secrets.0 {
            let digest = sign(&secret.0, timestamp, id, body);
            matched |= digest.ct_eq(&expected);
        }
        if bool::from(matched) {
            Ok(())
        } else {
            Err(AuthError::BadSignature)
        }
    }

    fn check_basic(&self, headers: &HeaderMap) -> Result<(), AuthError> {
        let value = header_str(headers, "authorization")?.ok_or(AuthError::MissingCredentials)?;
        let (scheme, encoded) = value.split_once(' ').ok_or(AuthError::BadCredentials)?;
        if !scheme.eq_ignore_ascii_case("basic") {
            return Err(AuthError::BadCredentials);
        }
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(encoded.trim())
            .map_err(|_| AuthError::BadCredentials)?;
        let presented: [u8; 32] = Sha256::digest(&decoded).into();
        let mut matched = Choice::from(0);
        for digest in &self.basic.0 {
            matched |= digest.ct_eq(&presented);
        }
        if bool::from(matched) {
            Ok(())
        } else {
            Err(AuthError::BadCredentials)
        }
    }
}

/// HMAC-SHA256 over `{timestamp}.{id}.{body}`, as Ocrolus signs.
pub fn sign(secret: &[u8], timestamp: &str, id: &str, body: &[u8]) -> [u8; 32] {
    // HMAC accepts keys of any length; new_from_slice cannot fail for it.
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret) else {
        unreachable!("HMAC takes keys of any length")
    };
    mac.update(timestamp.as_bytes());
    mac.update(b".");
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(body);
    mac.finalize().into_bytes().into()
}

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Result<Option<&'a str>, AuthError> {
    let mut values = headers.get_all(name).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(AuthError::DuplicateHeader);
    }
    value
        .to_str()
        .map(Some)
        .map_err(|_| AuthError::DuplicateHeader)
}

/// Why a delivery was not authenticated. All map to 401; each variant has its
/// metric reason (see `reject.rs`) and is logged, never sent back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("missing Webhook-Signature")]
    MissingSignature,
    #[error("Webhook-Signature is not a hex SHA-256 digest")]
    MalformedSignature,
    #[error("signature matches no configured secret")]
    BadSignature,
    #[error("missing Webhook-Timestamp")]
    MissingTimestamp,
    #[error("Webhook-Timestamp is not Unix seconds")]
    MalformedTimestamp,
    #[error("Webhook-Timestamp outside the accepted window")]
    StaleTimestamp,
    #[error("missing Webhook-Request-Id")]
    MissingRequestId,
    #[error("Webhook-Request-Id is not 1-255 printable ASCII characters")]
    MalformedRequestId,
    #[error("an authentication header is repeated or not ASCII")]
    DuplicateHeader,
    #[error("missing Basic credentials")]
    MissingCredentials,
    #[error("Basic credentials do not match")]
    BadCredentials,
}

/// Ocrolus' `Webhook-Request-Id`: printable ASCII, fits an AMQP short string.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DeliveryId(String);

impl DeliveryId {
    pub fn parse(s: &str) -> Option<Self> {
        let ok = (1..=255).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_graphic());
        ok.then(|| Self(s.to_owned()))
    }

    /// For unsigned deliveries that carry no id (Basic-only setups).
    pub fn generate() -> Self {
        Self(uuid::Uuid::now_v7().to_string())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for DeliveryId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An authenticated delivery: the raw body and what Ocrolus said about it.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub id: DeliveryId,
    /// True when the HMAC covered the id (`{timestamp}.{id}.{body}`): only
    /// then may de-duplication trust the id alone.
    pub id_signed: bool,
    /// `Webhook-Timestamp` as sent, when present.
    pub timestamp: Option<String>,
    pub body: Bytes,
}

/// Proof that a value passed authentication; only [`AuthPolicy::verify`]
/// makes one, so nothing downstream can take an unverified body.
#[derive(Debug)]
pub struct Verified<T>(T);

impl<T> Verified<T> {
    pub fn get(&self) -> &T {
        &self.0
    }

    pub fn into_inner(self) -> T {
        self.0
    }
}

#[cfg(test)]
mod tests;
