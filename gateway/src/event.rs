//! Turning request bodies into validated events.
//!
//! Everything is validated before anything is written, so a rejected request
//! leaves nothing behind in Redis.

use protocol::{unix_millis, EventEntry};
use serde::{Deserialize, Deserializer};
use serde_json::value::RawValue;

/// Why a body was refused; the message names the field, index or limit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ParseError(String);

pub const MAX_USER_ID_BYTES: usize = 256;
pub const MAX_MESSAGE_ID_BYTES: usize = 128;
pub const MAX_EVENT_TYPE_BYTES: usize = 128;

/// An event that passed validation, ready to be stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewEvent {
    /// The stream entry to write; the payload is the JSON text exactly as
    /// received, and `received_at_ms` the moment it was validated.
    pub entry: EventEntry,
    /// The key a repeat is recognised by: the Idempotency-Key header, else messageId.
    pub idempotency_key: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EventBody<'a> {
    #[serde(rename = "userId", alias = "user_id", alias = "userID", default)]
    user_id: Option<String>,
    #[serde(borrow, default, deserialize_with = "present")]
    payload: Option<&'a RawValue>,
    #[serde(rename = "messageId", default)]
    message_id: Option<String>,
    #[serde(default)]
    destinations: Option<Vec<String>>,
    #[serde(rename = "eventType", alias = "event_type", default)]
    event_type: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchBody<'a> {
    #[serde(borrow)]
    events: Vec<&'a RawValue>,
}

/// Keeps an explicit `null` payload as a payload (`Option` alone would read
/// it as missing).
fn present<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue>::deserialize(deserializer).map(Some)
}

