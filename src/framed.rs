//! The one framed reader: newline-delimited frames from any async byte stream, with the
//! protocol's line-length limit (a longer line is reported as `Frame::TooLong`, not buffered).
//! Used for plugin stdout, the control socket (both ends) and `plugins test`. Log streams
//! (a plugin's stderr, an install step's output) are read with [`read_log_line`] instead,
//! which keeps the start of an over-long line.

use plugin_protocol::{Frame, LineDecoder};
use std::io;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, BufReader};

/// Bytes read from the stream at a time.
const READ_CHUNK: usize = 64 * 1024;

pub struct FramedReader<R> {
    reader: R,
    decoder: LineDecoder,
    buf: Vec<u8>,
    eof: bool,
}

impl<R: AsyncRead + Unpin> FramedReader<R> {
    pub fn new(reader: R, max_line: usize) -> Self {
        FramedReader {
            reader,
            decoder: LineDecoder::new(max_line),
            buf: vec![0; READ_CHUNK],
            eof: false,
        }
    }

    /// The next frame, or `None` at end of stream (a last line without a newline comes
    /// first). Cancel-safe: bytes are only consumed once a read completes.
    pub async fn next(&mut self) -> io::Result<Option<Frame>> {
        loop {
            if let Some(frame) = self.decoder.next_frame() {
                return Ok(Some(frame));
            }
            if self.eof {
                return Ok(None);
            }
            let n = self.reader.read(&mut self.buf).await?;
            if n == 0 {
                self.eof = true;
                return Ok(self.decoder.finish());
            }
            self.decoder.extend(&self.buf[..n]);
        }
    }
}

/// The next line of a log stream as text: its first `max` bytes (trailing whitespace removed,
/// invalid UTF-8 replaced) and how many bytes of it were skipped after them, never buffered,
/// so memory stays bounded whatever the writer sends without a newline. `None` at the end of
/// the stream; a last line without a newline comes first.
pub async fn read_log_line<R: AsyncRead + Unpin>(
    reader: &mut BufReader<R>,
    max: usize,
) -> io::Result<Option<(String, u64)>> {
    let mut buf = Vec::new();
    if (&mut *reader)
        .take(max as u64)
        .read_until(b'\n', &mut buf)
        .await?
        == 0
    {
        return Ok(None);
    }
    let skipped = match buf.last() {
        Some(b'\n') => 0,
        _ => skip_line(reader).await?,
    };
    let mut line = String::from_utf8(buf)
        .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned());
    line.truncate(line.trim_end().len());
    Ok(Some((line, skipped)))
}

/// Skips the rest of a line (its newline too); returns how many bytes it had before the newline.
async fn skip_line<R: AsyncRead + Unpin>(reader: &mut BufReader<R>) -> io::Result<u64> {
    let mut skipped = 0;
    loop {
        let buf = reader.fill_buf().await?;
        if buf.is_empty() {
            return Ok(skipped);
        }
        match buf.iter().position(|&b| b == b'\n') {
            Some(at) => {
                reader.consume(at + 1);
                return Ok(skipped + at as u64);
            }
            None => {
                let n = buf.len();
                reader.consume(n);
                skipped += n as u64;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn log_lines_keep_their_start_and_count_the_rest() {
        let input: &[u8] = b"one  \ntoo long by five\n\xffok\nlast";
        let mut r = BufReader::with_capacity(4, input);
        let mut lines = Vec::new();
        while let Some(line) = read_log_line(&mut r, 11).await.unwrap() {
            lines.push(line);
        }
        let want = [
            ("one", 0),
            ("too long by", 5),
            ("\u{fffd}ok", 0),
            ("last", 0),
        ];
        let want: Vec<(String, u64)> = want.iter().map(|(l, n)| (l.to_string(), *n)).collect();
        assert_eq!(lines, want);
    }

    #[tokio::test]
    async fn frames_a_stream_with_a_limit_and_a_last_unterminated_line() {
        let input: &[u8] = b"one\n\nthree is too long\nlast";
        let mut r = FramedReader::new(input, 8);
        let mut frames = Vec::new();
        while let Some(f) = r.next().await.unwrap() {
            frames.push(f);
        }
        assert_eq!(frames[0], Frame::Line(b"one".to_vec()));
        assert!(frames.iter().any(|f| matches!(f, Frame::TooLong { .. })));
        assert_eq!(frames.last(), Some(&Frame::Line(b"last".to_vec())));
    }
}
