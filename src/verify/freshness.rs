//! How current the index is: since when each watched scope's watch has been failing without
//! recovering. A watch that works but sees no change is current; one that fails is not, from its
//! first failure until a list completes or an event arrives again.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

#[derive(Debug, Default)]
pub struct Freshness {
    /// Scope number → when its watch started failing.
    failing: Mutex<HashMap<usize, Instant>>,
}

impl Freshness {
    /// A list or watch of `scope` failed; it counts as failing from its first failure on.
    pub fn failed(&self, scope: usize) {
        self.failing.lock().expect("poisoned").entry(scope).or_insert_with(Instant::now);
    }

    /// `scope`'s watch delivered a complete list or an event: its part of the index is current.
    pub fn current(&self, scope: usize) {
        self.failing.lock().expect("poisoned").remove(&scope);
    }

    /// How long the longest-failing scope has been failing; `None` if every watch works.
    pub fn failing_for(&self) -> Option<Duration> {
        self.failing.lock().expect("poisoned").values().map(Instant::elapsed).max()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failing_from_the_first_failure_until_current() {
        let f = Freshness::default();
        assert_eq!(f.failing_for(), None);
        f.failed(0);
        let first = f.failing_for().unwrap();
        // A later failure does not restart the count; another scope's neither hides it.
        f.failed(0);
        f.failed(1);
        assert!(f.failing_for().unwrap() >= first);
        f.current(0);
        assert!(f.failing_for().is_some(), "scope 1 still fails");
        f.current(1);
        assert_eq!(f.failing_for(), None);
    }
}
