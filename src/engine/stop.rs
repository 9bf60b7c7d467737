//! Stop-string matching over streamed text.
//!
//! Text arrives a token at a time, and a stop string may span several tokens. [`StopMatcher`] holds
//! back the longest tail that could still grow into a stop string, so a partial match never leaks
//! into a streamed delta, and the stop string itself is never emitted (OpenAI's behaviour).

/// What pushing a chunk of text produced.
#[derive(Debug, PartialEq, Eq)]
pub struct StopOutcome {
    /// Text that is safe to emit now.
    pub emit: String,
    /// A stop string matched; generation ends and `emit` is the last text.
    pub stopped: bool,
}

/// Matches any of a set of stop strings across chunk boundaries.
#[derive(Debug, Default)]
pub struct StopMatcher {
    /// The stop strings with their positions in the request's list.
    stops: Vec<(usize, String)>,
    held: String,
    /// The position of the stop string that matched.
    matched: Option<usize>,
}

impl StopMatcher {
    /// `stops` may be empty; empty strings are ignored.
    pub fn new(stops: Vec<String>) -> Self {
        let stops = stops
            .into_iter()
            .enumerate()
            .filter(|(_, s)| !s.is_empty())
            .collect();
        Self {
            stops,
            held: String::new(),
            matched: None,
        }
    }

    /// Which of the request's stop strings (its position in the list) ended the text, once one has.
    pub fn matched(&self) -> Option<usize> {
        self.matched
    }

    /// Adds `text` and returns what can be emitted.
    pub fn push(&mut self, text: &str) -> StopOutcome {
        if self.stops.is_empty() {
            return StopOutcome {
                emit: text.to_owned(),
                stopped: false,
            };
        }
        self.held.push_str(text);
        if let Some((at, which)) = self
            .stops
            .iter()
            .filter_map(|(which, stop)| self.held.find(stop.as_str()).map(|at| (at, *which)))
            .min()
        {
            self.matched = Some(which);
            let emit = self.held[..at].to_owned();
            self.held.clear();
            return StopOutcome {
                emit,
                stopped: true,
            };
        }
        let keep = self.partial_match_len();
        let split = self.held.len() - keep;
        let emit = self.held[..split].to_owned();
        self.held.drain(..split);
        StopOutcome {
            emit,
            stopped: false,
        }
    }

    /// Ends the stream without a match: whatever was held back is ordinary text.
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.held)
    }

    /// Length of the longest suffix of `held` that is a proper prefix of some stop string.
    fn partial_match_len(&self) -> usize {
        let held = self.held.as_str();
        let longest = self.stops.iter().map(|(_, s)| s.len()).max().unwrap_or(0);
        (1..longest.min(held.len() + 1))
            .rev()
            .find(|&k| {
                let start = held.len() - k;
                held.is_char_boundary(start)
                    && self
                        .stops
                        .iter()
                        .any(|(_, s)| s.starts_with(&held[start..]))
            })
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], chunks: &[&str]) -> (String, bool) {
        let mut m = StopMatcher::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = String::new();
        for chunk in chunks {
            let o = m.push(chunk);
            out += &o.emit;
            if o.stopped {
                return (out, true);
            }
        }
        out += &m.flush();
        (out, false)
    }

    #[test]
    fn no_stops_is_a_passthrough() {
        assert_eq!(run(&[], &["a", "b"]), ("ab".into(), false));
    }

    #[test]
    fn a_stop_within_one_chunk_cuts_before_it() {
        assert_eq!(run(&["END"], &["abcENDdef"]), ("abc".into(), true));
    }

    #[test]
    fn a_stop_spanning_chunks_is_matched_and_never_leaked() {
        let mut m = StopMatcher::new(vec!["</s>".into()]);
        assert_eq!(m.push("hi <").emit, "hi ");
        assert_eq!(m.push("/").emit, "");
        let o = m.push("s> tail");
        assert_eq!(
            o,
            StopOutcome {
                emit: String::new(),
                stopped: true
            }
        );
    }

    #[test]
    fn the_stop_that_matched_first_in_the_text_is_named_by_its_position() {
        let mut m = StopMatcher::new(vec!["".into(), "zzz".into(), "END".into(), "D".into()]);
        assert!(m.push("abcEND").stopped);
        // "END" starts before "D": the earliest match in the text wins.
        assert_eq!(m.matched(), Some(2));
    }

    #[test]
    fn a_false_partial_match_is_released() {
        assert_eq!(run(&["STOP"], &["ST", "ART"]), ("START".into(), false));
        let mut m = StopMatcher::new(vec!["STOP".into()]);
        assert_eq!(m.push("ST").emit, "");
        assert_eq!(m.push("AR").emit, "STAR");
    }

    #[test]
    fn the_earliest_of_several_stops_wins() {
        assert_eq!(run(&["c", "ab"], &["xabc"]), ("x".into(), true));
    }

    #[test]
    fn held_text_is_released_on_flush() {
        assert_eq!(run(&["abc"], &["xx", "ab"]), ("xxab".into(), false));
    }

    #[test]
    fn multibyte_stops_hold_on_char_boundaries() {
        assert_eq!(run(&["é!"], &["caf", "é", "!", "x"]), ("caf".into(), true));
        assert_eq!(run(&["éé"], &["aé", "b"]), ("aéb".into(), false));
    }
}
