//! The aggregator's shared vocabulary for subjects and message keys: the hashes that name a
//! subject or a message key without a copy of it, and the maps of subjects a batch decides.
//!
//! Contract: this module is a leaf. It imports nothing from the other aggregator modules,
//! so any of them may use it without forming a cycle (the loop, the lanes, the headroom
//! and the store all speak of subjects in these terms).

use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};

use chrono::{DateTime, Utc};

/// Subjects to decide for, each with the API key hash of its latest event.
pub type Subjects = BTreeMap<String, Option<String>>;

/// Subjects whose fresh usage awaits its refresh: the API key hash, and when it is due.
pub type Deferred = BTreeMap<String, (Option<String>, DateTime<Utc>)>;

/// FNV-1a: a fixed, seedless hash, so digests written by one process compare equal in another.
pub struct Fnv1a(u64);

impl Default for Fnv1a {
    fn default() -> Self {
        Fnv1a(0xcbf2_9ce4_8422_2325)
    }
}

impl Hasher for Fnv1a {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
}

/// A message key's hash, to count a batch's distinct subjects.
pub fn key_hash(key: Option<&[u8]>) -> u64 {
    let mut h = Fnv1a::default();
    key.hash(&mut h);
    h.finish()
}

/// A subject as the headroom knows it: a 64-bit hash of its name, so neither the map nor a
/// commit's outcome keeps a copy of the name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubjectKey(pub(crate) u64);

impl SubjectKey {
    pub fn of(subject: &str) -> Self {
        SubjectKey(key_hash(Some(subject.as_bytes())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_subject_key_is_the_hash_of_its_message_key() {
        assert_eq!(SubjectKey::of("s"), SubjectKey(key_hash(Some(b"s"))));
        assert_ne!(key_hash(Some(b"s")), key_hash(None), "a keyless message is told from a subject");
        // FNV-1a of nothing is its offset basis: the hash is seedless.
        assert_eq!(Fnv1a::default().finish(), 0xcbf2_9ce4_8422_2325);
    }
}
