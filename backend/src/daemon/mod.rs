//! The daemon around a device: where connections come from (a socket path, or an inherited
//! fd that is listening or already connected), serving them one at a time, and stopping
//! cleanly on SIGINT/SIGTERM.

mod endpoint;
mod signals;

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::Arc;

use thiserror::Error;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::vhost_user::{ConnectionThread, VirtioDevice};

pub use endpoint::{Endpoint, Listener, SocketAccess};
pub use signals::Signals;

#[derive(Debug, Error)]
pub enum DaemonError {
    #[error("{path} is in use by another process")]
    SocketInUse { path: PathBuf },
    #[error("cannot listen on {path}")]
    Bind {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("--fd {fd} is not usable")]
    BadFd {
        fd: i32,
        #[source]
        source: io::Error,
    },
    #[error("--fd {fd} is not a unix stream socket")]
    NotUnixStream { fd: i32 },
    #[error("cannot set up the event loop")]
    EventLoop(#[source] io::Error),
}

const EV_SIGNAL: u64 = 0;
const EV_LISTENER: u64 = 1;
const EV_DONE: u64 = 2;

/// Serves `device` on `endpoint` until a signal arrives (or, for a connected fd, until that
/// connection ends).
pub fn run<D: VirtioDevice>(
    endpoint: Endpoint,
    access: SocketAccess,
    device: Arc<D>,
) -> Result<(), DaemonError> {
    // Block the signals before any thread exists, so every thread inherits the mask and they
    // arrive only through the signalfd.
    let signals = Signals::block_and_watch().map_err(DaemonError::EventLoop)?;
    let listener = endpoint.open(access)?;
    let done = EventFd::new(EFD_NONBLOCK).map_err(DaemonError::EventLoop)?;
    let epoll = epoll::create(true).map_err(DaemonError::EventLoop)?;
    let watch = |fd: i32, data: u64| {
        epoll::ctl(
            epoll,
            epoll::ControlOptions::EPOLL_CTL_ADD,
            fd,
            epoll::Event::new(epoll::Events::EPOLLIN, data),
        )
    };
    watch(signals.as_raw_fd(), EV_SIGNAL).map_err(DaemonError::EventLoop)?;
    watch(done.as_raw_fd(), EV_DONE).map_err(DaemonError::EventLoop)?;

    let mut active = None;
    let mut connections = 0u64;
    match &listener {
        Listener::Listening { listener, .. } => {
            watch(listener.as_raw_fd(), EV_LISTENER).map_err(DaemonError::EventLoop)?;
        }
        Listener::Connected(stream) => {
            let stream = stream.try_clone().map_err(DaemonError::EventLoop)?;
            active = Some(
                spawn_connection(stream, device.clone(), &done, 1, &endpoint)
                    .map_err(DaemonError::EventLoop)?,
            );
        }
    }

    let mut events = [epoll::Event::new(epoll::Events::empty(), 0); 4];
    loop {
        let n = match epoll::wait(epoll, -1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(DaemonError::EventLoop(e)),
        };
        for event in &events[..n] {
            match event.data {
                EV_SIGNAL => {
                    let signal = signals.read();
                    tracing::info!("{signal} received, stopping");
                    if let Some(active) = active.take() {
                        active.shutdown();
                        active.join();
                    }
                    listener.cleanup();
                    return Ok(());
                }
                EV_DONE => {
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
                            watch(l.as_raw_fd(), EV_LISTENER).map_err(DaemonError::EventLoop)?;
                        }
                    }
                }
                EV_LISTENER => {
                    let Listener::Listening { listener: l, .. } = &listener else {
                        continue;
                    };
                    match l.accept() {
                        Ok((stream, _)) => {
                            // One frontend at a time: stop watching until this one is gone.
                            let _ = epoll::ctl(
                                epoll,
                                epoll::ControlOptions::EPOLL_CTL_DEL,
                                l.as_raw_fd(),
                                epoll::Event::new(epoll::Events::empty(), 0),
                            );
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
                                    watch(l.as_raw_fd(), EV_LISTENER)
                                        .map_err(DaemonError::EventLoop)?;
                                }
                            }
                        }
                        Err(e) => {
                            crate::ratelimit::vmm_line!(warn, "accept failed: {e}");
                            if matches!(
                                e.raw_os_error(),
                                Some(libc::EMFILE | libc::ENFILE | libc::ENOMEM | libc::ENOBUFS)
                            ) {
                                // One frontend at a time: nobody else waits on this loop.
                                std::thread::sleep(std::time::Duration::from_millis(100));
                            }
                        }
                    }
                }
                _ => {}
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
    let name = match endpoint {
        Endpoint::Path(path) => path.display().to_string(),
        Endpoint::Fd(fd) => format!("fd:{fd}"),
    };
    ConnectionThread::spawn(id, &name, stream, device, move || {
        let _ = done.write(1);
    })
}
