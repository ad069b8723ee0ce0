//! `--single-process`: the daemon serves one export itself, one frontend at a time, with no
//! supervisor and no workers. Its main thread waits on the signalfd, the listening socket and
//! a "done" eventfd; a connection thread serves the frontend; SIGINT or SIGTERM stops it
//! cleanly.

use std::io;
use std::os::unix::net::UnixStream;
use std::sync::Arc;

use thiserror::Error;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::endpoint::{AcceptFailure, Endpoint, EndpointError, Listener, SocketAccess};
use crate::event_loop::{self, EventLoop, Token};
use crate::signals::Signals;
use crate::vhost_user::{ConnectionThread, VirtioDevice};

#[derive(Debug, Error)]
pub enum SingleProcessError {
    #[error(transparent)]
    Endpoint(#[from] EndpointError),
    #[error("cannot set up the event loop")]
    EventLoop(#[source] io::Error),
    #[error("cannot serve the connection on the inherited fd")]
    Connected(#[source] io::Error),
    #[error("waiting for events failed")]
    Wait(#[source] io::Error),
}

/// What the main thread waits on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Event {
    /// SIGINT or SIGTERM.
    Signal,
    /// A frontend is connecting (watched only while none is being served).
    Listener,
    /// The connection thread ended.
    Done,
}

impl Token for Event {
    fn to_raw(self) -> u64 {
        event_loop::pack(self as u8, 0)
    }

    fn from_raw(raw: u64) -> Option<Event> {
        match event_loop::unpack(raw) {
            (0, 0) => Some(Event::Signal),
            (1, 0) => Some(Event::Listener),
            (2, 0) => Some(Event::Done),
            _ => None,
        }
    }
}

/// Serves `device` on `endpoint` until a signal arrives (or, for a connected fd, until that
/// connection ends).
pub fn run<D: VirtioDevice>(
    endpoint: Endpoint,
    access: SocketAccess,
    device: Arc<D>,
) -> Result<(), SingleProcessError> {
    // Block the signals before any thread exists, so every thread inherits the mask and they
    // arrive only through the signalfd.
    let signals = Signals::block_and_watch().map_err(SingleProcessError::EventLoop)?;
    // A socket systemd passed (LISTEN_FDS) is served by the path it is bound to, as in the
    // supervisor; an `--fd N` is served as that option says.
    let named: Vec<i32> = match endpoint {
        Endpoint::Fd(fd) => vec![fd],
        Endpoint::Path(_) => Vec::new(),
    };
    crate::endpoint::inherited::take_from_environment(&named);
    let listener = endpoint.open(access)?;
    crate::endpoint::inherited::notify_ready();
    let done = EventFd::new(EFD_NONBLOCK).map_err(SingleProcessError::EventLoop)?;
    let events = EventLoop::new().map_err(SingleProcessError::EventLoop)?;
    events
        .watch(&signals, Event::Signal)
        .map_err(SingleProcessError::EventLoop)?;
    events
        .watch(&done, Event::Done)
        .map_err(SingleProcessError::EventLoop)?;

    let mut active = None;
    let mut connections = 0u64;
    match &listener {
        Listener::Listening { listener, .. } => {
            events
                .watch(listener, Event::Listener)
                .map_err(SingleProcessError::EventLoop)?;
        }
        Listener::Connected(stream) => {
            let stream = stream.try_clone().map_err(SingleProcessError::Connected)?;
            active = Some(
                spawn_connection(stream, device.clone(), &done, 1, &endpoint)
                    .map_err(SingleProcessError::Connected)?,
            );
        }
    }

    loop {
        for event in events.wait(None).map_err(SingleProcessError::Wait)? {
            match event {
                Event::Signal => {
                    let signal = signals.read();
                    tracing::info!("{signal} received, stopping");
                    if let Some(active) = active.take() {
                        active.shutdown();
                        active.join();
                    }
                    listener.cleanup();
                    return Ok(());
                }
                Event::Done => {
                    let _ = done.read();
                    if let Some(active) = active.take() {
                        active.join();
                    }
                    match &listener {
                        Listener::Connected(_) => {
                            listener.cleanup();
                            return Ok(());
                        }
                        Listener::Listening { listener: l, .. } => {
                            // Take the next frontend (a VM reboot or a VMM restart).
                            events
                                .watch(l, Event::Listener)
                                .map_err(SingleProcessError::EventLoop)?;
                        }
                    }
                }
                Event::Listener => {
                    let Listener::Listening { listener: l, .. } = &listener else {
                        continue;
                    };
                    match l.accept() {
                        Ok((stream, _)) => {
                            // One frontend at a time: stop watching until this one is gone.
                            events.unwatch(l);
                            connections += 1;
                            match spawn_connection(
                                stream,
                                device.clone(),
                                &done,
                                connections,
                                &endpoint,
                            ) {
                                Ok(a) => active = Some(a),
                                Err(e) => {
                                    // The stream is dropped: the frontend sees the connection close.
                                    tracing::error!("cannot serve a new frontend: {e}");
                                    events
                                        .watch(l, Event::Listener)
                                        .map_err(SingleProcessError::EventLoop)?;
                                }
                            }
                        }
                        Err(e) => {
                            crate::ratelimit::vmm_line!(warn, "accept failed: {e}");
                            if AcceptFailure::of(&e).is_shortage() {
                                // One frontend at a time: nobody else waits on this loop.
                                std::thread::sleep(std::time::Duration::from_millis(100));
                            }
                        }
                    }
                }
            }
        }
    }
}

fn spawn_connection<D: VirtioDevice>(
    stream: UnixStream,
    device: Arc<D>,
    done: &EventFd,
    id: u64,
    endpoint: &Endpoint,
) -> io::Result<ConnectionThread> {
    let peer = rustix::net::sockopt::socket_peercred(&stream)
        .map(|c| format!("pid {} uid {}", c.pid.as_raw_nonzero(), c.uid.as_raw()))
        .unwrap_or_else(|_| "unknown peer".to_string());
    crate::ratelimit::vmm_line!(info, "frontend connected ({peer}), connection {id}");
    let done = done.try_clone()?;
    ConnectionThread::spawn(id, &endpoint.name(), stream, device, move || {
        let _ = done.write(1);
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_tokens_round_trip() {
        for event in [Event::Signal, Event::Listener, Event::Done] {
            assert_eq!(Event::from_raw(event.to_raw()), Some(event), "{event:?}");
        }
        assert_eq!(Event::from_raw(event_loop::pack(3, 0)), None);
    }
}
