//! Line framing: one UTF-8 JSON object per `\n`-terminated line, with a maximum length.
//!
//! [`LineDecoder`] is sans-io: callers feed it whatever bytes they read and take complete
//! frames out, so the same framing rules hold for the async worker and the blocking SDK.
//! An over-long line is reported once as [`Frame::TooLong`] and its remaining bytes are
//! discarded up to the next newline, so memory stays bounded whatever the peer writes.

use serde::Serialize;

/// Default maximum line length: 16 MiB (the worker's `max_line_bytes` default).
pub const DEFAULT_MAX_LINE_BYTES: usize = 16 * 1024 * 1024;

/// One unit taken out of a [`LineDecoder`].
#[derive(Debug, PartialEq, Eq)]
pub enum Frame {
    /// A complete line without its terminating `\n` (a trailing `\r` is removed too).
    Line(Vec<u8>),
    /// A line longer than the limit; `seen` is how many bytes of it had arrived when the
    /// limit was crossed. The rest of the line is skipped.
    TooLong { seen: usize },
}

/// Splits a byte stream into lines no longer than `max` bytes.
#[derive(Debug)]
pub struct LineDecoder {
    max: usize,
    buf: Vec<u8>,
    /// Start of the first byte not yet returned; consumed bytes are dropped lazily, once per
    /// [`extend`](Self::extend), so taking many small lines out of one read copies nothing twice.
    start: usize,
    /// Absolute offset in `buf` up to which no newline was found.
    scanned: usize,
    /// True while skipping the tail of an over-long line.
    discarding: bool,
}

impl LineDecoder {
    /// A decoder that refuses lines longer than `max` bytes (excluding the newline).
    pub fn new(max: usize) -> Self {
        LineDecoder {
            max,
            buf: Vec::new(),
            start: 0,
            scanned: 0,
            discarding: false,
        }
    }

    /// Appends freshly read bytes.
    pub fn extend(&mut self, bytes: &[u8]) {
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.scanned -= self.start;
            self.start = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes buffered but not yet returned as a frame.
    pub fn pending(&self) -> usize {
        self.buf.len() - self.start
    }

    /// Takes the next complete frame, if the buffered bytes hold one.
    pub fn next_frame(&mut self) -> Option<Frame> {
        loop {
            let from = self.scanned.max(self.start);
            let newline = self.buf[from..]
                .iter()
                .position(|&b| b == b'\n')
                .map(|i| i + from);
            match newline {
                Some(end) if self.discarding => {
                    self.consume_to(end + 1);
                    self.discarding = false;
                }
                Some(end) if end - self.start > self.max => {
                    let seen = end - self.start;
                    self.consume_to(end + 1);
                    return Some(Frame::TooLong { seen });
                }
                Some(end) => {
                    let mut line_end = end;
                    if line_end > self.start && self.buf[line_end - 1] == b'\r' {
                        line_end -= 1;
                    }
                    let line = self.buf[self.start..line_end].to_vec();
                    self.consume_to(end + 1);
                    return Some(Frame::Line(line));
                }
                None if self.discarding => {
                    self.consume_to(self.buf.len());
                    return None;
                }
                None if self.pending() > self.max => {
                    let seen = self.pending();
                    self.consume_to(self.buf.len());
                    self.discarding = true;
                    return Some(Frame::TooLong { seen });
                }
                None => {
                    self.scanned = self.buf.len();
                    return None;
                }
            }
        }
    }

    /// At end of input: the unterminated last line, if any (over-long tails are dropped).
    pub fn finish(&mut self) -> Option<Frame> {
        let tail = if self.discarding || self.pending() == 0 {
            None
        } else {
            Some(Frame::Line(self.buf[self.start..].to_vec()))
        };
        self.buf.clear();
        self.start = 0;
        self.scanned = 0;
        self.discarding = false;
        tail
    }

    fn consume_to(&mut self, offset: usize) {
        self.start = offset;
        self.scanned = offset;
        if self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
            self.scanned = 0;
        }
    }
}

/// Serializes `value` as one protocol line, newline included.
pub fn encode_line<T: Serialize>(value: &T) -> Vec<u8> {
    // Room for a typical `task.run` line from the start: growing the buffer field by field
    // was a tenth of the cost of writing one.
    let mut out = Vec::with_capacity(LINE_CAPACITY);
    serde_json::to_writer(&mut out, value).expect("protocol values always serialize");
    out.push(b'\n');
    out
}

/// The buffer a line is written into starts this large.
pub(crate) const LINE_CAPACITY: usize = 512;

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(dec: &mut LineDecoder) -> Vec<Frame> {
        std::iter::from_fn(|| dec.next_frame()).collect()
    }

    #[test]
    fn splits_lines_across_reads() {
        let mut dec = LineDecoder::new(100);
        dec.extend(b"{\"a\":1}\n{\"b\"");
        assert_eq!(frames(&mut dec), vec![Frame::Line(b"{\"a\":1}".to_vec())]);
        dec.extend(b":2}\r\n");
        assert_eq!(frames(&mut dec), vec![Frame::Line(b"{\"b\":2}".to_vec())]);
        assert_eq!(dec.finish(), None);
    }

    #[test]
    fn over_long_line_is_reported_once_and_skipped() {
        let mut dec = LineDecoder::new(8);
        dec.extend(b"0123456789");
        assert_eq!(frames(&mut dec), vec![Frame::TooLong { seen: 10 }]);
        dec.extend(b"abcdef");
        assert_eq!(frames(&mut dec), vec![]);
        dec.extend(b"ghi\nok\n");
        assert_eq!(frames(&mut dec), vec![Frame::Line(b"ok".to_vec())]);
    }

    #[test]
    fn over_long_line_within_one_read() {
        let mut dec = LineDecoder::new(4);
        dec.extend(b"toolong\nfine\n");
        assert_eq!(
            frames(&mut dec),
            vec![Frame::TooLong { seen: 7 }, Frame::Line(b"fine".to_vec())]
        );
    }

    #[test]
    fn line_of_exactly_max_is_accepted() {
        let mut dec = LineDecoder::new(4);
        dec.extend(b"abcd\n");
        assert_eq!(frames(&mut dec), vec![Frame::Line(b"abcd".to_vec())]);
    }

    #[test]
    fn unterminated_tail_comes_out_at_finish() {
        let mut dec = LineDecoder::new(100);
        dec.extend(b"tail");
        assert_eq!(dec.next_frame(), None);
        assert_eq!(dec.finish(), Some(Frame::Line(b"tail".to_vec())));
    }
}
