//! The admin API and `/metrics` ([`crate::listener`] serves them beside
//! the console, behind the admin token).
//!
//! | route | does |
//! |---|---|
//! | `GET /metrics` | Prometheus metrics of this router |
//! | `GET /admin/destinations` | every destination's state (the latest [`Overview`]) |
//! | `POST /admin/destinations` | create a destination (201, or 409 if the name exists) |
//! | `GET /admin/destinations/{name}` | its definition (secrets masked) and state |
//! | `PATCH /admin/destinations/{name}` | change its settings (a JSON merge patch) |
//! | `DELETE /admin/destinations/{name}` | delete it: delivery stops, its groups go, its dead letters stay |
//! | `POST /admin/destinations/{name}/pause`, `…/resume` | stop or restart delivery |
//! | `GET /admin/destinations/{name}/dead-letters?limit&cursor` | list dead letters |
//! | `POST /admin/destinations/{name}/dead-letters/replay` | replay all, `{"ids": […]}` or `{"from_ms", "to_ms"}` |
//! | `DELETE /admin/destinations/{name}/dead-letters/{id}` | delete one |
//! | `DELETE /admin/destinations/{name}/dead-letters` | delete all |
//! | `GET /healthz` | 200 while the router runs (no token: for health checks) |
//! | `GET /admin/events/{event_id}` | the delivery log of an event: per destination, its state and attempts |
//! | `GET /admin/users/{user_id}/events?limit` | a user's recent events, each with its log |
//! | `GET /admin/openapi.json` | this API's OpenAPI 3 document |
//!
//! Every other route needs the admin token (unless `admin.require_token` is off):
//! `Authorization: Bearer <token>`, or HTTP Basic with the token as the
//! password, which is what a browser sends after asking for it.

use std::sync::Arc;

use actix_web::http::{header, StatusCode};
use actix_web::{web, HttpResponse, ResponseError};
use protocol::secret::TokenDigest;
use protocol::{Keys, RedisConnection};
use serde::{Deserialize, Serialize};
use telemetry::lifecycle::metrics_endpoint;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{IntoParams, IntoResponses, Modify, OpenApi, ToSchema};

use crate::admin::dead_letters::{
    DeadLetterError, DeadLetters, Page, Purged, ReplayReport, Selection,
};
use crate::admin::destinations::{self, DestinationChangeDoc, DestinationDoc, NewDestinationDoc};
use crate::admin::event_log::{EventLog, LogError, LogReader, Subject};
use crate::admin::history::HistoryStore;
use crate::admin::overview::{DestinationView, Overview, SharedOverview};
use crate::config::LeaseConfig;
use crate::control::catalog::{Catalog, CatalogError, Definition};
use crate::control::registry::Registry;
use crate::destination::delivery::Destination;
use crate::outbound::Policy;
use protocol::config::is_valid_name;

/// Most dead letters one list request returns.
const MAX_PAGE: usize = 1000;

pub struct AdminState {
    pub keys: Keys,
    pub shards: u16,
    pub con: RedisConnection,
    pub registry: Arc<Registry>,
    pub catalog: Catalog,
    /// Checks a created or changed destination's URL.
    pub policy: Policy,
    /// Bounds a destination's `timeout_ms`.
    pub lease: LeaseConfig,
    /// Most records of one (shard, destination) log a lookup reads: the cap.
    pub log_scan_limit: usize,
    pub overview: SharedOverview,
    pub history: HistoryStore,
    pub access: Access,
}

/// Who the admin listener lets in.
pub enum Access {
    /// Everyone (`admin.require_token = false`).
    Open,
    /// Requests with the token of this digest.
    Token(TokenDigest),
    /// No one: a token is required but none is configured (a config that
    /// skipped validation fails closed).
    Closed,
}

impl Access {
    pub fn new(config: &crate::config::AdminConfig) -> Self {
        match (config.require_token, &config.token_sha256) {
            (false, _) => Access::Open,
            (true, Some(digest)) => Access::Token(digest.clone()),
            (true, None) => Access::Closed,
        }
    }
}

