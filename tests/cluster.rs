//! The relay against a real three-node RabbitMQ cluster
//! (`scripts/rabbitmq-cluster.sh`: relay-c1..3@localhost on 127.0.0.1:5681-5683,
//! amqps with mutual TLS on 5691). `scripts/test.sh` runs them in a phase of
//! their own (every test name starts with `cluster_`, which its main run
//! skips): it takes the cluster's lock, starts the cluster, runs them and
//! stops it. Run alone, they skip with a message when no cluster runs (or
//! fail, with `RELAY_CLUSTER_REQUIRED=1`) and take the lock per test.
//!
//! Each test takes the whole cluster (they stop nodes), so they run one at a
//! time, and starts by bringing every node back. Each declares its own quorum
//! queue and exchanges (random suffix) and deletes them. Every test prints
//! its figures (`cargo test --test cluster -- --nocapture`): events answered
//! 200, lost (asserted 0), duplicates (counted, not asserted: an event whose
//! confirm was lost with its node is spooled and published again), time to
//! recover.

mod common;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use lapin::options::{
    BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Connection, ConnectionProperties};
use tokio::net::{TcpListener, TcpStream};

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/rabbitmq-cluster.sh");
const BIN: &str = env!("CARGO_BIN_EXE_ocrolus-relay");
const NODE_PORTS: [u16; 3] = [5681, 5682, 5683];
const TLS_URL: &str = "amqps://guest:guest@localhost:5691/%2f";
/// Upper bound for anything that "eventually" happens on a busy 2-core box
/// (a node restart alone takes 20-30 s here).
const EVENTUALLY: Duration = Duration::from_secs(180);
/// The promised bound: new events are `published` again within 10 s of a
/// node stop.
const RECOVERY_BOUND: Duration = Duration::from_secs(10);
/// How long the whole cluster stays down under load: a full minute, well
/// past the backoff's ceiling, so the relay has retried every node many
/// times and spooled every event before the cluster comes back.
const CLUSTER_OUTAGE: Duration = Duration::from_secs(60);

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The cluster's lock file: `scripts/test.sh` holds it for its whole cluster
/// phase (and says so with `RELAY_CLUSTER_LOCKED=1`); a test run by hand
/// takes it for each test, so that two runs on one machine never stop nodes
/// under each other.
fn lock_file() -> PathBuf {
    let mut name = cluster_dir().into_os_string();
    name.push(".lock");
    PathBuf::from(name)
}

