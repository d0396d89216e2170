//! Step 1, up to the first byte of HTTP: the accept loop and the connection
//! slots, the PROXY protocol header (believed only from trusted proxies) and
//! the TLS handshake, each bounded by the header timeout.
//!
//! A peer that may not deliver (neither allowlisted nor a trusted proxy;
//! with PROXY protocol: not a trusted proxy, then a named client outside the
//! allowlist) is closed here, before TLS and before any byte of HTTP is
//! read, so that it never holds a slot for longer than an accept.

use std::net::SocketAddr;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use super::conn::http;
use super::slots::{ClientSlot, PoolSlot, Slots};
use super::tls_stream;
use crate::client::ClientIp;
use crate::log_throttle::LogThrottle;
use crate::metrics::{GaugeHold, Reason};
use crate::proxy_protocol;
use crate::state::AppState;

/// "accept failed" lines: at most one a second while descriptors run out.
static ACCEPT_FAILED_LOG: LazyLock<LogThrottle> =
    LazyLock::new(|| LogThrottle::new(1, 1, Duration::from_secs(1)));

/// "connection refused" lines: per reason, 5 a second (a flood is counted
/// in full by the metric).
static REFUSED_LOG: LazyLock<LogThrottle> =
    LazyLock::new(|| LogThrottle::new(Reason::ALL.len(), 5, Duration::from_secs(1)));

/// Accepts connections until `shutdown`, then lets the open ones finish
/// within the deadline.
pub async fn serve(listener: TcpListener, state: Arc<AppState>, shutdown: CancellationToken) {
    let slots = Arc::new(Slots::new(&state.config.limits));
    let connections = TaskTracker::new();
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
        // Dropping the stream closes it: nothing read, nothing written.
        let Some(held) = admit(&state, &slots, peer) else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let (state, slots) = (state.clone(), slots.clone());
        connections.spawn(connection(
            stream,
            peer,
            state,
            slots,
            held,
            shutdown.clone(),
        ));
    }
    drop(listener);
    connections.close();
    let deadline = state.config.shutdown.deadline;
    tokio::select! {
        () = connections.wait() => info!("all connections finished"),
        _ = tokio::time::sleep(deadline) => warn!(?deadline, "shutdown deadline passed; closing remaining connections"),
    }
}

/// Decides on the TCP peer alone whether a connection may hold a slot, and
/// takes it: the pool (or the reserve, for an allowlisted peer) and, for a
/// direct client, one of its own. A trusted proxy carries many clients and
/// has no per-client cap; behind PROXY protocol the client is known, and
/// counted, only once its header is read.
fn admit(state: &AppState, slots: &Slots, peer: SocketAddr) -> Option<Held> {
    let policy = state.policy();
    let ip = ClientIp::new(peer.ip());
    let trusted = policy.net.is_trusted_proxy(ip.addr());
    let allowed = policy.net.check(ip).is_ok();
    if state.config.proxy_protocol && !trusted {
        // A PROXY header names any address it likes: believe it only from
        // the load balancers listed as trusted proxies.
        return refuse(state, peer, Reason::UntrustedProxyPeer);
    }
    if !allowed && !trusted {
        return refuse(state, peer, Reason::PeerNotAllowed);
    }
    let client = if trusted {
        None
    } else {
        match slots.client(ip) {
            Some(slot) => Some(slot),
            None => return refuse(state, peer, Reason::TooManyConnectionsFromClient),
        }
    };
    let Some(pool) = slots.pool(allowed) else {
        state.metrics.connections_rejected.inc();
        debug!(%peer, "connection limit reached; closing");
        return None;
    };
    Some(Held {
        _pool: pool,
        client,
    })
}

/// Counts and logs (rate-limited) a connection closed before HTTP.
fn refuse<T>(state: &AppState, peer: SocketAddr, reason: Reason) -> Option<T> {
    state.metrics.reject(reason);
    if let Some(suppressed) = REFUSED_LOG.admit(reason as usize) {
        info!(%peer, reason = reason.as_str(), suppressed, "connection refused; closing");
    }
    None
}

/// The slots a connection holds for as long as it lives.
struct Held {
    _pool: PoolSlot,
    client: Option<ClientSlot>,
}

/// Counts an open connection, and holds its slots, for as long as it lives.
struct OpenConnection {
    _open: GaugeHold,
    held: Held,
}

async fn connection(
    mut stream: TcpStream,
    peer: SocketAddr,
    state: Arc<AppState>,
    slots: Arc<Slots>,
    held: Held,
    shutdown: CancellationToken,
) {
    let mut open = OpenConnection {
        _open: GaugeHold::new(&state.metrics.connections_open),
        held,
    };
    let header_timeout = state.config.limits.header_timeout;
    let mut client_ip = peer.ip();
    if state.config.proxy_protocol {
        let source =
            match tokio::time::timeout(header_timeout, proxy_protocol::read_header(&mut stream))
                .await
            {
                // LOCAL/UNKNOWN/UNSPEC/AF_UNIX: the TCP peer is the client.
                Ok(Ok(source)) => ClientIp::new(source.unwrap_or(client_ip)),
                Ok(Err(e)) => {
                    debug!(%peer, error = %e, "PROXY protocol header rejected");
                    refuse::<()>(&state, peer, Reason::BadProxyHeader);
                    return;
                }
                Err(_) => {
                    refuse::<()>(&state, peer, Reason::ProxyHeaderTimeout);
                    return;
                }
            };
        if state.policy().net.check(source).is_err() {
            refuse::<()>(&state, peer, Reason::PeerNotAllowed);
            return;
        }
        match slots.client(source) {
            Some(slot) => open.held.client = Some(slot),
            None => {
                refuse::<()>(&state, peer, Reason::TooManyConnectionsFromClient);
                return;
            }
        }
        client_ip = source.addr();
    }
    // Boxed: the handshake's state (the TLS stream, ~1.3 KiB) only while it
    // runs, and the stream behind a pointer after it, so that this task
    // stays small while the connection is parked (server/conn.rs).
    match state.tls() {
        Some(tls) => {
            let handshake = tls_stream::accept(tls.config.clone(), stream);
            match tokio::time::timeout(header_timeout, Box::pin(handshake)).await {
                Ok(Ok(tls_stream)) => http(Box::new(tls_stream), client_ip, state, shutdown).await,
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
        None => http(stream, client_ip, state, shutdown).await,
    }
}
