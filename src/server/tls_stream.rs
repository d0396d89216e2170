//! Server-side TLS on rustls' unbuffered API, so that a parked keep-alive
//! connection holds no TLS buffer (docs/architecture.md, "Connections": at
//! most 8 KiB per idle connection). rustls' buffered `ServerConnection`, the
//! one tokio-rustls drives, keeps a 4 KiB read buffer for the whole life of a
//! connection. Here the stream owns the ciphertext and plaintext buffers and
//! frees each one as soon as it is empty; an idle connection keeps only
//! rustls' own state.

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker, ready};

use rustls::server::UnbufferedServerConnection;
use rustls::unbuffered::{
    ConnectionState, EncodeError, EncryptError, ReadTraffic, UnbufferedStatus,
};
use rustls::{Error as TlsError, ServerConfig};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A TLS record header: content type, version, length.
const HEADER_LEN: usize = 5;
/// The most undecoded input held after the handshake: one record of the
/// largest size rustls accepts (its `MAX_WIRE_SIZE`).
const MAX_RECORD_LEN: usize = HEADER_LEN + 16_384 + 2048;
/// The most undecoded input held during the handshake, where rustls joins a
/// handshake message split over records in place: its own cap, 64 KiB.
const MAX_HANDSHAKE_LEN: usize = 0xffff;
/// Free space offered to each socket read: a small request in one read.
const READ_CHUNK: usize = 8 * 1024;
/// Plaintext encrypted per `poll_write`: one full record.
const WRITE_CHUNK: usize = 16 * 1024;
/// First guess at what a record adds to its plaintext (header, nonce, tag,
/// content type); rustls names the exact size when it needs more.
const RECORD_OVERHEAD: usize = 64;

/// Performs the server handshake. Errors (bad ClientHello, protocol errors,
/// peer EOF) come back as io::Error: InvalidData for TLS errors, with the
/// rustls error as source; UnexpectedEof for EOF mid-handshake. Best effort:
/// the TLS alert rustls queues on an error is written to the peer before
/// returning the error.
pub(crate) async fn accept<IO>(config: Arc<ServerConfig>, io: IO) -> io::Result<TlsStream<IO>>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let conn = UnbufferedServerConnection::new(config)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    let mut stream = TlsStream {
        io,
        conn,
        incoming: Incoming::default(),
        outgoing: Outgoing::default(),
        plaintext: Plaintext::default(),
        read_side: ReadSide::Open,
        shut: false,
        failed: None,
    };
    poll_fn(|cx| {
        let result = stream.poll_handshake(cx);
        stream.finish(cx, result)
    })
    .await?;
    Ok(stream)
}

/// A server-side TLS stream over `IO` that holds no buffer while idle.
pub(crate) struct TlsStream<IO> {
    io: IO,
    conn: UnbufferedServerConnection,
    incoming: Incoming,
    outgoing: Outgoing,
    plaintext: Plaintext,
    read_side: ReadSide,
    /// close_notify is queued: no more application data.
    shut: bool,
    /// The first TLS or socket error; every later call returns it again.
    failed: Option<Failure>,
}

/// What readers get once the input is used up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ReadSide {
    Open,
    /// The peer's close_notify: EOF.
    Closed,
    /// TCP EOF without close_notify: `UnexpectedEof`, as tokio-rustls says.
    Truncated,
}

/// An error that ended the stream, kept to be returned again.
#[derive(Debug)]
enum Failure {
    Tls(TlsError),
    Io(io::ErrorKind),
}

impl Failure {
    fn to_io(&self) -> io::Error {
        match self {
            Self::Tls(e) => io::Error::new(io::ErrorKind::InvalidData, e.clone()),
            Self::Io(kind) => io::Error::new(*kind, "the TLS stream failed earlier"),
        }
    }
}

/// What one turn of rustls' state machine came to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Step {
    /// Something was consumed or queued for sending: turn again.
    Again,
    /// Plaintext went to the reader or to [`Plaintext`].
    Delivered,
    /// rustls needs more ciphertext from the peer.
    NeedInput,
    /// The data passed as [`Out`] was encrypted: its length.
    Encrypted(usize),
    /// The peer's close_notify: reported once.
    PeerClosed,
    /// Both sides sent close_notify.
    Closed,
}

/// What to encrypt if rustls lets application data out.
#[derive(Clone, Copy, Debug)]
enum Out<'a> {
    Nothing,
    Data(&'a [u8]),
    CloseNotify,
}

/// Ciphertext taken off the socket and not yet consumed by rustls:
/// `buf[start..start + len]`; the rest of `buf` is room for the next read.
/// What rustls consumed is dropped by moving `start`, and the rest is moved
/// to the front only before a read: a move per record would copy a window of
/// tiny records once for each of them.
#[derive(Debug, Default)]
struct Incoming {
    buf: Vec<u8>,
    start: usize,
    len: usize,
}

impl Incoming {
    fn filled_mut(&mut self) -> &mut [u8] {
        &mut self.buf[self.start..self.start + self.len]
    }

    /// Removes what rustls has consumed from the front.
    fn discard(&mut self, consumed: usize) {
        let consumed = consumed.min(self.len);
        self.start += consumed;
        self.len -= consumed;
        if self.len == 0 {
            self.start = 0;
        }
    }

    /// Frees the buffer once everything in it was consumed. Never while
    /// bytes remain: rustls keeps offsets into a handshake message it is
    /// joining there.
    fn free_if_empty(&mut self) {
        if self.len == 0 {
            *self = Self::default();
        }
    }

    /// Where the record at the front ends, once its header is in: after
    /// the handshake the front is always the start of a record.
    fn front_record_end(&self) -> usize {
        match self.buf.get(self.start + 3..self.start + HEADER_LEN) {
            Some(&[high, low]) if self.len >= HEADER_LEN => {
                HEADER_LEN + usize::from(u16::from_be_bytes([high, low]))
            }
            _ => 0,
        }
    }

    /// Room after the unread bytes, moved to the front, for `want` in all.
    fn room(&mut self, want: usize) -> &mut [u8] {
        if self.start > 0 {
            self.buf.copy_within(self.start..self.start + self.len, 0);
            self.start = 0;
        }
        if self.buf.len() < want {
            self.buf.resize(want, 0);
        }
        &mut self.buf[self.len..want]
    }
}

