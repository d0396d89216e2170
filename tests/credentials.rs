//! A secret file can never silently switch HMAC off.
//! A line starting with `#` is a secret unless `#` is followed by a space
//! (or stands alone), a secret file that yields no secret is a
//! configuration error, and the file's mode is checked (group/others
//! writable: refused; readable by others: a warning).

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use clap::Parser;
use common::*;
use ocrolus_relay::{Cli, Command, Config, Relay};

const BODY: &[u8] =
    br#"{"event_name":"book.verified","book_uuid":"940cd2ca-a00b-4695-a76c-d59873bc759c"}"#;
/// A random-looking secret that starts with `#`, as generators produce.
const HASH_SECRET: &str = "#q7Vx!m2Lr@9pT&zK4wN8sB$eY6hJ3cD";

fn basic_header() -> (String, String) {
    let encoded = base64::engine::general_purpose::STANDARD.encode("ocrolus:first-password");
    ("authorization".into(), format!("Basic {encoded}"))
}

fn write(dir: &Path, name: &str, text: &str, mode: u32) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write file");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).expect("chmod");
    path.display().to_string()
}

fn binary() -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_ocrolus-relay"));
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("RELAY_") {
            cmd.env_remove(key);
        }
    }
    cmd.env("RUST_LOG", "warn");
    cmd
}

/// `check-config` with a test relay's flags plus `extra`: exit code, stdout, stderr.
async fn check_config(dir: &Path, extra: Vec<String>) -> (i32, String, String) {
    let exchange = unique("test.creds");
    let opts = RelayOptions {
        secrets: vec![],
        extra,
        ..RelayOptions::default()
    };
    let args = serve_args(
        &opts,
        dir,
        &exchange,
        &format!("{exchange}.unrouted"),
        &dir.join("spool"),
    );
    let output = binary()
        .arg("check-config")
        .args(&args)
        .output()
        .await
        .expect("run check-config");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// The defect as reported: the only line of the secret file starts with `#`,
/// Basic is configured too, and an unsigned Basic request got 200.
#[tokio::test]
async fn hash_prefixed_secret_keeps_hmac_required_with_basic() {
    require_broker!();
    let dir = tempfile::tempdir().expect("tempdir");
    let secret_file = write(dir.path(), "secret", &format!("{HASH_SECRET}\n"), 0o600);
    let basic_file = write(dir.path(), "basic", "ocrolus:first-password\n", 0o600);
    let relay = TestRelay::start(RelayOptions {
        secrets: vec![],
        extra: vec![
            "--secret-file".into(),
            secret_file,
            "--basic-auth-file".into(),
            basic_file,
        ],
        ..RelayOptions::default()
    })
    .await;
    let (broker, queue) = relay.watch_all().await;
    let json = ("content-type".to_string(), "application/json".to_string());

    let unsigned = vec![json, basic_header()];
    let (status, _, body) = request("POST", &relay.url, &unsigned, Bytes::from_static(BODY)).await;
    assert_eq!(
        status,
        401,
        "unsigned Basic request: {}",
        String::from_utf8_lossy(&body)
    );

    let mut signed = signed_headers(HASH_SECRET, &new_id(), now_secs(), BODY);
    signed.push(basic_header());
    let (status, _, _) = request("POST", &relay.url, &signed, Bytes::from_static(BODY)).await;
    assert_eq!(status, 200, "signed with the '#' secret and Basic");
    let got = broker.drain(&queue, 1, Duration::from_secs(5)).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].delivery.data, BODY);
    relay.finish(&broker, &[&queue]).await;
}

/// An empty file, blank lines only, or comments only: no secret, so the
/// relay refuses to start and `check-config` exits 64, even with Basic.
#[tokio::test]
async fn secret_file_without_a_secret_is_a_config_error() {
    for (what, text, says) in [
        ("empty", "", "is empty"),
        ("blank lines", "\n  \n\n", "is empty"),
        (
            "comments only",
            "# REPLACE: one secret per line\n#\n",
            "holds no secret",
        ),
    ] {
        let dir = tempfile::tempdir().expect("tempdir");
        let secret_file = write(dir.path(), "secret", text, 0o600);
        let basic_file = write(dir.path(), "basic", "ocrolus:first-password\n", 0o600);
        let extra = vec![
            "--secret-file".to_string(),
            secret_file.clone(),
            "--basic-auth-file".to_string(),
            basic_file,
        ];
        let (code, out, err) = check_config(dir.path(), extra.clone()).await;
        assert_eq!(code, 64, "{what}: stdout:\n{out}\nstderr:\n{err}");
        assert!(err.contains(says), "{what}: {err}");
        assert!(!out.contains("configuration OK"), "{what}: {out}");

        let mut argv = vec!["ocrolus-relay".to_string(), "serve".to_string()];
        let exchange = unique("test.creds");
        argv.extend(serve_args(
            &RelayOptions {
                secrets: vec![],
                extra,
                ..RelayOptions::default()
            },
            dir.path(),
            &exchange,
            &format!("{exchange}.unrouted"),
            &dir.path().join("spool"),
        ));
        let Command::Serve(args) = Cli::try_parse_from(&argv).expect("flags").command else {
            panic!("not serve")
        };
        let config = Config::from_args(&args, None).expect("flags are valid");
        match Relay::start(config).await {
            Ok(relay) => {
                relay.shutdown().await;
                panic!("{what}: the relay started without a secret");
            }
            Err(e) => assert!(format!("{e:#}").contains(says), "{what}: {e:#}"),
        }
    }
}

/// Group- or world-writable secret or Basic files are refused (anyone who
/// can write one can add a key); a world-readable one starts with a warning.
#[tokio::test]
async fn secret_file_mode_is_checked() {
    let secret = "a-good-secret-0123456789abcdef\n";
    for (file, mode, code, needle) in [
        ("secret", 0o666, 64, "writable"),
        ("secret", 0o620, 64, "writable"),
        ("basic", 0o602, 64, "writable"),
        ("secret", 0o644, 0, "WARNING"),
        ("basic", 0o604, 0, "WARNING"),
    ] {
        let dir = tempfile::tempdir().expect("tempdir");
        let (secret_mode, basic_mode) = if file == "secret" {
            (mode, 0o600)
        } else {
            (0o600, mode)
        };
        let extra = vec![
            "--secret-file".to_string(),
            write(dir.path(), "secret", secret, secret_mode),
            "--basic-auth-file".to_string(),
            write(dir.path(), "basic", "ocrolus:first-password\n", basic_mode),
        ];
        let (got, out, err) = check_config(dir.path(), extra).await;
        assert_eq!(got, code, "{file} {mode:o}: stdout:\n{out}\nstderr:\n{err}");
        let shown = if code == 0 { &out } else { &err };
        assert!(shown.contains(needle), "{file} {mode:o}: {shown}");
    }
    // Owner-only: no warning, and the comment rule is spelt out.
    let dir = tempfile::tempdir().expect("tempdir");
    let extra = vec![
        "--secret-file".to_string(),
        write(dir.path(), "secret", secret, 0o600),
    ];
    let (code, out, err) = check_config(dir.path(), extra).await;
    assert_eq!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
    assert!(!out.contains("WARNING"), "{out}");
    assert!(
        out.contains("comment only if '#' is followed by a space"),
        "check-config states the comment rule: {out}"
    );
}