impl AdminState {
    pub fn configured(&self, name: &str) -> Result<Arc<Destination>, AdminError> {
        self.registry
            .get(name)
            .map(|known| known.destination)
            .ok_or_else(|| AdminError::UnknownDestination(name.to_owned()))
    }

    /// Applies the catalog here at once after a change made here (the other
    /// routers follow within one overview interval).
    pub async fn follow_catalog(&self) {
        if let Err(error) = self.registry.follow(&self.catalog).await {
            tracing::warn!(%error, "Cannot read the destinations back; the next overview will.");
        }
    }

    pub fn log_reader(&self) -> LogReader {
        LogReader {
            con: self.con.clone(),
            keys: self.keys.clone(),
            shards: self.shards,
            scan_limit: self.log_scan_limit,
        }
    }

    /// What the delivery log knows of `event_id` at every destination.
    pub async fn event_log(&self, event_id: &str) -> Result<EventLog, AdminError> {
        let known = self.registry.known();
        let endpoints: Vec<_> = known.iter().map(|k| k.destination.endpoint()).collect();
        let subjects: Vec<Subject<'_>> = known
            .iter()
            .zip(&endpoints)
            .map(|(known, endpoint)| Subject {
                name: &known.destination.name,
                endpoint,
                cuts: &known.definition.cuts,
                routed: known.definition.routed,
            })
            .collect();
        Ok(self.log_reader().event(event_id, &subjects).await?)
    }

    /// The logs of `user`'s latest events (at most `limit`), newest first.
    pub async fn user_event_logs(
        &self,
        user: &str,
        limit: usize,
    ) -> Result<Vec<EventLog>, AdminError> {
        let names = self.registry.names();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        let ids = self.log_reader().user_events(user, &names, limit).await?;
        let mut logs = Vec::with_capacity(ids.len());
        for id in ids {
            match self.event_log(&id).await {
                Ok(log) => logs.push(log),
                // Trimmed between the listing and the lookup.
                Err(AdminError::Log(LogError::Unknown(_))) => {}
                Err(error) => return Err(error),
            }
        }
        Ok(logs)
    }

    /// This router's latest measurement of `name`, with whether it is
    /// paused as of now (a pause or resume made here shows at once).
    pub async fn status_of(&self, name: &str) -> Option<DestinationView> {
        let mut view = self
            .overview()
            .await
            .destinations
            .into_iter()
            .find(|view| view.name == name)?;
        if let Ok(destination) = self.configured(name) {
            view.paused = destination.is_paused();
        }
        Some(view)
    }

    /// Dead letters of a configured destination, or of one removed from the
    /// config whose dead-letter streams are kept.
    pub fn dead_letters(&self, name: &str) -> Result<DeadLetters, AdminError> {
        if !is_valid_name(name) {
            return Err(AdminError::UnknownDestination(name.to_owned()));
        }
        Ok(DeadLetters::new(
            self.con.clone(),
            self.keys.clone(),
            self.shards,
            name,
        ))
    }

    /// A measurement at most one overview interval old (taken now if the
    /// latest is older).
    pub async fn overview(&self) -> Overview {
        self.overview.fresh().await
    }

    /// Pauses or resumes a destination on every router: recorded in Redis
    /// (others pick it up within one overview interval), applied here at once.
    pub async fn set_paused(&self, name: &str, paused: bool) -> Result<(), AdminError> {
        let destination = self.configured(name)?;
        let mut con = self.con.clone();
        let command = if paused { "SADD" } else { "SREM" };
        let _: i64 = redis::cmd(command)
            .arg(self.keys.paused())
            .arg(name)
            .query_async(&mut con)
            .await?;
        destination.set_paused(paused);
        Ok(())
    }

    /// Creates a destination from a create request's JSON body.
    pub async fn create_destination(&self, body: &[u8]) -> Result<Definition, AdminError> {
        let (settings, start) = destinations::parse_create(body, &self.policy, &self.lease)
            .map_err(AdminError::Invalid)?;
        let definition = self.catalog.create(settings, start).await?;
        self.follow_catalog().await;
        Ok(definition)
    }

