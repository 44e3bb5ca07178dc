//! `tessera serve`: starts the shard ranks (`--num-shard` ranks of tensor parallelism
//! in each of `--replicas` groups), waits until they have loaded the model, starts the
//! router (which warms them up), waits for it to be healthy, prints the URL, and
//! supervises: SIGINT/SIGTERM drain gracefully. A rank that dies takes its group out
//! of service; `tessera` stops everything and exits non-zero once no group is whole
//! (with one group, at the first death), or when the router dies.

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};
use tokio::sync::watch;

#[derive(Args, Debug, Clone)]
pub struct ServeArgs {
    /// A .gguf file or a Hugging Face folder; defaults to the embedded SmolLM2-135M-Instruct.
    #[arg(long, env = "TESSERA_MODEL")]
    pub model: Option<PathBuf>,
    /// auto (bfloat16 on a GPU and on a CPU with AVX-512 or AMX, float32 on other CPUs),
    /// float32, bfloat16 or float16.
    #[arg(long, env = "TESSERA_DTYPE", default_value = "auto")]
    pub dtype: String,
    /// cpu, cuda or cuda:N.
    #[arg(long, env = "TESSERA_DEVICE", default_value = "cpu")]
    pub device: String,
    /// Shard ranks per group: the model is split over them (tensor parallelism; with
    /// CUDA one GPU per rank).
    #[arg(long, env = "TESSERA_NUM_SHARD", default_value_t = 1)]
    pub num_shard: u32,
    /// Independent shard groups behind the router (data parallelism), each with its
    /// own batch and KV cache.
    #[arg(long, env = "TESSERA_REPLICAS", default_value_t = 1)]
    pub replicas: u32,
    /// Host of each group's rendezvous store (c10d TCPStore on rank 0).
    #[arg(long, env = "TESSERA_MASTER_ADDR", default_value = "127.0.0.1")]
    pub master_addr: String,
    /// Port of group 0's rendezvous store (group g uses this + g); default: free ports.
    #[arg(long, env = "TESSERA_MASTER_PORT")]
    pub master_port: Option<u16>,
    /// Address the HTTP API listens on.
    #[arg(long, env = "TESSERA_HOSTNAME", default_value = "0.0.0.0")]
    pub hostname: IpAddr,
    /// Port of the HTTP API.
    #[arg(long, short, env = "TESSERA_PORT", default_value_t = 3000)]
    pub port: u16,
    /// Requests in flight at once; more get 429.
    #[arg(long, env = "TESSERA_MAX_CONCURRENT_REQUESTS", default_value_t = 128)]
    pub max_concurrent_requests: usize,
    /// Require `Authorization: Bearer KEY`.
    #[arg(long, env = "TESSERA_API_KEY")]
    pub api_key: Option<String>,
    /// KV cache capacity in tokens per shard (all requests together).
    #[arg(long, env = "TESSERA_KV_TOKENS", default_value_t = 32_768)]
    pub kv_tokens: usize,
    /// Tokens per KV cache block.
    #[arg(long, env = "TESSERA_BLOCK_SIZE", default_value_t = 16)]
    pub block_size: usize,
    /// Intra-op CPU threads per shard rank (0: libtorch's default with one rank, the
    /// cores shared out evenly with several).
    #[arg(long, env = "TESSERA_THREADS", default_value_t = 0)]
    pub threads: i32,
    /// Shards compute each batch's next decode step while the router handles the last
    /// one, hiding the router round trip (outputs are the same either way).
    #[arg(long, env = "TESSERA_RUN_AHEAD", default_value_t = true, action = clap::ArgAction::Set)]
    pub run_ahead: bool,
    /// Name reported by /info and /v1/models.
    #[arg(long, env = "TESSERA_MODEL_ID")]
    pub model_id: Option<String>,
    /// Unix socket prefix of the shards (default: one per launcher process under /tmp).
    #[arg(long, env = "TESSERA_SHARD_UDS_PATH")]
    pub shard_uds_path: Option<PathBuf>,
    /// Log as JSON lines (router and shards).
    #[arg(long, env = "TESSERA_JSON_OUTPUT")]
    pub json_output: bool,
    /// Export traces over OTLP/gRPC to this collector (e.g.
    /// http://localhost:4317), from the router and every shard rank. The
    /// standard OTEL_* variables (OTEL_EXPORTER_OTLP_ENDPOINT, OTEL_SERVICE_NAME,
    /// OTEL_RESOURCE_ATTRIBUTES, ...) reach them too.
    #[arg(long, env = "TESSERA_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// More flags for tessera-router (its limits and batching settings: see
    /// `tessera-router --help`; each also has an environment variable), after `--`.
    #[arg(last = true)]
    pub router_args: Vec<String>,
}

