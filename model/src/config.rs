//! The model configuration the engine runs on, read from GGUF metadata or from a
//! Hugging Face `config.json`, and the rotary embedding frequencies it implies.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::gguf::{GgufError, GgufFile};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a valid model config: {source}")]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("unsupported architecture {found:?} in {path} (supported: Llama 2/3, Mistral, Qwen2, SmolLM, TinyLlama)")]
    UnsupportedArchitecture { path: PathBuf, found: String },
    #[error("{path}: {key} must be {expected}, found {found}")]
    Invalid {
        path: PathBuf,
        key: String,
        expected: String,
        found: String,
    },
    #[error(transparent)]
    Gguf(#[from] GgufError),
}

/// The families the engine implements. SmolLM and TinyLlama are Llama.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Architecture {
    Llama,
    Mistral,
    Qwen2,
}

impl Architecture {
    fn parse(name: &str) -> Option<Self> {
        match name.to_ascii_lowercase().as_str() {
            "llama" | "llamaforcausallm" => Some(Self::Llama),
            "mistral" | "mistralforcausallm" => Some(Self::Mistral),
            "qwen2" | "qwen2forcausallm" => Some(Self::Qwen2),
            _ => None,
        }
    }
}

/// How rotary frequencies are rescaled for long contexts.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Position interpolation: every frequency divided by `factor`.
    Linear { factor: f64 },
    /// Llama 3.1's frequency-dependent scaling.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
    /// Per-frequency divisors as stored by llama.cpp in `rope_freqs.weight`.
    Factors(Vec<f32>),
}

#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: Option<RopeScaling>,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// Biases on the q, k and v projections (Qwen2).
    pub attention_bias: bool,
}

