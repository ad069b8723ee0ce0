//! Serving one connected frontend until it goes away.

use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};

use vhost::vhost_user::{BackendReqHandler, Error as VhostUserError};

use super::device::VirtioDevice;
use super::session::Session;

/// Why a connection ended.
#[derive(Debug)]
pub enum ConnectionEnd {
    /// The frontend closed the socket (VM shut down, VMM restarted, or we were told to stop).
    Disconnected,
    /// The socket failed, or the frontend sent something we cannot continue after.
    Failed(VhostUserError),
}

/// Is this error the end of the connection, or one refused request on a healthy one?
fn is_fatal(e: &VhostUserError) -> bool {
    matches!(
        e,
        VhostUserError::Disconnected
            | VhostUserError::PartialMessage
            | VhostUserError::SocketBroken(_)
            | VhostUserError::SocketError(_)
            | VhostUserError::SocketRetry(_)
            | VhostUserError::InvalidSocketFd(_)
            | VhostUserError::NotUnixSocket
            | VhostUserError::NotStreamSocket
            | VhostUserError::IncorrectFds
            | VhostUserError::OversizedMsg
            | VhostUserError::InvalidMessage
            | VhostUserError::FrontendInternalError
    )
}

/// Serves `stream` with a new session of `device` until the frontend disconnects. Every ring
/// is stopped (its in-flight requests completed) before this returns. `on_start` receives a
/// clone of the stream, which another thread may `shutdown()` to end the connection.
pub fn serve_connection<D: VirtioDevice>(
    stream: UnixStream,
    device: Arc<D>,
    on_start: impl FnOnce(UnixStream),
) -> ConnectionEnd {
    if let Ok(clone) = stream.try_clone() {
        on_start(clone);
    }
    let session = Arc::new(Mutex::new(Session::new(device)));
    let mut handler = BackendReqHandler::from_stream(stream, session.clone());
    let end = loop {
        match handler.handle_request() {
            Ok(()) => {}
            Err(VhostUserError::Disconnected) => break ConnectionEnd::Disconnected,
            Err(e) if is_fatal(&e) => break ConnectionEnd::Failed(e),
            // The frontend was told (NACK with REPLY_ACK) and the stream is still in step.
            Err(e) => tracing::warn!("request refused: {e}"),
        }
    };
    session
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .stop_all();
    end
}
