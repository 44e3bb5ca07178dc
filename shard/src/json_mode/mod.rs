//! JSON mode (OpenAI's `response_format: {"type": "json_object"}`): at every step
//! the tokens whose bytes cannot continue a JSON object are masked out of the
//! logits, and the end of sequence is allowed only once the object is complete
//! (and then it is the only choice).

mod machine;

use std::sync::Arc;

use tokenizers::{DecoderWrapper, Tokenizer};

pub use machine::{JsonMachine, MAX_DEPTH, MAX_WHITESPACE_RUN};

/// The bytes each token adds to the output; `None` for special tokens, which never
/// belong to a JSON document.
#[derive(Debug, Default)]
pub struct TokenBytes {
    bytes: Vec<Option<Box<[u8]>>>,
    /// Tokens that can only be string content (no quote, backslash or control
    /// byte): inside a string they are always allowed.
    string_safe: Vec<bool>,
}

impl TokenBytes {
    /// From the vocabulary: byte-level BPE pieces (GPT-2's byte-to-character
    /// table undone), or SentencePiece pieces (`▁` is a space, `<0xNN>` one byte).
    pub fn from_tokenizer(tokenizer: &Tokenizer) -> Self {
        let byte_level = matches!(tokenizer.get_decoder(), Some(DecoderWrapper::ByteLevel(_)));
        let unbyte = byte_level.then(gpt2_char_to_byte);
        let added = tokenizer.get_added_tokens_decoder();
        let vocab = tokenizer.get_vocab(true);
        let size = vocab.values().map(|&id| id as usize + 1).max().unwrap_or(0);
        let mut bytes: Vec<Option<Box<[u8]>>> = vec![None; size];
        for (piece, id) in vocab {
            let entry = match added.get(&id) {
                Some(token) if token.special => None,
                // Added tokens are literal text, not encoded pieces.
                Some(token) => Some(token.content.as_bytes().into()),
                None => match &unbyte {
                    Some(table) => piece
                        .chars()
                        .map(|c| table.get(&c).copied())
                        .collect::<Option<Vec<u8>>>()
                        .map(Into::into),
                    None => Some(sentencepiece_bytes(&piece).into()),
                },
            };
            if let Some(slot) = bytes.get_mut(id as usize) {
                *slot = entry;
            }
        }
        Self::new(bytes)
    }

    /// From explicit byte strings (tests).
    pub fn from_pieces(pieces: Vec<Option<Vec<u8>>>) -> Self {
        Self::new(pieces.into_iter().map(|p| p.map(Into::into)).collect())
    }

    fn new(bytes: Vec<Option<Box<[u8]>>>) -> Self {
        let string_safe = bytes
            .iter()
            .map(|b| {
                b.as_deref().is_some_and(|b| {
                    !b.is_empty() && b.iter().all(|&c| c >= 0x20 && c != b'"' && c != b'\\')
                })
            })
            .collect();
        Self { bytes, string_safe }
    }

    fn string_safe(&self, id: u32) -> bool {
        self.string_safe.get(id as usize).copied().unwrap_or(false)
    }

    pub fn get(&self, id: u32) -> Option<&[u8]> {
        self.bytes.get(id as usize).and_then(|b| b.as_deref())
    }
}

/// GPT-2's table from the printable characters standing for bytes back to the bytes.
fn gpt2_char_to_byte() -> std::collections::HashMap<char, u8> {
    let mut table = std::collections::HashMap::with_capacity(256);
    let mut extra = 0u32;
    for b in 0..=255u8 {
        let printable = matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        let c = if printable {
            char::from(b)
        } else {
            let c = char::from_u32(256 + extra).unwrap_or('\u{FFFD}');
            extra += 1;
            c
        };
        table.insert(c, b);
    }
    table
}

