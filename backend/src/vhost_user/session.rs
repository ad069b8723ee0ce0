//! The vhost-user request handler for one frontend connection.
//!
//! `vhost::vhost_user::BackendReqHandler` decodes messages and calls into [`Session`]; the
//! session keeps the negotiated features, the memory table and the vrings, and starts and
//! stops queue threads running the device's queue loop.
//!
//! Every line a frontend's messages can make it write goes through the VMM's log budget
//! ([`vmm_line!`]): a VMM can send the same bad message in a loop.

use std::fs::File;
use std::io;
use std::os::fd::{FromRawFd, IntoRawFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserConfigFlags, VhostUserInflight,
    VhostUserLog, VhostUserMemoryRegion, VhostUserProtocolFeatures, VhostUserShMemConfig,
    VhostUserSharedMsg, VhostUserSingleMemoryRegion, VhostUserVirtioFeatures,
    VhostUserVringAddrFlags, VhostUserVringState, VHOST_USER_CONFIG_OFFSET, VHOST_USER_CONFIG_SIZE,
};
use vhost::vhost_user::{
    Backend, Error as VhostUserError, GpuBackend, Result as VhostUserResult,
    VhostUserBackendReqHandlerMut,
};
use vhost::VhostUserMemoryRegionBase;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

use super::backend_channel::BackendChannel;
use super::device::VirtioDevice;
use super::dirty_log::{DirtyLog, LogMap};
use super::inflight::{self, InflightMap};
use super::memory::{GuestMemoryHandle, RegionPin, Retiring, MAX_MEM_SLOTS};
use super::vring::Vring;
use crate::ratelimit::vmm_line;

/// Where frontends address the device config space. QEMU counts from 0; rust-vmm frontends
/// (cloud-hypervisor, crosvm) count from VHOST_USER_CONFIG_OFFSET (0x100, where virtio-mmio
/// puts it), up to VHOST_USER_CONFIG_SIZE. A config space is smaller than 0x100 bytes, so the
/// two forms never overlap.
fn config_range(offset: u32, size: u32) -> Option<u32> {
    let end = offset.checked_add(size)?;
    if offset >= VHOST_USER_CONFIG_OFFSET {
        (end <= VHOST_USER_CONFIG_SIZE).then_some(offset - VHOST_USER_CONFIG_OFFSET)
    } else {
        (end <= VHOST_USER_CONFIG_OFFSET).then_some(offset)
    }
}

fn handler_error(e: impl std::error::Error + Send + Sync + 'static) -> VhostUserError {
    VhostUserError::ReqHandlerError(io::Error::other(e))
}

/// One frontend's device state.
pub struct Session<D: VirtioDevice> {
    device: Arc<D>,
    owned: bool,
    acked_features: u64,
    acked_protocol_features: u64,
    memory: GuestMemoryHandle,
    vrings: Vec<Vring>,
    /// The inflight region the frontend keeps for us (SET_INFLIGHT_FD), if any.
    inflight: Option<Arc<InflightMap>>,
    /// The dirty log of a live migration (dirty_log.rs), shared with the queue threads.
    log: DirtyLog,
    /// The current request's refusal has been logged (see [`Session::take_explained`]).
    explained: bool,
    /// The frontend waits for a reply the session cannot give: end the connection.
    end_connection: bool,
    /// Where config changes are announced (SET_BACKEND_REQ_FD), shared with the worker.
    backend_channel: BackendChannel,
}

impl<D: VirtioDevice> Session<D> {
    pub fn new(device: Arc<D>) -> Session<D> {
        let vrings = (0..device.num_queues())
            .map(|_| Vring::new(device.max_queue_size()))
            .collect();
        let memory = GuestMemoryHandle::default();
        device.attach_memory(&memory);
        Session {
            device,
            owned: false,
            acked_features: 0,
            acked_protocol_features: 0,
            memory,
            vrings,
            inflight: None,
            log: DirtyLog::default(),
            explained: false,
            end_connection: false,
            backend_channel: BackendChannel::default(),
        }
    }

    /// The connection's backend request channel (empty until the frontend sends one).
    pub fn backend_channel(&self) -> BackendChannel {
        self.backend_channel.clone()
    }