/// Holds the lock through `flock(1)`: the child keeps it until this test
/// drops it or dies (its stdin closes and `read` returns).
async fn take_lock() -> Option<tokio::process::Child> {
    use tokio::io::AsyncBufReadExt;
    if std::env::var_os("RELAY_CLUSTER_LOCKED").is_some() {
        return None;
    }
    let mut child = tokio::process::Command::new("flock")
        .arg("-x")
        .arg(lock_file())
        .args(["-c", "echo locked; read _"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("flock(1)");
    let stdout = child.stdout.take().expect("stdout");
    let mut line = String::new();
    tokio::io::BufReader::new(stdout)
        .read_line(&mut line)
        .await
        .expect("read flock output");
    assert_eq!(line.trim(), "locked", "flock {}", lock_file().display());
    Some(child)
}

/// One test's hold on the cluster.
struct ClusterGuard {
    _serial: tokio::sync::MutexGuard<'static, ()>,
    _lock: Option<tokio::process::Child>,
}

fn node_url(port: u16) -> String {
    format!("amqp://guest:guest@127.0.0.1:{port}/%2f")
}

/// All three nodes, comma-separated, as `RELAY_AMQP_URL` takes them.
fn cluster_urls() -> String {
    NODE_PORTS.map(node_url).join(",")
}

fn cluster_dir() -> PathBuf {
    std::env::var_os("RELAY_CLUSTER_DIR").map_or_else(
        || PathBuf::from("/tmp/ocrolus-relay-cluster"),
        PathBuf::from,
    )
}

/// Runs the cluster script; panics with its output when it fails.
async fn script(args: &[&str]) -> String {
    let out = tokio::process::Command::new(SCRIPT)
        .args(args)
        .output()
        .await
        .expect("run scripts/rabbitmq-cluster.sh");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "rabbitmq-cluster.sh {args:?} failed:\n{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// Takes the cluster for one test and makes sure all three nodes run;
/// `None` (skip) when no test cluster was started.
async fn cluster() -> Option<ClusterGuard> {
    // With RUST_LOG set, the in-process relays log to stderr, so that a
    // failed run shows what the relay did (`RUST_LOG=ocrolus_relay=debug`).
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .try_init();
    }
    let serial = SERIAL.lock().await;
    if !cluster_dir().join("formed").exists() {
        assert!(
            std::env::var_os("RELAY_CLUSTER_REQUIRED").is_none(),
            "RELAY_CLUSTER_REQUIRED is set but no test cluster runs (scripts/rabbitmq-cluster.sh start)"
        );
        eprintln!(
            "SKIPPED: no RabbitMQ test cluster runs; start one with `scripts/rabbitmq-cluster.sh start` (scripts/test.sh does)"
        );
        return None;
    }
    let lock = take_lock().await;
    script(&["start"]).await;
    Some(ClusterGuard {
        _serial: serial,
        _lock: lock,
    })
}

/// Index (1-3) of the node behind a `host:port` label.
fn node_index(label: &str) -> usize {
    let port: u16 = label
        .rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .expect("host:port");
    NODE_PORTS
        .iter()
        .position(|p| *p == port)
        .map_or_else(|| panic!("{label} is no cluster node"), |i| i + 1)
}

/// A connection to the first node that answers.
async fn connect_any() -> Connection {
    for port in NODE_PORTS {
        if let Ok(c) = Connection::connect(&node_url(port), ConnectionProperties::default()).await {
            return c;
        }
    }
    panic!("no cluster node answers");
}

/// Waits until quorum queue `queue` has a replica on each of the three
/// nodes, as node `via` sees it, and returns its leader. A queue declared
/// while a node was not (yet) running gets fewer replicas; stopping one of
/// two would leave it without a majority, and nothing would be confirmed
/// until the node is back: a broken test, not a relay failure.
async fn wait_three_members(via: usize, queue: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let listed = script(&[
            "ctl",
            &via.to_string(),
            "list_queues",
            "name",
            "members",
            "leader",
        ])
        .await;
        let found = listed.lines().find_map(|line| {
            let mut fields = line.split('\t');
            if fields.next()? != queue {
                return None;
            }
            let members = fields.next()?.matches("relay-c").count();
            Some((members, fields.next()?.to_owned()))
        });
        match found {
            Some((3, leader)) => return leader,
            other => assert!(
                Instant::now() < deadline,
                "quorum queue {queue} never had three replicas: (members, leader) = {other:?}"
            ),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// The relay's topology plus a quorum queue bound with `#`: sees every event.
async fn quorum_queue(exchange: &str, alternate: &str) -> String {
    quorum_queue_led_by(connect_any().await, exchange, alternate).await
}

/// [`quorum_queue`], declared through `connection`: RabbitMQ puts the
/// leader of a new quorum queue on the node the client is connected to.
async fn quorum_queue_led_by(connection: Connection, exchange: &str, alternate: &str) -> String {
    let channel = connection.create_channel().await.expect("channel");
    ocrolus_relay::declare_topology(&channel, exchange, Some(alternate), None)
        .await
        .expect("declare topology");
    let queue = unique("test.quorum");
    let mut arguments = FieldTable::default();
    arguments.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    channel
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            arguments,
        )
        .await
        .expect("declare quorum queue");
    channel
        .queue_bind(
            queue.as_str().into(),
            exchange.into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("bind");
    let _ = connection.close(200, "declared".into()).await;
    queue
}

async fn cleanup(queue: &str, exchange: &str, alternate: &str) {
    let connection = connect_any().await;
    let channel = connection.create_channel().await.expect("channel");
    let dead_letter = format!("{exchange}.dead");
    for q in [queue, alternate, &dead_letter] {
        let _ = channel
            .queue_delete(q.into(), QueueDeleteOptions::default())
            .await;
    }
    for e in [exchange, alternate, &dead_letter] {
        let _ = channel.exchange_delete(e.into(), Default::default()).await;
    }
    let _ = connection.close(200, "cleaned up".into()).await;
}

/// Messages found in the queue, in queue order, duplicates included.
struct Delivered {
    messages: Vec<(String, Vec<u8>)>,
}

impl Delivered {
    fn ids(&self) -> HashSet<&str> {
        self.messages.iter().map(|(id, _)| id.as_str()).collect()
    }

    fn duplicates(&self) -> usize {
        self.messages.len() - self.ids().len()
    }

    /// Every id answered 200 is in the queue with the bytes answered 200.
    fn assert_promise_kept(&self, ok: &HashMap<String, Vec<u8>>) {
        let ids = self.ids();
        let lost: Vec<&String> = ok.keys().filter(|id| !ids.contains(id.as_str())).collect();
        assert!(
            lost.is_empty(),
            "answered 200 but not in the queue: {lost:?}"
        );
        for (id, body) in &self.messages {
            if let Some(sent) = ok.get(id) {
                assert_eq!(body, sent, "{id}: bytes changed on the way");
            }
        }
    }
}

/// Empties `queue` until every id in `want` arrived (or [`EVENTUALLY`]),
/// then waits half a second more for late duplicates. One consumer without
/// acknowledgements: deliveries come in queue order.
async fn collect(queue: &str, want: &HashSet<String>) -> Delivered {
    use futures_util::StreamExt;
    let connection = connect_any().await;
    let channel = connection.create_channel().await.expect("channel");
    let mut deliveries = channel
        .basic_consume(
            queue.into(),
            "collect".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("basic_consume");
    let deadline = Instant::now() + EVENTUALLY;
    let mut messages = Vec::new();
    let mut seen = HashSet::new();
    loop {
        match tokio::time::timeout(Duration::from_millis(500), deliveries.next()).await {
            Ok(Some(delivery)) => {
                let delivery = delivery.expect("delivery");
                let id = delivery
                    .properties
                    .message_id()
                    .as_ref()
                    .map(|s| s.as_str().to_owned())
                    .unwrap_or_default();
                seen.insert(id.clone());
                messages.push((id, delivery.data));
            }
            Ok(None) => break,
            Err(_quiet) => {
                if want.iter().all(|w| seen.contains(w)) || Instant::now() >= deadline {
                    break;
                }
            }
        }
    }
    let _ = connection.close(200, "collected".into()).await;
    Delivered { messages }
}

// ---------------------------------------------------------------------------
// Load: signed deliveries, retried like Ocrolus retries.

fn event_body(n: usize, run: &str) -> Vec<u8> {
    format!(r#"{{"event_name":"BOOK_VERIFIED","book_pk":{n},"run":"{run}"}}"#).into_bytes()
}

/// One signed POST; `None` when the connection failed or no answer came.
async fn try_post(url: &str, id: &str, body: &[u8]) -> Option<(u16, String)> {
    let (status, _, body) = common::try_post(url, id, body, Duration::from_secs(60)).await?;
    let outcome = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v["status"].as_str().map(str::to_owned))
        .unwrap_or_default();
    Some((status, outcome))
}

/// The final answer to one delivery, after Ocrolus-style retries.
struct Answered {
    id: String,
    body: Vec<u8>,
    /// `published`, `spooled` or `duplicate` for a 200; empty otherwise.
    outcome: String,
    /// When the attempt that got the final answer was sent.
    sent: Instant,
    /// Attempts that got no answer or a 503 before the final one.
    retries: usize,
}

/// Senders that post deliveries until stopped. A delivery without an answer
/// or with a 503 is sent again with the same id and body, as Ocrolus does.
struct Load {
    stop: Arc<AtomicBool>,
    answered: Arc<Mutex<Vec<Answered>>>,
    /// Why a sender gave up, if one did: the waits below fail at once with
    /// it instead of timing out on a load that silently shrank or stopped.
    gave_up: Arc<Mutex<Option<String>>>,
    senders: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(url: &str, senders: usize, pause: Duration, run: &str) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let answered = Arc::new(Mutex::new(Vec::new()));
        let gave_up = Arc::new(Mutex::new(None));
        let next = Arc::new(AtomicUsize::new(0));
        let senders = (0..senders)
            .map(|_| {
                let (stop, answered, next) = (stop.clone(), answered.clone(), next.clone());
                let gave_up = gave_up.clone();
                let (url, run) = (url.to_owned(), run.to_owned());
                tokio::spawn(async move {
                    while !stop.load(Ordering::SeqCst) {
                        let n = next.fetch_add(1, Ordering::SeqCst);
                        let (id, body) = (new_id(), event_body(n, &run));
                        let mut retries = 0;
                        loop {
                            let sent = Instant::now();
                            match try_post(&url, &id, &body).await {
                                Some((200, outcome)) => {
                                    answered.lock().expect("answers").push(Answered {
                                        id,
                                        body,
                                        outcome,
                                        sent,
                                        retries,
                                    });
                                    break;
                                }
                                Some((503, _)) | None if retries < 100 => {
                                    retries += 1;
                                    tokio::time::sleep(Duration::from_millis(100)).await;
                                }
                                other => {
                                    let why = format!(
                                        "{id}: unexpected final answer {other:?} after {retries} retries"
                                    );
                                    gave_up.lock().expect("gave_up").get_or_insert(why);
                                    return;
                                }
                            }
                        }
                        tokio::time::sleep(pause).await;
                    }
                })
            })
            .collect();
        Self {
            stop,
            answered,
            gave_up,
            senders,
        }
    }

    /// Fails the test if a sender gave up.
    fn assert_senders_alive(&self) {
        if let Some(why) = self.gave_up.lock().expect("gave_up").as_ref() {
            panic!("a load sender gave up: {why}");
        }
    }

    fn count(&self) -> usize {
        self.answered.lock().expect("answers").len()
    }

    /// Waits until `n` more deliveries were answered.
    async fn wait_for(&self, n: usize) {
        let target = self.count() + n;
        let deadline = Instant::now() + EVENTUALLY;
        while self.count() < target {
            self.assert_senders_alive();
            assert!(
                Instant::now() < deadline,
                "load stalled at {}",
                self.count()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The first delivery sent after `since` that was answered `published`.
    fn first_published_after(&self, since: Instant) -> Option<Duration> {
        self.answered
            .lock()
            .expect("answers")
            .iter()
            .filter(|a| a.sent >= since && a.outcome == "published")
            .map(|a| a.sent - since)
            .min()
    }

    /// Counts by outcome of the deliveries sent after `since`.
    fn outcomes_since(&self, since: Instant) -> String {
        let answered = self.answered.lock().expect("answers");
        let mut counts: HashMap<&str, usize> = HashMap::new();
        for a in answered.iter().filter(|a| a.sent >= since) {
            *counts.entry(a.outcome.as_str()).or_default() += 1;
        }
        let mut parts: Vec<String> = counts.iter().map(|(k, v)| format!("{k}={v}")).collect();
        parts.sort();
        parts.join(" ")
    }

    async fn finish(mut self) -> Vec<Answered> {
        self.stop.store(true, Ordering::SeqCst);
        for s in std::mem::take(&mut self.senders) {
            s.await.expect("sender");
        }
        self.assert_senders_alive();
        std::mem::take(&mut *self.answered.lock().expect("answers"))
    }
}

/// Counts by outcome, for the printed figures.
fn outcomes(answers: &[Answered]) -> String {
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for a in answers {
        *counts.entry(a.outcome.as_str()).or_default() += 1;
    }
    let retried = answers.iter().filter(|a| a.retries > 0).count();
    let mut parts: Vec<String> = counts.iter().map(|(k, v)| format!("{k}={v}")).collect();
    parts.sort();
    format!("{} retried={retried}", parts.join(" "))
}

fn ok_map(answers: &[Answered]) -> HashMap<String, Vec<u8>> {
    answers
        .iter()
        .map(|a| (a.id.clone(), a.body.clone()))
        .collect()
}

/// Flags that take rate limiting out of the way (the load comes from one
/// address on purpose).
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

/// Waits until the in-process relay is connected and its spool is empty.
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

// ---------------------------------------------------------------------------
// 1. Node loss under load: stop_app, then a hard kill.

#[derive(Debug, Clone, Copy)]
enum NodeStop {
    /// `rabbitmqctl stop_app`: the node closes its connections cleanly.
    StopApp,
    /// `kill -9` of the node's Erlang VM: sockets reset, nothing said.
    Kill,
}

async fn node_loss_under_load(how: NodeStop) {
    let Some(_cluster) = cluster().await else {
        return;
    };
    let relay = TestRelay::start(RelayOptions {
        amqp_url: cluster_urls(),
        extra: unthrottled(),
        ..RelayOptions::default()
    })
    .await;
    assert!(
        relay.wait_broker_up(EVENTUALLY).await,
        "relay never connected"
    );
    let broker = relay.relay().state().outbox.broker.clone();
    // The queue's leader on the node the relay publishes to, so that the
    // stop takes both: the worst case, where the remaining nodes elect a
    // new leader before they confirm anything.
    let relay_node = node_index(&broker.connected_node().expect("connected"));
    let through = Connection::connect(
        &node_url(NODE_PORTS[relay_node - 1]),
        ConnectionProperties::default(),
    )
    .await
    .expect("connect to the relay's node");
    let queue = quorum_queue_led_by(through, &relay.exchange, &relay.alternate).await;
    let leader = wait_three_members(relay_node, &queue).await;
    let run = unique("node-loss");

    let load = Load::start(&relay.url, 4, Duration::from_millis(10), &run);
    load.wait_for(200).await;
    let victim = broker.connected_node().expect("connected");
    let n = node_index(&victim);
    // Watches the link: when the relay lost the victim, and when it had
    // another node.
    let watcher = {
        let (broker, victim) = (broker.clone(), victim.clone());
        tokio::spawn(async move {
            let mut lost = None;
            loop {
                match broker.connected_node() {
                    Some(node) if node == victim => {}
                    Some(node) => {
                        let now = Instant::now();
                        return (lost.unwrap_or(now), now, node);
                    }
                    None => {
                        lost.get_or_insert_with(Instant::now);
                    }
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    let stopped = Instant::now();
    match how {
        NodeStop::StopApp => {
            script(&["ctl", &n.to_string(), "stop_app"]).await;
        }
        NodeStop::Kill => {
            let pid = script(&["pid", &n.to_string()]).await;
            let status = Command::new("kill")
                .args(["-9", pid.trim()])
                .status()
                .expect("kill -9");
            assert!(status.success(), "kill -9 {pid}");
        }
    }
    let stop_took = stopped.elapsed();
    let (lost, reconnected, moved_to) = tokio::time::timeout(EVENTUALLY, watcher)
        .await
        .expect("the relay never moved to another node")
        .expect("watcher");
    let deadline = Instant::now() + EVENTUALLY;
    let recovered = loop {
        if let Some(after) = load.first_published_after(lost) {
            break after;
        }
        load.assert_senders_alive();
        assert!(
            Instant::now() < deadline,
            "never published again after the loss; answers sent since: [{}]",
            load.outcomes_since(lost)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let link_down = reconnected - lost;
    // Steady load on the remaining two nodes, then the node rejoins under
    // load.
    load.wait_for(300).await;
    let rejoin = Instant::now();
    script(&["start"]).await;
    let rejoin_took = rejoin.elapsed();
    load.wait_for(200).await;
    let answers = load.finish().await;
    let drained_in = wait_drained(&relay).await;

    let ok = ok_map(&answers);
    let want: HashSet<String> = ok.keys().cloned().collect();
    let delivered = collect(&queue, &want).await;
    eprintln!(
        "node loss ({how:?}): stopped {victim} (command took {stop_took:?}; the queue's leader \
         was {leader}); the relay lost it \
         {:?} after the command began, was on {moved_to} {link_down:?} later; first `published` \
         sent {recovered:?} after the loss; rejoin took {rejoin_took:?}; \
         answered200={} [{}] in_queue={} unique={} duplicates={} lost=0 drained_in={drained_in:?}",
        lost.saturating_duration_since(stopped),
        answers.len(),
        outcomes(&answers),
        delivered.messages.len(),
        delivered.ids().len(),
        delivered.duplicates(),
    );
    delivered.assert_promise_kept(&ok);
    assert_ne!(moved_to, victim, "the relay left the stopped node");
    assert!(
        recovered <= RECOVERY_BOUND,
        "new events were published again only {recovered:?} after the stop"
    );

    cleanup(&queue, &relay.exchange, &relay.alternate).await;
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cluster_node_stop_app_under_load_loses_nothing() {
    node_loss_under_load(NodeStop::StopApp).await;
}

/// With the queue's leader on the killed node, the relay reaches another
/// node before the new leader is elected; RabbitMQ then nacked every publish
/// on the channels opened in that window, for minutes, and the relay (which
/// did not count nacks as a broken link) spooled everything while connected.
/// tests/resilience.rs has the focused test of the fix.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cluster_node_hard_kill_under_load_loses_nothing() {
    node_loss_under_load(NodeStop::Kill).await;
}

// ---------------------------------------------------------------------------
// 2. The whole cluster down under load.

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cluster_whole_cluster_down_spools_then_delivers_in_arrival_order() {
    let Some(_cluster) = cluster().await else {
        return;
    };
    let relay = TestRelay::start(RelayOptions {
        amqp_url: cluster_urls(),
        extra: unthrottled(),
        ..RelayOptions::default()
    })
    .await;
    assert!(
        relay.wait_broker_up(EVENTUALLY).await,
        "relay never connected"
    );
    let queue = quorum_queue(&relay.exchange, &relay.alternate).await;
    let broker = &relay.relay().state().outbox.broker;
    let run = unique("cluster-down");

    let stops: Vec<_> = (1..=3)
        .map(|n| tokio::spawn(async move { script(&["ctl", &n.to_string(), "stop_app"]).await }))
        .collect();
    for s in stops {
        s.await.expect("stop_app");
    }
    let deadline = Instant::now() + EVENTUALLY;
    while broker.is_up() {
        assert!(Instant::now() < deadline, "relay still connected");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // One sender, one delivery at a time: arrival order is send order.
    let down = Instant::now();
    let load = Load::start(&relay.url, 1, Duration::ZERO, &run);
    tokio::time::sleep(CLUSTER_OUTAGE).await;
    let answers = load.finish().await;
    let outage = down.elapsed();
    let spooled = answers.iter().filter(|a| a.outcome == "spooled").count();
    assert_eq!(
        spooled,
        answers.len(),
        "every 200 during the outage is `spooled` [{}]",
        outcomes(&answers)
    );
    let restart = Instant::now();
    script(&["start"]).await;
    let restart_took = restart.elapsed();
    let drained_in = wait_drained(&relay).await;

    let ok = ok_map(&answers);
    let want: HashSet<String> = ok.keys().cloned().collect();
    let delivered = collect(&queue, &want).await;
    let arrival: Vec<&str> = answers.iter().map(|a| a.id.as_str()).collect();
    let mut first_seen = HashSet::new();
    let queue_order: Vec<&str> = delivered
        .messages
        .iter()
        .map(|(id, _)| id.as_str())
        .filter(|id| first_seen.insert(*id))
        .collect();
    eprintln!(
        "whole cluster down: outage {outage:?} under load, answered200={} spooled={spooled}; \
         cluster restart took {restart_took:?}, spool drained {drained_in:?} after; \
         in_queue={} duplicates={} in_arrival_order={} lost=0",
        answers.len(),
        delivered.messages.len(),
        delivered.duplicates(),
        queue_order == arrival,
    );
    delivered.assert_promise_kept(&ok);
    assert_eq!(
        queue_order, arrival,
        "spooled events arrive in arrival order"
    );

    cleanup(&queue, &relay.exchange, &relay.alternate).await;
    relay.shutdown().await;
}

// ---------------------------------------------------------------------------
// 3. Two relay replicas (the binary) behind a load balancer; kill -9 one.

/// A TCP load balancer: each connection goes to the next backend in turn;
/// a backend that refuses is skipped (as a health-checking balancer would).
struct Balancer {
    addr: SocketAddr,
    backends: Arc<Mutex<Vec<SocketAddr>>>,
}

impl Balancer {
    async fn start(backends: Vec<SocketAddr>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let backends = Arc::new(Mutex::new(backends));
        let list = backends.clone();
        tokio::spawn(async move {
            let mut turn = 0usize;
            loop {
                let Ok((mut client, _)) = listener.accept().await else {
                    return;
                };
                let candidates = list.lock().expect("backends").clone();
                turn += 1;
                let start = turn;
                tokio::spawn(async move {
                    for i in 0..candidates.len() {
                        let backend = candidates[(start + i) % candidates.len()];
                        if let Ok(mut server) = TcpStream::connect(backend).await {
                            let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                            return;
                        }
                    }
                });
            }
        });
        Self { addr, backends }
    }

    fn replace(&self, old: SocketAddr, new: SocketAddr) {
        for b in self.backends.lock().expect("backends").iter_mut() {
            if *b == old {
                *b = new;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cluster_replica_kill_dash_nine_under_load_loses_nothing() {
    let Some(_cluster) = cluster().await else {
        return;
    };
    let exchange = unique("test.events");
    let alternate = format!("{exchange}.unrouted");
    let queue = quorum_queue(&exchange, &alternate).await;
    let dirs = [
        tempfile::tempdir().expect("tempdir"),
        tempfile::tempdir().expect("tempdir"),
    ];
    let args = |dir: &Path| {
        let opts = RelayOptions {
            amqp_url: cluster_urls(),
            extra: unthrottled(),
            ..RelayOptions::default()
        };
        serve_args(&opts, dir, &exchange, &alternate, &dir.join("spool"))
    };
    let mut a = RelayBinary::start(&args(dirs[0].path())).await;
    let b = RelayBinary::start(&args(dirs[1].path())).await;
    let lb = Balancer::start(vec![a.listen, b.listen]).await;
    let run = unique("replica-kill");

    let load = Load::start(
        &format!("http://{}/webhooks/ocrolus", lb.addr),
        8,
        Duration::from_millis(5),
        &run,
    );
    load.wait_for(300).await;
    let killed = Instant::now();
    a.kill9();
    load.wait_for(300).await;
    let a_listen = a.listen;
    drop(a);
    let restarted = RelayBinary::start(&args(dirs[0].path())).await;
    let restart_took = killed.elapsed();
    lb.replace(a_listen, restarted.listen);
    load.wait_for(300).await;
    let answers = load.finish().await;
    let drained_a = restarted.wait_drained(EVENTUALLY).await;
    let drained_b = b.wait_drained(EVENTUALLY).await;

    let ok = ok_map(&answers);
    let want: HashSet<String> = ok.keys().cloned().collect();
    let delivered = collect(&queue, &want).await;
    let duplicate_answers = answers.iter().filter(|a| a.outcome == "duplicate").count();
    eprintln!(
        "replica kill -9: answered200={} [{}] ({duplicate_answers} answered `duplicate` by the replica that \
         had it); replica back after {restart_took:?}; in_queue={} unique={} duplicate_messages={} \
         ({:.3}% of deliveries) lost=0 drained_in={:?}",
        answers.len(),
        outcomes(&answers),
        delivered.messages.len(),
        delivered.ids().len(),
        delivered.duplicates(),
        100.0 * delivered.duplicates() as f64 / answers.len().max(1) as f64,
        drained_a.max(drained_b),
    );
    delivered.assert_promise_kept(&ok);

    cleanup(&queue, &exchange, &alternate).await;
}

// ---------------------------------------------------------------------------
// 4. A dead replica's spool, drained from elsewhere with `spool replay`.

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cluster_spool_replay_drains_a_dead_replicas_spool_through_the_node_list() {
    let Some(_cluster) = cluster().await else {
        return;
    };
    let exchange = unique("test.events");
    let alternate = format!("{exchange}.unrouted");
    let queue = quorum_queue(&exchange, &alternate).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let spool_dir = dir.path().join("spool");
    // A replica that never reaches a broker spools everything, then dies.
    let opts = RelayOptions {
        amqp_url: "amqp://guest:guest@127.0.0.1:1/%2f".into(),
        extra: unthrottled(),
        ..RelayOptions::default()
    };
    let mut replica = RelayBinary::start(&serve_args(
        &opts,
        dir.path(),
        &exchange,
        &alternate,
        &spool_dir,
    ))
    .await;
    let run = unique("replay");
    let url = format!("http://{}/webhooks/ocrolus", replica.listen);
    let mut ok = HashMap::new();
    for n in 0..50 {
        let (id, body) = (new_id(), event_body(n, &run));
        let answer = try_post(&url, &id, &body).await;
        assert_eq!(answer, Some((200, "spooled".to_owned())));
        ok.insert(id, body);
    }
    replica.kill9();

    // The first address is dead: replay moves on to the cluster's nodes.
    let urls = format!("amqp://guest:guest@127.0.0.1:1/%2f,{}", cluster_urls());
    let out = tokio::process::Command::new(BIN)
        .args(["spool", "--spool-dir"])
        .arg(&spool_dir)
        .args(["replay", "--exchange", &exchange, "--amqp-url", &urls])
        .output()
        .await
        .expect("spool replay");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "spool replay failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains(r#""replayed":50"#), "{stdout}");
    let want: HashSet<String> = ok.keys().cloned().collect();
    let delivered = collect(&queue, &want).await;
    eprintln!(
        "spool replay of a dead replica: replayed=50 in_queue={} duplicates={}",
        delivered.messages.len(),
        delivered.duplicates()
    );
    delivered.assert_promise_kept(&ok);
    cleanup(&queue, &exchange, &alternate).await;
}

// ---------------------------------------------------------------------------
// 5. amqps with mutual TLS, certificates made here.

/// A client key and certificate signed by the cluster's CA (`openssl`, with
/// the CA key the cluster script leaves for tests).
fn client_certificate(dir: &Path) -> (PathBuf, PathBuf) {
    let tls = cluster_dir().join("tls");
    let (key, csr, cert) = (
        dir.join("client.key"),
        dir.join("client.csr"),
        dir.join("client.pem"),
    );
    let ok = Command::new("openssl")
        .args([
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=ocrolus-relay-test",
        ])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&csr)
        .stderr(Stdio::null())
        .status()
        .expect("openssl req");
    assert!(ok.success(), "openssl req");
    // Extensions make it an X.509 v3 certificate (webpki refuses v1).
    let ext = dir.join("client.ext");
    std::fs::write(
        &ext,
        "basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n",
    )
    .expect("write extensions");
    let ok = Command::new("openssl")
        .args(["x509", "-req", "-days", "1", "-extfile"])
        .arg(&ext)
        .arg("-set_serial")
        .arg(rand::random::<u32>().to_string())
        .arg("-in")
        .arg(&csr)
        .arg("-CA")
        .arg(tls.join("ca.pem"))
        .arg("-CAkey")
        .arg(tls.join("ca.key"))
        .arg("-out")
        .arg(&cert)
        .stderr(Stdio::null())
        .status()
        .expect("openssl x509");
    assert!(ok.success(), "openssl x509 -req");
    (cert, key)
}

fn tls_flags(ca: &Path, client: Option<&(PathBuf, PathBuf)>) -> Vec<String> {
    let mut flags = unthrottled();
    flags.extend(["--amqp-ca-file".into(), ca.display().to_string()]);
    if let Some((cert, key)) = client {
        flags.extend([
            "--amqp-client-cert".into(),
            cert.display().to_string(),
            "--amqp-client-key".into(),
            key.display().to_string(),
        ]);
    }
    flags
}

async fn readyz(admin: SocketAddr) -> (u16, serde_json::Value) {
    let (status, _, body) = get(&format!("http://{admin}/readyz")).await;
    (status, serde_json::from_slice(&body).expect("readyz json"))
}

/// Waits for `/readyz` to answer 503 with a reason containing `needle`.
async fn wait_not_ready(relay: &TestRelay, needle: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, body) = readyz(relay.admin).await;
        let reason = body["reason"].as_str().unwrap_or_default().to_owned();
        if status == 503 && reason.contains(needle) {
            return reason;
        }
        assert!(
            Instant::now() < deadline,
            "readyz never reported {needle:?}: {status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cluster_amqps_with_mutual_tls_publishes() {
    let Some(_cluster) = cluster().await else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let client = client_certificate(dir.path());
    let relay = TestRelay::start(RelayOptions {
        amqp_url: TLS_URL.into(),
        extra: tls_flags(&cluster_dir().join("tls/ca.pem"), Some(&client)),
        ..RelayOptions::default()
    })
    .await;
    assert!(
        relay.wait_broker_up(Duration::from_secs(60)).await,
        "no amqps link: {:?}",
        readyz(relay.admin).await
    );
    let broker = &relay.relay().state().outbox.broker;
    assert_eq!(broker.connected_node().as_deref(), Some("localhost:5691"));
    let queue = quorum_queue(&relay.exchange, &relay.alternate).await;
    let (id, body) = (new_id(), event_body(1, "tls"));
    let (status, _, answer) = post_signed(&relay, &id, &body).await;
    assert_eq!(status, 200);
    assert!(
        String::from_utf8_lossy(&answer).contains(r#""published""#),
        "{answer:?}"
    );
    let delivered = collect(&queue, &HashSet::from([id.clone()])).await;
    delivered.assert_promise_kept(&HashMap::from([(id, body)]));
    assert_eq!(delivered.messages.len(), 1);
    assert_eq!(readyz(relay.admin).await.0, 200);
    cleanup(&queue, &relay.exchange, &relay.alternate).await;
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cluster_amqps_with_a_wrong_ca_is_a_readiness_error() {
    let Some(_cluster) = cluster().await else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let client = client_certificate(dir.path());
    // A CA made here that signed nothing the broker presents.
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let key = rcgen::KeyPair::generate().expect("key");
    let wrong_ca = params.self_signed(&key).expect("self-signed CA");
    let wrong = dir.path().join("wrong-ca.pem");
    std::fs::write(&wrong, wrong_ca.pem()).expect("write");
    let relay = TestRelay::start(RelayOptions {
        amqp_url: TLS_URL.into(),
        extra: tls_flags(&wrong, Some(&client)),
        ..RelayOptions::default()
    })
    .await;
    let reason = wait_not_ready(&relay, "refuses").await;
    let rejected = relay
        .metric(r#"ocrolus_relay_broker_connect_failures_total{reason="rejected"}"#)
        .await;
    eprintln!("wrong CA: readyz reason {reason:?}, rejected connects {rejected}");
    assert!(reason.contains("localhost:5691"), "{reason}");
    assert!(rejected >= 1.0);
    assert!(!relay.relay().state().outbox.broker.is_up());
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cluster_amqps_without_a_client_certificate_is_a_readiness_error() {
    let Some(_cluster) = cluster().await else {
        return;
    };
    let relay = TestRelay::start(RelayOptions {
        amqp_url: TLS_URL.into(),
        extra: tls_flags(&cluster_dir().join("tls/ca.pem"), None),
        ..RelayOptions::default()
    })
    .await;
    let reason = wait_not_ready(&relay, "refuses").await;
    eprintln!("no client certificate: readyz reason {reason:?}");
    assert!(!relay.relay().state().outbox.broker.is_up());
    relay.shutdown().await;
}

#[tokio::test]
async fn cluster_a_missing_client_certificate_file_stops_the_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let opts = RelayOptions {
        amqp_url: TLS_URL.into(),
        extra: vec![
            "--amqp-client-cert".into(),
            dir.path().join("absent.pem").display().to_string(),
            "--amqp-client-key".into(),
            dir.path().join("absent.key").display().to_string(),
        ],
        ..RelayOptions::default()
    };
    let args = serve_args(
        &opts,
        dir.path(),
        "test.events",
        "",
        &dir.path().join("spool"),
    );
    let out = tokio::process::Command::new(BIN)
        .arg("serve")
        .args(&args)
        .output()
        .await
        .expect("run relay");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "started without its client certificate"
    );
    assert!(stderr.contains("--amqp-client-cert"), "{stderr}");
}

// ---------------------------------------------------------------------------
// 6. `tail` and the example consumers: the node list and amqps.

/// The compiled `examples/consumer.rs`, next to the relay binary (cargo
/// test builds examples; `scripts/test.sh` builds them first).
fn rust_consumer() -> PathBuf {
    let dir = Path::new(BIN).parent().expect("binary directory");
    let path = dir
        .join("examples")
        .join(format!("consumer{}", std::env::consts::EXE_SUFFIX));
    assert!(
        path.exists(),
        "{} is missing: `cargo build --example consumer` first",
        path.display()
    );
    path
}

/// True when `python3 -c 'import pika'` works (`scripts/test.sh` installs
/// examples/requirements.txt); the Python consumer is skipped otherwise.
async fn python_has_pika() -> bool {
    let ok = tokio::process::Command::new("python3")
        .args(["-c", "import pika"])
        .output()
        .await
        .is_ok_and(|o| o.status.success());
    if !ok {
        eprintln!("SKIPPED (Python consumer only): python3 with pika is not installed");
    }
    ok
}

/// Broker flags shared by `tail` and both example consumers.
fn broker_flags(urls: &str, tls: Option<(&Path, &(PathBuf, PathBuf))>) -> Vec<String> {
    let mut flags = vec!["--amqp-url".to_owned(), urls.to_owned()];
    if let Some((ca, (cert, key))) = tls {
        for (flag, path) in [
            ("--amqp-ca-file", ca),
            ("--amqp-client-cert", cert.as_path()),
            ("--amqp-client-key", key.as_path()),
        ] {
            flags.extend([flag.to_owned(), path.display().to_string()]);
        }
    }
    flags
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cluster_tail_and_example_consumers_take_the_node_list_and_amqps() {
    let Some(_cluster) = cluster().await else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let client = client_certificate(dir.path());
    let ca = cluster_dir().join("tls/ca.pem");
    let exchange = unique("test.events");
    let alternate = format!("{exchange}.unrouted");
    let watch = quorum_queue(&exchange, &alternate).await;
    let python = python_has_pika().await;
    // Port 1 refuses: the first node of the list is down.
    let first_down = format!("amqp://guest:guest@127.0.0.1:1/%2f,{}", cluster_urls());
    let connection = connect_any().await;
    let channel = connection.create_channel().await.expect("channel");
    for (case, urls, tls) in [
        ("first node down", first_down.as_str(), None),
        ("amqps, mutual TLS", TLS_URL, Some((ca.as_path(), &client))),
    ] {
        let flags = broker_flags(urls, tls);
        let queue = |who: &str| unique(&format!("test.{who}"));
        let mut tail = spawn_lines(
            tokio::process::Command::new(BIN)
                .arg("tail")
                .args(&flags)
                .args(["--exchange", &exchange, "--max", "1"])
                .env("RUST_LOG", "warn"),
        );
        let rust_queue = queue("consumer-rs");
        let rust_dlx = format!("{rust_queue}.dlx");
        let mut consumers = vec![(
            "examples/consumer.rs",
            rust_queue.clone(),
            rust_dlx.clone(),
            spawn_lines(
                tokio::process::Command::new(rust_consumer())
                    .args(&flags)
                    .args(["--exchange", &exchange, "--queue", &rust_queue])
                    .args(["--dead-letter-exchange", &rust_dlx])
                    .args(["--binding", "#", "--max-messages", "1"])
                    .env_remove("AMQP_URL")
                    .env_remove("RELAY_AMQP_URL"),
            ),
        )];
        if python {
            let py_queue = queue("consumer-py");
            let py_dlx = format!("{py_queue}.dlx");
            let child = spawn_lines(
                tokio::process::Command::new("python3")
                    .arg("-u")
                    .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/consumer.py"))
                    .args(&flags)
                    .args(["--exchange", &exchange, "--queue", &py_queue])
                    .args(["--dead-letter-exchange", &py_dlx])
                    .args(["--binding", "#", "--max-messages", "1"])
                    .env("PYTHONDONTWRITEBYTECODE", "1")
                    .env_remove("AMQP_URL")
                    .env_remove("RELAY_AMQP_URL"),
            );
            consumers.push(("examples/consumer.py", py_queue, py_dlx, child));
        }
        assert!(
            tail.stderr_until("tailing exchange", Duration::from_secs(60))
                .await,
            "{case}: tail never bound its queue: {:?}",
            tail.stderr_seen
        );
        for (who, queue, _, child) in &consumers {
            assert!(
                wait_for_consumer(&connection, queue, Duration::from_secs(60)).await,
                "{case}: {who} never consumed {queue}: {:?}",
                child.stderr_seen
            );
        }

        let id = new_id();
        let body = event_body(1, case);
        channel
            .basic_publish(
                exchange.as_str().into(),
                "book.verified".into(),
                lapin::options::BasicPublishOptions::default(),
                &body,
                lapin::BasicProperties::default().with_message_id(id.as_str().into()),
            )
            .await
            .expect("publish")
            .await
            .expect("confirm");

        let made: Vec<(String, String)> = consumers
            .iter()
            .map(|(_, queue, dlx, _)| (queue.clone(), dlx.clone()))
            .collect();
        let mut readers = vec![("tail", tail)];
        readers.extend(consumers.into_iter().map(|(who, _, _, child)| (who, child)));
        for (who, mut child) in readers {
            let line = child.next_stdout(Duration::from_secs(60)).await;
            let (exit, _, stderr) = child.finish(Duration::from_secs(30)).await;
            let line = line.unwrap_or_else(|| panic!("{case}: {who} printed nothing: {stderr:?}"));
            let printed: serde_json::Value = serde_json::from_str(&line).expect("a JSON line");
            assert_eq!(printed["message_id"], id.as_str(), "{case}: {who}: {line}");
            assert!(
                exit.is_some_and(|s| s.success()),
                "{case}: {who} exits 0 after one message: {exit:?} {stderr:?}"
            );
            eprintln!("{case}: {who} received {id}");
        }
        // The consumers' queues and dead-letter topology.
        for (queue, dlx) in made {
            for q in [queue.clone(), format!("{queue}.dead-letter")] {
                let _ = channel
                    .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                    .await;
            }
            let _ = channel
                .exchange_delete(dlx.as_str().into(), Default::default())
                .await;
        }
    }
    let _ = connection.close(200, "done".into()).await;
    cleanup(&watch, &exchange, &alternate).await;
}
