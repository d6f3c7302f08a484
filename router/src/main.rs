use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};

/// Event delivery router: delivers events from Redis streams to webhook destinations.
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
    /// Deliver events (the default).
    Run,
    /// Delete the consumer groups of a destination removed from the config,
    /// which otherwise keep its undelivered events from being trimmed. Its
    /// dead-letter streams are kept.
    RemoveDestination {
        /// The destination's name, as it was in the config.
        name: String,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let config = router::Config::load(args.config.as_deref())?;
    telemetry::init_logging(config.log_format);
    match args.command.unwrap_or(Command::Run) {
        Command::Run => {
            let admin = std::net::TcpListener::bind(&config.admin.listen).with_context(|| {
                format!("cannot listen on {} (admin.listen)", config.admin.listen)
            })?;
            let shutdown = telemetry::shutdown_on_signal();
            router::run(config, admin, shutdown).await
        }
        Command::RemoveDestination { name } => {
            let shards = router::remove_destination(&config, &name).await?;
            println!(
                "Deleted the consumer groups of `{name}` on {shards} of {} shards; its dead-letter streams are kept.",
                config.redis.shards
            );
            Ok(())
        }
    }
}
