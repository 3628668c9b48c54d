//! Why a message goes to quarantine: the reasons the aggregator writes to the quarantine
//! topic.
//!
//! Contract: a record's `reason` is a [`Reason`], the stable string of its
//! [`QuarantineReason`] (`overflow`, `invalid event`, `late`, ...), followed, for some
//! reasons, by `": "` and words about this message (`late: event time ... is older than
//! ...`). Consumers of the topic match on the stable start ([`QuarantineReason::of`]); the
//! strings never change, since records already written and every reader depend on them.
//! A leaf module: it imports nothing from the other aggregator modules.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The kind of a quarantine reason, with a stable string form ([`QuarantineReason::as_str`],
/// the same through serde and `Display`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum QuarantineReason {
    /// The message had no payload.
    #[serde(rename = "empty message")]
    EmptyMessage,
    /// The payload is not a usage event (JSON, a field, a CloudEvent envelope).
    #[serde(rename = "invalid event")]
    InvalidEvent,
    /// An amount past the bound, or a sum of amounts past a ledger's bound.
    #[serde(rename = "overflow")]
    Overflow,
    /// The event time is older than the lateness window.
    #[serde(rename = "late")]
    Late,
    /// The event time is too far ahead.
    #[serde(rename = "future")]
    Future,
    /// The event id was already counted with a different payload.
    #[serde(rename = "conflict")]
    Conflict,
    /// A correction of an event never counted, already corrected, or of another subject.
    #[serde(rename = "correction")]
    Correction,
    /// The event fails its batch's transaction on its own ([`crate::isolate`]).
    #[serde(rename = "unprocessable")]
    Unprocessable,
    /// The event names a group the configuration in force does not know.
    #[serde(rename = "unknown group")]
    UnknownGroup,
}

impl QuarantineReason {
    /// Every reason, in the order of the enum.
    pub const ALL: [QuarantineReason; 9] = [
        QuarantineReason::EmptyMessage,
        QuarantineReason::InvalidEvent,
        QuarantineReason::Overflow,
        QuarantineReason::Late,
        QuarantineReason::Future,
        QuarantineReason::Conflict,
        QuarantineReason::Correction,
        QuarantineReason::Unprocessable,
        QuarantineReason::UnknownGroup,
    ];

    /// The stable string a record's `reason` starts with.
    pub fn as_str(self) -> &'static str {
        match self {
            QuarantineReason::EmptyMessage => "empty message",
            QuarantineReason::InvalidEvent => "invalid event",
            QuarantineReason::Overflow => "overflow",
            QuarantineReason::Late => "late",
            QuarantineReason::Future => "future",
            QuarantineReason::Conflict => "conflict",
            QuarantineReason::Correction => "correction",
            QuarantineReason::Unprocessable => "unprocessable",
            QuarantineReason::UnknownGroup => "unknown group",
        }
    }

    /// The kind of a record's `reason` string: the reason it is, or starts with before
    /// `": "`. `None` for a string no reason starts.
    pub fn of(reason: &str) -> Option<QuarantineReason> {
        let kind = reason.split_once(": ").map_or(reason, |(kind, _)| kind);
        QuarantineReason::ALL.into_iter().find(|r| r.as_str() == kind)
    }
}

impl fmt::Display for QuarantineReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A record's `reason` as written: its kind, and the words about this message that follow
/// it (`kind: words`) for the reasons that have them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reason {
    pub kind: QuarantineReason,
    pub words: Option<String>,
}

impl Reason {
    /// The reason alone (`overflow`).
    pub fn bare(kind: QuarantineReason) -> Self {
        Reason { kind, words: None }
    }

    /// The reason with words about this message (`late: event time ...`).
    pub fn with_words(kind: QuarantineReason, words: impl Into<String>) -> Self {
        Reason { kind, words: Some(words.into()) }
    }
}

impl From<QuarantineReason> for Reason {
    fn from(kind: QuarantineReason) -> Self {
        Reason::bare(kind)
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.words {
            Some(words) => write!(f, "{}: {words}", self.kind),
            None => f.write_str(self.kind.as_str()),
        }
    }
}

/// Why a string is not a quarantine reason.
#[derive(Debug, thiserror::Error)]
#[error("not a quarantine reason: {0:?}")]
pub struct UnknownReason(String);

impl FromStr for Reason {
    type Err = UnknownReason;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let kind = QuarantineReason::of(s).ok_or_else(|| UnknownReason(s.to_string()))?;
        let words = s.split_once(": ").map(|(_, words)| words.to_string());
        Ok(Reason { kind, words })
    }
}

impl Serialize for Reason {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Reason {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The strings records carry today; readers and stored records depend on them.
    #[test]
    fn every_reason_keeps_its_string() {
        let strings: Vec<&str> = QuarantineReason::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(
            strings,
            ["empty message", "invalid event", "overflow", "late", "future", "conflict", "correction", "unprocessable", "unknown group"]
        );
        for r in QuarantineReason::ALL {
            assert_eq!(serde_json::to_value(r).unwrap(), serde_json::Value::from(r.as_str()), "serde of {r:?}");
            assert_eq!(r.to_string(), r.as_str());
            assert_eq!(serde_json::from_value::<QuarantineReason>(r.as_str().into()).unwrap(), r);
        }
    }

    #[test]
    fn a_reason_with_words_is_written_kind_colon_words_and_read_back() {
        let late =
            Reason::with_words(QuarantineReason::Late, "event time 2026-09-01 00:00:00 UTC is older than the lateness window of 35 days");
        let written = serde_json::to_value(&late).unwrap();
        assert_eq!(written, "late: event time 2026-09-01 00:00:00 UTC is older than the lateness window of 35 days");
        assert_eq!(serde_json::from_value::<Reason>(written).unwrap(), late);
        assert_eq!(serde_json::to_value(Reason::bare(QuarantineReason::EmptyMessage)).unwrap(), "empty message");
        assert_eq!("overflow".parse::<Reason>().unwrap(), Reason::bare(QuarantineReason::Overflow));
    }

    #[test]
    fn the_kind_is_read_from_the_start_of_a_reason_only() {
        assert_eq!(QuarantineReason::of("invalid event: missing field `id`"), Some(QuarantineReason::InvalidEvent));
        assert_eq!(QuarantineReason::of("conflict"), Some(QuarantineReason::Conflict));
        assert_eq!(QuarantineReason::of("lately"), None);
        assert_eq!(QuarantineReason::of("something: late"), None);
        assert!("nothing we write".parse::<Reason>().is_err());
    }
}
