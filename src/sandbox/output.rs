//! Capped capture of a command's output: the first `limit` bytes are kept, the rest only counted,
//! so a command that prints gigabytes costs the server `limit` bytes of memory.

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
