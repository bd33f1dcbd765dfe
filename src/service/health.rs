//! Checkpoint health: a checkpoint that cannot be written (state disk full, read-only, failing)
//! degrades the service instead of ending it.
//!
//! The partial checkpoint is removed ([`super::checkpoints::save`] does that), the failure is
//! reported (status.json, `STATUS=`, the metrics endpoint, one warning per attempt), training goes
//! on and the checkpoint is retried with a growing pause between attempts. Once
//! `serve.pause_after_unsaved_steps` steps were trained since the last durable checkpoint,
//! training pauses (the loop keeps answering signals and the watchdog) until a checkpoint is
//! written again, so that work that cannot be saved does not pile up. A successful checkpoint ends
//! all of this by itself.

use std::time::{Duration, Instant};

/// The first retry comes this long after a failure; each further failure doubles the wait.
const FIRST_RETRY: Duration = Duration::from_secs(2);
/// The longest wait between two attempts.
const MAX_RETRY: Duration = Duration::from_secs(300);

/// Whether checkpoints are being written, and when to try again if not.
#[derive(Debug, Default)]
pub struct CheckpointHealth {
    /// Failed attempts since the last successful checkpoint.
    failures: u32,
    /// The last failure, as logged.
    error: Option<String>,
    /// The next attempt is not made before this.
    retry_at: Option<Instant>,
    /// Training is paused (logged once per pause).
    paused: bool,
}

impl CheckpointHealth {
    /// A checkpoint at `step` failed with `error`; `durable` is the step of the last checkpoint
    /// that was written.
    pub fn failed(&mut self, step: u64, durable: u64, error: &anyhow::Error) {
        self.failures += 1;
        let wait = FIRST_RETRY.saturating_mul(1 << (self.failures - 1).min(16)).min(MAX_RETRY);
        self.retry_at = Some(Instant::now() + wait);
        let error = format!("{error:#}");
        log::warn!(
            "checkpoint of step {step} failed ({} time(s) in a row): {error}; training goes on, the last durable checkpoint is step {durable}; retrying in {} s (free space in the state folder, or make it writable)",
            self.failures,
            wait.as_secs()
        );
        self.error = Some(error);
    }

    /// A checkpoint was written: back to normal.
    pub fn succeeded(&mut self, step: u64) {
        if self.failures > 0 {
            log::info!(
                "checkpoint of step {step} written after {} failed attempt(s); the service is healthy again",
                self.failures
            );
        }
        *self = CheckpointHealth::default();
    }

    /// When failing: whether the next attempt may be made now. `None` when healthy.
    pub fn retry_due(&self) -> Option<bool> {
        self.retry_at.map(|at| Instant::now() >= at)
    }

    /// Whether training must pause with `unsaved` steps since the last durable checkpoint
    /// (only while checkpoints fail). Logs the pause once.
    pub fn must_pause(&mut self, unsaved: u64, limit: u64) -> bool {
        let pause = self.failures > 0 && unsaved >= limit;
        if pause && !self.paused {
            log::warn!(
                "training paused: {unsaved} step(s) since the last durable checkpoint (serve.pause_after_unsaved_steps = {limit}) and checkpoints keep failing; it resumes once a checkpoint is written"
            );
        }
        self.paused = pause;
        pause
    }

    /// Whether training is paused now.
    pub fn paused(&self) -> bool {
        self.paused
    }

    /// Failed attempts since the last successful checkpoint (0 when healthy).
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// The last failure, while failing.
    pub fn error(&self) -> Option<&str> {
        self.error.as_deref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_back_off_pause_training_past_the_limit_and_a_success_clears_them() {
        let mut h = CheckpointHealth::default();
        assert_eq!(h.retry_due(), None);
        assert!(!h.must_pause(5000, 10), "a healthy service never pauses");
        h.failed(12, 10, &anyhow::anyhow!("No space left on device"));
        assert_eq!(h.retry_due(), Some(false), "the retry waits");
        assert!(!h.must_pause(5, 10));
        assert!(h.must_pause(10, 10) && h.paused());
        let first = h.retry_at.unwrap();
        h.failed(12, 10, &anyhow::anyhow!("No space left on device"));
        assert!(h.retry_at.unwrap() > first + Duration::from_secs(1), "the second wait is longer");
        assert_eq!((h.failures(), h.error()), (2, Some("No space left on device")));
        h.succeeded(14);
        assert_eq!((h.failures(), h.retry_due(), h.paused()), (0, None, false));
    }
}
