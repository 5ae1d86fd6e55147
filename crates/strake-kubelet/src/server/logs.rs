//! `/containerLogs`: reads a container's CRI log file (`<RFC3339Nano> <stream> <P|F> <text>`
//! lines, `P` = partial line continued by the next one of the same stream) and serves it with
//! upstream's options: `follow`, `tailLines`, `limitBytes`, `timestamps`, `previous`,
//! `sinceSeconds`/`sinceTime` (these two and `previous` also read the rotated files).

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::time::Duration;

use bytes::Bytes;
use jiff::Timestamp;
use std::io::{Read, Seek, SeekFrom};

use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio::sync::mpsc;

/// The query options of a log request.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LogOptions {
    pub follow: bool,
    pub previous: bool,
    pub timestamps: bool,
    pub tail_lines: Option<usize>,
    pub limit_bytes: Option<usize>,
    pub since: Option<Timestamp>,
}

fn parse_bool(key: &str, v: &str) -> Result<bool, String> {
    // Go's strconv.ParseBool, which the API server's parameter codec uses.
    match v {
        "1" | "t" | "T" | "true" | "TRUE" | "True" | "" => Ok(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Ok(false),
        _ => Err(format!("invalid {key}: {v:?}")),
    }
}

fn parse_int(key: &str, v: &str) -> Result<i64, String> {
    v.parse::<i64>()
        .map_err(|_| format!("invalid {key}: {v:?}"))
}

impl LogOptions {
    /// Parses the query string of a `/containerLogs` request; `now` anchors `sinceSeconds`.
    pub fn from_query(query: &str, now: Timestamp) -> Result<Self, String> {
        let mut o = LogOptions::default();
        for (k, v) in form_urlencoded::parse(query.as_bytes()) {
            match k.as_ref() {
                "follow" => o.follow = parse_bool(&k, &v)?,
                "previous" => o.previous = parse_bool(&k, &v)?,
                "timestamps" => o.timestamps = parse_bool(&k, &v)?,
                "tailLines" => {
                    let n = parse_int(&k, &v)?;
                    if n < 0 {
                        return Err("tailLines must be a non-negative integer".into());
                    }
                    o.tail_lines = Some(n as usize);
                }
                "limitBytes" => {
                    let n = parse_int(&k, &v)?;
                    if n < 1 {
                        return Err("limitBytes must be a positive integer".into());
                    }
                    o.limit_bytes = Some(n as usize);
                }
                "sinceSeconds" => {
                    let n = parse_int(&k, &v)?;
                    if n < 1 {
                        return Err("sinceSeconds must be a positive integer".into());
                    }
                    o.since = now.checked_sub(jiff::SignedDuration::from_secs(n)).ok();
                }
                "sinceTime" => {
                    o.since = Some(
                        v.parse::<Timestamp>()
                            .map_err(|_| format!("invalid sinceTime: {v:?}"))?,
                    );
                }
                _ => {}
            }
        }
        Ok(o)
    }
}

/// How much of a log file is read at once: the unit of memory a log request costs.
const BLOCK: usize = 64 * 1024;
/// Longest CRI log line kept whole; the rest of a longer line is dropped, so a file without
/// newlines costs bounded memory (runtimes split long output into `P` lines of 16 KiB).
const MAX_LINE: usize = 1024 * 1024;

/// One log line's content: the text of a full line (with its newline) or of a partial one.
#[derive(Clone, Debug, PartialEq)]
pub struct Message {
    pub time: Timestamp,
    /// The text, with its newline if the line is complete.
    pub text: Vec<u8>,
}

impl Message {
    /// The message as the kubelet prints it: `<RFC3339Nano> ` first with `timestamps`, when it
    /// starts a line (the previous message ended with a newline).
    pub fn render(&self, timestamps: bool, line_start: bool) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.text.len() + 32);
        if timestamps && line_start {
            out.extend_from_slice(self.time.to_string().as_bytes());
            out.push(b' ');
        }
        out.extend_from_slice(&self.text);
        out
    }
}

