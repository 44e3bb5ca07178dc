//! `tessera-loadgen`: drives a server's streaming HTTP API (OpenAI
//! completions or TGI `generate_stream`) with closed-loop clients or Poisson
//! arrivals and reports TTFT, TPOT, ITL, end-to-end latency and output tokens/s.

pub mod api;
pub mod arrivals;
pub mod cli;
pub mod client;
pub mod error;
pub mod prompt;
pub mod report;
pub mod runner;
pub mod server_metrics;
pub mod sse;
pub mod stats;

pub use api::ApiKind;
pub use error::LoadgenError;
pub use report::{PhaseKind, PhaseReport, RunReport};
pub use runner::{run, RunConfig};
