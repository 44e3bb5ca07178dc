//! `tessera-shard serve`: the engine behind the router–shard gRPC contract,
//! on a unix socket (default) or TCP.

mod convert;
mod service;
mod worker;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;
use tessera_proto as pb;
use tessera_proto::text_generation_service_server::TextGenerationServiceServer;
use tokio::sync::mpsc;
use tracing::info;

use crate::cli::{engine_config, model_path, ModelArgs};
use crate::device::kind_name;
use crate::engine::Engine;

pub use worker::{CachedBatch, StepOutput};

#[derive(Args, Clone, Debug)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Unix socket path prefix: rank r listens on `<prefix>-<r>`.
    #[arg(
        long,
        env = "TESSERA_SHARD_UDS_PATH",
        default_value = "/tmp/tessera-shard"
    )]
    pub uds_path: PathBuf,
    /// Listen on TCP at this address instead of a unix socket.
    #[arg(long, env = "TESSERA_SHARD_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// This process's rank in its shard group.
    #[arg(long, env = "TESSERA_RANK", default_value_t = 0)]
    pub rank: u32,
    /// Ranks in the shard group (tensor parallelism across more than one rank comes with the c10d collectives).
    #[arg(long, env = "TESSERA_WORLD_SIZE", default_value_t = 1)]
    pub world_size: u32,
    /// Name reported to clients; defaults to the model file or folder name.
    #[arg(long, env = "TESSERA_MODEL_ID")]
    pub model_id: Option<String>,
}

fn model_id(path: &Path) -> String {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string());
    name.strip_suffix(".gguf")
        .map(str::to_string)
        .unwrap_or(name)
}

/// Loads the model, then serves until SIGINT/SIGTERM. The socket appears only
/// once the model is loaded, so waiting for it is waiting for the shard.
pub fn serve(args: ServeArgs) -> anyhow::Result<()> {
    if args.world_size != 1 || args.rank != 0 {
        anyhow::bail!(
            "--world-size {} --rank {}: this build serves one rank per group (world size 1)",
            args.world_size,
            args.rank
        );
    }
    let config = engine_config(&args.model)?;
    let path = model_path(&args.model);
    let engine =
        Engine::load(&path, &config).with_context(|| format!("loading {}", path.display()))?;
    let mc = engine.model_config();
    let socket = PathBuf::from(format!("{}-{}", args.uds_path.display(), args.rank));
    let url = match args.listen {
        Some(addr) => format!("http://{addr}"),
        None => format!("unix://{}", socket.display()),
    };
    let info = pb::InfoResponse {
        model_id: args.model_id.clone().unwrap_or_else(|| model_id(&path)),
        model_path: path.display().to_string(),
        architecture: format!("{:?}", mc.architecture),
        dtype: kind_name(config.kind).to_string(),
        device: format!("{:?}", config.device).to_lowercase(),
        block_size: engine.cache().block_size() as u32,
        num_blocks: engine.cache().num_blocks() as u32,
        rank: args.rank,
        world_size: args.world_size,
        vocab_size: mc.vocab_size as u32,
        max_position_embeddings: mc.max_position_embeddings as u32,
        eos_token_ids: engine.eos_ids().to_vec(),
    };
    let (tx, rx) = mpsc::channel(64);
    let engine_thread = std::thread::Builder::new()
        .name("engine".into())
        .spawn(move || worker::run(engine, rx))
        .context("starting the engine thread")?;
    let service = service::ShardService {
        commands: tx,
        info,
        urls: vec![url.clone()],
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        let server = tonic::transport::Server::builder().add_service(
            TextGenerationServiceServer::new(service).max_decoding_message_size(64 << 20),
        );
        match args.listen {
            Some(addr) => {
                let listener = tokio::net::TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("binding {addr}"))?;
                info!("shard rank {} serving on {url}", args.rank);
                server
                    .serve_with_incoming_shutdown(
                        tokio_stream::wrappers::TcpListenerStream::new(listener),
                        shutdown_signal(),
                    )
                    .await?;
            }
            None => {
                if socket.exists() {
                    std::fs::remove_file(&socket)
                        .with_context(|| format!("removing stale socket {}", socket.display()))?;
                }
                let listener = tokio::net::UnixListener::bind(&socket)
                    .with_context(|| format!("binding {}", socket.display()))?;
                info!("shard rank {} serving on {url}", args.rank);
                let result = server
                    .serve_with_incoming_shutdown(
                        tokio_stream::wrappers::UnixListenerStream::new(listener),
                        shutdown_signal(),
                    )
                    .await;
                let _ = std::fs::remove_file(&socket);
                result?;
            }
        }
        anyhow::Ok(())
    })?;
    // The service (and with it the command sender) is gone: the engine thread ends.
    let _ = engine_thread.join();
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {},
                    _ = term.recv() => {},
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
    info!("shard shutting down");
}