    /// Whether the request just handled was refused in a way that leaves the frontend waiting
    /// for a reply (a bad SET_LOG_BASE): the connection must end.
    pub fn take_end_connection(&mut self) -> bool {
        std::mem::take(&mut self.end_connection)
    }

    /// Features the session offers: the device's, and vhost-user's own.
    fn offered_features(&self) -> u64 {
        self.device.features()
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
            | VhostUserVirtioFeatures::LOG_ALL.bits()
    }

    /// Warns if guest memory now reaches beyond the dirty log (marks there are lost).
    fn check_log_covers(&mut self) {
        let Some(map) = self.log.map() else { return };
        let end = self.memory.current().end();
        if end > map.covers() {
            vmm_line!(
                warn,
                "guest memory now reaches {end:#x}, beyond the dirty log ({:#x}); pages                  written there are not logged until the frontend sends a larger log",
                map.covers()
            );
        }
    }

    /// Whether the request just handled was refused with a line of its own, so the caller
    /// need not log the error again; clears the note for the next request.
    pub fn take_explained(&mut self) -> bool {
        std::mem::take(&mut self.explained)
    }

    /// Refuses a request the frontend should not have sent.
    fn frontend_error(&mut self, what: &'static str) -> VhostUserError {
        self.explain(format_args!("frontend error: {what}"));
        VhostUserError::InvalidOperation(what)
    }

    /// Logs why the current request is refused.
    fn explain(&mut self, line: std::fmt::Arguments<'_>) {
        vmm_line!(warn, "{line}");
        self.explained = true;
    }

    /// The guest memory shared with this session's queue threads.
    pub fn memory(&self) -> &GuestMemoryHandle {
        &self.memory
    }

    /// The connection ended. With an inflight region the frontend keeps, the rings are
    /// abandoned: what is in flight finishes its I/O but is not returned to the rings, so that
    /// the next backend, which resubmits what the region shows in flight, never meets a head
    /// this one completes late (a clean stop for an upgrade hands over the same way a crash
    /// does). Without one, the rings stop as on RESET_OWNER.
    pub fn disconnected(&mut self) {
        if self.inflight.is_some() {
            for vring in &self.vrings {
                vring.begin_abandon();
            }
        }
        self.stop_all();
    }

    /// Stops every ring (each completes its in-flight requests first) and drops the memory
    /// table. Used on disconnect and on RESET_OWNER.
    pub fn stop_all(&mut self) {
        // All queues drain (and hit their bound) at once, not one after another.
        for vring in &self.vrings {
            vring.begin_stop();
        }
        for vring in &mut self.vrings {
            vring.stop();
            vring.enabled = false;
            vring.set_used_log(None);
        }
        // After the rings: what they wrote while draining is marked.
        self.log.clear();
        let retiring = self.memory.clear();
        self.retire(retiring);
    }

    /// Waits until no in-flight request uses the retiring regions — the reply to the message
    /// that retired them goes out only after this, and from then on nothing touches them.
    /// Past the device's bound the queues cancel those requests (they complete with IOERR),
    /// and the wait goes on until the cancellations have completed.
    fn retire(&mut self, retiring: Retiring) {
        let busy = |pins: &[Arc<RegionPin>]| {
            pins.iter()
                .filter(|p| p.in_flight() > 0)
                .cloned()
                .collect::<Vec<_>>()
        };
        let mut waiting = busy(&retiring.pins);
        if waiting.is_empty() {
            return;
        }
        let requests: usize = waiting.iter().map(|p| p.in_flight()).sum();
        let bound = self.device.retire_timeout();
        let start = Instant::now();
        let mut cancelled = false;
        let mut next_complaint = bound * 2;
        while !waiting.is_empty() {
            let waited = start.elapsed();
            if !cancelled && waited >= bound {
                vmm_line!(
                    warn,
                    "retiring memory: {} request(s) still in flight after {} ms; cancelling them",
                    waiting.iter().map(|p| p.in_flight()).sum::<usize>(),
                    waited.as_millis()
                );
                for vring in &self.vrings {
                    vring.cancel(&waiting);
                }
                cancelled = true;
            } else if cancelled && waited >= next_complaint {
                tracing::error!(
                    "retiring memory: cancelled requests have not completed after {} ms",
                    waited.as_millis()
                );
                next_complaint += bound;
            }
            std::thread::sleep(Duration::from_micros(200));
            waiting = busy(&waiting);
        }
        let waited = start.elapsed();
        let stats = self.memory.stats();
        stats.retire_waits.fetch_add(1, Ordering::Relaxed);
        stats
            .longest_retire_wait_us
            .fetch_max(waited.as_micros() as u64, Ordering::Relaxed);
        let regions: Vec<String> = retiring
            .pins
            .iter()
            .map(|p| format!("{:#x}", p.guest_phys_addr))
            .collect();
        vmm_line!(
            info,
            "retired region(s) {} after waiting {} ms for {requests} request(s){}",
            regions.join(", "),
            waited.as_millis(),
            if cancelled {
                " (cancelled past the bound)"
            } else {
                ""
            }
        );
    }

