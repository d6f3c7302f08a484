//! The benchmark's phases, each from an empty Redis: the no-op ceiling,
//! ingest, drain, and end-to-end latency against offered load.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use protocol::Keys;

use crate::check::{self, OrderCheck, Verdict};
use crate::load::{self, Endpoint, LoadResult, LoadSpec, Stop};
use crate::sink::{Payload, Sink};
use crate::system::{self, Binaries, Process, Redis};

/// Concurrent client connections for the ingest phases, as the issue asks.
const CONNECTIONS: usize = 64;
/// Users per connection: 64 × 16 = 1024 users.
const USERS_PER_CONNECTION: usize = 16;
/// Events per `/v1/batch` request.
const BATCH_SIZE: usize = 100;
/// The fsync settings ingest is measured with: the shipped one first.
const FSYNCS: [&str; 2] = ["always", "everysec"];
/// Shard count of the shipped configuration (gateway and router defaults).
const SHARDS: u16 = 16;
/// A drain or delivery wait gives up after this long without progress.
const STALL: Duration = Duration::from_secs(30);

/// A part of the benchmark that can be run alone (`bench --only …`) while
/// investigating; the report needs them all.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Phase {
    Ceiling,
    Ingest,
    Drain,
    /// Drains to 1, 16 and 64 destinations that each take one event type,
    /// and to 16 that take everything.
    Destinations,
    EndToEnd,
    /// Trace export off, on at 100 % and on at 1 %, in alternating rounds
    /// (only when asked for: `--only traces`).
    Traces,
}

/// The destinations phase's layouts, in the order of each round.
const DESTINATION_LAYOUTS: [Layout; 4] = [
    Layout::Filtered(1),
    Layout::Filtered(16),
    Layout::Filtered(64),
    Layout::FannedOut(16),
];

fn print_drain(row: &DrainRow) {
    eprintln!(
        "  {:.0} events/s; CPU: router {:.1} µs/delivery, Redis {:.1} µs/event; \
         router: {} Redis connections, peak RSS {} MB; {}",
        row.events_per_sec,
        row.router_cpu_us,
        row.redis_cpu_us,
        row.router_connections,
        row.router_peak_rss / 1_000_000,
        check::summary(&row.verdicts)
    );
}

/// How long and how big each phase is.
#[derive(Debug, Clone)]
pub struct Plan {
    /// How long each batch ingest run lasts.
    pub ingest_for: Duration,
    /// Rounds of the single-event comparison with the no-op, per fsync
    /// setting; each runs both servers for one slice.
    pub share_rounds: usize,
    pub share_slice: Duration,
    pub drain_events: u64,
    pub big_drain_events: u64,
    /// Events drained to three destinations (the CPU-per-delivery figure).
    pub fan_out_drain_events: u64,
    /// Events per drain of the destinations phase, and how many rounds of
    /// its layouts run.
    pub destinations_events: u64,
    pub destinations_rounds: usize,
    pub e2e_rate: f64,
    pub e2e_for: Duration,
    pub curve_rates: Vec<f64>,
    pub curve_for: Duration,
}

impl Plan {
    pub fn full() -> Self {
        Self {
            ingest_for: Duration::from_secs(10),
            share_rounds: 6,
            share_slice: Duration::from_secs(2),
            drain_events: 100_000,
            big_drain_events: 1_000_000,
            fan_out_drain_events: 100_000,
            destinations_events: 16_000,
            destinations_rounds: 2,
            e2e_rate: 2000.0,
            e2e_for: Duration::from_secs(20),
            curve_rates: vec![250.0, 500.0, 1000.0, 4000.0, 8000.0],
            curve_for: Duration::from_secs(5),
        }
    }

    /// A smoke run that exercises every phase in well under a minute.
    pub fn quick() -> Self {
        Self {
            ingest_for: Duration::from_secs(1),
            share_rounds: 2,
            share_slice: Duration::from_millis(500),
            drain_events: 5_000,
            big_drain_events: 20_000,
            fan_out_drain_events: 5_000,
            destinations_events: 2_000,
            destinations_rounds: 1,
            e2e_rate: 500.0,
            e2e_for: Duration::from_secs(2),
            curve_rates: vec![250.0],
            curve_for: Duration::from_secs(1),
        }
    }
}