/// Ciphertext queued for the socket: `buf[sent..]`.
#[derive(Debug, Default)]
struct Outgoing {
    buf: Vec<u8>,
    sent: usize,
}

impl Outgoing {
    fn is_empty(&self) -> bool {
        self.sent == self.buf.len()
    }

    fn pending(&self) -> &[u8] {
        &self.buf[self.sent..]
    }

    /// Marks `n` bytes as written; frees the buffer once all are.
    fn advance(&mut self, n: usize) {
        self.sent += n;
        if self.is_empty() {
            *self = Self::default();
        }
    }

    /// Lets `write` put ciphertext after what is queued, into `guess` bytes
    /// or, when rustls names a larger size, into that many.
    fn append<E>(
        &mut self,
        guess: usize,
        mut write: impl FnMut(&mut [u8]) -> Result<usize, E>,
        needs: impl Fn(&E) -> Option<usize>,
    ) -> Result<(), E> {
        let start = self.buf.len();
        self.buf.resize(start + guess, 0);
        let result = match write(&mut self.buf[start..]) {
            Err(e) => match needs(&e) {
                Some(size) => {
                    self.buf.resize(start + size, 0);
                    write(&mut self.buf[start..])
                }
                None => Err(e),
            },
            written => written,
        };
        let written = result.as_ref().map_or(0, |n| *n);
        self.buf.truncate(start + written);
        result.map(drop)
    }
}

/// Decrypted plaintext that did not fit the reader's buffer: `buf[read..]`.
#[derive(Debug, Default)]
struct Plaintext {
    buf: Vec<u8>,
    read: usize,
}

impl Plaintext {
    fn is_empty(&self) -> bool {
        self.read == self.buf.len()
    }

    fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Moves what fits into `out`; frees the buffer once drained. False if
    /// there was nothing.
    fn take_into(&mut self, out: &mut ReadBuf<'_>) -> bool {
        if self.is_empty() {
            return false;
        }
        let n = out.remaining().min(self.buf.len() - self.read);
        out.put_slice(&self.buf[self.read..self.read + n]);
        self.read += n;
        if self.is_empty() {
            *self = Self::default();
        }
        true
    }
}

impl<IO> TlsStream<IO> {
    pub(crate) fn get_ref(&self) -> &IO {
        &self.io
    }

    /// ALPN protocol agreed in the handshake.
    pub(crate) fn alpn_protocol(&self) -> Option<&[u8]> {
        self.conn.alpn_protocol()
    }

    /// The heap the stream holds of its own, beside rustls' state.
    #[cfg(test)]
    fn buffer_capacity(&self) -> usize {
        self.incoming.buf.capacity() + self.outgoing.buf.capacity() + self.plaintext.buf.capacity()
    }

    fn check(&self) -> io::Result<()> {
        self.failed.as_ref().map_or(Ok(()), |f| Err(f.to_io()))
    }

    /// Keeps the first error for every later call.
    fn fail(&mut self, err: io::Error) -> io::Error {
        if self.failed.is_none() {
            self.failed = Some(Failure::Io(err.kind()));
        }
        err
    }

    /// Keeps a TLS error, with the alert rustls queued for it ready to go.
    fn fail_tls(&mut self, err: TlsError) -> io::Error {
        self.queue_alerts();
        self.fail_quietly(err)
    }

    /// Keeps a TLS error of our own: rustls has no alert for it.
    fn fail_quietly(&mut self, err: TlsError) -> io::Error {
        if self.failed.is_none() {
            self.failed = Some(Failure::Tls(err.clone()));
        }
        io::Error::new(io::ErrorKind::InvalidData, err)
    }

    /// Moves what rustls queued on an error (its alert) to the outgoing
    /// buffer. Only while rustls says something is queued: a turn with
    /// nothing queued would decode the offending input again (and queue a
    /// second fatal alert, which rustls asserts never happens).
    fn queue_alerts(&mut self) {
        while self.conn.wants_write() {
            let UnbufferedStatus { discard, state } =
                self.conn.process_tls_records(self.incoming.filled_mut());
            let encoded = match state {
                Ok(ConnectionState::EncodeTlsData(mut data)) => self
                    .outgoing
                    .append(0, |buf| data.encode(buf), encode_needs)
                    .is_ok(),
                _ => false,
            };
            self.incoming.discard(discard);
            if !encoded {
                return;
            }
        }
    }

    /// One turn of rustls' state machine over the input at hand. Plaintext
    /// goes to `reader` while it has room (the rest to [`Plaintext`]),
    /// records to send to the outgoing buffer, in rustls' order.
    fn step(&mut self, reader: Option<&mut ReadBuf<'_>>, out: Out<'_>) -> io::Result<Step> {
        let UnbufferedStatus { mut discard, state } =
            self.conn.process_tls_records(self.incoming.filled_mut());
        let turn = match state {
            Ok(state) => handle(
                state,
                &mut discard,
                reader,
                out,
                &mut self.outgoing,
                &mut self.plaintext,
            ),
            Err(e) => Err(e),
        };
        // After the state was handled, before the next turn.
        self.incoming.discard(discard);
        match turn {
            Ok(Step::PeerClosed) => {
                // rustls reads nothing after close_notify.
                self.read_side = ReadSide::Closed;
                self.incoming = Incoming::default();
                Ok(Step::PeerClosed)
            }
            Ok(step) => Ok(step),
            Err(e) => Err(self.fail_tls(e)),
        }
    }