fn sentencepiece_bytes(piece: &str) -> Vec<u8> {
    if let Some(hex) = piece
        .strip_prefix("<0x")
        .and_then(|rest| rest.strip_suffix('>'))
    {
        if let Ok(b) = u8::from_str_radix(hex, 16) {
            return vec![b];
        }
    }
    piece.replace('\u{2581}', " ").into_bytes()
}

/// One sequence's JSON constraint.
#[derive(Debug, Clone)]
pub struct JsonConstraint {
    machine: JsonMachine,
    vocab: Arc<TokenBytes>,
    eos: Vec<u32>,
    scratch: Vec<machine::Container>,
}

impl JsonConstraint {
    pub fn new(vocab: Arc<TokenBytes>, eos: Vec<u32>) -> Self {
        Self {
            machine: JsonMachine::new(),
            vocab,
            eos,
            scratch: Vec::new(),
        }
    }

    /// Whether the object is complete.
    pub fn is_done(&self) -> bool {
        self.machine.is_done()
    }

    /// Sets the logits of the tokens that cannot come next to `-inf`; returns how
    /// many may come next.
    pub fn mask(&mut self, logits: &mut [f32]) -> usize {
        if self.machine.is_done() {
            // Only the end of the sequence.
            let mut allowed = 0;
            for (id, x) in logits.iter_mut().enumerate() {
                if self.eos.contains(&(id as u32)) {
                    allowed += 1;
                } else {
                    *x = f32::NEG_INFINITY;
                }
            }
            return allowed;
        }
        let mut first_ok = [false; 256];
        for (b, ok) in first_ok.iter_mut().enumerate() {
            *ok = self.machine.accepts(&[b as u8], &mut self.scratch);
        }
        let in_string = self.machine.in_plain_string();
        let mut allowed = 0;
        for (id, x) in logits.iter_mut().enumerate() {
            if in_string && self.vocab.string_safe(id as u32) {
                allowed += 1;
                continue;
            }
            let ok = match self.vocab.get(id as u32) {
                Some(bytes) => match bytes.split_first() {
                    Some((first, rest)) => {
                        first_ok[*first as usize]
                            && (rest.is_empty() || self.machine.accepts(bytes, &mut self.scratch))
                    }
                    None => false,
                },
                None => false,
            };
            if ok {
                allowed += 1;
            } else {
                *x = f32::NEG_INFINITY;
            }
        }
        allowed
    }

