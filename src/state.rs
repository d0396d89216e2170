//! The shared state every request and the admin listener read: the
//! configuration, the reloadable policy and certificate, admission, the
//! de-duplication window and the outbox. Built by `app`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use arc_swap::{ArcSwap, ArcSwapOption};
use tracing::{error, info};

use crate::config::{Config, Policy};
use crate::config_error::ConfigError;
use crate::dedup::Dedup;
use crate::limits::Admission;
use crate::metrics::{Metrics, ReloadResult};
use crate::outbox::Outbox;
use crate::tls::Tls;

/// Everything a request needs, shared by all connections.
pub struct AppState {
    pub config: Config,
    policy: ArcSwap<Policy>,
    tls: ArcSwapOption<Tls>,
    pub admission: Admission,
    pub dedup: Arc<Dedup>,
    pub outbox: Outbox,
    pub metrics: Arc<Metrics>,
    draining: AtomicBool,
}

impl AppState {
    pub fn new(
        config: Config,
        policy: Policy,
        tls: Option<Tls>,
        dedup: Arc<Dedup>,
        outbox: Outbox,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            admission: Admission::new(&config.limits),
            config,
            policy: ArcSwap::from_pointee(policy),
            tls: ArcSwapOption::new(tls.map(Arc::new)),
            dedup,
            outbox,
            metrics,
            draining: AtomicBool::new(false),
        }
    }

    /// The current network and auth policy (swapped atomically on reload).
    pub fn policy(&self) -> Arc<Policy> {
        self.policy.load_full()
    }

    pub fn tls(&self) -> Option<Arc<Tls>> {
        self.tls.load_full()
    }

    /// SIGHUP: re-reads allowlist, secrets and certificate. All or nothing:
    /// a bad file leaves the running configuration untouched.
    pub fn reload(&self) -> Result<(), ConfigError> {
        let result = self.config.sources.load_policy().and_then(|policy| {
            let tls = self
                .config
                .sources
                .tls
                .as_ref()
                .map(Tls::load)
                .transpose()?;
            Ok((policy, tls))
        });
        match result {
            Ok((policy, tls)) => {
                self.policy.store(Arc::new(policy));
                if let Some(tls) = tls {
                    self.metrics.set_cert_expiry(tls.not_after);
                    self.tls.store(Some(Arc::new(tls)));
                }
                self.metrics
                    .config_reloads
                    .with_label_values(&[ReloadResult::Success.as_str()])
                    .inc();
                self.metrics.config_last_reload_ok.set(1);
                info!("configuration reloaded");
                Ok(())
            }
            Err(e) => {
                self.metrics
                    .config_reloads
                    .with_label_values(&[ReloadResult::Failure.as_str()])
                    .inc();
                self.metrics.config_last_reload_ok.set(0);
                error!(error = %e, "reload rejected; keeping the running configuration");
                Err(e)
            }
        }
    }

    /// What `GET /secrets` shows: per source, counts and fingerprints.
    pub fn secrets_status(&self) -> serde_json::Value {
        let policy = self.policy();
        policy
            .sources
            .iter()
            .map(|source| {
                serde_json::json!({
                    "name": source.name,
                    "path": source.path,
                    "hmac_secrets": source.auth.hmac_secrets(),
                    "fingerprints": source.auth.secret_fingerprints(),
                    "basic_credentials": source.auth.basic_credentials(),
                })
            })
            .collect()
    }

    /// `/readyz`: can an event be made safe right now? A pure read; the
    /// `ready` gauge is set from it when metrics are scraped.
    ///
    /// A node refusing our TLS or credentials is a configuration error: not
    /// ready, with the reason, rather than a relay that silently spools.
    pub fn readiness(&self) -> Result<(), String> {
        if self.draining.load(Ordering::Relaxed) {
            Err("draining".to_owned())
        } else if let Some(rejected) = self.outbox.broker.rejected() {
            Err(format!("broker refuses the relay: {rejected}"))
        } else if !self.outbox.can_accept() {
            Err("broker down and spool full".to_owned())
        } else {
            Ok(())
        }
    }

    /// Shutdown has begun: readiness answers 503 from now on.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }
}
