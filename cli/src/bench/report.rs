//! The bench report: one [`Section`] per measurement, printed as a table and written as JSON.
//!
//! Every section has the same shape, so readers (and `tests/it/bench.rs`) need no per-section
//! code: `figures` (absolute numbers, units in the name), `ratios` (each figure set against a
//! baseline measured in the same run), `targets` (the targets, met or not) and
//! `notes` (what was measured and how, in words).

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;

/// One measurement of the bench.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Section {
    pub figures: BTreeMap<String, f64>,
    pub ratios: BTreeMap<String, f64>,
    pub targets: Vec<Target>,
    pub notes: Vec<String>,
}

/// A target from the issue and whether this run met it.
#[derive(Debug, Clone, Serialize)]
pub struct Target {
    pub what: String,
    pub met: bool,
}

impl Section {
    pub fn figure(&mut self, name: &str, value: f64) -> &mut Self {
        self.figures.insert(name.to_string(), round(value));
        self
    }

    /// `value / baseline`; left out (with a note) when the baseline is not positive.
    pub fn ratio(&mut self, name: &str, value: f64, baseline: f64) -> &mut Self {
        if baseline > 0.0 && value.is_finite() {
            self.ratios.insert(name.to_string(), round(value / baseline));
        } else {
            self.notes.push(format!("ratio {name} left out: baseline was {baseline}"));
        }
        self
    }

    pub fn target(&mut self, what: &str, met: bool) -> &mut Self {
        self.targets.push(Target { what: what.to_string(), met });
        self
    }

    pub fn note(&mut self, note: impl Into<String>) -> &mut Self {
        self.notes.push(note.into());
        self
    }

    /// Adds `<prefix>_p50_ms`, `_p99_ms` and `_max_ms` of `samples`.
    pub fn latencies(&mut self, prefix: &str, samples: &Latencies) -> &mut Self {
        self.figure(&format!("{prefix}_p50_ms"), samples.p50_ms());
        self.figure(&format!("{prefix}_p99_ms"), samples.p99_ms());
        self.figure(&format!("{prefix}_max_ms"), samples.max_ms())
    }
}

/// Four significant decimals are plenty and keep the JSON readable.
fn round(v: f64) -> f64 {
    if !v.is_finite() {
        return 0.0;
    }
    (v * 10_000.0).round() / 10_000.0
}

/// Latency samples; percentiles by nearest rank.
#[derive(Debug, Clone, Default)]
pub struct Latencies {
    micros: Vec<u64>,
}

impl Latencies {
    pub fn push(&mut self, d: Duration) {
        self.micros.push(u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
    }

    pub fn push_micros(&mut self, us: u64) {
        self.micros.push(us);
    }

    pub fn extend(&mut self, other: Latencies) {
        self.micros.extend(other.micros);
    }

    pub fn len(&self) -> usize {
        self.micros.len()
    }

    pub fn is_empty(&self) -> bool {
        self.micros.is_empty()
    }

    /// The `q`-quantile (0..=1) in milliseconds; 0 without samples.
    pub fn quantile_ms(&self, q: f64) -> f64 {
        if self.micros.is_empty() {
            return 0.0;
        }
        let mut sorted = self.micros.clone();
        sorted.sort_unstable();
        let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
        sorted[rank - 1] as f64 / 1000.0
    }

    pub fn p50_ms(&self) -> f64 {
        self.quantile_ms(0.50)
    }

    pub fn p99_ms(&self) -> f64 {
        self.quantile_ms(0.99)
    }

    pub fn max_ms(&self) -> f64 {
        self.quantile_ms(1.0)
    }
}

/// The whole report.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub quick: bool,
    pub started_at: String,
    pub seconds: f64,
    pub machine: Machine,
    /// Sections in the order they ran: broker, pipeline, decision_latency, memory, check,
    /// ingest, history.
    pub sections: BTreeMap<String, Section>,
    /// Sections in run order (for the table).
    #[serde(skip)]
    pub order: Vec<String>,
}

/// What the bench ran on.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub cpus: usize,
    pub cpu_model: String,
    pub memory_gib: f64,
    pub load_average_at_start: String,
    /// The machine's own speed, measured at the start of the run.
    pub calibration: super::calibrate::Calibration,
}

impl Machine {
    pub fn detect() -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
            .unwrap_or_else(|| "unknown".into());
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let memory_kib = meminfo
            .lines()
            .find(|l| l.starts_with("MemTotal:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0);
        let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
        Machine {
            cpus: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            cpu_model,
            memory_gib: round(memory_kib / 1024.0 / 1024.0),
            load_average_at_start: load.split_whitespace().take(3).collect::<Vec<_>>().join(" "),
            calibration: Default::default(),
        }
    }
}

impl Report {
    pub fn add(&mut self, name: &str, section: Section) {
        self.order.push(name.to_string());
        self.sections.insert(name.to_string(), section);
    }

    /// The report as a plain-text table.
    pub fn table(&self) -> String {
        let mut out = String::new();
        out.push_str(&format!(
            "tally bench{} on {} CPUs ({}), {:.1} GiB, load {} at start; {:.0} s\n",
            if self.quick { " --quick" } else { "" },
            self.machine.cpus,
            self.machine.cpu_model,
            self.machine.memory_gib,
            self.machine.load_average_at_start,
            self.seconds
        ));
        let c = &self.machine.calibration;
        out.push_str(&format!(
            "machine speed: SHA-256 {:.0} MiB/s on one thread; Postgres sums 10M integers in {:.0} ms, inserts {:.0} rows/s\n",
            c.cpu_sha256_mib_per_s, c.postgres_sum_ms, c.postgres_insert_rows_per_s
        ));
        for name in &self.order {
            let Some(section) = self.sections.get(name) else { continue };
            out.push_str(&format!("\n== {name}\n"));
            for (k, v) in &section.figures {
                out.push_str(&format!("  {k:<40} {v:>14.2}\n"));
            }
            for (k, v) in &section.ratios {
                out.push_str(&format!("  ratio {k:<34} {v:>14.3}\n"));
            }
            for t in &section.targets {
                out.push_str(&format!("  target {:<33} {:>14}\n", t.what, if t.met { "met" } else { "MISSED" }));
            }
            for n in &section.notes {
                out.push_str(&format!("  - {n}\n"));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_by_nearest_rank() {
        let mut l = Latencies::default();
        for ms in 1..=100u64 {
            l.push_micros(ms * 1000);
        }
        assert_eq!(l.p50_ms(), 50.0);
        assert_eq!(l.p99_ms(), 99.0);
        assert_eq!(l.max_ms(), 100.0);
        assert_eq!(Latencies::default().p99_ms(), 0.0);
    }

    #[test]
    fn a_ratio_without_a_baseline_becomes_a_note() {
        let mut s = Section::default();
        s.ratio("x", 10.0, 0.0).ratio("y", 10.0, 4.0);
        assert_eq!(s.ratios.len(), 1);
        assert_eq!(s.ratios["y"], 2.5);
        assert_eq!(s.notes.len(), 1);
    }
}
