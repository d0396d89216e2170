use super::*;
use http::HeaderValue;

const NOW: i64 = 1_767_225_600;
const BODY: &[u8] =
    br#"{"event_name": "book.verified", "book_uuid":"940cd2ca-a00b-4695-a76c-d59873bc759c"}"#;
const ID: &str = "019d0c76-a902-7b75-8f9e-8694eae8a374";

// Vectors computed independently with Python:
// python3 -c "import hmac,hashlib; print(hmac.new(b'0123456789abcdef-test-secret',
//   b'1767225600.019d0c76-a902-7b75-8f9e-8694eae8a374.' + BODY, hashlib.sha256).hexdigest())"
const SIG_1: &str = "eeb90632b8a18f064d8f04e47257a276066615a7f401fb333eaf5fd0c674b13b";
// python3 -c "import hmac,hashlib; print(hmac.new(b'second-secret-for-rotation-0001',
//   b'1767225600.req-2.{\"status\":\"VERIFICATION_COMPLETE\",\"uploaded_doc_pk\":0,\"book_pk\":0}',
//   hashlib.sha256).hexdigest())"
const SIG_2: &str = "c9bffc3b88b44259f667a552405e17b1f4814b4f2728c2f3dc9f4f5886f7e0c6";
const BODY_2: &[u8] = br#"{"status":"VERIFICATION_COMPLETE","uploaded_doc_pk":0,"book_pk":0}"#;

fn policy() -> AuthPolicy {
    let secrets = Secrets::parse(
        "0123456789abcdef-test-secret\n# old one below\nsecond-secret-for-rotation-0001\n",
        "test",
        '\n',
    )
    .expect("secrets");
    AuthPolicy::new(
        secrets,
        BasicCredentials::default(),
        Duration::from_secs(300),
        false,
    )
    .expect("policy")
}

fn headers(ts: &str, id: &str, sig: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(TIMESTAMP_HEADER, HeaderValue::from_str(ts).expect("ts"));
    h.insert(REQUEST_ID_HEADER, HeaderValue::from_str(id).expect("id"));
    h.insert(SIGNATURE_HEADER, HeaderValue::from_str(sig).expect("sig"));
    h
}

#[test]
fn signs_like_the_python_reference() {
    let secret = b"0123456789abcdef-test-secret";
    assert_eq!(hex::encode(sign(secret, "1767225600", ID, BODY)), SIG_1);
}

#[test]
fn accepts_first_and_rotated_secret() {
    let p = policy();
    let v = p
        .verify(
            &headers("1767225600", ID, SIG_1),
            Bytes::from_static(BODY),
            NOW,
        )
        .expect("first secret");
    assert_eq!(v.get().id.as_str(), ID);
    assert_eq!(v.get().timestamp.as_deref(), Some("1767225600"));
    assert_eq!(&v.get().body[..], BODY);
    p.verify(
        &headers("1767225600", "req-2", SIG_2),
        Bytes::from_static(BODY_2),
        NOW,
    )
    .expect("second secret");
}

#[test]
fn upper_case_hex_is_accepted() {
    let p = policy();
    p.verify(
        &headers("1767225600", ID, &SIG_1.to_uppercase()),
        Bytes::from_static(BODY),
        NOW,
    )
    .expect("upper-case hex");
}

#[test]
fn altered_body_is_rejected() {
    let p = policy();
    let mut body = BODY.to_vec();
    body[3] ^= 1;
    let err = p
        .verify(&headers("1767225600", ID, SIG_1), body.into(), NOW)
        .expect_err("altered");
    assert_eq!(err, AuthError::BadSignature);
}

#[test]
fn reserialised_json_is_rejected() {
    // Same JSON value, different bytes: the signature covers bytes.
    let p = policy();
    let compact =
        br#"{"event_name":"book.verified","book_uuid":"940cd2ca-a00b-4695-a76c-d59873bc759c"}"#;
    let err = p
        .verify(
            &headers("1767225600", ID, SIG_1),
            Bytes::from_static(compact),
            NOW,
        )
        .expect_err("reserialised");
    assert_eq!(err, AuthError::BadSignature);
}

#[test]
fn stale_and_future_timestamps_are_rejected() {
    let p = policy();
    let h = headers("1767225600", ID, SIG_1);
    let body = Bytes::from_static(BODY);
    assert_eq!(
        p.verify(&h, body.clone(), NOW + 301).expect_err("stale"),
        AuthError::StaleTimestamp
    );
    assert_eq!(
        p.verify(&h, body.clone(), NOW - 301).expect_err("future"),
        AuthError::StaleTimestamp
    );
    p.verify(&h, body, NOW + 300).expect("edge of window");
}

