//! `AuthPolicy::verify` on arbitrary authentication headers and body, with
//! fixed HMAC secrets (and, on some inputs, also required Basic credentials).
//!
//! Invariants: never panics; `Ok` only if `Webhook-Signature` (trimmed of the
//! spaces/tabs hyper strips anyway) equals, case-insensitively,
//! hex(HMAC-SHA256(secret, "{ts}.{id}.{body}")) for one configured secret,
//! computed here independently, and `Webhook-Timestamp` is Unix seconds
//! within the window; with Basic required, `Ok` only with the right
//! credentials; the `Delivery` carries the id, timestamp and body as sent.
//! Conversely a well-formed, correctly signed, in-window delivery is accepted.
#![no_main]

use std::time::Duration;

use arbitrary::Arbitrary;
use base64::Engine as _;
use bytes::Bytes;
use hmac::{Hmac, Mac};
use http::{HeaderMap, HeaderValue};
use libfuzzer_sys::fuzz_target;
use ocrolus_relay::{AuthPolicy, BasicCredentials, Secrets};
use sha2::Sha256;

const SECRETS: [&str; 2] = ["fuzz-secret-0123456789abcdef", "second-rotated-secret-XYZ"];
const BASIC_USER_PASS: &str = "relay:correct horse battery";
const TOLERANCE: u64 = 300;
const NOW: i64 = 1_700_000_000;

#[derive(Debug, Arbitrary)]
enum Timestamp {
    /// `NOW + offset`, as decimal.
    Offset(i16),
    Raw(String),
    Missing,
}

#[derive(Debug, Arbitrary)]
enum Signature {
    /// The right signature for `SECRETS[secret % 2]`, optionally upper-case
    /// and padded with spaces.
    Correct {
        secret: u8,
        upper: bool,
        pad: bool,
    },
    /// Correct but for a different timestamp (replayed signature, new time).
    OtherTimestamp(u8),
    Raw(String),
    Missing,
}

#[derive(Debug, Arbitrary)]
struct Input {
    now_offset: Option<i64>,
    timestamp: Timestamp,
    request_id: Option<String>,
    signature: Signature,
    /// Some: Basic is required too; the bool says whether to send the right
    /// credentials, the string is sent otherwise.
    basic: Option<(bool, String)>,
    /// Extra header lines: (which auth header, raw value).
    extra: Vec<(u8, Vec<u8>)>,
    body: Vec<u8>,
}

fn hmac_hex(secret: &str, ts: &str, id: &str, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("any key length");
    mac.update(ts.as_bytes());
    mac.update(b".");
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(body);
    hex::encode(mac.finalize().into_bytes())
}

fn one<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    let mut all = headers.get_all(name).iter();
    let first = all.next()?;
    if all.next().is_some() {
        return None;
    }
    first.to_str().ok()
}