/// Throughput and response latency of one ingest run.
#[derive(Debug, Clone)]
pub struct IngestRow {
    pub target: String,
    pub fsync: &'static str,
    pub endpoint: Endpoint,
    pub events_per_sec: f64,
    pub requests_per_sec: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub refused: u64,
    /// CPU time per accepted event of the server under test (µs).
    pub server_cpu_us: f64,
    /// CPU time per accepted event of redis-server (µs; none for the no-op).
    pub redis_cpu_us: Option<f64>,
    /// What the streams hold, against what was accepted (none for the no-op).
    pub verdict: Option<Verdict>,
}

/// Single-event ingest as a share of the no-op ceiling, from rounds that
/// each ran both under the same load generator, one slice each, in
/// alternating order: the machine's speed drifts by tens of percent over
/// minutes, and a round's two slices see nearly the same machine.
#[derive(Debug, Clone)]
pub struct Share {
    pub fsync: &'static str,
    /// The median of the rounds' ratios of requests per second.
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub rounds: usize,
}

impl Share {
    fn of_rounds(fsync: &'static str, mut ratios: Vec<f64>) -> Self {
        ratios.sort_by(f64::total_cmp);
        let middle = ratios.len() / 2;
        let median = if ratios.len().is_multiple_of(2) {
            (ratios[middle - 1] + ratios[middle]) / 2.0
        } else {
            ratios[middle]
        };
        Self {
            fsync,
            median,
            min: ratios[0],
            max: ratios[ratios.len() - 1],
            rounds: ratios.len(),
        }
    }
}

/// How a drain's destinations divide the events between them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// Every destination takes every event.
    FannedOut(usize),
    /// Destination i takes only events of type `t<i>`, and each user sends
    /// one type: every event goes to exactly one destination.
    Filtered(usize),
}

impl Layout {
    pub fn destinations(self) -> usize {
        match self {
            Layout::FannedOut(n) | Layout::Filtered(n) => n,
        }
    }
}

impl std::fmt::Display for Layout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Layout::FannedOut(n) => write!(f, "{n} fanned out"),
            Layout::Filtered(n) => write!(f, "{n} filtered"),
        }
    }
}

#[derive(Debug, Clone)]
pub struct DrainRow {
    pub events: u64,
    pub users: usize,
    pub layout: Layout,
    /// Events delivered, summed over the destinations.
    pub deliveries: u64,
    /// From the router's start to the last event's arrival everywhere.
    pub seconds: f64,
    pub events_per_sec: f64,
    pub router_peak_rss: u64,
    /// The router's user + system time from its start, per delivery (an
    /// event delivered to three destinations is three deliveries).
    pub router_cpu_us: f64,
    /// redis-server's CPU time over the same span, per stored event.
    pub redis_cpu_us: f64,
    /// Redis client connections the router opened.
    pub router_connections: u64,
    /// One per destination.
    pub verdicts: Vec<Verdict>,
}

impl DrainRow {
    pub fn destinations(&self) -> usize {
        self.layout.destinations()
    }

    pub fn passed(&self) -> bool {
        self.verdicts.iter().all(Verdict::passed)
    }
}

#[derive(Debug, Clone)]
pub struct LatencyRow {
    pub offered: f64,
    pub achieved: f64,
    pub destinations: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// One per destination.
    pub verdicts: Vec<Verdict>,
}

#[derive(Debug)]
pub struct Results {
    pub machine: system::Machine,
    pub redis_version: String,
    pub plan: Plan,
    pub noop: IngestRow,
    pub ingest: Vec<IngestRow>,
    /// One per fsync setting.
    pub shares: Vec<Share>,
    pub drain: DrainRow,
    pub big_drain: DrainRow,
    pub fan_out_drain: DrainRow,
    /// The destinations phase, round by round in [`DESTINATION_LAYOUTS`] order.
    pub destinations: Vec<DrainRow>,
    pub e2e: LatencyRow,
    pub curve: Vec<LatencyRow>,
    pub gateway_peak_rss: u64,
    pub e2e_router_peak_rss: u64,
}

impl Results {
    /// Every run delivered (or stored) everything, in per-user order.
    pub fn all_correct(&self) -> bool {
        self.ingest
            .iter()
            .filter_map(|row| row.verdict)
            .all(|v| v.passed())
            && [&self.drain, &self.big_drain, &self.fan_out_drain]
                .into_iter()
                .chain(&self.destinations)
                .all(DrainRow::passed)
            && std::iter::once(&self.e2e)
                .chain(&self.curve)
                .flat_map(|row| &row.verdicts)
                .all(Verdict::passed)
    }
}

