//! `tessera`: the one command a user runs. It finds the shard engine binary
//! (`tessera-shard`, installed beside it) and runs it; `serve`, which starts shard
//! ranks and the router, arrives with the serving work. Today it forwards
//! `generate` and `bench` to the engine and reports its exit status.

use std::path::PathBuf;
use std::process::{Command, ExitCode};

use anyhow::{bail, Context};

const USAGE: &str =
    "usage: tessera <generate|bench> [ARGS...]   (tessera <command> --help for details)";

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

fn run() -> anyhow::Result<ExitCode> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(command) = args.first() else {
        eprintln!("{USAGE}");
        return Ok(ExitCode::from(2));
    };
    match command.as_str() {
        "generate" | "bench" => {
            let shard = shard_binary()?;
            let status = Command::new(&shard)
                .args(&args)
                .status()
                .with_context(|| format!("starting {}", shard.display()))?;
            Ok(match status.code() {
                Some(0) => ExitCode::SUCCESS,
                Some(code) => ExitCode::from(code.clamp(1, 255) as u8),
                None => {
                    eprintln!("tessera: the engine was killed by a signal");
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
