//! The SDK's outgoing queue: every line a plugin sends goes to one writer thread, which writes
//! what is ready in one piece.
//!
//! What tasks send (progress, stream items, logs, their answers) is bounded: a task waits while
//! [`TASK_BYTES`] are queued, so a task that streams faster than the worker reads is held back
//! rather than buffered in the plugin's memory without end (the worker stops reading a
//! plugin's stdout while a task's caller is slow). What the reading thread sends itself
//! (answers to pings and refusals, quick tasks' answers) and the backends' lines never wait:
//! the reading thread must keep reading the worker's requests, and its answers are a line each.
//! Those lines still queue behind at most [`TASK_BYTES`] of the tasks', so a ping's answer is
//! never stuck behind gigabytes.
//!
//! The reading thread may also write its answers itself ([`Outbox::send_or_write`]), when
//! stdout is a descriptor it can test: only while nothing is queued or being written (so no
//! line overtakes one sent before it), and only what the kernel takes without blocking
//! (whole lines of at most `PIPE_BUF` bytes, each after `poll` said there is room). That saves
//! waking the writer thread once per read; the rest goes to the writer as before.

use std::io::{self, Write};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex, PoisonError};

/// Bytes of task output queued before a task that sends more waits for the writer.
pub(crate) const TASK_BYTES: usize = 1 << 20;

/// The most a write to a pipe that `poll` found writable takes whole without blocking.
const PIPE_BUF: usize = 4096;

/// A line on its way to the writer, and how many of its bytes count against [`TASK_BYTES`].
struct Queued {
    line: Vec<u8>,
    counted: usize,
}

/// The task bytes queued, and the wait for room that the writer signals.
struct Room {
    /// Task bytes queued before a task that sends more waits.
    limit: usize,
    queued: AtomicUsize,
    /// The writer has ended (stdout closed): nothing waits for room any more.
    closed: AtomicBool,
    lock: Mutex<()>,
    freed: Condvar,
}

/// Stdout's turns: whoever writes to it holds `lock`.
struct Pen {
    lock: Mutex<()>,
    /// Sends not yet written by the writer thread.
    unwritten: AtomicUsize,
    /// Stdout, where the reading thread may test it for room and write to it itself.
    direct: Option<Box<dyn AsFd + Send + Sync>>,
}

/// The sending side, cloned by everything that writes to the worker.
#[derive(Clone)]
pub(crate) struct Outbox {
    tx: mpsc::Sender<Queued>,
    room: Arc<Room>,
    pen: Arc<Pen>,
}

/// The writer thread's side.
pub(crate) struct OutboxReader {
    rx: mpsc::Receiver<Queued>,
    room: Arc<Room>,
    pen: Arc<Pen>,
}

/// A queue whose tasks wait once `limit` of their bytes are queued. With `direct` (the
/// descriptor the writer's output writes to), the reading thread may write there itself.
pub(crate) fn outbox(
    limit: usize,
    direct: Option<Box<dyn AsFd + Send + Sync>>,
) -> (Outbox, OutboxReader) {
    let (tx, rx) = mpsc::channel();
    let room = Arc::new(Room {
        limit,
        queued: AtomicUsize::new(0),
        closed: AtomicBool::new(false),
        lock: Mutex::new(()),
        freed: Condvar::new(),
    });
    let pen = Arc::new(Pen {
        lock: Mutex::new(()),
        unwritten: AtomicUsize::new(0),
        direct,
    });
    let reader = OutboxReader {
        rx,
        room: room.clone(),
        pen: pen.clone(),
    };
    (Outbox { tx, room, pen }, reader)
}

impl Outbox {
    /// Queues a line that must not wait (the reading thread's answers, the backends' lines).
    /// False when the writer has ended: the worker is gone, and nobody is left to tell.
    pub(crate) fn send(&self, line: Vec<u8>) -> bool {
        self.queue(Queued { line, counted: 0 })
    }

    /// Writes what of `lines` (whole lines) stdout takes at once without blocking, when nothing
    /// is queued before them, and queues the rest as [`Outbox::send`] does.
    pub(crate) fn send_or_write(&self, mut lines: Vec<u8>) -> bool {
        let written = self.write_now(&lines);
        if written == lines.len() {
            return true;
        }
        lines.drain(..written);
        self.send(lines)
    }

