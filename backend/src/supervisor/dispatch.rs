//! Connections on their way to workers: within the tenant's limits, to the VMM's live worker or
//! a new one, through a bounded outbox and a non-blocking control socket.

use std::io;
use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::disk::{Disk, DiskError, DiskSpec};
use crate::export::OpenAs;
use crate::handoff::{self, ToWorker};

use super::lifecycle::{StartError, WorkerFailure};
use super::tenants::{Verdict, GIVE_UP};
use super::vm::{Handoff, WorkerState};
use super::{Event, Level, Supervisor, MAX_WAITING};

/// How long to wait before sending again after the kernel ran short of memory.
const SEND_RETRY: Duration = Duration::from_millis(100);

/// Why a connection is closed instead of served.
#[derive(Debug, Error)]
pub(super) enum Refusal {
    #[error("it has {limit} connections, the most a VMM may have (--max-connections-per-vmm)")]
    ConnectionCap { limit: usize },
    #[error("the VMM changed its credentials since it connected first (its worker carries uid {uid} gid {gid})")]
    CredentialsChanged { uid: u32, gid: u32 },
    #[error("worker pid {worker} has {waiting} connections waiting to be taken")]
    Waiting { worker: i32, waiting: usize },
    /// `open-as=daemon`: the supervisor cannot open the image.
    #[error(transparent)]
    Image(DiskError),
    #[error("its last worker failed; next try in {ms} ms")]
    Backoff { ms: u128 },
    #[error("its workers keep failing; next try in {s} s")]
    GivenUp { s: u64 },
    #[error("uid {uid} has {limit} VMs, the most a uid may have (--max-vms-per-uid)")]
    VmCap { uid: u32, limit: usize },
    #[error("the VMM exited")]
    Gone,
    /// The supervisor's own shortage (descriptors, memory, processes): not the VMM's failure.
    #[error("the supervisor cannot start a worker now")]
    Shortage(#[source] StartError),
}

impl Refusal {
    /// The log budget its lines are charged to (each kind has its own, so routine lines
    /// cannot hide a refusal of another kind).
    fn kind(&self) -> &'static str {
        match self {
            Refusal::ConnectionCap { .. } => "connection-cap",
            Refusal::CredentialsChanged { .. } => "credentials",
            Refusal::Waiting { .. } => "waiting",
            Refusal::Image(_) => "image",
            Refusal::Backoff { .. } | Refusal::GivenUp { .. } => "backoff",
            Refusal::VmCap { .. } => "vm-cap",
            Refusal::Gone => "gone",
            Refusal::Shortage(_) => "supervisor",
        }
    }

    fn level(&self) -> Level {
        match self {
            // Nothing to act on: the VMM went away, or the failure behind the backoff was
            // explained once, when it happened.
            Refusal::Gone | Refusal::Backoff { .. } | Refusal::GivenUp { .. } => Level::Debug,
            _ => Level::Warn,
        }
    }
}

impl Supervisor {
    /// Closes a connection that will not be served, with a line charged to its VMM's uid.
    pub(super) fn refuse(&mut self, handoff: Handoff, why: Refusal) {
        let name = self.exports[handoff.export].spec.name.clone();
        let (connection, pid, uid) = (handoff.connection, handoff.peer.pid, handoff.peer.uid);
        self.tenant_line(uid, why.level(), why.kind(), || {
            format!(
                "{name}: connection {connection} of VMM pid {pid} (uid {uid}) closed: {}",
                crate::error_line(&why)
            )
        });
        self.connected_done(handoff.export);
    }

