use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use protocol::secret::{generate_token, TokenDigest};
use protocol::webhook::SigningSecret;

/// mimalloc instead of glibc malloc: 12 % fewer instructions per delivery
/// and no arena-lock wake-ups between threads. Its peak RSS with large
/// events pending stays within the byte budget's bound, as glibc's does
/// (`tests/tests/isolation.rs`, docs/benchmarks.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
    /// List, apply or delete the destinations in Redis, which every router
    /// follows (the admin API's /admin/destinations does the same).
    Destinations {
        #[command(subcommand)]
        command: DestinationsCommand,
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

#[derive(Subcommand)]
enum DestinationsCommand {
    /// Print every destination (secrets masked), one JSON object per line.
    List,
    /// Apply the [[destinations]] of a TOML file (a router config file
    /// will do): create the missing, update the different.
    Apply {
        file: PathBuf,
        /// Also delete destinations the file does not list (the file's
        /// `unlisted_destinations = "remove"` does the same).
        #[arg(long)]
        remove_unlisted: bool,
    },
    /// Delete a destination: delivery stops and its consumer groups are
    /// deleted; its dead letters are kept.
    Delete { name: String },
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
            let config = router::Config::load(args.config.as_deref())?;
            // Only the serving router exports traces; the subcommands log.
            let _telemetry = telemetry::init(config.log_format, &config.traces, "event-router")
                .map_err(anyhow::Error::msg)?;
            let admin = std::net::TcpListener::bind(&config.admin.listen).with_context(|| {
                format!("cannot listen on {} (admin.listen)", config.admin.listen)
            })?;
            let shutdown = telemetry::shutdown_on_signal();
            router::run(config, admin, shutdown).await
        }
        Command::Destinations { command } => {
            let config = load()?;
            let catalog = router::catalog(&config).await?;
            match command {
                DestinationsCommand::List => {
                    let (_, definitions) = catalog.load().await?;
                    for definition in definitions.values() {
                        let shown = router::DestinationDoc::new(definition, None);
                        println!("{}", serde_json::to_string(&shown)?);
                    }
                }
                DestinationsCommand::Apply {
                    file,
                    remove_unlisted,
                } => {
                    let (wanted, mut unlisted) = router::config::destinations_file(file, &config)?;
                    if *remove_unlisted {
                        unlisted = router::config::Unlisted::Remove;
                    }
                    let applied = catalog.apply(&wanted, unlisted).await?;
                    println!(
                        "created {:?}, updated {:?}, unchanged {:?}, deleted {:?}",
                        applied.created, applied.updated, applied.unchanged, applied.deleted
                    );
                }
                DestinationsCommand::Delete { name } => {
                    catalog.delete(name).await?;
                    println!("Deleted `{name}`: delivery stops within a second; its dead letters are kept.");
                }
            }
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
