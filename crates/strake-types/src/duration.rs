//! Durations written as Go writes them (`time.ParseDuration`): `30s`, `1m30s`, `1.5h`, `250ms`,
//! `0`. Upstream's flags and configuration files (kubelet, kube-proxy, containerd) use this
//! syntax, so every Strake daemon reads it with this one parser.
//!
//! Differences from Go, on purpose: a negative duration is refused (no setting of ours means
//! anything by one), and so is an empty string. As in Go, a fraction below a nanosecond is
//! dropped and anything past `i64::MAX` nanoseconds (about 292 years) is refused.

use std::time::Duration;

/// Why a duration did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid duration {text:?}: {reason} (e.g. 90s, 1m30s, 1.5h, 250ms)")]
pub struct DurationError {
    /// The text as given.
    pub text: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

const NANOS_PER: [(&str, u128); 8] = [
    ("ns", 1),
    ("us", 1_000),
    ("µs", 1_000),
    ("μs", 1_000),
    ("ms", 1_000_000),
    ("s", 1_000_000_000),
    ("m", 60_000_000_000),
    ("h", 3_600_000_000_000),
];

/// Parses a Go duration.
pub fn parse(text: &str) -> Result<Duration, DurationError> {
    let err = |reason| DurationError {
        text: text.to_string(),
        reason,
    };
    let s = text.trim();
    let s = s.strip_prefix('+').unwrap_or(s);
    if s.starts_with('-') {
        return Err(err("negative"));
    }
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    if s.is_empty() {
        return Err(err("empty"));
    }
    let mut total: u128 = 0;
    let mut rest = s;
    while !rest.is_empty() {
        let int_len = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        let (int_digits, tail) = rest.split_at(int_len);
        let (frac_digits, tail) = match tail.strip_prefix('.') {
            Some(t) => t.split_at(t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len())),
            None => ("", tail),
        };
        if int_digits.is_empty() && frac_digits.is_empty() {
            return Err(err("a number is missing"));
        }
        let unit_len = tail
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(unit_len);
        if unit.is_empty() {
            return Err(err("a unit is missing"));
        }
        let per = NANOS_PER
            .iter()
            .find(|(u, _)| *u == unit)
            .map(|(_, n)| *n)
            .ok_or_else(|| err("unknown unit"))?;
        let too_long = || err("too long");
        let int: u128 = if int_digits.is_empty() {
            0
        } else {
            // More digits than fit in i64 nanoseconds are too long whatever the unit.
            int_digits.parse().map_err(|_| too_long())?
        };
        let mut nanos = int.checked_mul(per).ok_or_else(too_long)?;
        // The fraction: digits past the nanosecond change nothing, as in Go.
        let mut scale: u128 = 1;
        let mut frac: u128 = 0;
        for d in frac_digits.bytes().take(30) {
            frac = frac * 10 + u128::from(d - b'0');
            scale *= 10;
        }
        nanos += frac * per / scale;
        total = total.checked_add(nanos).ok_or_else(too_long)?;
        if total > i64::MAX as u128 {
            return Err(too_long());
        }
        rest = tail;
    }
    Ok(Duration::from_nanos(total as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_syntax_parses() {
        let ok = |s: &str| parse(s).unwrap();
        assert_eq!(ok("0"), Duration::ZERO);
        assert_eq!(ok("10s"), Duration::from_secs(10));
        assert_eq!(ok("1m30s"), Duration::from_secs(90));
        assert_eq!(ok("1h0m0s"), Duration::from_secs(3600));
        assert_eq!(ok("4h"), Duration::from_secs(14400));
        assert_eq!(ok("1.5h"), Duration::from_secs(5400));
        assert_eq!(ok("1.5s"), Duration::from_millis(1500));
        assert_eq!(ok(".5s"), Duration::from_millis(500));
        assert_eq!(ok("2.s"), Duration::from_secs(2));
        assert_eq!(ok("250ms"), Duration::from_millis(250));
        assert_eq!(ok("3us"), Duration::from_micros(3));
        assert_eq!(ok("3µs"), Duration::from_micros(3));
        assert_eq!(ok("7ns"), Duration::from_nanos(7));
        assert_eq!(ok("+5m"), Duration::from_secs(300));
        assert_eq!(ok(" 30s "), Duration::from_secs(30));
        // Exact, where floating point is not: 0.3s is 300 000 000 ns.
        assert_eq!(ok("0.3s"), Duration::from_nanos(300_000_000));
        assert_eq!(ok("1.0000000001s"), Duration::from_secs(1));
        assert_eq!(ok("2562047h"), Duration::from_secs(2562047 * 3600));
    }

    #[test]
    fn anything_else_is_refused_with_its_reason() {
        let reason = |s: &str| parse(s).unwrap_err().reason;
        assert_eq!(reason(""), "empty");
        assert_eq!(reason("10"), "a unit is missing");
        assert_eq!(reason("1h30"), "a unit is missing");
        assert_eq!(reason("h"), "a number is missing");
        assert_eq!(reason("."), "a number is missing");
        assert_eq!(reason("4d"), "unknown unit");
        assert_eq!(reason("10x"), "unknown unit");
        assert_eq!(reason("1h x"), "unknown unit");
        assert_eq!(reason("-1s"), "negative");
        assert_eq!(reason("1e400s"), "unknown unit");
        assert_eq!(reason("2562048h"), "too long");
        assert_eq!(reason("131h300h3922337203685472231h3720"), "too long");
        assert_eq!(
            reason("18446744073709551615s18446744073709551615s"),
            "too long"
        );
        assert_eq!(reason(&"9".repeat(60)), "a unit is missing");
        assert_eq!(reason(&format!("{}s", "9".repeat(60))), "too long");
        let e = parse("soon").unwrap_err();
        assert!(e.to_string().contains("\"soon\""), "{e}");
    }
}
