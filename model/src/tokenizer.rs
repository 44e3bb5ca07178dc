//! Tokenizers for the models Tessera serves, and the special-token facts the
//! router needs (BOS, the set of end-of-generation ids, whether BOS is added,
//! the chat template).
//!
//! Two sources:
//! - a GGUF file, whose tokenizer lives only in its metadata
//!   (`tokenizer.ggml.*`): [`GgufTokenizerSpec::from_gguf`] reads it and
//!   [`GgufTokenizerSpec::build`] turns it into a [`tokenizers::Tokenizer`]
//!   that encodes and decodes like Hugging Face Transformers' GGUF loader;
//! - a Hugging Face folder: [`load_tokenizer_json`] and
//!   [`TokenizerInfo::from_hf_dir`] (`tokenizer_config.json`,
//!   `generation_config.json`, `chat_template.jinja`).
//!
//! The tokenizers built here already add BOS/EOS through their post-processor
//! when the model asks for it, so callers encode prompts with
//! `add_special_tokens = true` and never prepend BOS by hand.

use std::path::{Path, PathBuf};

use serde_json::Value as Json;
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::Replace;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::template::{SpecialToken, TemplateProcessing};
use tokenizers::{
    AddedToken, DecoderWrapper, PreTokenizerWrapper, SplitDelimiterBehavior, Tokenizer,
};

use crate::gguf::{GgufFile, MetaValue};

/// GGUF metadata keys read by [`GgufTokenizerSpec::from_gguf`].
pub mod keys {
    pub const MODEL: &str = "tokenizer.ggml.model";
    pub const PRE: &str = "tokenizer.ggml.pre";
    pub const TOKENS: &str = "tokenizer.ggml.tokens";
    pub const SCORES: &str = "tokenizer.ggml.scores";
    pub const TOKEN_TYPE: &str = "tokenizer.ggml.token_type";
    pub const MERGES: &str = "tokenizer.ggml.merges";
    pub const BOS_ID: &str = "tokenizer.ggml.bos_token_id";
    pub const EOS_ID: &str = "tokenizer.ggml.eos_token_id";
    pub const EOT_ID: &str = "tokenizer.ggml.eot_token_id";
    pub const EOM_ID: &str = "tokenizer.ggml.eom_token_id";
    pub const UNK_ID: &str = "tokenizer.ggml.unknown_token_id";
    pub const PAD_ID: &str = "tokenizer.ggml.padding_token_id";
    pub const ADD_BOS: &str = "tokenizer.ggml.add_bos_token";
    pub const ADD_EOS: &str = "tokenizer.ggml.add_eos_token";
    pub const ADD_SPACE_PREFIX: &str = "tokenizer.ggml.add_space_prefix";
    pub const CHAT_TEMPLATE: &str = "tokenizer.chat_template";
}

/// llama.cpp token types (`tokenizer.ggml.token_type`).
pub mod token_type {
    pub const NORMAL: i32 = 1;
    pub const UNKNOWN: i32 = 2;
    pub const CONTROL: i32 = 3;
    pub const USER_DEFINED: i32 = 4;
    pub const UNUSED: i32 = 5;
    pub const BYTE: i32 = 6;
}

/// Token texts that end a turn in well-known chat formats. When one of them is
/// a special (control) token of the vocabulary, generation stops on it too,
/// as llama.cpp does.
pub const KNOWN_END_OF_TURN_TOKENS: &[&str] = &[
    "<|endoftext|>",
    "<|im_end|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|end|>",
    "<end_of_turn>",
    "<|end_of_text|>",
    "<|return|>",
    "<|call|>",
    "</s>",
];

/// Everything that can go wrong building or loading a tokenizer.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("{}: missing metadata key `{key}`", path.display())]
    MissingKey { path: PathBuf, key: String },

    #[error("{}: metadata key `{key}` holds {found}, expected {expected}", path.display())]
    WrongType {
        path: PathBuf,
        key: String,
        expected: &'static str,
        found: String,
    },

    #[error("{}: metadata key `{key}`: {message}", path.display())]
    InvalidMetadata {
        path: PathBuf,
        key: String,
        message: String,
    },

    #[error(
        "{}: unsupported tokenizer model `{model}` in `tokenizer.ggml.model` (supported: gpt2, llama)",
        path.display()
    )]
    UnsupportedModel { path: PathBuf, model: String },

    #[error("{}: building the tokenizer failed: {message}", path.display())]
    Build { path: PathBuf, message: String },

    #[error("cannot read {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("{} is not valid JSON: {source}", path.display())]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },

    #[error("{}: cannot load the tokenizer: {message}", path.display())]
    Load { path: PathBuf, message: String },

    #[error("{}: field `{field}`: {message}", path.display())]
    Config {
        path: PathBuf,
        field: String,
        message: String,
    },
}

