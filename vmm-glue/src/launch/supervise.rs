//! Watching the pair once both run: whichever ends first (vublk, the VMM, or vmm-glue by a
//! signal), the rest is stopped.

use std::os::fd::AsFd;
use std::process::ExitStatus;

use super::child::{poll_readable, Child};
use super::signals::StopSignals;
use super::LaunchError;

/// What ended the launch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// The VMM exited on its own.
    Vmm(ExitStatus),
    /// vublk exited while the VMM was running.
    Vublk(ExitStatus),
    /// vmm-glue was asked to stop (SIGINT, SIGTERM, SIGHUP).
    Signal(i32),
}

/// Waits until one of the three happens. The VMM is looked at first, so a VMM and a vublk that
/// end together (a Ctrl-C reaching both) count as the VMM ending.
pub fn watch(
    vmm: &mut Child,
    vublk: &mut Child,
    signals: &StopSignals,
) -> Result<Ended, LaunchError> {
    let setup = LaunchError::Setup;
    loop {
        if let Some(st) = vmm.try_wait().map_err(setup)? {
            return Ok(Ended::Vmm(st));
        }
        if let Some(sig) = signals.take().map_err(setup)? {
            return Ok(Ended::Signal(sig));
        }
        if let Some(st) = vublk.try_wait().map_err(setup)? {
            return Ok(Ended::Vublk(st));
        }
        poll_readable(&[vmm.as_fd(), vublk.as_fd(), signals.as_fd()], None).map_err(setup)?;
    }
}
