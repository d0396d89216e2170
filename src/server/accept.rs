//! Step 1, up to the first byte of HTTP: the accept loop with its
//! connection cap, the PROXY protocol header (believed only from trusted
//! proxies) and the TLS handshake, each bounded by the header timeout.

use std::net::SocketAddr;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::conn::http;
use crate::log_throttle::LogThrottle;
use crate::metrics::Reason;
use crate::proxy_protocol;
use crate::state::AppState;

/// "accept failed" lines: at most one a second while descriptors run out.
static ACCEPT_FAILED_LOG: LazyLock<LogThrottle> =
    LazyLock::new(|| LogThrottle::new(1, 1, Duration::from_secs(1)));

/// Accepts connections until `shutdown`, then lets the open ones finish
/// within the deadline.
pub async fn serve(listener: TcpListener, state: Arc<AppState>, shutdown: CancellationToken) {
    let limits = &state.config.limits;
    let connections = Arc::new(Semaphore::new(limits.max_connections));
    let graceful = GracefulShutdown::new();
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    if let Some(suppressed) = ACCEPT_FAILED_LOG.admit(0) {
                        warn!(error = %e, suppressed, "accept failed");
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            state.metrics.connections_rejected.inc();
            debug!(%peer, "connection limit reached; closing");
            continue;
        };
        let _ = stream.set_nodelay(true);
        let state = state.clone();
        let watcher = graceful.watcher();
        tokio::spawn(connection(stream, peer, state, permit, watcher));
    }
    drop(listener);
    let deadline = state.config.shutdown.deadline;
    tokio::select! {
        _ = graceful.shutdown() => info!("all connections finished"),
        _ = tokio::time::sleep(deadline) => warn!(?deadline, "shutdown deadline passed; closing remaining connections"),
    }
}

/// Counts an open connection for as long as it lives.
struct OpenConnection {
    state: Arc<AppState>,
    _permit: OwnedSemaphorePermit,
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.state.metrics.connections_open.dec();
    }
}

async fn connection(
    mut stream: TcpStream,
    peer: SocketAddr,
    state: Arc<AppState>,
    permit: OwnedSemaphorePermit,
    watcher: Watcher,
) {
    state.metrics.connections_open.inc();
    let _open = OpenConnection {
        state: state.clone(),
        _permit: permit,
    };
    let header_timeout = state.config.limits.header_timeout;
    let mut peer_ip = peer.ip();
    if state.config.proxy_protocol {
        // A PROXY header names any address it likes: believe it only from
        // the load balancers listed as trusted proxies.
        if !state.policy().net.is_trusted_proxy(peer_ip.to_canonical()) {
            state.metrics.reject(Reason::UntrustedProxyPeer);
            info!(%peer, "PROXY protocol from a peer outside trusted_proxies; closing");
            return;
        }
        match tokio::time::timeout(header_timeout, proxy_protocol::read_header(&mut stream)).await {
            Ok(Ok(Some(source))) => peer_ip = source,
            Ok(Ok(None)) => {}
            Ok(Err(e)) => {
                state.metrics.reject(Reason::BadProxyHeader);
                info!(%peer, error = %e, "PROXY protocol header rejected; closing");
                return;
            }
            Err(_) => {
                state.metrics.reject(Reason::ProxyHeaderTimeout);
                return;
            }
        }
    }
    match state.tls() {
        Some(tls) => {
            match tokio::time::timeout(header_timeout, tls.acceptor.accept(stream)).await {
                Ok(Ok(tls_stream)) => http(tls_stream, peer_ip, state, watcher).await,
                Ok(Err(e)) => {
                    state.metrics.tls_handshake_failures.inc();
                    debug!(%peer, error = %e, "TLS handshake failed");
                }
                Err(_) => {
                    state.metrics.tls_handshake_failures.inc();
                    debug!(%peer, "TLS handshake timed out");
                }
            }
        }
        None => http(stream, peer_ip, state, watcher).await,
    }
}
