//! What a simulation reports: one [`RoundRecord`] per round, written as `results.json` and as a
//! self-contained `report.html` (inline SVG plots, no scripts or external files).

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

/// Every figure of one round.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RoundRecord {
    /// Round number (1-based).
    pub round: u64,
    /// Whether the round committed a new model.
    pub committed: bool,
    /// Why it failed, if it did.
    pub failure: Option<String>,
    /// Clients that tried to check in (inside their availability window and willing this round).
    #[serde(default)]
    pub check_ins: usize,
    /// Clients that checked in and were eligible.
    pub candidates: usize,
    /// Clients sent the task.
    pub selected: usize,
    /// Updates accepted.
    pub participants: usize,
    /// Selected clients that dropped out.
    pub dropouts: usize,
    /// Selected clients that missed the deadline.
    pub stragglers: usize,
    /// Selected clients whose availability window closed before they finished training.
    #[serde(default)]
    pub window_closed: usize,
    /// Weighted mean local training loss.
    pub loss: Option<f64>,
    /// HR@10 after this round (when evaluated): the run's quality figure — the devices' own
    /// (federated evaluation) when the run has it, else the central scorer's.
    pub hr_at_10: Option<f64>,
    /// NDCG@10 after this round (when evaluated), as `hr_at_10`.
    pub ndcg_at_10: Option<f64>,
    /// The central scorer's HR@10 over every evaluation user (when evaluated).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub central_hr_at_10: Option<f64>,
    /// The central scorer's NDCG@10 over every evaluation user (when evaluated).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub central_ndcg_at_10: Option<f64>,
    /// The federated evaluation round run after this round, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub federated: Option<FederatedRecord>,
    /// Full-ranking HR@10 after this round (synthetic data, when evaluated).
    pub full_hr_at_10: Option<f64>,
    /// ε spent so far at the configured δ (when DP is on; under central DP, the ledger's PLD
    /// accountant).
    pub epsilon: Option<f64>,
    /// The clip norm clients were told to use this round (it moves under adaptive clipping).
    #[serde(default)]
    pub clip_norm: Option<f64>,
    /// Share of reports whose norm before clipping was within the clip norm (clients' adaptive
    /// clipping indicators, unnoised: a simulator diagnostic).
    #[serde(default)]
    pub within_clip: Option<f64>,
    /// The same ledger's ε by the RDP accountant, for comparison (central DP, in-process runs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epsilon_rdp: Option<f64>,
    /// Bytes sent by clients this round.
    pub bytes_up: u64,
    /// Bytes sent by the coordinator this round.
    pub bytes_down: u64,
    /// Wall-clock seconds of the whole round (protocol, training, aggregation; evaluation excluded).
    pub round_seconds: f64,
    /// Wall-clock seconds spent in local training.
    pub train_seconds: f64,
    /// Simulated (virtual) seconds the round took.
    pub simulated_seconds: f64,
    /// Bytes by message kind this round: kind → (up, down), frames included (in-process runs).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub traffic: Traffic,
    /// Host time by protocol step this round: step → (seconds, calls), summed over every device
    /// and the coordinator; training excluded (in-process runs; see `docs/simulation.md`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub cpu: StepTimes,
}

/// A federated evaluation round: what the devices reported, and the central scorer's figures
/// for the same devices (the cross-check).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct FederatedRecord {
    /// Whether the evaluation round released figures (it may fail: too few reports, budget).
    pub completed: bool,
    /// Why it failed, if it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<String>,
    /// Reports accepted.
    pub reports: usize,
    /// Evaluation cases the released figures are over (noised under DP).
    pub cases: f64,
    /// Client-reported HR@10.
    pub hr_at_10: Option<f64>,
    /// Client-reported NDCG@10.
    pub ndcg_at_10: Option<f64>,
    /// Client-reported mean loss of the held-out items.
    pub loss: Option<f64>,
    /// Standard deviation of the noise on each released sum (DP), if any.
    pub noise_std: Option<f64>,
    /// The central scorer's HR@10 over the devices that reported (equal with DP off).
    pub central_hr_at_10: Option<f64>,
    /// The central scorer's NDCG@10 over the devices that reported.
    pub central_ndcg_at_10: Option<f64>,
    /// Bytes sent by devices in the evaluation round.
    pub bytes_up: u64,
    /// Bytes sent by the coordinator in the evaluation round.
    pub bytes_down: u64,
}

