//! Incremental detokenization for streaming.
//!
//! Decoding token by token in isolation is wrong for most tokenizers: a
//! byte-level BPE token can hold part of a multi-byte character, and
//! SentencePiece-style decoders drop the leading space of the first token
//! they see. [`IncrementalDecoder`] instead decodes a small window of recent
//! tokens twice (without and with the new ones) and emits the difference:
//!
//! * `prefix_offset..read_offset`: tokens whose text was already emitted,
//!   kept as context;
//! * `read_offset..`: tokens whose text is still pending.
//!
//! Text is held back while it ends in U+FFFD (an incomplete UTF-8 sequence)
//! and released once the character is complete.

use tokenizers::Tokenizer;

/// At most this many prompt tokens are kept as initial context.
pub const MAX_PROMPT_CONTEXT: usize = 8;

/// Once this many already-emitted tokens sit before the window, they are
/// dropped, so memory stays bounded over long generations.
const COMPACT_AFTER: usize = 64;

const REPLACEMENT: char = '\u{FFFD}';

/// Errors of incremental detokenization.
#[derive(Debug, thiserror::Error)]
pub enum DetokenizeError {
    /// The token id is not in the tokenizer's vocabulary.
    #[error("token id {id} is not in the vocabulary")]
    UnknownToken { id: u32 },
    /// The tokenizer's decoder failed.
    #[error("decoding tokens failed: {0}")]
    Decode(#[source] tokenizers::Error),
}

/// Streaming detokenizer of one sequence.
///
/// The concatenation of everything [`IncrementalDecoder::step`] and a final
/// [`IncrementalDecoder::flush`] return equals
/// `tokenizer.decode(generated_ids, skip_special_tokens)` when the prompt
/// context is empty, and for byte-level BPE tokenizers (GPT-2 style, as in
/// Llama 3, Qwen2, SmolLM) whatever the context. With a prompt context and a
/// decoder that strips the leading space of a decode (SentencePiece
/// `Metaspace`), the first piece keeps the space it has after the prompt,
/// which is what a client appending the stream to the prompt needs.
#[derive(Debug, Clone)]
pub struct IncrementalDecoder {
    /// Context and generated ids; ids before `prefix_offset` are not needed
    /// any more and are dropped from time to time.
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
    skip_special_tokens: bool,
}

impl IncrementalDecoder {
    /// `prompt_tail_ids`: the last few prompt tokens (may be empty; only the
    /// last [`MAX_PROMPT_CONTEXT`] are used) so that the first generated
    /// token is decoded in context.
    pub fn new(prompt_tail_ids: &[u32], skip_special_tokens: bool) -> IncrementalDecoder {
        let start = prompt_tail_ids.len().saturating_sub(MAX_PROMPT_CONTEXT);
        let ids = prompt_tail_ids[start..].to_vec();
        let read_offset = ids.len();
        IncrementalDecoder {
            ids,
            prefix_offset: 0,
            read_offset,
            skip_special_tokens,
        }
    }

    /// Adds one generated token and returns the text it completes: empty
    /// while the pending bytes end in an incomplete UTF-8 character (the
    /// decoded window ends with U+FFFD) or the token decodes to nothing
    /// (e.g. a skipped special token); otherwise all text not returned yet.
    pub fn step(
        &mut self,
        tokenizer: &Tokenizer,
        token_id: u32,
    ) -> Result<String, DetokenizeError> {
        if tokenizer.id_to_token(token_id).is_none() {
            return Err(DetokenizeError::UnknownToken { id: token_id });
        }
        self.ids.push(token_id);
        let (prefix_text, new_text) = self.decode_window(tokenizer)?;
        if new_text.len() <= prefix_text.len() || new_text.ends_with(REPLACEMENT) {
            return Ok(String::new());
        }
        let out = suffix_after(&prefix_text, &new_text);
        self.advance();
        Ok(out)
    }

