//! Serving one connected frontend until it goes away.
//!
//! What a connection logs (a refused request, its end) goes through the VMM's log budget
//! ([`vmm_line!`]): a VMM can send bad requests, or connect and disconnect, in a loop.

use std::io;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use vhost::vhost_user::{BackendReqHandler, Error as VhostUserError};

use super::backend_channel::BackendChannel;
use super::device::VirtioDevice;
use super::session::Session;
use crate::ratelimit::vmm_line;

/// Why a connection ended.
#[derive(Debug)]
pub enum ConnectionEnd {
    /// The frontend closed the socket (VM shut down, VMM restarted, or we were told to stop).
    Disconnected,
    /// The socket failed, or the frontend sent something we cannot continue after.
    Failed(VhostUserError),
}

/// Is this error the end of the connection, or one refused request on a healthy one?
pub fn is_fatal(e: &VhostUserError) -> bool {
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
/// clone of the stream, which another thread may `shutdown()` to end the connection, and the
/// session's backend request channel.
pub fn serve_connection<D: VirtioDevice>(
    stream: UnixStream,
    device: Arc<D>,
    on_start: impl FnOnce(UnixStream, BackendChannel),
) -> ConnectionEnd {
    let session = Session::new(device);
    if let Ok(clone) = stream.try_clone() {
        on_start(clone, session.backend_channel());
    }
    let session = Arc::new(Mutex::new(session));
    let mut handler = BackendReqHandler::from_stream(stream, session.clone());
    let end = loop {
        let result = handler.handle_request();
        // Taken after every request: the vhost crate answers some refusals itself (an empty
        // GET_CONFIG reply) and returns Ok.
        let (explained, end_connection) = {
            let mut session = session.lock().unwrap_or_else(|e| e.into_inner());
            (session.take_explained(), session.take_end_connection())
        };
        match result {
            Ok(()) => {}
            Err(e) if end_connection => break ConnectionEnd::Failed(e),
            Err(VhostUserError::Disconnected) => break ConnectionEnd::Disconnected,
            Err(e) if is_fatal(&e) => break ConnectionEnd::Failed(e),
            // The frontend was told (NACK with REPLY_ACK) and the stream is still in step. The
            // session has logged why, unless the vhost crate refused it before reaching us.
            Err(e) if explained => tracing::debug!("request refused: {e}"),
            Err(e) => vmm_line!(warn, "request refused: {e}"),
        }
    };
    session
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .disconnected();
    end
}

/// A connection served on a thread of its own (`vublk-conn<id>`), which another thread can end.
pub struct ConnectionThread {
    stream: Arc<Mutex<Option<(UnixStream, BackendChannel)>>>,
    thread: JoinHandle<()>,
}

impl ConnectionThread {
    /// Serves `stream` with `device` on a new thread; `on_end` runs on that thread once every
    /// ring has stopped.
    pub fn spawn<D: VirtioDevice>(
        id: u64,
        export: &str,
        stream: UnixStream,
        device: Arc<D>,
        on_end: impl FnOnce() + Send + 'static,
    ) -> io::Result<ConnectionThread> {
        let shared = Arc::new(Mutex::new(None));
        let slot = shared.clone();
        let export = export.to_string();
        let thread = std::thread::Builder::new()
            .name(format!("vublk-conn{id}"))
            .spawn(move || {
                let _span = tracing::info_span!("conn", id, export = %export).entered();
                let end = serve_connection(stream, device, |clone, channel| {
                    *slot.lock().unwrap_or_else(|e| e.into_inner()) = Some((clone, channel));
                });
                match end {
                    ConnectionEnd::Disconnected => {
                        vmm_line!(info, "frontend disconnected; device stopped")
                    }
                    ConnectionEnd::Failed(e) => {
                        vmm_line!(warn, "connection ended: {e}; device stopped")
                    }
                }
                on_end();
            })?;
        Ok(ConnectionThread {
            stream: shared,
            thread,
        })
    }

    /// Ends the connection as if the frontend had closed it.
    pub fn shutdown(&self) {
        if let Some(stream) = self
            .stream
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            let _ = stream.0.shutdown(std::net::Shutdown::Both);
        }
    }

    /// Tells the frontend the config space changed (see [`BackendChannel::config_changed`]).
    pub fn config_changed(&self) -> io::Result<bool> {
        let channel = self
            .stream
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|s| s.1.clone());
        match channel {
            Some(channel) => channel.config_changed(),
            None => Ok(false),
        }
    }

    /// Waits for the thread (after it ended, or after `shutdown`).
    pub fn join(self) {
        let _ = self.thread.join();
    }
}