    fn vring(&mut self, index: u32) -> VhostUserResult<&mut Vring> {
        if index as usize >= self.vrings.len() {
            return Err(self.frontend_error("vring index out of range"));
        }
        Ok(&mut self.vrings[index as usize])
    }

    fn protocol_features_negotiated(&self) -> bool {
        self.acked_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0
    }

    /// Starts ring `index` if it has everything a queue thread needs; called when its kick fd
    /// arrives, which is when the spec says a ring starts.
    fn start_ring(&mut self, index: usize) -> VhostUserResult<()> {
        let generation = self.memory.current();
        let event_idx = self.acked_features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        let device = self.device.clone();
        let memory = self.memory.clone();
        let max_size = self.device.max_queue_size();
        let vring = &self.vrings[index];
        if vring.is_started() {
            return Ok(());
        }
        let (size, base) = (vring.size, vring.base);
        let (Some(desc), Some(avail), Some(used)) = (vring.desc, vring.avail, vring.used) else {
            return Err(self.frontend_error("ring kicked before its addresses were set"));
        };
        if generation.is_empty() {
            return Err(self.frontend_error("ring kicked before any memory table was set"));
        }
        let mut queue = Queue::new(max_size).map_err(handler_error)?;
        queue.try_set_size(size).map_err(handler_error)?;
        queue
            .try_set_desc_table_address(desc)
            .map_err(handler_error)?;
        queue
            .try_set_avail_ring_address(avail)
            .map_err(handler_error)?;
        queue
            .try_set_used_ring_address(used)
            .map_err(handler_error)?;
        queue.set_event_idx(event_idx);
        queue.set_next_avail(base);
        queue.set_ready(true);
        if !queue.is_valid(generation.memory()) {
            return Err(self.frontend_error("ring addresses are not inside guest memory"));
        }
        // After a guest reset or a backend restart, the used index lives in guest memory.
        let used_idx = queue
            .used_idx(generation.memory(), Ordering::Acquire)
            .map_err(handler_error)?;
        queue.set_next_used(used_idx.0);
        // With an inflight region, it says where the avail ring stands and what was left in
        // flight (a previous backend crashed or was killed).
        let recovered = match &self.inflight {
            Some(map) => {
                match map
                    .queue(index, size)
                    .and_then(|region| region.recover(used_idx.0, base))
                {
                    Ok(r) => {
                        if r.next_avail != base || !r.resubmit.is_empty() {
                            let left = r.resubmit.len();
                            let at = r.next_avail;
                            vmm_line!(
                                info,
                                "queue {index}: inflight region: {left} request(s) left in flight; avail ring at {at} (the frontend said {base})"
                            );
                        }
                        queue.set_next_avail(r.next_avail);
                        Some((r.tracker, r.resubmit))
                    }
                    Err(e) => {
                        self.explain(format_args!("queue {index}: {e}"));
                        return Err(handler_error(e));
                    }
                }
            }
            None => None,
        };

        let vring = &mut self.vrings[index];
        let Some(kick) = vring
            .kick
            .as_ref()
            .map(|k| k.try_clone())
            .transpose()
            .map_err(VhostUserError::ReqHandlerError)?
        else {
            return Ok(());
        };
        let span = tracing::Span::current();
        let log = self.log.clone();
        let vring = &mut self.vrings[index];
        vring.recovered = recovered;
        let started = vring.start(queue, kick, index, memory, log, move |running| {
            let queue_loop = device.prepare_queue(running)?;
            std::thread::Builder::new()
                .name(format!("vublk-q{index}"))
                .spawn(move || {
                    let _span = tracing::info_span!(parent: &span, "queue", q = index).entered();
                    queue_loop()
                })
        });
        if let Err(e) = started {
            // The VMM's own thread limit: it can kick the ring again and again.
            if e.raw_os_error() == Some(libc::EAGAIN) {
                vmm_line!(
                    error,
                    "cannot create the thread for queue {index}: the thread limit \
                     (RLIMIT_NPROC or pids.max) is reached"
                );
            } else {
                vmm_line!(error, "cannot start queue {index}: {e}");
            }
            self.explained = true;
            return Err(VhostUserError::ReqHandlerError(e));
        }
        tracing::debug!("queue {index} started: size {size}, base {base}, event_idx {event_idx}");
        Ok(())
    }
}

