//! A per-VM worker process. It runs as its VMM (uid, gids, rlimits, cgroups: see
//! identity/apply.rs), receives that VM's connections from the supervisor over the control
//! socket, and serves each with its own session and queue threads — created here, after the
//! identity switch, so they count against the VMM's limits.
//!
//! It exits when the supervisor goes away (the control socket closes; the parent-death signal
//! covers a supervisor that was killed) or when its VMM has exited and its last connection
//! has ended.
//!
//! Everything its VMM can make it log goes through one log budget for the process
//! (`ratelimit::VMM_LOG`): all its connections are one tenant, and a VMM may connect
//! and disconnect in a loop.

use std::collections::HashMap;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::AtomicBool;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use thiserror::Error;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::disk::{Disk, DiskError, DiskSpec};
use crate::event_loop::{self, EventLoop, Token};
use crate::export::{ExportSpec, OpenAs};
use crate::handoff::{self, DeviceStatus, ReportPipe, ToSupervisor, ToWorker};
use crate::ratelimit::{vmm_line, VMM_LOG};
use crate::sandbox::TestMisdeed;
use crate::vhost_user::ConnectionThread;
use crate::virtio_blk::{BlockDevice, Resized, WriteCacheWatch};

mod misdeeds;

/// Why a worker stopped serving altogether.
#[derive(Debug, Error)]
pub enum WorkerError {
    #[error("cannot set up the event loop")]
    EventLoop(#[source] io::Error),
    #[error("cannot watch the VMM's pidfd")]
    WatchVmm(#[source] io::Error),
    #[error("waiting for events failed")]
    Wait(#[source] io::Error),
}

/// Why one connection is refused; the supervisor gets it as text (`ToSupervisor::Refused`).
#[derive(Debug, Error)]
pub enum ServeError {
    #[error(transparent)]
    Disk(#[from] DiskError),
    #[error("open-as=daemon but no file from the supervisor")]
    NoDiskFile,
    #[error("cannot open the test I/O gate")]
    TestIoGate(#[source] io::Error),
    #[error(
        "cannot create a thread: the VMM's thread limit (RLIMIT_NPROC or pids.max) is reached"
    )]
    ThreadLimit(#[source] io::Error),
    #[error("cannot create a thread")]
    Thread(#[source] io::Error),
    #[error("cannot duplicate the worker's \"done\" eventfd")]
    DoneFd(#[source] io::Error),
}

/// What a worker's main thread waits on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Event {
    /// A message from the supervisor, or the supervisor gone.
    Control,
    /// A connection thread ended.
    Done,
    /// The VMM exited (its pidfd).
    Vmm,
}

impl Token for Event {
    fn to_raw(self) -> u64 {
        event_loop::pack(self as u8, 0)
    }

    fn from_raw(raw: u64) -> Option<Event> {
        match event_loop::unpack(raw) {
            (0, 0) => Some(Event::Control),
            (1, 0) => Some(Event::Done),
            (2, 0) => Some(Event::Vmm),
            _ => None,
        }
    }
}

struct Connection {
    export: String,
    device: Arc<BlockDevice>,
    thread: ConnectionThread,
}

/// How often the worker tells the supervisor what its devices served.
const STATS_INTERVAL: Duration = Duration::from_secs(1);

fn send_stats(reports: &ReportPipe, connections: &HashMap<u64, Connection>) {
    let devices = connections
        .iter()
        .map(|(id, c)| DeviceStatus {
            connection: *id,
            export: c.export.clone(),
            queues: c.device.config().num_queues,
            write_cache: Some(
                c.device
                    .config()
                    .writeback_cell()
                    .load(std::sync::atomic::Ordering::Relaxed),
            ),
            totals: c.device.totals(),
            memory: c.device.memory_status(),
            per_queue: c.device.per_queue(),
        })
        .collect();
    let _ = reports.send(&handoff::stats_message(devices));
}

/// Serves connections from the control socket until there is nothing left to serve, telling
/// the supervisor how it goes on the `reports` pipe. `misdeeds` are for tests only
/// (`--test-worker-arg`).
pub fn run(
    control: OwnedFd,
    reports: OwnedFd,
    misdeeds: &[TestMisdeed],
) -> Result<(), WorkerError> {
    let events = EventLoop::new().map_err(WorkerError::EventLoop)?;
    let done = EventFd::new(EFD_NONBLOCK).map_err(WorkerError::EventLoop)?;
    events
        .watch(&control, Event::Control)
        .map_err(WorkerError::EventLoop)?;
    events
        .watch(&done, Event::Done)
        .map_err(WorkerError::EventLoop)?;
    let (ended_tx, ended_rx) = mpsc::channel::<u64>();
    // Connection threads report too (a guest's write-cache choice, before it is acked).
    let reports = Arc::new(ReportPipe::new(reports));
    let mut connections: HashMap<u64, Connection> = HashMap::new();
    // The write cache the guest last chose per export (SET_CONFIG of `writeback`): device
    // state that outlives a connection. Neither QEMU nor cloud-hypervisor re-sends it after a
    // reconnect, and a guest that chose write-through must not silently get write-back. Each
    // change also goes to the supervisor, which gives it to the next worker should this one
    // die (supervisor/device_state.rs).
    let mut write_cache: HashMap<String, Arc<AtomicBool>> = HashMap::new();
    let mut vmm_pidfd: Option<OwnedFd> = None;
    let mut vmm_exited = false;
    let mut supervisor_gone = false;

    let mut last_stats = Instant::now();
    loop {
        if (vmm_exited || supervisor_gone) && connections.is_empty() {
            VMM_LOG.finish();
            tracing::info!("no connections left; worker exits");
            return Ok(());
        }
        // The count of lines left out is written even if the VMM has gone quiet.
        VMM_LOG.flush(Instant::now());
        if !supervisor_gone && last_stats.elapsed() >= STATS_INTERVAL {
            send_stats(&reports, &connections);
            last_stats = Instant::now();
        }
        for event in events
            .wait(Some(STATS_INTERVAL))
            .map_err(WorkerError::Wait)?
        {
            match event {
                Event::Control => match handoff::recv::<ToWorker>(&control) {
                    Ok(Some((
                        ToWorker::Serve {
                            connection,
                            export,
                            disk_fd_attached,
                            write_cache: remembered,
                        },
                        fds,
                    ))) => {
                        let _ = reports.send(&ToSupervisor::Accepted { connection });
                        let mut fds = fds.into_iter();
                        let (Some(stream), Some(pidfd)) = (fds.next(), fds.next()) else {
                            tracing::error!("supervisor sent a connection without its fds");
                            continue;
                        };
                        if vmm_pidfd.is_none() {
                            events
                                .watch(&pidfd, Event::Vmm)
                                .map_err(WorkerError::WatchVmm)?;
                            vmm_pidfd = Some(pidfd);
                        }
                        let disk_fd = if disk_fd_attached { fds.next() } else { None };
                        // This worker's own cell is the latest; else what an earlier worker of
                        // this VMM reported.
                        let cell = write_cache
                            .get(&export.name)
                            .cloned()
                            .or_else(|| remembered.map(|on| Arc::new(AtomicBool::new(on))));
                        // On the connection thread, before SET_CONFIG is acked: once the
                        // guest's driver goes on, the supervisor has it.
                        let watch = {
                            let reports = reports.clone();
                            Box::new(move |on| {
                                let _ = reports.send(&ToSupervisor::WriteCache {
                                    connection,
                                    write_cache: on,
                                });
                            })
                        };
                        match start(
                            connection,
                            &export,
                            DeviceWriteCache { cell, watch },
                            UnixStream::from(stream),
                            disk_fd,
                            &done,
                            &ended_tx,
                        ) {
                            Ok(c) => {
                                write_cache.insert(
                                    export.name.clone(),
                                    c.device.config().writeback_cell(),
                                );
                                connections.insert(connection, c);
                            }
                            Err(e) => {
                                let reason = crate::error_line(&e);
                                vmm_line!(
                                    error,
                                    "refusing {} (connection {connection}): {reason}",
                                    export.name
                                );
                                let refused = ToSupervisor::Refused {
                                    connection,
                                    export: export.name.clone(),
                                    reason,
                                };
                                let _ = reports.send(&refused);
                            }
                        }
                        misdeeds::commit(misdeeds, &export.name, connection, &reports);
                    }
                    Ok(Some((ToWorker::Resize { connection }, _))) => {
                        if let Some(c) = connections.get(&connection) {
                            resize(connection, c);
                        }
                    }
                    Ok(Some((ToWorker::SetQos { connection, qos }, _))) => {
                        if let Some(c) = connections.get(&connection) {
                            c.device.set_qos(qos);
                            tracing::info!(
                                "connection {connection}: {} qos {}",
                                c.export,
                                qos.describe()
                            );
                        }
                    }
                    Ok(Some((ToWorker::Stop { connection }, _))) => {
                        if let Some(c) = connections.get(&connection) {
                            tracing::info!("connection {connection}: export removed; stopping");
                            c.thread.shutdown();
                        }
                    }
                    Ok(None) => {
                        tracing::info!("supervisor went away; stopping");
                        supervisor_gone = true;
                        events.unwatch(&control);
                        for c in connections.values() {
                            c.thread.shutdown();
                        }
                    }
                    Err(e) => tracing::error!("bad message from the supervisor: {e}"),
                },
                Event::Done => {
                    let _ = done.read();
                    while let Ok(id) = ended_rx.try_recv() {
                        if let Some(c) = connections.remove(&id) {
                            c.thread.join();
                        }
                        if !supervisor_gone {
                            let _ = reports.send(&ToSupervisor::Ended { connection: id });
                        }
                    }
                }
                Event::Vmm => {
                    vmm_exited = true;
                    if let Some(fd) = &vmm_pidfd {
                        events.unwatch(fd);
                    }
                }
            }
        }
    }
}

/// Reads the size of a connection's backing again; if it grew, the device shows the new
/// capacity and the frontend is told (VHOST_USER_BACKEND_CONFIG_CHANGE_MSG).
fn resize(connection: u64, c: &Connection) {
    match c.device.resize() {
        Ok(Resized::Unchanged(size)) => {
            tracing::info!(
                "connection {connection}: {} still has {size} bytes",
                c.export
            )
        }
        Ok(Resized::Grown { from, to }) => match c.thread.config_changed() {
            Ok(true) => tracing::info!(
                "connection {connection}: {} grew from {from} to {to} bytes; frontend told",
                c.export
            ),
            Ok(false) => tracing::warn!(
                "connection {connection}: {} grew from {from} to {to} bytes, but the frontend \
                 gave no backend request channel (BACKEND_REQ): the guest sees the new size \
                 when it reads the config space again",
                c.export
            ),
            Err(e) => tracing::warn!(
                "connection {connection}: {} grew from {from} to {to} bytes; cannot tell the \
                 frontend: {e}",
                c.export
            ),
        },
        Err(e) => tracing::error!("connection {connection}: {}", crate::error_line(&e)),
    }
}

/// A new device's write cache: the setting it shares (the export's in this worker, or what
/// the supervisor remembered), and who hears of the guest's changes.
struct DeviceWriteCache {
    cell: Option<Arc<AtomicBool>>,
    watch: WriteCacheWatch,
}

/// Opens the export's disk (as the VMM, or from the supervisor's fd) and starts serving.
fn start(
    connection: u64,
    export: &ExportSpec,
    write_cache: DeviceWriteCache,
    stream: UnixStream,
    disk_fd: Option<OwnedFd>,
    done: &EventFd,
    ended: &mpsc::Sender<u64>,
) -> Result<Connection, ServeError> {
    let disk = match (export.open_as, disk_fd, &export.disk) {
        (OpenAs::Daemon, Some(fd), DiskSpec::Path(path)) => {
            Disk::from_file(std::fs::File::from(fd), path, export.open)?
        }
        (OpenAs::Daemon, None, DiskSpec::Path(_)) => return Err(ServeError::NoDiskFile),
        _ => Disk::open(&export.disk, export.open)?,
    };
    let device = crate::virtio_blk::device_for(disk, export).map_err(ServeError::TestIoGate)?;
    let device = Arc::new(
        device
            .with_write_cache(write_cache.cell)
            .with_write_cache_watch(write_cache.watch),
    );
    let done = done.try_clone().map_err(ServeError::DoneFd)?;
    let ended = ended.clone();
    let thread = ConnectionThread::spawn(
        connection,
        &export.name,
        stream,
        device.clone(),
        move || {
            let _ = ended.send(connection);
            let _ = done.write(1);
        },
    )
    .map_err(|e| {
        if e.raw_os_error() == Some(libc::EAGAIN) {
            ServeError::ThreadLimit(e)
        } else {
            ServeError::Thread(e)
        }
    })?;
    vmm_line!(info, "serving {} (connection {connection})", export.name);
    Ok(Connection {
        export: export.name.clone(),
        device,
        thread,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_tokens_round_trip() {
        for event in [Event::Control, Event::Done, Event::Vmm] {
            assert_eq!(Event::from_raw(event.to_raw()), Some(event), "{event:?}");
        }
        assert_eq!(Event::from_raw(event_loop::pack(3, 0)), None);
    }
}
