//! Pipeline steps 5-7: bound what a client may cost before anything is
//! trusted: declared size and framing, request rate (per client and global), requests in
//! flight, and the body read itself (size cap also for chunked bodies, and a
//! deadline against slow senders).
//!
//! The per-client limiter is keyed on the resolved [`ClientIp`], so a spoofed
//! `X-Forwarded-For` from an untrusted peer cannot buy fresh buckets. IPv6
//! clients are keyed per /64, since one host usually owns a whole /64. The key
//! map is pruned periodically (`retain_recent`), so it cannot grow without
//! bound.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota, RateLimiter};
use http::HeaderMap;
use http_body_util::BodyExt;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::client::ClientIp;
use crate::config::Limits;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LimitReject {
    #[error("declared Content-Length over the limit")]
    DeclaredTooLarge,
    #[error("body over the limit")]
    BodyTooLarge,
    #[error("Content-Length is not a number")]
    BadContentLength,
    #[error("per-client rate limit")]
    RateLimitedClient { retry_after_secs: u64 },
    #[error("global rate limit")]
    RateLimitedGlobal { retry_after_secs: u64 },
    #[error("too many requests in flight")]
    TooManyInFlight,
    #[error("body not received in time")]
    BodyTimeout,
    #[error("client aborted the body")]
    BodyAborted,
    #[error("transfer coding other than a single chunked")]
    BadTransferEncoding,
}

/// Step 5: refuse a declared oversize body before reading any of it.
pub fn check_declared_len(headers: &HeaderMap, max: usize) -> Result<(), LimitReject> {
    let Some(value) = headers.get(http::header::CONTENT_LENGTH) else {
        return Ok(());
    };
    let len: u64 = value
        .to_str()
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .ok_or(LimitReject::BadContentLength)?;
    if len > max as u64 {
        Err(LimitReject::DeclaredTooLarge)
    } else {
        Ok(())
    }
}

/// Step 5: the body's framing. A transfer coding other than one `chunked`
/// (`gzip, chunked`, `identity, chunked`, two header lines) would pass on
/// undecoded, and a proxy in front may frame it differently: refused.
pub fn check_transfer_encoding(headers: &HeaderMap) -> Result<(), LimitReject> {
    let mut codings = headers.get_all(http::header::TRANSFER_ENCODING).iter();
    match (codings.next(), codings.next()) {
        (None, _) => Ok(()),
        (Some(coding), None)
            if coding
                .as_bytes()
                .trim_ascii()
                .eq_ignore_ascii_case(b"chunked") =>
        {
            Ok(())
        }
        _ => Err(LimitReject::BadTransferEncoding),
    }
}

/// Step 7: read the whole body, capped in size and time.
///
/// The body is copied at most once. A body that arrives in one frame (a
/// small delivery) is that frame's bytes, not copied. A longer one is
/// copied frame by frame into one buffer, reserved at once for the declared
/// `Content-Length` (never more than `max`), and each frame is freed as
/// soon as it is copied, so that a large body is not held twice.
pub async fn read_body<B>(body: B, max: usize, timeout: Duration) -> Result<Bytes, LimitReject>
where
    B: http_body::Body<Data = Bytes>,
{
    let declared = body
        .size_hint()
        .exact()
        .and_then(|n| usize::try_from(n).ok());
    let read = async {
        let mut body = std::pin::pin!(body);
        let mut first = Bytes::new();
        let mut joined: Option<BytesMut> = None;
        let mut len = 0usize;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|_| LimitReject::BodyAborted)?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            len = len.saturating_add(data.len());
            if len > max {
                return Err(LimitReject::BodyTooLarge);
            }
            match &mut joined {
                Some(buf) => buf.extend_from_slice(&data),
                None if first.is_empty() => first = data,
                None => {
                    let capacity = declared.unwrap_or(len).clamp(len, max);
                    let mut buf = BytesMut::with_capacity(capacity);
                    buf.extend_from_slice(&first);
                    buf.extend_from_slice(&data);
                    first = Bytes::new();
                    joined = Some(buf);
                }
            }
        }
        Ok(joined.map_or(first, BytesMut::freeze))
    };
    tokio::time::timeout(timeout, read)
        .await
        .unwrap_or(Err(LimitReject::BodyTimeout))
}

/// After a refusal: reads and discards the rest of a body, at most `max`
/// bytes within `deadline`; `true` if it ended, so that the connection can
/// carry the next request.
pub async fn drain_body<B>(body: B, max: usize, deadline: Duration) -> bool
where
    B: http_body::Body<Data = Bytes>,
{
    let discard = async {
        let mut body = std::pin::pin!(body);
        let mut seen = 0usize;
        while let Some(frame) = body.frame().await {
            let Ok(frame) = frame else { return false };
            if let Some(data) = frame.data_ref() {
                seen = seen.saturating_add(data.len());
                if seen > max {
                    return false;
                }
            }
        }
        true
    };
    tokio::time::timeout(deadline, discard)
        .await
        .unwrap_or(false)
}

