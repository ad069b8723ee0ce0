//! The supervisor's table of VMs: a VM is its VMM (pid and start time, and the credentials the
//! kernel recorded at connect) and the worker serving it, with the connections on their way to
//! that worker.

use std::collections::{HashMap, VecDeque};
use std::os::fd::OwnedFd;
use std::time::Instant;

use crate::handoff::{DeviceStatus, ReportReader};
use crate::identity::{Peer, VmmIdentity};
use crate::ratelimit::RateLimit;
use crate::sandbox::SandboxStatus;

use super::worker_log::WorkerLog;

/// Where a VM's worker is in its life.
pub(super) enum WorkerState {
    /// Forked, not exec'd yet: connections wait in the outbox.
    Starting {
        exec_status: OwnedFd,
        deadline: Instant,
    },
    Running,
    /// It cannot take connections (it failed to start, closed its channels, or died): new
    /// connections of its VMM go to a new worker. It still counts against its tenant's limits
    /// until its pidfd reports it gone and `reap` clears it.
    Retired,
}

/// One VM: its VMM and the worker serving it.
pub(super) struct Vm {
    pub vmm_pid: i32,
    pub vmm_key: (i32, u64),
    /// The VMM, to tell a worker that died under a live VMM from one that followed its VMM.
    pub vmm_pidfd: OwnedFd,
    /// The credentials the kernel recorded when the VMM connected; its worker carries them.
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
    pub worker_pid: i32,
    pub worker_pidfd: OwnedFd,
    /// When it was forked.
    pub started_at: Instant,
    /// Send-only, non-blocking: connections go to the worker here.
    pub control: OwnedFd,
    /// The worker's report pipe, non-blocking, and what was read of it.
    pub reports: OwnedFd,
    pub reader: ReportReader,
    /// Reports it may send per interval before it counts as broken ([`REPORT_BURST`]).
    pub report_budget: RateLimit,
    /// The worker's stderr, non-blocking, and what was read of it.
    pub log: OwnedFd,
    pub log_reader: WorkerLog,
    /// Its sandbox, as it reported it.
    pub sandbox: Option<SandboxStatus>,
    pub state: WorkerState,
    /// Connections sent to the worker and not ended, with their export's index.
    pub live: HashMap<u64, usize>,
    /// Connections waiting to be sent (the worker is starting, or its socket is full).
    pub outbox: VecDeque<Handoff>,
    /// Connections sent to the worker that it has not acknowledged yet; if it dies first,
    /// they go to a new worker.
    pub pending: Vec<Handoff>,
    /// The worker acknowledged a connection: it started.
    pub took_one: bool,
    /// Its failure was already counted against its VMM.
    pub failure_counted: bool,
    /// The control socket is watched for room to send.
    pub watching_writable: bool,
    /// A send failed for lack of kernel memory: try again then.
    pub retry_send_at: Option<Instant>,
    pub identity: VmmIdentity,
    /// The worker's last report, and when it came.
    pub devices: Vec<DeviceStatus>,
    pub reported_at: Option<Instant>,
}

/// Reports a worker may send per [`REPORT_INTERVAL`]: one about each connection it takes,
/// refuses or ends, a few a second about its devices. A worker that sends more is broken or
/// taken over, and is killed.
pub(super) const REPORT_BURST: u32 = 1024;
pub(super) const REPORT_INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);

impl Vm {
    pub fn takes_connections(&self) -> bool {
        !matches!(self.state, WorkerState::Retired)
    }

    /// Connections the worker has not taken.
    pub fn waiting(&self) -> usize {
        self.outbox.len() + self.pending.len()
    }

    /// Connections of the VMM this VM holds, served or waiting.
    pub fn open_connections(&self) -> usize {
        self.live.len() + self.outbox.len()
    }

    /// The connections to export `index` sent to the worker, taken or not yet acknowledged,
    /// in order: those a message about the export's devices must reach.
    pub fn sent_connections(&self, index: usize) -> Vec<u64> {
        let live = self
            .live
            .iter()
            .filter(|(_, &e)| e == index)
            .map(|(&c, _)| c);
        let pending = self.pending.iter().filter(|h| h.export == index);
        let mut connections: Vec<u64> = live.chain(pending.map(|h| h.connection)).collect();
        connections.sort_unstable();
        connections.dedup();
        connections
    }

    /// When the event loop must look at this VM without an event.
    pub fn deadline(&self) -> Option<Instant> {
        match &self.state {
            WorkerState::Starting { deadline, .. } => Some(*deadline),
            _ => self.retry_send_at,
        }
    }
}

/// A connection on its way to a worker. The supervisor keeps its copy of the socket until the
/// worker acknowledges it: a worker killed just before reading the message (the VMM then
/// reconnects at once, as cloud-hypervisor does) must not take the connection with it.
pub(super) struct Handoff {
    pub connection: u64,
    pub export: usize,
    pub stream: OwnedFd,
    pub peer: Peer,
    /// With `open-as=daemon`, the backing the supervisor opened.
    pub disk: Option<OwnedFd>,
}

/// Whether the process behind `pidfd` has exited (without blocking).
pub(super) fn exited(pidfd: &OwnedFd) -> bool {
    super::lifecycle::wait_exit(pidfd, std::time::Duration::ZERO)
}
