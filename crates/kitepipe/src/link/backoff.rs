//! Capped exponential backoff with jitter: the one retry helper.

use std::time::Duration;

use rand::Rng;

/// Delays between retries: doubling from `initial` up to `max`, each drawn
/// uniformly from [delay/2, delay] ("equal jitter") so that many connectors
/// cut off together do not come back in lockstep.
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    initial: Duration,
    max: Duration,
    current: Duration,
    attempt: u32,
}

impl Backoff {
    /// A backoff starting at `initial` and capped at `max`.
    pub(crate) fn new(initial: Duration, max: Duration) -> Backoff {
        Backoff {
            initial,
            max,
            current: initial,
            attempt: 0,
        }
    }

    /// The delay before the next attempt; grows the following one.
    pub(crate) fn next_delay(&mut self) -> Duration {
        let base = self.current;
        self.current = (self.current * 2).min(self.max);
        self.attempt += 1;
        let half = base / 2;
        let jitter = rand::rng().random_range(0..=half.as_millis() as u64);
        half + Duration::from_millis(jitter)
    }

    /// Attempts made since the last reset.
    pub(crate) fn attempt(&self) -> u32 {
        self.attempt
    }

    /// Starts over from `initial` (after a link stayed up).
    pub(crate) fn reset(&mut self) {
        self.current = self.initial;
        self.attempt = 0;
    }
}

/// A random 128-bit token in hex (for demo secrets and ids).
pub(crate) fn random_token() -> String {
    let bytes: [u8; 16] = rand::random();
    kitepipe_proto::message::hex(&bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_stay_jittered_and_cap() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let mut bases = vec![];
        for _ in 0..10 {
            bases.push(backoff.current);
            let delay = backoff.next_delay();
            let base = *bases.last().unwrap();
            assert!(delay >= base / 2 && delay <= base, "{delay:?} vs {base:?}");
        }
        assert_eq!(bases[1], Duration::from_millis(200));
        assert_eq!(*bases.last().unwrap(), Duration::from_secs(2));
        assert_eq!(backoff.attempt(), 10);
        backoff.reset();
        assert_eq!(backoff.current, Duration::from_millis(100));
    }
}
