//! One destination: its state and figures, charts over the last hour, its
//! settings (a form), pause and resume, a test event, its latest attempts,
//! its dead letters (replay, purge) and deletion.

use crate::admin::dead_letters::Page;
use crate::admin::destinations::DestinationDoc;
use crate::admin::event_log::RecentAttempt;
use crate::admin::overview::DestinationView;
use crate::console::charts::{chart, Series, WIDE};
use crate::console::forms::{self, Purpose, Refusal, Values};
use crate::console::health::{per_minute, total, Health, CHART_MINUTES, RECENT_MINUTES};
use crate::console::html::{self, button_form, csrf_field, escape, url_part};
use crate::console::overview_page::latency;
use crate::destination::history::{Minutes, Tally};

/// Everything the page shows.
pub struct DestinationPage<'a> {
    /// Its definition as the API shows it (secrets masked).
    pub doc: &'a DestinationDoc,
    /// This router's latest measurement of it (absent until measured).
    pub view: Option<&'a DestinationView>,
    /// Its recent minutes; `None` when Redis did not answer.
    pub minutes: Option<&'a Minutes>,
    /// Its latest attempts, or why they could not be read.
    pub recent: Result<Vec<RecentAttempt>, String>,
    pub dead_letters: Result<Page, String>,
    /// The settings form's values (as typed, after a refusal).
    pub values: Values,
    pub refusal: Option<Refusal>,
    pub notice: Option<String>,
    pub csrf: &'a str,
    pub now_ms: u64,
}

pub fn render(page: &DestinationPage<'_>) -> String {
    let name = &page.doc.name;
    let base = format!("/destinations/{}", url_part(name));
    // The last minutes over every router, which the state and figures read.
    let recent = page
        .minutes
        .map(|m| total(m, page.now_ms, RECENT_MINUTES))
        .unwrap_or_default();
    let mut body = header(page, &recent, &base);
    if let Some(notice) = &page.notice {
        body.push_str(&format!(
            r#"<p class="notice" role="status" data-field="notice">{}</p>"#,
            escape(notice)
        ));
    }
    body.push_str(&figures(page, &recent));
    body.push_str(&charts(page));
    body.push_str(&format!(
        r#"<section class="panel" aria-labelledby="settings"><h3 id="settings">Settings</h3>{form}{secrets}</section>"#,
        form = forms::render(Purpose::Edit, &base, &page.values, page.refusal.as_ref(), page.csrf),
        secrets = secrets(page.doc),
    ));
    body.push_str(&attempts(page));
    body.push_str(&dead_letters(page, &base));
    body.push_str(&format!(
        r#"<section class="panel" aria-labelledby="danger"><h3 id="danger">Delete</h3><form method="post" action="{base}/delete">{csrf}<p>Delivery stops and its consumer groups are removed; its dead letters stay until purged.</p><div class="actions"><input type="checkbox" id="confirm-delete" name="confirm" value="yes" required><label for="confirm-delete">Delete <strong>{name}</strong></label><button type="submit" class="danger">Delete destination</button></div></form></section>"#,
        csrf = csrf_field(page.csrf),
        name = escape(name),
    ));
    html::page(name, html::Section::Destinations, None, &body)
}

fn header(page: &DestinationPage<'_>, recent: &Tally, base: &str) -> String {
    let (badge, pause) = match page.view {
        Some(view) => {
            let health = Health::of(view, recent);
            let pause = match view.paused {
                true => button_form(&format!("{base}/resume"), page.csrf, "Resume", "primary"),
                false => button_form(&format!("{base}/pause"), page.csrf, "Pause", ""),
            };
            (html::badge(health.class(), health.label()), pause)
        }
        None => (html::badge("paused", "not measured yet"), String::new()),
    };
    format!(
        r#"<div class="top" style="display:flex;gap:12px;align-items:center;flex-wrap:wrap"><h1 data-destination="{name}">{name}</h1>{badge}<div class="actions">{pause}{test}</div></div><p class="meta">POSTs to <code>{url}</code> · event types: {types} · created {created} · revision {revision}</p>"#,
        name = escape(&page.doc.name),
        url = escape(&page.doc.url),
        types = match page.doc.event_types.is_empty() {
            true => "all".to_owned(),
            false => escape(&page.doc.event_types.join(", ")),
        },
        created = html::time(page.doc.created_at_ms),
        revision = page.doc.revision,
        test = button_form(
            &format!("{base}/test-event"),
            page.csrf,
            "Send a test event",
            ""
        ),
    )
}

