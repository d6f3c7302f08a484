//! Event lookup: by event id, an event's state and attempts at every
//! destination with a preview of its payload; by user id, the user's latest
//! events, each the same way.

use crate::admin::event_log::{EventLog, EventState};
use crate::console::destination_page::outcome;
use crate::console::html::{self, escape, url_part};

/// Characters of a payload shown.
const PREVIEW_CHARS: usize = 2000;

/// What a lookup found.
pub enum Found {
    /// No lookup yet.
    Nothing,
    Event {
        log: EventLog,
        /// While the event is still in its stream.
        payload: Option<String>,
    },
    User {
        user: String,
        logs: Vec<EventLog>,
    },
    /// Nothing known, or Redis did not answer: what went wrong.
    Refused(String),
}

pub fn render(query: &str, found: &Found) -> String {
    let mut body = format!(
        r#"<h1>Event lookup</h1><form class="panel" method="get" action="/events" role="search"><div class="field"><label for="q">Event id or user id</label><div class="actions"><input id="q" name="q" type="text" value="{}" aria-describedby="q-hint" style="max-width:420px"><button type="submit" class="primary">Look up</button></div><span class="hint" id="q-hint">An event id is <code>&lt;shard&gt;-&lt;ms&gt;-&lt;seq&gt;</code>, as the gateway answered; anything else is taken as a user id.</span></div></form>"#,
        escape(query)
    );
    match found {
        Found::Nothing => {}
        Found::Refused(message) => body.push_str(&format!(
            r#"<p class="notice bad" role="alert" data-field="lookup-error">{}</p>"#,
            escape(message)
        )),
        Found::Event { log, payload } => body.push_str(&event(log, payload.as_deref(), true)),
        Found::User { user, logs } => {
            body.push_str(&format!(
                r#"<h2>User <code data-field="user">{}</code>: {} latest events</h2>"#,
                escape(user),
                logs.len()
            ));
            for log in logs {
                body.push_str(&event(log, None, false));
            }
        }
    }
    html::page("Event lookup", html::Section::Events, None, &body)
}

fn state_label(state: EventState) -> &'static str {
    match state {
        EventState::Queued => "queued",
        EventState::Pending => "pending",
        EventState::InBackoff => "in backoff",
        EventState::Delivered => "delivered",
        EventState::DeadLettered => "dead-lettered",
        EventState::Filtered => "filtered (not for it)",
        EventState::BeforeCreation => "before its creation",
        EventState::Unknown => "unknown (past retention)",
    }
}

fn event(log: &EventLog, payload: Option<&str>, with_payload: bool) -> String {
    let mut html = format!(
        r#"<section class="panel" data-event="{id}"><h3><a href="/events?q={link}">{id}</a></h3><p class="meta">user <code data-field="event-user">{user}</code> · type {kind} · received {received}{trace}</p>"#,
        id = escape(&log.event_id),
        link = url_part(&log.event_id),
        user = escape(log.user_id.as_deref().unwrap_or("?")),
        kind = escape(log.event_type.as_deref().unwrap_or("none")),
        received = log
            .received_at_ms
            .map_or_else(|| "(no longer known)".into(), html::time),
        trace = log
            .trace_id
            .as_ref()
            .map(|t| format!(" · trace <code>{}</code>", escape(t)))
            .unwrap_or_default(),
    );
    match payload {
        Some(payload) => {
            let preview: String = payload.chars().take(PREVIEW_CHARS).collect();
            html.push_str(&format!(
                r#"<pre data-field="payload" aria-label="Payload">{}</pre>"#,
                escape(&preview)
            ));
        }
        None if with_payload => html.push_str(
            r#"<p class="muted" data-field="payload-gone">Its payload is no longer in its stream (trimmed once every destination finished with it); a dead letter keeps its own copy.</p>"#,
        ),
        None => {}
    }
    html.push_str(r#"<table><thead><tr><th style="width:18%">Destination</th><th style="width:16%">State</th><th>Attempts</th></tr></thead><tbody>"#);
    for destination in &log.destinations {
        let attempts: String = destination
            .attempts
            .iter()
            .map(|a| {
                format!(
                    "<li>#{n} {time}: {outcome}, {latency}{error}</li>",
                    n = a.attempt,
                    time = html::time(a.at_ms),
                    outcome = outcome(a.status, a.outcome),
                    latency = html::duration_ms(a.latency_ms),
                    error = a
                        .error
                        .as_ref()
                        .map(|e| format!(
                            " — <span data-field=\"attempt-error\">{}</span>",
                            escape(e)
                        ))
                        .unwrap_or_default(),
                )
            })
            .collect();
        let attempts = match attempts.is_empty() {
            true => "<span class=\"muted\">none</span>".to_owned(),
            false => format!("<ol style=\"margin:0;padding-left:18px\">{attempts}</ol>"),
        };
        html.push_str(&format!(
            r#"<tr data-destination="{name}"><td><a href="/destinations/{link}">{name}</a></td><td data-field="state">{state}</td><td>{attempts}</td></tr>"#,
            name = escape(&destination.destination),
            link = url_part(&destination.destination),
            state = state_label(destination.state),
        ));
    }
    html.push_str("</tbody></table></section>");
    html
}