pub struct Bench {
    pub binaries: Binaries,
    pub work_dir: PathBuf,
    pub plan: Plan,
    http: reqwest::Client,
    sink: Arc<Sink>,
    sink_url: String,
    keys: Keys,
}

impl Bench {
    pub fn new(
        binaries: Binaries,
        work_dir: PathBuf,
        plan: Plan,
        sink: Arc<Sink>,
        sink_url: String,
    ) -> anyhow::Result<Self> {
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert(
            reqwest::header::AUTHORIZATION,
            format!("Bearer {}", crate::system::API_KEY).parse()?,
        );
        let http = reqwest::Client::builder()
            .default_headers(headers)
            .pool_max_idle_per_host(CONNECTIONS)
            .timeout(Duration::from_secs(10))
            .build()?;
        Ok(Self {
            binaries,
            work_dir,
            plan,
            http,
            sink,
            sink_url,
            keys: Keys::new("evd"),
        })
    }

    /// Runs every phase, or only `only`; the results are complete only
    /// when every phase ran.
    pub async fn run(&self, only: Option<Phase>) -> anyhow::Result<Option<Results>> {
        let wanted = |phase: Phase| only.is_none_or(|only| only == phase);
        let data = self.work_dir.join("redis");
        let _ = std::fs::remove_dir_all(&data);
        std::fs::create_dir_all(&data)?;
        let redis = Redis::start(&self.binaries, &data).await?;
        let redis_version = redis.version().await?;
        if only == Some(Phase::Traces) {
            redis.set_fsync("always").await?;
            self.traces(&redis).await?;
            return Ok(None);
        }

        let (mut gateway, gateway_url) =
            system::start_gateway(&self.binaries, &redis, &self.http, &self.work_dir).await?;
        let (mut noop, mut ingest, mut shares) = (None, Vec::new(), Vec::new());
        if wanted(Phase::Ceiling) || wanted(Phase::Ingest) {
            let single = self
                .noop_and_single_events(&redis, &mut gateway, &gateway_url, wanted(Phase::Ingest))
                .await?;
            (noop, ingest, shares) = (Some(single.0), single.1, single.2);
        }
        if wanted(Phase::Ingest) {
            let batch = Endpoint::Batch(BATCH_SIZE);
            for fsync in FSYNCS {
                eprintln!("» ingest {} with appendfsync {fsync}", batch.path());
                redis.reset().await?;
                redis.set_fsync(fsync).await?;
                let row = self
                    .ingest_batches(
                        Target::gateway(&gateway, &gateway_url, &redis),
                        fsync,
                        batch,
                    )
                    .await?;
                eprintln!(
                    "  {:.0} events/s; CPU per event: gateway {:.1} µs, Redis {:.1} µs; streams: {}",
                    row.events_per_sec,
                    row.server_cpu_us,
                    row.redis_cpu_us.unwrap_or_default(),
                    row.verdict.map(|v| v.to_string()).unwrap_or_default()
                );
                redis.report_latency_spikes().await?;
                ingest.push(row);
                gateway.check_running()?;
            }
        }
        // Everything after this runs with the shipped setting.
        redis.set_fsync("always").await?;
        let mut drains = None;
        if wanted(Phase::Drain) {
            let plan = &self.plan;
            let mut rows = Vec::new();
            for (events, label, layout) in [
                (plan.drain_events, "drain", Layout::FannedOut(1)),
                (plan.big_drain_events, "drain-big", Layout::FannedOut(1)),
                (
                    plan.fan_out_drain_events,
                    "drain-fan-out",
                    Layout::FannedOut(3),
                ),
            ] {
                eprintln!("» drain {events} events to {layout} destination(s)");
                let row = self
                    .drain(&redis, &gateway_url, events, label, layout)
                    .await?;
                print_drain(&row);
                rows.push(row);
            }
            redis.report_latency_spikes().await?;
            drains = <[DrainRow; 3]>::try_from(rows).ok();
        }
        let mut many = Vec::new();
        if wanted(Phase::Destinations) {
            // Alternating rounds: each layout is compared with the single
            // destination of its own round.
            for round in 1..=self.plan.destinations_rounds {
                for layout in DESTINATION_LAYOUTS {
                    let events = self.plan.destinations_events;
                    eprintln!("» round {round}: drain {events} events to {layout} destinations");
                    let label = format!("dest{round}-{}", layout.to_string().replace(' ', "-"));
                    let row = self
                        .drain(&redis, &gateway_url, events, &label, layout)
                        .await?;
                    print_drain(&row);
                    many.push(row);
                }
            }
            redis.report_latency_spikes().await?;
        }
        if !wanted(Phase::EndToEnd) {
            return Ok(None);
        }

        eprintln!("» end to end, 3 destinations");
        redis.reset().await?;
        let names = ["a", "b", "c"];
        let destinations: Vec<system::Route> = names
            .iter()
            .map(|name| system::Route {
                name: (*name).to_owned(),
                url: format!("{}/e2e/{name}", self.sink_url),
                event_type: None,
            })
            .collect();
        let mut router =
            system::start_router(&self.binaries, &redis, &destinations, &self.work_dir, "e2e")?;
        // Warm up: leases taken, connections open.
        self.paced(
            &gateway_url,
            "warmup",
            200.0,
            Duration::from_secs(1),
            &names,
            &mut router,
        )
        .await?;
        let e2e = self
            .paced(
                &gateway_url,
                "e2e",
                self.plan.e2e_rate,
                self.plan.e2e_for,
                &names,
                &mut router,
            )
            .await?;
        eprintln!(
            "  at {:.0}/s: p50 {:.2} ms, p99 {:.2} ms",
            e2e.achieved, e2e.p50_ms, e2e.p99_ms
        );
        let mut curve = vec![e2e.clone()];
        for &rate in &self.plan.curve_rates {
            let row = self
                .paced(
                    &gateway_url,
                    &format!("curve{rate}"),
                    rate,
                    self.plan.curve_for,
                    &names,
                    &mut router,
                )
                .await?;
            eprintln!(
                "  at {:.0}/s: p50 {:.2} ms, p99 {:.2} ms",
                row.achieved, row.p50_ms, row.p99_ms
            );
            curve.push(row);
            redis.report_latency_spikes().await?;
        }
        curve.sort_by(|a, b| a.offered.total_cmp(&b.offered));
        let e2e_router_peak_rss = router.peak_rss_bytes()?;
        router.stop().await?;
        let gateway_peak_rss = gateway.peak_rss_bytes()?;
        gateway.stop().await?;
        redis.process.stop().await?;
        let _ = std::fs::remove_dir_all(&data);

        let (Some(noop), Some([drain, big_drain, fan_out_drain])) = (noop, drains) else {
            return Ok(None);
        };
        Ok(Some(Results {
            machine: system::machine(),
            redis_version,
            plan: self.plan.clone(),
            noop,
            ingest,
            shares,
            drain,
            big_drain,
            fan_out_drain,
            destinations: many,
            e2e,
            curve,
            gateway_peak_rss,
            e2e_router_peak_rss,
        }))
    }

