use std::net::TcpListener;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use protocol::secret::{generate_token, TokenDigest};

/// mimalloc instead of glibc malloc: 5-14 % less CPU per event
/// (docs/benchmarks.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const HEALTH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);

/// Event delivery gateway: accepts events over HTTP into Redis streams.
#[derive(Parser)]
struct Args {
    /// TOML config file; settings it leaves out keep their defaults.
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the API (the default).
    Run,
    /// Create an API key: prints the key, for the client, and the line to
    /// add to `auth.keys`, which holds only its digest.
    NewKey {
        /// Recorded on every event the key sends.
        #[arg(long)]
        name: String,
    },
    /// Exit 0 if the gateway configured here is ready (`GET /readyz` on its
    /// listen port: up and reaching Redis); the container health check.
    Health,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(Command::NewKey { name }) = args.command {
        anyhow::ensure!(
            protocol::config::is_valid_name(&name),
            "--name must be 1-64 letters, digits, `-` or `_`"
        );
        let key = generate_token("evd_");
        println!("API key (give it to the client; it is not stored anywhere): {key}");
        println!("Add to auth.keys in the gateway config:");
        println!(
            "  {{ name = \"{name}\", sha256 = \"{}\" }}",
            TokenDigest::of(&key).to_hex()
        );
        return Ok(());
    }
    let config = gateway::Config::load(args.config.as_deref())?;
    if let Some(Command::Health) = args.command {
        telemetry::health::probe(&config.listen, "/readyz", HEALTH_TIMEOUT)?;
        return Ok(());
    }
    let _telemetry = telemetry::init(config.log_format, &config.traces, "event-gateway")
        .map_err(anyhow::Error::msg)?;
    let listener = TcpListener::bind(&config.listen)
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let shutdown = telemetry::shutdown_on_signal();
    gateway::run(config, listener, shutdown).await
}
