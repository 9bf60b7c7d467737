//! UTF-8-safe incremental detokenization.
//!
//! A token's bytes may end in the middle of a multi-byte character (byte-fallback vocabularies split
//! emoji and CJK characters across tokens). [`Utf8Decoder`] emits only whole characters and holds an
//! incomplete tail until the next token completes it; bytes that can never become valid UTF-8 are
//! replaced with U+FFFD instead of being dropped or passed through broken.

/// Turns a stream of byte pieces into a stream of whole-character text chunks.
#[derive(Debug, Default)]
pub struct Utf8Decoder {
    pending: Vec<u8>,
}

impl Utf8Decoder {
    /// Appends `bytes` and returns every complete character now available.
    pub fn push(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        let mut out = String::new();
        loop {
            match std::str::from_utf8(&self.pending) {
                Ok(text) => {
                    out.push_str(text);
                    self.pending.clear();
                    return out;
                }
                Err(err) => {
                    let valid = err.valid_up_to();
                    // SAFETY-free: `valid_up_to` guarantees this prefix is valid UTF-8.
                    out.push_str(std::str::from_utf8(&self.pending[..valid]).unwrap_or_default());
                    match err.error_len() {
                        // An incomplete sequence at the end: wait for the next piece.
                        None => {
                            self.pending.drain(..valid);
                            return out;
                        }
                        // Bytes that no continuation can fix.
                        Some(bad) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            self.pending.drain(..valid + bad);
                        }
                    }
                }
            }
        }
    }

    /// Ends the stream: an incomplete tail becomes U+FFFD.
    pub fn flush(&mut self) -> String {
        let out = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ascii_passes_through() {
        let mut d = Utf8Decoder::default();
        assert_eq!(d.push(b"hello"), "hello");
        assert_eq!(d.flush(), "");
    }

    #[test]
    fn a_character_split_across_pieces_is_held_until_complete() {
        let emoji = "🦀".as_bytes(); // 4 bytes
        let mut d = Utf8Decoder::default();
        assert_eq!(d.push(&emoji[..1]), "");
        assert_eq!(d.push(&emoji[1..3]), "");
        assert_eq!(d.push(&[emoji[3], b'!']), "🦀!");
    }

    #[test]
    fn every_split_point_of_mixed_text_reassembles_exactly() {
        let text = "aé中🦀z";
        let bytes = text.as_bytes();
        for cut in 0..=bytes.len() {
            let mut d = Utf8Decoder::default();
            let mut out = d.push(&bytes[..cut]);
            // Nothing emitted is ever a broken character.
            assert!(!out.contains(char::REPLACEMENT_CHARACTER));
            out += &d.push(&bytes[cut..]);
            out += &d.flush();
            assert_eq!(out, text, "cut at {cut}");
        }
    }

    #[test]
    fn invalid_bytes_become_replacement_characters() {
        let mut d = Utf8Decoder::default();
        assert_eq!(d.push(&[b'a', 0xFF, b'b']), "a\u{FFFD}b");
    }

    #[test]
    fn an_unfinished_tail_is_replaced_on_flush() {
        let mut d = Utf8Decoder::default();
        assert_eq!(d.push(&"é".as_bytes()[..1]), "");
        assert_eq!(d.flush(), "\u{FFFD}");
    }
}