impl ModelConfig {
    /// Inverse rotary frequencies, one per pair of head dimensions, scaling applied.
    pub fn rope_inv_freq(&self) -> Vec<f64> {
        let half = self.head_dim / 2;
        let base: Vec<f64> = (0..half)
            .map(|i| 1.0 / self.rope_theta.powf((2 * i) as f64 / self.head_dim as f64))
            .collect();
        match &self.rope_scaling {
            None => base,
            Some(RopeScaling::Linear { factor }) => base.iter().map(|f| f / factor).collect(),
            Some(RopeScaling::Factors(factors)) => base
                .iter()
                .zip(factors.iter().chain(std::iter::repeat(&1.0)))
                .map(|(f, d)| f / *d as f64)
                .collect(),
            Some(RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings: old_ctx,
            }) => {
                let low_wavelen = old_ctx / low_freq_factor;
                let high_wavelen = old_ctx / high_freq_factor;
                base.iter()
                    .map(|&f| {
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        if wavelen < high_wavelen {
                            f
                        } else if wavelen > low_wavelen {
                            f / factor
                        } else {
                            let smooth = (old_ctx / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect()
            }
        }
    }

    /// Checks the invariants the engine relies on, naming the offending key.
    fn validate(self, path: &Path) -> Result<Self, ConfigError> {
        let bad = |key: &str, expected: &str, found: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            key: key.to_string(),
            expected: expected.to_string(),
            found,
        };
        for (key, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_layers),
            ("num_attention_heads", self.num_heads),
            ("num_key_value_heads", self.num_kv_heads),
            ("head_dim", self.head_dim),
        ] {
            if v == 0 {
                return Err(bad(key, "a positive integer", v.to_string()));
            }
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return Err(bad(
                "num_key_value_heads",
                &format!("a divisor of num_attention_heads ({})", self.num_heads),
                self.num_kv_heads.to_string(),
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(bad("head_dim", "an even number", self.head_dim.to_string()));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return Err(bad(
                "rope_theta",
                "a positive number",
                self.rope_theta.to_string(),
            ));
        }
        Ok(self)
    }

    /// Reads the configuration from GGUF metadata (`<arch>.*` keys) and tensor index.
    pub fn from_gguf(file: &GgufFile) -> Result<Self, ConfigError> {
        let path = file.path().to_path_buf();
        let arch_name = file.get_str("general.architecture")?.to_string();
        let architecture = Architecture::parse(&arch_name).ok_or_else(|| {
            ConfigError::UnsupportedArchitecture {
                path: path.clone(),
                found: arch_name.clone(),
            }
        })?;
        let key = |k: &str| format!("{arch_name}.{k}");
        let usize_key =
            |k: &str| -> Result<usize, ConfigError> { Ok(file.get_u64(&key(k))? as usize) };
        let hidden_size = usize_key("embedding_length")?;
        let num_heads = usize_key("attention.head_count")?;
        let num_kv_heads = match file.get(&key("attention.head_count_kv")) {
            Some(v) => v.as_u64().ok_or_else(|| ConfigError::Invalid {
                path: path.clone(),
                key: key("attention.head_count_kv"),
                expected: "an integer".into(),
                found: format!("{v:?}"),
            })? as usize,
            None => num_heads,
        };
        let head_dim = match file.get(&key("attention.key_length")) {
            Some(v) => v.as_u64().unwrap_or(0) as usize,
            None if num_heads > 0 => hidden_size / num_heads,
            None => 0,
        };
        let vocab_size = match file.get(&key("vocab_size")).and_then(|v| v.as_u64()) {
            Some(v) => v as usize,
            None => match file.tensor("token_embd.weight") {
                Some(t) => t.shape().first().copied().unwrap_or(0),
                None => file
                    .get("tokenizer.ggml.tokens")
                    .and_then(|v| v.as_array())
                    .map(|a| a.len())
                    .unwrap_or(0),
            },
        };
        let rope_scaling = if let Some(t) = file.tensor("rope_freqs.weight") {
            let _ = t;
            Some(RopeScaling::Factors(file.dequantize("rope_freqs.weight")?))
        } else {
            match file.get(&key("rope.scaling.type")).and_then(|v| v.as_str()) {
                Some("linear") => Some(RopeScaling::Linear {
                    factor: file.get_f64(&key("rope.scaling.factor"))?,
                }),
                _ => None,
            }
        };
        let config = ModelConfig {
            architecture,
            vocab_size,
            hidden_size,
            intermediate_size: usize_key("feed_forward_length")?,
            num_layers: usize_key("block_count")?,
            num_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: file
                .get(&key("attention.layer_norm_rms_epsilon"))
                .and_then(|v| v.as_f64())
                .unwrap_or(1e-5),
            rope_theta: file
                .get(&key("rope.freq_base"))
                .and_then(|v| v.as_f64())
                .unwrap_or(10_000.0),
            rope_scaling,
            max_position_embeddings: file
                .get(&key("context_length"))
                .and_then(|v| v.as_u64())
                .unwrap_or(4096) as usize,
            tie_word_embeddings: file.tensor("output.weight").is_none(),
            attention_bias: file.tensor("blk.0.attn_q.bias").is_some(),
        };
        config.validate(&path)
    }

    /// Reads a Hugging Face `config.json`.
    pub fn from_hf_json(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let raw: HfConfig = serde_json::from_str(&text).map_err(|source| ConfigError::Json {
            path: path.to_path_buf(),
            source,
        })?;
        let arch_name = raw
            .model_type
            .clone()
            .or_else(|| raw.architectures.as_ref().and_then(|a| a.first().cloned()))
            .unwrap_or_default();
        let architecture = Architecture::parse(&arch_name).ok_or_else(|| {
            ConfigError::UnsupportedArchitecture {
                path: path.to_path_buf(),
                found: arch_name.clone(),
            }
        })?;
        let num_kv_heads = raw.num_key_value_heads.unwrap_or(raw.num_attention_heads);
        let head_dim = raw
            .head_dim
            .unwrap_or(raw.hidden_size / raw.num_attention_heads.max(1));
        let rope_scaling = match raw.rope_scaling {
            None => None,
            Some(s) => {
                let kind = s.rope_type.or(s.kind).unwrap_or_default();
                match kind.as_str() {
                    "default" => None,
                    "linear" => Some(RopeScaling::Linear {
                        factor: s.factor.unwrap_or(1.0),
                    }),
                    "llama3" => Some(RopeScaling::Llama3 {
                        factor: s.factor.unwrap_or(8.0),
                        low_freq_factor: s.low_freq_factor.unwrap_or(1.0),
                        high_freq_factor: s.high_freq_factor.unwrap_or(4.0),
                        original_max_position_embeddings: s
                            .original_max_position_embeddings
                            .unwrap_or(8192.0),
                    }),
                    other => {
                        return Err(ConfigError::Invalid {
                            path: path.to_path_buf(),
                            key: "rope_scaling.rope_type".into(),
                            expected: "one of default, linear, llama3".into(),
                            found: other.to_string(),
                        })
                    }
                }
            }
        };
        let config = ModelConfig {
            architecture,
            vocab_size: raw.vocab_size,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_layers: raw.num_hidden_layers,
            num_heads: raw.num_attention_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: raw.rms_norm_eps.unwrap_or(1e-6),
            rope_theta: raw.rope_theta.unwrap_or(10_000.0),
            rope_scaling,
            max_position_embeddings: raw.max_position_embeddings.unwrap_or(4096),
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
            attention_bias: raw
                .attention_bias
                .unwrap_or(architecture == Architecture::Qwen2),
        };
        config.validate(path)
    }
}

#[derive(Deserialize)]
struct HfConfig {
    model_type: Option<String>,
    architectures: Option<Vec<String>>,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_scaling: Option<HfRopeScaling>,
    max_position_embeddings: Option<usize>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
}

#[derive(Deserialize)]
struct HfRopeScaling {
    rope_type: Option<String>,
    #[serde(rename = "type")]
    kind: Option<String>,
    factor: Option<f64>,
    low_freq_factor: Option<f64>,
    high_freq_factor: Option<f64>,
    original_max_position_embeddings: Option<f64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> ModelConfig {
        ModelConfig {
            architecture: Architecture::Llama,
            vocab_size: 10,
            hidden_size: 8,
            intermediate_size: 16,
            num_layers: 1,
            num_heads: 2,
            num_kv_heads: 1,
            head_dim: 4,
            rms_norm_eps: 1e-5,
            rope_theta: 10_000.0,
            rope_scaling: None,
            max_position_embeddings: 64,
            tie_word_embeddings: true,
            attention_bias: false,
        }
    }

    #[test]
    fn inv_freq_unscaled() {
        let f = base().rope_inv_freq();
        assert_eq!(f.len(), 2);
        assert!((f[0] - 1.0).abs() < 1e-12);
        assert!((f[1] - 0.01).abs() < 1e-12);
    }

    #[test]
    fn llama3_scaling_keeps_high_and_divides_low_frequencies() {
        let mut c = base();
        c.head_dim = 64;
        c.rope_theta = 500_000.0;
        c.rope_scaling = Some(RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192.0,
        });
        let scaled = c.rope_inv_freq();
        c.rope_scaling = None;
        let plain = c.rope_inv_freq();
        assert_eq!(scaled[0], plain[0]);
        assert!((scaled[31] - plain[31] / 8.0).abs() < 1e-15);
    }

    #[test]
    fn rejects_heads_not_divisible_by_kv_heads() {
        let mut c = base();
        c.num_heads = 3;
        c.num_kv_heads = 2;
        let err = c.validate(Path::new("x")).unwrap_err().to_string();
        assert!(err.contains("num_key_value_heads"), "{err}");
    }

    #[test]
    fn unknown_architecture_is_named() {
        let dir = std::env::temp_dir().join(format!("tessera-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("config.json");
        std::fs::write(
            &p,
            r#"{"model_type":"gpt_neox","vocab_size":1,"hidden_size":1,"intermediate_size":1,"num_hidden_layers":1,"num_attention_heads":1}"#,
        )
        .unwrap();
        let err = ModelConfig::from_hf_json(&p).unwrap_err().to_string();
        assert!(err.contains("gpt_neox"), "{err}");
    }
}
