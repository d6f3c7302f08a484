//! The console's routes. Pages are GETs; every change is a form POST that
//! carries the form token ([`csrf`]), goes through the admin API's own
//! operation, then redirects (so a reload repeats nothing) to a page that
//! says what happened.
//!
//! | route | does |
//! |---|---|
//! | `GET /` | every destination ([`overview_page`]) |
//! | `GET /create`, `POST /create` | the new-destination form, and creating |
//! | `GET /destinations/{name}`, `POST /destinations/{name}` | one destination, and saving its settings |
//! | `POST /destinations/{name}/{pause,resume,replay,purge,test-event,delete}` | its buttons |
//! | `GET /events?q=` | event lookup, by event id or user id |

use std::collections::BTreeMap;

use actix_web::http::{header, StatusCode};
use actix_web::{web, HttpRequest, HttpResponse, ResponseError};
use futures_util::future::join_all;
use protocol::{EventEntry, EventId};
use serde::Deserialize;

use crate::admin::dead_letters::Selection;
use crate::admin::destinations::DestinationDoc;
use crate::admin::routes::{resource, AdminError, AdminState};
use crate::console::csrf;
use crate::console::destination_page::{self, DestinationPage};
use crate::console::event_page::{self, Found};
use crate::console::forms::{self, Purpose, Refusal, Values};
use crate::console::health::CHART_MINUTES;
use crate::console::html::{self, escape, url_part};
use crate::console::overview_page;
use crate::destination::history::Minutes;

/// Attempts a destination page lists.
const RECENT_ATTEMPTS: usize = 20;

/// Dead letters a destination page lists.
const DEAD_LETTERS_SHOWN: usize = 50;

/// Events a user lookup shows.
const USER_EVENTS: usize = 10;

pub fn pages(config: &mut web::ServiceConfig) {
    let post = |path: &str, action: Action| {
        resource(
            path,
            vec![web::post()
                .to(move |state, request, name, form| act(state, request, name, form, action))],
        )
    };
    config
        .service(resource("/", vec![web::get().to(overview)]))
        .service(resource(
            "/create",
            vec![web::get().to(create_form), web::post().to(create)],
        ))
        .service(resource("/events", vec![web::get().to(lookup)]))
        .service(resource(
            "/destinations/{name}",
            vec![web::get().to(destination), web::post().to(save)],
        ))
        .service(post("/destinations/{name}/pause", Action::Pause))
        .service(post("/destinations/{name}/resume", Action::Resume))
        .service(post("/destinations/{name}/replay", Action::Replay))
        .service(post("/destinations/{name}/purge", Action::Purge))
        .service(post("/destinations/{name}/test-event", Action::TestEvent))
        .service(post("/destinations/{name}/delete", Action::Delete));
}

/// A form's fields.
type Form = web::Form<Vec<(String, String)>>;

/// The request's form token, and the cookie to set when it had none.
fn token(request: &HttpRequest) -> (String, Option<actix_web::cookie::Cookie<'static>>) {
    match csrf::token_of(request) {
        Some(token) => (token, None),
        None => {
            let token = csrf::new_token();
            let cookie = csrf::cookie(&token);
            (token, Some(cookie))
        }
    }
}

fn html_response(
    status: StatusCode,
    cookie: Option<actix_web::cookie::Cookie<'static>>,
    body: String,
) -> HttpResponse {
    let mut response = HttpResponse::build(status);
    response
        .content_type("text/html; charset=utf-8")
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .insert_header(("content-security-policy", "default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"));
    if let Some(cookie) = cookie {
        response.cookie(cookie);
    }
    response.body(body)
}

/// An error as a page.
fn error_page(error: &AdminError) -> HttpResponse {
    let status = error.status_code();
    if status.is_server_error() {
        tracing::warn!(%error, "Console request failed.");
    }
    let body = format!(
        r#"<h1>{}</h1><p class="notice bad" role="alert" data-field="error">{}</p><p><a href="/">Back to the destinations</a></p>"#,
        status.canonical_reason().unwrap_or("Error"),
        escape(&error.to_string())
    );
    html_response(
        status,
        None,
        html::page("Error", html::Section::Destinations, None, &body),
    )
}