/// An incremental CRI log parser: feed it bytes as the file grows. Partial (`P`) lines are
/// passed on as they come, as upstream's reader does: memory stays at one line however long
/// a container writes without a newline.
#[derive(Debug, Default)]
pub struct Parser {
    carry: Vec<u8>,
    /// The current line passed [`MAX_LINE`]: drop bytes until its newline.
    skipping: bool,
}

impl Parser {
    /// Parses the complete lines in `data` (plus what was carried over) into messages.
    pub fn feed(&mut self, data: &[u8]) -> Vec<Message> {
        let mut out = Vec::new();
        let mut rest = data;
        while !rest.is_empty() {
            let nl = rest.iter().position(|b| *b == b'\n');
            let (piece, ends) = match nl {
                Some(i) => (&rest[..i], true),
                None => (rest, false),
            };
            rest = &rest[piece.len() + usize::from(ends)..];
            if !self.skipping {
                let room = MAX_LINE.saturating_sub(self.carry.len());
                self.carry
                    .extend_from_slice(&piece[..piece.len().min(room)]);
                self.skipping = piece.len() > room;
            }
            if ends {
                if let Some((time, _stream, partial, text)) = parse_line(&self.carry) {
                    let mut text = text.to_vec();
                    if !partial {
                        text.push(b'\n');
                    }
                    out.push(Message { time, text });
                }
                self.carry.clear();
                self.skipping = false;
            }
        }
        out
    }
}
/// Splits one CRI log line into time, stream index (0 stdout, 1 stderr), partial flag, text.
fn parse_line(line: &[u8]) -> Option<(Timestamp, usize, bool, &[u8])> {
    let mut parts = line.splitn(4, |b| *b == b' ');
    let time = std::str::from_utf8(parts.next()?).ok()?.parse().ok()?;
    let stream = match parts.next()? {
        b"stdout" => 0,
        b"stderr" => 1,
        _ => return None,
    };
    let tags = parts.next()?;
    let partial = tags.split(|b| *b == b':').next() == Some(b"P");
    Some((time, stream, partial, parts.next().unwrap_or_default()))
}

/// Where the last `n` lines of `r` start, reading backwards a block at a time (upstream's
/// `findTailLineStartIndex`): `[start, end)` holds `n` newlines, or is the whole file.
pub fn tail_start<R: Read + Seek>(r: &mut R, n: usize) -> std::io::Result<u64> {
    tail_range(r, n).map(|(start, _)| start)
}

/// [`tail_start`], with the file's size when the lines were counted: the range holding the last
/// `n` lines of the file as it was then.
fn tail_range<R: Read + Seek>(r: &mut R, n: usize) -> std::io::Result<(u64, u64)> {
    let size = r.seek(SeekFrom::End(0))?;
    tail_range_below(r, n, size).map(|start| (start, size))
}

fn tail_range_below<R: Read + Seek>(r: &mut R, n: usize, size: u64) -> std::io::Result<u64> {
    if n == 0 {
        return Ok(size);
    }
    let mut buf = vec![0u8; BLOCK];
    let mut right = size;
    let mut seen = 0usize;
    while right > 0 {
        let left = right.saturating_sub(BLOCK as u64);
        let chunk = &mut buf[..(right - left) as usize];
        r.seek(SeekFrom::Start(left))?;
        r.read_exact(chunk)?;
        for (i, b) in chunk.iter().enumerate().rev() {
            if *b == b'\n' {
                seen += 1;
                if seen > n {
                    return Ok(left + i as u64 + 1);
                }
            }
        }
        right = left;
    }
    Ok(0)
}

/// A check whether the container is still running (ends a `follow`).
pub type RunningCheck = Box<dyn Fn() -> Pin<Box<dyn Future<Output = bool> + Send>> + Send + Sync>;

