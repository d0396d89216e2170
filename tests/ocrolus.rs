//! `ocrolus-relay ocrolus …` through the binary, against an in-test fake of
//! the Ocrolus API and a real relay on the real RabbitMQ. The fake delivers
//! signed events the way Ocrolus does, so every rotation test can ask the
//! one question that matters: does the relay still accept the secret
//! Ocrolus signs with?

mod common;
#[path = "ocrolus_fake/mod.rs"]
mod fake;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::{RelayOptions, SECRET, TestBroker, TestRelay};
use fake::{FakeOcrolus, RotateMode};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_ocrolus-relay");
const EVENT: &str = "book.verified";

struct Run {
    ok: bool,
    stdout: String,
    stderr: String,
}

impl Run {
    fn json(&self) -> Value {
        serde_json::from_str(self.stdout.trim())
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {}", self.stdout))
    }
}

async fn ocrolus(fake: &FakeOcrolus, args: &[&str]) -> Run {
    let mut cmd = tokio::process::Command::new(BIN);
    cmd.arg("ocrolus").args(args).envs(fake.env());
    for var in ["RELAY_SECRET_FILE", "RELAY_ADMIN_URL", "RELAY_WEBHOOK_PATH"] {
        cmd.env_remove(var);
    }
    let out = cmd.output().await.expect("run the binary");
    let run = Run {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    for text in [&run.stdout, &run.stderr] {
        assert!(
            !text.contains(fake::CLIENT_SECRET) && !text.contains("token-"),
            "a credential leaked: {text}"
        );
    }
    run
}

/// A relay with one secret, the fake Ocrolus with one webhook using it.
async fn setup() -> (TestRelay, FakeOcrolus, String) {
    let relay = TestRelay::start(RelayOptions {
        secrets: vec![SECRET.into()],
        ..Default::default()
    })
    .await;
    let fake = FakeOcrolus::start(&format!("http://{}", relay.addr)).await;
    let uuid = fake.add_webhook(
        "https://relay.example.com/webhooks/ocrolus",
        &[EVENT, "document.verification_succeeded"],
        Some(SECRET),
    );
    (relay, fake, uuid)
}

fn secret_file(relay: &TestRelay) -> PathBuf {
    relay.dir.path().join("secrets")
}

fn admin_url(relay: &TestRelay) -> String {
    format!("http://{}", relay.admin)
}

async fn rotate(relay: &TestRelay, fake: &FakeOcrolus, file: &Path, extra: &[&str]) -> Run {
    let file = file.display().to_string();
    let admin = admin_url(relay);
    let mut args = vec![
        "rotate-secret",
        "--secret-file",
        &file,
        "--admin-url",
        &admin,
    ];
    args.extend_from_slice(extra);
    ocrolus(fake, &args).await
}

async fn relay_fingerprints(relay: &TestRelay) -> Vec<String> {
    let (status, _, body) = common::get(&format!("{}/secrets", admin_url(relay))).await;
    assert_eq!(status, 200);
    let value: Value = serde_json::from_slice(&body).unwrap();
    value["sources"][0]["fingerprints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap().to_owned())
        .collect()
}

fn fp(secret: &str) -> String {
    ocrolus_relay::fingerprint(secret.as_bytes())
}

/// The invariant: Ocrolus' next delivery gets 200.
async fn assert_ocrolus_accepted(fake: &FakeOcrolus, uuid: &str, when: &str) {
    let (status, _) = fake.deliver(uuid, EVENT).await;
    assert_eq!(
        status, 200,
        "{when}: the relay rejected the secret Ocrolus uses"
    );
}

fn break_allowlist(relay: &TestRelay) -> Vec<u8> {
    let path = relay.dir.path().join("allowlist.yaml");
    let good = std::fs::read(&path).unwrap();
    std::fs::write(&path, "allow: [not-an-address]\n").unwrap();
    good
}

#[tokio::test]
async fn webhook_commands_follow_the_documented_api() {
    require_broker!();
    let (relay, fake, existing) = setup().await;
    let dir = tempfile::tempdir().unwrap();
    let basic = dir.path().join("basic");
    std::fs::write(&basic, "ocrolus:s3cret-basic-pass\n").unwrap();
    let secrets = dir.path().join("secrets");
    std::fs::write(&secrets, format!("{SECRET}\n")).unwrap();

    let run = ocrolus(
        &fake,
        &[
            "webhooks",
            "add",
            "--url",
            "https://relay.example.com/webhooks/ocrolus",
            "--events",
            "book.verified,book.completed",
            "--description",
            "production relay",
            "--basic-auth-file",
            basic.to_str().unwrap(),
            "--secret-file",
            secrets.to_str().unwrap(),
            "--json",
        ],
    )
    .await;
    assert!(run.ok, "add failed: {}", run.stderr);
    let created = run.json()["uuid"].as_str().unwrap().to_owned();
    let hook = fake.webhook(&created).unwrap();
    assert_eq!(
        hook.url,
        "https://ocrolus:s3cret-basic-pass@relay.example.com/webhooks/ocrolus"
    );
    assert_eq!(hook.events, ["book.verified", "book.completed"]);
    assert_eq!(
        hook.secret.as_deref(),
        Some(SECRET),
        "add uploads the newest secret"
    );
    let add_call = fake
        .calls()
        .into_iter()
        .find(|c| c.method == "POST" && c.path == "/v1/account/settings/webhook")
        .unwrap();
    assert_eq!(add_call.body["webhook"]["description"], "production relay");
    assert_eq!(
        add_call.body["event_names"],
        serde_json::json!(["book.verified", "book.completed"])
    );

    let wrong_path = ocrolus(
        &fake,
        &[
            "webhooks",
            "add",
            "--url",
            "https://relay.example.com/other",
            "--all-events",
        ],
    )
    .await;
    assert!(!wrong_path.ok);
    assert!(
        wrong_path
            .stderr
            .contains("is not the path of source default")
    );

    let list = ocrolus(&fake, &["webhooks", "list"]).await;
    assert!(list.ok, "{}", list.stderr);
    assert!(list.stdout.contains(&existing) && list.stdout.contains(&created));
    assert!(
        list.stdout.contains("ocrolus:***@relay.example.com")
            && !list.stdout.contains("s3cret-basic-pass"),
        "Basic password shown: {}",
        list.stdout
    );
    let show = ocrolus(&fake, &["webhooks", "show", &created, "--json"]).await;
    assert_eq!(show.json()["webhook"]["uuid"], created.as_str());

    let update = ocrolus(
        &fake,
        &[
            "webhooks",
            "update",
            &created,
            "--events",
            "document.verification_failed",
            "--active",
            "false",
        ],
    )
    .await;
    assert!(update.ok, "{}", update.stderr);
    let hook = fake.webhook(&created).unwrap();
    assert_eq!(hook.events, ["document.verification_failed"]);
    assert!(!hook.is_active);

    let events = ocrolus(&fake, &["webhooks", "events", &existing, "--json"]).await;
    let events = events.json();
    let names: Vec<&str> = events["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, [EVENT, "document.verification_succeeded"]);

    let refused = ocrolus(&fake, &["webhooks", "delete", &created]).await;
    assert!(!refused.ok && refused.stderr.contains("--yes"));
    let deleted = ocrolus(&fake, &["webhooks", "delete", &created, "--yes"]).await;
    assert!(deleted.ok, "{}", deleted.stderr);
    assert!(fake.webhook(&created).is_none());

    let missing = ocrolus(&fake, &["webhooks", "show", &created]).await;
    assert!(!missing.ok);
    assert!(
        missing.stderr.contains("answered 400") && missing.stderr.contains("not found"),
        "status and message expected: {}",
        missing.stderr
    );
    let broker = TestBroker::connect().await;
    relay.finish(&broker, &[]).await;
}

#[tokio::test]
async fn token_is_cached_refreshed_on_expiry_and_never_shown() {
    require_broker!();
    let (relay, fake, _uuid) = setup().await;
    // One client, several calls: one token.
    let client = client_for(&fake);
    client.list_webhooks().await.unwrap();
    client.list_webhooks().await.unwrap();
    assert_eq!(fake.tokens_issued(), 1);

    // An expired token (lifetime 0) is fetched again before every call.
    fake.set_token_lifetime(0);
    let client = client_for(&fake);
    client.list_webhooks().await.unwrap();
    client.list_webhooks().await.unwrap();
    assert_eq!(fake.tokens_issued(), 3);

    // A token the API stops accepting is replaced once, transparently.
    fake.set_token_lifetime(86_400);
    let client = client_for(&fake);
    client.list_webhooks().await.unwrap();
    fake.revoke_tokens();
    client.list_webhooks().await.unwrap();
    assert_eq!(fake.tokens_issued(), 1, "revoked, then one new token");

    // Wrong credentials: status and Ocrolus' message, not the secret.
    let mut bad = tokio::process::Command::new(BIN);
    bad.args(["ocrolus", "webhooks", "list"])
        .envs(fake.env())
        .env("OCROLUS_CLIENT_SECRET", "wrong-secret-value-XYZ");
    let out = bad.output().await.unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("401") && stderr.contains("access_denied: Unauthorized"),
        "{stderr}"
    );
    assert!(!stderr.contains("wrong-secret-value-XYZ"));
    let broker = TestBroker::connect().await;
    relay.finish(&broker, &[]).await;
}

fn client_for(fake: &FakeOcrolus) -> ocrolus_relay::OcrolusClient {
    ocrolus_relay::OcrolusClient::new(ocrolus_relay::OcrolusClientConfig {
        api_url: fake.api_url(),
        token_url: fake.token_url(),
        audience: "https://api.ocrolus.com/".into(),
        client_id: fake::CLIENT_ID.into(),
        client_secret: ocrolus_relay::OcrolusClientSecret::new(fake::CLIENT_SECRET.into()),
        timeout: Duration::from_secs(10),
    })
    .unwrap()
}

#[tokio::test]
async fn webhooks_test_sees_the_relay_publish_the_test_event() {
    require_broker!();
    let (relay, fake, uuid) = setup().await;
    let broker = TestBroker::connect().await;
    let run = ocrolus(
        &fake,
        &[
            "webhooks",
            "test",
            &uuid,
            "--event",
            EVENT,
            "--amqp-url",
            common::AMQP_URL,
            "--exchange",
            &relay.exchange,
            "--json",
        ],
    )
    .await;
    assert!(run.ok, "{}\n{}", run.stdout, run.stderr);
    let report = run.json();
    assert_eq!(report["published"]["routing_key"], EVENT);
    assert_eq!(
        report["published"]["body"]["book_uuid"],
        report["sent"]["book_uuid"]
    );
    assert!(fake.calls().iter().any(|c| c.path.ends_with("/test")));

    // A webhook whose secret the relay does not know: Ocrolus reports the
    // failure, the command says so.
    let stranger = fake.add_webhook(
        "https://relay.example.com/webhooks/ocrolus",
        &[EVENT],
        Some("a-secret-the-relay-never-saw"),
    );
    let run = ocrolus(
        &fake,
        &[
            "webhooks",
            "test",
            &stranger,
            "--event",
            EVENT,
            "--exchange",
            &relay.exchange,
        ],
    )
    .await;
    assert!(!run.ok);
    assert!(
        run.stderr.contains("endpoint answered 401"),
        "{}",
        run.stderr
    );
    relay.finish(&broker, &[]).await;
}

/// Ocrolus' deliveries, sent continuously while a rotation runs.
struct Deliveries {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<Vec<u16>>,
}

impl Deliveries {
    fn start(fake: &FakeOcrolus, uuid: &str) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (fake, uuid, flag) = (fake.clone(), uuid.to_owned(), stop.clone());
        let task = tokio::spawn(async move {
            let mut statuses = Vec::new();
            while !flag.load(Ordering::SeqCst) {
                statuses.push(fake.deliver(&uuid, EVENT).await.0);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            statuses
        });
        Self { stop, task }
    }

    async fn stop(self) -> Vec<u16> {
        self.stop.store(true, Ordering::SeqCst);
        self.task.await.unwrap()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotate_secret_end_to_end_keeps_every_delivery_accepted() {
    require_broker!();
    let (relay, fake, uuid) = setup().await;
    let (broker, queue) = relay.watch_all().await;
    let file = secret_file(&relay);
    std::fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let deliveries = Deliveries::start(&fake, &uuid);
    let run = rotate(&relay, &fake, &file, &["--grace", "2s", "--json"]).await;
    let statuses = deliveries.stop().await;
    assert!(run.ok, "{}\n{}", run.stdout, run.stderr);
    let steps: Vec<String> = run.json()["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["step"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        steps,
        [
            "preflight",
            "generate",
            "add",
            "reload",
            "confirm",
            "upload",
            "wait",
            "remove",
            "done"
        ]
    );

    let new_secret = fake.webhook(&uuid).unwrap().secret.unwrap();
    assert_ne!(new_secret, SECRET);
    assert_eq!(new_secret.len(), 48);
    assert_eq!(std::fs::read_to_string(&file).unwrap().trim(), new_secret);
    assert_eq!(std::fs::metadata(&file).unwrap().mode() & 0o777, 0o600);
    assert!(!PathBuf::from(format!("{}.rotation", file.display())).exists());
    assert_eq!(relay_fingerprints(&relay).await, [fp(&new_secret)]);
    let rotate_call = fake
        .calls()
        .into_iter()
        .find(|c| c.path == format!("/v1/account/settings/webhook/{uuid}/rotate-secret"))
        .unwrap();
    assert_eq!(rotate_call.body["secret_key"], new_secret.as_str());

    assert!(!statuses.is_empty());
    assert!(
        statuses.iter().all(|s| *s == 200),
        "a delivery was refused during the rotation: {statuses:?}"
    );
    assert_ocrolus_accepted(&fake, &uuid, "after the rotation").await;
    // Every 200 is a message on the exchange.
    let messages = broker
        .drain(&queue, statuses.len() + 1, Duration::from_secs(10))
        .await;
    assert_eq!(messages.len(), statuses.len() + 1);
    // The old secret is gone.
    let body = br#"{"event_name":"book.verified"}"#;
    let (status, _, _) = common::post_signed(&relay, &common::new_id(), body).await;
    assert_eq!(status, 401);
    relay.finish(&broker, &[&queue]).await;
}

#[tokio::test]
async fn rotate_secret_failure_writing_the_file_changes_nothing() {
    require_broker!();
    let (relay, fake, uuid) = setup().await;
    let file = secret_file(&relay);
    let before = std::fs::read(&file).unwrap();
    let tmp = PathBuf::from(format!("{}.rotate-tmp", file.display()));
    std::fs::write(&tmp, "").unwrap();
    let run = rotate(&relay, &fake, &file, &["--webhook", &uuid]).await;
    assert!(!run.ok);
    assert!(
        run.stderr.contains("another rotate-secret"),
        "{}",
        run.stderr
    );
    assert_eq!(std::fs::read(&file).unwrap(), before);
    assert_eq!(fake.webhook(&uuid).unwrap().secret.as_deref(), Some(SECRET));
    assert_ocrolus_accepted(&fake, &uuid, "after a failed write").await;
    let broker = TestBroker::connect().await;
    relay.finish(&broker, &[]).await;
}

#[tokio::test]
async fn rotate_secret_failed_reload_rolls_back() {
    require_broker!();
    let (relay, fake, uuid) = setup().await;
    let file = secret_file(&relay);
    let before = std::fs::read(&file).unwrap();
    let good = break_allowlist(&relay);
    let run = rotate(&relay, &fake, &file, &[]).await;
    assert!(!run.ok);
    assert!(run.stderr.contains("rejected the reload"), "{}", run.stderr);
    assert_eq!(
        std::fs::read(&file).unwrap(),
        before,
        "new secret taken out again"
    );
    assert_eq!(fake.webhook(&uuid).unwrap().secret.as_deref(), Some(SECRET));
    assert_ocrolus_accepted(&fake, &uuid, "after a failed reload").await;
    std::fs::write(relay.dir.path().join("allowlist.yaml"), good).unwrap();
    let broker = TestBroker::connect().await;
    relay.finish(&broker, &[]).await;
}

#[tokio::test]
async fn rotate_secret_unconfirmed_relay_rolls_back() {
    require_broker!();
    let (relay, fake, uuid) = setup().await;
    // The operator points at a copy: same secrets, but not the file the
    // relay reads, so the relay never shows the new secret.
    let copy = relay.dir.path().join("secrets.copy");
    std::fs::copy(secret_file(&relay), &copy).unwrap();
    let run = rotate(&relay, &fake, &copy, &[]).await;
    assert!(!run.ok);
    assert!(
        run.stderr.contains("after the reload the relay holds"),
        "{}",
        run.stderr
    );
    assert_eq!(
        std::fs::read_to_string(&copy).unwrap().trim(),
        SECRET,
        "new secret taken out again"
    );
    assert_eq!(fake.webhook(&uuid).unwrap().secret.as_deref(), Some(SECRET));
    assert_ocrolus_accepted(&fake, &uuid, "after an unconfirmed reload").await;
    let broker = TestBroker::connect().await;
    relay.finish(&broker, &[]).await;
}

#[tokio::test]
async fn rotate_secret_refused_upload_rolls_back() {
    require_broker!();
    let (relay, fake, uuid) = setup().await;
    fake.set_rotate_mode(RotateMode::Refuse);
    let run = rotate(&relay, &fake, &secret_file(&relay), &[]).await;
    assert!(!run.ok);
    assert!(
        run.stderr.contains("answered 400: secret rejected"),
        "{}",
        run.stderr
    );
    assert_eq!(relay_fingerprints(&relay).await, [fp(SECRET)]);
    assert_eq!(fake.webhook(&uuid).unwrap().secret.as_deref(), Some(SECRET));
    assert_ocrolus_accepted(&fake, &uuid, "after a refused upload").await;
    let broker = TestBroker::connect().await;
    relay.finish(&broker, &[]).await;
}

#[tokio::test]
async fn rotate_secret_unconfirmed_upload_keeps_both_secrets() {
    require_broker!();
    let (relay, fake, uuid) = setup().await;
    fake.set_rotate_mode(RotateMode::ApplyThen503);
    let run = rotate(&relay, &fake, &secret_file(&relay), &[]).await;
    assert!(!run.ok);
    assert!(run.stderr.contains("answered 503"), "{}", run.stderr);
    let new_secret = fake.webhook(&uuid).unwrap().secret.unwrap();
    assert_ne!(new_secret, SECRET, "the fake took the new secret");
    let mut held = relay_fingerprints(&relay).await;
    held.sort();
    let mut both = vec![fp(SECRET), fp(&new_secret)];
    both.sort();
    assert_eq!(held, both);
    assert_ocrolus_accepted(&fake, &uuid, "after an unconfirmed upload").await;
    let broker = TestBroker::connect().await;
    relay.finish(&broker, &[]).await;
}

#[tokio::test]
async fn rotate_secret_failed_finish_keeps_both_then_finish_completes() {
    require_broker!();
    let (relay, fake, uuid) = setup().await;
    let file = secret_file(&relay);
    let run = rotate(&relay, &fake, &file, &["--defer-finish"]).await;
    assert!(run.ok, "{}", run.stderr);
    assert!(run.stdout.contains("--finish"), "{}", run.stdout);
    let new_secret = fake.webhook(&uuid).unwrap().secret.unwrap();
    assert_eq!(relay_fingerprints(&relay).await.len(), 2);
    assert_ocrolus_accepted(&fake, &uuid, "after the deferred upload").await;

    let good = break_allowlist(&relay);
    let run = rotate(&relay, &fake, &file, &["--finish", "--grace", "0"]).await;
    assert!(!run.ok);
    assert!(run.stderr.contains("run --finish again"), "{}", run.stderr);
    assert_eq!(relay_fingerprints(&relay).await.len(), 2);
    assert_ocrolus_accepted(&fake, &uuid, "after a failed finish").await;

    std::fs::write(relay.dir.path().join("allowlist.yaml"), good).unwrap();
    let run = rotate(&relay, &fake, &file, &["--finish", "--grace", "0"]).await;
    assert!(run.ok, "{}", run.stderr);
    assert_eq!(relay_fingerprints(&relay).await, [fp(&new_secret)]);
    assert_ocrolus_accepted(&fake, &uuid, "after the finish").await;

    let again = rotate(&relay, &fake, &file, &["--finish"]).await;
    assert!(!again.ok && again.stderr.contains("nothing to finish"));
    let broker = TestBroker::connect().await;
    relay.finish(&broker, &[]).await;
}