    /// Encrypts `out` once rustls lets application data out, after the
    /// records it queued before it.
    fn encrypt(&mut self, out: Out<'_>) -> io::Result<usize> {
        loop {
            match self.step(None, out)? {
                Step::Encrypted(n) => return Ok(n),
                Step::Again | Step::Delivered | Step::PeerClosed => {}
                Step::Closed if matches!(out, Out::CloseNotify) => return Ok(0),
                Step::Closed => {
                    return Err(io::Error::new(
                        io::ErrorKind::BrokenPipe,
                        "the TLS session is closed",
                    ));
                }
                Step::NeedInput => {
                    return Err(self.fail_quietly(TlsError::General(
                        "rustls refused application data after the handshake".into(),
                    )));
                }
            }
        }
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> TlsStream<IO> {
    /// Decodes what is already in hand, then sends what that queued without
    /// waiting and frees empty buffers.
    ///
    /// True if a reader would get something without the socket becoming
    /// readable again: decrypted plaintext not yet read, undecoded TLS bytes
    /// already taken off the socket that hold a record with plaintext or a
    /// close_notify, the peer's close_notify or TCP EOF (a reader gets EOF or
    /// UnexpectedEof at once), or a stored error. The caller parks a
    /// connection waiting for socket readability and must not when this is
    /// true: e.g. a request sent in the same flight as the client's Finished
    /// is in hand at the end of the handshake. A partial record is not
    /// buffered: only the socket can complete it.
    pub(crate) fn has_buffered(&mut self) -> bool {
        // Nobody waits on this context: the caller is about to wait for
        // readability only, and a later write brings its own waker.
        let mut cx = Context::from_waker(Waker::noop());
        if self.failed.is_some() || self.read_side != ReadSide::Open || !self.plaintext.is_empty() {
            return true;
        }
        loop {
            match self.step(None, Out::Nothing) {
                Ok(Step::Again | Step::Encrypted(_)) => {}
                Ok(Step::NeedInput) => break,
                Ok(Step::Delivered | Step::PeerClosed | Step::Closed) => return true,
                Err(_) => {
                    self.last_gasp(&mut cx);
                    return true;
                }
            }
        }
        // Decoding may have queued a record to send (a TLS 1.2 warning).
        if let Poll::Ready(Err(_)) = self.poll_send(&mut cx) {
            self.last_gasp(&mut cx);
            return true;
        }
        self.incoming.free_if_empty();
        false
    }

    /// Reads more ciphertext, within the limit rustls itself sets.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let handshaking = self.conn.is_handshaking();
        let limit = if handshaking {
            MAX_HANDSHAKE_LEN
        } else {
            MAX_RECORD_LEN
        };
        if self.incoming.len >= limit {
            return Poll::Ready(Err(self.fail_quietly(TlsError::General(format!(
                "TLS message over the {limit} bytes rustls buffers"
            )))));
        }
        let record_end = if handshaking {
            0
        } else {
            self.incoming.front_record_end()
        };
        let want = (self.incoming.len + READ_CHUNK).max(record_end).min(limit);
        let mut buf = ReadBuf::new(self.incoming.room(want));
        match Pin::new(&mut self.io).poll_read(cx, &mut buf) {
            Poll::Ready(Ok(())) => {
                let n = buf.filled().len();
                if n == 0 {
                    self.read_side = ReadSide::Truncated;
                }
                self.incoming.len += n;
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(self.fail(e))),
            Poll::Pending => {
                self.incoming.free_if_empty();
                Poll::Pending
            }
        }
    }

    /// Writes queued ciphertext until none is left.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.outgoing.is_empty() {
            match Pin::new(&mut self.io).poll_write(cx, self.outgoing.pending()) {
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(Err(self.fail(io::ErrorKind::WriteZero.into())));
                }
                Poll::Ready(Ok(n)) => self.outgoing.advance(n),
                Poll::Ready(Err(e)) => return Poll::Ready(Err(self.fail(e))),
                Poll::Pending => return Poll::Pending,
            }
        }
        Poll::Ready(Ok(()))
    }

    /// Sends what it can of the queued ciphertext without waiting for it.
    fn send_some(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        match self.poll_send(cx) {
            Poll::Ready(result) => result,
            Poll::Pending => Ok(()),
        }
    }

    /// After an error: one try at sending the alert rustls queued for it,
    /// then no buffers any more.
    fn last_gasp(&mut self, cx: &mut Context<'_>) {
        if matches!(self.failed, Some(Failure::Tls(_))) && !self.outgoing.is_empty() {
            let _ = Pin::new(&mut self.io).poll_write(cx, self.outgoing.pending());
        }
        self.incoming = Incoming::default();
        self.outgoing = Outgoing::default();
        self.plaintext = Plaintext::default();
    }

    /// Gives a failed stream its last gasp on the way out.
    fn finish<T>(
        &mut self,
        cx: &mut Context<'_>,
        result: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        if matches!(result, Poll::Ready(Err(_))) && self.failed.is_some() {
            self.last_gasp(cx);
        }
        result
    }

    fn poll_handshake(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            match self.step(None, Out::Nothing)? {
                Step::Again | Step::Delivered | Step::Encrypted(_) => {}
                // TLS 1.3 lets the server send before the client's Finished:
                // done means done handshaking, not WriteTraffic.
                Step::NeedInput | Step::PeerClosed | Step::Closed
                    if !self.conn.is_handshaking() =>
                {
                    // Like tokio-rustls: the last flight (TLS 1.2 Finished,
                    // TLS 1.3 tickets) is out before the stream is handed over.
                    ready!(self.poll_send(cx))?;
                    self.incoming.free_if_empty();
                    return Poll::Ready(Ok(()));
                }
                Step::NeedInput => {
                    self.send_some(cx)?;
                    if self.read_side == ReadSide::Truncated {
                        return Poll::Ready(Err(unexpected_eof("EOF during the TLS handshake")));
                    }
                    ready!(self.poll_fill(cx))?;
                }
                Step::PeerClosed | Step::Closed => {
                    return Poll::Ready(Err(unexpected_eof(
                        "close_notify during the TLS handshake",
                    )));
                }
            }
        }
    }

    fn read_plaintext(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.check()?;
        if buf.remaining() == 0 || self.plaintext.take_into(buf) {
            return Poll::Ready(Ok(()));
        }
        loop {
            if self.read_side == ReadSide::Closed {
                return Poll::Ready(Ok(()));
            }
            match self.step(Some(buf), Out::Nothing)? {
                Step::Delivered => {
                    self.send_some(cx)?;
                    return Poll::Ready(Ok(()));
                }
                Step::Again | Step::Encrypted(_) | Step::PeerClosed | Step::Closed => {}
                Step::NeedInput => {
                    // Records rustls queued while decoding go out meanwhile,
                    // but reading never waits for writing.
                    self.send_some(cx)?;
                    if self.read_side == ReadSide::Truncated {
                        return Poll::Ready(Err(unexpected_eof(
                            "peer closed connection without sending TLS close_notify",
                        )));
                    }
                    ready!(self.poll_fill(cx))?;
                }
            }
        }
    }

    fn write_plaintext(&mut self, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        self.check()?;
        if self.shut {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "write after the TLS stream was shut down",
            )));
        }
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        // Earlier ciphertext goes first: at most one chunk waits here.
        ready!(self.poll_send(cx))?;
        let taken = self.encrypt(Out::Data(&data[..data.len().min(WRITE_CHUNK)]))?;
        self.send_some(cx)?;
        Poll::Ready(Ok(taken))
    }

    fn flush_out(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.check()?;
        ready!(self.poll_send(cx))?;
        // A reader that took the last byte saw no Pending to free on.
        self.incoming.free_if_empty();
        match ready!(Pin::new(&mut self.io).poll_flush(cx)) {
            Ok(()) => Poll::Ready(Ok(())),
            Err(e) => Poll::Ready(Err(self.fail(e))),
        }
    }

    fn close_write(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.check()?;
        if !self.shut {
            self.encrypt(Out::CloseNotify)?;
            self.shut = true;
        }
        ready!(self.poll_send(cx))?;
        match ready!(Pin::new(&mut self.io).poll_shutdown(cx)) {
            // Like tokio-rustls: a peer already gone is shut down enough.
            Err(e) if e.kind() != io::ErrorKind::NotConnected => Poll::Ready(Err(self.fail(e))),
            _ => Poll::Ready(Ok(())),
        }
    }
}

