//! What operators see. Metrics move by exactly what happened and
//! never carry client addresses or delivery ids; the dashboard and alert
//! rules only name metrics the relay exports; the admin endpoints answer;
//! `tail` prints what consumers receive; `check-config` accepts a good
//! configuration and refuses bad ones with exit 64.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use common::*;

const RELAXED_LIMITS: [&str; 8] = [
    // Sequential requests from one address must never meet the rate limiter.
    "--rate-limit-per-ip",
    "100000",
    "--rate-limit-global",
    "100000",
    "--rate-limit-burst",
    "1000",
    "--max-body",
    "4096",
];

fn relaxed() -> Vec<String> {
    RELAXED_LIMITS
        .iter()
        .map(std::string::ToString::to_string)
        .collect()
}

/// `name{labels}` → value, for every sample line of a scrape.
fn samples(text: &str) -> Vec<(String, f64)> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.to_owned(), value.parse().ok()?))
        })
        .collect()
}

/// Sum of every sample of metric `name` (all label sets).
fn total(text: &str, name: &str) -> f64 {
    samples(text)
        .iter()
        .filter(|(series, _)| series == name || series.starts_with(&format!("{name}{{")))
        .map(|(_, v)| v)
        .sum()
}

/// The metric names a scrape declares in its `# TYPE` lines, with their types.
fn exported(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| {
            let (name, kind) = l.split_once(' ')?;
            Some((name.to_owned(), kind.trim().to_owned()))
        })
        .collect()
}

#[tokio::test]
async fn process_metrics_are_exported_and_tls_expiry_only_with_tls() {
    require_broker!();
    let relay = TestRelay::start(RelayOptions::default()).await;
    let scrape = relay.metrics().await;
    for name in [
        "process_resident_memory_bytes",
        "process_open_fds",
        "process_max_fds",
        "process_start_time_seconds",
    ] {
        assert!(
            metric_value(&scrape, name) > 0.0,
            "{name} missing or 0 in:\n{scrape}"
        );
    }
    assert!(
        scrape.contains("\nprocess_cpu_seconds_total "),
        "process_cpu_seconds_total missing"
    );
    // A plaintext relay serves no certificate: no expiry series, not a 0
    // that reads as "expired in 1970".
    assert!(
        !scrape.contains("tls_cert_expiry_timestamp_seconds"),
        "plaintext relay exports a certificate expiry:\n{scrape}"
    );
    let broker = TestBroker::connect().await;
    relay.finish(&broker, &[]).await;
}

/// A relay whose rate limits sequential test requests never meet.
async fn relaxed_relay() -> TestRelay {
    TestRelay::start(RelayOptions {
        extra: relaxed(),
        ..RelayOptions::default()
    })
    .await
}

const VERIFIED: &[u8] = br#"{"event_name":"book.verified","book_uuid":"b-1"}"#;
const UNKNOWN: &[u8] = br#"{"event_name":"book.not_yet_invented"}"#;

/// One request of each kind: three published (two `book.verified`, one
/// event nobody has named yet), a duplicate, and one each answered 401,
/// 400, 404, 405 and 413. Returns every delivery id sent.
async fn mixed_traffic(relay: &TestRelay) -> Vec<String> {
    let (id1, id2, id3) = (new_id(), new_id(), new_id());
    for (id, body) in [(&id1, VERIFIED), (&id2, VERIFIED), (&id3, UNKNOWN)] {
        let (status, _, answer) = post_signed(relay, id, body).await;
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&answer));
    }
    let (status, _, answer) = post_signed(relay, &id1, VERIFIED).await;
    assert_eq!(status, 200);
    assert!(String::from_utf8_lossy(&answer).contains("duplicate"));

    let bad_id = new_id();
    let headers = signed_headers(
        "not-the-configured-secret-000",
        &bad_id,
        now_secs(),
        VERIFIED,
    );
    let (status, _, _) = request("POST", &relay.url, &headers, Bytes::from_static(VERIFIED)).await;
    assert_eq!(status, 401);

    let json_id = new_id();
    let (status, _, _) = post_signed(relay, &json_id, b"{not json").await;
    assert_eq!(status, 400);

    let other_url = relay.url.replace("/webhooks/ocrolus", "/webhooks/other");
    let nf_id = new_id();
    let headers = signed_headers(SECRET, &nf_id, now_secs(), VERIFIED);
    let (status, _, _) = request("POST", &other_url, &headers, Bytes::from_static(VERIFIED)).await;
    assert_eq!(status, 404);

    let (status, _, _) = get(&relay.url).await;
    assert_eq!(status, 405);

    // Declared Content-Length over --max-body.
    let big = vec![b' '; 5000];
    let big_id = new_id();
    let headers = signed_headers(SECRET, &big_id, now_secs(), &big);
    let (status, _, _) = request("POST", &relay.url, &headers, Bytes::from(big)).await;
    assert_eq!(status, 413);

    vec![id1, id2, id3, bad_id, json_id, nf_id, big_id]
}

