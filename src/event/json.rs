//! Is this text JSON (RFC 8259)? A grammar check only, iterative so that no
//! nesting depth is too deep, that also reports what strict parsers (serde,
//! most typed consumers) refuse although the grammar allows it: a number
//! beyond f64 and a `\u` escape that is a lone surrogate. Those bodies are
//! JSON, so an authentic one is published (unclassified), never refused.
//! On the way it notes where the top-level members resolution reads are,
//! so that no second pass over the body (serde's) is needed to find them.

/// A byte that ends the plain run of a string: its quote, an escape, or a
/// control character (not allowed in a string).
fn needs_look(c: u8) -> bool {
    // `|`, not `||`: no branch per byte, so a chunk's test vectorizes.
    (c == b'"') | (c == b'\\') | (c < 0x20)
}

/// What a JSON text holds that strict parsers refuse, and where the
/// members resolution reads are.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Findings {
    pub number_out_of_range: bool,
    pub lone_surrogate: bool,
    /// Nested deeper than serde_json's recursion limit.
    pub too_deep: bool,
    pub members: Members,
}

/// The values of the top-level object's `event_name`, `event` and `status`
/// members, found by their decoded names as serde's derive finds them.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Members {
    pub event_name: Option<Span>,
    pub event: Option<Span>,
    pub status: Option<Span>,
    /// One of the three appears more than once (serde refuses the object).
    pub repeated: bool,
}

/// Byte range of a member's value in the text (whitespace trimmed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    pub start: usize,
    pub end: usize,
}

/// Which of the read members a top-level key names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Member {
    EventName,
    Event,
    Status,
}

impl Members {
    fn set(&mut self, member: Member, span: Span) {
        let slot = match member {
            Member::EventName => &mut self.event_name,
            Member::Event => &mut self.event,
            Member::Status => &mut self.status,
        };
        self.repeated |= slot.replace(span).is_some();
    }
}

/// serde_json refuses 128 levels of nesting; anything from there on counts.
const STRICT_DEPTH: usize = 127;

/// `None` if `text` is not one JSON value with optional whitespace around it.
pub fn scan(text: &str) -> Option<Findings> {
    let mut p = Scanner {
        b: text.as_bytes(),
        i: 0,
        found: Findings::default(),
    };
    // Open containers, innermost last: `{` or `[`.
    let mut open: Vec<u8> = Vec::new();
    // A read member of the top-level object whose value is being scanned,
    // and where that value starts.
    let mut member: Option<(Member, usize)> = None;
    loop {
        p.ws();
        match p.peek()? {
            b'{' => {
                p.i += 1;
                p.ws();
                if !p.eat(b'}') {
                    open.push(b'{');
                    p.found.too_deep |= open.len() > STRICT_DEPTH;
                    if let Some(m) = p.key(open.len())? {
                        member = Some((m, p.i));
                    }
                    continue;
                }
            }
            b'[' => {
                p.i += 1;
                p.ws();
                if !p.eat(b']') {
                    open.push(b'[');
                    p.found.too_deep |= open.len() > STRICT_DEPTH;
                    continue;
                }
            }
            b'"' => p.string()?,
            b't' => p.literal(b"true")?,
            b'f' => p.literal(b"false")?,
            b'n' => p.literal(b"null")?,
            _ => p.number()?,
        }
        // A value ended: close containers until the next value starts.
        loop {
            let end = p.i;
            p.ws();
            let Some(&container) = open.last() else {
                return (p.i == p.b.len()).then_some(p.found);
            };
            if open.len() == 1
                && matches!(p.peek(), Some(b',' | b'}'))
                && let Some((m, start)) = member.take()
            {
                p.found.members.set(m, Span { start, end });
            }
            match p.next()? {
                b',' if container == b'{' => {
                    if let Some(m) = p.key(open.len())? {
                        member = Some((m, p.i));
                    }
                    break;
                }
                b',' => break,
                b'}' if container == b'{' => {
                    open.pop();
                }
                b']' if container == b'[' => {
                    open.pop();
                }
                _ => return None,
            }
        }
    }
}

