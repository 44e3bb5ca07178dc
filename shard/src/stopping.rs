//! Stop criteria of one sequence: token budget, EOS tokens and stop
//! sequences matched on the decoded text, across token boundaries.

use serde::{Deserialize, Serialize};

/// Why a sequence finished (TGI's names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// `max_new_tokens` tokens were generated.
    Length,
    /// An end-of-sequence token was generated.
    EosToken,
    /// The generated text produced one of the stop sequences.
    StopSequence,
}

impl FinishReason {
    /// `"length"`, `"eos_token"` or `"stop_sequence"`.
    pub fn as_str(&self) -> &'static str {
        match self {
            FinishReason::Length => "length",
            FinishReason::EosToken => "eos_token",
            FinishReason::StopSequence => "stop_sequence",
        }
    }
}

impl std::fmt::Display for FinishReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// When to stop one sequence.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct StoppingCriteria {
    /// Stop after this many generated tokens (`0` stops after the first).
    pub max_new_tokens: u32,
    /// Tokens that end the sequence (unless `ignore_eos`).
    pub eos_token_ids: Vec<u32>,
    /// Strings that end the sequence when they appear in the generated text.
    /// Empty strings are ignored.
    pub stop_sequences: Vec<String>,
    /// Keep generating through EOS tokens (benchmarks).
    pub ignore_eos: bool,
    /// EOS tokens and stop sequences do not end the sequence before this many
    /// generated tokens (the engine also keeps EOS from being sampled until then).
    #[serde(default)]
    pub min_new_tokens: u32,
}

/// Tracks one sequence's generated tokens and text against its criteria.
///
/// When several criteria are met by the same token, the reason reported is
/// the first of: EOS token, stop sequence, length.
#[derive(Debug, Clone)]
pub struct StopChecker {
    criteria: StoppingCriteria,
    /// Longest stop sequence, in bytes.
    max_stop_len: usize,
    tokens: u32,
    /// Everything pushed so far.
    text: String,
    /// Byte offset in `text` where the matched stop sequence starts.
    stop_at: Option<usize>,
    /// Index into `criteria.stop_sequences` of the matched one.
    matched: Option<usize>,
    finished: Option<FinishReason>,
}

impl StopChecker {
    pub fn new(mut criteria: StoppingCriteria) -> StopChecker {
        criteria.stop_sequences.retain(|s| !s.is_empty());
        let max_stop_len = criteria
            .stop_sequences
            .iter()
            .map(String::len)
            .max()
            .unwrap_or(0);
        StopChecker {
            criteria,
            max_stop_len,
            tokens: 0,
            text: String::new(),
            stop_at: None,
            matched: None,
            finished: None,
        }
    }

    pub fn criteria(&self) -> &StoppingCriteria {
        &self.criteria
    }

    /// Feeds one generated token and the text it added (possibly empty, e.g.
    /// while a multi-byte character is incomplete, or for a skipped special
    /// token). Returns the reason when generation must stop after this token.
    ///
    /// Once finished, further calls change nothing and return the same reason.
    pub fn push(&mut self, token_id: u32, new_text: &str) -> Option<FinishReason> {
        if self.finished.is_some() {
            return self.finished;
        }
        self.tokens = self.tokens.saturating_add(1);
        let old_len = self.text.len();
        self.text.push_str(new_text);

        let early = self.tokens < self.criteria.min_new_tokens;
        let reason = if !early
            && !self.criteria.ignore_eos
            && self.criteria.eos_token_ids.contains(&token_id)
        {
            Some(FinishReason::EosToken)
        } else if !early && !new_text.is_empty() && self.find_stop(old_len) {
            Some(FinishReason::StopSequence)
        } else if self.tokens >= self.criteria.max_new_tokens {
            Some(FinishReason::Length)
        } else {
            None
        };
        self.finished = reason;
        reason
    }

