//! Never lose an event: across broker cuts, stalls, long outages,
//! `kill -9`, SIGTERM, a full spool and a failing disk, the number of events
//! answered 200 but never delivered is zero. Every test prints its counts
//! (`cargo test --test resilience -- --nocapture`) and asserts them.
//!
//! Faults are injected with [`FaultProxy`] between the relay and the shared
//! RabbitMQ (never stopped), with the real binary for process-level faults,
//! and with a tiny tmpfs for disk-full. Assertions never depend on timing
//! except through generous upper bounds.

mod common;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// Upper bound for anything that "eventually" happens on a busy 2-core box.
const EVENTUALLY: Duration = Duration::from_secs(90);

/// Flags that take rate limiting out of the way: these tests load the relay
/// from one address on purpose.
fn unthrottled() -> Vec<String> {
    [
        "--rate-limit-per-ip",
        "1000000",
        "--rate-limit-global",
        "1000000",
        "--max-in-flight",
        "100000",
    ]
    .iter()
    .map(std::string::ToString::to_string)
    .collect()
}

fn flags(extra: &[&str]) -> Vec<String> {
    let mut f = unthrottled();
    f.extend(extra.iter().map(std::string::ToString::to_string));
    f
}

fn event_body(n: usize, run: &str) -> Vec<u8> {
    format!(r#"{{"event_name":"BOOK_VERIFIED","book_pk":{n},"run":"{run}"}}"#).into_bytes()
}

/// One signed POST that never panics: `None` when the connection failed
/// (refused, reset, closed without an answer) or no answer came in 60 s.
async fn try_post(url: &str, id: &str, body: &[u8]) -> Option<Answer> {
    common::try_post(url, id, body, Duration::from_secs(60)).await
}

fn status_of(body: &[u8]) -> String {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["status"].as_str().map(str::to_owned))
        .unwrap_or_default()
}

/// What the relay answered, per delivery.
#[derive(Default)]
struct Tally {
    /// id → body of every event answered 200.
    ok: HashMap<String, Vec<u8>>,
    /// ids in the order their 200 arrived.
    ok_order: Vec<String>,
    published: usize,
    spooled: usize,
    duplicate: usize,
    unavailable: usize,
    unanswered: usize,
    other: Vec<u16>,
}

impl Tally {
    fn record(&mut self, id: &str, body: &[u8], answer: Option<Answer>) {
        match answer {
            Some((200, _, answer)) => {
                match status_of(&answer).as_str() {
                    "published" => self.published += 1,
                    "spooled" => self.spooled += 1,
                    "duplicate" => self.duplicate += 1,
                    s => panic!("200 with unknown status {s:?}"),
                }
                if self.ok.insert(id.to_owned(), body.to_vec()).is_none() {
                    self.ok_order.push(id.to_owned());
                }
            }
            Some((503, headers, _)) => {
                assert!(
                    headers.contains_key("retry-after"),
                    "a 503 tells Ocrolus when to retry"
                );
                self.unavailable += 1;
            }
            Some((status, _, _)) => self.other.push(status),
            None => self.unanswered += 1,
        }
    }

    fn total(&self) -> usize {
        self.published
            + self.spooled
            + self.duplicate
            + self.unavailable
            + self.unanswered
            + self.other.len()
    }
}

/// Messages found in a queue, keyed by `message_id`.
struct Delivered {
    /// (message id, body) in queue order, duplicates included.
    messages: Vec<(String, Vec<u8>)>,
}

impl Delivered {
    fn ids(&self) -> HashSet<&str> {
        self.messages.iter().map(|(id, _)| id.as_str()).collect()
    }

    fn duplicates(&self) -> usize {
        self.messages.len() - self.ids().len()
    }

    /// Ids answered 200 that are not in the queue.
    fn lost<'a>(&self, tally: &'a Tally) -> Vec<&'a str> {
        let ids = self.ids();
        tally
            .ok
            .keys()
            .map(String::as_str)
            .filter(|id| !ids.contains(id))
            .collect()
    }

    /// The promise behind a 200: every id answered 200 was delivered, and
    /// every delivered copy carries the exact bytes that were answered 200.
    fn assert_promise_kept(&self, tally: &Tally) {
        let lost = self.lost(tally);
        assert!(
            lost.is_empty(),
            "answered 200 but never delivered: {lost:?}"
        );
        for (id, body) in &self.messages {
            if let Some(sent) = tally.ok.get(id) {
                assert_eq!(body, sent, "{id}: bytes changed on the way");
            }
        }
    }
}

