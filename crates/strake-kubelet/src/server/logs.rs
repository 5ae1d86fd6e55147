//! `/containerLogs`: reads a container's CRI log file (`<RFC3339Nano> <stream> <P|F> <text>`
//! lines, `P` = partial line continued by the next one of the same stream) and serves it with
//! upstream's options: `follow`, `tailLines`, `limitBytes`, `timestamps`, `previous`,
//! `sinceSeconds`/`sinceTime`.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::time::Duration;

use bytes::Bytes;
use jiff::Timestamp;
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

/// One log message: a full line (partials joined), or the trailing part of an unfinished one.
#[derive(Clone, Debug, PartialEq)]
pub struct Message {
    pub time: Timestamp,
    /// The text, with its newline if the line is complete.
    pub text: Vec<u8>,
}

impl Message {
    /// The message as the kubelet prints it (`<RFC3339Nano> ` first with `timestamps`).
    pub fn render(&self, timestamps: bool) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.text.len() + 32);
        if timestamps {
            out.extend_from_slice(self.time.to_string().as_bytes());
            out.push(b' ');
        }
        out.extend_from_slice(&self.text);
        out
    }
}

/// An incremental CRI log parser: feed it bytes as the file grows.
#[derive(Debug, Default)]
pub struct Parser {
    carry: Vec<u8>,
    /// Unfinished lines per stream (stdout, stderr): first fragment's time and text so far.
    partial: [Option<(Timestamp, Vec<u8>)>; 2],
}

impl Parser {
    /// Parses the complete lines in `data` (plus what was carried over) into messages.
    pub fn feed(&mut self, data: &[u8]) -> Vec<Message> {
        self.carry.extend_from_slice(data);
        let mut out = Vec::new();
        let mut start = 0;
        while let Some(nl) = self.carry[start..].iter().position(|b| *b == b'\n') {
            let line = &self.carry[start..start + nl];
            start += nl + 1;
            let Some((time, stream, partial, text)) = parse_line(line) else {
                continue;
            };
            let slot = &mut self.partial[stream];
            match slot {
                Some((_, buf)) => buf.extend_from_slice(text),
                None => *slot = Some((time, text.to_vec())),
            }
            if !partial && let Some((time, mut text)) = slot.take() {
                text.push(b'\n');
                out.push(Message { time, text });
            }
        }
        self.carry.drain(..start);
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

/// Messages at or after `since`, then the last `tail` of them.
pub fn select(messages: Vec<Message>, opts: &LogOptions) -> Vec<Message> {
    let mut kept: Vec<Message> = messages
        .into_iter()
        .filter(|m| opts.since.is_none_or(|s| m.time >= s))
        .collect();
    if let Some(n) = opts.tail_lines {
        let skip = kept.len().saturating_sub(n);
        kept.drain(..skip);
    }
    kept
}

/// A check whether the container is still running (ends a `follow`).
pub type RunningCheck = Box<dyn Fn() -> Pin<Box<dyn Future<Output = bool> + Send>> + Send + Sync>;

/// Streams the log at `path` into `tx` per `opts`; with `follow`, keeps reading as the file
/// grows until `running` says the container stopped (and the rest is read) or the client left.
pub async fn stream(
    path: PathBuf,
    opts: LogOptions,
    running: RunningCheck,
    tx: mpsc::Sender<Bytes>,
) -> std::io::Result<()> {
    let mut file = tokio::fs::File::open(&path).await?;
    let mut data = Vec::new();
    file.read_to_end(&mut data).await?;
    let mut offset = data.len() as u64;
    let mut parser = Parser::default();
    let mut left = opts.limit_bytes.unwrap_or(usize::MAX);
    let first = select(parser.feed(&data), &opts);
    if !send(&tx, first, &opts, &mut left).await || !opts.follow {
        return Ok(());
    }
    let mut idle = 0u32;
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
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
        let mut chunk = Vec::new();
        file.seek(std::io::SeekFrom::Start(offset)).await?;
        file.read_to_end(&mut chunk).await?;
        offset += chunk.len() as u64;
        if !chunk.is_empty() {
            idle = 0;
            let msgs: Vec<Message> = parser
                .feed(&chunk)
                .into_iter()
                .filter(|m| opts.since.is_none_or(|s| m.time >= s))
                .collect();
            if !send(&tx, msgs, &opts, &mut left).await {
                return Ok(());
            }
            continue;
        }
        idle += 1;
        // Ask the runtime about once a second, not on every poll.
        if idle.is_multiple_of(5) && !running().await {
            return Ok(());
        }
    }
}

/// Sends rendered messages within the byte budget; false when done (budget spent or client gone).
async fn send(
    tx: &mpsc::Sender<Bytes>,
    msgs: Vec<Message>,
    opts: &LogOptions,
    left: &mut usize,
) -> bool {
    for m in msgs {
        let mut bytes = m.render(opts.timestamps);
        if bytes.len() >= *left {
            bytes.truncate(*left);
            *left = 0;
            let _ = tx.send(Bytes::from(bytes)).await;
            return false;
        }
        *left -= bytes.len();
        if tx.send(Bytes::from(bytes)).await.is_err() {
            return false;
        }
    }
    true
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
    fn lines_parse_and_partials_join_per_stream() {
        let mut p = Parser::default();
        let msgs = p.feed(log().as_bytes());
        let texts: Vec<String> = msgs
            .iter()
            .map(|m| String::from_utf8_lossy(&m.text).into_owned())
            .collect();
        assert_eq!(texts, ["one\n", "three\n", "two\n", "four\n"]);
        // The joined line keeps its first fragment's time.
        assert_eq!(msgs[2].time, T1.parse::<Timestamp>().unwrap());
        assert_eq!(
            String::from_utf8(msgs[0].render(true)).unwrap(),
            "2026-01-02T03:04:05.000000001Z one\n"
        );
    }

    #[test]
    fn a_line_split_across_reads_is_carried_over() {
        let mut p = Parser::default();
        let text = log();
        let (a, b) = text.as_bytes().split_at(40);
        let mut msgs = p.feed(a);
        msgs.extend(p.feed(b));
        assert_eq!(msgs.len(), 4);
        assert!(p.feed(b"garbage line\n").is_empty());
        assert_eq!(p.feed(format!("{T1} stdout F\n").as_bytes())[0].text, b"\n");
    }

    #[test]
    fn since_and_tail_select_messages() {
        let all = Parser::default().feed(log().as_bytes());
        let o = LogOptions {
            tail_lines: Some(2),
            ..Default::default()
        };
        let tail: Vec<Vec<u8>> = select(all.clone(), &o)
            .into_iter()
            .map(|m| m.text)
            .collect();
        assert_eq!(tail, [b"two\n".to_vec(), b"four\n".to_vec()]);
        let o = LogOptions {
            since: Some(T2.parse().unwrap()),
            ..Default::default()
        };
        assert_eq!(select(all.clone(), &o).len(), 2);
        let o = LogOptions {
            tail_lines: Some(0),
            ..Default::default()
        };
        assert!(select(all, &o).is_empty());
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
        assert_eq!(collect(rx).await, "one\nth");
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
        assert_eq!(rx.recv().await.unwrap(), Bytes::from_static(b"new\n"));
        flag.store(false, Ordering::SeqCst);
        assert_eq!(collect(rx).await, "");
        task.await.unwrap().unwrap();
    }
}
