//! Wiring: builds every subsystem from a validated [`Config`], starts the
//! listeners and background tasks, reloads on SIGHUP and shuts down in order.
//! Tests start whole relays through [`Relay::start`] on ephemeral ports.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::broker::Broker;
use crate::config::Config;
use crate::dedup::Dedup;
use crate::metrics::Metrics;
use crate::outbox::Outbox;
use crate::outbox::spool::Spool;
use crate::state::AppState;
use crate::tls::Tls;
use crate::{admin, server};

/// How often idle rate-limit buckets are pruned.
const PRUNE_EVERY: Duration = Duration::from_secs(60);
/// Bound for the background tasks (drainer, supervisor with its clean AMQP
/// close, admin) to stop once told to: one bound for all, not one each.
const BACKGROUND_STOP: Duration = Duration::from_secs(5);

/// A running relay.
pub struct Relay {
    pub public_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    state: Arc<AppState>,
    stop_accepting: CancellationToken,
    stop_background: CancellationToken,
    server: JoinHandle<()>,
    background: Vec<JoinHandle<()>>,
}

impl Relay {
    pub async fn start(config: Config) -> anyhow::Result<Self> {
        let metrics = Arc::new(Metrics::new());
        let policy = config.sources.load_policy()?;
        let tls = config.sources.tls.as_ref().map(Tls::load).transpose()?;
        if let Some(tls) = &tls {
            metrics.set_cert_expiry(tls.not_after);
        }
        let spool = Spool::open(config.spool.clone(), metrics.clone())?;
        let broker = Broker::new(config.broker.clone(), metrics.clone());
        for source in &config.sources.webhooks {
            metrics.add_source(&source.name);
            broker.add_source(&source.name);
        }
        let dedup = Dedup::new(&config.dedup);
        for (source, id) in spool.ids().await? {
            dedup.remember(&crate::dedup::key(&source, &id));
        }
        let public = TcpListener::bind(config.listen)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", config.listen))?;
        let admin = TcpListener::bind(config.admin_listen).await.map_err(|e| {
            anyhow::anyhow!("cannot listen on {} (admin): {e}", config.admin_listen)
        })?;
        let public_addr = public.local_addr()?;
        let admin_addr = admin.local_addr()?;

        let outbox = Outbox::new(
            broker.clone(),
            spool,
            metrics.clone(),
            config.poison.clone(),
        );
        let state = Arc::new(AppState::new(config, policy, tls, dedup, outbox, metrics));

        let stop_accepting = CancellationToken::new();
        let stop_background = CancellationToken::new();
        let background = vec![
            tokio::spawn(broker.supervise(stop_background.clone())),
            tokio::spawn(state.outbox.drain(stop_background.clone())),
            tokio::spawn(prune(state.clone(), stop_background.clone())),
            tokio::spawn(admin::serve(admin, state.clone(), stop_background.clone())),
        ];
        let server = tokio::spawn(server::serve(public, state.clone(), stop_accepting.clone()));
        info!(
            listen = %public_addr,
            admin = %admin_addr,
            tls = state.tls().is_some(),
            paths = ?state
                .config
                .sources
                .webhooks
                .iter()
                .map(|w| w.path.as_str())
                .collect::<Vec<_>>(),
            "ocrolus-relay serving"
        );
        Ok(Self {
            public_addr,
            admin_addr,
            state,
            stop_accepting,
            stop_background,
            server,
            background,
        })
    }

    pub fn state(&self) -> &Arc<AppState> {
        &self.state
    }

    /// Graceful shutdown: readiness 503 at once, keep serving for the grace
    /// period, stop accepting, let requests in flight finish within the
    /// deadline, spend what is left of the deadline flushing the spool to
    /// the broker (if it is up), then stop the drainer and close the broker
    /// connection cleanly. Undelivered events stay in the spool for the next
    /// start. Total time: grace + deadline + at most `BACKGROUND_STOP`.
    pub async fn shutdown(self) {
        self.state.start_draining();
        let grace = self.state.config.shutdown.grace;
        if !grace.is_zero() {
            info!(?grace, "draining: readiness is 503, still serving");
            tokio::time::sleep(grace).await;
        }
        let deadline = tokio::time::Instant::now() + self.state.config.shutdown.deadline;
        self.stop_accepting.cancel();
        if let Err(e) = self.server.await {
            warn!(error = %e, "public listener task failed");
        }
        self.state.outbox.flush(deadline).await;
        self.stop_background.cancel();
        let stopped = tokio::time::timeout(
            BACKGROUND_STOP,
            futures_util::future::join_all(self.background),
        )
        .await;
        if stopped.is_err() {
            warn!(?BACKGROUND_STOP, "background tasks did not stop in time");
        }
        let left = self.state.outbox.spool.stats().messages;
        self.state.outbox.spool.close().await;
        info!(spooled = left, "ocrolus-relay stopped");
    }
}

async fn prune(state: Arc<AppState>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(PRUNE_EVERY);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {
                state.admission.prune();
            }
        }
    }
}
