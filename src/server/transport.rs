//! The byte stream under hyper: a socket (plain or TLS) that can say when
//! the peer has sent something without a read buffer, and [`Rewind`], which
//! hands bytes already read back to the next reader.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use super::tls_stream::TlsStream;

/// What the connection code needs of a socket beyond reading and writing.
pub(super) trait Transport: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    /// Resolves once the peer has sent something or closed; waiting holds
    /// no buffer. It may resolve spuriously, like any readiness.
    fn readable(&self) -> impl Future<Output = io::Result<()>> + Send;

    /// Bytes taken off the socket but not yet read (TLS plaintext a reader
    /// left behind): the peer will not make the socket readable for them.
    fn has_buffered(&mut self) -> bool;

    /// The protocol agreed by ALPN, if any: `Some(true)` for h2.
    fn alpn_h2(&self) -> Option<bool>;
}

impl Transport for TcpStream {
    fn readable(&self) -> impl Future<Output = io::Result<()>> + Send {
        TcpStream::readable(self)
    }

    fn has_buffered(&mut self) -> bool {
        false
    }

    fn alpn_h2(&self) -> Option<bool> {
        None
    }
}

impl Transport for Box<TlsStream<TcpStream>> {
    fn readable(&self) -> impl Future<Output = io::Result<()>> + Send {
        self.get_ref().readable()
    }

    fn has_buffered(&mut self) -> bool {
        TlsStream::has_buffered(self)
    }

    fn alpn_h2(&self) -> Option<bool> {
        self.alpn_protocol().map(|protocol| protocol == b"h2")
    }
}

/// A stream with bytes in front of it that were read before (the protocol
/// sniff, or what hyper had buffered when a connection was released).
pub(super) struct Rewind<S> {
    prefix: Bytes,
    inner: S,
}

impl<S> Rewind<S> {
    pub(super) fn new(inner: S, prefix: Bytes) -> Self {
        Self { prefix, inner }
    }

    /// The stream and the bytes not yet read again.
    pub(super) fn into_parts(self) -> (S, Bytes) {
        (self.inner, self.prefix)
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewind<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.prefix.has_remaining() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            if self.prefix.is_empty() {
                // Read through: free the buffer it was cut from.
                self.prefix = Bytes::new();
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Rewind<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[tokio::test]
    async fn rewind_reads_the_prefix_then_the_stream() {
        let (mut peer, ours) = tokio::io::duplex(64);
        peer.write_all(b" world").await.expect("write");
        drop(peer);
        let mut rewind = Rewind::new(ours, Bytes::from_static(b"hello"));
        let mut all = String::new();
        rewind.read_to_string(&mut all).await.expect("read");
        assert_eq!(all, "hello world");
        assert!(rewind.into_parts().1.is_empty());
    }

    #[tokio::test]
    async fn rewind_keeps_what_a_small_reader_left() {
        let (_peer, ours) = tokio::io::duplex(64);
        let mut rewind = Rewind::new(ours, Bytes::from_static(b"abcdef"));
        let mut two = [0u8; 2];
        rewind.read_exact(&mut two).await.expect("read");
        assert_eq!(&two, b"ab");
        assert_eq!(&rewind.into_parts().1[..], b"cdef");
    }
}
