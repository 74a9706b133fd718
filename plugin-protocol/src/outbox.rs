//! The SDK's outgoing queue: every line a plugin sends goes to one writer thread, which writes
//! what is ready in one piece.
//!
//! What tasks send (progress, stream items, logs, their answers) is bounded: a task waits while
//! [`TASK_BYTES`] are queued, so a task that streams faster than the worker reads is held back
//! rather than buffered in the plugin's memory without end (the worker stops reading a
//! plugin's stdout while a task's caller is slow). What the reading thread sends itself
//! (answers to pings and refusals) and the backends' lines never wait: the reading thread must
//! keep reading the worker's requests, and its answers are a line each. Those lines still
//! queue behind at most [`TASK_BYTES`] of the tasks', so a ping's answer is never stuck behind
//! gigabytes.

use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex, PoisonError};

/// Bytes of task output queued before a task that sends more waits for the writer.
pub(crate) const TASK_BYTES: usize = 1 << 20;

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

/// The sending side, cloned by everything that writes to the worker.
#[derive(Clone)]
pub(crate) struct Outbox {
    tx: mpsc::Sender<Queued>,
    room: Arc<Room>,
}

/// The writer thread's side.
pub(crate) struct OutboxReader {
    rx: mpsc::Receiver<Queued>,
    room: Arc<Room>,
}

/// A queue whose tasks wait once `limit` of their bytes are queued.
pub(crate) fn outbox(limit: usize) -> (Outbox, OutboxReader) {
    let (tx, rx) = mpsc::channel();
    let room = Arc::new(Room {
        limit,
        queued: AtomicUsize::new(0),
        closed: AtomicBool::new(false),
        lock: Mutex::new(()),
        freed: Condvar::new(),
    });
    let reader = OutboxReader {
        rx,
        room: room.clone(),
    };
    (Outbox { tx, room }, reader)
}

impl Outbox {
    /// Queues a line that must not wait (the reading thread's answers, the backends' lines).
    /// False when the writer has ended: the worker is gone, and nobody is left to tell.
    pub(crate) fn send(&self, line: Vec<u8>) -> bool {
        self.tx.send(Queued { line, counted: 0 }).is_ok()
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
        self.tx.send(Queued { line, counted }).is_ok()
    }
}

impl OutboxReader {
    /// Writes queued lines until every sender is gone or `output` fails, flushing once per
    /// batch of whatever is ready.
    pub(crate) fn write_to<W: Write>(self, output: W) {
        let mut output = io::BufWriter::with_capacity(64 * 1024, output);
        while let Ok(first) = self.rx.recv() {
            let mut written = 0;
            let mut next = Some(first);
            while let Some(q) = next {
                if output.write_all(&q.line).is_err() {
                    return self.close();
                }
                written += q.counted;
                next = self.rx.try_recv().ok();
            }
            if output.flush().is_err() {
                return self.close();
            }
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
        let (out, reader) = outbox(100);
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
        let (out, reader) = outbox(10);
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
        let (out, reader) = outbox(100);
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
}