/// The tokenizer a GGUF file describes, as plain data (`tokenizer.ggml.*`).
#[derive(Debug, Clone, PartialEq)]
pub struct GgufTokenizerSpec {
    /// The file it came from, for error messages.
    pub source: PathBuf,
    /// `tokenizer.ggml.model`: `gpt2` (byte-level BPE) or `llama` (SentencePiece BPE).
    pub model: String,
    /// `tokenizer.ggml.pre`: llama.cpp's name for the pre-tokenizer split.
    pub pre: Option<String>,
    pub tokens: Vec<String>,
    /// `tokenizer.ggml.scores` (SentencePiece vocabularies); empty when absent.
    pub scores: Vec<f32>,
    /// `tokenizer.ggml.merges`, each `"left right"`; empty when absent.
    pub merges: Vec<String>,
    /// `tokenizer.ggml.token_type` (see [`token_type`]); empty when absent.
    pub token_types: Vec<i32>,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
    /// `tokenizer.ggml.eot_token_id` (end of turn), where the file has it.
    pub eot_token_id: Option<u32>,
    /// `tokenizer.ggml.eom_token_id` (end of message), where the file has it.
    pub eom_token_id: Option<u32>,
    pub unk_token_id: Option<u32>,
    pub pad_token_id: Option<u32>,
    /// `tokenizer.ggml.add_bos_token`; absent means true for `llama` and false otherwise.
    pub add_bos_token: bool,
    /// `tokenizer.ggml.add_eos_token`; absent means false.
    pub add_eos_token: bool,
    /// `tokenizer.ggml.add_space_prefix` (SentencePiece); absent means true.
    pub add_space_prefix: Option<bool>,
    /// `tokenizer.chat_template`.
    pub chat_template: Option<String>,
}

impl GgufTokenizerSpec {
    /// Reads the tokenizer metadata of `file`. Checks types and that every
    /// token id refers to a token; does not build anything.
    pub fn from_gguf(file: &GgufFile) -> Result<GgufTokenizerSpec, TokenizerError> {
        let meta = MetaReader {
            file,
            path: file.path(),
        };
        let model = meta.required_str(keys::MODEL)?.to_owned();
        let tokens = meta.required_strings(keys::TOKENS)?;
        if tokens.is_empty() {
            return Err(meta.invalid(keys::TOKENS, "the vocabulary is empty".into()));
        }
        let scores = meta.optional_f32s(keys::SCORES)?.unwrap_or_default();
        let merges = meta.optional_strings(keys::MERGES)?.unwrap_or_default();
        let token_types = meta.optional_i32s(keys::TOKEN_TYPE)?.unwrap_or_default();
        for (key, len) in [
            (keys::SCORES, scores.len()),
            (keys::TOKEN_TYPE, token_types.len()),
        ] {
            if len != 0 && len != tokens.len() {
                return Err(meta.invalid(
                    key,
                    format!("has {len} entries but the vocabulary has {}", tokens.len()),
                ));
            }
        }
        let id = |key: &str| meta.optional_token_id(key, tokens.len());
        let add_bos_default = model == "llama";
        let spec = GgufTokenizerSpec {
            source: file.path().to_path_buf(),
            pre: meta.optional_str(keys::PRE)?.map(str::to_owned),
            bos_token_id: id(keys::BOS_ID)?,
            eos_token_id: id(keys::EOS_ID)?,
            eot_token_id: id(keys::EOT_ID)?,
            eom_token_id: id(keys::EOM_ID)?,
            unk_token_id: id(keys::UNK_ID)?,
            pad_token_id: id(keys::PAD_ID)?,
            add_bos_token: meta
                .optional_bool(keys::ADD_BOS)?
                .unwrap_or(add_bos_default),
            add_eos_token: meta.optional_bool(keys::ADD_EOS)?.unwrap_or(false),
            add_space_prefix: meta.optional_bool(keys::ADD_SPACE_PREFIX)?,
            chat_template: meta.optional_str(keys::CHAT_TEMPLATE)?.map(str::to_owned),
            model,
            tokens,
            scores,
            merges,
            token_types,
        };
        Ok(spec)
    }

    /// The text of token `id`, if it exists.
    pub fn token(&self, id: u32) -> Option<&str> {
        self.tokens.get(id as usize).map(String::as_str)
    }

    /// The llama.cpp type of token `id` ([`token_type::NORMAL`] when the file has no types).
    pub fn token_type(&self, id: u32) -> i32 {
        self.token_types
            .get(id as usize)
            .copied()
            .unwrap_or(token_type::NORMAL)
    }