impl FederatedRecord {
    /// An evaluation round that released nothing, and why.
    pub fn failed(reason: String) -> Self {
        Self { failure: Some(reason), ..Self::default() }
    }

    /// What an evaluation round released (no cross-check, no bytes yet).
    pub fn released(m: &starling_proto::round::FederatedEval) -> Self {
        Self {
            completed: true,
            reports: m.reports,
            cases: m.cases,
            hr_at_10: Some(m.hr_at_10),
            ndcg_at_10: Some(m.ndcg_at_10),
            loss: Some(m.loss),
            noise_std: m.noise_std,
            ..Self::default()
        }
    }
}

/// A whole run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SimReport {
    /// The configuration, as given.
    pub config: serde_json::Value,
    /// One record per round.
    pub rounds: Vec<RoundRecord>,
    /// Untrained model's HR@10 (round 0).
    pub initial_hr_at_10: Option<f64>,
    /// Untrained model's NDCG@10 (round 0).
    pub initial_ndcg_at_10: Option<f64>,
    /// Popularity ranking's HR@10, for reference.
    pub popularity_hr_at_10: Option<f64>,
    /// Where the rounds' `hr_at_10` comes from: `federated` (the devices' own evaluation) or
    /// `central` (the simulator's scorer).
    #[serde(default)]
    pub quality_source: String,
    /// Total wall-clock seconds.
    pub total_seconds: f64,
    /// Median wall-clock seconds per round.
    pub median_round_seconds: f64,
    /// Median wall-clock seconds of training per round.
    pub median_train_seconds: f64,
    /// Peak resident memory in bytes, when the platform reports it.
    pub peak_rss_bytes: Option<u64>,
    /// Why the run stopped before its last round (e.g. the privacy budget refused a round).
    #[serde(default)]
    pub stopped: Option<String>,
    /// The Byzantine clients of the run, if it had any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attack: Option<AttackReport>,
    /// The empirical privacy audit, if the run had canaries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audit: Option<super::audit::AuditReport>,
}

/// Bytes by message kind: kind → (up, down).
pub type Traffic = BTreeMap<String, (u64, u64)>;
/// Host time by protocol step: step → (seconds, calls).
pub type StepTimes = BTreeMap<String, (f64, u64)>;

impl SimReport {
    /// Per-step bytes and host time over the whole run, per call (a call is one message handled:
    /// per device for device steps): the "bytes and CPU per phase" table of secure aggregation.
    pub fn step_totals(&self) -> (Traffic, StepTimes) {
        let mut traffic = Traffic::new();
        let mut cpu = StepTimes::new();
        for r in &self.rounds {
            for (k, (u, d)) in &r.traffic {
                let e = traffic.entry(k.clone()).or_default();
                e.0 += u;
                e.1 += d;
            }
            for (k, (t, n)) in &r.cpu {
                let e = cpu.entry(k.clone()).or_default();
                e.0 += t;
                e.1 += n;
            }
        }
        (traffic, cpu)
    }

