//! The bounded soak: for `SOAK_SECS` (60) at once,
//! a flood of rejected requests from a non-allowlisted address (127.0.0.2)
//! over many connections, a steady stream of genuine signed deliveries, a
//! poison event (its queue is a full `reject-publish` queue) and a broker
//! stall. It reports the genuine p99, the count lost (must be 0), the
//! relay's peak RSS and the bytes it logged. A figure-printing benchmark,
//! not a CI test: `bench/soak.sh` runs it (ignored by `cargo test`).
//!
//! Knobs (environment): `SOAK_SECS` (60), `SOAK_FLOOD_CONNS` (64 at once),
//! `SOAK_FLOOD_RATE` (rejected requests per second in total, 1000),
//! `SOAK_GENUINE_RATE` (deliveries per second, 20), `SOAK_STALL_AT` (20 s)
//! and `SOAK_STALL_SECS` (10 s).

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use lapin::options::{QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpSocket;

fn knob(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// One signed POST; `None` when no answer came (refused, reset, 30 s).
async fn post(url: &str, id: &str, body: &[u8]) -> Option<u16> {
    let (status, _, _) = common::try_post(url, id, body, Duration::from_secs(30)).await?;
    Some(status)
}

/// One rejected request from 127.0.0.2 on a fresh connection: `true` when
/// the relay answered (403) or closed; either way it cost a connection.
async fn flood_once(addr: std::net::SocketAddr, n: u64) -> bool {
    let attempt = async {
        let socket = TcpSocket::new_v4().ok()?;
        socket.bind("127.0.0.2:0".parse().ok()?).ok()?;
        let mut stream = socket.connect(addr).await.ok()?;
        let request = if n.is_multiple_of(2) {
            "GET / HTTP/1.1\r\nhost: relay\r\n\r\n".to_owned()
        } else {
            format!(
                "POST /webhooks/ocrolus HTTP/1.1\r\nhost: relay\r\ncontent-type: application/json\r\ncontent-length: 2\r\nwebhook-request-id: flood-{n}\r\n\r\n{{}}"
            )
        };
        let _ = stream.write_all(request.as_bytes()).await;
        let mut buf = [0u8; 512];
        let _ = stream.read(&mut buf).await;
        Some(())
    };
    tokio::time::timeout(Duration::from_secs(2), attempt)
        .await
        .ok()
        .flatten()
        .is_some()
}

/// Resident set size and its peak, in KiB, from /proc.
fn rss_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let Some(end) = stat.rfind(')') else {
        return 0.0;
    };
    let fields: Vec<&str> = stat[end + 2..].split_whitespace().collect();
    let ticks: u64 = fields[11].parse().unwrap_or(0) + fields[12].parse::<u64>().unwrap_or(0);
    ticks as f64 / 100.0
}

/// The `listen` and `admin` addresses from the relay's JSON log file.
async fn wait_serving(log: &Path) -> (String, String) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        for line in text.lines() {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(line)
                && v["message"] == "ocrolus-relay serving"
            {
                return (
                    v["listen"].as_str().unwrap_or_default().to_owned(),
                    v["admin"].as_str().unwrap_or_default().to_owned(),
                );
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!(
        "relay did not start:\n{}",
        std::fs::read_to_string(log).unwrap_or_default()
    );
}

async fn metric(admin: &str, series: &str) -> f64 {
    let (_, _, body) = get(&format!("http://{admin}/metrics")).await;
    metric_value(&String::from_utf8_lossy(&body), series)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

#[derive(Default)]
struct Genuine {
    /// id → body of every delivery answered 200.
    ok: HashMap<String, Vec<u8>>,
    /// Latency of the attempt that got the 200.
    latencies: Vec<Duration>,
    sent: u64,
    retries: u64,
    gave_up: u64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "a 60 s soak that prints figures: run bench/soak.sh"]
async fn soak_flood_poison_and_stall() {
    require_broker!();
    let soak = Duration::from_secs(knob("SOAK_SECS", 60));
    let flood_conns = knob("SOAK_FLOOD_CONNS", 64);
    let flood_rate = knob("SOAK_FLOOD_RATE", 1000).max(1);
    let genuine_rate = knob("SOAK_GENUINE_RATE", 20).max(1);
    let stall_at = Duration::from_secs(knob("SOAK_STALL_AT", 20));
    let stall_for = Duration::from_secs(knob("SOAK_STALL_SECS", 10));

    let proxy = Arc::new(FaultProxy::start("127.0.0.1:5672").await);
    let dir = tempfile::tempdir().expect("tempdir");
    let exchange = unique("soak.events");
    let alternate = format!("{exchange}.unrouted");
    let dead_letter = format!("{exchange}.dead");
    let args = serve_args(
        &RelayOptions {
            amqp_url: proxy.url(),
            ..RelayOptions::default()
        },
        dir.path(),
        &exchange,
        &alternate,
        &dir.path().join("spool"),
    );
    let log_path = dir.path().join("relay.log");
    let log = std::fs::File::create(&log_path).expect("log file");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_ocrolus-relay"))
        .arg("serve")
        .args(&args)
        .args(["--log-format", "json"])
        .env(
            "RUST_LOG",
            std::env::var("SOAK_RUST_LOG").unwrap_or_else(|_| "info".into()),
        )
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn relay");
    let pid = child.id();
    let (listen, admin) = wait_serving(&log_path).await;
    let url = format!("http://{listen}/webhooks/ocrolus");
    let started = Instant::now();
    while metric(&admin, "ocrolus_relay_broker_up").await < 1.0 {
        assert!(started.elapsed() < Duration::from_secs(30), "no broker");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Genuine events go to `queue`; the poison's routing key only to a
    // full reject-publish queue, so every publish of it is nacked.
    let broker = TestBroker::connect().await;
    let queue = broker.bind_queue(&exchange, "book.verified").await;
    let full = unique("soak.full");
    let mut full_args = FieldTable::default();
    full_args.insert("x-max-length".into(), AMQPValue::LongInt(1));
    full_args.insert(
        "x-overflow".into(),
        AMQPValue::LongString("reject-publish".into()),
    );
    broker
        .channel
        .queue_declare(
            full.as_str().into(),
            QueueDeclareOptions::default(),
            full_args,
        )
        .await
        .expect("declare full queue");
    broker
        .channel
        .queue_bind(
            full.as_str().into(),
            exchange.as_str().into(),
            "plaid.upload_failed".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("bind full queue");
    let run = unique("soak");
    let poison_body = |n: u32| {
        format!(r#"{{"event_name":"plaid.upload_failed","run":"{run}","n":{n}}}"#).into_bytes()
    };
    assert_eq!(
        post(&url, &new_id(), &poison_body(0)).await,
        Some(200),
        "fills the queue"
    );

    let t0 = Instant::now();
    let deadline = t0 + soak;
    let relay_addr: std::net::SocketAddr = listen.parse().expect("listen address");

    // The flood: `flood_conns` tasks, each a fresh connection per request,
    // paced to `flood_rate` in total.
    let flooded = Arc::new(AtomicU64::new(0));
    let answered = Arc::new(AtomicU64::new(0));
    let mut flood = Vec::new();
    for task in 0..flood_conns {
        let (flooded, answered) = (flooded.clone(), answered.clone());
        let every = Duration::from_secs_f64(flood_conns as f64 / flood_rate as f64);
        flood.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut n = task;
            while Instant::now() < deadline {
                tick.tick().await;
                if flood_once(relay_addr, n).await {
                    answered.fetch_add(1, Ordering::Relaxed);
                }
                flooded.fetch_add(1, Ordering::Relaxed);
                n += flood_conns;
            }
        }));
    }

    // Genuine deliveries, each retried like Ocrolus (3 retries, 1 s apart
    // here instead of minutes).
    let genuine = Arc::new(Mutex::new(Genuine::default()));
    let sender = {
        let (genuine, url, run) = (genuine.clone(), url.clone(), run.clone());
        tokio::spawn(async move {
            let mut tick =
                tokio::time::interval(Duration::from_secs_f64(1.0 / genuine_rate as f64));
            let mut tasks = Vec::new();
            let mut n = 0u64;
            while Instant::now() < deadline {
                tick.tick().await;
                n += 1;
                let (genuine, url) = (genuine.clone(), url.clone());
                let body =
                    format!(r#"{{"event_name":"BOOK_VERIFIED","book_pk":{n},"run":"{run}"}}"#)
                        .into_bytes();
                tasks.push(tokio::spawn(async move {
                    let id = new_id();
                    genuine.lock().expect("genuine").sent += 1;
                    for attempt in 0..4 {
                        let began = Instant::now();
                        if post(&url, &id, &body).await == Some(200) {
                            let mut g = genuine.lock().expect("genuine");
                            g.latencies.push(began.elapsed());
                            g.ok.insert(id, body);
                            return;
                        }
                        if attempt < 3 {
                            genuine.lock().expect("genuine").retries += 1;
                            tokio::time::sleep(Duration::from_secs(1)).await;
                        }
                    }
                    genuine.lock().expect("genuine").gave_up += 1;
                }));
            }
            for t in tasks {
                let _ = t.await;
            }
        })
    };

    // RSS sampled every 250 ms; the kernel's high-water mark at the end.
    let peak_rss = Arc::new(AtomicU64::new(0));
    let sampler = {
        let peak_rss = peak_rss.clone();
        tokio::spawn(async move {
            while Instant::now() < deadline + Duration::from_secs(5) {
                peak_rss.fetch_max(rss_kib(pid).0, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        })
    };

    // The poison (once before the stall, once during it) and the stall.
    tokio::time::sleep_until((t0 + stall_at / 2).into()).await;
    let poisons = [(new_id(), poison_body(1)), (new_id(), poison_body(2))];
    assert_eq!(
        post(&url, &poisons[0].0, &poisons[0].1).await,
        Some(200),
        "poison 1"
    );
    tokio::time::sleep_until((t0 + stall_at).into()).await;
    proxy.stall();
    tokio::time::sleep(stall_for / 2).await;
    assert_eq!(
        post(&url, &poisons[1].0, &poisons[1].1).await,
        Some(200),
        "poison 2"
    );
    tokio::time::sleep(stall_for / 2).await;
    proxy.restore();
    let restored_at = t0.elapsed();

    sender.await.expect("sender");
    for f in flood {
        let _ = f.await;
    }
    let flood_secs = t0.elapsed().as_secs_f64();

    // Everything answered 200 must arrive; the poison in the dead letters.
    let genuine = std::mem::take(&mut *genuine.lock().expect("genuine"));
    let settle = Instant::now() + Duration::from_secs(120);
    let mut delivered: HashMap<String, Vec<u8>> = HashMap::new();
    let mut dead: HashMap<String, Vec<u8>> = HashMap::new();
    loop {
        for m in broker.drain(&queue, 0, Duration::ZERO).await {
            let id = m
                .delivery
                .properties
                .message_id()
                .as_ref()
                .map(|s| s.as_str().to_owned())
                .unwrap_or_default();
            delivered.insert(id, m.delivery.data);
        }
        for m in broker.drain(&dead_letter, 0, Duration::ZERO).await {
            let id = m
                .delivery
                .properties
                .message_id()
                .as_ref()
                .map(|s| s.as_str().to_owned())
                .unwrap_or_default();
            dead.insert(id, m.delivery.data);
        }
        let complete = genuine.ok.keys().all(|id| delivered.contains_key(id))
            && poisons.iter().all(|(id, _)| dead.contains_key(id));
        if complete || Instant::now() > settle {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let lost: Vec<&String> = genuine
        .ok
        .keys()
        .filter(|id| delivered.get(*id) != genuine.ok.get(*id))
        .collect();
    let poison_dead = poisons
        .iter()
        .filter(|(id, body)| dead.get(id) == Some(body))
        .count();
    let quarantined = metric(&admin, "ocrolus_relay_spool_quarantined_messages").await;
    // Closed at accept (peer neither allowed nor a trusted proxy), or
    // answered 403 if it got further.
    let mut rejections = 0.0;
    for reason in ["peer_not_allowed", "not_allowlisted"] {
        rejections += metric(
            &admin,
            &format!("ocrolus_relay_rejections_total{{reason=\"{reason}\"}}"),
        )
        .await;
    }
    let (_, hwm) = rss_kib(pid);
    let cpu = cpu_secs(pid);
    sampler.abort();
    let peak = peak_rss.load(Ordering::Relaxed).max(hwm);
    let _ = child.kill();
    let _ = child.wait();
    let log_text = std::fs::read_to_string(&log_path).unwrap_or_default();
    let log_bytes = log_text.len();
    let log_lines = log_text.lines().count();
    let loud = log_text
        .lines()
        .filter(|l| l.contains("\"level\":\"WARN\"") || l.contains("\"level\":\"ERROR\""))
        .count();

    let mut latencies = genuine.latencies.clone();
    latencies.sort();
    let flood_total = flooded.load(Ordering::Relaxed);
    let report = serde_json::json!({
        "soak_secs": soak.as_secs(),
        "stall": format!("{:?}..{:?}", stall_at, restored_at),
        "flood_requests": flood_total,
        "flood_rate_per_s": (flood_total as f64 / flood_secs).round(),
        "flood_answered_or_closed": answered.load(Ordering::Relaxed),
        "flood_rejections_counted": rejections,
        "genuine_sent": genuine.sent,
        "genuine_200": genuine.ok.len(),
        "genuine_retries": genuine.retries,
        "genuine_gave_up": genuine.gave_up,
        "genuine_p50_ms": percentile(&latencies, 50.0).as_secs_f64() * 1000.0,
        "genuine_p99_ms": percentile(&latencies, 99.0).as_secs_f64() * 1000.0,
        "genuine_max_ms": percentile(&latencies, 100.0).as_secs_f64() * 1000.0,
        "lost": lost.len(),
        "poison_in_dead_letter_queue": format!("{poison_dead}/{}", poisons.len()),
        "quarantined": quarantined,
        "peak_rss_mib": peak as f64 / 1024.0,
        "relay_cpu_secs": cpu,
        "log_bytes": log_bytes,
        "log_lines": log_lines,
        "log_warn_error_lines": loud,
    });
    println!("SOAK {report}");

    for name in [
        queue.as_str(),
        full.as_str(),
        dead_letter.as_str(),
        alternate.as_str(),
    ] {
        broker.delete_queue(name).await;
    }
    for name in [exchange.as_str(), dead_letter.as_str(), alternate.as_str()] {
        broker.delete_exchange(name).await;
    }
    assert!(lost.is_empty(), "answered 200 but not delivered: {lost:?}");
    assert_eq!(genuine.gave_up, 0, "a genuine delivery never got a 200");
    assert_eq!(poison_dead, poisons.len(), "the poison is dead-lettered");
}
