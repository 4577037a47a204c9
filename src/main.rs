//! The `users-service` binary: parse the command line, start logging, then
//! serve until SIGINT or SIGTERM (or run a `keys`, `check`,
//! `import` or `export` command).

use std::process::ExitCode;

use clap::Parser;
use tokio::signal::unix::{SignalKind, signal};
use users_service::{
    app::Application,
    commands,
    config::{Cli, Command},
    telemetry, transfer,
};

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let telemetry =
        match telemetry::init(cli.config.log_format, cli.config.otlp_endpoint.as_deref()) {
            Ok(telemetry) => telemetry,
            Err(error) => {
                eprintln!("users-service: {error}");
                return ExitCode::FAILURE;
            }
        };
    let result = match cli.command {
        None | Some(Command::Serve) => serve(&cli.config).await,
        Some(Command::Check) => commands::check(&cli.config).await,
        Some(Command::Keys(command)) => commands::keys(&cli.config, command).await,
        Some(Command::Import(args)) => transfer::import(&cli.config, args).await,
        Some(Command::Export(args)) => transfer::export(&cli.config, args).await,
    };
    // Every queued span and line is out before the last line below.
    telemetry.shutdown().await;
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("users-service: {error}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(
    config: &users_service::config::Config,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let app = Application::build(config).await?;
    app.run_until(shutdown_signal()).await?;
    Ok(())
}

/// Completes on the first SIGINT or SIGTERM.
async fn shutdown_signal() {
    let mut terminate = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
}
