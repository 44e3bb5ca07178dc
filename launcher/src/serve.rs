//! `tessera serve`: starts the shard ranks, waits until they have loaded the
//! model, starts the router (which warms them up), waits for it to be healthy,
//! prints the URL, and supervises: SIGINT/SIGTERM drain gracefully; a child
//! that dies takes the others down and makes `tessera` exit non-zero.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};

#[derive(Args, Debug, Clone)]
pub struct ServeArgs {
    /// A .gguf file or a Hugging Face folder; defaults to the embedded SmolLM2-135M-Instruct.
    #[arg(long, env = "TESSERA_MODEL")]
    pub model: Option<PathBuf>,
    /// float32, bfloat16 or float16.
    #[arg(long, env = "TESSERA_DTYPE", default_value = "bfloat16")]
    pub dtype: String,
    /// cpu, cuda or cuda:N.
    #[arg(long, env = "TESSERA_DEVICE", default_value = "cpu")]
    pub device: String,
    /// Shard ranks (one per device; tensor parallelism).
    #[arg(long, env = "TESSERA_NUM_SHARD", default_value_t = 1)]
    pub num_shard: u32,
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
    /// Intra-op CPU threads per shard (0: libtorch's default).
    #[arg(long, env = "TESSERA_THREADS", default_value_t = 0)]
    pub threads: i32,
    /// Name reported by /info and /v1/models.
    #[arg(long, env = "TESSERA_MODEL_ID")]
    pub model_id: Option<String>,
    /// Unix socket prefix of the shards (default: one per launcher process under /tmp).
    #[arg(long, env = "TESSERA_SHARD_UDS_PATH")]
    pub shard_uds_path: Option<PathBuf>,
    /// Log as JSON lines.
    #[arg(long, env = "TESSERA_JSON_OUTPUT")]
    pub json_output: bool,
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

async fn wait_for_socket(path: &Path, shard: &mut Child) -> anyhow::Result<()> {
    loop {
        if path.exists() {
            return Ok(());
        }
        if let Some(status) = shard.try_wait()? {
            bail!("shard rank 0 exited ({status}) before it was ready: the model could not be loaded (see its log above)");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

enum Stop {
    Signal,
    ShardDied(std::process::ExitStatus),
    RouterDied(std::process::ExitStatus),
}

async fn signal() -> anyhow::Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r?,
        _ = term.recv() => {},
    }
    Ok(())
}

pub async fn serve(args: ServeArgs) -> anyhow::Result<ExitCode> {
    if args.num_shard != 1 {
        bail!(
            "--num-shard {}: tensor parallelism over several ranks is not available yet; use --num-shard 1",
            args.num_shard
        );
    }
    let shard_bin = sibling("tessera-shard", "TESSERA_SHARD_BIN")?;
    let router_bin = sibling("tessera-router", "TESSERA_ROUTER_BIN")?;
    let uds = args
        .shard_uds_path
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("/tmp/tessera-{}-shard", std::process::id())));
    let socket = PathBuf::from(format!("{}-0", uds.display()));
    let _ = std::fs::remove_file(&socket);

    let mut shard_cmd = Command::new(&shard_bin);
    shard_cmd
        .arg("serve")
        .args(["--uds-path", &uds.display().to_string()])
        .args(["--rank", "0", "--world-size", "1"])
        .args(["--dtype", &args.dtype, "--device", &args.device])
        .args(["--kv-tokens", &args.kv_tokens.to_string()])
        .args(["--block-size", &args.block_size.to_string()])
        .args(["--threads", &args.threads.to_string()]);
    if let Some(model) = &args.model {
        shard_cmd.arg("--model").arg(model);
    }
    if let Some(id) = &args.model_id {
        shard_cmd.args(["--model-id", id]);
    }
    let mut shard = shard_cmd
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", shard_bin.display()))?;
    eprintln!("tessera: loading the model in shard rank 0 ...");
    wait_for_socket(&socket, &mut shard).await?;

    let mut router_cmd = Command::new(&router_bin);
    router_cmd
        .args(["--shard-uri", &format!("unix://{}", socket.display())])
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
    router_cmd.args(&args.router_args);
    let mut router = match router_cmd.kill_on_drop(true).spawn() {
        Ok(router) => router,
        Err(e) => {
            stop(&mut shard, Duration::from_secs(10)).await;
            return Err(e).with_context(|| format!("starting {}", router_bin.display()));
        }
    };

    // Wait for the router to finish warming up.
    loop {
        if healthy(args.port).await {
            break;
        }
        if let Some(status) = shard.try_wait()? {
            stop(&mut router, Duration::from_secs(10)).await;
            bail!("shard rank 0 died during warmup ({status})");
        }
        if let Some(status) = router.try_wait()? {
            stop(&mut shard, Duration::from_secs(10)).await;
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
        r = signal() => { r?; Stop::Signal }
        s = shard.wait() => Stop::ShardDied(s?),
        s = router.wait() => Stop::RouterDied(s?),
    };
    match why {
        Stop::Signal => {
            eprintln!("tessera: draining (the router finishes the requests in flight) ...");
            stop(&mut router, Duration::from_secs(60)).await;
            stop(&mut shard, Duration::from_secs(10)).await;
            Ok(ExitCode::SUCCESS)
        }
        Stop::ShardDied(status) => {
            eprintln!("tessera: shard rank 0 died ({status}); stopping the router");
            stop(&mut router, Duration::from_secs(10)).await;
            Ok(ExitCode::FAILURE)
        }
        Stop::RouterDied(status) => {
            eprintln!("tessera: the router exited ({status}); stopping the shards");
            stop(&mut shard, Duration::from_secs(10)).await;
            Ok(ExitCode::FAILURE)
        }
    }
}
