//! The Tessera router: validates HTTP requests (TGI and OpenAI schemas), spreads
//! them over one or more replicas (independent shard groups of the same model),
//! batches them continuously per replica and drives the shard ranks over gRPC.

pub mod batcher;
pub mod client;
pub mod config;
pub mod http;
pub mod infer;
pub mod metrics;
pub mod startup;
pub mod validation;