    /// Queues a task's line, first waiting while the task bytes queued reach the limit. A line
    /// longer than the limit is still sent, once the queue is below it.
    pub(crate) fn send_from_task(&self, line: Vec<u8>) -> bool {
        let room = &*self.room;
        if room.queued.load(Ordering::Acquire) >= room.limit {
            let mut guard = room.lock.lock().unwrap_or_else(PoisonError::into_inner);
            while room.queued.load(Ordering::Acquire) >= room.limit
                && !room.closed.load(Ordering::Acquire)
            {
                guard = room
                    .freed
                    .wait(guard)
                    .unwrap_or_else(PoisonError::into_inner);
            }
        }
        let counted = line.len();
        room.queued.fetch_add(counted, Ordering::AcqRel);
        self.queue(Queued { line, counted })
    }

    fn queue(&self, queued: Queued) -> bool {
        self.pen.unwritten.fetch_add(1, Ordering::AcqRel);
        let sent = self.tx.send(queued).is_ok();
        if !sent {
            self.pen.unwritten.fetch_sub(1, Ordering::AcqRel);
        }
        sent
    }

    /// How many bytes of `lines` went straight to stdout: whole lines, in pieces of at most
    /// `PIPE_BUF` that `poll` found room for, and only while no write is under way and no
    /// earlier send is unwritten. A piece the kernel takes only in part (a signal, a full
    /// disk) is finished with blocking writes, so no line is ever left cut.
    fn write_now(&self, lines: &[u8]) -> usize {
        let Some(direct) = &self.pen.direct else {
            return 0;
        };
        let Ok(_turn) = self.pen.lock.try_lock() else {
            return 0;
        };
        if self.pen.unwritten.load(Ordering::Acquire) != 0 {
            return 0;
        }
        let fd = direct.as_fd();
        let mut done = 0;
        while done < lines.len() {
            let piece = whole_lines_within(&lines[done..], PIPE_BUF);
            if piece == 0 || !writable_now(fd) {
                break;
            }
            if write_all(fd, &lines[done..done + piece]).is_err() {
                // Stdout is gone; the writer thread finds out too, and lets waiting tasks go.
                return lines.len();
            }
            done += piece;
        }
        done
    }
}

/// The length of the longest run of whole lines at the start of `lines` within `limit` bytes
/// (0 when the first line is longer).
fn whole_lines_within(lines: &[u8], limit: usize) -> usize {
    let window = &lines[..lines.len().min(limit)];
    if window.len() == lines.len() && lines.last() == Some(&b'\n') {
        return lines.len();
    }
    window
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |end| end + 1)
}

/// Whether `poll` says `fd` takes a write now (for a pipe: at least `PIPE_BUF` bytes).
fn writable_now(fd: std::os::fd::BorrowedFd<'_>) -> bool {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let mut fds = [PollFd::new(fd, PollFlags::POLLOUT)];
    matches!(poll(&mut fds, PollTimeout::ZERO), Ok(1))
        && fds[0]
            .revents()
            .is_some_and(|r| r.contains(PollFlags::POLLOUT))
}

