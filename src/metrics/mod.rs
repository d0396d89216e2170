//! Every metric the relay exports, in one registry per relay instance (tests
//! run several relays in one process). Labels come only from closed sets:
//! never client addresses, delivery ids or error strings.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

mod labels;

pub use labels::{ConnectFailureReason, Outcome, Reason, ReloadResult, Unclassified};

const PREFIX: &str = "ocrolus_relay";

/// The `source` of a request refused before its path named a source (403
/// from the allowlist, 404). Empty: Prometheus stores such a series without
/// the label, so `source` only ever holds configured names.
pub const NO_SOURCE: &str = "";

pub struct Metrics {
    registry: Registry,
    /// The process collector's standard, unprefixed `process_*` series
    /// (what every exporter's dashboards expect).
    process: Registry,
    /// By `outcome` and `source`: a configured source's name, or
    /// [`NO_SOURCE`] for requests refused before their path named one.
    pub requests: IntCounterVec,
    pub rejections: IntCounterVec,
    pub request_duration: HistogramVec,
    pub events_published: IntCounterVec,
    pub confirm_duration: Histogram,
    pub publish_failures: IntCounterVec,
    pub unclassified: IntCounterVec,
    pub dedup_conflicts: IntCounter,
    pub broker_up: IntGauge,
    pub broker_blocked: IntGauge,
    pub broker_reconnects: IntCounter,
    pub broker_connect_failures: IntCounterVec,
    pub broker_node: IntGaugeVec,
    pub spool_messages: IntGauge,
    pub spool_bytes: IntGauge,
    pub spool_oldest_age: IntGauge,
    pub spool_max_bytes: IntGauge,
    pub spool_max_messages: IntGauge,
    pub spool_drained: IntCounter,
    pub spool_errors: IntCounter,
    pub spool_dead_lettered: IntCounterVec,
    pub spool_quarantined: IntCounterVec,
    pub spool_quarantined_messages: IntGauge,
    pub spool_files_moved_aside: IntGauge,
    pub connections_open: IntGauge,
    pub connections_parked: IntGauge,
    pub connections_rejected: IntCounter,
    pub requests_in_flight: IntGauge,
    pub tls_handshake_failures: IntCounter,
    pub config_reloads: IntCounterVec,
    pub config_last_reload_ok: IntGauge,
    /// Registered by [`Metrics::set_cert_expiry`] only: a plaintext relay
    /// has no certificate, and a 0 would read as "expired in 1970".
    cert_expiry: IntGauge,
    pub ready: IntGauge,
}

/// Buckets from 0.5 ms to 10 s: publishes confirm in about a millisecond,
/// Ocrolus gives up after 5-10 s.
const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0,
];

