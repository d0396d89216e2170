//! How `serve`'s log lines are formatted. tracing-subscriber's formatters
//! cost ~1.2 µs (text) and ~2 µs (JSON) per access-log line, mostly in
//! `core::fmt` and in JSON written a few bytes at a time through a UTF-8
//! check (BENCHMARKS.md, "Third pass", lever 9). [`LineFormat`]
//! writes the relay's own events itself — the very bytes tracing-subscriber
//! would write, which the tests check — and hands every other event
//! (another crate's, one inside a span, a terminal's coloured line) to
//! tracing-subscriber's formatter.

use std::cell::RefCell;
use std::fmt::{self, Write as _};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::ser::{SerializeMap, Serializer as _};
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Metadata, Subscriber};
use tracing_subscriber::field::VisitOutput as _;
use tracing_subscriber::fmt::format::{DefaultVisitor, Writer};
use tracing_subscriber::fmt::time::{FormatTime, SystemTime as Timer};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// The relay's formatter: `fallback` is tracing-subscriber's formatter of
/// the same layout, for the events this one does not write itself.
pub struct LineFormat<F> {
    json: bool,
    fallback: F,
}

impl<F> LineFormat<F> {
    pub fn text(fallback: F) -> Self {
        Self {
            json: false,
            fallback,
        }
    }

    pub fn json(fallback: F) -> Self {
        Self {
            json: true,
            fallback,
        }
    }
}

impl<S, N, F> FormatEvent<S, N> for LineFormat<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let meta = event.metadata();
        // A `log` record's fields name its real target (`log.target`).
        if writer.has_ansi_escapes()
            || !meta.target().starts_with(env!("CARGO_CRATE_NAME"))
            || meta.fields().field("log.target").is_some()
            || ctx.event_scope().is_some()
        {
            return self.fallback.format_event(ctx, writer, event);
        }
        if self.json {
            json_line(&mut writer, meta, event)
        } else {
            text_line(&mut writer, meta, event)
        }
    }
}

/// `2026-11-30T13:07:36.053306Z  INFO target: message field=value …`, as
/// tracing-subscriber's `Full` format without colours.
fn text_line(writer: &mut Writer<'_>, meta: &Metadata<'_>, event: &Event<'_>) -> fmt::Result {
    timestamp(writer)?;
    writer.write_char(' ')?;
    writer.write_str(padded_level(*meta.level()))?;
    writer.write_char(' ')?;
    writer.write_str(meta.target())?;
    writer.write_str(": ")?;
    let mut fields = TextFields {
        writer: writer.by_ref(),
        empty: true,
        result: Ok(()),
    };
    event.record(&mut fields);
    fields.result?;
    writer.write_char('\n')
}

/// `{"timestamp":…,"level":…,<fields>,"target":…}`, as tracing-subscriber's
/// JSON format with `flatten_event`. serde_json writes into a buffer of
/// this thread's, and the line goes to `writer` in one piece.
fn json_line(writer: &mut Writer<'_>, meta: &Metadata<'_>, event: &Event<'_>) -> fmt::Result {
    thread_local! {
        static LINE: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    }
    let mut stamp = Stamp::new();
    timestamp(&mut Writer::new(&mut stamp))?;
    LINE.with_borrow_mut(|line| {
        line.clear();
        let mut serializer = serde_json::Serializer::new(&mut *line);
        let mut map = serializer.serialize_map(None).map_err(|_| fmt::Error)?;
        map.serialize_entry("timestamp", stamp.as_str())
            .and_then(|()| map.serialize_entry("level", meta.level().as_str()))
            .map_err(|_| fmt::Error)?;
        let mut fields = JsonFields {
            map,
            result: Ok(()),
        };
        event.record(&mut fields);
        let JsonFields { mut map, result } = fields;
        result
            .and_then(|()| map.serialize_entry("target", meta.target()))
            .and_then(|()| map.end())
            .map_err(|_| fmt::Error)?;
        writer.write_str(std::str::from_utf8(line).map_err(|_| fmt::Error)?)?;
        writer.write_char('\n')
    })
}

fn padded_level(level: Level) -> &'static str {
    match level {
        Level::TRACE => "TRACE",
        Level::DEBUG => "DEBUG",
        Level::INFO => " INFO",
        Level::WARN => " WARN",
        Level::ERROR => "ERROR",
    }
}