    /// Returns the text still held back (an incomplete character at the end
    /// of the generation comes out as U+FFFD, as in a full decode) and
    /// resets the pending window. Call once when the sequence finishes.
    pub fn flush(&mut self, tokenizer: &Tokenizer) -> Result<String, DetokenizeError> {
        if self.read_offset >= self.ids.len() {
            return Ok(String::new());
        }
        let (prefix_text, new_text) = self.decode_window(tokenizer)?;
        let out = if new_text.len() > prefix_text.len() {
            suffix_after(&prefix_text, &new_text)
        } else {
            String::new()
        };
        self.advance();
        Ok(out)
    }

    /// Whether text is being held back (tokens after the last emission).
    pub fn has_pending(&self) -> bool {
        self.read_offset < self.ids.len()
    }

    /// Decodes the window without and with the pending tokens.
    fn decode_window(&self, tokenizer: &Tokenizer) -> Result<(String, String), DetokenizeError> {
        let context = &self.ids[self.prefix_offset..self.read_offset];
        let prefix_text = if context.is_empty() {
            String::new()
        } else {
            tokenizer
                .decode(context, self.skip_special_tokens)
                .map_err(DetokenizeError::Decode)?
        };
        let new_text = tokenizer
            .decode(&self.ids[self.prefix_offset..], self.skip_special_tokens)
            .map_err(DetokenizeError::Decode)?;
        Ok((prefix_text, new_text))
    }

