//! The report's figure as SVG: latency percentiles of the routing test beside aggregate
//! tokens/s against concurrent streams. Plain SVG text (no fonts, no raster), so it renders
//! the same in a browser and in docs.

use std::fmt::Write;

const W: f64 = 480.0;
const H: f64 = 360.0;
const LEFT: f64 = 64.0;
const RIGHT: f64 = 16.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 86.0;
const COLORS: [&str; 4] = ["#4e79a7", "#e15759", "#59a14f", "#f28e2b"];

/// A series: a name and one value per category.
pub struct Series {
    /// The legend label.
    pub name: String,
    /// One value per category, in the panel's unit (ms for latency, tokens/s for throughput).
    pub values: Vec<f64>,
}

/// A round upper bound for an axis and its tick step.
fn nice_axis(max: f64) -> (f64, f64) {
    let max = if max.is_finite() && max > 0.0 {
        max
    } else {
        1.0
    };
    let raw = max / 5.0;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 2.5, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * mag);
    ((max / step).ceil() * step, step)
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Axes, title, y ticks and category labels of one panel at `x0`, scaled to hold every
/// value of `series`; returns the y scale and the width of one category's band.
fn frame(
    out: &mut String,
    x0: f64,
    title: &str,
    y_label: &str,
    cats: &[String],
    series: &[Series],
) -> (impl Fn(f64) -> f64 + use<>, f64) {
    let top = series
        .iter()
        .flat_map(|s| s.values.iter().copied())
        .fold(0.0, f64::max);
    let (ymax, step) = nice_axis(top);
    let plot_h = H - TOP - BOTTOM;
    let y = move |v: f64| TOP + plot_h * (1.0 - v / ymax);
    let _ = write!(
        out,
        r#"<text x="{}" y="22" font-size="14" text-anchor="middle" font-weight="bold">{}</text>"#,
        x0 + W / 2.0,
        escape(title)
    );
    let mut v = 0.0;
    while v <= ymax + step / 2.0 {
        let _ = write!(
            out,
            r##"<line x1="{}" x2="{}" y1="{y:.1}" y2="{y:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" font-size="11" text-anchor="end">{}</text>"##,
            x0 + LEFT,
            x0 + W - RIGHT,
            x0 + LEFT - 6.0,
            y(v) + 4.0,
            trim_number(v),
            y = y(v)
        );
        v += step;
    }
    let _ = write!(
        out,
        r#"<text transform="translate({},{}) rotate(-90)" font-size="12" text-anchor="middle">{}</text>"#,
        x0 + 16.0,
        TOP + plot_h / 2.0,
        escape(y_label)
    );
    let band = (W - LEFT - RIGHT) / cats.len().max(1) as f64;
    for (i, c) in cats.iter().enumerate() {
        let _ = write!(
            out,
            r#"<text x="{:.1}" y="{}" font-size="12" text-anchor="middle">{}</text>"#,
            x0 + LEFT + band * (i as f64 + 0.5),
            H - BOTTOM + 18.0,
            escape(c)
        );
    }
    let _ = write!(
        out,
        r#"<line x1="{0}" x2="{0}" y1="{1}" y2="{2}" stroke="black"/><line x1="{0}" x2="{3}" y1="{2}" y2="{2}" stroke="black"/>"#,
        x0 + LEFT,
        TOP,
        H - BOTTOM,
        x0 + W - RIGHT
    );
    (y, band)
}

fn trim_number(v: f64) -> String {
    let s = format!("{v:.2}");
    s.trim_end_matches('0').trim_end_matches('.').to_owned()
}

fn legend(out: &mut String, x0: f64, series: &[Series]) {
    for (i, s) in series.iter().enumerate() {
        let y = H - BOTTOM + 36.0 + 16.0 * i as f64;
        let _ = write!(
            out,
            r#"<rect x="{}" y="{}" width="12" height="12" fill="{}"/><text x="{}" y="{}" font-size="12">{}</text>"#,
            x0 + LEFT,
            y - 10.0,
            COLORS[i % COLORS.len()],
            x0 + LEFT + 18.0,
            y,
            escape(&s.name)
        );
    }
}

