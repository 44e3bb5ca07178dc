use clap::Parser;
use std::process::ExitCode;
use tessera_loadgen::cli::Args;
use tessera_loadgen::{run, LoadgenError, RunReport};

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    match benchmark(&args).await {
        Ok(report) if report.phases.iter().all(|p| p.requests_ok == 0) => {
            eprintln!("no request succeeded");
            ExitCode::from(2)
        }
        Ok(_) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("tessera-loadgen: {error}");
            ExitCode::FAILURE
        }
    }
}

async fn benchmark(args: &Args) -> Result<RunReport, LoadgenError> {
    let config = args.run_config();
    let mut error_shown = false;
    let report = run(&config, |phase| {
        if let (false, Some(error)) = (error_shown, &phase.first_error) {
            eprintln!("first failure: {error}");
            error_shown = true;
        }
        println!("{}", phase.to_text());
    })
    .await?;
    if report.warmup_failed > 0 {
        eprintln!(
            "{} of {} warm-up requests failed",
            report.warmup_failed, report.settings.warmup
        );
    }
    println!("{}", report.summary_table());
    if let Some(path) = &args.json {
        std::fs::write(path, report.to_json()? + "\n").map_err(|source| {
            LoadgenError::WriteReport {
                path: path.clone(),
                source,
            }
        })?;
        println!("figures written to {}", path.display());
    }
    Ok(report)
}
