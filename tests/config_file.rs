//! `--config relay.yaml` through the binary: the file supplies every `serve`
//! setting, flags and environment override it, mistakes name their line,
//! and a relay started from a file alone publishes what it answers 200 for.

mod common;

use std::io::BufRead;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use bytes::Bytes;
use common::{SECRET, TestBroker};

const BIN: &str = env!("CARGO_BIN_EXE_ocrolus-relay");

/// A directory with an allowlist, a secret file and `relay.yaml` made of
/// `yaml` plus the paths of those files.
fn config_dir(yaml: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    std::fs::write(p.join("allowlist.yaml"), "allow: [127.0.0.1/32]\n").unwrap();
    std::fs::write(p.join("secrets"), format!("{SECRET}\n")).unwrap();
    std::fs::write(
        p.join("relay.yaml"),
        format!(
            "allowlist: {dir}/allowlist.yaml\nsecret_file: {dir}/secrets\nspool_dir: {dir}/spool\n{yaml}",
            dir = p.display()
        ),
    )
    .unwrap();
    dir
}

fn check_config(dir: &Path, extra: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let mut cmd = std::process::Command::new(BIN);
    cmd.arg("check-config")
        .arg("--config")
        .arg(dir.join("relay.yaml"))
        .args(extra);
    for var in [
        "RELAY_LISTEN",
        "RELAY_ADMIN_LISTEN",
        "RELAY_CONFIG",
        "RELAY_PLAINTEXT",
    ] {
        cmd.env_remove(var);
    }
    cmd.envs(env.iter().copied());
    let out = cmd.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn check_config_reads_the_file_and_flags_and_env_override_it() {
    let dir = config_dir(
        "plaintext: true\nlisten: 127.0.0.1:18443\nadmin_listen: 127.0.0.1:19090\nconfirm_timeout: 3\n",
    );
    let (code, out, err) = check_config(dir.path(), &[], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("listen:            127.0.0.1:18443 (plaintext)"),
        "{out}"
    );
    assert!(out.contains("admin listen:      127.0.0.1:19090"), "{out}");
    assert!(out.contains("confirm timeout:   3s"), "{out}");
    assert!(out.contains("HMAC secrets:      1"), "{out}");
    assert!(out.contains("config file:"), "{out}");
    assert!(!out.contains(SECRET));

    let (code, out, _) = check_config(dir.path(), &["--admin-listen", "127.0.0.1:29090"], &[]);
    assert_eq!(code, 0);
    assert!(
        out.contains("admin listen:      127.0.0.1:29090"),
        "flag wins: {out}"
    );

    let (code, out, _) = check_config(dir.path(), &[], &[("RELAY_LISTEN", "127.0.0.1:28443")]);
    assert_eq!(code, 0);
    assert!(
        out.contains("listen:            127.0.0.1:28443"),
        "env wins: {out}"
    );
}

#[test]
fn config_file_mistakes_name_their_line_and_exit_64() {
    let dir = config_dir("plaintext: true\nlisten_adress: 127.0.0.1:1\n");
    let (code, _, err) = check_config(dir.path(), &[], &[]);
    assert_eq!(code, 64, "{err}");
    assert!(
        err.contains("line 5") && err.contains("listen_adress"),
        "{err}"
    );

    let dir = config_dir("plaintext: true\nrate_limit_per_ip: lots\n");
    let (code, _, err) = check_config(dir.path(), &[], &[]);
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("line 5: `rate_limit_per_ip`"), "{err}");

    let dir = config_dir("listen: [\"127.0.0.1:1\", \"127.0.0.1:2\"]\n");
    let (code, _, err) = check_config(dir.path(), &[], &[]);
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("line 4: `listen` takes one value"), "{err}");

    // The file's own checks still run: TLS or an explicit plaintext.
    let dir = config_dir("listen: 127.0.0.1:18443\n");
    let (code, _, err) = check_config(dir.path(), &[], &[]);
    assert_eq!(code, 64);
    assert!(err.contains("--plaintext"), "{err}");
}

