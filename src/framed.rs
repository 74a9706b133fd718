//! The one framed reader: newline-delimited frames from any async byte stream, with the
//! protocol's line-length limit (a longer line is reported as `Frame::TooLong`, not buffered).
//! Used for plugin stdout, the control socket (both ends) and `plugins test`.

use plugin_protocol::{Frame, LineDecoder};
use std::io;
use tokio::io::{AsyncRead, AsyncReadExt};

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

#[cfg(test)]
mod tests {
    use super::*;

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
