//! OpenAI leaves the matched stop sequence out of its output (TGI keeps it).
//! [`StopTrimmer`] holds back streamed text that might be the start of a stop
//! sequence until more text proves otherwise, and cuts the match at the end.

use crate::infer::FinishReason;

/// Streaming hold-back for one sequence.
#[derive(Debug, Clone)]
pub struct StopTrimmer {
    stops: Vec<String>,
    /// Text received but not released yet.
    pending: String,
}

impl StopTrimmer {
    pub fn new(stops: &[String]) -> Self {
        Self {
            stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(),
            pending: String::new(),
        }
    }

    /// Adds a token's text and returns what can be sent now: everything
    /// except the longest tail that is the beginning of a stop sequence.
    pub fn push(&mut self, text: &str) -> String {
        self.pending.push_str(text);
        let keep = self.held_tail_len();
        let split = self.pending.len() - keep;
        let rest = self.pending.split_off(split);
        std::mem::replace(&mut self.pending, rest)
    }

    /// Adds the last token's text and returns the rest of the output: when
    /// the generation ended on a stop sequence, cut right before it.
    pub fn finish(&mut self, last_text: &str, finish_reason: FinishReason) -> String {
        let held = self.pending.len();
        self.pending.push_str(last_text);
        let mut text = std::mem::take(&mut self.pending);
        if finish_reason == FinishReason::StopSequence {
            if let Some(cut) = earliest_stop_ending_after(&text, &self.stops, held) {
                text.truncate(cut);
            }
        }
        text
    }

    /// Bytes at the end of `pending` that could start a stop sequence.
    fn held_tail_len(&self) -> usize {
        let text = &self.pending;
        let mut longest = 0;
        for stop in &self.stops {
            // Proper prefixes of `stop` that `text` ends with, longest first.
            for (len, _) in stop.char_indices().rev() {
                if len <= longest {
                    break;
                }
                if len > 0 && text.ends_with(&stop[..len]) {
                    longest = len;
                    break;
                }
            }
        }
        longest
    }
}

/// Start of the earliest stop sequence in `text` that ends after byte `after`
/// (a match ending earlier would have stopped generation before).
fn earliest_stop_ending_after(text: &str, stops: &[String], after: usize) -> Option<usize> {
    stops
        .iter()
        .filter_map(|stop| {
            text.match_indices(stop.as_str())
                .map(|(pos, _)| pos)
                .find(|&pos| pos + stop.len() > after)
        })
        .min()
}

/// Non-streaming: the generated text without the stop sequence that ended it.
pub fn trim_stop_sequence(text: &str, stops: &[String], finish_reason: FinishReason) -> String {
    let mut trimmer = StopTrimmer::new(stops);
    trimmer.finish(text, finish_reason)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stops(s: &[&str]) -> Vec<String> {
        s.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn releases_text_that_cannot_start_a_stop() {
        let mut t = StopTrimmer::new(&stops(&["###"]));
        assert_eq!(t.push("Hello"), "Hello");
        assert_eq!(t.push(" wor#"), " wor");
        assert_eq!(t.push("#"), "");
        assert_eq!(t.push("x"), "##x");
        assert_eq!(t.finish("!", FinishReason::Length), "!");
    }

    #[test]
    fn trims_the_match_at_the_end() {
        let mut t = StopTrimmer::new(&stops(&["\nUser:"]));
        assert_eq!(t.push("Sure."), "Sure.");
        assert_eq!(t.push("\nUs"), "");
        assert_eq!(t.finish("er:", FinishReason::StopSequence), "");
        let mut t = StopTrimmer::new(&stops(&["END"]));
        assert_eq!(t.push("a"), "a");
        assert_eq!(t.finish("bENDc", FinishReason::StopSequence), "b");
    }

    #[test]
    fn keeps_text_when_not_stopped_by_a_sequence() {
        let mut t = StopTrimmer::new(&stops(&["##"]));
        assert_eq!(t.push("a#"), "a");
        assert_eq!(t.finish("", FinishReason::EosToken), "#");
        assert_eq!(
            trim_stop_sequence("a##", &stops(&["##"]), FinishReason::Length),
            "a##"
        );
    }

    #[test]
    fn holds_the_longest_candidate_of_several_stops() {
        let mut t = StopTrimmer::new(&stops(&["ab", "xyz"]));
        assert_eq!(t.push("1xy"), "1");
        assert_eq!(t.push("a"), "xy");
        assert_eq!(t.finish("b", FinishReason::StopSequence), "");
    }

    #[test]
    fn respects_char_boundaries() {
        let mut t = StopTrimmer::new(&stops(&["é!"]));
        assert_eq!(t.push("café"), "caf");
        assert_eq!(t.push("s"), "és");
        assert_eq!(t.finish("é!", FinishReason::StopSequence), "");
    }

    #[test]
    fn no_stops_releases_everything() {
        let mut t = StopTrimmer::new(&[]);
        assert_eq!(t.push("abc"), "abc");
        assert_eq!(t.finish("d", FinishReason::StopSequence), "d");
    }

    #[test]
    fn non_streaming_trim() {
        assert_eq!(
            trim_stop_sequence(
                "The answer.\n\nQ:",
                &stops(&["Q:", "\n\n"]),
                FinishReason::StopSequence
            ),
            "The answer."
        );
    }
}
