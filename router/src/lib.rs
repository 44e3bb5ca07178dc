//! The Tessera router: validates HTTP requests (TGI and OpenAI schemas), batches
//! them continuously and drives the shard ranks over gRPC.

pub mod batcher;
pub mod client;
pub mod config;
pub mod http;
pub mod infer;
pub mod metrics;
pub mod validation;
