//! Container logs in the CRI format: one record per line,
//! `<RFC3339Nano timestamp> <stdout|stderr> <P|F> <content>\n`, where `P` marks a partial
//! line (a long line split, or output cut off) and `F` the last piece of a line.

use std::fmt::Write as _;

/// Longest content of one record; longer lines are split into `P` records (as containerd does).
pub const MAX_LINE: usize = 16 * 1024;

/// Which stream a record came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

impl Stream {
    pub fn as_str(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }
}

/// Formats a UTC time the way Go's `time.RFC3339Nano` does: nanoseconds with trailing zeros
/// trimmed (and no fraction at all when it is zero), `Z` for UTC.
pub fn rfc3339_nano(t: chrono::DateTime<chrono::Utc>) -> String {
    let mut s = t.format("%Y-%m-%dT%H:%M:%S").to_string();
    let nanos = t.timestamp_subsec_nanos();
    if nanos != 0 {
        let mut frac = format!("{nanos:09}");
        while frac.ends_with('0') {
            frac.pop();
        }
        let _ = write!(s, ".{frac}");
    }
    s.push('Z');
    s
}

/// Splits one stream's bytes into CRI records. Bytes without a newline yet are held back
/// (up to [`MAX_LINE`]) until the line completes or the stream ends.
#[derive(Debug)]
pub struct LineSplitter {
    stream: Stream,
    pending: Vec<u8>,
}

impl LineSplitter {
    pub fn new(stream: Stream) -> Self {
        LineSplitter {
            stream,
            pending: Vec::new(),
        }
    }

    /// Appends to `out` the records that `data` completes, stamped with `now`.
    pub fn feed(&mut self, mut data: &[u8], now: &str, out: &mut Vec<u8>) {
        while !data.is_empty() {
            let room = MAX_LINE - self.pending.len();
            match data.iter().take(room).position(|b| *b == b'\n') {
                Some(i) => {
                    self.pending.extend_from_slice(&data[..i]);
                    self.emit(now, true, out);
                    data = &data[i + 1..];
                }
                None if data.len() >= room => {
                    self.pending.extend_from_slice(&data[..room]);
                    // Exactly full and the next byte ends the line: it is a full line.
                    if data.get(room) == Some(&b'\n') {
                        self.emit(now, true, out);
                        data = &data[room + 1..];
                    } else {
                        self.emit(now, false, out);
                        data = &data[room..];
                    }
                }
                None => {
                    self.pending.extend_from_slice(data);
                    data = &[];
                }
            }
        }
    }

    /// The stream ended: whatever is held back becomes a final record.
    pub fn finish(&mut self, now: &str, out: &mut Vec<u8>) {
        if !self.pending.is_empty() {
            self.emit(now, true, out);
        }
    }

    fn emit(&mut self, now: &str, full: bool, out: &mut Vec<u8>) {
        out.extend_from_slice(now.as_bytes());
        out.push(b' ');
        out.extend_from_slice(self.stream.as_str().as_bytes());
        out.extend_from_slice(if full { b" F " } else { b" P " });
        out.extend_from_slice(&self.pending);
        out.push(b'\n');
        self.pending.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn timestamps_match_go_rfc3339nano() {
        let t = chrono::Utc
            .timestamp_opt(1_475_713_029, 669_794_202)
            .unwrap();
        assert_eq!(rfc3339_nano(t), "2016-10-06T00:17:09.669794202Z");
        let t = chrono::Utc
            .timestamp_opt(1_475_713_029, 500_000_000)
            .unwrap();
        assert_eq!(rfc3339_nano(t), "2016-10-06T00:17:09.5Z");
        let t = chrono::Utc.timestamp_opt(1_475_713_029, 0).unwrap();
        assert_eq!(rfc3339_nano(t), "2016-10-06T00:17:09Z");
    }

    #[test]
    fn lines_across_chunks_become_full_records() {
        let mut s = LineSplitter::new(Stream::Stdout);
        let mut out = Vec::new();
        s.feed(b"hel", "T", &mut out);
        assert!(out.is_empty());
        s.feed(b"lo\nworld\n\nta", "T", &mut out);
        s.finish("T2", &mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "T stdout F hello\nT stdout F world\nT stdout F \nT2 stdout F ta\n"
        );
    }

    #[test]
    fn long_lines_are_split_with_partial_markers() {
        let mut s = LineSplitter::new(Stream::Stderr);
        let mut out = Vec::new();
        let mut line = vec![b'a'; MAX_LINE * 2 + 10];
        line.push(b'\n');
        s.feed(&line, "T", &mut out);
        let text = String::from_utf8(out).unwrap();
        let recs: Vec<&str> = text.lines().collect();
        assert_eq!(recs.len(), 3);
        assert!(recs[0].starts_with("T stderr P aaa"));
        assert_eq!(recs[0].len(), "T stderr P ".len() + MAX_LINE);
        assert!(recs[1].starts_with("T stderr P "));
        assert_eq!(recs[2], format!("T stderr F {}", "a".repeat(10)));
    }

    #[test]
    fn a_line_of_exactly_max_length_is_one_full_record() {
        let mut s = LineSplitter::new(Stream::Stdout);
        let mut out = Vec::new();
        let mut line = vec![b'x'; MAX_LINE];
        line.push(b'\n');
        s.feed(&line[..100], "T", &mut out);
        s.feed(&line[100..], "T", &mut out);
        let text = String::from_utf8(out).unwrap();
        assert_eq!(text.lines().count(), 1);
        assert!(text.starts_with("T stdout F xx"));
    }
}
