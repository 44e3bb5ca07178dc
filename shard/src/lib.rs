//! The Tessera shard: runs a Llama-family model on libtorch through `tch`, with a
//! paged KV cache, batched prefill and decode, and per-sequence sampling.

pub mod attention;
pub mod bench;
pub mod cli;
pub mod collectives;
pub mod cpu_attention;
pub mod cpu_mlp;
pub mod cpu_norm;
pub mod cpu_rotary;
pub mod device;
pub mod element;
pub mod engine;
pub mod error;
pub mod json_mode;
pub mod kv_cache;
pub mod linear;
pub mod memory;
pub mod model;
pub mod model_files;
pub mod packed_linear;
pub mod parallel;
pub mod partition;
pub mod quant_matmul;
pub mod sampling;
pub mod server;
pub mod simd;
pub mod stage_timing;
pub mod stopping;
pub mod weights;

pub use engine::{Batch, Engine, EngineConfig, GenerateRequest, Generation};
pub use error::{EngineError, Result};
