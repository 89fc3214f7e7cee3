//! Waiting for a condition with a deadline: the only way tests wait.

use std::time::{Duration, Instant};

/// Calls `cond` every `every` until it returns true or `within` has passed; says which.
pub fn poll_until(within: Duration, every: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(every);
    }
}
