//! Durations and sizes as operators write them: `2s`, `500ms`, `5m`,
//! `1MiB`, `1GiB` (humantime and bytesize), and plain numbers as before
//! (seconds, bytes), so existing configurations keep working.

use std::time::Duration;

/// Longest duration any setting accepts: a year.
const MAX_DURATION: Duration = Duration::from_secs(86_400 * 365);

/// `2s`, `500ms`, `5m`, `1h 30m`, or a plain number of seconds (`2.5`).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let duration = match s.parse::<f64>() {
        Ok(secs) if secs.is_finite() && secs >= 0.0 => {
            Duration::try_from_secs_f64(secs).map_err(|_| format!("'{s}' is out of range"))?
        }
        Ok(_) => return Err(format!("'{s}' is not a duration")),
        Err(_) => humantime::parse_duration(s).map_err(|e| {
            format!(
                "'{s}' is not a duration ({e}); write e.g. 2s, 500ms, 5m or a number of seconds"
            )
        })?,
    };
    if duration > MAX_DURATION {
        return Err(format!("'{s}' is out of range (at most a year)"));
    }
    Ok(duration)
}

/// `1MiB`, `1GiB`, `512KB`, or a plain number of bytes.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    if let Ok(bytes) = s.parse::<u64>() {
        return Ok(bytes);
    }
    s.parse::<bytesize::ByteSize>()
        .map(|size| size.as_u64())
        .map_err(|_| {
            format!("'{s}' is not a size; write e.g. 1MiB, 512KiB, 1GiB or a number of bytes")
        })
}

/// [`parse_size`] for settings held as `usize`.
pub fn parse_size_usize(s: &str) -> Result<usize, String> {
    let bytes = parse_size(s)?;
    usize::try_from(bytes).map_err(|_| format!("'{s}' is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_with_units_and_plain_seconds() {
        let ok = [
            ("2s", Duration::from_secs(2)),
            ("500ms", Duration::from_millis(500)),
            ("5m", Duration::from_secs(300)),
            ("1h 30m", Duration::from_secs(5400)),
            ("2", Duration::from_secs(2)),
            ("0.5", Duration::from_millis(500)),
            ("0", Duration::ZERO),
            (" 10 ", Duration::from_secs(10)),
        ];
        for (text, want) in ok {
            assert_eq!(parse_duration(text), Ok(want), "{text}");
        }
        for bad in ["", "-1", "NaN", "inf", "2 parsecs", "400d", "s"] {
            assert!(parse_duration(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn sizes_with_units_and_plain_bytes() {
        let ok = [
            ("1MiB", 1 << 20),
            ("1GiB", 1 << 30),
            ("512KiB", 512 << 10),
            ("1MB", 1_000_000),
            ("1048576", 1 << 20),
            ("0", 0),
        ];
        for (text, want) in ok {
            assert_eq!(parse_size(text), Ok(want), "{text}");
        }
        for bad in ["", "-1", "1 parsec", "MiB", "1.5.5GiB"] {
            assert!(parse_size(bad).is_err(), "{bad} accepted");
        }
    }
}