/// A sibling binary: `$<env>`, or `<name>` next to this executable.
fn sibling(name: &str, env: &str) -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os(env) {
        return Ok(PathBuf::from(path));
    }
    let me = std::env::current_exe().context("locating the tessera executable")?;
    let path = me
        .parent()
        .context("the tessera executable has no folder")?
        .join(name);
    if !path.is_file() {
        bail!(
            "{} is missing; build it with `cargo build --release --workspace` or set {env}",
            path.display()
        );
    }
    Ok(path)
}

fn terminate(child: &Child) {
    if let Some(pid) = child.id() {
        // SAFETY: kill(2) with a pid we spawned and a valid signal number.
        unsafe {
            libc::kill(pid as libc::pid_t, libc::SIGTERM);
        }
    }
}

/// Sends SIGTERM and waits up to `grace` before killing.
async fn stop(child: &mut Child, grace: Duration) {
    terminate(child);
    if tokio::time::timeout(grace, child.wait()).await.is_err() {
        let _ = child.kill().await;
    }
}

/// Whether GET /health on the router answers 200.
async fn healthy(port: u16) -> bool {
    let Ok(mut stream) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else {
        return false;
    };
    let request = "GET /health HTTP/1.0\r\nHost: localhost\r\n\r\n";
    if stream.write_all(request.as_bytes()).await.is_err() {
        return false;
    }
    let mut head = [0u8; 16];
    match tokio::time::timeout(Duration::from_secs(5), stream.read(&mut head)).await {
        Ok(Ok(n)) => std::str::from_utf8(&head[..n]).is_ok_and(|s| s.contains(" 200")),
        _ => false,
    }
}

/// Waits until every rank's socket exists, failing if any rank exits first.
async fn wait_for_sockets(shards: &mut [Shard]) -> anyhow::Result<()> {
    loop {
        let mut ready = true;
        for shard in shards.iter_mut() {
            if let Some(status) = shard.child.try_wait()? {
                bail!(
                    "{} exited ({status}) before it was ready: the model could not be loaded (see its log above)",
                    shard.name
                );
            }
            ready &= shard.socket.exists();
        }
        if ready {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One shard process.
struct Shard {
    group: usize,
    name: String,
    socket: PathBuf,
    child: Child,
    alive: bool,
}

/// A port nobody listens on now (for a group's rendezvous).
fn free_port() -> anyhow::Result<u16> {
    let listener =
        std::net::TcpListener::bind("127.0.0.1:0").context("finding a free rendezvous port")?;
    Ok(listener.local_addr()?.port())
}

/// The device of rank `index` (counted over all groups): `cuda` gives each rank its own GPU.
fn rank_device(device: &str, index: u32, total: u32) -> anyhow::Result<String> {
    if device == "cuda" {
        return Ok(format!("cuda:{index}"));
    }
    if device.starts_with("cuda:") && total > 1 {
        bail!(
            "--device {device} names one GPU but {total} shard ranks need one each; use --device cuda"
        );
    }
    Ok(device.to_string())
}

async fn stop_all(shards: &mut [Shard], grace: Duration) {
    for shard in shards.iter() {
        terminate(&shard.child);
    }
    for shard in shards.iter_mut() {
        stop(&mut shard.child, grace).await;
    }
}

enum Stop {
    Signal,
    ShardsDied(String),
    RouterDied(std::process::ExitStatus),
}

/// Listens for SIGINT and SIGTERM from now on (so that a stop asked while the model is
/// still loading is not lost, and the default action cannot kill the launcher and leave
/// its shards running); the receiver turns `true` at the first one.
fn stop_requests() -> anyhow::Result<watch::Receiver<bool>> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        tokio::select! {
            _ = int.recv() => {},
            _ = term.recv() => {},
        }
        let _ = tx.send(true);
    });
    Ok(rx)
}