/// Step 6: rate limits and the cap on requests in flight.
pub struct Admission {
    per_client: DefaultKeyedRateLimiter<IpAddr>,
    global: DefaultDirectRateLimiter,
    in_flight: Arc<Semaphore>,
    clock: DefaultClock,
}

/// Held while a request is processed; frees its in-flight slot on drop.
pub struct InFlight(#[allow(dead_code)] OwnedSemaphorePermit);

impl Admission {
    pub fn new(limits: &Limits) -> Self {
        let quota = |rate: u32| {
            let per_sec = NonZeroU32::new(rate).unwrap_or(NonZeroU32::MIN);
            let burst = NonZeroU32::new(rate.saturating_mul(limits.rate_burst)).unwrap_or(per_sec);
            Quota::per_second(per_sec).allow_burst(burst)
        };
        Self {
            per_client: RateLimiter::keyed(quota(limits.rate_per_ip)),
            global: RateLimiter::direct(quota(limits.rate_global)),
            in_flight: Arc::new(Semaphore::new(limits.max_in_flight)),
            clock: DefaultClock::default(),
        }
    }

    pub fn admit(&self, ip: ClientIp) -> Result<InFlight, LimitReject> {
        let now = self.clock.now();
        if let Err(not_until) = self.per_client.check_key(&client_key(ip)) {
            return Err(LimitReject::RateLimitedClient {
                retry_after_secs: ceil_secs(not_until.wait_time_from(now)),
            });
        }
        if let Err(not_until) = self.global.check() {
            return Err(LimitReject::RateLimitedGlobal {
                retry_after_secs: ceil_secs(not_until.wait_time_from(now)),
            });
        }
        self.in_flight
            .clone()
            .try_acquire_owned()
            .map(InFlight)
            .map_err(|_| LimitReject::TooManyInFlight)
    }

    /// Drops buckets that are full again; call periodically.
    pub fn prune(&self) {
        self.per_client.retain_recent();
        self.per_client.shrink_to_fit();
    }
}

/// The key a client is counted under: its address, or its /64 for IPv6
/// (one host usually owns a whole /64). Also keys the per-client
/// connection cap.
pub fn client_key(ip: ClientIp) -> IpAddr {
    match ip.addr() {
        IpAddr::V6(v6) => {
            let bits = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(bits.into())
        }
        v4 @ IpAddr::V4(_) => v4,
    }
}

fn ceil_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0).max(u64::from(d.is_zero()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(per_ip: u32, global: u32, in_flight: usize) -> Limits {
        Limits {
            max_body: 1024,
            header_timeout: Duration::from_secs(1),
            body_timeout: Duration::from_secs(1),
            request_timeout: Duration::from_secs(2),
            max_connections: 10,
            max_connections_per_ip: 10,
            reserved_connections: 0,
            max_in_flight: in_flight,
            rate_per_ip: per_ip,
            rate_global: global,
            rate_burst: 1,
        }
    }

    fn ip(s: &str) -> ClientIp {
        ClientIp::new(s.parse().expect("ip"))
    }

    #[test]
    fn per_client_limit_then_other_client_passes() {
        let a = Admission::new(&limits(2, 100, 100));
        assert!(a.admit(ip("1.1.1.1")).is_ok());
        assert!(a.admit(ip("1.1.1.1")).is_ok());
        match a.admit(ip("1.1.1.1")) {
            Err(LimitReject::RateLimitedClient { retry_after_secs }) => {
                assert!(retry_after_secs >= 1);
            }
            other => panic!("expected per-client limit, got {:?}", other.map(|_| ())),
        }
        assert!(a.admit(ip("2.2.2.2")).is_ok());
    }

    #[test]
    fn ipv6_clients_share_a_bucket_per_64() {
        let a = Admission::new(&limits(1, 100, 100));
        assert!(a.admit(ip("2001:db8::1")).is_ok());
        assert!(matches!(
            a.admit(ip("2001:db8::ffff")),
            Err(LimitReject::RateLimitedClient { .. })
        ));
        assert!(a.admit(ip("2001:db8:0:1::1")).is_ok());
    }

    #[test]
    fn global_limit_applies_across_clients() {
        let a = Admission::new(&limits(100, 2, 100));
        assert!(a.admit(ip("1.1.1.1")).is_ok());
        assert!(a.admit(ip("2.2.2.2")).is_ok());
        assert!(matches!(
            a.admit(ip("3.3.3.3")),
            Err(LimitReject::RateLimitedGlobal { .. })
        ));
    }

    #[test]
    fn in_flight_slots_are_returned_on_drop() {
        let a = Admission::new(&limits(100, 100, 1));
        let held = a.admit(ip("1.1.1.1")).expect("first");
        assert!(matches!(
            a.admit(ip("1.1.1.2")),
            Err(LimitReject::TooManyInFlight)
        ));
        drop(held);
        assert!(a.admit(ip("1.1.1.3")).is_ok());
    }

    #[test]
    fn declared_length_is_checked() {
        let mut h = HeaderMap::new();
        assert!(check_declared_len(&h, 10).is_ok());
        h.insert(http::header::CONTENT_LENGTH, "10".parse().expect("hv"));
        assert!(check_declared_len(&h, 10).is_ok());
        h.insert(http::header::CONTENT_LENGTH, "11".parse().expect("hv"));
        assert_eq!(
            check_declared_len(&h, 10),
            Err(LimitReject::DeclaredTooLarge)
        );
        h.insert(http::header::CONTENT_LENGTH, "x".parse().expect("hv"));
        assert_eq!(
            check_declared_len(&h, 10),
            Err(LimitReject::BadContentLength)
        );
    }

    #[test]
    fn only_a_single_chunked_coding_is_accepted() {
        let mut h = HeaderMap::new();
        assert!(check_transfer_encoding(&h).is_ok());
        for ok in ["chunked", "Chunked", " chunked "] {
            h.insert(http::header::TRANSFER_ENCODING, ok.parse().expect("hv"));
            assert!(check_transfer_encoding(&h).is_ok(), "{ok}");
        }
        for bad in [
            "gzip, chunked",
            "identity, chunked",
            "chunked, chunked",
            "gzip",
        ] {
            h.insert(http::header::TRANSFER_ENCODING, bad.parse().expect("hv"));
            assert_eq!(
                check_transfer_encoding(&h),
                Err(LimitReject::BadTransferEncoding),
                "{bad}"
            );
        }
        h.insert(http::header::TRANSFER_ENCODING, "gzip".parse().expect("hv"));
        h.append(
            http::header::TRANSFER_ENCODING,
            "chunked".parse().expect("hv"),
        );
        assert_eq!(
            check_transfer_encoding(&h),
            Err(LimitReject::BadTransferEncoding)
        );
    }

    #[tokio::test]
    async fn body_cap_applies_without_content_length() {
        let body = http_body_util::Full::new(Bytes::from(vec![b'a'; 11]));
        assert_eq!(
            read_body(body, 10, Duration::from_secs(1)).await,
            Err(LimitReject::BodyTooLarge)
        );
        let body = http_body_util::Full::new(Bytes::from_static(b"0123456789"));
        assert_eq!(
            read_body(body, 10, Duration::from_secs(1)).await.as_deref(),
            Ok(&b"0123456789"[..])
        );
    }

    #[tokio::test]
    async fn a_body_in_many_frames_is_joined_in_order_and_capped() {
        let frames = |n: u8| {
            http_body_util::StreamBody::new(futures_util::stream::iter((0..n).map(|i| {
                Ok::<_, std::convert::Infallible>(http_body::Frame::data(Bytes::from(vec![
                    b'a' + i;
                    4
                ])))
            })))
        };
        assert_eq!(
            read_body(frames(3), 12, Duration::from_secs(1))
                .await
                .as_deref(),
            Ok(&b"aaaabbbbcccc"[..])
        );
        assert_eq!(
            read_body(frames(4), 12, Duration::from_secs(1)).await,
            Err(LimitReject::BodyTooLarge)
        );
        assert_eq!(
            read_body(frames(0), 12, Duration::from_secs(1)).await,
            Ok(Bytes::new())
        );
    }

    #[tokio::test]
    async fn drain_discards_a_small_body_and_refuses_a_large_one() {
        let body = || http_body_util::Full::new(Bytes::from(vec![b'a'; 11]));
        assert!(drain_body(body(), 11, Duration::from_secs(1)).await);
        assert!(!drain_body(body(), 10, Duration::from_secs(1)).await);
    }

    #[test]
    fn retry_after_rounds_up() {
        assert_eq!(ceil_secs(Duration::from_millis(1)), 1);
        assert_eq!(ceil_secs(Duration::from_millis(1500)), 2);
        assert_eq!(ceil_secs(Duration::ZERO), 1);
        assert_eq!(ceil_secs(Duration::from_secs(3)), 3);
    }
}
