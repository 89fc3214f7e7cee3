//! Container logs as the kubelet serves them, read from the runtime's CRI log files: one
//! record per line, `<RFC 3339 time> <stream> <P|F> <content>`, where `P` marks a piece of a
//! longer line continued by the next record and `F` ends the line.
//!
//! The options are applied as upstream applies them: `tailLines` picks the last records of
//! the file, `sinceSeconds`/`sinceTime` then drops older records, `timestamps` puts each
//! record's time in front of its content, and `limitBytes` cuts the output.

use std::future::Future;
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use k8s_openapi::jiff::Timestamp;
use tokio::io::{AsyncReadExt as _, AsyncSeekExt as _};
use tokio::sync::mpsc;

use super::request::LogOptions;

/// How often a followed log is looked at for new records.
const FOLLOW_POLL: Duration = Duration::from_millis(100);
/// How much of a log file is read at a time.
const CHUNK: usize = 64 * 1024;

/// One parsed line of a CRI log file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record<'a> {
    pub time: &'a str,
    pub stream: &'a str,
    /// The line continues in the next record.
    pub partial: bool,
    pub content: &'a [u8],
}

/// Parses one line (without its `\n`); `None` if it is not a CRI log record.
pub fn parse_record(line: &[u8]) -> Option<Record<'_>> {
    let mut parts = line.splitn(4, |b| *b == b' ');
    let time = std::str::from_utf8(parts.next()?).ok()?;
    let stream = std::str::from_utf8(parts.next()?).ok()?;
    let tags = std::str::from_utf8(parts.next()?).ok()?;
    let content = parts.next().unwrap_or_default();
    if time.is_empty() || !matches!(stream, "stdout" | "stderr") {
        return None;
    }
    // Tags are `:`-separated; the first says whether the line is complete.
    let partial = match tags.split(':').next() {
        Some("P") => true,
        Some("F") => false,
        _ => return None,
    };
    Some(Record {
        time,
        stream,
        partial,
        content,
    })
}

/// Byte offset in `data` where its last `n` lines start.
pub fn tail_start(data: &[u8], n: u64) -> usize {
    if n == 0 {
        return data.len();
    }
    // A final newline ends the last line; it does not start another one.
    let body = data.strip_suffix(b"\n").unwrap_or(data);
    let mut seen = 0;
    for (i, b) in body.iter().enumerate().rev() {
        if *b == b'\n' {
            seen += 1;
            if seen == n {
                return i + 1;
            }
        }
    }
    0
}

/// Turns log file lines into response bytes under the request's options.
#[derive(Debug, Clone)]
pub struct LogWriter {
    timestamps: bool,
    cutoff: Option<Timestamp>,
    remaining: Option<u64>,
}

impl LogWriter {
    pub fn new(options: &LogOptions, now: Timestamp) -> LogWriter {
        LogWriter {
            timestamps: options.timestamps,
            cutoff: options.since.map(|s| s.cutoff(now)),
            remaining: options.limit_bytes,
        }
    }

    /// True once `limitBytes` has been written.
    pub fn full(&self) -> bool {
        self.remaining == Some(0)
    }

    /// Appends what one file line (without `\n`) shows. Lines that are not records are
    /// skipped, as are records before the `since` cutoff.
    pub fn line(&mut self, line: &[u8], out: &mut Vec<u8>) {
        let Some(record) = parse_record(line) else {
            return;
        };
        if let Some(cutoff) = self.cutoff {
            match record.time.parse::<Timestamp>() {
                Ok(t) if t >= cutoff => {}
                _ => return,
            }
        }
        let mut piece = Vec::with_capacity(record.content.len() + 40);
        if self.timestamps {
            piece.extend_from_slice(record.time.as_bytes());
            piece.push(b' ');
        }
        piece.extend_from_slice(record.content);
        if !record.partial {
            piece.push(b'\n');
        }
        if let Some(left) = self.remaining.as_mut() {
            let take = usize::try_from(*left)
                .unwrap_or(usize::MAX)
                .min(piece.len());
            piece.truncate(take);
            *left -= take as u64;
        }
        out.extend_from_slice(&piece);
    }