/// tracing-subscriber's timestamp, with the date and time of day formatted
/// once a second per thread and only the microseconds every time.
fn timestamp(writer: &mut Writer<'_>) -> fmt::Result {
    thread_local! {
        static SECOND: RefCell<(u64, Stamp)> = const { RefCell::new((u64::MAX, Stamp::new())) };
    }
    let Ok(now) = SystemTime::now().duration_since(UNIX_EPOCH) else {
        return Timer.format_time(writer);
    };
    SECOND.with_borrow_mut(|(second, prefix)| {
        if *second != now.as_secs() {
            // "…T13:07:36.053306Z": keep what comes before the dot.
            let mut full = Stamp::new();
            Timer.format_time(&mut Writer::new(&mut full))?;
            let date = full.as_str().split('.').next().unwrap_or_default();
            *prefix = Stamp::new();
            prefix.write_str(date)?;
            *second = now.as_secs();
        }
        writer.write_str(prefix.as_str())?;
        let micros = now.subsec_micros();
        let mut digits = [b'0'; 6];
        let mut rest = micros;
        for digit in digits.iter_mut().rev() {
            // `rest % 10` is a single digit.
            *digit = b'0' + u8::try_from(rest % 10).unwrap_or(0);
            rest /= 10;
        }
        writer.write_char('.')?;
        writer.write_str(std::str::from_utf8(&digits).map_err(|_| fmt::Error)?)?;
        writer.write_char('Z')
    })
}

/// A timestamp's text without an allocation.
struct Stamp {
    bytes: [u8; 32],
    len: usize,
}

impl Stamp {
    const fn new() -> Self {
        Self {
            bytes: [0; 32],
            len: 0,
        }
    }

    fn as_str(&self) -> &str {
        std::str::from_utf8(&self.bytes[..self.len]).unwrap_or_default()
    }
}

impl fmt::Write for Stamp {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let end = self.len + s.len();
        self.bytes
            .get_mut(self.len..end)
            .ok_or(fmt::Error)?
            .copy_from_slice(s.as_bytes());
        self.len = end;
        Ok(())
    }
}

/// tracing-subscriber's `DefaultVisitor`, with strings and integers written
/// without `core::fmt` where that gives the same bytes; the message (which
/// it sanitizes of terminal escapes), errors and `log.` fields are handed
/// to `DefaultVisitor` itself.
struct TextFields<'w> {
    writer: Writer<'w>,
    empty: bool,
    result: fmt::Result,
}

impl TextFields<'_> {
    fn delegate(&mut self, record: impl FnOnce(&mut DefaultVisitor<'_>)) {
        if self.result.is_err() {
            return;
        }
        let mut visitor = DefaultVisitor::new(self.writer.by_ref(), self.empty);
        record(&mut visitor);
        self.result = visitor.finish();
        self.empty = false;
    }

    /// The message: no `field=`, and sanitized unless the writer says not.
    fn message(&mut self, message: &dyn fmt::Debug) {
        if self.result.is_err() {
            return;
        }
        if !std::mem::replace(&mut self.empty, false) {
            self.result = self.writer.write_char(' ');
        }
        self.result = self.result.and_then(|()| {
            if self.writer.sanitizes_ansi_escapes() {
                write!(Sanitized(&mut self.writer), "{message:?}")
            } else {
                write!(self.writer, "{message:?}")
            }
        });
    }

    /// ` field=` and the value `write` writes.
    fn write(&mut self, field: &Field, write: impl FnOnce(&mut Writer<'_>) -> fmt::Result) {
        if self.result.is_err() {
            return;
        }
        let name = field.name();
        if !std::mem::replace(&mut self.empty, false) {
            self.result = self.writer.write_char(' ');
        }
        self.result = self
            .result
            .and_then(|()| {
                self.writer
                    .write_str(name.strip_prefix("r#").unwrap_or(name))
            })
            .and_then(|()| self.writer.write_char('='))
            .and_then(|()| write(&mut self.writer.by_ref()));
    }
}

impl Visit for TextFields<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if is_special(field) || !debug_is_plain(value) {
            self.delegate(|visitor| visitor.record_str(field, value));
        } else {
            self.write(field, |writer| {
                writer.write_char('"')?;
                writer.write_str(value)?;
                writer.write_char('"')
            });
        }
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        if is_special(field) {
            self.delegate(|visitor| visitor.record_u64(field, value));
        } else {
            self.write(field, |writer| {
                writer.write_str(itoa::Buffer::new().format(value))
            });
        }
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        if is_special(field) {
            self.delegate(|visitor| visitor.record_i64(field, value));
        } else {
            self.write(field, |writer| {
                writer.write_str(itoa::Buffer::new().format(value))
            });
        }
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.delegate(|visitor| visitor.record_error(field, value));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if field.name() == "message" {
            self.message(value);
        } else if is_special(field) {
            self.delegate(|visitor| visitor.record_debug(field, value));
        } else {
            self.write(field, |writer| write!(writer, "{value:?}"));
        }
    }
}

