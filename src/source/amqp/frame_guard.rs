//! The bytes the broker sends, vetted before lapin parses them. RabbitMQ hands a message's
//! headers over as one content-header frame of up to `frame_max` (131,072 bytes), and any
//! producer may nest a table or array in it as deep as that frame allows, about 26,000
//! levels. lapin's parser recurses once per level on its I/O thread (at well over 10 KB of
//! stack a level), and the parsed value is dropped recursively too: a 2,000-level header
//! aborted the whole process, and the message, still queued, aborted it again on restart.
//!
//! So the connection's stream is wrapped: every content-header frame's `headers` table is
//! scanned without recursion, and one nested deeper than [`MAX_DEPTH`] (or malformed) is
//! replaced, before lapin sees it, by a table holding only [`REFUSED`] and the reason. The
//! message then arrives shallow and is rejected by `inbound::read` with one log line. Every
//! other byte passes unchanged. The wrapper sits above TLS (it is given the decrypted stream),
//! and lapin is handed it as a plain stream through a reactor whose `TcpStream` it is.

use async_rs::traits::Reactor;
use async_rs::Tokio;
use futures_lite::io::{AsyncRead, AsyncWrite};
use lapin::tcp::AsyncTcpStream;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

/// How deep a header table may nest (tables and arrays, the headers table itself counted)
/// before the frame is rewritten; `inbound` refuses anything past its own, smaller, limit.
pub const MAX_DEPTH: usize = 64;
/// The header that marks a message whose headers were replaced, with the reason as its value.
pub const REFUSED: &str = "x-worker-refused-headers";

/// Frames larger than this are passed through unvetted (lapin refuses frames over
/// `frame_max` itself); the broker never sends one.
const MAX_VETTED_FRAME: usize = 16 << 20;
const FRAME_HEADER: u8 = 2;
const FRAME_END: u8 = 0xCE;
/// Bytes read from the socket at a time.
const READ_CHUNK: usize = 64 * 1024;

/// The stream of one broker connection, content-header frames vetted.
pub struct FrameGuard<S> {
    inner: S,
    /// Read space, zeroed once; the bytes read are `buf[start..end]`.
    buf: Vec<u8>,
    /// `buf[start..vetted]` may be handed to lapin; `buf[vetted..end]` is an incomplete frame.
    start: usize,
    vetted: usize,
    end: usize,
    /// Past the protocol header or a frame too large to vet: hand everything over.
    passthrough: bool,
    eof: bool,
}

impl<S> FrameGuard<S> {
    pub fn new(inner: S) -> Self {
        FrameGuard {
            inner,
            buf: Vec::new(),
            start: 0,
            vetted: 0,
            end: 0,
            passthrough: false,
            eof: false,
        }
    }

    /// Vets the complete frames after `vetted`, rewriting refused headers in place.
    fn vet(&mut self) {
        loop {
            if self.passthrough || self.eof {
                self.vetted = self.end;
                return;
            }
            let rest = &self.buf[self.vetted..self.end];
            // The broker answers a protocol mismatch with "AMQP" + version, not a frame.
            if rest.first() == Some(&b'A') {
                self.passthrough = true;
                continue;
            }
            if rest.len() < 7 {
                return;
            }
            let size = u32::from_be_bytes([rest[3], rest[4], rest[5], rest[6]]) as usize;
            if size > MAX_VETTED_FRAME {
                self.passthrough = true;
                continue;
            }
            let total = 7 + size + 1;
            if rest.len() < total {
                return;
            }
            if rest[0] == FRAME_HEADER {
                if let Some(reason) = refused(&rest[7..7 + size]) {
                    let replaced = rewrite(&rest[..total], reason);
                    let at = self.vetted;
                    self.buf.truncate(self.end);
                    self.buf.splice(at..at + total, replaced.iter().copied());
                    self.end = self.buf.len();
                    self.vetted += replaced.len();
                    continue;
                }
            }
            self.vetted += total;
        }
    }
}

/// Why a content-header payload's headers must be replaced, if they must.
fn refused(payload: &[u8]) -> Option<&'static str> {
    match headers_span(payload) {
        Ok(None) => None,
        Ok(Some((start, end))) => table_depth_within(&payload[start..end], MAX_DEPTH).err(),
        Err(why) => Some(why),
    }
}

