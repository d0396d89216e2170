//! One connection's HTTP: the hyper builder (HTTP/1.1 and HTTP/2 with their
//! bounds) and the idle watchdog that closes connections carrying no
//! request for longer than the header timeout.

use std::convert::Infallible;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use http::Request;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::Watcher;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;
use tracing::debug;

use crate::metrics::Reason;
use crate::pipeline;
use crate::state::AppState;

/// HTTP/2 streams per connection: Ocrolus sends one delivery at a time.
const H2_MAX_STREAMS: u32 = 64;
/// Header bytes per request (both protocols).
const MAX_HEADER_BYTES: usize = 16 * 1024;

pub(super) async fn http<S>(stream: S, peer: IpAddr, state: Arc<AppState>, watcher: Watcher)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let limits = &state.config.limits;
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(MAX_HEADER_BYTES.max(8192));
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(H2_MAX_STREAMS)
        .max_header_list_size(MAX_HEADER_BYTES as u32)
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(10));
    let service_state = state.clone();
    let (activity, requests) = watch::channel(0usize);
    let activity = Arc::new(activity);
    // Boxed: hyper's HTTP/1 dispatcher allocates one slot the size of the
    // service future for the whole life of the connection. The pipeline's
    // future is ~4.5 KiB; behind a box an idle keep-alive connection holds a
    // pointer, and the pipeline's state lives only while a request does
    // (BENCHMARKS.md, "Memory per idle connection").
    let service = service_fn(move |req: Request<Incoming>| {
        let active = ActiveRequest::start(&activity);
        let state = service_state.clone();
        Box::pin(async move {
            let _active = active;
            Ok::<_, Infallible>(pipeline::handle(&state, peer, req).await)
        })
    });
    let conn = builder.serve_connection(TokioIo::new(stream), service);
    let conn = watcher.watch(conn.into_owned());
    // hyper's header timer starts only once HTTP/1 is chosen and never
    // covers HTTP/2: without this, a client sending nothing, a trickled h2
    // preface or an idle h2 connection would hold its slot forever.
    let result = tokio::select! {
        result = conn => result,
        never_served = idle(requests, limits.header_timeout) => {
            if never_served {
                state.metrics.reject(Reason::HeaderTimeout);
            }
            debug!(%peer, never_served, "connection idle past the header timeout; closing");
            return;
        }
    };
    if let Err(e) = result {
        debug!(%peer, error = %e, "connection ended with an error");
    }
}

/// Counts a request being handled on its connection while it lives.
struct ActiveRequest(Arc<watch::Sender<usize>>);

impl ActiveRequest {
    fn start(activity: &Arc<watch::Sender<usize>>) -> Self {
        activity.send_modify(|n| *n += 1);
        Self(activity.clone())
    }
}

impl Drop for ActiveRequest {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n = n.saturating_sub(1));
    }
}

/// Resolves once the connection has had no request under way for `limit`
/// (from its start, or from the end of its last request); `true` if it
/// never carried one. Nothing is in flight then, so closing loses nothing.
async fn idle(mut requests: watch::Receiver<usize>, limit: Duration) -> bool {
    let mut served = false;
    loop {
        let active = *requests.borrow_and_update();
        let changed = if active == 0 {
            match tokio::time::timeout(limit, requests.changed()).await {
                Ok(changed) => changed,
                Err(_) => return !served,
            }
        } else {
            requests.changed().await
        };
        if changed.is_err() {
            // The connection itself is gone; its own future ends the select.
            std::future::pending::<()>().await;
        }
        served = true;
    }
}