    /// Looks for a stop sequence that ends inside the text added after
    /// `old_len`. Only a tail of `max_stop_len - 1` bytes before the new text
    /// is searched, so the cost per token is bounded by the longest stop
    /// sequence and the token's own text, not by the generation length.
    /// Picks the match that starts first (then the longest).
    fn find_stop(&mut self, old_len: usize) -> bool {
        if self.max_stop_len == 0 {
            return false;
        }
        let mut start = old_len.saturating_sub(self.max_stop_len - 1);
        while !self.text.is_char_boundary(start) {
            start -= 1;
        }
        let window = &self.text[start..];
        let mut best: Option<(usize, usize, usize)> = None; // (pos, len, index)
        for (idx, stop) in self.criteria.stop_sequences.iter().enumerate() {
            // A match ending before the new text would have stopped an
            // earlier push, so only matches reaching into it count.
            let found = window
                .match_indices(stop.as_str())
                .map(|(p, _)| start + p)
                .find(|&p| p + stop.len() > old_len);
            if let Some(pos) = found {
                let better = match best {
                    None => true,
                    Some((bpos, blen, _)) => pos < bpos || (pos == bpos && stop.len() > blen),
                };
                if better {
                    best = Some((pos, stop.len(), idx));
                }
            }
        }
        match best {
            Some((pos, _, idx)) => {
                self.stop_at = Some(pos);
                self.matched = Some(idx);
                true
            }
            None => false,
        }
    }

    /// The generated text: everything pushed, except that after a
    /// [`FinishReason::StopSequence`] it ends right before the stop sequence
    /// (which is left out, as OpenAI and vLLM do). After an EOS token it
    /// includes whatever text that token was pushed with.
    pub fn generated_text(&self) -> &str {
        match self.stop_at {
            Some(pos) => self.text.get(..pos).unwrap_or(&self.text),
            None => &self.text,
        }
    }

    /// Everything pushed so far, stop sequence (and anything after it in the
    /// same token) included.
    pub fn full_text(&self) -> &str {
        &self.text
    }

    /// The stop sequence that ended the generation, if one did.
    pub fn matched_stop_sequence(&self) -> Option<&str> {
        self.matched
            .and_then(|i| self.criteria.stop_sequences.get(i))
            .map(String::as_str)
    }

    /// Number of tokens pushed.
    pub fn generated_tokens(&self) -> u32 {
        self.tokens
    }

    /// The finish reason, once finished.
    pub fn finish_reason(&self) -> Option<FinishReason> {
        self.finished
    }