    /// The no-op ceiling and, with `against_gateway`, single events to the
    /// gateway against it in alternating slices, per fsync setting.
    async fn noop_and_single_events(
        &self,
        redis: &Redis,
        gateway: &mut Process,
        gateway_url: &str,
        against_gateway: bool,
    ) -> anyhow::Result<(IngestRow, Vec<IngestRow>, Vec<Share>)> {
        let (no_op, no_op_url) =
            system::start_noop(&self.binaries, &self.http, &self.work_dir).await?;
        let no_op_target = Target {
            process: &no_op,
            url: &no_op_url,
            redis: None,
        };
        let mut ceiling = Slices::default();
        let (mut rows, mut shares) = (Vec::new(), Vec::new());
        if against_gateway {
            for fsync in FSYNCS {
                eprintln!(
                    "» /v1/events with appendfsync {fsync}, against the no-op in alternating slices"
                );
                redis.reset().await?;
                redis.set_fsync(fsync).await?;
                let (row, share, no_op_slices) = self
                    .single_against_noop(
                        Target::gateway(gateway, gateway_url, redis),
                        no_op_target,
                        fsync,
                    )
                    .await?;
                eprintln!(
                    "  {:.0} events/s, {:.0}% of the no-op (median of {} rounds, {:.0}–{:.0}%); \
                     CPU per event: gateway {:.1} µs, Redis {:.1} µs; streams: {}",
                    row.events_per_sec,
                    share.median * 100.0,
                    share.rounds,
                    share.min * 100.0,
                    share.max * 100.0,
                    row.server_cpu_us,
                    row.redis_cpu_us.unwrap_or_default(),
                    row.verdict.map(|v| v.to_string()).unwrap_or_default()
                );
                redis.report_latency_spikes().await?;
                ceiling.absorb(no_op_slices);
                rows.push(row);
                shares.push(share);
                gateway.check_running()?;
            }
        } else {
            eprintln!("» no-op ceiling");
            let spec = self.saturating("noop", Endpoint::Single, self.plan.ingest_for);
            ceiling.run(&self.http, no_op_target, spec).await?;
        }
        no_op.stop().await?;
        let noop = ceiling.row("no-op handler", "-", Endpoint::Single, None);
        eprintln!(
            "  no-op: {:.0} events/s; CPU per event: no-op server {:.1} µs",
            noop.events_per_sec, noop.server_cpu_us
        );
        Ok((noop, rows, shares))
    }

