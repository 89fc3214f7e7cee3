//! Restart backoff per container (CrashLoopBackOff): the first restart is immediate, then a
//! container that exits again waits 10s, 20s, 40s, ... up to 5 minutes after its last exit.
//! A container that stays quiet for twice the cap starts over.

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

pub const INITIAL: Duration = Duration::from_secs(10);
pub const MAX: Duration = Duration::from_secs(300);

#[derive(Debug, Clone, Copy)]
struct Entry {
    delay: Duration,
    updated: SystemTime,
}

/// Backoff state of the containers of one pod, keyed by container name.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    entries: HashMap<String, Entry>,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff::new(INITIAL, MAX)
    }
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Backoff {
        Backoff {
            initial,
            max,
            entries: HashMap::new(),
        }
    }

    /// How long `key`, which exited at `finished_at`, must still wait before its restart;
    /// `None` if it may restart now.
    pub fn remaining(
        &self,
        key: &str,
        finished_at: SystemTime,
        now: SystemTime,
    ) -> Option<Duration> {
        let entry = self.entries.get(key)?;
        if now.duration_since(entry.updated).unwrap_or_default() > self.max * 2 {
            return None;
        }
        let until = finished_at + entry.delay;
        until.duration_since(now).ok().filter(|d| !d.is_zero())
    }

    /// Records a restart of `key` at `now`: the next exit waits twice as long (capped).
    pub fn restarted(&mut self, key: &str, now: SystemTime) {
        let delay = match self.entries.get(key) {
            Some(e) if now.duration_since(e.updated).unwrap_or_default() <= self.max * 2 => {
                (e.delay * 2).min(self.max)
            }
            _ => self.initial,
        };
        self.entries.insert(
            key.to_owned(),
            Entry {
                delay,
                updated: now,
            },
        );
    }

    /// The delay the next exit of `key` will wait, if it has restarted before.
    pub fn current(&self, key: &str) -> Option<Duration> {
        self.entries.get(key).map(|e| e.delay)
    }

    /// Forgets `key` (the pod or container is gone).
    pub fn forget(&mut self, key: &str) {
        self.entries.remove(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000 + secs)
    }

    #[test]
    fn first_restart_is_immediate_then_delays_double_to_the_cap() {
        let mut b = Backoff::default();
        assert_eq!(
            b.remaining("c", t(0), t(0)),
            None,
            "first exit restarts at once"
        );
        let mut now = 0;
        let mut seen = Vec::new();
        for _ in 0..8 {
            b.restarted("c", t(now));
            // It crashes at once again.
            let exit = now;
            let wait = b.remaining("c", t(exit), t(exit)).expect("in backoff");
            seen.push(wait.as_secs());
            assert_eq!(b.remaining("c", t(exit), t(exit) + wait), None);
            assert!(
                b.remaining("c", t(exit), t(exit) + wait - Duration::from_secs(1))
                    .is_some()
            );
            now = exit + wait.as_secs();
        }
        assert_eq!(seen, [10, 20, 40, 80, 160, 300, 300, 300]);
    }

    #[test]
    fn quiet_for_twice_the_cap_starts_over_and_keys_are_separate() {
        let mut b = Backoff::default();
        b.restarted("a", t(0));
        b.restarted("a", t(1));
        assert_eq!(b.current("a"), Some(Duration::from_secs(20)));
        assert_eq!(b.current("b"), None);
        assert_eq!(b.remaining("b", t(1), t(1)), None);
        // Ran for 11 minutes, then exited: no wait, and the next delay is the initial one.
        assert_eq!(b.remaining("a", t(661), t(661)), None);
        b.restarted("a", t(661));
        assert_eq!(b.current("a"), Some(INITIAL));
        b.forget("a");
        assert_eq!(b.current("a"), None);
    }
}
