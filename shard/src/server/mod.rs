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
use crate::collectives::GroupConfig;
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
    /// Listen on TCP instead of a unix socket: rank 0 at this address, rank r at its
    /// port + r.
    #[arg(long, env = "TESSERA_SHARD_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// This process's rank in its tensor-parallel shard group.
    #[arg(long, env = "TESSERA_RANK", default_value_t = 0)]
    pub rank: u32,
    /// Ranks in the shard group; the model is split over them (tensor parallelism).
    #[arg(long, env = "TESSERA_WORLD_SIZE", default_value_t = 1)]
    pub world_size: u32,
    /// Host of rank 0's rendezvous store (c10d TCPStore), like torch's MASTER_ADDR.
    #[arg(long, env = "TESSERA_MASTER_ADDR", default_value = "127.0.0.1")]
    pub master_addr: String,
    /// Port of rank 0's rendezvous store, like torch's MASTER_PORT.
    #[arg(long, env = "TESSERA_MASTER_PORT", default_value_t = 29500)]
    pub master_port: u16,
    /// Seconds to wait for the other ranks to join, and for any collective.
    #[arg(long, env = "TESSERA_COLLECTIVE_TIMEOUT", default_value_t = 120)]
    pub collective_timeout: u64,
    /// Name reported to clients; defaults to the model file or folder name.
    #[arg(long, env = "TESSERA_MODEL_ID")]
    pub model_id: Option<String>,
    /// Compute each batch's next decode step while the router handles the last one
    /// (hides the router round trip; outputs are the same either way).
    #[arg(long, env = "TESSERA_RUN_AHEAD", default_value_t = true, action = clap::ArgAction::Set)]
    pub run_ahead: bool,
    /// Log as JSON lines.
    #[arg(long, env = "TESSERA_JSON_OUTPUT")]
    pub json_output: bool,
    /// Export traces over OTLP/gRPC to this collector (e.g.
    /// http://localhost:4317). Without it, `OTEL_EXPORTER_OTLP_ENDPOINT` (or
    /// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) turns export on.
    #[arg(long, env = "TESSERA_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
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

/// Sets up logs and traces (service `tessera-shard` with resource attributes
/// `tessera.rank` and `tessera.world_size`), loads the model, then serves until
/// SIGINT/SIGTERM and flushes the spans still buffered. The socket appears only
/// once the model is loaded, so waiting for it is waiting for the shard.
pub fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let mut config = tessera_telemetry::TelemetryConfig::new("tessera-shard");
    config.json = args.json_output;
    config.otlp_endpoint = args.otlp_endpoint.clone();
    config.resource = vec![
        ("tessera.rank", i64::from(args.rank)),
        ("tessera.world_size", i64::from(args.world_size)),
    ];
    // The exporter's batch processor and gRPC channel run on this runtime.
    let telemetry = {
        let _runtime = runtime.enter();
        tessera_telemetry::init(&config).context("setting up logs and traces")?
    };
    let result = load_and_serve(args, &runtime);
    runtime.block_on(telemetry.shutdown(std::time::Duration::from_secs(5)));
    result
}

fn load_and_serve(args: ServeArgs, runtime: &tokio::runtime::Runtime) -> anyhow::Result<()> {
    if args.world_size == 0 || args.rank >= args.world_size {
        anyhow::bail!(
            "--rank {} must be below --world-size {}",
            args.rank,
            args.world_size
        );
    }
    let mut config = engine_config(&args.model)?;
    if args.world_size > 1 {
        config.group = Some(GroupConfig {
            rank: args.rank as usize,
            world_size: args.world_size as usize,
            master_addr: args.master_addr.clone(),
            master_port: args.master_port,
            timeout: std::time::Duration::from_secs(args.collective_timeout.max(1)),
            nccl: config.device.is_cuda(),
        });
    }
    let path = model_path(&args.model);
    let rank_url = |rank: u32| match args.listen {
        Some(addr) => format!(
            "http://{}",
            SocketAddr::new(addr.ip(), addr.port().saturating_add(rank as u16))
        ),
        None => format!("unix://{}-{rank}", args.uds_path.display()),
    };
    let socket = PathBuf::from(format!("{}-{}", args.uds_path.display(), args.rank));
    let listen = args
        .listen
        .map(|a| SocketAddr::new(a.ip(), a.port().saturating_add(args.rank as u16)));
    let url = rank_url(args.rank);
    let urls: Vec<String> = (0..args.world_size).map(rank_url).collect();
    let (tx, rx) = mpsc::channel(64);
    let run_ahead = args.run_ahead;
    // The model is loaded on the engine thread, which then runs every step: libtorch's
    // OpenMP runtime (libgomp) keeps a pool of worker threads per thread that starts
    // parallel work, and once its pools hold more threads than the machine has cores,
    // idle workers stop spinning between operators and sleep, so that every operator
    // pays to wake them. Loading on the main thread left a second pool behind, which made
    // one-stream decode steps 2.5x slower on a 2-core machine (27 ms against 11 ms).
    let (loaded_tx, loaded_rx) = std::sync::mpsc::channel();
    let describe = {
        let (model_id, path) = (args.model_id.clone(), path.clone());
        let (rank, world_size) = (args.rank, args.world_size);
        let (kind, device) = (config.kind, config.device);
        move |engine: &Engine| {
            let mc = engine.model_config();
            pb::InfoResponse {
                model_id: model_id.unwrap_or_else(|| self::model_id(&path)),
                model_path: path.display().to_string(),
                architecture: format!("{:?}", mc.architecture),
                dtype: kind_name(kind).to_string(),
                device: format!("{device:?}").to_lowercase(),
                block_size: engine.cache().block_size() as u32,
                num_blocks: engine.cache().num_blocks() as u32,
                rank,
                world_size,
                vocab_size: mc.vocab_size as u32,
                max_position_embeddings: mc.max_position_embeddings as u32,
                eos_token_ids: engine.eos_ids().to_vec(),
            }
        }
    };
    let load_path = path.clone();
    let engine_thread = std::thread::Builder::new()
        .name("engine".into())
        .spawn(move || match Engine::load(&load_path, &config) {
            Ok(engine) => {
                if loaded_tx.send(Ok(describe(&engine))).is_ok() {
                    worker::run(engine, rx, run_ahead);
                }
            }
            Err(e) => {
                let _ = loaded_tx.send(Err(e));
            }
        })
        .context("starting the engine thread")?;
    let info = loaded_rx
        .recv()
        .context("the engine thread ended while loading the model")?
        .with_context(|| format!("loading {}", path.display()))?;
    let service = service::ShardService {
        commands: tx,
        info,
        urls,
    };
    runtime.block_on(async move {
        let server = tonic::transport::Server::builder().add_service(
            TextGenerationServiceServer::new(service).max_decoding_message_size(64 << 20),
        );
        match listen {
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