    /// Changes a destination by a JSON merge patch.
    pub async fn change_destination(
        &self,
        name: &str,
        body: &[u8],
    ) -> Result<Definition, AdminError> {
        let mut invalid = None;
        let result = self
            .catalog
            .update(name, |settings| {
                match destinations::apply_change(settings, body, &self.policy, &self.lease) {
                    Ok(changed) => *settings = changed,
                    Err(message) => invalid = Some(message),
                }
                Ok(())
            })
            .await;
        if let Some(message) = invalid {
            return Err(AdminError::Invalid(message));
        }
        let definition = result?;
        self.follow_catalog().await;
        Ok(definition)
    }

    /// Deletes a destination (its dead letters stay; its history goes).
    pub async fn delete_destination(&self, name: &str) -> Result<(), AdminError> {
        if !is_valid_name(name) {
            return Err(AdminError::UnknownDestination(name.to_owned()));
        }
        self.catalog.delete(name).await?;
        self.follow_catalog().await;
        if let Err(error) = self.history.forget(name, protocol::unix_millis()).await {
            tracing::warn!(%error, destination = name, "Its history stays until it expires.");
        }
        Ok(())
    }
}

/// Every refusal's body.
#[derive(Serialize, ToSchema)]
pub struct ErrorBody {
    /// What was wrong; for invalid input it names the field.
    pub error: String,
}

#[derive(Serialize, ToSchema)]
pub struct Health {
    status: &'static str,
}

#[derive(Serialize, ToSchema)]
pub struct Paused {
    destination: String,
    paused: bool,
}

#[derive(Serialize, ToSchema)]
pub struct Deleted {
    destination: String,
    deleted: bool,
    /// Its dead letters stay until purged.
    dead_letters_kept: bool,
}

/// The refusals every token-protected route shares.
#[derive(IntoResponses)]
#[allow(dead_code)] // Documents `AdminError`'s statuses; never built.
pub enum AdminRefusal {
    #[response(status = 401, description = "Missing or invalid admin token")]
    Unauthorized(ErrorBody),
    #[response(
        status = 403,
        description = "A change sent from another site (CSRF guard)"
    )]
    CrossSite(ErrorBody),
    #[response(status = 503, description = "Redis did not answer; nothing changed")]
    Unavailable(ErrorBody),
}

/// The token refusals of a route that works shard by shard, whose 503
/// names the shards that did not answer instead.
#[derive(IntoResponses)]
#[allow(dead_code)] // Documents `AdminError`'s statuses; never built.
pub enum TokenRefusal {
    #[response(status = 401, description = "Missing or invalid admin token")]
    Unauthorized(ErrorBody),
    #[response(
        status = 403,
        description = "A change sent from another site (CSRF guard)"
    )]
    CrossSite(ErrorBody),
}

/// The admin API's OpenAPI 3 document, served at `GET /admin/openapi.json`.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "Event delivery router: admin API",
        description = "Destinations (created, changed and deleted at runtime; every router follows within a second), pauses and dead letters. Every route but /healthz needs the admin token."
    ),
    paths(
        healthz,
        destinations,
        create,
        read,
        change,
        remove,
        pause,
        resume,
        list_dead_letters,
        purge_dead_letters,
        replay,
        delete_dead_letter,
        event,
        user_events
    ),
    modifiers(&AdminTokenScheme),
    security(("admin_token" = []))
)]
pub struct AdminApiDoc;

/// `Authorization: Bearer <admin token>` (see `admin.token_sha256`).
struct AdminTokenScheme;

impl Modify for AdminTokenScheme {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        if let Some(components) = openapi.components.as_mut() {
            components.add_security_scheme(
                "admin_token",
                SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
            );
        }
    }
}

