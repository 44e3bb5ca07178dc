//! `tessera`: the one command a user runs. `serve` starts the shard ranks and
//! the router and supervises them; `generate` and `bench` run the engine
//! (`tessera-shard`, installed beside it) directly; `loadgen` runs the HTTP
//! load generator (`tessera-loadgen`).

mod serve;

use std::path::PathBuf;
use std::process::{Command, ExitCode};

use anyhow::{bail, Context};
use clap::Parser;

const USAGE: &str = "usage: tessera <serve|generate|bench|loadgen> [ARGS...]   (tessera <command> --help for details)

  serve     start the shards and the HTTP server (TGI and OpenAI APIs)
  generate  generate text from a prompt on the command line
  bench     measure the engine (load, prefill, decode, memory)
  loadgen   drive a running server with concurrent clients and print latencies";

#[derive(Parser)]
#[command(
    name = "tessera serve",
    version,
    about = "Serve a model over HTTP (TGI and OpenAI APIs)"
)]
struct ServeCli {
    #[command(flatten)]
    args: serve::ServeArgs,
}

/// The engine binary: `$TESSERA_SHARD_BIN`, or `tessera-shard` next to this executable.
fn shard_binary() -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os("TESSERA_SHARD_BIN") {
        return Ok(PathBuf::from(path));
    }
    let me = std::env::current_exe().context("locating the tessera executable")?;
    let dir = me
        .parent()
        .context("the tessera executable has no folder")?;
    let shard = dir.join("tessera-shard");
    if !shard.is_file() {
        bail!(
            "the engine binary {} is missing; build it with `cargo build --release --workspace` or set TESSERA_SHARD_BIN",
            shard.display()
        );
    }
    Ok(shard)
}

/// The load generator: `$TESSERA_LOADGEN_BIN`, or `tessera-loadgen` next to this executable.
fn loadgen_binary() -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os("TESSERA_LOADGEN_BIN") {
        return Ok(PathBuf::from(path));
    }
    let me = std::env::current_exe().context("locating the tessera executable")?;
    let path = me
        .parent()
        .context("the tessera executable has no folder")?
        .join("tessera-loadgen");
    if !path.is_file() {
        bail!(
            "{} is missing; build it with `cargo build --release --workspace`",
            path.display()
        );
    }
    Ok(path)
}

fn run() -> anyhow::Result<ExitCode> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(command) = args.first() else {
        eprintln!("{USAGE}");
        return Ok(ExitCode::from(2));
    };
    match command.as_str() {
        "serve" => {
            let cli = ServeCli::parse_from(&args);
            let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
            runtime.block_on(serve::serve(cli.args))
        }
        "generate" | "bench" | "loadgen" => {
            let (binary, args) = if command == "loadgen" {
                (loadgen_binary()?, &args[1..])
            } else {
                (shard_binary()?, &args[..])
            };
            let status = Command::new(&binary)
                .args(args)
                .status()
                .with_context(|| format!("starting {}", binary.display()))?;
            Ok(match status.code() {
                Some(0) => ExitCode::SUCCESS,
                Some(code) => ExitCode::from(code.clamp(1, 255) as u8),
                None => {
                    eprintln!("tessera: {} was killed by a signal", binary.display());
                    ExitCode::FAILURE
                }
            })
        }
        "-h" | "--help" | "help" => {
            println!("{USAGE}");
            Ok(ExitCode::SUCCESS)
        }
        "-V" | "--version" => {
            println!("tessera {}", env!("CARGO_PKG_VERSION"));
            Ok(ExitCode::SUCCESS)
        }
        other => {
            eprintln!("tessera: unknown command {other:?}\n{USAGE}");
            Ok(ExitCode::from(2))
        }
    }
}

fn main() -> ExitCode {
    match run() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("tessera: {e:#}");
            ExitCode::FAILURE
        }
    }
}
