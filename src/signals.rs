//! The signal loop: SIGHUP reloads, SIGTERM/SIGINT start the graceful
//! shutdown, and a second SIGTERM/SIGINT during it stops at once (as Ctrl-C
//! twice does in Vector or Caddy), for an operator who cannot wait out the
//! drain deadline. Stopping at once is as safe as `kill -9`: what was answered
//! 200 is in the broker or fsynced in the spool, and is delivered after the
//! next start; requests still in flight get no answer, and Ocrolus retries them.

use tokio::signal::unix::{Signal, SignalKind, signal};
use tracing::{info, warn};

use crate::app::Relay;

/// The graceful drain was cut short by a second signal. The process exits
/// with `128 + signal` (130 for SIGINT, 143 for SIGTERM), as a shell reports
/// a process killed by it.
#[derive(Debug, thiserror::Error)]
#[error("{signal} during the graceful drain: stopped without finishing it")]
pub struct ForcedExit {
    pub signal: &'static str,
    pub code: u8,
}

const SIGINT: ForcedExit = ForcedExit {
    signal: "SIGINT",
    code: 128 + 2,
};
const SIGTERM: ForcedExit = ForcedExit {
    signal: "SIGTERM",
    code: 128 + 15,
};

/// The signals the relay handles, installed before it starts serving: a
/// SIGHUP sent as soon as the "serving" line appears must reload, not kill
/// it (the default action of an unhandled SIGHUP).
pub struct Signals {
    hangup: Signal,
    terminate: Signal,
    interrupt: Signal,
}

impl Signals {
    pub fn install() -> std::io::Result<Self> {
        Ok(Self {
            hangup: signal(SignalKind::hangup())?,
            terminate: signal(SignalKind::terminate())?,
            interrupt: signal(SignalKind::interrupt())?,
        })
    }
}

/// Serves until SIGTERM or SIGINT, reloading on SIGHUP; then drains, unless
/// a second SIGTERM or SIGINT arrives first ([`ForcedExit`]).
pub async fn run_until_signalled(relay: Relay, signals: Signals) -> anyhow::Result<()> {
    let Signals {
        mut hangup,
        mut terminate,
        mut interrupt,
    } = signals;
    loop {
        tokio::select! {
            _ = hangup.recv() => {
                info!("SIGHUP: reloading allowlist, secrets and certificate");
                // A failed reload is logged and counted; the old config stays.
                let _ = relay.state().reload();
            }
            _ = terminate.recv() => {
                info!("SIGTERM: draining (send it again to stop at once)");
                break;
            }
            _ = interrupt.recv() => {
                info!("SIGINT: draining (press Ctrl-C again to stop at once)");
                break;
            }
        }
    }
    let forced = tokio::select! {
        () = relay.shutdown() => return Ok(()),
        _ = terminate.recv() => SIGTERM,
        _ = interrupt.recv() => SIGINT,
    };
    warn!(
        signal = forced.signal,
        exit_code = forced.code,
        "second signal: stopping now without finishing the drain; events answered 200 are in \
         the broker or the spool (delivered after the next start), requests in flight get no answer"
    );
    Err(forced.into())
}