impl<D: VirtioDevice> Drop for Session<D> {
    fn drop(&mut self) {
        self.stop_all();
    }
}

fn eventfd_from_file(file: File) -> EventFd {
    // SAFETY: the frontend's fd was received with SCM_RIGHTS and is owned solely by `file`;
    // into_raw_fd hands that ownership to the EventFd.
    unsafe { EventFd::from_raw_fd(file.into_raw_fd()) }
}

impl<D: VirtioDevice> VhostUserBackendReqHandlerMut for Session<D> {
    fn set_owner(&mut self) -> VhostUserResult<()> {
        if self.owned {
            return Err(self.frontend_error("SET_OWNER sent twice"));
        }
        self.owned = true;
        Ok(())
    }

    fn reset_owner(&mut self) -> VhostUserResult<()> {
        self.stop_all();
        self.owned = false;
        self.acked_features = 0;
        self.acked_protocol_features = 0;
        self.backend_channel.set(None);
        Ok(())
    }

    fn reset_device(&mut self) -> VhostUserResult<()> {
        self.stop_all();
        self.inflight = None;
        self.acked_features = 0;
        Ok(())
    }

    fn get_features(&mut self) -> VhostUserResult<u64> {
        Ok(self.offered_features())
    }

    fn set_features(&mut self, features: u64) -> VhostUserResult<()> {
        let offered = self.offered_features();
        if features & !offered != 0 {
            let extra = features & !offered;
            self.explain(format_args!(
                "frontend acked features we did not offer: {extra:#x}"
            ));
            return Err(VhostUserError::InvalidParam);
        }
        self.acked_features = features;
        self.device.set_acked_features(features);
        // QEMU waits for this reply before it copies guest memory: logging is on (and every
        // queue thread sees it) before the reply goes out.
        let log_all = features & VhostUserVirtioFeatures::LOG_ALL.bits() != 0;
        if log_all != self.log.log_all() {
            if let Err(e) = self.log.set_log_all(log_all) {
                self.explain(format_args!("cannot turn dirty logging on: {e}"));
                return Err(handler_error(e));
            }
            match (log_all, self.log.map()) {
                (true, Some(map)) => vmm_line!(
                    info,
                    "dirty logging on (migration): the log covers guest memory up to {:#x}",
                    map.covers()
                ),
                (true, None) => vmm_line!(info, "dirty logging on, once a log is sent"),
                (false, _) => vmm_line!(
                    info,
                    "dirty logging off{}",
                    match self.log.missed() {
                        0 => String::new(),
                        n => format!(" ({n} writes fell outside the log)"),
                    }
                ),
            }
        }
        // Without VHOST_USER_F_PROTOCOL_FEATURES, rings are enabled as soon as they start.
        if !self.protocol_features_negotiated() {
            for vring in &mut self.vrings {
                vring.set_enabled(true);
            }
        }
        Ok(())
    }

