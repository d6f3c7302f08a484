//! The destination form. Its fields become the admin API's JSON (a create
//! body, or a merge patch), so the API's own checks apply; a refusal comes
//! back as the API's message, shown next to the field it names.

use std::collections::BTreeMap;

use serde_json::{Map, Value};

use crate::config::DestinationConfig;
use crate::console::html::{csrf_field, escape};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Text,
    Url,
    Number,
    Secret,
}

/// When a field is on the form.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shown {
    Always,
    /// Only when creating (the name is fixed; a secret is only ever set).
    OnCreate,
}

struct Field {
    /// Its form name, which is also its JSON path (`retry.max_attempts`).
    path: &'static str,
    label: &'static str,
    hint: &'static str,
    kind: Kind,
    shown: Shown,
    /// Empty means "none" (removed by a change) rather than "unchanged".
    optional: bool,
}

const FIELDS: [Field; 11] = [
    Field {
        path: "name",
        label: "Name",
        hint: "Letters, digits, - and _; fixed once created.",
        kind: Kind::Text,
        shown: Shown::OnCreate,
        optional: false,
    },
    Field {
        path: "url",
        label: "URL",
        hint: "Where events are POSTed (http or https).",
        kind: Kind::Url,
        shown: Shown::Always,
        optional: false,
    },
    Field {
        path: "event_types",
        label: "Event types",
        hint: "Comma-separated; a prefix may end in *. Empty: every event.",
        kind: Kind::Text,
        shown: Shown::Always,
        optional: true,
    },
    Field {
        path: "timeout_ms",
        label: "Timeout (ms)",
        hint: "Longest one attempt may take.",
        kind: Kind::Number,
        shown: Shown::Always,
        optional: false,
    },
    Field {
        path: "max_concurrency",
        label: "Max concurrency",
        hint: "Attempts in flight at once, over all shards.",
        kind: Kind::Number,
        shown: Shown::Always,
        optional: false,
    },
    Field {
        path: "rate_limit_per_sec",
        label: "Rate limit (per second)",
        hint: "Over all routers. Empty: no limit.",
        kind: Kind::Number,
        shown: Shown::Always,
        optional: true,
    },
    Field {
        path: "max_age_ms",
        label: "Max age (ms)",
        hint: "Dead-letter events undelivered this long. Empty: no limit.",
        kind: Kind::Number,
        shown: Shown::Always,
        optional: true,
    },
    Field {
        path: "retry.initial_delay_ms",
        label: "First retry delay (ms)",
        hint: "Doubles after each failure.",
        kind: Kind::Number,
        shown: Shown::Always,
        optional: false,
    },
    Field {
        path: "retry.max_delay_ms",
        label: "Longest retry delay (ms)",
        hint: "Also caps Retry-After.",
        kind: Kind::Number,
        shown: Shown::Always,
        optional: false,
    },
    Field {
        path: "retry.max_attempts",
        label: "Max attempts",
        hint: "Empty: retry until the horizon below.",
        kind: Kind::Number,
        shown: Shown::Always,
        optional: true,
    },
    Field {
        path: "retry.max_elapsed_ms",
        label: "Retry horizon (ms)",
        hint: "Dead-letter after retrying this long.",
        kind: Kind::Number,
        shown: Shown::Always,
        optional: false,
    },
];

/// The signing secret a create may set (write-only; shown masked after).
const SECRET: Field = Field {
    path: "signing_secret",
    label: "Signing secret (optional)",
    hint: "whsec_ and base64; signs every delivery (Standard Webhooks).",
    kind: Kind::Secret,
    shown: Shown::OnCreate,
    optional: true,
};

/// What the form is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    Create,
    Edit,
}

/// The form's values by field path, as typed (or as the settings are).
pub type Values = BTreeMap<String, String>;

/// A refusal, placed: on a field, or on the whole form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub field: Option<&'static str>,
    pub message: String,
}

fn shown(purpose: Purpose) -> impl Iterator<Item = &'static Field> {
    FIELDS
        .iter()
        .chain(std::iter::once(&SECRET))
        .filter(move |field| purpose == Purpose::Create || field.shown == Shown::Always)
}