    fn steps_html(&self) -> String {
        let (traffic, cpu) = self.step_totals();
        if traffic.is_empty() && cpu.is_empty() {
            return String::new();
        }
        let mut html = String::from(
            "<h2>Protocol steps</h2>\n<table id=\"traffic\"><tr><th>message</th><th>bytes up</th><th>bytes down</th></tr>\n",
        );
        for (k, (u, d)) in &traffic {
            let _ = writeln!(
                html,
                "<tr><td style=\"text-align:left\">{}</td><td>{u}</td><td>{d}</td></tr>",
                escape(k)
            );
        }
        html.push_str(
            "</table>\n<table id=\"cpu\"><tr><th>step</th><th>calls</th><th>host ms total</th><th>host ms per call</th></tr>\n",
        );
        for (k, (t, n)) in &cpu {
            let per = if *n > 0 { t * 1e3 / *n as f64 } else { 0.0 };
            let _ = writeln!(
                html,
                "<tr><td style=\"text-align:left\">{}</td><td>{n}</td><td>{:.1}</td><td>{per:.3}</td></tr>",
                escape(k),
                t * 1e3
            );
        }
        html.push_str("</table>\n");
        html
    }
}

/// The Byzantine clients of a run and what they cost (`results.json`'s `attack` object).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AttackReport {
    /// Fraction of all clients that attack.
    pub fraction: f64,
    /// `scale`, `sign-flip` or `random`.
    pub kind: String,
    /// The attack's factor.
    pub factor: f32,
    /// How many clients attack (chosen by the seed).
    pub attackers: usize,
    /// Crafted updates the attackers sent over the run.
    pub crafted_updates: usize,
    /// The final HR@10 of this (attacked) run.
    pub hr_at_10: Option<f64>,
    /// The final HR@10 of the same run without attackers, when a baseline run was made.
    pub baseline_hr_at_10: Option<f64>,
    /// `baseline_hr_at_10 − hr_at_10` (positive: the attack hurt), when a baseline run was made.
    pub hr_at_10_drop: Option<f64>,
}

impl AttackReport {
    /// Records the final HR@10 of the same run without attackers, and the drop.
    pub fn set_baseline(&mut self, baseline_hr_at_10: Option<f64>) {
        self.baseline_hr_at_10 = baseline_hr_at_10;
        self.hr_at_10_drop = baseline_hr_at_10.zip(self.hr_at_10).map(|(b, a)| b - a);
    }

    /// One sentence describing the attack and, with a baseline, the HR@10 drop.
    pub fn summary(&self) -> String {
        let mut s = format!(
            "Byzantine clients: {} of the fleet ({} clients) sent `{}` updates with factor {} ({} crafted updates); final HR@10 {}",
            self.fraction,
            self.attackers,
            self.kind,
            self.factor,
            self.crafted_updates,
            fmt4(self.hr_at_10)
        );
        if let (Some(b), Some(d)) = (self.baseline_hr_at_10, self.hr_at_10_drop) {
            let _ = write!(s, ", against {b:.4} without attackers: HR@10 drop {d:.4}");
        }
        s
    }
}

/// Why a report could not be written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReportError {
    /// Writing a file failed.
    #[error("writing {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// Serialising the JSON failed.
    #[error("serialising results: {0}")]
    Json(#[from] serde_json::Error),
}

impl SimReport {
    /// Writes `results.json` and `report.html` into `dir` (created if missing).
    pub fn write(&self, dir: &Path) -> Result<(), ReportError> {
        let io = |path: &Path| {
            let path = path.display().to_string();
            move |source| ReportError::Io { path, source }
        };
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let json = dir.join("results.json");
        std::fs::write(&json, serde_json::to_vec_pretty(self)?).map_err(io(&json))?;
        let html = dir.join("report.html");
        std::fs::write(&html, self.to_html()).map_err(io(&html))?;
        Ok(())
    }