impl Metrics {
    pub fn new() -> Self {
        let registry =
            Registry::new_custom(Some(PREFIX.to_owned()), None).unwrap_or_else(|_| Registry::new());
        let r = &registry;
        let m = Self {
            requests: counter_vec(
                r,
                "requests_total",
                "Webhook requests by outcome and configured source (none before routing).",
                &["outcome", "source"],
            ),
            rejections: counter_vec(
                r,
                "rejections_total",
                "Rejected requests by precise reason.",
                &["reason"],
            ),
            request_duration: histogram_vec(
                r,
                "request_duration_seconds",
                "Time from request headers to answer.",
                &["outcome"],
            ),
            events_published: counter_vec(
                r,
                "events_published_total",
                "Events confirmed by the broker, by event (known names or other) and source.",
                &["event", "source"],
            ),
            confirm_duration: histogram(
                r,
                "publish_confirm_duration_seconds",
                "Time from publish to broker confirm.",
            ),
            publish_failures: counter_vec(
                r,
                "publish_failures_total",
                "Publishes that were not confirmed, by reason and source.",
                &["reason", "source"],
            ),
            unclassified: counter_vec(
                r,
                "unclassified_total",
                "Authentic JSON bodies published under ocrolus.unclassified, by reason.",
                &["reason"],
            ),
            dedup_conflicts: counter(
                r,
                "dedup_conflicts_total",
                "Deliveries whose unsigned id was known with another body; published as their own message.",
            ),
            broker_up: gauge(
                r,
                "broker_up",
                "1 while a confirm channel to the broker is open.",
            ),
            broker_blocked: gauge(
                r,
                "broker_blocked",
                "1 while the broker blocks publishing (connection.blocked).",
            ),
            broker_reconnects: counter(
                r,
                "broker_reconnects_total",
                "Broker connections established after the first.",
            ),
            broker_connect_failures: counter_vec(
                r,
                "broker_connect_failures_total",
                "Failed connects to a broker node: unreachable, rejected (TLS or credentials) or setup.",
                &["reason"],
            ),
            broker_node: gauge_vec(
                r,
                "broker_node_connected",
                "1 for the broker node (host:port from --amqp-url) the relay publishes to.",
                &["node"],
            ),
            spool_messages: gauge(r, "spool_messages", "Events waiting in the spool."),
            spool_bytes: gauge(r, "spool_bytes", "Bytes of events waiting in the spool."),
            spool_oldest_age: gauge(
                r,
                "spool_oldest_age_seconds",
                "Age of the oldest spooled event.",
            ),
            spool_max_bytes: gauge(r, "spool_max_bytes", "Spool bound in bytes."),
            spool_max_messages: gauge(r, "spool_max_messages", "Spool bound in events."),
            spool_drained: counter(
                r,
                "spool_drained_total",
                "Spooled events confirmed by the broker and removed.",
            ),
            spool_errors: counter(r, "spool_errors_total", "Spool read or write failures."),
            spool_dead_lettered: counter_vec(
                r,
                "spool_dead_lettered_total",
                "Spooled events the broker kept refusing, moved to the dead-letter exchange, by reason.",
                &["reason"],
            ),
            spool_quarantined: counter_vec(
                r,
                "spool_quarantined_total",
                "Spool records moved to quarantine (unreadable, or refused and not dead-lettered).",
                &["reason"],
            ),
            spool_quarantined_messages: gauge(
                r,
                "spool_quarantined_messages",
                "Records in the spool's quarantine table, waiting for an operator.",
            ),
            spool_files_moved_aside: gauge(
                r,
                "spool_files_moved_aside",
                "Unreadable spool files moved aside at start and still in the spool directory.",
            ),
            connections_open: gauge(r, "connections_open", "Open client connections."),
            connections_parked: gauge(
                r,
                "connections_parked",
                "Open HTTP/1 connections waiting for their next request without HTTP buffers.",
            ),
            connections_rejected: counter(
                r,
                "connections_rejected_total",
                "Connections closed at once because --max-connections (and, for allowlisted peers, the reserve) was reached.",
            ),
            requests_in_flight: gauge(r, "requests_in_flight", "Webhook requests being processed."),
            tls_handshake_failures: counter(
                r,
                "tls_handshake_failures_total",
                "Failed or timed-out TLS handshakes.",
            ),
            config_reloads: counter_vec(
                r,
                "config_reloads_total",
                "SIGHUP reloads by result.",
                &["result"],
            ),
            config_last_reload_ok: gauge(
                r,
                "config_last_reload_successful",
                "1 if the last configuration load (start or SIGHUP) succeeded.",
            ),
            cert_expiry: IntGauge::new(
                "tls_cert_expiry_timestamp_seconds",
                "notAfter of the served certificate, Unix seconds.",
            )
            .unwrap_or_else(|e| panic!("metric tls_cert_expiry_timestamp_seconds: {e}")),
            process: process_registry(),
            ready: gauge(r, "ready", "1 while /readyz answers 200."),
            registry,
        };
        // Known label values start at 0, so a series exists (and rate() and
        // alerts work) before the first event of its kind.
        for outcome in Outcome::ALL.iter().filter(|o| o.before_routing()) {
            m.requests.with_label_values(&[outcome.as_str(), NO_SOURCE]);
        }
        for reason in Reason::ALL {
            m.rejections.with_label_values(&[reason.as_str()]);
        }
        for reason in Unclassified::ALL {
            m.unclassified.with_label_values(&[reason.as_str()]);
        }
        for reason in ConnectFailureReason::ALL {
            m.broker_connect_failures
                .with_label_values(&[reason.as_str()]);
        }
        for result in ReloadResult::ALL {
            m.config_reloads.with_label_values(&[result.as_str()]);
        }
        let info = IntGaugeVec::new(
            Opts::new("build_info", "Build information; always 1."),
            &["version", "commit"],
        );
        if let Ok(info) = info {
            info.with_label_values(&[env!("CARGO_PKG_VERSION"), env!("RELAY_GIT_COMMIT")])
                .set(1);
            let _ = m.registry.register(Box::new(info));
        }
        // A relay only runs after its configuration loaded.
        m.config_last_reload_ok.set(1);
        m
    }

    /// Creates a configured source's request series at 0, like the other
    /// known label values (the publish series are the broker's:
    /// `Broker::add_source`).
    pub fn add_source(&self, source: &str) {
        for outcome in Outcome::ALL.iter().filter(|o| !o.before_routing()) {
            self.requests.with_label_values(&[outcome.as_str(), source]);
        }
    }

