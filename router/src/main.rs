use std::path::PathBuf;

use clap::Parser;

/// Event delivery router: delivers events from Redis streams to webhook destinations.
#[derive(Parser)]
struct Args {
    /// TOML config file; settings it leaves out keep their defaults.
    #[arg(long)]
    config: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let config = router::Config::load(args.config.as_deref())?;
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let shutdown = tokio_util::sync::CancellationToken::new();
    tokio::spawn(cancel_on_signal(shutdown.clone()));
    router::run(config, shutdown).await
}

async fn cancel_on_signal(shutdown: tokio_util::sync::CancellationToken) {
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing a SIGTERM handler succeeds on Unix");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
    shutdown.cancel();
}