/// Drains `queue` until every id in `want` arrived (or [`EVENTUALLY`]), then
/// once more after a pause to catch late duplicates.
async fn collect(broker: &TestBroker, queue: &str, want: &HashSet<String>) -> Delivered {
    let deadline = Instant::now() + EVENTUALLY;
    let mut messages = Vec::new();
    let mut seen = HashSet::new();
    let mut take = |batch: Vec<lapin::message::BasicGetMessage>| {
        for m in batch {
            let id = m
                .delivery
                .properties
                .message_id()
                .as_ref()
                .map(|s| s.as_str().to_owned())
                .unwrap_or_default();
            seen.insert(id.clone());
            messages.push((id, m.delivery.data));
        }
        want.iter().all(|w| seen.contains(w))
    };
    loop {
        let complete = take(broker.drain(queue, 0, Duration::ZERO).await);
        if complete || Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    take(broker.drain(queue, 0, Duration::ZERO).await);
    Delivered { messages }
}

/// Waits until the in-process relay's broker link is up and its spool empty.
async fn wait_drained(relay: &TestRelay) -> Duration {
    let started = Instant::now();
    let outbox = &relay.relay().state().outbox;
    while started.elapsed() < EVENTUALLY {
        if outbox.broker.is_up() && outbox.spool.stats().messages == 0 {
            return started.elapsed();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!(
        "spool still holds {} events after {EVENTUALLY:?}",
        outbox.spool.stats().messages
    );
}

async fn wait_broker_down(relay: &TestRelay) {
    let started = Instant::now();
    while relay.relay().state().outbox.broker.is_up() {
        assert!(started.elapsed() < EVENTUALLY, "broker link never dropped");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn readyz(admin: SocketAddr) -> Option<(u16, serde_json::Value)> {
    let url = format!("http://{admin}/readyz");
    let attempt = async {
        let uri: http::Uri = url.parse().ok()?;
        let stream = TcpStream::connect(admin).await.ok()?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .ok()?;
        tokio::spawn(conn);
        let req = Request::get(uri.path())
            .header("host", admin.to_string())
            .body(Full::new(Bytes::new()))
            .ok()?;
        let response = sender.send_request(req).await.ok()?;
        let status = response.status().as_u16();
        let body = response.into_body().collect().await.ok()?.to_bytes();
        Some((status, serde_json::from_slice(&body).ok()?))
    };
    tokio::time::timeout(Duration::from_secs(10), attempt)
        .await
        .ok()
        .flatten()
}

// ---------------------------------------------------------------------------
// 1. Broker cut while 1,000 events are in flight.

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn broker_cut_under_load_loses_nothing() {
    require_broker!();
    const EVENTS: usize = 1000;
    const SENDERS: usize = 32;
    let proxy = Arc::new(FaultProxy::start("127.0.0.1:5672").await);
    let relay = TestRelay::start(RelayOptions {
        amqp_url: proxy.url(),
        extra: unthrottled(),
        ..RelayOptions::default()
    })
    .await;
    let (broker, queue) = relay.watch_all().await;
    let run = unique("cut");

    let next = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let tally = Arc::new(Mutex::new(Tally::default()));
    let fault = {
        let (proxy, done) = (proxy.clone(), done.clone());
        tokio::spawn(async move {
            while done.load(Ordering::SeqCst) < EVENTS / 3 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            let cut_at = done.load(Ordering::SeqCst);
            proxy.cut();
            tokio::time::sleep(Duration::from_millis(1500)).await;
            let restored_at = done.load(Ordering::SeqCst);
            proxy.restore();
            (cut_at, restored_at)
        })
    };
    let mut senders = Vec::new();
    for _ in 0..SENDERS {
        let (next, done, tally, url, run) = (
            next.clone(),
            done.clone(),
            tally.clone(),
            relay.url.clone(),
            run.clone(),
        );
        senders.push(tokio::spawn(async move {
            loop {
                let n = next.fetch_add(1, Ordering::SeqCst);
                if n >= EVENTS {
                    return;
                }
                let id = new_id();
                let body = event_body(n, &run);
                let answer = try_post(&url, &id, &body).await;
                tally.lock().expect("tally").record(&id, &body, answer);
                done.fetch_add(1, Ordering::SeqCst);
            }
        }));
    }
    for s in senders {
        s.await.expect("sender");
    }
    let (cut_at, restored_at) = fault.await.expect("fault task");
    let drain_time = wait_drained(&relay).await;

    let tally = std::mem::take(&mut *tally.lock().expect("tally"));
    let want: HashSet<String> = tally.ok.keys().cloned().collect();
    let delivered = collect(&broker, &queue, &want).await;
    let lost = delivered.lost(&tally);
    eprintln!(
        "broker cut: sent={EVENTS} cut_after={cut_at} restored_after={restored_at} \
         ok200={} published={} spooled={} 503={} unanswered={} other={:?} \
         delivered_messages={} delivered_unique={} duplicates={} drained_in={drain_time:?} \
         lost={}",
        tally.ok.len(),
        tally.published,
        tally.spooled,
        tally.unavailable,
        tally.unanswered,
        tally.other,
        delivered.messages.len(),
        delivered.ids().len(),
        delivered.duplicates(),
        lost.len(),
    );
    assert_eq!(tally.total(), EVENTS);
    assert!(tally.other.is_empty(), "only 200 or 503: {:?}", tally.other);
    assert_eq!(tally.unanswered, 0, "every request got an answer");
    delivered.assert_promise_kept(&tally);

    relay.finish(&broker, &[&queue]).await;
}

// ---------------------------------------------------------------------------
// 2. Broker stalled: answers within the confirm timeout via the spool.

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn broker_stall_answers_from_the_spool_then_delivers() {
    require_broker!();
    const BEFORE: usize = 5;
    const DURING: usize = 40;
    let proxy = FaultProxy::start("127.0.0.1:5672").await;
    let relay = TestRelay::start(RelayOptions {
        amqp_url: proxy.url(),
        extra: flags(&["--confirm-timeout", "0.5"]),
        ..RelayOptions::default()
    })
    .await;
    let (broker, queue) = relay.watch_all().await;
    let run = unique("stall");
    let mut tally = Tally::default();

    for n in 0..BEFORE {
        let (id, body) = (new_id(), event_body(n, &run));
        let answer = try_post(&relay.url, &id, &body).await;
        tally.record(&id, &body, answer);
    }
    assert_eq!(tally.published, BEFORE, "broker healthy before the stall");

    proxy.stall();
    // Concurrent, so that many publishes wait on the stalled link at once.
    let mut tasks = Vec::new();
    for n in BEFORE..BEFORE + DURING {
        let (url, body) = (relay.url.clone(), event_body(n, &run));
        tasks.push(tokio::spawn(async move {
            let id = new_id();
            let started = Instant::now();
            let answer = try_post(&url, &id, &body).await;
            (id, body, answer, started.elapsed())
        }));
    }
    let mut slowest = Duration::ZERO;
    for t in tasks {
        let (id, body, answer, took) = t.await.expect("sender");
        slowest = slowest.max(took);
        tally.record(&id, &body, answer);
    }
    let stalled_spooled = tally.spooled;
    // Let the stall last a while with no traffic: recovery must not wait
    // for the next publish or a heartbeat timeout.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let restored = Instant::now();
    proxy.restore();
    let drain_time = wait_drained(&relay).await;
    let recovery = restored.elapsed();

    let want: HashSet<String> = tally.ok.keys().cloned().collect();
    let delivered = collect(&broker, &queue, &want).await;
    let lost = delivered.lost(&tally);
    eprintln!(
        "broker stall: sent={} ok200={} published={} spooled={} 503={} slowest_answer={slowest:?} \
         recovered_after_restore={recovery:?} (drain wait {drain_time:?}) delivered_unique={} \
         duplicates={} lost={}",
        BEFORE + DURING,
        tally.ok.len(),
        tally.published,
        tally.spooled,
        tally.unavailable,
        delivered.ids().len(),
        delivered.duplicates(),
        lost.len(),
    );
    assert_eq!(tally.ok.len(), BEFORE + DURING, "all accepted");
    assert_eq!(stalled_spooled, DURING, "every stalled event was spooled");
    // Confirm timeout 0.5 s; the bound only guards against hanging until
    // a heartbeat or TCP timeout.
    assert!(
        slowest < Duration::from_secs(8),
        "answers must not wait for the stalled broker: {slowest:?}"
    );
    delivered.assert_promise_kept(&tally);

    relay.finish(&broker, &[&queue]).await;
}

// ---------------------------------------------------------------------------
// 3. Broker down longer than Ocrolus retries: all delivered, in order.

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn long_outage_delivers_everything_in_arrival_order() {
    require_broker!();
    const EVENTS: usize = 50;
    let proxy = FaultProxy::start("127.0.0.1:5672").await;
    let relay = TestRelay::start(RelayOptions {
        amqp_url: proxy.url(),
        extra: unthrottled(),
        ..RelayOptions::default()
    })
    .await;
    let (broker, queue) = relay.watch_all().await;
    let run = unique("outage");

    proxy.cut();
    wait_broker_down(&relay).await;
    let down = Instant::now();
    let mut tally = Tally::default();
    // Spread over ~5 s: longer than the (simulated) retry window.
    for n in 0..EVENTS {
        let (id, body) = (new_id(), event_body(n, &run));
        let answer = try_post(&relay.url, &id, &body).await;
        tally.record(&id, &body, answer);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let outage = down.elapsed();
    assert_eq!(tally.spooled, EVENTS, "every event spooled while down");
    proxy.restore();
    let drain_time = wait_drained(&relay).await;

    let want: HashSet<String> = tally.ok.keys().cloned().collect();
    let delivered = collect(&broker, &queue, &want).await;
    let order: Vec<&str> = delivered
        .messages
        .iter()
        .map(|(id, _)| id.as_str())
        .collect();
    let in_order = order
        == tally
            .ok_order
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>();
    let lost = delivered.lost(&tally);
    eprintln!(
        "long outage: down_for={outage:?} sent={EVENTS} ok200={} spooled={} drained_in={drain_time:?} \
         delivered={} duplicates={} in_arrival_order={in_order} lost={}",
        tally.ok.len(),
        tally.spooled,
        delivered.messages.len(),
        delivered.duplicates(),
        lost.len()
    );
    delivered.assert_promise_kept(&tally);
    assert!(in_order, "spooled events drain in arrival order: {order:?}");

    relay.finish(&broker, &[&queue]).await;
}

// ---------------------------------------------------------------------------
// The real binary, for process-level faults.

/// Names and files for a spawned relay; `serve_args` writes the allowlist
/// and secrets into `dir`.
struct BinaryRelay {
    dir: tempfile::TempDir,
    spool_dir: PathBuf,
    exchange: String,
    alternate: String,
}

impl BinaryRelay {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let spool_dir = dir.path().join("spool");
        let exchange = unique("test.events");
        let alternate = format!("{exchange}.unrouted");
        Self {
            dir,
            spool_dir,
            exchange,
            alternate,
        }
    }

    fn args(&self, amqp_url: &str, extra: Vec<String>) -> Vec<String> {
        let opts = RelayOptions {
            amqp_url: amqp_url.to_owned(),
            extra,
            ..RelayOptions::default()
        };
        serve_args(
            &opts,
            self.dir.path(),
            &self.exchange,
            &self.alternate,
            &self.spool_dir,
        )
    }

    /// Declares the relay's topology ourselves (same arguments), so a test
    /// queue can be bound before the relay ever reached the broker.
    async fn declare(&self, broker: &TestBroker) {
        let dead_letter = format!("{}.dead", self.exchange);
        ocrolus_relay::declare_topology(
            &broker.channel,
            &self.exchange,
            Some(&self.alternate),
            Some(&dead_letter),
        )
        .await
        .expect("declare topology");
    }

    async fn cleanup(&self, broker: &TestBroker) {
        broker.delete_exchange(&self.exchange).await;
        broker
            .delete_exchange(&format!("{}.dead", self.exchange))
            .await;
        broker
            .delete_queue(&format!("{}.dead", self.exchange))
            .await;
        broker.delete_exchange(&self.alternate).await;
        broker.delete_queue(&self.alternate).await;
    }
}

// ---------------------------------------------------------------------------
// 4. kill -9 with events in the spool, then restart.

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_dash_nine_with_a_full_spool_then_restart_delivers_all() {
    require_broker!();
    const EVENTS: usize = 60;
    let files = BinaryRelay::new();
    let broker = TestBroker::connect().await;
    files.declare(&broker).await;
    let queue = broker.bind_queue(&files.exchange, "#").await;
    let proxy = FaultProxy::start("127.0.0.1:5672").await;
    proxy.cut();

    let mut first = RelayBinary::start(&files.args(&proxy.url(), unthrottled())).await;
    let run = unique("kill9");
    let mut tally = Tally::default();
    // Concurrent senders so the kill lands while group commits are busy.
    let mut tasks = Vec::new();
    for n in 0..EVENTS {
        let (url, body) = (first.url.clone(), event_body(n, &run));
        tasks.push(tokio::spawn(async move {
            let id = new_id();
            let answer = try_post(&url, &id, &body).await;
            (id, body, answer)
        }));
    }
    for t in tasks {
        let (id, body, answer) = t.await.expect("sender");
        tally.record(&id, &body, answer);
    }
    first.kill9();
    assert_eq!(tally.spooled, EVENTS, "broker unreachable: all spooled");

    let second = RelayBinary::start(&files.args(AMQP_URL, unthrottled())).await;
    let drain_time = second.wait_drained(EVENTUALLY).await;
    let want: HashSet<String> = tally.ok.keys().cloned().collect();
    let delivered = collect(&broker, &queue, &want).await;
    let lost = delivered.lost(&tally);
    eprintln!(
        "kill -9: sent={EVENTS} ok200={} spooled={} restarted_and_drained_in={drain_time:?} \
         delivered={} duplicates={} lost={}",
        tally.ok.len(),
        tally.spooled,
        delivered.messages.len(),
        delivered.duplicates(),
        lost.len()
    );
    delivered.assert_promise_kept(&tally);
    assert_eq!(
        delivered.duplicates(),
        0,
        "nothing was published before the kill"
    );

    second.sigterm();
    let mut second = second;
    second.wait_exit(Duration::from_secs(60)).await;
    broker.delete_queue(&queue).await;
    files.cleanup(&broker).await;
}

// ---------------------------------------------------------------------------
// 5a. Spool full → 503 with Retry-After, never 200.

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn full_spool_answers_503_never_200() {
    require_broker!();
    const ROOM: usize = 5;
    const EVENTS: usize = 12;
    let proxy = FaultProxy::start("127.0.0.1:5672").await;
    let room = ROOM.to_string();
    let relay = TestRelay::start(RelayOptions {
        amqp_url: proxy.url(),
        extra: flags(&["--spool-max-messages", &room]),
        ..RelayOptions::default()
    })
    .await;
    let (broker, queue) = relay.watch_all().await;
    let run = unique("full");
    proxy.cut();
    wait_broker_down(&relay).await;

    let mut tally = Tally::default();
    let mut statuses = Vec::new();
    for n in 0..EVENTS {
        let (id, body) = (new_id(), event_body(n, &run));
        let answer = try_post(&relay.url, &id, &body).await;
        statuses.push(answer.as_ref().map_or(0, |a| a.0));
        tally.record(&id, &body, answer);
    }
    proxy.restore();
    let drain_time = wait_drained(&relay).await;
    let want: HashSet<String> = tally.ok.keys().cloned().collect();
    let delivered = collect(&broker, &queue, &want).await;
    let lost = delivered.lost(&tally);
    eprintln!(
        "spool full: room={ROOM} sent={EVENTS} ok200={} spooled={} 503={} statuses={statuses:?} \
         drained_in={drain_time:?} delivered={} lost={}",
        tally.ok.len(),
        tally.spooled,
        tally.unavailable,
        delivered.messages.len(),
        lost.len()
    );
    assert_eq!(tally.spooled, ROOM);
    assert_eq!(tally.unavailable, EVENTS - ROOM, "the rest got 503");
    assert!(
        statuses[ROOM..].iter().all(|s| *s == 503),
        "never 200 once full"
    );
    delivered.assert_promise_kept(&tally);
    assert_eq!(
        delivered.ids().len(),
        ROOM,
        "503'd events were not published"
    );

    relay.finish(&broker, &[&queue]).await;
}

// ---------------------------------------------------------------------------
// 5b. Disk write failure → 503, never 200.

/// A tmpfs of `size` mounted on a fresh directory; unmounted on drop.
struct TinyDisk {
    dir: tempfile::TempDir,
}

impl TinyDisk {
    /// `None` (test skipped) when mounting is not permitted here.
    fn mount(size: &str) -> Option<Self> {
        let dir = tempfile::tempdir().ok()?;
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .stderr(Stdio::null())
            .status()
            .ok()?;
        status.success().then_some(Self { dir })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Fills the remaining space; returns the bytes written.
    fn fill(&self) -> u64 {
        use std::io::Write;
        let mut file = std::fs::File::create(self.path().join("filler")).expect("filler");
        let chunk = vec![0xA5u8; 4096];
        let mut written = 0;
        while file.write_all(&chunk).is_ok() {
            written += chunk.len() as u64;
        }
        let _ = file.sync_all();
        written
    }

    fn free(&self) {
        std::fs::remove_file(self.path().join("filler")).expect("remove filler");
    }
}

impl Drop for TinyDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn disk_write_failure_answers_503_never_200() {
    require_broker!();
    let Some(disk) = TinyDisk::mount("4m") else {
        eprintln!("disk failure: SKIPPED (cannot mount a tmpfs here; needs root)");
        return;
    };
    let proxy = FaultProxy::start("127.0.0.1:5672").await;
    let relay = TestRelay::start(RelayOptions {
        amqp_url: proxy.url(),
        extra: unthrottled(),
        spool_dir: Some(disk.path().join("spool")),
        ..RelayOptions::default()
    })
    .await;
    let (broker, queue) = relay.watch_all().await;
    let run = unique("disk");
    proxy.cut();
    wait_broker_down(&relay).await;

    let mut tally = Tally::default();
    for n in 0..5 {
        let (id, body) = (new_id(), event_body(n, &run));
        let answer = try_post(&relay.url, &id, &body).await;
        tally.record(&id, &body, answer);
    }
    assert_eq!(tally.spooled, 5, "spool works before the disk fills");

    let filled = disk.fill();
    // Bodies of ~200 KiB need fresh pages the full disk cannot give.
    let padding = "x".repeat(200 * 1024);
    let mut while_full = Vec::new();
    for n in 5..25 {
        let id = new_id();
        let body = format!(
            r#"{{"event_name":"BOOK_VERIFIED","book_pk":{n},"run":"{run}","pad":"{padding}"}}"#
        )
        .into_bytes();
        let answer = try_post(&relay.url, &id, &body).await;
        while_full.push(answer.as_ref().map_or(0, |a| a.0));
        tally.record(&id, &body, answer);
    }
    let failed = while_full.iter().filter(|s| **s == 503).count();
    let errors = relay.metric("ocrolus_relay_spool_errors_total").await;

    disk.free();
    let mut after_free = Vec::new();
    for n in 25..30 {
        let (id, body) = (new_id(), event_body(n, &run));
        let answer = try_post(&relay.url, &id, &body).await;
        after_free.push(answer.as_ref().map_or(0, |a| a.0));
        tally.record(&id, &body, answer);
    }

    eprintln!(
        "disk failure (before restore): while_full={while_full:?} after_free={after_free:?} spool={:?}",
        relay.relay().state().outbox.spool.stats()
    );
    proxy.restore();
    let drain_time = wait_drained(&relay).await;
    let want: HashSet<String> = tally.ok.keys().cloned().collect();
    let delivered = collect(&broker, &queue, &want).await;
    let lost = delivered.lost(&tally);
    eprintln!(
        "disk failure: filler={filled}B while_full={while_full:?} 503={failed} \
         spool_errors={errors} after_free={after_free:?} ok200={} drained_in={drain_time:?} \
         delivered={} duplicates={} lost={}",
        tally.ok.len(),
        delivered.messages.len(),
        delivered.duplicates(),
        lost.len()
    );
    assert!(failed > 0, "a full disk must make spooling fail");
    assert!(
        while_full.iter().all(|s| *s == 503 || *s == 200),
        "only 200 (really stored) or 503"
    );
    assert!(
        after_free.iter().all(|s| *s == 200),
        "the spool recovers once space is back, without a restart"
    );
    delivered.assert_promise_kept(&tally);

    relay.finish(&broker, &[&queue]).await;
    drop(disk);
}

// ---------------------------------------------------------------------------
// 6. Duplicate delivery ids → one message.

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn duplicate_delivery_ids_publish_once() {
    require_broker!();
    let relay = TestRelay::start(RelayOptions {
        extra: unthrottled(),
        ..RelayOptions::default()
    })
    .await;
    let (broker, queue) = relay.watch_all().await;
    let run = unique("dup");

    // Sequential retries of one delivery.
    let seq_id = new_id();
    let seq_body = event_body(0, &run);
    let mut seq = Vec::new();
    for _ in 0..3 {
        let (status, _, body) = post_signed(&relay, &seq_id, &seq_body).await;
        assert_eq!(status, 200);
        seq.push(status_of(&body));
    }
    assert_eq!(seq, ["published", "duplicate", "duplicate"]);

    // Concurrent twins: the same delivery sent at once by 10 tasks.
    let twin_id = new_id();
    let twin_body = event_body(1, &run);
    let mut tasks = Vec::new();
    for _ in 0..10 {
        let (url, id, body) = (relay.url.clone(), twin_id.clone(), twin_body.clone());
        tasks.push(tokio::spawn(
            async move { try_post(&url, &id, &body).await },
        ));
    }
    let mut twins = Vec::new();
    for t in tasks {
        let (status, _, body) = t.await.expect("twin").expect("answered");
        assert_eq!(status, 200);
        twins.push(status_of(&body));
    }
    let published = twins.iter().filter(|s| *s == "published").count();
    let duplicate = twins.iter().filter(|s| *s == "duplicate").count();

    let want: HashSet<String> = [seq_id.clone(), twin_id.clone()].into();
    let delivered = collect(&broker, &queue, &want).await;
    let count = |id: &str| delivered.messages.iter().filter(|(m, _)| m == id).count();
    eprintln!(
        "duplicates: sequential={seq:?} -> {} message(s); twins published={published} \
         duplicate={duplicate} -> {} message(s)",
        count(&seq_id),
        count(&twin_id)
    );
    assert_eq!((published, duplicate), (1, 9));
    assert_eq!(count(&seq_id), 1);
    assert_eq!(count(&twin_id), 1);
    assert_eq!(delivered.messages.len(), 2);

    relay.finish(&broker, &[&queue]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn failed_delivery_does_not_block_a_retry_with_the_same_id() {
    require_broker!();
    let proxy = FaultProxy::start("127.0.0.1:5672").await;
    let relay = TestRelay::start(RelayOptions {
        amqp_url: proxy.url(),
        // No spool room: with the broker cut, a delivery fails with 503.
        extra: flags(&["--spool-max-messages", "0"]),
        ..RelayOptions::default()
    })
    .await;
    let (broker, queue) = relay.watch_all().await;
    let (id, body) = (new_id(), event_body(0, &unique("retry")));

    proxy.cut();
    wait_broker_down(&relay).await;
    let (first, _, _) = post_signed(&relay, &id, &body).await;
    proxy.restore();
    assert!(
        relay.wait_broker_up(EVENTUALLY).await,
        "broker link comes back"
    );
    let (second, _, answer) = post_signed(&relay, &id, &body).await;
    let delivered = collect(&broker, &queue, &[id.clone()].into()).await;
    eprintln!(
        "retry after failure: first={first} second={second} {} -> {} message(s)",
        status_of(&answer),
        delivered.messages.len()
    );
    assert_eq!(first, 503);
    assert_eq!(second, 200);
    assert_eq!(status_of(&answer), "published");
    assert_eq!(delivered.messages.len(), 1);

    relay.finish(&broker, &[&queue]).await;
}

// ---------------------------------------------------------------------------
// 7. SIGTERM under load, and Relay::shutdown with requests in flight.

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_under_load_loses_nothing_and_exits_in_time() {
    require_broker!();
    const GRACE: f64 = 2.0;
    const DEADLINE: f64 = 5.0;
    const SENDERS: usize = 16;
    let files = BinaryRelay::new();
    let broker = TestBroker::connect().await;
    files.declare(&broker).await;
    let queue = broker.bind_queue(&files.exchange, "#").await;
    let extra = flags(&[
        "--shutdown-grace",
        &GRACE.to_string(),
        "--shutdown-deadline",
        &DEADLINE.to_string(),
    ]);
    let mut relay = RelayBinary::start(&files.args(AMQP_URL, extra)).await;
    let ready_before = readyz(relay.admin).await.map(|(s, _)| s);
    let run = unique("sigterm");

    let tally = Arc::new(Mutex::new(Tally::default()));
    let stop = Arc::new(AtomicUsize::new(0));
    let next = Arc::new(AtomicUsize::new(0));
    let mut senders = Vec::new();
    for _ in 0..SENDERS {
        let (tally, stop, next, url, run) = (
            tally.clone(),
            stop.clone(),
            next.clone(),
            relay.url.clone(),
            run.clone(),
        );
        senders.push(tokio::spawn(async move {
            // Keep sending until the listener is gone (refused) for good.
            let mut refused = 0;
            while stop.load(Ordering::SeqCst) == 0 && refused < 3 {
                let n = next.fetch_add(1, Ordering::SeqCst);
                let (id, body) = (new_id(), event_body(n, &run));
                let answer = try_post(&url, &id, &body).await;
                if answer.is_none() {
                    refused += 1;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                tally.lock().expect("tally").record(&id, &body, answer);
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let signalled = Instant::now();
    relay.sigterm();
    // Readiness must turn 503 while the relay still serves (grace period).
    let mut draining_seen = None;
    while signalled.elapsed() < Duration::from_secs_f64(GRACE + DEADLINE + 10.0) {
        match readyz(relay.admin).await {
            Some((503, body)) => {
                draining_seen = Some(body);
                break;
            }
            Some(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            None => break,
        }
    }
    let exit = relay
        .wait_exit(Duration::from_secs_f64(GRACE + DEADLINE + 15.0))
        .await;
    let exited_after = signalled.elapsed();
    stop.store(1, Ordering::SeqCst);
    for s in senders {
        s.await.expect("sender");
    }
    let tally = std::mem::take(&mut *tally.lock().expect("tally"));
    // Shutdown flushes the spool while the broker is up; whatever a very
    // slow machine left behind is delivered by the next start.
    let left_in_spool = {
        let spool = ocrolus_relay::SpoolFile::open(&files.spool_dir).expect("spool file");
        spool.stats().expect("stats").messages
    };
    if left_in_spool > 0 {
        let mut next = RelayBinary::start(&files.args(AMQP_URL, unthrottled())).await;
        next.wait_drained(EVENTUALLY).await;
        next.sigterm();
        next.wait_exit(Duration::from_secs(60)).await;
    }
    let want: HashSet<String> = tally.ok.keys().cloned().collect();
    let delivered = collect(&broker, &queue, &want).await;
    let lost = delivered.lost(&tally);
    eprintln!(
        "SIGTERM: ready_before={ready_before:?} draining_readyz={draining_seen:?} \
         exit={exit:?} after={exited_after:?} (grace {GRACE}s + deadline {DEADLINE}s) \
         attempts={} ok200={} published={} spooled={} 503={} refused={} other={:?} \
         delivered={} duplicates={} left_in_spool={left_in_spool} lost={}",
        tally.total(),
        tally.ok.len(),
        tally.published,
        tally.spooled,
        tally.unavailable,
        tally.unanswered,
        tally.other,
        delivered.messages.len(),
        delivered.duplicates(),
        lost.len()
    );
    assert_eq!(ready_before, Some(200));
    let body = draining_seen.expect("readyz answered 503 while draining");
    assert_eq!(body["reason"], "draining");
    let exit = exit.expect("the relay exits within grace + deadline + margin");
    assert!(exit.success(), "clean exit: {exit:?}");
    assert!(!tally.ok.is_empty(), "load was served");
    assert!(tally.other.is_empty(), "{:?}", tally.other);
    delivered.assert_promise_kept(&tally);

    broker.delete_queue(&queue).await;
    files.cleanup(&broker).await;
}

/// A second SIGTERM during the graceful drain stops the relay at once
/// (exit 143, one warning line), and what was answered 200 is delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn second_sigterm_during_the_drain_stops_at_once() {
    require_broker!();
    let files = BinaryRelay::new();
    let broker = TestBroker::connect().await;
    files.declare(&broker).await;
    let queue = broker.bind_queue(&files.exchange, "#").await;
    // Without the second signal the drain would last a minute.
    let extra = flags(&["--shutdown-grace", "60", "--shutdown-deadline", "25"]);
    let mut relay = RelayBinary::start(&files.args(AMQP_URL, extra)).await;
    let run = unique("second-signal");
    let (id, body) = (new_id(), event_body(0, &run));
    let answer = try_post(&relay.url, &id, &body).await;
    let mut tally = Tally::default();
    tally.record(&id, &body, answer);
    assert_eq!(tally.ok.len(), 1, "the event before the signals got a 200");

    relay.sigterm();
    let mut draining = false;
    for _ in 0..500 {
        if let Some((503, _)) = readyz(relay.admin).await {
            draining = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(draining, "readiness 503 after the first SIGTERM");
    relay.sigterm();
    let exit = relay
        .wait_exit(Duration::from_secs(20))
        .await
        .expect("the second SIGTERM ends the process well before the 60 s grace");
    assert_eq!(exit.code(), Some(143), "{exit:?}");
    let warnings: Vec<serde_json::Value> = relay
        .logs
        .lock()
        .expect("logs")
        .iter()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|l| l["level"] == "WARN" && l["signal"] == "SIGTERM")
        .collect();
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert_eq!(warnings[0]["exit_code"], 143);
    assert!(
        warnings[0]["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("second signal: stopping now")),
        "{}",
        warnings[0]
    );
    // An event still in the spool (answered before the broker link was up)
    // is delivered by the next start, as after kill -9.
    let left_in_spool = ocrolus_relay::SpoolFile::open(&files.spool_dir)
        .expect("spool file")
        .stats()
        .expect("stats")
        .messages;
    if left_in_spool > 0 {
        let mut next = RelayBinary::start(&files.args(AMQP_URL, unthrottled())).await;
        next.wait_drained(EVENTUALLY).await;
        next.sigterm();
        next.wait_exit(Duration::from_secs(60)).await;
    }
    let want: HashSet<String> = tally.ok.keys().cloned().collect();
    collect(&broker, &queue, &want)
        .await
        .assert_promise_kept(&tally);

    broker.delete_queue(&queue).await;
    files.cleanup(&broker).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shutdown_lets_requests_in_flight_complete() {
    require_broker!();
    const IN_FLIGHT: usize = 20;
    let spool = tempfile::tempdir().expect("spool dir");
    let proxy = FaultProxy::start("127.0.0.1:5672").await;
    let relay = TestRelay::start(RelayOptions {
        amqp_url: proxy.url(),
        extra: flags(&["--confirm-timeout", "2"]),
        spool_dir: Some(spool.path().to_path_buf()),
        ..RelayOptions::default()
    })
    .await;
    let (broker, queue) = relay.watch_all().await;
    let (exchange, alternate) = (relay.exchange.clone(), relay.alternate.clone());
    let run = unique("inflight");

    // A stalled broker keeps every request waiting for its confirm.
    proxy.stall();
    let mut tasks = Vec::new();
    for n in 0..IN_FLIGHT {
        let (url, body) = (relay.url.clone(), event_body(n, &run));
        tasks.push(tokio::spawn(async move {
            let id = new_id();
            let answer = try_post(&url, &id, &body).await;
            (id, body, answer)
        }));
    }
    let started = Instant::now();
    while relay.relay().state().metrics.requests_in_flight.get() < IN_FLIGHT as i64
        && started.elapsed() < Duration::from_secs(10)
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let in_flight_at_shutdown = relay.relay().state().metrics.requests_in_flight.get();
    let shutdown_started = Instant::now();
    relay.shutdown().await;
    let shutdown_took = shutdown_started.elapsed();
    let mut tally = Tally::default();
    for t in tasks {
        let (id, body, answer) = t.await.expect("request");
        tally.record(&id, &body, answer);
    }

    // Next start, against the healthy broker, drains what was spooled.
    proxy.restore();
    let restarted = TestRelay::start_with_names(
        RelayOptions {
            extra: unthrottled(),
            spool_dir: Some(spool.path().to_path_buf()),
            ..RelayOptions::default()
        },
        exchange,
        alternate,
    )
    .await;
    let drain_time = wait_drained(&restarted).await;
    let want: HashSet<String> = tally.ok.keys().cloned().collect();
    let delivered = collect(&broker, &queue, &want).await;
    let lost = delivered.lost(&tally);
    eprintln!(
        "shutdown with requests in flight: in_flight={in_flight_at_shutdown} \
         shutdown_took={shutdown_took:?} ok200={} spooled={} 503={} unanswered={} \
         restarted_and_drained_in={drain_time:?} delivered={} duplicates={} lost={}",
        tally.ok.len(),
        tally.spooled,
        tally.unavailable,
        tally.unanswered,
        delivered.messages.len(),
        delivered.duplicates(),
        lost.len()
    );
    assert_eq!(
        tally.ok.len(),
        IN_FLIGHT,
        "requests in flight complete with 200"
    );
    delivered.assert_promise_kept(&tally);

    restarted.finish(&broker, &[&queue]).await;
}

// ---------------------------------------------------------------------------
// 8. /readyz reflects reality.

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn readyz_reflects_broker_spool_and_draining() {
    require_broker!();
    const ROOM: usize = 3;
    let proxy = FaultProxy::start("127.0.0.1:5672").await;
    let room = ROOM.to_string();
    let relay = TestRelay::start(RelayOptions {
        amqp_url: proxy.url(),
        extra: flags(&["--spool-max-messages", &room, "--shutdown-grace", "3"]),
        ..RelayOptions::default()
    })
    .await;
    let broker = TestBroker::connect().await;
    let admin = relay.admin;
    let run = unique("ready");

    let up = readyz(admin).await.expect("readyz");
    proxy.cut();
    wait_broker_down(&relay).await;
    let cut_with_room = readyz(admin).await.expect("readyz");
    for n in 0..ROOM {
        let (status, _, _) = post_signed(&relay, &new_id(), &event_body(n, &run)).await;
        assert_eq!(status, 200);
    }
    let cut_and_full = readyz(admin).await.expect("readyz");
    proxy.restore();
    wait_drained(&relay).await;
    let recovered = readyz(admin).await.expect("readyz");

    relay.cleanup(&broker).await;
    let shutdown = tokio::spawn(relay.shutdown());
    let started = Instant::now();
    let draining = loop {
        let r = readyz(admin).await.expect("readyz during grace");
        if r.0 == 503 || started.elapsed() > Duration::from_secs(10) {
            break r;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    shutdown.await.expect("shutdown");
    eprintln!(
        "readyz: up={up:?} cut_with_room={cut_with_room:?} cut_and_full={cut_and_full:?} \
         recovered={recovered:?} draining={draining:?}"
    );
    assert_eq!(up.0, 200);
    assert_eq!(cut_with_room.0, 200, "the spool has room: still ready");
    assert_eq!(cut_and_full.0, 503);
    assert_eq!(cut_and_full.1["reason"], "broker down and spool full");
    assert_eq!(recovered.0, 200);
    assert_eq!(draining.0, 503);
    assert_eq!(draining.1["reason"], "draining");
}

// ---------------------------------------------------------------------------
// 9. An operator's `spool` commands against a running relay, under load.

/// `count` signed posts numbered from `first`, from `senders` concurrent
/// senders, each answer recorded in `tally`.
async fn send_load(
    url: &str,
    run: &str,
    (first, count): (usize, usize),
    senders: usize,
    tally: Arc<Mutex<Tally>>,
) {
    let next = Arc::new(AtomicUsize::new(first));
    let mut tasks = Vec::new();
    for _ in 0..senders {
        let (next, tally, url, run) = (next.clone(), tally.clone(), url.to_owned(), run.to_owned());
        tasks.push(tokio::spawn(async move {
            loop {
                let n = next.fetch_add(1, Ordering::SeqCst);
                if n >= first + count {
                    return;
                }
                let id = new_id();
                let body = event_body(n, &run);
                let answer = try_post(&url, &id, &body).await;
                tally.lock().expect("tally").record(&id, &body, answer);
            }
        }));
    }
    for t in tasks {
        t.await.expect("sender");
    }
}

/// `ocrolus-relay spool ARGS`: exit code, stdout lines as JSON, stderr.
async fn spool_command(args: &[&str]) -> (Option<i32>, Vec<serde_json::Value>, String) {
    let mut argv = vec!["spool"];
    argv.extend_from_slice(args);
    let out = run_binary(&argv, &[]).await;
    let lines = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
        .collect();
    (
        out.status.code(),
        lines,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn spool_commands_inspect_and_drain_a_running_relay_under_load() {
    use sha2::Digest;
    require_broker!();
    const EVENTS: usize = 300;
    const SENDERS: usize = 16;
    let files = BinaryRelay::new();
    let broker = TestBroker::connect().await;
    files.declare(&broker).await;
    let queue = broker.bind_queue(&files.exchange, "#").await;
    let proxy = FaultProxy::start("127.0.0.1:5672").await;
    proxy.cut();
    let relay = RelayBinary::start(&files.args(&proxy.url(), unthrottled())).await;
    let admin = relay.admin.to_string();
    let asked_relay = format!("spool: asking the running relay at http://{admin} (spool ");
    let run = unique("spool-live");
    let tally = Arc::new(Mutex::new(Tally::default()));

    // The broker is cut: every event is spooled while `spool stats` watches.
    let load = tokio::spawn({
        let (url, run, tally) = (relay.url.clone(), run.clone(), tally.clone());
        async move { send_load(&url, &run, (0, EVENTS), SENDERS, tally).await }
    });
    let mut seen = Vec::new();
    loop {
        let loading = !load.is_finished();
        let (code, lines, stderr) = spool_command(&["stats", "--admin-listen", &admin]).await;
        assert_eq!(code, Some(0), "{stderr}");
        assert!(stderr.starts_with(&asked_relay), "{stderr}");
        let messages = lines[0]["messages"].as_u64().expect("messages");
        assert!(
            seen.last().is_none_or(|&(last, _)| last <= messages),
            "nothing drains while the broker is cut: {seen:?} then {messages}"
        );
        seen.push((messages, loading));
        if !loading {
            break;
        }
    }
    load.await.expect("load");
    let accepted = std::mem::take(&mut *tally.lock().expect("tally"));
    assert_eq!(accepted.spooled, EVENTS, "broker cut: all spooled");

    let (code, lines, stderr) = spool_command(&["stats", "--admin-listen", &admin]).await;
    assert_eq!(code, Some(0), "{stderr}");
    let stats = &lines[0];
    let body_bytes: usize = accepted.ok.values().map(Vec::len).sum();
    assert_eq!(stats["messages"], EVENTS);
    assert!(stats["bytes"].as_u64().expect("bytes") >= body_bytes as u64);
    assert!(stats["oldest_age_seconds"].is_u64(), "{stats}");
    assert_eq!(stats["quarantined"], 0);
    assert_eq!(stats["broker_up"], false);

    // Flags after the action, and the relay's own spool dir named.
    let spool_dir = files.spool_dir.display().to_string();
    let (code, events, stderr) = spool_command(&[
        "list",
        "--limit",
        "1000",
        "--spool-dir",
        &spool_dir,
        "--admin-listen",
        &admin,
    ])
    .await;
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stderr.starts_with(&asked_relay), "{stderr}");
    assert_eq!(events.len(), EVENTS);
    let mut last_seq = None;
    for e in &events {
        let id = e["id"].as_str().expect("id");
        let sent = &accepted.ok[id];
        assert_eq!(e["body_bytes"], sent.len());
        assert_eq!(e["body_sha256"], hex::encode(sha2::Sha256::digest(sent)));
        assert!(e.get("body").is_none(), "the admin view never shows a body");
        let seq = e["seq"].as_u64().expect("seq");
        assert!(last_seq < Some(seq), "oldest first");
        last_seq = Some(seq);
    }
    let (code, quarantined, stderr) =
        spool_command(&["list", "--quarantine", "--admin-listen", &admin]).await;
    assert_eq!((code, quarantined.len()), (Some(0), 0), "{stderr}");
    // One request lists at most 1000 events; anything else is refused.
    for (query, status) in [
        ("limit=1000", 200),
        ("limit=0", 400),
        ("limit=1001", 400),
        ("quarantine=maybe", 400),
        ("offset=3", 400),
    ] {
        let answer = get(&format!("http://{admin}/spool/events?{query}")).await;
        assert_eq!(answer.0, status, "{query}: {:?}", answer.2);
    }

    // No broker: a drain now is refused, and says why and that nothing is lost.
    let (code, _, stderr) = spool_command(&["replay", "--admin-listen", &admin]).await;
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "cannot drain now: no broker connection (the relay keeps reconnecting; see its log); \
             its {EVENTS} spooled events stay safe"
        )),
        "{stderr}"
    );

    // The broker is back: replay asks the relay to drain while new events
    // keep arriving, and never opens the file the relay holds.
    proxy.restore();
    let started = Instant::now();
    while relay.metric("ocrolus_relay_broker_up").await != Some(1.0) {
        assert!(started.elapsed() < EVENTUALLY, "broker never came back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let tally = Arc::new(Mutex::new(accepted));
    let load = tokio::spawn({
        let (url, run, tally) = (relay.url.clone(), run.clone(), tally.clone());
        async move { send_load(&url, &run, (EVENTS, EVENTS), SENDERS, tally).await }
    });
    let (code, replayed, stderr) = spool_command(&["replay", "--admin-listen", &admin]).await;
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stderr.starts_with(&asked_relay), "{stderr}");
    assert_eq!(replayed[0]["replayed_by"], "relay");
    assert_eq!(replayed[0]["left"], 0);
    load.await.expect("load");
    relay.wait_drained(EVENTUALLY).await;

    let tally = std::mem::take(&mut *tally.lock().expect("tally"));
    let want: HashSet<String> = tally.ok.keys().cloned().collect();
    let delivered = collect(&broker, &queue, &want).await;
    eprintln!(
        "spool commands: stats_polls={} (during load {}) spooled={} then sent={EVENTS} ok200={} \
         replay={} delivered={} duplicates={} lost={}",
        seen.len(),
        seen.iter().filter(|(_, loading)| *loading).count(),
        EVENTS,
        tally.ok.len() - EVENTS,
        replayed[0],
        delivered.messages.len(),
        delivered.duplicates(),
        delivered.lost(&tally).len()
    );
    assert_eq!(tally.ok.len(), 2 * EVENTS, "every event answered 200");
    delivered.assert_promise_kept(&tally);
    assert_eq!(delivered.duplicates(), 0);

    relay.sigterm();
    let mut relay = relay;
    relay.wait_exit(Duration::from_secs(60)).await;
    broker.delete_queue(&queue).await;
    files.cleanup(&broker).await;
}

/// A link on which the broker nacks every publish for a whole confirm
/// timeout is replaced, as one that times out is. Seen on a RabbitMQ
/// cluster after the node holding a quorum queue's leader died: the channels
/// the relay had just opened on another node were nacked for minutes, and
/// every event was spooled while the relay counted itself connected. Here a
/// queue that takes no message (`x-max-length` 0, `reject-publish`) makes
/// the broker nack every publish routed to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_link_that_only_nacks_is_replaced() {
    use lapin::options::{QueueBindOptions, QueueDeclareOptions};
    use lapin::types::{AMQPValue, FieldTable};
    require_broker!();
    let relay = TestRelay::start(RelayOptions {
        extra: vec!["--confirm-timeout".into(), "1".into()],
        ..RelayOptions::default()
    })
    .await;
    assert!(
        relay.wait_broker_up(EVENTUALLY).await,
        "relay never connected"
    );
    let broker = TestBroker::connect().await;
    let refusing = unique("test.refusing");
    let mut arguments = FieldTable::default();
    arguments.insert("x-max-length".into(), AMQPValue::LongInt(0));
    arguments.insert(
        "x-overflow".into(),
        AMQPValue::LongString("reject-publish".into()),
    );
    broker
        .channel
        .queue_declare(
            refusing.as_str().into(),
            QueueDeclareOptions::default(),
            arguments,
        )
        .await
        .expect("declare the refusing queue");
    broker
        .channel
        .queue_bind(
            refusing.as_str().into(),
            relay.exchange.as_str().into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("bind");

    let reconnects = "ocrolus_relay_broker_reconnects_total";
    let before = relay.metric(reconnects).await;
    let started = Instant::now();
    let mut nacked = 0;
    while relay.metric(reconnects).await <= before {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the relay kept a link that nacked all {nacked} publishes for {:?}",
            started.elapsed()
        );
        let (status, _, body) =
            post_signed(&relay, &new_id(), br#"{"event_name":"BOOK_VERIFIED"}"#).await;
        assert_eq!(status, 200);
        assert!(
            String::from_utf8_lossy(&body).contains(r#""spooled""#),
            "a nacked publish is spooled: {body:?}"
        );
        nacked += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let replaced_after = started.elapsed();

    // Without the refusing queue, events are published again and the
    // spooled ones drain.
    broker.delete_queue(&refusing).await;
    let published_again = loop {
        let (status, _, body) =
            post_signed(&relay, &new_id(), br#"{"event_name":"BOOK_VERIFIED"}"#).await;
        assert_eq!(status, 200);
        if String::from_utf8_lossy(&body).contains(r#""published""#) {
            break started.elapsed();
        }
        assert!(
            started.elapsed() < EVENTUALLY,
            "never published again after the refusing queue went"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let drained_in = wait_drained(&relay).await;
    eprintln!(
        "only nacks: {nacked} deliveries nacked and spooled; link replaced {replaced_after:?} \
         after the first; published again {published_again:?} after it; spool drained in {drained_in:?}"
    );
    relay.finish(&broker, &[]).await;
}