    /// The self-contained HTML report: inline SVG charts (quality, privacy, traffic, round time,
    /// fleet), the per-round table and the configuration; nothing is fetched from anywhere.
    ///
    /// A tiny inline script runs after load and records on `<body data-rendered=…>` how many
    /// charts the browser laid out with visible lines, so a headless browser's `--dump-dom` can
    /// prove that the plots render (see `docs/simulation.md`).
    pub fn to_html(&self) -> String {
        let xs = |f: &dyn Fn(&RoundRecord) -> Option<f64>| -> Vec<(f64, f64)> {
            self.rounds.iter().filter_map(|r| f(r).map(|y| (r.round as f64, y))).collect()
        };
        let federated = self.rounds.iter().any(|r| r.federated.is_some());
        let mut quality = if federated {
            vec![
                Series { name: "HR@10 (devices)", points: xs(&|r| r.hr_at_10) },
                Series { name: "NDCG@10 (devices)", points: xs(&|r| r.ndcg_at_10) },
                Series { name: "HR@10 (central, all users)", points: xs(&|r| r.central_hr_at_10) },
            ]
        } else {
            vec![
                Series { name: "HR@10", points: xs(&|r| r.hr_at_10) },
                Series { name: "NDCG@10", points: xs(&|r| r.ndcg_at_10) },
            ]
        };
        if self.rounds.iter().any(|r| r.full_hr_at_10.is_some()) {
            quality.push(Series { name: "full-ranking HR@10", points: xs(&|r| r.full_hr_at_10) });
        }
        let mb = |b: u64| b as f64 / 1e6;
        let mut html = String::new();
        let _ = write!(
            html,
            "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>Starling simulation report</title>\
             <style>body{{font-family:system-ui,sans-serif;margin:2em;color:#222}}\
             .grid{{display:grid;grid-template-columns:repeat(auto-fit,minmax(460px,1fr));gap:1.5em}}\
             figure{{margin:0}}\
             table{{border-collapse:collapse;font-size:0.85em}}td,th{{border:1px solid #ccc;padding:2px 6px;text-align:right}}\
             pre{{background:#f6f6f6;padding:1em;overflow:auto}}</style></head><body>\n\
             <h1>Starling simulation report</h1>\n<p>{} rounds, total {:.1} s, median round {:.4} s (evaluation excluded; local training {:.4} s){}.</p>\n",
            self.rounds.len(),
            self.total_seconds,
            self.median_round_seconds,
            self.median_train_seconds,
            self.peak_rss_bytes
                .map(|b| format!(", peak RSS {:.1} MiB", b as f64 / 1048576.0))
                .unwrap_or_default()
        );
        let _ = writeln!(
            html,
            "<p>Untrained model: HR@10 {}, NDCG@10 {}; popularity ranking: HR@10 {}.{}</p>",
            fmt4(self.initial_hr_at_10),
            fmt4(self.initial_ndcg_at_10),
            fmt4(self.popularity_hr_at_10),
            self.stopped.as_ref().map(|s| format!(" Stopped early: {}.", escape(s))).unwrap_or_default()
        );
        if let Some(a) = &self.attack {
            let _ = writeln!(html, "<h2>Attack</h2>\n<p id=\"attack\">{}.</p>", escape(&a.summary()));
        }
        if let Some(a) = &self.audit {
            html.push_str(&a.to_html());
        }
        html.push_str("<div class=\"grid\">\n");
        let model = self.config.get("model").and_then(|m| m.as_str()).unwrap_or("mf");
        let source =
            if federated { "reported by the devices (federated evaluation)" } else { "central scorer" };
        html.push_str(&svg_chart(
            &format!("Recommendation quality ({model}; {source})"),
            "round",
            &quality,
            "no evaluation yet",
        ));
        let mut privacy = vec![Series { name: "ε", points: xs(&|r| r.epsilon) }];
        let rdp = xs(&|r| r.epsilon_rdp);
        if !rdp.is_empty() {
            privacy.push(Series { name: "ε by RDP", points: rdp });
        }
        html.push_str(&svg_chart("Privacy spent (ε)", "round", &privacy, "differential privacy off"));
        html.push_str(&svg_chart(
            "Upload per round (MB)",
            "round",
            &[Series { name: "bytes up", points: xs(&|r| Some(mb(r.bytes_up))) }],
            "no data",
        ));
        html.push_str(&svg_chart(
            "Download per round (MB)",
            "round",
            &[Series { name: "bytes down", points: xs(&|r| Some(mb(r.bytes_down))) }],
            "no data",
        ));
        html.push_str(&svg_chart(
            "Round time (s)",
            "round",
            &[
                Series { name: "round", points: xs(&|r| Some(r.round_seconds)) },
                Series { name: "local training", points: xs(&|r| Some(r.train_seconds)) },
            ],
            "no data",
        ));
        html.push_str(&svg_chart(
            "Fleet per round (clients)",
            "round",
            &[
                Series { name: "check-ins", points: xs(&|r| Some(r.check_ins as f64)) },
                Series { name: "participants", points: xs(&|r| Some(r.participants as f64)) },
                Series { name: "dropouts", points: xs(&|r| Some(r.dropouts as f64)) },
                Series { name: "late", points: xs(&|r| Some(r.stragglers as f64)) },
            ],
            "no data",
        ));
        html.push_str("</div>\n");
        html.push_str(&self.steps_html());
        html.push_str(
            "<h2>Rounds</h2>\n<table><tr><th>round</th><th>check-ins</th><th>selected</th><th>participants</th>\
             <th>dropouts</th><th>late</th><th>HR@10</th><th>NDCG@10</th><th>ε</th><th>bytes up</th><th>bytes down</th>\
             <th>round s</th><th>training s</th><th>simulated s</th></tr>\n",
        );
        for r in &self.rounds {
            let _ = writeln!(
                html,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td>\
                 <td>{}</td><td>{}</td><td>{:.4}</td><td>{:.4}</td><td>{:.1}</td></tr>",
                r.round,
                r.check_ins,
                r.selected,
                r.participants,
                r.dropouts,
                r.stragglers,
                fmt4(r.hr_at_10),
                fmt4(r.ndcg_at_10),
                fmt4(r.epsilon),
                r.bytes_up,
                r.bytes_down,
                r.round_seconds,
                r.train_seconds,
                r.simulated_seconds
            );
        }
        html.push_str("</table>\n<h2>Configuration</h2>\n<pre id=\"config\">");
        html.push_str(&escape(&serde_json::to_string_pretty(&self.config).unwrap_or_default()));
        html.push_str("</pre>\n");
        html.push_str(RENDER_CHECK);
        html.push_str("</body></html>\n");
        html
    }
}

