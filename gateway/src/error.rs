//! Every way a request can fail, and the response each one gets.

use actix_web::http::{header, StatusCode};
use actix_web::{HttpResponse, ResponseError};
use serde::Serialize;
use utoipa::ToSchema;

use telemetry::log_limit::EveryInterval;

use crate::event::ParseError;
use crate::store::StoreError;

/// During an outage every request is a 503: one log line a second says so.
static UNAVAILABLE_LOGGED: EveryInterval = EveryInterval::new(std::time::Duration::from_secs(1));

/// Every refusal: a message naming the field or limit.
#[derive(Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The request is malformed or breaks a rule; the message names the field or limit.
    #[error("{0}")]
    Invalid(String),
    #[error("request body is larger than the limit of {limit} bytes")]
    TooLarge { limit: usize },
    #[error("content-type must be application/json")]
    UnsupportedMediaType,
    /// No valid API key; the message says what was wrong, never which key.
    #[error("{0}")]
    Unauthorized(&'static str),
    #[error("API key `{key}` is over its rate limit; retry in {retry_after_secs} s")]
    RateLimited { key: String, retry_after_secs: u64 },
    #[error("{}", unavailable_reason(cause))]
    Unavailable {
        #[source]
        cause: StoreError,
        retry_after_secs: u64,
    },
}

impl From<ParseError> for ApiError {
    fn from(error: ParseError) -> Self {
        ApiError::Invalid(error.to_string())
    }
}

/// What a 503 tells the client: the backlog cap names its limit; Redis
/// failures stay generic (their details are logged, not sent).
fn unavailable_reason(cause: &StoreError) -> String {
    match cause {
        StoreError::BacklogFull(reason) => reason.clone(),
        StoreError::NotReplicated { .. } => cause.to_string(),
        _ => "event store unavailable, retry later".into(),
    }
}

impl ApiError {
    /// A short, fixed label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            ApiError::Invalid(_) => "invalid",
            ApiError::TooLarge { .. } => "too_large",
            ApiError::UnsupportedMediaType => "unsupported_media_type",
            ApiError::Unauthorized(_) => "unauthorized",
            ApiError::RateLimited { .. } => "rate_limited",
            ApiError::Unavailable {
                cause: StoreError::BacklogFull(_),
                ..
            } => "backlog_full",
            ApiError::Unavailable {
                cause: StoreError::NotReplicated { .. },
                ..
            } => "not_replicated",
            ApiError::Unavailable { .. } => "store_unavailable",
        }
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            ApiError::Invalid(_) => StatusCode::BAD_REQUEST,
            ApiError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    fn error_response(&self) -> HttpResponse {
        let mut response = HttpResponse::build(self.status_code());
        match self {
            ApiError::Unavailable {
                cause,
                retry_after_secs,
            } => {
                if let Some(left_out) = UNAVAILABLE_LOGGED.admit() {
                    tracing::warn!(
                        error = %cause,
                        left_out,
                        "Event store unavailable; answering 503 \
                         (left_out: how many more since the last such line)."
                    );
                }
                response.insert_header((header::RETRY_AFTER, retry_after_secs.to_string()));
            }
            ApiError::RateLimited {
                retry_after_secs, ..
            } => {
                response.insert_header((header::RETRY_AFTER, retry_after_secs.to_string()));
            }
            ApiError::Unauthorized(_) => {
                response.insert_header((header::WWW_AUTHENTICATE, "Bearer"));
            }
            _ => {}
        }
        response.json(ErrorBody {
            error: self.to_string(),
        })
    }
}
