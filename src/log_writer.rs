//! Where `serve`'s log lines go: stderr, in batches. One `write(2)` per
//! access-log line cost ~4 µs of the relay's ~34 µs per request
//! (BENCHMARKS.md, "Per-request cost"). Lines of level INFO and below are
//! kept in memory and written together once [`FLUSH_AT`] bytes wait or
//! every [`FLUSH_EVERY`], like nginx's `access_log … buffer= flush=`;
//! a warning or an error is written at once, after what waits before it,
//! and so is everything when a panic is reported or the process exits.
//! A `SIGKILL` can lose at most the last [`FLUSH_EVERY`] of INFO lines.

use std::io::{self, Write};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::Duration;

use tracing::{Level, Metadata};
use tracing_subscriber::fmt::MakeWriter;

/// Bytes of waiting lines that are written without waiting for the tick.
pub const FLUSH_AT: usize = 32 * 1024;
/// The longest an INFO line waits.
pub const FLUSH_EVERY: Duration = Duration::from_millis(100);

/// The writer handed to `tracing_subscriber`; clones share one buffer.
#[derive(Clone)]
pub struct LogWriter {
    waiting: Arc<Mutex<Vec<u8>>>,
    /// `false`: every line is written at once.
    batch: bool,
}

/// The writer of the process, once [`LogWriter::install`] ran: the exit
/// path and the panic hook flush it.
static INSTALLED: OnceLock<LogWriter> = OnceLock::new();

impl LogWriter {
    /// Creates the process's writer and makes panics flush it before they
    /// are reported. With `batch`, a thread flushes it every
    /// [`FLUSH_EVERY`]; if that thread cannot start, lines are written at
    /// once.
    pub fn install(batch: bool) -> Self {
        let writer = INSTALLED.get_or_init(|| {
            let waiting = Arc::new(Mutex::new(Vec::with_capacity(FLUSH_AT)));
            let ticking = Self {
                waiting: waiting.clone(),
                batch,
            };
            let batch = batch
                && std::thread::Builder::new()
                    .name("log-flush".into())
                    .spawn(move || {
                        loop {
                            std::thread::sleep(FLUSH_EVERY);
                            ticking.flush_waiting();
                        }
                    })
                    .is_ok();
            let report = std::panic::take_hook();
            std::panic::set_hook(Box::new(move |info| {
                flush();
                report(info);
            }));
            Self { waiting, batch }
        });
        writer.clone()
    }

    fn lock(&self) -> MutexGuard<'_, Vec<u8>> {
        // A panic while a line was being appended leaves at worst a
        // partial line; logging goes on.
        self.waiting.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Writes what waits. Errors writing to stderr are dropped, as
    /// `eprintln!` would panic on them and a log line is not worth that.
    fn flush_waiting(&self) {
        let mut waiting = self.lock();
        write_out(&mut waiting);
    }

    fn append(&self, line: &[u8], urgent: bool) {
        let mut waiting = self.lock();
        waiting.extend_from_slice(line);
        if urgent || waiting.len() >= FLUSH_AT {
            write_out(&mut waiting);
        }
    }
}

fn write_out(waiting: &mut Vec<u8>) {
    if !waiting.is_empty() {
        let _ = io::stderr().lock().write_all(waiting);
        waiting.clear();
    }
}

/// Writes every waiting line of the process's writer, if there is one.
pub fn flush() {
    if let Some(writer) = INSTALLED.get() {
        writer.flush_waiting();
    }
}

/// One event's line on its way into the buffer.
pub struct Line<'a> {
    writer: &'a LogWriter,
    urgent: bool,
}

impl Write for Line<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.writer.append(buf, self.urgent);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for LogWriter {
    type Writer = Line<'a>;

    fn make_writer(&'a self) -> Self::Writer {
        Line {
            writer: self,
            urgent: true,
        }
    }

    fn make_writer_for(&'a self, meta: &Metadata<'_>) -> Self::Writer {
        Line {
            writer: self,
            urgent: !self.batch || *meta.level() <= Level::WARN,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn writer() -> LogWriter {
        LogWriter {
            waiting: Arc::new(Mutex::new(Vec::new())),
            batch: true,
        }
    }

    #[test]
    fn info_lines_wait_and_warnings_take_them_along() {
        let writer = writer();
        writer.append(b"info 1\n", false);
        writer.append(b"info 2\n", false);
        assert_eq!(&writer.lock()[..], b"info 1\ninfo 2\n");
        writer.append(b"warn\n", true);
        assert!(writer.lock().is_empty(), "a warning writes what waits");
    }

    #[test]
    fn a_full_buffer_is_written_without_the_tick() {
        let writer = writer();
        let line = vec![b'x'; 1000];
        let mut appended = 0;
        while appended + line.len() < FLUSH_AT {
            writer.append(&line, false);
            appended += line.len();
        }
        assert_eq!(writer.lock().len(), appended, "still waiting");
        writer.append(&line, false);
        assert!(writer.lock().is_empty(), "written once full");
    }

    #[test]
    fn events_of_warning_level_and_above_are_written_at_once() {
        let writer = writer();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(writer.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!("an access line");
            let waiting = String::from_utf8_lossy(&writer.lock()).into_owned();
            assert!(waiting.contains("an access line"), "{waiting:?}");
            tracing::warn!("a warning");
            assert!(writer.lock().is_empty(), "the warning took it along");
        });
    }
}