/// Records, once the page has laid out, how many charts have at least one drawn line or point
/// with a non-empty box: `<body data-rendered="drawn/charts">`.
const RENDER_CHECK: &str = "<script>window.addEventListener('load',function(){var c=document.querySelectorAll('figure svg');\
var n=0;c.forEach(function(s){var ok=false;s.querySelectorAll('polyline,circle').forEach(function(e){var b=e.getBBox();\
if(b.width>0||b.height>0){ok=true;}});if(ok){n++;}});document.body.setAttribute('data-rendered',n+'/'+c.length);});</script>\n";

fn fmt4(v: Option<f64>) -> String {
    v.map(|v| format!("{v:.4}")).unwrap_or_else(|| "–".into())
}

/// One line of a chart.
struct Series {
    name: &'static str,
    points: Vec<(f64, f64)>,
}

const COLOURS: [&str; 4] = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"];

/// A line chart as inline SVG, with axes, ticks and a legend.
fn svg_chart(title: &str, x_label: &str, series: &[Series], empty: &str) -> String {
    let (w, h, left, right, top, bottom) = (460.0, 280.0, 56.0, 12.0, 28.0, 40.0);
    let all: Vec<(f64, f64)> = series.iter().flat_map(|s| s.points.iter().copied()).collect();
    let mut svg = String::new();
    let _ = write!(
        svg,
        "<figure><svg xmlns=\"http://www.w3.org/2000/svg\" role=\"img\" aria-label=\"{t}\" width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\">\
         <text x=\"{cx}\" y=\"18\" text-anchor=\"middle\" font-size=\"14\" font-weight=\"bold\">{t}</text>",
        t = escape(title),
        cx = w / 2.0
    );
    if all.is_empty() {
        let _ = writeln!(
            svg,
            "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\" fill=\"#888\">{}</text></svg></figure>",
            w / 2.0,
            h / 2.0,
            escape(empty)
        );
        return svg;
    }
    let (mut x0, mut x1) = all.iter().fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.0), b.max(p.0)));
    let (mut y0, mut y1) = all.iter().fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.1), b.max(p.1)));
    y0 = y0.min(0.0);
    if x1 <= x0 {
        x0 -= 1.0;
        x1 += 1.0;
    }
    if y1 <= y0 {
        y1 = y0 + 1.0;
    }
    let px = |x: f64| left + (x - x0) / (x1 - x0) * (w - left - right);
    let py = |y: f64| h - bottom - (y - y0) / (y1 - y0) * (h - top - bottom);
    let _ = write!(
        svg,
        "<line x1=\"{l}\" y1=\"{b}\" x2=\"{r}\" y2=\"{b}\" stroke=\"#444\"/><line x1=\"{l}\" y1=\"{t}\" x2=\"{l}\" y2=\"{b}\" stroke=\"#444\"/>",
        l = left,
        r = w - right,
        t = top,
        b = h - bottom
    );
    for i in 0..=4 {
        let fy = y0 + (y1 - y0) * f64::from(i) / 4.0;
        let mut fx = x0 + (x1 - x0) * f64::from(i) / 4.0;
        if x1 - x0 >= 4.0 {
            // Rounds are whole numbers.
            fx = fx.round();
        }
        let _ = write!(
            svg,
            "<text x=\"{}\" y=\"{}\" text-anchor=\"end\" font-size=\"10\">{}</text><line x1=\"{l}\" y1=\"{y}\" x2=\"{r}\" y2=\"{y}\" stroke=\"#eee\"/>\
             <text x=\"{}\" y=\"{}\" text-anchor=\"middle\" font-size=\"10\">{}</text>",
            left - 4.0,
            py(fy) + 3.0,
            tick(fy),
            px(fx),
            h - bottom + 14.0,
            tick(fx),
            l = left,
            r = w - right,
            y = py(fy)
        );
    }
    let _ = write!(
        svg,
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\" font-size=\"11\">{}</text>",
        w / 2.0,
        h - 6.0,
        escape(x_label)
    );
    let mut legend_x = left + 10.0;
    for (i, s) in series.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        let points: Vec<String> =
            s.points.iter().map(|&(x, y)| format!("{:.1},{:.1}", px(x), py(y))).collect();
        if points.len() == 1 {
            let (x, y) = s.points[0];
            let _ =
                write!(svg, "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\" fill=\"{colour}\"/>", px(x), py(y));
        } else if !points.is_empty() {
            let _ = write!(
                svg,
                "<polyline fill=\"none\" stroke=\"{colour}\" stroke-width=\"2\" points=\"{}\"/>",
                points.join(" ")
            );
        }
        let _ = write!(
            svg,
            "<rect x=\"{}\" y=\"{}\" width=\"10\" height=\"10\" fill=\"{colour}\"/><text x=\"{}\" y=\"{}\" font-size=\"11\">{}</text>",
            legend_x,
            top + 2.0,
            legend_x + 14.0,
            top + 11.0,
            escape(s.name)
        );
        legend_x += 30.0 + 6.5 * s.name.chars().count() as f64;
    }
    svg.push_str("</svg></figure>\n");
    svg
}