/// The form's values for a destination's current settings.
pub fn values_of(settings: &DestinationConfig) -> Values {
    let optional = |value: Option<u64>| value.map(|v| v.to_string()).unwrap_or_default();
    let retry = &settings.retry;
    [
        ("url", settings.url.clone()),
        ("event_types", settings.event_types.join(", ")),
        ("timeout_ms", settings.timeout_ms.to_string()),
        ("max_concurrency", settings.max_concurrency.to_string()),
        (
            "rate_limit_per_sec",
            optional(settings.rate_limit_per_sec.map(u64::from)),
        ),
        ("max_age_ms", optional(settings.max_age_ms)),
        ("retry.initial_delay_ms", retry.initial_delay_ms.to_string()),
        ("retry.max_delay_ms", retry.max_delay_ms.to_string()),
        (
            "retry.max_attempts",
            optional(retry.max_attempts.map(u64::from)),
        ),
        ("retry.max_elapsed_ms", retry.max_elapsed_ms.to_string()),
    ]
    .into_iter()
    .map(|(path, value)| (path.to_owned(), value))
    .collect()
}

/// The default settings' values, for a new destination's form.
pub fn defaults() -> Values {
    let settings: DestinationConfig = serde_json::from_value(serde_json::json!({
        "name": "new", "url": "http://example.invalid/"
    }))
    .expect("a name and a URL make settings");
    let mut values = values_of(&settings);
    values.insert("url".into(), String::new());
    values
}

/// The API's JSON body for the form's `values`: a create body, or a merge
/// patch of every field on the form. A number that is not one goes as text,
/// for the API to refuse in its own words.
pub fn to_json(purpose: Purpose, values: &Values) -> Value {
    let mut body = Map::new();
    for field in shown(purpose) {
        let text = values.get(field.path).map(|v| v.trim()).unwrap_or("");
        let value = match (field.kind, text.is_empty()) {
            (_, true) if purpose == Purpose::Create => continue,
            (Kind::Number, true) if field.optional => Value::Null,
            (Kind::Number, true) => continue,
            (Kind::Number, false) => match text.parse::<u64>() {
                Ok(number) => Value::from(number),
                Err(_) => Value::from(text),
            },
            (Kind::Secret, _) => Value::from(vec![text]),
            _ if field.path == "event_types" => Value::from(
                text.split(',')
                    .map(str::trim)
                    .filter(|t| !t.is_empty())
                    .collect::<Vec<_>>(),
            ),
            _ => Value::from(text),
        };
        let key = if field.kind == Kind::Secret {
            "signing_secrets"
        } else {
            field.path
        };
        match key.split_once('.') {
            Some((object, leaf)) => {
                let inner = body
                    .entry(object)
                    .or_insert_with(|| Value::Object(Map::new()));
                if let Value::Object(inner) = inner {
                    inner.insert(leaf.to_owned(), value);
                }
            }
            None => {
                body.insert(key.to_owned(), value);
            }
        }
    }
    Value::Object(body)
}

/// Which field an API message is about: the field named earliest in it
/// (by path, or by its last part), after the `destination `x`: ` prefix.
pub fn place(message: &str) -> Refusal {
    let about = match message.strip_prefix("destination `") {
        Some(rest) => rest.split_once("`: ").map_or(message, |(_, about)| about),
        None => message,
    };
    let is_word = |c: Option<char>| c.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '.');
    let position = |token: &str| {
        about.match_indices(token).map(|(at, _)| at).find(|&at| {
            !is_word(about[..at].chars().next_back())
                && !is_word(about[at + token.len()..].chars().next())
        })
    };
    let field = FIELDS
        .iter()
        .chain(std::iter::once(&SECRET))
        .filter_map(|field| {
            let leaf = field.path.rsplit('.').next().unwrap_or(field.path);
            let token = if field.kind == Kind::Secret {
                "signing_secrets"
            } else {
                leaf
            };
            let at = [position(field.path), position(token)]
                .into_iter()
                .flatten()
                .min()?;
            Some((at, field.path))
        })
        .min()
        .map(|(_, path)| path);
    Refusal {
        field,
        message: message.to_owned(),
    }
}

