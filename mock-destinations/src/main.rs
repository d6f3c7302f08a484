use std::net::TcpListener;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use mock_destinations::Recorder;
use protocol::webhook::SigningSecret;

/// Mock webhook destinations that succeed, fail, flap, stall and rate-limit.
#[derive(Parser)]
struct Args {
    /// Address and port to listen on.
    #[arg(long, default_value = "127.0.0.1:9000")]
    listen: String,
    /// Refuse (401) requests without a valid Standard Webhooks signature by
    /// this secret (`whsec_…`); repeat for several.
    #[arg(
        long = "signing-secret",
        env = "MOCK_SIGNING_SECRETS",
        value_delimiter = ','
    )]
    signing_secrets: Vec<String>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Exit 0 if the mocks answer on `--listen` (`GET /healthz`); the
    /// container health check.
    Health,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(Command::Health) = args.command {
        let timeout = std::time::Duration::from_secs(3);
        telemetry::health::probe(&args.listen, "/healthz", timeout)?;
        return Ok(());
    }
    telemetry::init_logging(telemetry::LogFormat::Text);
    let listener = TcpListener::bind(&args.listen)
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let shutdown = telemetry::shutdown_on_signal();
    let recorder = Arc::new(Recorder::default());
    let secrets = args
        .signing_secrets
        .into_iter()
        .map(SigningSecret::try_from)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow::anyhow!("--signing-secret: {e}"))?;
    if !secrets.is_empty() {
        tracing::info!(
            secrets = secrets.len(),
            "Requests must carry a valid webhook signature."
        );
    }
    recorder.require_signatures(secrets);
    mock_destinations::run(listener, recorder, shutdown).await?;
    Ok(())
}
