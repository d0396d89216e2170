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
/// pipe) and returns the public address from the "serving" line.
async fn serving_address(child: &mut tokio::process::Child) -> String {
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
                let _ = tx.send(v["listen"].as_str().unwrap_or_default().to_owned());
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(60), rx)
        .await
        .expect("the relay started in time")
        .expect("the relay started from its config file")
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
    let listen = serving_address(&mut child).await;
    let broker = TestBroker::connect().await;
    // The relay declares the exchange once connected; bind when it exists.
    let url = format!("http://{listen}/webhooks/ocrolus");
    let body = br#"{"event_name":"book.verified","book_uuid":"b"}"#;
    let mut queue = None;
    for _ in 0..200 {
        let channel = broker.connection.create_channel().await.unwrap();
        let exists = channel
            .exchange_declare(
                exchange.as_str().into(),
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
            queue = Some(broker.bind_queue(&exchange, "#").await);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let queue = queue.expect("the relay declared its exchange");
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