    /// Length in bytes of the prefix of [`StopChecker::generated_text`] that
    /// can safely be streamed: text that could still turn out to be the
    /// start of a stop sequence is held back (the longest suffix of the text
    /// that is a proper prefix of some stop sequence). After finishing, all
    /// of `generated_text()` is stable.
    pub fn stable_len(&self) -> usize {
        if self.finished.is_some() {
            return self.generated_text().len();
        }
        let text = self.text.as_str();
        let mut held = 0;
        for stop in &self.criteria.stop_sequences {
            // Proper prefixes of `stop`, longest first, that end the text.
            let limit = (stop.len() - 1).min(text.len());
            for len in (held + 1..=limit).rev() {
                if stop.is_char_boundary(len) && text.ends_with(&stop[..len]) {
                    held = len;
                    break;
                }
            }
        }
        text.len() - held
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checker(max: u32, eos: &[u32], stops: &[&str]) -> StopChecker {
        StopChecker::new(StoppingCriteria {
            max_new_tokens: max,
            eos_token_ids: eos.to_vec(),
            stop_sequences: stops.iter().map(|s| s.to_string()).collect(),
            ignore_eos: false,
            min_new_tokens: 0,
        })
    }

    #[test]
    fn min_new_tokens_defers_eos_and_stop_sequences() {
        let mut c = StopChecker::new(StoppingCriteria {
            max_new_tokens: 10,
            eos_token_ids: vec![2],
            stop_sequences: vec!["x".into()],
            ignore_eos: false,
            min_new_tokens: 3,
        });
        assert_eq!(c.push(2, ""), None);
        assert_eq!(c.push(5, "x"), None);
        assert_eq!(c.push(2, ""), Some(FinishReason::EosToken));
        let mut c = StopChecker::new(StoppingCriteria {
            max_new_tokens: 10,
            eos_token_ids: vec![],
            stop_sequences: vec!["y".into()],
            ignore_eos: false,
            min_new_tokens: 1,
        });
        assert_eq!(c.push(5, "y"), Some(FinishReason::StopSequence));
    }

    #[test]
    fn finish_reason_names() {
        assert_eq!(FinishReason::Length.as_str(), "length");
        assert_eq!(FinishReason::EosToken.as_str(), "eos_token");
        assert_eq!(FinishReason::StopSequence.as_str(), "stop_sequence");
        for r in [
            FinishReason::Length,
            FinishReason::EosToken,
            FinishReason::StopSequence,
        ] {
            let json = serde_json::to_string(&r).unwrap();
            assert_eq!(json, format!("\"{}\"", r.as_str()));
            assert_eq!(serde_json::from_str::<FinishReason>(&json).unwrap(), r);
            assert_eq!(r.to_string(), r.as_str());
        }
    }

    #[test]
    fn length_counts_tokens_not_text() {
        let mut c = checker(3, &[], &[]);
        assert_eq!(c.push(10, "a"), None);
        assert_eq!(c.push(11, ""), None); // incomplete character: still a token
        assert_eq!(c.push(12, "bc"), Some(FinishReason::Length));
        assert_eq!(c.generated_text(), "abc");
        assert_eq!(c.generated_tokens(), 3);
        // Finished: further pushes change nothing.
        assert_eq!(c.push(13, "zzz"), Some(FinishReason::Length));
        assert_eq!(c.generated_text(), "abc");
        assert_eq!(c.generated_tokens(), 3);
        // max_new_tokens 0 or 1 stops after the first token.
        assert_eq!(
            checker(0, &[], &[]).push(1, "x"),
            Some(FinishReason::Length)
        );
        assert_eq!(
            checker(1, &[], &[]).push(1, "x"),
            Some(FinishReason::Length)
        );
    }

    #[test]
    fn eos_stops_unless_ignored() {
        let mut c = checker(10, &[2, 7], &[]);
        assert_eq!(c.push(5, "hi"), None);
        assert_eq!(c.push(7, ""), Some(FinishReason::EosToken));
        assert_eq!(c.finish_reason(), Some(FinishReason::EosToken));
        assert_eq!(c.generated_text(), "hi");

        let mut c = StopChecker::new(StoppingCriteria {
            max_new_tokens: 3,
            eos_token_ids: vec![2],
            stop_sequences: vec![],
            ignore_eos: true,
            min_new_tokens: 0,
        });
        assert_eq!(c.push(2, ""), None);
        assert_eq!(c.push(2, ""), None);
        assert_eq!(c.push(2, ""), Some(FinishReason::Length));
        // EOS wins over length when both apply to the same token.
        let mut c = checker(2, &[2], &[]);
        assert_eq!(c.push(4, "a"), None);
        assert_eq!(c.push(2, ""), Some(FinishReason::EosToken));
    }

    #[test]
    fn stop_sequence_across_three_tokens() {
        let mut c = checker(100, &[], &["###END"]);
        assert_eq!(c.push(1, "Hello #"), None);
        assert_eq!(c.push(2, "##E"), None);
        assert_eq!(c.push(3, "N"), None);
        assert_eq!(c.push(4, "D and more"), Some(FinishReason::StopSequence));
        assert_eq!(c.generated_text(), "Hello ");
        assert_eq!(c.full_text(), "Hello ###END and more");
        assert_eq!(c.matched_stop_sequence(), Some("###END"));
    }

    #[test]
    fn stop_sequence_inside_one_token() {
        let mut c = checker(100, &[], &["\n\n", "User:"]);
        assert_eq!(c.push(1, "Sure."), None);
        assert_eq!(
            c.push(2, " Bye!\n\nUser: hi"),
            Some(FinishReason::StopSequence)
        );
        assert_eq!(c.generated_text(), "Sure. Bye!");
        assert_eq!(c.matched_stop_sequence(), Some("\n\n"));
        // Stop sequence as the very first text.
        let mut c = checker(100, &[], &["stop"]);
        assert_eq!(c.push(1, "stop"), Some(FinishReason::StopSequence));
        assert_eq!(c.generated_text(), "");
    }

    #[test]
    fn earliest_match_wins_and_partial_matches_do_not_stop() {
        let mut c = checker(100, &[], &["cde", "bc"]);
        assert_eq!(c.push(1, "ab"), None);
        assert_eq!(c.push(2, "cdef"), Some(FinishReason::StopSequence));
        assert_eq!(c.generated_text(), "a");
        assert_eq!(c.matched_stop_sequence(), Some("bc"));

        // Near misses across boundaries never stop.
        let mut c = checker(100, &[], &["abc"]);
        for (i, t) in ["a", "b", "x", "ab", "ab", "c"].iter().enumerate() {
            let r = c.push(i as u32, t);
            if i < 5 {
                assert_eq!(r, None, "step {i}");
            } else {
                assert_eq!(r, Some(FinishReason::StopSequence));
            }
        }
        assert_eq!(c.generated_text(), "abxab");
    }

    #[test]
    fn multibyte_text_and_empty_pushes() {
        let mut c = checker(100, &[], &["日本", "😀!"]);
        assert_eq!(c.push(1, "é"), None);
        assert_eq!(c.push(2, ""), None); // incomplete character
        assert_eq!(c.push(3, "😀"), None);
        assert_eq!(c.push(4, "日"), None);
        assert_eq!(c.push(5, "本語"), Some(FinishReason::StopSequence));
        assert_eq!(c.generated_text(), "é😀");

        let mut c = checker(100, &[], &["😀!"]);
        assert_eq!(c.push(1, "ab😀"), None);
        assert_eq!(c.push(2, "!"), Some(FinishReason::StopSequence));
        assert_eq!(c.generated_text(), "ab");
    }

    #[test]
    fn stop_sequence_wins_over_length() {
        let mut c = checker(2, &[], &["xy"]);
        assert_eq!(c.push(1, "x"), None);
        assert_eq!(c.push(2, "y"), Some(FinishReason::StopSequence));
    }

    #[test]
    fn empty_stop_sequences_are_ignored() {
        let mut c = checker(3, &[], &[""]);
        assert_eq!(c.push(1, "abc"), None);
        assert_eq!(c.stable_len(), 3);
    }

    #[test]
    fn long_generation_only_searches_the_tail() {
        let mut c = checker(u32::MAX, &[], &["<stop>"]);
        for i in 0..10_000 {
            assert_eq!(c.push(i, "<sto"), None);
            assert_eq!(c.push(i, "p "), None);
        }
        assert_eq!(c.push(0, "<st"), None);
        assert_eq!(c.push(0, "op>"), Some(FinishReason::StopSequence));
        assert_eq!(c.generated_text().len(), 10_000 * 6);
    }

    #[test]
    fn stable_len_holds_back_possible_stop_prefixes() {
        let mut c = checker(100, &[], &["</s>", "ab"]);
        c.push(1, "hello <");
        assert_eq!(c.stable_len(), "hello ".len());
        c.push(2, "/");
        assert_eq!(c.stable_len(), "hello ".len());
        c.push(3, "x a");
        assert_eq!(c.stable_len(), "hello </x ".len());
        c.push(4, "c");
        assert_eq!(c.stable_len(), c.full_text().len());
        assert_eq!(c.push(5, " </s>"), Some(FinishReason::StopSequence));
        assert_eq!(c.stable_len(), "hello </x ac ".len());
        assert_eq!(c.stable_len(), c.generated_text().len());
    }
}
