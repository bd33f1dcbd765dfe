//! OS signals mapped to one application event, in one place: SIGTERM and SIGINT ask for a graceful
//! shutdown (finish the step, checkpoint, exit 0); a second one while shutting down exits at once
//! with status 1. Stages never see signals: they watch the [`StopFlag`].

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use signal_hook::consts::{SIGINT, SIGTERM};

/// A shared "please stop" flag, set by signals or by the service itself (`--max-steps`, a fatal
/// stage error).
#[derive(Debug, Clone, Default)]
pub struct StopFlag(Arc<AtomicBool>);

impl StopFlag {
    /// A flag that no signal sets (tests, library use).
    pub fn new() -> StopFlag {
        StopFlag::default()
    }

    /// A flag set by SIGTERM/SIGINT. A second signal after the first terminates the process with
    /// exit status 1 (the operator insisted).
    pub fn from_signals() -> io::Result<StopFlag> {
        let flag = StopFlag::new();
        for sig in [SIGTERM, SIGINT] {
            signal_hook::flag::register_conditional_shutdown(sig, 1, Arc::clone(&flag.0))?;
            signal_hook::flag::register(sig, Arc::clone(&flag.0))?;
        }
        Ok(flag)
    }

    /// Ask everything watching this flag to stop.
    pub fn request(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    /// Whether a stop was requested.
    pub fn is_requested(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clones_share_one_flag() {
        let flag = StopFlag::new();
        let other = flag.clone();
        assert!(!other.is_requested());
        flag.request();
        assert!(other.is_requested());
    }
}
