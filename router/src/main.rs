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
use tessera_telemetry::TelemetryConfig;
use tracing::info;

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
    let mut config = TelemetryConfig::new("tessera-router");
    config.json = args.json_output;
    config.otlp_endpoint = args.otlp_endpoint.clone();
    let telemetry = tessera_telemetry::init(&config).context("setting up logs and traces")?;
    let result = run(args).await;
    // Every span has ended (the HTTP server and the batching tasks are gone):
    // export what is still buffered before exiting.
    telemetry.shutdown(Duration::from_secs(10)).await;
    result
}

async fn run(args: RouterArgs) -> anyhow::Result<()> {
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
