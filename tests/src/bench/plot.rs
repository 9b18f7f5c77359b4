//! An SVG plot of the summary, written by hand (no plotting dependency): new
//! connections per second against N, and connection latency p50 (solid) and p99
//! (dashed) against N, one line per mode, N on a log scale.
use std::fmt::Write as _;

use super::report::{Report, Summary};

const WIDTH: f64 = 980.0;
const HEIGHT: f64 = 420.0;
const PANEL_WIDTH: f64 = 370.0;
const PANEL_HEIGHT: f64 = 280.0;
const TOP: f64 = 60.0;
const LEFTS: [f64; 2] = [80.0, 560.0];

fn color(mode: &str) -> &'static str {
    match mode {
        "ebpf" => "#d62728",
        "iptables" => "#1f77b4",
        "iptables-legacy" => "#17becf",
        "nftables" => "#2ca02c",
        _ => "#7f7f7f",
    }
}

/// A round step for about five ticks up to `max`.
fn tick_step(max: f64) -> f64 {
    if max <= 0.0 {
        return 1.0;
    }
    let raw = max / 5.0;
    let magnitude = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|factor| factor * magnitude)
        .find(|step| *step >= raw)
        .unwrap_or(10.0 * magnitude)
}

struct Panel<'a> {
    left: f64,
    title: &'a str,
    y_label: &'a str,
    counts: &'a [usize],
    y_max: f64,
}

impl Panel<'_> {
    fn x(&self, count: usize) -> f64 {
        #[expect(clippy::cast_precision_loss, reason = "service counts far below 2^52")]
        let log = |n: usize| (n.max(1) as f64).ln();
        let (Some(&first), Some(&last)) = (self.counts.first(), self.counts.last()) else {
            return self.left + PANEL_WIDTH / 2.0;
        };
        if first == last {
            return self.left + PANEL_WIDTH / 2.0;
        }
        let span = log(last) - log(first);
        self.left + 20.0 + (PANEL_WIDTH - 40.0) * (log(count) - log(first)) / span
    }

    fn y(&self, value: f64) -> f64 {
        TOP + PANEL_HEIGHT - PANEL_HEIGHT * (value / self.y_max).clamp(0.0, 1.0)
    }

    fn frame(&self, out: &mut String) {
        let bottom = TOP + PANEL_HEIGHT;
        let _ = writeln!(
            out,
            r#"<text x="{:.1}" y="{:.1}" font-size="15" text-anchor="middle" font-weight="bold">{}</text>"#,
            self.left + PANEL_WIDTH / 2.0,
            TOP - 25.0,
            self.title
        );
        let _ = writeln!(
            out,
            r##"<rect x="{:.1}" y="{TOP:.1}" width="{PANEL_WIDTH:.1}" height="{PANEL_HEIGHT:.1}" fill="none" stroke="#444"/>"##,
            self.left
        );
        let step = tick_step(self.y_max / 1.1);
        let mut tick = 0.0;
        while tick <= self.y_max {
            let y = self.y(tick);
            let _ = writeln!(
                out,
                r##"<line x1="{:.1}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" font-size="11" text-anchor="end">{tick}</text>"##,
                self.left,
                self.left + PANEL_WIDTH,
                self.left - 6.0,
                y + 4.0
            );
            tick += step;
        }
        for &count in self.counts {
            let x = self.x(count);
            let _ = writeln!(
                out,
                r##"<line x1="{x:.1}" y1="{bottom:.1}" x2="{x:.1}" y2="{:.1}" stroke="#444"/><text x="{x:.1}" y="{:.1}" font-size="11" text-anchor="middle">{count}</text>"##,
                bottom + 5.0,
                bottom + 18.0
            );
        }
        let _ = writeln!(
            out,
            r#"<text x="{:.1}" y="{:.1}" font-size="12" text-anchor="middle">services (N, log scale)</text>"#,
            self.left + PANEL_WIDTH / 2.0,
            bottom + 38.0
        );
        let _ = writeln!(
            out,
            r#"<text x="{:.1}" y="{:.1}" font-size="12" text-anchor="middle" transform="rotate(-90 {:.1} {:.1})">{}</text>"#,
            self.left - 55.0,
            TOP + PANEL_HEIGHT / 2.0,
            self.left - 55.0,
            TOP + PANEL_HEIGHT / 2.0,
            self.y_label
        );
    }

    fn line(&self, out: &mut String, mode: &str, points: &[(usize, f64)], dashed: bool) {
        let color = color(mode);
        let path: Vec<String> = points
            .iter()
            .map(|&(count, value)| format!("{:.1},{:.1}", self.x(count), self.y(value)))
            .collect();
        let dash = if dashed {
            r#" stroke-dasharray="6 4""#
        } else {
            ""
        };
        let _ = writeln!(
            out,
            r#"<polyline points="{}" fill="none" stroke="{color}" stroke-width="2"{dash}/>"#,
            path.join(" ")
        );
        for &(count, value) in points {
            let _ = writeln!(
                out,
                r#"<circle cx="{:.1}" cy="{:.1}" r="3.5" fill="{color}"/>"#,
                self.x(count),
                self.y(value)
            );
        }
    }
}

