//! The backend request channel, as QEMU sets it up: a socket pair, one end sent with
//! SET_BACKEND_REQ_FD (protocol feature BACKEND_REQ), the other read for the backend's own
//! requests (VHOST_USER_BACKEND_CONFIG_CHANGE_MSG after a resize).

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use vhost::vhost_user::VhostUserFrontend;

use super::{Session, SessionError};

/// A request the backend sent on its channel: the header's fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackendRequest {
    /// The request code (VHOST_USER_BACKEND_CONFIG_CHANGE_MSG is 2).
    pub code: u32,
    pub flags: u32,
    /// Payload bytes (read and dropped).
    pub size: u32,
}

/// VHOST_USER_BACKEND_CONFIG_CHANGE_MSG.
pub const CONFIG_CHANGE_MSG: u32 = 2;

impl Session {
    /// Sends SET_BACKEND_REQ_FD with one end of a new socket pair (BACKEND_REQ must have been
    /// acked) and keeps the other.
    pub fn open_backend_channel(&mut self) -> Result<(), SessionError> {
        let (ours, theirs) = UnixStream::pair().map_err(SessionError::Socket)?;
        self.frontend
            .set_backend_request_fd(&theirs)
            .map_err(|source| SessionError::Vhost {
                step: "SET_BACKEND_REQ_FD".into(),
                source,
            })?;
        self.backend_channel = Some(ours);
        Ok(())
    }

    /// The backend's next request on its channel, or `None` if none came within `timeout`. No
    /// reply is sent (vublk does not ask for one).
    pub fn recv_backend_request(
        &mut self,
        timeout: Duration,
    ) -> Result<Option<BackendRequest>, SessionError> {
        let channel = self.backend_channel.as_mut().ok_or_else(|| {
            SessionError::Socket(std::io::Error::other("no backend channel was opened"))
        })?;
        channel
            .set_read_timeout(Some(timeout))
            .map_err(SessionError::Socket)?;
        let mut header = [0u8; 12];
        match channel.read_exact(&mut header) {
            Ok(()) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Ok(None)
            }
            Err(e) => return Err(SessionError::Socket(e)),
        }
        let field = |i: usize| u32::from_le_bytes(header[i..i + 4].try_into().unwrap());
        let request = BackendRequest {
            code: field(0),
            flags: field(4),
            size: field(8),
        };
        let mut payload = vec![0u8; request.size as usize];
        channel
            .read_exact(&mut payload)
            .map_err(SessionError::Socket)?;
        Ok(Some(request))
    }
}
