//! The gateway's OpenAPI 3 document, served at `GET /openapi.json`. Paths
//! come from the handlers' `#[utoipa::path]` annotations in [`crate::routes`];
//! the schemas below describe the bodies [`crate::event`] parses and the
//! answers the handlers give (limits included, from the same constants).

use serde::Serialize;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{IntoResponses, Modify, OpenApi, ToSchema};

/// One event. Unknown fields are refused.
#[derive(ToSchema)]
#[schema(as = Event)]
#[allow(dead_code)] // Describes the JSON `event::parse_event` reads; never built.
pub struct EventDoc {
    /// Whose event it is: events of one user are delivered in the order
    /// they were accepted. Also accepted as `user_id` or `userID`.
    #[schema(rename = "userId", min_length = 1, max_length = 256)]
    user_id: String,
    /// Any JSON value, forwarded byte for byte.
    payload: serde_json::Value,
    /// The client's id for the event: a repeat within the idempotency window
    /// is answered with the first event's id and stored once.
    #[schema(rename = "messageId", min_length = 1, max_length = 128)]
    message_id: Option<String>,
    /// Deliver to these destinations only (names the router serves);
    /// omitted means every destination.
    #[schema(min_items = 1)]
    destinations: Option<Vec<String>>,
}

/// Up to `max_batch_events` (default 1000) events, stored in order.
#[derive(ToSchema)]
#[schema(as = Batch)]
#[allow(dead_code)] // Describes the JSON `event::parse_batch` reads; never built.
pub struct BatchDoc {
    #[schema(min_items = 1, max_items = 1000)]
    events: Vec<EventDoc>,
}

/// The stored event's id.
#[derive(Serialize, ToSchema)]
pub struct Accepted {
    /// `<shard>-<ms>-<seq>`.
    pub id: String,
    /// Present (true) when the messageId or Idempotency-Key was seen before;
    /// `id` is then the first event's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duplicate: Option<bool>,
}

/// The stored events' ids, in the order they were sent.
#[derive(Serialize, ToSchema)]
pub struct BatchAccepted {
    pub ids: Vec<String>,
}

/// Every refusal: a message naming the field or limit.
#[derive(Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: String,
}

/// The refusals both ingest routes share (each an [`ErrorBody`]).
#[derive(IntoResponses)]
#[allow(dead_code)] // Documents `ApiError`'s statuses; never built.
pub enum IngestRefusal {
    #[response(status = 401, description = "Missing or invalid API key")]
    Unauthorized(ErrorBody),
    #[response(status = 413, description = "Body larger than max_body_bytes")]
    TooLarge(ErrorBody),
    #[response(status = 415, description = "Content-Type is not JSON")]
    UnsupportedMediaType(ErrorBody),
    #[response(
        status = 429,
        description = "The key is over its rate limit; see Retry-After"
    )]
    RateLimited(ErrorBody),
    #[response(
        status = 503,
        description = "Not stored (Redis unavailable or backlog full); see Retry-After"
    )]
    Unavailable(ErrorBody),
}

#[derive(Serialize, ToSchema)]
pub struct Status {
    pub status: String,
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Event delivery gateway",
        description = "Accepts events and stores each in its user's shard stream before answering 202; the router then delivers them to every webhook destination in per-user order."
    ),
    paths(
        crate::routes::post_event,
        crate::routes::post_batch,
        crate::routes::healthz,
        crate::routes::readyz
    ),
    components(schemas(EventDoc, BatchDoc, Accepted, BatchAccepted, ErrorBody, Status)),
    modifiers(&ApiKeyScheme)
)]
pub struct ApiDoc;

/// `Authorization: Bearer <API key>` (see `auth.keys`).
struct ApiKeyScheme;

impl Modify for ApiKeyScheme {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        if let Some(components) = openapi.components.as_mut() {
            components.add_security_scheme(
                "api_key",
                SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
            );
        }
    }
}
