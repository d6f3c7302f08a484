//! The console's HTML: escaping, the frame every page shares (navigation
//! and style), and small pieces. Everything a user or a destination could
//! have written (names, user ids, payloads, error bodies) goes through
//! [`escape`].

use std::fmt::Write;
use std::time::{Duration, UNIX_EPOCH};

/// `text` safe inside an element or a quoted attribute.
pub fn escape(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => escaped.push_str("&amp;"),
            '<' => escaped.push_str("&lt;"),
            '>' => escaped.push_str("&gt;"),
            '"' => escaped.push_str("&quot;"),
            '\'' => escaped.push_str("&#39;"),
            c => escaped.push(c),
        }
    }
    escaped
}

/// `text` as one URL path segment or query value.
pub fn url_part(text: &str) -> String {
    let mut encoded = String::with_capacity(text.len());
    for byte in text.bytes() {
        match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                encoded.push(char::from(byte))
            }
            _ => {
                let _ = write!(encoded, "%{byte:02X}");
            }
        }
    }
    encoded
}

/// Which navigation entry a page belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Section {
    Destinations,
    NewDestination,
    Events,
}

/// A whole page: `title`, the navigation with `section` marked, then `body`.
/// `refresh` reloads it every so many seconds.
pub fn page(title: &str, section: Section, refresh: Option<u32>, body: &str) -> String {
    let nav = [
        (Section::Destinations, "/", "Destinations"),
        (
            Section::NewDestination,
            "/destinations/new",
            "New destination",
        ),
        (Section::Events, "/events", "Event lookup"),
    ];
    let links: String = nav
        .iter()
        .map(|(entry, href, label)| {
            let current = if *entry == section {
                r#" aria-current="page""#
            } else {
                ""
            };
            format!(r#"<a href="{href}"{current}>{label}</a>"#)
        })
        .collect();
    let refresh = refresh
        .map(|secs| format!(r#"<meta http-equiv="refresh" content="{secs}">"#))
        .unwrap_or_default();
    format!(
        r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
{refresh}<title>{title} · Event delivery</title>
<style>{STYLE}</style></head>
<body>
<header><span class="brand">Event delivery</span><nav aria-label="Console">{links}</nav></header>
<main id="main">
{body}
</main>
</body></html>"#,
        title = escape(title),
    )
}

const STYLE: &str = r#"
*{box-sizing:border-box}
body{margin:0;font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;color:#1d2330;background:#f5f6f9}
header{display:flex;gap:24px;align-items:center;padding:10px 24px;background:#1d2330;color:#fff}
header .brand{font-weight:700}
header nav{display:flex;gap:4px;flex-wrap:wrap}
header nav a{color:#d8dcea;text-decoration:none;padding:6px 10px;border-radius:6px}
header nav a[aria-current=page]{background:#39415a;color:#fff}
main{max-width:1240px;margin:0 auto;padding:20px 24px}
h1{font-size:22px;margin:0 0 4px}
h2{font-size:17px;margin:0}
h3{font-size:15px;margin:18px 0 8px}
a{color:#2251c4}
a:focus-visible,button:focus-visible,input:focus-visible,textarea:focus-visible,select:focus-visible{outline:3px solid #ffb000;outline-offset:2px}
.meta{color:#5b6275;margin:0 0 16px}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(340px,1fr));gap:14px}
.card{background:#fff;border:1px solid #dfe3ec;border-radius:10px;padding:14px 16px;min-width:0}
.card header,.card .top{display:flex;justify-content:space-between;align-items:center;gap:8px;background:none;color:inherit;padding:0}
.card h2 a{color:#1d2330;text-decoration:none;overflow-wrap:anywhere}
.card h2 a:hover{text-decoration:underline}
dl.figures{display:grid;grid-template-columns:repeat(3,minmax(0,1fr));gap:8px 12px;margin:12px 0 8px}
dl.figures div{min-width:0}
dl.figures dt{color:#5b6275;font-size:12px}
dl.figures dd{margin:0;font-weight:600;font-variant-numeric:tabular-nums;overflow-wrap:anywhere}
.state{display:inline-block;font-weight:600;font-size:12px;padding:2px 9px;border-radius:10px;white-space:nowrap}
.state.healthy{background:#dcf5e3;color:#17612f}
.state.degraded{background:#fff1cc;color:#7a5800}
.state.failing,.state.circuit-open{background:#fde0e0;color:#8a1c1c}
.state.paused{background:#e6e9f2;color:#3b4360}
.state.stalled{background:#f3e1ff;color:#5b1f85}
.panel{background:#fff;border:1px solid #dfe3ec;border-radius:10px;padding:14px 16px;margin:0 0 16px;min-width:0}
.columns{display:grid;grid-template-columns:repeat(auto-fit,minmax(360px,1fr));gap:16px}
table{border-collapse:collapse;width:100%;table-layout:fixed}
th,td{text-align:left;padding:6px 8px;border-bottom:1px solid #e8ebf2;vertical-align:top;overflow-wrap:anywhere}
th{font-weight:600;color:#3b4360;background:#f7f8fb}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
code,pre{font-family:ui-monospace,SFMono-Regular,Menlo,monospace;font-size:12.5px}
pre{white-space:pre-wrap;overflow-wrap:anywhere;background:#f7f8fb;padding:8px;border-radius:6px;margin:0;max-height:180px;overflow:auto}
.notice{background:#e6f0ff;border:1px solid #b9d0ff;padding:8px 12px;border-radius:8px;margin:0 0 14px}
.notice.bad{background:#fde0e0;border-color:#f2b3b3}
form.settings{display:grid;grid-template-columns:repeat(auto-fit,minmax(260px,1fr));gap:12px 16px}
.field{display:flex;flex-direction:column;gap:3px;min-width:0}
.field label{font-weight:600}
.field .hint{color:#5b6275;font-size:12px}
.field .error{color:#a11616;font-weight:600}
input[type=text],input[type=url],input[type=number],input[type=password],textarea{font:inherit;padding:6px 8px;border:1px solid #b8bfd0;border-radius:6px;width:100%;background:#fff}
input[aria-invalid=true]{border-color:#c42222;background:#fff6f6}
.actions{display:flex;gap:8px;flex-wrap:wrap;align-items:center}
button{font:inherit;padding:6px 14px;border-radius:6px;border:1px solid #8f98ad;background:#fff;cursor:pointer}
button.primary{background:#2251c4;border-color:#2251c4;color:#fff}
button.danger{border-color:#c42222;color:#a11616}
form.inline{display:inline}
.chart{margin:0;min-width:0}
.chart svg{width:100%;height:auto;display:block}
.clip{display:-webkit-box;-webkit-line-clamp:2;-webkit-box-orient:vertical;overflow:hidden}
.chart figcaption{color:#5b6275;font-size:12px}
.muted{color:#5b6275}
.skip{position:absolute;left:-999px}
"#;

/// A health or attempt state as a coloured badge.
pub fn badge(class: &str, label: &str) -> String {
    format!(
        r#"<span class="state {class}" data-field="health">{}</span>"#,
        escape(label)
    )
}

/// A Unix ms time as RFC 3339, to the second.
pub fn time(unix_ms: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(unix_ms)).to_string()
}

/// A duration in ms, short: `850 ms`, `4.2 s`, `3 min`, `5.1 h`.
pub fn duration_ms(ms: u64) -> String {
    match ms {
        0..=999 => format!("{ms} ms"),
        1_000..=59_999 => format!("{:.1} s", ms as f64 / 1_000.0),
        60_000..=3_599_999 => format!("{} min", ms / 60_000),
        _ => format!("{:.1} h", ms as f64 / 3_600_000.0),
    }
}

/// A ratio 0 to 1 as a percentage, or a dash.
pub fn percent(ratio: Option<f64>) -> String {
    match ratio {
        Some(ratio) if ratio >= 0.9995 => "100 %".into(),
        Some(ratio) => format!("{:.1} %", ratio * 100.0),
        None => "–".into(),
    }
}

/// A value or a dash.
pub fn or_dash<T: std::fmt::Display>(value: Option<T>) -> String {
    value.map_or_else(|| "–".into(), |v| v.to_string())
}

/// Figures as a definition list: (field, label, value) each, the value
/// escaped and marked with `data-field` for tests.
pub fn figures(items: &[(&str, &str, String)]) -> String {
    let cells: String = items
        .iter()
        .map(|(field, label, value)| {
            format!(
                r#"<div><dt>{label}</dt><dd data-field="{field}">{}</dd></div>"#,
                escape(value)
            )
        })
        .collect();
    format!(r#"<dl class="figures">{cells}</dl>"#)
}

/// A hidden field carrying the form token.
pub fn csrf_field(token: &str) -> String {
    format!(
        r#"<input type="hidden" name="csrf" value="{}">"#,
        escape(token)
    )
}

/// A form of one button posting to `action`.
pub fn button_form(action: &str, token: &str, label: &str, class: &str) -> String {
    format!(
        r#"<form class="inline" method="post" action="{}">{}<button type="submit" class="{class}">{}</button></form>"#,
        escape(action),
        csrf_field(token),
        escape(label)
    )
}

/// "the Redis of shards 3, 7 did not answer".
pub fn unanswered(shards: &[u16]) -> String {
    let list: Vec<String> = shards.iter().map(u16::to_string).collect();
    match shards.len() {
        1 => format!("the Redis of shard {} did not answer", list[0]),
        _ => format!("the Redis of shards {} did not answer", list.join(", ")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markup_in_text_stays_text() {
        assert_eq!(
            escape(r#""><img src=x onerror=alert(1)><script>'"#),
            "&quot;&gt;&lt;img src=x onerror=alert(1)&gt;&lt;script&gt;&#39;"
        );
        assert_eq!(url_part("a b/<c>"), "a%20b%2F%3Cc%3E");
    }
}