fuzz_target!(|input: Input| {
    let secrets = Secrets::parse(&SECRETS.join("\n"), "fuzz", '\n').expect("fixed secrets");
    let basic = match input.basic {
        Some(_) => BasicCredentials::parse(BASIC_USER_PASS).expect("fixed credentials"),
        None => BasicCredentials::default(),
    };
    let policy = AuthPolicy::new(secrets, basic, Duration::from_secs(TOLERANCE), false)
        .expect("policy with secrets");
    let now = input
        .now_offset
        .map_or(NOW, |o| NOW.wrapping_add(o % 1_000_000));

    let ts: Option<String> = match &input.timestamp {
        Timestamp::Offset(o) => Some((NOW + i64::from(*o)).to_string()),
        Timestamp::Raw(s) => Some(s.clone()),
        Timestamp::Missing => None,
    };
    let id = input.request_id.clone();
    let sig: Option<String> = match &input.signature {
        Signature::Correct { secret, upper, pad } => {
            let secret = SECRETS[usize::from(*secret) % SECRETS.len()];
            let mut s = hmac_hex(
                secret,
                ts.as_deref().unwrap_or(""),
                id.as_deref().unwrap_or(""),
                &input.body,
            );
            if *upper {
                s = s.to_ascii_uppercase();
            }
            if *pad {
                s = format!("  {s}\t");
            }
            Some(s)
        }
        Signature::OtherTimestamp(secret) => {
            let secret = SECRETS[usize::from(*secret) % SECRETS.len()];
            let other = (NOW - 86_400).to_string();
            Some(hmac_hex(
                secret,
                &other,
                id.as_deref().unwrap_or(""),
                &input.body,
            ))
        }
        Signature::Raw(s) => Some(s.clone()),
        Signature::Missing => None,
    };

    let mut headers = HeaderMap::new();
    let mut clean = true;
    let put =
        |headers: &mut HeaderMap, name: &'static str, value: &[u8]| match HeaderValue::from_bytes(
            value,
        ) {
            Ok(v) => {
                headers.append(name, v);
                true
            }
            Err(_) => false,
        };
    if let Some(ts) = &ts {
        clean &= put(&mut headers, "webhook-timestamp", ts.as_bytes());
    }
    if let Some(id) = &id {
        clean &= put(&mut headers, "webhook-request-id", id.as_bytes());
    }
    if let Some(sig) = &sig {
        clean &= put(&mut headers, "webhook-signature", sig.as_bytes());
    }
    if let Some((right, other)) = &input.basic {
        let value = if *right {
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(BASIC_USER_PASS)
            )
        } else {
            other.clone()
        };
        clean &= put(&mut headers, "authorization", value.as_bytes());
    }
    const NAMES: [&str; 4] = [
        "webhook-timestamp",
        "webhook-request-id",
        "webhook-signature",
        "authorization",
    ];
    for (which, value) in input.extra.iter().take(4) {
        let name = NAMES[usize::from(*which) % NAMES.len()];
        put(&mut headers, name, value);
        clean = false;
    }

    let body = Bytes::from(input.body.clone());
    let result = policy.verify(&headers, body.clone(), now);

    if let Ok(verified) = &result {
        let delivery = verified.get();
        let h_ts = one(&headers, "webhook-timestamp").expect("Ok without a single timestamp");
        let h_id = one(&headers, "webhook-request-id").expect("Ok without a single request id");
        let h_sig = one(&headers, "webhook-signature").expect("Ok without a single signature");
        let presented = h_sig
            .trim_matches(|c| c == ' ' || c == '\t')
            .to_ascii_lowercase();
        assert!(
            SECRETS
                .iter()
                .any(|s| hmac_hex(s, h_ts, h_id, &body) == presented),
            "Ok but the signature matches no secret: {h_sig:?}"
        );
        let sent_at: i64 = h_ts.parse().expect("Ok with a timestamp that is not i64");
        assert!(
            now.abs_diff(sent_at) <= TOLERANCE,
            "Ok with a stale timestamp {h_ts}"
        );
        if input.basic.is_some() {
            let auth = one(&headers, "authorization").expect("Ok without Basic credentials");
            let (scheme, b64) = auth
                .split_once(' ')
                .expect("Ok with a malformed Authorization");
            assert!(scheme.eq_ignore_ascii_case("basic"));
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(b64.trim())
                .expect("Ok with bad base64");
            assert_eq!(
                decoded,
                BASIC_USER_PASS.as_bytes(),
                "Ok with wrong credentials"
            );
        }
        assert_eq!(delivery.id.as_str(), h_id);
        assert_eq!(delivery.timestamp.as_deref(), Some(h_ts));
        assert_eq!(delivery.body, body);
    }

    // Liveness: a clean, correctly signed, fresh delivery is accepted.
    let fresh = matches!(input.timestamp, Timestamp::Offset(o) if now.abs_diff(NOW + i64::from(o)) <= TOLERANCE);
    let good_id = id
        .as_deref()
        .is_some_and(|i| (1..=255).contains(&i.len()) && i.bytes().all(|b| b.is_ascii_graphic()));
    let good_basic = input.basic.as_ref().is_none_or(|(right, _)| *right);
    if clean
        && fresh
        && good_id
        && good_basic
        && matches!(input.signature, Signature::Correct { .. })
    {
        assert!(
            result.is_ok(),
            "correctly signed fresh delivery rejected: {:?}",
            result.err()
        );
    }
});