    /// Single events against the gateway and the no-op in alternating
    /// slices (see [`Share`]); returns the gateway's row, the share, and
    /// the no-op's slices.
    async fn single_against_noop(
        &self,
        gateway: Target<'_>,
        no_op: Target<'_>,
        fsync: &'static str,
    ) -> anyhow::Result<(IngestRow, Share, Slices)> {
        let (mut gateway_slices, mut no_op_slices) = (Slices::default(), Slices::default());
        let mut ratios = Vec::with_capacity(self.plan.share_rounds);
        for round in 0..self.plan.share_rounds {
            let slice = |users_named: String| {
                self.saturating(&users_named, Endpoint::Single, self.plan.share_slice)
            };
            let gateway_spec = slice(format!("ingest-{fsync}-{round}"));
            let no_op_spec = slice(format!("noop-{fsync}-{round}"));
            // Whichever goes first in a round goes second in the next, so
            // a steady drift of the machine favours neither.
            let (gateway_rate, no_op_rate) = if round % 2 == 0 {
                let no_op_rate = no_op_slices.run(&self.http, no_op, no_op_spec).await?;
                let gateway_rate = gateway_slices
                    .run(&self.http, gateway, gateway_spec)
                    .await?;
                (gateway_rate, no_op_rate)
            } else {
                let gateway_rate = gateway_slices
                    .run(&self.http, gateway, gateway_spec)
                    .await?;
                let no_op_rate = no_op_slices.run(&self.http, no_op, no_op_spec).await?;
                (gateway_rate, no_op_rate)
            };
            ratios.push(gateway_rate / no_op_rate);
        }
        let redis = gateway.redis.context("the gateway writes to Redis")?;
        let verdict = self
            .scan_streams(redis)
            .await?
            .verdict(&gateway_slices.load.accepted);
        let row = gateway_slices.row("gateway", fsync, Endpoint::Single, Some(verdict));
        Ok((row, Share::of_rounds(fsync, ratios), no_op_slices))
    }

    /// Batches against the gateway for the plan's ingest time.
    async fn ingest_batches(
        &self,
        gateway: Target<'_>,
        fsync: &'static str,
        endpoint: Endpoint,
    ) -> anyhow::Result<IngestRow> {
        let spec = self.saturating(&format!("ingest-{fsync}"), endpoint, self.plan.ingest_for);
        let mut slices = Slices::default();
        slices.run(&self.http, gateway, spec).await?;
        let redis = gateway.redis.context("the gateway writes to Redis")?;
        let verdict = self
            .scan_streams(redis)
            .await?
            .verdict(&slices.load.accepted);
        Ok(slices.row("gateway", fsync, endpoint, Some(verdict)))
    }

    fn saturating(&self, users_named: &str, endpoint: Endpoint, lasting: Duration) -> LoadSpec {
        LoadSpec {
            users_named: users_named.to_owned(),
            endpoint,
            connections: CONNECTIONS,
            users_per_connection: USERS_PER_CONNECTION,
            stop: Stop::After(lasting),
            rate: None,
            event_types: None,
        }
    }