/// Where the `headers` table's content lies in a content-header payload (`None`: no
/// headers). Payload: class(2) weight(2) body size(8) flags(2, more while bit 0 is set), then
/// content-type and content-encoding (short strings) before the headers (a long-length table).
fn headers_span(p: &[u8]) -> Result<Option<(usize, usize)>, &'static str> {
    const MALFORMED: &str = "malformed content header";
    let flags = p.get(12..14).ok_or(MALFORMED)?;
    let flags = u16::from_be_bytes([flags[0], flags[1]]);
    let mut pos = 14;
    let mut more = flags & 1 == 1;
    while more {
        let f = p.get(pos..pos + 2).ok_or(MALFORMED)?;
        more = f[1] & 1 == 1;
        pos += 2;
    }
    for bit in [0x8000, 0x4000] {
        if flags & bit != 0 {
            pos += 1 + *p.get(pos).ok_or(MALFORMED)? as usize;
        }
    }
    if flags & 0x2000 == 0 {
        return Ok(None);
    }
    let len = p.get(pos..pos + 4).ok_or(MALFORMED)?;
    let len = u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize;
    let start = pos + 4;
    let end = start
        .checked_add(len)
        .filter(|&e| e <= p.len())
        .ok_or(MALFORMED)?;
    Ok(Some((start, end)))
}

/// Checks, without recursion, that a field table's content nests at most `max` deep and is
/// well formed (AMQP 0-9-1 field types as RabbitMQ and lapin read them).
fn table_depth_within(t: &[u8], max: usize) -> Result<(), &'static str> {
    const MALFORMED: &str = "malformed header table";
    const TOO_DEEP: &str = "headers nested too deep";
    let read_u32 = |p: usize| -> Result<usize, &'static str> {
        let b = t.get(p..p + 4).ok_or(MALFORMED)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
    };
    // Open containers: (is a table, where it ends).
    let mut open: Vec<(bool, usize)> = vec![(true, t.len())];
    let mut p = 0;
    while let Some(&(table, end)) = open.last() {
        if p == end {
            open.pop();
            continue;
        }
        if p > end {
            return Err(MALFORMED);
        }
        if table {
            p += 1 + *t.get(p).ok_or(MALFORMED)? as usize;
        }
        let kind = *t.get(p).ok_or(MALFORMED)?;
        p += 1;
        p += match kind {
            b'V' => 0,
            b't' | b'b' | b'B' => 1,
            b's' | b'U' | b'u' => 2,
            b'I' | b'i' | b'f' => 4,
            b'D' => 5,
            b'L' | b'l' | b'd' | b'T' => 8,
            b'S' | b'x' => 4 + read_u32(p)?,
            b'F' | b'A' => {
                if open.len() >= max {
                    return Err(TOO_DEEP);
                }
                let inner_end = (p + 4)
                    .checked_add(read_u32(p)?)
                    .filter(|&e| e <= end)
                    .ok_or(MALFORMED)?;
                open.push((kind == b'F', inner_end));
                4
            }
            _ => return Err(MALFORMED),
        };
    }
    if p == t.len() {
        Ok(())
    } else {
        Err(MALFORMED)
    }
}

/// The frame again, its properties replaced by a headers table holding only the reason.
fn rewrite(frame: &[u8], reason: &str) -> Vec<u8> {
    let mut table = Vec::new();
    table.push(REFUSED.len() as u8);
    table.extend_from_slice(REFUSED.as_bytes());
    table.push(b'S');
    table.extend_from_slice(&(reason.len() as u32).to_be_bytes());
    table.extend_from_slice(reason.as_bytes());
    let mut payload = frame[7..7 + 12].to_vec();
    payload.extend_from_slice(&0x2000u16.to_be_bytes());
    payload.extend_from_slice(&(table.len() as u32).to_be_bytes());
    payload.extend_from_slice(&table);
    let mut out = frame[..3].to_vec();
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(&payload);
    out.push(FRAME_END);
    out
}

impl<S: AsyncRead + Unpin> AsyncRead for FrameGuard<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        loop {
            if this.start < this.vetted {
                let n = out.len().min(this.vetted - this.start);
                out[..n].copy_from_slice(&this.buf[this.start..this.start + n]);
                this.start += n;
                return Poll::Ready(Ok(n));
            }
            if this.eof {
                return Poll::Ready(Ok(0));
            }
            // Everything handed over: keep only the incomplete frame, at the front.
            if this.buf.len() - this.end < READ_CHUNK {
                this.buf.copy_within(this.start..this.end, 0);
                (this.end, this.vetted) = (this.end - this.start, this.vetted - this.start);
                this.start = 0;
                if this.buf.len() - this.end < READ_CHUNK {
                    this.buf.resize(this.end + READ_CHUNK, 0);
                }
            }
            let end = this.end;
            let n = ready!(Pin::new(&mut this.inner).poll_read(cx, &mut this.buf[end..]))?;
            this.end += n;
            this.eof = n == 0;
            this.vet();
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for FrameGuard<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(Pin::new(&mut self.inner).poll_close(cx))?;
        Poll::Ready(Ok(()))
    }
}

