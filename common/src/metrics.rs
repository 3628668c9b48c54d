//! A small Prometheus registry: counters and gauges with fixed labels, rendered in the text
//! exposition format at `/metrics`. Names follow `tally_<name>_<unit>`.
//!
//! Updating a metric is one atomic operation; rendering takes a lock on the list only.

use std::fmt::Write;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};

#[derive(Clone, Copy)]
enum Kind {
    Counter,
    Gauge,
}

struct Entry {
    name: &'static str,
    help: &'static str,
    labels: String,
    kind: Kind,
    value: Arc<AtomicI64>,
}

/// The set of metrics one service exposes.
#[derive(Clone, Default)]
pub struct Registry {
    entries: Arc<Mutex<Vec<Entry>>>,
}

/// A monotonically increasing count.
#[derive(Clone)]
pub struct Counter(Arc<AtomicI64>);

impl Counter {
    pub fn inc(&self) {
        self.add(1);
    }
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n as i64, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed) as u64
    }
}

/// A value that goes up and down.
#[derive(Clone)]
pub struct Gauge(Arc<AtomicI64>);

impl Gauge {
    pub fn set(&self, v: i64) {
        self.0.store(v, Ordering::Relaxed);
    }
    pub fn get(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
    }
}

fn render_labels(labels: &[(&str, &str)]) -> String {
    if labels.is_empty() {
        return String::new();
    }
    let inner: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{}\"", v.replace('\\', "\\\\").replace('"', "\\\""))).collect();
    format!("{{{}}}", inner.join(","))
}

impl Registry {
    fn register(&self, name: &'static str, help: &'static str, labels: &[(&str, &str)], kind: Kind) -> Arc<AtomicI64> {
        let value = Arc::new(AtomicI64::new(0));
        let entry = Entry { name, help, labels: render_labels(labels), kind, value: value.clone() };
        if let Ok(mut entries) = self.entries.lock() {
            entries.push(entry);
        }
        value
    }

    pub fn counter(&self, name: &'static str, help: &'static str, labels: &[(&str, &str)]) -> Counter {
        Counter(self.register(name, help, labels, Kind::Counter))
    }

    pub fn gauge(&self, name: &'static str, help: &'static str, labels: &[(&str, &str)]) -> Gauge {
        Gauge(self.register(name, help, labels, Kind::Gauge))
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let Ok(entries) = self.entries.lock() else { return out };
        let mut described: Vec<&str> = Vec::new();
        for e in entries.iter() {
            if !described.contains(&e.name) {
                described.push(e.name);
                let kind = match e.kind {
                    Kind::Counter => "counter",
                    Kind::Gauge => "gauge",
                };
                let _ = writeln!(out, "# HELP {} {}\n# TYPE {} {}", e.name, e.help, e.name, kind);
            }
            let _ = writeln!(out, "{}{} {}", e.name, e.labels, e.value.load(Ordering::Relaxed));
        }
        out
    }
}

/// A counter of elapsed time in microseconds with its count, for `_seconds`-style averages.
#[derive(Clone)]
pub struct Timing {
    pub micros: Counter,
    pub count: Counter,
}

impl Timing {
    pub fn new(registry: &Registry, micros_name: &'static str, count_name: &'static str, help: &'static str) -> Self {
        Timing { micros: registry.counter(micros_name, help, &[]), count: registry.counter(count_name, help, &[]) }
    }
    pub fn record(&self, elapsed: std::time::Duration) {
        self.micros.add(elapsed.as_micros() as u64);
        self.count.inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_help_type_and_labelled_values() {
        let r = Registry::default();
        let a = r.counter("tally_x_total", "things", &[("status", "ok")]);
        let b = r.counter("tally_x_total", "things", &[("status", "bad\"q")]);
        let g = r.gauge("tally_depth", "depth", &[]);
        a.add(3);
        b.inc();
        g.set(-2);
        let text = r.render();
        assert_eq!(text.matches("# TYPE tally_x_total counter").count(), 1);
        assert!(text.contains("tally_x_total{status=\"ok\"} 3\n"));
        assert!(text.contains("tally_x_total{status=\"bad\\\"q\"} 1\n"));
        assert!(text.contains("tally_depth -2\n"));
    }
}