/// A form whose token is missing or wrong: sent by another site, or from a
/// page older than the browser's cookie.
fn forged() -> HttpResponse {
    let body = r#"<h1>Form refused</h1><p class="notice bad" role="alert" data-field="error">This form's token does not match: it came from another site, or from a page older than this browser's session. Nothing changed. Reload the page and try again.</p><p><a href="/">Back to the destinations</a></p>"#;
    html_response(
        StatusCode::FORBIDDEN,
        None,
        html::page("Form refused", html::Section::Destinations, None, body),
    )
}

fn see_other(location: String) -> HttpResponse {
    HttpResponse::SeeOther()
        .insert_header((header::LOCATION, location))
        .finish()
}

fn field<'a>(form: &'a [(String, String)], name: &str) -> Option<&'a str> {
    form.iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

fn values(form: &[(String, String)]) -> Values {
    form.iter()
        .filter(|(k, _)| k != "csrf")
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// What a redirect after a change tells the page it lands on.
#[derive(Debug, Default, Deserialize)]
struct Done {
    done: Option<String>,
    n: Option<u64>,
    id: Option<String>,
    refresh: Option<String>,
}

impl Done {
    /// The notice, from a fixed set of sentences (nothing from the query is
    /// shown but a number and an id, escaped).
    fn notice(&self) -> Option<String> {
        let n = self.n.unwrap_or(0);
        let id = self.id.as_deref().unwrap_or("");
        Some(match self.done.as_deref()? {
            "created" => "Created. It receives the events accepted from now on.".into(),
            "saved" => "Saved. The next attempts use the new settings.".into(),
            "paused" => "Paused on every router.".into(),
            "resumed" => "Resumed.".into(),
            "replayed" => format!("Replaying {n} dead letters, in each user's order."),
            "purged" => format!("Purged {n} dead letters."),
            "test-event" => format!(
                "Test event {id} sent; it appears under the latest attempts once attempted."
            ),
            "deleted" => {
                format!("Deleted {id}. Its dead letters stay until purged through the API.")
            }
            _ => return None,
        })
    }
}

async fn histories(state: &AdminState, names: &[String], now_ms: u64) -> BTreeMap<String, Minutes> {
    let reads = names.iter().map(|name| async move {
        (
            name.clone(),
            state.history.read(name, now_ms, CHART_MINUTES).await,
        )
    });
    join_all(reads)
        .await
        .into_iter()
        .filter_map(|(name, read)| read.ok().map(|minutes| (name, minutes)))
        .collect()
}

async fn overview(state: web::Data<AdminState>, query: web::Query<Done>) -> HttpResponse {
    let mut overview = state.overview().await;
    // A destination deleted here since the measurement is gone at once.
    let defined = state.registry.names();
    overview
        .destinations
        .retain(|view| defined.contains(&view.name));
    let now_ms = protocol::unix_millis();
    let names: Vec<String> = overview
        .destinations
        .iter()
        .map(|d| d.name.clone())
        .collect();
    let histories = histories(&state, &names, now_ms).await;
    let shown = overview_page::Shown {
        histories: &histories,
        now_ms,
        refresh: query.refresh.as_deref() != Some("off") && query.done.is_none(),
        notice: query.notice(),
    };
    html_response(
        StatusCode::OK,
        None,
        overview_page::render(&overview, &shown),
    )
}

fn create_page(
    request: &HttpRequest,
    values: &Values,
    refusal: Option<&Refusal>,
    status: StatusCode,
) -> HttpResponse {
    let (token, cookie) = token(request);
    let body = format!(
        r#"<h1>New destination</h1><p class="meta">It receives the events accepted after it is created. Every router starts delivering to it within a second.</p><section class="panel">{}</section>"#,
        forms::render(Purpose::Create, "/create", values, refusal, &token)
    );
    html_response(
        status,
        cookie,
        html::page(
            "New destination",
            html::Section::NewDestination,
            None,
            &body,
        ),
    )
}

async fn create_form(request: HttpRequest) -> HttpResponse {
    create_page(&request, &forms::defaults(), None, StatusCode::OK)
}

async fn create(state: web::Data<AdminState>, request: HttpRequest, form: Form) -> HttpResponse {
    if !csrf::matches(&request, field(&form, "csrf")) {
        return forged();
    }
    let values = values(&form);
    let body = forms::to_json(Purpose::Create, &values).to_string();
    match state.create_destination(body.as_bytes()).await {
        Ok(definition) => see_other(format!(
            "/destinations/{}?done=created",
            url_part(&definition.settings.name)
        )),
        Err(AdminError::Invalid(message) | AdminError::Conflict(message)) => {
            let refusal = forms::place(&message);
            create_page(
                &request,
                &values,
                Some(&refusal),
                StatusCode::UNPROCESSABLE_ENTITY,
            )
        }
        Err(error) => error_page(&error),
    }
}

/// What the destination page needs beyond the path.
struct Edit {
    values: Option<Values>,
    refusal: Option<Refusal>,
    notice: Option<String>,
    status: StatusCode,
}

async fn destination_page(
    state: &AdminState,
    request: &HttpRequest,
    name: &str,
    edit: Edit,
) -> HttpResponse {
    let definition = match state.catalog.get(name).await {
        Ok(definition) => definition,
        Err(error) => return error_page(&error.into()),
    };
    let (token, cookie) = token(request);
    let now_ms = protocol::unix_millis();
    let doc = DestinationDoc::new(&definition, None);
    let view = state.status_of(name).await;
    let minutes = state.history.read(name, now_ms, CHART_MINUTES).await.ok();
    let recent = state
        .log_reader()
        .recent(name, RECENT_ATTEMPTS)
        .await
        .map_err(|e| e.to_string());
    let dead_letters = match state.dead_letters(name) {
        Ok(letters) => letters
            .list(DEAD_LETTERS_SHOWN, None)
            .await
            .map_err(|e| e.to_string()),
        Err(error) => Err(error.to_string()),
    };
    let page = DestinationPage {
        doc: &doc,
        view: view.as_ref(),
        minutes: minutes.as_ref(),
        recent,
        dead_letters,
        values: edit
            .values
            .unwrap_or_else(|| forms::values_of(&definition.settings)),
        refusal: edit.refusal,
        notice: edit.notice,
        csrf: &token,
        now_ms,
    };
    html_response(edit.status, cookie, destination_page::render(&page))
}

async fn destination(
    state: web::Data<AdminState>,
    request: HttpRequest,
    name: web::Path<String>,
    query: web::Query<Done>,
) -> HttpResponse {
    let edit = Edit {
        values: None,
        refusal: None,
        notice: query.notice(),
        status: StatusCode::OK,
    };
    destination_page(&state, &request, &name, edit).await
}

async fn save(
    state: web::Data<AdminState>,
    request: HttpRequest,
    name: web::Path<String>,
    form: Form,
) -> HttpResponse {
    if !csrf::matches(&request, field(&form, "csrf")) {
        return forged();
    }
    let values = values(&form);
    let patch = forms::to_json(Purpose::Edit, &values).to_string();
    match state.change_destination(&name, patch.as_bytes()).await {
        Ok(_) => see_other(format!("/destinations/{}?done=saved", url_part(&name))),
        Err(AdminError::Invalid(message) | AdminError::Conflict(message)) => {
            let edit = Edit {
                values: Some(values),
                refusal: Some(forms::place(&message)),
                notice: None,
                status: StatusCode::UNPROCESSABLE_ENTITY,
            };
            destination_page(&state, &request, &name, edit).await
        }
        Err(error) => error_page(&error),
    }
}

/// A destination page's buttons.
#[derive(Debug, Clone, Copy)]
enum Action {
    Pause,
    Resume,
    Replay,
    Purge,
    TestEvent,
    Delete,
}

async fn act(
    state: web::Data<AdminState>,
    request: HttpRequest,
    name: web::Path<String>,
    form: Form,
    action: Action,
) -> HttpResponse {
    if !csrf::matches(&request, field(&form, "csrf")) {
        return forged();
    }
    let page = format!("/destinations/{}", url_part(&name));
    let done = match action {
        Action::Pause => state
            .set_paused(&name, true)
            .await
            .map(|()| format!("{page}?done=paused")),
        Action::Resume => state
            .set_paused(&name, false)
            .await
            .map(|()| format!("{page}?done=resumed")),
        Action::Replay => replay_all(&state, &name)
            .await
            .map(|n| format!("{page}?done=replayed&n={n}")),
        Action::Purge => purge(&state, &name)
            .await
            .map(|n| format!("{page}?done=purged&n={n}")),
        Action::TestEvent => send_test_event(&state, &name)
            .await
            .map(|id| format!("{page}?done=test-event&id={}", url_part(&id))),
        Action::Delete if field(&form, "confirm") != Some("yes") => Err(AdminError::Invalid(
            "tick the box to confirm the deletion".into(),
        )),
        Action::Delete => state
            .delete_destination(&name)
            .await
            .map(|()| format!("/?done=deleted&id={}", url_part(&name))),
    };
    match done {
        Ok(location) => see_other(location),
        Err(error) => error_page(&error),
    }
}

async fn replay_all(state: &AdminState, name: &str) -> Result<u64, AdminError> {
    state.configured(name)?;
    let report = state
        .dead_letters(name)?
        .replay(&Selection::default())
        .await?;
    match report.failed_shards.as_slice() {
        [] => Ok(report.replayed),
        failed => Err(AdminError::Incomplete(format!(
            "Replaying {} dead letters; {}: theirs were not replayed. Replay again once they answer (a dead letter already replaying is skipped).",
            report.replayed,
            html::unanswered(failed)
        ))),
    }
}

async fn purge(state: &AdminState, name: &str) -> Result<u64, AdminError> {
    let purged = state.dead_letters(name)?.purge().await;
    tracing::info!(destination = %name, purged = purged.deleted, failed_shards = ?purged.failed_shards, "Dead letters purged from the console.");
    match purged.failed_shards.as_slice() {
        [] => Ok(purged.deleted),
        failed => Err(AdminError::Incomplete(format!(
            "Purged {} dead letters; {}: theirs may still be there. Purge again once they answer.",
            purged.deleted,
            html::unanswered(failed)
        ))),
    }
}

/// An event type the destination takes: its first exact type, or a
/// prefix's `console.test` under it; `console.test` when it takes all.
fn test_event_type(event_types: &[String]) -> String {
    match event_types.first() {
        None => "console.test".into(),
        Some(pattern) => match pattern.strip_suffix('*') {
            Some(prefix) => format!("{prefix}console.test"),
            None => pattern.clone(),
        },
    }
}

/// Appends one event for `name` alone, from user `console-test`; returns
/// its event id.
async fn send_test_event(state: &AdminState, name: &str) -> Result<String, AdminError> {
    let definition = state.catalog.get(name).await?;
    let now_ms = protocol::unix_millis();
    let user = "console-test";
    let entry = EventEntry {
        user_id: user.into(),
        payload: serde_json::json!({ "test": true, "sent_from": "console", "destination": name, "at_ms": now_ms }).to_string(),
        received_at_ms: now_ms,
        message_id: None,
        destinations: Some(vec![name.to_owned()]),
        event_type: Some(test_event_type(&definition.settings.event_types)),
        source: Some("console".into()),
        replay: None,
        trace: None,
    };
    let shard = protocol::shard_for(user, state.shards);
    let mut xadd = redis::cmd("XADD");
    xadd.arg(state.keys.events(shard)).arg("*");
    for (field, value) in entry.to_fields() {
        xadd.arg(field).arg(value.as_ref());
    }
    let mut con = state.con.clone();
    let stream_id: String = xadd.query_async(&mut con).await?;
    Ok(format!("{shard}-{stream_id}"))
}

#[derive(Debug, Deserialize)]
struct Lookup {
    q: Option<String>,
}

async fn lookup(state: web::Data<AdminState>, query: web::Query<Lookup>) -> HttpResponse {
    let q = query.q.as_deref().unwrap_or("").trim();
    let found = match q {
        "" => Found::Nothing,
        q if q.parse::<EventId>().is_ok() => match state.event_log(q).await {
            Ok(log) => Found::Event {
                payload: state.log_reader().payload(q).await.ok().flatten(),
                log,
            },
            Err(error) => Found::Refused(error.to_string()),
        },
        user => match state.user_event_logs(user, USER_EVENTS).await {
            Ok(logs) if logs.is_empty() => Found::Refused(format!(
                "no event id or user `{user}` is known (an event id looks like 3-1700000000000-0)"
            )),
            Ok(logs) => Found::User {
                user: user.to_owned(),
                logs,
            },
            Err(error) => Found::Refused(error.to_string()),
        },
    };
    let status = match found {
        Found::Refused(_) => StatusCode::NOT_FOUND,
        _ => StatusCode::OK,
    };
    html_response(status, None, event_page::render(q, &found))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_test_event_has_a_type_its_destination_takes() {
        assert_eq!(test_event_type(&[]), "console.test");
        assert_eq!(test_event_type(&["order.*".into()]), "order.console.test");
        assert_eq!(
            test_event_type(&["user.created".into(), "x".into()]),
            "user.created"
        );
    }
}