/// Refuses a body whose arrays and objects nest deeper than `max_depth`
/// (the outermost is level 1), before any parser recurses into it.
pub fn check_depth(body: &[u8], max_depth: usize) -> Result<(), ParseError> {
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for &byte in body {
        if in_string {
            match byte {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match byte {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > max_depth {
                    return Err(ParseError(format!(
                        "JSON nests deeper than the limit of {max_depth} levels"
                    )));
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    Ok(())
}

fn utf8(body: &[u8]) -> Result<&str, ParseError> {
    std::str::from_utf8(body).map_err(|_| ParseError("request body is not valid UTF-8".into()))
}

fn json_error(context: &str, error: serde_json::Error) -> ParseError {
    match error.classify() {
        serde_json::error::Category::Data => ParseError(format!("{context}{error}")),
        _ => ParseError(format!("{context}malformed JSON: {error}")),
    }
}

/// Parses and validates the body of `POST /v1/events`.
pub fn parse_event(body: &[u8], idempotency_header: Option<&str>) -> Result<NewEvent, ParseError> {
    let event: EventBody = serde_json::from_str(utf8(body)?).map_err(|e| json_error("", e))?;
    validate(event, idempotency_header).map_err(ParseError)
}

/// Parses and validates the body of `POST /v1/batch`; the first invalid
/// event rejects the whole batch, and the message names its index.
pub fn parse_batch(body: &[u8], max_events: usize) -> Result<Vec<NewEvent>, ParseError> {
    let batch: BatchBody = serde_json::from_str(utf8(body)?).map_err(|e| json_error("", e))?;
    if batch.events.is_empty() {
        return Err(ParseError("events must hold at least one event".into()));
    }
    if batch.events.len() > max_events {
        return Err(ParseError(format!(
            "events holds {} events; the limit is {max_events} per batch",
            batch.events.len()
        )));
    }
    batch
        .events
        .iter()
        .enumerate()
        .map(|(index, raw)| {
            let context = format!("events[{index}]: ");
            let event: EventBody =
                serde_json::from_str(raw.get()).map_err(|e| json_error(&context, e))?;
            validate(event, None).map_err(|message| ParseError(format!("{context}{message}")))
        })
        .collect()
}

fn validate(event: EventBody, idempotency_header: Option<&str>) -> Result<NewEvent, String> {
    let user_id = event.user_id.ok_or("userId is required")?;
    if user_id.is_empty() {
        return Err("userId must not be empty".into());
    }
    if user_id.len() > MAX_USER_ID_BYTES {
        return Err(format!("userId is longer than {MAX_USER_ID_BYTES} bytes"));
    }
    let payload = event.payload.ok_or("payload is required")?;
    check_key("messageId", event.message_id.as_deref())?;
    check_key("Idempotency-Key header", idempotency_header)?;
    if let Some(event_type) = &event.event_type {
        if event_type.is_empty() || event_type.len() > MAX_EVENT_TYPE_BYTES {
            return Err(format!(
                "eventType must be 1 to {MAX_EVENT_TYPE_BYTES} bytes"
            ));
        }
    }
    if let Some(destinations) = &event.destinations {
        if destinations.is_empty() {
            return Err("destinations must name at least one destination (omit it for all)".into());
        }
    }
    Ok(NewEvent {
        idempotency_key: idempotency_header
            .map(str::to_owned)
            .or_else(|| event.message_id.clone()),
        entry: EventEntry {
            user_id,
            payload: payload.get().to_owned(),
            received_at_ms: unix_millis(),
            message_id: event.message_id,
            destinations: event.destinations,
            event_type: event.event_type,
            source: None,
            replay: None,
            trace: None,
        },
    })
}

fn check_key(name: &str, value: Option<&str>) -> Result<(), String> {
    match value {
        Some("") => Err(format!("{name} must not be empty")),
        Some(value) if value.len() > MAX_MESSAGE_ID_BYTES => Err(format!(
            "{name} is longer than {MAX_MESSAGE_ID_BYTES} bytes"
        )),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message<T: std::fmt::Debug>(result: Result<T, ParseError>) -> String {
        result.expect_err("should be rejected").to_string()
    }

    #[test]
    fn accepts_every_spelling_of_user_id() {
        for name in ["userId", "user_id", "userID"] {
            let body = format!(r#"{{"{name}": "u1", "payload": {{"n": 1}}}}"#);
            let event = parse_event(body.as_bytes(), None).expect("valid");
            assert_eq!(event.entry.user_id, "u1");
        }
    }

    #[test]
    fn keeps_payload_text_byte_for_byte() {
        let body = br#"{"userId": "u1", "payload": {"b": 1.50,  "a": [ ]}}"#;
        let event = parse_event(body, None).expect("valid");
        assert_eq!(event.entry.payload, r#"{"b": 1.50,  "a": [ ]}"#);
    }

    #[test]
    fn event_type_is_kept_and_bounded() {
        let event = parse_event(
            br#"{"userId": "u", "payload": 1, "eventType": "order.paid"}"#,
            None,
        )
        .expect("valid");
        assert_eq!(event.entry.event_type.as_deref(), Some("order.paid"));
        for event_type in [String::new(), "x".repeat(MAX_EVENT_TYPE_BYTES + 1)] {
            let body = format!(r#"{{"userId": "u", "payload": 1, "eventType": "{event_type}"}}"#);
            assert!(message(parse_event(body.as_bytes(), None)).contains("eventType"));
        }
        let longest = "x".repeat(MAX_EVENT_TYPE_BYTES);
        let body = format!(r#"{{"userId": "u", "payload": 1, "eventType": "{longest}"}}"#);
        assert!(parse_event(body.as_bytes(), None).is_ok());
    }

    #[test]
    fn null_payload_is_a_payload() {
        let event = parse_event(br#"{"userId": "u1", "payload": null}"#, None).expect("valid");
        assert_eq!(event.entry.payload, "null");
    }

    #[test]
    fn rejections_name_the_problem() {
        assert!(message(parse_event(b"{", None)).contains("malformed JSON"));
        assert!(message(parse_event(br#"{"payload": 1}"#, None)).contains("userId is required"));
        assert!(
            message(parse_event(br#"{"userId": "", "payload": 1}"#, None))
                .contains("must not be empty")
        );
        let long = format!(r#"{{"userId": "{}", "payload": 1}}"#, "x".repeat(257));
        assert!(message(parse_event(long.as_bytes(), None)).contains("longer than 256"));
        assert!(message(parse_event(br#"{"userId": "u"}"#, None)).contains("payload is required"));
        assert!(
            message(parse_event(br#"{"userId": 5, "payload": 1}"#, None)).contains("invalid type")
        );
        assert!(message(parse_event(
            br#"{"userId": "u", "payload": 1, "x": 1}"#,
            None
        ))
        .contains("unknown field `x`"));
        assert!(message(parse_event(
            br#"{"userId": "u", "payload": 1, "destinations": []}"#,
            None
        ))
        .contains("destinations"));
        assert!(
            message(parse_event(br#"{"userId": "u", "payload": 1}"#, Some("")))
                .contains("Idempotency-Key")
        );
    }

    #[test]
    fn idempotency_header_wins_over_message_id() {
        let body = br#"{"userId": "u", "payload": 1, "messageId": "m"}"#;
        assert_eq!(
            parse_event(body, None)
                .expect("valid")
                .idempotency_key
                .as_deref(),
            Some("m")
        );
        assert_eq!(
            parse_event(body, Some("h"))
                .expect("valid")
                .idempotency_key
                .as_deref(),
            Some("h")
        );
    }

    #[test]
    fn depth_counts_nesting_outside_strings_only() {
        assert!(check_depth(br#"{"a": [1, {"b": 2}]}"#, 3).is_ok());
        assert!(message(check_depth(br#"{"a": [1, {"b": 2}]}"#, 2)).contains("limit of 2 levels"));
        assert!(check_depth(br#"{"a": "[[[[{{{{\"[["}"#, 1).is_ok());
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        assert!(check_depth(deep.as_bytes(), 32).is_err());
    }

    #[test]
    fn batch_errors_name_the_event_index() {
        let body = br#"{"events": [{"userId": "a", "payload": 1}, {"payload": 2}]}"#;
        assert_eq!(
            message(parse_batch(body, 10)),
            "events[1]: userId is required"
        );
        let body = br#"{"events": [{"userId": "a", "payload": 1}, {"userId": "b", "payload": 2}]}"#;
        assert!(message(parse_batch(body, 1)).contains("limit is 1"));
        assert_eq!(parse_batch(body, 2).expect("valid").len(), 2);
    }
}
