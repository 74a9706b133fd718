//! The lines waiting for a plugin's stdin, written by its instance itself whenever the pipe
//! takes them (no writer task in between: one hop less per task). Lines that are ready
//! together go out in one `write`. The queue holds `capacity` lines: the worker sends at most
//! one request per in-flight task plus a few control messages, so a full queue means the plugin
//! stopped reading its stdin (its instance then ends as a protocol violation instead of
//! buffering without bound).

/// Lines waiting to be written, at least (more for high concurrency).
pub(super) const STDIN_LINES: usize = 256;

#[derive(Debug, Default)]
pub(super) struct StdinQueue {
    /// Bytes not yet written, whole lines but for a partly written first one.
    buf: Vec<u8>,
    /// Lines (ends) in `buf`.
    lines: usize,
    capacity: usize,
}

impl StdinQueue {
    pub fn new(capacity: usize) -> StdinQueue {
        StdinQueue {
            buf: Vec::new(),
            lines: 0,
            capacity,
        }
    }

    /// Queues `line` (newline-terminated); false when `capacity` lines already wait.
    pub fn push(&mut self, line: &[u8]) -> bool {
        if self.lines >= self.capacity {
            return false;
        }
        self.buf.extend_from_slice(line);
        self.lines += 1;
        true
    }

    /// Queues the line `write` appends (newline-terminated) straight into the queue's buffer,
    /// with no line of its own in between; false when `capacity` lines already wait.
    pub fn push_with(&mut self, write: impl FnOnce(&mut Vec<u8>)) -> bool {
        if self.lines >= self.capacity {
            return false;
        }
        write(&mut self.buf);
        self.lines += 1;
        true
    }

    /// Events never take the last quarter of the queue: requests need it.
    pub fn has_room_for_event(&self) -> bool {
        self.lines < self.capacity - self.capacity / 4
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// What is to be written next.
    pub fn pending(&self) -> &[u8] {
        &self.buf
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// `n` bytes of [`pending`](Self::pending) were written.
    pub fn written(&mut self, n: usize) {
        if n == self.buf.len() {
            // Nearly always: the pipe took it all (nothing to count).
            return self.discard();
        }
        let ends = self.buf[..n].iter().filter(|&&b| b == b'\n').count();
        self.lines -= ends;
        self.buf.drain(..n);
    }

    /// The pipe is gone: nothing waiting will ever be read.
    pub fn discard(&mut self) {
        self.buf.clear();
        self.lines = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_wait_until_written_and_a_full_queue_refuses_more() {
        let mut q = StdinQueue::new(4);
        assert!(q.is_empty());
        assert!(q.push(b"one\n") && q.push(b"two\n") && q.push(b"three\n"));
        assert!(
            !q.has_room_for_event(),
            "3 of 4: the last quarter is for requests"
        );
        assert!(q.push(b"four\n"));
        assert!(!q.push(b"five\n"), "four lines wait");
        assert_eq!(q.pending(), b"one\ntwo\nthree\nfour\n");
        q.written(6); // "one\nty"
        assert_eq!(q.pending(), b"o\nthree\nfour\n");
        assert!(q.push(b"five\n"), "one line went out");
        assert!(!q.push(b"six\n"));
        q.written(q.pending().len());
        assert!(q.is_empty() && q.has_room_for_event());
        assert!(q.push(b"seven\n"));
        assert!(q.push_with(|buf| buf.extend_from_slice(b"eight\n")));
        assert_eq!(q.pending(), b"seven\neight\n");
        q.discard();
        assert!(q.is_empty());
        assert_eq!(q.capacity(), 4);
    }
}
