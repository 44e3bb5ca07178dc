//! Deterministic synthetic prompts of an approximate token length.
//!
//! Prompts are random sequences of short, common English words, each of which
//! is a single token (with its leading space) in the usual BPE vocabularies, so
//! a prompt of `n` words is about `n` tokens. Every request index gets its own
//! word sequence, so prefix caching cannot make one request cheaper than
//! another, unless a shared prefix is asked for: then every prompt starts with
//! the same words (as requests with one system prompt do).

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

#[rustfmt::skip]
const WORDS: &[&str] = &[
    "the", "of", "and", "to", "in", "is", "was", "for", "on", "are", "with", "as", "at", "be",
    "this", "have", "from", "or", "one", "had", "by", "word", "but", "not", "what", "all", "were",
    "we", "when", "your", "can", "said", "there", "use", "an", "each", "which", "she", "do", "how",
    "their", "if", "will", "up", "other", "about", "out", "many", "then", "them", "these", "so",
    "some", "her", "would", "make", "like", "him", "into", "time", "has", "look", "two", "more",
    "write", "go", "see", "number", "no", "way", "could", "people", "my", "than", "first", "water",
    "been", "call", "who", "oil", "its", "now", "find", "long", "down", "day", "did", "get", "come",
    "made", "may", "part", "over", "new", "sound", "take", "only", "little", "work", "know",
    "place", "year", "live", "me", "back", "give", "most", "very", "after", "thing", "our", "just",
    "name", "good", "man", "think", "say", "great", "where", "help", "through", "much", "before",
    "line", "right", "too", "mean", "old", "any", "same", "tell", "boy", "follow", "came", "want",
    "show", "also", "around", "form", "three", "small", "set", "put", "end", "does", "another",
    "well", "large", "must", "big", "even", "such", "because", "turn", "here", "why", "ask", "went",
    "men", "read", "need", "land", "different", "home", "us", "move", "try", "kind", "hand",
    "picture", "again", "change", "off", "play", "spell", "air", "away", "animal", "house", "point",
    "page", "letter", "mother", "answer", "found", "study", "still", "learn", "should", "world",
    "high", "every", "near", "add", "food", "between", "own", "below", "country", "plant", "last",
    "school", "father", "keep", "tree", "never", "start", "city", "earth", "eye", "light",
    "thought", "head", "under", "story", "saw", "left", "few", "while", "along", "might", "close",
    "something", "seem", "next", "hard", "open", "example", "begin", "life", "always", "those",
    "both", "paper", "together", "got", "group", "often", "run", "important", "until", "children",
    "side", "feet", "car", "mile", "night", "walk", "white", "sea", "began", "grow", "took",
    "river", "four", "carry", "state", "once", "book", "hear", "stop", "without", "second", "late",
    "miss", "idea", "enough", "eat", "face", "watch", "far", "real", "almost", "let", "above",
    "girl", "sometimes", "mountain", "cut", "young", "talk", "soon", "list", "song", "being",
    "leave", "family",
];

/// Builds the prompt of one request.
#[derive(Debug, Clone)]
pub struct PromptFactory {
    lengths: Vec<usize>,
    seed: u64,
    /// Words every prompt starts with (empty: none).
    shared: String,
}

impl PromptFactory {
    /// `lengths` are the prompt lengths (in approximate tokens) that requests
    /// cycle through; it must not be empty.
    pub fn new(lengths: Vec<usize>, seed: u64) -> Self {
        Self {
            lengths,
            seed,
            shared: String::new(),
        }
    }

    /// Every prompt starts with the same `words` words (drawn from the seed), before
    /// its own `length_of` words.
    pub fn with_shared_prefix(mut self, words: usize) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed ^ 0x005E_ED0F_5A4E_D000);
        self.shared = random_words(&mut rng, words);
        self
    }

    /// The approximate token length of request `index`: the lengths cycle so
    /// that any run of consecutive requests mixes them evenly.
    pub fn length_of(&self, index: u64) -> usize {
        match self.lengths.len() {
            0 => 1,
            n => self.lengths[(index % n as u64) as usize].max(1),
        }
    }

    /// The prompt of request `index`: `length_of(index)` words, the same for
    /// the same seed and index, different across indices.
    pub fn prompt(&self, index: u64) -> String {
        let words = self.length_of(index);
        let mut rng =
            ChaCha8Rng::seed_from_u64(self.seed ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let own = random_words(&mut rng, words);
        if self.shared.is_empty() {
            own
        } else {
            format!("{} {own}", self.shared)
        }
    }
}

/// `words` random words joined by spaces.
fn random_words(rng: &mut ChaCha8Rng, words: usize) -> String {
    let mut text = String::with_capacity(words * 7);
    for i in 0..words {
        if i > 0 {
            text.push(' ');
        }
        text.push_str(WORDS[rng.random_range(0..WORDS.len())]);
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompt_has_requested_word_count() {
        let factory = PromptFactory::new(vec![32, 128, 512], 7);
        for index in 0..9 {
            let prompt = factory.prompt(index);
            let expected = [32, 128, 512][(index % 3) as usize];
            assert_eq!(prompt.split(' ').count(), expected);
            assert!(prompt.split(' ').all(|w| !w.is_empty() && w.len() <= 10));
        }
    }

    #[test]
    fn prompts_are_deterministic_and_distinct() {
        let a = PromptFactory::new(vec![64], 1);
        let b = PromptFactory::new(vec![64], 1);
        let c = PromptFactory::new(vec![64], 2);
        assert_eq!(a.prompt(5), b.prompt(5));
        assert_ne!(a.prompt(5), a.prompt(6));
        assert_ne!(a.prompt(5), c.prompt(5));
        // The first few words already differ, so no shared cacheable prefix.
        let prefix = |s: String| s.split(' ').take(8).collect::<Vec<_>>().join(" ");
        let prefixes: std::collections::HashSet<String> =
            (0..100).map(|i| prefix(a.prompt(i))).collect();
        assert_eq!(prefixes.len(), 100);
    }

    #[test]
    fn a_shared_prefix_starts_every_prompt() {
        let factory = PromptFactory::new(vec![16, 32], 3).with_shared_prefix(100);
        let prompts: Vec<String> = (0..4).map(|i| factory.prompt(i)).collect();
        let head = |s: &String| s.split(' ').take(100).collect::<Vec<_>>().join(" ");
        assert!(prompts.iter().all(|p| head(p) == head(&prompts[0])));
        assert_eq!(prompts[0].split(' ').count(), 116);
        assert_eq!(prompts[1].split(' ').count(), 132);
        // After the prefix, each request's own words.
        assert_ne!(
            prompts[0][head(&prompts[0]).len()..],
            prompts[2][head(&prompts[2]).len()..]
        );
    }

    #[test]
    fn zero_length_is_one_word() {
        let factory = PromptFactory::new(vec![0], 0);
        assert_eq!(factory.prompt(0).split(' ').count(), 1);
    }
}
