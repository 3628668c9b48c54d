//! A run's names: everything a Tally of its own keeps on the shared servers is named after a
//! random id, so two runs (two tests, or a test and a bench) never meet.

/// Hex digits of a run id: 2^48 ids, so runs started together do not collide.
const ID_LEN: usize = 12;

/// A fresh random run id (lower-case hex), fit for database, topic and group names.
pub fn random_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..ID_LEN].to_string()
}

/// The names of one run: `kind` says what started it (`test`, `bench`) and prefixes every
/// name, `id` tells runs apart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    pub kind: &'static str,
    pub id: String,
}

impl Names {
    /// Names for a new run of `kind`, with a fresh id.
    pub fn new(kind: &'static str) -> Names {
        Names { kind, id: random_id() }
    }

    /// The run's database, the same name on Postgres and ClickHouse: `tally_<kind>_<id>`.
    pub fn database(&self) -> String {
        format!("tally_{}_{}", self.kind, self.id)
    }

    /// A topic of the run: `<kind>.<id>.<name>.v1` (`usage`, `decisions`, ...).
    pub fn topic(&self, name: &str) -> String {
        format!("{}.{}.{name}.v1", self.kind, self.id)
    }

    /// The consumer group of the run's aggregators: `tally-<kind>-ledger-<id>`.
    pub fn group(&self) -> String {
        format!("tally-{}-ledger-{}", self.kind, self.id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_name_carries_the_kind_and_the_id() {
        let names = Names { kind: "bench", id: "0123456789ab".to_string() };
        assert_eq!(names.database(), "tally_bench_0123456789ab");
        assert_eq!(names.topic("usage"), "bench.0123456789ab.usage.v1");
        assert_eq!(names.group(), "tally-bench-ledger-0123456789ab");
    }

    #[test]
    fn ids_are_fresh_lower_case_hex() {
        let (a, b) = (random_id(), random_id());
        assert_ne!(a, b);
        assert_eq!(a.len(), ID_LEN);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()), "{a}");
    }
}