/// Handles the state one `process_tls_records` returned.
fn handle<Data>(
    state: ConnectionState<'_, '_, Data>,
    discard: &mut usize,
    reader: Option<&mut ReadBuf<'_>>,
    out: Out<'_>,
    outgoing: &mut Outgoing,
    plaintext: &mut Plaintext,
) -> Result<Step, TlsError> {
    match state {
        ConnectionState::ReadTraffic(traffic) => take_records(traffic, discard, reader, plaintext),
        ConnectionState::EncodeTlsData(mut data) => {
            outgoing
                .append(0, |buf| data.encode(buf), encode_needs)
                .map_err(|e| TlsError::General(e.to_string()))?;
            Ok(Step::Again)
        }
        // Nothing to wait for: the outgoing buffer is sent in order, so
        // these records go out before anything encrypted later.
        ConnectionState::TransmitTlsData(data) => {
            data.done();
            Ok(Step::Again)
        }
        ConnectionState::WriteTraffic(mut traffic) => match out {
            Out::Nothing => Ok(Step::NeedInput),
            Out::Data(data) => {
                let records = data.len() / WRITE_CHUNK + 1;
                outgoing
                    .append(
                        data.len() + records * RECORD_OVERHEAD,
                        |buf| traffic.encrypt(data, buf),
                        encrypt_needs,
                    )
                    .map_err(encrypt_error)?;
                Ok(Step::Encrypted(data.len()))
            }
            Out::CloseNotify => {
                outgoing
                    .append(
                        RECORD_OVERHEAD,
                        |buf| traffic.queue_close_notify(buf),
                        encrypt_needs,
                    )
                    .map_err(encrypt_error)?;
                Ok(Step::Encrypted(0))
            }
        },
        ConnectionState::BlockedHandshake => Ok(Step::NeedInput),
        ConnectionState::PeerClosed => Ok(Step::PeerClosed),
        ConnectionState::Closed => Ok(Step::Closed),
        // The relay's config has max_early_data_size 0.
        ConnectionState::ReadEarlyData(_) => {
            Err(TlsError::General("unexpected TLS early data".into()))
        }
        _ => Err(TlsError::General("unknown TLS connection state".into())),
    }
}

/// Moves decrypted records to the reader, then to [`Plaintext`]. A record
/// that would not fit after others stays with rustls for the next read.
fn take_records<Data>(
    mut traffic: ReadTraffic<'_, '_, Data>,
    discard: &mut usize,
    mut reader: Option<&mut ReadBuf<'_>>,
    plaintext: &mut Plaintext,
) -> Result<Step, TlsError> {
    let mut delivered = false;
    loop {
        let room = reader.as_ref().map_or(usize::MAX, |buf| buf.remaining());
        if delivered && traffic.peek_len().is_some_and(|len| len.get() > room) {
            break;
        }
        let Some(record) = traffic.next_record() else {
            break;
        };
        let record = record?;
        *discard += record.discard;
        let payload = record.payload;
        delivered |= !payload.is_empty();
        let rest = match reader.as_deref_mut() {
            Some(buf) if plaintext.is_empty() => {
                let n = buf.remaining().min(payload.len());
                buf.put_slice(&payload[..n]);
                &payload[n..]
            }
            _ => payload,
        };
        plaintext.push(rest);
    }
    Ok(if delivered {
        Step::Delivered
    } else {
        Step::Again
    })
}

fn encode_needs(e: &EncodeError) -> Option<usize> {
    match e {
        EncodeError::InsufficientSize(size) => Some(size.required_size),
        EncodeError::AlreadyEncoded => None,
    }
}

fn encrypt_needs(e: &EncryptError) -> Option<usize> {
    match e {
        EncryptError::InsufficientSize(size) => Some(size.required_size),
        EncryptError::EncryptExhausted => None,
    }
}

fn encrypt_error(e: EncryptError) -> TlsError {
    match e {
        EncryptError::EncryptExhausted => TlsError::EncryptError,
        EncryptError::InsufficientSize(_) => TlsError::General(e.to_string()),
    }
}

fn unexpected_eof(what: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::UnexpectedEof, what)
}

impl<IO: AsyncRead + AsyncWrite + Unpin> AsyncRead for TlsStream<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let result = this.read_plaintext(cx, buf);
        this.finish(cx, result)
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> AsyncWrite for TlsStream<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let result = this.write_plaintext(cx, buf);
        this.finish(cx, result)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let result = this.flush_out(cx);
        this.finish(cx, result)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let result = this.close_write(cx);
        this.finish(cx, result)
    }
}

