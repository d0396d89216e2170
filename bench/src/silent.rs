//! The `idle --no-request` variant: connections that never send a byte of
//! HTTP. Over plaintext they send nothing at all; over TLS they finish the
//! handshake and then stay silent. Kept apart from the keep-alive hold in
//! [`crate::relay`] because it holds raw streams, not HTTP senders.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::io::{AsyncRead, AsyncWrite};

use crate::relay::Target;

/// A held connection: a plain `TcpStream` or a finished TLS client.
pub trait Held: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Held for T {}

/// Opens `count` connections, `concurrency` at a time; returns those that
/// opened and the number that failed.
pub async fn open(
    target: Arc<Target>,
    count: usize,
    concurrency: usize,
) -> (Vec<Box<dyn Held>>, u64) {
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..concurrency.max(1) {
        let (target, next) = (target.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut held: Vec<Box<dyn Held>> = Vec::new();
            let mut failed = 0u64;
            while next.fetch_add(1, Ordering::Relaxed) < count {
                match target.open_raw().await {
                    Ok(stream) => held.push(stream),
                    Err(_) => failed += 1,
                }
            }
            (held, failed)
        }));
    }
    let mut held = Vec::new();
    let mut failed = 0;
    for t in tasks {
        if let Ok((h, f)) = t.await {
            held.extend(h);
            failed += f;
        }
    }
    (held, failed)
}

/// How many of `held` the relay has not closed: a read that would block
/// means open; end of stream or an error means closed.
pub fn still_open(held: &mut [Box<dyn Held>]) -> usize {
    let waker = std::task::Waker::noop();
    let mut cx = std::task::Context::from_waker(waker);
    let mut byte = [0u8; 1];
    held.iter_mut()
        .map(|s| {
            let mut buf = tokio::io::ReadBuf::new(&mut byte);
            std::pin::Pin::new(&mut **s)
                .poll_read(&mut cx, &mut buf)
                .is_pending()
        })
        .filter(|&pending| pending)
        .count()
}