fn series(rows: &[&Summary], value: impl Fn(&Summary) -> f64) -> Vec<(usize, f64)> {
    rows.iter().map(|row| (row.services, value(row))).collect()
}

/// The plot of `report`'s summary.
#[must_use]
pub fn svg(report: &Report) -> String {
    let mut counts: Vec<usize> = report.summary.iter().map(|row| row.services).collect();
    counts.sort_unstable();
    counts.dedup();
    let modes = &report.settings.modes;
    let rows_of = |mode: &str| -> Vec<&Summary> {
        report
            .summary
            .iter()
            // Rows without figures (not programmed within the limit) are no points.
            .filter(|row| row.mode == mode && row.rounds > row.rounds_not_programmed)
            .collect()
    };
    let max_rate = report
        .summary
        .iter()
        .map(|row| row.conn_per_s)
        .fold(0.0, f64::max);
    let max_latency = report
        .summary
        .iter()
        .map(|row| row.latency_p99_us)
        .fold(0.0, f64::max);
    let panels = [
        Panel {
            left: LEFTS[0],
            title: "New TCP connections per second",
            y_label: "connections/s",
            counts: &counts,
            y_max: (max_rate * 1.1).max(1.0),
        },
        Panel {
            left: LEFTS[1],
            title: "Connection latency: p50 solid, p99 dashed",
            y_label: "microseconds",
            counts: &counts,
            y_max: (max_latency * 1.1).max(1.0),
        },
    ];
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif">"#
    );
    let _ = writeln!(
        out,
        r#"<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/>"#
    );
    for panel in &panels {
        panel.frame(&mut out);
    }
    for mode in modes {
        let rows = rows_of(mode);
        if rows.is_empty() {
            continue;
        }
        panels[0].line(&mut out, mode, &series(&rows, |row| row.conn_per_s), false);
        panels[1].line(
            &mut out,
            mode,
            &series(&rows, |row| row.latency_p50_us),
            false,
        );
        panels[1].line(
            &mut out,
            mode,
            &series(&rows, |row| row.latency_p99_us),
            true,
        );
    }
    let legend_y = HEIGHT - 22.0;
    let mut x = LEFTS[0];
    for mode in modes {
        let _ = writeln!(
            out,
            r#"<rect x="{x:.1}" y="{:.1}" width="14" height="4" fill="{}"/><text x="{:.1}" y="{legend_y:.1}" font-size="12">{mode}</text>"#,
            legend_y - 6.0,
            color(mode),
            x + 20.0
        );
        x += 130.0;
    }
    let _ = writeln!(
        out,
        r##"<text x="{:.1}" y="{legend_y:.1}" font-size="11" text-anchor="end" fill="#555">{} · {} CPUs · kernel {}</text>"##,
        WIDTH - 10.0,
        report.machine.cpu,
        report.machine.cpus,
        report.machine.kernel
    );
    out.push_str("</svg>\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_round() {
        assert!((tick_step(1000.0) - 200.0).abs() < 1e-9);
        assert!((tick_step(37.0) - 10.0).abs() < 1e-9);
        assert!((tick_step(0.0) - 1.0).abs() < 1e-9);
    }
}