    /// Moves past `token`, the one chosen.
    pub fn advance(&mut self, token: u32) {
        if let Some(bytes) = self.vocab.get(token) {
            // A token the mask allowed always feeds; anything else leaves the machine
            // where it was.
            let mut next = self.machine.clone();
            if next.feed(bytes) {
                self.machine = next;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vocab() -> Arc<TokenBytes> {
        let pieces: Vec<Option<Vec<u8>>> = vec![
            None, // 0: special (EOS)
            Some(b"{".to_vec()),
            Some(b"}".to_vec()),
            Some(b"\"".to_vec()),
            Some(b"name".to_vec()),
            Some(b"\":".to_vec()),
            Some(b" \"Ann\"".to_vec()),
            Some(b"hello".to_vec()),
            Some(b"{\"".to_vec()),
            Some(b" 42}".to_vec()),
            Some(Vec::new()), // 10: no bytes
        ];
        Arc::new(TokenBytes::from_pieces(pieces))
    }

    fn allowed(c: &mut JsonConstraint) -> Vec<u32> {
        let mut logits = vec![0.0f32; 11];
        c.mask(&mut logits);
        (0..11).filter(|&i| logits[i as usize] == 0.0).collect()
    }

    #[test]
    fn masks_follow_the_document_and_end_only_when_complete() {
        let mut c = JsonConstraint::new(vocab(), vec![0]);
        assert_eq!(allowed(&mut c), vec![1, 8], "an object opens");
        c.advance(8); // {"
                      // Inside a key any text goes, brackets too; ` "Ann"` would close the key
                      // and then need a colon.
        assert_eq!(allowed(&mut c), vec![1, 2, 3, 4, 5, 7, 8, 9]);
        c.advance(4); // name
        c.advance(5); // ":
        assert_eq!(allowed(&mut c), vec![1, 3, 5, 6, 8, 9], "a value");
        c.advance(6); //  "Ann"
        assert_eq!(allowed(&mut c), vec![2]);
        c.advance(2);
        assert!(c.is_done());
        assert_eq!(allowed(&mut c), vec![0], "only the end of the sequence");
    }

    #[test]
    fn a_number_then_the_close_in_one_token() {
        let mut c = JsonConstraint::new(vocab(), vec![0]);
        for t in [8, 4, 5] {
            c.advance(t);
        }
        // " 42}" is a value and the close at once.
        let mut logits = vec![0.0f32; 11];
        c.mask(&mut logits);
        assert_eq!(logits[9], 0.0);
        c.advance(9);
        assert!(c.is_done());
    }

    /// The mask (with its first-byte and in-string shortcuts) allows exactly the
    /// tokens that a fresh copy of the machine could be fed, at every byte of a
    /// document.
    #[test]
    fn the_mask_equals_trying_every_token() {
        let pieces: Vec<Option<Vec<u8>>> = [
            "{",
            "}",
            "[",
            "]",
            "\"",
            "\\",
            "\\\"",
            ":",
            ",",
            " ",
            "\n",
            "  \"",
            "a",
            "abc",
            "é",
            "\u{1}",
            "1",
            "-",
            "0.",
            "5e",
            "+3",
            "true",
            "tr",
            "ue",
            "null",
            "\":",
            "\",",
            "\"}",
            "}}",
            "]}",
            "{\"",
            "\\u00",
            "e9",
            "x\"y",
            ", \"k\": [",
            "\t",
        ]
        .iter()
        .map(|p| Some(p.as_bytes().to_vec()))
        .chain([None, Some(Vec::new())])
        .collect();
        let vocab = Arc::new(TokenBytes::from_pieces(pieces));
        let eos = vec![36u32];
        let doc = "{\"abc\": [1, -0.5e+3, true, null, \"x\\\"y\\u00e9\"], \"k\": {\"a\": {}}}";
        for end in 0..=doc.len() {
            let mut c = JsonConstraint::new(vocab.clone(), eos.clone());
            assert!(c.machine.feed(&doc.as_bytes()[..end]), "prefix {end}");
            let mut logits = vec![0.0f32; 38];
            c.mask(&mut logits);
            for (id, &x) in logits.iter().enumerate() {
                let id = id as u32;
                let want = if eos.contains(&id) {
                    c.is_done()
                } else {
                    !c.is_done()
                        && vocab
                            .get(id)
                            .is_some_and(|b| !b.is_empty() && c.machine.clone().feed(b))
                };
                assert_eq!(
                    x == 0.0,
                    want,
                    "after {:?}: token {id} {:?}",
                    &doc[..end],
                    vocab.get(id)
                );
            }
        }
    }

    #[test]
    fn gpt2_byte_table_round_trips() {
        let table = gpt2_char_to_byte();
        assert_eq!(table.len(), 256);
        assert_eq!(table[&'\u{0120}'], b' ');
        assert_eq!(table[&'\u{010A}'], b'\n');
        assert_eq!(table[&'a'], b'a');
        let mut seen: Vec<u8> = table.values().copied().collect();
        seen.sort();
        seen.dedup();
        assert_eq!(seen.len(), 256);
    }

    #[test]
    fn sentencepiece_pieces() {
        assert_eq!(sentencepiece_bytes("\u{2581}hello"), b" hello");
        assert_eq!(sentencepiece_bytes("<0x0A>"), b"\n");
        assert_eq!(sentencepiece_bytes("<0xZZ>"), b"<0xZZ>");
    }
}