    /// Sends a connection to the worker of its VMM, starting one if there is none (or the one
    /// there is cannot take it), within the tenant's limits.
    pub(super) fn dispatch(&mut self, mut handoff: Handoff) {
        if self.exports[handoff.export].listener.is_none() {
            // Its export was removed while the connection was on its way to a worker that
            // died (`export remove --force`): it is not served again.
            tracing::debug!(
                "connection {} of a removed export closed",
                handoff.connection
            );
            return;
        }
        let key = (handoff.peer.pid, handoff.peer.start_time);
        // A VMM's connections count wherever they are, a retired worker's included: a worker
        // its tenant keeps alive still holds them.
        let held: usize = self
            .vms
            .values()
            .filter(|vm| vm.vmm_key == key)
            .map(|vm| vm.open_connections())
            .sum();
        if held >= self.limits.connections_per_vmm {
            let limit = self.limits.connections_per_vmm;
            return self.refuse(handoff, Refusal::ConnectionCap { limit });
        }
        let live = self
            .vms
            .iter()
            .find(|(_, vm)| vm.vmm_key == key && vm.takes_connections())
            .map(|(id, _)| *id);
        let vm_id = match live {
            Some(id) => {
                let vm = &self.vms[&id];
                let ours = (vm.uid, vm.gid, sorted(&vm.groups));
                let theirs = (
                    handoff.peer.uid,
                    handoff.peer.gid,
                    sorted(&handoff.peer.groups),
                );
                if ours != theirs {
                    let (uid, gid) = (vm.uid, vm.gid);
                    return self.refuse(handoff, Refusal::CredentialsChanged { uid, gid });
                }
                if vm.waiting() >= MAX_WAITING {
                    let (worker, waiting) = (vm.worker_pid, vm.waiting());
                    return self.refuse(handoff, Refusal::Waiting { worker, waiting });
                }
                if let Err(e) = self.open_disk(&mut handoff) {
                    return self.refuse(handoff, Refusal::Image(e));
                }
                id
            }
            None => {
                match self.backoff.check(key, Instant::now()) {
                    Verdict::Start => {}
                    // The failure was explained once, when it happened.
                    Verdict::Wait(until) => {
                        let ms = until.saturating_duration_since(Instant::now()).as_millis();
                        return self.refuse(handoff, Refusal::Backoff { ms });
                    }
                    Verdict::GivenUp(until) => {
                        let s = until.saturating_duration_since(Instant::now()).as_secs();
                        return self.refuse(handoff, Refusal::GivenUp { s });
                    }
                }
                let uid = handoff.peer.uid;
                // Retired workers count too, until they are gone.
                let vms_of_uid = self.vms.values().filter(|vm| vm.uid == uid).count();
                if vms_of_uid >= self.limits.vms_per_uid {
                    let limit = self.limits.vms_per_uid;
                    return self.refuse(handoff, Refusal::VmCap { uid, limit });
                }
                // Before a worker exists: an image that cannot be opened needs none.
                if let Err(e) = self.open_disk(&mut handoff) {
                    return self.refuse(handoff, Refusal::Image(e));
                }
                match self.start(&handoff.peer) {
                    Ok(id) => id,
                    Err(StartError::Gone) => return self.refuse(handoff, Refusal::Gone),
                    Err(e) if e.is_supervisors() => {
                        return self.refuse(handoff, Refusal::Shortage(e))
                    }
                    Err(e) => {
                        let (uid, pid) = (handoff.peer.uid, handoff.peer.pid);
                        let failure = WorkerFailure::Start(e);
                        return self.start_failed(key, uid, pid, &failure, vec![handoff]);
                    }
                }
            }
        };
        let vms = &self.vms;
        let reconnect = self
            .device_state
            .note_connection(key, handoff.export, |vmm| {
                vms.values()
                    .any(|vm| vm.vmm_key == vmm && vm.takes_connections())
            });
        self.counters.connected(handoff.export, reconnect);
        if let Some(vm) = self.vms.get_mut(&vm_id) {
            vm.outbox.push_back(handoff);
        }
        self.flush(vm_id);
    }

    /// With `open-as=daemon`, opens the export's image for `handoff` (as root, without following
    /// symlinks, and only the file seen at start).
    fn open_disk(&self, handoff: &mut Handoff) -> Result<(), DiskError> {
        let spec = &self.exports[handoff.export].spec;
        if let (OpenAs::Daemon, DiskSpec::Path(path)) = (spec.open_as, &spec.disk) {
            let (file, _) = Disk::open_for_daemon(path, spec.open, spec.daemon_file)?;
            handoff.disk = Some(OwnedFd::from(file));
        }
        Ok(())
    }

    /// A worker for VMM `key` failed (it could not start, or died while its VMM lives): counts
    /// it, closes `handoffs` with one line that says why and what follows.
    pub(super) fn start_failed(
        &mut self,
        key: (i32, u64),
        uid: u32,
        pid: i32,
        failure: &WorkerFailure,
        handoffs: Vec<Handoff>,
    ) {
        let next = self.count_failure(key);
        let closed = handoffs.len();
        self.tenant_line(uid, Level::Warn, "start-failed", || {
            let reason = crate::error_line(failure);
            format!("cannot start a worker for VMM pid {pid} (uid {uid}): {reason}; {next}; {closed} connection(s) closed")
        });
        for handoff in handoffs {
            self.connected_done(handoff.export);
        }
    }

