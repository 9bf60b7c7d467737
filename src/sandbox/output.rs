//! Capped capture of a command's output: the first `limit` bytes are kept, the rest only counted,
//! so a command that prints gigabytes costs the server `limit` bytes of memory.

/// Output as it comes, for a client that shows a running command's progress: the newest bytes
/// since the last look (at most [`LIVE_LIMIT`]; older ones are dropped), and how many came in all.
#[derive(Debug, Default)]
pub struct LiveOutput {
    // A std Mutex: held only to append or take a few KiB, never across an await.
    inner: std::sync::Mutex<(Vec<u8>, u64)>,
}

/// Bytes [`LiveOutput`] holds between two looks.
pub const LIVE_LIMIT: usize = 4096;

impl LiveOutput {
    pub fn push(&self, data: &[u8]) {
        let mut inner = self.inner.lock().expect("live output");
        let (pending, total) = &mut *inner;
        *total += data.len() as u64;
        pending.extend_from_slice(data);
        if pending.len() > LIVE_LIMIT {
            let excess = pending.len() - LIVE_LIMIT;
            pending.drain(..excess);
        }
    }

    /// The output since the last call (as text; a character cut at the edge is replaced), and
    /// the bytes written in all.
    pub fn take(&self) -> (String, u64) {
        let mut inner = self.inner.lock().expect("live output");
        let (pending, total) = &mut *inner;
        let text = String::from_utf8_lossy(pending).into_owned();
        pending.clear();
        (text, *total)
    }
}

/// One output stream (stdout or stderr) being captured.
#[derive(Debug)]
pub struct CappedBuffer {
    kept: Vec<u8>,
    limit: usize,
    total: u64,
}

impl CappedBuffer {
    pub fn new(limit: usize) -> Self {
        Self {
            // Grows with the output, up to `limit`; most commands print little.
            kept: Vec::new(),
            limit,
            total: 0,
        }
    }

    pub fn push(&mut self, data: &[u8]) {
        self.total += data.len() as u64;
        let room = self.limit.saturating_sub(self.kept.len());
        self.kept.extend_from_slice(&data[..data.len().min(room)]);
    }

    /// Bytes the command wrote, kept or not.
    pub fn total(&self) -> u64 {
        self.total
    }

    pub fn truncated(&self) -> bool {
        self.total > self.kept.len() as u64
    }

    /// The kept text (invalid UTF-8 replaced by U+FFFD; a character cut at the limit dropped),
    /// ending with a visible marker when bytes were dropped.
    pub fn into_text(self) -> String {
        let truncated = self.truncated();
        let mut kept = self.kept;
        if truncated {
            // Do not end on half a character: the cut is ours, not the command's.
            if let Err(e) = std::str::from_utf8(&kept) {
                if e.error_len().is_none() {
                    kept.truncate(e.valid_up_to());
                }
            }
        }
        let mut text = String::from_utf8_lossy(&kept).into_owned();
        if truncated {
            let omitted = self.total - kept.len() as u64;
            if !text.is_empty() && !text.ends_with('\n') {
                text.push('\n');
            }
            text.push_str(&format!(
                "[lm-sandbox: output truncated: {omitted} of {} bytes omitted]\n",
                self.total
            ));
        }
        text
    }
}

#[cfg(test)]
mod tests {
    use super::CappedBuffer;

    #[test]
    fn short_output_is_kept_whole() {
        let mut b = CappedBuffer::new(16);
        b.push(b"hello ");
        b.push(b"world");
        assert!(!b.truncated());
        assert_eq!(b.total(), 11);
        assert_eq!(b.into_text(), "hello world");
    }

    #[test]
    fn long_output_keeps_the_head_and_says_so() {
        let mut b = CappedBuffer::new(8);
        for _ in 0..1000 {
            b.push(b"0123456789");
        }
        assert!(b.truncated());
        assert_eq!(b.total(), 10_000);
        assert!(b.kept.capacity() <= 64, "memory stays near the limit");
        assert_eq!(
            b.into_text(),
            "01234567\n[lm-sandbox: output truncated: 9992 of 10000 bytes omitted]\n"
        );
    }

    #[test]
    fn output_exactly_at_the_limit_is_not_truncated() {
        let mut b = CappedBuffer::new(4);
        b.push(b"abcd");
        assert!(!b.truncated());
        assert_eq!(b.into_text(), "abcd");
    }

    #[test]
    fn a_character_cut_by_the_limit_is_dropped_not_mangled() {
        let mut b = CappedBuffer::new(5);
        b.push("abcé€".as_bytes()); // é is 2 bytes, so the limit cuts into €
        let text = b.into_text();
        assert!(
            text.starts_with("abcé\n[lm-sandbox: output truncated"),
            "{text}"
        );
    }

    #[test]
    fn invalid_utf8_from_the_command_is_replaced() {
        let mut b = CappedBuffer::new(16);
        b.push(&[b'a', 0xff, b'b']);
        assert_eq!(b.into_text(), "a\u{fffd}b");
    }
}

#[cfg(test)]
mod live_tests {
    use super::*;

    #[test]
    fn live_output_keeps_the_newest_bytes_between_looks() {
        let live = LiveOutput::default();
        live.push(b"one\n");
        live.push(b"two\n");
        assert_eq!(live.take(), ("one\ntwo\n".to_owned(), 8));
        assert_eq!(live.take(), (String::new(), 8));
        live.push(&vec![b'x'; LIVE_LIMIT + 10]);
        let (text, total) = live.take();
        assert_eq!(
            (text.len(), total),
            (LIVE_LIMIT, 8 + LIVE_LIMIT as u64 + 10)
        );
    }
}