/// Two scrapes around something that happened.
struct Scrapes {
    before: String,
    after: String,
}

impl Scrapes {
    async fn around<F: Future>(relay: &TestRelay, happen: F) -> (Self, F::Output) {
        let before = relay.metrics().await;
        let output = happen.await;
        let after = relay.metrics().await;
        (Self { before, after }, output)
    }

    fn delta(&self, series: &str) -> f64 {
        metric_value(&self.after, series) - metric_value(&self.before, series)
    }

    /// How much all series of metric `name` together moved.
    fn total_delta(&self, name: &str) -> f64 {
        total(&self.after, name) - total(&self.before, name)
    }
}

/// No client address or delivery id ever becomes a label value.
fn assert_no_identifying_labels(scrape: &str, ids: &[String]) {
    for (series, _) in samples(scrape) {
        let Some((name, labels)) = series.split_once('{') else {
            continue;
        };
        // The one address label: a configured broker node (`--amqp-url`),
        // which here is on 127.0.0.1 too, never a client's.
        if name == "ocrolus_relay_broker_node_connected" {
            continue;
        }
        assert!(
            !labels.contains("127.0.0.1"),
            "client IP in a label: {series}"
        );
        for id in ids {
            assert!(
                !labels.contains(id.as_str()),
                "delivery id in a label: {series}"
            );
        }
    }
}