/// The form, posting to `action`, with `values` and the `refusal` shown.
pub fn render(
    purpose: Purpose,
    action: &str,
    values: &Values,
    refusal: Option<&Refusal>,
    csrf: &str,
) -> String {
    let mut html = format!(
        r#"<form class="settings" method="post" action="{}" novalidate>{}"#,
        escape(action),
        csrf_field(csrf)
    );
    if let Some(Refusal {
        field: None,
        message,
    }) = refusal
    {
        html.push_str(&format!(
            r#"<p class="notice bad" role="alert" data-field="form-error">{}</p>"#,
            escape(message)
        ));
    }
    for field in shown(purpose) {
        let id = format!("f-{}", field.path.replace('.', "-"));
        let error = refusal
            .filter(|refusal| refusal.field == Some(field.path))
            .map(|refusal| {
                format!(
                    r#"<span class="error" id="{id}-error" role="alert" data-error-for="{}">{}</span>"#,
                    field.path,
                    escape(&refusal.message)
                )
            });
        let (kind, mode) = match field.kind {
            Kind::Text => ("text", ""),
            Kind::Url => ("url", ""),
            Kind::Number => ("text", r#" inputmode="numeric""#),
            Kind::Secret => ("password", r#" autocomplete="off""#),
        };
        let value = match field.kind {
            Kind::Secret => String::new(),
            _ => values.get(field.path).cloned().unwrap_or_default(),
        };
        let described = match &error {
            Some(_) => format!(r#" aria-describedby="{id}-hint {id}-error" aria-invalid="true""#),
            None => format!(r#" aria-describedby="{id}-hint""#),
        };
        html.push_str(&format!(
            r#"<div class="field"><label for="{id}">{label}</label><input id="{id}" name="{name}" type="{kind}"{mode} value="{value}"{described}><span class="hint" id="{id}-hint">{hint}</span>{error}</div>"#,
            label = field.label,
            name = field.path,
            value = escape(&value),
            hint = field.hint,
            error = error.unwrap_or_default(),
        ));
    }
    let submit = match purpose {
        Purpose::Create => "Create destination",
        Purpose::Edit => "Save settings",
    };
    html.push_str(&format!(
        r#"<div class="actions"><button type="submit" class="primary">{submit}</button></div></form>"#
    ));
    html
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn values(pairs: &[(&str, &str)]) -> Values {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn a_create_sends_what_was_typed_and_an_edit_clears_what_was_emptied() {
        let typed = values(&[
            ("name", "crm"),
            ("url", "http://x/"),
            ("event_types", "order.*, user.created,"),
            ("timeout_ms", "abc"),
            ("retry.max_attempts", "5"),
            ("max_age_ms", ""),
        ]);
        assert_eq!(
            to_json(Purpose::Create, &typed),
            json!({"name": "crm", "url": "http://x/", "event_types": ["order.*", "user.created"],
                   "timeout_ms": "abc", "retry": {"max_attempts": 5}})
        );
        let edit = to_json(Purpose::Edit, &typed);
        assert_eq!(edit["max_age_ms"], Value::Null);
        assert!(edit.get("name").is_none(), "the name is fixed");
        assert!(
            edit.get("signing_secrets").is_none(),
            "secrets are only set on create"
        );
    }

    #[test]
    fn a_message_lands_on_the_field_it_names_first() {
        let placed = |m: &str| place(m).field;
        assert_eq!(
            placed("destination `a`: url must be http or https"),
            Some("url")
        );
        assert_eq!(
            placed("timeout_ms: invalid type: string \"abc\", expected u64"),
            Some("timeout_ms")
        );
        assert_eq!(
            placed("retry.max_attempts: invalid value: integer `0`"),
            Some("retry.max_attempts")
        );
        assert_eq!(
            placed("destination name `a b` must be 1 to 64 letters, digits, `-` or `_`"),
            Some("name")
        );
        assert_eq!(placed("the body must be a JSON object"), None);
    }

    #[test]
    fn a_refusal_shows_next_to_its_field_escaped() {
        let refusal = place("url: <b>bad</b>");
        let html = render(
            Purpose::Edit,
            "/x",
            &values(&[("url", "\"><i>")]),
            Some(&refusal),
            "t",
        );
        assert!(
            html.contains(r#"data-error-for="url">url: &lt;b&gt;bad&lt;/b&gt;</span>"#),
            "{html}"
        );
        assert!(html.contains(r#"value="&quot;&gt;&lt;i&gt;""#));
        assert!(html.contains(r#"aria-invalid="true""#));
    }
}