/// The member a quoted key names, compared after decoding as serde does:
/// `"ev\u0065nt"` is `event`.
fn member_named(quoted: &[u8]) -> Option<Member> {
    let decoded;
    let name = match quoted.get(1..quoted.len() - 1)? {
        plain if !plain.contains(&b'\\') => plain,
        _ => {
            decoded = serde_json::from_slice::<String>(quoted).ok()?;
            decoded.as_bytes()
        }
    };
    match name {
        b"event_name" => Some(Member::EventName),
        b"event" => Some(Member::Event),
        b"status" => Some(Member::Status),
        _ => None,
    }
}

struct Scanner<'a> {
    b: &'a [u8],
    i: usize,
    found: Findings,
}

impl Scanner<'_> {
    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    fn next(&mut self) -> Option<u8> {
        let c = self.peek()?;
        self.i += 1;
        Some(c)
    }

    fn eat(&mut self, c: u8) -> bool {
        let hit = self.peek() == Some(c);
        if hit {
            self.i += 1;
        }
        hit
    }

    fn ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.i += 1;
        }
    }

    /// A member name, its colon and the whitespace after it, so that the
    /// value starts here; at `depth` 1 (the top-level object), which read
    /// member it names, if any.
    fn key(&mut self, depth: usize) -> Option<Option<Member>> {
        self.ws();
        if self.peek()? != b'"' {
            return None;
        }
        let start = self.i;
        self.string()?;
        let name = &self.b[start..self.i];
        self.ws();
        if !self.eat(b':') {
            return None;
        }
        self.ws();
        Some(if depth == 1 { member_named(name) } else { None })
    }

    fn literal(&mut self, word: &[u8]) -> Option<()> {
        let end = self.i.checked_add(word.len())?;
        (self.b.get(self.i..end)? == word).then(|| self.i = end)
    }

    /// A string; the text is already known to be UTF-8. The bytes that need
    /// no look are skipped in one pass over the slice: a delivery is mostly
    /// string bytes, and this loop was the relay's hottest function.
    fn string(&mut self) -> Option<()> {
        self.i += 1;
        loop {
            let rest = self.b.get(self.i..)?;
            let (chunks, _) = rest.as_chunks::<16>();
            let plain = chunks
                .iter()
                .take_while(|chunk| !chunk.iter().fold(false, |any, &c| any | needs_look(c)))
                .count()
                * 16;
            self.i += plain + rest.get(plain..)?.iter().position(|&c| needs_look(c))?;
            match self.next()? {
                b'"' => return Some(()),
                b'\\' => match self.next()? {
                    b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => {}
                    b'u' => self.unicode_escape()?,
                    _ => return None,
                },
                _ => return None,
            }
        }
    }

    /// After `\u`: four hex digits; a high surrogate must be followed by
    /// `\u` and a low one, and a low one must not stand alone.
    fn unicode_escape(&mut self) -> Option<()> {
        let unit = self.hex4()?;
        if (0xDC00..=0xDFFF).contains(&unit) {
            self.found.lone_surrogate = true;
        } else if (0xD800..=0xDBFF).contains(&unit) {
            let paired = self.b.get(self.i..self.i + 2) == Some(b"\\u")
                && self.b.get(self.i + 2..self.i + 6).is_some_and(|h| {
                    std::str::from_utf8(h)
                        .ok()
                        .and_then(|h| u16::from_str_radix(h, 16).ok())
                        .is_some_and(|low| (0xDC00..=0xDFFF).contains(&low))
                });
            if paired {
                self.i += 2;
                self.hex4()?;
            } else {
                self.found.lone_surrogate = true;
            }
        }
        Some(())
    }

    fn hex4(&mut self) -> Option<u16> {
        let digits = self.b.get(self.i..self.i + 4)?;
        if !digits.iter().all(u8::is_ascii_hexdigit) {
            return None;
        }
        self.i += 4;
        u16::from_str_radix(std::str::from_utf8(digits).ok()?, 16).ok()
    }

    fn digits(&mut self) -> usize {
        let start = self.i;
        while self.peek().is_some_and(|c| c.is_ascii_digit()) {
            self.i += 1;
        }
        self.i - start
    }

    /// `-? (0 | [1-9][0-9]*) (. [0-9]+)? ([eE] [+-]? [0-9]+)?`
    fn number(&mut self) -> Option<()> {
        let start = self.i;
        self.eat(b'-');
        match self.peek()? {
            b'0' => self.i += 1,
            b'1'..=b'9' => {
                self.digits();
            }
            _ => return None,
        }
        if self.eat(b'.') && self.digits() == 0 {
            return None;
        }
        if matches!(self.peek(), Some(b'e' | b'E')) {
            self.i += 1;
            if !self.eat(b'+') {
                self.eat(b'-');
            }
            if self.digits() == 0 {
                return None;
            }
        }
        let lexeme = std::str::from_utf8(&self.b[start..self.i]).ok()?;
        if lexeme.parse::<f64>().map_or(true, f64::is_infinite) {
            self.found.number_out_of_range = true;
        }
        Some(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grammar() {
        for ok in [
            "{}",
            " [ ] ",
            r#"{"a":[1,-0,2.5e-3,1E+2,true,false,null,{"b":"\u00e9\n"}]}"#,
            "\"x\"",
            "0",
        ] {
            assert_eq!(scan(ok), Some(Findings::default()), "{ok}");
        }
        for bad in [
            "",
            "{",
            "[1,]",
            "{\"a\"}",
            "{\"a\":1,}",
            "01",
            "1.",
            "-",
            "1e",
            "[1 2]",
            "tru",
            "{} {}",
            "\"\u{1}\"",
            "\"\\x\"",
            "{1:2}",
            "[}",
            "\"\\u12\"",
        ] {
            assert_eq!(scan(bad), None, "{bad:?}");
        }
    }

    /// Strings are skimmed 16 bytes at a time: whatever stands at any
    /// place of a long string, inside a chunk or across its edge, the
    /// verdict is serde_json's.
    #[test]
    fn a_string_is_read_alike_at_every_offset() {
        for len in 0..50 {
            for at in 0..=len {
                for odd in [
                    "\"", "\\n", "\\u00e9", "\u{1}", "\u{1f}", "\\", "\\q", "é", "\u{7f}",
                ] {
                    let mut text = "x".repeat(len);
                    text.insert_str(at, odd);
                    for doc in [
                        format!("\"{text}\""),
                        format!("{{\"k\":\"{text}\",\"n\":1}}"),
                    ] {
                        let strict = serde_json::from_str::<serde::de::IgnoredAny>(&doc).is_ok();
                        assert_eq!(scan(&doc).is_some(), strict, "{doc:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn deep_nesting_is_json() {
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        assert!(scan(&deep).expect("json").too_deep);
        let fine = format!("{}{}", "[".repeat(100), "]".repeat(100));
        assert_eq!(scan(&fine), Some(Findings::default()));
    }

    #[test]
    fn findings() {
        let huge = scan(r#"{"n":1e400}"#).expect("json");
        assert!(huge.number_out_of_range && !huge.lone_surrogate);
        assert!(!scan("1e-400").expect("json").number_out_of_range);
        assert!(
            !scan("123456789012345678901234567890")
                .expect("json")
                .number_out_of_range
        );
        for lone in [
            r#""\ud800""#,
            r#""\udc00""#,
            r#""\udbff\u0041""#,
            r#""\ud800\ud800""#,
        ] {
            assert!(scan(lone).expect("json").lone_surrogate, "{lone}");
        }
        assert!(!scan(r#""\ud83d\ude00""#).expect("json").lone_surrogate);
    }
}
