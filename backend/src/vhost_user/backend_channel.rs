//! The backend request channel: the socket a frontend gives with SET_BACKEND_REQ_FD (protocol
//! feature BACKEND_REQ), on which the backend sends requests of its own. vublk sends one:
//! VHOST_USER_BACKEND_CONFIG_CHANGE_MSG, after the disk grew (`vublk export resize`), so the
//! frontend re-reads the config space with GET_CONFIG and interrupts the guest.
//!
//! The session fills the channel when the frontend sends it; the worker's main thread sends
//! on it through [`BackendChannel::config_changed`]. The message goes without NEED_REPLY: the
//! sender does not wait for the VMM's answer. The send itself is a 12-byte write on a blocking
//! socket (the vhost crate keeps the socket to itself); it could only block if the VMM left
//! thousands of earlier resizes unread.

use std::io;
use std::sync::{Arc, Mutex};

use vhost::vhost_user::{Backend, VhostUserFrontendReqHandler};

/// One connection's backend request channel, once the frontend has sent it.
#[derive(Clone, Default)]
pub struct BackendChannel(Arc<Mutex<Option<Backend>>>);

impl BackendChannel {
    /// The channel the frontend sent (`None`: it was taken back, RESET_OWNER).
    pub(super) fn set(&self, backend: Option<Backend>) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = backend;
    }

    /// Tells the frontend the config space changed. `Ok(false)`: the frontend gave no channel
    /// (it did not negotiate BACKEND_REQ), so the guest sees the change only when its driver
    /// reads the config space again.
    pub fn config_changed(&self) -> io::Result<bool> {
        let guard = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let Some(backend) = guard.as_ref() else {
            return Ok(false);
        };
        backend.handle_config_change()?;
        Ok(true)
    }
}