fn write_all(fd: std::os::fd::BorrowedFd<'_>, mut bytes: &[u8]) -> nix::Result<()> {
    while !bytes.is_empty() {
        match nix::unistd::write(fd, bytes) {
            Ok(n) => bytes = &bytes[n..],
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

impl OutboxReader {
    /// Writes queued lines until every sender is gone or `output` fails, flushing once per
    /// batch of whatever is ready, in stdout's turn.
    pub(crate) fn write_to<W: Write>(self, output: W) {
        let mut output = io::BufWriter::with_capacity(64 * 1024, output);
        while let Ok(first) = self.rx.recv() {
            let turn = self.pen.lock.lock().unwrap_or_else(PoisonError::into_inner);
            let (mut written, mut lines) = (0, 0);
            let mut next = Some(first);
            while let Some(q) = next {
                if output.write_all(&q.line).is_err() {
                    return self.close();
                }
                written += q.counted;
                lines += 1;
                next = self.rx.try_recv().ok();
            }
            if output.flush().is_err() {
                return self.close();
            }
            self.pen.unwritten.fetch_sub(lines, Ordering::AcqRel);
            drop(turn);
            self.freed(written);
        }
    }
    /// `n` task bytes left the queue: wakes the tasks waiting for room if it was full. (The
    /// lock is taken only then: a task that found the queue full checks it again under the
    /// lock before it waits, so this wake-up cannot fall between its check and its wait.)
    fn freed(&self, n: usize) {
        if n == 0 {
            return;
        }
        let room = &*self.room;
        let before = room.queued.fetch_sub(n, Ordering::AcqRel);
        if before >= room.limit {
            let _guard = room.lock.lock().unwrap_or_else(PoisonError::into_inner);
            room.freed.notify_all();
        }
    }

    /// Stdout is gone: no task waits for room that will never come.
    fn close(&self) {
        let room = &*self.room;
        room.closed.store(true, Ordering::Release);
        let _guard = room.lock.lock().unwrap_or_else(PoisonError::into_inner);
        room.freed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::thread;
    use std::time::Duration;

    /// Stdout that takes nothing until opened, then everything; or that fails.
    #[derive(Clone, Default)]
    struct Gate(Arc<(Mutex<GateState>, Condvar)>);

    #[derive(Default)]
    struct GateState {
        open: bool,
        broken: bool,
        written: Vec<u8>,
    }

    impl Gate {
        fn set(&self, change: impl FnOnce(&mut GateState)) {
            change(&mut self.0 .0.lock().unwrap());
            self.0 .1.notify_all();
        }

        fn written(&self) -> Vec<u8> {
            self.0 .0.lock().unwrap().written.clone()
        }
    }

    impl Write for Gate {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let (lock, cvar) = &*self.0;
            let mut state = lock.lock().unwrap();
            while !state.open && !state.broken {
                state = cvar.wait(state).unwrap();
            }
            if state.broken {
                return Err(io::ErrorKind::BrokenPipe.into());
            }
            state.written.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn line(tag: &str) -> Vec<u8> {
        format!("{tag:-<49}\n").into_bytes()
    }

    /// A task that sends `n` 50-byte lines, telling `sent` after each.
    fn streaming_task(out: &Outbox, n: usize) -> (thread::JoinHandle<()>, mpsc::Receiver<usize>) {
        let (out, (tx, rx)) = (out.clone(), mpsc::channel());
        let task = thread::spawn(move || {
            for i in 0..n {
                assert!(out.send_from_task(line(&format!("task {i}"))));
                let _ = tx.send(i + 1);
            }
        });
        (task, rx)
    }

    #[test]
    fn a_task_waits_once_its_bytes_fill_the_queue_and_the_reading_thread_never_does() {
        let (out, reader) = outbox(100, None);
        let gate = Gate::default();
        let writer = thread::spawn({
            let gate = gate.clone();
            move || reader.write_to(gate)
        });
        // The writer holds the first line in its stuck write; the second fills the queue.
        let (task, sent) = streaming_task(&out, 10);
        assert_eq!(sent.recv_timeout(Duration::from_secs(10)), Ok(1));
        assert_eq!(sent.recv_timeout(Duration::from_secs(10)), Ok(2));
        assert_eq!(
            sent.recv_timeout(Duration::from_millis(200)),
            Err(mpsc::RecvTimeoutError::Timeout),
            "the third line waits for room"
        );
        // The reading thread's answer goes in at once, full queue or not.
        assert!(out.send(line("ping answer")));
        gate.set(|g| g.open = true);
        task.join().unwrap();
        assert_eq!(sent.iter().last(), Some(10));
        drop(out);
        writer.join().unwrap();
        let written = String::from_utf8(gate.written()).unwrap();
        let lines: Vec<&str> = written.lines().map(|l| l.trim_end_matches('-')).collect();
        let tasks: Vec<&str> = lines
            .iter()
            .copied()
            .filter(|l| *l != "ping answer")
            .collect();
        let expected: Vec<String> = (0..10).map(|i| format!("task {i}")).collect();
        assert_eq!(tasks, expected, "every task line, in order");
        assert_eq!(lines.len(), 11, "and the answer: {lines:?}");
    }

    #[test]
    fn a_line_longer_than_the_limit_is_sent_once_the_queue_is_below_it() {
        let (out, reader) = outbox(10, None);
        let gate = Gate::default();
        gate.set(|g| g.open = true);
        let writer = thread::spawn({
            let gate = gate.clone();
            move || reader.write_to(gate)
        });
        for i in 0..20 {
            assert!(out.send_from_task(line(&format!("long {i}"))));
        }
        drop(out);
        writer.join().unwrap();
        assert_eq!(gate.written().len(), 20 * 50);
    }

    #[test]
    fn a_waiting_task_is_let_go_when_stdout_breaks() {
        let (out, reader) = outbox(100, None);
        let gate = Gate::default();
        let writer = thread::spawn({
            let gate = gate.clone();
            move || reader.write_to(gate)
        });
        let (task, sent) = streaming_task(&out, 2);
        assert_eq!(sent.recv_timeout(Duration::from_secs(10)), Ok(1));
        assert_eq!(sent.recv_timeout(Duration::from_secs(10)), Ok(2));
        task.join().unwrap();
        // The queue is full; a third line waits, until the worker is gone.
        let waiting = thread::spawn({
            let out = out.clone();
            move || out.send_from_task(line("late"))
        });
        gate.set(|g| g.broken = true);
        writer.join().unwrap();
        waiting.join().unwrap();
        assert!(!out.send_from_task(line("later")), "nobody is left to tell");
        assert!(!out.send(line("an answer")));
    }

    /// A pipe whose write end is the outbox's direct descriptor, and the writer's output.
    fn piped(limit: usize) -> (Outbox, OutboxReader, io::PipeReader, io::PipeWriter) {
        let (rx, tx) = io::pipe().unwrap();
        let (out, reader) = outbox(limit, Some(Box::new(tx.try_clone().unwrap())));
        (out, reader, rx, tx)
    }

    fn read_exactly(rx: &mut io::PipeReader, n: usize) -> String {
        let mut buf = vec![0; n];
        io::Read::read_exact(rx, &mut buf).unwrap();
        String::from_utf8(buf).unwrap()
    }

    #[test]
    fn the_reading_thread_writes_its_lines_itself_when_nothing_is_queued() {
        let (out, _reader, mut rx, _tx) = piped(100);
        // No writer thread runs: what arrives was written by this thread.
        let lines = [line("a"), line("b")].concat();
        assert!(out.send_or_write(lines.clone()));
        assert_eq!(read_exactly(&mut rx, 100).as_bytes(), lines);
        // More than PIPE_BUF goes out in whole lines, all of it while the pipe has room.
        let many: Vec<u8> = (0..200).flat_map(|i| line(&format!("n{i}"))).collect();
        assert!(out.send_or_write(many.clone()));
        assert_eq!(read_exactly(&mut rx, many.len()).as_bytes(), many);
    }

    #[test]
    fn a_line_queued_before_keeps_its_place() {
        let (out, reader, mut rx, tx) = piped(100);
        assert!(out.send_from_task(line("progress")));
        assert!(
            out.send_or_write(line("answer")),
            "queued behind it, not written"
        );
        let writer = thread::spawn(move || reader.write_to(tx));
        let written = read_exactly(&mut rx, 100);
        assert_eq!(
            written.as_bytes(),
            [line("progress"), line("answer")].concat()
        );
        drop(out);
        writer.join().unwrap();
    }

    #[test]
    fn a_full_stdout_never_blocks_the_reading_thread() {
        let (out, reader, mut rx, mut tx) = piped(100);
        // Fill the pipe (no reader yet) without blocking: the descriptor is made non-blocking
        // only here, while nothing else writes to it.
        use nix::fcntl::{fcntl, FcntlArg, OFlag};
        use std::os::fd::AsRawFd;
        let fd = tx.as_raw_fd();
        let flags = OFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFL).unwrap());
        fcntl(fd, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK)).unwrap();
        let filler = [b'.'; 1024];
        let mut filled = 0;
        while let Ok(n) = tx.write(&filler) {
            filled += n;
        }
        fcntl(fd, FcntlArg::F_SETFL(flags)).unwrap();
        // This returns (queued for the writer) rather than waiting for room.
        assert!(out.send_or_write(line("pong")));
        let writer = thread::spawn(move || reader.write_to(tx));
        let written = read_exactly(&mut rx, filled + 50);
        assert!(written.ends_with(&String::from_utf8(line("pong")).unwrap()));
        drop(out);
        writer.join().unwrap();
    }

    #[test]
    fn only_whole_lines_within_the_limit_go_at_once() {
        assert_eq!(whole_lines_within(b"ab\ncd\n", 10), 6);
        assert_eq!(whole_lines_within(b"ab\ncd\n", 5), 3);
        assert_eq!(whole_lines_within(b"abcdef\n", 5), 0, "a longer first line");
        assert_eq!(whole_lines_within(b"ab\ncd", 10), 3, "never a cut line");
        assert_eq!(whole_lines_within(b"", 10), 0);
    }
}