    /// Builds the tokenizer: byte-level BPE for `gpt2`, SentencePiece-style
    /// BPE with byte fallback for `llama`; any other model is an error.
    pub fn build(&self) -> Result<Tokenizer, TokenizerError> {
        let mut tokenizer = match self.model.as_str() {
            "gpt2" => self.build_byte_level()?,
            "llama" => self.build_sentencepiece()?,
            other => {
                return Err(TokenizerError::UnsupportedModel {
                    path: self.source.clone(),
                    model: other.to_owned(),
                })
            }
        };
        if let Some(post) = self.post_processor()? {
            tokenizer.with_post_processor(Some(post));
        }
        Ok(tokenizer)
    }

    /// The special-token facts for the router.
    pub fn info(&self) -> TokenizerInfo {
        let mut eos_token_ids = Vec::new();
        for id in [self.eos_token_id, self.eot_token_id, self.eom_token_id]
            .into_iter()
            .flatten()
        {
            push_unique(&mut eos_token_ids, id);
        }
        for (id, text) in self.tokens.iter().enumerate() {
            let Ok(id) = u32::try_from(id) else { break };
            if self.token_type(id) == token_type::CONTROL
                && KNOWN_END_OF_TURN_TOKENS.contains(&text.as_str())
            {
                push_unique(&mut eos_token_ids, id);
            }
        }
        let text = |id: Option<u32>| id.and_then(|id| self.token(id)).map(str::to_owned);
        TokenizerInfo {
            bos_token: text(self.bos_token_id),
            bos_token_id: self.bos_token_id,
            eos_token: text(self.eos_token_id),
            eos_token_ids,
            pad_token_id: self.pad_token_id,
            add_bos_token: self.add_bos_token && self.bos_token_id.is_some(),
            add_eos_token: self.add_eos_token && self.eos_token_id.is_some(),
            chat_template: self.chat_template.clone(),
        }
    }

    fn build_error(&self, message: impl std::fmt::Display) -> TokenizerError {
        TokenizerError::Build {
            path: self.source.clone(),
            message: message.to_string(),
        }
    }

    fn parsed_merges(&self) -> Result<Vec<(String, String)>, TokenizerError> {
        self.merges
            .iter()
            .enumerate()
            .map(|(i, merge)| {
                merge
                    .split_once(' ')
                    .map(|(a, b)| (a.to_owned(), b.to_owned()))
                    .ok_or_else(|| TokenizerError::InvalidMetadata {
                        path: self.source.clone(),
                        key: keys::MERGES.to_owned(),
                        message: format!(
                            "merge {i} ({merge:?}) is not two tokens separated by a space"
                        ),
                    })
            })
            .collect()
    }

    /// `gpt2`: byte-level BPE. Tokens are spelled in the GPT-2 byte alphabet;
    /// a token that is not (some files store a few as raw text) is respelled
    /// from its UTF-8 bytes. Control tokens become special added tokens and
    /// user-defined tokens plain added tokens, so both are matched whole in text.
    fn build_byte_level(&self) -> Result<Tokenizer, TokenizerError> {
        let alphabet = ByteAlphabet::new();
        let mut vocab = Vocab::default();
        for (id, token) in self.tokens.iter().enumerate() {
            let id = u32::try_from(id).map_err(|_| self.build_error("vocabulary too large"))?;
            let spelled = if alphabet.spells(token) {
                token.clone()
            } else {
                alphabet.spell_bytes(token.as_bytes())
            };
            vocab.insert(spelled, id);
        }
        if self.merges.is_empty() {
            return Err(TokenizerError::MissingKey {
                path: self.source.clone(),
                key: keys::MERGES.to_owned(),
            });
        }
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, self.parsed_merges()?)
            .build()
            .map_err(|e| self.build_error(e))?;
        let mut tokenizer = Tokenizer::new(bpe);
        tokenizer.with_pre_tokenizer(Some(self.byte_level_pre_tokenizer()?));
        tokenizer.with_decoder(Some(ByteLevelDecoder::default()));

