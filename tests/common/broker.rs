//! The broker as a consumer sees it: queues bound to a test's exchange,
//! messages read back, names cleaned up afterwards; and the check that a
//! broker is there at all.

use std::io::Write;
use std::time::Duration;

use lapin::options::{
    BasicGetOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, ConnectionProperties};

use super::unique;

pub const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
const AMQP_ADDR: &str = "127.0.0.1:5672";

/// Whether a test that needs RabbitMQ should run. Without a broker on
/// 127.0.0.1:5672 it prints why and says no, so that `cargo test` on a
/// machine without one still runs everything else; with
/// `RELAY_TEST_REQUIRE_BROKER=1` (set by `scripts/test.sh`, hence CI) a
/// missing broker fails the test instead of skipping it.
pub fn broker_available() -> bool {
    let addr = AMQP_ADDR.parse().expect("broker address");
    if std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).is_ok() {
        return true;
    }
    let test = std::thread::current()
        .name()
        .unwrap_or("this test")
        .to_owned();
    if std::env::var_os("RELAY_TEST_REQUIRE_BROKER").is_some_and(|v| v == "1") {
        panic!("{test}: RabbitMQ is not listening on {AMQP_ADDR} (RELAY_TEST_REQUIRE_BROKER=1)");
    }
    let note = format!(
        "skipped {test}: RabbitMQ is not listening on {AMQP_ADDR} (scripts/test.sh starts one)"
    );
    // libtest captures (and hides) what a passing test prints: a handle of
    // our own on the process's stderr shows the skip in every run.
    match std::fs::OpenOptions::new().append(true).open("/dev/stderr") {
        Ok(mut stderr) => {
            let _ = writeln!(stderr, "{note}");
        }
        Err(_) => eprintln!("{note}"),
    }
    false
}

/// Returns from the test (skipping it) when no broker is there; see
/// [`broker_available`].
#[macro_export]
macro_rules! require_broker {
    () => {
        if !$crate::common::broker_available() {
            return;
        }
    };
}

/// A consumer-side view of the broker for assertions.
pub struct TestBroker {
    pub connection: Connection,
    pub channel: Channel,
}

impl TestBroker {
    pub async fn connect() -> Self {
        let connection = Connection::connect(AMQP_URL, ConnectionProperties::default())
            .await
            .expect("RabbitMQ on 127.0.0.1:5672");
        let channel = connection.create_channel().await.expect("channel");
        Self {
            connection,
            channel,
        }
    }

    /// A fresh queue bound to `exchange` with `binding`. The exchange must
    /// exist (the relay declares it when it connects).
    pub async fn bind_queue(&self, exchange: &str, binding: &str) -> String {
        let queue = unique("test.queue");
        self.channel
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions {
                    durable: false,
                    auto_delete: false,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("queue_declare");
        self.channel
            .queue_bind(
                queue.as_str().into(),
                exchange.into(),
                binding.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("queue_bind");
        queue
    }

    /// Every message currently in `queue` (waits up to `within` for `expect` of them).
    pub async fn drain(
        &self,
        queue: &str,
        expect: usize,
        within: Duration,
    ) -> Vec<lapin::message::BasicGetMessage> {
        let deadline = tokio::time::Instant::now() + within;
        let mut out = Vec::new();
        loop {
            match self
                .channel
                .basic_get(queue.into(), BasicGetOptions { no_ack: true })
                .await
                .expect("basic_get")
            {
                Some(message) => out.push(message),
                None => {
                    if out.len() >= expect || tokio::time::Instant::now() >= deadline {
                        return out;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    }

    pub async fn delete_queue(&self, queue: &str) {
        let _ = self
            .channel
            .queue_delete(queue.into(), QueueDeleteOptions::default())
            .await;
    }

    pub async fn delete_exchange(&self, exchange: &str) {
        let _ = self
            .channel
            .exchange_delete(exchange.into(), ExchangeDeleteOptions::default())
            .await;
    }
}

/// Waits until `queue` exists and has at least one consumer (passive
/// declare on a fresh channel each try: a miss closes the channel).
pub async fn wait_for_consumer(connection: &Connection, queue: &str, within: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    while tokio::time::Instant::now() < deadline {
        if let Ok(channel) = connection.create_channel().await {
            let declared = channel
                .queue_declare(
                    queue.into(),
                    QueueDeclareOptions {
                        passive: true,
                        ..Default::default()
                    },
                    FieldTable::default(),
                )
                .await;
            if let Ok(q) = declared {
                let _ = channel.close(200, "ok".into()).await;
                if q.consumer_count() >= 1 {
                    return true;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}