#[cfg(test)]
mod tests {
    use std::pin::pin;
    use std::sync::LazyLock;
    use std::time::Duration;

    use bytes::Bytes;
    use futures_util::future::{Either, select};
    use http_body_util::{BodyExt, Full};
    use hyper::body::Incoming as Body;
    use hyper::service::service_fn;
    use hyper::{Request, Response};
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use rand::rngs::StdRng;
    use rand::{Rng, RngCore, SeedableRng};
    use rustls::SupportedProtocolVersion;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream, duplex};
    use tokio::net::{TcpListener, TcpStream};
    use tokio::time::timeout;
    use tokio_rustls::client::TlsStream as ClientStream;
    use tokio_rustls::{Connect, TlsAcceptor, TlsConnector};

    use super::*;

    const TLS13: &SupportedProtocolVersion = &rustls::version::TLS13;
    const TLS12: &SupportedProtocolVersion = &rustls::version::TLS12;
    const LIMIT: Duration = Duration::from_secs(60);

    static CERT: LazyLock<(CertificateDer<'static>, Vec<u8>)> = LazyLock::new(|| {
        let certified =
            rcgen::generate_simple_self_signed(vec!["localhost".into()]).expect("rcgen");
        (
            certified.cert.der().clone(),
            certified.signing_key.serialize_der(),
        )
    });

    /// What the relay runs: TLS 1.3 and 1.2, ALPN h2 and http/1.1, rustls'
    /// defaults otherwise (two TLS 1.3 tickets after the handshake).
    fn server_config() -> Arc<ServerConfig> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(CERT.1.clone()));
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[TLS13, TLS12])
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(vec![CERT.0.clone()], key)
            .expect("certificate");
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Arc::new(config)
    }

    fn connector(version: &'static SupportedProtocolVersion, alpn: &[&[u8]]) -> TlsConnector {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(CERT.0.clone()).expect("root");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[version])
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        TlsConnector::from(Arc::new(config))
    }

    fn connect<IO: AsyncRead + AsyncWrite + Unpin>(
        version: &'static SupportedProtocolVersion,
        alpn: &[&[u8]],
        io: IO,
    ) -> Connect<IO> {
        let name = ServerName::try_from("localhost").expect("name");
        connector(version, alpn).connect(name, io)
    }

    type Pair = (TlsStream<DuplexStream>, ClientStream<DuplexStream>);

    /// A handshake over a pipe of `capacity` bytes. A TLS 1.3 client is
    /// done before the server has sent its tickets, and `accept` (like
    /// tokio-rustls') returns only once they are out: over a pipe smaller
    /// than the tickets the client must read meanwhile, as a socket's
    /// receive buffer would.
    async fn handshake(
        version: &'static SupportedProtocolVersion,
        alpn: &[&[u8]],
        capacity: usize,
    ) -> Pair {
        let (client_io, server_io) = duplex(capacity);
        let mut accepting = pin!(accept(server_config(), server_io));
        let connecting = connect(version, alpn, client_io);
        let mut client = match select(accepting.as_mut(), connecting).await {
            Either::Left((server, connecting)) => {
                return (server.expect("accept"), connecting.await.expect("connect"));
            }
            Either::Right((client, _)) => client.expect("connect"),
        };
        let mut byte = [0; 1];
        let server = match select(accepting, pin!(client.read(&mut byte))).await {
            // tokio-rustls reads are cancel safe: the tickets stay read.
            Either::Left((server, _)) => server.expect("accept"),
            Either::Right((read, _)) => panic!("no data was sent: {read:?}"),
        };
        (server, client)
    }

    async fn pair(version: &'static SupportedProtocolVersion, capacity: usize) -> Pair {
        handshake(version, &[b"http/1.1"], capacity).await
    }

    fn payload(len: usize, seed: u64) -> Vec<u8> {
        let mut bytes = vec![0; len];
        StdRng::seed_from_u64(seed).fill_bytes(&mut bytes);
        bytes
    }

    /// Reads `len` bytes in reads of at most `chunk`.
    async fn read_len<R: AsyncRead + Unpin>(reader: &mut R, len: usize, chunk: usize) -> Vec<u8> {
        let mut got = Vec::with_capacity(len);
        let mut buf = vec![0; chunk];
        while got.len() < len {
            let want = chunk.min(len - got.len());
            let n = reader.read(&mut buf[..want]).await.expect("read");
            assert!(n > 0, "EOF after {} of {len} bytes", got.len());
            got.extend_from_slice(&buf[..n]);
        }
        got
    }

    /// The client sends `data`, the server reads it in `chunk`s and sends it
    /// back; both sides compare.
    async fn echo(pair: &mut Pair, data: &[u8], chunk: usize) {
        let (server, client) = pair;
        let ((), got) = tokio::join!(
            async {
                client.write_all(data).await.expect("client write");
                client.flush().await.expect("client flush");
            },
            read_len(server, data.len(), chunk),
        );
        assert!(
            got == data,
            "server got {} bytes, not the {} sent",
            got.len(),
            data.len()
        );
        let ((), back) = tokio::join!(
            async {
                server.write_all(&got).await.expect("server write");
                server.flush().await.expect("server flush");
            },
            read_len(client, data.len(), 64 * 1024),
        );
        assert!(
            back == data,
            "client got {} bytes back, not {}",
            back.len(),
            data.len()
        );
    }

    fn is_rustls_error(e: &io::Error) -> bool {
        e.get_ref()
            .and_then(|source| source.downcast_ref::<TlsError>())
            .is_some()
    }

    #[tokio::test]
    async fn handshakes_with_tls13_and_tls12_and_reports_alpn() {
        for version in [TLS13, TLS12] {
            for alpn in [&[&b"h2"[..]][..], &[b"http/1.1"], &[]] {
                let (server, client) = handshake(version, alpn, 64).await;
                assert_eq!(server.alpn_protocol(), alpn.first().copied());
                assert_eq!(client.get_ref().1.alpn_protocol(), alpn.first().copied());
                assert_eq!(client.get_ref().1.protocol_version(), Some(version.version));
                let mut pair = (server, client);
                echo(&mut pair, b"hello", 1024).await;
            }
        }
    }

    #[tokio::test]
    async fn echoes_every_size_exactly_with_any_read_size() {
        let sizes = [0, 1, 1000, 16_384, 16_385, 100_000, 1 << 20];
        for version in [TLS13, TLS12] {
            let mut pair = pair(version, 64).await;
            for (i, &size) in sizes.iter().enumerate() {
                for chunk in [1, 7, 64 * 1024] {
                    if chunk == 1 && size > 100_000 {
                        continue; // a million one-byte reads say nothing more
                    }
                    let data = payload(size, i as u64);
                    timeout(LIMIT, echo(&mut pair, &data, chunk))
                        .await
                        .expect("echo in time");
                }
            }
        }
    }

    #[tokio::test]
    async fn echoes_over_loopback_tcp() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (accepted, client) = tokio::join!(listener.accept(), TcpStream::connect(addr));
        let (server_io, _) = accepted.expect("accept");
        let (server, client) = tokio::join!(
            accept(server_config(), server_io),
            connect(TLS13, &[], client.expect("connect")),
        );
        let (mut server, mut client) = (server.expect("accept"), client.expect("connect"));
        assert_eq!(
            server.get_ref().local_addr().expect("addr"),
            addr,
            "the socket underneath"
        );
        let data = payload(1 << 20, 7);
        let ((), got) = tokio::join!(
            async {
                client.write_all(&data).await.expect("write");
                client.shutdown().await.expect("shutdown");
            },
            async {
                let mut got = Vec::new();
                server.read_to_end(&mut got).await.expect("read");
                got
            },
        );
        assert!(got == data);
        server.write_all(&got).await.expect("write back");
        server.shutdown().await.expect("shutdown");
        let mut back = Vec::new();
        client.read_to_end(&mut back).await.expect("read back");
        assert!(back == data);
        println!(
            "size_of::<TlsStream<TcpStream>>() = {} (UnbufferedServerConnection {})",
            size_of::<TlsStream<TcpStream>>(),
            size_of::<UnbufferedServerConnection>(),
        );
        assert!(size_of::<TlsStream<TcpStream>>() <= 1536);
    }

    /// Writes `send` and shuts down while reading until the peer's EOF, at
    /// the same time; what was read.
    async fn send_while_reading<S: AsyncRead + AsyncWrite>(
        stream: S,
        send: &[u8],
        side: &str,
    ) -> Vec<u8> {
        let (mut reader, mut writer) = tokio::io::split(stream);
        let (got, ()) = tokio::join!(
            async {
                let mut got = Vec::new();
                reader
                    .read_to_end(&mut got)
                    .await
                    .unwrap_or_else(|e| panic!("{side} read: {e}"));
                got
            },
            async {
                writer
                    .write_all(send)
                    .await
                    .unwrap_or_else(|e| panic!("{side} write: {e}"));
                writer
                    .shutdown()
                    .await
                    .unwrap_or_else(|e| panic!("{side} shutdown: {e}"));
            },
        );
        got
    }

    /// Each side writes 1 MiB while reading the other's, in one task.
    async fn full_duplex(version: &'static SupportedProtocolVersion) {
        let (server, client) = pair(version, 1024).await;
        let to_client = payload(1 << 20, 1);
        let to_server = payload(1 << 20, 2);
        let server_side = {
            let to_client = to_client.clone();
            tokio::spawn(async move { send_while_reading(server, &to_client, "server").await })
        };
        let got = send_while_reading(client, &to_server, "client").await;
        assert!(got == to_client, "client got {} bytes", got.len());
        let got = server_side.await.expect("server task");
        assert!(got == to_server, "server got {} bytes", got.len());
    }

    #[tokio::test]
    async fn full_duplex_a_megabyte_each_way() {
        for version in [TLS13, TLS12] {
            timeout(LIMIT, full_duplex(version))
                .await
                .expect("no deadlock");
        }
    }

    #[tokio::test]
    async fn a_client_key_update_mid_stream_changes_nothing() {
        let mut pair = pair(TLS13, 64).await;
        echo(&mut pair, &payload(1000, 1), 1024).await;
        for round in 0..3 {
            pair.1
                .get_mut()
                .1
                .refresh_traffic_keys()
                .expect("key update");
            // The server answers with its own KeyUpdate, then new keys.
            echo(&mut pair, &payload(100_000, round), 7).await;
        }
        // One written in the middle of a stream of data.
        let data = payload(50_000, 9);
        let (server, client) = &mut pair;
        let ((), got) = tokio::join!(
            async {
                client.write_all(&data[..20_000]).await.expect("write");
                client
                    .get_mut()
                    .1
                    .refresh_traffic_keys()
                    .expect("key update");
                client.write_all(&data[20_000..]).await.expect("write");
                client.flush().await.expect("flush");
            },
            read_len(server, data.len(), 1000),
        );
        assert!(got == data);
        echo(&mut pair, &payload(1000, 10), 1024).await;
    }

    #[tokio::test]
    async fn a_client_close_notify_reads_as_eof() {
        let (mut server, mut client) = pair(TLS13, 64).await;
        client.shutdown().await.expect("client shutdown");
        let mut buf = [0; 16];
        assert_eq!(server.read(&mut buf).await.expect("read"), 0);
        assert_eq!(server.read(&mut buf).await.expect("read again"), 0);
        assert!(server.has_buffered(), "EOF is there for a reader");
        // The other direction stays open until the server closes it.
        let ((), rest) = tokio::join!(
            async {
                server
                    .write_all(b"bye")
                    .await
                    .expect("write after peer close");
                server.shutdown().await.expect("server shutdown");
            },
            async {
                let mut rest = Vec::new();
                client.read_to_end(&mut rest).await.expect("clean EOF");
                rest
            },
        );
        assert_eq!(rest, b"bye");
    }

    #[tokio::test]
    async fn a_server_shutdown_is_a_clean_eof_for_the_client() {
        for version in [TLS13, TLS12] {
            let (mut server, mut client) = pair(version, 64).await;
            let ((), rest) = tokio::join!(
                async {
                    server.write_all(b"last words").await.expect("write");
                    server.shutdown().await.expect("shutdown");
                    server.shutdown().await.expect("shutdown twice");
                },
                async {
                    let mut rest = Vec::new();
                    client.read_to_end(&mut rest).await.expect("clean EOF");
                    rest
                },
            );
            assert_eq!(rest, b"last words");
            let e = server
                .write_all(b"more")
                .await
                .expect_err("write after shutdown");
            assert_eq!(e.kind(), io::ErrorKind::BrokenPipe);
        }
    }

    #[tokio::test]
    async fn a_tcp_eof_without_close_notify_is_unexpected_eof_like_tokio_rustls() {
        let (mut server, client) = pair(TLS13, 64).await;
        drop(client.into_inner().0);
        let mut buf = [0; 16];
        let e = server.read(&mut buf).await.expect_err("truncated");
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        let e = server.read(&mut buf).await.expect_err("still truncated");
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        assert!(server.has_buffered(), "the EOF is there for a reader");

        // tokio-rustls, for the record (its tickets fit the pipe).
        let (client_io, server_io) = duplex(1024);
        let acceptor = TlsAcceptor::from(server_config());
        let (server, client) =
            tokio::join!(acceptor.accept(server_io), connect(TLS13, &[], client_io));
        let mut server = server.expect("accept");
        drop(client.expect("connect").into_inner().0);
        let e = server.read(&mut buf).await.expect_err("truncated");
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[tokio::test]
    async fn an_eof_during_the_handshake_is_unexpected_eof() {
        let (client_io, server_io) = duplex(64);
        drop(client_io);
        let e = accept(server_config(), server_io)
            .await
            .err()
            .expect("no handshake");
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);

        // Half a ClientHello, then EOF.
        let (mut client_io, server_io) = duplex(1024);
        client_io
            .write_all(&[0x16, 3, 1, 0x01, 0x00, 1, 0, 0])
            .await
            .expect("write");
        drop(client_io);
        let e = accept(server_config(), server_io)
            .await
            .err()
            .expect("no handshake");
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[tokio::test]
    async fn garbage_instead_of_a_client_hello_is_invalid_data_with_an_alert() {
        let (mut peer, server_io) = duplex(1024);
        peer.write_all(b"GET / HTTP/1.1\r\nHost: example\r\n\r\n")
            .await
            .expect("write");
        let e = accept(server_config(), server_io)
            .await
            .err()
            .expect("not TLS");
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        assert!(is_rustls_error(&e), "{e:?}");
        let mut alert = Vec::new();
        peer.read_to_end(&mut alert).await.expect("read");
        assert_eq!(alert.first(), Some(&0x15), "a TLS alert record: {alert:?}");
    }

    #[tokio::test]
    async fn a_handshake_message_over_64_kib_is_refused() {
        let (mut peer, server_io) = duplex(64 * 1024);
        let mut flood = Vec::new();
        for i in 0..5 {
            let mut body = if i == 0 {
                vec![1, 0x00, 0xff, 0xff]
            } else {
                Vec::new()
            };
            body.resize(16_000, 0);
            flood.extend_from_slice(&[0x16, 3, 1]);
            flood.extend_from_slice(&u16::try_from(body.len()).expect("len").to_be_bytes());
            flood.extend_from_slice(&body);
        }
        let (accepted, _) = tokio::join!(accept(server_config(), server_io), async {
            let _ = peer.write_all(&flood).await;
        });
        let e = accepted.err().expect("refused");
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        assert!(e.to_string().contains("65535"), "{e}");
    }

    #[tokio::test]
    async fn a_bogus_record_length_in_traffic_is_invalid_data_for_good() {
        let mut pair = pair(TLS13, 1024).await;
        echo(&mut pair, b"fine", 1024).await;
        let (mut server, mut client) = pair;
        client
            .get_mut()
            .0
            .write_all(&[0x17, 3, 3, 0xff, 0xff])
            .await
            .expect("write");
        let mut buf = [0; 16];
        let e = server.read(&mut buf).await.expect_err("oversized record");
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        assert!(is_rustls_error(&e), "{e:?}");
        assert_eq!(
            server.read(&mut buf).await.expect_err("again").kind(),
            io::ErrorKind::InvalidData
        );
        assert_eq!(
            server.write(b"x").await.expect_err("write").kind(),
            io::ErrorKind::InvalidData
        );
        assert!(server.flush().await.is_err());
        assert!(server.shutdown().await.is_err());
        assert!(server.has_buffered(), "the error is there for a reader");
        assert_eq!(server.buffer_capacity(), 0);
        // The client got the alert (rustls says decode_error).
        let e = client.read(&mut buf).await.expect_err("alert");
        assert!(e.to_string().contains("fatal alert"), "{e}");
    }

    #[tokio::test]
    async fn a_request_in_the_finished_flight_is_buffered() {
        let (client_io, server_io) = duplex(64 * 1024);
        let accepting = Box::pin(accept(server_config(), server_io));
        let connecting = connect(TLS13, &[], client_io);
        // The TLS 1.3 client is done once it sent Finished; the server has
        // not been polled since, so the request lands in the same read.
        let (mut client, accepting) = match select(accepting, connecting).await {
            Either::Right((client, accepting)) => (client.expect("connect"), accepting),
            Either::Left(_) => panic!("the server cannot finish first"),
        };
        client
            .write_all(b"GET / HTTP/1.1\r\n\r\n")
            .await
            .expect("write");
        client.flush().await.expect("flush");
        let mut server = accepting.await.expect("accept");
        assert!(server.has_buffered());
        let mut buf = [0; 64];
        let n = server.read(&mut buf).await.expect("read");
        assert_eq!(&buf[..n], b"GET / HTTP/1.1\r\n\r\n");
        assert!(!server.has_buffered());
    }

    #[tokio::test]
    async fn unread_plaintext_and_undecoded_records_are_buffered() {
        let (mut server, mut client) = pair(TLS13, 1024).await;
        assert!(!server.has_buffered());
        client.write_all(b"ab").await.expect("write");
        client.flush().await.expect("flush");
        client.write_all(b"cd").await.expect("write");
        client.flush().await.expect("flush");
        let mut one = [0; 1];
        server.read_exact(&mut one).await.expect("read");
        assert_eq!(&one, b"a");
        assert!(server.has_buffered(), "b is decrypted, not read");
        server.read_exact(&mut one).await.expect("read");
        assert_eq!(&one, b"b");
        assert!(server.has_buffered(), "cd's record was read off the socket");
        let mut two = [0; 2];
        server.read_exact(&mut two).await.expect("read");
        assert_eq!(&two, b"cd");
        assert!(!server.has_buffered());

        // Data with a close_notify behind it in the same read.
        client.write_all(b"x").await.expect("write");
        client.shutdown().await.expect("shutdown");
        server.read_exact(&mut one).await.expect("read");
        assert!(server.has_buffered(), "the close_notify is in hand");
        assert_eq!(server.read(&mut one).await.expect("EOF"), 0);
    }

    #[tokio::test]
    async fn buffers_are_freed_after_an_exchange() {
        for version in [TLS13, TLS12] {
            let (mut server, mut client) = pair(version, 1024).await;
            assert_eq!(server.buffer_capacity(), 0, "after the handshake");
            let request = payload(5000, 1);
            let response = payload(20_000, 2);
            let ((), got) = tokio::join!(
                async {
                    client.write_all(&request).await.expect("write");
                    client.flush().await.expect("flush");
                },
                read_len(&mut server, request.len(), 1000),
            );
            assert!(got == request);
            let ((), back) = tokio::join!(
                async {
                    server.write_all(&response).await.expect("write");
                    server.flush().await.expect("flush");
                },
                read_len(&mut client, response.len(), 64 * 1024),
            );
            assert!(back == response);
            assert_eq!(
                server.buffer_capacity(),
                0,
                "after a request and its response"
            );
            assert!(!server.has_buffered());
            assert_eq!(server.buffer_capacity(), 0);
        }
    }

    /// hyper reads and writes the stream from one task, interleaved.
    #[tokio::test]
    async fn serves_hyper_over_http1_and_h2() {
        for alpn in [&b"h2"[..], b"http/1.1"] {
            let (server, client) = handshake(TLS13, &[alpn], 1024).await;
            let h2 = server.alpn_protocol() == Some(b"h2");
            let echo = service_fn(|req: Request<Body>| async move {
                let body = req.into_body().collect().await?.to_bytes();
                Ok::<_, hyper::Error>(Response::new(Full::new(body)))
            });
            tokio::spawn(async move {
                let io = TokioIo::new(server);
                let served = if h2 {
                    hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(io, echo)
                        .await
                } else {
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(io, echo)
                        .await
                };
                served.expect("served");
            });
            let io = TokioIo::new(client);
            let data = Bytes::from(payload(300_000, 5));
            let request = || {
                Request::post("/")
                    .body(Full::new(data.clone()))
                    .expect("request")
            };
            let responses = if h2 {
                let (mut sender, conn) =
                    hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                        .await
                        .expect("h2 handshake");
                tokio::spawn(conn);
                let (a, b) = tokio::join!(
                    sender.send_request(request()),
                    sender.send_request(request())
                );
                vec![a.expect("response"), b.expect("response")]
            } else {
                let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
                    .await
                    .expect("handshake");
                tokio::spawn(conn);
                let a = sender.send_request(request()).await.expect("response");
                let a = a.into_body().collect().await.expect("body").to_bytes();
                assert!(a == data, "first response");
                sender.ready().await.expect("keep-alive");
                vec![sender.send_request(request()).await.expect("response")]
            };
            for response in responses {
                let body = response
                    .into_body()
                    .collect()
                    .await
                    .expect("body")
                    .to_bytes();
                assert!(
                    body == data,
                    "echoed {} bytes of {}",
                    body.len(),
                    data.len()
                );
            }
        }
    }

    /// Writes `data` in random chunks, flushing now and then, then shuts down.
    async fn write_randomly<W: AsyncWrite + Unpin>(writer: &mut W, data: &[u8], seed: u64) {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut at = 0;
        while at < data.len() {
            let n = rng.random_range(1..=40_000).min(data.len() - at);
            writer.write_all(&data[at..at + n]).await.expect("write");
            at += n;
            if rng.random_bool(0.3) {
                writer.flush().await.expect("flush");
            }
        }
        writer.shutdown().await.expect("shutdown");
    }

    /// Reads to EOF with buffers of random size.
    async fn read_randomly<R: AsyncRead + Unpin>(reader: &mut R, seed: u64) -> Vec<u8> {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut got = Vec::new();
        let mut buf = vec![0; 20_000];
        loop {
            let want = rng.random_range(1..=buf.len());
            match reader.read(&mut buf[..want]).await.expect("read") {
                0 => return got,
                n => got.extend_from_slice(&buf[..n]),
            }
        }
    }

    #[tokio::test]
    async fn random_chunks_both_ways_over_a_37_byte_pipe() {
        for (seed, version) in [(1, TLS13), (2, TLS12), (3, TLS13)] {
            let (server, client) = pair(version, 37).await;
            let to_client = payload(300 * 1024, seed * 10);
            let to_server = payload(300 * 1024 + 17, seed * 10 + 1);
            let (mut server_read, mut server_write) = tokio::io::split(server);
            let (mut client_read, mut client_write) = tokio::io::split(client);
            let run = async {
                tokio::join!(
                    write_randomly(&mut server_write, &to_client, seed * 100),
                    read_randomly(&mut server_read, seed * 100 + 1),
                    write_randomly(&mut client_write, &to_server, seed * 100 + 2),
                    read_randomly(&mut client_read, seed * 100 + 3),
                )
            };
            let ((), server_got, (), client_got) = timeout(LIMIT, run).await.expect("no deadlock");
            assert!(
                server_got == to_server,
                "server got {} bytes",
                server_got.len()
            );
            assert!(
                client_got == to_client,
                "client got {} bytes",
                client_got.len()
            );
        }
    }
}
