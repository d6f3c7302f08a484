use std::net::TcpListener;
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;

/// Event delivery gateway: accepts events over HTTP into Redis streams.
#[derive(Parser)]
struct Args {
    /// TOML config file; settings it leaves out keep their defaults.
    #[arg(long)]
    config: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let config = gateway::Config::load(args.config.as_deref())?;
    telemetry::init_logging(config.log_format);
    let listener = TcpListener::bind(&config.listen)
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let shutdown = telemetry::shutdown_on_signal();
    gateway::run(config, listener, shutdown).await
}
