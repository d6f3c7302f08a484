//! The shapes of the ingest API's bodies and answers, for the OpenAPI
//! document ([`crate::openapi`]) and the handlers ([`crate::routes`]). The
//! limits are written here as literals (schema attributes take no
//! constants); a test in `openapi.rs` keeps them equal to what `event.rs`
//! enforces. The batch limit is the default of the configurable
//! `max_batch_events`.

use serde::Serialize;
use utoipa::{IntoResponses, ToSchema};

use crate::error::ErrorBody;

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
    /// The event's type (`order.created`): destinations subscribed to
    /// event types receive only matching events. Also accepted as `event_type`.
    #[schema(rename = "eventType", min_length = 1, max_length = 128)]
    event_type: Option<String>,
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
