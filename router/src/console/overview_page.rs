//! Every destination at a glance: one card each with its health, recent
//! success rate and latency, deliveries over the last hour, backlog and
//! dead letters. Reloads itself (a link turns that off).

use std::collections::BTreeMap;

use crate::admin::overview::{DestinationView, Overview};
use crate::console::charts::{chart, Series, SPARK};
use crate::console::health::{per_minute, total, Health, CHART_MINUTES, RECENT_MINUTES};
use crate::console::html::{self, escape, url_part};
use crate::destination::history::{Minutes, Tally};

/// Seconds between reloads.
const REFRESH_SECS: u32 = 5;

/// What the page shows besides the overview.
pub struct Shown<'a> {
    /// Each destination's recent minutes; absent when Redis did not answer.
    pub histories: &'a BTreeMap<String, Minutes>,
    pub now_ms: u64,
    pub refresh: bool,
    /// A line about what a form just did.
    pub notice: Option<String>,
}

pub fn render(overview: &Overview, shown: &Shown<'_>) -> String {
    let mut body = format!(
        r#"<h1>Destinations</h1><p class="meta">{count} destinations · router <code>{instance}</code> · {shards} shards · measured {measured}. Success, latency and deliveries per second: the last 5 minutes, every router; the chart: the last hour. Lag, oldest pending and dead letters: from Redis. {toggle}</p>"#,
        count = overview.destinations.len(),
        instance = escape(&overview.instance),
        shards = overview.shards,
        measured = html::time(overview.measured_at_ms),
        toggle = match shown.refresh {
            true =>
                format!(r#"Reloads every {REFRESH_SECS} s (<a href="/?refresh=off">stop</a>)."#),
            false => r#"<a href="/">Reload automatically</a>."#.to_owned(),
        },
    );
    if let Some(notice) = &shown.notice {
        body.push_str(&format!(
            r#"<p class="notice" role="status" data-field="notice">{}</p>"#,
            escape(notice)
        ));
    }
    if !overview.unmeasured_shards.is_empty() {
        let shards: Vec<String> = overview
            .unmeasured_shards
            .iter()
            .map(u16::to_string)
            .collect();
        body.push_str(&format!(
            r#"<p class="notice bad" data-field="unmeasured">Redis did not answer for shards {}: their lag, pending entries and dead letters are missing below.</p>"#,
            shards.join(", ")
        ));
    }
    if overview.destinations.is_empty() {
        body.push_str(r#"<p class="panel">No destinations yet. <a href="/destinations/new">Create one</a>.</p>"#);
    }
    body.push_str(r#"<div class="grid">"#);
    for view in &overview.destinations {
        body.push_str(&card(view, shown.histories.get(&view.name), shown.now_ms));
    }
    body.push_str("</div>");
    html::page(
        "Destinations",
        html::Section::Destinations,
        shown.refresh.then_some(REFRESH_SECS),
        &body,
    )
}

fn card(view: &DestinationView, minutes: Option<&Minutes>, now_ms: u64) -> String {
    let empty = Minutes::new();
    let minutes = minutes.unwrap_or(&empty);
    let recent = total(minutes, now_ms, RECENT_MINUTES);
    let health = Health::of(view, &recent);
    let rate = recent.delivered as f64 / (RECENT_MINUTES * 60) as f64;
    let oldest = view
        .oldest_pending_ms
        .map(|at| html::duration_ms(now_ms.saturating_sub(at)));
    let figures = [
        ("success", "Success", html::percent(recent.success_rate())),
        ("latency", "p50 / p99", latency(&recent)),
        ("rate", "Delivered/s", format!("{rate:.2}")),
        ("lag", "Lag", html::or_dash(view.lag)),
        (
            "oldest",
            "Oldest pending",
            oldest.unwrap_or_else(|| "–".into()),
        ),
        (
            "dead_letters",
            "Dead letters",
            view.dead_letters.to_string(),
        ),
    ];
    let figures = html::figures(&figures);
    let points = per_minute(minutes, now_ms, CHART_MINUTES)
        .iter()
        .map(|tally| Some(tally.delivered as f64 / 60.0))
        .collect();
    let series = Series {
        title: "Deliveries per second",
        unit: "/s",
        points,
        span: "last hour, per minute",
    };
    format!(
        r#"<article class="card" data-destination="{name}"><div class="top"><h2><a href="/destinations/{link}">{name}</a></h2>{badge}</div>{figures}{chart}</article>"#,
        name = escape(&view.name),
        link = url_part(&view.name),
        badge = html::badge(health.class(), health.label()),
        chart = chart(&series, SPARK, "deliveries"),
    )
}

/// p50 and p99 of a tally's attempts (their buckets' upper bounds), or a dash.
pub fn latency(tally: &Tally) -> String {
    if tally.attempts() == 0 {
        return "–".into();
    }
    let p50 = tally.latency_quantile_ms(0.5);
    let p99 = tally.latency_quantile_ms(0.99);
    match (p50, p99) {
        (Some(p50), Some(p99)) if p99 < 1000 => format!("≤{p50} / ≤{p99} ms"),
        (p50, p99) => {
            let bound = |q: Option<u64>| {
                q.map_or_else(
                    || ">10 s".into(),
                    |ms| format!("≤{}", html::duration_ms(ms)),
                )
            };
            format!("{} / {}", bound(p50), bound(p99))
        }
    }
}
