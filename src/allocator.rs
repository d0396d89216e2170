//! The binary's allocator is jemalloc (`main.rs`), built with the defaults
//! in `.cargo/config.toml`: a background thread hands freed pages back to
//! the OS about a second after they were freed. A burst of deliveries on
//! thousands of connections allocates hyper's buffers on all of them at
//! once; glibc's malloc keeps that peak resident after the connections
//! park, jemalloc so configured returns it (BENCHMARKS.md, "Memory per idle
//! connection").

use tikv_jemalloc_ctl::{Access, AsName};
use tracing::{debug, warn};

/// What [`.cargo/config.toml`] asks jemalloc for.
const WANTED: Settings = Settings {
    background_thread: true,
    dirty_decay_ms: 1000,
    muzzy_decay_ms: 0,
};

/// The jemalloc options that decide when freed memory leaves RSS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    pub background_thread: bool,
    pub dirty_decay_ms: isize,
    pub muzzy_decay_ms: isize,
}

/// The options jemalloc runs with, as it reports them.
pub fn settings() -> Result<Settings, tikv_jemalloc_ctl::Error> {
    Ok(Settings {
        background_thread: tikv_jemalloc_ctl::opt::background_thread::read()?,
        dirty_decay_ms: b"opt.dirty_decay_ms\0".name().read()?,
        muzzy_decay_ms: b"opt.muzzy_decay_ms\0".name().read()?,
    })
}

/// Warns when the binary was built without the project's jemalloc
/// defaults (built outside this repository, say): it still works, but
/// keeps the memory of past bursts.
pub fn check() {
    match settings() {
        Ok(settings) if settings == WANTED => debug!(?settings, "jemalloc settings"),
        Ok(settings) => warn!(
            ?settings,
            wanted = ?WANTED,
            "jemalloc was built without the project's settings (.cargo/config.toml); memory freed after a burst stays resident longer"
        ),
        Err(e) => warn!(error = %e, "cannot read jemalloc's settings"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jemalloc_runs_with_the_settings_of_cargo_config() {
        assert_eq!(settings().expect("jemalloc settings"), WANTED);
    }
}