fn tick(v: f64) -> String {
    if v.abs() >= 10.0 || v == v.trunc() {
        format!("{v:.0}")
    } else if v.abs() >= 1.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.3}")
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(round: u64) -> RoundRecord {
        RoundRecord {
            round,
            committed: true,
            failure: None,
            check_ins: 12,
            candidates: 10,
            selected: 8,
            participants: 7,
            dropouts: 1,
            stragglers: 0,
            window_closed: 0,
            loss: Some(0.5),
            hr_at_10: Some(0.1 * round as f64),
            ndcg_at_10: Some(0.05 * round as f64),
            full_hr_at_10: None,
            central_hr_at_10: None,
            central_ndcg_at_10: None,
            federated: None,
            epsilon: Some(0.3 * round as f64),
            clip_norm: None,
            within_clip: None,
            epsilon_rdp: None,
            bytes_up: 1000,
            bytes_down: 5000,
            round_seconds: 0.01,
            train_seconds: 0.005,
            simulated_seconds: 3.0,
            traffic: Default::default(),
            cpu: Default::default(),
        }
    }

    #[test]
    fn html_has_every_chart_and_json_round_trips() {
        let report = SimReport {
            config: serde_json::json!({"clients": 10, "note": "<script>"}),
            rounds: (1..=3).map(record).collect(),
            initial_hr_at_10: Some(0.1),
            initial_ndcg_at_10: Some(0.05),
            popularity_hr_at_10: Some(0.2),
            quality_source: "central".into(),
            total_seconds: 1.0,
            median_round_seconds: 0.01,
            median_train_seconds: 0.005,
            peak_rss_bytes: Some(1 << 20),
            stopped: None,
            attack: None,
            audit: None,
        };
        let html = report.to_html();
        assert_eq!(html.matches("<svg").count(), 6);
        // Quality 2, ε 1, upload 1, download 1, round time 2, fleet 4.
        assert_eq!(html.matches("<polyline").count(), 2 + 1 + 1 + 1 + 2 + 4);
        for needle in
            ["HR@10", "NDCG@10", "Privacy spent", "Upload per round", "Download per round", "Round time"]
        {
            assert!(html.contains(needle), "{needle}");
        }
        assert!(html.contains("<pre id=\"config\">"), "the configuration is shown");
        // Self-contained: nothing to fetch (the SVG namespace is a name, not a request).
        let without_ns = html.replace("xmlns=\"http://www.w3.org/2000/svg\"", "");
        for fetch in ["http://", "https://", " src=", " href=", "@import", "url("] {
            assert!(!without_ns.contains(fetch), "{fetch}");
        }
        assert!(html.contains("&lt;script&gt;"), "configuration text is escaped");
        assert_eq!(html.matches("<script>").count(), 1, "only the render check is a script");
        let dir = tempfile::tempdir().unwrap();
        report.write(dir.path()).unwrap();
        let back: SimReport =
            serde_json::from_slice(&std::fs::read(dir.path().join("results.json")).unwrap()).unwrap();
        assert_eq!(back, report);
        assert!(!std::fs::read_to_string(dir.path().join("results.json")).unwrap().contains("\"attack\""));
    }

    #[test]
    fn an_attack_is_reported_in_json_and_html_with_the_drop() {
        let mut attack = AttackReport {
            fraction: 0.1,
            kind: "scale".into(),
            factor: 100.0,
            attackers: 94,
            crafted_updates: 1000,
            hr_at_10: Some(0.5),
            baseline_hr_at_10: None,
            hr_at_10_drop: None,
        };
        attack.set_baseline(Some(0.55));
        assert!((attack.hr_at_10_drop.unwrap() - 0.05).abs() < 1e-12);
        let report = SimReport {
            config: serde_json::json!({}),
            rounds: (1..=3).map(record).collect(),
            initial_hr_at_10: Some(0.1),
            initial_ndcg_at_10: Some(0.05),
            popularity_hr_at_10: Some(0.2),
            quality_source: "central".into(),
            total_seconds: 1.0,
            median_round_seconds: 0.01,
            median_train_seconds: 0.005,
            peak_rss_bytes: None,
            stopped: None,
            attack: Some(attack),
            audit: None,
        };
        let html = report.to_html();
        assert!(html.contains("<h2>Attack</h2>"), "{html}");
        assert!(html.contains("94 clients") && html.contains("`scale`"));
        assert!(html.contains("against 0.5500 without attackers: HR@10 drop 0.0500"));
        let json: serde_json::Value = serde_json::to_value(&report).unwrap();
        assert_eq!(json["attack"]["kind"], "scale");
        assert_eq!(json["attack"]["attackers"], 94);
        assert_eq!(json["attack"]["baseline_hr_at_10"], 0.55);
    }
}
