//! The shared state every request and the admin listener read: the
//! configuration, the reloadable policy and certificate, admission, the
//! de-duplication window and the outbox. Built by `app`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use arc_swap::{ArcSwap, ArcSwapOption};
use tracing::{error, info, warn};

use crate::config::{Config, Policy};
use crate::config_error::ConfigError;
use crate::config_file::{ConfigFile, changed_keys};
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
    /// The `--config` file's settings as the relay started with them.
    file_at_start: Option<BTreeMap<String, Vec<String>>>,
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
        let file_at_start = config
            .file
            .as_deref()
            .and_then(|path| ConfigFile::load(path).ok())
            .map(|file| file.snapshot());
        Self {
            file_at_start,
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
    /// a bad file leaves the running configuration untouched. The `--config`
    /// file is read again too: an invalid one fails the reload (the next
    /// restart would fail on it), and settings changed in it are named in
    /// one warning, as they take effect only after a restart.
    pub fn reload(&self) -> Result<(), ConfigError> {
        let result = self.restart_needed().and_then(|restart_keys| {
            let policy = self.config.sources.load_policy()?;
            let tls = self
                .config
                .sources
                .tls
                .as_ref()
                .map(Tls::load)
                .transpose()?;
            Ok((policy, tls, restart_keys))
        });
        match result {
            Ok((policy, tls, restart_keys)) => {
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
                if !restart_keys.is_empty() {
                    warn!(
                        keys = %restart_keys.join(", "),
                        "changed in the config file; these take effect only after a restart, the running values stay"
                    );
                }
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

    /// The `--config` file's keys that differ from the start, once the file
    /// has been read again and checked.
    fn restart_needed(&self) -> Result<Vec<String>, ConfigError> {
        let (Some(path), Some(at_start)) = (&self.config.file, &self.file_at_start) else {
            return Ok(Vec::new());
        };
        let now = ConfigFile::load_checked(path)?.snapshot();
        Ok(changed_keys(at_start, &now))
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