/// Reads the child's JSON log (to the end, so it never writes to a closed
/// pipe) and returns the public and admin addresses from the "serving" line.
async fn serving_addresses(child: &mut tokio::process::Child) -> (String, String) {
    let stderr = child.stderr.take().unwrap().into_owned_fd().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let mut tx = Some(tx);
        for line in std::io::BufReader::new(std::fs::File::from(stderr)).lines() {
            let Ok(line) = line else { return };
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line)
                && v["message"] == "ocrolus-relay serving"
                && let Some(tx) = tx.take()
            {
                let _ = tx.send((
                    v["listen"].as_str().unwrap_or_default().to_owned(),
                    v["admin"].as_str().unwrap_or_default().to_owned(),
                ));
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(60), rx)
        .await
        .expect("the relay started in time")
        .expect("the relay started from its config file")
}

/// The relay declares its exchange once connected; binds a queue then.
async fn bind_when_declared(broker: &TestBroker, exchange: &str) -> String {
    for _ in 0..200 {
        let channel = broker.connection.create_channel().await.unwrap();
        let exists = channel
            .exchange_declare(
                exchange.into(),
                lapin::ExchangeKind::Topic,
                lapin::options::ExchangeDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                lapin::types::FieldTable::default(),
            )
            .await
            .is_ok();
        if exists {
            return broker.bind_queue(exchange, "#").await;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the relay never declared {exchange}");
}

#[tokio::test]
async fn serve_from_a_config_file_publishes_what_it_accepts() {
    let exchange = common::unique("test.config");
    let dir = config_dir(&format!(
        "plaintext: true\nlisten: 127.0.0.1:0\nadmin_listen: 127.0.0.1:0\nexchange: {exchange}\nalternate_exchange: {exchange}.unrouted\nlog_format: json\n"
    ));
    let mut child = tokio::process::Command::new(BIN)
        .arg("serve")
        .arg("--config")
        .arg(dir.path().join("relay.yaml"))
        .env("RUST_LOG", "info,lapin=warn,amq_protocol=warn")
        .env_remove("RELAY_CONFIG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let (listen, _) = serving_addresses(&mut child).await;
    let broker = TestBroker::connect().await;
    let url = format!("http://{listen}/webhooks/ocrolus");
    let body = br#"{"event_name":"book.verified","book_uuid":"b"}"#;
    let queue = bind_when_declared(&broker, &exchange).await;
    let id = common::new_id();
    let headers = common::signed_headers(SECRET, &id, common::now_secs(), body);
    let (status, _, _) = common::request("POST", &url, &headers, Bytes::from_static(body)).await;
    assert_eq!(status, 200);
    let messages = broker.drain(&queue, 1, Duration::from_secs(10)).await;
    assert_eq!(messages.len(), 1);
    assert_eq!(messages[0].delivery.data, body);
    let _ = child.kill().await;
    broker.delete_queue(&queue).await;
    broker.delete_exchange(&exchange).await;
    broker
        .delete_exchange(&format!("{exchange}.unrouted"))
        .await;
    broker.delete_queue(&format!("{exchange}.unrouted")).await;
}

const PRODUCTION_SECRET: &str = "production-secret-0123456789abcdef";
const SANDBOX_SECRET: &str = "sandbox-secret-0123456789abcdef";
const SANDBOX_NEXT: &str = "sandbox-next-secret-9876543210fedcba";

fn write_secret_file(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
}

/// A config with two sources; the sandbox routes under `sandbox.`.
fn two_sources(exchange: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    std::fs::write(p.join("allowlist.yaml"), "allow: [127.0.0.1/32]\n").unwrap();
    write_secret_file(
        &p.join("production.secrets"),
        &format!("{PRODUCTION_SECRET}\n"),
    );
    write_secret_file(&p.join("sandbox.secrets"), &format!("{SANDBOX_SECRET}\n"));
    std::fs::write(
        p.join("relay.yaml"),
        format!(
            "plaintext: true
listen: 127.0.0.1:0
admin_listen: 127.0.0.1:0
allowlist: {dir}/allowlist.yaml
spool_dir: {dir}/spool
exchange: {exchange}
alternate_exchange: {exchange}.unrouted
log_format: json
sources:
  - name: production
    path: /webhooks/ocrolus
    secret_file: {dir}/production.secrets
  - name: sandbox
    path: /webhooks/ocrolus-sandbox
    secret_file: {dir}/sandbox.secrets
    routing_key_prefix: sandbox
",
            dir = p.display()
        ),
    )
    .unwrap();
    dir
}

async fn post(base: &str, path: &str, secret: &str, body: &'static [u8]) -> u16 {
    let id = common::new_id();
    let headers = common::signed_headers(secret, &id, common::now_secs(), body);
    common::request(
        "POST",
        &format!("{base}{path}"),
        &headers,
        Bytes::from_static(body),
    )
    .await
    .0
}

async fn fingerprints(admin: &str, source: &str) -> Vec<String> {
    let (status, _, body) = common::get(&format!("http://{admin}/secrets")).await;
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    v["sources"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == source)
        .map(|s| {
            s["fingerprints"]
                .as_array()
                .unwrap()
                .iter()
                .map(|f| f.as_str().unwrap().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Waits (bounded) until the relay reports `count` secrets for `source`.
async fn wait_for_secrets(admin: &str, source: &str, count: usize) {
    for _ in 0..500 {
        if fingerprints(admin, source).await.len() == count {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("source {source} never reported {count} secrets");
}

async fn wait_broker_up(admin: &str) {
    for _ in 0..200 {
        let (_, _, metrics) = common::get(&format!("http://{admin}/metrics")).await;
        let metrics = String::from_utf8_lossy(&metrics).into_owned();
        if common::metric_value(&metrics, "ocrolus_relay_broker_up") == 1.0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the relay never connected to the broker");
}

fn sighup(child: &tokio::process::Child) {
    let status = std::process::Command::new("kill")
        .args(["-HUP", &child.id().unwrap().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

#[tokio::test]
async fn two_sources_keep_their_paths_secrets_and_routing_apart() {
    let exchange = common::unique("test.sources");
    let dir = two_sources(&exchange);

    let (code, out, err) = check_config(dir.path(), &[], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("source production   /webhooks/ocrolus (1 HMAC secrets, 0 Basic credentials)"),
        "{out}"
    );
    assert!(
        out.contains("source sandbox      /webhooks/ocrolus-sandbox (1 HMAC secrets, 0 Basic credentials, routing keys sandbox.*)"),
        "{out}"
    );
    assert!(!out.contains(PRODUCTION_SECRET) && !out.contains(SANDBOX_SECRET));

    let mut child = tokio::process::Command::new(BIN)
        .arg("serve")
        .arg("--config")
        .arg(dir.path().join("relay.yaml"))
        .env("RUST_LOG", "info,lapin=warn,amq_protocol=warn")
        .env_remove("RELAY_CONFIG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let (listen, admin) = serving_addresses(&mut child).await;
    let base = format!("http://{listen}");
    let broker = TestBroker::connect().await;
    let queue = bind_when_declared(&broker, &exchange).await;
    // The exchange exists a moment before the link is in use; a delivery
    // in between is spooled, not published, and the counts below differ.
    wait_broker_up(&admin).await;
    let body: &'static [u8] = br#"{"event_name":"book.verified","book_uuid":"b"}"#;

    assert_eq!(
        post(&base, "/webhooks/ocrolus", PRODUCTION_SECRET, body).await,
        200
    );
    assert_eq!(
        post(&base, "/webhooks/ocrolus-sandbox", SANDBOX_SECRET, body).await,
        200
    );
    // Signed for one source, sent to the other: 401 both ways.
    assert_eq!(
        post(&base, "/webhooks/ocrolus", SANDBOX_SECRET, body).await,
        401
    );
    assert_eq!(
        post(&base, "/webhooks/ocrolus-sandbox", PRODUCTION_SECRET, body).await,
        401
    );
    let messages = broker.drain(&queue, 2, Duration::from_secs(10)).await;
    let mut keys: Vec<String> = messages
        .iter()
        .map(|m| m.delivery.routing_key.to_string())
        .collect();
    keys.sort();
    assert_eq!(keys, ["book.verified", "sandbox.book.verified"]);

    // SIGHUP rotates the sandbox's secrets; production is untouched.
    let sandbox_file = dir.path().join("sandbox.secrets");
    write_secret_file(
        &sandbox_file,
        &format!("{SANDBOX_NEXT}\n{SANDBOX_SECRET}\n"),
    );
    sighup(&child);
    wait_for_secrets(&admin, "sandbox", 2).await;
    assert_eq!(
        post(&base, "/webhooks/ocrolus-sandbox", SANDBOX_NEXT, body).await,
        200
    );
    assert_eq!(
        post(&base, "/webhooks/ocrolus-sandbox", SANDBOX_SECRET, body).await,
        200
    );
    write_secret_file(&sandbox_file, &format!("{SANDBOX_NEXT}\n"));
    sighup(&child);
    wait_for_secrets(&admin, "sandbox", 1).await;
    assert_eq!(
        post(&base, "/webhooks/ocrolus-sandbox", SANDBOX_SECRET, body).await,
        401
    );
    assert_eq!(
        post(&base, "/webhooks/ocrolus-sandbox", SANDBOX_NEXT, body).await,
        200
    );
    assert_eq!(
        post(&base, "/webhooks/ocrolus", PRODUCTION_SECRET, body).await,
        200
    );
    assert_eq!(fingerprints(&admin, "production").await.len(), 1);
    let later = broker.drain(&queue, 4, Duration::from_secs(10)).await;
    assert_eq!(later.len(), 4, "every 200 is a message");
    let (_, _, metrics) = common::get(&format!("http://{admin}/metrics")).await;
    let metrics = String::from_utf8_lossy(&metrics).into_owned();
    let count = |outcome: &str, source: &str| {
        common::metric_value(
            &metrics,
            &format!(r#"ocrolus_relay_requests_total{{outcome="{outcome}",source="{source}"}}"#),
        )
    };
    assert_eq!(
        (
            count("published", "production"),
            count("published", "sandbox")
        ),
        (2.0, 4.0),
        "{metrics}"
    );
    // The two cross-source deliveries and the retired secret: 401 each,
    // counted under the source whose path they came to.
    assert_eq!(
        (
            count("unauthorized", "production"),
            count("unauthorized", "sandbox")
        ),
        (1.0, 2.0),
        "{metrics}"
    );

    let _ = child.kill().await;
    broker.delete_queue(&queue).await;
    broker.delete_exchange(&exchange).await;
    broker
        .delete_exchange(&format!("{exchange}.unrouted"))
        .await;
    broker.delete_queue(&format!("{exchange}.unrouted")).await;
}

#[test]
fn sources_must_have_distinct_paths_and_names_and_their_own_files() {
    let dir = two_sources("test.unused");
    let path = dir.path().join("relay.yaml");
    let yaml = std::fs::read_to_string(&path).unwrap();
    std::fs::write(
        &path,
        yaml.replace("/webhooks/ocrolus-sandbox", "/webhooks/ocrolus"),
    )
    .unwrap();
    let (code, _, err) = check_config(dir.path(), &[], &[]);
    assert_eq!(code, 64);
    assert!(
        err.contains("line 14") && err.contains("already the path of source production"),
        "{err}"
    );

    std::fs::write(&path, yaml.replace("name: sandbox", "name: production")).unwrap();
    let (code, _, err) = check_config(dir.path(), &[], &[]);
    assert_eq!(code, 64);
    assert!(err.contains("used twice"), "{err}");

    let (code, _, err) = check_config(dir.path(), &["--secret-file", "/x"], &[]);
    assert_eq!(code, 64);
    assert!(err.contains("with `sources:`"), "{err}");

    std::fs::write(&path, format!("{yaml}    exchange: not a name\n")).unwrap();
    let (code, _, err) = check_config(dir.path(), &[], &[]);
    assert_eq!(code, 64);
    assert!(
        err.contains("line 17: source sandbox: exchange") && err.contains("not a valid exchange"),
        "{err}"
    );

    std::fs::write(&path, format!("{yaml}    exchange: test.unused.unrouted\n")).unwrap();
    let (code, _, err) = check_config(dir.path(), &[], &[]);
    assert_eq!(code, 64);
    assert!(
        err.contains("source sandbox: exchange test.unused.unrouted is the alternate"),
        "{err}"
    );

    std::fs::write(&path, format!("{yaml}    exchange: sandbox.events\n")).unwrap();
    let (code, out, err) = check_config(dir.path(), &[], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("routing keys sandbox.*, exchange sandbox.events)"),
        "{out}"
    );
}

/// Log lines of `relay` at `level` whose message starts with `start`,
/// waiting up to 10 s for at least `count` of them.
async fn log_lines(
    relay: &common::RelayBinary,
    level: &str,
    start: &str,
    count: usize,
) -> Vec<serde_json::Value> {
    let mut found = Vec::new();
    for _ in 0..200 {
        found = relay
            .logs
            .lock()
            .unwrap()
            .iter()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|l| {
                l["level"] == level && l["message"].as_str().is_some_and(|m| m.starts_with(start))
            })
            .collect();
        if found.len() >= count {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    found
}

/// SIGHUP re-reads the config file: settings changed in it are named in one
/// warning (they need a restart); an invalid file fails the reload, and the
/// next good one clears `config_last_reload_successful` again.
#[tokio::test]
async fn sighup_names_the_changed_settings_that_need_a_restart() {
    let dir = config_dir("max_in_flight: 100\nrate_limit_global: 2000\n");
    let config = dir.path().join("relay.yaml");
    let exchange = common::unique("test.reload");
    let args: Vec<String> = [
        "--config",
        &config.display().to_string(),
        "--plaintext",
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
        "--exchange",
        &exchange,
        "--no-declare",
    ]
    .iter()
    .map(ToString::to_string)
    .collect();
    let relay = common::RelayBinary::start(&args).await;
    let rewrite = |yaml: &str| {
        std::fs::write(
            &config,
            format!(
                "allowlist: {dir}/allowlist.yaml\nsecret_file: {dir}/secrets\nspool_dir: {dir}/spool\n{yaml}",
                dir = dir.path().display()
            ),
        )
        .unwrap();
    };
    let hup = || {
        let status = std::process::Command::new("kill")
            .args(["-HUP", &relay.pid().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    };

    rewrite("max_in_flight: 200\nlog_format: text\n");
    hup();
    let warnings = log_lines(&relay, "WARN", "changed in the config file", 1).await;
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert_eq!(
        warnings[0]["keys"], "log_format, max_in_flight, rate_limit_global",
        "{}",
        warnings[0]
    );
    assert_eq!(
        relay
            .metric("ocrolus_relay_config_last_reload_successful")
            .await,
        Some(1.0)
    );

    rewrite("max_in_flight: many\n");
    hup();
    let errors = log_lines(&relay, "ERROR", "reload rejected", 1).await;
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(
        errors[0]["error"]
            .as_str()
            .is_some_and(|e| e.contains("`max_in_flight`")),
        "{}",
        errors[0]
    );
    assert_eq!(
        relay
            .metric("ocrolus_relay_config_last_reload_successful")
            .await,
        Some(0.0)
    );

    rewrite("max_in_flight: 100\nrate_limit_global: 2000\n");
    hup();
    assert_eq!(
        log_lines(&relay, "INFO", "configuration reloaded", 2)
            .await
            .len(),
        2
    );
    assert_eq!(
        relay
            .metric("ocrolus_relay_config_last_reload_successful")
            .await,
        Some(1.0)
    );
    assert_eq!(
        log_lines(&relay, "WARN", "changed in the config file", 1)
            .await
            .len(),
        1,
        "the file as at start needs no restart"
    );
}
