//! vublk: a vhost-user virtio-blk backend.
//!
//! The request path, by module: [`endpoint`] is where a frontend connects; the [`supervisor`]
//! hands the connection to its VM's [`worker`]; [`vhost_user`] speaks the protocol, maps guest
//! memory and starts a queue thread per virtqueue; [`virtio_blk`] turns descriptor chains into
//! requests and requests into [`io`] on the [`disk`].
//!
//! Words with one meaning each: the *daemon* is the vublk process an operator starts (the
//! supervisor, or with `--single-process` the process serving one export itself); the
//! *supervisor* is its default mode ([`supervisor`]); a *worker* is a per-VM process the
//! supervisor starts ([`worker`]); a *queue thread* serves one virtqueue inside a worker (or
//! the single-process daemon).

pub mod cli;
pub mod disk;
pub mod endpoint;
mod event_loop;
pub mod export;
mod handoff;
pub mod identity;
pub mod io;
pub mod metrics;
pub mod qos;
mod ratelimit;
pub mod sandbox;
mod sigbus;
mod signals;
pub mod single_process;
pub mod supervisor;
pub mod top;
pub mod vhost_user;
pub mod virtio_blk;
pub mod worker;

use std::error::Error;
use std::sync::Arc;

use thiserror::Error;

use disk::{Disk, DiskError};
use endpoint::{Endpoint, SocketAccess};
use export::{ExportSpec, OpenAs};
use single_process::SingleProcessError;
use supervisor::SupervisorError;
use worker::WorkerError;

/// How the process runs.
pub enum Mode {
    /// The default: a supervisor handing each VM to a worker carrying its VMM's identity,
    /// answering `vublk status` on the control socket if there is one.
    Supervisor(
        Vec<(Endpoint, ExportSpec)>,
        supervisor::TenantLimits,
        supervisor::WorkerOptions,
        supervisor::ControlOptions,
    ),
    /// One export served in this process.
    SingleProcess(Endpoint, SocketAccess, Box<ExportSpec>),
    /// A per-VM worker, started by the supervisor with its control socket at this fd, in
    /// this sandbox.
    Worker(std::os::fd::RawFd, sandbox::Plan),
}

/// Why [`run`] failed; `main` prints it on one line with its causes ([`error_line`]).
#[derive(Debug, Error)]
pub enum RunError {
    #[error(transparent)]
    Disk(#[from] DiskError),
    #[error("cannot open the test I/O gate")]
    TestIoGate(#[source] std::io::Error),
    #[error(transparent)]
    Supervisor(#[from] SupervisorError),
    #[error(transparent)]
    SingleProcess(#[from] SingleProcessError),
    #[error(transparent)]
    Worker(#[from] WorkerError),
    #[error("cannot sandbox the worker")]
    Sandbox(#[from] sandbox::SandboxError),
}

pub fn run(mode: Mode) -> Result<(), RunError> {
    match mode {
        Mode::Supervisor(mut exports, limits, workers, options) => {
            // Check every image before taking connections, so a typo fails at start-up rather
            // than at the first VM. Workers open the images again, as their VMM's user; for
            // open-as=daemon the supervisor does, for each connection, and only the file found
            // now.
            for (_, export) in &mut exports {
                // An RBD image is not opened here (the supervisor is not the VMM's user, and
                // the cluster may come up later): only librbd is loaded, so a machine without
                // it fails now.
                if let disk::DiskSpec::Rbd(_) = &export.disk {
                    io::rbd::ffi::api().map_err(|e| DiskError::from(io::rbd::RbdError::from(e)))?;
                }
                if let disk::DiskSpec::Path(path) = &export.disk {
                    if export.open_as == OpenAs::Daemon {
                        let (_, id) = Disk::open_for_daemon(path, export.open, None)?;
                        export.daemon_file = Some(id);
                    } else {
                        Disk::open_file(path, export.open)?;
                    }
                }
            }
            supervisor::run(exports, limits, workers, options)?;
            Ok(())
        }
        Mode::SingleProcess(endpoint, access, export) => run_single(endpoint, access, *export),
        Mode::Worker(fd, plan) => {
            // SAFETY: the supervisor put the control socket at this fd and the report pipe at
            // the next one, for us alone.
            let (control, reports) = unsafe { supervisor::adopt_channels(fd) };
            if plan.profile == sandbox::Profile::Rbd {
                // librbd and librados (and what they link) are mapped now: the seccomp filter
                // forbids executable mappings, and landlock hides the library directories. A
                // failure is kept and told when an export opens its image.
                let _ = io::rbd::ffi::api();
            }
            let sandbox = {
                use std::os::fd::AsRawFd;
                let (control, reports) = (control.as_raw_fd(), reports.as_raw_fd());
                sandbox::enter(&plan, &[control, reports], reports)?
            };
            let _ = handoff::report(&reports, &handoff::ToSupervisor::Sandbox(sandbox));
            let _span = tracing::info_span!("worker", pid = std::process::id()).entered();
            worker::run(control, reports, &plan.test)?;
            Ok(())
        }
    }
}

/// Opens the disk and serves it in this process until stopped.
fn run_single(
    endpoint: Endpoint,
    access: SocketAccess,
    export: ExportSpec,
) -> Result<(), RunError> {
    let disk = Disk::open(&export.disk, export.open)?;
    let device = Arc::new(virtio_blk::device_for(disk, &export).map_err(RunError::TestIoGate)?);
    let config = device.config();
    tracing::info!(
        "serving {}: {} bytes, {} queue(s), {}{}{}",
        device.disk().name,
        config.capacity(),
        config.num_queues,
        if config.read_only {
            "read-only"
        } else {
            "read-write"
        },
        if device.disk().direct {
            ", O_DIRECT"
        } else {
            ""
        },
        if config.writeback() {
            ", write-back"
        } else {
            ", write-through"
        },
    );
    single_process::run(endpoint, access, device)?;
    Ok(())
}

/// An error and its causes on one line: "cannot open x.img: No such file or directory".
pub fn error_line(e: &(dyn Error + 'static)) -> String {
    let mut line = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        line.push_str(": ");
        line.push_str(&cause.to_string());
        source = cause.source();
    }
    line
}
