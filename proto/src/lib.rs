//! Generated types and tonic client/server for the router-shard contract
//! (`proto/generate.proto`).

#[allow(clippy::all, clippy::pedantic)]
pub mod generate {
    pub mod v1 {
        tonic::include_proto!("tessera.generate.v1");
    }
}

pub use generate::v1::*;