fn figures(page: &DestinationPage<'_>, recent: &Tally) -> String {
    let view = page.view;
    let of_view = |f: &dyn Fn(&DestinationView) -> String| view.map_or_else(|| "–".into(), f);
    let items = [
        ("success", "Success", html::percent(recent.success_rate())),
        ("latency", "p50 / p99", latency(recent)),
        (
            "attempts",
            "Attempts (5 min)",
            recent.attempts().to_string(),
        ),
        ("lag", "Lag", of_view(&|v| html::or_dash(v.lag))),
        ("pending", "Pending", of_view(&|v| v.pending.to_string())),
        (
            "oldest",
            "Oldest pending",
            of_view(&|v| {
                v.oldest_pending_ms.map_or_else(
                    || "–".into(),
                    |at| html::duration_ms(page.now_ms.saturating_sub(at)),
                )
            }),
        ),
        (
            "dead_letters",
            "Dead letters",
            of_view(&|v| v.dead_letters.to_string()),
        ),
        (
            "circuit",
            "Circuit",
            of_view(&|v| format!("{:?}", v.breaker.state).to_lowercase()),
        ),
        (
            "parked",
            "Parked users",
            of_view(&|v| v.counts.parked_users.to_string()),
        ),
    ];
    let cells = html::figures(&items);
    let last_error = view
        .and_then(|v| v.counts.last_error.as_ref())
        .map(|error| {
            format!(
                r#"<p>Last error ({at}, this router): <span data-field="last_error">{status}{message}</span></p>"#,
                at = html::time(error.at_ms),
                status = error.status.map(|s| format!("{s}: ")).unwrap_or_default(),
                message = escape(&error.message),
            )
        })
        .unwrap_or_default();
    format!(r#"<section class="panel" aria-label="Figures">{cells}{last_error}</section>"#)
}

fn charts(page: &DestinationPage<'_>) -> String {
    let Some(minutes) = page.minutes else {
        return r#"<section class="panel"><p class="notice bad">The history could not be read from Redis.</p></section>"#.into();
    };
    let tallies = per_minute(minutes, page.now_ms, CHART_MINUTES);
    let series = |title, unit, value: &dyn Fn(&Tally) -> Option<f64>| Series {
        title,
        unit,
        points: tallies.iter().map(value).collect(),
        span: "last hour, per minute",
    };
    let deliveries = series("Deliveries per second", "/s", &|t| {
        Some(t.delivered as f64 / 60.0)
    });
    let failures = series("Failed attempts per minute", "", &|t| Some(t.failed as f64));
    let p99 = series("Attempt latency p99", " ms", &|t| {
        t.latency_quantile_ms(0.99).map(|ms| ms as f64)
    });
    format!(
        r#"<section class="panel" aria-labelledby="history"><h3 id="history">Last hour (every router)</h3><div class="columns">{}{}{}</div></section>"#,
        chart(&deliveries, WIDE, "deliveries"),
        chart(&failures, WIDE, "failures"),
        chart(&p99, WIDE, "latency"),
    )
}

fn secrets(doc: &DestinationDoc) -> String {
    let secrets = match doc.signing_secrets.is_empty() {
        true => "none".to_owned(),
        false => escape(&doc.signing_secrets.join(", ")),
    };
    let headers = match doc.headers.is_empty() {
        true => "none".to_owned(),
        false => doc
            .headers
            .iter()
            .map(|(name, value)| format!("{}: {}", escape(name), escape(value)))
            .collect::<Vec<_>>()
            .join(", "),
    };
    format!(
        r#"<p class="muted">Signing secrets: <span data-field="secrets">{secrets}</span> · headers: {headers}. Change these through the admin API (<code>PATCH /admin/destinations/…</code>).</p>"#
    )
}

fn attempts(page: &DestinationPage<'_>) -> String {
    let rows = match &page.recent {
        Err(error) => format!(
            r#"<p class="notice bad">Cannot read the delivery log: {}</p>"#,
            escape(error)
        ),
        Ok(recent) if recent.is_empty() => {
            "<p class=\"muted\">No attempts recorded yet (or the delivery log is off).</p>".into()
        }
        Ok(recent) => {
            let rows: String = recent.iter().map(attempt_row).collect();
            format!(
                r#"<table data-field="attempt-list"><thead><tr><th style="width:18%">Time</th><th style="width:20%">Event</th><th style="width:14%">User</th><th class="num" style="width:7%">#</th><th style="width:13%">Outcome</th><th class="num" style="width:9%">Latency</th><th>Error</th></tr></thead><tbody>{rows}</tbody></table>"#
            )
        }
    };
    format!(
        r#"<section class="panel" aria-labelledby="attempts"><h3 id="attempts">Latest attempts</h3>{rows}</section>"#
    )
}

fn attempt_row(recent: &RecentAttempt) -> String {
    let attempt = &recent.attempt;
    format!(
        r#"<tr><td>{time}</td><td><a href="/events?q={link}">{event}</a></td><td><span class="clip">{user}</span></td><td class="num">{n}</td><td>{outcome}</td><td class="num">{latency}</td><td><span class="clip" title="{error}">{error}</span></td></tr>"#,
        time = html::time(attempt.at_ms),
        link = url_part(&recent.event_id),
        event = escape(&recent.event_id),
        user = escape(&recent.user_id),
        n = attempt.attempt,
        outcome = outcome(attempt.status, attempt.outcome),
        latency = html::duration_ms(attempt.latency_ms),
        error = escape(attempt.error.as_deref().unwrap_or("")),
    )
}

/// An attempt's status and outcome, e.g. `503 · retry`.
pub fn outcome(status: Option<u16>, logged: crate::worker::delivery_log::Logged) -> String {
    let logged = serde_json::to_value(logged)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default();
    match status {
        Some(status) => format!("{status} · {}", escape(&logged)),
        None => escape(&logged),
    }
}

fn dead_letters(page: &DestinationPage<'_>, base: &str) -> String {
    let list = match &page.dead_letters {
        Err(error) => format!(
            r#"<p class="notice bad">Cannot read the dead letters: {}</p>"#,
            escape(error)
        ),
        Ok(listed) if listed.dead_letters.is_empty() => {
            r#"<p class="muted" data-field="no-dead-letters">No dead letters.</p>"#.into()
        }
        Ok(listed) => {
            let rows: String = listed
                .dead_letters
                .iter()
                .map(|letter| {
                    let event = letter.event_id.clone().unwrap_or_default();
                    format!(
                        r#"<tr><td>{time}</td><td><a href="/events?q={link}">{event}</a></td><td><span class="clip">{user}</span></td><td class="num">{attempts}</td><td><span class="clip" title="{error}">{error}</span></td><td><pre>{payload}</pre></td></tr>"#,
                        time = html::time(letter.failed_at_ms),
                        link = url_part(&event),
                        event = escape(&event),
                        user = escape(letter.user_id.as_deref().unwrap_or("")),
                        attempts = html::or_dash(letter.attempts),
                        error = escape(&format!(
                            "{}{}",
                            letter.last_status.map(|s| format!("{s}: ")).unwrap_or_default(),
                            letter.last_error.as_deref().unwrap_or("")
                        )),
                        payload = escape(letter.payload.as_ref().map_or("", |p| p.get())),
                    )
                })
                .collect();
            let more = match listed.next_cursor {
                Some(_) => "<p class=\"muted\">Showing the oldest 50.</p>",
                None => "",
            };
            format!(
                r#"<table data-field="dead-letter-list"><thead><tr><th style="width:17%">Failed</th><th style="width:18%">Event</th><th style="width:12%">User</th><th class="num" style="width:8%">Attempts</th><th style="width:20%">Last error</th><th>Payload</th></tr></thead><tbody>{rows}</tbody></table>{more}"#
            )
        }
    };
    let missing = match &page.dead_letters {
        Ok(listed) if !listed.unavailable_shards.is_empty() => format!(
            r#"<p class="notice bad" data-field="dead-letters-unavailable">Not listed: {}.</p>"#,
            escape(&html::unanswered(&listed.unavailable_shards))
        ),
        _ => String::new(),
    };
    let count = page.view.map_or(0, |v| v.dead_letters);
    format!(
        r#"<section class="panel" aria-labelledby="dead"><h3 id="dead">Dead letters (<span data-field="dead-letter-count">{count}</span>)</h3><div class="actions">{replay}{purge}</div>{missing}{list}</section>"#,
        replay = button_form(
            &format!("{base}/replay"),
            page.csrf,
            "Replay all",
            "primary"
        ),
        purge = button_form(&format!("{base}/purge"), page.csrf, "Purge all", "danger"),
    )
}
