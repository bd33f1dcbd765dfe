//! The long-running service (`dinostream serve`): owns the threads, the bounded channels between
//! stages, the stop flag and everything that talks to the operating system (signals, systemd,
//! status files). Stages themselves are plain functions over values.

pub mod signal;
pub mod status;
pub mod systemd;
pub mod publish;
pub mod train;
