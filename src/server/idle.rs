//! When a connection carries no request: what it may still hold, and when
//! it is closed. Requests mark their start and end with two atomic updates
//! and one clock read; the connection task looks at the marks on a timer
//! (at most once per [`Deadlines::tick`]), so a busy connection pays no
//! wake-up per request.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

/// How long an HTTP/1 connection keeps hyper (its read and write buffers,
/// ~16 KiB) after its last request ended. A sender that delivers again
/// within this reuses them; one that stays quiet costs only its socket.
const RELEASE_AFTER: Duration = Duration::from_secs(1);

/// The request marks of one connection.
pub(super) struct Activity {
    start: Instant,
    /// Requests started, and requests ended.
    started: AtomicU64,
    ended: AtomicU64,
    /// Nanoseconds from `start` to the end of the last request.
    last_end: AtomicU64,
}

/// What the marks said at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Marks {
    pub started: u64,
    pub ended: u64,
    pub last_end: Instant,
}

impl Activity {
    pub(super) fn new() -> Arc<Self> {
        Arc::new(Self {
            start: Instant::now(),
            started: AtomicU64::new(0),
            ended: AtomicU64::new(0),
            last_end: AtomicU64::new(0),
        })
    }

    pub(super) fn marks(&self) -> Marks {
        // `ended` first: a request seen ended is also seen started.
        let ended = self.ended.load(Ordering::Acquire);
        let last_end = self.start + Duration::from_nanos(self.last_end.load(Ordering::Relaxed));
        Marks {
            started: self.started.load(Ordering::Acquire),
            ended,
            last_end,
        }
    }
}

/// Marks a request under way on its connection while it lives.
pub(super) struct ActiveRequest(Arc<Activity>);

impl ActiveRequest {
    pub(super) fn start(activity: &Arc<Activity>) -> Self {
        activity.started.fetch_add(1, Ordering::AcqRel);
        Self(activity.clone())
    }
}

impl Drop for ActiveRequest {
    fn drop(&mut self) {
        let since_start = self.0.start.elapsed();
        let nanos = u64::try_from(since_start.as_nanos()).unwrap_or(u64::MAX);
        self.0.last_end.fetch_max(nanos, Ordering::Relaxed);
        self.0.ended.fetch_add(1, Ordering::AcqRel);
    }
}

/// The idle limits of a connection.
#[derive(Debug, Clone, Copy)]
pub(super) struct Deadlines {
    /// No request under way for this long (since the start or the last
    /// request's end): the connection is closed.
    pub close_after: Duration,
    /// No request for this long: an HTTP/1 connection gives hyper back.
    pub release_after: Duration,
}

/// What the connection task does when it looks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Verdict {
    /// Idle past the limit. `never_served`: not one request was started.
    Close { never_served: bool },
    /// Idle long enough to give hyper's buffers back.
    Release,
    /// Look again then.
    LookAt(Instant),
}

impl Deadlines {
    pub(super) fn new(header_timeout: Duration) -> Self {
        Self {
            close_after: header_timeout,
            release_after: RELEASE_AFTER.min(header_timeout / 2),
        }
    }

    /// When a connection with these marks is closed if nothing happens.
    pub(super) fn close_at(self, marks: Marks) -> Instant {
        marks.last_end + self.close_after
    }

    /// The longest the task sleeps between looks, so that a request ending
    /// after a look moves the next deadline by at most this much.
    fn tick(self) -> Duration {
        self.release_after
    }

    /// `releasable_after`: the count of ended requests when hyper took the
    /// connection. It is released only once a request has ended since: a
    /// fresh hyper connection would answer a request that is still arriving
    /// with `Connection: close`, and one with a partial request must wait
    /// for the rest. `None`: this connection is never released (h2).
    pub(super) fn verdict(
        self,
        marks: Marks,
        releasable_after: Option<u64>,
        now: Instant,
    ) -> Verdict {
        let next_look = now + self.tick();
        if marks.started > marks.ended {
            return Verdict::LookAt(next_look);
        }
        let close_at = self.close_at(marks);
        if now >= close_at {
            return Verdict::Close {
                never_served: marks.started == 0,
            };
        }
        let released = releasable_after.is_some_and(|ended| marks.ended > ended);
        if released {
            let release_at = marks.last_end + self.release_after;
            if now >= release_at {
                return Verdict::Release;
            }
            return Verdict::LookAt(release_at.min(next_look));
        }
        Verdict::LookAt(close_at.min(next_look))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Deadlines = Deadlines {
        close_after: Duration::from_secs(10),
        release_after: Duration::from_secs(1),
    };

    fn marks(started: u64, ended: u64, last_end: Instant) -> Marks {
        Marks {
            started,
            ended,
            last_end,
        }
    }

    #[test]
    fn release_waits_for_a_half_of_a_short_header_timeout() {
        assert_eq!(
            Deadlines::new(Duration::from_secs(10)).release_after,
            RELEASE_AFTER
        );
        assert_eq!(
            Deadlines::new(Duration::from_secs(1)).release_after,
            Duration::from_millis(500)
        );
    }

    #[test]
    fn a_request_under_way_is_never_closed_or_released() {
        let t0 = Instant::now();
        let late = t0 + Duration::from_secs(3600);
        assert_eq!(
            LIMITS.verdict(marks(3, 2, t0), Some(0), late),
            Verdict::LookAt(late + LIMITS.tick())
        );
    }

    #[test]
    fn an_idle_connection_is_closed_at_the_limit_and_says_whether_it_served() {
        let t0 = Instant::now();
        let at = t0 + LIMITS.close_after;
        assert_eq!(
            LIMITS.verdict(marks(0, 0, t0), Some(0), at),
            Verdict::Close { never_served: true }
        );
        assert_eq!(
            LIMITS.verdict(marks(1, 1, t0), None, at),
            Verdict::Close {
                never_served: false
            }
        );
        assert!(matches!(
            LIMITS.verdict(marks(0, 0, t0), Some(0), at - Duration::from_millis(1)),
            Verdict::LookAt(_)
        ));
    }

    #[test]
    fn release_needs_a_request_ended_on_this_lease_and_a_quiet_second() {
        let t0 = Instant::now();
        let quiet = t0 + LIMITS.release_after;
        assert_eq!(
            LIMITS.verdict(marks(4, 4, t0), Some(3), quiet),
            Verdict::Release
        );
        // Nothing ended since hyper took it: wait for the close instead.
        assert_eq!(
            LIMITS.verdict(marks(4, 4, t0), Some(4), quiet),
            Verdict::LookAt(quiet + LIMITS.tick())
        );
        // h2 is never released.
        assert_eq!(
            LIMITS.verdict(marks(4, 4, t0), None, quiet),
            Verdict::LookAt(quiet + LIMITS.tick())
        );
        let early = t0 + Duration::from_millis(300);
        assert_eq!(
            LIMITS.verdict(marks(4, 4, t0), Some(3), early),
            Verdict::LookAt(quiet)
        );
    }

    #[test]
    fn the_marks_follow_requests() {
        let activity = Activity::new();
        let before = activity.marks();
        let request = ActiveRequest::start(&activity);
        let during = activity.marks();
        assert_eq!((during.started, during.ended), (1, 0));
        drop(request);
        let after = activity.marks();
        assert_eq!((after.started, after.ended), (1, 1));
        assert!(after.last_end >= before.last_end);
    }
}
