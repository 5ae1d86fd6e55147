//! The CRI container log format: `<RFC3339Nano time> <stream> <P|F> <content>\n`.
//!
//! `F` ends a line; `P` marks a piece of a line that was too long, or the unterminated tail at
//! end of stream. The kubelet (`kubectl logs`) joins `P` pieces up to the next `F`.

use std::io::Write;

/// Longest line content written as one record; longer lines are split into `P` records
/// (containerd's default `max_container_log_line_size`).
pub const MAX_LINE: usize = 16 * 1024;

/// Which output stream a record came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

impl Stream {
    fn name(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }
}

/// Formats nanoseconds since the epoch as Go's `time.RFC3339Nano` in UTC (trailing zeros of the
/// fraction dropped), as containerd writes it.
pub fn rfc3339_nano(ns_since_epoch: i128) -> String {
    let secs = ns_since_epoch.div_euclid(1_000_000_000);
    let nanos = ns_since_epoch.rem_euclid(1_000_000_000) as u32;
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days as i64);
    let mut s = format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}",
        sod / 3600,
        sod % 3600 / 60,
        sod % 60
    );
    if nanos != 0 {
        let frac = format!("{nanos:09}");
        s.push('.');
        s.push_str(frac.trim_end_matches('0'));
    }
    s.push('Z');
    s
}

/// Days since 1970-01-01 to (year, month, day) in the proleptic Gregorian calendar
/// (H. Hinnant's `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// Splits one stream's bytes into CRI log records, keeping an unterminated tail between reads.
#[derive(Debug)]
pub struct LineSplitter {
    stream: Stream,
    pending: Vec<u8>,
}

impl LineSplitter {
    /// A splitter for `stream`.
    pub fn new(stream: Stream) -> Self {
        LineSplitter {
            stream,
            pending: Vec::new(),
        }
    }

    /// Feeds bytes read from the stream; writes complete records to `out` stamped `now_ns`.
    pub fn feed(&mut self, data: &[u8], now_ns: i128, out: &mut impl Write) -> std::io::Result<()> {
        self.pending.extend_from_slice(data);
        let mut start = 0;
        while let Some(pos) = self.pending[start..].iter().position(|&b| b == b'\n') {
            let line_end = start + pos;
            self.write_line(start, line_end, true, now_ns, out)?;
            start = line_end + 1;
        }
        // Overlong unterminated content goes out in MAX_LINE pieces as partial records.
        while self.pending.len() - start >= MAX_LINE {
            self.write_line(start, start + MAX_LINE, false, now_ns, out)?;
            start += MAX_LINE;
        }
        self.pending.drain(..start);
        Ok(())
    }

    /// At end of stream: the unterminated tail, if any, as a partial record.
    pub fn finish(&mut self, now_ns: i128, out: &mut impl Write) -> std::io::Result<()> {
        if !self.pending.is_empty() {
            let len = self.pending.len();
            self.write_line(0, len, false, now_ns, out)?;
            self.pending.clear();
        }
        Ok(())
    }

    fn write_line(
        &self,
        from: usize,
        to: usize,
        full: bool,
        now_ns: i128,
        out: &mut impl Write,
    ) -> std::io::Result<()> {
        let mut content = &self.pending[from..to];
        // A full line longer than MAX_LINE: all but the last piece are partial.
        while content.len() > MAX_LINE {
            record(out, now_ns, self.stream, false, &content[..MAX_LINE])?;
            content = &content[MAX_LINE..];
        }
        if content.is_empty() && !full {
            return Ok(());
        }
        record(out, now_ns, self.stream, full, content)
    }
}

fn record(
    out: &mut impl Write,
    now_ns: i128,
    stream: Stream,
    full: bool,
    content: &[u8],
) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(content.len() + 48);
    buf.extend_from_slice(rfc3339_nano(now_ns).as_bytes());
    buf.push(b' ');
    buf.extend_from_slice(stream.name().as_bytes());
    buf.extend_from_slice(if full { b" F " } else { b" P " });
    buf.extend_from_slice(content);
    buf.push(b'\n');
    // One write per record so records from both streams never interleave mid-line.
    out.write_all(&buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: i128 = 1_764_324_000_123_456_000; // 2025-11-28T10:00:00.123456Z

    fn lines(out: &[u8]) -> Vec<String> {
        String::from_utf8_lossy(out)
            .lines()
            .map(String::from)
            .collect()
    }

    #[test]
    fn timestamps_match_go_rfc3339nano() {
        assert_eq!(rfc3339_nano(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339_nano(T), "2025-11-28T10:00:00.123456Z");
        assert_eq!(
            rfc3339_nano(951_782_400_000_000_001),
            "2000-02-29T00:00:00.000000001Z"
        );
        assert_eq!(
            rfc3339_nano(4_107_542_399_500_000_000),
            "2100-02-28T23:59:59.5Z"
        );
    }

    #[test]
    fn lines_split_across_reads_become_one_full_record() {
        let mut s = LineSplitter::new(Stream::Stdout);
        let mut out = Vec::new();
        s.feed(b"hel", T, &mut out).unwrap();
        assert!(out.is_empty());
        s.feed(b"lo\nwor", T, &mut out).unwrap();
        s.feed(b"ld\n\n", T, &mut out).unwrap();
        assert_eq!(
            lines(&out),
            [
                "2025-11-28T10:00:00.123456Z stdout F hello",
                "2025-11-28T10:00:00.123456Z stdout F world",
                "2025-11-28T10:00:00.123456Z stdout F ",
            ]
        );
    }

    #[test]
    fn long_lines_are_cut_into_partial_records() {
        let mut s = LineSplitter::new(Stream::Stderr);
        let mut out = Vec::new();
        let mut data = vec![b'a'; MAX_LINE * 2 + 10];
        data.push(b'\n');
        s.feed(&data, T, &mut out).unwrap();
        let l = lines(&out);
        assert_eq!(l.len(), 3);
        assert!(l[0].contains(" stderr P ") && l[0].ends_with(&"a".repeat(MAX_LINE)));
        assert!(l[1].contains(" stderr P "));
        assert!(l[2].ends_with(" stderr F aaaaaaaaaa"), "{}", l[2]);
    }

    #[test]
    fn an_unterminated_tail_is_flushed_as_partial_at_end() {
        let mut s = LineSplitter::new(Stream::Stdout);
        let mut out = Vec::new();
        s.feed(b"done\nno newline", T, &mut out).unwrap();
        s.finish(T, &mut out).unwrap();
        assert_eq!(
            lines(&out)[1],
            "2025-11-28T10:00:00.123456Z stdout P no newline"
        );
        let before = out.len();
        s.finish(T, &mut out).unwrap();
        assert_eq!(out.len(), before, "finish twice writes nothing more");
    }
}
