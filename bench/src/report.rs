//! Figures: percentiles of one run, medians over repeated runs, the targets from issue #3, and
//! the table and JSON they are printed as.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;

/// The `p`-th percentile (0–100) of `samples` by nearest rank; `NaN` when there are none.
pub fn percentile(samples: &[f64], p: f64) -> f64 {
    if samples.is_empty() {
        return f64::NAN;
    }
    let mut v = samples.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

/// The median of `values` (mean of the middle two for an even count).
pub fn median(values: &[f64]) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// A duration in milliseconds.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The figures of one run of one scenario, in the order they are shown.
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    /// `(name, unit, value)`.
    pub values: Vec<(String, &'static str, f64)>,
}

impl Metrics {
    /// Adds one figure.
    pub fn push(&mut self, name: impl Into<String>, unit: &'static str, value: f64) {
        self.values.push((name.into(), unit, value));
    }

    /// Adds p50, p90, p99 and max of latency samples in milliseconds, named `PREFIX_p50_ms`, ….
    pub fn latency(&mut self, prefix: &str, samples_ms: &[f64]) {
        for (label, p) in [("p50", 50.0), ("p90", 90.0), ("p99", 99.0)] {
            self.push(
                format!("{prefix}{label}_ms"),
                "ms",
                percentile(samples_ms, p),
            );
        }
        self.push(
            format!("{prefix}max_ms"),
            "ms",
            percentile(samples_ms, 100.0),
        );
    }
}

/// One figure over all repeats.
#[derive(Debug, Clone, Serialize)]
pub struct Figure {
    /// The unit.
    pub unit: &'static str,
    /// The median over the repeats.
    pub median: f64,
    /// The smallest value.
    pub min: f64,
    /// The largest value.
    pub max: f64,
    /// Each repeat's value.
    pub runs: Vec<f64>,
}

/// A scenario on a backend, over all its repeats.
#[derive(Debug, Clone, Serialize)]
pub struct ScenarioResult {
    /// The scenario's name.
    pub scenario: String,
    /// `sqlite` or `postgres`.
    pub backend: String,
    /// The sizes it ran with.
    pub params: BTreeMap<String, serde_json::Value>,
    /// How many repeats succeeded.
    pub repeats: usize,
    /// Whether every repeat ran and verified its outcome.
    pub ok: bool,
    /// Why it failed, when it did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Figures by name, in the order shown.
    pub metrics: Vec<(String, Figure)>,
}

impl ScenarioResult {
    /// Folds the repeats of one scenario into medians.
    pub fn fold(
        scenario: &str,
        backend: &str,
        params: BTreeMap<String, serde_json::Value>,
        runs: &[Metrics],
        error: Option<String>,
    ) -> Self {
        let mut metrics: Vec<(String, Figure)> = Vec::new();
        for run in runs {
            for (name, unit, value) in &run.values {
                match metrics.iter_mut().find(|(n, _)| n == name) {
                    Some((_, f)) => f.runs.push(*value),
                    None => metrics.push((
                        name.clone(),
                        Figure {
                            unit,
                            median: 0.0,
                            min: 0.0,
                            max: 0.0,
                            runs: vec![*value],
                        },
                    )),
                }
            }
        }
        for (_, f) in &mut metrics {
            f.median = median(&f.runs);
            f.min = f.runs.iter().copied().fold(f64::INFINITY, f64::min);
            f.max = f.runs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        }
        ScenarioResult {
            scenario: scenario.to_string(),
            backend: backend.to_string(),
            params,
            repeats: runs.len(),
            ok: error.is_none(),
            error,
            metrics,
        }
    }
}

/// Whether a figure must stay below or reach its target.
#[derive(Debug, Clone, Copy, Serialize)]
pub enum Cmp {
    /// The figure must be at most the target.
    #[serde(rename = "<=")]
    AtMost,
    /// The figure must be at least the target.
    #[serde(rename = ">=")]
    AtLeast,
}

/// One target from issue #3.
#[derive(Debug, Clone, Copy)]
pub struct Target {
    /// The scenario.
    pub scenario: &'static str,
    /// The backend it applies to, or both.
    pub backend: Option<&'static str>,
    /// The figure.
    pub metric: &'static str,
    /// The comparison.
    pub cmp: Cmp,
    /// The value.
    pub value: f64,
}

/// The targets of issue #3 (2-core machines, medians of repeated runs).
pub const TARGETS: &[Target] = &[
    Target {
        scenario: "dispatch",
        backend: None,
        metric: "p50_ms",
        cmp: Cmp::AtMost,
        value: 2.0,
    },
    Target {
        scenario: "dispatch",
        backend: None,
        metric: "p99_ms",
        cmp: Cmp::AtMost,
        value: 10.0,
    },
    Target {
        scenario: "throughput",
        backend: Some("postgres"),
        metric: "e2e_jobs_per_s",
        cmp: Cmp::AtLeast,
        value: 5000.0,
    },
    Target {
        scenario: "throughput",
        backend: Some("sqlite"),
        metric: "e2e_jobs_per_s",
        cmp: Cmp::AtLeast,
        value: 3000.0,
    },
    Target {
        scenario: "logs",
        backend: None,
        metric: "multi_mb_per_s",
        cmp: Cmp::AtLeast,
        value: 200.0,
    },
    Target {
        scenario: "logs",
        backend: None,
        metric: "big_mb_per_s",
        cmp: Cmp::AtLeast,
        value: 200.0,
    },
    Target {
        scenario: "logs",
        backend: None,
        metric: "big_server_peak_rss_mib",
        cmp: Cmp::AtMost,
        value: 100.0,
    },
    Target {
        scenario: "live-log",
        backend: None,
        metric: "p99_ms",
        cmp: Cmp::AtMost,
        value: 250.0,
    },
    Target {
        scenario: "idle",
        backend: None,
        metric: "server_rss_mib",
        cmp: Cmp::AtMost,
        value: 256.0,
    },
    Target {
        scenario: "runner",
        backend: None,
        metric: "idle_rss_mib",
        cmp: Cmp::AtMost,
        value: 10.0,
    },
    Target {
        scenario: "peer",
        backend: Some("postgres"),
        metric: "ratio_e2e_rate",
        cmp: Cmp::AtLeast,
        value: 2.0,
    },
];

/// A target checked against a result.
#[derive(Debug, Clone, Serialize)]
pub struct TargetCheck {
    /// The scenario.
    pub scenario: String,
    /// The backend.
    pub backend: String,
    /// The figure.
    pub metric: String,
    /// The comparison.
    pub cmp: Cmp,
    /// The target.
    pub target: f64,
    /// The median measured.
    pub measured: f64,
    /// Whether the target was met.
    pub met: bool,
}

/// The target for a figure, if it has one.
pub fn target_for(scenario: &str, backend: &str, metric: &str) -> Option<Target> {
    TARGETS
        .iter()
        .find(|t| {
            t.scenario == scenario && t.metric == metric && t.backend.is_none_or(|b| b == backend)
        })
        .copied()
}

/// Checks every target that applies to `results`.
pub fn check_targets(results: &[ScenarioResult]) -> Vec<TargetCheck> {
    let mut checks = Vec::new();
    for r in results.iter().filter(|r| r.ok) {
        for (name, fig) in &r.metrics {
            if let Some(t) = target_for(&r.scenario, &r.backend, name) {
                let met = match t.cmp {
                    Cmp::AtMost => fig.median <= t.value,
                    Cmp::AtLeast => fig.median >= t.value,
                };
                checks.push(TargetCheck {
                    scenario: r.scenario.clone(),
                    backend: r.backend.clone(),
                    metric: name.clone(),
                    cmp: t.cmp,
                    target: t.value,
                    measured: fig.median,
                    met,
                });
            }
        }
    }
    checks
}

fn fmt_value(v: f64) -> String {
    if v.is_nan() {
        "-".into()
    } else if v.abs() >= 1000.0 {
        format!("{v:.0}")
    } else if v.abs() >= 100.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// The results as a plain-text table.
pub fn table(results: &[ScenarioResult]) -> String {
    let mut rows: Vec<[String; 8]> = vec![[
        "scenario".into(),
        "backend".into(),
        "figure".into(),
        "median".into(),
        "min".into(),
        "max".into(),
        "unit".into(),
        "target".into(),
    ]];
    for r in results {
        if let Some(err) = &r.error {
            rows.push([
                r.scenario.clone(),
                r.backend.clone(),
                "FAILED".into(),
                String::new(),
                String::new(),
                String::new(),
                String::new(),
                err.lines().next().unwrap_or("").chars().take(120).collect(),
            ]);
        }
        for (name, f) in &r.metrics {
            let target = match target_for(&r.scenario, &r.backend, name) {
                Some(t) => {
                    let (sym, met) = match t.cmp {
                        Cmp::AtMost => ("<=", f.median <= t.value),
                        Cmp::AtLeast => (">=", f.median >= t.value),
                    };
                    format!(
                        "{sym} {} {}",
                        fmt_value(t.value),
                        if met { "met" } else { "MISSED" }
                    )
                }
                None => String::new(),
            };
            rows.push([
                r.scenario.clone(),
                r.backend.clone(),
                name.clone(),
                fmt_value(f.median),
                fmt_value(f.min),
                fmt_value(f.max),
                f.unit.to_string(),
                target,
            ]);
        }
    }
    let mut widths = [0usize; 8];
    for row in &rows {
        for (i, c) in row.iter().enumerate() {
            widths[i] = widths[i].max(c.chars().count());
        }
    }
    let mut out = String::new();
    for (k, row) in rows.iter().enumerate() {
        let line: Vec<String> = row
            .iter()
            .enumerate()
            .map(|(i, c)| {
                if (3..6).contains(&i) {
                    format!("{c:>w$}", w = widths[i])
                } else {
                    format!("{c:<w$}", w = widths[i])
                }
            })
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
        if k == 0 {
            let total: usize = widths.iter().sum::<usize>() + 2 * (widths.len() - 1);
            out.push_str(&"-".repeat(total));
            out.push('\n');
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 50.0);
        assert_eq!(percentile(&v, 99.0), 99.0);
        assert_eq!(percentile(&v, 100.0), 100.0);
        assert_eq!(percentile(&[3.0], 99.0), 3.0);
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
    }
}
