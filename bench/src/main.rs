//! The benchmark: starts redis-server, the gateway, the router and a sink
//! from scratch, drives them with a load generator whose every event is
//! checked for per-user order and completeness, and writes the results into
//! `docs/benchmarks.md` and a latency plot. Run it with `scripts/bench.sh`.
#![forbid(unsafe_code)]

mod check;
mod load;
mod phases;
mod report;
mod sink;
mod system;

use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::Arc;

use actix_web::{web, App, HttpResponse, HttpServer};
use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

/// Without a subcommand: run every phase and write the report.
#[derive(Parser)]
struct Args {
    #[command(flatten)]
    run: RunArgs,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve a do-nothing handler (202 to any POST), the ceiling ingest is
    /// compared with.
    Noop {
        #[arg(long)]
        listen: String,
        /// Worker threads; 0 means one per core, as the gateway's default.
        #[arg(long, default_value_t = 0)]
        workers: usize,
    },
}

#[derive(clap::Args)]
struct RunArgs {
    /// A smoke run: every phase, tiny sizes, seconds instead of minutes.
    #[arg(long)]
    quick: bool,
    /// Run one phase and print its figures, without writing the report.
    #[arg(long, value_enum)]
    only: Option<phases::Phase>,
    /// Where `gateway` and `router` are; default: next to this executable.
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// The Redis config to run with.
    #[arg(long, default_value = "config/redis.conf")]
    redis_config: PathBuf,
    /// Logs, router configs and Redis data of the run.
    #[arg(long, default_value = "target/bench-run")]
    work_dir: PathBuf,
    /// The report whose generated section is replaced.
    #[arg(long, default_value = "docs/benchmarks.md")]
    report: PathBuf,
    /// The latency plot, written next to the report.
    #[arg(long, default_value = "latency-vs-load.svg")]
    plot: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    match args.command {
        Some(Command::Noop { listen, workers }) => serve_noop(&listen, workers).await,
        None => run(args.run).await,
    }
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let bench = std::env::current_exe().context("cannot find this executable")?;
    let bin_dir = match args.bin_dir {
        Some(dir) => dir,
        None => bench
            .parent()
            .context("executable has no directory")?
            .to_owned(),
    };
    let binaries = system::Binaries {
        gateway: bin_dir.join("gateway"),
        router: bin_dir.join("router"),
        redis_server: std::env::var("REDIS_SERVER").unwrap_or_else(|_| "redis-server".into()),
        redis_config: std::fs::canonicalize(&args.redis_config)
            .with_context(|| format!("cannot find {}", args.redis_config.display()))?,
        bench,
    };
    for binary in [&binaries.gateway, &binaries.router] {
        anyhow::ensure!(
            binary.exists(),
            "{} is missing; build it first",
            binary.display()
        );
    }
    std::fs::create_dir_all(&args.work_dir)?;
    let work_dir = std::fs::canonicalize(&args.work_dir)?;

    let shutdown = CancellationToken::new();
    let sink = Arc::new(sink::Sink::default());
    let sink_listener = TcpListener::bind("127.0.0.1:0")?;
    let sink_url = format!("http://{}", sink_listener.local_addr()?);
    sink::serve(sink_listener, sink.clone(), shutdown.clone())?;

    let plan = if args.quick {
        phases::Plan::quick()
    } else {
        phases::Plan::full()
    };
    let results = phases::Bench::new(binaries, work_dir, plan, sink, sink_url)?
        .run(args.only)
        .await?;
    shutdown.cancel();
    let Some(results) = results else {
        return Ok(());
    };

    let date = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
    let section = report::markdown(&results, &date, &args.plot);
    println!("{section}");
    let existing = std::fs::read_to_string(&args.report).unwrap_or_default();
    std::fs::write(&args.report, report::splice(&existing, &section))
        .with_context(|| format!("cannot write {}", args.report.display()))?;
    let plot = args
        .report
        .parent()
        .map_or_else(|| PathBuf::from(&args.plot), |dir| dir.join(&args.plot));
    std::fs::write(&plot, report::svg(&results.curve))?;
    eprintln!("Wrote {} and {}.", args.report.display(), plot.display());
    anyhow::ensure!(
        results.all_correct(),
        "some events were missing or out of order; see the report"
    );
    Ok(())
}

/// The ceiling: the same HTTP framework and worker count as the gateway,
/// reading the body and answering 202 with an id as the gateway does.
async fn serve_noop(listen: &str, workers: usize) -> anyhow::Result<()> {
    let workers = match workers {
        0 => std::thread::available_parallelism().map_or(1, usize::from),
        n => n,
    };
    HttpServer::new(|| {
        App::new()
            .route("/readyz", web::get().to(HttpResponse::Ok))
            .default_service(web::post().to(|_body: web::Bytes| async {
                HttpResponse::Accepted()
                    .content_type("application/json")
                    .body(r#"{"id":"0-0-0"}"#)
            }))
    })
    .workers(workers)
    .bind(listen)?
    .run()
    .await
    .context("no-op server failed")
}