    /// Counts a refused request or connection by its precise reason.
    pub fn reject(&self, reason: Reason) {
        self.rejections.with_label_values(&[reason.as_str()]).inc();
    }

    /// Exports the served certificate's notAfter (first call registers it).
    pub fn set_cert_expiry(&self, not_after: i64) {
        // Already registered after the first call: nothing to do then.
        let _ = self.registry.register(Box::new(self.cert_expiry.clone()));
        self.cert_expiry.set(not_after);
    }

    /// Prometheus text exposition format.
    pub fn render(&self) -> Vec<u8> {
        let mut families = self.registry.gather();
        families.extend(self.process.gather());
        let mut out = Vec::new();
        // Encoding into a Vec cannot fail for well-formed metrics.
        let _ = TextEncoder::new().encode(&families, &mut out);
        out
    }
}

/// One unit of a gauge (an open connection, a request in flight, a parked
/// connection), counted while this lives: a future dropped half-way, such
/// as a request whose client reset its stream, takes its count with it.
pub struct GaugeHold(IntGauge);

impl GaugeHold {
    pub fn new(gauge: &IntGauge) -> Self {
        gauge.inc();
        Self(gauge.clone())
    }
}

impl Drop for GaugeHold {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// CPU, resident memory, open fds and start time of this process, read from
/// /proc at each scrape. Elsewhere than Linux the registry stays empty.
fn process_registry() -> Registry {
    let registry = Registry::new();
    let _ = registry.register(Box::new(
        prometheus::process_collector::ProcessCollector::for_self(),
    ));
    registry
}

// Metric names and help texts are constants: registration can only fail on a
// programming error (a duplicate name), which the unit test below catches.

fn register<C: prometheus::core::Collector + Clone + 'static>(r: &Registry, c: C) -> C {
    let _ = r.register(Box::new(c.clone()));
    c
}

fn counter(r: &Registry, name: &str, help: &str) -> IntCounter {
    register(
        r,
        IntCounter::new(name, help).unwrap_or_else(|e| panic!("metric {name}: {e}")),
    )
}

fn gauge(r: &Registry, name: &str, help: &str) -> IntGauge {
    register(
        r,
        IntGauge::new(name, help).unwrap_or_else(|e| panic!("metric {name}: {e}")),
    )
}

fn counter_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    register(
        r,
        IntCounterVec::new(Opts::new(name, help), labels)
            .unwrap_or_else(|e| panic!("metric {name}: {e}")),
    )
}

fn gauge_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    register(
        r,
        IntGaugeVec::new(Opts::new(name, help), labels)
            .unwrap_or_else(|e| panic!("metric {name}: {e}")),
    )
}

fn histogram(r: &Registry, name: &str, help: &str) -> Histogram {
    register(
        r,
        Histogram::with_opts(HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec()))
            .unwrap_or_else(|e| panic!("metric {name}: {e}")),
    )
}

fn histogram_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> HistogramVec {
    register(
        r,
        HistogramVec::new(
            HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec()),
            labels,
        )
        .unwrap_or_else(|e| panic!("metric {name}: {e}")),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_registers_with_the_prefix() {
        let m = Metrics::new();
        m.requests
            .with_label_values(&["published", "default"])
            .inc();
        m.request_duration
            .with_label_values(&["published"])
            .observe(0.01);
        m.events_published
            .with_label_values(&["book.verified", "default"])
            .inc();
        m.publish_failures
            .with_label_values(&["nack", "default"])
            .inc();
        m.rejections.with_label_values(&["bad_signature"]).inc();
        m.config_reloads.with_label_values(&["success"]).inc();
        let text = String::from_utf8(m.render()).expect("utf8");
        for name in [
            "ocrolus_relay_requests_total",
            "ocrolus_relay_request_duration_seconds_bucket",
            "ocrolus_relay_publish_confirm_duration_seconds_count",
            "ocrolus_relay_broker_up",
            "ocrolus_relay_spool_oldest_age_seconds",
            "ocrolus_relay_config_last_reload_successful",
            "ocrolus_relay_build_info",
            "ocrolus_relay_ready",
        ] {
            assert!(text.contains(name), "{name} missing from:\n{text}");
        }
        assert!(
            !text.contains("tls_cert_expiry"),
            "no certificate, no expiry"
        );
        m.set_cert_expiry(1_900_000_000);
        m.set_cert_expiry(1_900_000_001);
        let text = String::from_utf8(m.render()).expect("utf8");
        assert!(
            text.contains("ocrolus_relay_tls_cert_expiry_timestamp_seconds 1900000001"),
            "{text}"
        );
    }
}