/// How a panel draws its series.
#[derive(Clone, Copy)]
enum Marks {
    /// Grouped bars, one group per category.
    Bars,
    /// A line with points per series.
    Lines,
}

/// One panel at `x0`: frame, marks, legend.
fn panel(
    out: &mut String,
    x0: f64,
    (title, y_label): (&str, &str),
    cats: &[String],
    series: &[Series],
    marks: Marks,
) {
    let (y, band) = frame(out, x0, title, y_label, cats, series);
    let bar = band * 0.8 / series.len().max(1) as f64;
    for (si, s) in series.iter().enumerate() {
        let color = COLORS[si % COLORS.len()];
        match marks {
            Marks::Bars => {
                for (ci, v) in s.values.iter().enumerate() {
                    let x = x0 + LEFT + band * ci as f64 + band * 0.1 + bar * si as f64;
                    let _ = write!(
                        out,
                        r#"<rect x="{x:.1}" y="{:.1}" width="{bar:.1}" height="{:.1}" fill="{color}"><title>{}: {v:.3}</title></rect>"#,
                        y(*v),
                        (H - BOTTOM - y(*v)).max(0.0),
                        escape(&s.name)
                    );
                }
            }
            Marks::Lines => {
                let points: Vec<(f64, f64)> = s
                    .values
                    .iter()
                    .enumerate()
                    .map(|(ci, v)| (x0 + LEFT + band * (ci as f64 + 0.5), y(*v)))
                    .collect();
                let path: Vec<String> = points
                    .iter()
                    .map(|(px, py)| format!("{px:.1},{py:.1}"))
                    .collect();
                let _ = write!(
                    out,
                    r#"<polyline points="{}" fill="none" stroke="{color}" stroke-width="2"/>"#,
                    path.join(" ")
                );
                for (px, py) in points {
                    let _ = write!(
                        out,
                        r#"<circle cx="{px:.1}" cy="{py:.1}" r="3.5" fill="{color}"/>"#
                    );
                }
            }
        }
    }
    legend(out, x0, series);
}

/// Two panels: bars of latency percentiles per path, lines of tokens/s per concurrency.
pub fn figure(
    latency_cats: &[String],
    latency: &[Series],
    concurrency_cats: &[String],
    throughput: &[Series],
) -> String {
    let mut out = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{}" height="{H}" viewBox="0 0 {} {H}" font-family="sans-serif"><rect width="100%" height="100%" fill="white"/>"#,
        2.0 * W,
        2.0 * W
    );
    let titles = ("Routing latency, synthetic backend", "ms");
    panel(&mut out, 0.0, titles, latency_cats, latency, Marks::Bars);
    let titles = ("Aggregate tokens/s vs concurrent streams", "tokens/s");
    panel(
        &mut out,
        W,
        titles,
        concurrency_cats,
        throughput,
        Marks::Lines,
    );
    out.push_str("</svg>\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn axis_bounds_are_round_and_cover_the_data() {
        assert_eq!(nice_axis(0.93), (1.0, 0.2));
        assert_eq!(nice_axis(412.0), (500.0, 100.0));
        assert_eq!(nice_axis(0.0), (1.0, 0.2));
    }

    #[test]
    fn figure_holds_every_series_and_escapes_names() {
        let cats = vec!["p50".to_owned(), "p99".to_owned()];
        let svg = figure(
            &cats,
            &[Series {
                name: "a -> b <direct>".into(),
                values: vec![0.5, 0.9],
            }],
            &["1".into(), "4".into()],
            &[Series {
                name: "engine".into(),
                values: vec![100.0, 300.0],
            }],
        );
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>\n"));
        assert!(svg.contains("a -&gt; b &lt;direct&gt;"));
        assert_eq!(svg.matches("<rect x=").count(), 2 + 2);
        assert_eq!(svg.matches("<polyline").count(), 1);
    }
}