    /// Reads every shard stream in order, as the router would, and checks
    /// each user's events.
    async fn scan_streams(&self, redis: &Redis) -> anyhow::Result<OrderCheck> {
        let mut con = redis.connection().await?;
        let mut check = OrderCheck::default();
        for shard in 0..SHARDS {
            let stream = self.keys.events(shard);
            let mut start = "-".to_owned();
            loop {
                let reply: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
                    .arg(&stream)
                    .arg(&start)
                    .arg("+")
                    .arg("COUNT")
                    .arg(10_000)
                    .query_async(&mut con)
                    .await?;
                let Some(last) = reply.ids.last() else { break };
                start = format!("({}", last.id);
                for entry in &reply.ids {
                    let user: String = entry.get("user").context("an entry without a user")?;
                    let payload: String =
                        entry.get("payload").context("an entry without a payload")?;
                    let payload: Payload = serde_json::from_str(&payload)?;
                    check.observe(&user, payload.seq);
                }
            }
        }
        Ok(check)
    }

    /// Stores `events` (1000 users) with no router running, then starts
    /// one with the destinations of `layout` and times how long it takes to
    /// deliver them all.
    async fn drain(
        &self,
        redis: &Redis,
        gateway_url: &str,
        events: u64,
        label: &str,
        layout: Layout,
    ) -> anyhow::Result<DrainRow> {
        redis.reset().await?;
        let (connections, users_per_connection) = (40, 25);
        let types = match layout {
            Layout::FannedOut(_) => None,
            Layout::Filtered(n) => Some(n),
        };
        let spec = LoadSpec {
            users_named: label.to_owned(),
            endpoint: Endpoint::Batch(BATCH_SIZE),
            connections,
            users_per_connection,
            stop: Stop::Events(events),
            rate: None,
            event_types: types,
        };
        let filled = load::run(&self.http, gateway_url, spec).await?;
        let routes: Vec<system::Route> = (0..layout.destinations())
            .map(|i| {
                let name = format!("sink{i}");
                system::Route {
                    url: format!("{}/{label}/{name}", self.sink_url),
                    name,
                    event_type: types.map(|types| load::event_type(i, types)),
                }
            })
            .collect();
        // What each destination should get, per user.
        let expected: Vec<HashMap<String, u64>> = routes
            .iter()
            .map(|route| match &route.event_type {
                Some(event_type) => filled.accepted_of_type(event_type),
                None => filled.accepted.clone(),
            })
            .collect();
        let clients_before = redis.connected_clients().await?;
        let redis_cpu_before = redis.process.cpu_time()?;
        let mut router =
            system::start_router(&self.binaries, redis, &routes, &self.work_dir, label)?;
        let started = Instant::now();
        let paths: Vec<String> = routes
            .iter()
            .map(|route| format!("/{label}/{}", route.name))
            .collect();
        let wanted: Vec<(&str, u64)> = paths
            .iter()
            .zip(&expected)
            .map(|(path, expected)| (path.as_str(), expected.values().sum()))
            .collect();
        let finished = self.wait_until_delivered(&wanted, &mut router).await?;
        let seconds = finished.duration_since(started).as_secs_f64();
        let redis_cpu = redis.process.cpu_time()? - redis_cpu_before;
        let router_connections = redis
            .connected_clients()
            .await?
            .saturating_sub(clients_before);
        let router_peak_rss = router.peak_rss_bytes()?;
        let router_cpu = router.cpu_time()?;
        router.stop().await?;
        let mut received = self.sink.take();
        let verdicts: Vec<Verdict> = paths
            .iter()
            .zip(&expected)
            .map(|(path, expected)| {
                received
                    .remove(path)
                    .unwrap_or_default()
                    .order
                    .verdict(expected)
            })
            .collect();
        let deliveries: u64 = verdicts.iter().map(|v| v.expected).sum();
        Ok(DrainRow {
            events: filled.events(),
            users: connections * users_per_connection,
            layout,
            deliveries,
            seconds,
            events_per_sec: filled.events() as f64 / seconds,
            router_peak_rss,
            router_cpu_us: router_cpu.as_secs_f64() * 1e6 / deliveries.max(1) as f64,
            redis_cpu_us: redis_cpu.as_secs_f64() * 1e6 / filled.events().max(1) as f64,
            router_connections,
            verdicts,
        })
    }

