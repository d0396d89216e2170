//! `relay-floor`: the least any relay built on the relay's own crates must
//! do per delivery, to put a floor under the relay's CPU per request.
//!
//! hyper 1 reads the whole body over keep-alive HTTP/1.1; lapin publishes
//! it to the exchange with the relay's message properties, mandatory and
//! persistent, on confirm channels used round robin, and awaits the
//! confirm; then a 200 with a JSON body. No allowlist, signature, JSON
//! check, de-duplication, rate limit, metrics, access line or spool.
//! With `--no-publish` the body is read and answered without RabbitMQ:
//! what hyper and the kernel cost alone.
//!
//! Same allocator (jemalloc, with the relay's `.cargo/config.toml`
//! settings) and the same Tokio runtime shape (one worker per core) as the
//! relay, so `bench/run.sh`'s `floor` section can load it exactly as it
//! loads the relay and subtract: relay − floor is the relay's own code.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::Context;
use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Full};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use lapin::{Channel, Confirmation, Connection};
use ocrolus_relay::Envelope;
use relay_bench::{confirm_channels, publish_as_the_relay};
use tokio::net::TcpListener;

#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Debug, Parser)]
#[command(
    name = "relay-floor",
    about = "hyper + lapin with nothing else: the relay's floor"
)]
struct Args {
    #[arg(long, default_value = "127.0.0.1:18444")]
    listen: SocketAddr,
    #[arg(long, default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    amqp_url: String,
    /// Exchange to publish to (declared by `relay-bench setup`).
    #[arg(long, default_value = "")]
    exchange: String,
    /// Confirm channels, round robin (the relay's --publish-channels).
    #[arg(long, default_value_t = 4)]
    channels: usize,
    /// Answer without publishing: hyper and the kernel alone.
    #[arg(long)]
    no_publish: bool,
}

/// The publishing half; `None` with `--no-publish`.
struct Publisher {
    /// Held so that the channels stay open.
    _connection: Connection,
    channels: Vec<Channel>,
    next: AtomicUsize,
    exchange: String,
}

impl Publisher {
    async fn connect(args: &Args) -> anyhow::Result<Self> {
        let (connection, channels) = confirm_channels(&args.amqp_url, args.channels).await?;
        Ok(Self {
            _connection: connection,
            channels,
            next: AtomicUsize::new(0),
            exchange: args.exchange.clone(),
        })
    }

    /// Publishes like the relay (its envelope and properties, mandatory)
    /// and waits for the broker's confirm; `false` when it did not come.
    async fn publish(&self, id: String, body: Bytes) -> bool {
        let envelope = Envelope {
            id,
            routing_key: "floor".to_owned(),
            event_name: "floor".to_owned(),
            ocrolus_timestamp: None,
            client_ip: "127.0.0.1".to_owned(),
            received_at_ms: ocrolus_relay::now_ms(),
            body,
            source: "default".into(),
            exchange: None,
        };
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.channels.len();
        let confirm = publish_as_the_relay(&self.channels[i], &self.exchange, &envelope).await;
        matches!(confirm, Ok(Confirmation::Ack(None)))
    }
}

async fn handle(
    request: Request<hyper::body::Incoming>,
    publisher: Option<Arc<Publisher>>,
) -> Result<Response<Full<Bytes>>, hyper::Error> {
    // The delivery's id, as the relay takes it (the bench sends one).
    let id = request
        .headers()
        .get("webhook-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-")
        .to_owned();
    let body = request.into_body().collect().await?.to_bytes();
    let ok = match publisher {
        Some(publisher) => publisher.publish(id, body).await,
        None => true,
    };
    let (status, answer) = if ok {
        (StatusCode::OK, r#"{"id":"floor","status":"published"}"#)
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            r#"{"status":"unconfirmed"}"#,
        )
    };
    let mut response = Response::new(Full::new(Bytes::from_static(answer.as_bytes())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    Ok(response)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // One worker per core, like the relay's runtime (src/cli.rs).
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let publisher = if args.no_publish {
            None
        } else {
            Some(Arc::new(Publisher::connect(&args).await?))
        };
        let listener = TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("binding {}", args.listen))?;
        eprintln!("relay-floor listening on {}", args.listen);
        loop {
            let (stream, _) = listener.accept().await?;
            stream.set_nodelay(true)?;
            let publisher = publisher.clone();
            tokio::spawn(async move {
                let service = service_fn(move |request| handle(request, publisher.clone()));
                // Errors are the client going away; the load generator counts them.
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    })
}