/// Returns once a stop was asked (at once if it already was).
async fn stop_requested(rx: &mut watch::Receiver<bool>) {
    // An error means the listener is gone: no stop can come any more.
    if rx.wait_for(|stop| *stop).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Returns when no group is whole any more, describing the deaths.
async fn watch_shards(shards: &mut [Shard], groups: usize) -> String {
    let mut deaths = Vec::new();
    loop {
        for shard in shards.iter_mut().filter(|s| s.alive) {
            if let Ok(Some(status)) = shard.child.try_wait() {
                shard.alive = false;
                let what = format!("{} died ({status})", shard.name);
                eprintln!("tessera: {what}; its group is out of service");
                deaths.push(what);
            }
        }
        let whole = (0..groups)
            .filter(|&g| shards.iter().filter(|s| s.group == g).all(|s| s.alive))
            .count();
        if whole == 0 {
            return deaths.join("; ");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

pub async fn serve(args: ServeArgs) -> anyhow::Result<ExitCode> {
    if args.num_shard == 0 || args.replicas == 0 {
        bail!("--num-shard and --replicas must be at least 1");
    }
    let mut stop_rx = stop_requests()?;
    let shard_bin = sibling("tessera-shard", "TESSERA_SHARD_BIN")?;
    let router_bin = sibling("tessera-router", "TESSERA_ROUTER_BIN")?;
    let uds = args
        .shard_uds_path
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("/tmp/tessera-{}-shard", std::process::id())));
    let (ranks, groups) = (args.num_shard, args.replicas);
    // CPU ranks share the machine's cores: libtorch's default (all cores in every
    // rank) oversubscribes them, and its spinning workers then starve each other.
    let threads = if args.threads == 0 && args.device == "cpu" && ranks * groups > 1 {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as u32;
        (cores / (ranks * groups)).max(1) as i32
    } else {
        args.threads
    };
    let mut shards: Vec<Shard> = Vec::new();
    let mut group_uris = Vec::new();
    for g in 0..groups {
        // One group keeps the plain prefix (<prefix>-<rank>); several get <prefix>-g<g>.
        let prefix = if groups == 1 {
            uds.clone()
        } else {
            PathBuf::from(format!("{}-g{g}", uds.display()))
        };
        let port = match args.master_port {
            Some(p) => p
                .checked_add(g as u16)
                .context("--master-port + replicas overflows")?,
            None => free_port()?,
        };
        group_uris.push(format!("unix://{}-0", prefix.display()));
        for r in 0..ranks {
            let socket = PathBuf::from(format!("{}-{r}", prefix.display()));
            let _ = std::fs::remove_file(&socket);
            let device = rank_device(&args.device, g * ranks + r, groups * ranks)?;
            let mut cmd = Command::new(&shard_bin);
            cmd.arg("serve")
                .args(["--uds-path", &prefix.display().to_string()])
                .args(["--rank", &r.to_string(), "--world-size", &ranks.to_string()])
                .args(["--master-addr", &args.master_addr])
                .args(["--master-port", &port.to_string()])
                .args(["--dtype", &args.dtype, "--device", &device])
                .args(["--kv-tokens", &args.kv_tokens.to_string()])
                .args(["--block-size", &args.block_size.to_string()])
                .args(["--threads", &threads.to_string()])
                .args(["--run-ahead", &args.run_ahead.to_string()]);
            if let Some(model) = &args.model {
                cmd.arg("--model").arg(model);
            }
            if let Some(id) = &args.model_id {
                cmd.args(["--model-id", id]);
            }
            if args.json_output {
                cmd.arg("--json-output");
            }
            if let Some(endpoint) = &args.otlp_endpoint {
                cmd.args(["--otlp-endpoint", endpoint]);
            }
            let name = if groups == 1 {
                format!("shard rank {r}")
            } else {
                format!("shard rank {r} of replica {g}")
            };
            let child = match cmd.kill_on_drop(true).spawn() {
                Ok(child) => child,
                Err(e) => {
                    stop_all(&mut shards, Duration::from_secs(10)).await;
                    return Err(e).with_context(|| format!("starting {}", shard_bin.display()));
                }
            };
            shards.push(Shard {
                group: g as usize,
                name,
                socket,
                child,
                alive: true,
            });
        }
    }
    eprintln!(
        "tessera: loading the model in {} shard rank(s) ({ranks} per group, {groups} group(s)) ...",
        shards.len()
    );
    let loaded = tokio::select! {
        r = wait_for_sockets(&mut shards) => Some(r),
        _ = stop_requested(&mut stop_rx) => None,
    };
    match loaded {
        Some(Ok(())) => {}
        Some(Err(e)) => {
            stop_all(&mut shards, Duration::from_secs(10)).await;
            return Err(e);
        }
        None => {
            eprintln!("tessera: stopping during loading");
            stop_all(&mut shards, Duration::from_secs(10)).await;
            return Ok(ExitCode::SUCCESS);
        }
    }

    let mut router_cmd = Command::new(&router_bin);
    router_cmd
        .args(["--shard-uri", &group_uris.join(",")])
        .args(["--hostname", &args.hostname.to_string()])
        .args(["--port", &args.port.to_string()])
        .args([
            "--max-concurrent-requests",
            &args.max_concurrent_requests.to_string(),
        ]);
    if let Some(key) = &args.api_key {
        router_cmd.args(["--api-key", key]);
    }
    if let Some(id) = &args.model_id {
        router_cmd.args(["--model-id", id]);
    }
    if args.json_output {
        router_cmd.arg("--json-output");
    }
    if let Some(endpoint) = &args.otlp_endpoint {
        router_cmd.args(["--otlp-endpoint", endpoint]);
    }
    router_cmd.args(&args.router_args);
    let mut router = match router_cmd.kill_on_drop(true).spawn() {
        Ok(router) => router,
        Err(e) => {
            stop_all(&mut shards, Duration::from_secs(10)).await;
            return Err(e).with_context(|| format!("starting {}", router_bin.display()));
        }
    };

    // Wait for the router to finish warming up.
    loop {
        if healthy(args.port).await {
            break;
        }
        if *stop_rx.borrow() {
            eprintln!("tessera: stopping during warmup");
            stop(&mut router, Duration::from_secs(10)).await;
            stop_all(&mut shards, Duration::from_secs(10)).await;
            return Ok(ExitCode::SUCCESS);
        }
        for shard in shards.iter_mut() {
            if let Some(status) = shard.child.try_wait()? {
                let name = shard.name.clone();
                stop(&mut router, Duration::from_secs(10)).await;
                stop_all(&mut shards, Duration::from_secs(10)).await;
                bail!("{name} died during warmup ({status})");
            }
        }
        if let Some(status) = router.try_wait()? {
            stop_all(&mut shards, Duration::from_secs(10)).await;
            bail!("the router exited during startup ({status}); see its log above");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let shown = if args.hostname.is_unspecified() {
        "127.0.0.1".to_string()
    } else {
        args.hostname.to_string()
    };
    println!(
        "Tessera is ready: http://{shown}:{} (docs at /docs)",
        args.port
    );

    let why = tokio::select! {
        _ = stop_requested(&mut stop_rx) => Stop::Signal,
        d = watch_shards(&mut shards, groups as usize) => Stop::ShardsDied(d),
        s = router.wait() => Stop::RouterDied(s?),
    };
    match why {
        Stop::Signal => {
            eprintln!("tessera: draining (the router finishes the requests in flight) ...");
            stop(&mut router, Duration::from_secs(60)).await;
            stop_all(&mut shards, Duration::from_secs(10)).await;
            Ok(ExitCode::SUCCESS)
        }
        Stop::ShardsDied(deaths) => {
            eprintln!("tessera: no shard group is whole any more ({deaths}); stopping");
            stop(&mut router, Duration::from_secs(10)).await;
            stop_all(&mut shards, Duration::from_secs(10)).await;
            Ok(ExitCode::FAILURE)
        }
        Stop::RouterDied(status) => {
            eprintln!("tessera: the router exited ({status}); stopping the shards");
            stop_all(&mut shards, Duration::from_secs(10)).await;
            Ok(ExitCode::FAILURE)
        }
    }
}