        let mut special = Vec::new();
        let mut user_defined = Vec::new();
        for (id, token) in self.tokens.iter().enumerate() {
            let kind = self.token_types.get(id).copied();
            if !alphabet.spells(token) {
                continue;
            }
            match kind {
                Some(token_type::CONTROL) => {
                    special.push(AddedToken::from(token.clone(), true).normalized(false))
                }
                Some(token_type::USER_DEFINED) => {
                    user_defined.push(AddedToken::from(token.clone(), false).normalized(false))
                }
                _ => {}
            }
        }
        tokenizer.add_special_tokens(&special);
        tokenizer.add_tokens(&user_defined);
        Ok(tokenizer)
    }

    fn byte_level_pre_tokenizer(&self) -> Result<PreTokenizerWrapper, TokenizerError> {
        let pattern = self.pre.as_deref().and_then(pre_tokenizer_regex);
        let Some(pattern) = pattern else {
            if let Some(pre) = &self.pre {
                tracing::debug!(pre = %pre, "no specific split for this pre-tokenizer; using GPT-2's");
            }
            return Ok(ByteLevel::new(false, true, true).into());
        };
        let split = Split::new(
            SplitPattern::Regex(pattern.to_owned()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(|e| self.build_error(format!("pre-tokenizer regex: {e}")))?;
        Ok(PreTokenizerSequence::new(vec![
            split.into(),
            ByteLevel::new(false, true, false).into(),
        ])
        .into())
    }

    /// `llama`: a SentencePiece vocabulary run as BPE with byte fallback
    /// (`<0xNN>` tokens): spaces become `▁`, and one `▁` is put before the
    /// text unless `tokenizer.ggml.add_space_prefix` is false.
    fn build_sentencepiece(&self) -> Result<Tokenizer, TokenizerError> {
        let mut vocab = Vocab::default();
        for (id, token) in self.tokens.iter().enumerate() {
            let id = u32::try_from(id).map_err(|_| self.build_error("vocabulary too large"))?;
            vocab.insert(token.clone(), id);
        }
        let merges = if self.merges.is_empty() {
            if self.scores.len() != self.tokens.len() {
                return Err(TokenizerError::MissingKey {
                    path: self.source.clone(),
                    key: format!("{} (or {})", keys::MERGES, keys::SCORES),
                });
            }
            merges_from_scores(&self.tokens, &vocab, &self.scores)
        } else {
            self.parsed_merges()?
        };
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .byte_fallback(true)
            .fuse_unk(true)
            .build()
            .map_err(|e| self.build_error(e))?;
        let mut tokenizer = Tokenizer::new(bpe);

        let add_prefix = self.add_space_prefix.unwrap_or(true);
        let scheme = if add_prefix {
            PrependScheme::First
        } else {
            PrependScheme::Never
        };
        tokenizer.with_pre_tokenizer(Some(Metaspace::new('\u{2581}', scheme, false)));
        let mut decoders: Vec<DecoderWrapper> = vec![
            Replace::new("\u{2581}", " ")
                .map_err(|e| self.build_error(e))?
                .into(),
            ByteFallback::new().into(),
            Fuse::new().into(),
        ];
        if add_prefix {
            decoders.push(Strip::new(' ', 1, 0).into());
        }
        tokenizer.with_decoder(Some(DecoderSequence::new(decoders)));

        let mut special = Vec::new();
        let mut user_defined = Vec::new();
        for (id, token) in self.tokens.iter().enumerate() {
            match self.token_types.get(id).copied() {
                Some(token_type::CONTROL) => {
                    special.push(AddedToken::from(token.clone(), true).normalized(false))
                }
                Some(token_type::USER_DEFINED) => {
                    user_defined.push(AddedToken::from(token.clone(), false).normalized(false))
                }
                _ => {}
            }
        }
        if let Some(unk) = self.unk_token_id.and_then(|id| self.token(id)) {
            if !special.iter().any(|t| t.content == unk) {
                special.push(AddedToken::from(unk.to_owned(), true).normalized(false));
            }
        }
        tokenizer.add_special_tokens(&special);
        tokenizer.add_tokens(&user_defined);
        Ok(tokenizer)
    }

    /// BOS/EOS added around each sequence when the metadata asks for them.
    fn post_processor(&self) -> Result<Option<TemplateProcessing>, TokenizerError> {
        let bos = self.bos_token_id.filter(|_| self.add_bos_token);
        let eos = self.eos_token_id.filter(|_| self.add_eos_token);
        if self.add_bos_token && bos.is_none() {
            tracing::warn!(file = %self.source.display(), "add_bos_token is set but the file has no bos_token_id; not adding BOS");
        }
        if self.add_eos_token && eos.is_none() {
            tracing::warn!(file = %self.source.display(), "add_eos_token is set but the file has no eos_token_id; not adding EOS");
        }
        special_tokens_post_processor(
            bos.map(|id| (id, self.token(id).unwrap_or_default().to_owned())),
            eos.map(|id| (id, self.token(id).unwrap_or_default().to_owned())),
        )
        .map_err(|e| self.build_error(e))
    }
}

/// A `TemplateProcessing` adding `bos` before and `eos` after each sequence
/// (`None` when neither is given). Template ids are placeholders, so token
/// texts with spaces or colons are fine.
fn special_tokens_post_processor(
    bos: Option<(u32, String)>,
    eos: Option<(u32, String)>,
) -> Result<Option<TemplateProcessing>, String> {
    if bos.is_none() && eos.is_none() {
        return Ok(None);
    }
    let mut single = Vec::new();
    let mut pair = Vec::new();
    let mut special_tokens = Vec::new();
    if let Some((id, text)) = bos.clone() {
        special_tokens.push(
            SpecialToken::new("BOS".into(), vec![id], vec![text]).map_err(|e| e.to_string())?,
        );
    }
    if let Some((id, text)) = eos.clone() {
        special_tokens.push(
            SpecialToken::new("EOS".into(), vec![id], vec![text]).map_err(|e| e.to_string())?,
        );
    }
    let wrap = |seq: &str, type_id: u32, out: &mut Vec<String>| {
        if bos.is_some() {
            out.push(format!("BOS:{type_id}"));
        }
        out.push(format!("{seq}:{type_id}"));
        if eos.is_some() {
            out.push(format!("EOS:{type_id}"));
        }
    };
    wrap("$A", 0, &mut single);
    wrap("$A", 0, &mut pair);
    wrap("$B", 1, &mut pair);
    let processor = TemplateProcessing::builder()
        .try_single(single)?
        .try_pair(pair)?
        .special_tokens(special_tokens)
        .build()
        .map_err(|e| e.to_string())?;
    Ok(Some(processor))
}

/// The split regex for llama.cpp pre-tokenizer names whose split differs from
/// GPT-2's; `None` means the GPT-2 split of the byte-level pre-tokenizer.
pub fn pre_tokenizer_regex(pre: &str) -> Option<&'static str> {
    // The Llama 3 split: contractions, letters with one leading non-letter,
    // digits in groups of up to three, punctuation runs, newlines, spaces.
    const LLAMA3: &str = concat!(
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}",
        r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
    );
    // Qwen2: as Llama 3 but every digit on its own.
    const QWEN2: &str = concat!(
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}",
        r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
    );
    match pre {
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "pixtral" | "dbrx" | "smaug-bpe" => {
            Some(LLAMA3)
        }
        "qwen2" | "deepseek-r1-qwen" | "megrez" => Some(QWEN2),
        _ => None,
    }
}