/// tracing-subscriber's sanitizing of messages (its `escape.rs`): the
/// characters a terminal would act on come out escaped. A piece without
/// any (no such byte, and no 0xC2 that starts a C1 control) is written
/// whole rather than a character at a time.
struct Sanitized<'a, 'w>(&'a mut Writer<'w>);

impl fmt::Write for Sanitized<'_, '_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        if !s
            .bytes()
            .any(|b| matches!(b, 0x07 | 0x08 | 0x0c | 0x1b | 0x7f | 0xc2))
        {
            return self.0.write_str(s);
        }
        for ch in s.chars() {
            match ch {
                '\x1b' => self.0.write_str("\\x1b")?,
                '\x07' => self.0.write_str("\\x07")?,
                '\x08' => self.0.write_str("\\x08")?,
                '\x0c' => self.0.write_str("\\x0c")?,
                '\x7f' => self.0.write_str("\\x7f")?,
                '\u{80}'..='\u{9f}' => write!(self.0, "\\u{{{:x}}}", u32::from(ch))?,
                _ => self.0.write_char(ch)?,
            }
        }
        Ok(())
    }
}

/// Fields `DefaultVisitor` treats apart: the message, and `log.` fields it
/// leaves out.
fn is_special(field: &Field) -> bool {
    field.name() == "message" || field.name().starts_with("log.")
}

/// Whether `str`'s `Debug` is the text between two quotes: printable
/// ASCII without a quote or a backslash.
fn debug_is_plain(value: &str) -> bool {
    value
        .bytes()
        .all(|b| (b' '..=b'~').contains(&b) && b != b'"' && b != b'\\')
}

/// tracing-serde's `SerdeMapVisitor`, which tracing-subscriber's JSON
/// format uses for flattened fields.
struct JsonFields<M> {
    map: M,
    result: Result<(), serde_json::Error>,
}

impl<M: SerializeMap<Error = serde_json::Error>> JsonFields<M> {
    fn entry(&mut self, field: &Field, value: &(impl serde::Serialize + ?Sized)) {
        if self.result.is_ok() {
            self.result = self.map.serialize_entry(field.name(), value);
        }
    }
}

impl<M: SerializeMap<Error = serde_json::Error>> Visit for JsonFields<M> {
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.entry(field, &value);
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.entry(field, &value);
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.entry(field, &value);
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.entry(field, &value);
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.entry(field, value);
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.entry(field, &format_args!("{value:?}"));
    }
}

#[cfg(test)]
mod tests {
    use std::io;
    use std::net::IpAddr;
    use std::sync::{Arc, Mutex, PoisonError};

    use tracing::{debug, error, info, info_span, warn};
    use tracing_subscriber::fmt::MakeWriter;

    use super::*;

    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let mut all = self.0.lock().unwrap_or_else(PoisonError::into_inner);
            all.extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl MakeWriter<'_> for Captured {
        type Writer = Self;