#[tokio::test]
async fn each_request_counts_once_under_its_outcome() {
    require_broker!();
    let relay = relaxed_relay().await;
    let broker = TestBroker::connect().await;
    let (scrapes, _) = Scrapes::around(&relay, mixed_traffic(&relay)).await;

    let outcomes = [
        ("published", 3.0),
        ("duplicate", 1.0),
        ("unauthorized", 1.0),
        ("bad_request", 1.0),
        ("not_found", 1.0),
        ("method_not_allowed", 1.0),
        ("payload_too_large", 1.0),
        ("forbidden", 0.0),
        ("spooled", 0.0),
        ("rate_limited", 0.0),
        ("unavailable", 0.0),
    ];
    for (outcome, n) in outcomes {
        // Refused before routing: no source; every other one: its source.
        let source = if matches!(outcome, "forbidden" | "not_found") {
            ""
        } else {
            "default"
        };
        let series =
            format!(r#"ocrolus_relay_requests_total{{outcome="{outcome}",source="{source}"}}"#);
        assert_eq!(scrapes.delta(&series), n, "{series}\n{}", scrapes.after);
        let count =
            format!(r#"ocrolus_relay_request_duration_seconds_count{{outcome="{outcome}"}}"#);
        assert_eq!(scrapes.delta(&count), n, "{count}");
    }
    let requests = 9.0;
    assert_eq!(
        scrapes.total_delta("ocrolus_relay_requests_total"),
        requests,
        "no other outcome moved"
    );
    assert_eq!(
        scrapes.total_delta("ocrolus_relay_request_duration_seconds_count"),
        requests,
        "one latency observation per request"
    );
    relay.finish(&broker, &[]).await;
}

#[tokio::test]
async fn each_rejection_counts_once_under_its_reason() {
    require_broker!();
    let relay = relaxed_relay().await;
    let broker = TestBroker::connect().await;
    let (scrapes, _) = Scrapes::around(&relay, mixed_traffic(&relay)).await;

    let reasons = [
        ("bad_signature", 1.0),
        ("invalid_json", 1.0),
        ("not_found", 1.0),
        ("method_not_allowed", 1.0),
        ("declared_too_large", 1.0),
        ("not_allowlisted", 0.0),
    ];
    for (reason, n) in reasons {
        let series = format!(r#"ocrolus_relay_rejections_total{{reason="{reason}"}}"#);
        assert_eq!(scrapes.delta(&series), n, "{series}");
    }
    assert_eq!(
        scrapes.total_delta("ocrolus_relay_rejections_total"),
        5.0,
        "published and duplicate are not rejections"
    );
    relay.finish(&broker, &[]).await;
}

#[tokio::test]
async fn published_events_count_by_known_name_or_other() {
    require_broker!();
    let relay = relaxed_relay().await;
    let (broker, queue) = relay.watch_all().await;
    let (scrapes, _) = Scrapes::around(&relay, mixed_traffic(&relay)).await;

    assert_eq!(
        scrapes.delta(
            r#"ocrolus_relay_events_published_total{event="book.verified",source="default"}"#
        ),
        2.0
    );
    assert_eq!(
        scrapes.delta(r#"ocrolus_relay_events_published_total{event="other",source="default"}"#),
        1.0
    );
    assert!(
        !scrapes.after.contains("book.not_yet_invented"),
        "unknown event names never become labels"
    );
    assert_eq!(
        scrapes.delta("ocrolus_relay_publish_confirm_duration_seconds_count"),
        3.0
    );
    let got = broker.drain(&queue, 3, Duration::from_secs(10)).await;
    assert_eq!(
        got.len(),
        3,
        "exactly the three published events reached the queue"
    );
    relay.finish(&broker, &[&queue]).await;
}

#[tokio::test]
async fn a_client_outside_the_allowlist_counts_as_forbidden_not_allowlisted() {
    require_broker!();
    // A client outside the allowlist behind the trusted proxy 127.0.0.1
    // (a peer that is neither is closed at accept, before any request).
    let relay = TestRelay::start(RelayOptions {
        allow: vec!["10.0.0.0/8".into()],
        trusted_proxies: vec!["127.0.0.1/32".into()],
        extra: relaxed(),
        ..RelayOptions::default()
    })
    .await;
    let broker = TestBroker::connect().await;
    let id = new_id();
    let (scrapes, status) = Scrapes::around(&relay, async {
        let mut headers = signed_headers(SECRET, &id, now_secs(), VERIFIED);
        headers.push(("x-forwarded-for".into(), "192.0.2.1".into()));
        let (status, _, _) =
            request("POST", &relay.url, &headers, Bytes::from_static(VERIFIED)).await;
        status
    })
    .await;
    assert_eq!(status, 403);
    assert_eq!(
        scrapes.delta(r#"ocrolus_relay_requests_total{outcome="forbidden",source=""}"#),
        1.0
    );
    assert_eq!(
        scrapes.delta(r#"ocrolus_relay_rejections_total{reason="not_allowlisted"}"#),
        1.0
    );
    assert_eq!(scrapes.total_delta("ocrolus_relay_requests_total"), 1.0);
    assert_no_identifying_labels(&scrapes.after, &[id]);
    relay.finish(&broker, &[]).await;
}

#[tokio::test]
async fn labels_never_carry_client_addresses_or_delivery_ids() {
    require_broker!();
    let relay = relaxed_relay().await;
    let broker = TestBroker::connect().await;
    let (scrapes, ids) = Scrapes::around(&relay, mixed_traffic(&relay)).await;
    assert_no_identifying_labels(&scrapes.after, &ids);
    relay.finish(&broker, &[]).await;
}

#[tokio::test]
async fn a_healthy_relay_reports_broker_up_ready_and_its_version() {
    require_broker!();
    let relay = relaxed_relay().await;
    let broker = TestBroker::connect().await;
    let scrape = relay.metrics().await;
    assert_eq!(metric_value(&scrape, "ocrolus_relay_broker_up"), 1.0);
    assert_eq!(metric_value(&scrape, "ocrolus_relay_ready"), 1.0);
    let version = env!("CARGO_PKG_VERSION");
    assert_eq!(
        metric_value(
            &scrape,
            &format!(
                r#"ocrolus_relay_build_info{{commit="{}",version="{version}"}}"#,
                env!("RELAY_GIT_COMMIT")
            )
        ),
        1.0
    );
    relay.finish(&broker, &[]).await;
}

#[tokio::test]
async fn admin_endpoints_answer_on_the_admin_port_only() {
    require_broker!();
    let relay = relaxed_relay().await;
    let broker = TestBroker::connect().await;
    let (status, _, body) = get(&format!("http://{}/livez", relay.admin)).await;
    assert_eq!(status, 200);
    assert!(!body.is_empty());
    let (status, headers, body) = get(&format!("http://{}/readyz", relay.admin)).await;
    assert_eq!(status, 200);
    assert_eq!(
        headers.get("content-type").map(http::HeaderValue::as_bytes),
        Some(&b"application/json"[..])
    );
    let ready: serde_json::Value = serde_json::from_slice(&body).expect("readyz JSON");
    assert_eq!(ready["status"], "ready");
    let (status, _, _) = get(&format!("http://{}/no-such-admin-path", relay.admin)).await;
    assert_eq!(status, 404);
    // Nothing of the admin listener is served on the public port.
    let (status, _, _) = get(&format!("http://{}/metrics", relay.addr)).await;
    assert_eq!(status, 404);
    relay.finish(&broker, &[]).await;
}

/// Metric names in a PromQL expression.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    while let Some((pos, prefix)) = ["ocrolus_relay_", "process_"]
        .iter()
        .filter_map(|p| expr[i..].find(p).map(|pos| (pos, *p)))
        .min()
    {
        let start = i + pos;
        let boundary = start == 0 || {
            let b = bytes[start - 1];
            !(b.is_ascii_alphanumeric() || b == b'_')
        };
        let mut end = start + prefix.len();
        while end < bytes.len()
            && (bytes[end].is_ascii_lowercase()
                || bytes[end].is_ascii_digit()
                || bytes[end] == b'_')
        {
            end += 1;
        }
        if boundary {
            names.insert(expr[start..end].to_owned());
        }
        i = end;
    }
    names
}

/// Every panel target `expr`, recursively through rows' panels.
fn dashboard_exprs(panels: &serde_json::Value, title: &str, out: &mut Vec<(String, String)>) {
    for panel in panels.as_array().into_iter().flatten() {
        let where_ = format!(
            "{title} / {}",
            panel
                .get("title")
                .and_then(|t| t.as_str())
                .unwrap_or("(untitled)")
        );
        for target in panel
            .get("targets")
            .and_then(|t| t.as_array())
            .into_iter()
            .flatten()
        {
            if let Some(expr) = target.get("expr").and_then(|e| e.as_str()) {
                out.push((where_.clone(), expr.to_owned()));
            }
        }
        if let Some(inner) = panel.get("panels") {
            dashboard_exprs(inner, &where_, out);
        }
    }
}

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

#[tokio::test]
async fn dashboards_and_alerts_use_only_exported_metrics() {
    require_broker!();
    // Vec metrics appear in a scrape only once a label set exists: exercise
    // every family. No alternate exchange, so an event nobody binds comes
    // back (publish failure "returned") and is spooled.
    let mut extra = relaxed();
    extra.extend(["--alternate-exchange".into(), String::new()]);
    let relay = TestRelay::start(RelayOptions {
        extra,
        ..RelayOptions::default()
    })
    .await;
    let broker = TestBroker::connect().await;
    let queue = broker.bind_queue(&relay.exchange, "book.#").await;
    let (status, _, _) = post_signed(&relay, &new_id(), br#"{"event_name":"book.verified"}"#).await;
    assert_eq!(status, 200);
    let (status, _, answer) = post_signed(
        &relay,
        &new_id(),
        br#"{"event_name":"plaid.upload_failed"}"#,
    )
    .await;
    assert_eq!(status, 200);
    assert!(
        String::from_utf8_lossy(&answer).contains("spooled"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    let (status, _, _) = post_signed(&relay, &new_id(), b"{not json").await;
    assert_eq!(status, 400);
    relay
        .relay()
        .state()
        .reload()
        .expect("reload of unchanged files");
    let scrape = relay.metrics().await;
    // Let the spooled event drain, so shutdown has nothing left over.
    broker
        .channel
        .queue_bind(
            queue.as_str().into(),
            relay.exchange.as_str().into(),
            "#".into(),
            Default::default(),
            Default::default(),
        )
        .await
        .expect("bind #");

    let exported = exported(&scrape);
    let names: BTreeSet<String> = exported.iter().map(|(n, _)| n.clone()).collect();
    let histograms: BTreeSet<String> = exported
        .iter()
        .filter(|(_, kind)| kind == "histogram")
        .map(|(n, _)| n.clone())
        .collect();
    let resolve = |name: &str| -> String {
        for suffix in ["_bucket", "_sum", "_count"] {
            if let Some(base) = name.strip_suffix(suffix)
                && histograms.contains(base)
            {
                return base.to_owned();
            }
        }
        name.to_owned()
    };

    let mut exprs = Vec::new();
    let mut dashboards = 0;
    for entry in std::fs::read_dir(repo("grafana/dashboards")).expect("grafana/dashboards") {
        let path = entry.expect("dir entry").path();
        if path.extension().is_none_or(|e| e != "json") {
            continue;
        }
        dashboards += 1;
        let text = std::fs::read_to_string(&path).expect("read dashboard");
        let json: serde_json::Value =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        dashboard_exprs(&json["panels"], &name, &mut exprs);
    }
    assert!(dashboards > 0, "no dashboards found");
    let dashboard_exprs_count = exprs.len();

    let alerts_text =
        std::fs::read_to_string(repo("deploy/prometheus/alerts.yml")).expect("alerts.yml");
    let alerts: serde_json::Value =
        serde_saphyr::from_str(&alerts_text).expect("alerts.yml parses");
    for group in alerts["groups"].as_array().expect("groups") {
        for rule in group["rules"].as_array().expect("rules") {
            let name = rule
                .get("alert")
                .or_else(|| rule.get("record"))
                .and_then(|n| n.as_str())
                .unwrap_or("(unnamed)");
            let expr = rule["expr"]
                .as_str()
                .unwrap_or_else(|| panic!("rule {name} has no expr"));
            exprs.push((format!("alerts.yml / {name}"), expr.to_owned()));
        }
    }
    assert!(
        dashboard_exprs_count > 10,
        "found only {dashboard_exprs_count} dashboard queries"
    );
    assert!(exprs.len() > dashboard_exprs_count, "no alert rules found");

    // Exported only by a relay that serves TLS (this one is plaintext);
    // reload_swaps_the_certificate_and_keeps_requests_in_flight scrapes it.
    let tls_only = "ocrolus_relay_tls_cert_expiry_timestamp_seconds";
    let mut missing = Vec::new();
    let mut used = BTreeSet::new();
    for (place, expr) in &exprs {
        for name in metric_names(expr) {
            let base = resolve(&name);
            if !names.contains(&base) && base != tls_only {
                missing.push(format!("{place}: {name} in `{expr}`"));
            }
            used.insert(base);
        }
    }
    assert!(
        missing.is_empty(),
        "metrics not exported by the relay:\n{}\nexported: {names:?}",
        missing.join("\n")
    );
    let unused: Vec<&String> = names.difference(&used).collect();
    if !unused.is_empty() {
        eprintln!("exported but not on any dashboard or alert: {unused:?}");
    }

    let _ = broker.drain(&queue, 2, Duration::from_secs(5)).await;
    relay.finish(&broker, &[&queue]).await;
}

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

#[tokio::test]
async fn tail_prints_what_consumers_receive() {
    require_broker!();
    let relay = TestRelay::start(RelayOptions::default()).await;
    let broker = TestBroker::connect().await;
    let mut tail = spawn_lines(binary().args([
        "tail",
        "--amqp-url",
        AMQP_URL,
        "--exchange",
        &relay.exchange,
        "--binding",
        "book.#",
        "--max",
        "1",
    ]));
    assert!(
        tail.stderr_until("tailing exchange", Duration::from_secs(30))
            .await,
        "tail did not bind its queue: {:?}",
        tail.stderr_seen
    );
    let id = new_id();
    let body = br#"{"event_name":"book.verified","book_uuid":"5f1c1f5e-0000-4000-8000-000000000001","status":"VERIFICATION_COMPLETE"}"#;
    let (status, _, _) = post_signed(&relay, &id, body).await;
    assert_eq!(status, 200);

    let line = tail
        .next_stdout(Duration::from_secs(30))
        .await
        .expect("tail printed a line");
    let (exit, rest, stderr) = tail.finish(Duration::from_secs(30)).await;
    assert!(
        exit.is_some_and(|s| s.success()),
        "tail exits 0 after --max 1: {exit:?} {stderr:?}"
    );
    assert!(rest.is_empty(), "one line only: {rest:?}");
    let printed: serde_json::Value = serde_json::from_str(&line).expect("a JSON line");
    assert_eq!(printed["routing_key"], "book.verified");
    assert_eq!(printed["message_id"], id.as_str());
    assert_eq!(printed["headers"]["x-ocrolus-event"], "book.verified");
    let sent: serde_json::Value = serde_json::from_slice(body).expect("json");
    assert_eq!(printed["body"], sent);

    relay.finish(&broker, &[]).await;
}

/// Runs `check-config` with the flags a test relay would get.
async fn check_config(opts: RelayOptions) -> (i32, String, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let exchange = unique("test.check");
    let spool = dir.path().join("spool");
    let args = serve_args(
        &opts,
        dir.path(),
        &exchange,
        &format!("{exchange}.unrouted"),
        &spool,
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

#[tokio::test]
async fn check_config_accepts_good_and_refuses_bad_configuration() {
    // Good: exit 0, a summary, and no secret text anywhere.
    let (code, out, err) = check_config(RelayOptions::default()).await;
    assert_eq!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
    assert!(out.contains("configuration OK"), "{out}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("HMAC secrets:") && l.trim_end().ends_with(" 2")),
        "both secrets counted: {out}"
    );
    for secret in [SECRET, SECOND_SECRET, "guest:guest"] {
        assert!(
            !out.contains(secret) && !err.contains(secret),
            "{secret:?} printed:\n{out}\n{err}"
        );
    }

    // A bad CIDR: exit 64 and the message names the line.
    let (code, out, err) = check_config(RelayOptions {
        allow: vec!["127.0.0.1/32".into(), "10.0.0.300/8".into()],
        ..RelayOptions::default()
    })
    .await;
    assert_eq!(code, 64, "stdout:\n{out}\nstderr:\n{err}");
    assert!(
        err.contains("line 3"),
        "the message names line 3 (allow:, 127.0.0.1/32, the bad one): {err}"
    );
    assert!(err.contains("10.0.0.300/8"), "{err}");
    assert!(!out.contains("configuration OK"));

    // A secret Ocrolus would never accept (10 characters): exit 64, not echoed.
    let (code, out, err) = check_config(RelayOptions {
        secrets: vec!["0123456789".into()],
        ..RelayOptions::default()
    })
    .await;
    assert_eq!(code, 64, "stdout:\n{out}\nstderr:\n{err}");
    assert!(err.contains("16-128"), "{err}");
    assert!(
        !err.contains("0123456789") && !out.contains("0123456789"),
        "secret echoed: {err}"
    );

    // No secret and no Basic credentials: fail closed.
    let (code, out, err) = check_config(RelayOptions {
        secrets: vec![],
        ..RelayOptions::default()
    })
    .await;
    assert_eq!(code, 64, "stdout:\n{out}\nstderr:\n{err}");
    assert!(err.starts_with("error: "), "{err}");
    assert!(!out.contains("configuration OK"));

    // --tls-cert without --tls-key.
    let (code, out, err) = check_config(RelayOptions {
        extra: vec!["--tls-cert".into(), "/nonexistent/cert.pem".into()],
        ..RelayOptions::default()
    })
    .await;
    assert_eq!(code, 64, "stdout:\n{out}\nstderr:\n{err}");
    assert!(err.contains("--tls-key"), "{err}");
}

#[test]
fn metric_name_extraction() {
    let names = metric_names(
        r#"sum(rate(ocrolus_relay_requests_total{outcome!="published"}[5m])) / on() x_ocrolus_relay_not_ours + histogram_quantile(0.9, ocrolus_relay_a_bucket) + process_open_fds / my_process_not_ours"#,
    );
    let expected: BTreeSet<String> = [
        "ocrolus_relay_requests_total",
        "ocrolus_relay_a_bucket",
        "process_open_fds",
    ]
    .iter()
    .map(std::string::ToString::to_string)
    .collect();
    assert_eq!(names, expected);
}

/// `serve` writes INFO lines in batches (src/log_writer.rs): an access line
/// still shows within a flush period, and none is lost when the relay
/// exits, down to the last line it logs.
#[tokio::test]
async fn access_lines_come_out_in_batches_and_all_of_them_before_exit() {
    require_broker!();
    let broker = TestBroker::connect().await;
    let exchange = unique("test.events");
    let (alternate, dead) = (format!("{exchange}.unrouted"), format!("{exchange}.dead"));
    ocrolus_relay::declare_topology(&broker.channel, &exchange, Some(&alternate), Some(&dead))
        .await
        .expect("declare");
    let queue = broker.bind_queue(&exchange, "#").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let spool_dir = dir.path().join("spool");
    let opts = RelayOptions {
        extra: relaxed(),
        ..RelayOptions::default()
    };
    let args = serve_args(&opts, dir.path(), &exchange, &alternate, &spool_dir);
    let mut relay = RelayBinary::start(&args).await;
    let logged = |relay: &RelayBinary, id: &str| {
        relay
            .logs
            .lock()
            .expect("logs")
            .iter()
            .filter(|line| line.contains("webhook accepted") && line.contains(id))
            .count()
    };
    let body = br#"{"event_name":"book.verified","book_pk":1}"#;
    let first = new_id();
    let answer = try_post(&relay.url, &first, body, Duration::from_secs(30)).await;
    assert_eq!(answer.expect("answer").0, 200);
    let started = std::time::Instant::now();
    while logged(&relay, &first) == 0 && started.elapsed() < Duration::from_secs(2) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(logged(&relay, &first), 1, "access line not out after 2 s");

    let mut ids = vec![first];
    for _ in 0..200 {
        let id = new_id();
        let answer = try_post(&relay.url, &id, body, Duration::from_secs(30)).await;
        assert_eq!(answer.expect("answer").0, 200);
        ids.push(id);
    }
    relay.sigterm();
    let status = relay.wait_exit(Duration::from_secs(60)).await;
    assert_eq!(status.and_then(|s| s.code()), Some(0));
    // The reader thread reads the pipe to its end.
    let stopped = |relay: &RelayBinary| {
        relay
            .logs
            .lock()
            .expect("logs")
            .iter()
            .any(|line| line.contains("ocrolus-relay stopped"))
    };
    let started = std::time::Instant::now();
    while !stopped(&relay) && started.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(stopped(&relay), "the last line before exit is missing");
    for id in &ids {
        assert_eq!(logged(&relay, id), 1, "access line of {id}");
    }
    let got = broker
        .drain(&queue, ids.len(), Duration::from_secs(10))
        .await;
    assert_eq!(got.len(), ids.len());
    assert!(got.iter().all(|m| m.data == body));
    for queue in [&queue, &alternate, &dead] {
        broker.delete_queue(queue).await;
    }
    for exchange in [&exchange, &alternate, &dead] {
        broker.delete_exchange(exchange).await;
    }
}
