//! `tessera-router`: connects to every replica's shard group (rank 0 of each,
//! and through it to every rank), warms them up, starts one batching task per
//! replica and serves the HTTP API.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use tessera_router::config::RouterArgs;
use tessera_router::http;
use tessera_router::startup::{self, Timing};
use tracing::info;

fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
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
    info!("shutting down: finishing the requests in flight");
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = RouterArgs::parse();
    init_logging(args.json_output);
    let addr = SocketAddr::new(args.hostname, args.port);

    let started = startup::start(args, Timing::default())
        .await
        .context("starting the router")?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr}"))?;
    info!(
        "router ready on http://{} ({} replica(s))",
        listener.local_addr().unwrap_or(addr),
        started.state.info.replicas
    );
    let app = http::app(started.state.clone());
    http::serve(app, listener, shutdown_signal())
        .await
        .context("serving HTTP")?;
    // The HTTP server (and with it every Infer handle but `started`'s) is
    // gone: the batching tasks drain what is left and stop.
    started.drain(Duration::from_secs(30)).await;
    Ok(())
}