    /// The pending tokens were emitted: they become the context.
    fn advance(&mut self) {
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        if self.prefix_offset >= COMPACT_AFTER {
            self.ids.drain(..self.prefix_offset);
            self.read_offset -= self.prefix_offset;
            self.prefix_offset = 0;
        }
    }
}

/// `new` minus its leading `prefix`. Decoders normally only append, so
/// `new` starts with `prefix`; if one rewrote earlier text, the part after
/// the longest common prefix (on a character boundary) is returned.
fn suffix_after(prefix: &str, new: &str) -> String {
    if let Some(rest) = new.strip_prefix(prefix) {
        return rest.to_string();
    }
    let common = prefix
        .char_indices()
        .zip(new.chars())
        .find(|((_, a), b)| a != b)
        .map(|((i, _), _)| i)
        .unwrap_or_else(|| prefix.len().min(new.len()));
    // `common` is a boundary in `prefix`, and the bytes before it are equal
    // in `new`, so it is a boundary there too.
    new.get(common..).unwrap_or_default().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
    use tokenizers::decoders::metaspace::Metaspace as MetaspaceDecoder;
    use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
    use tokenizers::models::TrainerWrapper;
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;
    use tokenizers::AddedToken;

    const CORPUS: &[&str] = &[
        "The quick brown fox jumps over the lazy dog.",
        "Le café déjà vu à la crème brûlée, naïve façade.",
        "東京は日本の首都です。日本語の文章を書きます。",
        "我喜欢吃中国菜。中文分词很有趣。",
        "Emoji time 😀😃😄 and 🚀 rockets 🚀🚀 and hearts ❤️❤️",
        "Ελληνικά και русский текст, ქართული, עברית, العربية",
        "the the the quick quick brown brown fox fox",
    ];

    /// A small byte-level BPE trained on CORPUS, with one special token.
    fn byte_level_bpe(vocab_size: usize) -> Tokenizer {
        let mut tok = Tokenizer::new(BPE::default());
        tok.with_pre_tokenizer(Some(ByteLevel::default().add_prefix_space(false)));
        tok.with_decoder(Some(ByteLevelDecoder::default()));
        let trainer = BpeTrainerBuilder::new()
            .show_progress(false)
            .vocab_size(vocab_size)
            .min_frequency(1)
            .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
            .build();
        let mut trainer = TrainerWrapper::from(trainer);
        tok.train(&mut trainer, CORPUS.iter()).unwrap();
        tok.add_special_tokens(&[AddedToken::from("<|end|>", true)]);
        tok
    }

    fn encode(tok: &Tokenizer, text: &str) -> Vec<u32> {
        tok.encode(text, false).unwrap().get_ids().to_vec()
    }

    fn stream(tok: &Tokenizer, context: &[u32], ids: &[u32], skip: bool) -> (Vec<String>, String) {
        let mut d = IncrementalDecoder::new(context, skip);
        let mut pieces: Vec<String> = ids.iter().map(|&id| d.step(tok, id).unwrap()).collect();
        pieces.push(d.flush(tok).unwrap());
        let joined = pieces.concat();
        (pieces, joined)
    }

    const SAMPLES: &[&str] = &[
        " Hello world, the quick brown fox!",
        "café crème brûlée — naïve déjà vu",
        "東京は日本の首都です。新しい文章",
        "我喜欢吃中国菜 and 日本料理",
        "rocket 🚀 smile 😀 family 👩‍👩‍👧 flag 🇫🇷 keycap 1️⃣",
        "mixed: Ελληνικά, русский, ქართული, العربية, 한국어 🦀",
        "  leading and   multiple   spaces\n\nnew lines\t tabs",
        "",
    ];

    #[test]
    fn concatenation_equals_full_decode() {
        for vocab_size in [300usize, 600, 2000] {
            let tok = byte_level_bpe(vocab_size);
            // The samples do contain tokens that hold part of a character.
            let partial = SAMPLES
                .iter()
                .flat_map(|t| encode(&tok, t))
                .filter(|&id| tok.decode(&[id], true).unwrap().contains(REPLACEMENT))
                .count();
            assert!(partial > 10, "vocab {vocab_size}: {partial}");
            for &text in SAMPLES {
                let ids = encode(&tok, text);
                let full = tok.decode(&ids, true).unwrap();
                assert_eq!(full, text, "tokenizer must round-trip");
                let (_, joined) = stream(&tok, &[], &ids, true);
                assert_eq!(joined, full, "vocab {vocab_size}: {text:?}");
                // With a prompt context (byte-level: context never leaks in).
                let ctx = encode(&tok, "Prompt: 日本語 😀 ok");
                let (_, joined) = stream(&tok, &ctx, &ids, true);
                assert_eq!(joined, full, "vocab {vocab_size}, with context: {text:?}");
            }
        }
    }

    #[test]
    fn multi_byte_characters_wait_for_their_last_byte() {
        // No merges: every byte is its own token.
        let tok = byte_level_bpe(256);
        let ids = encode(&tok, "a😀é東");
        assert_eq!(ids.len(), 1 + 4 + 2 + 3);
        let (pieces, joined) = stream(&tok, &[], &ids, true);
        let expect = ["a", "", "", "", "😀", "", "é", "", "", "東", ""];
        assert_eq!(pieces, expect);
        assert_eq!(joined, "a😀é東");
        // Never a replacement character in any emitted piece.
        assert!(pieces.iter().all(|p| !p.contains(REPLACEMENT)));
    }

    #[test]
    fn byte_level_spaces_come_out_right() {
        let tok = byte_level_bpe(2000);
        let ids = encode(&tok, "the quick brown fox");
        let (pieces, joined) = stream(&tok, &[], &ids, true);
        assert_eq!(joined, "the quick brown fox");
        // Each word after the first carries its own leading space.
        let words: Vec<&str> = pieces
            .iter()
            .map(String::as_str)
            .filter(|p| !p.is_empty())
            .collect();
        assert!(words.len() >= 4, "{words:?}");
        assert!(words[1..].iter().all(|w| w.starts_with(' ')), "{words:?}");
    }

    #[test]
    fn special_tokens_skipped_or_kept() {
        let tok = byte_level_bpe(600);
        let end = tok.token_to_id("<|end|>").unwrap();
        let mut ids = encode(&tok, "café 😀");
        ids.push(end);
        ids.extend(encode(&tok, " after"));
        for skip in [true, false] {
            let (_, joined) = stream(&tok, &[], &ids, skip);
            assert_eq!(joined, tok.decode(&ids, skip).unwrap());
        }
        assert_eq!(stream(&tok, &[], &ids, true).1, "café 😀 after");
        assert!(stream(&tok, &[], &ids, false).1.contains("<|end|>"));
        // The skipped special token itself yields nothing.
        let mut d = IncrementalDecoder::new(&[], true);
        assert_eq!(d.step(&tok, end).unwrap(), "");
    }

    #[test]
    fn incomplete_character_at_the_end_is_flushed() {
        let tok = byte_level_bpe(256);
        let ids = encode(&tok, "ok😀");
        let cut = &ids[..ids.len() - 1]; // generation stopped mid-character
        let mut d = IncrementalDecoder::new(&[], false);
        let mut out = String::new();
        for &id in cut {
            out.push_str(&d.step(&tok, id).unwrap());
        }
        assert_eq!(out, "ok");
        assert!(d.has_pending());
        out.push_str(&d.flush(&tok).unwrap());
        assert_eq!(out, tok.decode(cut, false).unwrap());
        assert!(out.ends_with(REPLACEMENT));
        assert!(!d.has_pending());
        assert_eq!(d.flush(&tok).unwrap(), "");
    }

    #[test]
    fn long_generation_stays_bounded_and_exact() {
        let tok = byte_level_bpe(600);
        let text = SAMPLES.concat().repeat(20);
        let ids = encode(&tok, &text);
        let mut d = IncrementalDecoder::new(&[], true);
        let mut out = String::new();
        for &id in &ids {
            out.push_str(&d.step(&tok, id).unwrap());
            assert!(d.ids.len() < COMPACT_AFTER + 16);
        }
        out.push_str(&d.flush(&tok).unwrap());
        assert_eq!(out, text);
    }

    #[test]
    fn unknown_token_is_an_error() {
        let tok = byte_level_bpe(300);
        let mut d = IncrementalDecoder::new(&[], true);
        let err = d.step(&tok, 1_000_000).unwrap_err();
        assert!(matches!(
            err,
            DetokenizeError::UnknownToken { id: 1_000_000 }
        ));
        assert!(err.to_string().contains("1000000"));
        // The decoder is still usable.
        let ids = encode(&tok, "fine");
        let (_, joined) = stream(&tok, &[], &ids, true);
        assert_eq!(joined, "fine");
    }

    #[test]
    fn metaspace_leading_space_uses_context() {
        // SentencePiece-style: the decoder strips the first token's "▁".
        let vocab = [("▁Hello", 0), ("▁world", 1), ("!", 2), ("▁again", 3)]
            .map(|(t, i)| (t.to_string(), i));
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, vec![])
            .build()
            .unwrap();
        let mut tok = Tokenizer::new(bpe);
        tok.with_decoder(Some(MetaspaceDecoder::default()));
        let ids = [0u32, 1, 2, 3];
        // Token-by-token decoding in isolation loses the spaces...
        let naive: String = ids
            .iter()
            .map(|&i| tok.decode(&[i], true).unwrap())
            .collect();
        assert_eq!(naive, "Helloworld!again");
        // ...the incremental decoder does not.
        let (pieces, joined) = stream(&tok, &[], &ids, true);
        assert_eq!(joined, "Hello world! again");
        assert_eq!(joined, tok.decode(&ids, true).unwrap());
        assert_eq!(pieces[..4], ["Hello", " world", "!", " again"]);
        // With the prompt as context, the first piece keeps its space.
        let (_, joined) = stream(&tok, &[0], &[1, 2], true);
        assert_eq!(joined, " world!");
    }

    #[test]
    fn prompt_context_is_capped() {
        let tok = byte_level_bpe(600);
        let ctx = encode(&tok, &SAMPLES.concat());
        assert!(ctx.len() > MAX_PROMPT_CONTEXT);
        let d = IncrementalDecoder::new(&ctx, true);
        assert_eq!(d.ids.len(), MAX_PROMPT_CONTEXT);
        assert_eq!(d.read_offset, MAX_PROMPT_CONTEXT);
    }

    #[test]
    fn suffix_after_handles_rewrites() {
        assert_eq!(suffix_after("abc", "abcdé"), "dé");
        assert_eq!(suffix_after("", "x"), "x");
        // Rewritten tail (e.g. a replacement char completed): from the divergence.
        assert_eq!(suffix_after("ab\u{FFFD}", "abé!"), "é!");
        assert_eq!(suffix_after("abc", "ab"), "");
    }
}
