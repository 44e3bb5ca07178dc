//! The engine layer's one error type.

use tessera_model::{
    config::ConfigError, gguf::GgufError, safetensors_folder::SafetensorsError,
    tokenizer::TokenizerError,
};

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("model path {0} does not exist")]
    ModelNotFound(std::path::PathBuf),
    #[error("model path {0} is neither a .gguf file nor a folder with config.json")]
    UnknownModelFormat(std::path::PathBuf),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error(transparent)]
    Safetensors(#[from] SafetensorsError),
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error("tensor {name}: expected shape {expected:?}, found {found:?}")]
    Shape {
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("tensor {name} is missing from {path}")]
    MissingTensor {
        name: String,
        path: std::path::PathBuf,
    },
    #[error("tensor {name}: unsupported dtype {dtype}")]
    UnsupportedDtype { name: String, dtype: String },
    #[error("unsupported dtype {0:?} (expected auto, float32, bfloat16 or float16)")]
    BadDtype(String),
    #[error("unsupported device {0:?} (expected cpu, cuda or cuda:N)")]
    BadDevice(String),
    #[error("device {name} is not available: {}", device_count_note(*.cuda_devices))]
    DeviceUnavailable { name: String, cuda_devices: i64 },
    #[error("request {id}: {message}")]
    Request { id: u64, message: String },
    #[error("batch: {0}")]
    Batch(String),
    #[error("KV cache exhausted: {0}")]
    KvCache(String),
    #[error("tokenizing the prompt failed: {0}")]
    Encode(String),
    #[error("the model has no chat template")]
    NoChatTemplate,
    #[error(transparent)]
    ChatTemplate(#[from] tessera_model::chat_template::ChatTemplateError),
    #[error("{0}")]
    Partition(String),
    #[error(transparent)]
    Collective(#[from] crate::collectives::CollectiveError),
    #[error("decode attention: {0}")]
    Attention(String),
    #[error("rotary embedding: {0}")]
    Rotary(String),
    #[error("MLP activation: {0}")]
    Activation(String),
    #[error("RMSNorm: {0}")]
    Norm(String),
    #[error("packed linear layer: {0}")]
    PackedLinear(String),
    #[error("compressing weights: {0}")]
    Quantize(String),
    #[error("torch: {0}")]
    Torch(#[from] tch::TchError),
}

pub type Result<T> = std::result::Result<T, EngineError>;

/// Why a CUDA device is missing, for [`EngineError::DeviceUnavailable`].
fn device_count_note(cuda_devices: i64) -> String {
    if cuda_devices <= 0 {
        "no CUDA device is usable (a CPU-only build, or no GPU or driver on this machine)".into()
    } else {
        format!(
            "this machine has {cuda_devices} CUDA device(s), cuda:0 to cuda:{}; with --device cuda, shard rank r uses cuda:r, one GPU per rank",
            cuda_devices - 1
        )
    }
}
