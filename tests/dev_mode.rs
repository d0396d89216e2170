//! `serve --dev` on moved ports: the commands its banner prints work as
//! printed (the quick start on the default ports is scripts/quickstart-test.sh).

mod common;

use std::time::Duration;

use common::*;

fn binary() -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_ocrolus-relay"));
    // The environment twins of the flags must not leak in from the test runner.
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("RELAY_") {
            cmd.env_remove(key);
        }
    }
    cmd.env("RUST_LOG", "warn");
    cmd
}

/// The words after `prefix` on the first banner line that holds it.
fn banner_words(lines: &[String], prefix: &str) -> Vec<String> {
    let line = lines
        .iter()
        .find_map(|l| l.split_once(prefix).map(|(_, rest)| rest.to_owned()))
        .unwrap_or_else(|| panic!("no {prefix:?} in the banner: {lines:?}"));
    line.split_whitespace().map(str::to_owned).collect()
}

#[tokio::test]
async fn dev_banner_commands_work_on_moved_ports() {
    require_broker!();
    let dir = tempfile::tempdir().expect("tempdir");
    let exchange = unique("test.dev");
    let spool = dir.path().join("spool");
    let mut relay = spawn_lines(binary().args([
        "serve",
        "--dev",
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
        "--exchange",
        &exchange,
        "--alternate-exchange",
        "",
        "--dead-letter-exchange",
        "",
        "--spool-dir",
        &spool.display().to_string(),
    ]));
    assert!(
        relay.stderr_until("curl -s", Duration::from_secs(30)).await,
        "no banner: {:?}",
        relay.stderr_seen
    );
    let send_test = banner_words(&relay.stderr_seen, "try: cargo run -- ");
    let admin = banner_words(&relay.stderr_seen, "curl -s ")[0].replace("/metrics", "");
    assert!(
        send_test
            .windows(2)
            .any(|w| w[0] == "--listen" && w[1] != "127.0.0.1:0" && w[1] != "127.0.0.1:8080"),
        "send-test is told the bound port: {send_test:?}"
    );
    assert_ne!(admin, "127.0.0.1:9090");

    let metrics_url = format!("http://{admin}/metrics");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let metrics = String::from_utf8_lossy(&get(&metrics_url).await.2).into_owned();
        if metric_value(&metrics, "ocrolus_relay_broker_up") >= 1.0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "relay never reached the broker"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let broker = TestBroker::connect().await;
    let queue = broker.bind_queue(&exchange, "#").await;

    let output = binary()
        .args(&send_test)
        .output()
        .await
        .expect("run send-test");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{send_test:?}: {stdout} {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains(r#""status":"published""#), "{stdout}");
    let sent = stdout
        .lines()
        .find_map(|l| l.strip_prefix("body: "))
        .expect("send-test prints the body");

    let got = broker.drain(&queue, 1, Duration::from_secs(10)).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].delivery.data, sent.as_bytes());
    assert_eq!(got[0].delivery.routing_key.as_str(), "book.verified");
    let metrics = String::from_utf8_lossy(&get(&metrics_url).await.2).into_owned();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("ocrolus_relay_requests_total{")
                && l.contains(r#"outcome="published""#)
                && l.ends_with(" 1")),
        "{metrics}"
    );

    let _ = relay.child.kill().await;
    broker.delete_queue(&queue).await;
    broker.delete_exchange(&exchange).await;
}