    /// Counts a failure of VMM `key`'s worker; says what follows.
    pub(super) fn count_failure(&mut self, key: (i32, u64)) -> String {
        self.counters.workers_failed += 1;
        let (count, verdict) = self.backoff.failed(key, Instant::now());
        match verdict {
            Verdict::GivenUp(_) => format!(
                "{count} worker starts failed in a row, so its connections are closed for {} s",
                GIVE_UP.as_secs()
            ),
            Verdict::Wait(until) => format!(
                "next try in {} ms",
                until.saturating_duration_since(Instant::now()).as_millis()
            ),
            Verdict::Start => "next try at its next connection".into(),
        }
    }

    /// Sends what waits in the VM's outbox, until the control socket is full.
    pub(super) fn flush(&mut self, id: u64) {
        loop {
            let Some(vm) = self.vms.get_mut(&id) else {
                return;
            };
            if !matches!(vm.state, WorkerState::Running) {
                return;
            }
            let Some(handoff) = vm.outbox.front() else {
                break;
            };
            let spec = self.exports[handoff.export].spec.clone();
            let key = (handoff.peer.pid, handoff.peer.start_time);
            let message = ToWorker::Serve {
                connection: handoff.connection,
                export: spec,
                disk_fd_attached: handoff.disk.is_some(),
                write_cache: self
                    .device_state
                    .write_cache(key, handoff.export)
                    .or_else(|| {
                        let state_key = &self.exports[handoff.export].state_key;
                        self.state.as_ref()?.write_cache(key, state_key)
                    }),
            };
            let mut fds = vec![&handoff.stream, &handoff.peer.pidfd];
            if let Some(disk) = &handoff.disk {
                fds.push(disk);
            }
            match handoff::send(&vm.control, &message, &fds) {
                Ok(()) => {
                    vm.retry_send_at = None;
                    let handoff = vm.outbox.pop_front().expect("front exists");
                    vm.live.insert(handoff.connection, handoff.export);
                    let (worker, uid) = (vm.worker_pid, vm.uid);
                    let (connection, pid) = (handoff.connection, handoff.peer.pid);
                    let name = self.exports[handoff.export].spec.name.clone();
                    vm.pending.push(handoff);
                    self.tenant_line(uid, Level::Info, "handed-over", || {
                        format!("{name}: connection {connection} from VMM pid {pid} (uid {uid}) handed to worker pid {worker}")
                    });
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if !vm.watching_writable {
                        // Watched only until it has room again: nothing is ever read from it
                        // (its receiving side is shut down).
                        vm.watching_writable = true;
                        let _ = self
                            .events
                            .watch_writable(&vm.control, Event::WorkerWritable(id));
                    }
                    return;
                }
                Err(e) if matches!(e.raw_os_error(), Some(libc::ENOBUFS | libc::ENOMEM)) => {
                    // The kernel is short, not the worker broken: try again shortly.
                    vm.retry_send_at = Some(Instant::now() + SEND_RETRY);
                    return;
                }
                Err(e) => {
                    // The worker closed its end: it is exiting. Its connections not sent yet
                    // go to a new worker.
                    let (worker, uid) = (vm.worker_pid, vm.uid);
                    self.tenant_line(uid, Level::Warn, "worker-broken", || {
                        format!("worker pid {worker} cannot take connections ({e}); its next connections go to a new worker")
                    });
                    self.retire(id);
                    return;
                }
            }
        }
        if let Some(vm) = self.vms.get_mut(&id) {
            if vm.watching_writable {
                vm.watching_writable = false;
                self.events.unwatch(&vm.control);
            }
        }
    }

    /// A connection of `export` will not be served (counts down a `--fd` connected socket).
    pub(super) fn connected_done(&mut self, export: usize) {
        if matches!(
            self.exports[export].listener,
            Some(crate::endpoint::Listener::Connected(_))
        ) {
            self.connected_left = self.connected_left.saturating_sub(1);
        }
    }
}

fn sorted(groups: &[u32]) -> Vec<u32> {
    let mut groups = groups.to_vec();
    groups.sort_unstable();
    groups.dedup();
    groups
}
