use std::net::TcpListener;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use mock_destinations::Recorder;

/// Mock webhook destinations that succeed, fail, flap, stall and rate-limit.
#[derive(Parser)]
struct Args {
    /// Address and port to listen on.
    #[arg(long, default_value = "127.0.0.1:9000")]
    listen: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    telemetry::init_logging(telemetry::LogFormat::Text);
    let listener = TcpListener::bind(&args.listen)
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let shutdown = telemetry::shutdown_on_signal();
    mock_destinations::run(listener, Arc::new(Recorder::default()), shutdown).await?;
    Ok(())
}
