//! The signal loop: SIGHUP reloads, SIGTERM/SIGINT start the graceful shutdown.

use tracing::info;

use crate::app::Relay;

/// Serves until SIGTERM or SIGINT, reloading on SIGHUP; then drains.
pub async fn run_until_signalled(relay: Relay) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hangup = signal(SignalKind::hangup())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    loop {
        tokio::select! {
            _ = hangup.recv() => {
                info!("SIGHUP: reloading allowlist, secrets and certificate");
                // A failed reload is logged and counted; the old config stays.
                let _ = relay.state().reload();
            }
            _ = terminate.recv() => { info!("SIGTERM: draining"); break; }
            _ = interrupt.recv() => { info!("SIGINT: draining"); break; }
        }
    }
    relay.shutdown().await;
    Ok(())
}
