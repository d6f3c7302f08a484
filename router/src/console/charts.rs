//! A series over time as an inline SVG chart: no scripts, no fonts to load,
//! readable by a screen reader through its label (which states the latest
//! value and the peak).

use std::fmt::Write;

use crate::console::html::escape;

/// Points evenly spaced in time, oldest first; `None`: nothing measured.
pub struct Series<'a> {
    /// What it shows, e.g. "Deliveries per second".
    pub title: &'a str,
    /// After a value, e.g. "/s" or " ms".
    pub unit: &'a str,
    pub points: Vec<Option<f64>>,
    /// What the span is, e.g. "last hour, per minute".
    pub span: &'a str,
}

/// Width and height of the drawing, in SVG units.
#[derive(Clone, Copy)]
pub struct Size {
    pub width: f64,
    pub height: f64,
}

pub const SPARK: Size = Size {
    width: 300.0,
    height: 44.0,
};
pub const WIDE: Size = Size {
    width: 560.0,
    height: 140.0,
};

fn number(value: f64) -> String {
    if value >= 100.0 || value == value.trunc() {
        format!("{value:.0}")
    } else if value >= 10.0 {
        format!("{value:.1}")
    } else {
        format!("{value:.2}")
    }
}

/// The chart as a `<figure>`, with a caption when `size` is not a sparkline.
pub fn chart(series: &Series<'_>, size: Size, field: &str) -> String {
    let values: Vec<f64> = series.points.iter().flatten().copied().collect();
    let peak = values.iter().copied().fold(0.0_f64, f64::max);
    let latest = series.points.iter().rev().flatten().next().copied();
    let label = format!(
        "{}, {}: latest {}, peak {}",
        series.title,
        series.span,
        latest.map_or_else(
            || "none".into(),
            |v| format!("{}{}", number(v), series.unit)
        ),
        format_args!("{}{}", number(peak), series.unit),
    );
    let scale = if peak > 0.0 { peak } else { 1.0 };
    let step = size.width / (series.points.len().max(2) - 1) as f64;
    let pad = 4.0;
    let y_of = |v: f64| pad + (size.height - 2.0 * pad) * (1.0 - v / scale);
    let mut path = String::new();
    let mut pen_down = false;
    for (i, point) in series.points.iter().enumerate() {
        match point {
            Some(v) => {
                let command = if pen_down { 'L' } else { 'M' };
                let _ = write!(path, "{command}{:.1},{:.1} ", i as f64 * step, y_of(*v));
                pen_down = true;
            }
            None => pen_down = false,
        }
    }
    // A point without a neighbour draws no line: mark it.
    let present = |i: usize| series.points.get(i).is_some_and(Option::is_some);
    let dots: String = series
        .points
        .iter()
        .enumerate()
        .filter_map(|(i, point)| {
            let lonely = !present(i.wrapping_sub(1)) && !present(i + 1);
            point.filter(|_| lonely).map(|v| {
                format!(
                    r##"<circle cx="{:.1}" cy="{:.1}" r="2.5" fill="#2251c4"/>"##,
                    i as f64 * step,
                    y_of(v)
                )
            })
        })
        .collect();
    let caption = match size.height > SPARK.height {
        true => format!(
            "<figcaption>{} · {} · peak {}{}</figcaption>",
            escape(series.title),
            escape(series.span),
            number(peak),
            escape(series.unit)
        ),
        false => String::new(),
    };
    format!(
        r##"<figure class="chart" data-field="{field}" data-points="{count}" data-peak="{peak}"><svg viewBox="0 0 {w} {h}" role="img" aria-label="{label}" preserveAspectRatio="none"><title>{label}</title><line x1="0" y1="{base:.1}" x2="{w}" y2="{base:.1}" stroke="#d5dae6" stroke-width="1"/><path d="{path}" fill="none" stroke="#2251c4" stroke-width="1.6" vector-effect="non-scaling-stroke"/>{dots}</svg>{caption}</figure>"##,
        field = escape(field),
        count = values.len(),
        peak = number(peak),
        w = size.width,
        h = size.height,
        base = y_of(0.0),
        label = escape(&label),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gap_lifts_the_pen_and_the_label_says_the_figures() {
        let series = Series {
            title: "Deliveries per second",
            unit: "/s",
            points: vec![Some(1.0), None, Some(4.0), Some(2.0), None],
            span: "last hour",
        };
        let svg = chart(&series, WIDE, "deliveries");
        assert_eq!(svg.matches('M').count(), 2, "{svg}");
        assert!(svg.contains("latest 2/s, peak 4/s"), "{svg}");
        assert!(svg.contains(r#"data-points="3""#));
        assert_eq!(
            svg.matches("<circle").count(),
            1,
            "the lone first point is marked"
        );
    }
}