    /// Offers `rate` events/s for `duration` to the gateway, waits until
    /// every destination got everything, and measures send → arrival.
    /// Trace export's cost per event: rounds of export off, on at 100 %
    /// and on at 1 % (parent-based ratio), each with a gateway and a
    /// router of its own exporting to the no-op server (which answers
    /// every export 202), under the same paced single events to one
    /// destination. With `--bin-dir` of an older build, "off" is the
    /// build before (it ignores the variables).
    async fn traces(&self, redis: &Redis) -> anyhow::Result<()> {
        let (_otlp, otlp_url) =
            system::start_noop(&self.binaries, &self.http, &self.work_dir).await?;
        let settings: [(&str, Vec<(&str, &str)>); 3] = [
            ("off", vec![]),
            (
                "on, 100 %",
                vec![("OTEL_EXPORTER_OTLP_ENDPOINT", otlp_url.as_str())],
            ),
            (
                "on, 1 %",
                vec![
                    ("OTEL_EXPORTER_OTLP_ENDPOINT", otlp_url.as_str()),
                    ("OTEL_TRACES_SAMPLER", "parentbased_traceidratio"),
                    ("OTEL_TRACES_SAMPLER_ARG", "0.01"),
                ],
            ),
        ];
        let destination = system::Route {
            name: "t".to_owned(),
            url: format!("{}/e2e/t", self.sink_url),
            event_type: None,
        };
        for round in 1..=self.plan.destinations_rounds {
            for (index, (setting, env)) in settings.iter().enumerate() {
                redis.reset().await?;
                let label = format!("traces{round}-{index}");
                let (gateway, gateway_url) = system::start_gateway_with(
                    &self.binaries,
                    redis,
                    &self.http,
                    &self.work_dir,
                    env,
                )
                .await?;
                let mut router = system::start_router_with(
                    &self.binaries,
                    redis,
                    std::slice::from_ref(&destination),
                    &self.work_dir,
                    &label,
                    env,
                )?;
                self.paced(
                    &gateway_url,
                    "warmup",
                    200.0,
                    Duration::from_secs(1),
                    &["t"],
                    &mut router,
                )
                .await?;
                let (gateway_before, router_before) = (gateway.cpu_time()?, router.cpu_time()?);
                let row = self
                    .paced(
                        &gateway_url,
                        &label,
                        self.plan.e2e_rate,
                        self.plan.e2e_for,
                        &["t"],
                        &mut router,
                    )
                    .await?;
                let events = row.achieved * self.plan.e2e_for.as_secs_f64();
                let per_event = |before: Duration, after: Duration| {
                    (after - before).as_secs_f64() * 1e6 / events
                };
                eprintln!(
                    "  round {round}, export {setting}: {:.0} events/s; CPU per event: gateway {:.1} µs, \
                     router {:.1} µs; p50 {:.2} ms, p99 {:.2} ms; {}",
                    row.achieved,
                    per_event(gateway_before, gateway.cpu_time()?),
                    per_event(router_before, router.cpu_time()?),
                    row.p50_ms,
                    row.p99_ms,
                    row.verdicts
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
        }
        Ok(())
    }

    async fn paced(
        &self,
        gateway_url: &str,
        label: &str,
        rate: f64,
        duration: Duration,
        destinations: &[&str],
        router: &mut Process,
    ) -> anyhow::Result<LatencyRow> {
        let spec = LoadSpec {
            users_named: label.to_owned(),
            endpoint: Endpoint::Single,
            connections: CONNECTIONS,
            users_per_connection: USERS_PER_CONNECTION,
            stop: Stop::After(duration),
            rate: Some(rate),
            event_types: None,
        };
        let sent = load::run(&self.http, gateway_url, spec).await?;
        let paths: Vec<String> = destinations
            .iter()
            .map(|name| format!("/e2e/{name}"))
            .collect();
        let wanted: Vec<(&str, u64)> = paths
            .iter()
            .map(|path| (path.as_str(), sent.events()))
            .collect();
        self.wait_until_delivered(&wanted, router).await?;
        let mut received = self.sink.take();
        let mut latencies = Vec::new();
        let mut verdicts = Vec::new();
        for path in &paths {
            let received = received.remove(path).unwrap_or_default();
            verdicts.push(received.order.verdict(&sent.accepted));
            latencies.extend(received.latencies_us);
        }
        let ms = |us: u32| f64::from(us) / 1000.0;
        Ok(LatencyRow {
            offered: rate,
            achieved: sent.events_per_sec(),
            destinations: destinations.len(),
            p50_ms: ms(load::percentile(&mut latencies, 50.0)),
            p99_ms: ms(load::percentile(&mut latencies, 99.0)),
            max_ms: ms(latencies.iter().copied().max().unwrap_or(0)),
            verdicts,
        })
    }

    /// Polls the sink until every path has its expected count of events in
    /// order, or nothing has moved for [`STALL`] (then the verdict shows
    /// what is missing or out of order); returns when the last one arrived.
    /// Fails if the router exits.
    async fn wait_until_delivered(
        &self,
        wanted: &[(&str, u64)],
        router: &mut Process,
    ) -> anyhow::Result<Instant> {
        let mut last_total = 0;
        let mut last_progress = Instant::now();
        loop {
            let counts: Vec<u64> = wanted
                .iter()
                .map(|(path, _)| self.sink.in_order(path))
                .collect();
            let total: u64 = counts.iter().sum();
            if counts
                .iter()
                .zip(wanted)
                .all(|(&count, (_, expected))| count >= *expected)
            {
                return Ok(Instant::now());
            }
            if total != last_total {
                last_total = total;
                last_progress = Instant::now();
            } else if last_progress.elapsed() > STALL {
                eprintln!("  no progress for {STALL:?}: {counts:?} of {wanted:?}");
                return Ok(last_progress);
            }
            router.check_running()?;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// A server under load: its process, its URL, and the Redis it writes to
/// (none for the no-op).
#[derive(Clone, Copy)]
struct Target<'a> {
    process: &'a Process,
    url: &'a str,
    redis: Option<&'a Redis>,
}

impl<'a> Target<'a> {
    fn gateway(process: &'a Process, url: &'a str, redis: &'a Redis) -> Self {
        Self {
            process,
            url,
            redis: Some(redis),
        }
    }
}

/// Load runs against one server, added up, with the CPU time they cost it
/// and its Redis.
#[derive(Default)]
struct Slices {
    load: LoadResult,
    server_cpu: Duration,
    redis_cpu: Option<Duration>,
}

impl Slices {
    /// Runs `spec` against `target` and adds its figures; returns the
    /// slice's own requests per second.
    async fn run(
        &mut self,
        http: &reqwest::Client,
        target: Target<'_>,
        spec: LoadSpec,
    ) -> anyhow::Result<f64> {
        let redis_cpu = || {
            target
                .redis
                .map(|redis| redis.process.cpu_time())
                .transpose()
        };
        let before = (target.process.cpu_time()?, redis_cpu()?);
        let load = load::run(http, target.url, spec).await?;
        self.server_cpu += target.process.cpu_time()? - before.0;
        if let (Some(after), Some(before)) = (redis_cpu()?, before.1) {
            *self.redis_cpu.get_or_insert_default() += after - before;
        }
        let rate = load.requests_per_sec();
        self.load.absorb(load);
        Ok(rate)
    }

    fn absorb(&mut self, other: Slices) {
        self.load.absorb(other.load);
        self.server_cpu += other.server_cpu;
        if let Some(cpu) = other.redis_cpu {
            *self.redis_cpu.get_or_insert_default() += cpu;
        }
    }

    fn row(
        &mut self,
        target: &str,
        fsync: &'static str,
        endpoint: Endpoint,
        verdict: Option<Verdict>,
    ) -> IngestRow {
        let result = &mut self.load;
        let events = result.events().max(1) as f64;
        let per_event = |cpu: Duration| cpu.as_secs_f64() * 1e6 / events;
        let ms = |us: u32| f64::from(us) / 1000.0;
        IngestRow {
            target: target.to_owned(),
            fsync,
            endpoint,
            events_per_sec: result.events_per_sec(),
            requests_per_sec: result.requests_per_sec(),
            p50_ms: ms(load::percentile(&mut result.latencies_us, 50.0)),
            p99_ms: ms(load::percentile(&mut result.latencies_us, 99.0)),
            refused: result.refused,
            server_cpu_us: per_event(self.server_cpu),
            redis_cpu_us: self.redis_cpu.map(per_event),
            verdict,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_share_is_the_median_of_its_rounds() {
        let odd = Share::of_rounds("always", vec![0.7, 0.5, 0.9]);
        assert_eq!(
            (odd.median, odd.min, odd.max, odd.rounds),
            (0.7, 0.5, 0.9, 3)
        );
        let even = Share::of_rounds("always", vec![0.8, 0.5, 0.6, 0.9]);
        assert!((even.median - 0.7).abs() < 1e-9, "{}", even.median);
        assert_eq!((even.min, even.max), (0.5, 0.9));
    }
}