/// Merges implied by a SentencePiece vocabulary without explicit merges,
/// ranked as Transformers ranks them: every cut of a token into two known
/// tokens, ordered by the token's score (best first), then by longer left and
/// right parts; ties keep vocabulary order, and the cuts of one token are
/// ordered by the ids of their parts.
fn merges_from_scores(tokens: &[String], vocab: &Vocab, scores: &[f32]) -> Vec<(String, String)> {
    struct Ranked {
        score: f32,
        left_len: usize,
        right_len: usize,
        left: String,
        right: String,
    }
    let mut ranked: Vec<Ranked> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for (id, token) in tokens.iter().enumerate() {
        if !seen.insert(token.as_str()) {
            continue;
        }
        let score = scores.get(id).copied().unwrap_or(0.0);
        let mut local: Vec<(u32, u32, &str, &str)> = token
            .char_indices()
            .skip(1)
            .filter_map(|(cut, _)| {
                let (left, right) = token.split_at(cut);
                Some((*vocab.get(left)?, *vocab.get(right)?, left, right))
            })
            .collect();
        local.sort_by_key(|&(l, r, _, _)| (l, r));
        ranked.extend(local.into_iter().map(|(_, _, left, right)| Ranked {
            score,
            left_len: left.chars().count(),
            right_len: right.chars().count(),
            left: left.to_owned(),
            right: right.to_owned(),
        }));
    }
    ranked.sort_by(|a, b| {
        b.score
            .total_cmp(&a.score)
            .then(b.left_len.cmp(&a.left_len))
            .then(b.right_len.cmp(&a.right_len))
    });
    ranked.into_iter().map(|r| (r.left, r.right)).collect()
}

fn push_unique(ids: &mut Vec<u32>, id: u32) {
    if !ids.contains(&id) {
        ids.push(id);
    }
}

/// GPT-2's byte alphabet: each byte is spelled as one printable character.
struct ByteAlphabet {
    byte_to_char: [char; 256],
}

impl ByteAlphabet {
    fn new() -> ByteAlphabet {
        let mut byte_to_char = ['\0'; 256];
        let mut next_unprintable = 256u32;
        for (b, slot) in byte_to_char.iter_mut().enumerate() {
            let b32 = b as u32;
            let printable = (0x21..=0x7e).contains(&b32)
                || (0xa1..=0xac).contains(&b32)
                || (0xae..=0xff).contains(&b32);
            let code = if printable {
                b32
            } else {
                let c = next_unprintable;
                next_unprintable += 1;
                c
            };
            *slot = char::from_u32(code).unwrap_or('\u{fffd}');
        }
        ByteAlphabet { byte_to_char }
    }