    fn set_mem_table(
        &mut self,
        ctx: &[VhostUserMemoryRegion],
        files: Vec<File>,
        postcopy_listening: Option<bool>,
    ) -> VhostUserResult<Option<Vec<VhostUserMemoryRegionBase>>> {
        if postcopy_listening.is_some() {
            return Err(self.frontend_error("postcopy is not supported"));
        }
        if ctx.len() != files.len() {
            return Err(self.frontend_error("SET_MEM_TABLE: region and fd counts differ"));
        }
        let (generation, retiring) = match self.memory.set_table(ctx, files) {
            Ok(installed) => installed,
            Err(e) => {
                self.explain(format_args!("SET_MEM_TABLE refused: {e}"));
                return Err(handler_error(e));
            }
        };
        tracing::debug!(
            "memory table generation {} installed ({} regions)",
            generation.id(),
            ctx.len()
        );
        drop(generation);
        self.retire(retiring);
        self.check_log_covers();
        Ok(None)
    }

    fn set_vring_num(&mut self, index: u32, num: u32) -> VhostUserResult<()> {
        let max = self.device.max_queue_size();
        let vring = self.vring(index)?;
        if num == 0 || num > u32::from(max) || !num.is_power_of_two() {
            self.explain(format_args!(
                "queue {index}: size {num} refused (a power of two up to {max})"
            ));
            return Err(VhostUserError::InvalidParam);
        }
        vring.size = num as u16;
        Ok(())
    }

