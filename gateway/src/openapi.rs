//! The gateway's OpenAPI 3 document, served at `GET /openapi.json`. Paths
//! come from the handlers' `#[utoipa::path]` annotations in [`crate::routes`],
//! schemas from [`crate::api`].

use actix_web::HttpResponse;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use crate::api::{Accepted, BatchAccepted, BatchDoc, EventDoc, Status};
use crate::error::ErrorBody;

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

/// `GET /openapi.json`: this API's OpenAPI 3 document.
pub async fn document() -> HttpResponse {
    HttpResponse::Ok().json(ApiDoc::openapi())
}

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{MAX_EVENT_TYPE_BYTES, MAX_MESSAGE_ID_BYTES, MAX_USER_ID_BYTES};

    #[test]
    fn the_documented_limits_are_the_enforced_ones() {
        let document = serde_json::to_value(ApiDoc::openapi()).expect("serializes");
        let schemas = &document["components"]["schemas"];
        let event = &schemas["Event"]["properties"];
        assert_eq!(event["userId"]["maxLength"], MAX_USER_ID_BYTES);
        assert_eq!(event["messageId"]["maxLength"], MAX_MESSAGE_ID_BYTES);
        assert_eq!(event["eventType"]["maxLength"], MAX_EVENT_TYPE_BYTES);
        let defaults = crate::config::Config::defaults();
        assert_eq!(
            schemas["Batch"]["properties"]["events"]["maxItems"],
            defaults.max_batch_events
        );
    }
}