        fn make_writer(&self) -> Self {
            self.clone()
        }
    }

    /// A fallback that says it was used, to tell which formatter wrote a line.
    struct Marked;

    impl<S, N> FormatEvent<S, N> for Marked
    where
        S: Subscriber + for<'a> LookupSpan<'a>,
        N: for<'a> FormatFields<'a> + 'static,
    {
        fn format_event(
            &self,
            _: &FmtContext<'_, S, N>,
            mut writer: Writer<'_>,
            _: &Event<'_>,
        ) -> fmt::Result {
            writeln!(writer, "FALLBACK")
        }
    }

    #[derive(Debug)]
    struct Outer(io::Error);

    impl fmt::Display for Outer {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("publishing failed")
        }
    }

    impl std::error::Error for Outer {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    /// Every kind of field the relay logs, and the awkward values of each.
    fn events() {
        let client: IpAddr = "203.0.113.7".parse().expect("address");
        info!(
            client_ip = %client,
            source = "ocrolus",
            outcome = "published",
            status = 200,
            latency_ms = 3.25,
            delivery_id = %"0193a1b2-7c3d-7e4f-8a9b-0c1d2e3f4a5b",
            "webhook accepted"
        );
        info!("only a message");
        info!(count = 3_u64, "formatted {} message", "with args");
        warn!(
            value = "quote \" backslash \\ newline \n tab \t",
            "awkward strings"
        );
        warn!(
            value = "escape \u{1b}[31m bell \u{7} é ü \u{85}",
            "more awkward strings"
        );
        error!(
            negative = -17_i64,
            zero = 0_u64,
            max = u64::MAX,
            min = i64::MIN
        );
        info!(yes = true, no = false, "booleans");
        info!(
            one = 1.0,
            tiny = 1e-7,
            big = 1e17,
            nan = f64::NAN,
            neg = -0.0,
            "floats"
        );
        info!(list = ?vec!["a", "b"], text = ?"debug str", "debug values");
        let plain: &(dyn std::error::Error + 'static) = &io::Error::other("disk full");
        let chained = Outer(io::Error::other("connection reset"));
        let chained: &(dyn std::error::Error + 'static) = &chained;
        error!(error = plain, "an error");
        error!(error = chained, "an error with a source");
        info!(r#type = "raw", "a raw identifier");
        info!(
            empty = "",
            wide = 340_282_366_920_938_463_463_374_607_431_768_211_455_u128
        );
        debug!("message with an escape \u{1b}[2J inside");
        info!("C1 \u{9b} and \u{7f}, \u{a0} and é in a message");
        info!(message = "a message given as a field", after = 1_u64);
        info!(first = "no message at all", second = 2_u64);
    }

    fn lines<F>(json: bool, format: F) -> Vec<String>
    where
        F: FormatEvent<
                tracing_subscriber::Registry,
                tracing_subscriber::fmt::format::DefaultFields,
            > + FormatEvent<tracing_subscriber::Registry, tracing_subscriber::fmt::format::JsonFields>
            + Send
            + Sync
            + 'static,
    {
        let captured = Captured::default();
        let builder = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_max_level(Level::TRACE)
            .with_writer(captured.clone());
        if json {
            let subscriber = builder.json().event_format(format).finish();
            tracing::subscriber::with_default(subscriber, events);
        } else {
            let subscriber = builder.event_format(format).finish();
            tracing::subscriber::with_default(subscriber, events);
        }
        let all = captured.0.lock().unwrap_or_else(PoisonError::into_inner);
        String::from_utf8(all.clone())
            .expect("UTF-8")
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// The line with its timestamp replaced, after checking its shape.
    fn masked(line: &str) -> String {
        let at = line.find("\"timestamp\":\"").map_or(0, |at| at + 13);
        let stamp = &line[at..at + 27];
        let shape: String = stamp
            .chars()
            .map(|c| if c.is_ascii_digit() { '0' } else { c })
            .collect();
        assert_eq!(shape, "0000-00-00T00:00:00.000000Z", "{line}");
        format!("{}<time>{}", &line[..at], &line[at + 27..])
    }

    fn assert_same_as_tracing_subscriber(json: bool) {
        let theirs = if json {
            lines(
                true,
                tracing_subscriber::fmt::format().json().flatten_event(true),
            )
        } else {
            lines(false, tracing_subscriber::fmt::format())
        };
        let ours = if json {
            lines(true, LineFormat::json(Marked))
        } else {
            lines(false, LineFormat::text(Marked))
        };
        assert_eq!(theirs.len(), 17);
        assert_eq!(ours.len(), theirs.len(), "{ours:#?}");
        for (ours, theirs) in ours.iter().zip(&theirs) {
            assert_eq!(masked(ours), masked(theirs));
        }
    }

    #[test]
    fn text_lines_are_tracing_subscribers_bytes() {
        assert_same_as_tracing_subscriber(false);
    }

    #[test]
    fn json_lines_are_tracing_subscribers_bytes() {
        assert_same_as_tracing_subscriber(true);
    }

    #[test]
    fn events_in_a_span_are_left_to_tracing_subscriber() {
        let captured = Captured::default();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(captured.clone())
            .event_format(LineFormat::text(Marked))
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            info_span!("connection", id = 1).in_scope(|| info!("inside"));
            info!("outside");
        });
        let all = captured.0.lock().unwrap_or_else(PoisonError::into_inner);
        let all = String::from_utf8_lossy(&all);
        let lines: Vec<&str> = all.lines().collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0], "FALLBACK");
        assert!(lines[1].ends_with(" INFO ocrolus_relay::log_format::tests: outside"));
    }

    #[test]
    fn the_timestamp_is_tracing_subscribers_to_the_second() {
        for _ in 0..3 {
            let mut ours = Stamp::new();
            timestamp(&mut Writer::new(&mut ours)).expect("timestamp");
            let mut theirs = Stamp::new();
            Timer
                .format_time(&mut Writer::new(&mut theirs))
                .expect("timestamp");
            let (ours, theirs) = (ours.as_str(), theirs.as_str());
            assert_eq!(ours.len(), theirs.len());
            assert!(ours <= theirs, "{ours} after {theirs}");
            if ours[..19] == theirs[..19] {
                return;
            }
        }
        panic!("three timestamps in a row crossed a second");
    }
}
