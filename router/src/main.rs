use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use protocol::secret::{generate_token, TokenDigest};
use protocol::webhook::SigningSecret;

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
    /// Create an admin token: prints the token, for operators, and the line
    /// to set in `[admin]`, which holds only its digest.
    NewAdminToken,
    /// Create a webhook signing secret (`whsec_…`) for a destination's
    /// `signing_secrets`; give the same secret to the receiver.
    NewSigningSecret,
    /// Exit 0 if the router configured here answers on its admin listener
    /// (`GET /healthz`, open without the token); the container health check.
    Health,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let load = || -> anyhow::Result<router::Config> {
        let config = router::Config::load(args.config.as_deref())?;
        telemetry::init_logging(config.log_format);
        Ok(config)
    };
    match args.command.as_ref().unwrap_or(&Command::Run) {
        Command::Run => {
            let config = load()?;
            let admin = std::net::TcpListener::bind(&config.admin.listen).with_context(|| {
                format!("cannot listen on {} (admin.listen)", config.admin.listen)
            })?;
            let shutdown = telemetry::shutdown_on_signal();
            router::run(config, admin, shutdown).await
        }
        Command::RemoveDestination { name } => {
            let config = load()?;
            let shards = router::remove_destination(&config, name).await?;
            println!(
                "Deleted the consumer groups of `{name}` on {shards} of {} shards; its dead-letter streams are kept.",
                config.redis.shards
            );
            Ok(())
        }
        Command::NewAdminToken => {
            let token = generate_token("evd_admin_");
            println!("Admin token (for operators; it is not stored anywhere): {token}");
            println!("Set in [admin] of the router config:");
            println!("  token_sha256 = \"{}\"", TokenDigest::of(&token).to_hex());
            Ok(())
        }
        Command::NewSigningSecret => {
            println!("{}", SigningSecret::generate());
            Ok(())
        }
        Command::Health => {
            let config = router::Config::load(args.config.as_deref())?;
            let timeout = std::time::Duration::from_secs(3);
            telemetry::health::probe(&config.admin.listen, "/healthz", timeout)?;
            Ok(())
        }
    }
}