/// Streams the log at `path` into `tx` per `opts`; with `follow`, keeps reading as the file
/// grows until `running` says the container stopped (and the rest is read) or the client left.
/// Reads a block at a time (`tailLines` found from the end), so a request costs the same
/// memory whatever the file's size.
pub async fn stream(
    path: PathBuf,
    opts: LogOptions,
    running: RunningCheck,
    tx: mpsc::Sender<Bytes>,
) -> std::io::Result<()> {
    let file = std::fs::File::open(&path)?;
    let tail = opts.tail_lines;
    // With `tailLines`, the lines are the last ones of the file as it was when they were
    // counted: a container writing on meanwhile does not add to them.
    let (file, mut offset, counted) = tokio::task::spawn_blocking(move || {
        let mut file = file;
        let (start, counted) = match tail {
            Some(n) => {
                let (start, size) = tail_range(&mut file, n)?;
                (start, Some(size))
            }
            None => (0, None),
        };
        Ok::<_, std::io::Error>((file, start, counted))
    })
    .await
    .map_err(std::io::Error::other)??;
    let mut file = tokio::fs::File::from_std(file);
    let mut out = Output {
        parser: Parser::default(),
        left: opts.limit_bytes.unwrap_or(usize::MAX),
        line_start: true,
    };
    // `sinceTime` and `previous` reach back into the rotated files, oldest first (a tail is
    // counted in the current file alone).
    if (opts.since.is_some() || opts.previous) && tail.is_none() {
        for rotated in crate::log_rotation::readable_rotations(&path) {
            if !send_rotated(&rotated, &mut out, &tx, &opts).await {
                return Ok(());
            }
        }
    }
    // What is there now, then (with follow) what comes.
    let end = match counted {
        Some(size) => size,
        None => file.metadata().await?.len(),
    };
    file.seek(std::io::SeekFrom::Start(offset)).await?;
    let mut buf = vec![0u8; BLOCK];
    while offset < end {
        let want = BLOCK.min((end - offset) as usize);
        let n = file.read(&mut buf[..want]).await?;
        if n == 0 {
            break;
        }
        offset += n as u64;
        if !out.send(&tx, &buf[..n], &opts).await {
            return Ok(());
        }
    }
    if !opts.follow {
        return Ok(());
    }
    let mut idle = 0u32;
    let mut stopped = false;
    loop {
        if tx.is_closed() {
            return Ok(());
        }
        let len = tokio::fs::metadata(&path)
            .await
            .map(|m| m.len())
            .unwrap_or(0);
        if len < offset {
            // Truncated or replaced: start over on the new content.
            offset = 0;
            file = tokio::fs::File::open(&path).await?;
        }
        if len > offset {
            idle = 0;
            file.seek(std::io::SeekFrom::Start(offset)).await?;
            let n = file.read(&mut buf).await?;
            offset += n as u64;
            if !out.send(&tx, &buf[..n], &opts).await {
                return Ok(());
            }
            continue;
        }
        if stopped {
            // Everything written before the container stopped has been sent.
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        idle += 1;
        // Ask the runtime about once a second, not on every poll; once it says the container
        // stopped, read what is left once more.
        stopped = idle.is_multiple_of(5) && !running().await;
    }
}

/// Sends the lines of rotated log `path` (gzipped or not), a block at a time read off the
/// async executor; false when the request is done (budget spent or client gone). A file that
/// rotation removed meanwhile, or cannot read, is skipped.
async fn send_rotated(
    path: &std::path::Path,
    out: &mut Output,
    tx: &mpsc::Sender<Bytes>,
    opts: &LogOptions,
) -> bool {
    let (blocks, mut rx) = mpsc::channel::<Vec<u8>>(2);
    let p = path.to_path_buf();
    let reader = tokio::task::spawn_blocking(move || {
        let file = match std::fs::File::open(&p) {
            Ok(f) => f,
            Err(e) => {
                tracing::debug!(path = %p.display(), error = %e, "rotated log not read");
                return;
            }
        };
        let mut r: Box<dyn Read> = if p.extension().is_some_and(|e| e == "gz") {
            Box::new(flate2::read::GzDecoder::new(file))
        } else {
            Box::new(file)
        };
        loop {
            let mut buf = vec![0u8; BLOCK];
            match r.read(&mut buf) {
                Ok(0) => return,
                Ok(n) => {
                    buf.truncate(n);
                    if blocks.blocking_send(buf).is_err() {
                        return;
                    }
                }
                Err(e) => {
                    tracing::debug!(path = %p.display(), error = %e, "rotated log read failed");
                    return;
                }
            }
        }
    });
    while let Some(block) = rx.recv().await {
        if !out.send(tx, &block, opts).await {
            drop(rx);
            let _ = reader.await;
            return false;
        }
    }
    true
}

/// The parser and what is left of the byte budget of one request.
struct Output {
    parser: Parser,
    left: usize,
    /// Whether the next message starts a line (gets the timestamp).
    line_start: bool,
}

impl Output {
    /// Parses `data` and sends its messages; false when done (budget spent or client gone).
    async fn send(&mut self, tx: &mpsc::Sender<Bytes>, data: &[u8], opts: &LogOptions) -> bool {
        for m in self.parser.feed(data) {
            if opts.since.is_some_and(|s| m.time < s) {
                continue;
            }
            let bytes = m.render(opts.timestamps, self.line_start);
            self.line_start = m.text.last() == Some(&b'\n');
            if !send_within(tx, bytes, &mut self.left).await {
                return false;
            }
        }
        true
    }
}

/// Sends `bytes` within the byte budget `left`; false when done (budget spent or client gone).
async fn send_within(tx: &mpsc::Sender<Bytes>, mut bytes: Vec<u8>, left: &mut usize) -> bool {
    if bytes.len() >= *left {
        bytes.truncate(*left);
        *left = 0;
        let _ = tx.send(Bytes::from(bytes)).await;
        return false;
    }
    *left -= bytes.len();
    tx.send(Bytes::from(bytes)).await.is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    const T1: &str = "2026-01-02T03:04:05.000000001Z";
    const T2: &str = "2026-01-02T03:04:06.5Z";
    const T3: &str = "2026-01-02T03:04:07+00:00";

    fn log() -> String {
        format!(
            "{T1} stdout F one\n{T1} stderr P tw\n{T2} stdout F three\n{T2} stderr F o\n{T3} stdout F four\n"
        )
    }

    #[test]
    fn lines_parse_and_partials_pass_through_as_upstream() {
        let mut p = Parser::default();
        let msgs = p.feed(log().as_bytes());
        let texts: Vec<String> = msgs
            .iter()
            .map(|m| String::from_utf8_lossy(&m.text).into_owned())
            .collect();
        // Upstream's reader writes each line's content in file order: a partial line has no
        // newline, and nothing is joined (memory stays at one line).
        assert_eq!(texts, ["one\n", "tw", "three\n", "o\n", "four\n"]);
        assert_eq!(msgs[1].time, T1.parse::<Timestamp>().unwrap());
        assert_eq!(
            String::from_utf8(msgs[0].render(true, true)).unwrap(),
            "2026-01-02T03:04:05.000000001Z one\n"
        );
        // A message continuing a partial line gets no timestamp.
        assert_eq!(msgs[2].render(true, false), b"three\n");
    }

    #[test]
    fn a_line_split_across_reads_is_carried_over() {
        let mut p = Parser::default();
        let text = log();
        let (a, b) = text.as_bytes().split_at(40);
        let mut msgs = p.feed(a);
        msgs.extend(p.feed(b));
        assert_eq!(msgs.len(), 5);
        assert!(p.feed(b"garbage line\n").is_empty());
        assert_eq!(p.feed(format!("{T1} stdout F\n").as_bytes())[0].text, b"\n");
    }

    #[test]
    fn a_line_without_end_costs_bounded_memory() {
        let mut p = Parser::default();
        assert!(p.feed(format!("{T1} stdout F ").as_bytes()).is_empty());
        let block = vec![b'x'; BLOCK];
        // 64 MiB without a newline: the parser keeps at most MAX_LINE of it.
        for _ in 0..1024 {
            assert!(p.feed(&block).is_empty());
            assert!(p.carry.len() <= MAX_LINE);
        }
        let msgs = p.feed(format!("\n{T2} stdout F next\n").as_bytes());
        assert_eq!(msgs.len(), 2);
        assert!(msgs[0].text.len() <= MAX_LINE && msgs[0].text.ends_with(b"x\n"));
        assert_eq!(msgs[1].text, b"next\n");
    }

    /// A log file of `len` bytes of identical lines that is never stored: it counts the bytes
    /// read from it.
    struct Synthetic {
        len: u64,
        pos: u64,
        read: u64,
    }

    const LINE: &[u8] = b"2026-01-02T03:04:05.000000001Z stdout F 0123456789abcdef\n";

    impl Read for Synthetic {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let n = buf.len().min((self.len - self.pos) as usize);
            for (i, b) in buf[..n].iter_mut().enumerate() {
                *b = LINE[((self.pos + i as u64) % LINE.len() as u64) as usize];
            }
            self.pos += n as u64;
            self.read += n as u64;
            Ok(n)
        }
    }

    impl Seek for Synthetic {
        fn seek(&mut self, to: SeekFrom) -> std::io::Result<u64> {
            self.pos = match to {
                SeekFrom::Start(p) => p,
                SeekFrom::End(d) => self.len.saturating_add_signed(d),
                SeekFrom::Current(d) => self.pos.saturating_add_signed(d),
            };
            Ok(self.pos)
        }
    }

    #[test]
    fn tail_reads_from_the_end_only() {
        let line = LINE.len() as u64;
        // 2 GiB worth of lines: finding the last one reads one block, not the file.
        let len = (2u64 << 30) / line * line;
        let mut f = Synthetic {
            len,
            pos: 0,
            read: 0,
        };
        assert_eq!(tail_start(&mut f, 1).unwrap(), len - line);
        assert!(f.read <= BLOCK as u64, "read {} bytes", f.read);
        assert_eq!(tail_start(&mut f, 3).unwrap(), len - 3 * line);
        assert_eq!(tail_start(&mut f, 0).unwrap(), len);
        // More lines than the file has: all of it.
        let mut small = Synthetic {
            len: 2 * line,
            pos: 0,
            read: 0,
        };
        assert_eq!(tail_start(&mut small, 5).unwrap(), 0);
        // An unfinished last line is not counted, as upstream.
        let mut c = std::io::Cursor::new(b"a\nb\nc".to_vec());
        assert_eq!(tail_start(&mut c, 1).unwrap(), 2);
    }

    /// What [`stream`] sends for the log at `path` of a container that has stopped.
    async fn read_stopped(path: PathBuf, opts: LogOptions) -> String {
        let (tx, rx) = mpsc::channel(16);
        let task = tokio::spawn(stream(
            path,
            opts,
            running(Arc::new(AtomicBool::new(false))),
            tx,
        ));
        let out = collect(rx).await;
        task.await.unwrap().unwrap();
        out
    }

    #[tokio::test]
    async fn since_and_tail_select_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("0.log");
        std::fs::write(&path, log()).unwrap();
        let run = |opts: LogOptions| read_stopped(path.clone(), opts);
        let tail = |n| LogOptions {
            tail_lines: Some(n),
            ..Default::default()
        };
        assert_eq!(run(tail(2)).await, "o\nfour\n");
        assert_eq!(run(tail(0)).await, "");
        assert_eq!(run(tail(9)).await, "one\ntwthree\no\nfour\n");
        let since = LogOptions {
            since: Some(T2.parse().unwrap()),
            timestamps: true,
            ..Default::default()
        };
        assert_eq!(
            run(since).await,
            "2026-01-02T03:04:06.5Z three\n2026-01-02T03:04:06.5Z o\n2026-01-02T03:04:07Z four\n"
        );
    }

    #[tokio::test]
    async fn since_and_previous_reach_into_rotated_files_oldest_first() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("0.log");
        let line = |t: &str, text: &str| format!("2026-01-02T03:04:{t}Z stdout F {text}\n");
        // The oldest rotation compressed, the newest plain, and a compression's leftover.
        let gz = dir.path().join("0.log.20260102-030401.gz");
        let mut enc = flate2::write::GzEncoder::new(
            std::fs::File::create(&gz).unwrap(),
            flate2::Compression::default(),
        );
        std::io::Write::write_all(&mut enc, (line("01", "a") + &line("02", "b")).as_bytes())
            .unwrap();
        enc.finish().unwrap();
        std::fs::write(dir.path().join("0.log.20260102-030403"), line("03", "c")).unwrap();
        std::fs::write(dir.path().join("0.log.20260102-030403.tmp"), "garbage").unwrap();
        std::fs::write(&path, line("04", "d")).unwrap();
        let run = |opts: LogOptions| read_stopped(path.clone(), opts);
        let since = |t: &str| LogOptions {
            since: Some(format!("2026-01-02T03:04:{t}Z").parse().unwrap()),
            ..Default::default()
        };
        assert_eq!(run(since("02")).await, "b\nc\nd\n");
        assert_eq!(run(since("00")).await, "a\nb\nc\nd\n");
        let previous = LogOptions {
            previous: true,
            ..Default::default()
        };
        assert_eq!(run(previous).await, "a\nb\nc\nd\n");
        // Without them, as upstream: the current file only; a tail counts in it alone.
        assert_eq!(run(LogOptions::default()).await, "d\n");
        let tail = LogOptions {
            since: Some("2026-01-02T03:04:00Z".parse().unwrap()),
            tail_lines: Some(5),
            ..Default::default()
        };
        assert_eq!(run(tail).await, "d\n");
    }

    #[test]
    fn query_options_parse_like_upstream() {
        let now: Timestamp = "2026-01-02T03:05:00Z".parse().unwrap();
        let o = LogOptions::from_query(
            "follow=true&previous=1&timestamps=true&tailLines=3&limitBytes=10&sinceSeconds=60",
            now,
        )
        .unwrap();
        assert!(o.follow && o.previous && o.timestamps);
        assert_eq!((o.tail_lines, o.limit_bytes), (Some(3), Some(10)));
        assert_eq!(o.since, Some("2026-01-02T03:04:00Z".parse().unwrap()));
        let o = LogOptions::from_query("sinceTime=2026-01-02T03%3A04%3A06Z", now).unwrap();
        assert_eq!(o.since, Some("2026-01-02T03:04:06Z".parse().unwrap()));
        assert!(LogOptions::from_query("tailLines=-1", now).is_err());
        assert!(LogOptions::from_query("limitBytes=0", now).is_err());
        assert!(LogOptions::from_query("follow=maybe", now).is_err());
        assert_eq!(
            LogOptions::from_query("", now).unwrap(),
            LogOptions::default()
        );
    }

    async fn collect(mut rx: mpsc::Receiver<Bytes>) -> String {
        let mut out = Vec::new();
        while let Some(b) = rx.recv().await {
            out.extend_from_slice(&b);
        }
        String::from_utf8(out).unwrap()
    }

    fn running(flag: Arc<AtomicBool>) -> RunningCheck {
        Box::new(move || {
            let flag = flag.clone();
            Box::pin(async move { flag.load(Ordering::SeqCst) })
        })
    }

    #[tokio::test]
    async fn limit_bytes_cuts_the_output() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("0.log");
        std::fs::write(&path, log()).unwrap();
        let (tx, rx) = mpsc::channel(16);
        let opts = LogOptions {
            limit_bytes: Some(6),
            ..Default::default()
        };
        let task = tokio::spawn(stream(
            path,
            opts,
            running(Arc::new(AtomicBool::new(false))),
            tx,
        ));
        // File order, as upstream: the partial "tw" comes before "three".
        assert_eq!(collect(rx).await, "one\ntw");
        task.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn follow_sees_appended_lines_and_ends_when_the_container_stops() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("0.log");
        std::fs::write(&path, format!("{T1} stdout F old\n")).unwrap();
        let (tx, mut rx) = mpsc::channel(16);
        let flag = Arc::new(AtomicBool::new(true));
        let opts = LogOptions {
            follow: true,
            ..Default::default()
        };
        let task = tokio::spawn(stream(path.clone(), opts, running(flag.clone()), tx));
        assert_eq!(rx.recv().await.unwrap(), Bytes::from_static(b"old\n"));
        {
            use std::io::Write;
            let mut f = std::fs::OpenOptions::new()
                .append(true)
                .open(&path)
                .unwrap();
            write!(f, "{T2} stdout P ne").unwrap();
            f.flush().unwrap();
            write!(f, "w\n{T2} stdout F\n").unwrap();
        }
        // The partial line's pieces arrive as they were written.
        let mut got = Vec::new();
        while got.len() < 4 {
            got.extend_from_slice(&rx.recv().await.unwrap());
        }
        assert_eq!(got, b"new\n");
        flag.store(false, Ordering::SeqCst);
        assert_eq!(collect(rx).await, "");
        task.await.unwrap().unwrap();
    }
}
