//! The status page: one server-rendered HTML page, no scripts, that reloads
//! itself. Every number sits in an element with a `data-field` attribute,
//! inside a row with `data-destination`, so a test can read it.

use std::fmt::Write;

use serde::Deserialize;

use crate::admin::overview::{DestinationView, Overview};
use crate::destination::breaker::BreakerState;

/// Seconds between reloads.
const REFRESH_SECS: u32 = 2;

/// What the replay button just did, shown once above the table.
#[derive(Debug, Default, Deserialize)]
pub struct Notice {
    pub replayed: Option<u64>,
    pub destination: Option<String>,
}

pub fn render(overview: &Overview, notice: &Notice) -> String {
    let mut page = String::with_capacity(8 * 1024);
    let _ = write!(
        page,
        r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="refresh" content="{REFRESH_SECS}; url=/">
<title>Event delivery: destinations</title>
<style>
body {{ font: 14px/1.4 system-ui, sans-serif; margin: 24px; color: #1d2330; }}
h1 {{ font-size: 20px; margin: 0 0 4px; }}
.meta {{ color: #667; margin-bottom: 16px; }}
table {{ border-collapse: collapse; width: 100%; }}
th, td {{ text-align: left; padding: 8px 10px; border-bottom: 1px solid #e3e6ee; vertical-align: top; }}
th {{ background: #f4f6fa; font-weight: 600; }}
td.num {{ text-align: right; font-variant-numeric: tabular-nums; }}
.state {{ font-weight: 600; padding: 2px 8px; border-radius: 10px; }}
.state.ok {{ background: #dcf5e3; color: #17612f; }}
.state.paused {{ background: #fff1cc; color: #7a5800; }}
.state.failing {{ background: #fde0e0; color: #8a1c1c; }}
.error {{ color: #8a1c1c; max-width: 360px; overflow-wrap: anywhere; }}
.lookup {{ margin-top: 16px; }}
.notice {{ background: #e6f0ff; padding: 8px 12px; border-radius: 6px; margin-bottom: 12px; }}
button {{ font: inherit; padding: 3px 10px; cursor: pointer; white-space: nowrap; }}
</style></head>
<body data-sequence="{sequence}">
<h1>Destinations</h1>
<div class="meta">Router <code>{instance}</code> · {shards} shards · destinations at revision <span data-field="revision">{revision}</span> · measured {measured} · reloads every {REFRESH_SECS} s. Lag, pending and dead letters are from Redis; counts and rates are this router's since it started.</div>
"#,
        sequence = overview.sequence,
        instance = escape(&overview.instance),
        shards = overview.shards,
        revision = overview.revision,
        measured = humantime::format_rfc3339_seconds(
            std::time::UNIX_EPOCH + std::time::Duration::from_millis(overview.measured_at_ms)
        ),
    );
    if !overview.unmeasured_shards.is_empty() {
        let shards: Vec<String> = overview
            .unmeasured_shards
            .iter()
            .map(u16::to_string)
            .collect();
        let _ = write!(
            page,
            r#"<div class="notice" data-field="unmeasured">Redis did not answer for shards {}: their lag, pending entries, dead letters and owners are missing below.</div>"#,
            shards.join(", ")
        );
    }
    if let (Some(replayed), Some(destination)) = (notice.replayed, &notice.destination) {
        let _ = write!(
            page,
            r#"<div class="notice" data-field="notice">Replaying {replayed} dead letters to {}.</div>"#,
            escape(destination)
        );
    }
    page.push_str(
        "<table><thead><tr><th>Destination</th><th>State</th><th>Delivered/s</th><th>Lag</th>\
         <th>Pending</th><th>Circuit</th><th>In flight</th><th>Users in backoff</th><th>Parked users</th><th>Parked events</th><th>Dead letters</th>\
         <th>Delivered</th><th>Retries</th><th>Last error</th><th>Shards owned here</th><th></th></tr></thead><tbody>\n",
    );
    for destination in &overview.destinations {
        row(&mut page, destination, &overview.instance);
    }
    page.push_str(
        "</tbody></table>\n<form method=\"get\" action=\"/events\" class=\"lookup\">\
         <label>What happened to an event? <input name=\"id\" placeholder=\"7-1795353102574-0\" \
         size=\"24\" data-field=\"event_lookup\"></label> <button type=\"submit\">Show its delivery log</button>\
         </form></body></html>\n",
    );
    page
}

/// The state column: its CSS class and text.
fn state_of(d: &DestinationView) -> (&'static str, String) {
    let stalled = d.stalled_workers();
    if d.paused {
        ("paused", "paused".to_owned())
    } else if d.breaker.state != BreakerState::Closed {
        ("failing", "circuit open".to_owned())
    } else if stalled > 0 {
        // The admin API names what each stalled worker waits on.
        ("failing", format!("stalled ({stalled} shards)"))
    } else if d.counts.users_in_backoff > 0 {
        ("failing", "retrying".to_owned())
    } else {
        ("ok", "delivering".to_owned())
    }
}

/// The last error, escaped, with when it happened.
fn last_error_of(d: &DestinationView) -> String {
    d.counts.last_error.as_ref().map_or_else(String::new, |e| {
        format!(
            "{} <small>({})</small>",
            escape(&e.message),
            humantime::format_rfc3339_seconds(
                std::time::UNIX_EPOCH + std::time::Duration::from_millis(e.at_ms)
            )
        )
    })
}

/// The breaker's state, and since when unless closed.
fn breaker_of(d: &DestinationView) -> String {
    let state = match d.breaker.state {
        BreakerState::Closed => return "closed".to_owned(),
        BreakerState::Open => "open",
        BreakerState::HalfOpen => "half-open",
    };
    format!(
        "{state} since {}",
        humantime::format_rfc3339_seconds(
            std::time::UNIX_EPOCH + std::time::Duration::from_millis(d.breaker.since_ms)
        )
    )
}

fn row(page: &mut String, d: &DestinationView, instance: &str) {
    let (state_class, state) = state_of(d);
    let lag = d.lag.map_or_else(|| "?".to_owned(), |lag| lag.to_string());
    let last_error = last_error_of(d);
    let owned = d
        .owners
        .iter()
        .filter(|owner| owner.as_deref() == Some(instance))
        .count();
    let name = escape(&d.name);
    let _ = write!(
        page,
        r#"<tr data-destination="{name}">
<td><strong>{name}</strong><br><small data-field="url">{url}</small><br><small>event types: <span data-field="event_types">{event_types}</span> · revision <span data-field="definition_revision">{definition_revision}</span></small></td>
<td><span class="state {state_class}" data-field="state">{state}</span></td>
<td class="num" data-field="delivery_rate">{rate:.1}</td>
<td class="num" data-field="lag">{lag}</td>
<td class="num" data-field="pending">{pending}</td>
<td data-field="breaker">{breaker}</td>
<td class="num" data-field="in_flight">{in_flight}</td>
<td class="num" data-field="users_in_backoff">{backoff}</td>
<td class="num" data-field="parked_users">{parked_users}</td>
<td class="num" data-field="parked_events">{parked_events}</td>
<td class="num" data-field="dead_letters">{dead_letters}</td>
<td class="num" data-field="delivered">{delivered}</td>
<td class="num" data-field="retried">{retried}</td>
<td class="error" data-field="last_error">{last_error}</td>
<td class="num" data-field="owned_shards">{owned} / {shards}</td>
<td><form method="post" action="/destinations/{name}/replay"><button type="submit" data-action="replay"{disabled}>Replay dead letters</button></form></td>
</tr>
"#,
        url = escape(&d.url),
        event_types = if d.event_types.is_empty() {
            "all".to_owned()
        } else {
            escape(&d.event_types.join(", "))
        },
        definition_revision = d.revision,
        rate = d.delivery_rate,
        pending = d.pending,
        breaker = breaker_of(d),
        in_flight = d.counts.in_flight,
        backoff = d.counts.users_in_backoff,
        parked_users = d.counts.parked_users,
        parked_events = d.counts.parked_events,
        dead_letters = d.dead_letters,
        delivered = d.counts.delivered,
        retried = d.counts.retried,
        shards = d.owners.len(),
        disabled = if d.dead_letters == 0 { " disabled" } else { "" },
    );
}

fn escape(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => escaped.push_str("&amp;"),
            '<' => escaped.push_str("&lt;"),
            '>' => escaped.push_str("&gt;"),
            '"' => escaped.push_str("&quot;"),
            '\'' => escaped.push_str("&#39;"),
            c => escaped.push(c),
        }
    }
    escaped
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::destination::stats::{Counts, LastError};

    #[test]
    fn page_shows_each_number_and_escapes_errors() {
        let overview = Overview {
            sequence: 7,
            measured_at_ms: 0,
            instance: "r1".into(),
            shards: 2,
            revision: 12,
            unmeasured_shards: Vec::new(),
            destinations: vec![DestinationView {
                name: "crm".into(),
                url: "http://crm/hook".into(),
                event_types: vec!["order.*".into(), "<x>".into()],
                revision: 11,
                created_at_ms: 0,
                paused: true,
                breaker: crate::destination::breaker::BreakerView {
                    state: BreakerState::Open,
                    since_ms: 0,
                },
                lag: Some(12),
                pending: 3,
                dead_letters: 4,
                counts: Counts {
                    delivered: 99,
                    last_error: Some(LastError {
                        message: "HTTP 500: <b>boom</b>".into(),
                        status: Some(500),
                        at_ms: 0,
                    }),
                    ..Counts::default()
                },
                delivery_rate: 2.5,
                owners: vec![Some("r1".into()), None],
                workers: Vec::new(),
            }],
        };
        let page = render(&overview, &Notice::default());
        for expected in [
            r#"data-sequence="7""#,
            r#"data-field="lag">12<"#,
            r#"data-field="pending">3<"#,
            r#"data-field="dead_letters">4<"#,
            r#"data-field="delivered">99<"#,
            r#"data-field="delivery_rate">2.5<"#,
            r#"data-field="state">paused<"#,
            r#"data-field="owned_shards">1 / 2<"#,
            r#"data-field="revision">12<"#,
            r#"action="/events""#,
            r#"data-field="breaker">open since 1970-01-01T00:00:00Z<"#,
            r#"data-field="definition_revision">11<"#,
            r#"data-field="event_types">order.*, &lt;x&gt;<"#,
            "HTTP 500: &lt;b&gt;boom&lt;/b&gt;",
        ] {
            assert!(page.contains(expected), "missing {expected} in {page}");
        }
        assert!(!page.contains("<b>boom"));
    }

    #[test]
    fn a_stalled_worker_shows_in_the_state() {
        use crate::destination::progress::{WorkerState, WorkerView};
        let worker = |state| WorkerView {
            shard: 0,
            started_at_ms: 0,
            state,
            waiting_on: Vec::new(),
            stalled_for_ms: None,
        };
        let mut overview = Overview {
            sequence: 1,
            measured_at_ms: 0,
            instance: "r1".into(),
            shards: 2,
            revision: 1,
            unmeasured_shards: Vec::new(),
            destinations: vec![DestinationView {
                name: "crm".into(),
                url: "http://crm/hook".into(),
                event_types: Vec::new(),
                revision: 1,
                created_at_ms: 0,
                paused: false,
                breaker: crate::destination::breaker::BreakerView {
                    state: BreakerState::Closed,
                    since_ms: 0,
                },
                lag: Some(0),
                pending: 1,
                dead_letters: 0,
                counts: Counts::default(),
                delivery_rate: 0.0,
                owners: vec![Some("r1".into()), Some("r1".into())],
                workers: vec![worker(WorkerState::Working), worker(WorkerState::Stalled)],
            }],
        };
        let page = render(&overview, &Notice::default());
        assert!(
            page.contains(r#"data-field="state">stalled (1 shards)<"#),
            "{page}"
        );
        overview.destinations[0].workers[1].state = WorkerState::Idle;
        let page = render(&overview, &Notice::default());
        assert!(page.contains(r#"data-field="state">delivering<"#), "{page}");
    }
}