/// The TCP (or TLS) stream of a broker connection, before the guard.
pub type BrokerStream = AsyncTcpStream<<Tokio as Reactor>::TcpStream>;

/// tokio's reactor, except that the streams it connects come guarded: lapin is handed a
/// `FrameGuard` as its "TCP stream".
#[derive(Debug, Clone)]
pub struct GuardedReactor(pub Tokio);

impl Reactor for GuardedReactor {
    type TcpStream = FrameGuard<BrokerStream>;
    type Sleep = <Tokio as Reactor>::Sleep;

    fn register<
        H: io::Read + io::Write + std::os::fd::AsFd + std::os::fd::AsRawFd + Send + 'static,
    >(
        &self,
        socket: H,
    ) -> io::Result<impl AsyncRead + AsyncWrite + Send + Unpin + 'static> {
        self.0.register(socket)
    }

    fn sleep(&self, dur: Duration) -> Self::Sleep {
        self.0.sleep(dur)
    }

    fn interval(
        &self,
        dur: Duration,
    ) -> impl futures_lite::Stream<Item = Instant> + Send + 'static {
        self.0.interval(dur)
    }

    fn tcp_connect_addr(
        &self,
        addr: SocketAddr,
    ) -> impl std::future::Future<Output = io::Result<Self::TcpStream>> + Send + 'static {
        let connecting = self.0.tcp_connect_addr(addr);
        async move { Ok(FrameGuard::new(AsyncTcpStream::Plain(connecting.await?))) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::{AMQPValue, FieldArray, FieldTable};
    use lapin::BasicProperties;

    /// A content-header frame of exactly `frame_max` (131,072) bytes whose headers hold one
    /// field, `d`, an array nested as deep as the frame allows: built as bytes.
    fn deepest_header_frame() -> (Vec<u8>, usize) {
        const FRAME_MAX: usize = 131_072;
        let payload_len = FRAME_MAX - 8;
        let value_len = payload_len - (2 + 2 + 8 + 2 + 4 + 2);
        let depth = (value_len - 1) / 5;
        let padding = value_len - 1 - depth * 5;
        let mut f = Vec::with_capacity(FRAME_MAX);
        f.push(FRAME_HEADER);
        f.extend_from_slice(&1u16.to_be_bytes());
        f.extend_from_slice(&(payload_len as u32).to_be_bytes());
        f.extend_from_slice(&60u16.to_be_bytes());
        f.extend_from_slice(&0u16.to_be_bytes());
        f.extend_from_slice(&7u64.to_be_bytes());
        f.extend_from_slice(&0x2000u16.to_be_bytes());
        f.extend_from_slice(&((value_len + 2) as u32).to_be_bytes());
        f.extend_from_slice(&[1, b'd']);
        for level in 0..depth {
            f.push(b'A');
            let inside = (depth - level - 1) * 5 + 1 + padding;
            f.extend_from_slice(&(inside as u32).to_be_bytes());
        }
        f.extend(std::iter::repeat_n(b'V', 1 + padding));
        f.push(FRAME_END);
        assert_eq!(f.len(), FRAME_MAX);
        (f, depth)
    }

    /// A frame as lapin would write it.
    fn header_frame(props: BasicProperties) -> Vec<u8> {
        use amq_protocol::frame::{gen_frame, AMQPContentHeader, AMQPFrame};
        let frame = AMQPFrame::Header(
            1,
            AMQPContentHeader {
                class_id: 60,
                body_size: 3,
                properties: props,
            },
        );
        let written = gen_frame(&frame)(amq_protocol::frame::WriteContext::from(Vec::new()))
            .expect("the frame serializes");
        written.write
    }

    fn parse(bytes: &[u8]) -> BasicProperties {
        let (rest, frame) = amq_protocol::frame::parse_frame(bytes).expect("a frame");
        assert!(rest.is_empty());
        match frame {
            amq_protocol::frame::AMQPFrame::Header(_, h) => h.properties,
            other => panic!("not a header frame: {other:?}"),
        }
    }

    /// Reads everything through a guard, `chunk` bytes at a time from the source.
    fn through_guard(bytes: &[u8], chunk: usize) -> Vec<u8> {
        struct Chunks<'a>(&'a [u8], usize);
        impl AsyncRead for Chunks<'_> {
            fn poll_read(
                mut self: Pin<&mut Self>,
                _: &mut Context<'_>,
                out: &mut [u8],
            ) -> Poll<io::Result<usize>> {
                let n = out.len().min(self.1).min(self.0.len());
                out[..n].copy_from_slice(&self.0[..n]);
                self.0 = &self.0[n..];
                Poll::Ready(Ok(n))
            }
        }
        let mut guard = FrameGuard::new(Chunks(bytes, chunk));
        let mut all = Vec::new();
        futures_lite::future::block_on(futures_lite::io::AsyncReadExt::read_to_end(
            &mut guard, &mut all,
        ))
        .expect("reads");
        all
    }

    #[test]
    fn the_deepest_frame_the_broker_can_send_arrives_shallow_and_marked() {
        let (deep, depth) = deepest_header_frame();
        assert!(depth > 26_000);
        let mut stream = deep.clone();
        let ordinary = header_frame(
            BasicProperties::default()
                .with_content_type("application/json".into())
                .with_reply_to("rq".into()),
        );
        stream.extend_from_slice(&ordinary);
        for chunk in [1, 7, 4096, 1 << 20] {
            let out = through_guard(&stream, chunk);
            let marked = parse(&out[..out.len() - ordinary.len()]);
            let headers = marked.headers().as_ref().expect("headers");
            assert!(
                matches!(headers.inner().get(REFUSED), Some(AMQPValue::LongString(s)) if s.to_string().contains("too deep")),
                "{headers:?}"
            );
            assert_eq!(
                &out[out.len() - ordinary.len()..],
                ordinary.as_slice(),
                "untouched"
            );
        }
    }

    #[test]
    fn ordinary_headers_pass_byte_for_byte() {
        let mut nested = FieldTable::default();
        let mut arr = FieldArray::default();
        arr.push(AMQPValue::LongString("x".into()));
        arr.push(AMQPValue::Double(1.5));
        nested.insert("a".into(), AMQPValue::FieldArray(arr));
        let mut h = FieldTable::default();
        for (k, v) in [
            ("task", AMQPValue::LongString("t".into())),
            ("n", AMQPValue::LongLongInt(-3)),
            ("b", AMQPValue::Boolean(true)),
            ("s", AMQPValue::ShortInt(2)),
            ("ts", AMQPValue::Timestamp(9)),
            ("v", AMQPValue::Void),
            ("f", AMQPValue::FieldTable(nested)),
        ] {
            h.insert(k.into(), v);
        }
        let frame = header_frame(
            BasicProperties::default()
                .with_content_type("application/json".into())
                .with_content_encoding("utf-8".into())
                .with_headers(h.clone())
                .with_priority(3),
        );
        assert_eq!(through_guard(&frame, 5), frame);
        assert_eq!(parse(&frame).headers().as_ref(), Some(&h));
    }

    #[test]
    fn nesting_is_counted_and_malformed_tables_are_refused() {
        let nest = |levels: usize| {
            let mut v = AMQPValue::Void;
            for _ in 0..levels {
                let mut a = FieldArray::default();
                a.push(v);
                v = AMQPValue::FieldArray(a);
            }
            let mut h = FieldTable::default();
            h.insert("d".into(), v);
            header_frame(BasicProperties::default().with_headers(h))
        };
        let ok = nest(MAX_DEPTH - 1);
        assert_eq!(through_guard(&ok, 64), ok, "the table and 63 arrays");
        let deep = through_guard(&nest(MAX_DEPTH), 64);
        assert!(parse(&deep)
            .headers()
            .as_ref()
            .unwrap()
            .inner()
            .contains_key(REFUSED));
        assert_eq!(
            table_depth_within(&[1, b'k', b'?'], 8),
            Err("malformed header table")
        );
        assert_eq!(
            table_depth_within(&[1, b'k', b'S', 0, 0, 0, 9], 8),
            Err("malformed header table")
        );
        assert_eq!(table_depth_within(&[], 8), Ok(()));
    }
}