    /// Writes every complete line of `data` to `out`; returns how many bytes were used (the
    /// rest is an unfinished line).
    pub fn lines(&mut self, data: &[u8], out: &mut Vec<u8>) -> usize {
        let mut used = 0;
        while let Some(end) = data[used..].iter().position(|b| *b == b'\n') {
            if self.full() {
                return data.len();
            }
            self.line(&data[used..used + end], out);
            used += end + 1;
        }
        used
    }
}

/// The whole answer for a log file that is not followed.
pub fn render(data: &[u8], options: &LogOptions, now: Timestamp) -> Vec<u8> {
    let start = options.tail_lines.map_or(0, |n| tail_start(data, n));
    let mut writer = LogWriter::new(options, now);
    let mut out = Vec::new();
    let data = &data[start..];
    let used = writer.lines(data, &mut out);
    // A last line without its newline is still a record (a file cut short by a crash).
    if used < data.len() && !writer.full() {
        writer.line(&data[used..], &mut out);
    }
    out
}

/// Streams the log at `path` into `tx` under `options`, then keeps sending new records while
/// `running()` says the container runs; ends when it stopped and the file is drained, when
/// `limitBytes` is reached, or when the receiver is gone (the client left).
pub async fn follow<F, Fut>(
    path: &Path,
    options: &LogOptions,
    tx: mpsc::Sender<Bytes>,
    mut running: F,
) -> std::io::Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let mut file = tokio::fs::File::open(path).await?;
    let mut data = Vec::new();
    file.read_to_end(&mut data).await?;
    let start = options.tail_lines.map_or(0, |n| tail_start(&data, n));
    let mut writer = LogWriter::new(options, crate::api::now());
    let mut pending: Vec<u8> = data.split_off(start);
    let mut position = file.stream_position().await?;
    let mut buf = vec![0u8; CHUNK];
    loop {
        let mut out = Vec::new();
        let used = writer.lines(&pending, &mut out);
        pending.drain(..used);
        if !out.is_empty() && tx.send(Bytes::from(out)).await.is_err() {
            return Ok(());
        }
        if writer.full() {
            return Ok(());
        }
        let n = file.read(&mut buf).await?;
        if n > 0 {
            position += n as u64;
            pending.extend_from_slice(&buf[..n]);
            continue;
        }
        if !running().await {
            // One more look: the last records may have landed after the read above.
            let n = file.read(&mut buf).await?;
            if n == 0 {
                let mut out = Vec::new();
                writer.lines(&pending, &mut out);
                if !out.is_empty() {
                    let _ = tx.send(Bytes::from(out)).await;
                }
                return Ok(());
            }
            position += n as u64;
            pending.extend_from_slice(&buf[..n]);
            continue;
        }
        tokio::select! {
            () = tx.closed() => return Ok(()),
            () = tokio::time::sleep(FOLLOW_POLL) => {}
        }
        // A log rotated away under us starts again from the top of the new file.
        if tokio::fs::metadata(path)
            .await
            .is_ok_and(|m| m.len() < position)
        {
            file = tokio::fs::File::open(path).await?;
            position = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::request::Since;

    const LOG: &[u8] = b"2026-11-22T08:00:00.000000001Z stdout F one\n\
2026-11-22T08:00:01Z stderr F two\n\
2026-11-22T08:00:02Z stdout P thr\n\
2026-11-22T08:00:02.5Z stdout F ee\n\
not a record\n\
2026-11-22T08:00:03Z stdout F \n";

    fn now() -> Timestamp {
        "2026-11-22T08:00:10Z".parse().expect("ts")
    }

    fn text(options: &LogOptions) -> String {
        String::from_utf8(render(LOG, options, now())).expect("utf8")
    }

    #[test]
    fn records_parse_and_junk_does_not() {
        let r = parse_record(b"2026-11-22T08:00:00Z stderr F hello world").expect("record");
        assert_eq!(r.stream, "stderr");
        assert!(!r.partial);
        assert_eq!(r.content, b"hello world");
        assert!(
            parse_record(b"2026-11-22T08:00:00Z stdout P:x part")
                .expect("tags")
                .partial
        );
        assert_eq!(
            parse_record(b"2026-11-22T08:00:00Z stdout F")
                .expect("empty")
                .content,
            b""
        );
        assert!(parse_record(b"garbage").is_none());
        assert!(parse_record(b"2026-11-22T08:00:00Z stdin F x").is_none());
        assert!(parse_record(b"2026-11-22T08:00:00Z stdout X x").is_none());
    }

    #[test]
    fn plain_output_joins_partial_records() {
        assert_eq!(text(&LogOptions::default()), "one\ntwo\nthree\n\n");
    }

    #[test]
    fn timestamps_prefix_each_record() {
        let out = text(&LogOptions {
            timestamps: true,
            ..Default::default()
        });
        assert!(
            out.starts_with("2026-11-22T08:00:00.000000001Z one\n2026-11-22T08:00:01Z two\n"),
            "{out}"
        );
    }

    #[test]
    fn tail_counts_file_lines_from_the_end() {
        assert_eq!(tail_start(b"a\nb\nc\n", 2), 2);
        assert_eq!(tail_start(b"a\nb\nc", 2), 2);
        assert_eq!(tail_start(b"a\nb\n", 5), 0);
        assert_eq!(tail_start(b"a\nb\n", 0), 4);
        let out = text(&LogOptions {
            tail_lines: Some(3),
            ..Default::default()
        });
        assert_eq!(out, "ee\n\n");
        assert_eq!(
            text(&LogOptions {
                tail_lines: Some(0),
                ..Default::default()
            }),
            ""
        );
    }

    #[test]
    fn since_drops_older_records() {
        let out = text(&LogOptions {
            since: Some(Since::Time("2026-11-22T08:00:01Z".parse().expect("ts"))),
            ..Default::default()
        });
        assert_eq!(out, "two\nthree\n\n");
        let out = text(&LogOptions {
            since: Some(Since::Seconds(8)),
            ..Default::default()
        });
        assert_eq!(out, "three\n\n");
    }

    #[test]
    fn limit_bytes_cuts_the_output() {
        let out = text(&LogOptions {
            limit_bytes: Some(6),
            ..Default::default()
        });
        assert_eq!(out, "one\ntw");
    }

    #[tokio::test]
    async fn follow_sends_new_records_until_the_container_stops() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("0.log");
        std::fs::write(&path, b"2026-11-22T08:00:00Z stdout F first\n").expect("write");
        let (tx, mut rx) = mpsc::channel(16);
        let running = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        let flag = running.clone();
        let options = LogOptions {
            follow: true,
            ..Default::default()
        };
        let p = path.clone();
        let task = tokio::spawn(async move {
            follow(&p, &options, tx, move || {
                let flag = flag.clone();
                async move { flag.load(std::sync::atomic::Ordering::SeqCst) }
            })
            .await
        });
        assert_eq!(rx.recv().await.expect("first").as_ref(), b"first\n");
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .expect("open");
        std::io::Write::write_all(&mut f, b"2026-11-22T08:00:01Z stdout F second\n")
            .expect("append");
        assert_eq!(rx.recv().await.expect("second").as_ref(), b"second\n");
        std::io::Write::write_all(&mut f, b"2026-11-22T08:00:02Z stdout F last\n").expect("append");
        running.store(false, std::sync::atomic::Ordering::SeqCst);
        let mut rest = Vec::new();
        while let Some(chunk) = rx.recv().await {
            rest.extend_from_slice(&chunk);
        }
        assert_eq!(rest, b"last\n");
        task.await.expect("join").expect("follow");
    }
}