    fn contains(&self, c: char) -> bool {
        let code = c as u32;
        // The alphabet is the printable Latin-1 bytes plus U+0100..U+0143.
        (0x21..=0x7e).contains(&code)
            || (0xa1..=0xac).contains(&code)
            || (0xae..=0xff).contains(&code)
            || (0x100..0x100 + 68).contains(&code)
    }

    fn spells(&self, token: &str) -> bool {
        token.chars().all(|c| self.contains(c))
    }

    fn spell_bytes(&self, bytes: &[u8]) -> String {
        bytes
            .iter()
            .map(|&b| self.byte_to_char[b as usize])
            .collect()
    }
}

/// Typed access to GGUF metadata with errors naming the file and the key.
struct MetaReader<'a> {
    file: &'a GgufFile,
    path: &'a Path,
}

impl MetaReader<'_> {
    fn wrong_type(&self, key: &str, expected: &'static str, found: &MetaValue) -> TokenizerError {
        let found = match found {
            MetaValue::Array(items) => match items.first() {
                Some(first) => format!("an array of {}", first.type_name()),
                None => "an empty array".to_owned(),
            },
            other => format!("a {}", other.type_name()),
        };
        TokenizerError::WrongType {
            path: self.path.to_path_buf(),
            key: key.to_owned(),
            expected,
            found,
        }
    }

    fn invalid(&self, key: &str, message: String) -> TokenizerError {
        TokenizerError::InvalidMetadata {
            path: self.path.to_path_buf(),
            key: key.to_owned(),
            message,
        }
    }

    fn required_str(&self, key: &str) -> Result<&str, TokenizerError> {
        self.optional_str(key)?
            .ok_or_else(|| TokenizerError::MissingKey {
                path: self.path.to_path_buf(),
                key: key.to_owned(),
            })
    }

    fn optional_str(&self, key: &str) -> Result<Option<&str>, TokenizerError> {
        match self.file.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_str()
                .map(Some)
                .ok_or_else(|| self.wrong_type(key, "a string", v)),
        }
    }

    fn optional_bool(&self, key: &str) -> Result<Option<bool>, TokenizerError> {
        match self.file.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_bool()
                .map(Some)
                .ok_or_else(|| self.wrong_type(key, "a bool", v)),
        }
    }

    fn optional_token_id(&self, key: &str, vocab: usize) -> Result<Option<u32>, TokenizerError> {
        let Some(v) = self.file.get(key) else {
            return Ok(None);
        };
        // Some converters write -1 for "none".
        if v.as_i64() == Some(-1) {
            return Ok(None);
        }
        let id = v
            .as_u64()
            .ok_or_else(|| self.wrong_type(key, "a token id (unsigned integer)", v))?;
        match u32::try_from(id) {
            Ok(id) if (id as usize) < vocab => Ok(Some(id)),
            _ => Err(self.invalid(
                key,
                format!("token id {id} is outside the vocabulary of {vocab} tokens"),
            )),
        }
    }

    fn array(
        &self,
        key: &str,
        expected: &'static str,
    ) -> Result<Option<&[MetaValue]>, TokenizerError> {
        match self.file.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_array()
                .map(Some)
                .ok_or_else(|| self.wrong_type(key, expected, v)),
        }
    }

    fn required_strings(&self, key: &str) -> Result<Vec<String>, TokenizerError> {
        self.optional_strings(key)?
            .ok_or_else(|| TokenizerError::MissingKey {
                path: self.path.to_path_buf(),
                key: key.to_owned(),
            })
    }

    fn optional_strings(&self, key: &str) -> Result<Option<Vec<String>>, TokenizerError> {
        const EXPECTED: &str = "an array of strings";
        let Some(items) = self.array(key, EXPECTED)? else {
            return Ok(None);
        };
        items
            .iter()
            .map(|v| {
                v.as_str().map(str::to_owned).ok_or_else(|| {
                    self.wrong_type(key, EXPECTED, &MetaValue::Array(vec![v.clone()]))
                })
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
    }

    fn optional_f32s(&self, key: &str) -> Result<Option<Vec<f32>>, TokenizerError> {
        const EXPECTED: &str = "an array of numbers";
        let Some(items) = self.array(key, EXPECTED)? else {
            return Ok(None);
        };
        items
            .iter()
            .map(|v| {
                v.as_f64().map(|x| x as f32).ok_or_else(|| {
                    self.wrong_type(key, EXPECTED, &MetaValue::Array(vec![v.clone()]))
                })
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
    }

    fn optional_i32s(&self, key: &str) -> Result<Option<Vec<i32>>, TokenizerError> {
        const EXPECTED: &str = "an array of integers";
        let Some(items) = self.array(key, EXPECTED)? else {
            return Ok(None);
        };
        items
            .iter()
            .map(|v| {
                v.as_i64()
                    .and_then(|x| i32::try_from(x).ok())
                    .ok_or_else(|| {
                        self.wrong_type(key, EXPECTED, &MetaValue::Array(vec![v.clone()]))
                    })
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
    }
}

/// Builds the tokenizer of a GGUF file and its special-token facts.
pub fn load_gguf_tokenizer(file: &GgufFile) -> Result<(Tokenizer, TokenizerInfo), TokenizerError> {
    let spec = GgufTokenizerSpec::from_gguf(file)?;
    let tokenizer = spec.build()?;
    Ok((tokenizer, spec.info()))
}

/// Loads a Hugging Face `tokenizer.json`; `path` may also be the folder holding it.
pub fn load_tokenizer_json(path: impl AsRef<Path>) -> Result<Tokenizer, TokenizerError> {
    let path = path.as_ref();
    let file = if path.is_dir() {
        path.join("tokenizer.json")
    } else {
        path.to_path_buf()
    };
    if !file.is_file() {
        return Err(TokenizerError::Io {
            path: file,
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
        });
    }
    Tokenizer::from_file(&file).map_err(|e| TokenizerError::Load {
        path: file,
        message: e.to_string(),
    })
}

/// What the router needs to know about special tokens, wherever the
/// tokenizer came from.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TokenizerInfo {
    pub bos_token: Option<String>,
    pub bos_token_id: Option<u32>,
    /// The main EOS token's text (what chat templates call `eos_token`).
    pub eos_token: Option<String>,
    /// Every id that ends generation, the main EOS first.
    pub eos_token_ids: Vec<u32>,
    pub pad_token_id: Option<u32>,
    /// Whether the model expects BOS at the start of a prompt. The tokenizers
    /// built or loaded here already add it when encoding with special tokens.
    pub add_bos_token: bool,
    pub add_eos_token: bool,
    /// The Jinja chat template, if the model has one.
    pub chat_template: Option<String>,
}

impl TokenizerInfo {
    /// Whether `id` ends generation.
    pub fn is_eos(&self, id: u32) -> bool {
        self.eos_token_ids.contains(&id)
    }

    /// Reads `tokenizer_config.json`, `generation_config.json`,
    /// `special_tokens_map.json` and `chat_template.jinja` from a Hugging Face
    /// folder (each optional), resolving token texts with `tokenizer`.
    ///
    /// `add_bos_token` comes from `tokenizer_config.json` when it says so,
    /// otherwise from whether `tokenizer` itself puts BOS first.
    pub fn from_hf_dir(
        dir: impl AsRef<Path>,
        tokenizer: &Tokenizer,
    ) -> Result<TokenizerInfo, TokenizerError> {
        let dir = dir.as_ref();
        let config_path = dir.join("tokenizer_config.json");
        let config = read_json_if_exists(&config_path)?;
        let special_map_path = dir.join("special_tokens_map.json");
        let special_map = read_json_if_exists(&special_map_path)?;
        let generation_path = dir.join("generation_config.json");
        let generation = read_json_if_exists(&generation_path)?;

        let token_field = |name: &str| -> Result<Option<String>, TokenizerError> {
            if let Some(config) = &config {
                if let Some(text) = token_text(config, name, &config_path)? {
                    return Ok(Some(text));
                }
            }
            match &special_map {
                Some(map) => token_text(map, name, &special_map_path),
                None => Ok(None),
            }
        };
        let bos_token = token_field("bos_token")?;
        let eos_token = token_field("eos_token")?;
        let pad_token = token_field("pad_token")?;
        let bos_token_id = bos_token.as_deref().and_then(|t| tokenizer.token_to_id(t));
        let pad_token_id = pad_token.as_deref().and_then(|t| tokenizer.token_to_id(t));

        let mut eos_token_ids = Vec::new();
        if let Some(id) = eos_token.as_deref().and_then(|t| tokenizer.token_to_id(t)) {
            push_unique(&mut eos_token_ids, id);
        }
        if let Some(generation) = &generation {
            for id in id_list(generation, "eos_token_id", &generation_path)? {
                push_unique(&mut eos_token_ids, id);
            }
        }
        let added = tokenizer.get_added_tokens_decoder();
        let mut known: Vec<(u32, &AddedToken)> = added
            .iter()
            .filter(|(_, t)| t.special && KNOWN_END_OF_TURN_TOKENS.contains(&t.content.as_str()))
            .map(|(id, t)| (*id, t))
            .collect();
        known.sort_by_key(|(id, _)| *id);
        for (id, _) in known {
            push_unique(&mut eos_token_ids, id);
        }

        let flag = |name: &str| -> Result<Option<bool>, TokenizerError> {
            match config.as_ref().and_then(|c| c.get(name)) {
                None | Some(Json::Null) => Ok(None),
                Some(Json::Bool(b)) => Ok(Some(*b)),
                Some(other) => Err(TokenizerError::Config {
                    path: config_path.clone(),
                    field: name.to_owned(),
                    message: format!("expected true or false, found {other}"),
                }),
            }
        };
        let add_bos_token = match flag("add_bos_token")? {
            Some(b) => b,
            None => match bos_token_id {
                Some(bos) => tokenizer
                    .encode("a", true)
                    .map(|e| e.get_ids().first() == Some(&bos))
                    .unwrap_or(false),
                None => false,
            },
        };
        let add_eos_token = flag("add_eos_token")?.unwrap_or(false);

        let chat_template = hf_chat_template(dir, config.as_ref(), &config_path)?;
        Ok(TokenizerInfo {
            bos_token,
            bos_token_id,
            eos_token,
            eos_token_ids,
            pad_token_id,
            add_bos_token,
            add_eos_token,
            chat_template,
        })
    }
}

fn read_json_if_exists(path: &Path) -> Result<Option<Json>, TokenizerError> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(TokenizerError::Io {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|source| TokenizerError::Json {
            path: path.to_path_buf(),
            source,
        })
}

/// A special token in a tokenizer config: a string, `{"content": ...}`, or null.
fn token_text(config: &Json, name: &str, path: &Path) -> Result<Option<String>, TokenizerError> {
    match config.get(name) {
        None | Some(Json::Null) => Ok(None),
        Some(Json::String(s)) => Ok(Some(s.clone())),
        Some(Json::Object(obj)) => match obj.get("content") {
            Some(Json::String(s)) => Ok(Some(s.clone())),
            _ => Err(TokenizerError::Config {
                path: path.to_path_buf(),
                field: name.to_owned(),
                message: "expected a string or an object with a string `content`".into(),
            }),
        },
        Some(other) => Err(TokenizerError::Config {
            path: path.to_path_buf(),
            field: name.to_owned(),
            message: format!(
                "expected a string or an object with a string `content`, found {other}"
            ),
        }),
    }
}

/// A token-id field that may be an integer, a list of integers, or null.
fn id_list(config: &Json, name: &str, path: &Path) -> Result<Vec<u32>, TokenizerError> {
    let bad = |found: &Json| TokenizerError::Config {
        path: path.to_path_buf(),
        field: name.to_owned(),
        message: format!("expected a token id or a list of token ids, found {found}"),
    };
    let one = |v: &Json| {
        v.as_u64()
            .and_then(|id| u32::try_from(id).ok())
            .ok_or_else(|| bad(v))
    };
    match config.get(name) {
        None | Some(Json::Null) => Ok(Vec::new()),
        Some(Json::Array(items)) => items.iter().map(one).collect(),
        Some(v) => Ok(vec![one(v)?]),
    }
}

/// The chat template of a Hugging Face folder: `chat_template.jinja` if
/// present, else `chat_template` in `tokenizer_config.json`, which is either a
/// string or a list of `{name, template}` (the one named `default`, else the first).
fn hf_chat_template(
    dir: &Path,
    config: Option<&Json>,
    config_path: &Path,
) -> Result<Option<String>, TokenizerError> {
    let jinja = dir.join("chat_template.jinja");
    match std::fs::read_to_string(&jinja) {
        Ok(text) => return Ok(Some(text)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(TokenizerError::Io {
                path: jinja,
                source,
            })
        }
    }
    let bad = |message: String| TokenizerError::Config {
        path: config_path.to_path_buf(),
        field: "chat_template".into(),
        message,
    };
    match config.and_then(|c| c.get("chat_template")) {
        None | Some(Json::Null) => Ok(None),
        Some(Json::String(s)) => Ok(Some(s.clone())),
        Some(Json::Array(items)) => {
            let mut named = Vec::with_capacity(items.len());
            for item in items {
                let name = item.get("name").and_then(Json::as_str);
                let template = item.get("template").and_then(Json::as_str);
                match (name, template) {
                    (Some(name), Some(template)) => named.push((name, template)),
                    _ => {
                        return Err(bad(
                            "each entry of the list needs a string `name` and `template`".into(),
                        ))
                    }
                }
            }
            let chosen = named
                .iter()
                .find(|(name, _)| *name == "default")
                .or_else(|| named.first());
            Ok(chosen.map(|(_, t)| (*t).to_owned()))
        }
        Some(other) => Err(bad(format!(
            "expected a string or a list of {{name, template}}, found {other}"
        ))),
    }
}
