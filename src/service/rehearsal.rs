//! Learning between arrivals: when the service may train on a replay-only batch
//! (`serve.rehearsal`, `serve.max_rehearsal_steps_per_patch`), and the pause between steps that
//! holds `serve.duty_cycle`.
//!
//! Both are decisions over plain numbers. Whether a replay-only batch is allowed depends only on
//! the mixer's batch counts, which travel in the checkpoint, so a resumed run rehearses exactly
//! as a straight one. The duty cycle only delays steps; it never changes what is trained.

use std::time::{Duration, Instant};

use crate::config::{Rehearsal, ServeConfig};
use crate::stream::BatchCounts;

/// Lateness of a step beyond its allowed start that still counts against the next pause (a
/// sleep that overshot, a short wait for the batch): the duty cycle holds over time instead of
/// drifting below its target. Later starts (the service idled) begin a new account.
const CARRY: Duration = Duration::from_secs(1);

/// Whether replay-only batches may be trained now.
#[derive(Debug, Clone, Copy)]
pub struct RehearsalPolicy {
    mode: Rehearsal,
    max_steps_per_patch: Option<f64>,
}

impl RehearsalPolicy {
    /// The policy of `cfg` (`rehearsal`, `max_rehearsal_steps_per_patch`).
    pub fn new(cfg: &ServeConfig) -> RehearsalPolicy {
        RehearsalPolicy { mode: cfg.rehearsal, max_steps_per_patch: cfg.max_rehearsal_steps_per_patch }
    }

    /// Whether another replay-only batch may be built after `batches`, with `fresh_patches`
    /// patches trained as fresh so far.
    pub fn allows(&self, batches: BatchCounts, fresh_patches: u64) -> bool {
        match self.mode {
            Rehearsal::Off => false,
            Rehearsal::Continuous => self
                .max_steps_per_patch
                .is_none_or(|cap| (batches.replay_only as f64) < cap * fresh_patches as f64),
        }
    }
}

/// Paces steps so that they take `duty` of the wall time: a step that worked `t` is followed by
/// a pause of `t * (1 - duty) / duty`.
#[derive(Debug, Clone)]
pub struct DutyCycle {
    duty: f64,
    /// When the next step may start.
    next: Option<Instant>,
    /// Time spent in steps since the last [`DutyCycle::take_busy`].
    busy: Duration,
}

impl DutyCycle {
    /// A pacer for `duty` in (0, 1] (validated by the config).
    pub fn new(duty: f64) -> DutyCycle {
        DutyCycle { duty, next: None, busy: Duration::ZERO }
    }

    /// A step ran from `started` to `ended`.
    pub fn worked(&mut self, started: Instant, ended: Instant) {
        let busy = ended.saturating_duration_since(started);
        self.busy += busy;
        let from = match self.next {
            Some(next) if started.saturating_duration_since(next) < CARRY => next,
            _ => started,
        };
        self.next = Some(from + busy.div_f64(self.duty));
    }

    /// How long to pause before the next step, at `now`; `None` when it may start.
    pub fn pause_left(&self, now: Instant) -> Option<Duration> {
        let left = self.next?.saturating_duration_since(now);
        (!left.is_zero()).then_some(left)
    }

    /// Time spent in steps since the last call.
    pub fn take_busy(&mut self) -> Duration {
        std::mem::take(&mut self.busy)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(mode: Rehearsal, cap: Option<f64>) -> RehearsalPolicy {
        RehearsalPolicy::new(&ServeConfig {
            rehearsal: mode,
            max_rehearsal_steps_per_patch: cap,
            ..Default::default()
        })
    }

    #[test]
    fn rehearsal_is_off_or_capped_per_fresh_patch() {
        let counts = |replay_only| BatchCounts { fresh: 3, replay_only };
        assert!(policy(Rehearsal::Continuous, None).allows(counts(1_000_000), 1));
        assert!(!policy(Rehearsal::Off, None).allows(counts(0), 100));
        let capped = policy(Rehearsal::Continuous, Some(0.5));
        assert!(capped.allows(counts(4), 10));
        assert!(!capped.allows(counts(5), 10), "0.5 per patch with 10 patches: 5 replay-only steps");
        assert!(!capped.allows(counts(0), 0), "no fresh patch, no budget");
    }

    /// Steps of `work` each, pausing as told but waking up `oversleep` late; returns the busy
    /// share of the wall time over `steps` steps (a simulated clock: no real sleeping).
    fn simulate(duty: f64, work: Duration, oversleep: Duration, steps: usize) -> f64 {
        let start = Instant::now();
        let mut now = start;
        let mut pacer = DutyCycle::new(duty);
        for _ in 0..steps {
            if let Some(left) = pacer.pause_left(now) {
                now += left + oversleep;
            }
            let started = now;
            now += work;
            pacer.worked(started, now);
        }
        pacer.take_busy().as_secs_f64() / (now - start).as_secs_f64()
    }

    #[test]
    fn the_duty_cycle_holds_within_ten_percent_even_when_sleeps_overshoot() {
        for duty in [0.1, 0.25, 0.5, 0.9, 1.0] {
            for oversleep in [Duration::ZERO, Duration::from_millis(15)] {
                let got = simulate(duty, Duration::from_millis(40), oversleep, 1500);
                assert!(
                    (got - duty).abs() <= 0.1 * duty,
                    "duty {duty}, oversleep {oversleep:?}: got {got:.4}"
                );
            }
        }
    }

    #[test]
    fn the_duty_cycle_holds_over_a_few_seconds_of_real_sleeping() {
        let (duty, work) = (0.4, Duration::from_millis(30));
        let mut pacer = DutyCycle::new(duty);
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(3) {
            while let Some(left) = pacer.pause_left(Instant::now()) {
                std::thread::sleep(left.min(Duration::from_millis(100)));
            }
            let started = Instant::now();
            std::thread::sleep(work);
            pacer.worked(started, Instant::now());
        }
        let got = pacer.take_busy().as_secs_f64() / start.elapsed().as_secs_f64();
        assert!((got - duty).abs() <= 0.1 * duty, "busy share {got:.4}, wanted {duty}");
    }

    #[test]
    fn a_full_duty_cycle_never_pauses_and_an_idle_gap_is_not_made_up_for() {
        let mut pacer = DutyCycle::new(1.0);
        let t = Instant::now();
        pacer.worked(t, t + Duration::from_millis(50));
        assert_eq!(pacer.pause_left(t + Duration::from_millis(50)), None);
        let mut half = DutyCycle::new(0.5);
        half.worked(t, t + Duration::from_millis(100));
        assert_eq!(half.pause_left(t + Duration::from_millis(100)), Some(Duration::from_millis(100)));
        // the service idled for a minute: the next step is paced from its own start
        let later = t + Duration::from_secs(60);
        half.worked(later, later + Duration::from_millis(10));
        assert_eq!(half.pause_left(later + Duration::from_millis(10)), Some(Duration::from_millis(10)));
    }
}