    fn set_vring_addr(
        &mut self,
        index: u32,
        flags: VhostUserVringAddrFlags,
        descriptor: u64,
        used: u64,
        available: u64,
        log: u64,
    ) -> VhostUserResult<()> {
        let generation = self.memory.current();
        let translate = |addr| generation.vmm_to_guest(addr);
        let (desc, avail, used) =
            match (translate(descriptor), translate(available), translate(used)) {
                (Ok(desc), Ok(avail), Ok(used)) => (desc, avail, used),
                (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => {
                    self.explain(format_args!("queue {index}: {e}"));
                    return Err(handler_error(e));
                }
            };
        let vring = self.vring(index)?;
        vring.desc = Some(desc);
        vring.avail = Some(avail);
        vring.used = Some(used);
        // The log address is a guest address (unlike the others), and may arrive while the
        // ring runs: QEMU sets it when a migration starts and clears it when one ends.
        let used_log = flags
            .contains(VhostUserVringAddrFlags::VHOST_VRING_F_LOG)
            .then_some(log);
        vring.set_used_log(used_log);
        Ok(())
    }

    fn set_vring_base(&mut self, index: u32, base: u32) -> VhostUserResult<()> {
        let vring = self.vring(index)?;
        if vring.is_started() {
            return Err(self.frontend_error("SET_VRING_BASE on a running ring"));
        }
        vring.base = base as u16;
        Ok(())
    }

    fn get_vring_base(&mut self, index: u32) -> VhostUserResult<VhostUserVringState> {
        let base = self.vring(index)?.stop();
        tracing::debug!("queue {index} stopped at avail index {base}");
        Ok(VhostUserVringState::new(index, u32::from(base)))
    }

    fn set_vring_kick(&mut self, index: u8, fd: Option<File>) -> VhostUserResult<()> {
        let Some(fd) = fd else {
            return Err(self.frontend_error("polling mode (no kick fd) is not supported"));
        };
        let vring = self.vring(u32::from(index))?;
        // A new kick fd for a running ring: restart its thread with the new one. The call and
        // error fds stay: the frontend does not send them again (QEMU re-sends only the kick
        // when it switches the ring's notifier), and dropping the call fd would lose every
        // interrupt until it did.
        vring.stop_thread();
        vring.kick = Some(eventfd_from_file(fd));
        self.start_ring(usize::from(index))
    }

    fn set_vring_call(&mut self, index: u8, fd: Option<File>) -> VhostUserResult<()> {
        let vring = self.vring(u32::from(index))?;
        let fd = fd.map(eventfd_from_file);
        let signal = fd.is_some();
        vring.set_call(fd);
        // The ring may hold used entries no fd heard of: those a previous backend wrote after
        // the frontend saw it go (a stopping worker completes what it has in flight after its
        // socket closed), and those of requests it left in flight, which complete as soon as
        // the ring starts, maybe before this fd arrives. With EVENT_IDX no later completion
        // signals for them, and the driver would wait for good. A spurious interrupt costs the
        // guest nothing (libvhost-user signals here too).
        if signal {
            vring.call.signal();
        }
        Ok(())
    }

    fn set_vring_err(&mut self, index: u8, fd: Option<File>) -> VhostUserResult<()> {
        let vring = self.vring(u32::from(index))?;
        vring.set_err(fd.map(eventfd_from_file));
        Ok(())
    }

    fn get_protocol_features(&mut self) -> VhostUserResult<VhostUserProtocolFeatures> {
        Ok(VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::INFLIGHT_SHMFD
            | VhostUserProtocolFeatures::LOG_SHMFD
            | VhostUserProtocolFeatures::BACKEND_REQ)
    }

    fn set_protocol_features(&mut self, features: u64) -> VhostUserResult<()> {
        self.acked_protocol_features = features;
        Ok(())
    }

    fn get_queue_num(&mut self) -> VhostUserResult<u64> {
        Ok(self.device.num_queues() as u64)
    }

    fn set_vring_enable(&mut self, index: u32, enable: bool) -> VhostUserResult<()> {
        if !self.protocol_features_negotiated() {
            return Err(self.frontend_error("SET_VRING_ENABLE without protocol features"));
        }
        self.vring(index)?.set_enabled(enable);
        Ok(())
    }

    fn get_config(
        &mut self,
        offset: u32,
        size: u32,
        _flags: VhostUserConfigFlags,
    ) -> VhostUserResult<Vec<u8>> {
        let Some(offset) = config_range(offset, size) else {
            return Err(self.frontend_error("GET_CONFIG beyond the config space"));
        };
        let mut data = vec![0u8; size as usize];
        self.device.read_config(offset, &mut data);
        Ok(data)
    }

    fn set_config(
        &mut self,
        offset: u32,
        buf: &[u8],
        _flags: VhostUserConfigFlags,
    ) -> VhostUserResult<()> {
        let Some(offset) = config_range(offset, buf.len() as u32) else {
            return Err(self.frontend_error("SET_CONFIG beyond the config space"));
        };
        self.device.write_config(offset, buf).map_err(|e| {
            self.explain(format_args!("SET_CONFIG refused: {e}"));
            VhostUserError::ReqHandlerError(e)
        })
    }

    /// SET_BACKEND_REQ_FD (the vhost crate checked BACKEND_REQ was negotiated and that the fd
    /// is a stream socket): kept for announcing config changes.
    fn set_backend_req_fd(&mut self, backend: Backend) {
        tracing::debug!("backend request channel set");
        self.backend_channel.set(Some(backend));
    }

    fn set_gpu_socket(&mut self, _gpu_backend: GpuBackend) -> VhostUserResult<()> {
        Err(self.frontend_error("GPU socket is not supported"))
    }

    fn get_shared_object(&mut self, _uuid: VhostUserSharedMsg) -> VhostUserResult<File> {
        Err(self.frontend_error("shared objects are not supported"))
    }

    fn get_inflight_fd(
        &mut self,
        request: &VhostUserInflight,
    ) -> VhostUserResult<(VhostUserInflight, File)> {
        let made = inflight::create(
            request.num_queues,
            request.queue_size,
            self.device.num_queues(),
            self.device.max_queue_size(),
        );
        match made {
            Ok((file, size)) => Ok((
                VhostUserInflight {
                    mmap_size: size,
                    mmap_offset: 0,
                    num_queues: request.num_queues,
                    queue_size: request.queue_size,
                },
                file,
            )),
            Err(e) => {
                self.explain(format_args!("GET_INFLIGHT_FD refused: {e}"));
                Err(handler_error(e))
            }
        }
    }

    fn set_inflight_fd(&mut self, request: &VhostUserInflight, file: File) -> VhostUserResult<()> {
        if self.vrings.iter().any(Vring::is_started) {
            return Err(self.frontend_error("SET_INFLIGHT_FD while rings run"));
        }
        let mapped = InflightMap::map(
            &file,
            request.mmap_size,
            request.mmap_offset,
            request.num_queues,
            request.queue_size,
            self.device.max_queue_size(),
        );
        match mapped {
            Ok(map) => {
                tracing::debug!(
                    "inflight region set: {} queue(s) of {}",
                    request.num_queues,
                    request.queue_size
                );
                self.inflight = Some(Arc::new(map));
                Ok(())
            }
            Err(e) => {
                self.explain(format_args!("SET_INFLIGHT_FD refused: {e}"));
                Err(handler_error(e))
            }
        }
    }

    fn get_max_mem_slots(&mut self) -> VhostUserResult<u64> {
        Ok(MAX_MEM_SLOTS as u64)
    }

    fn add_mem_region(
        &mut self,
        region: &VhostUserSingleMemoryRegion,
        fd: File,
        postcopy_listening: Option<bool>,
    ) -> VhostUserResult<Option<VhostUserMemoryRegionBase>> {
        if postcopy_listening.is_some() {
            return Err(self.frontend_error("postcopy is not supported"));
        }
        let generation = match self.memory.add_region(region, fd) {
            Ok(generation) => generation,
            Err(e) => {
                self.explain(format_args!("ADD_MEM_REG refused: {e}"));
                return Err(handler_error(e));
            }
        };
        tracing::debug!(
            "memory generation {}: added region at {:#x} ({:#x} bytes)",
            generation.id(),
            { region.guest_phys_addr },
            { region.memory_size }
        );
        self.check_log_covers();
        Ok(None)
    }

    fn remove_mem_region(&mut self, region: &VhostUserSingleMemoryRegion) -> VhostUserResult<()> {
        let (generation, retiring) = match self.memory.remove_region(region) {
            Ok(removed) => removed,
            Err(e) => {
                self.explain(format_args!("REM_MEM_REG refused: {e}"));
                return Err(handler_error(e));
            }
        };
        tracing::debug!(
            "memory generation {}: removed region at {:#x}",
            generation.id(),
            { region.guest_phys_addr }
        );
        drop(generation);
        self.retire(retiring);
        Ok(())
    }

    fn set_device_state_fd(
        &mut self,
        _direction: VhostTransferStateDirection,
        _phase: VhostTransferStatePhase,
        _fd: File,
    ) -> VhostUserResult<Option<File>> {
        Err(self.frontend_error("device state transfer is not supported"))
    }

    fn check_device_state(&mut self) -> VhostUserResult<()> {
        Err(self.frontend_error("device state transfer is not supported"))
    }

    fn get_shmem_config(&mut self) -> VhostUserResult<VhostUserShMemConfig> {
        Err(self.frontend_error("shared memory regions are not supported"))
    }

    /// SET_LOG_BASE: the dirty log. A log that cannot be used ends the connection: the
    /// frontend waits for a reply that only a usable log gets (the vhost crate sends it), and
    /// migrating without one would lose pages.
    ///
    /// SET_LOG_FD (an eventfd the backend would signal after logging, without LOG_SHMFD) has no
    /// hook in the vhost crate's backend handler (0.18): it is refused there, which ends the
    /// connection. QEMU never sends it.
    fn set_log_base(&mut self, log: &VhostUserLog, file: File) -> VhostUserResult<()> {
        let (size, offset) = (log.mmap_size, log.mmap_offset);
        let needed = self.memory.current().end();
        match LogMap::map(&file, size, offset, needed) {
            Ok(map) => {
                let covers = map.covers();
                if let Err(e) = self.log.install(map) {
                    self.explain(format_args!("SET_LOG_BASE refused: {e}"));
                    self.end_connection = true;
                    return Err(handler_error(e));
                }
                tracing::debug!(
                    "dirty log installed: {size:#x} bytes, covering guest memory up to {covers:#x}"
                );
                Ok(())
            }
            Err(e) => {
                self.explain(format_args!(
                    "SET_LOG_BASE refused: {e}; closing the connection (the frontend waits \
                     for a reply)"
                ));
                self.end_connection = true;
                Err(handler_error(e))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::config_range;

    #[test]
    fn config_offsets_in_both_forms() {
        assert_eq!(config_range(0, 60), Some(0));
        assert_eq!(config_range(34, 2), Some(34));
        assert_eq!(config_range(0x100, 60), Some(0));
        assert_eq!(config_range(0x100 + 32, 1), Some(32));
        assert_eq!(config_range(0xf0, 0x20), None, "straddles the two forms");
        assert_eq!(config_range(0x100, 0x1000), None);
        assert_eq!(config_range(u32::MAX, 2), None);
    }
}