async fn openapi_document() -> HttpResponse {
    HttpResponse::Ok().json(AdminApiDoc::openapi())
}

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("no destination named `{0}`")]
    UnknownDestination(String),
    #[error("no dead letter `{0}`")]
    NoSuchDeadLetter(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Internal(String),
    /// Done on some shards; the others' Redis did not answer.
    #[error("{0}")]
    Incomplete(String),
    #[error(transparent)]
    DeadLetters(#[from] DeadLetterError),
    #[error(transparent)]
    Log(#[from] LogError),
    #[error("Redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("missing or invalid admin token")]
    Unauthorized,
    #[error("a change requested from another site is refused")]
    CrossSite,
}

impl ResponseError for AdminError {
    fn status_code(&self) -> StatusCode {
        match self {
            AdminError::UnknownDestination(_) | AdminError::NoSuchDeadLetter(_) => {
                StatusCode::NOT_FOUND
            }
            AdminError::Conflict(_) => StatusCode::CONFLICT,
            AdminError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            AdminError::Incomplete(_) => StatusCode::SERVICE_UNAVAILABLE,
            AdminError::Unauthorized => StatusCode::UNAUTHORIZED,
            AdminError::CrossSite => StatusCode::FORBIDDEN,
            AdminError::Invalid(_) => StatusCode::BAD_REQUEST,
            AdminError::DeadLetters(DeadLetterError::Redis(_)) | AdminError::Redis(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            AdminError::DeadLetters(_) => StatusCode::BAD_REQUEST,
            AdminError::Log(LogError::Redis(_)) => StatusCode::SERVICE_UNAVAILABLE,
            AdminError::Log(LogError::Unknown(_)) => StatusCode::NOT_FOUND,
            AdminError::Log(_) => StatusCode::BAD_REQUEST,
        }
    }

    fn error_response(&self) -> HttpResponse {
        let status = self.status_code();
        if status.is_server_error() {
            tracing::warn!(error = %self, "Admin request failed.");
        }
        let mut response = HttpResponse::build(status);
        if let AdminError::Unauthorized = self {
            // Basic lets a browser ask for the token; Bearer serves scripts.
            response.insert_header((
                header::WWW_AUTHENTICATE,
                "Basic realm=\"event-delivery admin\", charset=\"UTF-8\"",
            ));
        }
        response.json(ErrorBody {
            error: self.to_string(),
        })
    }
}

impl From<CatalogError> for AdminError {
    fn from(error: CatalogError) -> Self {
        match error {
            CatalogError::Unknown(name) => AdminError::UnknownDestination(name),
            CatalogError::Redis(error) => AdminError::Redis(error),
            CatalogError::Corrupt(_) => AdminError::Internal(error.to_string()),
            CatalogError::GroupsLeft { .. } => AdminError::Incomplete(error.to_string()),
            CatalogError::Exists(_)
            | CatalogError::Creating(_)
            | CatalogError::DeletedWhileCreating(_)
            | CatalogError::Contended(_) => AdminError::Conflict(error.to_string()),
        }
    }
}

#[utoipa::path(get, path = "/healthz", security(()), responses((status = 200, description = "The router runs (no token needed)", body = Health)))]
async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(Health { status: "ok" })
}

/// A resource answering `routes`: another method gets 405 (not 404).
pub fn resource(path: &str, routes: Vec<actix_web::Route>) -> actix_web::Resource {
    routes
        .into_iter()
        .fold(web::resource(path), |resource, route| resource.route(route))
}

/// The admin API, `/healthz` and `/metrics`.
pub fn api(config: &mut web::ServiceConfig) {
    config
        .service(resource("/healthz", vec![web::get().to(healthz)]))
        .service(resource("/metrics", vec![web::get().to(metrics)]))
        .service(resource(
            "/admin/openapi.json",
            vec![web::get().to(openapi_document)],
        ))
        .service(resource(
            "/admin/destinations",
            vec![web::get().to(destinations), web::post().to(create)],
        ))
        .service(resource(
            "/admin/destinations/{name}",
            vec![
                web::get().to(read),
                web::patch().to(change),
                web::delete().to(remove),
            ],
        ))
        .service(resource(
            "/admin/destinations/{name}/pause",
            vec![web::post().to(pause)],
        ))
        .service(resource(
            "/admin/destinations/{name}/resume",
            vec![web::post().to(resume)],
        ))
        .service(resource(
            "/admin/destinations/{name}/dead-letters",
            vec![
                web::get().to(list_dead_letters),
                web::delete().to(purge_dead_letters),
            ],
        ))
        .service(resource(
            "/admin/destinations/{name}/dead-letters/replay",
            vec![web::post().to(replay)],
        ))
        .service(resource(
            "/admin/destinations/{name}/dead-letters/{id}",
            vec![web::delete().to(delete_dead_letter)],
        ))
        .service(resource(
            "/admin/events/{event_id}",
            vec![web::get().to(event)],
        ))
        .service(resource(
            "/admin/users/{user_id}/events",
            vec![web::get().to(user_events)],
        ));
}

/// Prometheus metrics, the Redis-derived gauges measured first (at most
/// one overview interval old).
async fn metrics(state: web::Data<AdminState>) -> HttpResponse {
    state.overview().await;
    metrics_endpoint().await
}

#[utoipa::path(get, path = "/admin/destinations", responses((status = 200, description = "Every destination's latest measurement", body = Overview), AdminRefusal))]
async fn destinations(state: web::Data<AdminState>) -> HttpResponse {
    HttpResponse::Ok().json(state.overview().await)
}

#[utoipa::path(post, path = "/admin/destinations/{name}/pause", params(("name" = String, Path, description = "The destination's name")), responses((status = 200, description = "Paused on every router within one overview interval", body = Paused), (status = 404, description = "No such destination", body = ErrorBody), AdminRefusal))]
async fn pause(
    state: web::Data<AdminState>,
    name: web::Path<String>,
) -> Result<HttpResponse, AdminError> {
    state.set_paused(&name, true).await?;
    Ok(HttpResponse::Ok().json(Paused {
        destination: name.into_inner(),
        paused: true,
    }))
}

#[utoipa::path(post, path = "/admin/destinations/{name}/resume", params(("name" = String, Path, description = "The destination's name")), responses((status = 200, description = "Resumed", body = Paused), (status = 404, description = "No such destination", body = ErrorBody), AdminRefusal))]
async fn resume(
    state: web::Data<AdminState>,
    name: web::Path<String>,
) -> Result<HttpResponse, AdminError> {
    state.set_paused(&name, false).await?;
    Ok(HttpResponse::Ok().json(Paused {
        destination: name.into_inner(),
        paused: false,
    }))
}

#[utoipa::path(post, path = "/admin/destinations", request_body(content = NewDestinationDoc, content_type = "application/json"), responses((status = 201, description = "Created: it receives the events accepted from now on (or since start_from_ms)", body = DestinationDoc), (status = 400, description = "Invalid; the message names the field", body = ErrorBody), (status = 409, description = "The name exists", body = ErrorBody), AdminRefusal))]
async fn create(
    state: web::Data<AdminState>,
    body: web::Bytes,
) -> Result<HttpResponse, AdminError> {
    let definition = state.create_destination(&body).await?;
    let location = format!("/admin/destinations/{}", definition.settings.name);
    Ok(HttpResponse::Created()
        .insert_header((header::LOCATION, location))
        .json(DestinationDoc::new(&definition, None)))
}

#[utoipa::path(get, path = "/admin/destinations/{name}", params(("name" = String, Path, description = "The destination's name")), responses((status = 200, description = "Its definition (secrets masked) and state", body = DestinationDoc), (status = 404, description = "No such destination", body = ErrorBody), AdminRefusal))]
async fn read(
    state: web::Data<AdminState>,
    name: web::Path<String>,
) -> Result<HttpResponse, AdminError> {
    let definition = state.catalog.get(&name).await?;
    let status = state.status_of(&name).await;
    Ok(HttpResponse::Ok().json(DestinationDoc::new(&definition, status)))
}

#[utoipa::path(patch, path = "/admin/destinations/{name}", params(("name" = String, Path, description = "The destination's name")), request_body(content = DestinationChangeDoc, content_type = "application/json"), responses((status = 200, description = "Changed: the next attempts use it", body = DestinationDoc), (status = 400, description = "Invalid; the message names the field", body = ErrorBody), (status = 404, description = "No such destination", body = ErrorBody), (status = 409, description = "Still being created, or changed concurrently", body = ErrorBody), AdminRefusal))]
async fn change(
    state: web::Data<AdminState>,
    name: web::Path<String>,
    body: web::Bytes,
) -> Result<HttpResponse, AdminError> {
    let definition = state.change_destination(&name, &body).await?;
    Ok(HttpResponse::Ok().json(DestinationDoc::new(
        &definition,
        state.status_of(&name).await,
    )))
}

#[utoipa::path(delete, path = "/admin/destinations/{name}", params(("name" = String, Path, description = "The destination's name")), responses((status = 200, description = "Deleted: delivery stops, its consumer groups are gone, its dead letters stay", body = Deleted), (status = 404, description = "No such destination", body = ErrorBody), AdminRefusal))]
async fn remove(
    state: web::Data<AdminState>,
    name: web::Path<String>,
) -> Result<HttpResponse, AdminError> {
    state.delete_destination(&name).await?;
    Ok(HttpResponse::Ok().json(Deleted {
        destination: name.into_inner(),
        deleted: true,
        dead_letters_kept: true,
    }))
}

#[utoipa::path(get, path = "/admin/events/{event_id}", params(("event_id" = String, Path, description = "The event's id, <shard>-<ms>-<seq>")), responses((status = 200, description = "Per destination: its state and every recorded attempt", body = EventLog), (status = 400, description = "Not an event id", body = ErrorBody), (status = 404, description = "Unknown: not in its stream and not in the log (past retention)", body = ErrorBody), AdminRefusal))]
async fn event(
    state: web::Data<AdminState>,
    event_id: web::Path<String>,
) -> Result<HttpResponse, AdminError> {
    Ok(HttpResponse::Ok().json(state.event_log(&event_id).await?))
}

/// Most events one user listing returns.
const MAX_USER_EVENTS: usize = 100;

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct UserEventsQuery {
    /// Events to return, newest first (1 to 100, default 20).
    #[param(minimum = 1, maximum = 100)]
    limit: Option<usize>,
}

#[utoipa::path(get, path = "/admin/users/{user_id}/events", params(("user_id" = String, Path, description = "The user's id"), UserEventsQuery), responses((status = 200, description = "The user's most recent events (still in the stream or in the log), newest first, with their state per destination", body = Vec<EventLog>), (status = 400, description = "Invalid limit", body = ErrorBody), AdminRefusal))]
async fn user_events(
    state: web::Data<AdminState>,
    user_id: web::Path<String>,
    query: web::Query<UserEventsQuery>,
) -> Result<HttpResponse, AdminError> {
    let limit = query.limit.unwrap_or(20);
    if !(1..=MAX_USER_EVENTS).contains(&limit) {
        return Err(AdminError::Invalid(format!(
            "limit must be between 1 and {MAX_USER_EVENTS}"
        )));
    }
    let logs = state.user_event_logs(&user_id, limit).await?;
    Ok(HttpResponse::Ok().json(logs))
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct ListQuery {
    /// Dead letters per page (1 to 1000, default 100).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<usize>,
    /// `next_cursor` of the previous page.
    cursor: Option<String>,
}

#[utoipa::path(get, path = "/admin/destinations/{name}/dead-letters", params(("name" = String, Path, description = "The destination's name"), ListQuery), responses((status = 200, description = "A page of dead letters, oldest first; `unavailable_shards` names the shards whose Redis did not answer, whose dead letters are missing", body = Page), (status = 400, description = "Invalid limit or cursor", body = ErrorBody), (status = 404, description = "Not a destination name", body = ErrorBody), AdminRefusal))]
async fn list_dead_letters(
    state: web::Data<AdminState>,
    name: web::Path<String>,
    query: web::Query<ListQuery>,
) -> Result<HttpResponse, AdminError> {
    let limit = query.limit.unwrap_or(100);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(AdminError::Invalid(format!(
            "limit must be between 1 and {MAX_PAGE}"
        )));
    }
    let page = state
        .dead_letters(&name)?
        .list(limit, query.cursor.as_deref())
        .await?;
    Ok(HttpResponse::Ok().json(page))
}

#[utoipa::path(delete, path = "/admin/destinations/{name}/dead-letters/{id}", params(("name" = String, Path, description = "The destination's name"), ("id" = String, Path, description = "The dead letter's id, <shard>-<ms>-<seq>")), responses((status = 204, description = "Deleted"), (status = 400, description = "Not a dead-letter id", body = ErrorBody), (status = 404, description = "No such dead letter", body = ErrorBody), AdminRefusal))]
async fn delete_dead_letter(
    state: web::Data<AdminState>,
    path: web::Path<(String, String)>,
) -> Result<HttpResponse, AdminError> {
    let (name, id) = path.into_inner();
    match state.dead_letters(&name)?.delete(&id).await? {
        true => Ok(HttpResponse::NoContent().finish()),
        false => Err(AdminError::NoSuchDeadLetter(id)),
    }
}

#[utoipa::path(delete, path = "/admin/destinations/{name}/dead-letters", params(("name" = String, Path, description = "The destination's name")), responses((status = 200, description = "Every dead letter deleted", body = Purged), (status = 404, description = "Not a destination name", body = ErrorBody), (status = 503, description = "Some shards' Redis did not answer (`failed_shards`, with `Retry-After`): the other shards' dead letters were deleted; theirs may be once it answers (the deletion was sent): purge again", body = Purged), TokenRefusal))]
async fn purge_dead_letters(
    state: web::Data<AdminState>,
    name: web::Path<String>,
) -> Result<HttpResponse, AdminError> {
    let purged = state.dead_letters(&name)?.purge().await;
    tracing::info!(destination = %name, purged = purged.deleted, failed_shards = ?purged.failed_shards, "Dead letters purged.");
    Ok(partial(&purged.failed_shards).json(purged))
}

/// The body is optional: none (or `{}`) replays every dead letter.
#[utoipa::path(post, path = "/admin/destinations/{name}/dead-letters/replay", params(("name" = String, Path, description = "The destination's name")), request_body(content = Option<Selection>, description = "Optional: none replays every dead letter", content_type = "application/json"), responses((status = 200, description = "Replayed dead letters are delivered again in per-user order", body = ReplayReport), (status = 400, description = "Invalid selection", body = ErrorBody), (status = 404, description = "No such destination", body = ErrorBody), (status = 503, description = "Some shards' Redis did not answer (`failed_shards`, with `Retry-After`): the other shards' selected dead letters were replayed; replaying again is safe", body = ReplayReport), TokenRefusal))]
async fn replay(
    state: web::Data<AdminState>,
    name: web::Path<String>,
    body: web::Bytes,
) -> Result<HttpResponse, AdminError> {
    state.configured(&name)?;
    let selection: Selection = if body.iter().all(u8::is_ascii_whitespace) {
        Selection::default()
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| AdminError::Invalid(format!("invalid JSON body: {e}")))?
    };
    let report = state.dead_letters(&name)?.replay(&selection).await?;
    Ok(partial(&report.failed_shards).json(report))
}

/// 200, or 503 (with `Retry-After`) when some shards' Redis did not answer:
/// the body says which, and that the others were done.
fn partial(failed_shards: &[u16]) -> actix_web::HttpResponseBuilder {
    match failed_shards.is_empty() {
        true => HttpResponse::Ok(),
        false => {
            let mut response = HttpResponse::ServiceUnavailable();
            response.insert_header((header::RETRY_AFTER, "1"));
            response
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use serde::de::DeserializeOwned;
    use serde_json::Value;

    use super::AdminApiDoc;
    use crate::admin::destinations::CHANGEABLE;
    use crate::config::{BreakerConfig, DestinationConfig, RetryConfig};
    use utoipa::OpenApi;

    /// Every field `T` (which denies unknown fields) accepts, from serde's
    /// own refusal of one it does not: the type is the one definition.
    fn fields_of<T: DeserializeOwned>() -> BTreeSet<String> {
        let refused = serde_json::from_str::<T>(r#"{"~": 0}"#)
            .err()
            .expect("an unknown field is refused")
            .to_string();
        let expected = refused
            .split_once("expected one of ")
            .map(|(_, list)| list)
            .expect("serde lists the fields it expects");
        expected
            .split(',')
            .filter_map(|field| field.trim().split('`').nth(1))
            .map(str::to_owned)
            .collect()
    }

    /// The properties of the schema `name` in the admin API's document,
    /// through its `allOf` parts and references (a flattened struct).
    fn properties(document: &Value, name: &str) -> BTreeSet<String> {
        fn collect(document: &Value, schema: &Value, into: &mut BTreeSet<String>) {
            if let Some(reference) = schema["$ref"].as_str() {
                let name = reference.rsplit('/').next().unwrap_or_default();
                return collect(document, &document["components"]["schemas"][name], into);
            }
            if let Some(properties) = schema["properties"].as_object() {
                into.extend(properties.keys().cloned());
            }
            for part in schema["allOf"].as_array().into_iter().flatten() {
                collect(document, part, into);
            }
        }
        let mut into = BTreeSet::new();
        let schema = &document["components"]["schemas"][name];
        assert!(schema.is_object(), "no schema {name} in the document");
        collect(document, schema, &mut into);
        into
    }

    fn set(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|name| (*name).to_owned()).collect()
    }

    #[test]
    fn destination_settings_are_described_as_the_config_type_defines_them() {
        let document = serde_json::to_value(AdminApiDoc::openapi()).expect("serializes");
        let settings = fields_of::<DestinationConfig>();
        let mut changeable = settings.clone();
        changeable.remove("name");
        assert_eq!(
            set(&CHANGEABLE),
            changeable,
            "CHANGEABLE: every setting but the name"
        );

        let mut creatable = settings.clone();
        creatable.insert("start_from_ms".to_owned());
        assert_eq!(properties(&document, "NewDestination"), creatable);
        assert_eq!(properties(&document, "DestinationChange"), changeable);
        let shown = properties(&document, "DestinationDoc");
        assert!(
            settings.is_subset(&shown),
            "a read shows every setting: missing {:?}",
            settings.difference(&shown).collect::<Vec<_>>()
        );
        assert_eq!(properties(&document, "Retry"), fields_of::<RetryConfig>());
        assert_eq!(
            properties(&document, "Breaker"),
            fields_of::<BreakerConfig>()
        );
    }

    #[test]
    fn the_reference_toml_describes_every_destination_setting() {
        let reference = crate::config::DEFAULT_CONFIG;
        let described = reference
            .split_once("# Fields per destination")
            .and_then(|(_, rest)| rest.split_once("[[destinations]]"))
            .map(|(fields, _)| fields)
            .expect("the reference TOML has a field list before its destinations");
        let named = |field: &str| {
            described.contains(&format!("#   {field} "))
                || described.contains(&format!("#   [{field}]"))
        };
        for field in fields_of::<DestinationConfig>() {
            assert!(
                named(&field),
                "the reference TOML's field list lacks `{field}`"
            );
        }
        let (retry, rest) = described
            .split_once("#   [breaker]")
            .expect("a [breaker] item");
        for field in fields_of::<RetryConfig>() {
            assert!(retry.contains(&field), "its [retry] item lacks `{field}`");
        }
        for field in fields_of::<BreakerConfig>() {
            assert!(rest.contains(&field), "its [breaker] item lacks `{field}`");
        }
    }
}