#[test]
fn missing_and_malformed_headers_are_rejected() {
    let p = policy();
    let body = Bytes::from_static(BODY);
    let mut h = headers("1767225600", ID, SIG_1);
    h.remove(SIGNATURE_HEADER);
    assert_eq!(
        p.verify(&h, body.clone(), NOW).expect_err("no sig"),
        AuthError::MissingSignature
    );

    let mut h = headers("1767225600", ID, SIG_1);
    h.remove(TIMESTAMP_HEADER);
    assert_eq!(
        p.verify(&h, body.clone(), NOW).expect_err("no ts"),
        AuthError::MissingTimestamp
    );

    let mut h = headers("1767225600", ID, SIG_1);
    h.remove(REQUEST_ID_HEADER);
    assert_eq!(
        p.verify(&h, body.clone(), NOW).expect_err("no id"),
        AuthError::MissingRequestId
    );

    let h = headers("1767225600", ID, "zz-not-hex");
    assert_eq!(
        p.verify(&h, body.clone(), NOW).expect_err("hex"),
        AuthError::MalformedSignature
    );

    let h = headers("1767225600", ID, &SIG_1[..62]);
    assert_eq!(
        p.verify(&h, body.clone(), NOW).expect_err("short"),
        AuthError::MalformedSignature
    );

    let h = headers("soon", ID, SIG_1);
    assert_eq!(
        p.verify(&h, body.clone(), NOW).expect_err("ts"),
        AuthError::MalformedTimestamp
    );

    let mut h = headers("1767225600", ID, SIG_1);
    h.append(SIGNATURE_HEADER, HeaderValue::from_static("00"));
    assert_eq!(
        p.verify(&h, body, NOW).expect_err("dup"),
        AuthError::DuplicateHeader
    );
}

#[test]
fn wrong_secret_is_rejected() {
    let secrets = Secrets::parse("a-completely-different-secret", "t", '\n').expect("s");
    let p = AuthPolicy::new(
        secrets,
        BasicCredentials::default(),
        Duration::from_secs(300),
        false,
    )
    .expect("p");
    let err = p
        .verify(
            &headers("1767225600", ID, SIG_1),
            Bytes::from_static(BODY),
            NOW,
        )
        .expect_err("wrong secret");
    assert_eq!(err, AuthError::BadSignature);
}

#[test]
fn no_auth_configured_fails_closed() {
    let err = AuthPolicy::new(
        Secrets::default(),
        BasicCredentials::default(),
        Duration::from_secs(300),
        false,
    )
    .expect_err("fail closed");
    assert!(err.to_string().contains("refusing"));
}

#[test]
fn short_secret_is_refused_without_echoing_it() {
    let err =
        Secrets::parse("ok-secret-0123456789\nshorty", "secret file s", '\n').expect_err("short");
    let msg = err.to_string();
    assert!(msg.contains("entry 2"), "{msg}");
    assert!(!msg.contains("shorty"), "{msg}");
}

#[test]
fn basic_auth_right_and_wrong() {
    let basic = BasicCredentials::parse("ocrolus:s3cret-pass\nother:x\n").expect("basic");
    let p = AuthPolicy::new(Secrets::default(), basic, Duration::from_secs(300), false).expect("p");
    let mut h = HeaderMap::new();
    // base64("ocrolus:s3cret-pass")
    h.insert(
        "authorization",
        HeaderValue::from_static("Basic b2Nyb2x1czpzM2NyZXQtcGFzcw=="),
    );
    let v = p.verify(&h, Bytes::from_static(b"{}"), NOW).expect("right");
    assert!(!v.get().id.as_str().is_empty(), "an id is generated");

    h.insert(
        "authorization",
        HeaderValue::from_static("Basic b2Nyb2x1czp3cm9uZw=="),
    );
    assert_eq!(
        p.verify(&h, Bytes::from_static(b"{}"), NOW)
            .expect_err("wrong"),
        AuthError::BadCredentials
    );
    h.remove("authorization");
    assert_eq!(
        p.verify(&h, Bytes::from_static(b"{}"), NOW)
            .expect_err("none"),
        AuthError::MissingCredentials
    );
}

#[test]
fn debug_output_hides_secrets() {
    let p = policy();
    let shown = format!("{p:?}");
    assert!(!shown.contains("0123456789abcdef-test-secret"), "{shown}");
}

/// Regression: random secrets often start with `#`; such a line is a
/// secret, not a comment (it used to be skipped, which turned HMAC off).
#[test]
fn hash_followed_by_a_non_space_is_a_secret() {
    let secrets = Secrets::parse("#q7Vx!m2Lr@9pT&zK4wN8sB$eY6hJ3cD\n", "t", '\n').expect("parse");
    assert_eq!(secrets.len(), 1);
    let basic = BasicCredentials::parse("#ocrolus:first-password\n").expect("parse");
    assert_eq!(basic.len(), 1);
}

#[test]
fn comment_is_hash_then_whitespace_or_alone() {
    let secrets = Secrets::parse(
        "# rotated 2026-11\n#\n  #\tindented comment\nok-secret-0123456789\n",
        "t",
        '\n',
    )
    .expect("parse");
    assert_eq!(secrets.len(), 1);
}

/// A secret never holds whitespace, so no comment can be a secret.
#[test]
fn secret_with_whitespace_is_refused_without_echoing_it() {
    let err = Secrets::parse("ok-secret-0123456789\nhas a space inside it\n", "t", '\n')
        .expect_err("whitespace");
    let msg = err.to_string();
    assert!(
        msg.contains("entry 2") && msg.contains("whitespace"),
        "{msg}"
    );
    assert!(!msg.contains("space inside"), "{msg}");
}

#[test]
fn secret_file_without_a_secret_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (text, says) in [
        ("", "is empty"),
        ("\n\n", "is empty"),
        ("# only a comment\n", "holds no secret"),
    ] {
        let path = dir.path().join("secrets");
        std::fs::write(&path, text).expect("write");
        let err = Secrets::load(&path).expect_err("no secret");
        assert!(err.to_string().contains(says), "{err}");
    }
}
