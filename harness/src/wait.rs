//! Polling a condition until a deadline: the one wait loop for what has no
//! event to wait on (a process to exit, a count in /proc, a metrics page).

use std::thread;
use std::time::{Duration, Instant};

/// The first pause between two tries; it doubles up to [`LONGEST_PAUSE`].
const FIRST_PAUSE: Duration = Duration::from_millis(10);
const LONGEST_PAUSE: Duration = Duration::from_millis(100);

/// Calls `probe` until it returns `Ok`, and returns that; once `within` has
/// passed, returns its last `Err` (which says what was seen). `probe` runs
/// at least once, and once more at the deadline.
pub fn poll<T, E>(within: Duration, mut probe: impl FnMut() -> Result<T, E>) -> Result<T, E> {
    let deadline = Instant::now() + within;
    let mut pause = FIRST_PAUSE;
    loop {
        let tried = probe();
        let left = deadline.saturating_duration_since(Instant::now());
        if tried.is_ok() || left.is_zero() {
            return tried;
        }
        thread::sleep(pause.min(left));
        pause = (pause * 2).min(LONGEST_PAUSE);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn returns_the_first_success() {
        let mut tries = 0;
        let got: Result<u32, String> = poll(Duration::from_secs(60), || {
            tries += 1;
            if tries == 3 {
                Ok(tries)
            } else {
                Err(format!("try {tries}"))
            }
        });
        assert_eq!(got, Ok(3));
    }

    #[test]
    fn returns_the_last_failure_at_the_deadline() {
        let mut tries = 0;
        let got: Result<(), u32> = poll(Duration::ZERO, || {
            tries += 1;
            Err(tries)
        });
        assert_eq!(got, Err(1));
    }
}
