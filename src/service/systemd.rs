//! The systemd notify protocol: READY=1 after start-up, STATUS= lines, and WATCHDOG=1 keep-alives
//! from the training loop when the unit sets `WatchdogSec`. Outside systemd (no `NOTIFY_SOCKET`)
//! every call is a no-op.

use std::time::{Duration, Instant};

use sd_notify::NotifyState;

/// Talks to systemd if the process runs under a `Type=notify` unit.
#[derive(Debug)]
pub struct Systemd {
    enabled: bool,
    watchdog_every: Option<Duration>,
    last_ping: Instant,
}

impl Systemd {
    /// Detect the notify socket and the watchdog interval (pings at half of `WatchdogSec`).
    pub fn detect() -> Systemd {
        let enabled = std::env::var_os("NOTIFY_SOCKET").is_some();
        let mut usec = 0u64;
        let watchdog_every = (enabled && sd_notify::watchdog_enabled(false, &mut usec))
            .then(|| Duration::from_micros(usec / 2));
        Systemd { enabled, watchdog_every, last_ping: Instant::now() }
    }

    /// Start-up finished: the unit becomes active.
    pub fn ready(&self) {
        self.send(&[NotifyState::Ready]);
    }

    /// One human-readable status line (`systemctl status` shows it).
    pub fn status(&self, line: &str) {
        self.send(&[NotifyState::Status(line)]);
    }

    /// Shutdown began.
    pub fn stopping(&self) {
        self.send(&[NotifyState::Stopping]);
    }

    /// Keep-alive from the training loop; rate-limited to half the watchdog interval.
    pub fn watchdog(&mut self) {
        let Some(every) = self.watchdog_every else { return };
        if self.last_ping.elapsed() >= every {
            self.send(&[NotifyState::Watchdog]);
            self.last_ping = Instant::now();
        }
    }

    fn send(&self, states: &[NotifyState]) {
        if self.enabled
            && let Err(e) = sd_notify::notify(false, states)
        {
            log::debug!("sd_notify failed: {e}");
        }
    }
}
